//! Red-team findings on ownership, stored output and prompts in argv: each test reproduces
//! one and shows it closed.
//!
//! * Objects belong to the API user's immutable id (`user:<id>`, or `admin` for the admin
//!   token) and its Unix user, never to a name: a user named like the admin token, or a
//!   name removed and added again, gets nothing it did not create.
//! * An agent's output is bounded in the store per message, per task and per Unix user.
//! * Gemini's prompt travels on stdin: never in any process's argv, the audit log or
//!   `GET /processes`.
#![forbid(unsafe_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "store_admin_name_is_reserved_and_gives_no_admin_objects",
        admin_name,
    ),
    (
        "store_name_removed_and_added_again_owns_nothing_old",
        name_reused,
    ),
    (
        "store_output_flood_fails_the_task_at_its_limits",
        output_flood,
    ),
    (
        "store_gemini_prompt_stays_out_of_argv_audit_and_processes",
        gemini_prompt,
    ),
];

/// `stoa user ARGS` against this instance's broker; (success, stdout, stderr).
fn stoa_user(stoa: &Instance, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(stoa.dir.join("bin/stoa"))
        .arg("user")
        .args(args)
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory in the user's (0700) home, owned by the user.
fn worktree(user: &str) -> String {
    let n = DIRS.fetch_add(1, Ordering::SeqCst);
    let dir = format!("/home/{user}/sec-wt-{n}");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run("chown", &[&format!("{user}:"), &dir]);
    dir
}

fn create_session(stoa: &Instance, token: &str, body: Value) -> String {
    let (status, s) = stoa.request("POST", "/sessions", Some(token), Some(&body));
    assert_eq!(status, 201, "{s}");
    s["session_id"].as_str().unwrap().to_string()
}

fn open_terminal(stoa: &Instance, token: &str, body: Value) -> (String, i32) {
    let (status, t) = stoa.request("POST", "/terminals", Some(token), Some(&body));
    assert_eq!(status, 201, "{t}");
    (
        t["terminal_id"].as_str().unwrap().to_string(),
        t["pid"].as_i64().unwrap() as i32,
    )
}

fn status(stoa: &Instance, method: &str, path: &str, token: &str) -> u16 {
    stoa.request(method, path, Some(token), None).0
}

/// The HTTP status of a terminal WebSocket attach with `token` (101 when it opens).
fn attach_status(stoa: &Instance, id: &str, token: &str) -> u16 {
    let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws", stoa.port);
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("Sec-WebSocket-Protocol", "stoa.term.v1".parse().unwrap());
    headers.insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", stoa.port)).unwrap();
    match tungstenite::client::client(request, stream) {
        Ok(_) => 101,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            r.status().as_u16()
        }
        Err(e) => panic!("websocket: {e}"),
    }
}

/// Everything a token could use to reach a session or terminal it does not own answers
/// 404, and its lists are empty.
fn assert_cannot_reach(stoa: &Instance, token: &str, session: &str, terminal: &str, who: &str) {
    let (_, sessions) = stoa.request("GET", "/sessions", Some(token), None);
    assert_eq!(sessions, json!([]), "{who} lists sessions it does not own");
    let (_, terminals) = stoa.request("GET", "/terminals", Some(token), None);
    assert_eq!(
        terminals,
        json!([]),
        "{who} lists terminals it does not own"
    );
    for (method, path) in [
        ("GET", format!("/sessions/{session}")),
        ("GET", format!("/sessions/{session}/messages")),
        ("POST", format!("/sessions/{session}/stop")),
        ("GET", format!("/terminals/{terminal}")),
        ("POST", format!("/terminals/{terminal}/ticket")),
        ("DELETE", format!("/terminals/{terminal}")),
    ] {
        assert_eq!(
            status(stoa, method, &path, token),
            404,
            "{who}: {method} {path}"
        );
    }
    let (code, v) = stoa.request(
        "POST",
        &format!("/sessions/{session}/prompt"),
        Some(token),
        Some(&json!({ "prompt": "echo hijacked" })),
    );
    assert_eq!(code, 404, "{who} prompts a session it does not own: {v}");
    assert_eq!(
        attach_status(stoa, terminal, token),
        404,
        "{who} attaches to a terminal it does not own"
    );
}

