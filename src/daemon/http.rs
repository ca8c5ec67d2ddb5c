//! The HTTP API. Errors are JSON `{"error": "...", "rule": "..."?}`.
//!
//! | route             | auth  | what                                                    |
//! |-------------------|-------|---------------------------------------------------------|
//! The front's own routes (everything else goes to a worker, `proxy.rs`):
//!
//! | route             | auth  | what                                                    |
//! |-------------------|-------|---------------------------------------------------------|
//! | `GET /health`     | none  | status and version; with a valid token the full report  |
//! | `GET /users/me`   | any   | who the token is                                        |
//! | `GET /processes`  | admin | what the broker runs, for every user                    |
//! | `GET /metrics`    | admin | the front's and every running worker's metrics          |
//! | `POST /daemon/restart` | admin | a fresh front; running work (in the workers) is untouched |
//! | `POST /workers/:user/restart` | admin | a fresh worker for that user; its work survives |
//! | `GET /`, `/static/…` | none | the web page (built in, or `web_dir`)             |
//!
//! Sessions, tasks, secrets, terminals and `POST /exec` are served by the user's worker:
//! see `sessions.rs`, `terminals.rs`, `exec.rs`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::broker_link::LinkDown;
use super::front_main::FrontState;
use crate::wire::{BrokerError, ErrorKind, Principal, ReplyBody, RequestBody};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    rule: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            rule: None,
        }
    }

    /// A refusal by a named rule (the body says `rule`).
    pub fn by_rule(status: StatusCode, rule: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            rule: Some(rule.into()),
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn broker_down(_: LinkDown) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is not connected",
        )
    }

    pub fn from_broker(e: BrokerError) -> ApiError {
        let (status, rule) = match e.kind {
            ErrorKind::Unauthorized => (StatusCode::UNAUTHORIZED, None),
            ErrorKind::Forbidden => (StatusCode::FORBIDDEN, None),
            ErrorKind::Refused { rule } => (StatusCode::FORBIDDEN, Some(rule)),
            ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, None),
            ErrorKind::Quota => (StatusCode::TOO_MANY_REQUESTS, None),
            ErrorKind::Failed => (StatusCode::INTERNAL_SERVER_ERROR, None),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, None),
        };
        ApiError {
            status,
            message: e.message,
            rule,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(rule) = self.rule {
            body["rule"] = json!(rule);
        }
        (self.status, Json(body)).into_response()
    }
}

pub fn router(state: Arc<FrontState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/users/me", get(me))
        .route("/login", post(super::login::login))
        .route("/logout", post(super::login::logout))
        .route("/shares", get(super::proxy::list_shares))
        .route("/processes", get(processes))
        .route("/daemon/restart", post(restart))
        .route(
            "/workers/{user}/restart",
            post(super::proxy::restart_worker),
        )
        .route("/metrics", get(metrics))
        .merge(web_routes(&state.config))
        .fallback(super::proxy::forward)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::guard::layer,
        ))
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(state)
}

