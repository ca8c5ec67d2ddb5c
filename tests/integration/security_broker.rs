//! The red-team findings against the broker, each tried as the attacker did: a local user
//! stopping the spawn child, a compromised daemon naming a reaped handle after its pid was
//! reused, a refused user flooding the audit log, an admin token asking about root.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use stoa::wire::{BrokerMessage, Handle, ReplyBody, Request, RequestBody, Signal};
use stoa_executor::{codec, sys};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    ("a_users_stop_loop_cannot_freeze_the_broker", freeze),
    (
        "hostile_daemon_cannot_signal_or_adopt_a_reaped_handle_after_pid_reuse",
        stale_handle,
    ),
    (
        "refused_spawns_cannot_fill_the_disk_through_the_audit_log",
        audit_flood,
    ),
    ("directory_checks_obey_the_policy", checkdir_policy),
    (
        "health_reports_no_cpu_weight_that_runs_do_not_get",
        cpu_report,
    ),
    (
        "a_worktree_swapped_after_its_check_runs_nothing",
        worktree_swap,
    ),
    (
        "failed_authentications_are_audited_with_the_peer",
        auth_audit,
    ),
];

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

fn post_exec(agent: &ureq::Agent, stoa_port: u16, token: &str, body: &Value) -> (u16, Value) {
    match agent
        .post(format!("http://127.0.0.1:{stoa_port}/exec"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(body)
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_json().unwrap_or(Value::Null),
        ),
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

/// A working directory of alice's that takes her spawn child milliseconds to open: a chain
/// of 39 symlinks, each through 800 `a/..` steps. A user may make their own paths
/// slow; it widens the window between the child's identity change and its exec, so her
/// stop loop catches it there every time, as it does by chance with any path.
fn slow_path() -> String {
    let home = format!("/home/{ALICE}/slow");
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(format!("{home}/a")).unwrap();
    // 800 steps: a symlink holds at most 4095 bytes.
    let steps = "a/../".repeat(800);
    for i in 0..39 {
        let next = if i == 38 {
            "a".to_string()
        } else {
            format!("l{}", i + 1)
        };
        std::os::unix::fs::symlink(format!("{steps}{next}"), format!("{home}/l{i}")).unwrap();
    }
    run("chown", &["-R", "-h", &format!("{ALICE}:"), &home]);
    format!("{home}/l0")
}

/// A `kill(-1, SIGSTOP)` loop: compiled C if `cc` works, else perl.
fn stopper_program(dir: &std::path::Path) -> Vec<String> {
    let src = dir.join("stopper.c");
    let bin = dir.join("stopper");
    let compiled = std::fs::write(
        &src,
        "#include <signal.h>\nint main(void) { for (;;) kill(-1, SIGSTOP); }\n",
    )
    .is_ok()
        && Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
    if compiled {
        vec![bin.display().to_string()]
    } else {
        ["perl", "-e", "while (1) { kill 'STOP', -1 }"]
            .map(String::from)
            .to_vec()
    }
}

/// Finding 1: alice's `kill(STOP, -1)` loop stops her spawn child after its identity
/// change. The broker used to sit in the kernel (vfork) until the child exec'd; now it
/// polls the child's report, kills it at its deadline, and serves everyone meanwhile.
fn freeze() -> Result<(), Failed> {
    let stoa = Instance::start();
    // One loop (two would stop each other: both are alice's), in C where a compiler is
    // there: the faster it sends, the likelier a spawn child is caught between its
    // identity change and its exec.
    let stopper = stopper_program(&stoa.dir);
    let slow = slow_path();
    let mut stoppers = (0..1)
        .map(|_| {
            Command::new("runuser")
                .args(["-u", ALICE, "--"])
                .args(&stopper)
                .stdin(Stdio::null())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let port = stoa.port;
    let token = stoa.token.clone();
    let done = Arc::new(AtomicBool::new(false));
    // Bob's spawns and /health, throughout: every one must be answered.
    let served = {
        let (done, token) = (done.clone(), token.clone());
        std::thread::spawn(move || {
            let agent = agent(Duration::from_secs(5));
            let mut answers = Vec::new();
            let mut slowest = Duration::ZERO;
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                let (status, reply) = post_exec(
                    &agent,
                    port,
                    &token,
                    &json!({ "unix_user": BOB, "argv": ["id", "-un"] }),
                );
                let health = agent
                    .get(format!("http://127.0.0.1:{port}/health"))
                    .call()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                slowest = slowest.max(t.elapsed());
                answers.push((
                    status,
                    reply["stdout"].as_str().unwrap_or("").to_string(),
                    health,
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            (answers, slowest)
        })
    };
    // Alice's own spawns, in waves of three until one was caught before its exec (the
    // loops race the child; one that exec'd first runs, or stops as her own process).
    let mut alice: Vec<(u16, Value)> = Vec::new();
    for _ in 0..8 {
        let wave: Vec<_> = (0..3)
            .map(|_| {
                let (token, slow) = (token.clone(), slow.clone());
                std::thread::spawn(move || {
                    post_exec(
                        &agent(Duration::from_secs(13)),
                        port,
                        &token,
                        &json!({ "unix_user": ALICE, "argv": ["true"], "cwd": slow }),
                    )
                })
            })
            .collect();
        alice.extend(wave.into_iter().map(|t| t.join().unwrap()));
        if alice.iter().any(|(s, _)| *s == 500) {
            break;
        }
    }
    done.store(true, Ordering::SeqCst);
    let (answers, slowest) = served.join().unwrap();
    for stopper in &mut stoppers {
        let _ = stopper.kill();
        let _ = stopper.wait();
    }
    run("pkill", &["-KILL", "-u", ALICE]);
    eprintln!(
        "freeze: {} of bob's spawns and /health checks answered while alice's spawns were stopped; slowest pair {slowest:?}",
        answers.len()
    );
    assert!(answers.len() >= 20, "{answers:?} {alice:?}");
    let bob_ok = format!("{BOB}\n");
    assert!(
        answers
            .iter()
            .all(|(s, out, h)| *s == 200 && *out == bob_ok && *h == 200),
        "{answers:?}\n{}",
        stoa.log()
    );
    // Each of alice's spawns was stopped before its exec (answered as failed at the
    // deadline), or reached exec first and ran, or runs on as her own stopped process
    // (her request then waits on it: her business, nobody else's).
    let failed_at_deadline = |reply: &Value| {
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("did not start within")
    };
    let waited = |reply: &Value| reply["error"].as_str().unwrap_or("").contains("timeout");
    assert!(
        alice.iter().all(|(s, r)| *s == 200
            || (*s == 500 && failed_at_deadline(r))
            || (*s == 0 && waited(r))),
        "{alice:?}"
    );
    assert!(
        alice.iter().any(|(_, r)| failed_at_deadline(r)),
        "{alice:?}"
    );
    Ok(())
}

/// Reads broker messages from a stolen link until the reply to `id`.
fn reply_to(link: &mut UnixStream, id: u64) -> std::io::Result<ReplyBody> {
    loop {
        let mut header = [0u8; 4];
        link.read_exact(&mut header)?;
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        link.read_exact(&mut payload)?;
        match codec::decode::<BrokerMessage>(&payload).map_err(std::io::Error::other)? {
            BrokerMessage::Reply { id: got, body } if got == id => return Ok(body),
            _ => continue,
        }
    }
}

fn ask(link: &mut UnixStream, id: u64, body: RequestBody) -> std::io::Result<ReplyBody> {
    let frame = codec::encode(&Request {
        id,
        request_id: None,
        body,
    })
    .map_err(std::io::Error::other)?;
    link.write_all(&frame)?;
    reply_to(link, id)
}

/// Starts a root process that gets exactly `pid` (through `ns_last_pid`) and leads its own
/// process group, as a root daemon reusing the number would.
fn root_process_at(pid: i32) -> Option<std::process::Child> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut child = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .ok()?;
        if child.id() as i32 == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// Findings 2 and 6: a compromised daemon (here: its link taken with `pidfd_getfd`, the
/// daemon stopped) names a handle whose process was reaped, after a root process took the
/// pid over. Neither `Kill` nor `Adopt` reaches anything.
fn stale_handle() -> Result<(), Failed> {
    let stoa = Instance::start();
    let sleeper = {
        let (port, token) = (stoa.port, stoa.token.clone());
        std::thread::spawn(move || {
            post_exec(
                &agent(Duration::from_secs(60)),
                port,
                &token,
                &json!({ "unix_user": BOB, "argv": ["sleep", "59"] }),
            )
        });
        let mut pids = Vec::new();
        wait_until("bob's sleep", Duration::from_secs(10), || {
            pids = find_processes(BOB, &["sleep", "59"]);
            !pids.is_empty()
        });
        pids[0]
    };
    let daemon = stoa.daemon_pid().expect("daemon");
    run("kill", &["-STOP", &daemon.to_string()]);
    // Every thread stopped: none of them may still be reading the link.
    wait_until("the daemon to stop", Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{daemon}/task"))
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
    let mut link = UnixStream::from(sys::pidfd_getfd(daemon, 3)?);
    let failed = |e: std::io::Error| -> Failed { format!("{e}\n{}", stoa.log()).into() };
    let ReplyBody::Handles { list, .. } = ask(
        &mut link,
        1_000_001,
        RequestBody::ListHandles { after: None },
    )
    .map_err(failed)?
    else {
        panic!("ListHandles")
    };
    let handle: Handle = list
        .iter()
        .find(|h| h.pid == sleeper)
        .map(|h| h.handle)
        .expect("bob's handle");
    // The process ends; the broker reaps it. Its handle stays (the daemon has not seen the
    // exit, so it has not released it).
    run("kill", &["-KILL", &sleeper.to_string()]);
    wait_until(
        "the broker to reap bob's sleep",
        Duration::from_secs(5),
        || !std::path::Path::new(&format!("/proc/{sleeper}")).exists(),
    );
    let Some(mut root) = root_process_at(sleeper) else {
        run("kill", &["-KILL", &daemon.to_string()]);
        return Err("could not place a root process at the reused pid".into());
    };
    let killed = ask(
        &mut link,
        1_000_002,
        RequestBody::Kill {
            handle,
            signal: Signal::Kill,
        },
    )
    .map_err(failed)?;
    let adopted = ask(&mut link, 1_000_003, RequestBody::Adopt { handle }).map_err(failed)?;
    std::thread::sleep(Duration::from_millis(200));
    let root_alive = root.try_wait()?.is_none();
    let _ = root.kill();
    let _ = root.wait();
    run("kill", &["-KILL", &daemon.to_string()]);
    stoa.wait_new_daemon(daemon);
    assert!(root_alive, "the root process at the reused pid was killed");
    for (what, reply) in [("Kill", killed), ("Adopt", adopted)] {
        match reply {
            ReplyBody::Error(e) => assert!(e.message.contains("has exited"), "{what}: {e:?}"),
            other => panic!("{what} of a reaped handle answered {other:?}"),
        }
    }
    assert!(stoa.log().contains("daemon started"));
    let _ = link.as_fd();
    Ok(())
}

/// Finding 3: a user the policy refuses sends thousands of spawns with 64 KiB of argv.
/// Each refusal is one bounded audit line (argv summarised), and past the principal's
/// refusal burst the requests are answered 429 without a line each.
fn audit_flood() -> Result<(), Failed> {
    let stoa = Instance::start();
    let carol = stoa.api_user("carol", CAROL);
    let audit = stoa.dir.join("broker/audit.jsonl");
    let before = std::fs::metadata(&audit)?.len();
    let argv: Vec<String> = std::iter::once("sh".to_string())
        .chain((0..15).map(|i| format!("{i}{}", "A".repeat(4095))))
        .collect();
    let body = json!({ "unix_user": CAROL, "argv": argv });
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (port, carol, body, statuses) =
                (stoa.port, carol.clone(), body.clone(), statuses.clone());
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(30));
                for _ in 0..300 {
                    let (s, _) = post_exec(&agent, port, &carol, &body);
                    statuses.lock().unwrap().push(s);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    let grown = std::fs::metadata(&audit)?.len() - before;
    eprintln!(
        "audit flood: 1200 refused spawns of 64 KiB each grew the audit log by {grown} bytes"
    );
    assert!(
        statuses.iter().all(|s| *s == 403 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.iter().filter(|s| **s == 429).count() > 900);
    assert!(grown < 256 * 1024, "audit grew {grown} bytes");
    let text = std::fs::read_to_string(&audit)?;
    assert!(
        !text.contains(&"A".repeat(100)),
        "argv copied into the audit log"
    );
    // Everyone else is still served, and carol's refusals are on record with their rule.
    assert_eq!(stoa.sh(ALICE, "echo ok")["stdout"], "ok\n");
    assert!(text
        .lines()
        .any(|l| l.contains("\"refused\"") && l.contains("allow-group")));
    Ok(())
}

/// Finding 10 (CheckDir): the admin token asking about root's or the service user's
/// directories is refused by the policy before anything is looked at.
fn checkdir_policy() -> Result<(), Failed> {
    let stoa = Instance::start();
    for (user, rule) in [("root", "root"), (SERVICE, "service-user")] {
        let (status, reply) = stoa.request(
            "POST",
            "/sessions",
            Some(&stoa.token.clone()),
            Some(&json!({ "agentic_tool": "claude-code", "worktree": "/root", "unix_user": user })),
        );
        assert_eq!(status, 403, "{user}: {reply}");
        assert!(
            reply["error"].as_str().unwrap_or("").contains(rule),
            "{user}: {reply}"
        );
    }
    // Alice's answer about a root-only path is the same whether it exists or not.
    let mut answers = Vec::new();
    for path in ["/root/.bashrc-does-not-exist", "/root"] {
        let (status, reply) = stoa.request(
            "POST",
            "/sessions",
            Some(&stoa.token.clone()),
            Some(&json!({ "agentic_tool": "claude-code", "worktree": format!("{path}/x"), "unix_user": ALICE })),
        );
        assert_eq!(status, 400, "{reply}");
        answers.push(reply["error"].as_str().unwrap_or("").replace(path, "P"));
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0].contains("Permission denied"), "{answers:?}");
    Ok(())
}

/// Finding 10 (cgroup v1): at the default weight a run is not moved into the cpu
/// hierarchy (a migration saved), so `/health` must not claim a weight for it.
fn cpu_report() -> Result<(), Failed> {
    let stoa = Instance::start();
    let (_, health) = stoa.request("GET", "/health", Some(&stoa.token.clone()), None);
    let limits = &health["limits"];
    let cgroups = limits["cgroups"].as_str().unwrap_or_default();
    if !cgroups.starts_with("v1") {
        eprintln!("SKIPPED: not a cgroup v1 machine ({cgroups})");
        return Ok(());
    }
    let cpu = limits["cgroup_cpu"].as_str().unwrap_or_default();
    assert!(cpu.starts_with("not applied"), "{health}");
    // And indeed: a run's cpu cgroup is the broker's.
    let broker_cpu = |pid: i32| -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()?
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|n| n == "cpu"))
            })
            .map(str::to_string)
    };
    let run = stoa.sh(ALICE, "cat /proc/self/cgroup");
    let own = broker_cpu(stoa.broker_pid());
    let cpu_line = run["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|n| n == "cpu"))
        })
        .map(str::to_string);
    assert_eq!(cpu_line, own, "{run}");
    Ok(())
}

/// Finding 8: alice's session worktree sits in a directory bob owns. After the session was
/// created (and the worktree checked), bob moves alice's directory away and puts his own
/// in its place, with a planted file. Nothing of alice's may run there: the spawn child
/// opens the path as alice and refuses a directory that is not the one checked.
fn worktree_swap() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice-wt", ALICE);
    let parent = format!("/tmp/stoa-t-swap-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir(&parent)?;
    run("chown", &[&format!("{BOB}:"), &parent]);
    run("chmod", &["0755", &parent]);
    let wt = format!("{parent}/wt");
    std::fs::create_dir(&wt)?;
    run("chown", &[&format!("{ALICE}:"), &wt]);
    let (status, session) = stoa.request(
        "POST",
        "/sessions",
        Some(&alice),
        Some(&json!({ "agentic_tool": "claude-code", "worktree": wt })),
    );
    assert_eq!(status, 201, "{session}");
    let session = session["session_id"].as_str().unwrap().to_string();
    let open = |stoa: &Instance| {
        stoa.request(
            "POST",
            "/terminals",
            Some(&alice),
            Some(&json!({ "session_id": session, "command": ["sh", "-c", "pwd > .ran-here"], "cols": 80, "rows": 24 })),
        )
    };
    // Before the swap it runs, in alice's directory.
    let (status, t) = open(&stoa);
    assert_eq!(status, 201, "{t}");
    wait_until(
        "the run in alice's worktree",
        Duration::from_secs(10),
        || std::path::Path::new(&format!("{wt}/.ran-here")).exists(),
    );
    // Bob swaps it: alice's directory moved aside, his own (open to all) in its place.
    let out = Command::new("runuser")
        .args(["-u", BOB, "--", "sh", "-c"])
        .arg(format!(
            "mv {wt} {parent}/moved && mkdir -m 0777 {wt} && echo planted > {wt}/planted"
        ))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, reply) = open(&stoa);
    let ran = std::path::Path::new(&format!("{wt}/.ran-here")).exists();
    let _ = std::fs::remove_dir_all(&parent);
    assert!(!ran, "alice's run ran in bob's directory");
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["rule"], "worktree-replaced", "{reply}");
    Ok(())
}

/// Finding 10 (failed authentications were not logged): each is an `auth_failed` line in
/// the broker's audit log, with the client address the front reported.
fn auth_audit() -> Result<(), Failed> {
    let stoa = Instance::start();
    for _ in 0..3 {
        let (status, _) = stoa.request("GET", "/users/me", Some("stoa_not-a-real-token"), None);
        assert_eq!(status, 401);
    }
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    let failed: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "auth_failed")
        .collect();
    assert_eq!(failed.len(), 3, "{audit}");
    assert!(
        failed.iter().all(|r| r["peer"] == "127.0.0.1"),
        "{failed:?}"
    );
    assert!(
        !audit.contains("not-a-real-token"),
        "a credential in the audit log"
    );
    Ok(())
}
