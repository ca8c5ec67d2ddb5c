//! Gemini CLI: `gemini --output-format stream-json --skip-trust`, the prompt on stdin.
//!
//! Stream lines (gemini-cli `packages/core/src/output/types.ts`): `init`, `message`
//! (role user|assistant, `delta` for chunks), `tool_use`, `tool_result`, `error`
//! (non-fatal, with a `severity`), `result` (status success|error, `stats`), and in newer
//! versions `retry` and `loop_detected`.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde_json::Value;

use super::{
    argv_prefix, parse_json, raw, str_at, Adapter, AgentEvent, Invocation, NotJson, RunSpec, Tool,
};

/// Gemini's `--approval-mode` values; other permission modes are ignored (gemini's
/// configured default applies).
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
        let settings = Path::new(SYSTEM_SETTINGS_PATH);
        invocation(spec, trusted_settings(settings).then_some(settings))
    }

    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson> {
        parse_line(line)
    }
}

/// The run, given the system settings file stoa may point gemini at.
fn invocation(spec: &RunSpec, system_settings: Option<&Path>) -> Invocation {
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
        stdin: Some(spec.prompt.clone()),
        env,
    }
}

fn parse_line(line: &str) -> Result<Vec<AgentEvent>, NotJson> {
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
            .flat_map(|l| parse_line(&l.to_string()).unwrap())
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
        assert!(invocation(&s, Some(settings)).env.is_empty());
        s.base_url = Some("http://127.0.0.1:8765".into());
        let inv = invocation(&s, Some(settings));
        assert_eq!(
            env_of(&inv, "GOOGLE_GEMINI_BASE_URL").as_deref(),
            Some("http://127.0.0.1:8765")
        );
        assert_eq!(
            env_of(&inv, "GEMINI_CLI_SYSTEM_SETTINGS_PATH").as_deref(),
            Some("/run/stoa/gemini-settings.json")
        );
        // Without a trusted file, no variable: gemini would skip it with a warning anyway.
        assert!(env_of(&invocation(&s, None), "GEMINI_CLI_SYSTEM_SETTINGS_PATH").is_none());
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
