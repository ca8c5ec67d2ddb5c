//! `stoa session …`, `stoa task show`, `stoa secret …`, `stoa daemon …`: clients of the
//! HTTP API.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::Client;

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Create a session: an agent working in a directory as a Unix user.
    Create {
        /// claude-code, codex, gemini or opencode.
        #[arg(long, default_value = "claude-code")]
        tool: String,
        /// The directory the agent works in, as a path on the server (must be enterable by
        /// the user).
        #[arg(long)]
        worktree: String,
        /// The Unix user (default: your token's; with the admin token: yours, when you are
        /// not root).
        #[arg(long)]
        user: Option<String>,
        /// The model the agent uses (default: the tool's own).
        #[arg(long)]
        model: Option<String>,
        /// The agent's permission mode (the tool's own names, e.g. acceptEdits).
        #[arg(long)]
        permission_mode: Option<String>,
        /// Print the created session as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Your sessions (admins: all).
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One session, with its tasks.
    Show {
        /// The session's id.
        id: String,
        /// Print the session and its tasks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Everything the session's agents said so far.
    Log {
        /// The session's id.
        id: String,
        /// One stored message per line, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the session's messages and task changes as they come, until Ctrl-C.
    Follow {
        /// The session's id.
        id: String,
        /// Print what is stored first, then follow.
        #[arg(long)]
        all: bool,
    },
    /// Send a prompt; with --wait, print the agent's messages as they come and exit with
    /// the task's outcome.
    Prompt {
        /// The session's id.
        id: String,
        /// What to ask the agent.
        prompt: String,
        /// Wait for the task to end, printing the agent's messages.
        #[arg(long, conflicts_with = "json")]
        wait: bool,
        /// Print the started task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running task.
    Stop {
        /// The session's id.
        id: String,
    },
    /// Delete a session and its messages.
    Delete {
        /// The session's id.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// One task.
    Show {
        /// The task's id.
        id: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store a secret for your agents (the value is read from stdin; typed at a terminal,
    /// it is not shown).
    Set {
        /// The environment variable agents get it as (A-Z, 0-9 and _, e.g.
        /// ANTHROPIC_API_KEY).
        name: String,
        /// As root: a default for every user who has no secret of this name (kept in the
        /// broker's store, never shown, audited).
        #[arg(long)]
        default: bool,
    },
    /// The names of your secrets (values are never shown).
    List {
        /// As root: the defaults every user gets.
        #[arg(long)]
        default: bool,
    },
    /// Remove a secret.
    Rm {
        /// The secret's name.
        name: String,
        /// As root: the default of that name.
        #[arg(long)]
        default: bool,
    },
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Is the daemon up, with its broker?
    Status {
        /// Print the daemon's health report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a fresh front (the network-facing process); running tasks and terminals live
    /// in the users' workers and are not touched.
    Restart,
    /// Replace a Unix user's worker (admin); its running tasks and terminals survive.
    RestartWorker {
        /// The Unix user whose worker to replace.
        user: String,
    },
    /// Upgrade the running broker in place (root; `systemctl reload stoa` runs this): it
    /// re-execs the binary now installed, keeping its pid and every user's shells, agents
    /// and terminal output, and replaces the front and the workers (viewers reconnect). A
    /// new binary that does not accept the broker's state leaves the old one serving.
    Upgrade {
        /// The broker's policy file (where its state directory is).
        #[arg(long, env = "STOA_BROKER_CONFIG")]
        broker_config: Option<std::path::PathBuf>,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn client() -> Result<Client, String> {
    Client::from_env()
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn done(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The caller's own Unix user, for `--user` left out: only when the credential is not bound
/// to one (the admin token), and never root (the admin must then name one).
fn own_unix_user() -> Option<String> {
    if std::env::var("STOA_TOKEN").is_ok_and(|t| !t.trim().is_empty()) {
        return None; // an API user's token names its Unix user itself
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return None;
    }
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn session_fields(s: &Value) {
    let f = |k: &str| super::table::cell(&s[k]);
    super::table::fields(&[
        ("session", f("session_id")),
        ("tool", f("agentic_tool")),
        ("user", f("unix_user")),
        ("worktree", f("worktree")),
        ("status", f("status")),
        ("model", f("model")),
        ("permission mode", f("permission_mode")),
        ("created", f("created_at")),
        ("updated", f("updated_at")),
    ]);
}

fn task_fields(t: &Value) {
    let f = |k: &str| super::table::cell(&t[k]);
    super::table::fields(&[
        ("task", f("task_id")),
        ("session", f("session_id")),
        ("status", f("status")),
        ("prompt", f("prompt")),
        ("error", f("error")),
        ("exit code", f("exit_code")),
        ("signal", f("signal")),
        ("user", f("unix_user")),
        ("created", f("created_at")),
        ("started", f("started_at")),
        ("finished", f("finished_at")),
    ]);
}

pub fn session(cmd: SessionCommand) -> ExitCode {
    done((|| {
        let c = client()?;
        match cmd {
            SessionCommand::Create {
                tool,
                worktree,
                user,
                model,
                permission_mode,
                json,
            } => {
                let worktree = std::path::absolute(&worktree).map_err(|e| e.to_string())?;
                let body = json!({
                    "agentic_tool": tool, "worktree": worktree,
                    "unix_user": user.or_else(own_unix_user),
                    "model": model, "permission_mode": permission_mode,
                });
                let created = c.post("/sessions", &body).map_err(|e| e.message)?;
                if json {
                    print(&created);
                } else {
                    session_fields(&created);
                    eprintln!(
                        "next: stoa session prompt {} 'your prompt' --wait",
                        super::table::cell(&created["session_id"])
                    );
                }
            }
            SessionCommand::List { json } => {
                let list = c.get("/sessions").map_err(|e| e.message)?;
                if json {
                    print(&list);
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        [
                            "session_id",
                            "agentic_tool",
                            "unix_user",
                            "status",
                            "worktree",
                        ]
                        .iter()
                        .map(|k| super::table::cell(&s[*k]))
                        .collect()
                    })
                    .collect();
                super::table::print(&["SESSION", "TOOL", "USER", "STATUS", "WORKTREE"], &rows);
            }
            SessionCommand::Show { id, json } => {
                let mut session = c.get(&format!("/sessions/{id}")).map_err(|e| e.message)?;
                session["tasks"] = c
                    .get(&format!("/sessions/{id}/tasks"))
                    .map_err(|e| e.message)?;
                if json {
                    print(&session);
                    return Ok(());
                }
                session_fields(&session);
                let rows: Vec<Vec<String>> = session["tasks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        ["task_id", "status", "created_at", "prompt"]
                            .iter()
                            .map(|k| super::table::cell(&t[*k]))
                            .collect()
                    })
                    .collect();
                if !rows.is_empty() {
                    println!();
                    super::table::print(&["TASK", "STATUS", "CREATED", "PROMPT"], &rows);
                }
            }
            SessionCommand::Log { id, json } => {
                let mut after = 0;
                loop {
                    let page = c
                        .get(&format!("/sessions/{id}/messages?after={after}&limit=1000"))
                        .map_err(|e| e.message)?;
                    let page = page.as_array().cloned().unwrap_or_default();
                    for m in &page {
                        if json {
                            println!("{}", serde_json::to_string(m).unwrap_or_default());
                        } else {
                            show_event(&m["event"]);
                        }
                        after = after.max(m["seq"].as_i64().unwrap_or(after));
                    }
                    if page.len() < 1000 {
                        break;
                    }
                }
            }
            SessionCommand::Follow { id, all } => {
                let last = if all { 0 } else { last_seq(&c, &id, None)? };
                return watch(&c, &id, last, None);
            }
            SessionCommand::Prompt {
                id,
                prompt,
                wait,
                json,
            } => {
                let task = c
                    .post(
                        &format!("/sessions/{id}/prompt"),
                        &json!({ "prompt": prompt }),
                    )
                    .map_err(|e| e.message)?;
                if json {
                    print(&task);
                    return Ok(());
                }
                if !wait {
                    task_fields(&task);
                    eprintln!("watch it with: stoa session follow {id}");
                    return Ok(());
                }
                let task_id = task["task_id"].as_str().unwrap_or_default();
                let last = last_seq(&c, &id, Some(task_id))?;
                return watch(&c, &id, last, Some(task_id));
            }
            SessionCommand::Stop { id } => {
                let v = c
                    .post(&format!("/sessions/{id}/stop"), &json!({}))
                    .map_err(|e| e.message)?;
                eprintln!(
                    "stopping the running task of session {id}{}",
                    v["task_id"]
                        .as_str()
                        .map(|t| format!(" ({})", super::escape::field(t)))
                        .unwrap_or_default()
                );
            }
            SessionCommand::Delete { id } => {
                c.delete(&format!("/sessions/{id}"))
                    .map_err(|e| e.message)?;
                eprintln!("deleted session {id}");
            }
        }
        Ok(())
    })())
}

/// The last stored message's seq (not counting `skip_task`'s): following starts after it.
fn last_seq(c: &Client, session_id: &str, skip_task: Option<&str>) -> Result<i64, String> {
    let mut after = 0;
    loop {
        let page = c
            .get(&format!(
                "/sessions/{session_id}/messages?after={after}&limit=10000"
            ))
            .map_err(|e| e.message)?;
        let page = page.as_array().cloned().unwrap_or_default();
        for m in &page {
            if skip_task.is_some_and(|t| m["task_id"] == t) {
                continue;
            }
            after = after.max(m["seq"].as_i64().unwrap_or(after));
        }
        if page.len() < 10_000 {
            return Ok(after);
        }
        after = page
            .iter()
            .filter_map(|m| m["seq"].as_i64())
            .max()
            .unwrap_or(after);
    }
}

/// How long `watch` keeps trying to get the event stream back after it broke.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Prints the session's messages after `last` as they come, and its tasks' changes. With
/// `task_id`, only that task's messages, until it ends (its outcome is ours); without,
/// until interrupted. A broken stream (the daemon restarted) is resumed where it was.
fn watch(c: &Client, session_id: &str, mut last: i64, task_id: Option<&str>) -> Result<(), String> {
    let mut broken_since: Option<std::time::Instant> = None;
    loop {
        let body = match c.stream(&format!("/sessions/{session_id}/events"), last) {
            Ok(body) => body,
            Err(e) if e.status.is_none() => {
                let since = *broken_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(e.message);
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e.message),
        };
        broken_since = None;
        let mut event = String::new();
        let mut data = String::new();
        for line in BufReader::new(body).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                data.clear();
                let ours = task_id.is_none_or(|t| value["task_id"] == t);
                match event.as_str() {
                    "message" => {
                        last = last.max(value["seq"].as_i64().unwrap_or(last));
                        if ours {
                            show_event(&value["event"]);
                        }
                    }
                    "approval" if ours => show_approval(&value),
                    "task" if ours => {
                        let status = value["status"].as_str().unwrap_or("");
                        let error = value["error"].as_str().unwrap_or("");
                        match task_id {
                            Some(_) => match status {
                                "completed" => return Ok(()),
                                "failed" | "stopped" => {
                                    return Err(format!(
                                        "task {status}: {}",
                                        super::escape::field(error)
                                    ))
                                }
                                _ => {}
                            },
                            None => eprintln!(
                                "[task {} {}{}]",
                                super::escape::field(value["task_id"].as_str().unwrap_or("?")),
                                super::escape::field(status),
                                if error.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {}", super::escape::field(error))
                                }
                            ),
                        }
                    }
                    _ => {}
                }
            }
        }
        // The stream ended without the task's end: the daemon went away; resume.
        broken_since.get_or_insert_with(std::time::Instant::now);
    }
}

fn show_event(e: &Value) {
    // What an agent says can carry escape sequences (from files it read, web pages).
    let text = |k: &str| super::escape::text(e[k].as_str().unwrap_or(""));
    match e["kind"].as_str() {
        Some("assistant_text") => println!("{}", text("text")),
        Some("tool_use") => {
            let name = super::escape::field(e["name"].as_str().unwrap_or("?"));
            match &e["input"] {
                Value::Null => println!("[tool {name}]"),
                input => println!("[tool {name}] {input}"),
            }
        }
        Some("tool_result") => println!("[result] {}", text("content")),
        Some("result") => eprintln!("{}", result_summary(e)),
        Some("permission_decision") => eprintln!(
            "[{} {}{}]",
            super::escape::field(e["tool"].as_str().unwrap_or("?")),
            super::escape::field(e["decision"].as_str().unwrap_or("?")),
            e["by"]
                .as_str()
                .map(|b| format!(" by {}", super::escape::field(b)))
                .unwrap_or_default()
        ),
        Some("notice") => eprintln!("[notice] {}", text("message")),
        _ => {}
    }
}

/// A permission request of the run: waiting (and how to answer it), or settled.
fn show_approval(a: &Value) {
    let id = super::escape::field(a["approval_id"].as_str().unwrap_or("?"));
    let summary = super::escape::text(a["summary"].as_str().unwrap_or(""));
    if a["status"] == "pending" {
        eprintln!("[the agent asks: {summary}]");
        eprintln!("[see it all: stoa approvals show {id}]");
        eprintln!("[answer: stoa approvals allow {id}   or   stoa approvals deny {id}]");
    }
}

/// `[done: 2 turns, $0.0123]` with what the tool reported: a tool that counts no turns
/// (Codex, Gemini, OpenCode) or no cost shows no `null` for it.
fn result_summary(e: &Value) -> String {
    let mut parts = vec![];
    if let Some(turns) = e["num_turns"].as_u64() {
        parts.push(format!("{turns} turn{}", if turns == 1 { "" } else { "s" }));
    }
    if let Some(cost) = e["cost_usd"].as_f64() {
        parts.push(format!("${cost:.4}"));
    }
    let word = if e["is_error"] == true {
        "error"
    } else {
        "done"
    };
    if parts.is_empty() {
        format!("[{word}]")
    } else {
        format!("[{word}: {}]", parts.join(", "))
    }
}

pub fn task(cmd: TaskCommand) -> ExitCode {
    done((|| {
        let TaskCommand::Show { id, json } = cmd;
        let task = client()?
            .get(&format!("/tasks/{id}"))
            .map_err(|e| e.message)?;
        if json {
            print(&task);
        } else {
            task_fields(&task);
        }
        Ok(())
    })())
}

/// The value of a secret: typed at a terminal without echo, or all of stdin.
fn secret_value(name: &str) -> Result<String, String> {
    let value = if std::io::stdin().is_terminal() {
        read_hidden(&format!("value for {name} (not shown; then Enter): "))?
    } else {
        let mut value = String::new();
        std::io::stdin()
            .read_to_string(&mut value)
            .map_err(|e| format!("cannot read the value from stdin: {e}"))?;
        value
    };
    if value.trim().is_empty() {
        return Err(format!("not stored: the value for {name} is empty"));
    }
    Ok(value)
}

fn check_secret_name(name: &str) -> Result<(), String> {
    if !crate::broker::users::valid_secret_name(name) {
        return Err(format!(
            "invalid secret name {:?}: agents get secrets as environment \
             variables, so use capital letters, digits and _, not starting with a \
             digit, at most 128 (e.g. ANTHROPIC_API_KEY)",
            super::escape::field(name)
        ));
    }
    Ok(())
}

/// `--default`: root edits the broker's store itself.
fn default_secret(cmd: SecretCommand) -> Result<(), String> {
    use super::users::defaults;
    if !nix::unistd::geteuid().is_root() {
        return Err("--default: only root sets secrets for every user (they are kept in the broker's store)".into());
    }
    match cmd {
        SecretCommand::Set { name, .. } => {
            check_secret_name(&name)?;
            let value = secret_value(&name)?;
            defaults::set(&name, &value)?;
            eprintln!("default secret {name} stored: users without their own {name} get it");
        }
        SecretCommand::List { .. } => {
            for name in defaults::names()? {
                println!("{name}");
            }
        }
        SecretCommand::Rm { name, .. } => {
            if !defaults::remove(&name)? {
                return Err(format!("there is no default secret {name}"));
            }
            eprintln!("default secret {name} removed");
        }
    }
    Ok(())
}

pub fn secret(cmd: SecretCommand) -> ExitCode {
    if let SecretCommand::Set { default: true, .. }
    | SecretCommand::List { default: true }
    | SecretCommand::Rm { default: true, .. } = cmd
    {
        return done(default_secret(cmd));
    }
    done((|| {
        let c = client()?;
        match cmd {
            SecretCommand::Set { name, .. } => {
                check_secret_name(&name)?;
                let value = secret_value(&name)?;
                c.put_text(&format!("/users/me/secrets/{name}"), &value)
                    .map_err(|e| e.message)?;
                eprintln!("secret {name} stored");
            }
            SecretCommand::List { .. } => {
                for n in c.get("/users/me/secrets").map_err(|e| e.message)?["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    println!("{}", n.as_str().unwrap_or(""));
                }
            }
            SecretCommand::Rm { name, .. } => {
                c.delete(&format!("/users/me/secrets/{name}"))
                    .map_err(|e| e.message)?;
                eprintln!("secret {name} removed");
            }
        }
        Ok(())
    })())
}

/// Reads one line from the terminal on stdin without echoing it; echo comes back whatever
/// happens (an error, Ctrl-C: the line discipline's SIGINT is left to end us, so echo is
/// put back by a guard only on the paths that return).
fn read_hidden(prompt: &str) -> Result<String, String> {
    use nix::sys::termios::{self, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved =
        termios::tcgetattr(&stdin).map_err(|e| format!("cannot read the terminal's mode: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    // ISIG off too: Ctrl-C must not leave the terminal without echo. It ends the read.
    quiet.local_flags.remove(LocalFlags::ISIG);
    eprint!("{prompt}");
    termios::tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet)
        .map_err(|e| format!("cannot turn the terminal's echo off: {e}"))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = termios::tcsetattr(&stdin, SetArg::TCSAFLUSH, &saved);
    read.map_err(|e| format!("cannot read the value: {e}"))?;
    if line.contains('\u{3}') {
        return Err("interrupted: nothing stored".into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn daemon_status(h: &Value) {
    let problems: Vec<String> = h["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(String::from))
        .collect();
    let limits: Vec<String> = h["limits"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", super::table::cell(v)))
        .collect();
    super::table::fields(&[
        ("status", super::table::cell(&h["status"])),
        ("problems", problems.join("; ")),
        ("warning", super::table::cell(&h["warning"])),
        ("mode", super::table::cell(&h["mode"])),
        ("version", super::table::cell(&h["version"])),
        (
            "broker",
            match h["broker_connected"].as_bool() {
                Some(true) => "connected".into(),
                Some(false) => "NOT connected".into(),
                None => String::new(),
            },
        ),
        (
            "broker process",
            match &h["broker"] {
                Value::Null => String::new(),
                b => format!(
                    "pid {}, version {}, up since {}, upgraded in place {} ({})",
                    super::table::cell(&b["pid"]),
                    super::table::cell(&b["version"]),
                    super::table::cell(&b["started_at"]),
                    match b["upgrades"].as_u64() {
                        Some(1) => "once".to_string(),
                        Some(n) => format!("{n} times"),
                        None => "?".into(),
                    },
                    match &b["upgraded_at"] {
                        Value::Null => "never".to_string(),
                        at => format!("last {}", super::table::cell(at)),
                    }
                ),
            },
        ),
        ("workers dir", super::table::cell(&h["workers_dir"])),
        (
            "free space",
            h["state_dir_free_bytes"]
                .as_u64()
                .map(|b| format!("{} MiB", b >> 20))
                .unwrap_or_default(),
        ),
        ("limits", limits.join(" ")),
    ]);
}

/// `stoa daemon upgrade`: exit 0 upgraded, 1 the broker stayed on its binary, 2 it could
/// not be asked or did not answer.
fn upgrade(broker_config: Option<std::path::PathBuf>, timeout: u64) -> ExitCode {
    let path = broker_config.unwrap_or_else(crate::config::default_broker_config);
    let timeout = std::time::Duration::from_secs(timeout);
    match crate::broker::upgrade::ask(&path, timeout) {
        Ok(o) => {
            eprintln!(
                "stoa: the broker (pid {}) upgraded in place from {} to {}; every user's work goes on (viewers reconnect)",
                o.pid,
                o.from,
                o.to.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err((code, why)) => {
            eprintln!("stoa daemon upgrade: {why}");
            ExitCode::from(code)
        }
    }
}

pub fn daemon(cmd: DaemonCommand) -> ExitCode {
    if let DaemonCommand::Upgrade {
        broker_config,
        timeout,
    } = cmd
    {
        return upgrade(broker_config, timeout);
    }
    done((|| {
        let c = client()?;
        match cmd {
            DaemonCommand::Status { json } => {
                let health = c.get("/health").map_err(|e| e.message)?;
                if json {
                    print(&health);
                } else {
                    daemon_status(&health);
                }
                if health["status"] != "ok" {
                    return Err(format!(
                        "the daemon is {}",
                        super::table::cell(&health["status"])
                    ));
                }
            }
            DaemonCommand::Restart => {
                let before = c
                    .post("/daemon/restart", &json!({}))
                    .map_err(|e| e.message)?;
                // Wait for the new one.
                for _ in 0..100 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    if let Ok(h) = c.get("/health") {
                        if h["status"] == "ok" {
                            eprintln!("daemon restarted (was pid {})", before["pid"]);
                            return Ok(());
                        }
                    }
                }
                return Err("no daemon answered within 10 s after the restart".into());
            }
            DaemonCommand::Upgrade { .. } => unreachable!("handled above"),
            DaemonCommand::RestartWorker { user } => {
                let v = c
                    .post(&format!("/workers/{user}/restart"), &json!({}))
                    .map_err(|e| e.message)?;
                eprintln!(
                    "the worker of {user} (pid {}) is being replaced; its work survives",
                    v["pid"]
                );
            }
        }
        Ok(())
    })())
}

#[cfg(test)]
mod result_summary_tests {
    use super::result_summary;
    use serde_json::json;

    #[test]
    fn says_only_what_the_tool_reported() {
        let r = |v| result_summary(&v);
        assert_eq!(
            r(json!({"kind":"result","is_error":false,"num_turns":2,"cost_usd":0.0123})),
            "[done: 2 turns, $0.0123]"
        );
        assert_eq!(
            r(json!({"kind":"result","is_error":false,"num_turns":null,"cost_usd":0.000141})),
            "[done: $0.0001]"
        );
        assert_eq!(
            r(json!({"kind":"result","is_error":false,"num_turns":1,"cost_usd":null})),
            "[done: 1 turn]"
        );
        assert_eq!(
            r(
                json!({"kind":"result","is_error":false,"num_turns":null,"cost_usd":null,"usage":null})
            ),
            "[done]"
        );
        assert_eq!(r(json!({"kind":"result","is_error":true})), "[error]");
        for v in [json!({}), json!({"num_turns":null,"cost_usd":null})] {
            assert!(!result_summary(&v).contains("null"));
        }
    }
}
