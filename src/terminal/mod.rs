//! Terminals: the `stoa.term.v1` protocol shared by the daemon (server side, in
//! `daemon::terminals`), the CLI (`stoa terminal`) and the web page.
#![forbid(unsafe_code)]

pub mod protocol;
