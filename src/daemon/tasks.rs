//! Running a prompt: the session's agent, through the broker and `stoa-executor` as the
//! session's Unix user (or, on the direct path, by the session's worker itself), its
//! streaming JSON parsed into messages and stored as they come, its end recorded as the
//! task's state.
//!
//! Every way a run ends is a final state: `completed`; `stopped` (asked to); `failed` with
//! a reason a person can read (timeout, binary missing, crash, non-JSON output, non-zero
//! exit, the agent's own error). Before the state is recorded the run's process group is
//! killed, so nothing it started outlives it.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{info, warn};

use stoa_executor::agents::{Adapter, AgentEvent, Invocation, PermissionAsk, RunSpec, Tool};
use stoa_executor::codec;
use stoa_executor::job::Report;

use super::conversation::{Asks, Input, RunRefs, Sink};
use super::fdio::{FdReader, FdWriter};
use super::store::{Outcome, Session, Task};
use super::{AppState, Notice};
use crate::wire::{
    ExitStatus, FdLayout, Handle, HandleInfo, Program, Purpose, RequestBody, Signal, SpawnRequest,
};

/// The most of a line (one JSON event) the daemon holds while it waits for its end.
const MAX_LINE_BYTES: usize = 16 << 20;
/// How much of the agent's stderr is kept for the failure message.
const STDERR_TAIL_BYTES: usize = 16 * 1024;

/// One output stream of a run: an fd from the broker, or a direct child's pipe.
enum Output {
    Fd(FdReader),
    Pipe(Box<dyn tokio::io::AsyncRead + Unpin + Send>),
}

impl Output {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Output::Fd(r) => r.read(buf).await,
            Output::Pipe(p) => p.read(buf).await,
        }
    }
}

/// How the run's process is watched and signalled.
enum Process {
    Broker {
        handle: Handle,
        exit: watch::Receiver<Option<ExitStatus>>,
    },
    Direct {
        child: tokio::process::Child,
        pgid: i32,
    },
}

struct Run {
    stdout: Output,
    stderr: Option<Output>,
    /// The agent's stdin, for a conversation.
    input: Option<Input>,
    /// The executor's report channel (broker path).
    control: Option<FdReader>,
    process: Process,
}

impl Process {
    async fn signal(&self, state: &AppState, signal: Signal) {
        match self {
            Process::Broker { handle, .. } => {
                let _ = state
                    .link
                    .request(RequestBody::Kill {
                        handle: *handle,
                        signal,
                    })
                    .await;
            }
            Process::Direct { pgid, .. } => {
                let sig = nix::sys::signal::Signal::try_from(signal.number())
                    .unwrap_or(nix::sys::signal::SIGKILL);
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*pgid), sig);
            }
        }
    }

    async fn wait(&mut self) -> Option<ExitStatus> {
        match self {
            Process::Broker { exit, .. } => {
                exit.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
            }
            Process::Direct { child, .. } => {
                use std::os::unix::process::ExitStatusExt;
                let status = child.wait().await.ok()?;
                Some(match status.signal() {
                    Some(sig) => ExitStatus::Signal(sig),
                    None => ExitStatus::Code(status.code().unwrap_or(-1)),
                })
            }
        }
    }
}

/// Why the run was ended from outside.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StopReason {
    Requested,
    Timeout,
}

/// Splits a byte stream into lines.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        if self.buf.len() > MAX_LINE_BYTES {
            return Err(format!(
                "the agent wrote a line longer than {MAX_LINE_BYTES} bytes"
            ));
        }
        Ok(lines)
    }

    /// Nothing of a line is held back: everything read so far has been handled.
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn rest(&mut self) -> Option<String> {
        (!self.buf.is_empty())
            .then(|| String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned())
    }
}

/// What the parsed stream said.
#[derive(Default)]
struct Seen {
    /// The first line that was not JSON.
    garbage: Option<String>,
    /// The final result: is_error and its text.
    result: Option<(bool, Option<String>)>,
    too_long: Option<String>,
    /// The agent's own last words (its error result, a notice, its last message): a run
    /// that exits non-zero says why in them (OpenCode's "Forbidden", a refused key).
    last_words: Option<String>,
    /// A stored-output limit the run reached (which one, in words): nothing more of it is
    /// stored, and it is ended.
    output_limit: Option<String>,
    /// Permission requests parsed and not yet taken up by the run.
    asks: Vec<PermissionAsk>,
}

