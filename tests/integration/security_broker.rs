//! The red-team findings against the broker, each tried as the attacker did: a local user
//! stopping the spawn child, a compromised daemon naming a reaped handle after its pid was
//! reused, a refused user flooding the audit log, an admin token asking about root.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use stoa::wire::{BrokerMessage, ExitStatus, Handle, ReplyBody, Request, RequestBody, Signal};
use stoa_executor::{codec, sys};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    ("a_users_stop_loop_cannot_freeze_the_broker", freeze),
    (
        "hostile_daemon_cannot_signal_a_reaped_handle_after_pid_reuse",
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

/// A stop loop: compiled C if `cc` works, else perl. `spare` `None`: `kill(-1, SIGSTOP)`,
/// every process of the user's. `Some(pid)`: every process of the user's but `pid` (and
/// itself), found by scanning /proc (the kernel refuses the others' with EPERM).
fn stopper_program(dir: &std::path::Path, spare: Option<i32>) -> Vec<String> {
    let name = if spare.is_some() { "sparing" } else { "all" };
    let src = dir.join(format!("stopper-{name}.c"));
    let bin = dir.join(format!("stopper-{name}"));
    let code = match spare {
        None => "#include <signal.h>\nint main(void) { for (;;) kill(-1, SIGSTOP); }\n",
        Some(_) => concat!(
            "#include <dirent.h>\n#include <signal.h>\n#include <stdlib.h>\n#include <unistd.h>\n",
            "int main(int argc, char **argv) {\n",
            "  int spare = atoi(argv[1]), me = getpid();\n",
            "  for (;;) {\n",
            "    DIR *d = opendir(\"/proc\"); struct dirent *e;\n",
            "    if (!d) continue;\n",
            "    while ((e = readdir(d))) { int p = atoi(e->d_name);\n",
            "      if (p > 1 && p != spare && p != me) kill(p, SIGSTOP); }\n",
            "    closedir(d);\n",
            "  }\n",
            "}\n"
        ),
    };
    let compiled = std::fs::write(&src, code).is_ok()
        && Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
    let mut argv = if compiled {
        vec![bin.display().to_string()]
    } else {
        let script = match spare {
            None => "while (1) { kill 'STOP', -1 }",
            Some(_) => concat!(
                "my $spare = shift; while (1) { opendir(my $d, '/proc') or next; ",
                "for (readdir $d) { next unless /^\\d+$/; ",
                "next if $_ <= 1 || $_ == $spare || $_ == $$; kill 'STOP', $_ } closedir $d }"
            ),
        };
        vec!["perl".to_string(), "-e".to_string(), script.to_string()]
    };
    argv.extend(spare.map(|p| p.to_string()));
    argv
}

/// Starts one stop loop as alice (two would stop each other: both are hers).
fn start_stopper(argv: &[String]) -> std::io::Result<std::process::Child> {
    Command::new("runuser")
        .args(["-u", ALICE, "--"])
        .args(argv)
        .stdin(Stdio::null())
        .spawn()
}

/// Alice's spawns, in waves of three (each with `timeout`), until `enough` or `waves`.
fn alice_waves(
    port: u16,
    token: &str,
    slow: &str,
    waves: usize,
    timeout: Duration,
    enough: impl Fn(&[(u16, Value)]) -> bool,
) -> Vec<(u16, Value)> {
    let mut alice: Vec<(u16, Value)> = Vec::new();
    for _ in 0..waves {
        let wave: Vec<_> = (0..3)
            .map(|_| {
                let (token, slow) = (token.to_string(), slow.to_string());
                std::thread::spawn(move || {
                    post_exec(
                        &agent(timeout),
                        port,
                        &token,
                        &json!({ "unix_user": ALICE, "argv": ["true"], "cwd": slow }),
                    )
                })
            })
            .collect();
        alice.extend(wave.into_iter().map(|t| t.join().unwrap()));
        if enough(&alice) {
            break;
        }
    }
    alice
}

/// Finding 1: alice's `kill(STOP, -1)` loop stops her spawn child after its identity
/// change. The broker used to sit in the kernel (vfork) until the child exec'd; now it
/// polls the child's report, kills it at its deadline, and serves everyone meanwhile.
///
/// Her worker is one of her processes too: her `kill(-1)` loop stops it, and the child the
/// broker forks to start it, so her own requests fail (502: her worker did not answer, the
/// broker killed it at its Hello deadline) or time out. That is her business; bob and
/// `/health` are answered throughout. A loop that spares her worker catches her spawn
/// child between its identity change and its exec, as before: answered as failed at the
/// broker's deadline, everyone else served meanwhile.
fn freeze() -> Result<(), Failed> {
    let stoa = Instance::start();
    let slow = slow_path();
    // In C where a compiler is there: the faster it sends, the likelier a child is caught
    // between its identity change and its exec.
    let mut stopper = start_stopper(&stopper_program(&stoa.dir, None))?;
    std::thread::sleep(Duration::from_millis(300));
    let port = stoa.port;
    let token = stoa.token.clone();
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    // Bob's spawns and /health, throughout: every one must be answered.
    let served = {
        let (done, count, token) = (done.clone(), count.clone(), token.clone());
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
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            (answers, slowest)
        })
    };
    let failed_at_deadline = |reply: &Value| {
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("did not start within")
    };
    let waited = |reply: &Value| reply["error"].as_str().unwrap_or("").contains("timeout");
    let worker_unanswered = |reply: &Value| {
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("the worker of '{ALICE}' did not answer"))
    };

    // 1. Every process of hers stopped, her worker included. Seen stopped: a process of
    // hers the broker started (her worker, or the child starting it).
    let broker = stoa.broker_pid();
    let alice_uid = uid_of(ALICE).to_string();
    let worker_stopped = Arc::new(AtomicBool::new(false));
    let phase_one_done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stopped, done) = (worker_stopped.clone(), phase_one_done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) && !stopped.load(Ordering::SeqCst) {
                let seen = children_of(broker).into_iter().any(|p| {
                    status_field(p, "Uid")
                        .is_some_and(|u| u.split_whitespace().next() == Some(&alice_uid))
                        && state_and_ppid(p).is_some_and(|(s, _)| s == "T")
                });
                stopped.store(seen, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let everything = alice_waves(port, &token, &slow, 4, Duration::from_secs(13), |_| {
        worker_stopped.load(Ordering::SeqCst)
    });
    phase_one_done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let _ = stopper.kill();
    let _ = stopper.wait();
    run("pkill", &["-KILL", "-u", ALICE]);
    let phase_one = count.load(Ordering::SeqCst);

    // 2. Every process of hers stopped but her (running) worker.
    wait_until("alice's worker", Duration::from_secs(30), || {
        let (status, _) = post_exec(
            &agent(Duration::from_secs(10)),
            port,
            &token,
            &json!({ "unix_user": ALICE, "argv": ["true"] }),
        );
        status == 200
    });
    let worker = crate::sessions::worker_pid(&stoa, ALICE).expect("alice's worker");
    let mut stopper = start_stopper(&stopper_program(&stoa.dir, Some(worker)))?;
    std::thread::sleep(Duration::from_millis(300));
    let spared = alice_waves(port, &token, &slow, 8, Duration::from_secs(13), |a| {
        a.iter().any(|(s, _)| *s == 500)
    });
    done.store(true, Ordering::SeqCst);
    let (answers, slowest) = served.join().unwrap();
    let _ = stopper.kill();
    let _ = stopper.wait();
    let worker_spared = crate::sessions::worker_pid(&stoa, ALICE) == Some(worker);
    run("pkill", &["-KILL", "-u", ALICE]);
    let codes = |a: &[(u16, Value)]| a.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    eprintln!(
        "freeze: {} of bob's spawns and /health checks answered while alice's processes were stopped ({phase_one} while her worker was too); slowest pair {slowest:?}; alice's answers {:?} then {:?}",
        answers.len(),
        codes(&everything),
        codes(&spared)
    );
    assert!(answers.len() >= 20, "{answers:?} {everything:?} {spared:?}");
    let bob_ok = format!("{BOB}\n");
    assert!(
        answers
            .iter()
            .all(|(s, out, h)| *s == 200 && *out == bob_ok && *h == 200),
        "{answers:?}\n{}",
        stoa.log()
    );
    // 1: her worker (or the child starting it) was stopped by her loop; each of her requests
    // failed (her worker stopped before its Hello, killed by the broker at that deadline:
    // 502), timed out (it had said Hello, then stopped), was refused at the spawn deadline,
    // or ran.
    assert!(
        worker_stopped.load(Ordering::SeqCst),
        "no stopped worker of alice's seen: {everything:?}"
    );
    assert!(
        everything.iter().all(|(s, r)| *s == 200
            || (*s == 500 && failed_at_deadline(r))
            || (*s == 502 && worker_unanswered(r))
            || (*s == 0 && waited(r))),
        "{everything:?}"
    );
    // 2: each of her spawns was stopped before its exec (answered as failed at the
    // deadline), or reached exec first and ran, or runs on as her own stopped process
    // (her request then waits on it: her business, nobody else's).
    assert!(
        worker_spared,
        "alice's worker was replaced during the second loop"
    );
    assert!(
        spared.iter().all(|(s, r)| *s == 200
            || (*s == 500 && failed_at_deadline(r))
            || (*s == 0 && waited(r))),
        "{spared:?}"
    );
    assert!(
        spared.iter().any(|(_, r)| failed_at_deadline(r)),
        "{spared:?}"
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

/// Stops `pid` and waits until every one of its threads is stopped: none of them may still
/// be reading its broker link when the test takes it.
fn stop_all_threads(pid: i32) {
    run("kill", &["-STOP", &pid.to_string()]);
    wait_until("the process to stop", Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
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
}

/// A `sleep 59` of bob's through `POST /exec` (admin), its client kept open on a thread (an
/// exec ends when its client goes away); its pid.
fn bobs_sleep(stoa: &Instance) -> i32 {
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
}

/// Findings 2 and 6: a compromised process holding a broker link names a handle whose
/// process was reaped, after a root process took the pid over. Neither `Kill` nor `Adopt`
/// reaches anything.
///
/// Only a worker's link may name handles now, and only its own user's: the compromised
/// process is bob's worker (its link taken with `pidfd_getfd`, the worker stopped), the
/// handle bob's. Naming alice's handle on it is a protocol violation (link dropped, worker
/// restarted, alice's process untouched); so is `ListHandles` on the front's link.
fn stale_handle() -> Result<(), Failed> {
    let stoa = Instance::start();
    let sleeper = bobs_sleep(&stoa);
    // Alice's process is a terminal's: it outlives the requests, so the front's restart
    // below must leave it running.
    let (status, terminal) = stoa.request(
        "POST",
        "/terminals",
        Some(&stoa.token.clone()),
        Some(&json!({ "unix_user": ALICE, "cols": 80, "rows": 24, "command": ["sleep", "58"] })),
    );
    assert_eq!(status, 201, "{terminal}");
    let mut alices = Vec::new();
    wait_until("alice's sleep", Duration::from_secs(10), || {
        alices = find_processes(ALICE, &["sleep", "58"]);
        !alices.is_empty()
    });
    let alices = alices[0];
    let alice_handle = stoa
        .processes()
        .iter()
        .find(|p| p["unix_user"] == ALICE && p["running"] == true)
        .and_then(|p| p["handle"].as_u64())
        .map(Handle)
        .expect("alice's handle in GET /processes");
    let worker = crate::sessions::worker_pid(&stoa, BOB).expect("bob's worker");
    stop_all_threads(worker);
    let mut link = UnixStream::from(sys::pidfd_getfd(worker, 3)?);
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
    // Bob's worker's link lists bob's handles only.
    assert!(
        list.iter()
            .all(|h| h.unix_user == BOB && h.handle != alice_handle),
        "{list:?}"
    );
    let handle: Handle = list
        .iter()
        .find(|h| h.pid == sleeper)
        .map(|h| h.handle)
        .expect("bob's handle");
    // The process ends; the broker reaps it. Its handle stays (the worker has not seen the
    // exit, so it has not released it).
    run("kill", &["-KILL", &sleeper.to_string()]);
    wait_until(
        "the broker to reap bob's sleep",
        Duration::from_secs(5),
        || !std::path::Path::new(&format!("/proc/{sleeper}")).exists(),
    );
    let Some(mut root) = root_process_at(sleeper) else {
        run("kill", &["-KILL", &worker.to_string()]);
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
    assert!(root_alive, "the root process at the reused pid was killed");
    match killed {
        ReplyBody::Error(e) => assert!(e.message.contains("has exited"), "Kill: {e:?}"),
        other => panic!("Kill of a reaped handle answered {other:?}"),
    }
    // Adopting it gives back its fds (what it wrote may still be there) and its exit: the
    // pid, now another process's, is not touched.
    match adopted {
        ReplyBody::Adopted(info) => assert_eq!(info.exited, Some(ExitStatus::Signal(9))),
        other => panic!("Adopt of a reaped handle answered {other:?}"),
    }
    // Alice's live handle, named on bob's worker's link: the link is dropped, nothing
    // answered, nothing signalled.
    let other_user = ask(
        &mut link,
        1_000_004,
        RequestBody::Kill {
            handle: alice_handle,
            signal: Signal::Kill,
        },
    );
    assert!(
        other_user.is_err(),
        "Kill of alice's handle on bob's worker's link answered {other_user:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        alive(alices) && find_processes(ALICE, &["sleep", "58"]) == [alices],
        "alice's sleep was signalled through bob's worker's link"
    );
    // Bob's worker is replaced (he has live work: the reaped handle it never released).
    wait_until("bob's new worker", Duration::from_secs(20), || {
        crate::sessions::worker_pid(&stoa, BOB).is_some_and(|p| p != worker)
    });
    assert!(!alive(worker), "the hostile worker was left running");
    let log = stoa.log();
    assert!(
        log.contains("PROTOCOL VIOLATION by a worker")
            && log.contains(&format!(
                "Kill of handle {} of another user",
                alice_handle.0
            )),
        "{log}"
    );

    // The front's link names no handle at all: ListHandles on it is a violation too.
    let front = stoa.daemon_pid().expect("front");
    stop_all_threads(front);
    let mut link = UnixStream::from(sys::pidfd_getfd(front, 3)?);
    let listed = ask(
        &mut link,
        1_000_005,
        RequestBody::ListHandles { after: None },
    );
    assert!(
        listed.is_err(),
        "ListHandles on the front's link answered {listed:?}"
    );
    stoa.wait_new_daemon(front);
    assert!(
        !alive(front),
        "the front that broke the protocol was left running"
    );
    assert!(
        stoa.log().contains("ListHandles is not for a front link"),
        "{}",
        stoa.log()
    );
    // Executors are untouched by either: alice's sleep runs on.
    assert!(alive(alices), "alice's sleep died with a dropped link");
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
                    let (s, reply) = post_exec(&agent, port, &carol, &body);
                    statuses.lock().unwrap().push((s, reply));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let answers = statuses.lock().unwrap().clone();
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 403 && *s != 429)
        .collect();
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    let grown = std::fs::metadata(&audit)?.len() - before;
    eprintln!(
        "audit flood: 1200 refused spawns of 64 KiB each grew the audit log by {grown} bytes"
    );
    assert!(unexpected.is_empty(), "{unexpected:?}\n{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 429).count() > 900);
    assert!(grown < 256 * 1024, "audit grew {grown} bytes");
    let text = std::fs::read_to_string(&audit)?;
    assert!(
        !text.contains(&"A".repeat(100)),
        "argv copied into the audit log"
    );
    // No worker was started for her: the broker refused before opening one (no process
    // of hers, no store).
    let carol_uid = uid_of(CAROL).to_string();
    let hers: Vec<i32> = all_pids()
        .into_iter()
        .filter(|p| {
            status_field(*p, "Uid").is_some_and(|u| u.split_whitespace().next() == Some(&carol_uid))
        })
        .collect();
    assert!(hers.is_empty(), "processes of carol: {hers:?}");
    assert!(
        !stoa.dir.join("workers").join(&carol_uid).exists(),
        "a store was made for carol"
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
    let session = crate::sessions::create_session(&stoa, &alice, "claude-code", &wt);
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
