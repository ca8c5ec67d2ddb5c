//! Where a worker keeps its agents' permission requests: one row per request, from
//! `pending` to exactly one answer (`allowed`, `denied`, `expired`, `abandoned`), decided
//! in one statement so two answers cannot both win; and the tools a session allows without
//! asking (an "allow for the rest of the session").
#![forbid(unsafe_code)]

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use stoa_executor::agents::PermissionAsk;

use super::store::{now, Store, StoreResult};

/// One permission request, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Approval {
    pub approval_id: String,
    pub session_id: String,
    pub task_id: String,
    pub tool: String,
    /// One line saying what the tool would do.
    pub summary: String,
    /// The tool's input, whole.
    pub input: serde_json::Value,
    pub description: Option<String>,
    /// pending | allowed | denied | expired | abandoned
    pub status: String,
    /// Allowed, and the tool for the rest of the session.
    pub for_session: bool,
    /// Who answered (an owner key), or `timeout` / `session rule` / `run ended`.
    pub decided_by: Option<String>,
    /// Said to the agent with a denial.
    pub reason: Option<String>,
    pub created_at: String,
    /// When it is denied unanswered (seconds since the epoch).
    pub expires_at: i64,
    pub decided_at: Option<String>,
    /// What the agent asked, as it takes to answer it.
    #[serde(skip)]
    pub ask: PermissionAsk,
}

/// How a request was settled.
pub struct Verdict<'a> {
    /// allowed | denied | expired | abandoned
    pub status: &'a str,
    pub for_session: bool,
    pub by: &'a str,
    pub reason: Option<&'a str>,
}

impl<'a> Verdict<'a> {
    /// Settled by stoa (not a person's answer): never "for the session".
    pub fn settled(status: &'a str, by: &'a str, reason: Option<&'a str>) -> Verdict<'a> {
        Verdict {
            status,
            for_session: false,
            by,
            reason,
        }
    }
}

const COLS: &str = "approval_id, session_id, task_id, tool, summary, ask, status, for_session, decided_by, reason, created_at, expires_unix, decided_at";

fn row(r: &Row<'_>) -> rusqlite::Result<Approval> {
    let ask_text: String = r.get(5)?;
    let ask: PermissionAsk = serde_json::from_str(&ask_text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Approval {
        approval_id: r.get(0)?,
        session_id: r.get(1)?,
        task_id: r.get(2)?,
        tool: r.get(3)?,
        summary: r.get(4)?,
        input: ask.input.clone(),
        description: ask.description.clone(),
        status: r.get(6)?,
        for_session: r.get(7)?,
        decided_by: r.get(8)?,
        reason: r.get(9)?,
        created_at: r.get(10)?,
        expires_at: r.get(11)?,
        decided_at: r.get(12)?,
        ask,
    })
}

impl Store {
    /// Keeps a request, counted against its Unix user's stored output (`user_limit`
    /// bytes, as messages are): `Ok(false)` when it does not fit.
    pub async fn insert_approval(
        &self,
        a: Approval,
        unix_user: &str,
        user_limit: u64,
    ) -> StoreResult<bool> {
        let ask = serde_json::to_string(&a.ask).map_err(|e| e.to_string())?;
        let unix_user = unix_user.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let used: i64 = tx
                .query_row(
                    "SELECT bytes FROM output_usage WHERE unix_user = ?1",
                    [&unix_user],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let bytes = ask.len() as i64;
            if used.max(0) as u64 + bytes as u64 > user_limit {
                return Ok(false);
            }
            tx.execute(
                &format!("INSERT INTO approvals ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    a.approval_id, a.session_id, a.task_id, a.tool, a.summary, ask, a.status,
                    a.for_session, a.decided_by, a.reason, a.created_at, a.expires_at, a.decided_at
                ],
            )?;
            tx.execute(
                "INSERT INTO output_usage (unix_user, bytes) VALUES (?1, ?2)
                 ON CONFLICT(unix_user) DO UPDATE SET bytes = bytes + ?2",
                params![unix_user, bytes],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Pending requests of `session_id` for `tool` (to settle by a new session rule).
    pub async fn pending_for_tool(&self, session_id: &str, tool: &str) -> StoreResult<Vec<String>> {
        let (session_id, tool) = (session_id.to_string(), tool.to_string());
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT approval_id FROM approvals WHERE session_id = ?1 AND tool = ?2 AND status = 'pending'",
            )?;
            let rows = stmt.query_map(params![session_id, tool], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    pub async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        let id = id.to_string();
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM approvals WHERE approval_id = ?1"),
                [id],
                row,
            )
            .optional()
        })
        .await
    }

    /// Pending requests, oldest first: every one (`None`) or one task's.
    pub async fn pending_approvals(&self, task_id: Option<&str>) -> StoreResult<Vec<Approval>> {
        let task_id = task_id.map(str::to_string);
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLS} FROM approvals WHERE status = 'pending' AND (?1 IS NULL OR task_id = ?1) ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([task_id], row)?;
            rows.collect()
        })
        .await
    }

    /// Settles a pending request; `Ok(false)` when it was settled already (the first
    /// answer wins). An allowance for the session is recorded with it.
    pub async fn decide_approval(&self, id: &str, v: Verdict<'_>) -> StoreResult<bool> {
        let id = id.to_string();
        let (status, by) = (v.status.to_string(), v.by.to_string());
        let reason = v.reason.map(str::to_string);
        let for_session = v.for_session;
        self.with(move |c| {
            let tx = c.transaction()?;
            let at = now();
            let changed = tx.execute(
                "UPDATE approvals SET status = ?2, for_session = ?3, decided_by = ?4, reason = ?5, decided_at = ?6 WHERE approval_id = ?1 AND status = 'pending'",
                params![id, status, for_session, by, reason, at],
            )?;
            if changed > 0 && for_session {
                tx.execute(
                    "INSERT OR IGNORE INTO session_tools (session_id, tool, allowed_by, created_at)
                     SELECT session_id, tool, ?2, ?3 FROM approvals WHERE approval_id = ?1",
                    params![id, by, at],
                )?;
            }
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    /// Settled requests of `task_id` whose answer the agent has not been given yet.
    pub async fn undelivered_answers(&self, task_id: &str) -> StoreResult<Vec<Approval>> {
        let task_id = task_id.to_string();
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLS} FROM approvals WHERE task_id = ?1 AND status != 'pending' AND delivered = 0 ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([task_id], row)?;
            rows.collect()
        })
        .await
    }

    /// The agent has been given the answer (or can no longer be).
    pub async fn answer_delivered(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE approvals SET delivered = 1 WHERE approval_id = ?1",
                [id],
            )
            .map(|_| ())
        })
        .await
    }

    /// Whether the session allows `tool` without asking.
    pub async fn session_allows(&self, session_id: &str, tool: &str) -> StoreResult<bool> {
        let (session_id, tool) = (session_id.to_string(), tool.to_string());
        self.with(move |c| {
            c.query_row(
                "SELECT 1 FROM session_tools WHERE session_id = ?1 AND tool = ?2",
                params![session_id, tool],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
        })
        .await
    }

    /// Whether a task's run has already given its final result (stored as a message).
    pub async fn task_has_result(&self, task_id: &str) -> StoreResult<bool> {
        let task_id = task_id.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT 1 FROM messages WHERE task_id = ?1 AND json_extract(event, '$.kind') = 'result' LIMIT 1",
                [task_id],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
        })
        .await
    }
}
