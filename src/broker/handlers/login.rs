//! `Login` and `Logout`: logging in with a Unix account's password.
//!
//! The password is checked by PAM in a short-lived root helper per attempt
//! (`stoa __pam-login`, `login_helper.rs`); the broker only writes the attempt to its stdin
//! and polls its one-line answer, so a PAM module that hangs holds up nobody else, and is
//! killed at [`CHECK_DEADLINE`]. On success, and if the policy allows the user, the broker
//! starts a log-in (`credentials::Logins`) and answers its credential, which acts as that
//! Unix user only.
//!
//! | check, in order                         | refusal                                     |
//! |-----------------------------------------|---------------------------------------------|
//! | a valid user name, a password of 1–1024 bytes without NUL | `BadRequest`                |
//! | root or the service user                | `Refused` `root` / `service-user` (no PAM run) |
//! | failures of this user name or this address in the last [`FAILURE_WINDOW`] | `Quota` (`login-throttle`) |
//! | a check of this user name running; [`MAX_CHECKS`] running | `Quota` (`login-busy`)       |
//! | PAM: the password, then the account     | `Unauthorized` (one answer for a wrong password and an unknown user), `Refused` `account` |
//! | the policy allows the Unix user          | `Refused` with the policy's rule           |
//!
//! Every attempt is audited (`login`: user, address, result), successful or not.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use super::super::handles::ReplyTo;
use super::super::login_helper::{self, Answer};
use super::super::table::{clip, error, user_allowed, Ctx, Outcome};
use super::super::{Broker, Mode, Outgoing, Target};
use crate::wire::{limits, BrokerError, BrokerMessage, ErrorKind, Event, ReplyBody, RequestBody};

/// How long one password check may take (PAM's own delay after a failure is ~2 s).
pub const CHECK_DEADLINE: Duration = Duration::from_secs(15);
/// Most checks running at once (each is a root process), and from one address (an IPv6
/// /64 counts as one).
pub const MAX_CHECKS: usize = 8;
pub const MAX_CHECKS_PER_PEER: usize = 2;
/// The window failures are counted over, and the most failures in it before further
/// attempts are refused without a check: for a user name from one address (so a guesser
/// elsewhere cannot lock its owner out), for a user name from anywhere (a bound on
/// guessing spread over many addresses), and from one address (an IPv6 /64 counts as one).
pub const FAILURE_WINDOW: Duration = Duration::from_secs(300);
pub const FAILURES_PER_USER: usize = 5;
pub const FAILURES_PER_NAME: usize = 50;
pub const FAILURES_PER_PEER: usize = 20;
/// How often live log-ins' users are checked against the policy again.
pub const POLICY_RECHECK: Duration = Duration::from_secs(60);
/// Names and addresses whose failures are remembered at once.
const THROTTLE_KEYS_MAX: usize = 16384;

/// A password check in flight.
pub struct Check {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The helper's stdout (non-blocking): its one-line answer.
    pub answer: OwnedFd,
    pub got: Vec<u8>,
    pub deadline: Instant,
    pub reply: ReplyTo,
    pub username: String,
    pub peer: Option<String>,
    /// Reaped already: what it wrote is all there is.
    pub reaped: bool,
}

/// Recent failures by user name and address, by user name, and by address.
#[derive(Default)]
pub struct Throttle {
    by_user: HashMap<String, VecDeque<Instant>>,
    by_name: HashMap<String, VecDeque<Instant>>,
    by_peer: HashMap<String, VecDeque<Instant>>,
}

/// What an address counts as: itself, or its /64 for IPv6 (one host's many addresses).
pub fn peer_key(peer: &str) -> String {
    match peer.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or(peer.to_string(), |v4| v4.to_string()),
        _ => peer.to_string(),
    }
}

fn user_at(user: &str, peer: Option<&str>) -> String {
    format!("{user}\0{}", peer.map(peer_key).unwrap_or_default())
}

fn recent(map: &mut HashMap<String, VecDeque<Instant>>, key: &str) -> usize {
    let Some(q) = map.get_mut(key) else { return 0 };
    while q.front().is_some_and(|t| t.elapsed() > FAILURE_WINDOW) {
        q.pop_front();
    }
    let n = q.len();
    if n == 0 {
        map.remove(key);
    }
    n
}

