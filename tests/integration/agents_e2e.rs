//! Issues 3 and 13: the real agent CLIs (Claude Code, Codex, Gemini CLI, OpenCode), end to
//! end, against the local mock of the model APIs.
//!
//! The mock (`tests/e2e/mock_llm.py`) and a whole `stoa serve` (broker, daemon, executors,
//! the agent) run in one network namespace that has nothing but loopback: `unshare --net`
//! starts the mock, which anchors the namespace, and `stoa serve` joins it with `nsenter`.
//! The namespace has no name, so it disappears with the last of those processes. The test
//! talks to the daemon with `curl` run inside the namespace. The agent also gets
//! `HTTP(S)_PROXY` pointing at the mock, which logs and refuses any CONNECT, so an attempt
//! to go anywhere else would show in the mock's log.
//!
//! Alice has no dotfiles of any tool: the daemon's config names only the CLI, `base_url`,
//! `model` and `secrets` (the key's name), and the key is a stoa secret of hers. Each test
//! checks that the prompt completes as her, and that neither the key nor the prompt shows
//! where it must not: in any process's command line (every process, sampled over and over
//! while the agent runs), stoa's log and audit log, or an API response (the key nowhere;
//! the prompt only as the task's own `prompt` and in the session's messages).
//!
//! Each CLI comes from `$STOA_E2E_<TOOL>` (CLAUDE, CODEX, GEMINI, OPENCODE), else
//! `/opt/stoa-ci/<tool>/bin/<binary>`, installed from the npm registry by
//! `tests/e2e/install-agents.sh` (run by `.ci/run`, and by the test when it is missing).
//! When it cannot be installed, or a tool the test needs is absent, the test prints
//! `SKIPPED: ...` and passes.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "claude_code_runs_the_mocks_bash_tool_as_alice_offline",
        claude_code_e2e,
    ),
    (
        "codex_answers_alice_from_stoas_config_alone_offline",
        codex_e2e,
    ),
    (
        "gemini_answers_alice_from_stoas_config_alone_offline",
        gemini_e2e,
    ),
    (
        "opencode_answers_alice_from_stoas_config_alone_offline",
        opencode_e2e,
    ),
    (
        "opencode_refused_by_the_model_api_fails_the_task_with_its_words_offline",
        opencode_refused_e2e,
    ),
];

const E2E_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e");
/// Inside the namespace every port is free: fixed ones are fine.
const MOCK_PORT: u16 = 8765;
const STOA_PORT: u16 = 7433;
const API_USER: &str = "e2e-alice";
const WORKTREE: &str = "e2e-worktree";
/// What the mock answers every prompt with.
const REPLY: &str = "Hello from the mock server.";

/// One agent CLI as the tests install and configure it.
pub struct Agent {
    /// stoa's name for it, and `install-agents.sh`'s.
    pub tool: &'static str,
    pub bin: &'static str,
    /// The variable that names another build of the CLI to drive.
    pub env_var: &'static str,
    /// The secret its key is stored as.
    pub key_name: &'static str,
    /// The header the key travels in to the model API.
    pub key_header: &'static str,
    /// The model API's path (the mock's log).
    pub model_path: &'static str,
    /// `agents.<tool>` beyond `command`, `secrets` and the proxy variables.
    pub config: &'static str,
    /// Extra arguments after the binary in `command`.
    pub args: &'static [&'static str],
    /// Hosts the CLI still tries at every start (refused by the mock, logged).
    pub tries: &'static [&'static str],
    /// The dotfiles the tool would read: alice must have none of them.
    pub dotfiles: &'static [&'static str],
}

pub const CLAUDE: Agent = Agent {
    tool: "claude-code",
    bin: "claude",
    env_var: "STOA_E2E_CLAUDE",
    key_name: "ANTHROPIC_API_KEY",
    key_header: "x-api-key",
    model_path: "/v1/messages",
    config: "base_url = \"http://127.0.0.1:8765\"\n",
    args: &[],
    tries: &[],
    dotfiles: &[".claude", ".claude.json"],
};

const CODEX: Agent = Agent {
    tool: "codex",
    bin: "codex",
    env_var: "STOA_E2E_CODEX",
    key_name: "OPENAI_API_KEY",
    key_header: "authorization",
    model_path: "/v1/responses",
    config: "base_url = \"http://127.0.0.1:8765/v1\"\nmodel = \"gpt-mock\"\n",
    // Codex syncs its plugin marketplace from GitHub and chatgpt.com at every start; the
    // README's offline setup turns that off the same way.
    args: &["-c", "features.plugins=false"],
    tries: &[],
    dotfiles: &[".codex"],
};

