//! Terminals: a PTY as the user (spawned by the broker), its master held here, its output
//! streamed over WebSockets in `stoa.term.v1` (see `crate::terminal::protocol`).
//!
//! Each terminal has one reader: it reads the master (coalescing what is ready, up to 64
//! KiB) into a bounded ring with byte offsets. The ring is not this process's memory but a
//! memfd the broker created with the PTY and keeps with the handle (`super::ring`). Viewers
//! send from the ring and acknowledge what they processed; a *writing* viewer may be at
//! most one window ahead of its acks, and while one is out of credit the reader stops
//! reading, so a flood blocks in the kernel (and ^C, on the separate input path, still
//! works at once). Read-only viewers never hold the program up: one that falls behind the
//! ring gets a SNAPSHOT (a reset) and continues from what is kept. Memory per terminal is
//! the ring plus one window per viewer.
//!
//! Exit is reported only once the master read end-of-file (EIO), so no output is lost;
//! processes that keep the PTY open past the drain timeout get their group killed. The
//! broker keeps a duplicate of the master and of the ring's memfd: a restarted daemon takes
//! the terminal back with its ring and end offset as they were (`recover`), so a viewer
//! resuming from its last acknowledged offset gets exactly the bytes after it. Only when
//! the ring's header is not valid does it start a new ring 4 GiB past the offsets the last
//! daemon recorded (a resuming viewer then gets a SNAPSHOT). A planned restart
//! (`POST /daemon/restart`) first stops the readers between reads (`Terminals::quiesce`),
//! so not even a byte read but not yet in the ring is lost.
//!
//! | route                            | what                                                    |
//! |----------------------------------|---------------------------------------------------------|
//! | `POST /terminals`                | `{session_id? | cwd?, unix_user?, command?, cols, rows, env?}` → 201 |
//! | `GET /terminals`, `GET /terminals/:id` | yours (admins: all); others' are 404               |
//! | `DELETE /terminals/:id`          | SIGHUP → SIGTERM → SIGKILL of its process group; 204    |
//! | `POST /terminals/:id/ticket`     | a one-time ticket (30 s) for a browser's WebSocket      |
//! | `GET /terminals/:id/ws`          | the WebSocket (`?mode=view`: read-only; `?ticket=`)     |
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use stoa_executor::sys;

use super::fdio::{FdReader, FdWriter};
use super::http::ApiError;
use super::ring::Ring;
use super::store::{new_id, now, TerminalRow};
use super::worker::authenticate;
use super::AppState;
use crate::terminal::protocol::{error, ClientFrame, Exit, ServerFrame, FROM_NOW, SUBPROTOCOL};
use crate::wire::{
    ExitStatus, FdLayout, Handle, HandleInfo, Principal, Program, Purpose, RequestBody, Signal,
    SpawnRequest, WindowSize,
};

/// Most bytes one OUTPUT frame carries.
const MAX_FRAME_BYTES: usize = 64 * 1024;
/// A viewer that falls behind while streaming is resent at most this much after its reset.
const CATCH_UP_BYTES: u64 = 64 * 1024;
const TICKET_TTL: Duration = Duration::from_secs(30);
/// Input bytes a terminal holds for a program that is not reading before it refuses more.
const INPUT_QUEUE_BYTES: usize = 4 << 20;
/// A viewer must say HELLO within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// After EXIT and the server's close, how long to wait for the client's close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Viewer {
    acked: u64,
    can_write: bool,
}

struct Inner {
    /// The output kept, in the broker's memfd: offsets `ring.start()..ring.end()`.
    ring: Ring,
    cols: u16,
    rows: u16,
    viewers: HashMap<u64, Viewer>,
    exit: Option<Exit>,
    /// The master reported end-of-file: every byte the program wrote is in the ring.
    drained: bool,
    last_viewer_left: Option<Instant>,
    /// The reader stopped between reads for a planned restart (`Terminals::quiesce`).
    reader_parked: bool,
}

impl Inner {
    fn end(&self) -> u64 {
        self.ring.end()
    }

    fn ring_start(&self) -> u64 {
        self.ring.start()
    }
}

pub struct Terminal {
    pub id: String,
    pub owner: String,
    pub unix_user: String,
    pub handle: Handle,
    pub pid: i32,
    pub command: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub started_at: String,
    inner: Mutex<Inner>,
    /// Bumped whenever there is something new for viewers (output, size, exit).
    progress: watch::Sender<u64>,
    /// Wakes the reader when a viewer acknowledges or leaves.
    credit: Notify,
    /// Input for the PTY, written by its own task: a program that does not read its input
    /// must not stop a viewer from acknowledging output (that would deadlock a paste into
    /// a program waiting on its output).
    input: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// Input bytes queued or being written; while 0, input may go straight to the master
    /// (a keystroke's fastest path) without overtaking anything.
    input_pending: Arc<std::sync::atomic::AtomicUsize>,
    /// The master, for window-size changes, urgent keys and unqueued input.
    master: FdWriter,
    window: u32,
    next_viewer: AtomicU64,
}