/// Gives every request an id: the client's `X-Request-Id` when it is a valid one, else a
/// fresh one. It is echoed in the response, set on the request's log lines, and carried
/// in every broker request made while serving it (so it reaches the broker's log and
/// audit lines).
pub async fn with_request_id(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::wire::valid_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let span = tracing::info_span!("http", request_id = %id);
    let mut response = super::broker_link::REQUEST_ID
        .scope(
            id.clone(),
            tracing::Instrument::instrument(next.run(request), span),
        )
        .await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// 16 random hex digits.
pub fn new_request_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = t.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Least free space in the state directory before `/health` says degraded.
const MIN_FREE_BYTES: u64 = 256 << 20;

async fn health(State(state): State<Arc<FrontState>>, headers: HeaderMap) -> Response {
    // Without a valid token: only whether it is up, and the version. The rest (paths,
    // limits, free space) is for users.
    let full = matches!(super::credential::presented(&headers), Ok(Some(_)))
        && authenticate(&state, &headers).await.is_ok();
    let welcome = state.link.welcome();
    let connected = state.link.connected();
    let direct = !(state.config.execution.use_executor && welcome.isolation);
    let warning = welcome.single_user.as_ref().map(|u| {
        format!("single-user mode: stoa was not started as root, so there is no isolation; everything runs as '{u}'")
    }).or_else(|| direct.then(|| {
        "execution.use_executor = false: agents run on the direct path, started by each user's worker as that user, without the executor (no per-run cgroup, limits or confinement)".to_string()
    }));
    let mut problems = Vec::new();
    if !connected {
        problems.push("the broker is not connected".to_string());
    }
    if state.shutting_down() {
        problems.push("stoa is shutting down".to_string());
    }
    // The users' stores are their workers' (each checks its own on every write); the
    // disk they are on is checked here.
    let stores = std::path::PathBuf::from(&welcome.workers_dir);
    let free =
        nix::sys::statvfs::statvfs(&stores).map(|s| s.blocks_available() * s.fragment_size());
    match free {
        Ok(b) if b < MIN_FREE_BYTES => {
            problems.push(format!("only {} MiB free in {}", b >> 20, stores.display()))
        }
        Err(e) => problems.push(format!(
            "cannot check free space in {}: {e}",
            stores.display()
        )),
        Ok(_) => {}
    }
    let stats = match state.link.request(RequestBody::Stats).await {
        Ok(r) => match r.body {
            ReplyBody::Stats(stats) => Some(stats),
            _ => None,
        },
        Err(_) => None,
    };
    let limits: serde_json::Map<String, serde_json::Value> = stats
        .iter()
        .flat_map(|s| s.limits.iter().map(|(k, v)| (k.clone(), json!(v))))
        .collect();
    // The broker process: an upgrade in place keeps its pid and changes its version.
    let rfc3339 = |secs: u64| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        humantime::format_rfc3339_seconds(t).to_string()
    };
    let broker = stats.map(|s| {
        json!({
            "version": s.broker.version,
            "pid": s.broker.pid,
            "started_at": rfc3339(s.broker.started_at),
            "upgraded_at": s.broker.upgraded_at.map(rfc3339),
            "upgrades": s.broker.upgrades,
        })
    });
    let body = json!({
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "problems": problems,
        "isolation": welcome.isolation,
        "mode": if welcome.isolation { "multi-user" } else { "single-user" },
        // How agents are started: by the broker through the executor, or by the worker.
        "execution": if direct { "direct" } else { "executor" },
        "broker_connected": connected,
        "workers_dir": welcome.workers_dir,
        "state_dir_free_bytes": free.ok(),
        "limits": limits,
        "version": env!("CARGO_PKG_VERSION"),
        "broker": broker,
        "warning": warning,
    });
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !full {
        let brief = json!({ "status": body["status"], "version": body["version"] });
        return (status, Json(brief)).into_response();
    }
    (status, Json(body)).into_response()
}

/// The request's credential (bearer token or log-in cookie) and who the broker says it
/// belongs to.
pub async fn authenticate(
    state: &FrontState,
    headers: &HeaderMap,
) -> Result<(Principal, String), ApiError> {
    let presented = super::credential::presented(headers)
        .map_err(|why| ApiError::new(StatusCode::UNAUTHORIZED, why))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not logged in: log in (POST /login) or send Authorization: Bearer <token>",
            )
        })?;
    let token = presented.value.as_str();
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some(v) = state.auth.cached(&key) {
        super::auth::note_verified(&v);
        return Ok((v.principal, token.to_string()));
    }
    // Taken before asking: a revocation that lands meanwhile wins.
    let generation = state.auth.generation();
    let peer = super::auth::current_peer();
    let reply = state
        .link
        .request(RequestBody::Authenticate {
            credential: token.to_string(),
            peer: peer.map(|p| p.to_string()),
        })
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::Principal(p) => {
            if !state.auth.insert(key, &p, generation) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this credential was just revoked",
                ));
            }
            super::auth::note_verified(&super::auth::Verified {
                principal: p.clone(),
                generation,
            });
            Ok((p, token.to_string()))
        }
        ReplyBody::Error(e) if e.kind == ErrorKind::Unauthorized => {
            let Some(peer) = peer else {
                return Err(ApiError::from_broker(e));
            };
            let (failures, throttled) = state.auth.failed(peer);
            tracing::warn!(%peer, failures, "authentication failed");
            if throttled {
                return Err(ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "too many failed authentications from {peer}: more than {} in the last minute; \
                         try again later (valid credentials still work)",
                        state.auth.failure_limit()
                    ),
                    rule: Some("http.auth_failures_per_minute".into()),
                });
            }
            Err(ApiError::from_broker(e))
        }
        ReplyBody::Error(e) => Err(ApiError::from_broker(e)),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

