//! Issue 6: per-user cgroups (fork bomb, memory hog, nothing escapes a stop) and the
//! request id from HTTP into the broker's log.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    ("fork_bomb_is_contained_by_the_users_cgroup", fork_bomb),
    ("memory_hog_is_contained_by_the_users_cgroup", memory_hog),
    ("nothing_a_spawn_started_outlives_it", nothing_escapes),
    ("request_id_reaches_the_broker_log_and_audit", request_id),
    (
        "sighup_rewrites_every_users_cgroup_limits",
        sighup_rewrites_limits,
    ),
    ("each_run_starts_in_a_cgroup_of_its_own", own_cgroup),
];

/// The broker's cgroup roots (`stoa.<pid ns>.<pid>`), one per hierarchy (v1) or one (v2).
fn cgroup_roots(broker_pid: i32) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let file_name = e.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.starts_with("stoa.") && file_name.ends_with(name) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!(".{broker_pid}"),
        6,
        &mut out,
    );
    out
}

/// Limits as reported by `/health`; `None` when this machine offers no cgroups to stoa
/// (the test then says so and checks that `/health` says it too).
fn cgroups_in_force(stoa: &Instance) -> Option<Value> {
    let health = stoa.wait_healthy(Duration::from_secs(10));
    let limits = health["limits"].clone();
    let described = limits["cgroups"].as_str().unwrap_or_default().to_string();
    assert!(
        !described.is_empty(),
        "/health names no cgroup state: {health}"
    );
    if described.starts_with("not enforced") {
        eprintln!("SKIPPED: cgroups are not available here ({described})");
        return None;
    }
    Some(limits)
}

/// Starts stoa with `policy` and returns it with its `/health` limits, or `None` (having
/// said SKIPPED) when this machine cannot enforce the limit `key` of `/health`.
fn start_enforcing(policy: &str, key: &str) -> Option<(Instance, Value)> {
    let stoa = Instance::start_with(Options {
        extra_policy: policy.into(),
        ..Options::default()
    });
    let limits = cgroups_in_force(&stoa)?;
    if limits[key].as_str().unwrap_or("").contains("not enforced") {
        eprintln!("SKIPPED: {key} is not enforced here: {limits}");
        return None;
    }
    Some((stoa, limits))
}

fn uid_processes(uid: u32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            status_field(*p, "Uid")
                .and_then(|u| u.split_whitespace().next().map(str::to_string))
                .is_some_and(|u| u == uid.to_string())
        })
        .collect()
}

/// Whether `pid` is a per-user worker (`stoa __worker`, a child of the broker): a process
/// of its user that holds that user's work and retires by itself once idle (60 s), so it
/// may outlive any one spawn.
fn is_worker(pid: i32, broker: i32) -> bool {
    state_and_ppid(pid).is_some_and(|(_, ppid)| ppid == broker)
        && cmdline(pid).get(1).map(String::as_str) == Some("__worker")
}

/// `uid`'s processes but its worker: what its spawns started.
fn spawned_processes(uid: u32, broker: i32) -> Vec<i32> {
    uid_processes(uid)
        .into_iter()
        .filter(|p| !is_worker(*p, broker))
        .collect()
}

/// Bob and the machine work while alice misbehaves.
fn others_unaffected(stoa: &Instance) {
    let reply = stoa.sh(
        BOB,
        "for i in 1 2 3 4 5 6 7 8; do /bin/true || exit 1; done; echo bob-ok",
    );
    assert_eq!(reply["exit_code"], 0, "bob was affected: {reply}");
    assert!(
        reply["stdout"].as_str().unwrap_or("").contains("bob-ok"),
        "{reply}"
    );
    for _ in 0..20 {
        let out = Command::new("/bin/true")
            .status()
            .expect("the machine cannot fork");
        assert!(out.success());
    }
}

