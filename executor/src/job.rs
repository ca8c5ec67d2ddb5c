//! The executor's control channel (fd 3): what it is asked to run, and what it reports.
//!
//! The broker writes the [`Job`] into the socket before the executor starts, so what runs
//! is exactly what the broker checked and logged; the daemon holds the other end.
#![forbid(unsafe_code)]

use bincode::{Decode, Encode};

/// The control socket's fd number in the executor.
pub const CONTROL_FD: i32 = 3;

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Run `argv` in place of the executor (`argv[0]` is looked up in the broker-built PATH),
    /// with `env` added to the environment (the user's secrets: they travel here so they
    /// never show in argv or in the broker's environment).
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// The user's login shell (`$SHELL`, from the passwd entry) as a login shell.
    Shell,
}

/// What the executor says back on the control socket. Success is silence: the socket is
/// close-on-exec, so the daemon reads end-of-file once the program has replaced the executor.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The program could not be started; the executor exits 127 (not found) or 126.
    ExecFailed { program: String, error: String },
}
