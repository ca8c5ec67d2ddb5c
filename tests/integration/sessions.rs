//! Issue 3: sessions, prompts and agents through the executor, broker-verified identity.
//!
//! The agent CLIs are played by `fake-agent`, a shell script that replays the recorded
//! output of the real CLIs (tests/fixtures/agents) and records who ran it, where, with
//! which environment; the prompt's keywords pick a misbehaviour (crash, hang, garbage…).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "claude_prompt_runs_as_the_user_in_the_worktree",
        claude_as_user,
    ),
    (
        "direct_path_runs_as_the_sessions_user_in_its_worker",
        direct_path,
    ),
    (
        "codex_gemini_opencode_adapters_on_their_recordings",
        other_adapters,
    ),
    (
        "stop_crash_missing_binary_garbage_and_failure_end_right",
        failures,
    ),
    ("timeout_fails_the_task_and_kills_the_group", timeout),
    (
        "other_users_cannot_see_prompt_or_stop_a_session",
        authorization,
    ),
    ("secrets_reach_only_their_users_agent", secrets),
    (
        "an_agent_flooding_permission_requests_is_bounded",
        approval_flood,
    ),
    (
        "killed_worker_mid_task_loses_no_message",
        worker_killed_mid_task,
    ),
    (
        "an_agent_that_ends_while_its_worker_is_down_is_recorded_in_full",
        agent_ends_while_its_worker_is_down,
    ),
    ("cli_prompt_wait_config_and_users", cli),
    (
        "sigterm_lets_tasks_finish_records_every_end_and_exits_0",
        graceful_shutdown,
    ),
];

const FAKE_AGENT: &str = r#"#!/bin/sh
# A stand-in agent CLI: replays a recorded stream ($1); the adapter's own arguments follow.
fixture=$1; shift
# One line: a conversation (Claude Code's stream-json) keeps stdin open until its result.
if [ -t 0 ]; then input=""; else IFS= read -r input || true; fi
prompt="$input $*"
id -u > .fake-uid
echo "$PPID" > .fake-ppid
pwd > .fake-cwd
printf '%s' "${ANTHROPIC_API_KEY-}" > .fake-secret
tr '\0' ' ' < /proc/$$/cmdline > .fake-cmdline
case "$prompt" in
  *CRASH*) head -n 1 "$fixture"; kill -SEGV $$ ;;
  *GARBAGE*) echo "this is not json"; exec sleep 30 ;;
  *HANG*) sleep 300 & echo $! > .fake-child; head -n 1 "$fixture"; wait ;;
  *SLOW*) while IFS= read -r line; do printf '%s\n' "$line"; sleep 1; done < "$fixture" ;;
  *LONG*) while IFS= read -r line; do printf '%s\n' "$line"; sleep 4; done < "$fixture" ;;
  *FAIL*) echo "boom: model unavailable" >&2; exit 3 ;;
  *REFUSED*) echo '{"type":"result","subtype":"error_during_execution","is_error":true,"result":"Forbidden: the key was refused"}'; exit 1 ;;
  *ASKONCE*)
    # Claude Code's recorded permission request, then, after stoa's answer, the recorded
    # rest of an allowed or a denied run.
    dir=$(dirname "$fixture")
    head -n 3 "$dir/claude-code-2.1.197-approval-allow.jsonl"
    IFS= read -r answer || exit 1
    case "$answer" in
      *'"behavior":"allow"'*) tail -n +4 "$dir/claude-code-2.1.197-approval-allow.jsonl" ;;
      *) tail -n +4 "$dir/claude-code-2.1.197-approval-deny.jsonl" ;;
    esac ;;
  *ASKFLOOD*)
    # 300 permission requests at once, the first with a 100 KB input; then it counts the
    # answers that come (all but the 16 left waiting) and ends.
    big=$(head -c 100000 /dev/zero | tr '\0' x)
    printf '{"type":"control_request","request_id":"r0","request":{"subtype":"can_use_tool","tool_name":"Write","input":{"content":"%s"}}}\n' "$big"
    i=1
    while [ $i -lt 300 ]; do
      printf '{"type":"control_request","request_id":"r%d","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"echo %d"}}}\n' $i $i
      i=$((i + 1))
    done
    n=0
    while [ $n -lt 284 ] && IFS= read -r answer; do n=$((n + 1)); done
    echo $n > .fake-answers
    echo '{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":1}' ;;
  *) cat "$fixture" ;;
esac
"#;

const FIXTURES: [(&str, &str); 4] = [
    ("claude-code", "claude-code-2.1.197-bash-tool.jsonl"),
    ("codex", "codex-0.169.0-text.jsonl"),
    ("gemini", "gemini-cli-0.61.0-acp-text.jsonl"),
    ("opencode", "opencode-1.18.33-text.jsonl"),
];

static FAKES: AtomicU32 = AtomicU32::new(0);

/// The fake agent and the recordings, in a root-owned directory the users can read.
pub struct Fakes {
    dir: PathBuf,
}

