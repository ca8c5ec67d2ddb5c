//! `POST /exec`: run a command as a user to completion and return its output.
//!
//! Two forms of reply, chosen by the request's `Accept`:
//!
//! | `Accept` | reply |
//! |---|---|
//! | anything else | once the run ends: [`ExecResponse`] as JSON, output as (lossy) UTF-8 |
//! | [`STREAM_TYPE`] | at once, a body of records as output comes (see below) |
//!
//! A stream record is `[kind: u8][length: u32, big-endian][payload]`: [`STDOUT`] and
//! [`STDERR`] carry output bytes unchanged (binary-safe); the last record is [`END`], whose
//! payload is the [`ExecResponse`] JSON with empty `stdout` and `stderr`. A stream that ends
//! without END was cut (the worker went away). Both forms keep each stream to
//! `exec_output_limit` bytes, honour `timeout_ms`, and cut processes left holding the output
//! open after `exec_drain_timeout_ms`. A client that goes away kills the run.
//!
//! Input is `stdin` (text) or `stdin_base64` (any bytes), never both; all of it is given at
//! the start (the request body is at most 1 MiB).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use stoa_executor::codec;
use stoa_executor::job::Report;

use super::fdio::{self, Collected, FdReader};
use super::http::ApiError;
use super::AppState;
use crate::wire::{
    ExitStatus, FdLayout, Program, Purpose, RequestBody, Signal, SpawnRequest, WindowSize,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub unix_user: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub tty: Option<WindowSize>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// Input as base64, for bytes that are not text.
    #[serde(default)]
    pub stdin_base64: Option<String>,
    /// Kill the process group after this long (the reply says `timed_out`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ExecResponse {
    pub handle: u64,
    pub pid: i32,
    pub unix_user: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output past `exec_output_limit` was dropped, or processes left behind kept the
    /// output open past the drain timeout.
    pub truncated: bool,
    pub timed_out: bool,
    /// Set when the program could not be started at all.
    pub error: Option<String>,
    /// A cgroup limit its processes ran into (out of memory, process limit).
    pub limit_hit: Option<String>,
    /// "landlock abi N" (its writes were confined), or "none (why)".
    pub confinement: String,
}

async fn wait_exit(mut rx: watch::Receiver<Option<ExitStatus>>) -> Option<ExitStatus> {
    rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
}

/// The `Accept` value that asks for a streamed reply.
pub const STREAM_TYPE: &str = "application/vnd.stoa.exec-stream";
/// Record kinds of a streamed reply.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const END: u8 = 3;
/// Records queued for a slow client before the program is made to wait.
const STREAM_QUEUE: usize = 16;

/// One stream record.
pub fn record(kind: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Where one output stream goes: kept for the JSON reply, or sent on as records.
struct Sink<'a> {
    kept: &'a mut Collected,
    stream: Option<(&'a mpsc::Sender<Bytes>, u8)>,
    /// Bytes passed on so far (kept or sent).
    passed: usize,
}

/// How reading one output ended.
#[derive(PartialEq)]
enum Drained {
    /// End of file.
    Closed,
    /// The program had exited and something left behind kept the output open (or kept
    /// writing past the limit).
    HeldOpen,
}

/// Resolves `drain` after the program exited (never before).
async fn after_exit(mut exit: watch::Receiver<Option<ExitStatus>>, drain: Duration) {
    if exit.wait_for(|s| s.is_some()).await.is_err() {
        return std::future::pending().await;
    }
    tokio::time::sleep(drain).await
}

async fn collect_into(
    reader: Option<FdReader>,
    limit: usize,
    mut sink: Sink<'_>,
    exit: watch::Receiver<Option<ExitStatus>>,
    drain: Duration,
) -> Drained {
    let Some(reader) = reader else {
        return Drained::Closed;
    };
    // Small: most runs print little, and a pipe is read again at once when it has more.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Reading is cancel-safe: a read that loses the race has taken nothing.
        let n = tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(n) => n,
                Err(_) => return Drained::Closed,
            },
            _ = after_exit(exit.clone(), drain) => return Drained::HeldOpen,
        };
        if n == 0 {
            return Drained::Closed;
        }
        let keep = n.min(limit.saturating_sub(sink.passed));
        sink.passed += keep;
        sink.kept.dropped += (n - keep) as u64;
        match sink.stream {
            Some((tx, kind)) if keep > 0 => {
                // A client gone: the run is being dropped by the handler; stop reading.
                if tx.send(record(kind, &buf[..keep])).await.is_err() {
                    return Drained::Closed;
                }
            }
            Some(_) => {}
            None => sink.kept.bytes.extend_from_slice(&buf[..keep]),
        }
        if keep < n && exit.borrow().is_some() {
            return Drained::HeldOpen;
        }
    }
}

