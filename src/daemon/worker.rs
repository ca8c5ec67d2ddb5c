//! The worker: `stoa __worker`, one per Unix user, started by the broker as that user. It
//! holds that user's terminals (PTY masters, rings, viewers), tasks (agent pipes) and store
//! (`<workers_dir>/<uid>/stoa.db`), and serves the HTTP requests the front forwards to it.
//!
//! It listens on nothing: each connection comes from the broker (`Event::Connection`), which
//! authenticated it for a principal (or not at all: then only what the worker checks itself,
//! a terminal's one-time ticket, is served). fd 3 is its broker link, fd 4 the config text.
//! With no live work and no connection for [`IDLE_EXIT`], it asks the broker to retire and
//! exits; a worker that dies with live work is started again and takes it back
//! (`adopt_all`), as the one daemon used to.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming as Incoming_;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use stoa_executor::sys;

use super::auth::{self, Verified};
use super::broker_link::{BrokerLink, LinkObserver};
use super::http::{require_admin, with_request_id, ApiError};
use super::prefixed::Prefixed;
use super::processes::Processes;
use super::{metrics, store, terminals, AppState};
use crate::config::DaemonConfig;
use crate::wire::{Event, Principal, ReplyBody, RequestBody};

/// The worker's fds: its link, and the config text.
pub const WORKER_LINK_FD: i32 = 3;
pub const WORKER_CONFIG_FD: i32 = 4;

/// How long a worker with nothing running and no connection stays before it retires.
pub const IDLE_EXIT: Duration = Duration::from_secs(60);

/// Who the broker authenticated a connection as, and when (for revocations).
pub struct ConnectionAuth {
    pub principal: Option<Principal>,
    pub generation: u64,
    /// The SHA-256 of the credential the connection was opened with: every request on it
    /// must carry the same one.
    pub credential: Option<[u8; 32]>,
    /// Opened for a share: only that terminal's socket may be reached on it.
    pub share: Option<Box<crate::wire::ShareInfo>>,
    /// Opened for an admin: the broker's credential for this worker's user, used where the
    /// broker wants one (the admin's own never comes here).
    pub delegated: Option<String>,
}

/// How the front uses a connection the broker handed over: its first byte says.
const MODE_HTTP: u8 = b'H';
/// A client's own TCP connection follows (with what the front read of it), as an fd.
const MODE_HANDOVER: u8 = b'T';
/// Most bytes of a client's request the front may have read before handing it over.
const MAX_HANDOVER_PREFIX: usize = 64 * 1024;

tokio::task_local! {
    /// The connection the request being served came on.
    pub static CONNECTION: Arc<ConnectionAuth>;
}

/// The principal of the connection this request came on (the front authenticated it with
/// the broker), and the bearer credential the front forwarded (for the broker's own checks
/// on spawns, directories and secrets).
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Principal, String), ApiError> {
    let conn = CONNECTION.try_with(|c| c.clone()).ok();
    let Some(principal) = conn.as_ref().and_then(|c| c.principal.clone()) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        ));
    };
    let generation = conn.as_ref().map_or(0, |c| c.generation);
    let verified = Verified {
        principal,
        generation,
    };
    if state.auth.revoked(&verified) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this credential was revoked",
        ));
    }
    // An admin's requests come without the admin's credential: the broker gave this
    // connection one for this worker's user alone.
    let credential = match super::credential::presented(headers).ok().flatten() {
        Some(p) => p.value,
        None => conn
            .as_ref()
            .and_then(|c| c.delegated.clone())
            .unwrap_or_default(),
    };
    auth::note_verified(&verified);
    Ok((verified.principal, credential))
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/exec", post(super::exec::handler))
        .route("/metrics", get(metrics_text))
        .route("/worker/restart", post(restart))
        .merge(super::sessions::routes())
        .merge(super::terminals::routes())
        .merge(super::shares::routes())
        .merge(super::approvals::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(state)
}

/// What the broker tells the worker unasked.
struct Observer {
    processes: Arc<Processes>,
    auth: Arc<auth::Auth>,
    connections: tokio::sync::mpsc::UnboundedSender<Incoming>,
}

/// A connection from the broker: who it was authenticated as, the credential's digest,
/// the revocation generation when it arrived, the socket.
/// A connection from the broker: what it said of it (see `ConnectionAuth`) and its fd.
type Incoming = (ConnectionAuth, OwnedFd);

impl LinkObserver for Observer {
    fn reply(&self, body: &ReplyBody) {
        self.processes.reply(body);
    }

