//! `POST /exec`: run a command as a user to completion and return its output.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use stoa_executor::codec;
use stoa_executor::job::Report;

use super::fdio::{self, Collected, FdReader};
use super::http::ApiError;
use super::AppState;
use crate::wire::{ExitStatus, FdLayout, Program, RequestBody, Signal, SpawnRequest, WindowSize};

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
}

async fn wait_exit(mut rx: watch::Receiver<Option<ExitStatus>>) -> Option<ExitStatus> {
    rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
}

async fn collect_into(reader: Option<FdReader>, limit: usize, out: &mut Collected) {
    let Some(reader) = reader else { return };
    // Small: most runs print little, and a pipe is read again at once when it has more.
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let keep = n.min(limit.saturating_sub(out.bytes.len()));
        out.bytes.extend_from_slice(&buf[..keep]);
        out.dropped += (n - keep) as u64;
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
    let result = run(state, credential, req).await?;
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        result,
    )))
}

pub async fn run(
    state: Arc<AppState>,
    credential: String,
    req: ExecRequest,
) -> Result<ExecResponse, ApiError> {
    let has_stdin = req.stdin.is_some();
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
        secrets: false,
        secret_names: None,
        // A tty comes with an output ring; this run reads the master itself and leaves the
        // ring unused, so it asks for the smallest.
        ring_bytes: if req.tty.is_some() {
            crate::wire::limits::MIN_RING_BYTES
        } else {
            0
        },
    };
    // Dropped before the end (the client went away, an error): the guard kills and
    // releases what was spawned.
    let super::Spawned {
        info,
        fds,
        mut guard,
    } = state.spawn("exec", spawn).await?;
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
    if let (Some(fd), Some(data)) = (stdin_fd, req.stdin) {
        // A program that exits without reading its input is not an error.
        super::broker_link::spawn_traced(async move {
            let _ = fdio::write_all_and_close(fd, data.as_bytes()).await;
        });
    }

    let limit = state.config.exec_output_limit;
    let (mut out, mut err, mut ctl) = (
        Collected::default(),
        Collected::default(),
        Collected::default(),
    );
    let mut timed_out = false;
    let mut truncated = false;
    let status = {
        let collect = async {
            tokio::join!(
                collect_into(Some(stdout), limit, &mut out),
                collect_into(stderr, limit, &mut err),
                collect_into(Some(control), 64 * 1024, &mut ctl),
            )
        };
        tokio::pin!(collect);
        let exited = wait_exit(exit_rx);
        tokio::pin!(exited);
        let timer = tokio::time::sleep(Duration::from_millis(
            req.timeout_ms.unwrap_or(u64::MAX / 4),
        ));
        tokio::pin!(timer);
        let mut collected = false;
        let status = loop {
            tokio::select! {
                status = &mut exited => break status,
                _ = &mut collect, if !collected => collected = true,
                _ = &mut timer, if !timed_out && req.timeout_ms.is_some() => {
                    timed_out = true;
                    let _ = state.link.request(RequestBody::Kill { handle: info.handle, signal: Signal::Kill }).await;
                }
            }
        };
        if !collected {
            // Output may still be in flight, or held open by processes left behind.
            let drain = Duration::from_millis(state.config.exec_drain_timeout_ms);
            if tokio::time::timeout(drain, &mut collect).await.is_err() {
                truncated = true;
                let _ = state
                    .link
                    .request(RequestBody::Kill {
                        handle: info.handle,
                        signal: Signal::Kill,
                    })
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut collect).await;
            }
        }
        status
    };
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
    Ok(ExecResponse {
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
        truncated: truncated || out.dropped > 0 || err.dropped > 0,
        stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
        stderr: String::from_utf8_lossy(&err.bytes).into_owned(),
        timed_out,
        error,
        limit_hit: limit_hit.map(|l| l.to_string()),
    })
}
