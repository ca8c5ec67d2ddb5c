//! Claude Code in its SDK control protocol: `claude -p --input-format stream-json
//! --output-format stream-json --verbose --permission-prompt-tool stdio`. The prompt is one
//! `user` line on stdin, which stays open: when the CLI wants to use a tool its permission
//! mode does not allow outright, it writes a `control_request` (`can_use_tool`) and waits
//! for stoa's `control_response` on stdin. After the final `result` stoa closes stdin and
//! the CLI exits.
//!
//! Stream lines are `system` (subtype `init` first), `assistant` and `user` messages in the
//! Anthropic Messages shape (`message.content[]` blocks), `control_request`s, and one final
//! `result`.
#![forbid(unsafe_code)]

use serde_json::Value;

use serde_json::json;

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Decision, Invocation, NotJson,
    PermissionAsk, RunSpec, Tool,
};

#[derive(Debug, Default)]
pub struct ClaudeCodeAdapter {
    /// Answers owed for control requests stoa does not serve.
    owed: Vec<String>,
}

/// A control request's `request_id` is echoed back: bounded so a hostile line cannot make
/// the answer large.
const MAX_REQUEST_ID: usize = 256;

impl Adapter for ClaudeCodeAdapter {
    fn tool(&self) -> Tool {
        Tool::ClaudeCode
    }

    fn invocation(&mut self, spec: &RunSpec) -> Invocation {
        let mut argv = argv_prefix(Tool::ClaudeCode, spec);
        // `--verbose` is required by `-p` with stream-json. The prompt goes on stdin, so it
        // is never parsed as an option whatever it starts with, and has no argv size limit.
        argv.extend(
            [
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-prompt-tool",
                "stdio",
            ]
            .map(String::from),
        );
        for (flag, value) in [
            ("--model", &spec.model),
            ("--permission-mode", &spec.permission_mode),
            ("--resume", &spec.resume),
        ] {
            if let Some(value) = value {
                argv.extend([flag.to_string(), value.clone()]);
            }
        }
        let prompt = json!({
            "type": "user",
            "message": { "role": "user", "content": [{ "type": "text", "text": spec.prompt }] },
        });
        Invocation {
            argv,
            stdin: Some(format!("{prompt}\n")),
            conversation: true,
            // Turns off the auto-updater, telemetry and error reporting: a headless run as
            // a Unix user must not rewrite its own install or call out to anything but the
            // model API (the fixtures were recorded this way).
            env: [(
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_string(),
                "1".to_string(),
            )]
            .into_iter()
            .chain(
                spec.base_url
                    .iter()
                    .map(|u| ("ANTHROPIC_BASE_URL".to_string(), u.clone())),
            )
            .collect(),
        }
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        let Some(v) = parse_json(line)? else {
            return Ok(vec![]);
        };
        let events = match v.get("type").and_then(Value::as_str) {
            Some("system") if v.get("subtype").and_then(Value::as_str) == Some("init") => {
                match str_at(&v, "session_id") {
                    Some(agent_session_id) => vec![AgentEvent::SessionStarted {
                        agent_session_id,
                        model: str_at(&v, "model"),
                    }],
                    None => raw(v),
                }
            }
            Some("assistant") | Some("user") => content_events(v),
            Some("result") => vec![result(&v)],
            Some("control_request") => self.control_request(v),
            // Other `system` subtypes (retries, compaction, hooks...) and anything newer.
            _ => raw(v),
        };
        Ok(events)
    }

    fn take_input(&mut self) -> Vec<String> {
        std::mem::take(&mut self.owed)
    }

    fn answer(&self, ask: &PermissionAsk, decision: &Decision) -> Option<String> {
        let response = match decision {
            // The input as asked: stoa allows exactly what was shown.
            Decision::Allow => json!({ "behavior": "allow", "updatedInput": ask.input }),
            Decision::Deny { message } => json!({ "behavior": "deny", "message": message }),
        };
        Some(control_response(
            &ask.request_id,
            json!({ "subtype": "success", "response": response }),
        ))
    }
}

impl ClaudeCodeAdapter {
    /// A `can_use_tool` request is a permission request; any other is answered with an
    /// error at once (stoa registers no hooks or MCP servers, so none should come), so the
    /// CLI never waits on it. Kept in the transcript either way.
    fn control_request(&mut self, v: Value) -> Vec<AgentEvent> {
        let Some(request_id) = str_at(&v, "request_id").filter(|id| id.len() <= MAX_REQUEST_ID)
        else {
            return raw(v);
        };
        let request = v.get("request").cloned().unwrap_or(Value::Null);
        let tool = str_at(&request, "tool_name");
        match (str_at(&request, "subtype").as_deref(), tool) {
            (Some("can_use_tool"), Some(tool)) => {
                vec![AgentEvent::PermissionRequest(PermissionAsk {
                    request_id,
                    tool,
                    input: request.get("input").cloned().unwrap_or(Value::Null),
                    description: str_at(&request, "description"),
                    tool_use_id: str_at(&request, "tool_use_id"),
                    reply: Value::Null,
                })]
            }
            (subtype, _) => {
                let error = format!(
                    "stoa does not serve the control request {:?}",
                    subtype.unwrap_or("(none)")
                );
                self.owed.push(control_response(
                    &request_id,
                    json!({ "subtype": "error", "error": error }),
                ));
                raw(v)
            }
        }
    }
}

