//! OpenCode: `opencode run --format json`, prompt on stdin.
//!
//! Stream lines (opencode `src/cli/cmd/run.ts`) are `{type, timestamp, sessionID, part}`
//! with `type` one of `step_start`, `text` (a finished text part), `tool_use` (a tool part
//! that completed or failed, call and outcome together), `reasoning` (with `--thinking`),
//! `step_finish` (per model step: `reason`, `tokens`, `cost`), and `error` (`{error}`).
#![forbid(unsafe_code)]

use serde_json::{json, Value};

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Invocation, NotJson, RunSpec, Tool,
};

#[derive(Debug, Default)]
pub struct OpenCodeAdapter {
    /// Whether `SessionStarted` was emitted: every line repeats the session id.
    announced: bool,
    /// Cost and token counts summed over the run's steps so far.
    cost_usd: Option<f64>,
    tokens: Option<Value>,
}

impl Adapter for OpenCodeAdapter {
    fn tool(&self) -> Tool {
        Tool::OpenCode
    }

    fn invocation(&mut self, spec: &RunSpec) -> Invocation {
        let mut argv = argv_prefix(Tool::OpenCode, spec);
        argv.extend(["run", "--format", "json"].map(String::from));
        if let Some(model) = &spec.model {
            argv.extend(["-m".into(), model.clone()]); // provider/model
        }
        if let Some(id) = &spec.resume {
            argv.extend(["--session".into(), id.clone()]);
        }
        // OpenCode has no permission-mode flag for `run`: `permission_mode` is ignored.
        Invocation {
            argv,
            // Not argv: `opencode run` joins its message words back together and wraps each
            // one that holds a space in double quotes (escaping inner quotes), so the model
            // would get `"fix the bug"` quoted. Piped stdin is sent as it is, and cannot be
            // mistaken for an option either.
            stdin: Some(spec.prompt.clone()),
            conversation: false,
            env: [("OPENCODE_DISABLE_AUTOUPDATE".to_string(), "1".to_string())]
                .into_iter()
                .chain(spec.base_url.as_ref().map(|url| {
                    // The provider is the model's (`provider/model`), Anthropic's by default.
                    let provider = spec
                        .model
                        .as_deref()
                        .and_then(|m| m.split_once('/'))
                        .map_or("anthropic", |(p, _)| p);
                    let config = serde_json::json!({
                        "provider": { provider: { "options": { "baseURL": url } } },
                        "autoupdate": false,
                        "share": "disabled",
                    });
                    ("OPENCODE_CONFIG_CONTENT".to_string(), config.to_string())
                }))
                // With a base URL of its own, no catalogue from models.dev either (an
                // outside fetch at every start); opencode then uses the one it ships.
                .chain(
                    spec.base_url
                        .as_ref()
                        .map(|_| ("OPENCODE_DISABLE_MODELS_FETCH".to_string(), "1".to_string())),
                )
                .collect(),
        }
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        let Some(v) = parse_json(line)? else {
            return Ok(vec![]);
        };
        let mut events = Vec::new();
        // Normally announced by the first `step_start`; an `error` may come first.
        let announcing = !self.announced && v.get("sessionID").is_some_and(Value::is_string);
        if announcing {
            self.announced = true;
            let agent_session_id = str_at(&v, "sessionID").unwrap_or_default();
            events.push(AgentEvent::SessionStarted {
                agent_session_id,
                model: None,
            });
        }
        let part = &v["part"];
        match v.get("type").and_then(Value::as_str) {
            Some("step_start") if announcing => {}
            Some("text") => events.push(AgentEvent::AssistantText {
                text: str_at(part, "text").unwrap_or_default(),
                delta: false,
            }),
            Some("tool_use") => {
                let state = &part["state"];
                let failed = state.get("status").and_then(Value::as_str) == Some("error");
                let content = if failed {
                    str_at(state, "error")
                } else {
                    str_at(state, "output")
                };
                events.push(AgentEvent::ToolUse {
                    id: str_at(part, "callID"),
                    name: str_at(part, "tool").unwrap_or_default(),
                    input: state.get("input").cloned().unwrap_or(Value::Null),
                });
                events.push(AgentEvent::ToolResult {
                    tool_use_id: str_at(part, "callID"),
                    content: content.unwrap_or_default(),
                    is_error: failed,
                });
            }
            Some("step_finish") => {
                if let Some(cost) = part.get("cost").and_then(Value::as_f64) {
                    *self.cost_usd.get_or_insert(0.0) += cost;
                }
                if let Some(tokens) = part.get("tokens") {
                    add_into(self.tokens.get_or_insert(Value::Null), tokens);
                }
                // A step that ends in tool calls is followed by another step; only the
                // step that ends the run is its Result, carrying the whole run's totals.
                if part.get("reason").and_then(Value::as_str) == Some("tool-calls") {
                    events.push(AgentEvent::Raw { value: v });
                } else {
                    events.push(self.result(false, None));
                }
            }
            // A session error ends the run (opencode then exits 1).
            Some("error") => events.push(self.result(true, Some(error_message(&v["error"])))),
            // Later `step_start`s, `reasoning`, newer types.
            _ => events.extend(raw(v)),
        }
        Ok(events)
    }
}

