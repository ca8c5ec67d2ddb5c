//! A run that talks with its agent over stdin (`Invocation::conversation`): the stdin
//! writer, and the state of the run's permission requests, driven by `tasks::drive`.
//!
//! | event (from `drive`)            | what happens                                           |
//! |---------------------------------|--------------------------------------------------------|
//! | the agent asks (`on_ask`)       | denied at once, unstored, if it is larger than [`approvals::MAX_ASK_BYTES`] or past [`approvals::MAX_ASKS_PER_RUN`]; allowed at once if the session allows the tool; denied at once past [`approvals::MAX_PENDING_PER_TASK`] waiting; else a pending approval, the task `waiting` |
//! | an answer was given (`on_wake`) | every settled, undelivered answer of the task goes to the agent, in order, and into the transcript |
//! | a request's time is up (`on_expiry`) | denied as `expired`, and delivered                 |
//! | the run ends (`abandon`)        | nothing wakes it; `tasks::finish` settles what is still pending as `abandoned` |
//!
//! While a request waits, the run's own timeout stands still.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use stoa_executor::agents::{Adapter, Decision, PermissionAsk};

use super::approval_store::{Approval, Verdict};
use super::approvals::{self, unix_secs};
use super::fdio::FdWriter;
use super::store::{Session, Task};
use super::{AppState, Notice};
use crate::wire::{ApprovalStep, Handle, RequestBody};

/// Lines queued for the agent's stdin at most (answers: a handful).
const MAX_QUEUED_LINES: usize = 64;
/// How long an answer may take to be written before it counts as not given (a worker that
/// restarts gives it again).
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// Where a conversation's lines go: a pipe fd from the broker, or a direct child's stdin.
pub enum Sink {
    Fd(FdWriter),
    Pipe(tokio::process::ChildStdin),
}

impl Sink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Fd(w) => w.write_all(data).await,
            Sink::Pipe(p) => tokio::io::AsyncWriteExt::write_all(p, data).await,
        }
    }
}

/// The agent's stdin for the whole run. Lines are written in order by a task of their own,
/// so an agent that does not read holds up nothing else; once this is closed (or dropped)
/// and the queue written, stdin is closed.
pub struct Input {
    /// Each line, and who waits to know it was written.
    lines: mpsc::Sender<(String, Option<oneshot::Sender<()>>)>,
    /// The broker keeps a copy of the pipe for a worker restart: it must let go of it too.
    handle: Option<Handle>,
}

impl Input {
    pub fn start(mut sink: Sink, handle: Option<Handle>, first: Option<String>) -> Input {
        let (lines, mut rx) =
            mpsc::channel::<(String, Option<oneshot::Sender<()>>)>(MAX_QUEUED_LINES);
        if let Some(first) = first {
            let _ = lines.try_send((first, None));
        }
        super::broker_link::spawn_traced(async move {
            while let Some((mut line, written)) = rx.recv().await {
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                if sink.write_all(line.as_bytes()).await.is_err() {
                    break; // the agent is gone
                }
                if let Some(written) = written {
                    let _ = written.send(());
                }
            }
        });
        Input { lines, handle }
    }

    pub fn send(&self, line: String) {
        if self.lines.try_send((line, None)).is_err() {
            warn!("the agent reads none of its input: a line for it was dropped");
        }
    }

    /// Sends `line` and waits (at most [`WRITE_WAIT`]) until it is written: whether it was.
    pub async fn send_written(&self, line: String) -> bool {
        let (done, written) = oneshot::channel();
        if self.lines.try_send((line, Some(done))).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(WRITE_WAIT, written).await, Ok(Ok(())))
    }

    /// No more input: the agent sees end-of-file once what is queued is written.
    pub async fn close(self, state: &AppState) {
        if let Some(handle) = self.handle {
            let _ = state.link.request(RequestBody::CloseStdin { handle }).await;
        }
    }
}

/// What the request handling of a run works with.
pub struct RunRefs<'a> {
    pub state: &'a AppState,
    pub session: &'a Session,
    pub task: &'a Task,
    pub adapter: &'a dyn Adapter,
    pub input: Option<&'a Input>,
}

/// The permission requests of one run.
pub struct Asks {
    /// Since when the run waits for an answer (`None`: it does not).
    waiting_since: Option<Instant>,
    /// The earliest time a pending request expires.
    pub next_expiry: Option<Instant>,
    /// When the run times out, pushed back by the time it spent waiting (see `deadline`).
    timeout_at: Instant,
    /// The most waiting time the run is credited: its own timeout. Past it the run times
    /// out even while it waits, so an agent that keeps asking cannot run for ever.
    max_credit: Duration,
    credited: Duration,
    /// Requests this run made.
    asked: usize,
    /// The task's status has not been written by this run yet (a run taken over must put
    /// right what the last worker left).
    fresh: bool,
    pub wake: Arc<tokio::sync::Notify>,
}

