//! Forwarding: which worker a request is for, and handing it over.
//!
//! The front authenticates the request (through the broker), picks the Unix user it
//! concerns and asks the broker for a connection to that user's worker, showing the
//! caller's credential (`OpenWorker`): a compromised front reaches only the users whose
//! credentials it sees. The request then goes over that connection as HTTP/1.1; a WebSocket
//! upgrade is spliced through byte for byte once both sides have switched.
//!
//! | request                                   | the worker of                                  |
//! |-------------------------------------------|------------------------------------------------|
//! | anyone's but an admin's                   | the principal's own Unix user (others' ids are 404 there) |
//! | an admin's, naming an id `u<uid>-…`       | that uid's user                                |
//! | an admin's `POST /sessions`, `/terminals`, `/exec` | the body's `unix_user` (or its `session_id`'s user) |
//! | an admin's `GET /sessions`, `/terminals`, `/approvals` | every user with a store: the lists are merged |
//! | an admin's, naming an older id            | every user with a store, until one knows it    |
//! | `GET /terminals/:id/ws?ticket=` (no token)| the id's user, if that worker runs, unauthenticated: the worker checks the ticket |
#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tracing::{debug, warn};

use super::front_main::FrontState;
use super::http::{authenticate, require_admin, ApiError};
use super::store::uid_of_id;
use super::worker_pool::{Conn, Key, Returning};
use crate::wire::{Principal, ReplyBody, RequestBody};
use hyper::client::conn::http1::SendRequest;
use sha2::{Digest, Sha256};

/// Most bytes of a request body the front reads to find the user it names.
const MAX_ROUTED_BODY: usize = 1 << 20;
/// Socket buffers for a spliced WebSocket.
const SPLICE_BUFFER: usize = 64 * 1024;

enum Target {
    One(String),
    /// Every user with a store (an admin's listing or older id).
    All,
}