fn fork_bomb() -> Result<(), Failed> {
    let Some((stoa, limits)) = start_enforcing(
        "[cgroup]\npids_max = 64\nmemory_max = \"512M\"\n",
        "cgroup_pids_max",
    ) else {
        return Ok(());
    };
    assert_eq!(limits["cgroup_pids_max"], "64 per user", "{limits}");
    let alice = uid_of(ALICE);
    let started = Instant::now();
    // The classic bomb, with the leader kept alive a while so the run has an end to report.
    let token = stoa.token.clone();
    let port = stoa.port;
    let bomb = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut resp = agent
            .post(format!("http://127.0.0.1:{port}/exec"))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(json!({
                "unix_user": ALICE,
                "argv": ["sh", "-c", "b() { b | b & }; b; sleep 4; echo leader-done"],
                "timeout_ms": 60000,
            }))
            .expect("exec");
        let status = resp.status().as_u16();
        (
            status,
            resp.body_mut().read_json::<Value>().unwrap_or(Value::Null),
        )
    });
    // While it rages: alice's stoa processes (her worker too: it lives in her cgroup) stay
    // at the limit, bob and the machine work.
    let broker = stoa.broker_pid();
    let (mut peak, mut spawned_peak) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(uid_processes(alice).len());
        spawned_peak = spawned_peak.max(spawned_processes(alice, broker).len());
        std::thread::sleep(Duration::from_millis(50));
    }
    others_unaffected(&stoa);
    let (status, reply) = bomb.join().expect("bomb thread");
    assert_eq!(status, 200, "{reply}");
    let limit = reply["limit_hit"].as_str().unwrap_or_default();
    assert!(
        limit.contains("process limit") && limit.contains("64"),
        "no reason given: {reply}"
    );
    assert!(
        peak <= 64 + 2,
        "alice had {peak} processes against a limit of 64"
    );
    // Without the worker, which would make any run count as two.
    assert!(
        spawned_peak > 1,
        "the bomb never went off ({spawned_peak} processes)"
    );
    // Ended with its cgroup: nothing of alice's is left but her worker (it outlives the
    // spawn by design, and retires once idle), and the spawn's cgroup is gone.
    wait_until(
        "alice's processes to be gone",
        Duration::from_secs(10),
        || spawned_processes(alice, broker).is_empty(),
    );
    let roots = cgroup_roots(broker);
    assert!(!roots.is_empty(), "no cgroup root for the broker");
    for root in &roots {
        let user = root.join(format!("user-{alice}"));
        wait_until(
            "the spawn's cgroup to be removed",
            Duration::from_secs(10),
            || {
                std::fs::read_dir(&user)
                    .map(|d| {
                        !d.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with('h'))
                    })
                    .unwrap_or(true)
            },
        );
    }
    // The audit log says how it ended.
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"exit\"") && l.contains("process limit")),
        "audit has no exit with the limit"
    );
    let health = stoa.wait_healthy(Duration::from_secs(10));
    assert_eq!(health["status"], "ok", "{health}");
    eprintln!(
        "fork bomb: peak {peak} processes of alice (limit 64), ended in {:?}",
        started.elapsed()
    );
    Ok(())
}