/// Finding: `stoa user add admin --unix-user alice` gave alice's token everything the
/// admin token created, because objects were owned by the name "admin".
fn admin_name() -> Result<(), Failed> {
    let stoa = Instance::start();
    for name in ["admin", "Admin"] {
        let (ok, token, err) = stoa_user(&stoa, &["add", name, "--unix-user", ALICE]);
        assert!(!ok && token.is_empty(), "`user add {name}` was accepted");
        assert!(err.contains("reserved"), "{err}");
    }
    // The admin token's session and terminal, running as alice.
    let wt = worktree(ALICE);
    let admin = stoa.token.clone();
    let session = create_session(
        &stoa,
        &admin,
        json!({ "agentic_tool": "claude-code", "worktree": wt, "unix_user": ALICE }),
    );
    let (terminal, shell) = open_terminal(
        &stoa,
        &admin,
        json!({ "cols": 80, "rows": 24, "unix_user": ALICE, "command": ["sh"] }),
    );
    // A store may still hold a user named "admin" (written before the name was reserved):
    // rename one in place, as such a store would have it.
    let impostor = stoa.api_user("impostor", ALICE);
    let users = stoa.dir.join("broker/users.json");
    let mut store: Value = serde_json::from_str(&std::fs::read_to_string(&users)?)?;
    for u in store["users"].as_array_mut().unwrap() {
        if u["name"] == "impostor" {
            u["name"] = json!("admin");
        }
    }
    std::fs::write(&users, serde_json::to_vec_pretty(&store)?)?;
    let (_, me) = stoa.request("GET", "/users/me", Some(&impostor), None);
    assert_eq!(
        (me["name"].as_str(), me["admin"].as_bool()),
        (Some("admin"), Some(false)),
        "{me}"
    );
    assert_cannot_reach(
        &stoa,
        &impostor,
        &session,
        &terminal,
        "an API user named admin",
    );
    assert!(alive(shell), "the admin's terminal was killed");
    // It still has its own things, and the admin token still sees everything.
    let own = create_session(
        &stoa,
        &impostor,
        json!({ "agentic_tool": "claude-code", "worktree": wt }),
    );
    assert_eq!(
        status(&stoa, "GET", &format!("/sessions/{own}"), &impostor),
        200
    );
    assert_eq!(
        status(&stoa, "GET", &format!("/sessions/{session}"), &admin),
        200
    );
    assert_eq!(
        status(&stoa, "GET", &format!("/sessions/{own}"), &admin),
        200
    );
    assert_eq!(
        status(&stoa, "GET", &format!("/terminals/{terminal}"), &admin),
        200
    );
    Ok(())
}

