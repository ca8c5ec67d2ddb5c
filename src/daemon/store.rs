//! The daemon's store: one SQLite file (WAL) in its state directory. Sessions, their tasks,
//! and every message the agents streamed, in order. Schema changes are migrations keyed by
//! `PRAGMA user_version`.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

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
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub session_id: String,
    pub owner: String,
    pub unix_user: String,
    pub agentic_tool: String,
    pub worktree: String,
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
    /// queued | running | completed | failed | stopped
    pub status: String,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// executor | direct
    pub executed_via: Option<String>,
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
    })
}

const SESSION_COLS: &str = "session_id, owner, unix_user, agentic_tool, worktree, model, permission_mode, agent_session_id, status, created_at, updated_at";
const TASK_COLS: &str = "task_id, session_id, prompt, status, error, exit_code, signal, executed_via, unix_user, handle, created_at, started_at, finished_at";

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

    /// Runs `f` on the connection on a blocking thread.
    pub async fn with<T: Send + 'static>(
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
                &format!("INSERT INTO sessions ({SESSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    s.session_id, s.owner, s.unix_user, s.agentic_tool, s.worktree, s.model,
                    s.permission_mode, s.agent_session_id, s.status, s.created_at, s.updated_at
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

    /// Sessions owned by `owner`, or all with `None`.
    pub async fn sessions(&self, owner: Option<String>) -> StoreResult<Vec<Session>> {
        self.with(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE ?1 IS NULL OR owner = ?1 ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([owner], session_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn delete_session(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute("DELETE FROM sessions WHERE session_id = ?1", [id])
                .map(|n| n > 0)
        })
        .await
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
                &format!("INSERT INTO tasks ({TASK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    t.task_id, t.session_id, t.prompt, t.status, t.error, t.exit_code, t.signal,
                    t.executed_via, t.unix_user, t.handle.map(|h| h as i64), t.created_at,
                    t.started_at, t.finished_at
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
                "SELECT {TASK_COLS} FROM tasks WHERE status IN ('queued', 'running') ORDER BY created_at"
            ))?;
            let rows = stmt.query_map([], task_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn task_started(&self, id: &str, via: &str, handle: Option<u64>) -> StoreResult<()> {
        let (id, via) = (id.to_string(), via.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE tasks SET status = 'running', executed_via = ?2, handle = ?3, started_at = ?4 WHERE task_id = ?1",
                params![id, via, handle.map(|h| h as i64), now()],
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

    /// Appends events to a session's messages; returns the last sequence number.
    pub async fn append_messages(
        &self,
        session_id: &str,
        task_id: &str,
        events: Vec<serde_json::Value>,
    ) -> StoreResult<i64> {
        let (session_id, task_id) = (session_id.to_string(), task_id.to_string());
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut seq: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = ?1",
                [&session_id],
                |r| r.get(0),
            )?;
            let at = now();
            for event in events {
                seq += 1;
                tx.execute(
                    "INSERT INTO messages (session_id, seq, task_id, event, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![session_id, seq, task_id, event.to_string(), at],
                )?;
            }
            tx.commit()?;
            Ok(seq)
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
