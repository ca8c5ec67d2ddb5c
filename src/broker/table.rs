//! The request table: the whole of what the front and the workers may ask (after
//! OpenSSH's `monitor.c` dispatch table). Each row is a request, which kind of link may
//! send it, when, what it must prove before its handler runs, the handler, and what is
//! audited. A request without a row, from the other kind of link, out of its time, or
//! naming a handle of another user is a protocol violation: the link is dropped and its
//! process restarted; executors are untouched.
//!
//! A worker's link is bound to its Unix user: whatever it asks can concern only that user
//! (a credential for another user is refused with `worker-user`). The front's link can
//! authenticate, and with a credential obtain a connection to that user's worker; it can
//! spawn, signal or adopt nothing.
//!
//! | request        | from   | when        | must prove                                     | handler                 | audited |
//! |----------------|--------|-------------|------------------------------------------------|-------------------------|---------|
//! | `Hello`        | both   | first, once | the protocol version                           | `session::hello`        | – (`daemon_start`/`worker_start` by the loop) |
//! | `Ready`        | both   | after Hello | –                                              | `session::ready`        | – |
//! | `Stats`        | both   | after Hello | –                                              | `session::stats`        | – |
//! | `Authenticate` | front  | after Hello | – (it is the check)                            | `session::authenticate` | `auth_failed` (rate-limited) |
//! | `OpenWorker`   | front  | after Hello | credential may act as the Unix user, policy allows that user | `workers::open` | `refused` |
//! | `OpenWorkerAnonymous` | front | after Hello | – (only a running worker; it checks what comes) | `workers::open_anonymous` | – |
//! | `ListAll`      | front  | after Hello | a valid credential (the handler: an admin's)   | `workers::list_all`     | `refused` |
//! | `Login`        | front  | after Hello | – (it is the check: PAM in a helper, then the policy) | `login::login` | `login` (every attempt) |
//! | `Logout`       | front  | after Hello | – (the credential it ends)                     | `login::logout`         | `logout` |
//! | `ListShares`   | front  | after Hello | a user credential                              | `shares::list`          | – |
//! | `OpenShared`   | front  | after Hello | a user credential holding a live share of the object (the handler) | `shares::open_shared` | `share_attach` |
//! | `Share`        | worker | after Hello | – (an object of the worker's own user; the grantee checked by the handler) | `shares::share` | `share_grant` |
//! | `Unshare`      | worker | after Hello | – (its own user's shares only)                 | `shares::unshare`       | `share_revoke` |
//! | `Spawn`        | worker | after Hello | credential may act as the Unix user, policy allows that user, the worker's own | `launch::spawn` | `spawn`, `refused` |
//! | `CheckDir`     | worker | after Hello | as `Spawn`                                     | `dirs::check_dir`       | `refused` |
//! | `SetSecret`    | worker | after Hello | a user credential of the worker's own Unix user| `secrets::set`          | `secret_set` |
//! | `DeleteSecret` | worker | after Hello | as `SetSecret`                                 | `secrets::delete`       | `secret_deleted` |
//! | `ListSecrets`  | worker | after Hello | as `SetSecret`                                 | `secrets::list`         | – |
//! | `RunSecrets`   | worker | after Hello | as `Spawn`; the daemon runs agents on the direct path (the handler) | `secrets::for_run` | `secrets_handed` |
//! | `Kill`         | worker | after Hello | a handle of its own user it has not released   | `handles::kill`         | `signal` (with owner) |
//! | `Release`      | worker | after Hello | as `Kill`                                      | `handles::release`      | `release` (with owner) |
//! | `ListHandles`  | worker | after Hello | – (its own user's, a page at a time)           | `handles::list`         | – |
//! | `Adopt`        | worker | after Hello | as `Kill`                                      | `handles::adopt`        | `adopt` (with owner) |
//! | `CloseStdin`   | worker | after Hello | as `Kill`                                      | `handles::close_stdin`  | – |
//! | `RecordApproval` | worker | after Hello | – (recorded as its user's word; an answer's credential is checked by the handler; size and rate bounded) | `approvals::record` | `approval` |
//! | `Retire`       | worker | after Hello | – (refused while its user has live handles)    | `workers::retire`       | `worker_retire` |
//!
//! Refusals (bad credential, another user's credential, a user the policy refuses) are
//! answered with the rule and audited at most at the principal's refusal rate
//! (`admission.rs`); over it, the principal's requests are answered 429 before any work.
#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use tracing::warn;

use super::handlers::{approvals, dirs, handles, launch, login, secrets, session, shares, workers};
use super::policy::{Refusal, UserFacts};
use super::spawn::Account;
use super::{Broker, LinkState, Mode, Outgoing, PeerKind};
use crate::wire::{
    BrokerError, BrokerMessage, ErrorKind, Handle, Principal, ReplyBody, Request, RequestBody,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The first request on a link, and only then.
    First,
    AfterHello,
}

