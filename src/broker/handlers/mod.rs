//! The request handlers, one file per family; `table.rs` says which runs when, and has
//! checked what each must prove before it is called.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod dirs;
pub mod handles;
pub mod launch;
pub mod login;
pub mod secrets;
pub mod session;
pub mod shares;
pub mod workers;
