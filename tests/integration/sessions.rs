//! Issue 3: sessions, prompts and agents through the executor, broker-verified identity.
#![forbid(unsafe_code)]

pub const TESTS: &[(&str, crate::TestFn)] = &[];
