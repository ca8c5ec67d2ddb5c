//! The link itself and who is asking: `Hello`, `Ready`, `Authenticate`, `Stats`; the audit
//! lines for refusals and failed authentications (both rate-limited); telling the daemon
//! whose credentials stopped working.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use serde_json::json;
use tracing::{info, warn};

use super::super::admission::Record;
use super::super::table::{clip, error, Ctx, Outcome};
use super::super::{Broker, LinkState, Mode, Outgoing, PeerKind, Target};
use crate::wire::{
    limits, BrokerMessage, BrokerStats, ErrorKind, Event, ReplyBody, RequestBody, Welcome,
    PROTOCOL_VERSION,
};

pub fn hello(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Hello { protocol } = body else {
        unreachable!("the table routes only Hello here")
    };
    if protocol != PROTOCOL_VERSION {
        return Outcome::Violation(format!(
            "daemon speaks protocol {protocol}, broker {PROTOCOL_VERSION}"
        ));
    }
    b.link_state = LinkState::Ready;
    let single_user = match &b.mode {
        Mode::Isolated { .. } => None,
        Mode::SingleUser { me } => Some(me.name.clone()),
    };
    let welcome = Welcome {
        version: env!("CARGO_PKG_VERSION").into(),
        isolation: single_user.is_none(),
        single_user,
        workers_dir: b.policy.workers_dir.display().to_string(),
    };
    Outcome::Reply(ReplyBody::Welcome(welcome), Vec::new())
}

pub fn ready(b: &mut Broker, _ctx: &Ctx, _body: RequestBody) -> Outcome {
    if b.peer_kind() == Some(&PeerKind::Front) {
        info!("front ready");
        // Only the front's readiness is the service's (a worker starts on demand).
        if !b.announced {
            b.notifier.notify("READY=1\nSTATUS=serving");
            b.announced = true;
        } else {
            b.notifier.notify("STATUS=serving (front restarted)");
        }
    }
    if b.shutting_down {
        // A process that starts during a shutdown must know it too (only this link).
        b.outbox.push(Outgoing {
            link: b.link,
            message: BrokerMessage::Event(Event::ShuttingDown {
                grace_secs: b.policy.shutdown_grace_secs,
            }),
            fds: Vec::new(),
        });
    }
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

pub fn authenticate(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Authenticate { credential, peer } = body else {
        unreachable!("the table routes only Authenticate here")
    };
    let principal = (credential.len() <= limits::MAX_CREDENTIAL_BYTES)
        .then(|| b.credentials.verify(&credential))
        .flatten();
    match principal {
        Some(p) => {
            note_seen(b, &p, &credential);
            Outcome::Reply(ReplyBody::Principal(p), Vec::new())
        }
        None => {
            audit_auth_failure(b, peer.as_deref(), "Authenticate");
            error(ErrorKind::Unauthorized, "invalid credential")
        }
    }
}

pub fn stats(b: &mut Broker, _ctx: &Ctx, _body: RequestBody) -> Outcome {
    let p = &b.policy;
    let limits = [
        (
            "max_executors_per_user",
            p.max_executors_per_user.to_string(),
        ),
        ("max_executors_total", p.max_executors_total.to_string()),
        ("spawn_rate_per_sec", p.spawn_rate_per_sec.to_string()),
        ("spawn_burst", p.spawn_burst.to_string()),
        ("rlimit_nofile", p.rlimits.nofile.to_string()),
        ("rlimit_nproc", p.rlimits.nproc.to_string()),
        ("rlimit_core", p.rlimits.core.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into_iter()
    .chain(b.os.cgroup_report())
    .chain(b.policy.confine.report(&b.os.landlock()))
    .collect();
    let stats = BrokerStats {
        handles: b.handles.len() as u64,
        limits,
        ..b.stats.clone()
    };
    Outcome::Reply(ReplyBody::Stats(stats), Vec::new())
}

/// A failed authentication, audited at most at the broker-wide rate (the peer is the
/// daemon's word and clipped: it cannot grow the log).
pub fn audit_auth_failure(b: &mut Broker, peer: Option<&str>, what: &str) {
    if let Record::Write { suppressed } = b.admission.auth_failure() {
        let peer = peer.map(|p| clip(p, limits::MAX_PEER_BYTES).to_string());
        b.audit.record(
            "auth_failed",
            json!({ "request": what, "peer": peer, "suppressed_before": suppressed }),
        );
    }
}

/// A refused request, audited at most at `principal`'s refusal rate, with every string
/// clipped: a refusal costs the log a bounded line, and only so many.
pub fn audit_refusal(
    b: &mut Broker,
    principal: &str,
    what: &str,
    request_id: Option<&str>,
    unix_user: Option<&str>,
    kind: &ErrorKind,
    message: &str,
) {
    if let Record::Write { suppressed } = b.admission.refusal(principal) {
        let rule = match kind {
            ErrorKind::Refused { rule } => Some(rule.as_str()),
            _ => None,
        };
        b.audit.record(
            "refused",
            json!({
                "request": what,
                "principal": clip(principal, 64),
                "unix_user": unix_user.map(|u| clip(u, 64)),
                "rule": rule,
                "error": clip(message, 512),
                "request_id": request_id,
                "suppressed_before": suppressed,
            }),
        );
    }
}

/// A user credential the daemon now holds counts as seen, even if the user was added and
/// removed between two looks at the store: its removal must still end its connections.
pub fn note_seen(b: &mut Broker, principal: &crate::wire::Principal, credential: &str) {
    if let (crate::wire::Principal::User { id, .. }, Some(known)) =
        (principal, b.known_users.as_mut())
    {
        known
            .entry(*id)
            .or_insert_with(|| super::super::users::digest_hex(credential));
    }
}

/// Compares the user store with what was seen last and tells the daemon whose
/// credentials stopped working (removed users, rotated tokens).
pub fn check_revocations(b: &mut Broker) {
    let now: HashMap<u64, String> = match b.credentials.store.get() {
        Ok(store) => store
            .users
            .iter()
            .map(|u| (u.id, u.token_sha256.clone()))
            .collect(),
        Err(e) => {
            warn!("user store unreadable: {e}");
            return;
        }
    };
    let Some(before) = b.known_users.replace(now.clone()) else {
        return;
    };
    let revoked: Vec<u64> = before
        .iter()
        .filter(|(id, digest)| now.get(id) != Some(digest))
        .map(|(id, _)| *id)
        .collect();
    if !revoked.is_empty() {
        info!(
            ?revoked,
            "API users removed or rotated: their connections end"
        );
        b.audit
            .record("credentials_revoked", json!({ "api_users": revoked }));
        b.send_event(Target::All, Event::Revoked { keys: revoked });
    }
}
