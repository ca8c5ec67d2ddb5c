//! Agents that ask before they act: a permission request from an agent's run becomes a
//! durable approval in the worker's store, announced on the session's event stream, and
//! waits (its task `waiting`) until somebody who may use the session answers it, or
//! `execution.approval_timeout_secs` passes (then it is denied). Every step goes to the
//! broker's audit log (`RecordApproval`).
//!
//! | route                     | what                                                        |
//! |---------------------------|-------------------------------------------------------------|
//! | `GET /approvals`          | pending requests of the sessions you may use, oldest first (admins: everyone's, merged by the front) |
//! | `GET /approvals/:id`      | one, answered or not                                        |
//! | `POST /approvals/:id`     | `{"decision": "allow" \| "deny", "for_session": bool, "message": "..."}`: the first answer wins (409 after) |
//!
//! The answer reaches the agent through its run (`tasks.rs`), which holds the agent's
//! stdin; a run taken over after a worker restart finds its pending requests in the store.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use tracing::warn;

use stoa_executor::agents::PermissionAsk;

use super::approval_store::{Approval, Verdict};
use super::http::ApiError;
use super::store::{now, object_id, Session};
use super::worker::authenticate;
use super::{AppState, Notice};
use crate::wire::{ApprovalStep, RequestBody};

/// Most pending requests one run may have; past it the agent's next asks are denied at once.
pub const MAX_PENDING_PER_TASK: usize = 16;
/// Most requests one run may make in all: past it they are denied without being stored, so
/// an agent cannot grow its user's store (on a disk others share) by asking.
pub const MAX_ASKS_PER_RUN: usize = 256;
/// Most bytes of one request as stored (its input whole): a larger one is denied at once,
/// never allowed unseen.
pub const MAX_ASK_BYTES: usize = 64 * 1024;
/// Most bytes of a summary line.
const SUMMARY_CHARS: usize = 200;
/// Most bytes of a denial message a person may give.
const MAX_MESSAGE_BYTES: usize = 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/approvals", get(list))
        .route("/approvals/{id}", get(show).post(answer))
}

/// One line saying what the tool would do: a command, a file, or the input compacted; it
/// says when the input holds more than it shows (`stoa approvals show` has it all).
pub fn summary(ask: &PermissionAsk) -> String {
    let input = &ask.input;
    let key = ["command", "file_path", "path", "url", "pattern", "title"]
        .into_iter()
        .find(|k| input.get(*k).is_some_and(Value::is_string));
    let said = key
        .and_then(|k| input.get(k).and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| input.to_string());
    let others = match (key, input.as_object()) {
        (Some(k), Some(fields)) => fields
            .keys()
            .filter(|f| *f != k && *f != "description")
            .count(),
        _ => 0,
    };
    let mut line: String = format!("{}: {}", ask.tool, said.replace(['\n', '\r'], " "));
    let mut short: String = line.chars().take(SUMMARY_CHARS).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    if others > 0 {
        line = format!(
            " (+{others} more field{})",
            if others == 1 { "" } else { "s" }
        );
        short.push_str(&line);
    }
    short
}

/// Writes one step to the broker's audit log (best effort: a refused record is logged).
pub async fn audit(
    state: &AppState,
    approval: &Approval,
    step: ApprovalStep,
    credential: Option<String>,
) {
    let request = RequestBody::RecordApproval {
        credential,
        approval: approval.approval_id.clone(),
        session: approval.session_id.clone(),
        task: approval.task_id.clone(),
        tool: clip(&approval.tool, 128),
        step,
        summary: approval.summary.clone(),
    };
    match state.link.request(request).await {
        Ok(reply) => {
            if let crate::wire::ReplyBody::Error(e) = reply.body {
                warn!(approval = %approval.approval_id, "the audit record was refused: {}", e.message);
            }
        }
        Err(e) => warn!(approval = %approval.approval_id, "cannot audit: {e}"),
    }
}

/// A new pending request for `ask` of `task_id`'s run.
pub async fn open(
    state: &AppState,
    session: &Session,
    task_id: &str,
    ask: PermissionAsk,
) -> Result<Approval, String> {
    let created = std::time::SystemTime::now();
    let expires =
        created + std::time::Duration::from_secs(state.config.execution.approval_timeout_secs);
    let approval = Approval {
        approval_id: object_id(state.uid),
        session_id: session.session_id.clone(),
        task_id: task_id.to_string(),
        tool: ask.tool.clone(),
        summary: summary(&ask),
        input: ask.input.clone(),
        description: ask.description.clone(),
        status: "pending".into(),
        for_session: false,
        decided_by: None,
        reason: None,
        created_at: now(),
        expires_at: unix_secs(expires),
        decided_at: None,
        ask,
    };
    let limit = state.config.execution.max_user_output_bytes;
    if !state
        .store
        .insert_approval(approval.clone(), &session.unix_user, limit)
        .await?
    {
        return Err(format!(
            "the user's stored output is at its limit ({limit} bytes, execution.max_user_output_bytes)"
        ));
    }
    announce(state, &approval);
    audit(state, &approval, ApprovalStep::Asked, None).await;
    Ok(approval)
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Settles what still waits of `task_id`'s run as abandoned (the run has ended, or
/// could not be taken over): nothing can answer it any more.
pub async fn abandon_task(state: &AppState, task_id: &str) {
    let pending = state
        .store
        .pending_approvals(Some(task_id))
        .await
        .unwrap_or_default();
    for approval in pending {
        let verdict = Verdict::settled("abandoned", "run ended", None);
        settle(
            state,
            &approval.approval_id,
            verdict,
            ApprovalStep::Abandoned,
        )
        .await;
        let _ = state.store.answer_delivered(&approval.approval_id).await;
    }
}

pub fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Tells the session's event streams about a request (new or settled).
pub fn announce(state: &AppState, approval: &Approval) {
    let _ = state.notices.send(Notice::Approval {
        session_id: approval.session_id.clone(),
        approval: Box::new(approval.clone()),
    });
}

/// Settles a request the run settles itself (expired, abandoned, allowed by the session's
/// rule); `None` if somebody answered first.
pub async fn settle(
    state: &AppState,
    approval_id: &str,
    verdict: Verdict<'_>,
    step: ApprovalStep,
) -> Option<Approval> {
    match state.store.decide_approval(approval_id, verdict).await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            warn!(approval = %approval_id, "cannot settle: {e}");
            return None;
        }
    }
    let approval = state.store.approval(approval_id).await.ok().flatten()?;
    announce(state, &approval);
    audit(state, &approval, step, None).await;
    Some(approval)
}

