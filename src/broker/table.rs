//! The request table: the whole of what the daemon may ask (after OpenSSH's `monitor.c`
//! dispatch table). Each row is a request, when it is permitted, what it must prove before
//! its handler runs, the handler, and what is audited. A request without a row, out of
//! its time, or naming a handle the daemon was never given is a protocol violation: the
//! link is dropped and the daemon restarted; executors are untouched.
//!
//! | request        | when        | must prove                                     | handler                 | audited |
//! |----------------|-------------|------------------------------------------------|-------------------------|---------|
//! | `Hello`        | first, once | the protocol version                           | `session::hello`        | – (`daemon_start` by the loop) |
//! | `Ready`        | after Hello | –                                              | `session::ready`        | – |
//! | `Authenticate` | after Hello | – (it is the check)                            | `session::authenticate` | `auth_failed` (rate-limited) |
//! | `Spawn`        | after Hello | credential may act as the Unix user, policy allows that user | `launch::spawn` | `spawn`, `refused` |
//! | `CheckDir`     | after Hello | credential may act as the Unix user, policy allows that user | `dirs::check_dir` | `refused` |
//! | `SetSecret`    | after Hello | a user credential (its own Unix user's secrets)| `secrets::set`          | `secret_set` |
//! | `DeleteSecret` | after Hello | a user credential                              | `secrets::delete`       | `secret_deleted` |
//! | `ListSecrets`  | after Hello | a user credential                              | `secrets::list`         | – |
//! | `Kill`         | after Hello | a handle it was given and has not released     | `handles::kill`         | `signal` (with owner) |
//! | `Release`      | after Hello | a handle it was given and has not released     | `handles::release`      | `release` (with owner) |
//! | `ListHandles`  | after Hello | – (a page at a time)                           | `handles::list`         | – |
//! | `Adopt`        | after Hello | a handle it was given and has not released     | `handles::adopt`        | `adopt` (with owner) |
//! | `Stats`        | after Hello | –                                              | `session::stats`        | – |
//!
//! Refusals (bad credential, another user's credential, a user the policy refuses) are
//! answered with the rule and audited at most at the principal's refusal rate
//! (`admission.rs`); over it, the principal's requests are answered 429 before any work.
#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use tracing::warn;

use super::handlers::{dirs, handles, launch, secrets, session};
use super::policy::{Refusal, UserFacts};
use super::spawn::Account;
use super::{Broker, LinkState, Mode, Outgoing};
use crate::wire::{
    BrokerError, BrokerMessage, ErrorKind, Handle, Principal, ReplyBody, Request, RequestBody,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The first request on a link, and only then.
    First,
    AfterHello,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    Nothing,
    /// A credential that may act as the request's Unix user, who the policy allows.
    ActAsUser,
    /// A valid credential of an API user (not the admin token: it has no Unix user).
    UserCredential,
    /// A handle the daemon was given and has not released.
    GivenHandle,
}

/// What a handler decided.
pub enum Outcome {
    Reply(ReplyBody, Vec<OwnedFd>),
    /// The reply goes out later (a child has to report first).
    Later,
    /// The daemon broke the protocol.
    Violation(String),
}

/// What the dispatcher established before the handler runs.
pub struct Ctx {
    pub reply: super::handles::ReplyTo,
    /// The HTTP request this serves, for log and audit lines.
    pub request_id: Option<String>,
    /// With `ActAsUser` and `UserCredential`.
    pub principal: Option<Principal>,
    /// With `ActAsUser`: the Unix user, resolved now.
    pub account: Option<Account>,
}

pub type Handler = fn(&mut Broker, &Ctx, RequestBody) -> Outcome;

pub struct Row {
    pub request: &'static str,
    pub when: When,
    pub proof: Proof,
    pub handler: Handler,
}

const fn row(request: &'static str, when: When, proof: Proof, handler: Handler) -> Row {
    Row {
        request,
        when,
        proof,
        handler,
    }
}

use Proof::*;
use When::*;

