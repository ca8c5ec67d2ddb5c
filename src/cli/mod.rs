//! The `stoa` command line.
#![forbid(unsafe_code)]

pub mod client;
pub mod config_cmd;
pub mod doctor;
pub mod escape;
pub mod local_login;
pub mod sessions;
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
    },
    /// Run a command as a Unix user through stoa; prints its output and exits with its code.
    Exec {
        /// The Unix user to run as.
        #[arg(long, short)]
        user: String,
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
    match cli.command {
        Command::Serve {
            broker_config,
            config: daemon_config,
        } => {
            let opts = crate::broker::ServeOptions {
                broker_config: broker_config.unwrap_or_else(config::default_broker_config),
                config: daemon_config.unwrap_or_else(config::default_daemon_config),
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

fn exec(
    user: String,
    cwd: Option<String>,
    tty: bool,
    env: Vec<(String, String)>,
    timeout: Option<f64>,
    command: Vec<String>,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("stoa exec: {msg}");
        ExitCode::from(STOA_ERROR)
    };
    let client = match client::Client::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let stdin = if std::io::stdin().is_terminal() {
        None
    } else {
        let mut data = String::new();
        match std::io::stdin().read_to_string(&mut data) {
            Ok(_) if !data.is_empty() => Some(data),
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
        "stdin": stdin,
        "timeout_ms": timeout.map(|t| (t * 1000.0) as u64),
    });
    let reply = match client.post("/exec", &body) {
        Ok(r) => r,
        Err(e) => return fail(e.message),
    };
    let _ = std::io::stdout().write_all(reply["stdout"].as_str().unwrap_or("").as_bytes());
    let _ = std::io::stderr().write_all(reply["stderr"].as_str().unwrap_or("").as_bytes());
    if let Some(error) = reply["error"].as_str() {
        eprintln!("stoa exec: {error}");
    }
    if reply["truncated"].as_bool() == Some(true) {
        eprintln!("stoa exec: output truncated");
    }
    if reply["timed_out"].as_bool() == Some(true) {
        eprintln!("stoa exec: timed out");
    }
    let code = match (reply["exit_code"].as_i64(), reply["signal"].as_i64()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => STOA_ERROR as i64,
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