#[derive(Serialize)]
struct TerminalView {
    terminal_id: String,
    owner: String,
    unix_user: String,
    pid: i32,
    cols: u16,
    rows: u16,
    command: Option<Vec<String>>,
    cwd: Option<String>,
    started_at: String,
    running: bool,
    exit_code: Option<i32>,
    signal: Option<i32>,
    viewers: usize,
}

impl Terminal {
    fn view(&self) -> TerminalView {
        let inner = self.inner.lock().expect("terminal lock");
        let (exit_code, signal) = match inner.exit {
            Some(Exit::Code(c)) if inner.drained => (Some(c), None),
            Some(Exit::Signal(s)) if inner.drained => (None, Some(s)),
            _ => (None, None),
        };
        TerminalView {
            terminal_id: self.id.clone(),
            owner: self.owner.clone(),
            unix_user: self.unix_user.clone(),
            pid: self.pid,
            cols: inner.cols,
            rows: inner.rows,
            command: self.command.clone(),
            cwd: self.cwd.clone(),
            started_at: self.started_at.clone(),
            running: !(inner.drained && inner.exit.is_some()),
            exit_code,
            signal,
            viewers: inner.viewers.len(),
        }
    }

    /// Input for the program: straight to the master when nothing is queued and it takes
    /// it all now, else queued for the writer task. A full queue drops it (the caller says
    /// so to the viewer): the program is not reading.
    fn send_input(&self, mut bytes: Vec<u8>) -> Result<(), String> {
        if self.input_pending.load(Ordering::SeqCst) == 0 {
            if let Ok(Some(n)) = self.master.try_write(&bytes) {
                if n == bytes.len() {
                    return Ok(());
                }
                bytes.drain(..n);
            }
        }
        let len = bytes.len();
        let queued = self.input_pending.fetch_add(len, Ordering::SeqCst);
        if queued + len > INPUT_QUEUE_BYTES {
            self.input_pending.fetch_sub(len, Ordering::SeqCst);
            return Err(format!(
                "the program is not reading its input ({queued} bytes waiting): {len} bytes dropped"
            ));
        }
        self.input.send(bytes).map_err(|_| {
            self.input_pending.fetch_sub(len, Ordering::SeqCst);
            "the terminal's input is closed".to_string()
        })
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    fn finished(&self) -> bool {
        let inner = self.inner.lock().expect("terminal lock");
        inner.drained && inner.exit.is_some()
    }

    /// True while a writing viewer has a full window unacknowledged.
    /// How much the reader may read now: the least credit any writing viewer has left
    /// (the whole buffer when there is none). Never reading past it keeps every byte a
    /// writer has not acknowledged in the ring (which is at least one window).
    fn read_budget(&self, buffer: usize) -> usize {
        let inner = self.inner.lock().expect("terminal lock");
        let end = inner.end();
        inner
            .viewers
            .values()
            .filter(|v| v.can_write)
            .map(|v| (self.window as u64).saturating_sub(end.saturating_sub(v.acked)) as usize)
            .fold(buffer, usize::min)
    }

    /// Into the ring (data, then its end offset: see `super::ring`), then to the viewers:
    /// a viewer is never sent a byte the ring has not published, so a holder that dies
    /// never leaves a viewer ahead of the ring its successor finds.
    fn append(&self, bytes: &[u8]) {
        self.inner.lock().expect("terminal lock").ring.append(bytes);
        self.bump();
    }
}

/// The terminals this daemon serves, and browser tickets.
#[derive(Default)]
pub struct Terminals {
    live: Mutex<HashMap<String, Arc<Terminal>>>,
    tickets: Mutex<HashMap<String, Ticket>>,
    /// Set before a planned restart: readers stop between reads.
    pause: watch::Sender<bool>,
    /// Shares this worker's user revoked (their open viewers end).
    pub revocations: super::shares::Revocations,
}

struct Ticket {
    terminal_id: String,
    principal: Principal,
    /// The revocation generation its principal was verified at (see `auth.rs`).
    generation: u64,
    expires: Instant,
}

impl Terminals {
    /// Before a planned restart: every reader stops between two reads, so each byte it
    /// read from a PTY is in the ring (which outlives this process) and the rest stays in
    /// the kernel for the next daemon. Returns once all have stopped (or ended), or after
    /// `wait`. Nothing reads again in this process afterwards.
    pub async fn quiesce(&self, wait: Duration) {
        self.pause.send_replace(true);
        let deadline = Instant::now() + wait;
        loop {
            let all: Vec<Arc<Terminal>> = self
                .live
                .lock()
                .expect("terminals lock")
                .values()
                .cloned()
                .collect();
            let stopped = all.iter().all(|t| {
                let inner = t.inner.lock().expect("terminal lock");
                inner.reader_parked || inner.drained
            });
            if stopped || Instant::now() >= deadline {
                if !stopped {
                    warn!("not every terminal reader stopped before the restart");
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// (unix user, running) of every terminal, for metrics.
    pub fn users(&self) -> Vec<(String, bool)> {
        self.live
            .lock()
            .expect("terminals lock")
            .values()
            .map(|t| (t.unix_user.clone(), !t.finished()))
            .collect()
    }

    fn get(&self, id: &str) -> Option<Arc<Terminal>> {
        self.live.lock().expect("terminals lock").get(id).cloned()
    }

    /// The id of a live terminal that `principal` itself owns (what may be shared).
    pub fn owned(&self, principal: &Principal, id: &str) -> Result<String, ApiError> {
        match self.get(id) {
            Some(t)
                if principal.owner() == t.owner && principal.unix_user() == Some(&t.unix_user) =>
            {
                Ok(t.id.clone())
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no terminal {id} of yours"),
            )),
        }
    }

    fn visible(&self, principal: &Principal, id: &str) -> Result<Arc<Terminal>, ApiError> {
        match self.get(id) {
            Some(t) if principal.may_use(&t.owner, &t.unix_user) => Ok(t),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no terminal {id}"),
            )),
        }
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/terminals", post(create).get(list))
        .route("/terminals/{id}", get(show).delete(delete))
        .route("/terminals/{id}/ticket", post(ticket))
        .route("/terminals/{id}/ws", get(websocket))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTerminal {
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    unix_user: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    cols: u16,
    rows: u16,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CreateTerminal>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (principal, credential) = authenticate(&state, &headers).await?;
    state.accepting_work()?;
    let req = body
        .map(|Json(b)| b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (mut unix_user, mut cwd) = (req.unix_user.clone(), req.cwd.clone());
    // A terminal in a session's worktree must find the directory the session pinned.
    let mut cwd_id = None;
    if let Some(session_id) = &req.session_id {
        let session = state
            .store
            .session(session_id)
            .await
            .map_err(ApiError::internal)?;
        let session = session
            .filter(|s| principal.may_use(&s.owner, &s.unix_user))
            .ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("no session {session_id}"))
            })?;
        unix_user = Some(session.unix_user);
        cwd = Some(session.worktree);
        cwd_id = session.worktree_id;
    }
    let unix_user = match (unix_user, principal.unix_user()) {
        (Some(u), _) => u,
        (None, Some(own)) => own.to_string(),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unix_user is required with the admin token",
            ))
        }
    };
    let mine = state
        .terminals
        .live
        .lock()
        .expect("terminals lock")
        .values()
        .filter(|t| t.owner == principal.owner() && !t.finished())
        .count();
    if mine >= state.config.terminal.max_per_user {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "at most {} live terminals per user",
                state.config.terminal.max_per_user
            ),
        ));
    }
    let program = match &req.command {
        Some(argv) if !argv.is_empty() => Program::Exec { argv: argv.clone() },
        Some(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "command is empty")),
        None => Program::Shell,
    };
    let spawn = SpawnRequest {
        cwd_id,
        credential,
        unix_user,
        program,
        cwd: cwd.clone(),
        env: req.env.into_iter().collect(),
        tty: Some(WindowSize {
            rows: req.rows,
            cols: req.cols,
        }),
        stdin: false,
        keep_stdin: false,
        secrets: false,
        secret_names: None,
        ring_bytes: ring_memfd_bytes(state.config.terminal.ring_bytes),
        purpose: Purpose::Terminal,
    };
    // Until the terminal runs, an error drops the guard, which kills and releases it.
    let super::Spawned {
        info,
        fds,
        mut guard,
    } = state.spawn("terminal", spawn).await?;
    let terminal_id = super::store::object_id(state.uid);
    let row = TerminalRow {
        terminal_id: terminal_id.clone(),
        owner: principal.owner(),
        unix_user: info.unix_user.clone(),
        handle: info.handle.0,
        pid: info.pid,
        command: req.command,
        cwd,
        cols: req.cols,
        rows: req.rows,
        started_at: now(),
        exit_code: None,
        signal: None,
        ended_at: None,
        offset_base: 0,
        last_offset: 0,
    };
    state
        .store
        .insert_terminal(row.clone())
        .await
        .map_err(ApiError::internal)?;
    let started = take_fds(&info, fds).and_then(|(master, map)| {
        let ring = Ring::create(map, row.offset_base)
            .map_err(|e| format!("cannot set the output ring up: {e}"))?;
        start(&state, row, &info, master, ring)
    });
    let terminal = match started {
        Ok(t) => t,
        Err(e) => {
            let _ = state.store.delete_terminal(&terminal_id).await;
            return Err(ApiError::internal(e));
        }
    };
    // From here its lifecycle ends and releases it.
    guard.set(super::OnDrop::Nothing);
    info!(terminal = %terminal.id, user = %terminal.unix_user, pid = terminal.pid, "terminal started");
    Ok((StatusCode::CREATED, Json(terminal.view())).into_response())
}