pub const TABLE: &[Row] = &[
    row("Hello", First, Nothing, session::hello),
    row("Ready", AfterHello, Nothing, session::ready),
    row("Authenticate", AfterHello, Nothing, session::authenticate),
    row("Spawn", AfterHello, ActAsUser, launch::spawn),
    row("CheckDir", AfterHello, ActAsUser, dirs::check_dir),
    row("SetSecret", AfterHello, UserCredential, secrets::set),
    row("DeleteSecret", AfterHello, UserCredential, secrets::delete),
    row("ListSecrets", AfterHello, UserCredential, secrets::list),
    row("Kill", AfterHello, GivenHandle, handles::kill),
    row("Release", AfterHello, GivenHandle, handles::release),
    row("ListHandles", AfterHello, Nothing, handles::list),
    row("Adopt", AfterHello, GivenHandle, handles::adopt),
    row("Stats", AfterHello, Nothing, session::stats),
];

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
        RequestBody::ListHandles { .. } => "ListHandles",
        RequestBody::Adopt { .. } => "Adopt",
        RequestBody::Stats => "Stats",
    }
}

/// The credential and Unix user a request names, if it names them.
fn credential_of(body: &RequestBody) -> Option<(&str, Option<&str>)> {
    match body {
        RequestBody::Spawn(s) => Some((&s.credential, Some(&s.unix_user))),
        RequestBody::CheckDir {
            credential,
            unix_user,
            ..
        } => Some((credential, Some(unix_user))),
        RequestBody::SetSecret { credential, .. }
        | RequestBody::DeleteSecret { credential, .. }
        | RequestBody::ListSecrets { credential } => Some((credential, None)),
        _ => None,
    }
}

fn handle_of(body: &RequestBody) -> Option<Handle> {
    match body {
        RequestBody::Kill { handle, .. }
        | RequestBody::Release { handle }
        | RequestBody::Adopt { handle } => Some(*handle),
        _ => None,
    }
}

/// Whether `state` permits the row (the first request is Hello, and only the first).
pub fn permitted(row: &Row, state: LinkState) -> Result<(), &'static str> {
    match (row.when, state) {
        (First, LinkState::Fresh) | (AfterHello, LinkState::Ready) => Ok(()),
        (First, LinkState::Ready) => Err("only as the first request"),
        (AfterHello, LinkState::Fresh) => Err("request before Hello"),
    }
}

/// Answers one request from the current link. `Err` is a protocol violation.
pub fn dispatch(b: &mut Broker, request: Request) -> Result<(), String> {
    let what = name(&request.body);
    // Deny by default: only what has a row.
    let row = TABLE
        .iter()
        .find(|r| r.request == what)
        .ok_or_else(|| format!("{what} has no row in the request table"))?;
    permitted(row, b.link_state).map_err(|why| format!("{what} not permitted: {why}"))?;
    if let Some(id) = &request.request_id {
        if !crate::wire::valid_request_id(id) {
            return Err(format!("invalid request id ({} bytes)", id.len()));
        }
    }
    let _span =
        tracing::info_span!("request", request_id = request.request_id.as_deref()).entered();
    let mut ctx = Ctx {
        reply: super::handles::ReplyTo {
            link: b.link,
            id: request.id,
        },
        request_id: request.request_id.clone(),
        principal: None,
        account: None,
    };
    let proven = match row.proof {
        Nothing => Ok(()),
        GivenHandle => {
            let handle = handle_of(&request.body).expect("rows with Handle name one");
            match b.handles.visible(handle) {
                Some(_) => Ok(()),
                None => return Err(format!("{what} of unknown handle {}", handle.0)),
            }
        }
        ActAsUser | UserCredential => {
            let (credential, user) = credential_of(&request.body).expect("rows with credentials");
            prove_credential(b, &mut ctx, what, credential, user, row.proof)
        }
    };
    let outcome = match proven {
        Ok(()) => (row.handler)(b, &ctx, request.body),
        Err(refusal) => Outcome::Reply(ReplyBody::Error(refusal), Vec::new()),
    };
    match outcome {
        Outcome::Violation(why) => Err(why),
        Outcome::Later => Ok(()),
        Outcome::Reply(body, fds) => {
            b.outbox.push(Outgoing {
                link: ctx.reply.link,
                message: BrokerMessage::Reply {
                    id: ctx.reply.id,
                    body,
                },
                fds,
            });
            Ok(())
        }
    }
}