fn note(map: &mut HashMap<String, VecDeque<Instant>>, key: &str, keep: usize) {
    if map.len() >= THROTTLE_KEYS_MAX && !map.contains_key(key) {
        map.retain(|_, q| q.back().is_some_and(|t| t.elapsed() <= FAILURE_WINDOW));
        if map.len() >= THROTTLE_KEYS_MAX {
            return;
        }
    }
    let q = map.entry(key.to_string()).or_default();
    q.push_back(Instant::now());
    while q.len() > keep {
        q.pop_front();
    }
}

impl Throttle {
    /// Seconds until `user` or `peer` may try again, if either is over its limit.
    fn wait(&mut self, user: &str, peer: Option<&str>) -> Option<u64> {
        let over = |map: &mut HashMap<String, VecDeque<Instant>>, key: &str, limit: usize| {
            (recent(map, key) >= limit).then(|| {
                let oldest = map[key].front().copied().expect("non-empty");
                FAILURE_WINDOW.saturating_sub(oldest.elapsed()).as_secs() + 1
            })
        };
        let u = over(&mut self.by_user, &user_at(user, peer), FAILURES_PER_USER);
        let n = over(&mut self.by_name, user, FAILURES_PER_NAME);
        let p = peer.and_then(|p| over(&mut self.by_peer, &peer_key(p), FAILURES_PER_PEER));
        u.max(n).max(p)
    }

    fn failed(&mut self, user: &str, peer: Option<&str>) {
        note(&mut self.by_user, &user_at(user, peer), FAILURES_PER_USER);
        note(&mut self.by_name, user, FAILURES_PER_NAME);
        if let Some(p) = peer {
            note(&mut self.by_peer, &peer_key(p), FAILURES_PER_PEER);
        }
    }
}

fn audit(b: &mut Broker, user: &str, peer: Option<&str>, result: &str) {
    b.audit.record(
        "login",
        json!({ "unix_user": clip(user, 64), "peer": peer.map(|p| clip(p, 64)), "result": result }),
    );
}

fn refused(rule: &str, message: String) -> Outcome {
    error(
        ErrorKind::Refused {
            rule: rule.to_string(),
        },
        message,
    )
}

pub fn login(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Login {
        username,
        password,
        peer,
    } = body
    else {
        unreachable!("the table routes only Login here")
    };
    let peer = peer.filter(|p| p.len() <= limits::MAX_PEER_BYTES);
    if !super::super::users::valid_name(&username) {
        return error(
            ErrorKind::BadRequest,
            format!("invalid user name {:?}", clip(&username, 64)),
        );
    }
    if password.is_empty() || password.len() > limits::MAX_PASSWORD_BYTES || password.contains('\0')
    {
        return error(
            ErrorKind::BadRequest,
            format!(
                "a password is 1 to {} bytes, without NUL",
                limits::MAX_PASSWORD_BYTES
            ),
        );
    }
    // Root's and the service user's passwords are never checked: the helper looks the name
    // up (in its own process: a slow directory service holds up only that attempt, never
    // the broker) and refuses them before PAM runs.
    if username == "root" {
        audit(b, &username, peer.as_deref(), "root");
        return refused(
            "root",
            "refused by rule root: root may not log in to stoa".into(),
        );
    }
    if let Some(secs) = b.login_throttle.wait(&username, peer.as_deref()) {
        audit(b, &username, peer.as_deref(), "throttled");
        return refused(
            "login-throttle",
            format!(
                "refused by rule login-throttle: too many failed log-ins for '{}' or from this address; try again in {secs} s",
                clip(&username, 64)
            ),
        );
    }
    if b.login_checks.iter().any(|c| c.username == username) {
        return refused(
            "login-busy",
            format!(
                "refused by rule login-busy: a log-in of '{}' is being checked; try again when it is done",
                clip(&username, 64)
            ),
        );
    }
    let prefix = peer.as_deref().map(peer_key);
    let from_there = b
        .login_checks
        .iter()
        .filter(|c| c.peer.as_deref().map(peer_key) == prefix)
        .count();
    if prefix.is_some() && from_there >= MAX_CHECKS_PER_PEER {
        return refused(
            "login-busy",
            format!("refused by rule login-busy: {MAX_CHECKS_PER_PEER} log-ins from this address are being checked; try again when they are done"),
        );
    }
    if b.login_checks.len() >= MAX_CHECKS {
        return refused(
            "login-busy",
            format!("refused by rule login-busy: {MAX_CHECKS} log-ins are being checked; try again in a moment"),
        );
    }
    let service_uid = match &b.mode {
        Mode::Isolated { service } => Some(service.uid),
        Mode::SingleUser { .. } => None,
    };
    let mut request = login_helper::request(&username, &password, peer.as_deref(), service_uid);
    // The password's copies are wiped once handed on.
    let mut password = password.into_bytes();
    password.fill(0);
    let started = b.os.start_login_check(&request);
    request.fill(0);
    match started {
        Ok(child) => {
            b.login_checks.push(Check {
                pid: child.started.pid,
                pidfd: child.started.pidfd,
                answer: child.answer,
                got: Vec::new(),
                deadline: Instant::now() + CHECK_DEADLINE,
                reply: ctx.reply,
                username,
                peer,
                reaped: false,
            });
            Outcome::Later
        }
        Err(e) => error(ErrorKind::Failed, format!("cannot check the password: {e}")),
    }
}