/// Which kind of link may send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Front,
    Worker,
    Both,
}

impl Who {
    fn admits(self, kind: &PeerKind) -> bool {
        matches!(
            (self, kind),
            (Who::Both, _) | (Who::Front, PeerKind::Front) | (Who::Worker, PeerKind::Worker { .. })
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    Nothing,
    /// A credential that may act as the request's Unix user, who the policy allows.
    ActAsUser,
    /// A valid credential of an API user (not the admin token: it has no Unix user).
    UserCredential,
    /// Any valid credential (the handler decides what it may see).
    AnyCredential,
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
    pub who: Who,
    pub when: When,
    pub proof: Proof,
    pub handler: Handler,
}

const fn row(request: &'static str, who: Who, when: When, proof: Proof, handler: Handler) -> Row {
    Row {
        request,
        who,
        when,
        proof,
        handler,
    }
}

use Proof::*;
use When::*;

pub const TABLE: &[Row] = &[
    row("Hello", Who::Both, First, Nothing, session::hello),
    row("Ready", Who::Both, AfterHello, Nothing, session::ready),
    row("Stats", Who::Both, AfterHello, Nothing, session::stats),
    row(
        "Authenticate",
        Who::Front,
        AfterHello,
        Nothing,
        session::authenticate,
    ),
    row(
        "OpenWorker",
        Who::Front,
        AfterHello,
        ActAsUser,
        workers::open,
    ),
    row(
        "OpenWorkerAnonymous",
        Who::Front,
        AfterHello,
        Nothing,
        workers::open_anonymous,
    ),
    row(
        "ListAll",
        Who::Front,
        AfterHello,
        AnyCredential,
        workers::list_all,
    ),
    row("Login", Who::Front, AfterHello, Nothing, login::login),
    row("Logout", Who::Front, AfterHello, Nothing, login::logout),
    row(
        "ListShares",
        Who::Front,
        AfterHello,
        UserCredential,
        shares::list,
    ),
    row(
        "OpenShared",
        Who::Front,
        AfterHello,
        UserCredential,
        shares::open_shared,
    ),
    row("Share", Who::Worker, AfterHello, Nothing, shares::share),
    row("Unshare", Who::Worker, AfterHello, Nothing, shares::unshare),
    row("Spawn", Who::Worker, AfterHello, ActAsUser, launch::spawn),
    row(
        "CheckDir",
        Who::Worker,
        AfterHello,
        ActAsUser,
        dirs::check_dir,
    ),
    row(
        "SetSecret",
        Who::Worker,
        AfterHello,
        UserCredential,
        secrets::set,
    ),
    row(
        "DeleteSecret",
        Who::Worker,
        AfterHello,
        UserCredential,
        secrets::delete,
    ),
    row(
        "ListSecrets",
        Who::Worker,
        AfterHello,
        UserCredential,
        secrets::list,
    ),
    row(
        "RunSecrets",
        Who::Worker,
        AfterHello,
        ActAsUser,
        secrets::for_run,
    ),
    row("Kill", Who::Worker, AfterHello, GivenHandle, handles::kill),
    row(
        "Release",
        Who::Worker,
        AfterHello,
        GivenHandle,
        handles::release,
    ),
    row(
        "ListHandles",
        Who::Worker,
        AfterHello,
        Nothing,
        handles::list,
    ),
    row(
        "Adopt",
        Who::Worker,
        AfterHello,
        GivenHandle,
        handles::adopt,
    ),
    row(
        "CloseStdin",
        Who::Worker,
        AfterHello,
        GivenHandle,
        handles::close_stdin,
    ),
    row(
        "RecordApproval",
        Who::Worker,
        AfterHello,
        Nothing,
        approvals::record,
    ),
    row("Retire", Who::Worker, AfterHello, Nothing, workers::retire),
];

pub fn name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::Hello { .. } => "Hello",
        RequestBody::Ready => "Ready",
        RequestBody::Authenticate { .. } => "Authenticate",
        RequestBody::Spawn(_) => "Spawn",
        RequestBody::CheckDir { .. } => "CheckDir",
        RequestBody::RunSecrets { .. } => "RunSecrets",
        RequestBody::SetSecret { .. } => "SetSecret",
        RequestBody::DeleteSecret { .. } => "DeleteSecret",
        RequestBody::ListSecrets { .. } => "ListSecrets",
        RequestBody::Kill { .. } => "Kill",
        RequestBody::Release { .. } => "Release",
        RequestBody::ListHandles { .. } => "ListHandles",
        RequestBody::Adopt { .. } => "Adopt",
        RequestBody::CloseStdin { .. } => "CloseStdin",
        RequestBody::RecordApproval { .. } => "RecordApproval",
        RequestBody::Stats => "Stats",
        RequestBody::OpenWorker { .. } => "OpenWorker",
        RequestBody::OpenWorkerAnonymous { .. } => "OpenWorkerAnonymous",
        RequestBody::ListAll { .. } => "ListAll",
        RequestBody::Retire => "Retire",
        RequestBody::Login { .. } => "Login",
        RequestBody::Logout { .. } => "Logout",
        RequestBody::ListShares { .. } => "ListShares",
        RequestBody::OpenShared { .. } => "OpenShared",
        RequestBody::Share { .. } => "Share",
        RequestBody::Unshare { .. } => "Unshare",
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
        }
        | RequestBody::RunSecrets {
            credential,
            unix_user,
            ..
        } => Some((credential, Some(unix_user))),
        RequestBody::SetSecret { credential, .. }
        | RequestBody::DeleteSecret { credential, .. }
        | RequestBody::ListSecrets { credential }
        | RequestBody::ListAll { credential, .. }
        | RequestBody::ListShares { credential }
        | RequestBody::OpenShared { credential, .. } => Some((credential, None)),
        RequestBody::OpenWorker {
            credential,
            unix_user,
            ..
        } => Some((credential, Some(unix_user))),
        _ => None,
    }
}

