//! stoa's integration tests: real users, real processes, a real `stoa serve`.
//!
//! As root they create the users they need (`stoa-t-*`) and remove them at the end; without
//! root every test reports itself ignored with the reason, never a silent pass. Tests run
//! one at a time: several of them kill daemons and count processes.
#![forbid(unsafe_code)]

mod agents_e2e;
mod approvals_e2e;
mod cli_human;
mod confine;
mod core;
mod harness;
mod limits;
mod login;
mod privacy;
mod security_broker;
mod security_front;
mod security_store;
mod sessions;
mod shares;
mod terminal_browser;
mod terminal_cli;
mod terminals;
mod upgrade;
mod viewer;
mod workers;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!(
            "stoa integration tests: SKIPPED, they need root (real users, real privilege drops)"
        );
    }
    let users = root.then(harness::TestUsers::create);
    let trials = [
        core::TESTS,
        limits::TESTS,
        login::TESTS,
        privacy::TESTS,
        security_broker::TESTS,
        sessions::TESTS,
        shares::TESTS,
        agents_e2e::TESTS,
        approvals_e2e::TESTS,
        terminals::TESTS,
        terminal_cli::TESTS,
        terminal_browser::TESTS,
        security_store::TESTS,
        security_front::TESTS,
        workers::TESTS,
        cli_human::TESTS,
        confine::TESTS,
        upgrade::TESTS,
    ]
    .concat()
    .into_iter()
    .map(|(name, test): (&str, TestFn)| {
        Trial::ignorable_test(name, move || {
            if !root {
                return Ok(Completion::ignored_with("needs root"));
            }
            match test() {
                Ok(()) => Ok(Completion::Completed),
                // A test whose feature is not in this tree yet says so, and is not a pass.
                Err(e) if e.message().is_some_and(|m| m.starts_with("WAITING:")) => Ok(
                    Completion::ignored_with(e.message().unwrap_or_default().to_string()),
                ),
                Err(e) => Err(e),
            }
        })
    })
    .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(users);
    conclusion.exit();
}