/// `POST /exec` (any principal: the broker decides which Unix users its credential may act
/// as).
pub async fn handler(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Result<axum::Json<ExecRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    let (_principal, credential) = super::worker::authenticate(&state, &headers).await?;
    state.accepting_work()?;
    let axum::Json(req) =
        body.map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, e.body_text()))?;
    let streamed = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.split(';').next().map(str::trim) == Some(STREAM_TYPE));
    let started = start(&state, credential, req).await?;
    if !streamed {
        let result = finish(state, started, None).await;
        return Ok(axum::response::IntoResponse::into_response(axum::Json(
            result,
        )));
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    super::broker_link::spawn_traced(async move {
        let run = finish(state, started, Some(&tx));
        // The client gone (the body dropped): dropping the run kills what it started.
        let result = tokio::select! {
            result = run => result,
            _ = tx.closed() => return,
        };
        let end = serde_json::to_vec(&result).unwrap_or_default();
        let _ = tx.send(record(END, &end)).await;
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|r| r.map(Ok::<_, std::convert::Infallible>))
    });
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, STREAM_TYPE)
        .header(axum::http::header::CACHE_CONTROL, "no-store")
        .body(axum::body::Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A started run: its handle and the fds to read and write.
pub struct Started {
    info: crate::wire::HandleInfo,
    guard: super::HandleGuard,
    exit_rx: watch::Receiver<Option<ExitStatus>>,
    control: FdReader,
    stdout: FdReader,
    stderr: Option<FdReader>,
    timeout_ms: Option<u64>,
}

/// Runs the request to its end and returns the JSON reply.
pub async fn run(
    state: Arc<AppState>,
    credential: String,
    req: ExecRequest,
) -> Result<ExecResponse, ApiError> {
    let started = start(&state, credential, req).await?;
    Ok(finish(state, started, None).await)
}

/// Checks the request and spawns its program.
async fn start(
    state: &Arc<AppState>,
    credential: String,
    req: ExecRequest,
) -> Result<Started, ApiError> {
    let stdin_data: Option<Vec<u8>> = match (req.stdin, req.stdin_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "give stdin or stdin_base64, not both",
            ))
        }
        (Some(text), None) => Some(text.into_bytes()),
        (None, Some(b64)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    ApiError::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        format!("stdin_base64 is not base64: {e}"),
                    )
                })?,
        ),
        (None, None) => None,
    };
    let has_stdin = stdin_data.is_some();
    let spawn = SpawnRequest {
        cwd_id: None,
        credential,
        unix_user: req.unix_user.clone(),
        program: Program::Exec {
            argv: req.argv.clone(),
        },
        cwd: req.cwd.clone(),
        env: req.env.clone().into_iter().collect(),
        tty: req.tty,
        stdin: has_stdin && req.tty.is_none(),
        keep_stdin: false,
        secrets: false,
        secret_names: None,
        // A tty comes with an output ring; this run reads the master itself and leaves the
        // ring unused, so it asks for the smallest.
        ring_bytes: if req.tty.is_some() {
            crate::wire::limits::MIN_RING_BYTES
        } else {
            0
        },
        purpose: Purpose::Exec,
    };
    // Dropped before the end (the client went away, an error): the guard kills and
    // releases what was spawned.
    let super::Spawned { info, fds, guard } = state.spawn("exec", spawn).await?;
    let exit_rx = state
        .processes
        .exit_watch(info.handle)
        .ok_or_else(|| ApiError::internal("spawned handle is not tracked"))?;

    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or_else(|| ApiError::internal("broker sent too few fds"))
    };
    let control = next()?;
    let (stdin_fd, stdout_fd, stderr_fd): (Option<OwnedFd>, OwnedFd, Option<OwnedFd>) =
        match info.fds {
            FdLayout::Pty => {
                let master = next()?;
                let writer = if has_stdin {
                    Some(
                        master
                            .try_clone()
                            .map_err(|e| ApiError::internal(e.to_string()))?,
                    )
                } else {
                    None
                };
                (writer, master, None)
            }
            FdLayout::Pipes { stdin } => {
                let stdin_fd = if stdin { Some(next()?) } else { None };
                (stdin_fd, next()?, Some(next()?))
            }
        };
    let reader = |fd: OwnedFd| FdReader::new(fd).map_err(|e| ApiError::internal(e.to_string()));
    let control = reader(control)?;
    let stdout = reader(stdout_fd)?;
    let stderr = stderr_fd.map(reader).transpose()?;
    if let (Some(fd), Some(data)) = (stdin_fd, stdin_data) {
        // A program that exits without reading its input is not an error.
        super::broker_link::spawn_traced(async move {
            let _ = fdio::write_all_and_close(fd, &data).await;
        });
    }
    Ok(Started {
        info,
        guard,
        exit_rx,
        control,
        stdout,
        stderr,
        timeout_ms: req.timeout_ms,
    })
}

