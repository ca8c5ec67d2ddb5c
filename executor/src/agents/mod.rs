//! Agent adapters, shared by the executor path and the daemon's direct path: for each tool
//! the command line and environment of one run, and a parser from the tool's streaming JSON
//! to stoa's message events.
//!
//! Interface fixed here; each tool's module implements [`Adapter`].
#![forbid(unsafe_code)]

pub mod acp;
pub mod claude_code;
pub mod codex;
pub mod gemini;
pub mod opencode;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The agentic tools stoa drives (the seed's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tool {
    #[serde(rename = "claude-code")]
    ClaudeCode,
    #[serde(rename = "codex")]
    Codex,
    #[serde(rename = "gemini")]
    Gemini,
    #[serde(rename = "opencode")]
    OpenCode,
}

impl Tool {
    pub const ALL: [Tool; 4] = [Tool::ClaudeCode, Tool::Codex, Tool::Gemini, Tool::OpenCode];

    /// "claude-code", "codex", "gemini", "opencode".
    pub fn name(self) -> &'static str {
        match self {
            Tool::ClaudeCode => "claude-code",
            Tool::Codex => "codex",
            Tool::Gemini => "gemini",
            Tool::OpenCode => "opencode",
        }
    }

    pub fn from_name(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The binary when `agents.<tool>.command` is not configured.
    pub fn default_command(self) -> &'static str {
        match self {
            Tool::ClaudeCode => "claude",
            Tool::Codex => "codex",
            Tool::Gemini => "gemini",
            Tool::OpenCode => "opencode",
        }
    }

    /// A fresh adapter (parsers keep per-run state: use one adapter per run).
    pub fn adapter(self) -> Box<dyn Adapter> {
        match self {
            Tool::ClaudeCode => Box::<claude_code::ClaudeCodeAdapter>::default(),
            Tool::Codex => Box::<codex::CodexAdapter>::default(),
            Tool::Gemini => Box::<gemini::GeminiAdapter>::default(),
            Tool::OpenCode => Box::<opencode::OpenCodeAdapter>::default(),
        }
    }
}

/// What one prompt asks of the tool.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub prompt: String,
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    /// The tool's own session/thread id from an earlier run, to continue that conversation.
    pub resume: Option<String>,
    /// `agents.<tool>.command`: the binary or an argv prefix; empty = the tool's default.
    pub command: Vec<String>,
    /// `agents.<tool>.base_url`: the model API (or a gateway) this tool talks to, turned
    /// into whatever the tool reads (an environment variable, `-c` overrides, a config).
    pub base_url: Option<String>,
    /// The directory the run works in (tools that take it in their protocol need it).
    pub cwd: Option<String>,
}

/// How to start one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub argv: Vec<String>,
    /// Written to the tool's stdin (`None`: stdin is /dev/null). Closed at once, unless
    /// `conversation`.
    pub stdin: Option<String>,
    /// The tool talks over stdin for the whole run (permission requests are answered
    /// there): stdin stays open until the run's final result.
    pub conversation: bool,
    /// Extra non-secret environment this tool needs for headless runs.
    pub env: Vec<(String, String)>,
}

/// One event in a session's message stream, in the order the tool produced them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The tool started (or resumed) its session; `agent_session_id` continues it later.
    SessionStarted {
        agent_session_id: String,
        model: Option<String>,
    },
    /// Text from the assistant (a whole message, or a streamed delta when `delta`).
    AssistantText { text: String, delta: bool },
    /// The assistant called a tool.
    ToolUse {
        id: Option<String>,
        name: String,
        input: serde_json::Value,
    },
    /// A tool's result.
    ToolResult {
        tool_use_id: Option<String>,
        content: String,
        is_error: bool,
    },
    /// The run's final result.
    Result {
        is_error: bool,
        text: Option<String>,
        cost_usd: Option<f64>,
        num_turns: Option<u64>,
        usage: Option<serde_json::Value>,
    },
    /// A non-fatal error or warning the tool reported in its stream.
    Notice { message: String },
    /// The tool asks permission before it uses a tool; it waits for the answer on stdin.
    PermissionRequest(PermissionAsk),
    /// A line of valid JSON whose type this adapter does not know: kept as it is.
    Raw { value: serde_json::Value },
}

