#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    // The broker runs this binary as the executor when no `stoa-executor` was built beside
    // it (`policy::default_executor_path`): nothing else may run first.
    if std::env::args_os()
        .next()
        .is_some_and(|a| a == "stoa-executor")
    {
        return stoa_executor::run::main();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Readable lines for a person at a terminal; JSON objects (one a line, every field
    // escaped) for the journal and log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
    stoa::cli::main()
}
