//! The daemon: `stoa __daemon`, started by the broker as the service user with no
//! capabilities and no_new_privs. Everything from the network lands here; it never decides
//! which Unix user runs anything without the broker's say.
//!
//! fd 3 is its end of the broker link, fd 4 the HTTP listener the broker bound (so a
//! restart loses no connection attempts: they wait in the listen backlog).
#![forbid(unsafe_code)]

pub mod auth;
pub mod broker_link;
pub mod exec;
pub mod fdio;
pub mod front;
pub mod http;
pub mod metrics;
pub mod processes;
pub mod serve;
pub mod sessions;
pub mod store;
pub mod tasks;
pub mod terminals;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use stoa_executor::sys;

use crate::broker::{DAEMON_LINK_FD, DAEMON_LISTENER_FD};
use crate::config::DaemonConfig;
use crate::wire::{Event, HandleInfo, ReplyBody, RequestBody};
use broker_link::BrokerLink;
use fdio::FdReader;
use processes::Processes;

/// How long requests in flight get after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct AppState {
    pub link: Arc<BrokerLink>,
    pub processes: Arc<Processes>,
    pub config: DaemonConfig,
    /// The auth cache, revocations and the failed-authentication throttle.
    pub auth: Arc<auth::Auth>,
    /// Open HTTP connections (see `serve.rs`).
    pub connections: Arc<serve::Connections>,
    pub store: store::Store,
    /// Running tasks, by task id: send a reason to end one.
    pub running: Mutex<HashMap<String, tokio::sync::watch::Sender<Option<tasks::StopReason>>>>,
    /// What changed, for live event streams.
    pub notices: tokio::sync::broadcast::Sender<Notice>,
    pub terminals: terminals::Terminals,
    pub metrics: metrics::Metrics,
}

/// A spawn that failed: the broker is gone, or it said no (with its reason).
#[derive(Debug)]
pub enum SpawnError {
    LinkDown,
    Refused(crate::wire::BrokerError),
    Unexpected(String),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::LinkDown => write!(f, "the broker is not connected"),
            SpawnError::Refused(e) => write!(f, "{}", e.message),
            SpawnError::Unexpected(m) => write!(f, "{m}"),
        }
    }
}

impl From<SpawnError> for http::ApiError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::LinkDown => http::ApiError::broker_down(broker_link::LinkDown),
            SpawnError::Refused(e) => http::ApiError::from_broker(e),
            SpawnError::Unexpected(m) => http::ApiError::internal(m),
        }
    }
}

/// What the broker spawned: its handle's description, its fds, and the guard that cleans
/// up after it.
pub struct Spawned {
    pub info: HandleInfo,
    pub fds: Vec<std::os::fd::OwnedFd>,
    pub guard: HandleGuard,
}

/// What to do with a handle when its guard is dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnDrop {
    /// Nobody finished with it (an error, a client gone): kill its group, release it.
    KillAndRelease,
    /// It ended normally: release it.
    Release,
    /// Someone else took it over (a terminal's lifecycle, a task's run).
    Nothing,
}

pub struct HandleGuard {
    state: Arc<AppState>,
    handle: crate::wire::Handle,
    on_drop: OnDrop,
}

impl HandleGuard {
    pub fn set(&mut self, on_drop: OnDrop) {
        self.on_drop = on_drop;
    }
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        if self.on_drop == OnDrop::Nothing {
            return;
        }
        let (state, handle, kill) = (
            self.state.clone(),
            self.handle,
            self.on_drop == OnDrop::KillAndRelease,
        );
        broker_link::spawn_traced(async move { state.end_handle(handle, kill).await });
    }
}

#[derive(Clone, Debug)]
pub enum Notice {
    /// Messages up to `last_seq` are stored for the session.
    Messages { session_id: String, last_seq: i64 },
    /// A task changed state.
    Task {
        session_id: String,
        task: Box<store::Task>,
    },
}

