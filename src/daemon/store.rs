//! The daemon's store: one SQLite file (WAL) in its state directory. Sessions, their tasks,
//! and every message the agents streamed, in order. Schema changes are migrations keyed by
//! `PRAGMA user_version`.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use crate::wire::DirId;

/// Each entry brings the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sessions (
    session_id       TEXT PRIMARY KEY,
    owner            TEXT NOT NULL,
    unix_user        TEXT NOT NULL,
    agentic_tool     TEXT NOT NULL,
    worktree         TEXT NOT NULL,
    model            TEXT,
    permission_mode  TEXT,
    agent_session_id TEXT,
    status           TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE TABLE tasks (
    task_id       TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    prompt        TEXT NOT NULL,
    status        TEXT NOT NULL,
    error         TEXT,
    exit_code     INTEGER,
    signal        INTEGER,
    executed_via  TEXT,
    unix_user     TEXT NOT NULL,
    handle        INTEGER,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    finished_at   TEXT
);
CREATE INDEX tasks_by_session ON tasks(session_id, created_at);
CREATE INDEX tasks_by_status ON tasks(status);
CREATE TABLE messages (
    session_id  TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    task_id     TEXT NOT NULL,
    event       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"#,
    r#"
CREATE TABLE terminals (
    terminal_id  TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    unix_user    TEXT NOT NULL,
    handle       INTEGER NOT NULL,
    pid          INTEGER NOT NULL,
    command      TEXT,
    cwd          TEXT,
    cols         INTEGER NOT NULL,
    rows         INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    exit_code    INTEGER,
    signal       INTEGER,
    ended_at     TEXT
);
"#,
    r#"
ALTER TABLE terminals ADD COLUMN offset_base INTEGER NOT NULL DEFAULT 0;
ALTER TABLE terminals ADD COLUMN last_offset INTEGER NOT NULL DEFAULT 0;
"#,
    // The worktree as the broker pinned it at creation (device, inode, owner); NULL for
    // sessions from before, which run unpinned.
    r#"
ALTER TABLE sessions ADD COLUMN worktree_dev INTEGER;
ALTER TABLE sessions ADD COLUMN worktree_ino INTEGER;
ALTER TABLE sessions ADD COLUMN worktree_uid INTEGER;
"#,
    // Stored output, counted so it can be bounded per task and per Unix user without
    // reading it back: each message's size, each task's total, each user's total.
    r#"
ALTER TABLE messages ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET bytes = length(CAST(event AS BLOB));
ALTER TABLE tasks ADD COLUMN output_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET output_bytes =
    (SELECT COALESCE(SUM(m.bytes), 0) FROM messages m WHERE m.task_id = tasks.task_id);
CREATE TABLE output_usage (
    unix_user TEXT PRIMARY KEY,
    bytes     INTEGER NOT NULL
);
INSERT INTO output_usage (unix_user, bytes)
    SELECT s.unix_user, SUM(m.bytes) FROM messages m JOIN sessions s USING (session_id)
    GROUP BY s.unix_user;
"#,
    // Agents' permission requests (approval_store.rs), and the tools a session allows
    // without asking.
    r#"
CREATE TABLE approvals (
    approval_id  TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    task_id      TEXT NOT NULL,
    tool         TEXT NOT NULL,
    summary      TEXT NOT NULL,
    ask          TEXT NOT NULL,
    status       TEXT NOT NULL,
    for_session  INTEGER NOT NULL DEFAULT 0,
    decided_by   TEXT,
    reason       TEXT,
    created_at   TEXT NOT NULL,
    expires_unix INTEGER NOT NULL,
    decided_at   TEXT,
    delivered    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX approvals_by_status ON approvals(status, created_at);
CREATE INDEX approvals_by_task ON approvals(task_id);
CREATE TABLE session_tools (
    session_id  TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    tool        TEXT NOT NULL,
    allowed_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (session_id, tool)
);
"#,
    // Whether the task's run was confined (Landlock), as the broker reported it.
    r#"
ALTER TABLE tasks ADD COLUMN confinement TEXT;
"#,
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub session_id: String,
    pub owner: String,
    pub unix_user: String,
    pub agentic_tool: String,
    pub worktree: String,
    /// The worktree as `CheckDir` pinned it; every run in it must find the same directory.
    /// `None`: created before pins (or by a broker that did not pin), run unpinned.
    #[serde(skip)]
    pub worktree_id: Option<DirId>,
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    /// The agent's own session/thread id, to continue the conversation.
    pub agent_session_id: Option<String>,
    /// idle | running | failed
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Task {
    pub task_id: String,
    pub session_id: String,
    pub prompt: String,
    /// queued | running | waiting (for an answer to a permission request) | completed |
    /// failed | stopped
    pub status: String,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// executor | direct
    pub executed_via: Option<String>,
    /// "landlock abi N", or "none (why)"; unset until it runs.
    pub confinement: Option<String>,
    pub unix_user: String,
    #[serde(skip)]
    pub handle: Option<u64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub seq: i64,
    pub task_id: String,
    pub created_at: String,
    pub event: serde_json::Value,
}

/// Bounds on what the agents' output may occupy in the store (`[execution]` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// One message, as stored JSON.
    pub message: usize,
    /// All messages of one task.
    pub task: u64,
    /// All stored messages of one Unix user's sessions.
    pub user: u64,
}

/// What `append_messages` stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The session's last sequence number after the append.
    pub last_seq: i64,
    /// Set when an event did not fit: which limit, in words (it and the rest were not
    /// stored).
    pub refused: Option<String>,
}

