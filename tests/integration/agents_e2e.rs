//! Issue 3: the real Claude Code CLI, end to end, against the local mock of the model API.
//!
//! The mock (`tests/e2e/mock_llm.py`) and a whole `stoa serve` (broker, daemon, executors,
//! the agent) run in one network namespace that has nothing but loopback: `unshare --net`
//! starts the mock, which anchors the namespace, and `stoa serve` joins it with `nsenter`.
//! The namespace has no name, so it disappears with the last of those processes. The test
//! talks to the daemon with `curl` run inside the namespace. The agent also gets
//! `HTTP(S)_PROXY` pointing at the mock, which logs and refuses any CONNECT, so an attempt
//! to go anywhere else would show in the mock's log.
//!
//! The CLI comes from `$STOA_E2E_CLAUDE`, else `/opt/stoa-ci/claude-code/bin/claude`,
//! installed from the npm registry by `tests/e2e/install-claude-code.sh` (run by `.ci/run`,
//! and by this test when it is missing). When it cannot be installed, or a tool the test
//! needs is absent, the test prints `SKIPPED: ...` and passes.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "claude_code_runs_the_mocks_bash_tool_as_alice_offline",
    claude_code_e2e,
)];

const DEFAULT_CLAUDE: &str = "/opt/stoa-ci/claude-code/bin/claude";
const E2E_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e");
/// Inside the namespace every port is free: fixed ones are fine.
const MOCK_PORT: u16 = 8765;
const STOA_PORT: u16 = 7433;
const API_USER: &str = "e2e-alice";
const WORKTREE: &str = "e2e-worktree";

