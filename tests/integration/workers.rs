//! The front and the per-user workers: a front taken over reaches no user whose credential
//! it is not shown, it holds none of the users' fds (each user's are held by that user's
//! worker, running as that user), a killed worker is replaced and takes its user's work back
//! without anyone else noticing, and a flood in a user's terminal is counted against that
//! user, not against the front or another user.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use stoa::terminal::protocol::FROM_NOW;
use stoa::wire::{
    BrokerMessage, ErrorKind, Handle, Program, ReplyBody, Request, RequestBody, Signal,
    SpawnRequest,
};
use stoa_executor::{codec, sys};

use crate::harness::*;
use crate::viewer::connect;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "front_taken_over_reaches_no_user_without_their_credential",
        taken_over,
    ),
    (
        "front_holds_no_user_fds_each_users_are_held_as_that_user",
        fds_by_user,
    ),
    (
        "killed_worker_is_replaced_adopts_and_bob_never_notices",
        killed_worker,
    ),
    (
        "a_flood_in_alices_terminal_counts_against_alice",
        flood_accounting,
    ),
    (
        "an_admin_acting_in_alices_worker_leaves_no_admin_token_there",
        admin_token_stays_in_the_front,
    ),
];

const BOGUS: &str = "stoa_bogus-credential-0000000000000000";

// ---- a fake agent ------------------------------------------------------------------

const FAKE_AGENT: &str = r#"#!/bin/sh
# A stand-in agent CLI replaying a recorded stream ($1). HANG: one line, then it runs on
# (its pid and pipes unchanged: exec). SLOW: a line a second.
fixture=$1; shift
# One line: a conversation (Claude Code's stream-json) keeps stdin open until its result.
if [ -t 0 ]; then input=""; else IFS= read -r input || true; fi
case "$input $*" in
  *HANG*) head -n 1 "$fixture"; exec sleep 3600 ;;
  *SLOW*) while IFS= read -r line; do printf '%s\n' "$line"; sleep 1; done < "$fixture" ;;
  *) cat "$fixture" ;;
esac
"#;
const FIXTURE: &str = "claude-code-2.1.197-bash-tool.jsonl";

static FAKES: AtomicU32 = AtomicU32::new(0);

/// The fake agent and its recording, in a root-owned directory the users can read.
struct Fakes {
    dir: PathBuf,
}

impl Fakes {
    fn install() -> Fakes {
        let n = FAKES.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!(
            "/run/stoa-test-{}-workers-fakes-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chmod", &["0755", dir.to_str().unwrap()]);
        std::fs::write(dir.join("fake-agent"), FAKE_AGENT).unwrap();
        run("chmod", &["0755", dir.join("fake-agent").to_str().unwrap()]);
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agents");
        std::fs::copy(fixtures.join(FIXTURE), dir.join(FIXTURE)).expect("fixture");
        run("chmod", &["0644", dir.join(FIXTURE).to_str().unwrap()]);
        Fakes { dir }
    }

