//! The Agent Client Protocol (JSON-RPC 2.0, one message per line on stdin/stdout), as a
//! client: stoa starts the agent in its ACP mode, and the adapter walks it through
//! `initialize` → `session/new` (or `session/load` to continue a session) →
//! `session/prompt`, turning `session/update` notifications into stoa's events and the
//! agent's `session/request_permission` requests into permission requests. The prompt's
//! answer (its `stopReason`) is the run's result; stoa then closes stdin and the agent exits.
//!
//! | from the agent                             | becomes                                       |
//! |--------------------------------------------|-----------------------------------------------|
//! | response to `initialize`                   | `session/new` or `session/load` sent          |
//! | response to `session/new` / `session/load` | `SessionStarted`; `session/prompt` sent       |
//! | response to `session/prompt`               | `Result` (an error response: a failed one)    |
//! | `session/update` `agent_message_chunk`     | `AssistantText` (delta)                       |
//! | `session/update` `tool_call`               | `ToolUse`                                     |
//! | `session/update` `tool_call_update` (completed, failed) | `ToolResult`                     |
//! | `session/update` `available_commands_update` | nothing (the agent's slash commands)       |
//! | other updates, while loading: all updates   | `Raw` / nothing (a load replays the history, which stoa has) |
//! | `session/request_permission`               | `PermissionRequest`, answered by `answer`     |
//! | any other request                          | a "method not found" error, at once            |
#![forbid(unsafe_code)]

use serde_json::{json, Value};

use super::{raw, str_at, AgentEvent, Decision, NotJson, PermissionAsk, RunSpec};

/// Our requests' ids.
const INITIALIZE: u64 = 0;
const OPEN: u64 = 1;
const PROMPT: u64 = 2;
/// A new session, when the one to continue could not be loaded.
const OPEN_NEW: u64 = 3;
/// An id the agent gives its request is echoed back: bounded.
const MAX_ID_BYTES: usize = 256;

/// The protocol's client side for one run.
#[derive(Debug, Default)]
pub struct AcpClient {
    prompt: String,
    cwd: String,
    model: Option<String>,
    resume: Option<String>,
    session: Option<String>,
    /// Made for a run of its own (`new`): a client of a run taken over after a restart
    /// knows neither the prompt nor the directory, and must not open a session.
    started: bool,
    /// A `session/load` is replaying the history: its updates are not stored again, until
    /// the agent says its commands (it does once a session is set up; see `gemini.rs`).
    loading: bool,
    owed: Vec<String>,
}

fn request(id: u64, method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string()
}

impl AcpClient {
    pub fn new(spec: &RunSpec) -> AcpClient {
        AcpClient {
            prompt: spec.prompt.clone(),
            cwd: spec.cwd.clone().unwrap_or_else(|| "/".into()),
            model: spec.model.clone(),
            resume: spec.resume.clone(),
            started: true,
            ..AcpClient::default()
        }
    }

    /// The first line: `initialize`, with no file system or terminal offered (the agent
    /// uses its own tools, as the session's user).
    pub fn first_line(&self) -> String {
        let params = json!({
            "protocolVersion": 1,
            "clientCapabilities": { "fs": { "readTextFile": false, "writeTextFile": false }, "terminal": false },
        });
        format!("{}\n", request(INITIALIZE, "initialize", params))
    }

    pub fn take_input(&mut self) -> Vec<String> {
        std::mem::take(&mut self.owed)
    }

