//! `stoa approvals …`: the agents' permission requests waiting for you, and your answers.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::Client;
use super::escape;
use super::table;

#[derive(Subcommand)]
pub enum ApprovalCommand {
    /// The requests waiting for an answer (admins: everyone's).
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One request, with the tool's input in full (what allowing it lets the agent do).
    Show {
        /// The request's id.
        id: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let the agent do it (see it first with `show`).
    Allow {
        /// The request's id.
        id: String,
        /// Allow this tool without asking for the rest of the session.
        #[arg(long)]
        for_session: bool,
    },
    /// Refuse; the agent is told, with your message if you give one.
    Deny {
        /// The request's id.
        id: String,
        /// What the agent is told.
        #[arg(long, short)]
        message: Option<String>,
    },
}

pub fn run(cmd: ApprovalCommand) -> ExitCode {
    match answer(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa: {e}");
            ExitCode::FAILURE
        }
    }
}

fn answer(cmd: ApprovalCommand) -> Result<(), String> {
    let c = Client::from_env()?;
    let (id, body) = match cmd {
        ApprovalCommand::List { json } => {
            let list = c.get("/approvals").map_err(|e| e.message)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        table::cell(&a["approval_id"]),
                        table::cell(&a["session_id"]),
                        table::cell(&a["summary"]),
                        expires_in(&a["expires_at"]),
                    ]
                })
                .collect();
            if rows.is_empty() {
                eprintln!("no requests are waiting");
                return Ok(());
            }
            table::print(&["APPROVAL", "SESSION", "WANTS TO", "DENIED IN"], &rows);
            eprintln!(
                "see all of one: stoa approvals show ID; answer: stoa approvals allow|deny ID"
            );
            return Ok(());
        }
        ApprovalCommand::Show { id, json } => {
            let a = c.get(&format!("/approvals/{id}")).map_err(|e| e.message)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
                return Ok(());
            }
            table::fields(&[
                ("approval", table::cell(&a["approval_id"])),
                ("session", table::cell(&a["session_id"])),
                ("task", table::cell(&a["task_id"])),
                ("tool", table::cell(&a["tool"])),
                ("status", table::cell(&a["status"])),
                ("asked", table::cell(&a["created_at"])),
                ("denied in", expires_in(&a["expires_at"])),
                ("decided by", table::cell(&a["decided_by"])),
            ]);
            // All of it: allowing lets the agent do exactly this, every field of it.
            let input = serde_json::to_string_pretty(&a["input"]).unwrap_or_default();
            println!("\ninput:\n{}", escape::text(&input));
            return Ok(());
        }
        ApprovalCommand::Allow { id, for_session } => (
            id,
            json!({ "decision": "allow", "for_session": for_session }),
        ),
        ApprovalCommand::Deny { id, message } => {
            (id, json!({ "decision": "deny", "message": message }))
        }
    };
    let settled = c
        .post(&format!("/approvals/{id}"), &body)
        .map_err(|e| e.message)?;
    eprintln!(
        "{} {}: {}",
        escape::field(settled["status"].as_str().unwrap_or("?")),
        escape::field(&id),
        escape::text(settled["summary"].as_str().unwrap_or(""))
    );
    Ok(())
}

/// "4m 10s" until `expires_at` (seconds since the epoch), or "now".
fn expires_in(at: &Value) -> String {
    let Some(at) = at.as_i64() else {
        return String::new();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match at - now {
        s if s <= 0 => "now".into(),
        s if s < 60 => format!("{s}s"),
        s => format!("{}m {}s", s / 60, s % 60),
    }
}