/// Starts `task` of `session` in the background. `credential` is the prompting caller's,
/// which the broker checks against the session's Unix user.
pub fn start(state: Arc<AppState>, session: Session, task: Task, credential: String) {
    super::broker_link::spawn_traced(async move {
        let task_id = task.task_id.clone();
        let outcome = run(&state, &session, &task, &credential).await;
        finish(&state, &session, &task_id, outcome).await;
    });
}

/// The parts of an outcome before it is stored.
struct Ending {
    status: &'static str,
    error: Option<String>,
    exit: Option<ExitStatus>,
}

impl Ending {
    fn failed(error: impl Into<String>) -> Ending {
        Ending {
            status: "failed",
            error: Some(error.into()),
            exit: None,
        }
    }
}

async fn finish(state: &AppState, session: &Session, task_id: &str, ending: Ending) {
    // However it ended (a run that could not even be taken over too), nothing it asked
    // can be answered any more.
    super::approvals::abandon_task(state, task_id).await;
    let (exit_code, signal) = match ending.exit {
        Some(ExitStatus::Code(c)) => (Some(c), None),
        Some(ExitStatus::Signal(s)) => (None, Some(s)),
        None => (None, None),
    };
    info!(task = %task_id, status = ending.status, error = ?ending.error, "task finished");
    let outcome = Outcome {
        status: ending.status,
        error: ending.error,
        exit_code,
        signal,
    };
    if let Err(e) = state
        .store
        .finish_task(task_id, &session.session_id, outcome)
        .await
    {
        warn!(task = %task_id, "cannot record the end of the task: {e}");
    }
    state.running.lock().expect("running lock").remove(task_id);
    state.notify_task(task_id).await;
}

fn adapter_for(session: &Session) -> Result<Box<dyn Adapter>, String> {
    Tool::from_name(&session.agentic_tool)
        .map(|t| t.adapter())
        .ok_or_else(|| format!("unknown agentic tool {:?}", session.agentic_tool))
}

async fn run(state: &Arc<AppState>, session: &Session, task: &Task, credential: &str) -> Ending {
    let mut adapter = match adapter_for(session) {
        Ok(a) => a,
        Err(e) => return Ending::failed(e),
    };
    let agent_config = state
        .config
        .agents
        .get(&session.agentic_tool)
        .cloned()
        .unwrap_or_default();
    let spec = RunSpec {
        prompt: task.prompt.clone(),
        model: session.model.clone().or(agent_config.model.clone()),
        permission_mode: session.permission_mode.clone(),
        resume: session.agent_session_id.clone(),
        command: agent_config.command.clone(),
        base_url: agent_config.base_url.clone(),
        cwd: Some(session.worktree.clone()),
    };
    let invocation = adapter.invocation(&spec);
    let mut env: Vec<(String, String)> = agent_config.env.into_iter().collect();
    env.extend(invocation.env.clone());

    let (run, via, handle, confinement) = if state.use_executor() {
        match spawn_through_broker(
            state,
            session,
            &invocation,
            env,
            agent_config.secrets.clone(),
            credential,
        )
        .await
        {
            Ok((run, handle, confinement)) => (run, "executor", Some(handle), confinement),
            Err(e) => return Ending::failed(e),
        }
    } else {
        // The direct path: this worker starts the agent itself, as its own user (the
        // session's), with the secrets the broker hands it for that (only on this path).
        let mut env = env;
        if state.link.welcome().isolation {
            match direct_secrets(state, session, credential, agent_config.secrets.clone()).await {
                Ok(secrets) => env.extend(secrets),
                Err(e) => return Ending::failed(e),
            }
        }
        match spawn_direct(session, &invocation, env) {
            Ok(run) => (run, "direct", None, DIRECT_CONFINEMENT.to_string()),
            Err(e) => return Ending::failed(e),
        }
    };
    if let Err(e) = state
        .store
        .task_started(&task.task_id, via, handle.map(|h| h.0), &confinement)
        .await
    {
        warn!("cannot record the task's start: {e}");
    }
    state.notify_task(&task.task_id).await;
    drive(
        state,
        session,
        task,
        run,
        adapter.as_mut(),
        state.config.execution.timeout_secs,
    )
    .await
}

