//! The `stoa-executor` library: what every stoa process shares below the protocol level.
//!
//! * [`codec`]: the length-prefixed bincode frame used on every stoa channel.
//! * [`job`]: the job the broker hands an executor on its control socket (fd 3).
//! * [`run`]: the executor's program (the `stoa-executor` binary's `main`).
//! * [`sys`]: every system call in stoa that Rust cannot check, each behind a safe function.
//!
//! The broker (in the `stoa` crate) and the `stoa-executor` binary both link this crate,
//! which is why that one module lives here and not in `stoa` itself.
#![deny(unsafe_code)]

pub mod agents;
pub mod codec;
pub mod job;
pub mod run;
pub mod sys;