/// Finding: `user remove alice; user add alice --unix-user bob` let bob's new token type
/// into alice's old shell. A rotated token keeps what its user owns.
fn name_reused() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(
        &stoa,
        &alice,
        json!({ "agentic_tool": "claude-code", "worktree": wt }),
    );
    let (terminal, shell) = open_terminal(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    // Rotation: the same user, a new token, everything still its own.
    let (ok, rotated, err) = stoa_user(&stoa, &["token", "alice"]);
    assert!(ok, "{err}");
    assert_eq!(
        status(&stoa, "GET", &format!("/sessions/{session}"), &rotated),
        200
    );
    assert_eq!(
        status(&stoa, "GET", &format!("/terminals/{terminal}"), &rotated),
        200
    );
    // The name goes to bob's Unix user.
    let (ok, _, err) = stoa_user(&stoa, &["remove", "alice"]);
    assert!(ok, "{err}");
    let (ok, as_bob, err) = stoa_user(&stoa, &["add", "alice", "--unix-user", BOB]);
    assert!(ok, "{err}");
    assert_cannot_reach(
        &stoa,
        &as_bob,
        &session,
        &terminal,
        "a new 'alice' acting as bob",
    );
    // Even acting as alice again, a new user with the old name is another owner.
    let (ok, _, err) = stoa_user(&stoa, &["remove", "alice"]);
    assert!(ok, "{err}");
    let (ok, again, err) = stoa_user(&stoa, &["add", "alice", "--unix-user", ALICE]);
    assert!(ok, "{err}");
    assert_cannot_reach(
        &stoa,
        &again,
        &session,
        &terminal,
        "a new 'alice' acting as alice",
    );
    assert!(alive(shell), "the old terminal's shell was killed");
    let admin = stoa.token.clone();
    assert_eq!(
        status(&stoa, "GET", &format!("/terminals/{terminal}"), &admin),
        200
    );
    Ok(())
}

/// The fake agent CLIs: a flooder (played as claude-code) and a gemini that waits for the
/// test before it answers. Root-owned, readable by the users.
struct Fakes {
    dir: PathBuf,
}

const FLOOD_AGENT: &str = r#"#!/bin/sh
# Asked to flood: writes one 3 MiB JSON line and up to 64 lines of 1 MiB, while a child in
# its process group sleeps; if it is not stopped it says so in a file. Else: a short answer.
IFS= read -r input || true  # one line: Claude Code's stdin stays open until its result
case "$input" in
  *flood*) ;;
  *) printf '{"type":"system","subtype":"init","session_id":"small-1","model":"m"}\n'
     printf '{"type":"result","subtype":"success","is_error":false,"result":"ok","num_turns":1}\n'
     exit 0 ;;
esac
sleep 300 &
printf '{"type":"system","subtype":"init","session_id":"flood-1","model":"m"}\n'
big=$(head -c 3145728 /dev/zero | tr '\0' b)
printf '{"type":"big","data":"%s"}\n' "$big"
line=$(head -c 1048576 /dev/zero | tr '\0' a)
n=0
while [ $n -lt 64 ]; do
  printf '{"type":"flood","n":%d,"data":"%s"}\n' $n "$line"
  n=$((n + 1))
done
touch .flood-finished
kill $!
"#;

const WAITING_GEMINI: &str = r#"#!/bin/sh
# $1: the recording to replay (Gemini in its ACP mode). Says it started and waits for the
# test's go-ahead (at most 60 s) so the test can look at the process table meanwhile; then
# answers stoa's initialize, session/new and session/prompt with the recorded lines, keeping
# what came on stdin.
fixture=$1; shift
tr '\0' ' ' < /proc/$$/cmdline > .fake-cmdline
touch .fake-started
n=0
while [ ! -e .fake-go ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n + 1)); done
IFS= read -r line; printf '%s\n' "$line" > .fake-stdin
sed -n 1p "$fixture"
IFS= read -r line; printf '%s\n' "$line" >> .fake-stdin
sed -n 2p "$fixture"
IFS= read -r line; printf '%s\n' "$line" >> .fake-stdin
sed -n '3,$p' "$fixture"
"#;

const GEMINI_FIXTURE: &str = "gemini-cli-0.61.0-acp-text.jsonl";