/// The secrets of a direct run, from the broker.
async fn direct_secrets(
    state: &AppState,
    session: &Session,
    credential: &str,
    names: Option<Vec<String>>,
) -> Result<Vec<(String, String)>, String> {
    let request = RequestBody::RunSecrets {
        credential: credential.to_string(),
        unix_user: session.unix_user.clone(),
        names,
    };
    match state.link.request(request).await {
        Ok(reply) => match reply.body {
            crate::wire::ReplyBody::Secrets(s) => Ok(s),
            crate::wire::ReplyBody::Error(e) => {
                Err(format!("cannot have the run's secrets: {}", e.message))
            }
            other => Err(format!("unexpected broker reply {other:?}")),
        },
        Err(e) => Err(format!("cannot have the run's secrets: {e}")),
    }
}

async fn spawn_through_broker(
    state: &Arc<AppState>,
    session: &Session,
    invocation: &Invocation,
    env: Vec<(String, String)>,
    secret_names: Option<Vec<String>>,
    credential: &str,
) -> Result<(Run, Handle, String), String> {
    let stdin = invocation.stdin.clone();
    let request = SpawnRequest {
        // The broker refuses to run anywhere but the directory pinned at creation.
        cwd_id: session.worktree_id,
        credential: credential.to_string(),
        unix_user: session.unix_user.clone(),
        program: Program::Exec {
            argv: invocation.argv.clone(),
        },
        cwd: Some(session.worktree.clone()),
        env,
        tty: None,
        stdin: stdin.is_some(),
        // A conversation's stdin outlives a worker restart: the agent may be waiting on it.
        keep_stdin: stdin.is_some() && invocation.conversation,
        secrets: true,
        secret_names,
        ring_bytes: 0,
        purpose: Purpose::Agent,
    };
    let super::Spawned {
        info,
        fds,
        mut guard,
    } = state
        .spawn("agent", request)
        .await
        .map_err(|e| e.to_string())?;
    // If the run cannot be set up, the guard kills and releases what was spawned; once it
    // is, `drive` ends it and releases it.
    let run = run_from_fds(state, &info, fds, stdin, invocation.conversation)?;
    guard.set(super::OnDrop::Nothing);
    Ok((run, info.handle, info.confinement.to_string()))
}

/// A task's confinement on the direct path (no broker, no Landlock).
const DIRECT_CONFINEMENT: &str = "none (run directly by the worker, not through the broker)";

/// A run from a handle's fds (fresh from a spawn, or adopted after a restart: then there
/// is a stdin only for a conversation, and nothing to write first).
fn run_from_fds(
    state: &AppState,
    info: &HandleInfo,
    fds: Vec<OwnedFd>,
    stdin: Option<String>,
    conversation: bool,
) -> Result<Run, String> {
    let exit = state
        .processes
        .exit_watch(info.handle)
        .ok_or("the handle is not tracked")?;
    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or_else(|| "the broker sent too few fds".to_string())
    };
    let reader = |fd: OwnedFd| FdReader::new(fd).map_err(|e| e.to_string());
    let control = reader(next()?)?;
    let FdLayout::Pipes { stdin: has_stdin } = info.fds else {
        return Err("an agent run needs pipes, not a terminal".into());
    };
    let stdin_fd = if has_stdin { Some(next()?) } else { None };
    let stdout = reader(next()?)?;
    let stderr = reader(next()?)?;
    let mut input = None;
    match (stdin_fd, stdin) {
        (Some(fd), first) if conversation => {
            let writer = FdWriter::new(fd).map_err(|e| e.to_string())?;
            input = Some(Input::start(Sink::Fd(writer), Some(info.handle), first));
        }
        (Some(fd), Some(prompt)) => {
            super::broker_link::spawn_traced(async move {
                let _ = super::fdio::write_all_and_close(fd, prompt.as_bytes()).await;
            });
        }
        _ => {}
    }
    Ok(Run {
        stdout: Output::Fd(stdout),
        stderr: Some(Output::Fd(stderr)),
        input,
        control: Some(control),
        process: Process::Broker {
            handle: info.handle,
            exit,
        },
    })
}

