//! Issue 4: terminals (terminals).
#![forbid(unsafe_code)]

pub const TESTS: &[(&str, crate::TestFn)] = &[];