/// The size of the memfd to ask the broker for: the ring's header and `capacity` data
/// bytes (the config keeps it within the broker's limits).
pub fn ring_memfd_bytes(capacity: usize) -> u32 {
    u32::try_from(capacity + super::ring::HEADER_BYTES).unwrap_or(u32::MAX)
}

/// A terminal handle's fds (`[control, pty master, ring]`): the master, and the ring's
/// memfd mapped (the mapping keeps it; the fd itself is closed, the broker holds one).
fn take_fds(
    info: &HandleInfo,
    fds: Vec<OwnedFd>,
) -> Result<(OwnedFd, stoa_executor::sys::SharedMap), String> {
    if info.fds != FdLayout::Pty || fds.len() != 3 {
        return Err("a terminal needs a pty and its output ring".into());
    }
    let mut fds = fds.into_iter();
    let _control = fds.next();
    let master = fds.next().expect("three fds");
    let ring = fds.next().expect("three fds");
    let map = Ring::map(ring.as_fd()).map_err(|e| format!("cannot map the output ring: {e}"))?;
    Ok((master, map))
}

/// Sets a terminal up from its master and its ring and starts its reader and its
/// lifecycle.
fn start(
    state: &Arc<AppState>,
    row: TerminalRow,
    info: &HandleInfo,
    master: OwnedFd,
    ring: Ring,
) -> Result<Arc<Terminal>, String> {
    let writer =
        FdWriter::new(master.try_clone().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let control =
        FdWriter::new(master.try_clone().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let reader = FdReader::new(master).map_err(|e| e.to_string())?;
    // Unbounded as a channel, bounded in bytes by `send_input`.
    let (input, mut queued) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let input_pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pending = input_pending.clone();
    super::broker_link::spawn_traced(async move {
        while let Some(bytes) = queued.recv().await {
            let written = writer.write_all(&bytes).await;
            pending.fetch_sub(bytes.len(), Ordering::SeqCst);
            if written.is_err() {
                break;
            }
        }
    });
    let (cols, rows) = match sys::window_size(control.raw()) {
        Ok((r, c)) if r > 0 && c > 0 => (c, r),
        _ => (row.cols, row.rows),
    };
    let terminal = Arc::new(Terminal {
        id: row.terminal_id.clone(),
        owner: row.owner,
        unix_user: row.unix_user,
        handle: info.handle,
        pid: info.pid,
        command: row.command,
        cwd: row.cwd,
        started_at: row.started_at,
        // Never more than the ring holds: the reader keeps what a writer has not
        // acknowledged in the ring (a ring taken back may be smaller than configured now).
        window: (state.config.terminal.window_bytes as u64).min(ring.capacity()) as u32,
        inner: Mutex::new(Inner {
            ring,
            cols,
            rows,
            viewers: HashMap::new(),
            exit: None,
            drained: false,
            last_viewer_left: Some(Instant::now()),
            reader_parked: false,
        }),
        progress: watch::channel(0).0,
        credit: Notify::new(),
        input,
        input_pending,
        master: control,
        next_viewer: AtomicU64::new(1),
    });
    state
        .terminals
        .live
        .lock()
        .expect("terminals lock")
        .insert(terminal.id.clone(), terminal.clone());
    let pause = state.terminals.pause.subscribe();
    super::broker_link::spawn_traced(read_loop(terminal.clone(), reader, pause));
    super::broker_link::spawn_traced(record_offsets(state.clone(), terminal.clone()));
    super::broker_link::spawn_traced(lifecycle(state.clone(), terminal.clone()));
    Ok(terminal)
}

/// Records the terminal's end offset once a second while it changes (see `recover`).
async fn record_offsets(state: Arc<AppState>, terminal: Arc<Terminal>) {
    // Woken by output only: an idle terminal costs nothing here. Returns as soon as the
    // terminal has ended, so it never keeps an ended terminal (and its fds) alive.
    let mut progress = terminal.progress.subscribe();
    let mut recorded = None;
    loop {
        if terminal.finished() || state.terminals.get(&terminal.id).is_none() {
            return;
        }
        let end = terminal.inner.lock().expect("terminal lock").end();
        if recorded != Some(end) {
            if let Err(e) = state
                .store
                .set_terminal_last_offset(&terminal.id, end)
                .await
            {
                warn!(terminal = %terminal.id, "cannot record the output offset: {e}");
            }
            recorded = Some(end);
        }
        if progress.changed().await.is_err() || terminal.finished() {
            return;
        }
        // At most one record a second, but no waiting once it has ended.
        let ended = async {
            while !terminal.finished() {
                if progress.changed().await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), ended)
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// PTY master → ring, pausing while a writing viewer is out of credit, and stopping for
/// good between two reads when `pause` is set (a planned restart).
async fn read_loop(terminal: Arc<Terminal>, reader: FdReader, mut pause: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    loop {
        let ready = async {
            loop {
                let notified = terminal.credit.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if terminal.read_budget(buf.len()) > 0 {
                    break;
                }
                notified.await;
            }
            // Credit only grows while we read (acks), so this budget still holds after it.
            let budget = terminal.read_budget(buf.len());
            reader.read(&mut buf[..budget]).await
        };
        // `FdReader::read` takes bytes from the kernel only in the step that returns them:
        // dropped while waiting (paused), it has read nothing.
        let first = tokio::select! {
            biased;
            Ok(_) = pause.wait_for(|p| *p) => None,
            r = ready => Some(r),
        };
        let mut filled = match first {
            None => {
                terminal.inner.lock().expect("terminal lock").reader_parked = true;
                // The process is about to exit; the next daemon reads on.
                std::future::pending::<()>().await;
                return;
            }
            Some(Ok(0) | Err(_)) => break,
            Some(Ok(n)) => n,
        };
        let budget = terminal.read_budget(buf.len()).max(filled);
        let buf = &mut buf[..budget];
        // Take whatever else is ready now, up to one frame: fewer, larger frames.
        let mut ended = false;
        while filled < buf.len() {
            match reader.try_read(&mut buf[filled..]) {
                Ok(Some(0)) => {
                    ended = true;
                    break;
                }
                Ok(Some(n)) => filled += n,
                Ok(None) => break,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        terminal.append(&buf[..filled]);
        if ended {
            break;
        }
    }
    terminal.inner.lock().expect("terminal lock").drained = true;
    terminal.bump();
}

/// Waits for the program's exit, makes sure the output is drained (killing what holds the
/// PTY open past the timeout), records the end and releases the broker's handle. Also
/// ends a terminal idle for too long.
async fn lifecycle(state: Arc<AppState>, terminal: Arc<Terminal>) {
    let Some(mut exit_rx) = state.processes.exit_watch(terminal.handle) else {
        warn!(terminal = %terminal.id, "terminal handle not tracked");
        return;
    };
    let idle = state.config.terminal.idle_timeout_secs;
    let status = loop {
        let check = tokio::time::sleep(Duration::from_secs(if idle > 0 {
            idle.min(5)
        } else {
            3600
        }));
        let exited = tokio::select! {
            r = exit_rx.wait_for(|s| s.is_some()) => Some(r.ok().and_then(|s| *s)),
            _ = check => None,
        };
        if let Some(status) = exited {
            break status;
        }
        let idle_since = terminal
            .inner
            .lock()
            .expect("terminal lock")
            .last_viewer_left;
        if idle > 0 && idle_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(idle)) {
            info!(terminal = %terminal.id, "idle timeout: ending the terminal");
            hang_up(&state, &terminal).await;
        }
    };
    let exit = match status {
        Some(ExitStatus::Code(c)) => Exit::Code(c),
        Some(ExitStatus::Signal(s)) => Exit::Signal(s),
        None => Exit::Signal(0),
    };
    terminal.inner.lock().expect("terminal lock").exit = Some(exit);
    let mut progress = terminal.progress.subscribe();
    let drained = |t: &Terminal| t.inner.lock().expect("terminal lock").drained;
    let drain = Duration::from_millis(state.config.terminal.drain_timeout_ms);
    let waited = tokio::time::timeout(drain, async {
        while !drained(&terminal) {
            let _ = progress.changed().await;
        }
    })
    .await;
    if waited.is_err() {
        // Processes it left behind keep the PTY open: end them.
        let _ = state
            .link
            .request(RequestBody::Kill {
                handle: terminal.handle,
                signal: Signal::Kill,
            })
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !drained(&terminal) {
                let _ = progress.changed().await;
            }
        })
        .await;
        terminal.inner.lock().expect("terminal lock").drained = true;
    }
    terminal.bump();
    let (code, signal) = match exit {
        Exit::Code(c) => (Some(c), None),
        Exit::Signal(s) => (None, Some(s)),
    };
    if let Err(e) = state.store.terminal_ended(&terminal.id, code, signal).await {
        warn!(terminal = %terminal.id, "cannot record the end: {e}");
    }
    state.end_handle(terminal.handle, false).await;
    info!(terminal = %terminal.id, ?exit, "terminal ended");
}

/// SIGHUP, then SIGTERM, then SIGKILL to the terminal's process group, a second apart,
/// until it has exited.
async fn hang_up(state: &AppState, terminal: &Terminal) {
    let Some(mut exit_rx) = state.processes.exit_watch(terminal.handle) else {
        return;
    };
    for signal in [Signal::Hup, Signal::Term, Signal::Kill] {
        if exit_rx.borrow().is_some() {
            return;
        }
        let _ = state
            .link
            .request(RequestBody::Kill {
                handle: terminal.handle,
                signal,
            })
            .await;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), exit_rx.wait_for(|s| s.is_some())).await;
    }
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let all: Vec<Arc<Terminal>> = state
        .terminals
        .live
        .lock()
        .expect("terminals lock")
        .values()
        .cloned()
        .collect();
    let mut views: Vec<TerminalView> = all
        .iter()
        .filter(|t| principal.may_use(&t.owner, &t.unix_user))
        .map(|t| t.view())
        .collect();
    views.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(Json(views).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    Ok(Json(state.terminals.visible(&principal, &id)?.view()).into_response())
}

async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (principal, _) = authenticate(&state, &headers).await?;
    let terminal = state.terminals.visible(&principal, &id)?;
    hang_up(&state, &terminal).await;
    // Let the lifecycle record the end and release the handle.
    let mut progress = terminal.progress.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !terminal.finished() {
            let _ = progress.changed().await;
        }
    })
    .await;
    state
        .terminals
        .live
        .lock()
        .expect("terminals lock")
        .remove(&id);
    let _ = state.store.delete_terminal(&id).await;
    info!(terminal = %id, by = %principal.name(), "terminal deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn ticket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let generation = state.auth.generation();
    let (principal, _) = authenticate(&state, &headers).await?;
    state.terminals.visible(&principal, &id)?;
    let ticket = new_id();
    let mut tickets = state.terminals.tickets.lock().expect("tickets lock");
    tickets.retain(|_, t| t.expires > Instant::now());
    tickets.insert(
        ticket.clone(),
        Ticket {
            terminal_id: id,
            principal,
            generation,
            expires: Instant::now() + TICKET_TTL,
        },
    );
    Ok(Json(json!({ "ticket": ticket, "expires_in_secs": TICKET_TTL.as_secs() })).into_response())
}

