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

use crate::agents_e2e::{prepare, skipped, Agent, World, CLAUDE, GEMINI};
use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (CLAUDE_NAME, claude_code_approvals),
    (GEMINI_NAME, gemini_approvals),
];

const CLAUDE_NAME: &str = "claude_code_asks_before_its_bash_call_and_waits_for_the_answer";
const GEMINI_NAME: &str = "gemini_cli_asks_over_acp_before_its_shell_call_and_waits";
/// Short, so the unanswered request expires within the test.
const APPROVAL_TIMEOUT_SECS: u64 = 6;

/// What the agent's process's command line shows.
fn process_of(agent: &Agent) -> &'static str {
    agent.bin
}

#[derive(Clone)]
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
            && cmdline(*p)
                .iter()
                .any(|a| a.contains(process_of(case.agent)))
    })
}

fn claude_code_approvals() -> Result<(), Failed> {
    approvals_of(CLAUDE_NAME, &CLAUDE)
}

fn gemini_approvals() -> Result<(), Failed> {
    approvals_of(GEMINI_NAME, &GEMINI)
}

fn approvals_of(test: &str, agent: &Agent) -> Result<(), Failed> {
    let (cli, _) = match prepare(test, agent) {
        Ok(found) => found,
        Err(why) => return skipped(test, &why),
    };
    let extra = format!("\n[execution]\napproval_timeout_secs = {APPROVAL_TIMEOUT_SECS}\n");
    approvals(World::start_with(agent, &cli, &extra), agent)
}

/// The four cases with `agent`: allowed, denied, expired, answered after the worker died.
fn approvals(mut world: World, agent: &Agent) -> Result<(), Failed> {
    let token = world.alice(agent.key_name, "dummy");

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
    // The conversation goes on: a second prompt continues the agent's own session (Claude
    // Code's --resume, Gemini's session/load), so the model sees the first exchange.
    let before = world.mock_log().len();
    let (status, next) = world.post(
        &format!("/sessions/{}/prompt", allow.session),
        &token,
        json!({ "prompt": "and what did you find?" }),
    );
    assert_eq!(status, 202, "{next}");
    let second = Case {
        task: next["task_id"].as_str().unwrap().to_string(),
        ..allow.clone()
    };
    second.wait_task("completed", Duration::from_secs(60));
    let asked_again: Vec<Value> = world.mock_log().into_iter().skip(before).collect();
    let last = asked_again
        .last()
        .map(|r| r["body"].to_string())
        .unwrap_or_default();
    assert!(last.contains("and what did you find?"), "{last}");
    let continued = last.contains("whoami.txt");
    // Gemini CLI 0.61 cannot load some of its own sessions ("Invalid session identifier"):
    // then the prompt runs in a new session and the transcript says so, never silently.
    let said_so = second.messages().iter().any(|e| {
        e["kind"] == "notice"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("could not continue")
    });
    assert!(
        continued || (agent.tool == "gemini" && said_so),
        "the second prompt's request carries the first exchange: {last}"
    );
    eprintln!(
        "approvals e2e: {}: the second prompt {}",
        agent.tool,
        if continued {
            "continued the session"
        } else {
            "ran in a new session (said in the transcript)"
        }
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
