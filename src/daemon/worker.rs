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
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use stoa_executor::sys;

use super::auth::{self, Verified};
use super::broker_link::{BrokerLink, LinkObserver};
use super::http::{require_admin, with_request_id, ApiError};
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
}

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
    let generation = conn.map_or(0, |c| c.generation);
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
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
        .to_string();
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
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(state)
}

/// What the broker tells the worker unasked.
struct Observer {
    processes: Arc<Processes>,
    auth: Arc<auth::Auth>,
    connections: tokio::sync::mpsc::UnboundedSender<(Option<Principal>, OwnedFd)>,
}

impl LinkObserver for Observer {
    fn reply(&self, body: &ReplyBody) {
        self.processes.reply(body);
    }

    fn event(&self, event: Event, mut fds: Vec<OwnedFd>) {
        match event {
            Event::Revoked { api_users } => {
                info!(?api_users, "credentials revoked: ending their connections");
                self.auth.revoke(&api_users);
            }
            Event::Connection { principal } => {
                if let Some(fd) = fds.pop() {
                    let _ = self.connections.send((principal, fd));
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
    let link = BrokerLink::connect(UnixStream::from(link_fd), observer)
        .map_err(|e| format!("cannot greet the broker: {e}"))?;
    if link.welcome().isolation && nix::unistd::geteuid().is_root() {
        return Err("a worker must not run as root".into());
    }
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
        notices,
        terminals: terminals::Terminals::default(),
        metrics: metrics::Metrics::default(),
        uid,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
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
                    let Some((principal, fd)) = c else { break };
                    idle_since = tokio::time::Instant::now();
                    serve_connection(&state, app.clone(), principal, fd, open.clone());
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
        // Every byte read from a terminal goes into its ring (the broker's memfd) first.
        state.terminals.quiesce(Duration::from_secs(1)).await;
        // Connections already handed over still get answered; then the runs being
        // recorded get to finish writing how they ended.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while (open.load(Ordering::SeqCst) > 0
            || !state.running.lock().expect("running lock").is_empty())
            && tokio::time::Instant::now() < deadline
        {
            if let Ok((principal, fd)) = conn_rx.try_recv() {
                serve_connection(&state, app.clone(), principal, fd, open.clone());
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
/// connection's authentication.
fn serve_connection(
    state: &Arc<AppState>,
    app: Router,
    principal: Option<Principal>,
    fd: OwnedFd,
    open: Arc<AtomicUsize>,
) {
    let conn_auth = Arc::new(ConnectionAuth {
        principal,
        generation: state.auth.generation(),
    });
    let stream = UnixStream::from(fd);
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    open.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut app = app.clone();
            let conn_auth = conn_auth.clone();
            async move {
                let context = Arc::new(auth::RequestContext {
                    peer: None,
                    verified: Mutex::new(None),
                });
                let call = tower_service::Service::call(&mut app, req.map(Body::new));
                let response = CONNECTION
                    .scope(conn_auth, auth::REQUEST.scope(context, call))
                    .await?;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        if let Err(e) = conn.await {
            debug!("connection: {e}");
        }
        open.fetch_sub(1, Ordering::SeqCst);
    });
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