impl Fakes {
    fn install() -> Fakes {
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!(
            "/run/stoa-test-{}-secfakes-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chmod", &["0755", dir.to_str().unwrap()]);
        for (name, text) in [
            ("flood-agent", FLOOD_AGENT),
            ("waiting-gemini", WAITING_GEMINI),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
            run("chmod", &["0755", dir.join(name).to_str().unwrap()]);
        }
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agents");
        std::fs::copy(fixtures.join(GEMINI_FIXTURE), dir.join(GEMINI_FIXTURE))
            .expect("fixture (tests/fixtures/agents)");
        run(
            "chmod",
            &["0644", dir.join(GEMINI_FIXTURE).to_str().unwrap()],
        );
        Fakes { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn prompt(stoa: &Instance, token: &str, session: &str, text: &str) -> String {
    let (code, t) = stoa.request(
        "POST",
        &format!("/sessions/{session}/prompt"),
        Some(token),
        Some(&json!({ "prompt": text })),
    );
    assert_eq!(code, 202, "{t}");
    t["task_id"].as_str().unwrap().to_string()
}

fn wait_task(stoa: &Instance, token: &str, task: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, t) = stoa.request("GET", &format!("/tasks/{task}"), Some(token), None);
        assert_eq!(code, 200, "{t}");
        if ["completed", "failed", "stopped"].contains(&t["status"].as_str().unwrap_or("")) {
            return t;
        }
        assert!(Instant::now() < deadline, "task did not end: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The processes of `user` that are not zombies, but for the user's own worker in `stoa`
/// (`stoa __worker`, a child of its broker: it holds her store and idles for a minute).
fn processes_of(stoa: &Instance, user: &str) -> Vec<(i32, Vec<String>)> {
    let uid = uid_of(user).to_string();
    all_pids()
        .into_iter()
        .filter(|p| {
            status_field(*p, "Uid").is_some_and(|u| u.split_whitespace().next() == Some(&uid))
                && state_and_ppid(*p).is_some_and(|(s, _)| s != "Z")
                && !crate::sessions::is_worker_of(stoa, *p)
        })
        .map(|p| (p, cmdline(p)))
        .collect()
}

/// `user`'s store (`<workers_dir>/<uid>/`, written by that user's worker), with its
/// write-ahead log. The database must be there: a missing one would measure as nothing.
fn db_bytes(stoa: &Instance, user: &str) -> u64 {
    let dir = stoa.dir.join("workers").join(uid_of(user).to_string());
    assert!(
        dir.join("stoa.db").is_file(),
        "no store of {user} in {}",
        dir.display()
    );
    ["stoa.db", "stoa.db-wal", "stoa.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Finding: an agent writing 1 MiB JSON lines grew `stoa.db` without bound. Now one
/// message, one task (16 MiB by default) and one Unix user (configured here to 24 MiB)
/// are bounded; the task fails naming the limit, and nothing of the run is left.
fn output_flood() -> Result<(), Failed> {
    const USER_LIMIT: u64 = 24 << 20;
    let fakes = Fakes::install();
    let config = |agent: &str| {
        format!(
            "[execution]\nmax_user_output_bytes = {USER_LIMIT}\n[agents.claude-code]\ncommand = [\"{}\"]\n",
            fakes.path(agent)
        )
    };
    let stoa = Instance::start_with(Options {
        extra_config: config("flood-agent"),
        ..Options::default()
    });
    let alice = stoa.api_user("alice", ALICE);
    // Her first request starts her worker, which creates her store: measured from there.
    assert_eq!(status(&stoa, "GET", "/sessions", &alice), 200);
    let before = db_bytes(&stoa, ALICE);
    let mut sessions = Vec::new();
    for limit in ["max_task_output_bytes", "max_user_output_bytes"] {
        let wt = worktree(ALICE);
        let session = create_session(
            &stoa,
            &alice,
            json!({ "agentic_tool": "claude-code", "worktree": wt }),
        );
        let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &session, "flood"));
        assert_eq!(t["status"], "failed", "{t}");
        let error = t["error"].as_str().unwrap_or("");
        assert!(error.contains(limit), "{limit}: {t}");
        // Stopped by stoa before it finished, its process group with it.
        assert!(
            !Path::new(&format!("{wt}/.flood-finished")).exists(),
            "the flooding agent ran to its end"
        );
        let left = processes_of(&stoa, ALICE);
        assert!(left.is_empty(), "processes of alice left: {left:?}");
        sessions.push(session);
    }
    // The 3 MiB line is stored as a notice, not whole.
    let (_, msgs) = stoa.request(
        "GET",
        &format!("/sessions/{}/messages?limit=5", sessions[0]),
        Some(&alice),
        None,
    );
    let omitted = msgs
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["event"]["kind"] == "omitted")
        .unwrap_or_else(|| panic!("no omitted message: {:.300}", msgs.to_string()));
    assert!(omitted["event"]["reason"]
        .as_str()
        .unwrap()
        .contains("max_message_bytes"));
    // What the store holds stays within the user's limit (+ the database's own overhead
    // and the write-ahead log).
    let grown = db_bytes(&stoa, ALICE).saturating_sub(before);
    eprintln!("output flood: alice's store grew by {grown} bytes (her limit {USER_LIMIT})");
    assert!(
        grown < USER_LIMIT + (16 << 20),
        "the database grew by {grown} bytes"
    );
    // At the limit, nothing more of the user's is stored: the next flood fails at once.
    let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &sessions[1], "flood"));
    assert!(
        t["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_user_output_bytes"),
        "{t}"
    );
    // Deleting a session frees its share: a well-behaved agent runs again.
    assert_eq!(
        status(
            &stoa,
            "DELETE",
            &format!("/sessions/{}", sessions[0]),
            &alice
        ),
        204
    );
    let t = wait_task(&stoa, &alice, &prompt(&stoa, &alice, &sessions[1], "hello"));
    assert_eq!(t["status"], "completed", "{t}");
    Ok(())
}

/// Finding: gemini's prompt was an argument, readable by every local user in
/// /proc/PID/cmdline and copied into the audit log and `GET /processes`.
fn gemini_prompt() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = Instance::start_with(Options {
        extra_config: format!(
            "[agents.gemini]\ncommand = [\"{}\", \"{}\"]\n",
            fakes.path("waiting-gemini"),
            fakes.path(GEMINI_FIXTURE)
        ),
        ..Options::default()
    });
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = create_session(
        &stoa,
        &alice,
        json!({ "agentic_tool": "gemini", "worktree": wt }),
    );
    let marker = format!(
        "privateplan{}x{}",
        std::process::id(),
        DIRS.load(Ordering::SeqCst)
    );
    let task = prompt(&stoa, &alice, &session, &format!("please {marker} now"));
    wait_until("the fake gemini to start", Duration::from_secs(30), || {
        Path::new(&format!("{wt}/.fake-started")).exists()
    });
    // While it runs: its argv is visible (the scan would find it) and holds no prompt, nor
    // does any other process's.
    let fake = fakes.path("waiting-gemini");
    let mut seen = false;
    for pid in all_pids() {
        let argv = cmdline(pid).join(" ");
        seen |= argv.contains(&fake);
        assert!(
            !argv.contains(&marker),
            "the prompt is in pid {pid}'s argv: {argv}"
        );
    }
    assert!(seen, "the fake gemini is not in the process table");
    let processes = serde_json::to_string(&stoa.processes())?;
    assert!(processes.contains(&fake), "GET /processes: {processes}");
    assert!(
        !processes.contains(&marker),
        "the prompt is in GET /processes"
    );
    std::fs::write(format!("{wt}/.fake-go"), "")?;
    let t = wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "completed", "{t}");
    // It got the prompt, on stdin.
    let stdin = std::fs::read_to_string(format!("{wt}/.fake-stdin"))?;
    assert!(stdin.contains(&marker), "stdin: {stdin:?}");
    let argv = std::fs::read_to_string(format!("{wt}/.fake-cmdline"))?;
    assert!(!argv.contains(&marker) && !argv.contains(" -p "), "{argv}");
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(
        audit.contains("\"spawn\""),
        "no spawn in the audit log: {audit}"
    );
    assert!(!audit.contains(&marker), "the prompt is in the audit log");
    assert!(!stoa.log().contains(&marker), "the prompt is in stoa's log");
    Ok(())
}