pub fn require_admin(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this needs an admin token",
        ))
    }
}

/// Who the token is (answered here: it needs no worker).
async fn me(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    let mut me = json!({
        "name": principal.name(),
        "unix_user": principal.unix_user(),
        "admin": principal.is_admin(),
    });
    // A page that was reloaded gets its log-in's CSRF token back.
    if let Ok(Some(p)) = super::credential::presented(&headers) {
        if p.source == super::credential::Source::Cookie {
            me["csrf_token"] = json!(super::credential::csrf_token(&credential));
        }
    }
    Ok(Json(me).into_response())
}

/// Every handle the broker has, for every user (admin): the broker checks the credential.
async fn processes(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    let list = all_handles(&state, &credential).await?;
    let views: Vec<_> = list
        .iter()
        .map(|i| super::processes::view_of(i, i.exited))
        .collect();
    Ok(Json(views).into_response())
}

/// Every handle, page by page (`ListAll`, which needs an admin credential).
pub async fn all_handles(
    state: &FrontState,
    credential: &str,
) -> Result<Vec<crate::wire::HandleInfo>, ApiError> {
    let (mut list, mut after) = (Vec::new(), None);
    loop {
        let reply = state
            .link
            .request(RequestBody::ListAll {
                credential: credential.to_string(),
                after,
            })
            .await
            .map_err(ApiError::broker_down)?;
        match reply.body {
            ReplyBody::Handles { list: page, more } => {
                after = page.last().map(|i| i.handle);
                list.extend(page);
                if !more || after.is_none() {
                    return Ok(list);
                }
            }
            ReplyBody::Error(e) => return Err(ApiError::from_broker(e)),
            other => {
                return Err(ApiError::internal(format!(
                    "unexpected broker reply {other:?}"
                )))
            }
        }
    }
}

/// Restarts the front: it answers, then exits; the broker starts a new one. Running work
/// lives in the workers and is not touched.
async fn restart(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    tracing::info!(by = %principal.name(), "restart requested");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::process::exit(0);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "restarting": true, "pid": std::process::id() })),
    )
        .into_response())
}

/// The web page: the directory `web_dir` names (`GET /` is its `index.html`, `/static/…`
/// its files) when set, else the page built into the binary (`web_page.rs`).
fn web_routes(config: &crate::config::DaemonConfig) -> Router<Arc<FrontState>> {
    match &config.web_dir {
        Some(dir) => Router::new()
            .route_service(
                "/",
                tower_http::services::ServeFile::new(dir.join("index.html")),
            )
            .nest_service("/static", tower_http::services::ServeDir::new(dir)),
        None => super::web_page::routes(),
    }
}

/// Prometheus text format (admin: the labels name users): the front's own counters and the
/// broker's, summed with every running worker's (`proxy::worker_metrics`).
async fn metrics(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    let m = &state.metrics;
    m.live_executors.clear();
    for i in all_handles(&state, &credential).await? {
        if i.exited.is_none() {
            m.live_executors
                .get_or_create(&super::metrics::UserLabels {
                    unix_user: i.unix_user,
                })
                .inc();
        }
    }
    if let Ok(reply) = state.link.request(RequestBody::Stats).await {
        if let ReplyBody::Stats(stats) = reply.body {
            // Mirror the broker's counters (they only grow while it runs).
            let mirror = |c: &prometheus_client::metrics::counter::Counter<
                u64,
                std::sync::atomic::AtomicU64,
            >,
                          v: u64| {
                let now = c.get();
                if v > now {
                    c.inc_by(v - now);
                }
            };
            mirror(&m.broker_frames, stats.frames_received);
            mirror(&m.broker_violations, stats.protocol_violations);
            mirror(&m.daemon_starts, stats.daemon_starts);
        }
    }
    let own = m.encode().map_err(|e| ApiError::internal(e.to_string()))?;
    let workers = super::proxy::worker_metrics(&state, &principal, &credential, &headers).await;
    let text = super::metrics::sum_texts(&own, &workers);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