/// The credential is valid, its principal may act as `user` (if named), which the policy
/// allows, and the principal is not over its refusal rate. Fills `ctx` on success.
fn prove_credential(
    b: &mut Broker,
    ctx: &mut Ctx,
    what: &str,
    credential: &str,
    user: Option<&str>,
    proof: Proof,
) -> Result<(), BrokerError> {
    let principal = if credential.len() > crate::wire::limits::MAX_CREDENTIAL_BYTES {
        None
    } else {
        b.credentials.verify(credential)
    };
    let key = principal.as_ref().map_or("anonymous".into(), |p| p.owner());
    if b.admission.refusing(&key) {
        return Err(BrokerError {
            kind: ErrorKind::Quota,
            message: Refusal::new(
                "refusal-rate",
                format!("too many refused requests from {key}; slow down"),
            )
            .to_string(),
        });
    }
    let fail = |b: &mut Broker, kind: ErrorKind, message: String| {
        session::audit_refusal(
            b,
            &key,
            what,
            ctx.request_id.as_deref(),
            user,
            &kind,
            &message,
        );
        Err(BrokerError { kind, message })
    };
    let Some(principal) = principal else {
        session::audit_auth_failure(b, None, what);
        return fail(b, ErrorKind::Unauthorized, "invalid credential".into());
    };
    if proof == UserCredential {
        if principal.unix_user().is_none() {
            return fail(
                b,
                ErrorKind::BadRequest,
                "the admin token has no unix user, so no secrets; use a user token".into(),
            );
        }
        session::note_seen(b, &principal, credential);
        ctx.principal = Some(principal);
        return Ok(());
    }
    let user = user.unwrap_or("");
    if !super::users::valid_name(user) {
        return fail(
            b,
            ErrorKind::BadRequest,
            format!("invalid unix user name {:?}", clip(user, 64)),
        );
    }
    if !principal.is_admin() && principal.unix_user() != Some(user) {
        warn!(principal = %principal.name(), user = %user, "refused: credential of another user");
        return fail(
            b,
            ErrorKind::Forbidden,
            format!("'{}' may not act as unix user '{user}'", principal.name()),
        );
    }
    let account = match b.os.lookup_user(user) {
        Ok(Some(a)) => a,
        Ok(None) => {
            let r = Refusal::new("unknown-user", format!("unix user '{user}' does not exist"));
            return fail(b, refused_kind(&r), r.to_string());
        }
        Err(e) => return fail(b, ErrorKind::Failed, e),
    };
    if let Err(r) = user_allowed(b, &account) {
        warn!(user = %account.name, rule = r.rule, "refused: {}", r.message);
        return fail(b, refused_kind(&r), r.to_string());
    }
    session::note_seen(b, &principal, credential);
    ctx.principal = Some(principal);
    ctx.account = Some(account);
    Ok(())
}

/// The policy's word on running `account` at all.
pub fn user_allowed(b: &Broker, account: &Account) -> Result<(), Refusal> {
    match &b.mode {
        Mode::Isolated { service } => b.policy.check_user(&UserFacts {
            name: &account.name,
            uid: account.uid,
            gid: account.gid,
            groups: &account.groups,
            service_uid: service.uid,
            service_gid: service.gid,
            allowed_gids: &b.allowed_gids,
        }),
        Mode::SingleUser { me } if me.uid != account.uid => Err(Refusal::new(
            "single-user",
            format!("single-user mode: only '{}' may be run", me.name),
        )),
        Mode::SingleUser { .. } => Ok(()),
    }
}

pub fn refused_kind(r: &Refusal) -> ErrorKind {
    ErrorKind::Refused {
        rule: r.rule.to_string(),
    }
}

/// At most `max` bytes of `s` (on a character boundary), for log and audit lines.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn error(kind: ErrorKind, message: impl Into<String>) -> Outcome {
    Outcome::Reply(
        ReplyBody::Error(BrokerError {
            kind,
            message: message.into(),
        }),
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_has_exactly_one_row() {
        for name in [
            "Hello",
            "Ready",
            "Authenticate",
            "Spawn",
            "CheckDir",
            "SetSecret",
            "DeleteSecret",
            "ListSecrets",
            "Kill",
            "Release",
            "ListHandles",
            "Adopt",
            "Stats",
        ] {
            assert_eq!(
                TABLE.iter().filter(|r| r.request == name).count(),
                1,
                "{name}"
            );
        }
        assert_eq!(TABLE.len(), 13);
    }

    #[test]
    fn hello_first_and_once() {
        let hello = TABLE.iter().find(|r| r.request == "Hello").unwrap();
        let list = TABLE.iter().find(|r| r.request == "ListHandles").unwrap();
        assert!(permitted(hello, LinkState::Fresh).is_ok());
        assert!(permitted(hello, LinkState::Ready).is_err());
        assert!(permitted(list, LinkState::Fresh).is_err());
        assert!(permitted(list, LinkState::Ready).is_ok());
    }
}
