//! Gemini CLI in its Agent Client Protocol mode: `gemini --acp` (see `acp.rs`). The prompt
//! goes in `session/prompt` on stdin, never in argv; the agent's permission requests come
//! as `session/request_permission` and wait for stoa's answer; a session is continued with
//! `session/load`.
//!
//! Gemini 0.61 answers `session/load` before it has replayed the whole history (the ACP
//! says the replay comes first): the replay ends with the `available_commands_update` it
//! sends once a session is set up, so updates before that one are not stored again.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::acp::AcpClient;
use super::{
    argv_prefix, parse_json, Adapter, AgentEvent, Decision, Invocation, NotJson, PermissionAsk,
    RunSpec, Tool,
};

/// Gemini's `--approval-mode` values; other permission modes are ignored (gemini's
/// configured default applies: `default`, which asks).
const APPROVAL_MODES: [&str; 4] = ["default", "auto_edit", "yolo", "plan"];

/// Gemini's system settings as stoa gives them when `agents.gemini.base_url` is set: the
/// auth type. With `GOOGLE_GEMINI_BASE_URL` set and no settings naming one, gemini 0.61
/// picks its "gateway" type, which it then refuses ("Invalid auth method selected", exit
/// 41); a user with no `~/.gemini` would have no other way to name it. Usage statistics
/// (sent to Google's `play.googleapis.com` at every run) are off: the operator chose a
/// model API of their own.
pub const SYSTEM_SETTINGS: &str = r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false}}"#;
/// Where the broker writes [`SYSTEM_SETTINGS`] when it starts as root. Gemini reads a
/// system settings file only when it and every directory above it are root's and writable
/// by no one else (else it skips it with a warning), so it cannot live in a clone or under
/// /tmp; `/run/stoa` is the broker's root-owned runtime directory in every install.
pub const SYSTEM_SETTINGS_PATH: &str = "/run/stoa/gemini-settings.json";

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
        let settings = Path::new(SYSTEM_SETTINGS_PATH);
        self.invocation_with(spec, trusted_settings(settings).then_some(settings))
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

impl GeminiAdapter {
    /// The run, given the system settings file stoa may point gemini at.
    fn invocation_with(&self, spec: &RunSpec, system_settings: Option<&Path>) -> Invocation {
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
        let mut env = vec![];
        if let Some(url) = &spec.base_url {
            env.push(("GOOGLE_GEMINI_BASE_URL".to_string(), url.clone()));
            // Only with a base URL: the variable replaces gemini's own system settings
            // (/etc/gemini-cli/settings.json), which an operator may otherwise rely on.
            if let Some(path) = system_settings {
                env.push((
                    "GEMINI_CLI_SYSTEM_SETTINGS_PATH".to_string(),
                    path.display().to_string(),
                ));
            }
        }
        Invocation {
            argv,
            stdin: Some(self.acp.first_line()),
            conversation: true,
            env,
        }
    }
}

/// Whether gemini would read `path` as its system settings: root's, as is every directory
/// above it, none of them writable by group or others (gemini's own check).
pub fn trusted_settings(path: &Path) -> bool {
    let mut is_file = true;
    let mut current = Some(path);
    while let Some(p) = current {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return false;
        };
        let kind_ok = if is_file {
            meta.is_file()
        } else {
            meta.is_dir()
        };
        if !kind_ok || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return false;
        }
        is_file = false;
        current = p.parent().filter(|d| !d.as_os_str().is_empty());
    }
    true
}