impl Asks {
    /// The run's requests, registered to be woken by answers; anything already pending or
    /// answered (a run taken over after a restart) is picked up by the first `on_wake`.
    pub fn new(state: &AppState, task: &Task, timeout: Duration) -> Asks {
        let wake = Arc::new(tokio::sync::Notify::new());
        state
            .answers
            .lock()
            .expect("answers lock")
            .insert(task.task_id.clone(), wake.clone());
        wake.notify_one();
        Asks {
            waiting_since: None,
            asked: 0,
            fresh: true,
            next_expiry: None,
            timeout_at: Instant::now() + timeout,
            max_credit: timeout,
            credited: Duration::ZERO,
            wake,
        }
    }

    pub fn waiting(&self) -> bool {
        self.waiting_since.is_some()
    }

    /// Nothing waits any more: the time it waited is credited, up to what is left.
    fn stop_waiting(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            let credit = since
                .elapsed()
                .min(self.max_credit.saturating_sub(self.credited));
            self.credited += credit;
            self.timeout_at += credit;
        }
    }

    /// When the run times out: while it waits for an answer its clock stands still, for
    /// at most what is left of its credit.
    pub fn deadline(&self) -> Instant {
        let left = self.max_credit.saturating_sub(self.credited);
        match self.waiting_since {
            None => self.timeout_at,
            Some(_) => self.timeout_at + left,
        }
    }

    /// The agent asks permission.
    pub async fn on_ask(&mut self, run: &RunRefs<'_>, ask: PermissionAsk) {
        let RunRefs {
            state,
            session,
            task,
            ..
        } = *run;
        self.asked += 1;
        let size = serde_json::to_string(&ask).map_or(usize::MAX, |t| t.len());
        let waiting = state
            .store
            .pending_approvals(Some(&task.task_id))
            .await
            .map_or(0, |p| p.len());
        let refusal = if run.input.is_none() {
            Some("stoa: the run has given its final result; nothing can answer now".to_string())
        } else if size > approvals::MAX_ASK_BYTES {
            Some(format!(
                "stoa: the request is too large to show ({size} bytes; at most {})",
                approvals::MAX_ASK_BYTES
            ))
        } else if self.asked > approvals::MAX_ASKS_PER_RUN {
            Some(format!(
                "stoa: this run has asked {} times already",
                approvals::MAX_ASKS_PER_RUN
            ))
        } else if waiting >= approvals::MAX_PENDING_PER_TASK {
            Some(format!(
                "stoa: this run has {} permission requests waiting already",
                approvals::MAX_PENDING_PER_TASK
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            deny_unstored(run, &ask, reason).await;
            return;
        }
        let tool = ask.tool.clone();
        let approval = match approvals::open(state, session, &task.task_id, ask.clone()).await {
            Ok(a) => a,
            Err(e) => {
                warn!(task = %task.task_id, "cannot store a permission request: {e}");
                let reason = "stoa: the request could not be kept, so it is denied".to_string();
                deny_unstored(run, &ask, reason).await;
                return;
            }
        };
        let allowed = state
            .store
            .session_allows(&session.session_id, &tool)
            .await
            .unwrap_or(false);
        if allowed {
            let verdict = Verdict::settled("allowed", "session rule", None);
            approvals::settle(
                state,
                &approval.approval_id,
                verdict,
                ApprovalStep::AllowedBySession,
            )
            .await;
        }
        self.on_wake(run).await;
    }

    /// Delivers every settled, undelivered answer, then looks at what still waits.
    pub async fn on_wake(&mut self, run: &RunRefs<'_>) {
        let answered = run
            .state
            .store
            .undelivered_answers(&run.task.task_id)
            .await
            .unwrap_or_default();
        for approval in answered {
            deliver(run, &approval).await;
        }
        self.refresh(run.state, run.task).await;
    }

    /// Requests whose time is up are denied.
    pub async fn on_expiry(&mut self, run: &RunRefs<'_>) {
        let (state, task) = (run.state, run.task);
        let now = unix_secs(std::time::SystemTime::now());
        let pending = state
            .store
            .pending_approvals(Some(&task.task_id))
            .await
            .unwrap_or_default();
        let secs = state.config.execution.approval_timeout_secs;
        let reason =
            format!("stoa: nobody answered within {secs} s (execution.approval_timeout_secs)");
        for approval in pending.iter().filter(|a| a.expires_at <= now) {
            let verdict = Verdict::settled("expired", "timeout", Some(&reason));
            approvals::settle(state, &approval.approval_id, verdict, ApprovalStep::Expired).await;
        }
        self.on_wake(run).await;
    }

    /// The run ended: nothing wakes it any more.
    /// (What still waits is settled by `tasks::finish`, however the run ended.)
    pub fn abandon(&mut self, state: &AppState, task: &Task) {
        state
            .answers
            .lock()
            .expect("answers lock")
            .remove(&task.task_id);
    }

    /// Whether the task waits, and until when; the run's timeout stands still meanwhile.
    async fn refresh(&mut self, state: &AppState, task: &Task) {
        let pending = state
            .store
            .pending_approvals(Some(&task.task_id))
            .await
            .unwrap_or_default();
        let now_unix = unix_secs(std::time::SystemTime::now());
        self.next_expiry = pending.iter().map(|a| a.expires_at).min().map(|at| {
            Instant::now() + Duration::from_secs(at.saturating_sub(now_unix).max(0) as u64)
        });
        let waiting = !pending.is_empty();
        let fresh = std::mem::take(&mut self.fresh);
        match (waiting, self.waiting_since) {
            (true, None) => self.waiting_since = Some(Instant::now()),
            (false, Some(_)) => self.stop_waiting(),
            _ if fresh => {}
            _ => return,
        }
        if let Ok(true) = state.store.set_task_waiting(&task.task_id, waiting).await {
            state.notify_task(&task.task_id).await;
        }
    }
}

/// Denies a request that is not kept (too large, too many, the store failing): the agent is
/// told at once, and the transcript says so.
async fn deny_unstored(run: &RunRefs<'_>, ask: &PermissionAsk, reason: String) {
    warn!(task = %run.task.task_id, tool = %ask.tool, "{reason}");
    let decision = Decision::Deny {
        message: reason.clone(),
    };
    if let (Some(line), Some(input)) = (run.adapter.answer(ask, &decision), run.input) {
        input.send(line);
    }
    note(
        run,
        json!({
            "kind": "permission_decision",
            "tool": ask.tool.chars().take(128).collect::<String>(),
            "decision": "denied",
            "by": "limit",
            "reason": reason,
        }),
    )
    .await;
}

/// Appends a note of stoa's to the run's transcript.
async fn note(run: &RunRefs<'_>, value: serde_json::Value) {
    let RunRefs {
        state,
        session,
        task,
        ..
    } = *run;
    if let Ok(appended) = state
        .store
        .append_messages(
            &session.session_id,
            &task.task_id,
            &session.unix_user,
            vec![value],
            state.config.execution.output_limits(),
        )
        .await
    {
        let _ = state.notices.send(Notice::Messages {
            session_id: session.session_id.clone(),
            last_seq: appended.last_seq,
        });
    }
}

/// Gives the agent one answer, and writes it into the transcript.
async fn deliver(run: &RunRefs<'_>, approval: &Approval) {
    let RunRefs {
        state,
        task,
        adapter,
        input,
        ..
    } = *run;
    let decision = if approval.status == "allowed" {
        Decision::Allow
    } else {
        Decision::Deny {
            message: approval
                .reason
                .clone()
                .unwrap_or_else(|| format!("stoa: the request was {}", approval.status)),
        }
    };
    match (adapter.answer(&approval.ask, &decision), input) {
        (Some(line), Some(input)) => {
            if !input.send_written(line).await {
                // Not given: it stays undelivered, for this run's next wake or a new worker.
                warn!(task = %task.task_id, approval = %approval.approval_id, "the answer could not be written to the agent yet");
                return;
            }
        }
        _ => warn!(task = %task.task_id, "an answer cannot reach this agent"),
    }
    if let Err(e) = state.store.answer_delivered(&approval.approval_id).await {
        warn!(approval = %approval.approval_id, "cannot record the delivery: {e}");
    }
    let decision = json!({
        "kind": "permission_decision",
        "approval_id": approval.approval_id,
        "tool": approval.tool,
        "decision": approval.status,
        "for_session": approval.for_session,
        "by": approval.decided_by,
        "reason": approval.reason,
    });
    note(run, decision).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(timeout: Duration) -> Asks {
        Asks {
            waiting_since: None,
            next_expiry: None,
            timeout_at: Instant::now() + timeout,
            max_credit: timeout,
            credited: Duration::ZERO,
            asked: 0,
            fresh: false,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    #[test]
    fn waiting_stops_the_clock_for_at_most_the_runs_own_timeout() {
        let hour = Duration::from_secs(3600);
        let mut a = asks(hour);
        let start = a.deadline();
        // Waiting: the deadline moves out by what is left of the credit (an hour).
        a.waiting_since = Some(Instant::now());
        assert_eq!(a.deadline(), start + hour);
        // A wait of 40 minutes is credited in full.
        a.waiting_since = Some(Instant::now() - Duration::from_secs(2400));
        a.stop_waiting();
        assert!(a.deadline() >= start + Duration::from_secs(2400));
        assert!(a.deadline() < start + Duration::from_secs(2401));
        // Waiting again: only the 20 minutes left can be added, however long it waits.
        a.waiting_since = Some(Instant::now() - Duration::from_secs(86400));
        let cap = a.timeout_at + (hour - a.credited);
        assert_eq!(a.deadline(), cap);
        assert!(a.deadline() <= start + hour + Duration::from_secs(1));
        a.stop_waiting();
        assert_eq!(a.deadline(), cap, "no more credit");
    }
}
