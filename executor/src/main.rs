//! `stoa-executor`: the only program stoa's broker runs as a user.
//!
//! By the time it starts, the broker has already switched to the user, cleared every
//! capability, set no_new_privs and entered the working directory. The executor reads its
//! [`Job`] from the control socket on fd 3 and replaces itself with the program. It does
//! nothing else, so it starts fast: no async runtime, no configuration, no allocation
//! beyond the job itself.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    stoa_executor::run::main()
}