/// An event as stored: its JSON, or, past `max` bytes, a small notice saying what was
/// left out and why.
fn bounded_event(event: serde_json::Value, max: usize) -> String {
    let text = event.to_string();
    if text.len() <= max {
        return text;
    }
    serde_json::json!({
        "kind": "omitted",
        "original_kind": event.get("kind").cloned().unwrap_or(serde_json::Value::Null),
        "bytes": text.len(),
        "reason": format!("a message is at most {max} bytes (execution.max_message_bytes)"),
    })
    .to_string()
}

fn usage_of(c: &Connection, unix_user: &str) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT bytes FROM output_usage WHERE unix_user = ?1",
        [unix_user],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|b| b.unwrap_or(0).max(0) as u64)
}

/// How a task ended.
pub struct Outcome<'a> {
    pub status: &'a str,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A random id in UUID form.
/// An id for something a worker stores, starting with its user's uid (`u1000-…`): the
/// front sends requests naming it to that user's worker.
pub fn object_id(uid: u32) -> String {
    format!("u{uid}-{}", new_id())
}

/// The uid an [`object_id`] starts with (`None`: an id from before workers).
pub fn uid_of_id(id: &str) -> Option<u32> {
    id.strip_prefix('u')?.split_once('-')?.0.parse().ok()
}

pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("randomness");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::broker::credentials::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        session_id: r.get(0)?,
        owner: r.get(1)?,
        unix_user: r.get(2)?,
        agentic_tool: r.get(3)?,
        worktree: r.get(4)?,
        model: r.get(5)?,
        permission_mode: r.get(6)?,
        agent_session_id: r.get(7)?,
        status: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        worktree_id: match (
            r.get::<_, Option<i64>>(11)?,
            r.get::<_, Option<i64>>(12)?,
            r.get::<_, Option<i64>>(13)?,
        ) {
            // Stored as SQLite's signed integers, bit for bit.
            (Some(dev), Some(ino), Some(uid)) => Some(DirId {
                dev: dev as u64,
                ino: ino as u64,
                uid: uid as u32,
            }),
            _ => None,
        },
    })
}

const SESSION_COLS: &str = "session_id, owner, unix_user, agentic_tool, worktree, model, permission_mode, agent_session_id, status, created_at, updated_at, worktree_dev, worktree_ino, worktree_uid";
const TASK_COLS: &str = "task_id, session_id, prompt, status, error, exit_code, signal, executed_via, unix_user, handle, created_at, started_at, finished_at, confinement";