#[derive(Deserialize)]
struct WsQuery {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    ticket: Option<String>,
}

/// Whether a browser on `origin` may open a socket here: the daemon's own address (the
/// request's Host) or a configured origin. Cross-site pages are refused (a WebSocket
/// upgrade is a GET, and browsers attach credentials to it).
fn origin_allowed(state: &AppState, headers: &HeaderMap, origin: &str) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        == Some(host);
    same || state
        .config
        .terminal
        .allowed_origins
        .iter()
        .any(|o| o == origin)
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin {
        if !origin_allowed(&state, &headers, origin) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("origin {origin} may not open terminals"),
            ));
        }
    }
    // Authenticate before the upgrade: a bearer header, or a browser's one-time ticket.
    // The generation is taken first, so a revocation from here on ends the socket.
    let generation = state.auth.generation();
    let (principal, generation) = match &query.ticket {
        Some(t) => {
            let ticket = state
                .terminals
                .tickets
                .lock()
                .expect("tickets lock")
                .remove(t);
            match ticket {
                Some(t) if t.terminal_id == id && t.expires > Instant::now() => {
                    (t.principal, t.generation)
                }
                _ => {
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "invalid or expired ticket",
                    ))
                }
            }
        }
        None => (authenticate(&state, &headers).await?.0, generation),
    };
    let verified = super::auth::Verified {
        principal,
        generation,
    };
    if state.auth.revoked(&verified) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this credential was revoked",
        ));
    }
    let principal = &verified.principal;
    // A connection the broker opened for a share reaches that terminal only, and types
    // into it only if the share says so.
    let share = super::worker::CONNECTION
        .try_with(|c| c.share.clone())
        .ok()
        .flatten();
    let (terminal, shared_read_only) = match &share {
        Some(s) if s.object == id => match state.terminals.get(&id) {
            Some(t) => (t, !s.input),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no terminal {id}"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this connection is for another shared terminal",
            ))
        }
        None => (state.terminals.visible(principal, &id)?, false),
    };
    let revoked = state.auth.until_revoked(verified.clone());
    let view_only = query.mode.as_deref() == Some("view") || shared_read_only;
    let attached = Instant::now();
    let wants_protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
    if !wants_protocol {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the WebSocket must offer the subprotocol {SUBPROTOCOL}"),
        ));
    }
    Ok(upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            // A revoked user's socket ends at once, with a close frame saying why.
            tokio::pin!(revoked);
            let mut socket = socket;
            let unshared = async {
                match &share {
                    Some(s) => {
                        let access = super::shares::Access {
                            share: s,
                            since: attached,
                        };
                        access.ended(&state).await
                    }
                    None => std::future::pending().await,
                }
            };
            let ended = tokio::select! {
                _ = viewer(&mut socket, terminal, view_only, state.clone()) => None,
                _ = &mut revoked => Some("credentials revoked"),
                _ = unshared => Some("the share ended"),
            };
            if let Some(reason) = ended {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: reason.into(),
                    })))
                    .await;
            }
        }))
}

