//! Gemini CLI: `gemini --output-format stream-json --skip-trust`, the prompt on stdin.
//!
//! Stream lines (gemini-cli `packages/core/src/output/types.ts`): `init`, `message`
//! (role user|assistant, `delta` for chunks), `tool_use`, `tool_result`, `error`
//! (non-fatal, with a `severity`), `result` (status success|error, `stats`), and in newer
//! versions `retry` and `loop_detected`.
#![forbid(unsafe_code)]

use serde_json::Value;

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Invocation, NotJson, RunSpec, Tool,
};

/// Gemini's `--approval-mode` values; other permission modes are ignored (gemini's
/// configured default applies).
const APPROVAL_MODES: [&str; 4] = ["default", "auto_edit", "yolo", "plan"];

#[derive(Debug, Default)]
pub struct GeminiAdapter;

impl Adapter for GeminiAdapter {
    fn tool(&self) -> Tool {
        Tool::Gemini
    }

    // The prompt goes on stdin, never in argv, where every local user could read it
    // (/proc/PID/cmdline) and the broker's audit log and `GET /processes` would copy it.
    // Gemini reads stdin whenever it is not a terminal: with no `-p` (nor a positional
    // prompt) and stdin a pipe it runs headless, and what it read is the prompt
    // (`packages/cli/src/gemini.tsx`, `readStdin`, up to 8 MiB; with `-p` as well, stdin
    // would be put before that text). It waits 500 ms for the first byte, so the prompt
    // must be written at once: the daemon writes it as soon as the process is spawned.
    // (Gemini's own sandbox mode, `--sandbox`/`GEMINI_SANDBOX` or the user's settings,
    // copies stdin into the sandboxed process's argv: stoa never turns it on.)
    fn invocation(&self, spec: &RunSpec) -> Invocation {
        let mut argv = argv_prefix(Tool::Gemini, spec);
        // `--skip-trust`: the work directory is the user's own, and gemini restricts or
        // refuses headless runs in folders it was not told to trust.
        argv.extend(["--output-format", "stream-json", "--skip-trust"].map(String::from));
        if let Some(model) = &spec.model {
            argv.extend(["-m".into(), model.clone()]);
        }
        if let Some(mode) = spec
            .permission_mode
            .as_deref()
            .filter(|m| APPROVAL_MODES.contains(m))
        {
            argv.extend(["--approval-mode".into(), mode.to_string()]);
        }
        // `--resume` takes "latest", an index or a session id (the `init` event's).
        if let Some(id) = &spec.resume {
            argv.extend(["--resume".into(), id.clone()]);
        }
        Invocation {
            argv,
            stdin: Some(spec.prompt.clone()),
            conversation: false,
            env: spec
                .base_url
                .iter()
                .map(|u| ("GOOGLE_GEMINI_BASE_URL".to_string(), u.clone()))
                .collect(),
        }
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        let Some(v) = parse_json(line)? else {
            return Ok(vec![]);
        };
        let events = match v.get("type").and_then(Value::as_str) {
            Some("init") => match str_at(&v, "session_id") {
                Some(agent_session_id) => {
                    vec![AgentEvent::SessionStarted {
                        agent_session_id,
                        model: str_at(&v, "model"),
                    }]
                }
                None => raw(v),
            },
            // User messages echo the prompt back: kept raw, not shown as assistant text.
            Some("message") if v.get("role").and_then(Value::as_str) == Some("assistant") => {
                vec![AgentEvent::AssistantText {
                    text: str_at(&v, "content").unwrap_or_default(),
                    delta: v.get("delta").and_then(Value::as_bool).unwrap_or(false),
                }]
            }
            Some("tool_use") => vec![AgentEvent::ToolUse {
                id: str_at(&v, "tool_id"),
                name: str_at(&v, "tool_name").unwrap_or_default(),
                input: v.get("parameters").cloned().unwrap_or(Value::Null),
            }],
            Some("tool_result") => vec![AgentEvent::ToolResult {
                tool_use_id: str_at(&v, "tool_id"),
                // A failed tool has an `error` object and usually no `output`.
                content: str_at(&v, "output")
                    .or_else(|| {
                        v.pointer("/error/message")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_default(),
                is_error: v.get("status").and_then(Value::as_str) != Some("success"),
            }],
            Some("error") => match str_at(&v, "message") {
                Some(message) => vec![AgentEvent::Notice { message }],
                None => raw(v),
            },
            Some("result") => vec![AgentEvent::Result {
                is_error: v.get("status").and_then(Value::as_str) != Some("success"),
                // Gemini repeats no final text; an error result says what went wrong.
                text: v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                cost_usd: None,
                num_turns: None,
                usage: v.get("stats").cloned(),
            }],
            _ => raw(v),
        };
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{parse_all, reordered_keys, spec, strings};
    use super::*;
    use serde_json::json;

    const TEXT: &str = include_str!("../../../tests/fixtures/agents/gemini-cli-0.61.0-text.jsonl");

    #[test]
    fn text_fixture() {
        let events = parse_all(&mut GeminiAdapter, TEXT);
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0],
            AgentEvent::SessionStarted {
                agent_session_id: "7bd29f52-5c37-4d6c-8cfa-8f27a6173143".into(),
                model: Some("gemini-2.5-flash".into()),
            }
        );
        assert!(matches!(&events[1], AgentEvent::Raw { value } if value["content"] == "hi"));
        assert_eq!(
            events[2],
            AgentEvent::AssistantText {
                text: "Hello from the mock server.".into(),
                delta: true
            }
        );
        let AgentEvent::Result {
            is_error,
            text,
            usage,
            ..
        } = &events[3]
        else {
            panic!("last event is {:?}", events[3]);
        };
        assert!(!is_error);
        assert_eq!(*text, None);
        assert_eq!(usage.as_ref().unwrap()["total_tokens"], json!(19));
    }

    #[test]
    fn key_order_does_not_matter() {
        let reordered: Vec<String> = TEXT.lines().map(reordered_keys).collect();
        assert_eq!(
            parse_all(&mut GeminiAdapter, &reordered.join("\n")),
            parse_all(&mut GeminiAdapter, TEXT)
        );
    }

    #[test]
    fn tools_errors_and_failed_result() {
        let lines = [
            json!({"type":"tool_use","timestamp":"t","tool_name":"run_shell_command","tool_id":"c1",
                "parameters":{"command":"ls"}}),
            json!({"type":"tool_result","timestamp":"t","tool_id":"c1","status":"success","output":"a.txt"}),
            json!({"type":"tool_result","timestamp":"t","tool_id":"c2","status":"error",
                "error":{"type":"invalid_tool_params","message":"no such file"}}),
            json!({"type":"error","timestamp":"t","severity":"warning","message":"slow down"}),
            json!({"type":"result","timestamp":"t","status":"error",
                "error":{"type":"FatalError","message":"quota exceeded"},"stats":{"total_tokens":3}}),
        ];
        let events: Vec<AgentEvent> = lines
            .iter()
            .flat_map(|l| GeminiAdapter.parse_line(&l.to_string()).unwrap())
            .collect();
        assert_eq!(
            events,
            vec![
                AgentEvent::ToolUse {
                    id: Some("c1".into()),
                    name: "run_shell_command".into(),
                    input: json!({"command": "ls"}),
                },
                AgentEvent::ToolResult {
                    tool_use_id: Some("c1".into()),
                    content: "a.txt".into(),
                    is_error: false
                },
                AgentEvent::ToolResult {
                    tool_use_id: Some("c2".into()),
                    content: "no such file".into(),
                    is_error: true,
                },
                AgentEvent::Notice {
                    message: "slow down".into()
                },
                AgentEvent::Result {
                    is_error: true,
                    text: Some("quota exceeded".into()),
                    cost_usd: None,
                    num_turns: None,
                    usage: Some(json!({"total_tokens": 3})),
                },
            ]
        );
    }

    #[test]
    fn invocation_plain() {
        let inv = GeminiAdapter.invocation(&spec("hi"));
        assert_eq!(
            inv.argv,
            strings(&["gemini", "--output-format", "stream-json", "--skip-trust"])
        );
        assert_eq!(inv.stdin.as_deref(), Some("hi"));
    }

    #[test]
    fn invocation_with_options() {
        let mut s = spec("fix it");
        s.model = Some("gemini-2.5-pro".into());
        s.permission_mode = Some("auto_edit".into());
        s.resume = Some("7bd29f52-5c37-4d6c-8cfa-8f27a6173143".into());
        assert_eq!(
            GeminiAdapter.invocation(&s).argv,
            strings(&[
                "gemini",
                "--output-format",
                "stream-json",
                "--skip-trust",
                "-m",
                "gemini-2.5-pro",
                "--approval-mode",
                "auto_edit",
                "--resume",
                "7bd29f52-5c37-4d6c-8cfa-8f27a6173143",
            ])
        );
        s.permission_mode = Some("bypassPermissions".into());
        assert!(!GeminiAdapter
            .invocation(&s)
            .argv
            .contains(&"--approval-mode".to_string()));
    }

    #[test]
    fn prompt_is_never_in_argv() {
        // Whatever the prompt looks like (an option, `-p`, a flag's value), argv is the same
        // and the prompt travels on stdin only.
        for prompt in ["--yolo please", "-p", "secret marker 7d1f", "--prompt=x"] {
            let inv = GeminiAdapter.invocation(&spec(prompt));
            assert!(
                !inv.argv.iter().any(|a| a.contains(prompt)),
                "{:?}",
                inv.argv
            );
            assert!(!inv
                .argv
                .iter()
                .any(|a| a == "-p" || a.starts_with("--prompt")));
            assert_eq!(inv.stdin.as_deref(), Some(prompt));
        }
    }
}
