//! Codex: `codex exec --json --skip-git-repo-check -- <prompt>`.
//!
//! Stream lines (codex-rs `exec/src/exec_events.rs`): `thread.started`, `turn.started`,
//! `item.started` / `item.updated` / `item.completed` carrying an `item` whose own `type`
//! is `agent_message`, `reasoning`, `command_execution`, `file_change`, `mcp_tool_call`,
//! `web_search`, `todo_list`, `error`...; then `turn.completed` (with `usage`) or
//! `turn.failed`; a top-level `error` reports a problem the turn may still survive.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use serde_json::{json, Value};

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Invocation, NotJson, RunSpec, Tool,
};

/// The `--sandbox` values of codex; other permission modes have no codex equivalent and
/// are ignored (codex then uses its configured sandbox).
const SANDBOX_MODES: [&str; 3] = ["read-only", "workspace-write", "danger-full-access"];

/// `-c` overrides of every run (before the subcommand).
const HEADLESS: [(&str, &str); 2] = [
    ("check_for_update_on_startup", "false"),
    ("analytics.enabled", "false"),
];

#[derive(Debug, Default)]
pub struct CodexAdapter {
    /// Tool items whose `ToolUse` was already emitted (at `item.started`), so that
    /// `item.completed` adds only the result.
    started: HashSet<String>,
}

impl Adapter for CodexAdapter {
    fn tool(&self) -> Tool {
        Tool::Codex
    }

    fn invocation(&mut self, spec: &RunSpec) -> Invocation {
        let mut argv = argv_prefix(Tool::Codex, spec);
        // A headless run for someone else: no update check (the operator installs codex)
        // and no analytics sent to OpenAI (`ab.chatgpt.com`), whatever ~/.codex says.
        for (key, value) in HEADLESS {
            argv.extend(["-c".to_string(), format!("{key}={value}")]);
        }
        // Codex ignores OPENAI_BASE_URL: a provider of stoa's own, given as `-c` overrides
        // (TOML values), reads its key from OPENAI_API_KEY.
        if let Some(url) = &spec.base_url {
            let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
            for (key, value) in [
                ("model_provider", quoted("stoa")),
                ("model_providers.stoa.name", quoted("stoa")),
                ("model_providers.stoa.base_url", quoted(url)),
                ("model_providers.stoa.env_key", quoted("OPENAI_API_KEY")),
                ("model_providers.stoa.wire_api", quoted("responses")),
                // A gateway or local server speaks HTTP: no websocket attempt first.
                ("model_providers.stoa.supports_websockets", "false".into()),
            ] {
                argv.extend(["-c".to_string(), format!("{key}={value}")]);
            }
        }
        argv.extend(["exec", "--json", "--skip-git-repo-check"].map(String::from));
        if let Some(model) = &spec.model {
            argv.extend(["-m".into(), model.clone()]);
        }
        if let Some(mode) = spec
            .permission_mode
            .as_deref()
            .filter(|m| SANDBOX_MODES.contains(m))
        {
            argv.extend(["-s".into(), mode.to_string()]);
        }
        // Every option goes before the `resume` subcommand: `--json`, `--skip-git-repo-check`
        // and `-m` are global in codex's clap definition, but `-s` belongs to `exec` alone,
        // so `codex exec resume -s ...` would be refused.
        if let Some(id) = &spec.resume {
            argv.push("resume".into());
            argv.push("--".into());
            argv.push(id.clone());
        } else {
            // `--` keeps the `-` below positional, and the subcommands apart.
            argv.push("--".into());
        }
        // A prompt of "-" tells codex to read the prompt from stdin: the prompt never
        // shows in the process table, where every local user could read it.
        argv.push("-".into());
        Invocation {
            argv,
            stdin: Some(spec.prompt.clone()),
            conversation: false,
            env: vec![],
        }
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        let Some(v) = parse_json(line)? else {
            return Ok(vec![]);
        };
        let events = match v.get("type").and_then(Value::as_str) {
            Some("thread.started") => match str_at(&v, "thread_id") {
                Some(agent_session_id) => vec![AgentEvent::SessionStarted {
                    agent_session_id,
                    model: None,
                }],
                None => raw(v),
            },
            Some("item.started") => self.item_started(v),
            Some("item.completed") => self.item_completed(v),
            Some("turn.completed") => vec![AgentEvent::Result {
                is_error: false,
                text: None,
                cost_usd: None,
                num_turns: None,
                usage: v.get("usage").cloned(),
            }],
            Some("turn.failed") => vec![AgentEvent::Result {
                is_error: true,
                text: v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                cost_usd: None,
                num_turns: None,
                usage: None,
            }],
            // Not a Result: codex keeps going after it (stream retries report here) and a
            // fatal one is followed by `turn.failed` carrying the same message.
            Some("error") => match str_at(&v, "message") {
                Some(message) => vec![AgentEvent::Notice { message }],
                None => raw(v),
            },
            // `turn.started`, `item.updated` (partial state, superseded by `item.completed`),
            // and anything newer: kept as they are.
            _ => raw(v),
        };
        Ok(events)
    }
}