/// The fallback route: everything the front does not serve itself.
pub async fn forward(State(state): State<Arc<FrontState>>, req: Request) -> Response {
    match forward_inner(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward_inner(state: &Arc<FrontState>, mut req: Request) -> Result<Response, ApiError> {
    // The worker logs under the same request id (it reaches the broker's lines from there).
    if let Ok(id) = super::broker_link::REQUEST_ID.try_with(|r| r.clone()) {
        if let Ok(value) = header::HeaderValue::from_str(&id) {
            req.headers_mut().insert("x-request-id", value);
        }
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Only what workers serve goes to one: anything else is no route, whoever asks.
    if !matches!(
        segments.first(),
        Some(&("approvals" | "exec" | "sessions" | "tasks" | "terminals" | "users"))
    ) {
        return Err(drained(req, ApiError::new(StatusCode::NOT_FOUND, "no such route")).await);
    }
    if let Some(user) = ticket_target(&req, &segments) {
        let fd = match open(state, None, &user, true).await {
            Ok(fd) => fd,
            Err(e) => return Err(drained(req, e).await),
        };
        return send(fd, req, &user).await;
    }
    let (principal, credential) = match authenticate(state, req.headers()).await {
        Ok(p) => p,
        Err(e) => return Err(drained(req, e).await),
    };
    let id = match segments.as_slice() {
        ["approvals" | "sessions" | "terminals" | "tasks", id, ..] => Some(id.to_string()),
        _ => None,
    };
    // Another user's terminal socket: only through a share of it, to its owner's worker,
    // without this user's credential (the owner's worker must never see it).
    if let ["terminals", id, "ws"] = segments.as_slice() {
        if let Some(owner) = shared_owner(&principal, id) {
            let object = id.to_string();
            let fd = match open_shared(state, &credential, &object).await {
                Ok(fd) => fd,
                Err(e) => return Err(drained(req, e).await),
            };
            let (mut parts, body) = req.into_parts();
            parts.headers = without_credential(&parts.headers);
            return send(fd, Request::from_parts(parts, body), &owner).await;
        }
    }
    let (req, target) = target(&principal, req, &segments, id.as_deref()).await?;
    match target {
        Target::One(user) => {
            // An admin's credential never goes to a user's worker: the broker gives the
            // connection one for that user alone (`Principal::Delegated`).
            let req = if principal.is_admin() {
                let (mut parts, body) = req.into_parts();
                parts.headers = without_credential(&parts.headers);
                Request::from_parts(parts, body)
            } else {
                req
            };
            let key = Key {
                credential: Sha256::digest(credential.as_bytes()).into(),
                user: user.clone(),
            };
            if !req.headers().contains_key(header::UPGRADE) {
                if let Some(sender) = state.pool.take(&key) {
                    return send_on(state, sender, key, req, &user).await;
                }
            }
            let kind = spawn_kind(req.method(), &segments);
            let fd = match open(state, Some(&credential), &user, true).await {
                Ok(fd) => fd,
                Err(e) => {
                    if let Some(kind) = kind {
                        let labels = super::metrics::SpawnLabels {
                            kind: kind.into(),
                            result: "refused".into(),
                        };
                        state.metrics.spawns.get_or_create(&labels).inc();
                    }
                    return Err(drained(req, e).await);
                }
            };
            if req.headers().contains_key(header::UPGRADE) {
                return send(fd, req, &user).await;
            }
            let sender = handshake(fd, &user).await?;
            send_on(state, Conn::new(sender), key, req, &user).await
        }
        Target::All => fan_out(state, &credential, req, id.is_some()).await,
    }
}

/// `e`, after reading what the client is still sending (bounded in size and time): an
/// answer sent over an unread body is lost to a connection reset.
async fn drained(req: Request, e: ApiError) -> ApiError {
    let body = axum::body::to_bytes(req.into_body(), MAX_ROUTED_BODY);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), body).await;
    e
}

/// A browser's terminal socket with a one-time ticket and no token: the id's user.
fn ticket_target(req: &Request, segments: &[&str]) -> Option<String> {
    let ["terminals", id, "ws"] = segments else {
        return None;
    };
    if !matches!(super::credential::presented(req.headers()), Ok(None)) {
        return None;
    }
    let query = req.uri().query().unwrap_or("");
    if !query.split('&').any(|kv| kv.starts_with("ticket=")) {
        return None;
    }
    user_of_uid(uid_of_id(id)?)
}

fn user_of_uid(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// What a refused connection counts as in the spawn metrics.
fn spawn_kind(method: &Method, segments: &[&str]) -> Option<&'static str> {
    match (method, segments) {
        (&Method::POST, ["exec"]) => Some("exec"),
        (&Method::POST, ["terminals"]) => Some("terminal"),
        (&Method::POST, ["sessions", _, "prompt"]) => Some("agent"),
        _ => None,
    }
}

async fn target(
    principal: &Principal,
    req: Request,
    segments: &[&str],
    id: Option<&str>,
) -> Result<(Request, Target), ApiError> {
    let own = principal.unix_user().map(str::to_string);
    if !principal.is_admin() {
        let user = own.ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "no unix user"))?;
        return Ok((req, Target::One(user)));
    }
    if let Some(id) = id {
        return match uid_of_id(id) {
            Some(uid) => match user_of_uid(uid) {
                Some(user) => Ok((req, Target::One(user))),
                None => Err(ApiError::new(StatusCode::NOT_FOUND, "no such object")),
            },
            None => Ok((req, Target::All)),
        };
    }
    let creates =
        req.method() == Method::POST && matches!(segments, ["sessions"] | ["terminals"] | ["exec"]);
    if creates {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_ROUTED_BODY)
            .await
            .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
        let named = named_user(&bytes).or(own);
        let req = Request::from_parts(parts, Body::from(bytes));
        return match named {
            Some(user) => Ok((req, Target::One(user))),
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "the admin token has no unix user: name one (\"unix_user\")",
            )),
        };
    }
    if req.method() == Method::GET
        && matches!(segments, ["sessions"] | ["terminals"] | ["approvals"])
    {
        return Ok((req, Target::All));
    }
    match own {
        Some(user) => Ok((req, Target::One(user))),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the admin token has no unix user; use a user token",
        )),
    }
}