impl Fakes {
    pub fn install() -> Fakes {
        let n = FAKES.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/run/stoa-test-{}-fakes-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chmod", &["0755", dir.to_str().unwrap()]);
        std::fs::write(dir.join("fake-agent"), FAKE_AGENT).unwrap();
        run("chmod", &["0755", dir.join("fake-agent").to_str().unwrap()]);
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agents");
        let asks = [
            "claude-code-2.1.197-approval-allow.jsonl",
            "claude-code-2.1.197-approval-deny.jsonl",
        ];
        for file in FIXTURES.iter().map(|(_, f)| *f).chain(asks) {
            std::fs::copy(fixtures.join(file), dir.join(file))
                .expect("fixture (tests/fixtures/agents)");
            run("chmod", &["0644", dir.join(file).to_str().unwrap()]);
        }
        Fakes { dir }
    }

    /// `[agents.*]` config running every tool through the fake, plus `extra`.
    fn config(&self, extra: &str) -> String {
        let mut config = String::new();
        for (tool, file) in FIXTURES {
            if extra.contains(&format!("[agents.{tool}]")) {
                continue; // the test configures this one itself
            }
            config.push_str(&format!(
                "[agents.{tool}]\ncommand = [\"{}\", \"{}\"]\n",
                self.dir.join("fake-agent").display(),
                self.dir.join(file).display()
            ));
        }
        format!("{extra}\n{config}")
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn start(fakes: &Fakes, extra_config: &str) -> Instance {
    Instance::start_with(Options {
        extra_config: fakes.config(extra_config),
        ..Options::default()
    })
}

static WORKTREES: AtomicU32 = AtomicU32::new(0);

/// A fresh directory in the user's (0700) home, owned by the user.
pub fn worktree(user: &str) -> String {
    let n = WORKTREES.fetch_add(1, Ordering::SeqCst);
    let dir = format!("/home/{user}/wt-{n}");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run("chown", &[&format!("{user}:"), &dir]);
    dir
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub(crate) fn create_session(stoa: &Instance, token: &str, tool: &str, worktree: &str) -> String {
    let (status, s) = stoa.request(
        "POST",
        "/sessions",
        Some(token),
        Some(&json!({ "agentic_tool": tool, "worktree": worktree })),
    );
    assert_eq!(status, 201, "{s}");
    s["session_id"].as_str().unwrap().to_string()
}

pub(crate) fn prompt(stoa: &Instance, token: &str, session: &str, text: &str) -> String {
    let (status, t) = stoa.request(
        "POST",
        &format!("/sessions/{session}/prompt"),
        Some(token),
        Some(&json!({ "prompt": text })),
    );
    assert_eq!(status, 202, "{t}");
    assert_eq!(t["status"], "queued");
    t["task_id"].as_str().unwrap().to_string()
}

pub(crate) fn wait_task(stoa: &Instance, token: &str, task: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, t) = stoa.request("GET", &format!("/tasks/{task}"), Some(token), None);
        assert_eq!(status, 200, "{t}");
        if ["completed", "failed", "stopped"].contains(&t["status"].as_str().unwrap_or("")) {
            return t;
        }
        assert!(Instant::now() < deadline, "task did not end: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn messages(stoa: &Instance, token: &str, session: &str) -> Vec<Value> {
    let (status, m) = stoa.request(
        "GET",
        &format!("/sessions/{session}/messages"),
        Some(token),
        None,
    );
    assert_eq!(status, 200, "{m}");
    m.as_array().cloned().unwrap_or_default()
}

/// The claude-code bash-tool fixture's run, every event stored once, in order.
pub(crate) fn assert_whole_bash_run(msgs: &[Value]) {
    assert_eq!(
        kinds(msgs),
        [
            "session_started",
            "tool_use",
            "tool_result",
            "assistant_text",
            "result"
        ]
    );
    let seqs: Vec<i64> = msgs.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

pub(crate) fn kinds(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["event"]["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Follows a session's Server-Sent Events on a thread: (event, data) pairs.
fn subscribe(stoa: &Instance, token: &str, session: &str) -> mpsc::Receiver<(String, Value)> {
    let (tx, rx) = mpsc::channel();
    let url = stoa.url(&format!("/sessions/{session}/events"));
    let token = token.to_string();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let Ok(resp) = agent
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .call()
        else {
            return;
        };
        let mut event = String::new();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                let value = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                if tx.send((event.clone(), value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn claude_as_user() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    let live = subscribe(&stoa, &alice, &session);
    std::thread::sleep(Duration::from_millis(200));
    let task = prompt(&stoa, &alice, &session, "say hello");
    let t = wait_task(&stoa, &alice, &task);
    assert_eq!(
        (t["status"].as_str(), t["executed_via"].as_str()),
        (Some("completed"), Some("executor")),
        "{t}"
    );
    assert_eq!(t["unix_user"], ALICE);
    assert_eq!(t["exit_code"], 0);
    // It ran as alice, in the worktree.
    assert_eq!(read(&format!("{wt}/.fake-uid")), uid_of(ALICE).to_string());
    assert_eq!(read(&format!("{wt}/.fake-cwd")), wt);
    assert!(
        !read(&format!("{wt}/.fake-cmdline")).contains("say hello"),
        "the prompt is in argv"
    );
    // Every event, stored in order.
    let msgs = messages(&stoa, &alice, &session);
    assert_whole_bash_run(&msgs);
    assert_eq!(msgs[1]["event"]["name"], "Bash");
    assert_eq!(msgs[3]["event"]["text"], "Hello from the mock server.");
    // SSE delivered the same messages live, and the task's states.
    let mut live_seqs = Vec::new();
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (live_seqs.len() < 5 || !states.contains(&"completed".to_string()))
        && Instant::now() < deadline
    {
        if let Ok((event, data)) = live.recv_timeout(Duration::from_millis(200)) {
            match event.as_str() {
                "message" => live_seqs.push(data["seq"].as_i64().unwrap()),
                "task" => states.push(data["status"].as_str().unwrap_or("").to_string()),
                _ => {}
            }
        }
    }
    assert_eq!(live_seqs, [1, 2, 3, 4, 5], "SSE messages");
    assert!(
        states.contains(&"running".to_string()) && states.contains(&"completed".to_string()),
        "{states:?}"
    );
    // The agent's own session id is kept, and the next prompt resumes it.
    let (_, s) = stoa.request("GET", &format!("/sessions/{session}"), Some(&alice), None);
    assert_eq!(
        s["agent_session_id"],
        "53359e04-ce14-4278-ac4f-40df05806dca"
    );
    assert_eq!(s["status"], "idle");
    let task = prompt(&stoa, &alice, &session, "again");
    assert_eq!(wait_task(&stoa, &alice, &task)["status"], "completed");
    assert!(read(&format!("{wt}/.fake-cmdline"))
        .contains("--resume 53359e04-ce14-4278-ac4f-40df05806dca"));
    // SSE resumes after Last-Event-ID.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .get(stoa.url(&format!("/sessions/{session}/events")))
        .header("Authorization", format!("Bearer {alice}"))
        .header("Last-Event-ID", "8")
        .call()?;
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first_id = String::new();
    while first_id.is_empty() {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if let Some(id) = line.strip_prefix("id:") {
            first_id = id.trim().to_string();
        }
    }
    assert_eq!(first_id, "9");
    Ok(())
}

/// `use_executor = false`: no executor, no broker spawn. The agent is run by the
/// session's worker itself, so as the session's Unix user (the worker is hers), never as
/// the service user: it enters her 0700 home, which the service user cannot.
fn direct_path() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "[execution]\nuse_executor = false\n");
    let alice = stoa.api_user("alice", ALICE);
    // An explicit choice, said in /health.
    let (_, health) = stoa.request("GET", "/health", Some(&alice), None);
    assert_eq!(health["execution"], "direct", "{health}");
    assert!(
        health["warning"]
            .as_str()
            .unwrap_or_default()
            .contains("direct path"),
        "{health}"
    );
    // Her key reaches the agent on this path too.
    let key = "sk-direct-path-key-9";
    let (status, v) = stoa.request_text("PUT", "/users/me/secrets/ANTHROPIC_API_KEY", &alice, key);
    assert_eq!(status, 204, "{v}");
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "hello"));
    assert_eq!(
        (t["status"].as_str(), t["executed_via"].as_str()),
        (Some("completed"), Some("direct")),
        "{t}"
    );
    assert_eq!(t["unix_user"], ALICE, "{t}");
    assert_eq!(read(&format!("{wt}/.fake-uid")), uid_of(ALICE).to_string());
    assert_ne!(
        read(&format!("{wt}/.fake-uid")),
        uid_of(SERVICE).to_string()
    );
    assert_eq!(read(&format!("{wt}/.fake-cwd")), wt);
    // Its parent was alice's worker (still there: it idles for a minute), not an executor
    // the broker started.
    let parent: i32 = read(&format!("{wt}/.fake-ppid")).parse()?;
    assert_eq!(
        Some(parent),
        worker_pid(&stoa, ALICE),
        "the agent's parent {parent} ({:?}) is not alice's worker",
        cmdline(parent)
    );
    assert_eq!(kinds(&messages(&stoa, &alice, &session)).len(), 5);
    assert_eq!(
        read(&format!("{wt}/.fake-secret")),
        key,
        "the agent has her key"
    );
    assert!(!read(&format!("{wt}/.fake-cmdline")).contains(key));
    assert!(!stoa.log().contains(key), "a log line holds the key");
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(audit.contains("\"secrets_handed\""), "audited");
    assert!(!audit.contains(key));
    Ok(())
}

fn other_adapters() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    for tool in ["codex", "gemini", "opencode"] {
        let wt = worktree(ALICE);
        let session = create_session(&stoa, &alice, tool, &wt);
        let t = wait_task(
            &stoa,
            &alice,
            &prompt(&stoa, &alice, &session, "hi private-plan"),
        );
        assert_eq!(t["status"], "completed", "{tool}: {t}");
        // The prompt reaches the agent on stdin, out of the process table that every local
        // user can read.
        let cmdline = read(&format!("{wt}/.fake-cmdline"));
        assert!(
            !cmdline.contains("private-plan"),
            "{tool}: the prompt is in argv: {cmdline}"
        );
        let msgs = messages(&stoa, &alice, &session);
        let k = kinds(&msgs);
        assert_eq!(
            k.first().map(String::as_str),
            Some("session_started"),
            "{tool}: {k:?}"
        );
        assert_eq!(
            k.last().map(String::as_str),
            Some("result"),
            "{tool}: {k:?}"
        );
        let text: String = msgs
            .iter()
            .filter(|m| m["event"]["kind"] == "assistant_text")
            .map(|m| m["event"]["text"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(text, "Hello from the mock server.", "{tool}");
        let (_, s) = stoa.request("GET", &format!("/sessions/{session}"), Some(&alice), None);
        assert!(
            s["agent_session_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{tool}: {s}"
        );
        assert_eq!(read(&format!("{wt}/.fake-uid")), uid_of(ALICE).to_string());
    }
    Ok(())
}

/// The live processes of `user` (not zombies), with their command lines.
pub(crate) fn live_processes_of(user: &str) -> Vec<(i32, Vec<String>)> {
    let uid = uid_of(user).to_string();
    all_pids()
        .into_iter()
        .filter(|p| {
            status_field(*p, "Uid").is_some_and(|u| u.split_whitespace().next() == Some(&uid))
                && state_and_ppid(*p).is_some_and(|(s, _)| s != "Z")
        })
        .map(|p| (p, cmdline(p)))
        .collect()
}

/// Whether `pid` is a `stoa __worker` that `stoa`'s broker started (a child of the broker,
/// not merely a process calling itself that).
pub(crate) fn is_worker_of(stoa: &Instance, pid: i32) -> bool {
    cmdline(pid).get(1).map(String::as_str) == Some("__worker")
        && state_and_ppid(pid).is_some_and(|(_, ppid)| ppid == stoa.broker_pid())
}

/// The pid of `user`'s worker in `stoa`, if one runs.
pub(crate) fn worker_pid(stoa: &Instance, user: &str) -> Option<i32> {
    live_processes_of(user)
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| is_worker_of(stoa, *p))
}

/// No process of `user` left (fake agents and their children) but the user's own worker
/// in `stoa` (it holds the user's store and retires by itself when idle).
fn assert_nothing_left(stoa: &Instance, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = live_processes_of(user)
            .into_iter()
            .filter(|(p, _)| !is_worker_of(stoa, *p))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of {user} left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// No process of `user` left at all, its worker included (`stoa serve` has exited).
fn assert_nothing_at_all_left(user: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = live_processes_of(user);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of {user} left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A user's store: `<workers_dir>/<uid>/stoa.db`, which only that user's worker writes.
fn store_of(stoa: &Instance, user: &str) -> PathBuf {
    stoa.dir
        .join("workers")
        .join(uid_of(user).to_string())
        .join("stoa.db")
}

fn failures() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(
        &fakes,
        "[execution]\nstop_grace_secs = 1\n[agents.gemini]\ncommand = [\"/nonexistent/gemini\"]\n",
    );
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);

    // Stop: SIGTERM to the whole group; the background child goes too.
    let task = prompt(&stoa, &alice, &session, "HANG");
    wait_until("the hang to start", Duration::from_secs(10), || {
        !read(&format!("{wt}/.fake-child")).is_empty()
    });
    let child: i32 = read(&format!("{wt}/.fake-child")).parse()?;
    let (status, _) = stoa.request(
        "POST",
        &format!("/sessions/{session}/stop"),
        Some(&alice),
        Some(&json!({})),
    );
    assert_eq!(status, 202);
    let t = wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "stopped", "{t}");
    assert!(!alive(child), "the agent's child outlived the stop");
    assert_nothing_left(&stoa, ALICE);
    let (status, _) = stoa.request(
        "POST",
        &format!("/sessions/{session}/stop"),
        Some(&alice),
        Some(&json!({})),
    );
    assert_eq!(status, 409, "nothing to stop");

    let cases = [
        ("CRASH", "crashed (signal 11)"),
        ("GARBAGE", "not JSON"),
        ("FAIL", "exited with code 3: boom: model unavailable"),
        // The agent's own words come with a non-zero exit (OpenCode's "Forbidden").
        (
            "REFUSED",
            "exited with code 1: Forbidden: the key was refused",
        ),
    ];
    for (word, error) in cases {
        let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, word));
        assert_eq!(t["status"], "failed", "{word}: {t}");
        assert!(
            t["error"].as_str().unwrap_or("").contains(error),
            "{word}: {t}"
        );
        assert_nothing_left(&stoa, ALICE);
        let (_, s) = stoa.request("GET", &format!("/sessions/{session}"), Some(&alice), None);
        assert_eq!(s["status"], "failed");
    }
    // Missing binary.
    let gemini = create_session(&stoa, &alice, "gemini", &wt);
    let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &gemini, "hi"));
    assert_eq!(t["status"], "failed");
    assert!(
        t["error"].as_str().unwrap_or("").contains("not found"),
        "{t}"
    );
    // A prompt while busy is refused (no queue), and the session is usable after all that.
    let task = prompt(&stoa, &alice, &session, "SLOW");
    let (status, busy) = stoa.request(
        "POST",
        &format!("/sessions/{session}/prompt"),
        Some(&alice),
        Some(&json!({ "prompt": "x" })),
    );
    assert_eq!(status, 409, "{busy}");
    assert_eq!(wait_task(&stoa, &alice, &task)["status"], "completed");
    let (_, s) = stoa.request("GET", &format!("/sessions/{session}"), Some(&alice), None);
    assert_eq!(s["status"], "idle");
    Ok(())
}