/// The direct (legacy) path: the worker runs the agent itself, as its own user, which is the
/// session's Unix user (no executor).
fn spawn_direct(
    session: &Session,
    invocation: &Invocation,
    env: Vec<(String, String)>,
) -> Result<Run, String> {
    use std::process::Stdio;
    let argv = &invocation.argv;
    let stdin = invocation.stdin.clone();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten();
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(&session.worktree)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .envs(env)
        .process_group(0)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(me) = &me {
        command
            .env("HOME", &me.dir)
            .env("USER", &me.name)
            .env("LOGNAME", &me.name)
            .env("SHELL", &me.shell);
    }
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("agent binary '{}' not found", argv[0]),
        _ => format!("cannot start the agent '{}': {e}", argv[0]),
    })?;
    let pgid = child
        .id()
        .map(|p| p as i32)
        .ok_or("the agent exited at once")?;
    let mut input = None;
    match (child.stdin.take(), stdin) {
        (Some(pipe), first) if invocation.conversation => {
            input = Some(Input::start(Sink::Pipe(pipe), None, first));
        }
        (Some(mut pipe), Some(prompt)) => {
            super::broker_link::spawn_traced(async move {
                use tokio::io::AsyncWriteExt;
                let _ = pipe.write_all(prompt.as_bytes()).await;
            });
        }
        _ => {}
    }
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    Ok(Run {
        stdout: Output::Pipe(Box::new(stdout)),
        stderr: Some(Output::Pipe(Box::new(stderr))),
        input,
        control: None,
        process: Process::Direct { child, pgid },
    })
}

/// Reads the run to its end, storing messages as they come; then decides the outcome.
/// A planned stop of this worker (SIGTERM: a restart, an upgrade of stoa): each run stops
/// reading its agent's output at a line boundary, with everything it read stored, so the
/// next worker reads on from exactly there. A run holding part of a line reads on until
/// the line is whole.
pub struct Pause {
    on: watch::Sender<bool>,
    /// Runs that stopped so (they wait for the worker to exit).
    held: std::sync::atomic::AtomicUsize,
}

impl Default for Pause {
    fn default() -> Pause {
        Pause {
            on: watch::channel(false).0,
            held: Default::default(),
        }
    }
}

impl Pause {
    pub fn begin(&self) {
        self.on.send_replace(true);
    }

