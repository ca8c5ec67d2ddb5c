//! `stoa terminal open|list|attach|kill`: a terminal on the server, in this terminal.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum TerminalCommand {
    /// Not written yet.
    List,
}

pub fn run(_cmd: TerminalCommand) -> ExitCode {
    eprintln!("stoa terminal: not written yet");
    ExitCode::FAILURE
}
