//! Gemini CLI in its Agent Client Protocol mode: `gemini --acp` (see `acp.rs`). The prompt
//! goes in `session/prompt` on stdin, never in argv; the agent's permission requests come
//! as `session/request_permission` and wait for stoa's answer; a session is continued with
//! `session/load`.
//!
//! Gemini 0.61 answers `session/load` before it has replayed the whole history (the ACP
//! says the replay comes first): the replay ends with the `available_commands_update` it
//! sends once a session is set up, so updates before that one are not stored again.
#![forbid(unsafe_code)]

use super::acp::AcpClient;
use super::{
    argv_prefix, parse_json, Adapter, AgentEvent, Decision, Invocation, NotJson, PermissionAsk,
    RunSpec, Tool,
};

/// Gemini's `--approval-mode` values; other permission modes are ignored (gemini's
/// configured default applies: `default`, which asks).
const APPROVAL_MODES: [&str; 4] = ["default", "auto_edit", "yolo", "plan"];

#[derive(Debug, Default)]
pub struct GeminiAdapter {
    acp: AcpClient,
}

impl Adapter for GeminiAdapter {
    fn tool(&self) -> Tool {
        Tool::Gemini
    }

    fn invocation(&mut self, spec: &RunSpec) -> Invocation {
        self.acp = AcpClient::new(spec);
        let mut argv = argv_prefix(Tool::Gemini, spec);
        argv.push("--acp".into());
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
        Invocation {
            argv,
            stdin: Some(self.acp.first_line()),
            conversation: true,
            env: spec
                .base_url
                .iter()
                .map(|u| ("GOOGLE_GEMINI_BASE_URL".to_string(), u.clone()))
                .collect(),
        }
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        match parse_json(line)? {
            Some(v) => self.acp.parse(v),
            None => Ok(vec![]),
        }
    }

    fn take_input(&mut self) -> Vec<String> {
        self.acp.take_input()
    }

    fn answer(&self, ask: &PermissionAsk, decision: &Decision) -> Option<String> {
        AcpClient::answer(ask, decision)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{reordered_keys, spec, strings};
    use super::*;
    use serde_json::{json, Value};

    const TEXT: &str =
        include_str!("../../../tests/fixtures/agents/gemini-cli-0.61.0-acp-text.jsonl");
    const ALLOW: &str =
        include_str!("../../../tests/fixtures/agents/gemini-cli-0.61.0-acp-allow.jsonl");
    const DENY: &str =
        include_str!("../../../tests/fixtures/agents/gemini-cli-0.61.0-acp-deny.jsonl");
    const LOAD: &str =
        include_str!("../../../tests/fixtures/agents/gemini-cli-0.61.0-acp-load.jsonl");

    /// Replays a recording through a fresh adapter: the events, and what it wrote to stdin.
    fn replay(s: &RunSpec, text: &str) -> (Vec<AgentEvent>, Vec<Value>) {
        let mut a = GeminiAdapter::default();
        let inv = a.invocation(s);
        let mut sent: Vec<Value> = vec![serde_json::from_str(inv.stdin.unwrap().trim()).unwrap()];
        let mut events = Vec::new();
        for line in text.lines() {
            events.extend(a.parse_line(line).expect("JSON"));
            sent.extend(
                a.take_input()
                    .iter()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
        (events, sent)
    }

    fn with_cwd(prompt: &str) -> RunSpec {
        RunSpec {
            cwd: Some("/home/alice".into()),
            ..spec(prompt)
        }
    }

    #[test]
    fn a_recorded_run_walks_the_protocol() {
        let (events, sent) = replay(&with_cwd("hi"), TEXT);
        let methods: Vec<&str> = sent.iter().filter_map(|m| m["method"].as_str()).collect();
        assert_eq!(methods, ["initialize", "session/new", "session/prompt"]);
        assert_eq!(sent[1]["params"]["cwd"], "/home/alice");
        assert_eq!(sent[2]["params"]["prompt"][0]["text"], "hi");
        assert_eq!(
            sent[2]["params"]["sessionId"],
            "b57cde6b-8141-4bc5-abd5-97f92f82afee"
        );
        assert_eq!(
            events[0],
            AgentEvent::SessionStarted {
                agent_session_id: "b57cde6b-8141-4bc5-abd5-97f92f82afee".into(),
                model: None,
            }
        );
        assert_eq!(
            events[1],
            AgentEvent::AssistantText {
                text: "Hello from the mock server.".into(),
                delta: true
            }
        );
        assert!(
            matches!(&events[2], AgentEvent::Result { is_error: false, usage: Some(u), .. } if u["output_tokens"] == 7),
            "{events:?}"
        );
        assert_eq!(events.len(), 3, "{events:?}");
    }

    #[test]
    fn a_permission_request_and_its_answers() {
        for (text, decision, option) in [
            (ALLOW, Decision::Allow, "proceed_once"),
            (
                DENY,
                Decision::Deny {
                    message: "no".into(),
                },
                "cancel",
            ),
        ] {
            let (events, _) = replay(&with_cwd("RUNTOOL: write down who you are"), text);
            let asks: Vec<&PermissionAsk> = events
                .iter()
                .filter_map(|e| match e {
                    AgentEvent::PermissionRequest(a) => Some(a),
                    _ => None,
                })
                .collect();
            assert_eq!(asks.len(), 1, "{events:?}");
            let ask = asks[0];
            assert_eq!(ask.tool, "execute");
            assert_eq!(
                ask.description.as_deref(),
                Some("id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt")
            );
            let answer: Value =
                serde_json::from_str(&GeminiAdapter::default().answer(ask, &decision).unwrap())
                    .unwrap();
            assert_eq!(
                answer,
                json!({"jsonrpc":"2.0","id":0,"result":{"outcome":{"outcome":"selected","optionId":option}}})
            );
            assert!(matches!(
                events.last(),
                Some(AgentEvent::Result {
                    is_error: false,
                    ..
                })
            ));
        }
        // Allowed, the shell ran and its result came.
        let (events, _) = replay(&with_cwd("RUNTOOL"), ALLOW);
        assert!(events.iter().any(|e| matches!(
            e,
            AgentEvent::ToolResult {
                is_error: false,
                ..
            }
        )));
    }

    #[test]
    fn a_continued_session_is_loaded_and_its_replayed_history_not_stored_again() {
        let mut s = with_cwd("hi again");
        s.resume = Some("9c69a2f2-1dee-472c-8367-d3891e317d73".into());
        let (events, sent) = replay(&s, LOAD);
        assert_eq!(sent[1]["method"], "session/load");
        assert_eq!(
            sent[1]["params"]["sessionId"],
            "9c69a2f2-1dee-472c-8367-d3891e317d73"
        );
        assert_eq!(sent[2]["method"], "session/prompt");
        // The replay (the earlier prompt, its tool call and answer) is not among the events:
        // only this run's permission request, its answer text and the result.
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, AgentEvent::ToolUse { .. })),
            "{events:?}"
        );
        let texts = events
            .iter()
            .filter(|e| matches!(e, AgentEvent::AssistantText { .. }))
            .count();
        assert_eq!(texts, 1, "{events:?}");
        assert!(events
            .iter()
            .any(|e| matches!(e, AgentEvent::PermissionRequest(_))));
    }