/// Writes [`SYSTEM_SETTINGS`] to `path` (root's, 0644; its directory root's 0755 if it
/// has to be made) unless it is already there with that content. For the broker, as root.
/// Returns what it made that was not there (the file, then the directory), to remove at
/// stop.
pub fn write_system_settings(path: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let mut made = vec![];
    if std::fs::read_to_string(path).is_ok_and(|s| s == SYSTEM_SETTINGS) && trusted_settings(path) {
        return Ok(made);
    }
    let dir = path.parent().ok_or("no directory")?;
    let new_dir = !dir.exists();
    if new_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    if std::fs::symlink_metadata(path).is_err() {
        made.push(path.to_path_buf());
    }
    if new_dir {
        made.push(dir.to_path_buf());
    }
    // A fresh file renamed over the old: no reader sees half of it, and whatever was at
    // `path` (a link, another owner's file) is replaced, not written through.
    let tmp = dir.join(format!(".gemini-settings.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, SYSTEM_SETTINGS.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        if new_dir {
            let _ = std::fs::remove_dir(dir);
        }
        format!("cannot write {}: {e}", path.display())
    })?;
    Ok(made)
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
    fn a_session_that_cannot_be_loaded_gives_way_to_a_new_one_and_says_so() {
        let mut a = GeminiAdapter::default();
        let mut s = with_cwd("hi again");
        s.resume = Some("eac607c2-249a-4522-848e-415efacf6acc".into());
        a.invocation(&s);
        let init = TEXT.lines().next().unwrap();
        assert!(a.parse_line(init).unwrap().is_empty());
        let sent: Value = serde_json::from_str(&a.take_input()[0]).unwrap();
        assert_eq!(sent["method"], "session/load");
        // Gemini 0.61's answer to a session it cannot load (recorded).
        let refused = json!({"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"Internal error",
            "data":{"details":"Invalid session identifier \"eac607c2-249a-4522-848e-415efacf6acc\".\n  Searched for sessions in /home/alice/.gemini/tmp/alice/chats."}}});
        let events = a.parse_line(&refused.to_string()).unwrap();
        assert!(
            matches!(&events[..], [AgentEvent::Notice { message }] if message.contains("could not continue") && message.contains("Invalid session identifier")),
            "{events:?}"
        );
        let sent: Value = serde_json::from_str(&a.take_input()[0]).unwrap();
        assert_eq!(sent["method"], "session/new");
        assert_eq!(sent["id"], 3);
        // The new session's answer opens it and sends the prompt.
        let opened = json!({"jsonrpc":"2.0","id":3,"result":{"sessionId":"new-1"}});
        let events = a.parse_line(&opened.to_string()).unwrap();
        assert!(
            matches!(&events[..], [AgentEvent::SessionStarted { agent_session_id, .. }] if agent_session_id == "new-1")
        );
        let sent: Value = serde_json::from_str(&a.take_input()[0]).unwrap();
        assert_eq!(sent["method"], "session/prompt");
        assert_eq!(sent["params"]["prompt"][0]["text"], "hi again");
    }

    #[test]
    fn a_run_taken_over_before_its_prompt_opens_no_session() {
        // A new worker's adapter never saw the run's spec: it must not send an empty
        // prompt into a session in no directory.
        let mut a = GeminiAdapter::default();
        let first = TEXT.lines().next().unwrap();
        let events = a.parse_line(first).unwrap();
        assert!(
            matches!(&events[..], [AgentEvent::Result { is_error: true, text: Some(t), .. }] if t.contains("taken over")),
            "{events:?}"
        );
        assert!(a.take_input().is_empty(), "nothing sent");
        // After the prompt went out, a taken-over run goes on as usual.
        let mut a = GeminiAdapter::default();
        let events: Vec<AgentEvent> = TEXT
            .lines()
            .skip(2)
            .flat_map(|l| a.parse_line(l).unwrap())
            .collect();
        assert!(matches!(
            events.last(),
            Some(AgentEvent::Result {
                is_error: false,
                ..
            })
        ));
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

    #[test]
    fn base_url_brings_the_system_settings_naming_the_auth_type() {
        let settings = Path::new("/run/stoa/gemini-settings.json");
        let env_of = |inv: &Invocation, name: &str| {
            inv.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mut s = spec("hi");
        // No base URL: gemini's own settings and auth rules, untouched.
        assert!(GeminiAdapter::default()
            .invocation_with(&s, Some(settings))
            .env
            .is_empty());
        s.base_url = Some("http://127.0.0.1:8765".into());
        let inv = GeminiAdapter::default().invocation_with(&s, Some(settings));
        assert_eq!(
            env_of(&inv, "GOOGLE_GEMINI_BASE_URL").as_deref(),
            Some("http://127.0.0.1:8765")
        );
        assert_eq!(
            env_of(&inv, "GEMINI_CLI_SYSTEM_SETTINGS_PATH").as_deref(),
            Some("/run/stoa/gemini-settings.json")
        );
        // Without a trusted file, no variable: gemini would skip it with a warning anyway.
        assert!(env_of(
            &GeminiAdapter::default().invocation_with(&s, None),
            "GEMINI_CLI_SYSTEM_SETTINGS_PATH"
        )
        .is_none());
        let parsed: Value = serde_json::from_str(SYSTEM_SETTINGS).unwrap();
        assert_eq!(parsed["security"]["auth"]["selectedType"], "gemini-api-key");
        assert_eq!(parsed["privacy"]["usageStatisticsEnabled"], false);
    }

    #[test]
    fn settings_are_trusted_only_in_a_root_owned_unwritable_chain() {
        // /tmp is writable by others (sticky or not, gemini refuses it).
        let dir = std::env::temp_dir().join(format!("stoa-gemini-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("settings.json");
        std::fs::write(&file, SYSTEM_SETTINGS).unwrap();
        assert!(!trusted_settings(&file));
        assert!(!trusted_settings(&dir.join("missing.json")));
        std::fs::remove_dir_all(&dir).unwrap();
        // A root-owned file in root-owned 0755 directories (where this machine has one).
        let etc = Path::new("/etc/passwd");
        if std::fs::metadata(etc).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0) {
            assert!(trusted_settings(etc));
            assert!(
                !trusted_settings(Path::new("/etc")),
                "a directory is no file"
            );
        }
    }

    #[test]
    fn written_settings_pass_gemini_s_check_and_are_reported_for_removal() {
        if !nix::unistd::geteuid().is_root() {
            return; // only root can make a file gemini trusts
        }
        let dir = std::path::PathBuf::from(format!("/run/stoa-gemini-unit-{}", std::process::id()));
        let path = dir.join("gemini-settings.json");
        let made = write_system_settings(&path).unwrap();
        assert_eq!(made, vec![path.clone(), dir.clone()]);
        assert!(trusted_settings(&path));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SYSTEM_SETTINGS);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        // Again: nothing to do, nothing made.
        assert!(write_system_settings(&path).unwrap().is_empty());
        // Someone else's content is replaced (the file was there: not ours to remove).
        std::fs::write(&path, "{}").unwrap();
        assert!(write_system_settings(&path).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SYSTEM_SETTINGS);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