impl AppState {
    /// Asks the broker to spawn, counting and timing it for the metrics. What comes back
    /// owns the handle: dropped, it kills what was spawned and releases the handle, so no
    /// error path after a spawn leaves a process behind (see [`Spawned`]).
    pub async fn spawn(
        self: &Arc<Self>,
        kind: &str,
        request: crate::wire::SpawnRequest,
    ) -> Result<Spawned, SpawnError> {
        let started = std::time::Instant::now();
        let reply = self.link.request(RequestBody::Spawn(request)).await;
        let result = reply
            .as_ref()
            .map_or("error", |r| metrics::result_of(&r.body));
        self.metrics.spawned(kind, result, started.elapsed());
        let reply = reply.map_err(|_| SpawnError::LinkDown)?;
        match reply.body {
            ReplyBody::Spawned(info) => Ok(Spawned {
                guard: HandleGuard {
                    state: self.clone(),
                    handle: info.handle,
                    on_drop: OnDrop::KillAndRelease,
                },
                info: *info,
                fds: reply.fds,
            }),
            ReplyBody::Error(e) => Err(SpawnError::Refused(e)),
            other => Err(SpawnError::Unexpected(format!(
                "unexpected broker reply {other:?}"
            ))),
        }
    }

    /// Done with a handle: kill its process group first if `kill`, then release it in the
    /// broker and keep it in the daemon's history.
    pub async fn end_handle(&self, handle: crate::wire::Handle, kill: bool) {
        if kill {
            let signal = crate::wire::Signal::Kill;
            let _ = self
                .link
                .request(RequestBody::Kill { handle, signal })
                .await;
        }
        let _ = self.link.request(RequestBody::Release { handle }).await;
        self.processes.finish(handle);
    }

    /// Agents run through the broker as the session's user, unless configured off or in
    /// single-user mode (then the daemon runs them itself: the direct path).
    pub fn use_executor(&self) -> bool {
        self.config.execution.use_executor && self.link.welcome().isolation
    }

    /// New work (a run, a prompt, a terminal) is refused once the broker is shutting down.
    pub fn accepting_work(&self) -> Result<(), http::ApiError> {
        if self.processes.shutting_down() {
            return Err(http::ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "stoa is shutting down: no new work is started",
            ));
        }
        Ok(())
    }

    pub async fn notify_task(&self, task_id: &str) {
        if let Ok(Some(task)) = self.store.task(task_id).await {
            let _ = self.notices.send(Notice::Task {
                session_id: task.session_id.clone(),
                task: Box::new(task),
            });
        }
    }
}