async fn visible(
    state: &AppState,
    principal: &crate::wire::Principal,
    approval: &Approval,
) -> Result<Session, ApiError> {
    match state.store.session(&approval.session_id).await {
        Ok(Some(s)) if principal.may_use(&s.owner, &s.unix_user) => Ok(s),
        _ => Err(not_found(&approval.approval_id)),
    }
}

/// Request `id`, if the principal may use its session (else 404, as for no request).
async fn visible_by_id(
    state: &AppState,
    principal: &crate::wire::Principal,
    id: &str,
) -> Result<Approval, ApiError> {
    let approval = state
        .store
        .approval(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(id))?;
    visible(state, principal, &approval).await?;
    Ok(approval)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no approval {id}"))
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let pending = state
        .store
        .pending_approvals(None)
        .await
        .map_err(ApiError::internal)?;
    let mut shown = Vec::new();
    for approval in pending {
        if visible(&state, &principal, &approval).await.is_ok() {
            shown.push(approval);
        }
    }
    Ok(Json(shown).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    Ok(Json(visible_by_id(&state, &principal, &id).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    decision: String,
    #[serde(default)]
    for_session: bool,
    message: Option<String>,
}

async fn answer(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Answer>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    let Json(answer) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    visible_by_id(&state, &principal, &id).await?;
    let allow = match answer.decision.as_str() {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("decision must be \"allow\" or \"deny\", not {other:?}"),
            ))
        }
    };
    if answer.for_session && !allow {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "for_session goes with \"allow\" only",
        ));
    }
    if answer
        .message
        .as_ref()
        .is_some_and(|m| m.len() > MAX_MESSAGE_BYTES)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("message: at most {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    let by = principal.owner();
    let reason = (!allow).then(|| {
        answer
            .message
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| format!("denied by {by} through stoa"))
    });
    let verdict = Verdict {
        status: if allow { "allowed" } else { "denied" },
        for_session: answer.for_session,
        by: &by,
        reason: reason.as_deref(),
    };
    let won = state
        .store
        .decide_approval(&id, verdict)
        .await
        .map_err(ApiError::internal)?;
    let settled = state
        .store
        .approval(&id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(&id))?;
    if !won {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("approval {id} is {} already", settled.status),
        ));
    }
    let step = match (allow, answer.for_session) {
        (true, true) => ApprovalStep::AllowedForSession,
        (true, false) => ApprovalStep::Allowed,
        (false, _) => ApprovalStep::Denied,
    };
    announce(&state, &settled);
    audit(&state, &settled, step, Some(credential.clone())).await;
    if answer.for_session {
        // The rule covers what already waits for that tool in the session, too.
        let waiting = state
            .store
            .pending_for_tool(&settled.session_id, &settled.tool)
            .await
            .unwrap_or_default();
        for other in waiting {
            let verdict = Verdict::settled("allowed", "session rule", None);
            settle(&state, &other, verdict, ApprovalStep::AllowedBySession).await;
        }
    }
    // The run delivers it to the agent; a run that is gone has abandoned it already.
    let sender = state
        .answers
        .lock()
        .expect("answers lock")
        .get(&settled.task_id)
        .cloned();
    if let Some(wake) = sender {
        wake.notify_one();
    }
    Ok(Json(settled).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ask(tool: &str, input: Value) -> PermissionAsk {
        PermissionAsk {
            request_id: "r".into(),
            tool: tool.into(),
            input,
            description: None,
            tool_use_id: None,
            reply: Value::Null,
        }
    }

    #[test]
    fn a_summary_says_when_the_input_holds_more_than_it_shows() {
        let plain = ask("Bash", json!({"command": "ls -l", "description": "list"}));
        assert_eq!(summary(&plain), "Bash: ls -l");
        let more = ask(
            "Bash",
            json!({"command": "ls", "run_in_background": true, "dangerouslyDisableSandbox": true}),
        );
        assert_eq!(summary(&more), "Bash: ls (+2 more fields)");
        // A long command is cut, and says so.
        let long = ask(
            "Bash",
            json!({"command": format!("echo ok; {}; rm -rf ~", "x".repeat(300))}),
        );
        let s = summary(&long);
        assert!(s.ends_with('…') && !s.contains("rm -rf"), "{s}");
        // Lines are one.
        assert_eq!(
            summary(&ask("Bash", json!({"command": "a\nb"}))),
            "Bash: a b"
        );
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("abc", 2), "ab");
        assert_eq!(clip("é", 1), "");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip(&"ü".repeat(100), 128).len(), 128);
    }
}