/// A tool's request for permission, as much as it takes to show it and to answer it later
/// (by a worker that may have restarted since: an answer needs nothing but this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PermissionAsk {
    /// The agent's own id for the request (the answer names it).
    pub request_id: String,
    /// The tool it wants to use ("Bash", "Write"...).
    pub tool: String,
    /// The tool's input, whole.
    pub input: Value,
    /// What the agent says the call does, if it says.
    pub description: Option<String>,
    /// The tool call it is about, if the agent names one.
    pub tool_use_id: Option<String>,
    /// What the adapter needs to answer it (its own: ids, option names).
    #[serde(default)]
    pub reply: Value,
}

/// An answer to a [`PermissionAsk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason the agent is told (and shows in its transcript).
    Deny {
        message: String,
    },
}

/// A line that is not JSON at all (the run is then a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson {
    pub line: String,
}

pub trait Adapter: Send + Sync {
    fn tool(&self) -> Tool;
    fn invocation(&mut self, spec: &RunSpec) -> Invocation;
    /// Parses one output line (without its newline). Blank lines give no events.
    fn parse_line(&mut self, line: &str) -> Result<Vec<AgentEvent>, NotJson>;
    /// Lines the tool must get on stdin after what was parsed (answers to requests stoa
    /// does not serve, so the tool never waits on them). Only for a `conversation`.
    fn take_input(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// The stdin line that answers `ask` (`None`: this tool is never asked).
    fn answer(&self, ask: &PermissionAsk, decision: &Decision) -> Option<String> {
        let _ = (ask, decision);
        None
    }
}

/// The argv prefix of a run: the configured command, or the tool's default binary.
fn argv_prefix(tool: Tool, spec: &RunSpec) -> Vec<String> {
    if spec.command.is_empty() {
        vec![tool.default_command().to_string()]
    } else {
        spec.command.clone()
    }
}

/// Parses one line as JSON: blank lines are `None`, anything else must be valid JSON.
fn parse_json(line: &str) -> Result<Option<Value>, NotJson> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(trimmed)
        .map(Some)
        .map_err(|_| NotJson {
            line: line.to_string(),
        })
}

/// `v[key]` as an owned string, if it is one.
fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn raw(value: Value) -> Vec<AgentEvent> {
    vec![AgentEvent::Raw { value }]
}

#[cfg(test)]
mod test_util {
    use super::*;

    /// Every event of a recorded fixture, parsed line by line (each line must be JSON).
    pub fn parse_all(adapter: &mut dyn Adapter, text: &str) -> Vec<AgentEvent> {
        text.lines()
            .flat_map(|line| adapter.parse_line(line).expect("fixture line is JSON"))
            .collect()
    }

