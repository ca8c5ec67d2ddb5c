//! The broker's request handling (`Broker::read_daemon`/`handle_request` in
//! `src/broker/mod.rs`, which need root and a running broker) as a model over the pure,
//! public pieces it is made of:
//!
//! payload → `codec::decode::<Request>` → `permit::permit` (Hello first and once) →
//! `wire::valid_request_id` → a Hello must speak `PROTOCOL_VERSION` → for a spawn
//! `spawn::validate`, then `Policy::env_denied` on each variable, then what the spawn would
//! hand on: `spawn::environment` (the execve environment) and the executor's `Job` frame.
//!
//! Anything that is a protocol violation in the broker kills the modelled link; nothing is
//! processed after that. Every step checks the invariants in [`Model::step`].

use std::ffi::CString;
use std::path::PathBuf;

use stoa::broker::permit::{self, LinkState};
use stoa::broker::policy::{Policy, IDENTITY_VARS};
use stoa::broker::spawn::{self, Account};
use stoa::broker::users;
use stoa::wire::{
    limits, valid_request_id, Program, Request, RequestBody, SpawnRequest, PROTOCOL_VERSION,
};
use stoa_executor::codec::{self, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::Job;

/// What one step did (counted by the target, useful when reading a crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The link died: a protocol violation.
    Violation(String),
    /// Answered without a state change worth noting.
    Answered,
    /// `Hello` accepted.
    Welcomed,
    /// A spawn refused with a `BadRequest` (validate) or by the env deny-list.
    SpawnRefused(String),
    /// A spawn that passed every check that runs without root.
    SpawnAccepted,
}

pub struct Model {
    pub state: LinkState,
    pub hellos: u32,
    /// Why the link died, if it did.
    pub dead: Option<String>,
    /// Requests that got past decode and permit, and how many of them were Hellos.
    pub permitted: usize,
    pub permitted_hellos: usize,
    pub accepted_spawns: usize,
    policy: Policy,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    pub fn new() -> Model {
        Model {
            state: LinkState::Fresh,
            hellos: 0,
            dead: None,
            permitted: 0,
            permitted_hellos: 0,
            accepted_spawns: 0,
            policy: Policy::default(),
        }
    }

    fn die(&mut self, why: String) -> Outcome {
        self.dead = Some(why.clone());
        Outcome::Violation(why)
    }

    /// One payload off the link.
    pub fn step(&mut self, payload: &[u8]) -> Outcome {
        assert!(
            self.dead.is_none(),
            "a request was processed after the link died ({:?})",
            self.dead
        );
        assert!(
            payload.len() <= MAX_FRAME,
            "the link passed an oversized payload"
        );
        let request: Request = match codec::decode(payload) {
            Ok(r) => r,
            Err(e) => return self.die(format!("undecodable: {e}")),
        };
        self.request(request)
    }

