//! The executor's program: read the [`Job`] from the control socket on fd 3 and replace
//! this process with it. `stoa-executor` is only this; the `stoa` binary runs it too when
//! started as `stoa-executor` (argv[0]), for a build that has no `stoa-executor` beside it
//! (`cargo run -- serve`).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use crate::codec;
use crate::job::{Job, Report, CONTROL_FD};
use crate::sys;

/// Runs the job on the control socket (fd 3); returns only when it could not be run.
pub fn main() -> ExitCode {
    let control = match sys::take_inherited_fd(CONTROL_FD) {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("stoa-executor: no control socket on fd {CONTROL_FD} ({e}); this program is started by the stoa broker, not by hand");
            return ExitCode::from(2);
        }
    };
    let job: Job = match codec::read_frame(&mut &control) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("stoa-executor: cannot read the job: {e}");
            return ExitCode::from(2);
        }
    };
    let (program, mut command) = match job {
        Job::Exec { argv, env } if !argv.is_empty() => {
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]).envs(env);
            (argv[0].clone(), command)
        }
        Job::Exec { .. } => {
            eprintln!("stoa-executor: empty argv");
            return ExitCode::from(2);
        }
        Job::Shell => {
            let shell = std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into());
            let mut command = Command::new(&shell);
            command.arg0(login_name(&shell));
            (shell.to_string_lossy().into_owned(), command)
        }
    };
    // exec only returns on failure; the control socket is close-on-exec, so on success the
    // daemon reads end-of-file.
    let error = command.exec();
    let _ = codec::write_frame(
        &mut &control,
        &Report::ExecFailed {
            program: program.clone(),
            error: error.to_string(),
        },
    );
    eprintln!("stoa-executor: cannot run {program}: {error}");
    ExitCode::from(match error.kind() {
        io::ErrorKind::NotFound => 127,
        _ => 126,
    })
}

/// A login shell's argv[0]: its file name with a leading dash.
fn login_name(shell: &std::ffi::OsStr) -> OsString {
    let base = shell
        .as_bytes()
        .rsplit(|b| *b == b'/')
        .next()
        .unwrap_or(b"sh");
    let mut name = OsString::from("-");
    name.push(std::ffi::OsStr::from_bytes(base));
    name
}
