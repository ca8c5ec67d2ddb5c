//! What the daemon may ask, and when: the broker's dispatch table (after OpenSSH's
//! `monitor.c` `mon_dispatch` with its PERMIT/ONCE flags).
//!
//! | request        | before `Hello`  | after `Hello`                                        |
//! |----------------|-----------------|------------------------------------------------------|
//! | `Hello`        | once            | violation                                            |
//! | `Ready`        | violation       | allowed                                              |
//! | `Authenticate` | violation       | allowed                                              |
//! | `Spawn`        | violation       | allowed; credential and policy checked per request   |
//! | `CheckDir`     | violation       | allowed; credential checked                          |
//! | `*Secret(s)`   | violation       | allowed; credential checked, values never returned   |
//! | `Kill`         | violation       | handle must exist and not be released                |
//! | `Release`      | violation       | handle must exist and not be released                |
//! | `ListHandles`  | violation       | allowed                                              |
//! | `Adopt`        | violation       | handle must exist and not be released                |
//! | `Stats`        | violation       | allowed                                              |
//!
//! A violation ends the link: the broker logs it, kills and restarts the daemon, and keeps
//! every executor running. Handle checks happen in the handlers, against broker state.
#![forbid(unsafe_code)]

use crate::wire::RequestBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connected, no `Hello` yet.
    Fresh,
    /// `Hello` accepted.
    Ready,
}

/// Whether `body` may be sent in `state`; the error says why not.
pub fn permit(state: LinkState, body: &RequestBody) -> Result<(), &'static str> {
    match (state, body) {
        (LinkState::Fresh, RequestBody::Hello { .. }) => Ok(()),
        (LinkState::Fresh, _) => Err("request before Hello"),
        (LinkState::Ready, RequestBody::Hello { .. }) => Err("second Hello"),
        (LinkState::Ready, _) => Ok(()),
    }
}

pub fn name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::Hello { .. } => "Hello",
        RequestBody::Ready => "Ready",
        RequestBody::Authenticate { .. } => "Authenticate",
        RequestBody::Spawn(_) => "Spawn",
        RequestBody::CheckDir { .. } => "CheckDir",
        RequestBody::SetSecret { .. } => "SetSecret",
        RequestBody::DeleteSecret { .. } => "DeleteSecret",
        RequestBody::ListSecrets { .. } => "ListSecrets",
        RequestBody::Kill { .. } => "Kill",
        RequestBody::Release { .. } => "Release",
        RequestBody::ListHandles => "ListHandles",
        RequestBody::Adopt { .. } => "Adopt",
        RequestBody::Stats => "Stats",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_first_and_once() {
        let hello = RequestBody::Hello { protocol: 1 };
        assert!(permit(LinkState::Fresh, &hello).is_ok());
        assert!(permit(LinkState::Ready, &hello).is_err());
        assert!(permit(LinkState::Fresh, &RequestBody::ListHandles).is_err());
        assert!(permit(LinkState::Ready, &RequestBody::ListHandles).is_ok());
    }
}