    fn event(&self, event: Event, mut fds: Vec<OwnedFd>) {
        match event {
            Event::Revoked { keys } => {
                info!(?keys, "credentials revoked: ending their connections");
                self.auth.revoke(&keys);
            }
            Event::Connection {
                principal,
                credential,
                share,
                delegated,
            } => {
                if let Some(fd) = fds.pop() {
                    // Taken here, in the order events arrive: a revocation that follows
                    // the connection on the link must still end it.
                    let generation = self.auth.generation();
                    let _ = self.connections.send((
                        ConnectionAuth {
                            principal,
                            generation,
                            credential,
                            share,
                            delegated,
                        },
                        fd,
                    ));
                }
            }
            other => self.processes.event(other, fds),
        }
    }
}

pub fn run(state_dir: PathBuf) -> Result<(), String> {
    let link_fd = sys::take_inherited_fd(WORKER_LINK_FD).map_err(|e| {
        format!("no broker link on fd {WORKER_LINK_FD} ({e}): a worker is started by `stoa serve`")
    })?;
    let config_fd = sys::take_inherited_fd(WORKER_CONFIG_FD)
        .map_err(|e| format!("no config on fd {WORKER_CONFIG_FD}: {e}"))?;
    let mut text = String::new();
    std::fs::File::from(config_fd)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the config the broker sent: {e}"))?;
    let mut config = DaemonConfig::parse(&text).map_err(|e| format!("invalid config: {e}"))?;
    config.state_dir = state_dir;
    let processes = Arc::new(Processes::default());
    let auth = Arc::new(auth::Auth::new(config.http.auth_failures_per_minute));
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
    let observer = Arc::new(Observer {
        processes: processes.clone(),
        auth: auth.clone(),
        connections: conn_tx,
    });
    // One thread (its threads count against the user's process limit: it is in the user's
    // cgroup), and a bounded blocking pool (the store's queries). One thread also means no
    // hops between threads on the spawn path (measured, BENCHMARKS.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let link = BrokerLink::start(&runtime, UnixStream::from(link_fd), observer, "a worker")?;
    let uid = nix::unistd::geteuid().as_raw();
    info!(uid, "worker connected to the broker");
    let store = store::Store::open(&config.state_dir.join("stoa.db"))?;
    let (notices, _) = tokio::sync::broadcast::channel(1024);
    let state = Arc::new(AppState {
        link,
        processes,
        config,
        auth,
        store,
        running: Mutex::new(HashMap::new()),
        pause: Default::default(),
        answers: Mutex::new(HashMap::new()),
        notices,
        terminals: terminals::Terminals::default(),
        metrics: metrics::Metrics::default(),
        uid,
    });
    runtime.block_on(async move {
        let adopted = super::adopt_all(&state).await;
        let adopted = super::tasks::recover(&state, adopted).await;
        for (info, fds) in terminals::recover(&state, adopted).await {
            tokio::spawn(super::drain_orphan(state.clone(), info, fds));
        }
        if let Err(e) = state.link.request(RequestBody::Ready).await {
            return Err(format!("cannot tell the broker we are ready: {e}"));
        }
        info!("worker {} ready", std::process::id());
        let app = router(state.clone());
        let open = Arc::new(AtomicUsize::new(0));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let mut idle_since = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                c = conn_rx.recv() => {
                    let Some(incoming) = c else { break };
                    idle_since = tokio::time::Instant::now();
                    serve_connection(&state, app.clone(), incoming, open.clone());
                }
                _ = term.recv() => {
                    info!("worker stopping (SIGTERM)");
                    break;
                }
                _ = tick.tick() => {
                    if open.load(Ordering::SeqCst) > 0 || has_live_work(&state) {
                        idle_since = tokio::time::Instant::now();
                    } else if idle_since.elapsed() >= IDLE_EXIT {
                        match state.link.request(RequestBody::Retire).await.map(|r| r.body) {
                            Ok(ReplyBody::Done) => {
                                info!("idle: retiring");
                                break;
                            }
                            other => {
                                debug!("not retiring: {other:?}");
                                idle_since = tokio::time::Instant::now();
                            }
                        }
                    }
                }
            }
        }
        // Every byte read from a terminal goes into its ring (the broker's memfd) first;
        // every line read from an agent into the store: the next worker reads on from there.
        state.pause.begin();
        state.terminals.quiesce(Duration::from_secs(1)).await;
        // Connections already handed over still get answered; then the runs being
        // recorded get to finish writing how they ended.
        while let Ok(incoming) = conn_rx.try_recv() {
            serve_connection(&state, app.clone(), incoming, open.clone());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while (open.load(Ordering::SeqCst) > 0
            || state.running.lock().expect("running lock").len() > state.pause.held())
            && tokio::time::Instant::now() < deadline
        {
            if let Ok(incoming) = conn_rx.try_recv() {
                serve_connection(&state, app.clone(), incoming, open.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

/// Whether anything of the user's runs here (a task, a terminal, a process).
fn has_live_work(state: &AppState) -> bool {
    !state.running.lock().expect("running lock").is_empty()
        || state.terminals.users().iter().any(|(_, running)| *running)
        || state.processes.list().iter().any(|p| p.running)
}

/// Serves HTTP/1.1 on a connection the broker handed over, every request in the
/// connection's authentication: on the socket itself (`H`), or on the client's own TCP
/// connection the front passed through it (`T`: no hop between the client and here).
fn serve_connection(
    state: &Arc<AppState>,
    app: Router,
    (conn_auth, fd): Incoming,
    open: Arc<AtomicUsize>,
) {
    let conn_auth = Arc::new(conn_auth);
    let stream = UnixStream::from(fd);
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    let header_timeout = Duration::from_secs(state.config.http.header_read_timeout_secs);
    let auth = state.auth.clone();
    open.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let mode = tokio::time::timeout(Duration::from_secs(10), receive_mode(&stream)).await;
        let result = match mode {
            Ok(Ok(Mode::Http(rest))) => {
                let io = Prefixed::new(rest, stream);
                serve_http(io, app, conn_auth, header_timeout, false, auth).await
            }
            Ok(Ok(Mode::Handover(prefix, fd))) => {
                drop(stream);
                let tcp = std::net::TcpStream::from(fd);
                match tcp
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(tcp))
                {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        let io = Prefixed::new(prefix, tcp);
                        serve_http(io, app, conn_auth, header_timeout, true, auth).await
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the front said nothing on a new connection".into()),
        };
        if let Err(e) = result {
            debug!("connection: {e}");
        }
        open.fetch_sub(1, Ordering::SeqCst);
    });
}

enum Mode {
    /// HTTP follows on the socket (these bytes came with the mode byte).
    Http(Vec<u8>),
    /// The client's connection, and what the front read of it.
    Handover(Vec<u8>, OwnedFd),
}

/// Reads the mode byte (and for a handover the prefix and the client's fd).
async fn receive_mode(stream: &tokio::net::UnixStream) -> Result<Mode, String> {
    use std::os::fd::AsFd;
    let (mut buf, mut fds) = (Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        stream.readable().await.map_err(|e| e.to_string())?;
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            sys::recv_with_fds(stream.as_fd(), &mut chunk, true)
        });
        match got {
            Ok(r) if r.bytes == 0 => return Err("the front closed the connection".into()),
            Ok(r) => {
                buf.extend_from_slice(&chunk[..r.bytes]);
                fds.extend(r.fds);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
        match buf[0] {
            MODE_HTTP => return Ok(Mode::Http(buf.split_off(1))),
            MODE_HANDOVER if buf.len() >= 5 => {
                let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
                if len > MAX_HANDOVER_PREFIX {
                    return Err(format!("a handover with {len} bytes read"));
                }
                if buf.len() >= 5 + len {
                    let fd = fds
                        .pop()
                        .ok_or("a handover without the client's connection")?;
                    buf.truncate(5 + len);
                    return Ok(Mode::Handover(buf.split_off(5), fd));
                }
            }
            MODE_HANDOVER => {}
            other => return Err(format!("unknown connection mode {other}")),
        }
    }
}

async fn serve_http<IO>(
    io: IO,
    app: Router,
    conn_auth: Arc<ConnectionAuth>,
    header_timeout: Duration,
    client_connection: bool,
    auth: Arc<auth::Auth>,
) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // On a client's own connection, the Host of the first request: the front checked it
    // before handing the connection over; a later request naming another is refused (DNS
    // rebinding). The front's kept-alive connections carry many clients' requests, each
    // checked by the front.
    let first_host: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming_>| {
        let auth = auth.clone();
        let mut app = app.clone();
        let conn_auth = conn_auth.clone();
        let first_host = first_host.clone();
        async move {
            let host_check = client_connection.then_some(&*first_host);
            if let Some(refusal) = refuse(&conn_auth, host_check, req.headers()) {
                return Ok(refusal);
            }
            if let Some(share) = &conn_auth.share {
                let socket = format!("/terminals/{}/ws", share.object);
                if req.method() != axum::http::Method::GET || req.uri().path() != socket {
                    return Ok(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "a shared connection reaches only its terminal's socket",
                    )
                    .into_response());
                }
            }
            let context = Arc::new(auth::RequestContext {
                peer: None,
                verified: Mutex::new(None),
            });
            let call = tower_service::Service::call(&mut app, req.map(Body::new));
            let response = CONNECTION
                .scope(conn_auth, auth::REQUEST.scope(context.clone(), call))
                .await?;
            // On a client's own connection nobody else ends a revoked user's stream.
            let verified = context.verified.lock().expect("request lock").take();
            let mut response = super::guard::end_on_revocation(&auth, verified, response);
            super::guard::add_security_headers(response.headers_mut());
            // A client's own connection carries one request (its terminal's WebSocket):
            // anything but the upgrade closes it, so a next request (maybe with another
            // credential) goes through the front again.
            if client_connection && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
        .map_err(|e| e.to_string())
}

/// A request that may not be served on this connection: another credential than the one
/// it was opened with, or another Host than its first request's.
fn refuse(
    conn: &ConnectionAuth,
    first_host: Option<&Mutex<Option<Vec<u8>>>>,
    headers: &HeaderMap,
) -> Option<Response> {
    use sha2::Digest;
    let host = headers.get(header::HOST).map(|h| h.as_bytes().to_vec());
    if let Some(first_host) = first_host {
        let mut first = first_host.lock().expect("host lock");
        match (&*first, &host) {
            (None, _) => *first = host.clone(),
            (Some(f), Some(h)) if f == h => {}
            _ => {
                return Some(
                    ApiError::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        "this connection was opened for another Host (rule: http.allowed_hosts)",
                    )
                    .into_response(),
                )
            }
        }
    }
    let expected = conn.credential?;
    // Without one, the request is the connection's principal's and can spawn nothing (the
    // broker wants a credential for that): the front sends an admin's listings so.
    let shown = match super::credential::presented(headers) {
        Ok(Some(p)) => p.value,
        Ok(None) => return None,
        Err(_) => String::new(),
    };
    let got: [u8; 32] = sha2::Sha256::digest(shown.as_bytes()).into();
    (got != expected).then(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this connection was opened with another credential: open a new connection",
        )
        .into_response()
    })
}

/// `POST /worker/restart` (admin): this worker exits; the broker starts a new one, which
/// takes the user's running work back.
async fn restart(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    info!(by = %principal.name(), "worker restart requested");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Every byte read from a terminal is in its ring (the broker's memfd) before we go.
        state.terminals.quiesce(Duration::from_secs(1)).await;
        std::process::exit(0);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "restarting": true, "pid": std::process::id() })),
    )
        .into_response())
}