fn task_row(r: &Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        task_id: r.get(0)?,
        session_id: r.get(1)?,
        prompt: r.get(2)?,
        status: r.get(3)?,
        error: r.get(4)?,
        exit_code: r.get(5)?,
        signal: r.get(6)?,
        executed_via: r.get(7)?,
        unix_user: r.get(8)?,
        handle: r.get::<_, Option<i64>>(9)?.map(|h| h as u64),
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
        confinement: r.get(13)?,
    })
}

pub type StoreResult<T> = Result<T, String>;

fn err(e: rusqlite::Error) -> String {
    format!("store: {e}")
}

impl Store {
    pub fn open(path: &Path) -> StoreResult<Store> {
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version < 0 || version as usize > MIGRATIONS.len() {
            return Err(format!(
                "store schema {version} is newer than this stoa ({})",
                MIGRATIONS.len()
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on a blocking thread. Only the store's own files use it:
    /// everything else goes through the methods, the interface a shared PostgreSQL store
    /// for many hosts would fill.
    pub(in crate::daemon) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().expect("store lock")).map_err(err))
            .await
            .map_err(|e| format!("store task: {e}"))?
    }

    pub async fn insert_session(&self, s: Session) -> StoreResult<()> {
        self.with(move |c| {
            c.execute(
                &format!("INSERT INTO sessions ({SESSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    s.session_id, s.owner, s.unix_user, s.agentic_tool, s.worktree, s.model,
                    s.permission_mode, s.agent_session_id, s.status, s.created_at, s.updated_at,
                    s.worktree_id.map(|d| d.dev as i64), s.worktree_id.map(|d| d.ino as i64),
                    s.worktree_id.map(|d| i64::from(d.uid))
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn session(&self, id: &str) -> StoreResult<Option<Session>> {
        let id = id.to_string();
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {SESSION_COLS} FROM sessions WHERE session_id = ?1"),
                [id],
                session_row,
            )
            .optional()
        })
        .await
    }

    /// Sessions of `(owner key, Unix user)`, or all with `None`.
    pub async fn sessions(&self, of: Option<(String, String)>) -> StoreResult<Vec<Session>> {
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE ?1 IS NULL OR (owner = ?1 AND unix_user = ?2) ORDER BY created_at"
            ))?;
            let (owner, unix_user) = of.unzip();
            let rows = stmt.query_map(params![owner, unix_user], session_row)?;
            rows.collect()
        })
        .await
    }

    /// Deletes a session with its tasks and messages; its messages no longer count
    /// against its user's stored output.
    pub async fn delete_session(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            // Its messages and its permission requests (counted as they were kept).
            tx.execute(
                "UPDATE output_usage SET bytes = bytes -
                    (SELECT COALESCE(SUM(bytes), 0) FROM messages WHERE session_id = ?1) -
                    (SELECT COALESCE(SUM(length(CAST(ask AS BLOB))), 0) FROM approvals WHERE session_id = ?1)
                 WHERE unix_user = (SELECT unix_user FROM sessions WHERE session_id = ?1)",
                [&id],
            )?;
            let deleted = tx.execute("DELETE FROM sessions WHERE session_id = ?1", [&id])? > 0;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    /// The bytes of stored messages of `unix_user`'s sessions.
    pub async fn user_output_bytes(&self, unix_user: &str) -> StoreResult<u64> {
        let unix_user = unix_user.to_string();
        self.with(move |c| usage_of(c, &unix_user)).await
    }

    pub async fn set_session_status(&self, id: &str, status: &str) -> StoreResult<()> {
        let (id, status) = (id.to_string(), status.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE sessions SET status = ?2, updated_at = ?3 WHERE session_id = ?1",
                params![id, status, now()],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn set_agent_session_id(&self, id: &str, agent_session_id: &str) -> StoreResult<()> {
        let (id, agent) = (id.to_string(), agent_session_id.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE sessions SET agent_session_id = ?2, updated_at = ?3 WHERE session_id = ?1",
                params![id, agent, now()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Creates a queued task and marks the session running, unless it is running already
    /// (`Ok(false)`): one task at a time per session, decided in one transaction.
    pub async fn begin_task(&self, t: Task) -> StoreResult<bool> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let busy: bool = tx.query_row(
                "SELECT status = 'running' FROM sessions WHERE session_id = ?1",
                [&t.session_id],
                |r| r.get(0),
            )?;
            if busy {
                return Ok(false);
            }
            tx.execute(
                &format!("INSERT INTO tasks ({TASK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    t.task_id, t.session_id, t.prompt, t.status, t.error, t.exit_code, t.signal,
                    t.executed_via, t.unix_user, t.handle.map(|h| h as i64), t.created_at,
                    t.started_at, t.finished_at, t.confinement
                ],
            )?;
            tx.execute(
                "UPDATE sessions SET status = 'running', updated_at = ?2 WHERE session_id = ?1",
                params![t.session_id, now()],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    pub async fn task(&self, id: &str) -> StoreResult<Option<Task>> {
        let id = id.to_string();
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE task_id = ?1"),
                [id],
                task_row,
            )
            .optional()
        })
        .await
    }

    pub async fn tasks_of(&self, session_id: &str) -> StoreResult<Vec<Task>> {
        let id = session_id.to_string();
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE session_id = ?1 ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([id], task_row)?;
            rows.collect()
        })
        .await
    }

    /// How many tasks are in each state.
    pub async fn task_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        self.with(move |c| {
            let mut stmt = c.prepare("SELECT status, COUNT(*) FROM tasks GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Tasks a daemon left unfinished (queued or running).
    pub async fn unfinished_tasks(&self) -> StoreResult<Vec<Task>> {
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE status IN ('queued', 'running', 'waiting') ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([], task_row)?;
            rows.collect()
        })
        .await
    }

    /// A running task waits for an answer (`waiting`), or no longer does (`running`);
    /// a task that has ended is left as it is. Whether it changed.
    pub async fn set_task_waiting(&self, id: &str, waiting: bool) -> StoreResult<bool> {
        let id = id.to_string();
        let (to, from) = if waiting {
            ("waiting", "running")
        } else {
            ("running", "waiting")
        };
        self.with(move |c| {
            c.execute(
                "UPDATE tasks SET status = ?2 WHERE task_id = ?1 AND status = ?3",
                params![id, to, from],
            )
            .map(|n| n > 0)
        })
        .await
    }

    pub async fn task_started(
        &self,
        id: &str,
        via: &str,
        handle: Option<u64>,
        confinement: &str,
    ) -> StoreResult<()> {
        let (id, via, confinement) = (id.to_string(), via.to_string(), confinement.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE tasks SET status = 'running', executed_via = ?2, handle = ?3, started_at = ?4, confinement = ?5 WHERE task_id = ?1",
                params![id, via, handle.map(|h| h as i64), now(), confinement],
            )
            .map(|_| ())
        })
        .await
    }

    /// Records the end of a task and sets its session idle (or failed), in one transaction.
    pub async fn finish_task(&self, id: &str, session_id: &str, o: Outcome<'_>) -> StoreResult<()> {
        let (id, session_id) = (id.to_string(), session_id.to_string());
        let status = o.status.to_string();
        let (error, exit_code, signal) = (o.error, o.exit_code, o.signal);
        self.with(move |c| {
            let tx = c.transaction()?;
            let at = now();
            tx.execute(
                "UPDATE tasks SET status = ?2, error = ?3, exit_code = ?4, signal = ?5, finished_at = ?6 WHERE task_id = ?1",
                params![id, status, error, exit_code, signal, at],
            )?;
            let session_status = if status == "failed" { "failed" } else { "idle" };
            tx.execute(
                "UPDATE sessions SET status = ?2, updated_at = ?3 WHERE session_id = ?1",
                params![session_id, session_status, at],
            )?;
            tx.commit()
        })
        .await
    }

    /// Appends events to a session's messages, within `limits`, in one transaction. An
    /// event larger than `limits.message` is stored as an `omitted` notice in its place.
    /// Events are stored in order while the task's and the user's totals stay within their
    /// limits; at the first that would not fit, storing stops and the reply names the limit.
    pub async fn append_messages(
        &self,
        session_id: &str,
        task_id: &str,
        unix_user: &str,
        events: Vec<serde_json::Value>,
        limits: OutputLimits,
    ) -> StoreResult<Appended> {
        let (session_id, task_id) = (session_id.to_string(), task_id.to_string());
        let unix_user = unix_user.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut seq: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = ?1",
                [&session_id],
                |r| r.get(0),
            )?;
            let task_bytes: i64 = tx
                .query_row(
                    "SELECT output_bytes FROM tasks WHERE task_id = ?1",
                    [&task_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let (mut task_bytes, mut user_bytes) = (task_bytes as u64, usage_of(&tx, &unix_user)?);
            let (start_task, start_user) = (task_bytes, user_bytes);
            let mut refused = None;
            let at = now();
            for event in events {
                let text = bounded_event(event, limits.message);
                let len = text.len() as u64;
                if task_bytes + len > limits.task {
                    refused = Some(format!(
                        "the task's stored output reached its limit (execution.max_task_output_bytes = {} bytes)",
                        limits.task
                    ));
                    break;
                }
                if user_bytes + len > limits.user {
                    refused = Some(format!(
                        "the stored output of unix user '{unix_user}' reached its limit (execution.max_user_output_bytes = {} bytes); delete old sessions to free it",
                        limits.user
                    ));
                    break;
                }
                seq += 1;
                tx.execute(
                    "INSERT INTO messages (session_id, seq, task_id, event, created_at, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![session_id, seq, task_id, text, at, len as i64],
                )?;
                task_bytes += len;
                user_bytes += len;
            }
            if task_bytes != start_task {
                tx.execute(
                    "UPDATE tasks SET output_bytes = ?2 WHERE task_id = ?1",
                    params![task_id, task_bytes as i64],
                )?;
                tx.execute(
                    "INSERT INTO output_usage (unix_user, bytes) VALUES (?1, ?2)
                     ON CONFLICT (unix_user) DO UPDATE SET bytes = bytes + ?2",
                    params![unix_user, (user_bytes - start_user) as i64],
                )?;
            }
            tx.commit()?;
            Ok(Appended {
                last_seq: seq,
                refused,
            })
        })
        .await
    }

    /// Messages after `after`, at most `limit`.
    pub async fn messages(
        &self,
        session_id: &str,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<Message>> {
        let session_id = session_id.to_string();
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT seq, task_id, created_at, event FROM messages WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![session_id, after, limit], |r| {
                let text: String = r.get(3)?;
                Ok(Message {
                    seq: r.get(0)?,
                    task_id: r.get(1)?,
                    created_at: r.get(2)?,
                    event: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// A terminal as stored (what survives a daemon restart).
#[derive(Debug, Clone, PartialEq)]
pub struct TerminalRow {
    pub terminal_id: String,
    pub owner: String,
    pub unix_user: String,
    pub handle: u64,
    pub pid: i32,
    pub command: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub cols: u16,
    pub rows: u16,
    pub started_at: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at: Option<String>,
    /// The output offset this daemon's stream of the terminal starts at (see
    /// `daemon::terminals::recover`).
    pub offset_base: u64,
    /// The end of the output, as last recorded (at most a second old).
    pub last_offset: u64,
}

impl Store {
    pub async fn insert_terminal(&self, t: TerminalRow) -> StoreResult<()> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO terminals (terminal_id, owner, unix_user, handle, pid, command, cwd, cols, rows, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    t.terminal_id,
                    t.owner,
                    t.unix_user,
                    t.handle as i64,
                    t.pid,
                    t.command.map(|c| serde_json::to_string(&c).unwrap_or_default()),
                    t.cwd,
                    t.cols,
                    t.rows,
                    t.started_at
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn terminal_ended(
        &self,
        id: &str,
        exit_code: Option<i32>,
        signal: Option<i32>,
    ) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE terminals SET exit_code = ?2, signal = ?3, ended_at = ?4 WHERE terminal_id = ?1",
                params![id, exit_code, signal, now()],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn set_terminal_offset_base(&self, id: &str, base: u64) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE terminals SET offset_base = ?2 WHERE terminal_id = ?1",
                params![id, base as i64],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn set_terminal_last_offset(&self, id: &str, offset: u64) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE terminals SET last_offset = ?2 WHERE terminal_id = ?1",
                params![id, offset as i64],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn delete_terminal(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute("DELETE FROM terminals WHERE terminal_id = ?1", [id])
                .map(|_| ())
        })
        .await
    }

    /// Terminals not yet recorded as ended.
    pub async fn live_terminals(&self) -> StoreResult<Vec<TerminalRow>> {
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT terminal_id, owner, unix_user, handle, pid, command, cwd, cols, rows, started_at, exit_code, signal, ended_at, offset_base, last_offset
                 FROM terminals WHERE ended_at IS NULL",
            )?;
            let rows = stmt.query_map([], |r| {
                let command: Option<String> = r.get(5)?;
                Ok(TerminalRow {
                    terminal_id: r.get(0)?,
                    owner: r.get(1)?,
                    unix_user: r.get(2)?,
                    handle: r.get::<_, i64>(3)? as u64,
                    pid: r.get(4)?,
                    command: command.and_then(|c| serde_json::from_str(&c).ok()),
                    cwd: r.get(6)?,
                    cols: r.get(7)?,
                    rows: r.get(8)?,
                    started_at: r.get(9)?,
                    exit_code: r.get(10)?,
                    signal: r.get(11)?,
                    ended_at: r.get(12)?,
                    offset_base: r.get::<_, i64>(13)? as u64,
                    last_offset: r.get::<_, i64>(14)? as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("stoa-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("stoa.db")
    }

    fn session(id: &str, owner: &str, unix_user: &str, pin: Option<DirId>) -> Session {
        Session {
            session_id: id.into(),
            owner: owner.into(),
            unix_user: unix_user.into(),
            agentic_tool: "claude-code".into(),
            worktree: "/w".into(),
            worktree_id: pin,
            model: None,
            permission_mode: None,
            agent_session_id: None,
            status: "idle".into(),
            created_at: now(),
            updated_at: now(),
        }
    }

    fn task(id: &str, session_id: &str) -> Task {
        Task {
            task_id: id.into(),
            session_id: session_id.into(),
            prompt: "p".into(),
            status: "running".into(),
            error: None,
            exit_code: None,
            signal: None,
            executed_via: None,
            confinement: None,
            unix_user: "alice".into(),
            handle: None,
            created_at: now(),
            started_at: None,
            finished_at: None,
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A database as the previous schema (3) left it gets the pin columns (NULL: unpinned)
    /// and its stored output counted, and keeps every row.
    #[test]
    fn migration_from_schema_3_keeps_rows_and_counts_output() {
        let path = temp_db("migrate");
        {
            let c = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..3] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", 3).unwrap();
            c.execute_batch(
                "INSERT INTO sessions VALUES ('s1','alice','alice','gemini','/w',NULL,NULL,NULL,'idle','t','t');
                 INSERT INTO tasks (task_id, session_id, prompt, status, unix_user, created_at)
                     VALUES ('t1','s1','p','completed','alice','t');
                 INSERT INTO messages VALUES ('s1',1,'t1','{\"kind\":\"x\"}','t');
                 INSERT INTO messages VALUES ('s1',2,'t1','\"é\"','t');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        run(async {
            let s = store.session("s1").await.unwrap().unwrap();
            assert_eq!((s.owner.as_str(), s.worktree_id), ("alice", None));
            // Bytes, not characters: `{"kind":"x"}` is 12, `"é"` is 4.
            assert_eq!(store.user_output_bytes("alice").await.unwrap(), 16);
            let output: i64 = store
                .with(|c| {
                    c.query_row(
                        "SELECT output_bytes FROM tasks WHERE task_id='t1'",
                        [],
                        |r| r.get(0),
                    )
                })
                .await
                .unwrap();
            assert_eq!(output, 16);
            // A pinned session keeps its directory's identity, all 64 bits of it.
            let pin = DirId {
                dev: u64::MAX - 1,
                ino: 1 << 63,
                uid: 2001,
            };
            store
                .insert_session(session("s2", "user:7", "alice", Some(pin)))
                .await
                .unwrap();
            let s2 = store.session("s2").await.unwrap().unwrap();
            assert_eq!(s2.worktree_id, Some(pin));
        });
        drop(store);
        // Opening again runs nothing twice.
        let store = Store::open(&path).unwrap();
        run(async {
            assert_eq!(store.user_output_bytes("alice").await.unwrap(), 16);
        });
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn output_is_bounded_per_message_task_and_user() {
        let path = temp_db("limits");
        let store = Store::open(&path).unwrap();
        let limits = OutputLimits {
            message: 1024,
            task: 4000,
            user: 6000,
        };
        let event = |n: usize| serde_json::json!({"kind": "assistant_text", "text": "a".repeat(n)});
        run(async {
            for (s, t) in [("s1", "t1"), ("s2", "t2")] {
                store
                    .insert_session(session(s, "user:1", "alice", None))
                    .await
                    .unwrap();
                store.begin_task(task(t, s)).await.unwrap();
            }
            // Too large for one message: stored as a notice that says why.
            let a = store
                .append_messages("s1", "t1", "alice", vec![event(5000)], limits)
                .await
                .unwrap();
            assert_eq!(a.refused, None);
            let m = store.messages("s1", 0, 10).await.unwrap();
            assert_eq!(m[0].event["kind"], "omitted");
            assert_eq!(m[0].event["original_kind"], "assistant_text");
            assert!(m[0].event["reason"]
                .as_str()
                .unwrap()
                .contains("execution.max_message_bytes"));
            // The task's limit: what fits is stored, in order, then the limit is named.
            let a = store
                .append_messages("s1", "t1", "alice", vec![event(900); 5], limits)
                .await
                .unwrap();
            assert!(a.refused.unwrap().contains("max_task_output_bytes"));
            let stored: u64 = store
                .messages("s1", 0, 100)
                .await
                .unwrap()
                .iter()
                .map(|m| m.event.to_string().len() as u64)
                .sum();
            assert!(stored <= 4000, "{stored}");
            let used = store.user_output_bytes("alice").await.unwrap();
            assert_eq!(used, stored);
            // The user's limit counts every session of the user.
            let a = store
                .append_messages("s2", "t2", "alice", vec![event(900); 5], limits)
                .await
                .unwrap();
            assert!(a.refused.unwrap().contains("max_user_output_bytes"));
            assert!(store.user_output_bytes("alice").await.unwrap() <= 6000);
            // Another user is not held back by alice's output.
            store
                .insert_session(session("s3", "user:2", "bob", None))
                .await
                .unwrap();
            store.begin_task(task("t3", "s3")).await.unwrap();
            let a = store
                .append_messages("s3", "t3", "bob", vec![event(900); 2], limits)
                .await
                .unwrap();
            assert_eq!(a.refused, None);
            // Deleting a session gives its bytes back.
            store.delete_session("s1").await.unwrap();
            assert_eq!(
                store.user_output_bytes("alice").await.unwrap(),
                store
                    .messages("s2", 0, 100)
                    .await
                    .unwrap()
                    .iter()
                    .map(|m| m.event.to_string().len() as u64)
                    .sum::<u64>()
            );
        });
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