async fn send(socket: &mut WebSocket, frame: ServerFrame) -> bool {
    socket
        .send(Message::Binary(frame.encode().into()))
        .await
        .is_ok()
}

/// One viewer: HELLO, then output as credit allows, input and control from the client.
async fn viewer(
    socket: &mut WebSocket,
    terminal: Arc<Terminal>,
    view_only: bool,
    state: Arc<AppState>,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => ClientFrame::decode(&b),
        _ => Err("no HELLO".to_string()),
    };
    let (resume, want_write) = match hello {
        Ok(ClientFrame::Hello {
            resume,
            want_write,
            cols,
            rows,
        }) => {
            if want_write && !view_only {
                // The writer's window is the size that counts.
                let _ = resize(&terminal, cols, rows);
            }
            (resume, want_write)
        }
        Ok(_) | Err(_) => {
            let _ = send(
                socket,
                ServerFrame::Error {
                    code: error::BAD_FRAME,
                    message: "HELLO must come first".into(),
                },
            )
            .await;
            return;
        }
    };
    let can_write = want_write && !view_only;
    let id = terminal.next_viewer.fetch_add(1, Ordering::SeqCst);
    let (mut sent, welcome) = {
        let mut inner = terminal.inner.lock().expect("terminal lock");
        let end = inner.end();
        let start = if resume == FROM_NOW || resume > end {
            end
        } else {
            resume
        };
        let acked = start.max(inner.ring_start()).min(end);
        inner.viewers.insert(id, Viewer { acked, can_write });
        inner.last_viewer_left = None;
        let exit = if inner.drained { inner.exit } else { None };
        let welcome = ServerFrame::Welcome {
            can_write,
            window: terminal.window,
            oldest: inner.ring_start(),
            current: end,
            cols: inner.cols,
            rows: inner.rows,
            exit,
        };
        (start, welcome)
    };
    let _registered = Registered {
        terminal: terminal.clone(),
        id,
    };
    let mut progress = terminal.progress.subscribe();
    let mut size_sent = (0u16, 0u16);
    let mut ok = send(socket, welcome).await;
    let mut read_only_warned = false;
    // Has this viewer been sent output yet (a viewer that falls behind while streaming
    // gets only the recent tail after its reset; one that attaches late gets all kept).
    let mut streaming = false;
    while ok {
        // Send what credit allows.
        let (frames, size, done) = {
            let mut inner = terminal.inner.lock().expect("terminal lock");
            let mut frames = Vec::new();
            if sent < inner.ring_start() {
                // What it missed is gone: a reset, then what is kept (all of it on a
                // (re)attach, the recent tail for a viewer that fell behind).
                let from = if streaming {
                    inner
                        .end()
                        .saturating_sub(CATCH_UP_BYTES)
                        .max(inner.ring_start())
                } else {
                    inner.ring_start()
                };
                frames.push(ServerFrame::Snapshot {
                    offset: from,
                    cols: inner.cols,
                    rows: inner.rows,
                    bytes: b"\x1bc".to_vec(),
                });
                sent = from;
                if let Some(v) = inner.viewers.get_mut(&id) {
                    v.acked = v.acked.max(from);
                }
            }
            let acked = inner.viewers.get(&id).map_or(sent, |v| v.acked);
            let end = inner.end();
            while sent < end && sent - acked < terminal.window as u64 {
                let room = (terminal.window as u64 - (sent - acked)).min(MAX_FRAME_BYTES as u64);
                let len = (end - sent).min(room) as usize;
                let bytes = inner.ring.read(sent, len);
                state.metrics.terminal_bytes.inc_by(bytes.len() as u64);
                frames.push(ServerFrame::Output {
                    offset: sent,
                    bytes,
                });
                sent += len as u64;
                streaming = true;
            }
            let done = inner.drained && inner.exit.is_some() && sent == inner.end();
            (
                frames,
                (inner.cols, inner.rows),
                done.then_some(inner.exit).flatten(),
            )
        };
        for f in frames {
            if !send(socket, f).await {
                ok = false;
                break;
            }
        }
        if !ok {
            break;
        }
        if size != size_sent {
            size_sent = size;
            ok = send(
                socket,
                ServerFrame::Size {
                    cols: size.0,
                    rows: size.1,
                },
            )
            .await;
        }
        if let Some(exit) = done {
            // All output is out: EXIT, our close, then the client's close (closing early
            // makes browsers drop the tail).
            let _ = send(socket, ServerFrame::Exit(exit)).await;
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "exited".into(),
                })))
                .await;
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(m)) = socket.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            break;
        }
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Binary(b))) => match ClientFrame::decode(&b) {
                    Ok(frame) => {
                        if let Err(e) = handle(&state, &terminal, id, can_write, frame, socket, &mut read_only_warned).await {
                            warn!(terminal = %terminal.id, "viewer: {e}");
                            ok = false;
                        }
                    }
                    Err(e) => {
                        ok = send(socket, ServerFrame::Error { code: error::BAD_FRAME, message: e }).await;
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    ok = send(socket, ServerFrame::Error { code: error::BAD_FRAME, message: "binary frames only".into() }).await;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => ok = false,
            },
            _ = progress.changed() => {}
        }
    }
}