impl CodexAdapter {
    fn item_started(&mut self, v: Value) -> Vec<AgentEvent> {
        let item = &v["item"];
        match (tool_use(item), str_at(item, "id")) {
            (Some(event), Some(id)) => {
                self.started.insert(id);
                vec![event]
            }
            _ => raw(v),
        }
    }

    fn item_completed(&mut self, v: Value) -> Vec<AgentEvent> {
        let item = &v["item"];
        match item.get("type").and_then(Value::as_str) {
            Some("agent_message") => {
                vec![AgentEvent::AssistantText {
                    text: str_at(item, "text").unwrap_or_default(),
                    delta: false,
                }]
            }
            // A non-fatal problem (config warnings, unknown model metadata...).
            Some("error") => vec![AgentEvent::Notice {
                message: str_at(item, "message").unwrap_or_default(),
            }],
            _ => {
                let (Some(use_event), Some(result)) = (tool_use(item), tool_result(item)) else {
                    return raw(v); // reasoning, web_search, todo_list, plan, ...
                };
                // `file_change` items (and anything codex did not announce) only complete.
                let seen = str_at(item, "id").is_some_and(|id| self.started.remove(&id));
                if seen {
                    vec![result]
                } else {
                    vec![use_event, result]
                }
            }
        }
    }
}

/// The call half of a tool-like item; `None` for items that are not tool calls.
fn tool_use(item: &Value) -> Option<AgentEvent> {
    let (name, input) = match item.get("type")?.as_str()? {
        "command_execution" => (
            "command_execution".to_string(),
            json!({ "command": item["command"] }),
        ),
        // Named like Claude Code names MCP tools, so one UI can show both.
        "mcp_tool_call" => (
            format!(
                "mcp__{}__{}",
                item["server"].as_str().unwrap_or_default(),
                item["tool"].as_str().unwrap_or_default()
            ),
            item.get("arguments").cloned().unwrap_or(Value::Null),
        ),
        "file_change" => (
            "file_change".to_string(),
            json!({ "changes": item["changes"] }),
        ),
        _ => return None,
    };
    Some(AgentEvent::ToolUse {
        id: str_at(item, "id"),
        name,
        input,
    })
}