    #[test]
    fn other_agent_requests_are_refused_at_once_and_errors_end_the_run() {
        let mut a = GeminiAdapter::default();
        a.invocation(&with_cwd("hi"));
        let read = json!({"jsonrpc":"2.0","id":7,"method":"fs/read_text_file","params":{"path":"/etc/shadow"}});
        assert!(matches!(
            a.parse_line(&read.to_string()).unwrap()[..],
            [AgentEvent::Raw { .. }]
        ));
        let owed: Vec<Value> = a
            .take_input()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0]["id"], 7);
        assert_eq!(owed[0]["error"]["code"], -32601);
        let failed =
            json!({"jsonrpc":"2.0","id":2,"error":{"code":-32603,"message":"quota exceeded"}});
        assert_eq!(
            a.parse_line(&failed.to_string()).unwrap(),
            vec![AgentEvent::Result {
                is_error: true,
                text: Some("quota exceeded".into()),
                cost_usd: None,
                num_turns: None,
                usage: None,
            }]
        );
    }

    #[test]
    fn key_order_does_not_matter() {
        for text in [TEXT, ALLOW, DENY, LOAD] {
            let reordered: Vec<String> = text.lines().map(reordered_keys).collect();
            let mut s = with_cwd("hi");
            if text == LOAD {
                s.resume = Some("9c69a2f2-1dee-472c-8367-d3891e317d73".into());
            }
            assert_eq!(replay(&s, &reordered.join("\n")).0, replay(&s, text).0);
        }
    }

    #[test]
    fn invocation() {
        let mut s = with_cwd("--yolo please, secret marker 7d1f");
        let inv = GeminiAdapter::default().invocation(&s);
        assert_eq!(inv.argv, strings(&["gemini", "--acp"]));
        assert!(inv.conversation);
        // The prompt is never in argv, nor in the first line: it goes in session/prompt.
        assert!(!inv.stdin.as_deref().unwrap().contains("7d1f"));
        s.model = Some("gemini-2.5-pro".into());
        s.permission_mode = Some("auto_edit".into());
        assert_eq!(
            GeminiAdapter::default().invocation(&s).argv,
            strings(&[
                "gemini",
                "--acp",
                "-m",
                "gemini-2.5-pro",
                "--approval-mode",
                "auto_edit"
            ])
        );
        s.permission_mode = Some("bypassPermissions".into());
        assert!(!GeminiAdapter::default()
            .invocation(&s)
            .argv
            .contains(&"--approval-mode".to_string()));
    }
}