    fn start(&self) -> Instance {
        Instance::start_with(Options {
            extra_config: format!(
                "[agents.claude-code]\ncommand = [\"{}\", \"{}\"]\n",
                self.dir.join("fake-agent").display(),
                self.dir.join(FIXTURE).display()
            ),
            ..Options::default()
        })
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static WORKTREES: AtomicU32 = AtomicU32::new(0);

/// A session of `user`'s in a fresh worktree in their home; returns its id.
fn session(stoa: &Instance, token: &str, user: &str) -> String {
    let n = WORKTREES.fetch_add(1, Ordering::SeqCst);
    let dir = format!("/home/{user}/workers-wt-{n}");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run("chown", &[&format!("{user}:"), &dir]);
    let (status, s) = stoa.request(
        "POST",
        "/sessions",
        Some(token),
        Some(&json!({ "agentic_tool": "claude-code", "worktree": dir })),
    );
    assert_eq!(status, 201, "{s}");
    s["session_id"].as_str().unwrap().to_string()
}

/// Prompts a new session of `user`'s; returns the task id.
fn task(stoa: &Instance, token: &str, user: &str, text: &str) -> (String, String) {
    let session = session(stoa, token, user);
    let (status, t) = stoa.request(
        "POST",
        &format!("/sessions/{session}/prompt"),
        Some(token),
        Some(&json!({ "prompt": text })),
    );
    assert_eq!(status, 202, "{t}");
    (session, t["task_id"].as_str().unwrap().to_string())
}

fn task_status(stoa: &Instance, token: &str, task: &str) -> String {
    let (status, t) = stoa.request("GET", &format!("/tasks/{task}"), Some(token), None);
    assert_eq!(status, 200, "{t}");
    t["status"].as_str().unwrap_or("").to_string()
}

fn wait_running(stoa: &Instance, token: &str, task: &str) {
    wait_until("the task to run", Duration::from_secs(15), || {
        task_status(stoa, token, task) == "running"
    });
}

fn message_kinds(stoa: &Instance, token: &str, session: &str) -> Vec<String> {
    let (status, m) = stoa.request(
        "GET",
        &format!("/sessions/{session}/messages"),
        Some(token),
        None,
    );
    assert_eq!(status, 200, "{m}");
    m.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| m["event"]["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The single process of `user` whose argv is `argv`.
fn one_process(user: &str, argv: &[&str]) -> i32 {
    let mut pids = Vec::new();
    wait_until(
        &format!("{user}'s {argv:?}"),
        Duration::from_secs(10),
        || {
            pids = find_processes(user, argv);
            pids.len() == 1
        },
    );
    pids[0]
}

fn open_terminal(stoa: &Instance, token: &str, command: Value) -> (String, i32) {
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(token),
        Some(&json!({ "cols": 80, "rows": 24, "command": command })),
    );
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["running"], true, "{t}");
    (
        t["terminal_id"].as_str().unwrap().to_string(),
        t["pid"].as_i64().unwrap() as i32,
    )
}

/// Types an arithmetic echo into a shell terminal and waits for its answer.
fn answers(stoa: &Instance, id: &str, token: &str, tag: &str) {
    let mut v = connect(stoa, id, token);
    v.hello(FROM_NOW, true);
    v.type_text(&format!("echo {tag}-$((6 * 7))\n"));
    v.wait_for(&format!("{tag}-42"), Duration::from_secs(10));
}

// ---- the front's broker link, taken over ---------------------------------------------

/// Stops the front (every thread) and takes its broker link (fd 3).
fn take_front(stoa: &Instance) -> (i32, UnixStream) {
    let front = stoa.daemon_pid().expect("the front");
    run("kill", &["-STOP", &front.to_string()]);
    wait_until("the front to stop", Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{front}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| {
                            s.rsplit(')')
                                .next()
                                .map(|r| r.trim_start().starts_with('T'))
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(false)
    });
    let link = UnixStream::from(sys::pidfd_getfd(front, 3).expect("pidfd_getfd"));
    link.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (front, link)
}

fn send_request(link: &mut UnixStream, id: u64, body: RequestBody) -> std::io::Result<()> {
    let frame = codec::encode(&Request {
        id,
        request_id: None,
        body,
    })?;
    link.write_all(&frame)
}

/// Fills `buf` from the link, keeping the fds that come with it. `Ok(false)`: end of file
/// before the first byte.
fn recv_exact(link: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let r = match sys::recv_with_fds(link.as_fd(), &mut buf[got..], false) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        fds.extend(r.fds);
        if r.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += r.bytes;
    }
    Ok(true)
}

/// The broker's next message and its fds; `None` once the broker dropped the link.
fn read_message(link: &UnixStream) -> std::io::Result<Option<(BrokerMessage, Vec<OwnedFd>)>> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    if !recv_exact(link, &mut header, &mut fds)? {
        return Ok(None);
    }
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    recv_exact(link, &mut payload, &mut fds)?;
    let msg = codec::decode::<BrokerMessage>(&payload).map_err(std::io::Error::other)?;
    Ok(Some((msg, fds)))
}