/// The Unix user a create request names: `unix_user`, or its `session_id`'s.
fn named_user(body: &Bytes) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if let Some(u) = v.get("unix_user").and_then(Value::as_str) {
        return Some(u.to_string());
    }
    let session = v.get("session_id").and_then(Value::as_str)?;
    user_of_uid(uid_of_id(session)?)
}

/// A connection to `user`'s worker, for `credential` (`None`: unauthenticated, only to a
/// running worker).
/// The owner of terminal `id` when it is another user's and `principal` is not an admin
/// (an admin reaches it as before, through its owner's worker).
fn shared_owner(principal: &crate::wire::Principal, id: &str) -> Option<String> {
    if principal.is_admin() {
        return None;
    }
    let owner = user_of_uid(uid_of_id(id)?)?;
    (principal.unix_user() != Some(owner.as_str())).then_some(owner)
}

/// A connection to the worker that holds `object`, for a share of it (`OpenShared`).
async fn open_shared(
    state: &FrontState,
    credential: &str,
    object: &str,
) -> Result<OwnedFd, ApiError> {
    let body = RequestBody::OpenShared {
        credential: credential.to_string(),
        object: object.to_string(),
    };
    match connection(state, body).await? {
        Ok(fd) => Ok(fd),
        // Nothing is said of terminals that are not shared with this user.
        Err(e)
            if matches!(
                e.kind,
                crate::wire::ErrorKind::Forbidden | crate::wire::ErrorKind::Unavailable
            ) =>
        {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no terminal {object}"),
            ))
        }
        Err(e) => Err(ApiError::from_broker(e)),
    }
}

/// `GET /shares`: the shares the caller gave and was given (the front answers it: the
/// broker keeps them).
pub async fn list_shares(
    axum::extract::State(state): axum::extract::State<Arc<FrontState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, credential) = super::http::authenticate(&state, &headers).await?;
    let reply = state
        .link
        .request(RequestBody::ListShares { credential })
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::Shares(list) => Ok(axum::Json(list).into_response()),
        ReplyBody::Error(e) => Err(ApiError::from_broker(e)),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

async fn open(
    state: &FrontState,
    credential: Option<&str>,
    user: &str,
    start: bool,
) -> Result<OwnedFd, ApiError> {
    let body = match credential {
        Some(c) => RequestBody::OpenWorker {
            credential: c.to_string(),
            unix_user: user.to_string(),
            start,
        },
        None => RequestBody::OpenWorkerAnonymous {
            unix_user: user.to_string(),
        },
    };
    match connection(state, body).await? {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind == crate::wire::ErrorKind::Unavailable && credential.is_none() => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "no such terminal"))
        }
        Err(e) => Err(ApiError::from_broker(e)),
    }
}

/// Asks the broker for a connection to a worker: its fd, or the broker's refusal.
async fn connection(
    state: &FrontState,
    body: RequestBody,
) -> Result<Result<OwnedFd, crate::wire::BrokerError>, ApiError> {
    let reply = state
        .link
        .request(body)
        .await
        .map_err(ApiError::broker_down)?;
    match reply.body {
        ReplyBody::Connection => reply
            .fds
            .into_iter()
            .next()
            .map(Ok)
            .ok_or_else(|| ApiError::internal("the broker sent no connection")),
        ReplyBody::Error(e) => Ok(Err(e)),
        other => Err(ApiError::internal(format!(
            "unexpected broker reply {other:?}"
        ))),
    }
}

fn unreachable(user: &str, e: &dyn std::fmt::Display) -> ApiError {
    warn!(%user, "worker connection: {e}");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        format!("the worker of '{user}' did not answer; try again"),
    )
}