fn memory_hog() -> Result<(), Failed> {
    if Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: no python3 to allocate memory with");
        return Ok(());
    }
    let Some((stoa, limits)) =
        start_enforcing("[cgroup]\nmemory_max = \"128M\"\n", "cgroup_memory_max")
    else {
        return Ok(());
    };
    assert_eq!(limits["cgroup_memory_max"], "128 MiB per user", "{limits}");
    // 1 GiB, touched page by page, against a 128 MiB limit.
    let (status, reply) = stoa.exec(json!({
        "unix_user": ALICE,
        "argv": ["python3", "-c", "x = bytearray(1 << 30)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('survived')"],
        "timeout_ms": 60000,
    }));
    assert_eq!(status, 200, "{reply}");
    assert!(
        !reply["stdout"].as_str().unwrap_or("").contains("survived"),
        "{reply}"
    );
    assert_eq!(reply["signal"], 9, "the hog was not killed: {reply}");
    let limit = reply["limit_hit"].as_str().unwrap_or_default();
    assert!(
        limit.contains("out of memory") && limit.contains("128 MiB"),
        "no reason: {reply}"
    );
    others_unaffected(&stoa);
    // The user's cgroup never held more than its limit.
    let peak = cgroup_roots(stoa.broker_pid())
        .iter()
        .map(|root| root.join(format!("user-{}", uid_of(ALICE))))
        .filter_map(|dir| {
            ["memory.max_usage_in_bytes", "memory.peak"]
                .iter()
                .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        })
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .max()
        .expect("no memory peak in alice's cgroup");
    assert!(peak <= 128 << 20, "alice's cgroup peaked at {peak} bytes");
    eprintln!(
        "memory hog: alice's cgroup peaked at {} MiB (limit 128 MiB)",
        peak >> 20
    );
    // A modest run as alice still works: the limit is per run's memory, not a ban.
    let ok = stoa.sh(ALICE, "echo fine");
    assert_eq!(ok["exit_code"], 0, "{ok}");
    assert!(ok["limit_hit"].is_null(), "{ok}");
    Ok(())
}

fn nothing_escapes() -> Result<(), Failed> {
    let stoa = Instance::start();
    if cgroups_in_force(&stoa).is_none() {
        return Ok(());
    }
    // A daemonized leftover (new session, so no process group reaches it) of a run that
    // ended normally.
    let reply = stoa.sh(
        ALICE,
        "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    assert_eq!(reply["exit_code"], 0, "{reply}");
    let leftover: i32 = reply["stdout"].as_str().unwrap_or("").trim().parse()?;
    wait_until("the leftover to be killed", Duration::from_secs(10), || {
        !alive(leftover)
    });

    // A run stopped by its timeout, with a child that left its process group.
    let (status, reply) = stoa.exec(json!({
        "unix_user": ALICE,
        "argv": ["sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!; sleep 1000"],
        "timeout_ms": 1000,
    }));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["timed_out"], true, "{reply}");
    let escaped: i32 = reply["stdout"].as_str().unwrap_or("").trim().parse()?;
    wait_until("the escapee to be killed", Duration::from_secs(10), || {
        !alive(escaped)
    });
    // Nothing of alice's left but her worker, which is no spawn's (it holds her work and
    // retires by itself once idle).
    let alice = uid_of(ALICE);
    let broker = stoa.broker_pid();
    wait_until(
        "no process of alice's left",
        Duration::from_secs(10),
        || spawned_processes(alice, broker).is_empty(),
    );
    Ok(())
}

fn request_id() -> Result<(), Failed> {
    let stoa = Instance::start();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(stoa.url("/exec"))
        .header("Authorization", format!("Bearer {}", stoa.token))
        .header("X-Request-Id", "trace-me-4711")
        .send_json(json!({ "unix_user": ALICE, "argv": ["true"] }))?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-me-4711")
    );
    let _ = resp.body_mut().read_to_string();
    wait_until(
        "the broker to log the request id",
        Duration::from_secs(5),
        || {
            stoa.log()
                .lines()
                .any(|l| l.contains("trace-me-4711") && l.contains("spawned"))
        },
    );
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"spawn\"") && l.contains("\"request_id\":\"trace-me-4711\"")),
        "audit:\n{audit}"
    );
    // A request id that is not one (spaces, too long) is replaced, not passed on.
    let mut resp = agent
        .post(stoa.url("/exec"))
        .header("Authorization", format!("Bearer {}", stoa.token))
        .header("X-Request-Id", "bad id\twith spaces")
        .send_json(json!({ "unix_user": ALICE, "argv": ["true"] }))?;
    let given = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let _ = resp.body_mut().read_to_string();
    assert_eq!(given.len(), 16, "{given:?}");
    assert!(given.bytes().all(|b| b.is_ascii_hexdigit()), "{given:?}");
    Ok(())
}