/// A viewer's place in its terminal, given up however the viewer ends (also when its
/// future is dropped: a revoked user's socket).
struct Registered {
    terminal: Arc<Terminal>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut inner = self.terminal.inner.lock().expect("terminal lock");
        inner.viewers.remove(&self.id);
        if inner.viewers.is_empty() {
            inner.last_viewer_left = Some(Instant::now());
        }
        drop(inner);
        self.terminal.credit.notify_one();
    }
}

/// Sets the terminal's window size (the program gets SIGWINCH) and tells the viewers.
fn resize(terminal: &Terminal, cols: u16, rows: u16) -> Result<(), String> {
    let (cols, rows) = (cols.clamp(1, 4096), rows.clamp(1, 4096));
    let mut inner = terminal.inner.lock().expect("terminal lock");
    if (inner.cols, inner.rows) == (cols, rows) {
        return Ok(());
    }
    sys::set_window_size(terminal.master.raw().as_fd(), rows, cols)
        .map_err(|e| format!("resize: {e}"))?;
    (inner.cols, inner.rows) = (cols, rows);
    drop(inner);
    terminal.bump();
    Ok(())
}

async fn handle(
    state: &AppState,
    terminal: &Terminal,
    id: u64,
    can_write: bool,
    frame: ClientFrame,
    socket: &mut WebSocket,
    read_only_warned: &mut bool,
) -> Result<(), String> {
    let refuse_read_only = |warned: &mut bool| {
        let first = !*warned;
        *warned = true;
        first.then(|| ServerFrame::Error {
            code: error::READ_ONLY,
            message: "this viewer is read-only".into(),
        })
    };
    match frame {
        ClientFrame::Hello { .. } => {}
        ClientFrame::Ack { consumed } => {
            let mut inner = terminal.inner.lock().expect("terminal lock");
            let end = inner.end();
            if let Some(v) = inner.viewers.get_mut(&id) {
                v.acked = v.acked.max(consumed.min(end));
            }
            drop(inner);
            terminal.credit.notify_one();
        }
        ClientFrame::Input(bytes) if can_write => {
            if let Err(message) = terminal.send_input(bytes) {
                send(
                    socket,
                    ServerFrame::Error {
                        code: error::INPUT_DROPPED,
                        message,
                    },
                )
                .await;
            }
        }
        ClientFrame::Resize { cols, rows } if can_write => resize(terminal, cols, rows)?,
        ClientFrame::Signal(sig) if can_write => {
            // Keyboard signals go through the line discipline, to the foreground job,
            // as a real keyboard would; the others to the terminal's process group.
            let key = match sig as i32 {
                libc::SIGINT => Some(0x03),
                libc::SIGQUIT => Some(0x1c),
                libc::SIGTSTP => Some(0x1a),
                _ => None,
            };
            let signal = match sig as i32 {
                libc::SIGHUP => Some(Signal::Hup),
                libc::SIGTERM => Some(Signal::Term),
                libc::SIGKILL => Some(Signal::Kill),
                libc::SIGCONT => Some(Signal::Cont),
                libc::SIGWINCH => Some(Signal::Winch),
                _ => None,
            };
            if let Some(k) = key {
                // Straight to the terminal, ahead of queued input; if its input buffer is
                // full, the signal itself to the terminal's process group.
                if !matches!(terminal.master.try_write(&[k]), Ok(Some(1))) {
                    let signal = match k {
                        0x03 => Signal::Int,
                        0x1c => Signal::Quit,
                        _ => Signal::Tstp,
                    };
                    let _ = state
                        .link
                        .request(RequestBody::Kill {
                            handle: terminal.handle,
                            signal,
                        })
                        .await;
                }
            } else if let Some(s) = signal {
                let _ = state
                    .link
                    .request(RequestBody::Kill {
                        handle: terminal.handle,
                        signal: s,
                    })
                    .await;
            } else {
                send(
                    socket,
                    ServerFrame::Error {
                        code: error::SIGNAL_REFUSED,
                        message: format!("signal {sig} is not allowed"),
                    },
                )
                .await;
            }
        }
        ClientFrame::Input(_) | ClientFrame::Resize { .. } | ClientFrame::Signal(_) => {
            if let Some(f) = refuse_read_only(read_only_warned) {
                send(socket, f).await;
            }
        }
        ClientFrame::Ping(t) => {
            send(socket, ServerFrame::Pong(t)).await;
        }
    }
    Ok(())
}