fn approval_flood() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    let task = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "ASKFLOOD"));
    assert_eq!(task["status"], "completed", "{task}");
    // Every request but the 16 left waiting was answered at once (denied).
    assert_eq!(read(&format!("{wt}/.fake-answers")), "284");
    let notes: Vec<Value> = messages(&stoa, &alice, &session)
        .into_iter()
        .map(|m| m["event"].clone())
        .filter(|e| e["kind"] == "permission_decision")
        .collect();
    let count = |f: &dyn Fn(&Value) -> bool| notes.iter().filter(|e| f(e)).count();
    let reason = |e: &Value| e["reason"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        count(&|e| reason(e).contains("too large")),
        1,
        "the 100 KB one"
    );
    assert_eq!(
        count(&|e| reason(e).contains("asked 256 times")),
        300 - 256,
        "past 256 asks, none is kept"
    );
    assert_eq!(
        count(&|e| reason(e).contains("waiting already")),
        256 - 1 - 16,
        "past 16 waiting, denied at once"
    );
    // The 16 that waited were abandoned when the run ended: nothing waits any more.
    assert_eq!(
        notes
            .iter()
            .filter(|e| e["decision"] == "abandoned")
            .count(),
        0
    );
    let (_, pending) = stoa.request("GET", "/approvals", Some(&alice), None);
    assert_eq!(pending, json!([]), "{pending}");
    assert_nothing_left(&stoa, ALICE);
    Ok(())
}