    /// One decoded request.
    pub fn request(&mut self, request: Request) -> Outcome {
        assert!(self.dead.is_none(), "a request after the link died");
        let body = &request.body;
        let is_hello = matches!(body, RequestBody::Hello { .. });
        let verdict = permit::permit(self.state, body);
        // The table, stated independently of permit.rs.
        match (self.state, is_hello) {
            (LinkState::Fresh, false) => assert!(
                verdict.is_err(),
                "{} permitted before Hello",
                permit::name(body)
            ),
            (LinkState::Ready, true) => assert!(verdict.is_err(), "a second Hello was permitted"),
            _ => assert!(
                verdict.is_ok(),
                "{} refused in {:?}: {verdict:?}",
                permit::name(body),
                self.state
            ),
        }
        if let Err(why) = verdict {
            return self.die(format!("{} not permitted: {why}", permit::name(body)));
        }
        // Then, as in handle_request, the wire's rule: a request id is at most
        // MAX_REQUEST_ID_BYTES of [A-Za-z0-9._-]; anything else is a violation.
        if let Some(id) = &request.request_id {
            if !valid_request_id(id) {
                return self.die(format!("invalid request id {id:?}"));
            }
            assert!(!id.is_empty() && id.len() <= limits::MAX_REQUEST_ID_BYTES);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        }

        assert!(
            self.state == LinkState::Ready || is_hello,
            "past permit before Hello"
        );
        self.permitted += 1;
        self.permitted_hellos += usize::from(is_hello);

        match request.body {
            RequestBody::Hello { protocol } => {
                if protocol != PROTOCOL_VERSION {
                    return self.die(format!("daemon speaks protocol {protocol}"));
                }
                self.hellos += 1;
                assert_eq!(self.hellos, 1, "Hello accepted twice");
                self.state = LinkState::Ready;
                Outcome::Welcomed
            }
            RequestBody::Spawn(req) => self.spawn(&req),
            // The broker checks handles against the handles it issued (a violation if
            // unknown or released); without root nothing is ever spawned, so none exist.
            RequestBody::Kill { handle, .. }
            | RequestBody::Release { handle }
            | RequestBody::Adopt { handle } => self.die(format!("unknown handle {}", handle.0)),
            RequestBody::SetSecret { name, value, .. } => self.secret(&name, Some(&value)),
            RequestBody::DeleteSecret { name, .. } => self.secret(&name, None),
            RequestBody::Ready
            | RequestBody::Authenticate { .. }
            | RequestBody::CheckDir { .. }
            | RequestBody::ListSecrets { .. }
            | RequestBody::ListHandles
            | RequestBody::Stats => Outcome::Answered,
        }
    }

    fn spawn(&mut self, req: &SpawnRequest) -> Outcome {
        if let Err(e) = spawn::validate(req) {
            return Outcome::SpawnRefused(e);
        }
        assert_within_limits(req);
        if let Some((name, _)) = req.env.iter().find(|(n, _)| self.policy.env_denied(n)) {
            return Outcome::SpawnRefused(format!("env-deny {name}"));
        }
        for (name, _) in &req.env {
            assert!(
                !IDENTITY_VARS.contains(&name.as_str()),
                "identity variable {name} got past the deny-list"
            );
        }
        check_what_reaches_execve(req, &self.policy);
        self.accepted_spawns += 1;
        Outcome::SpawnAccepted
    }

    /// `Broker::set_secret`'s checks (a private method): a name that passes them is stored
    /// and later becomes an environment variable in a job, so it must be one execve takes.
    fn secret(&mut self, name: &str, value: Option<&str>) -> Outcome {
        if !users::valid_secret_name(name) || self.policy.env_denied(name) {
            return Outcome::Answered;
        }
        if let Some(v) = value {
            if v.len() > users::MAX_SECRET_BYTES || v.contains('\0') {
                return Outcome::Answered;
            }
        }
        assert!(valid_env_name(name), "secret name {name:?} is no env name");
        assert!(
            !IDENTITY_VARS.contains(&name),
            "secret {name} would override an identity variable"
        );
        if let Some(v) = value {
            assert!(CString::new(format!("{name}={v}")).is_ok());
        }
        Outcome::Answered
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, non-empty (so no `=` and no NUL).
pub fn valid_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0] == b'_' || b[0].is_ascii_alphabetic())
        && b.iter().all(|c| *c == b'_' || c.is_ascii_alphanumeric())
}

