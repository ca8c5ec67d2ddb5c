//! Claude Code: `claude -p --output-format stream-json --verbose`, prompt on stdin.
//!
//! Stream lines are `system` (subtype `init` first), `assistant` and `user` messages in the
//! Anthropic Messages shape (`message.content[]` blocks), and one final `result`.
#![forbid(unsafe_code)]

use serde_json::Value;

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Invocation, NotJson, RunSpec, Tool,
};

#[derive(Debug, Default)]
pub struct ClaudeCodeAdapter;

impl Adapter for ClaudeCodeAdapter {
    fn tool(&self) -> Tool {
        Tool::ClaudeCode
    }

    fn invocation(&self, spec: &RunSpec) -> Invocation {
        let mut argv = argv_prefix(Tool::ClaudeCode, spec);
        // `--verbose` is required by `-p` with stream-json. The prompt goes on stdin, so it
        // is never parsed as an option whatever it starts with, and has no argv size limit.
        argv.extend(["-p", "--output-format", "stream-json", "--verbose"].map(String::from));
        for (flag, value) in [
            ("--model", &spec.model),
            ("--permission-mode", &spec.permission_mode),
            ("--resume", &spec.resume),
        ] {
            if let Some(value) = value {
                argv.extend([flag.to_string(), value.clone()]);
            }
        }
        Invocation {
            argv,
            stdin: Some(spec.prompt.clone()),
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
            // Other `system` subtypes (retries, compaction, hooks...) and anything newer.
            _ => raw(v),
        };
        Ok(events)
    }
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
        let events = parse_all(&mut ClaudeCodeAdapter, TEXT_197);
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
        let events = parse_all(&mut ClaudeCodeAdapter, TEXT_330);
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
        let events = parse_all(&mut ClaudeCodeAdapter, BASH_197);
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
                parse_all(&mut ClaudeCodeAdapter, &reordered.join("\n")),
                parse_all(&mut ClaudeCodeAdapter, fixture)
            );
        }
    }

    #[test]
    fn blocks_without_an_event_stay_raw() {
        let line = r#"{"type":"assistant","message":{"content":[
            {"type":"thinking","thinking":"hmm","signature":"x"},{"type":"text","text":"ok"}]}}"#
            .replace('\n', "");
        assert_eq!(
            ClaudeCodeAdapter.parse_line(&line).unwrap(),
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
            ClaudeCodeAdapter.parse_line(retry).unwrap(),
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
            ClaudeCodeAdapter.parse_line(&line).unwrap(),
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
            ClaudeCodeAdapter.parse_line(&line).unwrap(),
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
        let inv = ClaudeCodeAdapter.invocation(&spec("hi"));
        assert_eq!(
            inv.argv,
            strings(&[
                "claude",
                "-p",
                "--output-format",
                "stream-json",
                "--verbose"
            ])
        );
        assert_eq!(inv.stdin.as_deref(), Some("hi"));
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
        let inv = ClaudeCodeAdapter.invocation(&s);
        assert_eq!(
            inv.argv,
            strings(&[
                "claude",
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "claude-sonnet-4-5",
                "--permission-mode",
                "acceptEdits",
                "--resume",
                "c4e8bf3d-6a0e-406e-870c-c65c3b741252",
            ])
        );
        // A prompt that looks like a flag never reaches argv.
        assert_eq!(inv.stdin.as_deref(), Some("--help me"));
    }
}