/// `Logout`: ends the log-in (whatever the credential is, the answer is `Done`).
pub fn logout(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Logout { credential } = body else {
        unreachable!("the table routes only Logout here")
    };
    if let Some(login) = b.credentials.logins.end(&credential) {
        info!(user = %login.unix_user, "logged out");
        b.audit.record(
            "logout",
            json!({ "unix_user": login.unix_user, "login": login.number }),
        );
        revoke(b, &[login]);
    }
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

/// Tells the front and the workers that these log-ins ended.
pub fn revoke(b: &mut Broker, ended: &[super::super::credentials::Login]) {
    if ended.is_empty() {
        return;
    }
    let keys = ended
        .iter()
        .map(|l| l.principal().revocation_key().expect("a log-in has a key"))
        .collect();
    b.send_event(Target::All, Event::Revoked { keys });
}

/// Ends log-ins that expired, and those of users who are gone or whom the policy no
/// longer allows (looked up once per user).
pub fn sweep(b: &mut Broker) {
    if b.credentials.logins.is_empty() {
        return;
    }
    // Expiry is checked every time; the users (NSS, perhaps a directory server) once a
    // minute.
    let recheck = b.logins_rechecked.elapsed() >= POLICY_RECHECK;
    if recheck {
        b.logins_rechecked = Instant::now();
    }
    let refused: Vec<String> = if !recheck {
        Vec::new()
    } else {
        b.credentials
            .logins
            .users()
            .into_iter()
            .filter(|u| match b.os.lookup_user(u) {
                Ok(Some(a)) => user_allowed(b, &a).is_err(),
                Ok(None) => true,
                // NSS failing for a moment ends nobody's log-in.
                Err(_) => false,
            })
            .collect()
    };
    let ended = b
        .credentials
        .logins
        .sweep(|l| !refused.contains(&l.unix_user));
    for l in &ended {
        b.audit.record(
            "logout",
            json!({ "unix_user": l.unix_user, "login": l.number, "why": "expired, or the user may no longer log in" }),
        );
    }
    revoke(b, &ended);
}

/// Reads every check's answer; kills those past their deadline.
pub fn check_logins(b: &mut Broker) {
    let mut i = 0;
    while i < b.login_checks.len() {
        let c = &mut b.login_checks[i];
        let mut ended = c.reaped;
        let mut buf = [0u8; 512];
        loop {
            match nix::unistd::read(c.answer.as_fd(), &mut buf) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    if c.got.len() + n > login_helper::MAX_ANSWER {
                        ended = true;
                        break;
                    }
                    c.got.extend_from_slice(&buf[..n]);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        let late = Instant::now() >= c.deadline;
        if !ended && !late {
            i += 1;
            continue;
        }
        if late && !ended {
            b.os.kill_pidfd(c.pidfd.as_fd());
        }
        let check = b.login_checks.swap_remove(i);
        let answer = if late && !ended {
            Err(format!(
                "the password check did not finish within {CHECK_DEADLINE:?}"
            ))
        } else {
            Answer::parse(&check.got).ok_or_else(|| "the password check gave no answer".into())
        };
        answer_check(b, check, answer);
    }
}

/// A check's helper was reaped.
pub fn on_reaped(b: &mut Broker, pid: i32) -> bool {
    let Some(c) = b.login_checks.iter_mut().find(|c| c.pid == pid) else {
        return false;
    };
    c.reaped = true;
    check_logins(b);
    true
}

pub fn next_deadline(b: &Broker) -> Option<Instant> {
    b.login_checks.iter().map(|c| c.deadline).min()
}

fn answer_check(b: &mut Broker, check: Check, answer: Result<Answer, String>) {
    let user = check.username.clone();
    let peer = check.peer.clone();
    let body = match answer {
        Ok(Answer::Ok) => logged_in(b, &user, peer.as_deref()),
        Ok(Answer::Credentials) => {
            b.login_throttle.failed(&user, peer.as_deref());
            audit(b, &user, peer.as_deref(), "wrong password or unknown user");
            warn!(user = %clip(&user, 64), peer = ?peer, "log-in failed");
            Err(BrokerError {
                kind: ErrorKind::Unauthorized,
                message: "wrong user name or password".into(),
            })
        }
        Ok(Answer::Refused(rule)) => {
            audit(b, &user, peer.as_deref(), &rule);
            warn!(user = %clip(&user, 64), rule = %rule, "log-in refused");
            let why = if rule == "root" {
                "root may not log in to stoa"
            } else {
                "stoa's service user may not log in"
            };
            Err(BrokerError {
                kind: ErrorKind::Refused { rule: rule.clone() },
                message: format!("refused by rule {rule}: {why}"),
            })
        }
        Ok(Answer::PasswordExpired) => {
            audit(b, &user, peer.as_deref(), "password expired");
            Err(BrokerError {
                kind: ErrorKind::Refused {
                    rule: "account".into(),
                },
                message: "refused by rule account: the password has expired; change it (passwd) and log in again".into(),
            })
        }
        Ok(Answer::Account(words)) => {
            audit(b, &user, peer.as_deref(), "account refused");
            Err(BrokerError {
                kind: ErrorKind::Refused {
                    rule: "account".into(),
                },
                message: format!(
                    "refused by rule account: the account may not log in now: {words}"
                ),
            })
        }
        Ok(Answer::Unavailable(words)) => {
            // Counted as a failure, and the modules' words (which may say whether the
            // account exists) stay in the broker's log: the client is not logged in yet.
            b.login_throttle.failed(&user, peer.as_deref());
            audit(b, &user, peer.as_deref(), "check failed");
            warn!(user = %clip(&user, 64), "password check failed: {words}");
            Err(BrokerError {
                kind: ErrorKind::Failed,
                message:
                    "the password could not be checked; the administrator finds why in stoa's log"
                        .into(),
            })
        }
        Err(why) => {
            b.login_throttle.failed(&user, peer.as_deref());
            audit(b, &user, peer.as_deref(), "check failed");
            warn!(user = %clip(&user, 64), "password check failed: {why}");
            Err(BrokerError {
                kind: ErrorKind::Failed,
                message: why,
            })
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => ReplyBody::Error(e),
    };
    b.outbox.push(Outgoing {
        link: check.reply.link,
        message: BrokerMessage::Reply {
            id: check.reply.id,
            body,
        },
        fds: Vec::new(),
    });
}

/// The password was right: the policy's word, then a new log-in.
fn logged_in(b: &mut Broker, user: &str, peer: Option<&str>) -> Result<ReplyBody, BrokerError> {
    let account = match b.os.lookup_user(user) {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(BrokerError {
                kind: ErrorKind::Unauthorized,
                message: "wrong user name or password".into(),
            })
        }
        Err(e) => {
            return Err(BrokerError {
                kind: ErrorKind::Failed,
                message: e,
            })
        }
    };
    if let Err(r) = user_allowed(b, &account) {
        audit(b, user, peer, &format!("refused by rule {}", r.rule));
        warn!(user = %account.name, rule = r.rule, "log-in refused: {}", r.message);
        return Err(BrokerError {
            kind: ErrorKind::Refused {
                rule: r.rule.to_string(),
            },
            message: r.to_string(),
        });
    }
    let lasts = b.policy.login_session_secs;
    let (credential, login, ended) = b
        .credentials
        .logins
        .start(account.uid, &account.name, lasts)
        .map_err(|e| BrokerError {
            kind: ErrorKind::Failed,
            message: e,
        })?;
    revoke(b, &ended);
    audit(b, user, peer, "ok");
    info!(user = %account.name, login = login.number, "logged in");
    Ok(ReplyBody::LoggedIn {
        credential,
        unix_user: account.name,
        expires_at: login.expires_at,
    })
}
