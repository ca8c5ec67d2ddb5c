//! Issue 13: agents that ask before they act, with the real Claude Code CLI.
//!
//! The same world as `agents_e2e.rs` (the mock model API and a whole `stoa serve` in a
//! loopback-only network namespace). A session in Claude Code's `default` permission mode
//! asks before its Bash tool call (the mock answers `RUNTOOL` prompts with one); the request
//! must show in `GET /approvals` and on the session's event stream, with the task
//! `waiting`. Then: allow → the file exists, owned by alice; deny → it does not and the
//! transcript says so; no answer → denied after `execution.approval_timeout_secs`; the
//! worker SIGKILLed while the agent waits → the same agent process is still waiting, and the
//! request is still answerable. Every step is in the broker's audit log.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::agents_e2e::{find_claude, have, World};
use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (CLAUDE_NAME, claude_code_approvals),
    (GEMINI_NAME, gemini_approvals),
];

const CLAUDE_NAME: &str = "claude_code_asks_before_its_bash_call_and_waits_for_the_answer";
const GEMINI_NAME: &str = "gemini_cli_asks_over_acp_before_its_shell_call_and_waits";
const DEFAULT_GEMINI: &str = "/opt/stoa-ci/gemini/bin/gemini";
/// Short, so the unanswered request expires within the test.
const APPROVAL_TIMEOUT_SECS: u64 = 6;
const API_USER: &str = "e2e-approver";

fn skipped(name: &str, why: &str) -> Result<(), Failed> {
    eprintln!("SKIPPED: {name}: {why}");
    Ok(())
}

/// The agent a test drives: its tool name in stoa, the secret holding its key, and what its
/// process's command line shows.
struct Agent {
    tool: &'static str,
    key: &'static str,
    process: &'static str,
}

const CLAUDE: Agent = Agent {
    tool: "claude-code",
    key: "ANTHROPIC_API_KEY",
    process: "claude",
};
const GEMINI: Agent = Agent {
    tool: "gemini",
    key: "GEMINI_API_KEY",
    process: "gemini",
};

struct Case<'w> {
    world: &'w World,
    agent: &'w Agent,
    token: String,
    session: String,
    task: String,
    worktree: String,
}

impl Case<'_> {
    fn file(&self) -> std::path::PathBuf {
        Path::new(&self.worktree).join("whoami.txt")
    }

    fn task(&self) -> Value {
        let (status, task) = self
            .world
            .get(&format!("/tasks/{}", self.task), &self.token);
        assert_eq!(status, 200, "GET task: {task}");
        task
    }

    /// Waits for the task to reach `status` (or any final state, which must then be it).
    fn wait_task(&self, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let task = self.task();
            let now = task["status"].as_str().unwrap_or_default().to_string();
            if now == want {
                return task;
            }
            assert!(
                !matches!(now.as_str(), "completed" | "failed" | "stopped"),
                "task ended {now}, wanted {want}: {task}\nlog:\n{}",
                self.world.log()
            );
            assert!(
                Instant::now() < deadline,
                "task still {now}, wanted {want}: {task}\nlog:\n{}",
                self.world.log()
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// The one pending request of this session, as `GET /approvals` lists it.
    fn pending(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, list) = self.world.get("/approvals", &self.token);
            assert_eq!(status, 200, "GET /approvals: {list}");
            let mine: Vec<&Value> = list
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter(|a| a["session_id"] == self.session.as_str())
                        .collect()
                })
                .unwrap_or_default();
            if let Some(a) = mine.first() {
                assert_eq!(mine.len(), 1, "{list}");
                return (*a).clone();
            }
            assert!(
                Instant::now() < deadline,
                "no approval appeared: task {}\nlog:\n{}",
                self.task(),
                self.world.log()
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn answer(&self, id: &str, body: Value) -> (u16, Value) {
        self.world
            .post(&format!("/approvals/{id}"), &self.token, body)
    }

    fn messages(&self) -> Vec<Value> {
        let (status, messages) = self
            .world
            .get(&format!("/sessions/{}/messages", self.session), &self.token);
        assert_eq!(status, 200, "{messages}");
        messages
            .as_array()
            .map(|m| m.iter().map(|m| m["event"].clone()).collect())
            .unwrap_or_default()
    }
}

