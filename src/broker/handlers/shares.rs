//! Sharing a terminal with another user: the owner's worker grants (`Share`) and revokes
//! (`Unshare`); the front asks for a connection to the owner's worker for a grantee
//! (`OpenShared`) and lists shares (`ListShares`). The broker is the authority on who was
//! granted what; the owner's worker enforces it on the connection (that object only,
//! read-only unless the share gives input, until it expires or is revoked). The process keeps
//! running as its owner; the grantee's credential never reaches the owner's worker.
//!
//! | rule                                   | refusal                                        |
//! |----------------------------------------|------------------------------------------------|
//! | the object is the worker's own user's (`u<uid>-…`) | violation (a worker speaks for its user only) |
//! | the grantee exists, the policy allows them, and is not the owner | `Refused` (`share-grantee`) |
//! | at most [`MAX_SHARES_PER_USER`] live shares per owner | `Quota` (`shares-per-user`)          |
//! | `OpenShared`: a live share of that object for the credential's Unix user | `Forbidden` (404-like: nothing is said of objects not shared) |
//!
//! Every grant, revocation and attach is audited (`share_grant`, `share_revoke`,
//! `share_attach` with whether it may type).
#![forbid(unsafe_code)]

use serde_json::json;
use tracing::info;

use super::super::credentials::now_secs;
use super::super::table::{clip, error, user_allowed, Ctx, Outcome};
use super::super::{Broker, PeerKind};
use crate::wire::{ErrorKind, ReplyBody, RequestBody, ShareInfo};

pub const MAX_SHARES_PER_USER: usize = 64;
/// Most shares one `ListShares` answers with (many owners may share with one user).
pub const MAX_LISTED: usize = 1000;

/// A live share, with the uids it binds.
#[derive(Debug, Clone)]
pub struct Grant {
    pub info: ShareInfo,
    pub owner_uid: u32,
    pub grantee_uid: u32,
}

impl Grant {
    fn live(&self) -> bool {
        self.info.expires_at.is_none_or(|t| t > now_secs())
    }
}

/// The uid an object id names (`u<uid>-…`).
fn uid_of_object(object: &str) -> Option<u32> {
    let rest = object.strip_prefix('u')?;
    let (uid, tail) = rest.split_once('-')?;
    (!tail.is_empty() && object.len() <= 128).then_some(())?;
    uid.parse().ok()
}

pub fn share(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Share {
        object,
        grantee,
        input,
        expires_at,
    } = body
    else {
        unreachable!("the table routes only Share here")
    };
    let Some(PeerKind::Worker { uid, name }) = b.peer_kind().cloned() else {
        return Outcome::Violation("Share from a link that is not a worker".into());
    };
    if uid_of_object(&object) != Some(uid) {
        return Outcome::Violation(format!(
            "Share of {:?}, not an object of uid {uid}",
            clip(&object, 64)
        ));
    }
    let refuse = |message: String| {
        error(
            ErrorKind::Refused {
                rule: "share-grantee".into(),
            },
            format!("refused by rule share-grantee: {message}"),
        )
    };
    if !super::super::users::valid_name(&grantee) {
        return refuse(format!("invalid user name {:?}", clip(&grantee, 64)));
    }
    let account = match b.os.lookup_user(&grantee) {
        Ok(Some(a)) => a,
        Ok(None) => return refuse(format!("unix user '{grantee}' does not exist")),
        Err(e) => return error(ErrorKind::Failed, e),
    };
    if account.uid == uid {
        return refuse("a terminal is its owner's already".into());
    }
    if let Err(r) = user_allowed(b, &account) {
        return refuse(format!("'{grantee}' may not use stoa: {r}"));
    }
    b.shares.retain(Grant::live);
    b.shares
        .retain(|g| !(g.info.object == object && g.grantee_uid == account.uid));
    if b.shares.iter().filter(|g| g.owner_uid == uid).count() >= MAX_SHARES_PER_USER {
        return error(
            ErrorKind::Quota,
            format!("refused by rule shares-per-user: '{name}' has {MAX_SHARES_PER_USER} live shares; revoke one first"),
        );
    }
    let info = ShareInfo {
        object,
        owner: name.clone(),
        grantee: account.name.clone(),
        input,
        expires_at,
        granted_at: now_secs(),
    };
    info!(owner = %name, grantee = %account.name, object = %info.object, input, "shared");
    b.audit.record(
        "share_grant",
        json!({ "owner": name, "grantee": account.name, "object": info.object, "input": input, "expires_at": expires_at }),
    );
    b.shares.push(Grant {
        info,
        owner_uid: uid,
        grantee_uid: account.uid,
    });
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

pub fn unshare(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Unshare { object, grantee } = body else {
        unreachable!("the table routes only Unshare here")
    };
    let Some(PeerKind::Worker { uid, name }) = b.peer_kind().cloned() else {
        return Outcome::Violation("Unshare from a link that is not a worker".into());
    };
    let mut ended = Vec::new();
    b.shares.retain(|g| {
        let hit = g.owner_uid == uid
            && g.info.object == object
            && grantee.as_ref().is_none_or(|n| *n == g.info.grantee);
        if hit {
            ended.push(g.info.grantee.clone());
        }
        !hit
    });
    for grantee in ended {
        b.audit.record(
            "share_revoke",
            json!({ "owner": name, "grantee": grantee, "object": clip(&object, 128) }),
        );
    }
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

pub fn list(b: &mut Broker, ctx: &Ctx, _body: RequestBody) -> Outcome {
    let principal = ctx.principal.as_ref().expect("UserCredential fills it");
    let Some(me) = principal.unix_user() else {
        return Outcome::Reply(ReplyBody::Shares(Vec::new()), Vec::new());
    };
    b.shares.retain(Grant::live);
    let list = b
        .shares
        .iter()
        .filter(|g| g.info.owner == me || g.info.grantee == me)
        // Within a frame whatever others shared with this user.
        .take(MAX_LISTED)
        .map(|g| g.info.clone())
        .collect();
    Outcome::Reply(ReplyBody::Shares(list), Vec::new())
}

pub fn open_shared(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::OpenShared { object, .. } = body else {
        unreachable!("the table routes only OpenShared here")
    };
    let principal = ctx.principal.clone().expect("UserCredential fills it");
    let me = principal.unix_user().unwrap_or_default().to_string();
    b.shares.retain(Grant::live);
    let Some(grant) = b
        .shares
        .iter()
        .find(|g| g.info.object == object && g.info.grantee == me)
        .cloned()
    else {
        return error(
            ErrorKind::Forbidden,
            "nothing of that name is shared with you",
        );
    };
    b.audit.record(
        "share_attach",
        json!({ "owner": grant.info.owner, "grantee": me, "object": grant.info.object, "input": grant.info.input }),
    );
    let account = super::super::spawn::Account {
        name: grant.info.owner.clone(),
        uid: grant.owner_uid,
        gid: u32::MAX,
        home: Default::default(),
        shell: Default::default(),
        groups: Vec::new(),
    };
    // The owner's worker runs (the shared terminal is its live work): never started here.
    super::workers::connect_shared(b, account, principal, grant.info)
}

#[cfg(test)]
mod tests {
    use super::uid_of_object;

    #[test]
    fn object_ids_name_their_uid() {
        assert_eq!(uid_of_object("u1001-abc"), Some(1001));
        assert_eq!(uid_of_object("u1001-"), None);
        assert_eq!(uid_of_object("x1001-abc"), None);
        assert_eq!(uid_of_object("u-abc"), None);
    }
}