fn timeout() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(
        &fakes,
        "[execution]\ntimeout_secs = 1\nstop_grace_secs = 1\n",
    );
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "HANG"));
    assert_eq!(
        (t["status"].as_str(), t["error"].as_str()),
        (Some("failed"), Some("timeout")),
        "{t}"
    );
    assert_nothing_left(&stoa, ALICE);
    Ok(())
}

fn authorization() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let session = create_session(&stoa, &alice, "claude-code", &worktree(ALICE));
    let task = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "hi"));
    for (method, path) in [
        ("GET", format!("/sessions/{session}")),
        ("GET", format!("/sessions/{session}/messages")),
        ("GET", format!("/sessions/{session}/tasks")),
        ("GET", format!("/sessions/{session}/events")),
        (
            "GET",
            format!("/tasks/{}", task["task_id"].as_str().unwrap()),
        ),
        ("POST", format!("/sessions/{session}/prompt")),
        ("POST", format!("/sessions/{session}/stop")),
    ] {
        let (status, v) = stoa.request(method, &path, Some(&bob), Some(&json!({ "prompt": "x" })));
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    let (_, list) = stoa.request("GET", "/sessions", Some(&bob), None);
    assert_eq!(list, json!([]));
    // bob may not create a session as alice, nor make the broker run anything as her.
    let (status, v) = stoa.request(
        "POST",
        "/sessions",
        Some(&bob),
        Some(&json!({ "agentic_tool": "claude-code", "worktree": "/tmp", "unix_user": ALICE })),
    );
    assert_eq!(status, 403, "{v}");
    let (status, v) = stoa.request(
        "POST",
        "/exec",
        Some(&bob),
        Some(&json!({ "unix_user": ALICE, "argv": ["id"] })),
    );
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("may not act as"),
        "{v}"
    );
    // bob's worktree check runs as bob: alice's home is closed to him.
    let (status, v) = stoa.request(
        "POST",
        "/sessions",
        Some(&bob),
        Some(&json!({ "agentic_tool": "claude-code", "worktree": format!("/home/{ALICE}") })),
    );
    assert_eq!(status, 400, "{v}");
    // The admin token sees everything.
    let (_, list) = stoa.request("GET", "/sessions", Some(&stoa.token.clone()), None);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    assert!(stoa.log().contains("refused: credential of another user"));
    Ok(())
}

