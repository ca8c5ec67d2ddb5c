//! Issue 4: terminals (terminal_browser).
#![forbid(unsafe_code)]

pub const TESTS: &[(&str, crate::TestFn)] = &[];
