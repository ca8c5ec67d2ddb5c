//! Sessions, tasks, messages, live events and secrets over HTTP.
//!
//! | route                               | what                                                    |
//! |-------------------------------------|---------------------------------------------------------|
//! | `POST /sessions`                    | create (201); the worktree is checked as the user       |
//! | `GET /sessions`                     | yours (admins: all)                                     |
//! | `GET /sessions/:id`                 | one (404 if not yours)                                  |
//! | `DELETE /sessions/:id`              | delete (409 while a task runs)                          |
//! | `POST /sessions/:id/prompt`         | start a task (202); 409 while one runs: there is no queue|
//! | `POST /sessions/:id/stop`           | stop the running task: SIGTERM, SIGKILL after the grace |
//! | `GET /sessions/:id/tasks`           | its tasks, oldest first                                 |
//! | `GET /sessions/:id/messages`        | stored events, `?after=SEQ&limit=N`                     |
//! | `GET /sessions/:id/events`          | Server-Sent Events (`message`, `task`, `approval`), resumable with `Last-Event-ID` |
//! | `GET /tasks/:id`                    | one task                                                |
//! | `GET /users/me`                     | who the token is                                        |
//! | `GET /users/me/secrets`             | names of your secrets (never values)                    |
//! | `PUT /users/me/secrets/:name`       | set one (body: the value); 204                          |
//! | `DELETE /users/me/secrets/:name`    | remove one; 204                                         |
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use stoa_executor::agents::Tool;

use super::http::ApiError;
use super::store::{now, Session, Task};
use super::tasks::{self, StopReason};
use super::worker::authenticate;
use super::{AppState, Notice};
use crate::wire::{Principal, ReplyBody, RequestBody};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sessions", post(create).get(list))
        .route("/sessions/{id}", get(show).delete(delete))
        .route("/sessions/{id}/prompt", post(prompt))
        .route("/sessions/{id}/stop", post(stop))
        .route("/sessions/{id}/tasks", get(tasks_of))
        .route("/sessions/{id}/messages", get(messages))
        .route("/sessions/{id}/events", get(events))
        .route("/tasks/{id}", get(task))
        .route("/users/me/secrets", get(list_secrets))
        .route(
            "/users/me/secrets/{name}",
            put(set_secret).delete(delete_secret),
        )
}

fn store_error(e: String) -> ApiError {
    ApiError::internal(e)
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// The session, if the principal may see it (the API user that created it, by id, acting
/// as the session's Unix user; or an admin); else 404, which says nothing about whether it
/// exists.
async fn visible_session(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<Session, ApiError> {
    let session = state.store.session(id).await.map_err(store_error)?;
    match session {
        Some(s) if principal.may_use(&s.owner, &s.unix_user) => Ok(s),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no session {id}"),
        )),
    }
}