fn secrets() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let secret = "sk-ant-test-5ecr3t-value";
    let (status, v) = stoa.request_text(
        "PUT",
        "/users/me/secrets/ANTHROPIC_API_KEY",
        &alice,
        &format!("{secret}\n"),
    );
    assert_eq!(status, 204, "{v}");
    let (status, _) = stoa.request_text("PUT", "/users/me/secrets/LD_PRELOAD", &alice, "x");
    assert_eq!(status, 403);
    let (status, names) = stoa.request("GET", "/users/me/secrets", Some(&alice), None);
    assert_eq!(
        (status, names.clone()),
        (200, json!({ "names": ["ANTHROPIC_API_KEY"] }))
    );

    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    let task = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "hi"));
    assert_eq!(task["status"], "completed");
    assert_eq!(
        read(&format!("{wt}/.fake-secret")),
        secret,
        "alice's agent has her key"
    );
    assert!(
        !read(&format!("{wt}/.fake-cmdline")).contains(secret),
        "the key is in the command line"
    );
    let bob_wt = worktree(BOB);
    let bob_session = create_session(&stoa, &bob, "claude-code", &bob_wt);
    assert_eq!(
        wait_task(&stoa, &bob, &prompt(&stoa, &bob, &bob_session, "hi"))["status"],
        "completed"
    );
    assert_eq!(
        read(&format!("{bob_wt}/.fake-secret")),
        "",
        "bob's agent got alice's key"
    );

    // Nowhere in the API's answers, and in no log line.
    let mut answers = Vec::new();
    for path in [
        format!("/sessions/{session}"),
        format!("/sessions/{session}/messages"),
        format!("/sessions/{session}/tasks"),
        "/users/me".to_string(),
        "/users/me/secrets".to_string(),
        "/sessions".to_string(),
    ] {
        answers.push(stoa.request("GET", &path, Some(&alice), None).1.to_string());
    }
    answers.push(stoa.processes().iter().map(|p| p.to_string()).collect());
    assert!(
        answers.iter().all(|a| !a.contains(secret)),
        "a response holds the secret"
    );
    assert!(!stoa.log().contains(secret), "a log line holds the secret");
    // Stored only in the broker's root-only store.
    let store = std::fs::read_to_string(stoa.dir.join("broker/users.json"))?;
    assert!(store.contains(secret));
    let mode = run(
        "stat",
        &[
            "-c",
            "%U %a",
            stoa.dir.join("broker/users.json").to_str().unwrap(),
        ],
    );
    assert_eq!(mode.trim(), "root 600");
    // Not in any worker's store (database, write-ahead log), nor in anything else the
    // daemons keep.
    let mut stored = Vec::new();
    for dir in ["workers", "daemon"] {
        files_under(&stoa.dir.join(dir), &mut stored);
    }
    for user in [ALICE, BOB] {
        assert!(
            stored.contains(&store_of(&stoa, user)),
            "no store of {user} among {stored:?}"
        );
    }
    for file in &stored {
        let bytes = std::fs::read(file)?;
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{} holds the secret",
            file.display()
        );
    }
    // A default the admin provides (root, through the CLI): bob, who has no key of his own,
    // gets it; alice keeps hers. Never shown, audited without its value.
    let default = "sk-default-for-everyone-42";
    let secret_cli = |args: &[&str], stdin: &str, as_user: Option<&str>| {
        let mut cmd = match as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(stoa.dir.join("bin/stoa"));
                c
            }
            None => Command::new(stoa.dir.join("bin/stoa")),
        };
        let mut child = cmd
            .arg("secret")
            .args(args)
            .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = secret_cli(&["set", "--default", "ANTHROPIC_API_KEY"], default, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = secret_cli(&["list", "--default"], "", None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ANTHROPIC_API_KEY\n");
    let refused = secret_cli(&["set", "--default", "OTHER"], "x", Some(BOB));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only root"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for (user, token, wt, sid, want) in [
        (BOB, &bob, &bob_wt, &bob_session, default),
        (ALICE, &alice, &wt, &session, secret),
    ] {
        let task = wait_task(&stoa, token, &prompt(&stoa, token, sid, "hi"));
        assert_eq!(task["status"], "completed", "{user}: {task}");
        assert_eq!(read(&format!("{wt}/.fake-secret")), want, "{user}'s agent");
    }
    let (_, names) = stoa.request("GET", "/users/me/secrets", Some(&bob), None);
    assert_eq!(names, json!({ "names": [] }), "a default is never shown");
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(audit.contains("\"default_secret_set\""), "audited");
    assert!(!audit.contains(default), "the audit log holds the value");
    let out = secret_cli(&["rm", "--default", "ANTHROPIC_API_KEY"], "", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?
            .contains("\"default_secret_deleted\"")
    );

    let (status, _) = stoa.request(
        "DELETE",
        "/users/me/secrets/ANTHROPIC_API_KEY",
        Some(&alice),
        None,
    );
    assert_eq!(status, 204);
    Ok(())
}

