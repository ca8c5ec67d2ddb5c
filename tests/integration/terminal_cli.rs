//! Issue 4: terminals (terminal_cli).
#![forbid(unsafe_code)]

pub const TESTS: &[(&str, crate::TestFn)] = &[];