/// An HTTP/1.1 client connection over the worker connection `fd` (whose first byte says
/// so to the worker).
async fn handshake(fd: OwnedFd, user: &str) -> Result<SendRequest<Body>, ApiError> {
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    // A fresh socketpair: one byte never blocks.
    std::io::Write::write_all(&mut stream, b"H").map_err(|e| unreachable(user, &e))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| unreachable(user, &e))?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| unreachable(user, &e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(user, &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!("worker connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Sends `req` on a kept-alive connection; it goes back to the pool once its response is
/// read to the end.
async fn send_on(
    state: &FrontState,
    mut conn: Conn,
    key: Key,
    req: Request,
    user: &str,
) -> Result<Response, ApiError> {
    conn.sender
        .ready()
        .await
        .map_err(|e| unreachable(user, &e))?;
    let response = conn
        .sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(user, &e))?;
    let pool = state.pool.clone();
    Ok(response.map(|body| Body::new(Returning::new(body, pool, key, conn))))
}

/// Sends `req` over the worker connection `fd` (used once) and returns its answer; an
/// upgrade is spliced once both sides have switched protocols.
async fn send(fd: OwnedFd, mut req: Request, user: &str) -> Result<Response, ApiError> {
    let mut sender = handshake(fd, user).await?;
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_side = upgrading.then(|| hyper::upgrade::on(&mut req));
    let mut response = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(user, &e))?;
    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_side, response.status()) {
        let worker_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (Ok(client), Ok(worker)) = (client_side.await, worker_side.await) else {
                return;
            };
            let (mut client, mut worker) = (TokioIo::new(client), TokioIo::new(worker));
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut worker,
                SPLICE_BUFFER,
                SPLICE_BUFFER,
            )
            .await;
        });
    }
    Ok(response.map(Body::new))
}

/// Whether a client connection may go to a worker whole, decided on its first request
/// head: a terminal's WebSocket (the hot path: after the upgrade the connection is the
/// terminal's alone), with a user's credential the front has verified already (this never
/// asks the broker to authenticate: a failure is answered, counted and throttled by the
/// normal path) or a browser's one-time ticket; the Host must be one the front answers
/// to. The worker answers that one request (an error closes the connection) and, upgraded,
/// streams the terminal straight to the client. Other requests are relayed: a client may
/// send the next request on a kept-alive connection with another credential.
pub fn handover(state: Arc<FrontState>) -> super::serve::Handover {
    Arc::new(move |head, info| {
        let state = state.clone();
        Box::pin(async move { handover_target(&state, &head, info).await })
    })
}

async fn handover_target(
    state: &FrontState,
    head: &[u8],
    info: super::serve::ConnInfo,
) -> Option<OwnedFd> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let target = parsed.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["terminals", id, "ws"] = segments.as_slice() else {
        return None;
    };
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let host = header("host")?;
    if !super::guard::host_allowed(state, host, Some(info.local.ip()))
        || !header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return None;
    }
    let values = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect()
    };
    match super::credential::presented_in(values).ok()? {
        Some(presented) => {
            if presented.source == super::credential::Source::Cookie {
                super::credential::same_origin_in(header("origin"), Some(host)).ok()?;
            }
            let token = presented.value.as_str();
            let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let verified = state.auth.cached(&key)?;
            if state.auth.revoked(&verified) || verified.principal.is_admin() {
                return None;
            }
            // Another user's terminal (a share) is relayed: its head carries this user's
            // credential, which the owner's worker must not see.
            if shared_owner(&verified.principal, id).is_some() {
                return None;
            }
            let user = verified.principal.unix_user()?.to_string();
            open(state, Some(token), &user, true).await.ok()
        }
        None => {
            if !query.split('&').any(|kv| kv.starts_with("ticket=")) {
                return None;
            }
            let user = user_of_uid(uid_of_id(id)?)?;
            open(state, None, &user, true).await.ok()
        }
    }
}