/// Every file under `dir` (none if it does not exist).
fn files_under(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The process holding a running task's pipes dies mid-run: that is now the user's
/// worker (the front holds no task). The broker starts it again, because its user has live
/// work, and the new worker takes the task over: every message stored once, in order.
fn worker_killed_mid_task() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &wt);
    assert!(
        session.starts_with(&format!("u{}-", uid_of(ALICE))),
        "{session}"
    );
    // Five lines, one a second.
    let task = prompt(&stoa, &alice, &session, "SLOW");
    wait_until("two messages", Duration::from_secs(10), || {
        messages(&stoa, &alice, &session).len() >= 2
    });
    let front = stoa.daemon_pid().expect("front");
    let worker = worker_pid(&stoa, ALICE).expect("alice's worker");
    run("kill", &["-KILL", &worker.to_string()]);
    // The broker restarts it at once (her task still runs); until it noticed, a request
    // may have reached the dead one. Then every answer must come, from the new one.
    let mut new_worker = None;
    wait_until("alice's new worker", Duration::from_secs(20), || {
        new_worker = worker_pid(&stoa, ALICE).filter(|p| *p != worker);
        new_worker.is_some()
            && stoa
                .request("GET", &format!("/tasks/{task}"), Some(&alice), None)
                .0
                == 200
    });
    assert!(!alive(worker), "the killed worker is still there");
    let t = wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "completed", "{t}");
    let msgs = messages(&stoa, &alice, &session);
    assert_whole_bash_run(&msgs);
    assert_eq!(worker_pid(&stoa, ALICE), new_worker, "{}", stoa.log());
    assert!(stoa.log().contains("taking over a running task"));
    // The front was not involved.
    assert_eq!(stoa.daemon_pid(), Some(front));
    Ok(())
}