fn start_case<'w>(world: &'w World, agent: &'w Agent, token: &str, name: &str) -> Case<'w> {
    let worktree = format!("/home/{ALICE}/e2e-approvals-{}-{name}", agent.tool);
    run("runuser", &["-u", ALICE, "--", "mkdir", "-p", &worktree]);
    let (status, session) = world.post(
        "/sessions",
        token,
        json!({ "agentic_tool": agent.tool, "worktree": worktree, "permission_mode": "default" }),
    );
    assert_eq!(status, 201, "POST /sessions: {session}");
    let session = session["session_id"].as_str().unwrap().to_string();
    let (status, task) = world.post(
        &format!("/sessions/{session}/prompt"),
        token,
        json!({ "prompt": "RUNTOOL: write down who and where you are" }),
    );
    assert_eq!(status, 202, "POST prompt: {task}");
    Case {
        world,
        agent,
        token: token.to_string(),
        session,
        task: task["task_id"].as_str().unwrap().to_string(),
        worktree,
    }
}

/// The session's event stream, read by curl in the namespace into a file.
fn follow_events(world: &World, token: &str, session: &str) -> (Child, std::path::PathBuf) {
    let out = world.dir.join(format!("events-{session}.txt"));
    let ns = format!("/proc/{}/ns/net", world.mock_pid());
    let child = Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .args(["--", "curl", "-sSN", "--max-time", "120", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:7433/sessions/{session}/events"))
        .stdout(fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl the event stream");
    (child, out)
}

/// The pid of alice's worker (`stoa __worker`, running as her).
fn worker_pid() -> Option<i32> {
    let uid = uid_of(ALICE);
    all_pids().into_iter().find(|p| {
        cmdline(*p).iter().any(|a| a == "__worker")
            && fs::metadata(format!("/proc/{p}")).is_ok_and(|m| m.uid() == uid)
    })
}

/// The pid of the agent of this case (its process running in its worktree).
fn agent_pid(case: &Case) -> Option<i32> {
    all_pids().into_iter().find(|p| {
        fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c == Path::new(&case.worktree))
            && cmdline(*p).iter().any(|a| a.contains(case.agent.process))
    })
}

/// Why the world cannot be had here, if it cannot.
fn missing_tools() -> Option<String> {
    for tool in ["unshare", "nsenter", "ip", "curl", "python3"] {
        if !have(tool) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if !Command::new("unshare")
        .args(["--net", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        return Some("`unshare --net` is not permitted here".into());
    }
    None
}

fn claude_code_approvals() -> Result<(), Failed> {
    if let Some(why) = missing_tools() {
        return skipped(CLAUDE_NAME, &why);
    }
    let (claude, version) = match find_claude() {
        Ok(found) => found,
        Err(why) => return skipped(CLAUDE_NAME, &format!("no Claude Code CLI: {why}")),
    };
    eprintln!("approvals e2e: {} ({version})", claude.display());
    let extra = format!("\n[execution]\napproval_timeout_secs = {APPROVAL_TIMEOUT_SECS}\n");
    let world = World::start_with(&claude, &extra);
    approvals(world, &CLAUDE)
}

fn gemini_approvals() -> Result<(), Failed> {
    if let Some(why) = missing_tools() {
        return skipped(GEMINI_NAME, &why);
    }
    let gemini = std::env::var_os("STOA_E2E_GEMINI")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEFAULT_GEMINI.into());
    let version = Command::new(&gemini).arg("--version").output();
    let Some(version) = version
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    else {
        return skipped(
            GEMINI_NAME,
            &format!("no Gemini CLI at {}", gemini.display()),
        );
    };
    eprintln!("approvals e2e: {} ({version})", gemini.display());
    // Claude Code's section is the world's own; Gemini's comes from its config alone.
    let (claude, _) = find_claude().unwrap_or(("/bin/false".into(), String::new()));
    let extra = format!(
        "\n[agents.gemini]\ncommand = [{gemini}]\nbase_url = \"http://127.0.0.1:8765\"\nmodel = \"gemini-2.5-flash\"\nsecrets = [\"GEMINI_API_KEY\"]\n\n[execution]\napproval_timeout_secs = {APPROVAL_TIMEOUT_SECS}\n",
        gemini = Value::from(gemini.display().to_string()),
    );
    let world = World::start_with(&claude, &extra);
    approvals(world, &GEMINI)
}

/// The four cases with `agent`: allowed, denied, expired, answered after the worker died.
fn approvals(mut world: World, agent: &Agent) -> Result<(), Failed> {
    let out = Command::new(world.dir.join("bin/stoa"))
        .args(["user", "add", API_USER, "--unix-user", ALICE])
        .env("STOA_BROKER_CONFIG", world.dir.join("broker.toml"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let (status, reply) = world.request(
        "PUT",
        &format!("/users/me/secrets/{}", agent.key),
        Some(&token),
        Some("dummy".into()),
    );
    assert_eq!(status, 204, "setting the secret: {reply}");

    // 1. Allow: the request is listed and announced, the task waits; allowed, the command
    //    runs as alice.
    let allow = start_case(&world, agent, &token, "allow");
    let (mut events, events_file) = follow_events(&world, &token, &allow.session);
    let asked = allow.pending();
    assert_eq!(asked["status"], "pending", "{asked}");
    assert_eq!(asked["task_id"], allow.task.as_str(), "{asked}");
    assert!(
        asked["input"]
            .to_string()
            .contains("id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt"),
        "the input in full: {asked}"
    );
    assert!(
        asked["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("id -un > whoami.txt"),
        "{asked}"
    );
    allow.wait_task("waiting", Duration::from_secs(10));
    assert!(!allow.file().exists(), "nothing ran before the answer");
    let id = asked["approval_id"].as_str().unwrap().to_string();
    // A bad answer is refused in words and changes nothing.
    let (status, reply) = allow.answer(&id, json!({ "decision": "maybe" }));
    assert_eq!(status, 400, "{reply}");
    let (status, reply) = allow.answer(&id, json!({ "decision": "allow" }));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["status"], "allowed", "{reply}");
    // The first answer wins.
    let (status, reply) = allow.answer(&id, json!({ "decision": "deny" }));
    assert_eq!(status, 409, "{reply}");
    let task = allow.wait_task("completed", Duration::from_secs(60));
    let meta = fs::metadata(allow.file())?;
    assert_eq!(meta.uid(), uid_of(ALICE), "the file is alice's: {task}");
    assert_eq!(
        fs::read_to_string(allow.file())?,
        format!("{ALICE}\n{}\n", allow.worktree)
    );
    let _ = events.kill();
    let _ = events.wait();
    let stream = fs::read_to_string(&events_file)?;
    assert!(
        stream.contains("event: approval") && stream.contains(&id),
        "the request was announced on the session's events: {stream}"
    );
    let decided = allow.messages();
    assert!(
        decided
            .iter()
            .any(|e| e["kind"] == "permission_decision" && e["decision"] == "allowed"),
        "{decided:?}"
    );

    // 2. Deny: nothing runs, and the transcript says so.
    let deny = start_case(&world, agent, &token, "deny");
    let asked = deny.pending();
    let id = asked["approval_id"].as_str().unwrap().to_string();
    let (status, reply) = deny.answer(
        &id,
        json!({ "decision": "deny", "message": "not on this machine" }),
    );
    assert_eq!(status, 200, "{reply}");
    deny.wait_task("completed", Duration::from_secs(60));
    assert!(!deny.file().exists(), "denied, the command did not run");
    let transcript = deny.messages();
    assert!(
        transcript.iter().any(|e| e["kind"] == "permission_decision"
            && e["decision"] == "denied"
            && e["reason"] == "not on this machine"),
        "the transcript says it was denied, and why: {transcript:?}"
    );
    if agent.tool == "claude-code" {
        // Claude Code says so itself: the tool's result is the refusal.
        let refusal = transcript
            .iter()
            .find(|e| e["kind"] == "tool_result")
            .unwrap_or_else(|| panic!("no tool_result: {transcript:?}"));
        assert_eq!(refusal["is_error"], true, "{refusal}");
        assert_eq!(refusal["content"], "not on this machine", "{refusal}");
    }

    // 3. No answer: denied after the timeout.
    let expire = start_case(&world, agent, &token, "expire");
    let asked = expire.pending();
    let id = asked["approval_id"].as_str().unwrap().to_string();
    let waited = Instant::now();
    expire.wait_task("completed", Duration::from_secs(APPROVAL_TIMEOUT_SECS + 60));
    assert!(
        waited.elapsed() >= Duration::from_secs(APPROVAL_TIMEOUT_SECS - 2),
        "it waited for the timeout"
    );
    let (status, settled) = expire.world.get(&format!("/approvals/{id}"), &token);
    assert_eq!(status, 200, "{settled}");
    assert_eq!(settled["status"], "expired", "{settled}");
    assert_eq!(settled["decided_by"], "timeout", "{settled}");
    assert!(!expire.file().exists(), "expired, the command did not run");
    let transcript = expire.messages();
    assert!(
        transcript
            .iter()
            .any(|e| e.to_string().contains("approval_timeout_secs")),
        "the transcript says why: {transcript:?}"
    );

    // 4. The worker dies while the agent waits: the agent is the same process, still
    //    waiting, and the request can be answered through the new worker.
    let restart = start_case(&world, agent, &token, "restart");
    let asked = restart.pending();
    let id = asked["approval_id"].as_str().unwrap().to_string();
    let agent = agent_pid(&restart).expect("the waiting agent's process");
    let worker = worker_pid().expect("alice's worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(worker) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next request starts a new worker, which takes the run over.
    let again = restart.pending();
    assert_eq!(again["approval_id"], id.as_str(), "{again}");
    assert_ne!(worker_pid(), Some(worker), "a new worker");
    assert_eq!(
        agent_pid(&restart),
        Some(agent),
        "the same agent, still waiting"
    );
    restart.wait_task("waiting", Duration::from_secs(10));
    let (status, reply) = restart.answer(&id, json!({ "decision": "allow" }));
    assert_eq!(status, 200, "{reply}");
    restart.wait_task("completed", Duration::from_secs(60));
    assert_eq!(fs::metadata(restart.file())?.uid(), uid_of(ALICE));

    // Every step is in the broker's audit log, with who answered.
    let audit = fs::read_to_string(world.dir.join("broker/audit.jsonl"))?;
    let steps: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "approval")
        .collect();
    for step in ["asked", "allowed", "denied", "expired"] {
        assert!(
            steps.iter().any(|s| s["step"] == step),
            "no {step} in the audit log: {steps:?}"
        );
    }
    let answered = steps
        .iter()
        .find(|s| s["step"] == "allowed")
        .expect("allowed");
    assert_eq!(answered["user"], ALICE, "{answered}");
    assert!(
        answered["by"].as_str().is_some_and(|b| b != "unverified"),
        "the answer's caller was verified: {answered}"
    );
    for case in [&allow, &deny, &expire, &restart] {
        let _ = fs::remove_dir_all(&case.worktree);
    }
    let left = world.shutdown();
    assert!(left.is_empty(), "processes left: {left:?}");
    Ok(())
}