    /// A line re-serialized with every object's keys reversed and `type` moved last, so
    /// the order differs from the tool's whatever order serde_json's map keeps.
    pub fn reordered_keys(line: &str) -> String {
        fn write(v: &Value) -> String {
            match v {
                Value::Object(map) => {
                    let mut entries: Vec<(&String, &Value)> = map.iter().rev().collect();
                    entries.sort_by_key(|(k, _)| *k == "type"); // stable: only moves `type`
                    let fields: Vec<String> = entries
                        .into_iter()
                        .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), write(v)))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }
                Value::Array(items) => {
                    format!(
                        "[{}]",
                        items.iter().map(write).collect::<Vec<_>>().join(",")
                    )
                }
                other => other.to_string(),
            }
        }
        write(&serde_json::from_str(line).expect("JSON"))
    }

    #[test]
    fn reordering_moves_type_last() {
        let line = r#"{"type":"x","a":{"type":"y","b":1},"c":[{"type":"z","d":2}]}"#;
        assert_eq!(
            reordered_keys(line),
            r#"{"c":[{"d":2,"type":"z"}],"a":{"b":1,"type":"y"},"type":"x"}"#
        );
    }

    pub fn spec(prompt: &str) -> RunSpec {
        RunSpec {
            prompt: prompt.to_string(),
            ..RunSpec::default()
        }
    }

    pub fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn base_url_reaches_each_tool_the_way_it_reads_it() {
        let url = "http://127.0.0.1:8765/v1";
        let with = |model: Option<&str>| RunSpec {
            base_url: Some(url.to_string()),
            model: model.map(String::from),
            ..spec("hi")
        };
        let env_of = |inv: &Invocation, name: &str| {
            inv.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let claude = claude_code::ClaudeCodeAdapter::default().invocation(&with(None));
        assert_eq!(env_of(&claude, "ANTHROPIC_BASE_URL").as_deref(), Some(url));
        let gemini = gemini::GeminiAdapter::default().invocation(&with(Some("gemini-2.5-flash")));
        assert_eq!(
            env_of(&gemini, "GOOGLE_GEMINI_BASE_URL").as_deref(),
            Some(url)
        );
        // Codex ignores OPENAI_BASE_URL: a provider of its own, before the subcommand.
        let codex = codex::CodexAdapter::default().invocation(&with(None));
        let exec_at = codex.argv.iter().position(|a| a == "exec").unwrap();
        let overrides: Vec<&String> = codex.argv[..exec_at]
            .iter()
            .skip_while(|a| *a != "-c")
            .collect();
        assert!(
            overrides.contains(&&"model_provider=\"stoa\"".to_string()),
            "{codex:?}"
        );
        assert!(
            overrides.contains(&&format!("model_providers.stoa.base_url=\"{url}\"")),
            "{codex:?}"
        );
        assert!(env_of(&codex, "OPENAI_BASE_URL").is_none());
        // OpenCode: a config naming the model's provider.
        let opencode = opencode::OpenCodeAdapter::default().invocation(&with(Some("openai/gpt-5")));
        let config: serde_json::Value =
            serde_json::from_str(&env_of(&opencode, "OPENCODE_CONFIG_CONTENT").unwrap()).unwrap();
        assert_eq!(config["provider"]["openai"]["options"]["baseURL"], url);
        assert_eq!(config["autoupdate"], false);
        // Without a base URL, none of it.
        for inv in [
            claude_code::ClaudeCodeAdapter::default().invocation(&spec("hi")),
            codex::CodexAdapter::default().invocation(&spec("hi")),
            gemini::GeminiAdapter::default().invocation(&spec("hi")),
            opencode::OpenCodeAdapter::default().invocation(&spec("hi")),
        ] {
            assert!(!inv.argv.iter().any(|a| a.contains(url)));
            assert!(!inv.env.iter().any(|(_, v)| v.contains(url)));
        }
    }

    #[test]
    fn adapters_match_their_tool() {
        for tool in Tool::ALL {
            assert_eq!(tool.adapter().tool(), tool);
            assert_eq!(Tool::from_name(tool.name()), Some(tool));
        }
    }

    #[test]
    fn configured_command_replaces_the_binary() {
        let mut spec = spec("hi");
        spec.command = strings(&["/opt/bin/node", "/opt/claude/cli.js"]);
        let argv = Tool::ClaudeCode.adapter().invocation(&spec).argv;
        assert_eq!(
            &argv[..3],
            &strings(&["/opt/bin/node", "/opt/claude/cli.js", "-p"])[..]
        );
    }

    #[test]
    fn blank_and_non_json_lines() {
        for tool in Tool::ALL {
            let mut a = tool.adapter();
            assert_eq!(a.parse_line(""), Ok(vec![]));
            assert_eq!(a.parse_line("  \t"), Ok(vec![]));
            let line = "Error: something went wrong";
            assert_eq!(
                a.parse_line(line),
                Err(NotJson {
                    line: line.to_string()
                })
            );
            assert!(a.parse_line(r#"{"type":"#).is_err(), "{}", tool.name());
        }
    }

    #[test]
    fn unknown_types_are_kept_raw() {
        for tool in Tool::ALL {
            let mut a = tool.adapter();
            let line = r#"{"type":"brand_new_event","payload":{"n":1}}"#;
            let value: Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                a.parse_line(line),
                Ok(vec![AgentEvent::Raw { value }]),
                "{}",
                tool.name()
            );
            // JSON that is not an object has no type either.
            assert_eq!(
                a.parse_line("42"),
                Ok(vec![AgentEvent::Raw { value: 42.into() }])
            );
        }
    }
}