/// An agent that ends while its user's worker is down (stopped, then killed): what it wrote
/// waits in its pipe, its exit in the broker; the next worker adopts the exited handle and
/// records the whole run, not "interrupted".
fn agent_ends_while_its_worker_is_down() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let session = create_session(&stoa, &alice, "claude-code", &worktree(ALICE));
    let task = prompt(&stoa, &alice, &session, "SLOW");
    wait_until("two messages", Duration::from_secs(10), || {
        messages(&stoa, &alice, &session).len() >= 2
    });
    let agent: Vec<i32> = live_processes_of(ALICE)
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a.ends_with("fake-agent")))
        .map(|(p, _)| p)
        .collect();
    assert!(!agent.is_empty(), "alice's agent is not running");
    let worker = worker_pid(&stoa, ALICE).expect("alice's worker");
    run("kill", &["-STOP", &worker.to_string()]);
    // The agent writes the rest and ends, unread; the broker reaps it.
    wait_until("the agent to end", Duration::from_secs(20), || {
        agent.iter().all(|p| !alive(*p))
    });
    run("kill", &["-KILL", &worker.to_string()]);
    // Until the broker noticed, a request may reach the dead one (502, try again).
    wait_until("alice's new worker", Duration::from_secs(20), || {
        worker_pid(&stoa, ALICE).is_some_and(|p| p != worker)
            && stoa
                .request("GET", &format!("/tasks/{task}"), Some(&alice), None)
                .0
                == 200
    });
    let t = wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "completed", "{t}\n{}", stoa.log());
    let msgs = messages(&stoa, &alice, &session);
    assert_whole_bash_run(&msgs);
    assert_ne!(worker_pid(&stoa, ALICE), Some(worker));
    Ok(())
}