    /// How many runs have stopped at a line boundary.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn drive(
    state: &Arc<AppState>,
    session: &Session,
    task: &Task,
    run: Run,
    adapter: &mut dyn Adapter,
    timeout_secs: u64,
) -> Ending {
    let Run {
        mut stdout,
        mut stderr,
        mut input,
        control,
        mut process,
    } = run;
    let (stop_tx, mut stop_rx) = watch::channel(None::<StopReason>);
    state
        .running
        .lock()
        .expect("running lock")
        .insert(task.task_id.clone(), stop_tx.clone());
    let mut asks = Asks::new(state, task, Duration::from_secs(timeout_secs));
    // A run taken over after its final result: the agent only waits for end-of-file.
    if input.is_some()
        && state
            .store
            .task_has_result(&task.task_id)
            .await
            .unwrap_or(false)
    {
        if let Some(input) = input.take() {
            input.close(state).await;
        }
    }

    let mut seen = Seen::default();
    let mut lines = Lines::default();
    let mut stderr_tail: VecDeque<u8> = VecDeque::new();
    let mut control_bytes = Vec::new();
    let (mut out_open, mut err_open, mut ctl_open) = (true, stderr.is_some(), control.is_some());
    let mut stop: Option<StopReason> = None;
    let mut exit: Option<Option<ExitStatus>> = None;
    let mut killed_at: Option<tokio::time::Instant> = None;
    let grace = Duration::from_secs(state.config.execution.stop_grace_secs);
    let drain = Duration::from_millis(state.config.exec_drain_timeout_ms);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let (mut out_buf, mut err_buf, mut ctl_buf) =
        (vec![0u8; 64 * 1024], vec![0u8; 16 * 1024], vec![0u8; 4096]);

    let mut pause = state.pause.on.subscribe();
    loop {
        if exit.is_some() && !out_open && !err_open && !ctl_open {
            break;
        }
        if *pause.borrow() && lines.is_empty() {
            // Everything read is stored; the next worker reads the rest.
            state
                .pause
                .held
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            info!(task = %task.task_id, "run paused at a line boundary for the next worker");
            std::future::pending::<()>().await;
        }
        let kill_deadline = killed_at.map(|t| t + grace);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            n = stdout.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => {
                    out_open = false;
                    if let Some(rest) = lines.rest() {
                        handle_lines(state, session, task, adapter, vec![rest], &mut seen).await;
                    }
                }
                Ok(n) => match lines.push(&out_buf[..n]) {
                    Ok(complete) => handle_lines(state, session, task, adapter, complete, &mut seen).await,
                    Err(e) => seen.too_long = Some(e),
                },
            },
            n = async { stderr.as_mut().expect("stderr").read(&mut err_buf).await }, if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    stderr_tail.extend(&err_buf[..n]);
                    while stderr_tail.len() > STDERR_TAIL_BYTES {
                        stderr_tail.pop_front();
                    }
                }
            },
            n = async { control.as_ref().expect("control").read(&mut ctl_buf).await }, if ctl_open => match n {
                Ok(0) | Err(_) => ctl_open = false,
                Ok(n) => control_bytes.extend_from_slice(&ctl_buf[..n]),
            },
            status = process.wait(), if exit.is_none() => {
                exit = Some(status);
                drain_until = Some(tokio::time::Instant::now() + drain);
            }
            _ = pause.changed(), if !*pause.borrow() => {}
            changed = stop_rx.changed(), if stop.is_none() => {
                let requested = *stop_rx.borrow();
                if changed.is_ok() {
                    if let Some(reason) = requested {
                        stop = Some(reason);
                        process.signal(state, Signal::Term).await;
                        killed_at = Some(tokio::time::Instant::now());
                    }
                }
            }
            _ = tokio::time::sleep_until(asks.timeout_at), if stop.is_none() && exit.is_none() && !asks.waiting() => {
                stop = Some(StopReason::Timeout);
                process.signal(state, Signal::Term).await;
                killed_at = Some(tokio::time::Instant::now());
            }
            _ = asks.wake.notified() => {
                let run = RunRefs { state, session, task, adapter: &*adapter, input: input.as_ref() };
                asks.on_wake(&run).await;
            }
            _ = tokio::time::sleep_until(asks.next_expiry.unwrap_or(far)), if asks.next_expiry.is_some() => {
                let run = RunRefs { state, session, task, adapter: &*adapter, input: input.as_ref() };
                asks.on_expiry(&run).await;
            }
            _ = tokio::time::sleep_until(kill_deadline.unwrap_or(far)), if kill_deadline.is_some() && exit.is_none() => {
                process.signal(state, Signal::Kill).await;
                killed_at = None;
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => {
                // Processes it left behind hold the output open: end them.
                process.signal(state, Signal::Kill).await;
                drain_until = None;
                out_open = false;
                err_open = false;
                ctl_open = false;
            }
        }
        for ask in std::mem::take(&mut seen.asks) {
            let run = RunRefs {
                state,
                session,
                task,
                adapter: &*adapter,
                input: input.as_ref(),
            };
            asks.on_ask(&run, ask).await;
        }
        if let Some(input) = &input {
            for line in adapter.take_input() {
                input.send(line);
            }
        }
        // After its final result the agent has nothing more to be told.
        if seen.result.is_some() {
            if let Some(input) = input.take() {
                input.close(state).await;
            }
        }
        // Output that cannot be parsed, or that may not be stored, means the run is broken:
        // end it (TERM, then KILL of its process group after the grace).
        let broken =
            seen.garbage.is_some() || seen.too_long.is_some() || seen.output_limit.is_some();
        if broken && stop.is_none() && exit.is_none() && killed_at.is_none() {
            process.signal(state, Signal::Term).await;
            killed_at = Some(tokio::time::Instant::now());
        }
    }
    // Nothing the run started may outlive it.
    process.signal(state, Signal::Kill).await;
    drop(input);
    asks.abandon(state, task);
    let mut limit_hit = None;
    if let Process::Broker { handle, .. } = &process {
        limit_hit = state.processes.limit_hit(*handle);
        state.end_handle(*handle, false).await;
    }

    let exit = exit.flatten();
    let stderr_text = String::from_utf8_lossy(&stderr_tail.into_iter().collect::<Vec<u8>>())
        .trim()
        .to_string();
    let with_stderr = |msg: String| {
        if stderr_text.is_empty() {
            msg
        } else {
            format!("{msg}: {}", last_lines(&stderr_text, 5))
        }
    };
    let ending = |status, error: Option<String>| Ending {
        status,
        error,
        exit,
    };
    if let Some(report) = exec_report(&control_bytes) {
        return ending("failed", Some(report));
    }
    // The cgroup's verdict explains a SIGKILL or a failed fork better than the exit does.
    if let Some(limit) = limit_hit {
        return ending("failed", Some(with_stderr(limit.to_string())));
    }
    if let Some(e) = seen.output_limit {
        return ending("failed", Some(e));
    }
    if state.processes.shutting_down() && matches!(exit, Some(ExitStatus::Signal(_))) {
        return ending(
            "stopped",
            Some("stoa was shut down before the task finished".into()),
        );
    }
    match stop {
        Some(StopReason::Requested) => return ending("stopped", None),
        Some(StopReason::Timeout) => return ending("failed", Some("timeout".into())),
        None => {}
    }
    if let Some(e) = seen.too_long {
        return ending("failed", Some(e));
    }
    if let Some(line) = seen.garbage {
        return ending(
            "failed",
            Some(format!(
                "the agent wrote output that is not JSON: {}",
                snippet(&line)
            )),
        );
    }
    match exit {
        Some(ExitStatus::Signal(sig)) => ending(
            "failed",
            Some(with_stderr(format!("the agent crashed (signal {sig})"))),
        ),
        Some(ExitStatus::Code(c)) if c != 0 => {
            let said = seen
                .last_words
                .as_deref()
                .map(|w| format!(": {}", snippet(w)))
                .unwrap_or_default();
            ending(
                "failed",
                Some(with_stderr(format!("the agent exited with code {c}{said}"))),
            )
        }
        None => ending("failed", Some("the agent's exit status was lost".into())),
        Some(ExitStatus::Code(_)) => match seen.result {
            Some((false, _)) => ending("completed", None),
            Some((true, text)) => ending(
                "failed",
                Some(format!(
                    "the agent reported an error: {}",
                    text.unwrap_or_else(|| "no message".into())
                )),
            ),
            None => ending(
                "failed",
                Some(with_stderr(
                    "the agent exited without a final result".into(),
                )),
            ),
        },
    }
}

