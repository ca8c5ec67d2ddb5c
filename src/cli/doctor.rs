//! `stoa doctor`: checks a real installation and says how to fix what it finds.
#![forbid(unsafe_code)]

use std::process::ExitCode;

pub fn run() -> ExitCode {
    eprintln!("stoa doctor: not written yet");
    ExitCode::FAILURE
}