impl OpenCodeAdapter {
    fn result(&self, is_error: bool, text: Option<String>) -> AgentEvent {
        AgentEvent::Result {
            is_error,
            text,
            cost_usd: self.cost_usd,
            num_turns: None,
            usage: self.tokens.clone(),
        }
    }
}

/// Adds every number of `add` into `acc`, recursing into objects (token counts nest, e.g.
/// `cache.read`); anything that is not a number or object is replaced.
fn add_into(acc: &mut Value, add: &Value) {
    match (&mut *acc, add) {
        (Value::Object(acc), Value::Object(add)) => {
            for (key, value) in add {
                add_into(acc.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            *acc = match (a.as_u64(), b.as_u64()) {
                (Some(a), Some(b)) => a.saturating_add(b).into(),
                _ => json!(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)),
            };
        }
        _ => *acc = add.clone(),
    }
}

/// The readable part of an opencode error (`{name, data: {message}}`).
fn error_message(error: &Value) -> String {
    error
        .pointer("/data/message")
        .or_else(|| error.get("message"))
        .or_else(|| error.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{parse_all, reordered_keys, spec, strings};
    use super::*;

    const TEXT: &str = include_str!("../../../tests/fixtures/agents/opencode-1.18.33-text.jsonl");
    const SESSION: &str = "ses_df4a211dcffeQqg4uBOIY97iDM";

    #[test]
    fn text_fixture() {
        assert_eq!(
            parse_all(&mut OpenCodeAdapter::default(), TEXT),
            vec![
                AgentEvent::SessionStarted {
                    agent_session_id: SESSION.into(),
                    model: None
                },
                AgentEvent::AssistantText {
                    text: "Hello from the mock server.".into(),
                    delta: false
                },
                AgentEvent::Result {
                    is_error: false,
                    text: None,
                    cost_usd: Some(0.000141),
                    num_turns: None,
                    usage: Some(
                        json!({"total":19,"input":12,"output":7,"reasoning":0,"cache":{"write":0,"read":0}})
                    ),
                },
            ]
        );
    }

    #[test]
    fn key_order_does_not_matter() {
        let reordered: Vec<String> = TEXT.lines().map(reordered_keys).collect();
        assert_eq!(
            parse_all(&mut OpenCodeAdapter::default(), &reordered.join("\n")),
            parse_all(&mut OpenCodeAdapter::default(), TEXT)
        );
    }

    fn line(kind: &str, part: Value) -> String {
        json!({"type": kind, "timestamp": 1, "sessionID": SESSION, "part": part}).to_string()
    }

    #[test]
    fn tool_step_then_final_step() {
        let mut a = OpenCodeAdapter::default();
        let lines = [
            line("step_start", json!({"type": "step-start"})),
            line(
                "tool_use",
                json!({"type":"tool","callID":"call_1","tool":"bash",
                    "state":{"status":"completed","input":{"command":"ls"},"output":"a.txt\n"}}),
            ),
            line(
                "tool_use",
                json!({"type":"tool","callID":"call_2","tool":"read",
                    "state":{"status":"error","input":{"filePath":"x"},"error":"not found"}}),
            ),
            line(
                "step_finish",
                json!({"type":"step-finish","reason":"tool-calls","cost":0.25,"tokens":{"input":10,"cache":{"read":1}}}),
            ),
            line("step_start", json!({"type": "step-start"})),
            line(
                "step_finish",
                json!({"type":"step-finish","reason":"stop","cost":0.5,"tokens":{"input":20,"cache":{"read":2}}}),
            ),
        ];
        let events: Vec<AgentEvent> = lines
            .iter()
            .flat_map(|l| a.parse_line(l).unwrap())
            .collect();
        assert_eq!(events.len(), 8);
        assert_eq!(
            events[0],
            AgentEvent::SessionStarted {
                agent_session_id: SESSION.into(),
                model: None
            }
        );
        assert_eq!(
            events[1..5],
            [
                AgentEvent::ToolUse {
                    id: Some("call_1".into()),
                    name: "bash".into(),
                    input: json!({"command": "ls"})
                },
                AgentEvent::ToolResult {
                    tool_use_id: Some("call_1".into()),
                    content: "a.txt\n".into(),
                    is_error: false
                },
                AgentEvent::ToolUse {
                    id: Some("call_2".into()),
                    name: "read".into(),
                    input: json!({"filePath": "x"})
                },
                AgentEvent::ToolResult {
                    tool_use_id: Some("call_2".into()),
                    content: "not found".into(),
                    is_error: true
                },
            ]
        );
        // The tool-calls step and the second step_start are kept raw.
        assert!(
            matches!(&events[5], AgentEvent::Raw { value } if value["part"]["reason"] == "tool-calls")
        );
        assert!(matches!(&events[6], AgentEvent::Raw { value } if value["type"] == "step_start"));
        assert_eq!(
            events[7],
            AgentEvent::Result {
                is_error: false,
                text: None,
                cost_usd: Some(0.75),
                num_turns: None,
                usage: Some(json!({"input": 30, "cache": {"read": 3}})),
            }
        );
    }

    #[test]
    fn error_before_any_step() {
        let mut a = OpenCodeAdapter::default();
        let error = json!({"type":"error","timestamp":1,"sessionID":SESSION,
            "error":{"name":"APIError","data":{"message":"invalid x-api-key"}}})
        .to_string();
        assert_eq!(
            a.parse_line(&error).unwrap(),
            vec![
                AgentEvent::SessionStarted {
                    agent_session_id: SESSION.into(),
                    model: None
                },
                AgentEvent::Result {
                    is_error: true,
                    text: Some("invalid x-api-key".into()),
                    cost_usd: None,
                    num_turns: None,
                    usage: None,
                },
            ]
        );
    }

    #[test]
    fn invocation_plain() {
        let inv = OpenCodeAdapter::default().invocation(&spec("say \"hi\" twice"));
        assert_eq!(inv.argv, strings(&["opencode", "run", "--format", "json"]));
        assert_eq!(inv.stdin.as_deref(), Some("say \"hi\" twice"));
        assert_eq!(
            inv.env,
            vec![("OPENCODE_DISABLE_AUTOUPDATE".into(), "1".into())]
        );
    }

    #[test]
    fn invocation_with_options() {
        let mut s = spec("-m is not a flag here");
        s.model = Some("anthropic/claude-sonnet-4-5".into());
        s.resume = Some(SESSION.into());
        s.permission_mode = Some("plan".into());
        let inv = OpenCodeAdapter::default().invocation(&s);
        assert_eq!(
            inv.argv,
            strings(&[
                "opencode",
                "run",
                "--format",
                "json",
                "-m",
                "anthropic/claude-sonnet-4-5",
                "--session",
                SESSION
            ])
        );
        assert_eq!(inv.stdin.as_deref(), Some("-m is not a flag here"));
    }

    #[test]
    fn base_url_alone_configures_the_models_provider() {
        let mut s = spec("hi");
        s.base_url = Some("http://127.0.0.1:8765/v1".into());
        s.model = Some("anthropic/claude-sonnet-4-5".into());
        let inv = OpenCodeAdapter::default().invocation(&s);
        let env = |name: &str| {
            inv.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(env("OPENCODE_DISABLE_AUTOUPDATE").as_deref(), Some("1"));
        assert_eq!(env("OPENCODE_DISABLE_MODELS_FETCH").as_deref(), Some("1"));
        let config: Value = serde_json::from_str(&env("OPENCODE_CONFIG_CONTENT").unwrap()).unwrap();
        assert_eq!(
            config["provider"]["anthropic"]["options"]["baseURL"],
            "http://127.0.0.1:8765/v1"
        );
        // No key in the config: opencode reads ANTHROPIC_API_KEY (a stoa secret).
        assert!(!config.to_string().to_lowercase().contains("apikey"));
        assert_eq!(config["share"], "disabled");
    }
}
