//! The `stoa` command line.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod client;
pub mod config_cmd;
pub mod doctor;
pub mod escape;
pub mod local_login;
pub mod sessions;
pub mod table;
pub mod terminal;
pub mod users;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config;

/// Exit code for stoa's own errors (as `env` and container runtimes do), so it cannot be
/// mistaken for the command's.
const STOA_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "stoa",
    version,
    about = "Run each person's agent sessions and terminals as their own Unix user"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run stoa. As root: the broker, which starts the unprivileged daemon. Otherwise:
    /// single-user mode, with no isolation.
    Serve {
        /// The broker's policy file.
        #[arg(long, env = "STOA_BROKER_CONFIG")]
        broker_config: Option<PathBuf>,
        /// The daemon's configuration file.
        #[arg(long, env = "STOA_CONFIG")]
        config: Option<PathBuf>,
        /// Given by the broker to itself when it upgrades in place (`stoa daemon upgrade`).
        #[arg(long, hide = true)]
        resume_state_fd: Option<i32>,
    },
    /// The check a new binary makes of a running broker's state before that broker execs it
    /// (run by the broker, with the state on fd 3).
    #[command(name = "__broker-check-state", hide = true)]
    InternalBrokerCheckState {
        #[arg(long)]
        broker_config: PathBuf,
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a command as a Unix user through stoa; prints its output and exits with its code.
    Exec {
        /// The Unix user to run as (default: yours; root must name one).
        #[arg(long, short)]
        user: Option<String>,
        /// Working directory (default: the user's home).
        #[arg(long)]
        cwd: Option<String>,
        /// Run on a pseudo-terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Extra environment, NAME=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Check this machine's installation and say how to fix what is wrong.
    Doctor,
    /// API users and their tokens (as root).
    #[command(subcommand)]
    User(users::UserCommand),
    /// Agent sessions.
    #[command(subcommand)]
    Session(sessions::SessionCommand),
    /// Tasks (one prompt's run).
    #[command(subcommand)]
    Task(sessions::TaskCommand),
    /// What your agents ask permission for, waiting for your answer.
    #[command(subcommand)]
    Approvals(approvals::ApprovalCommand),
    /// Your secrets for agents (API keys), kept by the broker.
    #[command(subcommand)]
    Secret(sessions::SecretCommand),
    /// The daemon's configuration file.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// The running daemon.
    #[command(subcommand)]
    Daemon(sessions::DaemonCommand),
    /// Terminals on the server, as your Unix user.
    #[command(subcommand)]
    Terminal(terminal::TerminalCommand),
    /// The daemon (started by the broker, not by hand).
    #[command(name = "__daemon", hide = true)]
    InternalDaemon {
        #[arg(long)]
        config: PathBuf,
        /// The state directory the broker resolved and created.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// One log-in attempt checked with PAM (started by the broker, not by hand).
    #[command(name = "__pam-login", hide = true)]
    InternalPamLogin,
    /// A user's worker (started by the broker as that user, not by hand).
    #[command(name = "__worker", hide = true)]
    InternalWorker {
        /// The user's store directory the broker made.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `terminal` restores the tty before it ends, and the daemons handle their own pipes:
    // every other command may just end on a closed pipe.
    if !matches!(
        cli.command,
        Command::Terminal(_)
            | Command::Serve { .. }
            | Command::InternalDaemon { .. }
            | Command::InternalWorker { .. }
    ) {
        let _ = stoa_executor::sys::default_sigpipe();
    }
    match cli.command {
        Command::InternalBrokerCheckState {
            broker_config,
            config,
        } => match crate::broker::upgrade::check_state_main(&broker_config, &config) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("refused: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            broker_config,
            config: daemon_config,
            resume_state_fd,
        } => {
            let opts = crate::broker::ServeOptions {
                broker_config: broker_config.unwrap_or_else(config::default_broker_config),
                config: daemon_config.unwrap_or_else(config::default_daemon_config),
                resume_state_fd,
            };
            match crate::broker::serve(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("stoa serve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::InternalDaemon { config, state_dir } => {
            match crate::daemon::front_main::run(&config, state_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("daemon: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::InternalPamLogin => crate::broker::login_helper::run(),
        Command::InternalWorker { state_dir } => match crate::daemon::worker::run(state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("worker: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Doctor => doctor::run(),
        Command::User(cmd) => users::run(cmd),
        Command::Session(cmd) => sessions::session(cmd),
        Command::Task(cmd) => sessions::task(cmd),
        Command::Approvals(cmd) => approvals::run(cmd),
        Command::Secret(cmd) => sessions::secret(cmd),
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Daemon(cmd) => sessions::daemon(cmd),
        Command::Terminal(cmd) => terminal::run(cmd),
        Command::Exec {
            user,
            cwd,
            tty,
            env,
            timeout,
            command,
        } => exec(user, cwd, tty, env, timeout, command),
    }
}

/// Shells that, with no command, wait for someone to type: not what `exec -t` is for.
const INTERACTIVE_SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "fish", "ksh", "tcsh", "csh"];

/// A shell started with nothing to run: it would read commands from a terminal.
fn interactive_shell(command: &[String]) -> bool {
    let name = command[0].rsplit('/').next().unwrap_or("");
    let name = name.trim_start_matches('-');
    INTERACTIVE_SHELLS.contains(&name)
        && command[1..]
            .iter()
            .all(|a| a.starts_with('-') && !a.contains('c') && a != "-s")
}

fn exec(
    user: Option<String>,
    cwd: Option<String>,
    tty: bool,
    env: Vec<(String, String)>,
    timeout: Option<f64>,
    command: Vec<String>,
) -> ExitCode {
    use base64::Engine;
    let fail = |msg: String| {
        eprintln!("stoa exec: {msg}");
        ExitCode::from(STOA_ERROR)
    };
    let uid = nix::unistd::getuid();
    let Some(user) = user.or_else(|| {
        (!uid.is_root())
            .then(|| {
                nix::unistd::User::from_uid(uid)
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .flatten()
    }) else {
        return fail("name the Unix user to run as with --user (root has no default)".into());
    };
    if tty && std::io::stdin().is_terminal() && interactive_shell(&command) {
        return fail(format!(
            "`exec -t` runs a command to its end and does not pass your keys on; for an \
             interactive shell use: stoa terminal open --user {user}"
        ));
    }
    if let Some(t) = timeout {
        if !(t.is_finite() && t > 0.0) {
            return fail(format!(
                "--timeout must be a positive number of seconds, not {t}"
            ));
        }
    }
    let client = match client::Client::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let stdin = if std::io::stdin().is_terminal() {
        None
    } else {
        let mut data = Vec::new();
        match std::io::stdin().read_to_end(&mut data) {
            Ok(_) if !data.is_empty() => {
                Some(base64::engine::general_purpose::STANDARD.encode(data))
            }
            Ok(_) => None,
            Err(e) => return fail(format!("cannot read stdin: {e}")),
        }
    };
    let size = tty.then(|| {
        use std::os::fd::AsFd;
        let (rows, cols) = stoa_executor::sys::window_size(std::io::stdout().as_fd())
            .ok()
            .filter(|(r, c)| *r > 0 && *c > 0)
            .unwrap_or((24, 80));
        json!({ "rows": rows, "cols": cols })
    });
    let body = json!({
        "unix_user": user,
        "argv": command,
        "cwd": cwd,
        "env": env.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "tty": size,
        "stdin_base64": stdin,
        "timeout_ms": timeout.map(|t| (t * 1000.0).ceil() as u64),
    });
    let mut reply = match client.post_stream("/exec", &body, crate::daemon::exec::STREAM_TYPE) {
        Ok(r) => r,
        Err(e) => return fail(e.message),
    };
    let end = match relay_exec_stream(&mut reply) {
        Ok(end) => end,
        Err(e) => return fail(e),
    };
    if let Some(error) = end["error"].as_str() {
        eprintln!("stoa exec: {}", escape::field(error));
    }
    if end["truncated"].as_bool() == Some(true) {
        eprintln!("stoa exec: output truncated (past the daemon's exec_output_limit, or held open after the command exited)");
    }
    if end["timed_out"].as_bool() == Some(true) {
        eprintln!("stoa exec: timed out");
    }
    if let Some(limit) = end["limit_hit"].as_str() {
        eprintln!(
            "stoa exec: the command ran into a limit: {}",
            escape::field(limit)
        );
    }
    let code = match (end["exit_code"].as_i64(), end["signal"].as_i64()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => STOA_ERROR as i64,
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Largest record a streamed exec reply may carry (the worker reads 16 KiB at a time; the
/// end record is a small JSON object).
const MAX_EXEC_RECORD: usize = 1 << 20;

/// Copies a streamed exec reply's output to our stdout and stderr as it comes, unchanged;
/// returns its end record.
fn relay_exec_stream(reply: &mut impl Read) -> Result<serde_json::Value, String> {
    use crate::daemon::exec::{END, STDERR, STDOUT};
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; 5];
        reply.read_exact(&mut head).map_err(|e| {
            format!("the connection to the daemon broke before the command ended: {e}")
        })?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_EXEC_RECORD {
            return Err(format!(
                "the daemon sent a record of {len} bytes (most {MAX_EXEC_RECORD})"
            ));
        }
        payload.resize(len, 0);
        reply
            .read_exact(&mut payload)
            .map_err(|e| format!("the connection to the daemon broke mid-record: {e}"))?;
        match head[0] {
            // A closed stdout ends us (SIGPIPE), as for any command in a pipeline.
            STDOUT => {
                let _ = stdout.write_all(&payload).and_then(|()| stdout.flush());
            }
            STDERR => {
                let _ = stderr.write_all(&payload).and_then(|()| stderr.flush());
            }
            END => {
                return serde_json::from_slice(&payload)
                    .map_err(|e| format!("unreadable end record from the daemon: {e}"))
            }
            kind => return Err(format!("the daemon sent a record of unknown kind {kind}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// Every visible flag and argument of every command says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "stoa",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn interactive_shells_are_told_apart_from_commands() {
        assert!(interactive_shell(&words("bash")));
        assert!(interactive_shell(&words("/bin/sh")));
        assert!(interactive_shell(&words("bash -l")));
        assert!(interactive_shell(&words("zsh -i")));
        assert!(!interactive_shell(&words("bash -c ls")));
        assert!(!interactive_shell(&words("bash -lc ls")));
        assert!(!interactive_shell(&words("sh script.sh")));
        assert!(!interactive_shell(&words("tty")));
        assert!(!interactive_shell(&words("vim")));
    }

    #[test]
    fn exec_streams_are_relayed_and_bad_ones_refused() {
        use crate::daemon::exec::{record, END, STDOUT};
        let mut good = Vec::new();
        good.extend_from_slice(&record(STDOUT, b""));
        good.extend_from_slice(&record(END, br#"{"exit_code":3}"#));
        let end = relay_exec_stream(&mut &good[..]).unwrap();
        assert_eq!(end["exit_code"], 3);
        // Cut before END, an unknown kind, a record too large.
        let cut = record(STDOUT, b"");
        assert!(relay_exec_stream(&mut &cut[..])
            .unwrap_err()
            .contains("broke"));
        let odd = record(9, b"x");
        assert!(relay_exec_stream(&mut &odd[..])
            .unwrap_err()
            .contains("unknown kind"));
        let huge = [STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(relay_exec_stream(&mut &huge[..])
            .unwrap_err()
            .contains("bytes"));
    }
}