/// Every limit in `wire::limits`, restated: what `spawn::validate` accepted must obey them.
pub fn assert_within_limits(req: &SpawnRequest) {
    assert!(req.credential.len() <= limits::MAX_CREDENTIAL_BYTES);
    let u = &req.unix_user;
    assert!(
        !u.is_empty() && u.len() <= limits::MAX_NAME_BYTES,
        "unix_user length {}",
        u.len()
    );
    assert!(
        u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !u.starts_with('-'),
        "unix_user {u:?}"
    );
    if let Program::Exec { argv } = &req.program {
        assert!(!argv.is_empty() && argv.len() <= limits::MAX_ARGS);
        assert!(!argv[0].is_empty(), "empty argv[0]");
        let mut total = 0usize;
        for a in argv {
            assert!(
                a.len() <= limits::MAX_ARG_BYTES,
                "argument of {} bytes",
                a.len()
            );
            assert!(!a.contains('\0'), "NUL in argument {a:?}");
            total += a.len() + 1;
        }
        assert!(total <= limits::MAX_ARGV_BYTES, "argv of {total} bytes");
    }
    if let Some(cwd) = &req.cwd {
        assert!(cwd.starts_with('/'), "relative cwd {cwd:?}");
        assert!(
            cwd.len() <= limits::MAX_PATH_BYTES,
            "cwd of {} bytes",
            cwd.len()
        );
        assert!(!cwd.contains('\0'), "NUL in cwd");
    }
    assert!(
        req.env.len() <= limits::MAX_ENV_VARS,
        "{} env vars",
        req.env.len()
    );
    let mut env_bytes = 0usize;
    for (name, value) in &req.env {
        assert!(valid_env_name(name), "env name {name:?}");
        assert!(!value.contains('\0'), "NUL in env value of {name}");
        env_bytes += name.len() + value.len() + 2;
    }
    assert!(
        env_bytes <= limits::MAX_ENV_BYTES,
        "env of {env_bytes} bytes"
    );
    if let Some(ws) = req.tty {
        for d in [ws.rows, ws.cols] {
            assert!((1..=limits::MAX_TTY_DIMENSION).contains(&d), "tty {ws:?}");
        }
    }
}

/// An accepted spawn, followed to the strings it hands the kernel and the executor.
fn check_what_reaches_execve(req: &SpawnRequest, policy: &Policy) {
    let account = Account {
        name: req.unix_user.clone(),
        uid: 1000,
        gid: 1000,
        home: PathBuf::from(format!("/home/{}", req.unix_user)),
        shell: PathBuf::from("/bin/bash"),
        groups: vec![1000],
    };
    let env = spawn::environment(&account, req, &policy.path);
    // Nothing dropped (environment() silently skips entries with a NUL), no duplicate
    // names, identity variables from the account, the request's other variables as sent
    // (the last of a repeated name wins).
    let mut names: Vec<String> = Vec::new();
    for entry in &env {
        let bytes = entry.as_bytes();
        let eq = bytes
            .iter()
            .position(|b| *b == b'=')
            .expect("an environment entry without '='");
        let name = std::str::from_utf8(&bytes[..eq]).expect("utf-8 name");
        assert!(valid_env_name(name), "environment name {name:?}");
        assert!(!names.iter().any(|n| n == name), "{name} set twice");
        names.push(name.to_string());
        let value = &bytes[eq + 1..];
        let expect: Option<Vec<u8>> = match name {
            "HOME" => Some(format!("/home/{}", req.unix_user).into_bytes()),
            "USER" | "LOGNAME" => Some(req.unix_user.clone().into_bytes()),
            "SHELL" => Some(b"/bin/bash".to_vec()),
            "PATH" => Some(policy.path.clone().into_bytes()),
            _ => req
                .env
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone().into_bytes()),
        };
        if let Some(expect) = expect {
            assert_eq!(value, &expect[..], "value of {name}");
        }
    }
    for (name, _) in &req.env {
        assert!(
            names.contains(name),
            "{name} was dropped from the environment"
        );
    }
    for base in IDENTITY_VARS.iter().chain(&["TERM", "LANG"]) {
        assert!(names.iter().any(|n| n == base), "{base} missing");
    }

    // The job the broker writes to the control socket, as the executor reads it back.
    let job = match &req.program {
        Program::Exec { argv } => {
            for a in argv {
                CString::new(a.as_bytes()).expect("argv reaches execve as C strings");
            }
            Job::Exec {
                argv: argv.clone(),
                env: Vec::new(),
            }
        }
        Program::Shell => Job::Shell,
    };
    let frame = codec::encode(&job).expect("an accepted spawn's job fits in a frame");
    assert!(frame.len() - HEADER_LEN <= MAX_FRAME);
    let back: Job = codec::read_frame(&mut &frame[..]).expect("the executor reads the job");
    assert_eq!(back, job, "the executor runs what the broker checked");
}