/// The result half of a completed tool-like item.
fn tool_result(item: &Value) -> Option<AgentEvent> {
    let status = item
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (content, is_error) = match item.get("type")?.as_str()? {
        "command_execution" => {
            let failed_exit = item
                .get("exit_code")
                .and_then(Value::as_i64)
                .is_some_and(|c| c != 0);
            (
                str_at(item, "aggregated_output").unwrap_or_default(),
                failed_exit || matches!(status, "failed" | "declined"),
            )
        }
        "mcp_tool_call" => match item.pointer("/error/message").and_then(Value::as_str) {
            Some(message) => (message.to_string(), true),
            None => {
                let blocks = item.pointer("/result/content").and_then(Value::as_array);
                let text: Vec<&str> = blocks
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b.get("text").and_then(Value::as_str))
                    .collect();
                (text.join("\n"), status == "failed")
            }
        },
        // The changes themselves are in the ToolUse input; the outcome is the status.
        "file_change" => (status.to_string(), status != "completed"),
        _ => return None,
    };
    Some(AgentEvent::ToolResult {
        tool_use_id: str_at(item, "id"),
        content,
        is_error,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{parse_all, reordered_keys, spec, strings};
    use super::*;

    const TEXT: &str = include_str!("../../../tests/fixtures/agents/codex-0.169.0-text.jsonl");

    #[test]
    fn text_fixture() {
        let events = parse_all(&mut CodexAdapter::default(), TEXT);
        assert_eq!(
            events,
            vec![
                AgentEvent::SessionStarted {
                    agent_session_id: "01a20b5b-c785-73a2-853d-24af3a821581".into(),
                    model: None,
                },
                AgentEvent::Notice {
                    message:
                        "Model metadata for `gpt-mock` not found. Defaulting to fallback metadata; \
                              this can degrade performance and cause issues."
                            .into(),
                },
                AgentEvent::Raw {
                    value: json!({"type": "turn.started"})
                },
                AgentEvent::AssistantText {
                    text: "Hello from the mock server.".into(),
                    delta: false
                },
                AgentEvent::Result {
                    is_error: false,
                    text: None,
                    cost_usd: None,
                    num_turns: None,
                    usage: Some(json!({
                        "input_tokens": 12, "cached_input_tokens": 0, "cache_write_input_tokens": 0,
                        "output_tokens": 7, "reasoning_output_tokens": 0,
                    })),
                },
            ]
        );
    }

    #[test]
    fn key_order_does_not_matter() {
        let reordered: Vec<String> = TEXT.lines().map(reordered_keys).collect();
        assert_eq!(
            parse_all(&mut CodexAdapter::default(), &reordered.join("\n")),
            parse_all(&mut CodexAdapter::default(), TEXT)
        );
    }

    #[test]
    fn command_execution_started_then_completed() {
        let mut a = CodexAdapter::default();
        let started = r#"{"type":"item.started","item":{"id":"item_1","type":"command_execution",
            "command":"bash -lc ls","aggregated_output":"","exit_code":null,"status":"in_progress"}}"#;
        let completed = r#"{"type":"item.completed","item":{"id":"item_1","type":"command_execution",
            "command":"bash -lc ls","aggregated_output":"a.txt\n","exit_code":2,"status":"failed"}}"#;
        assert_eq!(
            a.parse_line(&started.replace('\n', "")).unwrap(),
            vec![AgentEvent::ToolUse {
                id: Some("item_1".into()),
                name: "command_execution".into(),
                input: json!({"command": "bash -lc ls"}),
            }]
        );
        assert_eq!(
            a.parse_line(&completed.replace('\n', "")).unwrap(),
            vec![AgentEvent::ToolResult {
                tool_use_id: Some("item_1".into()),
                content: "a.txt\n".into(),
                is_error: true,
            }]
        );
    }

    #[test]
    fn completed_only_items_get_both_halves() {
        let mut a = CodexAdapter::default();
        let line = json!({"type":"item.completed","item":{"id":"item_4","type":"mcp_tool_call",
            "server":"docs","tool":"search","arguments":{"q":"x"},"status":"completed",
            "result":{"content":[{"type":"text","text":"found"}],"structured_content":null},"error":null}})
        .to_string();
        assert_eq!(
            a.parse_line(&line).unwrap(),
            vec![
                AgentEvent::ToolUse {
                    id: Some("item_4".into()),
                    name: "mcp__docs__search".into(),
                    input: json!({"q": "x"}),
                },
                AgentEvent::ToolResult {
                    tool_use_id: Some("item_4".into()),
                    content: "found".into(),
                    is_error: false
                },
            ]
        );
        let patch = json!({"type":"item.completed","item":{"id":"item_5","type":"file_change",
            "changes":[{"path":"a.rs","kind":"update"}],"status":"completed"}})
        .to_string();
        let events = a.parse_line(&patch).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[1],
            AgentEvent::ToolResult {
                tool_use_id: Some("item_5".into()),
                content: "completed".into(),
                is_error: false
            }
        );
    }

    #[test]
    fn failures() {
        let mut a = CodexAdapter::default();
        assert_eq!(
            a.parse_line(r#"{"type":"error","message":"Reconnecting... 1/5"}"#)
                .unwrap(),
            vec![AgentEvent::Notice {
                message: "Reconnecting... 1/5".into()
            }]
        );
        assert_eq!(
            a.parse_line(r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#)
                .unwrap(),
            vec![AgentEvent::Result {
                is_error: true,
                text: Some("stream disconnected".into()),
                cost_usd: None,
                num_turns: None,
                usage: None,
            }]
        );
        // Reasoning has no event of its own: kept whole.
        let reasoning =
            r#"{"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"hm"}}"#;
        assert!(matches!(
            &a.parse_line(reasoning).unwrap()[..],
            [AgentEvent::Raw { .. }]
        ));
    }

    #[test]
    fn invocation_plain() {
        let inv = CodexAdapter::default().invocation(&spec("hi"));
        assert_eq!(
            inv.argv,
            strings(&[
                "codex",
                "-c",
                "check_for_update_on_startup=false",
                "-c",
                "analytics.enabled=false",
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--",
                "-"
            ])
        );
        assert_eq!(inv.stdin.as_deref(), Some("hi"));
        assert!(inv.env.is_empty());
    }

    #[test]
    fn invocation_with_options_and_resume() {
        let mut s = spec("-rf everything");
        s.model = Some("gpt-5".into());
        s.permission_mode = Some("workspace-write".into());
        s.resume = Some("01a20b5b-c785-73a2-853d-24af3a821581".into());
        assert_eq!(
            CodexAdapter::default().invocation(&s).argv,
            strings(&[
                "codex",
                "-c",
                "check_for_update_on_startup=false",
                "-c",
                "analytics.enabled=false",
                "exec",
                "--json",
                "--skip-git-repo-check",
                "-m",
                "gpt-5",
                "-s",
                "workspace-write",
                "resume",
                "--",
                "01a20b5b-c785-73a2-853d-24af3a821581",
                "-",
            ])
        );
        assert_eq!(
            CodexAdapter::default().invocation(&s).stdin.as_deref(),
            Some("-rf everything")
        );
    }

    #[test]
    fn unknown_permission_mode_is_ignored_and_dash_prompt_uses_stdin() {
        let mut s = spec("-");
        s.permission_mode = Some("acceptEdits".into());
        let inv = CodexAdapter::default().invocation(&s);
        assert_eq!(
            inv.argv,
            strings(&[
                "codex",
                "-c",
                "check_for_update_on_startup=false",
                "-c",
                "analytics.enabled=false",
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--",
                "-"
            ])
        );
        assert_eq!(inv.stdin.as_deref(), Some("-"));
    }

    #[test]
    fn base_url_alone_makes_a_provider() {
        let mut s = spec("hi");
        s.base_url = Some("http://gw.example:8080/v1".into());
        let inv = CodexAdapter::default().invocation(&s);
        let exec_at = inv.argv.iter().position(|a| a == "exec").unwrap();
        let overrides: Vec<&str> = inv.argv[1..exec_at]
            .chunks(2)
            .map(|pair| {
                assert_eq!(pair[0], "-c", "{:?}", inv.argv);
                pair[1].as_str()
            })
            .collect();
        assert_eq!(
            overrides,
            [
                "check_for_update_on_startup=false",
                "analytics.enabled=false",
                "model_provider=\"stoa\"",
                "model_providers.stoa.name=\"stoa\"",
                "model_providers.stoa.base_url=\"http://gw.example:8080/v1\"",
                "model_providers.stoa.env_key=\"OPENAI_API_KEY\"",
                "model_providers.stoa.wire_api=\"responses\"",
                "model_providers.stoa.supports_websockets=false",
            ]
        );
        // The key comes from the environment (a stoa secret), never argv.
        assert!(inv.env.is_empty());
    }
}