pub fn run(config_path: &Path, state_dir: Option<std::path::PathBuf>) -> Result<(), String> {
    let mut config = DaemonConfig::load(config_path)?;
    if let Some(dir) = state_dir {
        config.state_dir = dir;
    }
    let link_fd = sys::take_inherited_fd(DAEMON_LINK_FD).map_err(|e| {
        format!(
            "no broker link on fd {DAEMON_LINK_FD} ({e}): the daemon is started by `stoa serve`"
        )
    })?;
    let listener_fd = sys::take_inherited_fd(DAEMON_LISTENER_FD)
        .map_err(|e| format!("no listener on fd {DAEMON_LISTENER_FD}: {e}"))?;
    let processes = Arc::new(Processes::default());
    let auth = Arc::new(auth::Auth::new(config.http.auth_failures_per_minute));
    let observer = Arc::new(Observer {
        processes: processes.clone(),
        auth: auth.clone(),
    });
    let link = BrokerLink::connect(UnixStream::from(link_fd), observer)
        .map_err(|e| format!("cannot greet the broker: {e}"))?;
    if link.welcome().isolation && nix::unistd::geteuid().is_root() {
        return Err("the daemon must not run as root".into());
    }
    info!(
        uid = nix::unistd::geteuid().as_raw(),
        isolation = link.welcome().isolation,
        "daemon connected to the broker"
    );
    let store = store::Store::open(&config.state_dir.join("stoa.db"))?;
    let (notices, _) = tokio::sync::broadcast::channel(1024);
    let state = Arc::new(AppState {
        link,
        processes,
        config: config.clone(),
        auth,
        connections: Arc::new(serve::Connections::new(config.http.clone())),
        store,
        running: Mutex::new(HashMap::new()),
        notices,
        terminals: terminals::Terminals::default(),
        metrics: metrics::Metrics::default(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let adopted = adopt_all(&state).await;
        let adopted = tasks::recover(&state, adopted).await;
        for (info, fds) in terminals::recover(&state, adopted).await {
            tokio::spawn(drain_orphan(state.clone(), info, fds));
        }
        let std_listener = std::net::TcpListener::from(listener_fd);
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let listener =
            tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
        let app = http::router(state.clone());
        if let Err(e) = state.link.request(RequestBody::Ready).await {
            return Err(format!("cannot tell the broker we are ready: {e}"));
        }
        // On SIGTERM: stop accepting, give requests in flight a moment, then go; keep-alive
        // connections must not hold a restart or shutdown hostage.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        tokio::spawn(async move {
            term.recv().await;
            info!("daemon stopping (SIGTERM)");
            let _ = stop_tx.send(true);
        });
        let mut stopped = stop_rx.clone();
        let finishing = state.clone();
        let server = serve::serve(
            listener,
            app,
            state.config.http.clone(),
            state.connections.clone(),
            stop_rx,
        );
        tokio::select! {
            _ = server => {}
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {}
        }
        // Runs still being recorded get to finish writing how they ended.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !finishing.running.lock().expect("running lock").is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

/// What the broker tells the daemon unasked: revocations here, the rest for the process
/// table.
struct Observer {
    processes: Arc<Processes>,
    auth: Arc<auth::Auth>,
}

impl broker_link::LinkObserver for Observer {
    fn reply(&self, body: &ReplyBody) {
        self.processes.reply(body);
    }

    fn event(&self, event: Event) {
        match event {
            Event::Revoked { api_users } => {
                info!(?api_users, "credentials revoked: ending their connections");
                self.auth.revoke(&api_users);
            }
            other => self.processes.event(other),
        }
    }
}

/// Takes back everything an earlier daemon left running: each handle's fds come again
/// from the broker's duplicates. Tasks take theirs over (`tasks::recover`); the rest, with
/// nobody waiting on them any more, are drained (so they never block on a full pipe) and
/// their exit recorded, then released.
async fn adopt_all(state: &Arc<AppState>) -> Vec<(HandleInfo, Vec<std::os::fd::OwnedFd>)> {
    let mut adopted = Vec::new();
    // The broker answers a page at a time.
    let (mut list, mut after) = (Vec::new(), None);
    loop {
        match state.link.request(RequestBody::ListHandles { after }).await {
            Ok(r) => match r.body {
                ReplyBody::Handles { list: page, more } => {
                    after = page.last().map(|i| i.handle);
                    list.extend(page);
                    if !more || after.is_none() {
                        break;
                    }
                }
                other => {
                    warn!("unexpected reply to ListHandles: {other:?}");
                    return adopted;
                }
            },
            Err(e) => {
                warn!("cannot list handles: {e}");
                return adopted;
            }
        }
    }
    for info in list {
        let reply = match state
            .link
            .request(RequestBody::Adopt {
                handle: info.handle,
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot adopt handle {}: {e}", info.handle.0);
                continue;
            }
        };
        match reply.body {
            ReplyBody::Adopted(info) => {
                info!(handle = info.handle.0, pid = info.pid, user = %info.unix_user, exited = ?info.exited, "adopted");
                adopted.push((*info, reply.fds));
            }
            other => warn!("cannot adopt handle {}: {other:?}", info.handle.0),
        }
    }
    adopted
}

async fn drain_orphan(state: Arc<AppState>, info: HandleInfo, fds: Vec<std::os::fd::OwnedFd>) {
    // fds[0] is the control socket; the rest (pty master, or stdout and stderr) carry
    // output.
    let mut drains = Vec::new();
    for fd in fds.into_iter().skip(1) {
        if let Ok(reader) = FdReader::new(fd) {
            drains.push(tokio::spawn(async move {
                let _ = reader.collect(0).await;
            }));
        }
    }
    if let Some(mut rx) = state.processes.exit_watch(info.handle) {
        let _ = rx.wait_for(|s| s.is_some()).await;
    }
    for d in drains {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), d).await;
    }
    state.end_handle(info.handle, false).await;
}