fn handle_of(body: &RequestBody) -> Option<Handle> {
    match body {
        RequestBody::Kill { handle, .. }
        | RequestBody::Release { handle }
        | RequestBody::Adopt { handle }
        | RequestBody::CloseStdin { handle } => Some(*handle),
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
    let kind = b
        .peer_kind()
        .cloned()
        .ok_or_else(|| format!("{what} on link {} that is gone", b.link))?;
    if !row.who.admits(&kind) {
        return Err(format!("{what} is not for a {} link", kind_name(&kind)));
    }
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
            match (b.handles.visible(handle), &kind) {
                (Some(e), PeerKind::Worker { uid, .. }) if e.account.uid == *uid => Ok(()),
                (Some(_), _) => {
                    return Err(format!("{what} of handle {} of another user", handle.0))
                }
                (None, _) => return Err(format!("{what} of unknown handle {}", handle.0)),
            }
        }
        ActAsUser | UserCredential | AnyCredential => {
            let (credential, user) = credential_of(&request.body).expect("rows with credentials");
            prove_credential(b, &mut ctx, what, credential, user, row.proof)
                .and_then(|()| own_user_only(b, &ctx, what, &kind, row.proof))
        }
    };
    // A worker that retired starts nothing new: its user's next work goes to a new worker.
    let retiring = b.peers.get(&b.link).is_some_and(|p| p.retiring);
    let proven = match proven {
        Ok(()) if retiring && what == "Spawn" => Err(BrokerError {
            kind: ErrorKind::Unavailable,
            message: "this worker is retiring: it starts nothing new".into(),
        }),
        other => other,
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

fn kind_name(kind: &PeerKind) -> &'static str {
    match kind {
        PeerKind::Front => "front",
        PeerKind::Worker { .. } => "worker",
    }
}

/// On a worker's link, what a credential proved must concern the worker's own Unix user.
fn own_user_only(
    b: &mut Broker,
    ctx: &Ctx,
    what: &str,
    kind: &PeerKind,
    proof: Proof,
) -> Result<(), BrokerError> {
    let PeerKind::Worker { uid, name } = kind else {
        return Ok(());
    };
    let own = match proof {
        ActAsUser => ctx.account.as_ref().is_some_and(|a| a.uid == *uid),
        UserCredential => ctx
            .principal
            .as_ref()
            .is_some_and(|p| p.unix_user() == Some(name.as_str())),
        _ => true,
    };
    if own {
        return Ok(());
    }
    let r = Refusal::new(
        "worker-user",
        format!("this is the worker of '{name}': it acts for no other Unix user"),
    );
    let key = ctx
        .principal
        .as_ref()
        .map_or("anonymous".into(), |p| p.owner());
    session::audit_refusal(
        b,
        &key,
        what,
        ctx.request_id.as_deref(),
        None,
        &refused_kind(&r),
        &r.message,
    );
    Err(BrokerError {
        kind: refused_kind(&r),
        message: r.to_string(),
    })
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
    if proof == AnyCredential {
        session::note_seen(b, &principal, credential);
        ctx.principal = Some(principal);
        return Ok(());
    }
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
            "OpenWorker",
            "OpenWorkerAnonymous",
            "ListAll",
            "Retire",
            "Login",
            "Logout",
            "ListShares",
            "OpenShared",
            "Share",
            "Unshare",
            "CloseStdin",
            "RecordApproval",
            "RunSecrets",
        ] {
            assert_eq!(
                TABLE.iter().filter(|r| r.request == name).count(),
                1,
                "{name}"
            );
        }
        assert_eq!(TABLE.len(), 26);
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