/// Reads the run's output to its end (kept, or sent on `stream`) and says how it ended.
async fn finish(
    state: Arc<AppState>,
    started: Started,
    stream: Option<&mpsc::Sender<Bytes>>,
) -> ExecResponse {
    let Started {
        info,
        mut guard,
        exit_rx,
        control,
        stdout,
        stderr,
        timeout_ms,
    } = started;

    let limit = state.config.exec_output_limit;
    let drain = Duration::from_millis(state.config.exec_drain_timeout_ms);
    let (mut out, mut err, mut ctl) = (
        Collected::default(),
        Collected::default(),
        Collected::default(),
    );
    let mut timed_out = false;
    let status;
    let held_open;
    {
        let sink = |kept, kind| Sink {
            kept,
            stream: stream.map(|tx| (tx, kind)),
            passed: 0,
        };
        let collect = async {
            tokio::join!(
                collect_into(
                    Some(stdout),
                    limit,
                    sink(&mut out, STDOUT),
                    exit_rx.clone(),
                    drain
                ),
                collect_into(
                    stderr,
                    limit,
                    sink(&mut err, STDERR),
                    exit_rx.clone(),
                    drain
                ),
                collect_into(
                    Some(control),
                    64 * 1024,
                    Sink {
                        kept: &mut ctl,
                        stream: None,
                        passed: 0
                    },
                    exit_rx.clone(),
                    drain
                ),
            )
        };
        tokio::pin!(collect);
        let exited = wait_exit(exit_rx.clone());
        tokio::pin!(exited);
        let timer = tokio::time::sleep(Duration::from_millis(timeout_ms.unwrap_or(u64::MAX / 4)));
        tokio::pin!(timer);
        let mut collected = None;
        status = loop {
            tokio::select! {
                status = &mut exited => break status,
                done = &mut collect, if collected.is_none() => collected = Some(done),
                _ = &mut timer, if !timed_out && timeout_ms.is_some() => {
                    timed_out = true;
                    let _ = state.link.request(RequestBody::Kill { handle: info.handle, signal: Signal::Kill }).await;
                }
            }
        };
        // After the exit each read waits at most the drain timeout for more output.
        let (a, b, _) = match collected {
            Some(done) => done,
            None => collect.await,
        };
        held_open = a == Drained::HeldOpen || b == Drained::HeldOpen;
    }
    if held_open {
        let _ = state
            .link
            .request(RequestBody::Kill {
                handle: info.handle,
                signal: Signal::Kill,
            })
            .await;
    }
    let limit_hit = state.processes.limit_hit(info.handle);
    guard.set(super::OnDrop::Release);
    drop(guard);

    let error = if ctl.bytes.len() > codec::HEADER_LEN {
        match codec::decode::<Report>(&ctl.bytes[codec::HEADER_LEN..]) {
            Ok(Report::ExecFailed { program, error }) => {
                Some(format!("cannot run {program}: {error}"))
            }
            Err(e) => Some(format!("unreadable report from the executor: {e}")),
        }
    } else {
        None
    };
    ExecResponse {
        handle: info.handle.0,
        pid: info.pid,
        unix_user: info.unix_user,
        exit_code: match status {
            Some(ExitStatus::Code(c)) => Some(c),
            _ => None,
        },
        signal: match status {
            Some(ExitStatus::Signal(s)) => Some(s),
            _ => None,
        },
        truncated: held_open || out.dropped > 0 || err.dropped > 0,
        stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
        stderr: String::from_utf8_lossy(&err.bytes).into_owned(),
        timed_out,
        error,
        limit_hit: limit_hit.map(|l| l.to_string()),
        confinement: info.confinement.to_string(),
    }
}
