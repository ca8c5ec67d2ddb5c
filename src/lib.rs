//! stoa: each person's AI-agent sessions and web terminals, run as their own Unix user.
//!
//! Three processes (see DESIGN.md):
//! * [`broker`]: root, single-threaded; the only process that switches users.
//! * [`daemon`]: the service user; HTTP, and everything else that faces the network.
//! * the executor (`executor/`): the one program the broker runs as a user.
//!
//! [`wire`] is the protocol between the first two. Every system call that Rust cannot
//! check for memory safety is in `stoa_executor::sys`; this crate forbids such code.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod terminal;
pub mod wire;