fn exec_report(control: &[u8]) -> Option<String> {
    if control.len() <= codec::HEADER_LEN {
        return None;
    }
    match codec::decode::<Report>(&control[codec::HEADER_LEN..]) {
        Ok(Report::ExecFailed { program, error }) if error.contains("No such file") => Some(
            format!("agent binary '{program}' not found in the PATH of the session's user"),
        ),
        Ok(Report::ExecFailed { program, error }) => {
            Some(format!("cannot run the agent '{program}': {error}"))
        }
        Err(e) => Some(format!("unreadable report from the executor: {e}")),
    }
}

fn snippet(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

async fn handle_lines(
    state: &AppState,
    session: &Session,
    task: &Task,
    adapter: &mut dyn Adapter,
    lines: Vec<String>,
    seen: &mut Seen,
) {
    if seen.output_limit.is_some() {
        return; // the run is being ended; nothing more of it is stored
    }
    let mut events = Vec::new();
    for line in lines {
        match adapter.parse_line(&line) {
            Ok(parsed) => events.extend(parsed),
            Err(not_json) => {
                if seen.garbage.is_none() {
                    seen.garbage = Some(not_json.line);
                }
            }
        }
    }
    if events.is_empty() {
        return;
    }
    for event in &events {
        match event {
            AgentEvent::SessionStarted {
                agent_session_id, ..
            } => {
                if let Err(e) = state
                    .store
                    .set_agent_session_id(&session.session_id, agent_session_id)
                    .await
                {
                    warn!("cannot store the agent's session id: {e}");
                }
            }
            AgentEvent::Result { is_error, text, .. } => {
                seen.result = Some((*is_error, text.clone()));
                if let (true, Some(t)) = (*is_error, text) {
                    seen.last_words = Some(t.clone());
                }
            }
            AgentEvent::Notice { message } => seen.last_words = Some(message.clone()),
            AgentEvent::PermissionRequest(ask) => seen.asks.push(ask.clone()),
            AgentEvent::AssistantText { text, delta: false } if seen.result.is_none() => {
                seen.last_words = Some(text.clone())
            }
            _ => {}
        }
    }
    let values: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or(serde_json::Value::Null))
        .collect();
    match state
        .store
        .append_messages(
            &session.session_id,
            &task.task_id,
            &session.unix_user,
            values,
            state.config.execution.output_limits(),
        )
        .await
    {
        Ok(appended) => {
            if let Some(limit) = appended.refused {
                warn!(task = %task.task_id, "{limit}");
                seen.output_limit = Some(limit);
            }
            let _ = state.notices.send(Notice::Messages {
                session_id: session.session_id.clone(),
                last_seq: appended.last_seq,
            });
        }
        Err(e) => warn!(task = %task.task_id, "cannot store messages: {e}"),
    }
}

