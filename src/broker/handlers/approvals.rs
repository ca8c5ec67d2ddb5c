//! `RecordApproval`: a worker's account of its user's agents' permission requests (asked,
//! answered, expired), written to the audit log. The worker is its user's process: what it
//! says is recorded as its word, under its user, with only what the broker can check
//! itself verified (the answering caller's credential), bounded in size and rate so a
//! worker cannot fill root's disk with it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;

use super::super::table::{error, Ctx, Outcome};
use super::super::{Broker, PeerKind};
use crate::wire::{limits, ErrorKind, ReplyBody, RequestBody};

/// Records per second each Unix user's worker regains, up to [`BURST`] at once.
const RATE_PER_SEC: f64 = 2.0;
const BURST: f64 = 60.0;

/// Each user's budget of records (`RecordApproval`, `RunSecrets`: what a worker can make
/// the broker write to the audit log).
#[derive(Default)]
pub struct RecordBudget {
    buckets: HashMap<u32, (Instant, f64)>,
}

impl RecordBudget {
    /// Takes one record from `uid`'s budget; false when it is spent.
    pub fn take(&mut self, uid: u32, now: Instant) -> bool {
        let (last, tokens) = self.buckets.entry(uid).or_insert((now, BURST));
        let refilled =
            (*tokens + now.duration_since(*last).as_secs_f64() * RATE_PER_SEC).min(BURST);
        *last = now;
        if refilled < 1.0 {
            *tokens = refilled;
            return false;
        }
        *tokens = refilled - 1.0;
        true
    }
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field} is {} bytes; at most {max}", value.len()));
    }
    Ok(())
}

pub fn record(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::RecordApproval {
        credential,
        approval,
        session,
        task,
        tool,
        step,
        summary,
    } = body
    else {
        unreachable!("the table routes only RecordApproval here")
    };
    let Some(PeerKind::Worker { uid, name }) = b.peer_kind().cloned() else {
        return Outcome::Violation("RecordApproval from a link that is not a worker".into());
    };
    let sizes = [
        ("approval", &approval, limits::MAX_NAME_BYTES),
        ("session", &session, limits::MAX_NAME_BYTES),
        ("task", &task, limits::MAX_NAME_BYTES),
        ("tool", &tool, limits::MAX_NAME_BYTES * 2),
        ("summary", &summary, limits::MAX_APPROVAL_SUMMARY_BYTES),
    ];
    for (field, value, max) in sizes {
        if let Err(e) = bounded(field, value, max) {
            return error(ErrorKind::BadRequest, format!("RecordApproval: {e}"));
        }
    }
    if !b.approval_records.take(uid, Instant::now()) {
        return error(
            ErrorKind::Quota,
            format!(
                "approval records: at most {BURST} at once and {RATE_PER_SEC} a second per user"
            ),
        );
    }
    // Who answered, as far as the broker can tell: a credential of this worker's own user
    // (a log-in, a token, an admin's delegation) is named; anything else is not believed.
    let by = credential
        .as_deref()
        .map(|c| match b.credentials.verify(c) {
            Some(p) if p.unix_user() == Some(name.as_str()) => p.owner(),
            _ => "unverified".to_string(),
        });
    b.audit.record(
        "approval",
        json!({
            "step": step.name(),
            "uid": uid,
            "user": name,
            "approval": approval,
            "session": session,
            "task": task,
            "tool": tool,
            "summary": summary,
            "by": by,
            "request_id": ctx.request_id,
        }),
    );
    Outcome::Reply(ReplyBody::Done, Vec::new())
}