/// The ring a previous holder left in the terminal's memfd, as it was (offsets go on from
/// its end). If its header is not valid, a new ring whose offsets continue past any the
/// previous daemon gave out: its end is recorded every second, and a PTY cannot write 4 GiB
/// in one. So a viewer resuming from an old offset then gets a SNAPSHOT, never silently
/// skipped output. (Offsets stay far below 2^53, exact in a browser's numbers.)
async fn take_ring_back(
    state: &Arc<AppState>,
    row: &mut TerminalRow,
    map: stoa_executor::sys::SharedMap,
) -> Result<Ring, String> {
    let map = match Ring::resume(map) {
        Ok(ring) => {
            info!(terminal = %row.terminal_id, start = ring.start(), end = ring.end(), "output ring intact");
            return Ok(ring);
        }
        Err((map, why)) => {
            warn!(terminal = %row.terminal_id, "output ring not usable ({why}): starting a new one past the recorded offsets");
            map
        }
    };
    row.offset_base = row.offset_base.max(row.last_offset) + (1 << 32);
    if let Err(e) = state
        .store
        .set_terminal_offset_base(&row.terminal_id, row.offset_base)
        .await
    {
        warn!(terminal = %row.terminal_id, "cannot store the offset base: {e}");
    }
    Ring::create(map, row.offset_base).map_err(|e| format!("cannot set the output ring up: {e}"))
}