/// `headers` without the caller's credential. An admin's request that goes to many users'
/// workers (listings, metrics, restarts) needs none there: the broker told each worker who
/// opened the connection. A worker is its user's process, and the admin token must not
/// reach every user's memory on each scrape.
fn without_credential(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::COOKIE);
    headers
}

/// How long a worker may take to answer an admin's fan-out (a user may stop their own).
const FAN_OUT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The Unix users with a store (`<workers_dir>/<uid>`), by name.
fn users_with_stores(state: &FrontState) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(&state.link.welcome().workers_dir) else {
        return Vec::new();
    };
    let mut users: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(user_of_uid)
        .collect();
    users.sort();
    users
}

/// An admin's request for every user: a listing merged, or an older id's first answer.
async fn fan_out(
    state: &Arc<FrontState>,
    credential: &str,
    req: Request,
    by_id: bool,
) -> Result<Response, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such object (ids from before per-user workers are read-only for admins)",
        ));
    }
    let (parts, _) = req.into_parts();
    let mut merged: Vec<Value> = Vec::new();
    for user in users_with_stores(state) {
        let Ok(fd) = open(state, Some(credential), &user, true).await else {
            continue;
        };
        let mut one = Request::from_parts(parts.clone(), Body::empty());
        *one.headers_mut() = without_credential(&parts.headers);
        let Ok(Ok(response)) = tokio::time::timeout(FAN_OUT_WAIT, send(fd, one, &user)).await
        else {
            continue;
        };
        if by_id {
            if response.status() != StatusCode::NOT_FOUND {
                return Ok(response);
            }
            continue;
        }
        if !response.status().is_success() {
            continue;
        }
        let body = axum::body::to_bytes(response.into_body(), 64 << 20);
        let Ok(Ok(bytes)) = tokio::time::timeout(FAN_OUT_WAIT, body).await else {
            continue;
        };
        if let Ok(Value::Array(items)) = serde_json::from_slice(&bytes) {
            merged.extend(items);
        }
    }
    if by_id {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such object"));
    }
    let when = |v: &Value| {
        ["created_at", "started_at"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    };
    merged.sort_by_key(when);
    Ok(axum::Json(Value::Array(merged)).into_response())
}

/// `POST /workers/:user/restart` (admin): that user's worker is replaced; its work survives.
pub async fn restart_worker(
    State(state): State<Arc<FrontState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    let fd = open(&state, Some(&credential), &user, false).await?;
    let mut req = Request::new(Body::empty());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "/worker/restart".parse().expect("a valid uri");
    *req.headers_mut() = without_credential(&headers);
    send(fd, req, &user).await
}

/// The metrics of every running worker (never starting one), as Prometheus texts.
pub async fn worker_metrics(
    state: &Arc<FrontState>,
    _principal: &Principal,
    credential: &str,
    headers: &HeaderMap,
) -> Vec<String> {
    let mut texts = Vec::new();
    for user in users_with_stores(state) {
        let Ok(fd) = open(state, Some(credential), &user, false).await else {
            continue;
        };
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = "/metrics".parse().expect("a valid uri");
        *req.headers_mut() = without_credential(headers);
        let Ok(Ok(response)) = tokio::time::timeout(FAN_OUT_WAIT, send(fd, req, &user)).await
        else {
            continue;
        };
        let body = axum::body::to_bytes(response.into_body(), 16 << 20);
        if let Ok(Ok(bytes)) = tokio::time::timeout(FAN_OUT_WAIT, body).await {
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admins_fan_out_carries_no_credential_to_the_workers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Bearer admin-secret".parse().unwrap(),
        );
        h.insert(header::COOKIE, "stoa=x".parse().unwrap());
        h.insert(header::HOST, "127.0.0.1".parse().unwrap());
        let stripped = without_credential(&h);
        assert!(stripped.get(header::AUTHORIZATION).is_none());
        assert!(stripped.get(header::COOKIE).is_none());
        assert_eq!(stripped.get(header::HOST).unwrap(), "127.0.0.1");
    }
}