/// This worker's metrics (admin): the front sums every running worker's into its own.
async fn metrics_text(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    require_admin(&principal)?;
    let m = &state.metrics;
    // Live executors are counted by the front, from the broker (for every user at once).
    m.live_terminals.clear();
    for (user, running) in state.terminals.users() {
        if running {
            m.live_terminals
                .get_or_create(&metrics::UserLabels { unix_user: user })
                .inc();
        }
    }
    m.tasks.clear();
    for (task_state, n) in state
        .store
        .task_counts()
        .await
        .map_err(ApiError::internal)?
    {
        m.tasks
            .get_or_create(&metrics::StateLabels { state: task_state })
            .set(n);
    }
    let text = m.encode().map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(text.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn conn(token: &str) -> ConnectionAuth {
        ConnectionAuth {
            principal: None,
            generation: 0,
            credential: Some(sha2::Sha256::digest(token.as_bytes()).into()),
            share: None,
            delegated: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_connection_serves_its_own_credential_only() {
        let c = conn("alice-token");
        let mine = headers(&[("authorization", "Bearer alice-token")]);
        let other = headers(&[("authorization", "Bearer bob-token")]);
        assert!(refuse(&c, None, &mine).is_none());
        let refused = refuse(&c, None, &other).expect("another credential");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        // No credential at all: the connection's principal, which can spawn nothing.
        assert!(refuse(&c, None, &HeaderMap::new()).is_none());
    }

    #[test]
    fn a_handed_over_connection_keeps_its_first_host() {
        let c = conn("t");
        let first = Mutex::new(None);
        let at = |host: &str| headers(&[("authorization", "Bearer t"), ("host", host)]);
        assert!(refuse(&c, Some(&first), &at("127.0.0.1:7433")).is_none());
        assert!(refuse(&c, Some(&first), &at("127.0.0.1:7433")).is_none());
        let refused = refuse(&c, Some(&first), &at("evil.example")).expect("another Host");
        assert_eq!(refused.status(), StatusCode::MISDIRECTED_REQUEST);
    }
}