async fn broker_done(state: &AppState, request: RequestBody) -> Result<ReplyBody, ApiError> {
    let reply = state
        .link
        .request(request)
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::Error(e) => Err(ApiError::from_broker(e)),
        body => Ok(body),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    agentic_tool: String,
    worktree: String,
    #[serde(default)]
    unix_user: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    permission_mode: Option<String>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CreateSession>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    let req = json_body(body)?;
    if Tool::from_name(&req.agentic_tool).is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown agentic_tool {:?}: claude-code, codex, gemini or opencode",
                req.agentic_tool
            ),
        ));
    }
    let unix_user = match (req.unix_user, principal.unix_user()) {
        (Some(u), _) => u,
        (None, Some(own)) => own.to_string(),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unix_user is required with the admin token",
            ))
        }
    };
    for (what, value) in [
        ("model", &req.model),
        ("permission_mode", &req.permission_mode),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.len() > 200 || v.starts_with('-') || v.contains('\0'))
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid {what}"),
            ));
        }
    }
    // The broker checks, as that user, that the worktree can be entered; it also refuses a
    // credential that may not act as that user. It answers with the directory's identity,
    // which every run in the session must find again (a broker from before pins answers
    // `Done`: no pin).
    let worktree_id = match broker_done(
        &state,
        RequestBody::CheckDir {
            credential,
            unix_user: unix_user.clone(),
            path: req.worktree.clone(),
        },
    )
    .await?
    {
        ReplyBody::Dir(id) => Some(id),
        ReplyBody::Done => None,
        other => {
            return Err(ApiError::internal(format!(
                "unexpected broker reply to CheckDir: {other:?}"
            )))
        }
    };
    let at = now();
    let session = Session {
        session_id: super::store::object_id(state.uid),
        owner: principal.owner(),
        unix_user,
        agentic_tool: req.agentic_tool,
        worktree: req.worktree,
        worktree_id,
        model: req.model,
        permission_mode: req.permission_mode,
        agent_session_id: None,
        status: "idle".into(),
        created_at: at.clone(),
        updated_at: at,
    };
    state
        .store
        .insert_session(session.clone())
        .await
        .map_err(store_error)?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let of = match principal.unix_user() {
        Some(unix_user) if !principal.is_admin() => {
            Some((principal.owner(), unix_user.to_string()))
        }
        _ => None,
    };
    let sessions = state.store.sessions(of).await.map_err(store_error)?;
    Ok(Json(sessions).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    Ok(Json(visible_session(&state, &principal, &id).await?).into_response())
}

async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let session = visible_session(&state, &principal, &id).await?;
    if session.status == "running" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a task is running: stop it first",
        ));
    }
    state.store.delete_session(&id).await.map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptRequest {
    prompt: String,
    #[serde(default, rename = "permissionMode", alias = "permission_mode")]
    permission_mode: Option<String>,
}

/// Prompts are bounded: a prompt is text a person wrote or pasted.
const MAX_PROMPT_BYTES: usize = 256 * 1024;

async fn prompt(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<PromptRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    state.accepting_work()?;
    let mut session = visible_session(&state, &principal, &id).await?;
    let req = json_body(body)?;
    if req.prompt.trim().is_empty() || req.prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a prompt is 1 to {MAX_PROMPT_BYTES} bytes"),
        ));
    }
    if let Some(mode) = req.permission_mode {
        if mode.len() > 200 || mode.starts_with('-') {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid permissionMode",
            ));
        }
        session.permission_mode = Some(mode);
    }
    // A user whose stored output is at its limit gets nothing new stored: say so now
    // rather than start an agent whose first message would fail the task.
    let limit = state.config.execution.max_user_output_bytes;
    let used = state
        .store
        .user_output_bytes(&session.unix_user)
        .await
        .map_err(store_error)?;
    if used >= limit {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the stored output of unix user '{}' is at its limit (execution.max_user_output_bytes = {limit} bytes); delete old sessions to free it",
                session.unix_user
            ),
        ));
    }
    let task = Task {
        task_id: super::store::object_id(state.uid),
        session_id: session.session_id.clone(),
        prompt: req.prompt,
        status: "queued".into(),
        error: None,
        exit_code: None,
        signal: None,
        executed_via: None,
        confinement: None,
        unix_user: session.unix_user.clone(),
        handle: None,
        created_at: now(),
        started_at: None,
        finished_at: None,
    };
    if !state
        .store
        .begin_task(task.clone())
        .await
        .map_err(store_error)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the session is running a task; wait for it or stop it (prompts are not queued)",
        ));
    }
    state.notify_task(&task.task_id).await;
    tasks::start(state.clone(), session, task.clone(), credential);
    Ok((StatusCode::ACCEPTED, Json(task)).into_response())
}