/// After a restart: terminals the previous daemon served whose PTYs the broker still holds
/// are served again; the others are recorded as ended. Returns the adopted handles that
/// belong to no terminal.
pub async fn recover(
    state: &Arc<AppState>,
    mut adopted: Vec<(HandleInfo, Vec<OwnedFd>)>,
) -> Vec<(HandleInfo, Vec<OwnedFd>)> {
    let rows = match state.store.live_terminals().await {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot read terminals: {e}");
            return adopted;
        }
    };
    for mut row in rows {
        let Some(position) = adopted
            .iter()
            .position(|(info, _)| info.handle.0 == row.handle)
        else {
            let _ = state
                .store
                .terminal_ended(&row.terminal_id, None, None)
                .await;
            continue;
        };
        let (info, fds) = adopted.swap_remove(position);
        let id = row.terminal_id.clone();
        let started = match take_fds(&info, fds) {
            Ok((master, map)) => match take_ring_back(state, &mut row, map).await {
                Ok(ring) => start(state, row, &info, master, ring),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(_) => info!(terminal = %id, handle = info.handle.0, "took a terminal back"),
            Err(e) => {
                // Nobody could reach it again: end it rather than leave it unwatched.
                warn!(terminal = %id, "cannot take the terminal back, ending it: {e}");
                state.end_handle(info.handle, true).await;
                let _ = state.store.terminal_ended(&id, None, None).await;
            }
        }
    }
    adopted
}