/// A `control_response` line for `request_id` with `body`'s fields.
fn control_response(request_id: &str, mut body: Value) -> String {
    body["request_id"] = json!(request_id);
    json!({ "type": "control_response", "response": body }).to_string()
}

/// One event per content block of an `assistant` or `user` message. Blocks stoa has no
/// event for (`thinking`, `redacted_thinking`, images, a user's own text...) are kept as
/// `Raw` blocks rather than dropped; a message without a block array is `Raw` whole.
fn content_events(v: Value) -> Vec<AgentEvent> {
    let Some(blocks) = v.pointer("/message/content").and_then(Value::as_array) else {
        return raw(v);
    };
    blocks
        .iter()
        .map(|block| match block.get("type").and_then(Value::as_str) {
            Some("text") => AgentEvent::AssistantText {
                text: str_at(block, "text").unwrap_or_default(),
                delta: false,
            },
            Some("tool_use") => AgentEvent::ToolUse {
                id: str_at(block, "id"),
                name: str_at(block, "name").unwrap_or_default(),
                input: block.get("input").cloned().unwrap_or(Value::Null),
            },
            Some("tool_result") => AgentEvent::ToolResult {
                tool_use_id: str_at(block, "tool_use_id"),
                content: block.get("content").map(content_text).unwrap_or_default(),
                is_error: block
                    .get("is_error")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            _ => AgentEvent::Raw {
                value: block.clone(),
            },
        })
        .collect()
}

/// A tool result's content: a plain string, or the text blocks of a block array joined
/// by newlines (other blocks, e.g. images, have no text to show).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn result(v: &Value) -> AgentEvent {
    let is_error = v
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| v.get("subtype").and_then(Value::as_str) != Some("success"));
    // Error results (`error_max_turns`, `error_during_execution`) may carry no `result`
    // text but an `errors` list instead.
    let text = str_at(v, "result").or_else(|| {
        let errors = v.get("errors")?.as_array()?;
        let lines: Vec<&str> = errors.iter().filter_map(Value::as_str).collect();
        (!lines.is_empty()).then(|| lines.join("\n"))
    });
    AgentEvent::Result {
        is_error,
        text,
        cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
        num_turns: v.get("num_turns").and_then(Value::as_u64),
        usage: v.get("usage").cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{parse_all, reordered_keys, spec, strings};
    use super::*;
    use serde_json::json;

    const TEXT_197: &str =
        include_str!("../../../tests/fixtures/agents/claude-code-2.1.197-text.jsonl");
    const BASH_197: &str =
        include_str!("../../../tests/fixtures/agents/claude-code-2.1.197-bash-tool.jsonl");
    const TEXT_330: &str =
        include_str!("../../../tests/fixtures/agents/claude-code-2.1.330-text.jsonl");

    fn hello_events(session: &str, model: &str, cost: f64) -> Vec<AgentEvent> {
        vec![
            AgentEvent::SessionStarted {
                agent_session_id: session.into(),
                model: Some(model.into()),
            },
            AgentEvent::AssistantText {
                text: "Hello from the mock server.".into(),
                delta: false,
            },
            AgentEvent::Result {
                is_error: false,
                text: Some("Hello from the mock server.".into()),
                cost_usd: Some(cost),
                num_turns: Some(1),
                usage: None, // compared separately below
            },
        ]
    }

    /// The events with `Result.usage` blanked, after checking it carries the token counts.
    fn without_usage(mut events: Vec<AgentEvent>, output_tokens: u64) -> Vec<AgentEvent> {
        if let Some(AgentEvent::Result { usage, .. }) = events.last_mut() {
            let u = usage.take().expect("usage");
            assert_eq!(u["output_tokens"], json!(output_tokens));
        }
        events
    }

    #[test]
    fn text_fixture_2_1_197() {
        let events = parse_all(&mut ClaudeCodeAdapter::default(), TEXT_197);
        assert_eq!(
            without_usage(events, 7),
            hello_events(
                "c4e8bf3d-6a0e-406e-870c-c65c3b741252",
                "claude-opus-4-8[1m]",
                0.000235
            )
        );
    }

    #[test]
    fn text_fixture_2_1_330_has_type_late_in_result() {
        // 2.1.330 writes the result line with `type` in the middle of its keys.
        let events = parse_all(&mut ClaudeCodeAdapter::default(), TEXT_330);
        assert_eq!(
            without_usage(events, 7),
            hello_events(
                "33cc7596-63fa-46e6-a5ef-d229f392d902",
                "claude-opus-5-5",
                0.000188
            )
        );
    }

    #[test]
    fn bash_tool_fixture() {
        let events = parse_all(&mut ClaudeCodeAdapter::default(), BASH_197);
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0],
            AgentEvent::SessionStarted {
                agent_session_id: "53359e04-ce14-4278-ac4f-40df05806dca".into(),
                model: Some("claude-opus-4-8[1m]".into()),
            }
        );
        assert_eq!(
            events[1],
            AgentEvent::ToolUse {
                id: Some("toolu_mock_1".into()),
                name: "Bash".into(),
                input: json!({
                    "command": "id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt",
                    "description": "write whoami",
                }),
            }
        );
        assert_eq!(
            events[2],
            AgentEvent::ToolResult {
                tool_use_id: Some("toolu_mock_1".into()),
                content: "alice\n/srv/work/demo".into(),
                is_error: false,
            }
        );
        assert_eq!(
            events[3],
            AgentEvent::AssistantText {
                text: "Hello from the mock server.".into(),
                delta: false
            }
        );
        let AgentEvent::Result {
            is_error,
            text,
            cost_usd,
            num_turns,
            ..
        } = &events[4]
        else {
            panic!("last event is {:?}", events[4]);
        };
        assert!(!is_error);
        assert_eq!(text.as_deref(), Some("Hello from the mock server."));
        assert_eq!((*cost_usd, *num_turns), (Some(0.000795), Some(2)));
    }

    #[test]
    fn key_order_does_not_matter() {
        for fixture in [TEXT_197, BASH_197, TEXT_330] {
            let reordered: Vec<String> = fixture.lines().map(reordered_keys).collect();
            assert_eq!(
                parse_all(&mut ClaudeCodeAdapter::default(), &reordered.join("\n")),
                parse_all(&mut ClaudeCodeAdapter::default(), fixture)
            );
        }
    }

    #[test]
    fn blocks_without_an_event_stay_raw() {
        let line = r#"{"type":"assistant","message":{"content":[
            {"type":"thinking","thinking":"hmm","signature":"x"},{"type":"text","text":"ok"}]}}"#
            .replace('\n', "");
        assert_eq!(
            ClaudeCodeAdapter::default().parse_line(&line).unwrap(),
            vec![
                AgentEvent::Raw {
                    value: json!({"type":"thinking","thinking":"hmm","signature":"x"})
                },
                AgentEvent::AssistantText {
                    text: "ok".into(),
                    delta: false
                },
            ]
        );
        let retry = r#"{"type":"system","subtype":"api_retry","attempt":1}"#;
        assert_eq!(
            ClaudeCodeAdapter::default().parse_line(retry).unwrap(),
            vec![AgentEvent::Raw {
                value: serde_json::from_str(retry).unwrap()
            }]
        );
    }

    #[test]
    fn tool_result_block_arrays_and_errors() {
        let line = json!({"type":"user","message":{"role":"user","content":[{
            "type":"tool_result","tool_use_id":"t1","is_error":true,
            "content":[{"type":"text","text":"line 1"},{"type":"image"},{"type":"text","text":"line 2"}]
        }]}})
        .to_string();
        assert_eq!(
            ClaudeCodeAdapter::default().parse_line(&line).unwrap(),
            vec![AgentEvent::ToolResult {
                tool_use_id: Some("t1".into()),
                content: "line 1\nline 2".into(),
                is_error: true,
            }]
        );
    }

    #[test]
    fn error_result() {
        let line = json!({"type":"result","subtype":"error_max_turns","is_error":true,
            "num_turns":3,"total_cost_usd":0.5,"errors":["max turns reached"]})
        .to_string();
        assert_eq!(
            ClaudeCodeAdapter::default().parse_line(&line).unwrap(),
            vec![AgentEvent::Result {
                is_error: true,
                text: Some("max turns reached".into()),
                cost_usd: Some(0.5),
                num_turns: Some(3),
                usage: None,
            }]
        );
    }

    #[test]
    fn invocation_plain() {
        let inv = ClaudeCodeAdapter::default().invocation(&spec("hi"));
        assert_eq!(
            inv.argv,
            strings(&[
                "claude",
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-prompt-tool",
                "stdio",
            ])
        );
        assert!(inv.conversation);
        let line: Value = serde_json::from_str(inv.stdin.as_deref().unwrap().trim_end()).unwrap();
        assert_eq!(
            line,
            json!({"type":"user","message":{"role":"user","content":[{"type":"text","text":"hi"}]}})
        );
        assert!(inv.stdin.unwrap().ends_with('\n'));
        assert_eq!(
            inv.env,
            vec![(
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into()
            )]
        );
    }

    #[test]
    fn invocation_with_options() {
        let mut s = spec("--help me");
        s.model = Some("claude-sonnet-4-5".into());
        s.permission_mode = Some("acceptEdits".into());
        s.resume = Some("c4e8bf3d-6a0e-406e-870c-c65c3b741252".into());
        let inv = ClaudeCodeAdapter::default().invocation(&s);
        assert_eq!(
            inv.argv,
            strings(&[
                "claude",
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-prompt-tool",
                "stdio",
                "--model",
                "claude-sonnet-4-5",
                "--permission-mode",
                "acceptEdits",
                "--resume",
                "c4e8bf3d-6a0e-406e-870c-c65c3b741252",
            ])
        );
        // A prompt that looks like a flag never reaches argv.
        assert!(!inv.argv.iter().any(|a| a.contains("help me")));
        assert!(inv.stdin.unwrap().contains("\"--help me\""));
    }

    const ALLOW_197: &str =
        include_str!("../../../tests/fixtures/agents/claude-code-2.1.197-approval-allow.jsonl");
    const DENY_197: &str =
        include_str!("../../../tests/fixtures/agents/claude-code-2.1.197-approval-deny.jsonl");

    fn the_ask(events: &[AgentEvent]) -> PermissionAsk {
        let asks: Vec<&PermissionAsk> = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::PermissionRequest(ask) => Some(ask),
                _ => None,
            })
            .collect();
        assert_eq!(asks.len(), 1, "{events:?}");
        asks[0].clone()
    }

    #[test]
    fn a_recorded_permission_request_and_its_answers() {
        let mut adapter = ClaudeCodeAdapter::default();
        let events = parse_all(&mut adapter, ALLOW_197);
        let ask = the_ask(&events);
        assert_eq!(ask.tool, "Bash");
        assert_eq!(ask.tool_use_id.as_deref(), Some("toolu_mock_1"));
        assert_eq!(ask.description.as_deref(), Some("write whoami"));
        assert_eq!(
            ask.input["command"],
            "id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt"
        );
        assert!(adapter.take_input().is_empty(), "nothing owed");
        // The answer the CLI took in the recording: allow with the input as asked.
        let allow: Value =
            serde_json::from_str(&adapter.answer(&ask, &Decision::Allow).unwrap()).unwrap();
        assert_eq!(
            allow,
            json!({"type":"control_response","response":{"subtype":"success",
                "request_id": ask.request_id, "response":{"behavior":"allow","updatedInput": ask.input}}})
        );
        // Allowed, the tool ran: its result is not an error.
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::ToolResult { is_error: false, content, .. } if content == "alice\n/home/alice")));

        let events = parse_all(&mut ClaudeCodeAdapter::default(), DENY_197);
        let ask = the_ask(&events);
        let deny = Decision::Deny {
            message: "denied by stoa test".into(),
        };
        let line: Value = serde_json::from_str(&adapter.answer(&ask, &deny).unwrap()).unwrap();
        assert_eq!(line["response"]["response"]["behavior"], "deny");
        assert_eq!(
            line["response"]["response"]["message"],
            "denied by stoa test"
        );
        // Denied, the transcript says so: the tool's result is the refusal.
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::ToolResult { is_error: true, content, .. } if content == "denied by stoa test")));
    }

    #[test]
    fn other_control_requests_are_refused_at_once() {
        let mut adapter = ClaudeCodeAdapter::default();
        let line = json!({"type":"control_request","request_id":"r1",
            "request":{"subtype":"hook_callback","callback_id":"x"}})
        .to_string();
        assert!(matches!(
            adapter.parse_line(&line).unwrap()[..],
            [AgentEvent::Raw { .. }]
        ));
        let owed = adapter.take_input();
        assert_eq!(owed.len(), 1);
        let answer: Value = serde_json::from_str(&owed[0]).unwrap();
        assert_eq!(answer["response"]["subtype"], "error");
        assert_eq!(answer["response"]["request_id"], "r1");
        assert!(adapter.take_input().is_empty());
        // A request id too long to echo is not answered (nor asked about).
        let long = json!({"type":"control_request","request_id":"x".repeat(300),
            "request":{"subtype":"can_use_tool","tool_name":"Bash","input":{}}})
        .to_string();
        assert!(matches!(
            adapter.parse_line(&long).unwrap()[..],
            [AgentEvent::Raw { .. }]
        ));
        assert!(adapter.take_input().is_empty());
    }
}