pub const GEMINI: Agent = Agent {
    tool: "gemini",
    bin: "gemini",
    env_var: "STOA_E2E_GEMINI",
    key_name: "GEMINI_API_KEY",
    key_header: "x-goog-api-key",
    model_path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    config: "base_url = \"http://127.0.0.1:8765\"\nmodel = \"gemini-2.5-flash\"\n",
    args: &[],
    tries: &[],
    dotfiles: &[".gemini"],
};

const OPENCODE: Agent = Agent {
    tool: "opencode",
    bin: "opencode",
    env_var: "STOA_E2E_OPENCODE",
    key_name: "ANTHROPIC_API_KEY",
    key_header: "x-api-key",
    model_path: "/v1/messages",
    config: "base_url = \"http://127.0.0.1:8765/v1\"\nmodel = \"anthropic/claude-sonnet-4-5\"\n",
    args: &[],
    // OpenCode 1.18 fetches its config directory's plugin package from the npm registry
    // at start, whatever its settings say.
    tries: &["registry.npmjs.org:443"],
    dotfiles: &[".config/opencode", ".local/share/opencode"],
};

pub fn skipped(test: &str, why: &str) -> Result<(), Failed> {
    eprintln!("SKIPPED: {test}: {why}");
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the e2e tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    for tool in ["unshare", "nsenter", "ip", "curl", "python3"] {
        if !have(tool) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    // Needs the right to make network namespaces (not there in some containers).
    let netns = Command::new("unshare")
        .args(["--net", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (!netns).then(|| "`unshare --net` is not permitted here".to_string())
}

fn version_of(cli: &Path) -> Option<String> {
    let out = Command::new(cli).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The CLI to drive, installing the pinned one when it is missing; `Err` says why not.
fn find_cli(agent: &Agent) -> Result<(PathBuf, String), String> {
    if let Some(path) = std::env::var_os(agent.env_var).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return version_of(&path)
            .map(|v| (path.clone(), v))
            .ok_or_else(|| format!("${}={} does not run", agent.env_var, path.display()));
    }
    let prefix = format!("/opt/stoa-ci/{}", agent.tool);
    let path = Path::new(&prefix).join("bin").join(agent.bin);
    if let Some(v) = version_of(&path) {
        return Ok((path, v));
    }
    eprintln!("agents e2e: installing {} into {prefix} (npm)", agent.tool);
    let status = Command::new(format!("{E2E_DIR}/install-agents.sh"))
        .args([agent.tool, &prefix])
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(format!("tests/e2e/install-agents.sh failed ({s})")),
        Err(e) => return Err(format!("tests/e2e/install-agents.sh: {e}")),
    }
    version_of(&path)
        .map(|v| (path.clone(), v))
        .ok_or_else(|| format!("{} does not run after installing it", path.display()))
}

/// The CLI, or why the test is skipped.
pub fn prepare(test: &str, agent: &Agent) -> Result<(PathBuf, String), String> {
    if let Some(why) = missing_prerequisite() {
        return Err(why);
    }
    let (cli, version) = find_cli(agent).map_err(|why| format!("no {} CLI: {why}", agent.tool))?;
    eprintln!("agents e2e: {test}: {} ({version})", cli.display());
    Ok((cli, version))
}

fn net_ns(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

/// Processes (other than zombies) in the network namespace `ns`.
fn processes_in(ns: &Path) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| net_ns(*p as u32).as_deref() == Some(ns) && alive(*p))
        .collect()
}

fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A string no run would produce by chance (the key, the prompt's marker).
fn distinctive(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{what}-{}-{nanos:08x}", std::process::id())
}

/// The mock, a `stoa serve` in its namespace, and what to clean up.
pub struct World {
    pub dir: PathBuf,
    mock: Child,
    /// `/proc/<mock>/ns/net`, the namespace everything runs in.
    ns_path: String,
    /// Its identity (`net:[inode]`), to find every process left in it; `None` unless it
    /// is known to differ from the test's own (or once it is gone).
    ns: Option<PathBuf>,
    stoa: Option<Child>,
    home: PathBuf,
    home_before: BTreeSet<String>,
    /// Entries of /tmp that were alice's before (agents keep files there: Claude Code's
    /// `/tmp/claude-<uid>`...): the others of hers are removed at the end.
    tmp_before: BTreeSet<String>,
    /// What the broker may make under /run/stoa (gemini's settings), and was not there:
    /// the file first, then the directory.
    run_stoa_new: Vec<PathBuf>,
}

impl World {
    /// Starts the mock and `stoa serve` with `[agents.<tool>]` for `cli`.
    fn start(agent: &Agent, cli: &Path) -> World {
        World::start_with(agent, cli, "")
    }

    /// As `start`, with `extra` appended to the daemon's config.
    pub fn start_with(agent: &Agent, cli: &Path, extra: &str) -> World {
        let dir = PathBuf::from(format!("/run/stoa-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let home = PathBuf::from(format!("/home/{ALICE}"));
        let home_before = entries(&home);
        let tmp_before = alices_tmp();
        let run_stoa_new = [
            PathBuf::from(stoa_executor::agents::gemini::SYSTEM_SETTINGS_PATH),
            PathBuf::from("/run/stoa"),
        ]
        .into_iter()
        .filter(|p| !p.exists())
        .collect();

        // The mock first: it brings up loopback in a fresh namespace and holds it.
        let script = format!(
            "PATH=/usr/sbin:/sbin:$PATH; ip link set lo up && exec python3 {E2E_DIR}/mock_llm.py {MOCK_PORT} {}",
            dir.join("mock.jsonl").display()
        );
        let mut mock = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(dir.join("mock.stderr")).unwrap())
            .spawn()
            .expect("start the mock under unshare --net");
        // It prints one line once it listens.
        let mut line = String::new();
        let _ = BufReader::new(mock.stdout.take().unwrap()).read_line(&mut line);
        let ns_path = format!("/proc/{}/ns/net", mock.id());
        let own = net_ns(std::process::id());
        let ns = net_ns(mock.id()).filter(|ns| Some(ns) != own.as_ref());
        let mut world = World {
            dir,
            mock,
            ns_path,
            ns,
            stoa: None,
            home,
            home_before,
            tmp_before,
            run_stoa_new,
        };
        assert!(
            line.contains("mock listening"),
            "the mock did not start: {line:?} {}",
            fs::read_to_string(world.dir.join("mock.stderr")).unwrap_or_default()
        );
        assert!(
            world.ns.is_some(),
            "the mock is not in a network namespace of its own"
        );
        let links = run(
            "nsenter",
            &[
                &format!("--net={}", world.ns_path),
                "--",
                "ip",
                "-o",
                "link",
                "show",
            ],
        );
        let names: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
        assert_eq!(
            names,
            ["lo"],
            "the namespace must have only loopback: {links}"
        );
        world.start_stoa(agent, cli, extra);
        world
    }

    /// The mock's pid: its network namespace is the one everything runs in.
    pub fn mock_pid(&self) -> u32 {
        self.mock.id()
    }

    fn start_stoa(&mut self, agent: &Agent, cli: &Path, extra: &str) {
        let dir = &self.dir;
        let stoa = PathBuf::from(env!("CARGO_BIN_EXE_stoa"));
        let executor = stoa.with_file_name("stoa-executor");
        if !executor.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "stoa-executor"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build");
            assert!(status.success(), "building stoa-executor failed");
        }
        // Root-owned copies: the broker refuses an executor anyone else could replace.
        for (src, name) in [(&stoa, "stoa"), (&executor, "stoa-executor")] {
            let dst = dir.join("bin").join(name);
            fs::copy(src, &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let policy = format!(
            "executor_path = \"{}\"\nstate_dir = \"{}\"\nworkers_dir = \"{}\"\nlocal_socket = \"{}\"\nservice_user = \"{SERVICE}\"\nallow_groups = [\"{GROUP}\"]\nmin_uid = 1000\n",
            dir.join("bin/stoa-executor").display(),
            dir.join("broker").display(),
            dir.join("workers").display(),
            dir.join("local.sock").display(),
        );
        let mock = format!("http://127.0.0.1:{MOCK_PORT}");
        // A JSON string is a TOML basic string.
        let command: Vec<String> = std::iter::once(cli.display().to_string())
            .chain(agent.args.iter().map(|a| a.to_string()))
            .map(|a| Value::from(a).to_string())
            .collect();
        let config = format!(
            r#"listen = "127.0.0.1:{STOA_PORT}"
state_dir = "{state}"

[agents.{tool}]
command = [{command}]
secrets = ["{key_name}"]
env = {{ HTTP_PROXY = "{mock}", HTTPS_PROXY = "{mock}", http_proxy = "{mock}", https_proxy = "{mock}", NO_PROXY = "127.0.0.1,localhost", no_proxy = "127.0.0.1,localhost" }}
{rest}"#,
            state = dir.join("daemon").display(),
            tool = agent.tool,
            command = command.join(", "),
            key_name = agent.key_name,
            rest = agent.config,
        ) + extra;
        fs::write(dir.join("broker.toml"), policy).unwrap();
        fs::write(dir.join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        // nsenter execs: the child is `stoa serve` itself.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path))
            .arg("--")
            .arg(dir.join("bin/stoa"))
            .arg("serve")
            .arg("--broker-config")
            .arg(dir.join("broker.toml"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            // As talkative as stoa gets: what it logs must still hold no key or prompt.
            .env("STOA_LOG", "debug")
            .env("NO_COLOR", "1")
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start stoa serve in the namespace");
        self.stoa = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.request("GET", "/health", None, None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "stoa did not become healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn mock_log(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.join("mock.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.into())))
            .collect()
    }

    /// An HTTP request to the daemon, from inside the namespace (curl under nsenter; the
    /// body on its stdin, never in its argv). Status 0 when there was no answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path))
            .args(["--", "curl", "-sS", "--max-time", "30", "-X", method])
            .args(["-w", "\n%{http_code}"]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("http://127.0.0.1:{STOA_PORT}{path}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("nsenter curl");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(b.as_bytes()).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
        (code.trim().parse().unwrap_or(0), value)
    }

    pub fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(token), Some(body.to_string()))
    }

    pub fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.request("GET", path, Some(token), None)
    }

    fn admin_token(&self) -> String {
        fs::read_to_string(self.dir.join("broker/admin.token"))
            .expect("the admin token")
            .trim()
            .to_string()
    }

    /// An API user for alice (the CLI edits the broker's store), with `key` stored as her
    /// secret `key_name`, which the broker hands to the agent. Returns her token.
    pub fn alice(&self, key_name: &str, key: &str) -> String {
        let out = Command::new(self.dir.join("bin/stoa"))
            .args(["user", "add", API_USER, "--unix-user", ALICE])
            .env("STOA_BROKER_CONFIG", self.dir.join("broker.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stoa user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!token.is_empty(), "stoa user add printed no token");
        let (status, reply) = self.request(
            "PUT",
            &format!("/users/me/secrets/{key_name}"),
            Some(&token),
            Some(key.into()),
        );
        assert_eq!(status, 204, "setting the secret: {reply}");
        token
    }

    /// A session of `agent` in a worktree alice made, one prompt, and everything seen
    /// while it ran.
    fn prompt(&self, agent: &Agent, cli: &Path, token: &str, prompt: &str, watch: &[&str]) -> Run {
        let worktree = format!("/home/{ALICE}/{WORKTREE}");
        run("runuser", &["-u", ALICE, "--", "mkdir", &worktree]);
        let mut session = json!({ "agentic_tool": agent.tool, "worktree": worktree });
        if agent.tool == "claude-code" {
            session["permission_mode"] = json!("bypassPermissions");
        }
        let (status, session) = self.post("/sessions", token, session);
        assert_eq!(status, 201, "POST /sessions: {session}");
        let session_id = session["session_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();

        // Every directory up to the CLI marks the agent's processes (node runs a script
        // there, and a wrapper execs a native binary beside it).
        let prefix = cli
            .parent()
            .and_then(Path::parent)
            .unwrap_or(cli)
            .display()
            .to_string();
        let sampler = Sampler::start(watch, &prefix);
        let admin = self.admin_token();
        let mut api = vec![];
        let (status, task) = self.post(
            &format!("/sessions/{session_id}/prompt"),
            token,
            json!({ "prompt": prompt }),
        );
        assert_eq!(status, 202, "POST prompt: {task}");
        let task_id = task["task_id"].as_str().unwrap_or_default().to_string();
        api.push(("POST prompt".to_string(), task));

        let prompted = Instant::now();
        let deadline = prompted + Duration::from_secs(120);
        let task = loop {
            let (status, task) = self.get(&format!("/tasks/{task_id}"), token);
            assert_eq!(status, 200, "GET /tasks: {task}");
            if matches!(task["status"].as_str(), Some("completed" | "failed")) {
                break task;
            }
            // What the API shows of running processes (to the admin alone).
            let (_, processes) = self.get("/processes", &admin);
            api.push(("GET /processes (running)".to_string(), processes));
            api.push((format!("GET /tasks/{task_id} (running)"), task));
            assert!(
                Instant::now() < deadline,
                "the task did not finish\nstoa log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let secs = prompted.elapsed().as_secs_f64();
        let sampled = sampler.stop();
        api.push((format!("GET /tasks/{task_id}"), task.clone()));
        let (status, messages) = self.get(&format!("/sessions/{session_id}/messages"), token);
        assert_eq!(status, 200, "GET messages: {messages}");
        let events: Vec<Value> = messages
            .as_array()
            .map(|m| m.iter().map(|m| m["event"].clone()).collect())
            .unwrap_or_default();
        api.push(("GET messages".to_string(), messages));
        for path in [
            "/sessions".to_string(),
            format!("/sessions/{session_id}"),
            format!("/sessions/{session_id}/tasks"),
            "/users/me".to_string(),
            "/users/me/secrets".to_string(),
        ] {
            let (status, value) = self.get(&path, token);
            assert_eq!(status, 200, "GET {path}: {value}");
            api.push((format!("GET {path}"), value));
        }
        let (_, processes) = self.get("/processes", &admin);
        api.push(("GET /processes (admin)".to_string(), processes));
        Run {
            worktree,
            task,
            events,
            api,
            sampled,
            secs,
        }
    }

    /// Stops everything and returns the processes that were still in the namespace once
    /// `stoa serve` and the mock had exited (they are then killed), and the files under
    /// /run/stoa the broker left.
    pub fn shutdown(&mut self) -> Vec<String> {
        if let Some(mut stoa) = self.stoa.take() {
            let pid = nix::unistd::Pid::from_raw(stoa.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(stoa.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = stoa.kill();
            let _ = stoa.wait();
        }
        let _ = self.mock.kill();
        let _ = self.mock.wait();
        // Whatever is still in the namespace was left behind (give exits a moment).
        let mut described = vec![];
        if let Some(ns) = self.ns.take() {
            let mut left = processes_in(&ns);
            let deadline = Instant::now() + Duration::from_secs(3);
            while !left.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                left = processes_in(&ns);
            }
            for p in left {
                described.push(format!("{p} {:?}", cmdline(p)));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // What the agent created in alice's home (worktree, ~/.claude...) goes too, and
        // what it left in /tmp.
        for name in entries(&self.home).difference(&self.home_before) {
            let path = self.home.join(name);
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        for name in alices_tmp().difference(&self.tmp_before) {
            let path = Path::new("/tmp").join(name);
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        // The broker removes at stop the settings file it made, and /run/stoa if it made
        // that: anything still there is reported (and removed).
        for path in std::mem::take(&mut self.run_stoa_new) {
            if fs::symlink_metadata(&path).is_ok() {
                described.push(format!("{} left behind", path.display()));
                let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir(&path));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        described
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The names in /tmp owned by alice.
fn alices_tmp() -> BTreeSet<String> {
    let uid = uid_of(ALICE);
    entries(Path::new("/tmp"))
        .into_iter()
        .filter(|n| fs::symlink_metadata(Path::new("/tmp").join(n)).is_ok_and(|m| m.uid() == uid))
        .collect()
}

/// What one prompt did.
struct Run {
    worktree: String,
    task: Value,
    events: Vec<Value>,
    /// Every API response seen (what was asked, what came back).
    api: Vec<(String, Value)>,
    sampled: Sampled,
    secs: f64,
}

/// Reads every process's command line, over and over, until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Sampled>,
}

#[derive(Default)]
struct Sampled {
    rounds: u64,
    /// Command lines of the agent's processes (those naming `prefix`).
    agent: BTreeSet<String>,
    /// A command line holding one of the watched strings: pid, which, the command line.
    leaks: BTreeSet<String>,
}

impl Sampler {
    fn start(watch: &[&str], prefix: &str) -> Sampler {
        let watch: Vec<Vec<u8>> = watch.iter().map(|w| w.as_bytes().to_vec()).collect();
        let prefix = prefix.as_bytes().to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sampled = Sampled::default();
            let contains =
                |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            while !stopped.load(Ordering::Relaxed) {
                for pid in all_pids() {
                    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
                        continue;
                    };
                    let shown = || String::from_utf8_lossy(&raw).replace('\0', " ");
                    for w in &watch {
                        if contains(&raw, w) && sampled.leaks.len() < 32 {
                            sampled.leaks.insert(format!(
                                "pid {pid} shows {:?}: {}",
                                String::from_utf8_lossy(w),
                                shown()
                            ));
                        }
                    }
                    if contains(&raw, &prefix) && sampled.agent.len() < 32 {
                        sampled.agent.insert(shown());
                    }
                }
                sampled.rounds += 1;
                // Leaves the other core's work room; a process lives far longer.
                std::thread::sleep(Duration::from_millis(2));
            }
            sampled
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler")
    }
}

/// Removes every `"prompt": <prompt>` field: where the prompt belongs (a task's record).
fn without_prompt_fields(v: &Value, prompt: &str) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, v)| !(k.as_str() == "prompt" && v.as_str() == Some(prompt)))
                .map(|(k, v)| (k.clone(), without_prompt_fields(v, prompt)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| without_prompt_fields(v, prompt))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every check that holds whatever the tool: where the key and the prompt may and may not
/// be, who owns what the agent wrote, what reached the mock.
fn check_run(world: &World, agent: &Agent, run: &Run, key: &str, prompt: &str, marker: &str) {
    let context = format!(
        "task: {}\nevents: {}\nstoa log:\n{}",
        run.task,
        serde_json::to_string_pretty(&run.events).unwrap_or_default(),
        world.log()
    );
    // The command lines: the agent was seen (the sampling covered its run), and no
    // process anywhere showed the key or the prompt.
    assert!(
        !run.sampled.agent.is_empty() && run.sampled.rounds >= 2,
        "the sampler never saw the agent running ({} rounds)\n{context}",
        run.sampled.rounds
    );
    assert!(
        run.sampled.leaks.is_empty(),
        "a command line showed the key or the prompt: {:#?}",
        run.sampled.leaks
    );
    // stoa's own log and the broker's audit log.
    for (what, text) in [
        ("stoa's log", world.log()),
        (
            "the audit log",
            fs::read_to_string(world.dir.join("broker/audit.jsonl")).unwrap_or_default(),
        ),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(!text.contains(key), "{what} holds the key:\n{text}");
        assert!(!text.contains(marker), "{what} holds the prompt:\n{text}");
    }
    // The API: the key in no response at all; the prompt only as a task's `prompt` and in
    // the session's messages (the agent's own echo of it).
    for (what, value) in &run.api {
        let text = value.to_string();
        assert!(!text.contains(key), "{what} holds the key: {text}");
        if what != "GET messages" {
            let rest = without_prompt_fields(value, prompt).to_string();
            assert!(
                !rest.contains(marker),
                "{what} holds the prompt outside a task's prompt field: {text}"
            );
        }
    }
    // What the agent wrote in alice's home is hers.
    let uid = uid_of(ALICE);
    let mut stack: Vec<PathBuf> = entries(&world.home)
        .difference(&world.home_before)
        .map(|n| world.home.join(n))
        .collect();
    let mut written = 0;
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.uid(), uid, "{} is not {ALICE}'s", path.display());
        written += 1;
        if meta.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(written > 1, "the agent wrote nothing in {ALICE}'s home");
    // The mock saw only the model API, each request with the key from alice's secret,
    // and no attempt to go anywhere else but the known ones (refused).
    let mock_log = world.mock_log();
    let models: Vec<&Value> = mock_log
        .iter()
        .filter(|r| r["method"] != "CONNECT")
        .collect();
    assert!(!models.is_empty(), "no request reached the mock\n{context}");
    for r in &models {
        let path = r["path"].as_str().unwrap_or_default();
        assert!(
            r["method"] == "POST" && path.split('?').next() == Some(agent.model_path),
            "unexpected request to the mock: {r}\n{context}"
        );
        let headers = r["headers"].as_object().cloned().unwrap_or_default();
        let sent = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(agent.key_header))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default();
        assert!(
            sent == key || sent == format!("Bearer {key}"),
            "the request does not carry alice's key in {}: {r}",
            agent.key_header
        );
    }
    for r in mock_log.iter().filter(|r| r["method"] == "CONNECT") {
        assert_eq!(r["PROXY_REFUSED"], true, "{r}");
        let host = r["path"].as_str().unwrap_or_default();
        assert!(
            agent.tries.contains(&host),
            "the agent tried to reach {host} (refused)\n{context}"
        );
    }
}

/// The assistant's text, all of it, in order.
fn assistant_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["kind"] == "assistant_text")
        .filter_map(|e| e["text"].as_str())
        .collect()
}

/// Alice has none of the tool's dotfiles, so the config is stoa's alone: any left by an
/// earlier test (she is a test user) are removed before the world starts.
fn clear_dotfiles(agent: &Agent) {
    let home = PathBuf::from(format!("/home/{ALICE}"));
    for dotfile in agent.dotfiles {
        let path = home.join(dotfile);
        let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        assert!(
            fs::symlink_metadata(&path).is_err(),
            "{} cannot be removed: the test must start without it",
            path.display()
        );
    }
}

fn summary(test: &str, version: &str, world: &World, run: &Run, started: Instant) {
    let mock_log = world.mock_log();
    eprintln!(
        "agents e2e: {test}: {version}: task {:.1}s, {} cmdline rounds over {} agent processes, {} API responses checked, mock: {}; total {:.1}s",
        run.secs,
        run.sampled.rounds,
        run.sampled.agent.len(),
        run.api.len(),
        mock_log
            .iter()
            .map(|r| format!("{} {}", r["method"].as_str().unwrap_or("?"), r["path"].as_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
}

/// Codex, Gemini, OpenCode: one plain prompt, answered from stoa's config alone.
fn plain_e2e(test: &str, agent: &Agent) -> Result<(), Failed> {
    let started = Instant::now();
    let (cli, version) = match prepare(test, agent) {
        Ok(found) => found,
        Err(why) => return skipped(test, &why),
    };
    clear_dotfiles(agent);
    let mut world = World::start(agent, &cli);
    if agent.tool == "gemini" {
        // The broker, as root, wrote the settings gemini needs, where gemini trusts them.
        let settings = Path::new(stoa_executor::agents::gemini::SYSTEM_SETTINGS_PATH);
        assert!(
            stoa_executor::agents::gemini::trusted_settings(settings),
            "{} is missing or not root's alone\nstoa log:\n{}",
            settings.display(),
            world.log()
        );
    }
    let key = distinctive("sk-stoa-e2e-key");
    let marker = distinctive("PROMPTMARK");
    let token = world.alice(agent.key_name, &key);
    let prompt = format!("Say hello. {marker}");
    let run = world.prompt(agent, &cli, &token, &prompt, &[&key, &marker]);
    let context = format!(
        "task: {}\nevents: {}\nstoa log:\n{}",
        run.task,
        serde_json::to_string_pretty(&run.events).unwrap_or_default(),
        world.log()
    );
    assert_eq!(run.task["status"], "completed", "{context}");
    assert_eq!(run.task["executed_via"], "executor", "{context}");
    assert_eq!(run.task["prompt"], prompt.as_str(), "{context}");
    let kinds: Vec<&str> = run
        .events
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"session_started"), "{context}");
    assert_eq!(assistant_text(&run.events), REPLY, "{context}");
    let result = run
        .events
        .iter()
        .rfind(|e| e["kind"] == "result")
        .unwrap_or_else(|| panic!("no result event\n{context}"));
    assert_eq!(result["is_error"], false, "{context}");
    // The model got the prompt (it is the model API's to see).
    assert!(
        world
            .mock_log()
            .iter()
            .any(|r| r["body"].to_string().contains(&marker)),
        "the prompt never reached the model API\n{context}"
    );
    check_run(&world, agent, &run, &key, &prompt, &marker);
    summary(test, &version, &world, &run, started);
    let left = world.shutdown();
    assert!(
        left.is_empty(),
        "left behind after stoa and the mock exited: {left:?}"
    );
    Ok(())
}

fn codex_e2e() -> Result<(), Failed> {
    plain_e2e(
        "codex_answers_alice_from_stoas_config_alone_offline",
        &CODEX,
    )
}

fn gemini_e2e() -> Result<(), Failed> {
    plain_e2e(
        "gemini_answers_alice_from_stoas_config_alone_offline",
        &GEMINI,
    )
}

fn opencode_e2e() -> Result<(), Failed> {
    plain_e2e(
        "opencode_answers_alice_from_stoas_config_alone_offline",
        &OPENCODE,
    )
}

/// The model API refuses the key (403): OpenCode reports it and exits 1, and the task's
/// error says so in the agent's own words, without the key.
fn opencode_refused_e2e() -> Result<(), Failed> {
    let test = "opencode_refused_by_the_model_api_fails_the_task_with_its_words_offline";
    let started = Instant::now();
    let (cli, version) = match prepare(test, &OPENCODE) {
        Ok(found) => found,
        Err(why) => return skipped(test, &why),
    };
    clear_dotfiles(&OPENCODE);
    let mut world = World::start(&OPENCODE, &cli);
    let key = distinctive("sk-stoa-e2e-key");
    let marker = distinctive("PROMPTMARK");
    let token = world.alice(OPENCODE.key_name, &key);
    // The mock answers 403 to any request holding MOCK403.
    let prompt = format!("MOCK403 {marker}");
    let run = world.prompt(&OPENCODE, &cli, &token, &prompt, &[&key, &marker]);
    let context = format!(
        "task: {}\nevents: {}\nstoa log:\n{}",
        run.task,
        serde_json::to_string_pretty(&run.events).unwrap_or_default(),
        world.log()
    );
    assert_eq!(run.task["status"], "failed", "{context}");
    assert_eq!(run.task["exit_code"], 1, "{context}");
    let error = run.task["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("the agent exited with code 1: ")
            && error.contains("mock: this key may not use this model (MOCK403)"),
        "the error does not carry the agent's words: {error:?}\n{context}"
    );
    let result = run
        .events
        .iter()
        .rfind(|e| e["kind"] == "result")
        .unwrap_or_else(|| panic!("no result event\n{context}"));
    assert_eq!(result["is_error"], true, "{context}");
    check_run(&world, &OPENCODE, &run, &key, &prompt, &marker);
    summary(test, &version, &world, &run, started);
    let left = world.shutdown();
    assert!(left.is_empty(), "processes left in the namespace: {left:?}");
    Ok(())
}

/// Claude Code runs the mock's Bash tool as alice, in her worktree.
fn claude_code_e2e() -> Result<(), Failed> {
    let test = "claude_code_runs_the_mocks_bash_tool_as_alice_offline";
    let started = Instant::now();
    let (claude, version) = match prepare(test, &CLAUDE) {
        Ok(found) => found,
        Err(why) => return skipped(test, &why),
    };
    clear_dotfiles(&CLAUDE);
    let mut world = World::start(&CLAUDE, &claude);
    // Agents run as alice: she must be able to run it (every directory on the way).
    let out = Command::new("runuser")
        .args(["-u", ALICE, "--"])
        .arg(&claude)
        .arg("--version")
        .current_dir("/")
        .output()?;
    assert!(
        out.status.success(),
        "{ALICE} cannot run {}: {}",
        claude.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let key = distinctive("sk-stoa-e2e-key");
    let marker = distinctive("PROMPTMARK");
    let token = world.alice(CLAUDE.key_name, &key);
    // The mock answers a prompt containing RUNTOOL with one Bash tool_use:
    // `id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt`.
    let prompt = format!("RUNTOOL: write down who and where you are {marker}");
    let run = world.prompt(&CLAUDE, &claude, &token, &prompt, &[&key, &marker]);
    let worktree = &run.worktree;
    let events = &run.events;
    let context = format!(
        "task: {}\nevents: {}\nstoa log:\n{}",
        run.task,
        serde_json::to_string_pretty(events).unwrap_or_default(),
        world.log()
    );

    assert_eq!(run.task["status"], "completed", "{context}");
    assert_eq!(run.task["executed_via"], "executor", "{context}");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"session_started"), "{context}");
    let tool_use = events
        .iter()
        .find(|e| e["kind"] == "tool_use")
        .unwrap_or_else(|| panic!("no tool_use event\n{context}"));
    assert_eq!(tool_use["name"], "Bash", "{context}");
    assert_eq!(tool_use["id"], "toolu_mock_1", "{context}");
    let tool_result = events
        .iter()
        .find(|e| e["kind"] == "tool_result")
        .unwrap_or_else(|| panic!("no tool_result event\n{context}"));
    let expected = format!("{ALICE}\n{worktree}");
    assert_eq!(tool_result["content"], expected.as_str(), "{context}");
    assert_eq!(tool_result["is_error"], false, "{context}");
    assert_eq!(tool_result["tool_use_id"], "toolu_mock_1", "{context}");
    let result = events
        .iter()
        .rfind(|e| e["kind"] == "result")
        .unwrap_or_else(|| panic!("no result event\n{context}"));
    assert_eq!(result["is_error"], false, "{context}");
    assert_eq!(result["num_turns"], 2, "{context}");
    assert_eq!(result["text"], REPLY, "{context}");

    // The command really ran as alice, in the worktree.
    let file = Path::new(worktree).join("whoami.txt");
    let meta = fs::metadata(&file)?;
    assert_eq!(meta.uid(), uid_of(ALICE), "owner of {}", file.display());
    assert_eq!(fs::read_to_string(&file)?, format!("{expected}\n"));

    check_run(&world, &CLAUDE, &run, &key, &prompt, &marker);
    let mock_log = world.mock_log();
    assert!(mock_log.len() >= 2, "{context}");
    let last = mock_log.last().unwrap();
    assert!(
        last["body"].to_string().contains("toolu_mock_1"),
        "the second request carries the tool result: {last}"
    );
    summary(test, &version, &world, &run, started);
    let left = world.shutdown();
    assert!(
        left.is_empty(),
        "left behind after stoa and the mock exited: {left:?}"
    );
    Ok(())
}
