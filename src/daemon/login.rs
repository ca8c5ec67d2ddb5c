//! `POST /login` and `POST /logout` (the front): logging in with a Unix account.
//!
//! | request | body | answer |
//! |---------|------|--------|
//! | `POST /login` | `{"username", "password"}` as `application/json` (a form another site posts cannot be JSON without asking first) | 200 `{"unix_user", "csrf_token", "expires_at"}` and the `stoa_session` cookie (HttpOnly, SameSite=Strict, Secure over HTTPS); 401 a wrong user name or password; 403 with the rule (root, the service user, a user outside the policy, an account that may not log in); 429 too many failures |
//! | `POST /logout` | – | 204, the log-in ended and its cookie cleared |
//!
//! The password goes to the broker, which has it checked by PAM in a helper process of its
//! own (`broker::login_helper`), and counts and throttles failures per user name and per
//! address (`broker::handlers::login`); the front keeps nothing of it.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::credential::{self, Source};
use super::front_main::FrontState;
use super::http::ApiError;
use crate::wire::{ReplyBody, RequestBody};

/// Most bytes of a log-in request.
const MAX_LOGIN_BODY: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    username: String,
    password: String,
}

/// Whether the client reached us over HTTPS (through a proxy the config trusts to say so).
fn over_https(state: &FrontState, headers: &HeaderMap) -> bool {
    state.config.http.trust_forwarded_proto
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

pub async fn login(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().map(str::trim) == Some("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the log-in as Content-Type: application/json",
        ));
    }
    if body.len() > MAX_LOGIN_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the log-in request is too large",
        ));
    }
    let req: LoginRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"username\": \"...\", \"password\": \"...\"}}: {e}"),
        )
    })?;
    // Failures are counted (per user name and per address) and throttled by the broker.
    let peer = super::auth::current_peer();
    let reply = state
        .link
        .request(RequestBody::Login {
            username: req.username,
            password: req.password,
            peer: peer.map(|p| p.to_string()),
        })
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::LoggedIn {
            credential,
            unix_user,
            expires_at,
        } => {
            let max_age = expires_at.saturating_sub(crate::broker::credentials::now_secs());
            let cookie = credential::set_cookie(&credential, max_age, over_https(&state, &headers));
            let mut response = Json(json!({
                "unix_user": unix_user,
                "csrf_token": credential::csrf_token(&credential),
                "expires_at": expires_at,
            }))
            .into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
            Ok(response)
        }
        ReplyBody::Error(e) => Err(ApiError::from_broker(e)),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

/// Ends the log-in of the cookie (or of a log-in credential sent as a bearer token) and
/// clears the cookie. Answers 204 even when there was nothing to end.
pub async fn logout(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let presented = credential::presented(&headers)
        .map_err(|why| ApiError::new(StatusCode::UNAUTHORIZED, why))?;
    if let Some(p) = &presented {
        state
            .link
            .request(RequestBody::Logout {
                credential: p.value.clone(),
            })
            .await
            .map_err(ApiError::broker_down)?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    if presented.is_none_or(|p| p.source == Source::Cookie) {
        response.headers_mut().insert(
            header::SET_COOKIE,
            credential::clear_cookie(over_https(&state, &headers)),
        );
    }
    Ok(response)
}
