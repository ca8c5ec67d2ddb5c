//! Sharing a terminal, on the owner's worker.
//!
//! | route                                   | who              | what                                   |
//! |-----------------------------------------|------------------|----------------------------------------|
//! | `POST /terminals/:id/shares`            | the owner        | `{"unix_user", "input"?: bool, "minutes"?: n}` → 201: the broker records the share (`Share`) |
//! | `DELETE /terminals/:id/shares/:user`    | the owner        | ends the share (`Unshare`) and at once the grantee's open viewers of it → 204 |
//!
//! The grantee reaches the terminal through the front (`GET /shares` lists what was shared
//! with them and by them; `GET /terminals/:id/ws` with their own credential): the broker
//! opens a connection to this worker that names the share, and [`Access`] limits it to that
//! terminal's socket, read-only unless the share gives input, until it expires or is revoked.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Notify;

use super::http::ApiError;
use super::worker::authenticate;
use super::AppState;
use crate::wire::{ReplyBody, RequestBody, ShareInfo};

/// Longest a share with input may last (`minutes`); read-only shares may be open-ended.
pub const MAX_INPUT_MINUTES: u64 = 24 * 60;

/// Revocations this worker made, so open viewers of a revoked share end.
#[derive(Default)]
pub struct Revocations {
    /// (object, grantee) → when it was revoked.
    ended: Mutex<Vec<(String, String, Instant)>>,
    changed: Notify,
}

impl Revocations {
    fn revoke(&self, object: &str, grantee: Option<&str>) {
        let mut ended = self.ended.lock().expect("revocations lock");
        // A grantee of `None` is everyone: recorded as an empty name.
        ended.push((
            object.to_string(),
            grantee.unwrap_or("").to_string(),
            Instant::now(),
        ));
        // Bounded: the oldest go (a viewer older than them was ended when they came).
        if ended.len() > 1024 {
            ended.drain(..512);
        }
        drop(ended);
        self.changed.notify_waiters();
    }

    fn revoked_since(&self, share: &ShareInfo, since: Instant) -> bool {
        self.ended
            .lock()
            .expect("revocations lock")
            .iter()
            .any(|(o, g, at)| {
                *o == share.object && (g.is_empty() || *g == share.grantee) && *at >= since
            })
    }
}

/// A connection opened for a share: what it may do.
pub struct Access<'a> {
    pub share: &'a ShareInfo,
    pub since: Instant,
}

impl Access<'_> {
    /// Waits until the share ends for this viewer: revoked, or expired.
    pub async fn ended(&self, state: &AppState) {
        let revocations = &state.terminals.revocations;
        let expiry = async {
            match self.share.expires_at {
                Some(t) => {
                    let left = t.saturating_sub(crate::broker::credentials::now_secs());
                    tokio::time::sleep(std::time::Duration::from_secs(left)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        loop {
            let changed = revocations.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if revocations.revoked_since(self.share, self.since) {
                return;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = &mut expiry => return,
            }
        }
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/terminals/{id}/shares", post(grant))
        .route("/terminals/{id}/shares/{user}", delete(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    unix_user: String,
    #[serde(default)]
    input: bool,
    #[serde(default)]
    minutes: Option<u64>,
}

async fn grant(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Grant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    // Only the owner shares (an admin acts on it by acting as the owner, not by sharing it).
    let terminal = state.terminals.owned(&principal, &id)?;
    let minutes = match (req.input, req.minutes) {
        (true, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("a share with input lasts a limited time: give \"minutes\" (1 to {MAX_INPUT_MINUTES})"),
            ))
        }
        (true, Some(m)) if !(1..=MAX_INPUT_MINUTES).contains(&m) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("\"minutes\" is 1 to {MAX_INPUT_MINUTES} for a share with input"),
            ))
        }
        (_, Some(0)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "\"minutes\" is at least 1",
            ))
        }
        (_, m) => m,
    };
    let expires_at = minutes.map(|m| crate::broker::credentials::now_secs() + m * 60);
    let reply = state
        .link
        .request(RequestBody::Share {
            object: terminal.clone(),
            grantee: req.unix_user.clone(),
            input: req.input,
            expires_at,
        })
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::Done => Ok((
            StatusCode::CREATED,
            Json(serde_json::json!({
                "object": terminal,
                "grantee": req.unix_user,
                "input": req.input,
                "expires_at": expires_at,
            })),
        )
            .into_response()),
        ReplyBody::Error(e) => Err(ApiError::from_broker(e)),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let terminal = state.terminals.owned(&principal, &id)?;
    state
        .link
        .request(RequestBody::Unshare {
            object: terminal.clone(),
            grantee: Some(user.clone()),
        })
        .await
        .map_err(ApiError::broker_down)?;
    state.terminals.revocations.revoke(&terminal, Some(&user));
    Ok(StatusCode::NO_CONTENT.into_response())
}
