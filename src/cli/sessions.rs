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
        /// The directory the agent works in (must be enterable by the user).
        #[arg(long)]
        worktree: String,
        /// The Unix user (default: your token's).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        permission_mode: Option<String>,
    },
    /// Your sessions (admins: all).
    List,
    /// One session, with its tasks.
    Show { id: String },
    /// Send a prompt; with --wait, print the agent's messages as they come and exit with
    /// the task's outcome.
    Prompt {
        id: String,
        prompt: String,
        #[arg(long)]
        wait: bool,
    },
    /// Stop the running task.
    Stop { id: String },
    /// Delete a session and its messages.
    Delete { id: String },
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// One task.
    Show { id: String },
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store a secret for your agents (the value is read from stdin).
    Set { name: String },
    /// The names of your secrets (values are never shown).
    List,
    /// Remove a secret.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Is the daemon up, with its broker?
    Status,
    /// Start a fresh front (the network-facing process); running tasks and terminals live
    /// in the users' workers and are not touched.
    Restart,
    /// Replace a Unix user's worker (admin); its running tasks and terminals survive.
    RestartWorker {
        /// The Unix user whose worker to replace.
        user: String,
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
            } => {
                let worktree = std::path::absolute(&worktree).map_err(|e| e.to_string())?;
                let body = json!({
                    "agentic_tool": tool, "worktree": worktree, "unix_user": user,
                    "model": model, "permission_mode": permission_mode,
                });
                print(&c.post("/sessions", &body).map_err(|e| e.message)?);
            }
            SessionCommand::List => {
                let list = c.get("/sessions").map_err(|e| e.message)?;
                println!(
                    "{:<36}  {:<12} {:<16} {:<8} worktree",
                    "SESSION", "TOOL", "USER", "STATUS"
                );
                // A worktree is any user's path: no escape sequence reaches this terminal.
                let field = |s: &Value, k: &str| super::escape::field(s[k].as_str().unwrap_or(""));
                for s in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<36}  {:<12} {:<16} {:<8} {}",
                        field(s, "session_id"),
                        field(s, "agentic_tool"),
                        field(s, "unix_user"),
                        field(s, "status"),
                        field(s, "worktree")
                    );
                }
            }
            SessionCommand::Show { id } => {
                let mut session = c.get(&format!("/sessions/{id}")).map_err(|e| e.message)?;
                session["tasks"] = c
                    .get(&format!("/sessions/{id}/tasks"))
                    .map_err(|e| e.message)?;
                print(&session);
            }
            SessionCommand::Prompt { id, prompt, wait } => {
                let task = c
                    .post(
                        &format!("/sessions/{id}/prompt"),
                        &json!({ "prompt": prompt }),
                    )
                    .map_err(|e| e.message)?;
                if !wait {
                    print(&task);
                    return Ok(());
                }
                return follow(&c, &id, task["task_id"].as_str().unwrap_or_default());
            }
            SessionCommand::Stop { id } => print(
                &c.post(&format!("/sessions/{id}/stop"), &json!({}))
                    .map_err(|e| e.message)?,
            ),
            SessionCommand::Delete { id } => {
                c.delete(&format!("/sessions/{id}"))
                    .map_err(|e| e.message)?;
                eprintln!("deleted session {id}");
            }
        }
        Ok(())
    })())
}

/// Follows the session's events until `task_id` ends; prints the agent's messages.
fn follow(c: &Client, session_id: &str, task_id: &str) -> Result<(), String> {
    // Only messages from now on: start after the last stored one.
    let last = c
        .get(&format!(
            "/sessions/{session_id}/messages?after=0&limit=10000"
        ))
        .map_err(|e| e.message)?
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter(|m| m["task_id"] != task_id)
                .filter_map(|m| m["seq"].as_i64())
                .max()
        })
        .unwrap_or(0);
    let body = c
        .stream(&format!("/sessions/{session_id}/events"), last)
        .map_err(|e| e.message)?;
    let mut event = String::new();
    let mut data = String::new();
    for line in BufReader::new(body).lines() {
        let line = line.map_err(|e| format!("event stream broke: {e}"))?;
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        } else if line.is_empty() && !data.is_empty() {
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            data.clear();
            match event.as_str() {
                "message" if value["task_id"] == task_id => show_event(&value["event"]),
                "task" if value["task_id"] == task_id => match value["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some(s @ ("failed" | "stopped")) => {
                        return Err(format!(
                            "task {s}: {}",
                            value["error"].as_str().unwrap_or("")
                        ))
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Err("the event stream ended before the task did".into())
}

fn show_event(e: &Value) {
    // What an agent says can carry escape sequences (from files it read, web pages).
    let text = |k: &str| super::escape::text(e[k].as_str().unwrap_or(""));
    match e["kind"].as_str() {
        Some("assistant_text") => println!("{}", text("text")),
        Some("tool_use") => println!(
            "[tool {}] {}",
            super::escape::field(e["name"].as_str().unwrap_or("?")),
            e["input"]
        ),
        Some("tool_result") => println!("[result] {}", text("content")),
        Some("result") => {
            if let Some(cost) = e["cost_usd"].as_f64() {
                eprintln!("[done: {} turns, ${cost:.4}]", e["num_turns"]);
            }
        }
        Some("notice") => eprintln!("[notice] {}", text("message")),
        _ => {}
    }
}

pub fn task(cmd: TaskCommand) -> ExitCode {
    done((|| {
        let TaskCommand::Show { id } = cmd;
        print(
            &client()?
                .get(&format!("/tasks/{id}"))
                .map_err(|e| e.message)?,
        );
        Ok(())
    })())
}

pub fn secret(cmd: SecretCommand) -> ExitCode {
    done((|| {
        let c = client()?;
        match cmd {
            SecretCommand::Set { name } => {
                if std::io::stdin().is_terminal() {
                    eprintln!("value for {name} (then Enter and Ctrl-D):");
                }
                let mut value = String::new();
                std::io::stdin()
                    .read_to_string(&mut value)
                    .map_err(|e| e.to_string())?;
                c.put_text(&format!("/users/me/secrets/{name}"), &value)
                    .map_err(|e| e.message)?;
                eprintln!("secret {name} stored");
            }
            SecretCommand::List => {
                for n in c.get("/users/me/secrets").map_err(|e| e.message)?["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    println!("{}", n.as_str().unwrap_or(""));
                }
            }
            SecretCommand::Rm { name } => {
                c.delete(&format!("/users/me/secrets/{name}"))
                    .map_err(|e| e.message)?;
                eprintln!("secret {name} removed");
            }
        }
        Ok(())
    })())
}

pub fn daemon(cmd: DaemonCommand) -> ExitCode {
    done((|| {
        let c = client()?;
        match cmd {
            DaemonCommand::Status => print(&c.get("/health").map_err(|e| e.message)?),
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
