//! The two unprivileged processes that serve HTTP, and what they share.
//!
//! * The **front** (`stoa __daemon`, the service user, no capabilities): every network
//!   connection lands here (fd 4 is the listener the broker bound). It parses HTTP, checks
//!   `Host`, authenticates through the broker, serves the web page, `/health` and the admin
//!   views, and forwards everything else to the worker of the Unix user it concerns
//!   (`proxy.rs`), over a connection the broker opens for a credential the front shows. It
//!   holds no PTY, no pipe, no store.
//! * A **worker** per Unix user (`stoa __worker`, that user): terminals, tasks, sessions and
//!   its store (`worker.rs`, which owns [`AppState`]).
//!
//! | file              | process | owns                                                    |
//! |-------------------|---------|---------------------------------------------------------|
//! | `front_main.rs`   | front   | start-up, [`front_main::FrontState`], the broker's events |
//! | `serve.rs`, `guard.rs` | front | the accept loop and its limits; Host, security headers |
//! | `auth.rs`         | both    | the credential cache, revocations, the failure throttle |
//! | `http.rs`         | both    | errors, request ids; the front's own routes             |
//! | `proxy.rs`        | front   | which worker a request is for, and forwarding it        |
//! | `web_page.rs`     | front   | the web page built into the binary (`web/`)             |
//! | `worker_pool.rs`  | front   | kept-alive connections to the workers, per credential   |
//! | `worker.rs`       | worker  | start-up, the connections the broker hands over, idling |
//! | `sessions.rs`, `tasks.rs`, `terminals.rs`, `exec.rs`, `store.rs`, `processes.rs`, `fdio.rs` | worker | as named |
//! | `broker_link.rs`, `metrics.rs` | both | the broker link; Prometheus metrics      |
#![forbid(unsafe_code)]

pub mod approval_store;
pub mod approvals;
pub mod auth;
pub mod broker_link;
pub mod conversation;
pub mod credential;
pub mod exec;
pub mod fdio;
pub mod front_main;
pub mod guard;
pub mod http;
pub mod login;
pub mod metrics;
pub mod prefixed;
pub mod processes;
pub mod proxy;
pub mod ring;
pub mod serve;
pub mod sessions;
pub mod shares;
pub mod store;
pub mod tasks;
pub mod terminals;
pub mod web_page;
pub mod worker;
pub mod worker_pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::config::DaemonConfig;
use crate::wire::{HandleInfo, ReplyBody, RequestBody};
use broker_link::BrokerLink;
use fdio::FdReader;
use processes::Processes;

pub struct AppState {
    pub link: Arc<BrokerLink>,
    pub processes: Arc<Processes>,
    pub config: DaemonConfig,
    /// The auth cache, revocations and the failed-authentication throttle.
    pub auth: Arc<auth::Auth>,
    pub store: store::Store,
    /// Running tasks, by task id: send a reason to end one.
    pub running: Mutex<HashMap<String, tokio::sync::watch::Sender<Option<tasks::StopReason>>>>,
    /// A planned stop: runs stop reading at a line boundary (`tasks::Pause`).
    pub pause: tasks::Pause,
    /// What changed, for live event streams.
    pub notices: tokio::sync::broadcast::Sender<Notice>,
    /// Running tasks that may be waiting for answers, by task id: woken when one is given.
    pub answers: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    pub terminals: terminals::Terminals,
    pub metrics: metrics::Metrics,
    /// The worker's Unix user: the ids it gives out start with it (`store::object_id`),
    /// so the front knows whose worker an id belongs to.
    pub uid: u32,
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
    /// A permission request was made or settled.
    Approval {
        session_id: String,
        approval: Box<approval_store::Approval>,
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

/// Takes back everything an earlier daemon left running: each handle's fds come again
/// from the broker's duplicates. Tasks take theirs over (`tasks::recover`); the rest, with
/// nobody waiting on them any more, are drained (so they never block on a full pipe) and
/// their exit recorded, then released.
pub(crate) async fn adopt_all(
    state: &Arc<AppState>,
) -> Vec<(HandleInfo, Vec<std::os::fd::OwnedFd>)> {
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

pub(crate) async fn drain_orphan(
    state: Arc<AppState>,
    info: HandleInfo,
    fds: Vec<std::os::fd::OwnedFd>,
) {
    // fds[0] is the control socket; the pty master, or stdout and stderr, carry output (a
    // terminal's third fd is its ring's memfd: nothing to read there).
    let outputs = if info.fds == crate::wire::FdLayout::Pty {
        1
    } else {
        usize::MAX
    };
    let mut drains = Vec::new();
    for fd in fds.into_iter().skip(1).take(outputs) {
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
