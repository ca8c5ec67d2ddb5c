//! Where stoa's files are, and the daemon's configuration (`/etc/stoa/config.toml`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7433";
pub const DEFAULT_URL: &str = "http://127.0.0.1:7433";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Address the HTTP API listens on (bound by the broker, handed to each daemon).
    pub listen: String,
    /// The daemon's own state directory, owned by the service user.
    pub state_dir: PathBuf,
    /// Most bytes of stdout (and of stderr) `POST /exec` returns; the rest is drained and
    /// dropped, and the reply says `truncated`.
    pub exec_output_limit: usize,
    /// After a program exits, how long to wait for output still held open by processes it
    /// left behind before their process group is killed.
    pub exec_drain_timeout_ms: u64,
    pub execution: ExecutionConfig,
    /// Per tool (`claude-code`, `codex`, `gemini`, `opencode`).
    pub agents: BTreeMap<String, AgentConfig>,
    pub terminal: TerminalConfig,
    pub http: HttpConfig,
    /// A directory whose files replace the built-in web page (index.html, app.js, app.css,
    /// vendor/); unset: the page built into the binary (`web_page.rs`).
    pub web_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalConfig {
    /// Output each terminal keeps for viewers that (re)attach, in bytes (at most 64 MiB
    /// less 64: the ring is a memfd the broker creates, with a 64-byte header).
    pub ring_bytes: usize,
    /// Most bytes a viewer may have unacknowledged; a writing viewer out of credit pauses
    /// the program's output. At most `ring_bytes`.
    pub window_bytes: u32,
    /// After the program exits, how long output may stay held open by processes it left
    /// behind before their group is killed.
    pub drain_timeout_ms: u64,
    /// A terminal with no viewer for this long is ended (0: never).
    pub idle_timeout_secs: u64,
    /// Origins (`scheme://host:port`) a browser may open terminal sockets from, besides the
    /// daemon's own address.
    pub allowed_origins: Vec<String>,
    /// Most live terminals per API user.
    pub max_per_user: usize,
}

impl Default for TerminalConfig {
    fn default() -> Self {
        TerminalConfig {
            ring_bytes: 2 << 20,
            window_bytes: 2 << 20,
            drain_timeout_ms: 1000,
            idle_timeout_secs: 0,
            allowed_origins: Vec::new(),
            max_per_user: 64,
        }
    }
}

/// The HTTP front: how long a connection may take to send a request's header, how many
/// connections it may hold, failed-authentication throttling, and which `Host`s it answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A connection must send a whole request header within this time, whether new or
    /// idle between keep-alive requests; else it is closed.
    pub header_read_timeout_secs: u64,
    /// Most open HTTP connections (WebSockets, once upgraded, are not counted). When full,
    /// the oldest idle one is closed to make room; with none idle, the new one is closed.
    pub max_connections: usize,
    /// Most idle connections (no request in progress: not yet sent one, or between
    /// keep-alive requests); past it the oldest idle one is closed.
    pub max_idle_connections: usize,
    /// Most idle connections from one address; past it that address's oldest idle one is
    /// closed. Loopback users share 127.0.0.1, so this closes idle connections, never
    /// refuses a request in progress.
    pub max_idle_per_peer: usize,
    /// Failed authentications from one address in a minute; after that its further
    /// failures are answered 429 (valid credentials still work).
    pub auth_failures_per_minute: u32,
    /// Host names the daemon answers besides localhost, 127.0.0.1, [::1] and the listen
    /// address (DNS rebinding protection); matched without the port.
    pub allowed_hosts: Vec<String>,
    /// Trust a proxy's `X-Forwarded-Proto: https`: the log-in cookie is then marked
    /// `Secure`. Set it only when a proxy that sets (and overwrites) that header is the
    /// only way in.
    pub trust_forwarded_proto: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_secs: 30,
            max_connections: 16384,
            max_idle_connections: 2048,
            max_idle_per_peer: 1024,
            auth_failures_per_minute: 10,
            allowed_hosts: Vec::new(),
            trust_forwarded_proto: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Run agents through the broker and `stoa-executor` as the session's Unix user. Off (or
    /// in single-user mode): the daemon runs them itself, as its own user.
    pub use_executor: bool,
    /// A prompt running longer than this fails with reason `timeout`.
    pub timeout_secs: u64,
    /// After SIGTERM (stop, timeout), how long before SIGKILL.
    pub stop_grace_secs: u64,
    /// Most bytes of messages one task may store; past it the task fails and its agent is
    /// stopped.
    pub max_task_output_bytes: u64,
    /// Most bytes of messages all sessions of one Unix user may keep stored; past it their
    /// tasks fail until old sessions are deleted.
    pub max_user_output_bytes: u64,
    /// Most bytes of one stored message; a larger one is stored as an `omitted` notice.
    pub max_message_bytes: usize,
    /// An agent's permission request nobody answers is denied after this long. The task
    /// waits meanwhile; the time it waits does not count against `timeout_secs`.
    pub approval_timeout_secs: u64,
}