fn skipped(why: &str) -> Result<(), Failed> {
    eprintln!("SKIPPED: claude_code_runs_the_mocks_bash_tool_as_alice_offline: {why}");
    Ok(())
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn version_of(claude: &Path) -> Option<String> {
    let out = Command::new(claude).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The CLI to drive, installing the pinned one when it is missing; `Err` says why not.
pub fn find_claude() -> Result<(PathBuf, String), String> {
    if let Some(path) = std::env::var_os("STOA_E2E_CLAUDE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return version_of(&path)
            .map(|v| (path.clone(), v))
            .ok_or_else(|| format!("$STOA_E2E_CLAUDE={} does not run", path.display()));
    }
    let path = PathBuf::from(DEFAULT_CLAUDE);
    if let Some(v) = version_of(&path) {
        return Ok((path, v));
    }
    eprintln!("agents e2e: installing Claude Code into /opt/stoa-ci/claude-code (npm)");
    let status = Command::new(format!("{E2E_DIR}/install-claude-code.sh"))
        .arg("/opt/stoa-ci/claude-code")
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(format!("tests/e2e/install-claude-code.sh failed ({s})")),
        Err(e) => return Err(format!("tests/e2e/install-claude-code.sh: {e}")),
    }
    version_of(&path)
        .map(|v| (path, v))
        .ok_or_else(|| format!("{DEFAULT_CLAUDE} does not run after installing it"))
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
    /// Claude Code keeps per-project task files in `/tmp/claude-<uid>`: removed at the end
    /// unless it was there before.
    claude_tmp: Option<PathBuf>,
}

impl World {
    pub fn start(claude: &Path) -> World {
        World::start_with(claude, "")
    }

    /// With `extra` appended to the daemon's config.
    pub fn start_with(claude: &Path, extra: &str) -> World {
        let dir = PathBuf::from(format!("/run/stoa-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let home = PathBuf::from(format!("/home/{ALICE}"));
        let home_before = entries(&home);
        let claude_tmp =
            Some(PathBuf::from(format!("/tmp/claude-{}", uid_of(ALICE)))).filter(|p| !p.exists());

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
            claude_tmp,
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
        world.start_stoa(claude, extra);
        world
    }

    fn start_stoa(&mut self, claude: &Path, extra: &str) {
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
        let config = format!(
            r#"listen = "127.0.0.1:{STOA_PORT}"
state_dir = "{state}"

[agents.claude-code]
command = [{claude}]
base_url = "{mock}"
env = {{ HTTP_PROXY = "{mock}", HTTPS_PROXY = "{mock}", http_proxy = "{mock}", https_proxy = "{mock}", NO_PROXY = "127.0.0.1,localhost", no_proxy = "127.0.0.1,localhost" }}
"#,
            state = dir.join("daemon").display(),
            // A JSON string is a TOML basic string.
            claude = Value::from(claude.display().to_string()),
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
            .env("STOA_LOG", "info")
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

    /// The mock's pid: its network namespace is the one everything runs in.
    pub fn mock_pid(&self) -> u32 {
        self.mock.id()
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

    /// An HTTP request to the daemon, from inside the namespace (curl under nsenter).
    /// Status 0 when there was no answer.
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

    /// Stops everything and returns the processes that were still in the namespace once
    /// `stoa serve` and the mock had exited (they are then killed).
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
        // What the agent created in alice's home (worktree, ~/.claude...) goes too.
        for name in entries(&self.home).difference(&self.home_before) {
            let path = self.home.join(name);
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        if let Some(tmp) = self.claude_tmp.take() {
            let _ = fs::remove_dir_all(tmp);
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

fn claude_code_e2e() -> Result<(), Failed> {
    let started = Instant::now();
    for tool in ["unshare", "nsenter", "ip", "curl", "python3"] {
        if !have(tool) {
            return skipped(&format!("`{tool}` is not installed"));
        }
    }
    // Needs the right to make network namespaces (not there in some containers).
    if !Command::new("unshare")
        .args(["--net", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        return skipped("`unshare --net` is not permitted here");
    }
    let (claude, version) = match find_claude() {
        Ok(found) => found,
        Err(why) => return skipped(&format!("no Claude Code CLI: {why}")),
    };
    eprintln!("agents e2e: {} ({version})", claude.display());
    let mut world = World::start(&claude);
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

    // An API user for alice (the CLI edits the broker's store), and her model API key as
    // a stoa secret, which the broker hands to the agent.
    let out = Command::new(world.dir.join("bin/stoa"))
        .args(["user", "add", API_USER, "--unix-user", ALICE])
        .env("STOA_BROKER_CONFIG", world.dir.join("broker.toml"))
        .output()?;
    assert!(
        out.status.success(),
        "stoa user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(!token.is_empty(), "stoa user add printed no token");
    let (status, reply) = world.request(
        "PUT",
        "/users/me/secrets/ANTHROPIC_API_KEY",
        Some(&token),
        Some("dummy".into()),
    );
    assert_eq!(status, 204, "setting the secret: {reply}");

    // Alice's worktree, made by her.
    let worktree = format!("/home/{ALICE}/{WORKTREE}");
    run("runuser", &["-u", ALICE, "--", "mkdir", &worktree]);

    let (status, session) = world.post(
        "/sessions",
        &token,
        json!({ "agentic_tool": "claude-code", "worktree": worktree, "permission_mode": "bypassPermissions" }),
    );
    assert_eq!(status, 201, "POST /sessions: {session}");
    let session_id = session["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The mock answers a prompt containing RUNTOOL with one Bash tool_use:
    // `id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt`.
    let (status, task) = world.post(
        &format!("/sessions/{session_id}/prompt"),
        &token,
        json!({ "prompt": "RUNTOOL: write down who and where you are" }),
    );
    assert_eq!(status, 202, "POST prompt: {task}");
    let task_id = task["task_id"].as_str().unwrap_or_default().to_string();

    let prompted = Instant::now();
    let deadline = prompted + Duration::from_secs(180);
    let task = loop {
        let (status, task) = world.get(&format!("/tasks/{task_id}"), &token);
        assert_eq!(status, 200, "GET /tasks: {task}");
        if matches!(task["status"].as_str(), Some("completed" | "failed")) {
            break task;
        }
        assert!(
            Instant::now() < deadline,
            "the task did not finish: {task}\nstoa log:\n{}",
            world.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let task_secs = prompted.elapsed().as_secs_f64();
    let (status, messages) = world.get(&format!("/sessions/{session_id}/messages"), &token);
    assert_eq!(status, 200, "GET messages: {messages}");
    let events: Vec<Value> = messages
        .as_array()
        .map(|m| m.iter().map(|m| m["event"].clone()).collect())
        .unwrap_or_default();
    let mock_log = world.mock_log();
    let context = format!(
        "task: {task}\nevents: {}\nmock requests: {}\nstoa log:\n{}",
        serde_json::to_string_pretty(&events).unwrap_or_default(),
        mock_log
            .iter()
            .map(|r| format!("{} {}", r["method"], r["path"]))
            .collect::<Vec<_>>()
            .join(", "),
        world.log()
    );

    assert_eq!(task["status"], "completed", "{context}");
    assert_eq!(task["executed_via"], "executor", "{context}");
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
    assert_eq!(result["text"], "Hello from the mock server.", "{context}");

    // The command really ran as alice, in the worktree.
    let file = Path::new(&worktree).join("whoami.txt");
    let meta = fs::metadata(&file)?;
    assert_eq!(meta.uid(), uid_of(ALICE), "owner of {}", file.display());
    assert_eq!(fs::read_to_string(&file)?, format!("{expected}\n"));

    // The mock saw only the model API, with the key from alice's secret, and no attempt
    // to go anywhere else through the proxy.
    assert!(mock_log.len() >= 2, "{context}");
    for r in &mock_log {
        let path = r["path"].as_str().unwrap_or_default();
        assert!(
            r["method"] == "POST" && path.split('?').next() == Some("/v1/messages"),
            "unexpected request to the mock: {r}\n{context}"
        );
        assert!(r.get("PROXY_REFUSED").is_none(), "{r}");
        let headers = r["headers"].as_object().cloned().unwrap_or_default();
        let key = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-api-key"))
            .map(|(_, v)| v.clone());
        assert_eq!(key, Some(json!("dummy")), "{r}");
    }
    let last = mock_log.last().unwrap();
    assert!(
        last["body"].to_string().contains("toolu_mock_1"),
        "the second request carries the tool result: {last}"
    );

    let left = world.shutdown();
    assert!(
        left.is_empty(),
        "processes left in the namespace after stoa and the mock exited: {left:?}"
    );
    eprintln!(
        "agents e2e: {version}: Bash ran as {ALICE} in {worktree}; task {task_secs:.1}s, {} mock requests ({}), total {:.1}s",
        mock_log.len(),
        mock_log
            .iter()
            .map(|r| format!("{} {}", r["method"].as_str().unwrap_or("?"), r["path"].as_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