/// After a restart: tasks the previous daemon left. A run whose process the broker still
/// holds is taken over and finished; any other is recorded as interrupted. Returns the
/// adopted handles that belong to no task.
pub async fn recover(
    state: &Arc<AppState>,
    mut adopted: Vec<(HandleInfo, Vec<OwnedFd>)>,
) -> Vec<(HandleInfo, Vec<OwnedFd>)> {
    let unfinished = match state.store.unfinished_tasks().await {
        Ok(t) => t,
        Err(e) => {
            warn!("cannot read unfinished tasks: {e}");
            return adopted;
        }
    };
    for task in unfinished {
        let session = match state.store.session(&task.session_id).await {
            Ok(Some(s)) => s,
            _ => continue,
        };
        let position = task
            .handle
            .and_then(|h| adopted.iter().position(|(info, _)| info.handle.0 == h));
        let Some(position) = position else {
            let reason = if task.status == "queued" {
                "interrupted by a daemon restart before it started"
            } else {
                "interrupted by a daemon restart: its process is gone"
            };
            finish(state, &session, &task.task_id, Ending::failed(reason)).await;
            continue;
        };
        let (info, fds) = adopted.swap_remove(position);
        info!(task = %task.task_id, handle = info.handle.0, "taking over a running task");
        let state = state.clone();
        super::broker_link::spawn_traced(async move {
            let ending = match (
                adapter_for(&session),
                run_from_fds(&state, &info, fds, None, true),
            ) {
                (Ok(mut adapter), Ok(run)) => {
                    // What is left of the timeout is not known exactly; give it a full one.
                    drive(
                        &state,
                        &session,
                        &task,
                        run,
                        adapter.as_mut(),
                        state.config.execution.timeout_secs,
                    )
                    .await
                }
                (Err(e), _) | (_, Err(e)) => {
                    // It cannot be followed: end it rather than leave it running unwatched.
                    state.end_handle(info.handle, true).await;
                    Ending::failed(e)
                }
            };
            finish(&state, &session, &task.task_id, ending).await;
        });
    }
    adopted
}