impl ExecutionConfig {
    pub fn output_limits(&self) -> crate::daemon::store::OutputLimits {
        crate::daemon::store::OutputLimits {
            message: self.max_message_bytes,
            task: self.max_task_output_bytes,
            user: self.max_user_output_bytes,
        }
    }
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            use_executor: true,
            timeout_secs: 120,
            stop_grace_secs: 5,
            max_task_output_bytes: 16 << 20,
            max_user_output_bytes: 256 << 20,
            max_message_bytes: 2 << 20,
            approval_timeout_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The binary, or an argv prefix (default: the tool's usual binary name); a string is
    /// one path (`"/opt/bin/claude"`), a list an argv prefix (`["npx", "claude"]`).
    #[serde(deserialize_with = "string_or_list")]
    pub command: Vec<String>,
    /// Non-secret variables every run of the tool gets.
    pub env: BTreeMap<String, String>,
    /// The model API (or a gateway) the tool talks to; stoa gives it to each tool the way
    /// that tool reads it (Codex ignores `OPENAI_BASE_URL`, OpenCode wants a config...).
    pub base_url: Option<String>,
    /// The model when a session names none.
    pub model: Option<String>,
    /// Which of the user's secrets this tool receives (unset: all of them).
    pub secrets: Option<Vec<String>>,
}

/// A command given as one string (a program's path, spaces and all) or as a list.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Command {
        One(String),
        List(Vec<String>),
    }
    Ok(match Command::deserialize(d)? {
        Command::One(s) => vec![s],
        Command::List(l) => l,
    })
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: DEFAULT_LISTEN.into(),
            state_dir: if is_root() {
                "/var/lib/stoa".into()
            } else {
                user_state_dir().join("daemon")
            },
            exec_output_limit: 1 << 20,
            exec_drain_timeout_ms: 1000,
            execution: ExecutionConfig::default(),
            agents: BTreeMap::new(),
            terminal: TerminalConfig::default(),
            http: HttpConfig::default(),
            web_dir: None,
        }
    }
}

impl DaemonConfig {
    /// Reads the config; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<DaemonConfig, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => DaemonConfig::parse(&text)
                .map_err(|e| format!("invalid config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DaemonConfig::default()),
            Err(e) => Err(format!("cannot read config {}: {e}", path.display())),
        }
    }

    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        let config: DaemonConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("listen {:?}: {e}", self.listen))?;
        // The ring is a memfd the broker creates: its header and these bytes must be
        // within the broker's limit.
        let max_ring =
            crate::wire::limits::MAX_RING_BYTES as usize - crate::daemon::ring::HEADER_BYTES;
        if self.terminal.ring_bytes > max_ring {
            return Err(format!(
                "terminal.ring_bytes must be at most {max_ring} (64 MiB less the ring's header)"
            ));
        }
        if (self.terminal.window_bytes as usize) > self.terminal.ring_bytes
            || self.terminal.window_bytes < 4096
        {
            return Err(
                "terminal.window_bytes must be between 4096 and terminal.ring_bytes".into(),
            );
        }
        let h = &self.http;
        if h.header_read_timeout_secs == 0 {
            return Err("http.header_read_timeout_secs must be at least 1".into());
        }
        if h.max_idle_per_peer == 0
            || h.max_idle_per_peer > h.max_idle_connections
            || h.max_idle_connections > h.max_connections
        {
            return Err(
                "http: need 1 <= max_idle_per_peer <= max_idle_connections <= max_connections"
                    .into(),
            );
        }
        if h.auth_failures_per_minute == 0 {
            return Err("http.auth_failures_per_minute must be at least 1".into());
        }
        if self.execution.timeout_secs == 0 {
            return Err("execution.timeout_secs must be at least 1".into());
        }
        if !(1..=7 * 86_400).contains(&self.execution.approval_timeout_secs) {
            return Err("execution.approval_timeout_secs must be 1 to 604800 (a week)".into());
        }
        let e = &self.execution;
        if e.max_message_bytes < 1024
            || e.max_message_bytes as u64 > e.max_task_output_bytes
            || e.max_task_output_bytes > e.max_user_output_bytes
        {
            return Err("execution: need 1024 <= max_message_bytes <= max_task_output_bytes <= max_user_output_bytes".into());
        }
        for (tool, agent) in &self.agents {
            if stoa_executor::agents::Tool::from_name(tool).is_none() {
                return Err(format!(
                    "agents.{tool}: unknown tool (claude-code, codex, gemini, opencode)"
                ));
            }
            for name in agent.env.keys() {
                let upper = name.to_ascii_uppercase();
                if ["KEY", "TOKEN", "SECRET", "PASSWORD"]
                    .iter()
                    .any(|w| upper.contains(w))
                {
                    return Err(format!(
                        "agents.{tool}.env.{name} looks like a secret: store it with `stoa secret set {name}` instead"
                    ));
                }
            }
        }
        Ok(())
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `$XDG_STATE_HOME/stoa` or `~/.local/state/stoa`: single-user mode's state.
pub fn user_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("stoa");
    }
    home_dir().join(".local/state/stoa")
}

fn user_config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("stoa");
    }
    home_dir().join(".config/stoa")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The broker policy file: `/etc/stoa/broker.toml` as root, else the user's config dir.
pub fn default_broker_config() -> PathBuf {
    if is_root() {
        "/etc/stoa/broker.toml".into()
    } else {
        user_config_dir().join("broker.toml")
    }
}

/// The daemon config file: `/etc/stoa/config.toml` as root, else the user's config dir.
pub fn default_daemon_config() -> PathBuf {
    if is_root() {
        "/etc/stoa/config.toml".into()
    } else {
        user_config_dir().join("config.toml")
    }
}

/// Where the workers keep each user's store when the policy does not say.
pub fn default_workers_dir() -> PathBuf {
    if is_root() {
        "/var/lib/stoa-workers".into()
    } else {
        user_state_dir().join("workers")
    }
}

/// The broker's state directory when the policy does not name one.
pub fn default_broker_state_dir() -> PathBuf {
    if is_root() {
        "/var/lib/stoa-broker".into()
    } else {
        user_state_dir().join("broker")
    }
}