async fn stop(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let session = visible_session(&state, &principal, &id).await?;
    let tasks = state
        .store
        .tasks_of(&session.session_id)
        .await
        .map_err(store_error)?;
    let running = tasks
        .into_iter()
        .rev()
        .find(|t| matches!(t.status.as_str(), "running" | "waiting" | "queued"));
    let Some(task) = running else {
        return Err(ApiError::new(StatusCode::CONFLICT, "no task is running"));
    };
    let sender = state
        .running
        .lock()
        .expect("running lock")
        .get(&task.task_id)
        .cloned();
    match sender {
        Some(tx) => {
            let _ = tx.send(Some(StopReason::Requested));
            Ok((StatusCode::ACCEPTED, Json(task)).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "the task is starting; try again in a moment",
        )),
    }
}

async fn tasks_of(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let session = visible_session(&state, &principal, &id).await?;
    Ok(Json(
        state
            .store
            .tasks_of(&session.session_id)
            .await
            .map_err(store_error)?,
    )
    .into_response())
}

async fn task(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let task = state.store.task(&id).await.map_err(store_error)?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("no task {id}"));
    let task = task.ok_or_else(not_found)?;
    visible_session(&state, &principal, &task.session_id)
        .await
        .map_err(|_| not_found())?;
    Ok(Json(task).into_response())
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<i64>,
}

async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let session = visible_session(&state, &principal, &id).await?;
    let limit = page.limit.unwrap_or(1000).clamp(1, 10_000);
    let msgs = state
        .store
        .messages(&session.session_id, page.after, limit)
        .await
        .map_err(store_error)?;
    Ok(Json(msgs).into_response())
}

/// Server-Sent Events: `message` events (id = the message's sequence number, so a client
/// resumes with `Last-Event-ID`) and `task` events when a task changes state.
async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let session = visible_session(&state, &principal, &id).await?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    struct Cursor {
        state: Arc<AppState>,
        session_id: String,
        last: i64,
        pending: VecDeque<Event>,
        notices: tokio::sync::broadcast::Receiver<Notice>,
    }
    let cursor = Cursor {
        notices: state.notices.subscribe(),
        state,
        session_id: session.session_id,
        last,
        pending: VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(event), c));
            }
            // Whatever was stored since the last one sent, from the store: a lagging
            // subscriber loses nothing.
            match c.state.store.messages(&c.session_id, c.last, 256).await {
                Ok(msgs) if !msgs.is_empty() => {
                    for m in msgs {
                        c.last = m.seq;
                        let data = serde_json::to_string(&m).unwrap_or_default();
                        c.pending.push_back(
                            Event::default()
                                .id(m.seq.to_string())
                                .event("message")
                                .data(data),
                        );
                    }
                    continue;
                }
                Ok(_) => {}
                Err(_) => return None,
            }
            match tokio::time::timeout(Duration::from_secs(30), c.notices.recv()).await {
                Ok(Ok(Notice::Task { session_id, task })) if session_id == c.session_id => {
                    let data = serde_json::to_string(&task).unwrap_or_default();
                    c.pending
                        .push_back(Event::default().event("task").data(data));
                }
                Ok(Ok(Notice::Approval {
                    session_id,
                    approval,
                })) if session_id == c.session_id => {
                    let data = serde_json::to_string(&approval).unwrap_or_default();
                    c.pending
                        .push_back(Event::default().event("approval").data(data));
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                _ => {}
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn list_secrets(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, credential) = authenticate(&state, &headers).await?;
    match broker_done(&state, RequestBody::ListSecrets { credential }).await? {
        ReplyBody::Names(names) => Ok(Json(json!({ "names": names })).into_response()),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

async fn set_secret(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    let (_, credential) = authenticate(&state, &headers).await?;
    // A trailing newline from `echo` or a file is not part of a key.
    let value = body
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v))
        .unwrap_or(&body)
        .to_string();
    if value.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body is the secret's value, and it is empty",
        ));
    }
    broker_done(
        &state,
        RequestBody::SetSecret {
            credential,
            name,
            value,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_secret(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (_, credential) = authenticate(&state, &headers).await?;
    broker_done(&state, RequestBody::DeleteSecret { credential, name }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