fn sighup_rewrites_limits() -> Result<(), Failed> {
    let Some((stoa, _)) = start_enforcing("[cgroup]\npids_max = 100\n", "cgroup_pids_max") else {
        return Ok(());
    };
    assert_eq!(stoa.sh(ALICE, "echo hi")["exit_code"], 0);
    let pids_max = || {
        cgroup_roots(stoa.broker_pid())
            .iter()
            .find_map(|r| {
                std::fs::read_to_string(r.join(format!("user-{}", uid_of(ALICE))).join("pids.max"))
                    .ok()
            })
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(pids_max(), "100");
    let policy = std::fs::read_to_string(stoa.dir.join("broker.toml"))?;
    std::fs::write(
        stoa.dir.join("broker.toml"),
        policy.replace("pids_max = 100", "pids_max = 50"),
    )?;
    let daemon = stoa.daemon_pid().expect("daemon");
    run("kill", &["-HUP", &stoa.broker_pid().to_string()]);
    stoa.wait_new_daemon(daemon);
    wait_until(
        "the new limit in alice's cgroup",
        Duration::from_secs(10),
        || pids_max() == "50",
    );
    let health = stoa.wait_healthy(Duration::from_secs(10));
    assert_eq!(
        health["limits"]["cgroup_pids_max"], "50 per user",
        "{health}"
    );
    Ok(())
}

/// Every run is in its own cgroup (`user-<uid>/h<handle>`) from its first instruction: its
/// first command, `cat /proc/self/cgroup`, shows that leaf. On cgroup v2 it was born there
/// (`clone3(CLONE_INTO_CGROUP)`: no migration, no `cgroup.procs` written), and `/health`
/// says so; on v1 it wrote itself into `cgroup.procs` before anything else.
fn own_cgroup() -> Result<(), Failed> {
    let Some((stoa, _)) = start_enforcing("[cgroup]\npids_max = 100\n", "cgroup_pids_max") else {
        return Ok(());
    };
    let alice = uid_of(ALICE);
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let leaf_of = |out: &str| -> String {
        // v2: "0::<path>"; v1: the pids hierarchy (the one a run always joins).
        out.lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                let ours = if v2 {
                    names.is_empty()
                } else {
                    names.split(',').any(|n| n == "pids")
                };
                ours.then(|| path.to_string())
            })
            .unwrap_or_default()
    };
    let mut leaves = Vec::new();
    for _ in 0..2 {
        let (status, run) =
            stoa.exec(json!({ "unix_user": ALICE, "argv": ["cat", "/proc/self/cgroup"] }));
        assert_eq!(status, 200, "{run}");
        assert_eq!(run["exit_code"], 0, "{run}");
        let leaf = leaf_of(run["stdout"].as_str().unwrap_or_default());
        let (user, handle) = leaf
            .rsplit_once('/')
            .map(|(rest, h)| (rest.rsplit('/').next().unwrap_or(""), h))
            .unwrap_or_default();
        assert_eq!(user, format!("user-{alice}"), "{run}");
        assert!(
            handle.len() > 1
                && handle.starts_with('h')
                && handle[1..].bytes().all(|b| b.is_ascii_digit()),
            "not a run's own cgroup: {leaf:?} ({run})"
        );
        leaves.push(leaf);
    }
    assert_ne!(leaves[0], leaves[1], "two runs shared a cgroup");
    let health = stoa.wait_healthy(Duration::from_secs(10));
    let how = health["limits"]["cgroup_join"].as_str().unwrap_or_default();
    let expected = if v2 {
        "born in its cgroup (clone3 CLONE_INTO_CGROUP)"
    } else {
        "wrote itself into cgroup.procs"
    };
    assert_eq!(how, format!("last run: {expected}"), "{health}");
    eprintln!("each run in its own cgroup: {leaves:?}, {how}");
    Ok(())
}
