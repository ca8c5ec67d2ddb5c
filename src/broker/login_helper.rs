//! `stoa __pam-login`: one log-in attempt, in a process of its own. The broker starts it
//! (root, no new privileges, killed at its deadline) for each `Login`, so PAM modules load
//! neither in the long-lived broker nor in the network-facing front, and a module that
//! hangs holds up only this attempt (the way `cockpit-session` and sshd's monitor do it).
//!
//! stdin: `username NUL password NUL rhost NUL service-uid NUL` (at most [`MAX_INPUT`]
//! bytes; the service uid empty in single-user mode).
//! stdout: one [`Answer`] line. The exit code carries nothing.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::ExitCode;

use stoa_executor::sys::pam;

/// The PAM service: `/etc/pam.d/stoa` (installed by the packages); where it does not exist,
/// PAM itself uses `/etc/pam.d/other`.
pub const SERVICE: &str = "stoa";
/// Most bytes read from stdin.
pub const MAX_INPUT: usize = 4096;
/// Most bytes of the answer line the broker reads.
pub const MAX_ANSWER: usize = 1024;

/// What the helper answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// Wrong password or unknown user (one answer for both).
    Credentials,
    /// The password must be changed before logging in.
    PasswordExpired,
    /// The account may not log in (expired, refused by the account policy): PAM's words.
    Account(String),
    /// PAM could not check: its words.
    Unavailable(String),
    /// Never checked: the name is root's (`root`) or the service user's (`service-user`).
    Refused(String),
}

impl Answer {
    pub fn line(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(400)
                .collect()
        };
        match self {
            Answer::Ok => "ok\n".into(),
            Answer::Credentials => "credentials\n".into(),
            Answer::PasswordExpired => "expired\n".into(),
            Answer::Account(w) => format!("account {}\n", clean(w)),
            Answer::Unavailable(w) => format!("unavailable {}\n", clean(w)),
            Answer::Refused(rule) => format!("refused {}\n", clean(rule)),
        }
    }

    /// The helper's answer, from what it wrote (a whole line), or `None`.
    pub fn parse(bytes: &[u8]) -> Option<Answer> {
        let text = std::str::from_utf8(bytes).ok()?;
        let line = text.strip_suffix('\n')?;
        if line.contains('\n') {
            return None;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Some(match word {
            "ok" => Answer::Ok,
            "credentials" => Answer::Credentials,
            "expired" => Answer::PasswordExpired,
            "account" => Answer::Account(rest.into()),
            "unavailable" => Answer::Unavailable(rest.into()),
            "refused" if rest == "root" || rest == "service-user" => Answer::Refused(rest.into()),
            _ => return None,
        })
    }
}

/// The helper's main.
pub fn run() -> ExitCode {
    let mut input = Vec::with_capacity(256);
    let read = std::io::stdin()
        .take(MAX_INPUT as u64 + 1)
        .read_to_end(&mut input);
    let answer = match read {
        Ok(_) if input.len() <= MAX_INPUT => check(&input),
        Ok(_) => Answer::Unavailable("the request was too long".into()),
        Err(e) => Answer::Unavailable(format!("cannot read the request: {e}")),
    };
    input.fill(0);
    let mut out = std::io::stdout();
    let _ = out
        .write_all(answer.line().as_bytes())
        .and_then(|()| out.flush());
    ExitCode::SUCCESS
}

fn check(input: &[u8]) -> Answer {
    let mut fields = input.split(|b| *b == 0);
    let (Some(user), Some(password), Some(rhost), Some(service), Some(rest)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Answer::Unavailable("malformed request".into());
    };
    if !rest.is_empty() || fields.next().is_some() {
        return Answer::Unavailable("malformed request".into());
    }
    let Ok(user) = std::str::from_utf8(user) else {
        return Answer::Credentials;
    };
    let rhost = std::str::from_utf8(rhost).ok().filter(|r| !r.is_empty());
    // Root's and the service user's passwords are never checked (looked up here, in this
    // process, so a slow directory service holds up only this attempt).
    let service_uid: Option<u32> = std::str::from_utf8(service)
        .ok()
        .and_then(|s| s.parse().ok());
    if let Ok(Some(u)) = nix::unistd::User::from_name(user) {
        if u.uid.is_root() {
            return Answer::Refused("root".into());
        }
        if Some(u.uid.as_raw()) == service_uid {
            return Answer::Refused("service-user".into());
        }
    }
    match pam::authenticate(SERVICE, user, password, rhost) {
        Ok(()) => Answer::Ok,
        Err(pam::Refused::Credentials) => Answer::Credentials,
        Err(pam::Refused::PasswordExpired) => Answer::PasswordExpired,
        Err(pam::Refused::Account(w)) => Answer::Account(w),
        Err(pam::Refused::Unavailable(w)) => Answer::Unavailable(w),
    }
}

/// What the broker writes on the helper's stdin.
pub fn request(
    username: &str,
    password: &str,
    rhost: Option<&str>,
    service_uid: Option<u32>,
) -> Vec<u8> {
    let service = service_uid.map(|u| u.to_string()).unwrap_or_default();
    let mut bytes = Vec::with_capacity(username.len() + password.len() + 64);
    for part in [username, password, rhost.unwrap_or(""), &service] {
        bytes.extend_from_slice(part.as_bytes());
        bytes.push(0);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_nothing_else_parses() {
        for a in [
            Answer::Ok,
            Answer::Credentials,
            Answer::PasswordExpired,
            Answer::Account("account expired".into()),
            Answer::Unavailable("no libpam".into()),
            Answer::Refused("root".into()),
        ] {
            assert_eq!(Answer::parse(a.line().as_bytes()), Some(a));
        }
        assert_eq!(Answer::parse(b"ok"), None, "a line ends with a newline");
        assert_eq!(Answer::parse(b"ok\nok\n"), None);
        assert_eq!(Answer::parse(b"yes\n"), None);
        // Words from PAM cannot break the line.
        let a = Answer::Account("two\nlines".into());
        assert_eq!(
            Answer::parse(a.line().as_bytes()),
            Some(Answer::Account("two lines".into()))
        );
    }

    #[test]
    fn a_request_with_a_nul_in_a_field_is_malformed() {
        assert_eq!(
            check(b"alice\0pa\0ss\0host\0999\0"),
            Answer::Unavailable("malformed request".into())
        );
        assert_eq!(check(b"root\0pw\0\0\0"), Answer::Refused("root".into()));
        assert_eq!(
            check(b"alice\0pw\0"),
            Answer::Unavailable("malformed request".into())
        );
    }
}
