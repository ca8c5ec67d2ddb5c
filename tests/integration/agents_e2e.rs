//! Issue 3: the real Claude Code CLI, end to end, against the local mock of the model API.
#![forbid(unsafe_code)]

pub const TESTS: &[(&str, crate::TestFn)] = &[];