    pub fn parse(&mut self, v: Value) -> Result<Vec<AgentEvent>, NotJson> {
        if v.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Ok(raw(v));
        }
        match (v.get("method").and_then(Value::as_str), v.get("id")) {
            (Some(method), Some(id)) => Ok(self.agent_request(method, id.clone(), &v)),
            (Some("session/update"), None) => Ok(self.update(&v)),
            (Some(_), None) => Ok(raw(v)),
            (None, Some(id)) => Ok(self.response(id.as_u64(), &v)),
            (None, None) => Ok(raw(v)),
        }
    }

    fn response(&mut self, id: Option<u64>, v: &Value) -> Vec<AgentEvent> {
        if let Some(error) = v.get("error") {
            let message = str_at(error, "message").unwrap_or_else(|| error.to_string());
            // A session the agent cannot load (Gemini 0.61 refuses some of its own): the
            // prompt still runs, in a new session, and the transcript says so.
            if id == Some(OPEN) && self.started {
                if let Some(lost) = self.resume.take() {
                    self.loading = false;
                    let details = error
                        .pointer("/data/details")
                        .and_then(Value::as_str)
                        .map(|d| d.lines().next().unwrap_or(d).to_string())
                        .unwrap_or_else(|| message.clone());
                    let mcp: [Value; 0] = [];
                    self.owed.push(request(
                        OPEN_NEW,
                        "session/new",
                        json!({ "cwd": self.cwd, "mcpServers": mcp }),
                    ));
                    return vec![AgentEvent::Notice {
                        message: format!(
                            "the agent could not continue its session {lost} ({details}); this prompt starts a new one"
                        ),
                    }];
                }
            }
            return vec![AgentEvent::Result {
                is_error: true,
                text: Some(message),
                cost_usd: None,
                num_turns: None,
                usage: None,
            }];
        }
        let result = v.get("result").cloned().unwrap_or(Value::Null);
        if !self.started && matches!(id, Some(INITIALIZE | OPEN | OPEN_NEW)) {
            return vec![AgentEvent::Result {
                is_error: true,
                text: Some(
                    "the run was taken over by a new worker before its prompt was sent; send it again".into(),
                ),
                cost_usd: None,
                num_turns: None,
                usage: None,
            }];
        }
        match id {
            Some(INITIALIZE) => {
                let mcp: [Value; 0] = [];
                let line = match &self.resume {
                    Some(session) => {
                        self.loading = true;
                        request(
                            OPEN,
                            "session/load",
                            json!({ "sessionId": session, "cwd": self.cwd, "mcpServers": mcp }),
                        )
                    }
                    None => request(
                        OPEN,
                        "session/new",
                        json!({ "cwd": self.cwd, "mcpServers": mcp }),
                    ),
                };
                self.owed.push(line);
                vec![]
            }
            Some(OPEN | OPEN_NEW) => {
                let session = str_at(&result, "sessionId").or_else(|| self.resume.clone());
                let Some(session) = session else {
                    return vec![AgentEvent::Result {
                        is_error: true,
                        text: Some("the agent opened no session".into()),
                        cost_usd: None,
                        num_turns: None,
                        usage: None,
                    }];
                };
                self.session = Some(session.clone());
                self.owed.push(request(
                    PROMPT,
                    "session/prompt",
                    json!({ "sessionId": session, "prompt": [{ "type": "text", "text": self.prompt }] }),
                ));
                vec![AgentEvent::SessionStarted {
                    agent_session_id: session,
                    model: self.model.clone(),
                }]
            }
            Some(PROMPT) => {
                let reason = str_at(&result, "stopReason");
                let is_error = !matches!(reason.as_deref(), Some("end_turn"));
                vec![AgentEvent::Result {
                    is_error,
                    text: is_error.then(|| {
                        format!(
                            "the agent stopped: {}",
                            reason.as_deref().unwrap_or("no reason")
                        )
                    }),
                    cost_usd: None,
                    num_turns: None,
                    usage: result.pointer("/_meta/quota/token_count").cloned(),
                }]
            }
            _ => raw(v.clone()),
        }
    }

    fn update(&mut self, v: &Value) -> Vec<AgentEvent> {
        let Some(update) = v.pointer("/params/update") else {
            return raw(v.clone());
        };
        if self.loading {
            if update.get("sessionUpdate").and_then(Value::as_str)
                == Some("available_commands_update")
            {
                self.loading = false;
            }
            return vec![]; // the history stoa stored the first time
        }
        let text_of = |content: &Value| -> String {
            match content {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|c| {
                        c.pointer("/content/text")
                            .or_else(|| c.get("text"))
                            .and_then(Value::as_str)
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                other => other
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }
        };
        match update.get("sessionUpdate").and_then(Value::as_str) {
            Some("agent_message_chunk") => vec![AgentEvent::AssistantText {
                text: text_of(update.get("content").unwrap_or(&Value::Null)),
                delta: true,
            }],
            Some("tool_call") => vec![AgentEvent::ToolUse {
                id: str_at(update, "toolCallId"),
                name: str_at(update, "kind").unwrap_or_else(|| "tool".into()),
                input: update.get("rawInput").cloned().unwrap_or_else(
                    || json!({ "title": update.get("title"), "content": update.get("content") }),
                ),
            }],
            Some("tool_call_update")
                if matches!(
                    update.get("status").and_then(Value::as_str),
                    Some("completed" | "failed")
                ) =>
            {
                vec![AgentEvent::ToolResult {
                    tool_use_id: str_at(update, "toolCallId"),
                    content: text_of(update.get("content").unwrap_or(&Value::Null)),
                    is_error: update.get("status").and_then(Value::as_str) == Some("failed"),
                }]
            }
            // The agent's slash commands: nothing a transcript needs.
            Some("available_commands_update") => vec![],
            _ => vec![AgentEvent::Raw {
                value: update.clone(),
            }],
        }
    }

    fn agent_request(&mut self, method: &str, id: Value, v: &Value) -> Vec<AgentEvent> {
        let echo_ok = id.to_string().len() <= MAX_ID_BYTES;
        // Whatever the replay was, a question is live.
        self.loading = false;
        if method == "session/request_permission" && echo_ok {
            let params = v.get("params").cloned().unwrap_or(Value::Null);
            let call = params.get("toolCall").cloned().unwrap_or(Value::Null);
            let option = |kind: &str| {
                params
                    .get("options")
                    .and_then(Value::as_array)
                    .and_then(|o| {
                        o.iter()
                            .find(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
                    })
                    .and_then(|o| str_at(o, "optionId"))
            };
            let (allow, deny) = (option("allow_once"), option("reject_once"));
            if let (Some(allow), Some(deny)) = (allow, deny) {
                let title = str_at(&call, "title");
                return vec![AgentEvent::PermissionRequest(PermissionAsk {
                    request_id: id.to_string(),
                    tool: str_at(&call, "kind").unwrap_or_else(|| "tool".into()),
                    input: call.get("rawInput").cloned().unwrap_or_else(|| {
                        json!({ "title": title, "content": call.get("content"), "locations": call.get("locations") })
                    }),
                    description: title,
                    tool_use_id: str_at(&call, "toolCallId"),
                    reply: json!({ "id": id, "allow": allow, "deny": deny }),
                })];
            }
        }
        if echo_ok {
            self.owed.push(
                json!({ "jsonrpc": "2.0", "id": id,
                    "error": { "code": -32601, "message": format!("stoa does not serve {method}") } })
                .to_string(),
            );
        }
        raw(v.clone())
    }

    /// The response to a `session/request_permission`, from what was kept of it.
    pub fn answer(ask: &PermissionAsk, decision: &Decision) -> Option<String> {
        let option = match decision {
            Decision::Allow => ask.reply.get("allow"),
            Decision::Deny { .. } => ask.reply.get("deny"),
        }?;
        let id = ask.reply.get("id")?;
        Some(
            json!({ "jsonrpc": "2.0", "id": id,
                "result": { "outcome": { "outcome": "selected", "optionId": option } } })
            .to_string(),
        )
    }
}
