//! What the front may ask about workers (`OpenWorker`, `OpenWorkerAnonymous`, `ListAll`)
//! and what a worker asks about itself (`Retire`). The front never gets a user's fds: it
//! gets a connection to that user's worker, for a principal whose credential it showed.
#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;

use serde_json::json;
use sha2::Digest;
use tracing::info;

use super::super::table::{error, Ctx, Outcome};
use super::super::{Broker, Connect, PeerKind};
use super::handles::list_page;
use super::session::audit_refusal;
use crate::wire::{ErrorKind, ReplyBody, RequestBody};

/// How long a credential delegated for an admin's connection lasts (the front reuses a
/// connection for at most `worker_pool::MAX_AGE`, well within it).
pub const DELEGATION_SECS: u64 = 3600;

/// `OpenWorker`: the credential may act as the Unix user (checked by the table); the loop
/// hands the worker its end (starting the worker if needed), the front gets the other.
pub fn open(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::OpenWorker {
        start, credential, ..
    } = body
    else {
        unreachable!("the table routes only OpenWorker here")
    };
    let account = ctx.account.clone().expect("ActAsUser fills the account");
    if !start && b.worker_link(account.uid).is_none() {
        return error(ErrorKind::Unavailable, "no worker is running for that user");
    }
    let principal = ctx
        .principal
        .clone()
        .expect("ActAsUser fills the principal");
    if principal.is_admin() {
        // The admin's credential stays in the front: the worker gets one for this user
        // alone, and requests on this connection come without any.
        let (delegated, ended) = match b.credentials.logins.delegate(
            account.uid,
            &account.name,
            &principal.owner(),
            principal.name(),
            DELEGATION_SECS,
        ) {
            Ok(d) => d,
            Err(e) => return error(ErrorKind::Failed, e),
        };
        super::login::revoke(b, &ended);
        return connect(
            b,
            account,
            Some(principal),
            None,
            None,
            Some(delegated),
            start,
        );
    }
    let digest = sha2::Sha256::digest(credential.as_bytes()).into();
    connect(b, account, Some(principal), Some(digest), None, None, start)
}

/// `OpenWorkerAnonymous`: only to a worker that runs already (the front cannot start a
/// user's worker without that user's credential), for what the worker checks itself.
pub fn open_anonymous(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::OpenWorkerAnonymous { unix_user } = body else {
        unreachable!("the table routes only OpenWorkerAnonymous here")
    };
    // Found among the running workers, by name: an unauthenticated request makes the broker
    // look nobody up (a directory service may be slow).
    let running = b.peers.values().find_map(|p| match &p.kind {
        PeerKind::Worker { uid, name } if !p.retiring && *name == unix_user => Some(*uid),
        _ => None,
    });
    let Some(uid) = running else {
        return error(ErrorKind::Unavailable, "no worker is running for that user");
    };
    // Only the uid and name matter for a running worker; it is never started for this.
    let account = super::super::spawn::Account {
        name: unix_user,
        uid,
        gid: u32::MAX,
        home: Default::default(),
        shell: Default::default(),
        groups: Vec::new(),
    };
    connect(b, account, None, None, None, None, false)
}

/// A connection to a running owner's worker for a share's grantee (`shares::open_shared`).
pub fn connect_shared(
    b: &mut Broker,
    account: super::super::spawn::Account,
    grantee: crate::wire::Principal,
    share: crate::wire::ShareInfo,
) -> Outcome {
    if b.worker_link(account.uid).is_none() {
        return error(ErrorKind::Unavailable, "the owner's worker is not running");
    }
    connect(
        b,
        account,
        Some(grantee),
        None,
        Some(Box::new(share)),
        None,
        false,
    )
}

fn connect(
    b: &mut Broker,
    account: super::super::spawn::Account,
    principal: Option<crate::wire::Principal>,
    credential: Option<[u8; 32]>,
    share: Option<Box<crate::wire::ShareInfo>>,
    delegated: Option<String>,
    start: bool,
) -> Outcome {
    if b.shutting_down && b.worker_link(account.uid).is_none() {
        return error(
            ErrorKind::Unavailable,
            "stoa is shutting down: no new worker is started",
        );
    }
    let (front, worker) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return error(ErrorKind::Failed, format!("socketpair: {e}")),
    };
    b.connects.push(Connect {
        account,
        principal,
        credential,
        share,
        delegated,
        start,
        fd: worker.into(),
    });
    Outcome::Reply(ReplyBody::Connection, vec![front.into()])
}

/// `ListAll`: every handle, for an admin (the table checked the credential).
pub fn list_all(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::ListAll { after, .. } = body else {
        unreachable!("the table routes only ListAll here")
    };
    let principal = ctx
        .principal
        .as_ref()
        .expect("AnyCredential fills the principal");
    if !principal.is_admin() {
        // Audited and counted against the principal's refusal rate, as every refusal.
        let message = "listing every process needs an admin credential";
        let key = principal.owner();
        let id = ctx.request_id.as_deref();
        audit_refusal(b, &key, "ListAll", id, None, &ErrorKind::Forbidden, message);
        return error(ErrorKind::Forbidden, message);
    }
    list_page(b, after, None)
}

/// `Retire`: a worker with nothing running may go; new connections for its user go to a
/// new worker from now on.
pub fn retire(b: &mut Broker, _ctx: &Ctx, _body: RequestBody) -> Outcome {
    let Some(PeerKind::Worker { uid, name }) = b.peer_kind().cloned() else {
        return Outcome::Violation("Retire from a link that is not a worker".into());
    };
    let live = b
        .handles
        .iter()
        .filter(|(_, e)| e.account.uid == uid && !e.released)
        .count();
    if live > 0 {
        return error(
            ErrorKind::Refused {
                rule: "live-work".into(),
            },
            format!("{live} handles of {name} are not released"),
        );
    }
    if let Some(p) = b.peers.get_mut(&b.link) {
        p.retiring = true;
    }
    info!(user = %name, "worker retiring");
    b.audit
        .record("worker_retire", json!({ "unix_user": name, "uid": uid }));
    Outcome::Reply(ReplyBody::Done, Vec::new())
}