fn graceful_shutdown() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let mut stoa = Instance::start_with(Options {
        extra_policy: "shutdown_grace_secs = 8\n".into(),
        extra_config: fakes.config(""),
        ..Options::default()
    });
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    // One that finishes within the grace (five lines, one a second), one that never does,
    // and a terminal (hung up at once).
    let slow_session = create_session(&stoa, &alice, "claude-code", &worktree(ALICE));
    let slow = prompt(&stoa, &alice, &slow_session, "SLOW");
    let hang_session = create_session(&stoa, &bob, "claude-code", &worktree(BOB));
    let hang = prompt(&stoa, &bob, &hang_session, "HANG");
    let (status, terminal) = stoa.request(
        "POST",
        "/terminals",
        Some(&bob),
        Some(&json!({ "unix_user": BOB, "cols": 80, "rows": 24, "command": ["sleep", "600"] })),
    );
    assert_eq!(status, 201, "{terminal}");
    wait_until("both tasks running", Duration::from_secs(10), || {
        [(&slow, &alice), (&hang, &bob)].iter().all(|(t, token)| {
            let (_, v) = stoa.request("GET", &format!("/tasks/{t}"), Some(token), None);
            v["status"] == "running"
        })
    });

    let broker = stoa.broker_pid();
    run("kill", &["-TERM", &broker.to_string()]);
    // New work is refused while the old finishes; /health says why.
    wait_until("new work refused", Duration::from_secs(5), || {
        let (status, _) = stoa.request(
            "POST",
            &format!("/sessions/{slow_session}/prompt"),
            Some(&alice),
            Some(&json!({ "prompt": "hello" })),
        );
        status == 503
    });
    let (status, _) = stoa.exec(json!({ "unix_user": ALICE, "argv": ["true"] }));
    assert_eq!(status, 503);
    assert!(
        stoa.health().is_none(),
        "/health should answer 503 while stopping"
    );

    // (One SIGTERM only: a second one cuts the grace short.)
    let status = stoa
        .wait_exit(Duration::from_secs(40))
        .expect("stoa serve did not exit");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}; log:\n{}",
        stoa.log()
    );

    // Every end is in its user's store (alice's task in hers, bob's task and terminal in
    // his): the slow task completed, the hung one was stopped, the terminal ended; nothing
    // is left queued or running in either.
    let alice_db = rusqlite::Connection::open(store_of(&stoa, ALICE))?;
    let bob_db = rusqlite::Connection::open(store_of(&stoa, BOB))?;
    let row = |db: &rusqlite::Connection, id: &str| -> (String, Option<String>) {
        db.query_row(
            "SELECT status, error FROM tasks WHERE task_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap_or_else(|e| panic!("task row of {id}: {e}"))
    };
    assert_eq!(
        row(&alice_db, &slow).0,
        "completed",
        "{:?}; log:\n{}",
        row(&alice_db, &slow),
        stoa.log()
    );
    let (hang_status, hang_error) = row(&bob_db, &hang);
    assert_eq!(hang_status, "stopped", "{hang_error:?}");
    assert!(hang_error.unwrap_or_default().contains("shut down"));
    for db in [&alice_db, &bob_db] {
        let unfinished: i64 = db.query_row(
            "SELECT count(*) FROM tasks WHERE status NOT IN ('completed', 'failed', 'stopped')",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(unfinished, 0);
    }
    let ended: Option<String> = bob_db.query_row(
        "SELECT ended_at FROM terminals WHERE terminal_id = ?1",
        [terminal["terminal_id"].as_str().unwrap_or_default()],
        |r| r.get(0),
    )?;
    assert!(ended.is_some(), "the terminal's end was not recorded");
    // No process of any user is left, their workers included.
    for user in [ALICE, BOB] {
        assert_nothing_at_all_left(user);
    }
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    for event in ["\"shutdown\"", "\"broker_stop\""] {
        assert!(audit.contains(event), "audit lacks {event}");
    }
    Ok(())
}

fn cli() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(
        &fakes,
        "# the daemon's settings\n[execution]\n# seconds\ntimeout_secs = 60\n",
    );
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let stoa_cli = |args: &[&str]| {
        std::process::Command::new(stoa.dir.join("bin/stoa"))
            .args(args)
            .env("STOA_URL", stoa.url(""))
            .env("STOA_TOKEN", &alice)
            .env("STOA_CONFIG", stoa.dir.join("config.toml"))
            .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = stoa_cli(&[
        "session",
        "create",
        "--tool",
        "claude-code",
        "--worktree",
        &wt,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout)?;
    let id = created["session_id"].as_str().unwrap();
    let out = stoa_cli(&["session", "prompt", id, "hello", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("[tool Bash]") && printed.contains("Hello from the mock server."),
        "{printed}"
    );
    // The end's summary says what the agent reported, and no `null` for what it did not.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("[done") && !said.contains("null") && !printed.contains("null"),
        "{said}"
    );
    let out = stoa_cli(&["session", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));

    // Approvals from the CLI: listed for people and as JSON, allowed, refused twice.
    let task = prompt(&stoa, &alice, id, "ASKONCE");
    // The first waiting request's id, as `stoa approvals list --json` gives it.
    let first_waiting = || -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = stoa_cli(&["approvals", "list", "--json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            if let Some(id) = list[0]["approval_id"].as_str() {
                return id.to_string();
            }
            assert!(Instant::now() < deadline, "no request came");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let approval = first_waiting();
    let out = stoa_cli(&["approvals", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&approval) && table.contains("Bash: id -un > whoami.txt"),
        "{table}"
    );
    let out = stoa_cli(&["approvals", "allow", &approval]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("allowed"));
    let again = stoa_cli(&["approvals", "deny", &approval]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("allowed already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(wait_task(&stoa, &alice, &task)["status"], "completed");
    // `--wait` says what the agent asks and how to answer; denied from another terminal,
    // it ends with the decision.
    let waiting = std::process::Command::new(stoa.dir.join("bin/stoa"))
        .args(["session", "prompt", id, "ASKONCE again", "--wait"])
        .env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &alice)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let approval = first_waiting();
    let out = stoa_cli(&["approvals", "deny", &approval, "-m", "not today"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let waited = waiting.wait_with_output()?;
    let said = String::from_utf8_lossy(&waited.stderr);
    assert!(
        said.contains("[the agent asks: Bash: id -un > whoami.txt")
            && said.contains(&format!("stoa approvals allow {approval}"))
            && said.contains("[Bash denied by"),
        "{said}"
    );
    // Allowed for the session: the next time the tool is asked for, nobody is asked.
    let task = prompt(&stoa, &alice, id, "ASKONCE third");
    let approval = first_waiting();
    let out = stoa_cli(&["approvals", "show", &approval]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("\"command\": \"id -un > whoami.txt; pwd >> whoami.txt; cat whoami.txt\""),
        "show prints the input in full: {shown}"
    );
    let out = stoa_cli(&["approvals", "allow", &approval, "--for-session"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_task(&stoa, &alice, &task)["status"], "completed");
    let task = prompt(&stoa, &alice, id, "ASKONCE fourth");
    assert_eq!(wait_task(&stoa, &alice, &task)["status"], "completed");
    let by_rule = messages(&stoa, &alice, id)
        .into_iter()
        .filter(|m| m["task_id"] == task.as_str())
        .any(|m| m["event"]["kind"] == "permission_decision" && m["event"]["by"] == "session rule");
    assert!(by_rule, "allowed by the session's rule, unasked");

    // config set keeps comments, validates.
    let out = stoa_cli(&["config", "set", "execution.timeout_secs", "90"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(stoa.dir.join("config.toml"))?;
    assert!(
        text.contains("# the daemon's settings")
            && text.contains("# seconds")
            && text.contains("timeout_secs = 90"),
        "{text}"
    );
    let out = stoa_cli(&["config", "get", "execution.timeout_secs"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "90");
    let out = stoa_cli(&["config", "set", "execution.timeout_secs", "\"soon\""]);
    assert!(!out.status.success(), "an invalid value was accepted");
    let out = stoa_cli(&[
        "config",
        "set",
        "agents.claude-code.env.ANTHROPIC_API_KEY",
        "x",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stoa secret set"),
        "secrets refused in config"
    );
    assert_eq!(
        std::fs::read_to_string(stoa.dir.join("config.toml"))?,
        text,
        "a refused change was written"
    );

    // user list shows no token; daemon restart brings a new daemon.
    let out = stoa_cli(&["user", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("alice") && !listing.contains(&alice),
        "{listing}"
    );
    let before = stoa.daemon_pid().expect("daemon");
    let out = std::process::Command::new(stoa.dir.join("bin/stoa"))
        .args(["daemon", "restart"])
        .env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &stoa.token)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(stoa.wait_new_daemon(before), before);
    Ok(())
}