fn ask(link: &mut UnixStream, id: u64, body: RequestBody) -> (ReplyBody, Vec<OwnedFd>) {
    let what = format!("{body:?}");
    send_request(link, id, body).unwrap_or_else(|e| panic!("{what}: {e}"));
    loop {
        match read_message(link) {
            Ok(Some((BrokerMessage::Reply { id: got, body }, fds))) if got == id => {
                return (body, fds)
            }
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{what}: the broker dropped the link instead of answering"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Sends what the front may not send; the broker must drop the link without an answer.
fn must_drop_link(link: &mut UnixStream, id: u64, body: RequestBody) -> Result<(), String> {
    let what = format!("{body:?}");
    send_request(link, id, body).map_err(|e| format!("{what}: {e}"))?;
    loop {
        match read_message(link) {
            Ok(None) => return Ok(()),
            Ok(Some((BrokerMessage::Reply { id: got, body }, _))) if got == id => {
                return Err(format!("{what} was answered: {body:?}"))
            }
            Ok(Some(_)) => continue,
            Err(e) => return Err(format!("{what}: the link neither answered nor ended: {e}")),
        }
    }
}

fn error_kind(reply: &ReplyBody) -> Option<ErrorKind> {
    match reply {
        ReplyBody::Error(e) => Some(e.kind.clone()),
        _ => None,
    }
}

/// One HTTP/1.1 exchange on a worker connection, written by hand: (status, body).
fn http_on(fd: OwnedFd, request: &str) -> (u16, String) {
    let mut s = UnixStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The first byte says how the connection is used: `H`, HTTP on it (see `worker.rs`).
    s.write_all(b"H").unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("the worker's answer");
        assert!(n > 0, "the worker closed before answering: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head.contains("transfer-encoding: chunked");
    let complete = |body: &[u8]| match length {
        Some(len) => body.len() >= len,
        None if chunked => body.ends_with(b"0\r\n\r\n"),
        None => false,
    };
    while !complete(&buf[head_end..]) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut body = buf[head_end..].to_vec();
    if chunked {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            plain.extend_from_slice(&rest[i + 2..i + 2 + size]);
            rest = &rest[i + 2 + size + 2..];
        }
        body = plain;
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn audit_events(stoa: &Instance, event: &str) -> usize {
    std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == event)
        .count()
}

/// 1. A front taken over (stopped, its link stolen) is no more than a front: whatever only
///    a worker may ask ends its link; without a user's credential it reaches nothing of
///    theirs; with alice's it reaches alice's worker and nobody else's.
fn taken_over() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = fakes.start();
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let (alice_term, alice_shell) = open_terminal(&stoa, &alice, json!(["sh"]));
    let (bob_term, bob_shell) = open_terminal(&stoa, &bob, json!(["sh"]));
    let (_, alice_task) = task(&stoa, &alice, ALICE, "HANG");
    let (_, bob_task) = task(&stoa, &bob, BOB, "HANG");
    wait_running(&stoa, &alice, &alice_task);
    wait_running(&stoa, &bob, &bob_task);
    let alice_agent = one_process(ALICE, &["sleep", "3600"]);
    let bob_agent = one_process(BOB, &["sleep", "3600"]);
    let violations_before = audit_events(&stoa, "violation");
    let marker = format!("/tmp/stoa-t-workers-spawned-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);

    // What only a worker may ask: each one ends the link (and the front is replaced).
    let worker_only = [
        RequestBody::ListHandles { after: None },
        RequestBody::Adopt { handle: Handle(1) },
        RequestBody::Kill {
            handle: Handle(1),
            signal: Signal::Kill,
        },
        RequestBody::Spawn(SpawnRequest {
            credential: BOGUS.into(),
            unix_user: ALICE.into(),
            program: Program::Exec {
                argv: vec!["touch".into(), marker.clone()],
            },
            cwd: None,
            cwd_id: None,
            env: Vec::new(),
            tty: None,
            stdin: false,
            keep_stdin: false,
            ring_bytes: 0,
            secrets: false,
            secret_names: None,
            purpose: stoa::wire::Purpose::Agent,
        }),
    ];
    let mut fronts = Vec::new();
    for (i, body) in worker_only.into_iter().enumerate() {
        let (front, mut link) = take_front(&stoa);
        let outcome = must_drop_link(&mut link, 2_000_000 + i as u64, body);
        drop(link);
        if let Err(e) = outcome {
            run("kill", &["-KILL", &front.to_string()]);
            return Err(format!("{e}\n{}", stoa.log()).into());
        }
        let next = stoa.wait_new_daemon(front);
        assert!(
            !alive(front),
            "the front that broke the protocol still runs"
        );
        fronts.push((front, next));
    }
    assert_eq!(
        audit_events(&stoa, "violation") - violations_before,
        4,
        "one violation audited per forbidden request"
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the front's Spawn ran"
    );

    // The front's own requests, without a credential or with a bogus one.
    let (front, mut link) = take_front(&stoa);
    let (reply, fds) = ask(
        &mut link,
        3_000_001,
        RequestBody::OpenWorker {
            credential: BOGUS.into(),
            unix_user: ALICE.into(),
            start: true,
        },
    );
    assert_eq!(
        error_kind(&reply),
        Some(ErrorKind::Unauthorized),
        "{reply:?}"
    );
    assert!(fds.is_empty());
    let (reply, _) = ask(
        &mut link,
        3_000_002,
        RequestBody::ListAll {
            credential: BOGUS.into(),
            after: None,
        },
    );
    assert_eq!(
        error_kind(&reply),
        Some(ErrorKind::Unauthorized),
        "{reply:?}"
    );
    // Anonymous: alice's running worker answers only what it checks itself (a ticket).
    let anonymous = |link: &mut UnixStream, id: u64| -> OwnedFd {
        let (reply, mut fds) = ask(
            link,
            id,
            RequestBody::OpenWorkerAnonymous {
                unix_user: ALICE.into(),
            },
        );
        assert_eq!(reply, ReplyBody::Connection);
        assert_eq!(fds.len(), 1);
        fds.pop().unwrap()
    };
    let (status, body) = http_on(
        anonymous(&mut link, 3_000_003),
        "GET /terminals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains(&alice_term), "{body}");
    let (status, body) = http_on(
        anonymous(&mut link, 3_000_004),
        &format!(
            "GET /terminals/{alice_term}/ws?ticket=bogus HTTP/1.1\r\nHost: localhost\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: stoa.term.v1\r\n\r\n"
        ),
    );
    assert_eq!(status, 401, "a bogus ticket was not refused: {body}");
    // With alice's credential: alice's worker, alice's terminals only.
    let (reply, mut fds) = ask(
        &mut link,
        3_000_005,
        RequestBody::OpenWorker {
            credential: alice.clone(),
            unix_user: ALICE.into(),
            start: true,
        },
    );
    assert_eq!(reply, ReplyBody::Connection);
    assert_eq!(fds.len(), 1);
    let (status, body) = http_on(
        fds.pop().unwrap(),
        &format!(
            "GET /terminals HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let ids: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["terminal_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [alice_term.as_str()], "{body}");
    assert!(!body.contains(&bob_term), "{body}");
    let (reply, fds) = ask(
        &mut link,
        3_000_006,
        RequestBody::OpenWorker {
            credential: alice.clone(),
            unix_user: BOB.into(),
            start: true,
        },
    );
    assert_eq!(error_kind(&reply), Some(ErrorKind::Forbidden), "{reply:?}");
    assert!(fds.is_empty());
    drop(link);
    run("kill", &["-KILL", &front.to_string()]);
    stoa.wait_new_daemon(front);

    // Nobody's work was touched; both terminals still answer, through the new front.
    for pid in [alice_shell, bob_shell, alice_agent, bob_agent] {
        assert!(alive(pid), "process {pid} died");
    }
    answers(&stoa, &alice_term, &alice, "alice");
    answers(&stoa, &bob_term, &bob, "bob");
    assert_eq!(task_status(&stoa, &alice, &alice_task), "running");
    assert_eq!(task_status(&stoa, &bob, &bob_task), "running");
    eprintln!(
        "taken-over front: 4 forbidden requests each ended the link ({} fronts replaced), bogus credentials refused, alice's credential reached alice's worker only",
        fronts.len() + 1
    );
    Ok(())
}

// ---- fds and processes ---------------------------------------------------------------

/// Every fd of `pid`: (fd number, link target).
fn fd_links(pid: i32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        target.to_string_lossy().into_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pipe_inodes(pid: i32) -> BTreeSet<String> {
    fd_links(pid)
        .into_iter()
        .filter(|(_, t)| t.starts_with("pipe:["))
        .map(|(_, t)| t)
        .collect()
}

fn is_ptmx(target: &str) -> bool {
    target == "/dev/ptmx" || target == "/dev/pts/ptmx"
}

/// The pty indexes of the masters `pid` holds (`None` for a master whose fdinfo does not
/// say: kernels before 4.19).
fn master_indexes(pid: i32) -> Vec<Option<u32>> {
    fd_links(pid)
        .into_iter()
        .filter(|(_, t)| is_ptmx(t))
        .map(|(fd, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                .ok()
                .and_then(|info| {
                    info.lines().find_map(|l| {
                        l.strip_prefix("tty-index:")
                            .and_then(|v| v.trim().parse().ok())
                    })
                })
        })
        .collect()
}

/// The pty number of a process's terminal (its stdin, `/dev/pts/N`).
fn pts_index(pid: i32) -> u32 {
    let target = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("stdin");
    target
        .to_string_lossy()
        .strip_prefix("/dev/pts/")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{pid}'s stdin is {}", target.display()))
}

/// The stdout and stderr pipes of a process.
fn output_pipes(pid: i32) -> BTreeSet<String> {
    ["1", "2"]
        .iter()
        .map(|fd| {
            let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .expect("fd")
                .to_string_lossy()
                .into_owned();
            assert!(t.starts_with("pipe:["), "{pid}'s fd {fd} is {t}");
            t
        })
        .collect()
}

/// `user`'s live workers (children of the broker).
fn workers_of(stoa: &Instance, user: &str) -> Vec<i32> {
    let uid = uid_of(user).to_string();
    children_of(stoa.broker_pid())
        .into_iter()
        .filter(|p| cmdline(*p).iter().any(|a| a == "__worker"))
        .filter(|p| {
            status_field(*p, "Uid").is_some_and(|u| u.split_whitespace().next() == Some(&uid))
        })
        .filter(|p| alive(*p))
        .collect()
}

fn worker_of(stoa: &Instance, user: &str) -> i32 {
    let mut workers = Vec::new();
    wait_until(&format!("{user}'s worker"), Duration::from_secs(10), || {
        workers = workers_of(stoa, user);
        workers.len() == 1
    });
    workers[0]
}

/// 2. The front holds no PTY and no pipe of anyone's; each user's are in their own worker,
///    which runs as them, unprivileged, and holds nothing of the other's.
fn fds_by_user() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = fakes.start();
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let (_, alice_shell) = open_terminal(&stoa, &alice, json!(["sh"]));
    let (_, bob_shell) = open_terminal(&stoa, &bob, json!(["sh"]));
    let (_, alice_task) = task(&stoa, &alice, ALICE, "HANG");
    let (_, bob_task) = task(&stoa, &bob, BOB, "HANG");
    wait_running(&stoa, &alice, &alice_task);
    wait_running(&stoa, &bob, &bob_task);
    let alice_pipes = output_pipes(one_process(ALICE, &["sleep", "3600"]));
    let bob_pipes = output_pipes(one_process(BOB, &["sleep", "3600"]));
    assert_eq!((alice_pipes.len(), bob_pipes.len()), (2, 2));
    let (alice_pts, bob_pts) = (pts_index(alice_shell), pts_index(bob_shell));

    let front = stoa.daemon_pid().expect("the front");
    let front_fds = fd_links(front);
    let held: Vec<&(String, String)> = front_fds
        .iter()
        .filter(|(_, t)| {
            is_ptmx(t)
                || t.starts_with("/dev/pts/")
                || alice_pipes.contains(t)
                || bob_pipes.contains(t)
        })
        .collect();
    assert!(held.is_empty(), "the front holds users' fds: {held:?}");

    let mut figures = Vec::new();
    for (user, own_pts, own_pipes, other_pts, other_pipes) in [
        (ALICE, alice_pts, &alice_pipes, bob_pts, &bob_pipes),
        (BOB, bob_pts, &bob_pipes, alice_pts, &alice_pipes),
    ] {
        let worker = worker_of(&stoa, user);
        let uid = uid_of(user).to_string();
        let ids = status_field(worker, "Uid").unwrap_or_default();
        assert!(
            ids.split_whitespace().all(|u| u == uid),
            "{user}'s worker runs as {ids}"
        );
        assert_eq!(status_field(worker, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(
            status_field(worker, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        let masters = master_indexes(worker);
        assert!(!masters.is_empty(), "{user}'s worker holds no pty master");
        if masters.iter().all(Option::is_some) {
            assert!(
                masters.contains(&Some(own_pts)),
                "{user}'s worker lacks its pty {own_pts}: {masters:?}"
            );
            assert!(
                !masters.contains(&Some(other_pts)),
                "{user}'s worker holds the other user's pty {other_pts}"
            );
        }
        let pipes = pipe_inodes(worker);
        assert!(
            own_pipes.is_subset(&pipes),
            "{user}'s worker lacks its agent's pipes {own_pipes:?}: {pipes:?}"
        );
        assert!(
            pipes.is_disjoint(other_pipes),
            "{user}'s worker holds the other user's pipes"
        );
        figures.push(format!(
            "{user}'s worker {} fds ({} pty masters, {} pipes)",
            fd_count(worker),
            masters.len(),
            pipes.len()
        ));
    }
    eprintln!(
        "fds: the front holds {} fds, none a pty or a user's pipe; {}",
        front_fds.len(),
        figures.join("; ")
    );
    Ok(())
}

/// Numbered lines (`n-<k>`, CRLF) in order with none missing or repeated; the last,
/// partial line is ignored. `Err`: where the sequence broke.
fn numbered(text: &str) -> Result<(u64, u64), String> {
    let mut lines: Vec<&str> = text.split("\r\n").collect();
    lines.pop();
    let mut range: Option<(u64, u64)> = None;
    for line in lines {
        let n: u64 = line
            .strip_prefix("n-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected line {line:?}"))?;
        range = match range {
            None => Some((n, n)),
            Some((first, last)) if n == last + 1 => Some((first, n)),
            Some((_, last)) => return Err(format!("n-{last} was followed by n-{n}")),
        };
    }
    range.ok_or_else(|| "no complete line".into())
}

/// 3. Alice's worker killed: the broker starts another at once (her work is live), which
///    takes her terminal and task back; her viewer resumes where it was; bob sees nothing.
fn killed_worker() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = fakes.start();
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let (counter, shell) = open_terminal(
        &stoa,
        &alice,
        json!([
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo n-$i; sleep 0.02; done"
        ]),
    );
    let (bob_term, _) = open_terminal(&stoa, &bob, json!(["sh"]));
    let (session, alice_task) = task(&stoa, &alice, ALICE, "SLOW");
    let mut viewer = connect(&stoa, &counter, &alice);
    viewer.hello(0, false);
    let mut bob_view = connect(&stoa, &bob_term, &bob);
    bob_view.hello(FROM_NOW, true);
    bob_view.type_text("echo bob-$((1 + 1))-before\n");
    bob_view.wait_for("bob-2-before", Duration::from_secs(10));
    viewer.wait_for("n-50\r\n", Duration::from_secs(15));
    wait_until("the task's first messages", Duration::from_secs(10), || {
        message_kinds(&stoa, &alice, &session).len() >= 2
    });
    assert_eq!(task_status(&stoa, &alice, &alice_task), "running");

    let old = worker_of(&stoa, ALICE);
    let bob_worker = worker_of(&stoa, BOB);
    run("kill", &["-KILL", &old.to_string()]);
    let killed = Instant::now();
    // No request for alice from here: the broker starts her worker by itself.
    let mut new = None;
    wait_until(
        "a new worker for alice, unasked",
        Duration::from_secs(10),
        || {
            viewer.next(Duration::from_millis(10));
            bob_view.next(Duration::from_millis(10));
            new = workers_of(&stoa, ALICE).into_iter().find(|p| *p != old);
            new.is_some()
        },
    );
    let restarted_in = killed.elapsed();
    let new = new.unwrap();
    assert!(alive(shell), "alice's shell died with her worker");
    assert_eq!(workers_of(&stoa, BOB), [bob_worker], "bob's worker changed");
    // Her viewer's connection was to the worker that died.
    wait_until(
        "alice's viewer to be cut off",
        Duration::from_secs(10),
        || {
            viewer.next(Duration::from_millis(50));
            viewer.closed
        },
    );
    let before = viewer.output.clone();
    let resume = viewer.offset;
    let (status, info) = stoa.request("GET", &format!("/terminals/{counter}"), Some(&alice), None);
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (info["pid"].as_i64(), info["running"].as_bool()),
        (Some(shell as i64), Some(true)),
        "{info}"
    );
    let mut again = connect(&stoa, &counter, &alice);
    let (oldest, current) = again.hello(resume, false);
    let lines_before = viewer.text().matches("\r\n").count();
    let deadline = Instant::now() + Duration::from_secs(15);
    while again.text().matches("\r\n").count() < 100 && Instant::now() < deadline {
        again.next(Duration::from_millis(100));
    }
    assert!(alive(shell));

    // Bob: the same connection all along, and it still echoes.
    bob_view.type_text("echo bob-$((2 + 2))-after\n");
    bob_view.wait_for("bob-4-after", Duration::from_secs(10));
    assert!(
        !bob_view.closed && !bob_view.close_frame,
        "bob's viewer was disconnected"
    );

    // Alice's task was taken over and finished, every message recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = task_status(&stoa, &alice, &alice_task);
        if ["completed", "failed", "stopped"].contains(&s.as_str()) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, "completed");
    assert_eq!(
        message_kinds(&stoa, &alice, &session),
        [
            "session_started",
            "tool_use",
            "tool_result",
            "assistant_text",
            "result"
        ]
    );
    assert_eq!(
        workers_of(&stoa, ALICE),
        [new],
        "alice's worker restarted again"
    );

    // Her output across both connections: contiguous, nothing lost or repeated.
    let mut joined = before;
    joined.extend_from_slice(&again.output);
    let lines = numbered(&String::from_utf8_lossy(&joined));
    eprintln!(
        "killed worker: replaced in {restarted_in:?} (pid {old} -> {new}); viewer resumed at {resume} \
         (WELCOME oldest {oldest}, current {current}); {lines_before} lines before, {} after; \
         snapshots {}, offset jumps {:?}; lines {lines:?}",
        again.text().matches("\r\n").count(),
        again.snapshots,
        again.jumps
    );
    assert!(
        oldest <= resume && resume <= current,
        "the resumed offset {resume} is outside what the new worker keeps ({oldest}..{current})"
    );
    assert_eq!(again.snapshots, 0, "the resumed viewer got a SNAPSHOT");
    assert!(again.jumps.is_empty(), "offsets jumped: {:?}", again.jumps);
    let (first, last) = lines.map_err(|e| format!("output across the restart: {e}"))?;
    assert_eq!(first, 1);
    assert!(last >= 150, "only {last} lines");
    Ok(())
}

// ---- memory accounting -----------------------------------------------------------------

/// The directory of `pid`'s memory cgroup and the file with its usage: v1's
/// `memory.usage_in_bytes` or v2's `memory.current`.
fn memory_cgroup(pid: i32) -> Option<(PathBuf, &'static str)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // (fs type, super options, mount root, mount point)
    let mounts: Vec<(String, String, String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some((
                right.first()?.to_string(),
                right.get(2)?.to_string(),
                left.get(3)?.to_string(),
                left.get(4)?.to_string(),
            ))
        })
        .collect();
    let under = |root: &str, point: &str, path: &str| -> PathBuf {
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .trim_start_matches('/');
        PathBuf::from(point).join(rel)
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let (_, _, root, point) = mounts.iter().find(|(fs, opts, _, _)| {
                fs == "cgroup" && opts.split(',').any(|o| o == "memory")
            })?;
            return Some((under(root, point, path), "memory.usage_in_bytes"));
        }
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let (_, _, root, point) = mounts.iter().find(|(fs, _, _, _)| fs == "cgroup2")?;
    let dir = under(root, point, path);
    dir.join("memory.current")
        .exists()
        .then_some((dir, "memory.current"))
}

fn usage(cgroup: &(PathBuf, &'static str)) -> u64 {
    std::fs::read_to_string(cgroup.0.join(cgroup.1))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {} in {}", cgroup.1, cgroup.0.display()))
}

/// The cgroup's pages as `memory.stat` counts them (v1 `rss` + `cache`, v2 `anon` +
/// `file`): exact page counts, unlike the usage counter, which includes what each CPU
/// charged ahead (up to 64 pages per CPU).
fn page_bytes(cgroup: &(PathBuf, &'static str)) -> u64 {
    let keys: [&str; 2] = if cgroup.1 == "memory.current" {
        ["anon", "file"]
    } else {
        ["rss", "cache"]
    };
    let stat = std::fs::read_to_string(cgroup.0.join("memory.stat")).unwrap_or_default();
    stat.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| keys.contains(k))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 4. A flood held back by alice's stalled viewer fills a ring in alice's worker: her
///    cgroup pays for it, not the front, not bob.
fn flood_accounting() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    // Both workers running, and the front's paths for a terminal socket warmed up.
    let (quiet, _) = open_terminal(&stoa, &alice, json!(["sh"]));
    let (bob_term, _) = open_terminal(&stoa, &bob, json!(["sh"]));
    answers(&stoa, &quiet, &alice, "warm");
    answers(&stoa, &bob_term, &bob, "warm");
    let front = stoa.daemon_pid().expect("the front");
    let (alice_worker, bob_worker) = (worker_of(&stoa, ALICE), worker_of(&stoa, BOB));
    let (Some(alice_cg), Some(bob_cg)) = (memory_cgroup(alice_worker), memory_cgroup(bob_worker))
    else {
        eprintln!("SKIPPED: no memory cgroup controller for the workers");
        return Ok(());
    };
    for (user, cg) in [(ALICE, &alice_cg), (BOB, &bob_cg)] {
        let own = format!("/user-{}/", uid_of(user));
        if !cg.0.to_string_lossy().contains(&own) {
            eprintln!(
                "SKIPPED: {user}'s worker is in no memory cgroup of the user's ({})",
                cg.0.display()
            );
            return Ok(());
        }
    }
    // Past the kernel's periodic flush of the memory statistics (every 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let (alice_start, bob_start, front_start) = (usage(&alice_cg), usage(&bob_cg), rss_kib(front));
    let bob_pages_start = page_bytes(&bob_cg);

    let (flood, _) = open_terminal(&stoa, &alice, json!(["sh", "-c", "exec yes"]));
    let mut stalled = connect(&stoa, &flood, &alice);
    stalled.acking = false;
    stalled.hello(FROM_NOW, true);
    stalled.next(Duration::from_millis(300));
    let mut front_max = rss_kib(front);
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        front_max = front_max.max(rss_kib(front));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (alice_end, bob_end, bob_pages_end) =
        (usage(&alice_cg), usage(&bob_cg), page_bytes(&bob_cg));
    front_max = front_max.max(rss_kib(front));
    let alice_rise = alice_end as i64 - alice_start as i64;
    let bob_rise = bob_end as i64 - bob_start as i64;
    let bob_pages_rise = bob_pages_end as i64 - bob_pages_start as i64;
    let front_rise = front_max as i64 - front_start as i64;
    eprintln!(
        "flood: alice's worker cgroup {alice_start} -> {alice_end} bytes ({:+} KiB); bob's {:+} KiB \
         ({:+} KiB of pages); front RSS {front_start} -> max {front_max} KiB ({front_rise:+} KiB)",
        alice_rise / 1024,
        bob_rise / 1024,
        bob_pages_rise / 1024,
    );
    assert!(
        alice_rise >= 1 << 20,
        "alice's cgroup rose only {alice_rise} bytes"
    );
    assert!(front_rise < 1024, "the front's RSS grew {front_rise} KiB");
    // Bob's usage counter may move by what a CPU charged ahead for a page of his own (64
    // pages each): his pages are the exact measure.
    assert!(
        bob_pages_rise <= 256 << 10,
        "bob's cgroup gained {bob_pages_rise} bytes of pages"
    );
    drop(stalled);
    assert_eq!(
        stoa.request("DELETE", &format!("/terminals/{flood}"), Some(&alice), None)
            .0,
        204
    );
    Ok(())
}

/// Whether `needle` is anywhere in the writable memory of `pid` (read as root through
/// `/proc/PID/mem`).
fn memory_contains(pid: i32, needle: &[u8]) -> bool {
    use std::io::{Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

fn admin_token_stays_in_the_front() -> Result<(), Failed> {
    let stoa = Instance::start();
    // The admin runs, lists and opens a terminal as alice: all served by alice's worker.
    let reply = stoa.sh(ALICE, "id -un");
    assert_eq!(reply["stdout"].as_str().unwrap().trim(), ALICE);
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(&stoa.token.clone()),
        Some(&json!({ "cols": 80, "rows": 24, "unix_user": ALICE, "command": ["sh"] })),
    );
    assert_eq!(status, 201, "{t}");
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let mut v = connect(&stoa, &id, &stoa.token);
    v.hello(FROM_NOW, true);
    v.type_text("echo ADMIN-IN-$((3*4))\n");
    v.wait_for("ADMIN-IN-12", Duration::from_secs(10));
    let (status, _) = stoa.request("GET", "/terminals", Some(&stoa.token.clone()), None);
    assert_eq!(status, 200);
    let worker = stoa.worker_pid(ALICE).expect("alice's worker");
    assert!(
        !memory_contains(worker, stoa.token.as_bytes()),
        "the admin token is in alice's worker's memory"
    );
    // The check can fail: the front, which verified it, does hold it.
    let front = stoa.daemon_pid().expect("the front");
    assert!(memory_contains(front, stoa.token.as_bytes()));
    Ok(())
}
