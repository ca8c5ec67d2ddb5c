//! Issue 2: the broker, the daemon, spawn-as-user, the wire under attack, restarts.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libtest_mimic::Failed;
use serde_json::{json, Value};

use stoa::wire::{Handle, Program, Request, RequestBody, Signal, SpawnRequest};
use stoa_executor::codec;
use stoa_executor::sys;

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    ("probe_identity_through_the_whole_path", probe_identity),
    ("probe_with_tty_is_session_leader_on_its_own_pty", probe_tty),
    ("users_cannot_reach_each_other", users_isolated),
    ("daemon_runs_unprivileged", daemon_unprivileged),
    ("refusals_are_clear_and_spawn_nothing", refusals),
    ("bad_requests_get_json_errors", bad_requests),
    ("exit_codes_signals_stdin_and_output_limit", exit_codes),
    ("cli_exec_prints_output_and_exits_with_the_code", cli_exec),
    (
        "hostile_frames_restart_the_daemon_not_the_executors",
        hostile_frames,
    ),
    ("thousand_spawns_leak_no_fd_and_no_zombie", thousand_spawns),
    (
        "killed_daemon_is_replaced_and_adopts_running_work",
        daemon_kill_adopts,
    ),
    ("single_user_mode_without_root", single_user_mode),
    ("systemd_readiness_and_stopping", systemd_notify),
    (
        "audit_log_records_spawns_refusals_exits_violations",
        audit_log,
    ),
    ("quotas_answer_429_and_leak_nothing", quotas),
    ("metrics_parse_and_move", metrics),
    (
        "sighup_applies_policy_and_config_without_dropping_work",
        sighup,
    ),
    ("health_reports_degradation_with_reasons", health_degraded),
];

fn stdout(v: &Value) -> String {
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// Splits `KEY:value` lines of a probe's output into a lookup.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")).map(str::trim))
}

fn expected_groups(user: &str) -> BTreeSet<u32> {
    run("id", &["-G", user])
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect()
}

const PROBE: &str = r#"
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/$$/status
echo fds-begin; ls -1 /proc/$$/fd; echo fds-end
echo "cwd: $(pwd)"
echo "umask: $(umask)"
echo "env-ld: $(env | grep -c '^LD_')"
echo "env-stoa: $(env | grep -ci 'stoa_')"
if setpriv --reuid=0 --regid=0 --clear-groups true 2>/dev/null; then echo "regain-root: yes"; else echo "regain-root: no"; fi
set -- $(cat /proc/$$/stat | sed 's/.*) //'); echo "session: $4 pid: $$ tty_nr: $5"
"#;

fn probe_identity() -> Result<(), Failed> {
    let stoa = Instance::start();
    let cwd = format!("/home/{ALICE}");
    let (status, reply) =
        stoa.exec(json!({ "unix_user": ALICE, "argv": ["sh", "-c", PROBE], "cwd": cwd, "env": { "FOO": "bar" } }));
    assert_eq!(status, 200, "{reply}");
    let out = stdout(&reply);
    let uid = uid_of(ALICE);
    let gid: u32 = run("id", &["-g", ALICE]).trim().parse()?;
    assert_eq!(
        field(&out, "Uid"),
        Some(format!("{uid}\t{uid}\t{uid}\t{uid}").as_str()),
        "{out}"
    );
    assert_eq!(
        field(&out, "Gid"),
        Some(format!("{gid}\t{gid}\t{gid}\t{gid}").as_str()),
        "{out}"
    );
    let groups: BTreeSet<u32> = field(&out, "Groups")
        .unwrap_or_default()
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(groups, expected_groups(ALICE), "{out}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&out, cap), Some("0000000000000000"), "{cap}: {out}");
    }
    assert_eq!(field(&out, "NoNewPrivs"), Some("1"), "{out}");
    // Listed by a child of the shell, so the shell's own fds show as they are.
    let fds: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "fds-begin")
        .skip(1)
        .take_while(|l| *l != "fds-end")
        .collect();
    assert_eq!(fds, ["0", "1", "2"], "only stdio may be open: {out}");
    assert_eq!(field(&out, "cwd"), Some(cwd.as_str()), "{out}");
    assert_eq!(field(&out, "umask"), Some("0077"), "{out}");
    assert_eq!(field(&out, "env-ld"), Some("0"), "{out}");
    assert_eq!(field(&out, "env-stoa"), Some("0"), "{out}");
    assert_eq!(field(&out, "regain-root"), Some("no"), "{out}");
    assert!(
        !out.contains(&stoa.token),
        "the token leaked into the child"
    );
    // Without a tty: its own session, no controlling terminal.
    let session = field(&out, "session").unwrap_or_default();
    assert!(session.ends_with("tty_nr: 0"), "{out}");

    // The environment is exactly what the broker built, plus what was asked.
    let env = stdout(&stoa.sh(ALICE, "env | sort"));
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .collect();
    assert_eq!(
        names,
        ["HOME", "LANG", "LOGNAME", "PATH", "PWD", "SHELL", "TERM", "USER"],
        "{env}"
    );
    Ok(())
}

fn probe_tty() -> Result<(), Failed> {
    let stoa = Instance::start();
    let script = format!("{PROBE}\ntty; stat -c '%U %G %a' $(tty); stty size");
    let (status, reply) =
        stoa.exec(json!({ "unix_user": ALICE, "argv": ["sh", "-c", script], "tty": { "rows": 33, "cols": 101 } }));
    assert_eq!(status, 200, "{reply}");
    let out = stdout(&reply);
    let session = field(&out, "session").unwrap_or_default();
    let parts: Vec<&str> = session.split_whitespace().collect();
    assert_eq!(
        parts[0], parts[2],
        "the shell must lead its own session: {out}"
    );
    assert_ne!(parts[4], "0", "no controlling tty: {out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(
        out.contains(&format!("{ALICE} tty 620")),
        "pty must be alice's, group tty, 0620: {out}"
    );
    assert!(out.contains("33 101"), "window size: {out}");
    assert_eq!(field(&out, "CapEff"), Some("0000000000000000"), "{out}");
    assert_eq!(field(&out, "NoNewPrivs"), Some("1"), "{out}");
    Ok(())
}

fn users_isolated() -> Result<(), Failed> {
    let stoa = Instance::start();
    let secret = format!("/home/{BOB}/secret");
    stoa.sh(
        BOB,
        &format!("echo bob-secret > {secret}; chmod 600 {secret}"),
    );
    let reply = stoa.sh(ALICE, &format!("cat {secret}"));
    assert_ne!(reply["exit_code"], 0, "{reply}");
    assert!(!stdout(&reply).contains("bob-secret"));
    assert!(
        reply["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("Permission denied"),
        "{reply}"
    );
    // Even with the file world-readable, bob's 0700 home keeps alice out.
    let reply = stoa.sh(ALICE, &format!("ls /home/{BOB}"));
    assert_ne!(reply["exit_code"], 0, "{reply}");

    // bob runs a sleep; alice may not signal it.
    let background = {
        let port = stoa.port;
        let token = stoa.token.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let _ = agent
                .post(format!("http://127.0.0.1:{port}/exec"))
                .header("Authorization", format!("Bearer {token}"))
                .send_json(json!({ "unix_user": BOB, "argv": ["sleep", "30"] }));
        })
    };
    let mut pids = Vec::new();
    wait_until("bob's sleep", Duration::from_secs(10), || {
        pids = find_processes(BOB, &["sleep", "30"]);
        !pids.is_empty()
    });
    let pid = pids[0];
    let reply = stoa.sh(ALICE, &format!("kill -TERM {pid}"));
    assert_ne!(reply["exit_code"], 0, "{reply}");
    assert!(
        reply["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("not permitted"),
        "{reply}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(pid), "bob's process died from alice's signal");
    run("kill", &["-KILL", &pid.to_string()]);
    background.join().unwrap();
    Ok(())
}

fn daemon_unprivileged() -> Result<(), Failed> {
    let stoa = Instance::start();
    let daemon = stoa.daemon_pid().expect("daemon pid");
    let svc = uid_of(SERVICE);
    assert_eq!(
        status_field(daemon, "Uid"),
        Some(format!("{svc}\t{svc}\t{svc}\t{svc}"))
    );
    assert_eq!(
        status_field(daemon, "Groups").as_deref(),
        Some(""),
        "no supplementary groups"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(daemon, cap).as_deref(),
            Some("0000000000000000"),
            "{cap}"
        );
    }
    assert_eq!(status_field(daemon, "NoNewPrivs").as_deref(), Some("1"));
    // The service account was created as a system account with no login shell.
    let entry = run("getent", &["passwd", SERVICE]);
    assert!(entry.trim_end().ends_with("/usr/sbin/nologin"), "{entry}");
    assert!(
        svc < 1000,
        "service account should be a system account: {entry}"
    );
    // The broker kept only the capabilities it needs.
    let eff = status_field(stoa.broker_pid(), "CapEff").expect("broker caps");
    let eff = u64::from_str_radix(&eff, 16)?;
    let allowed = [0u32, 5, 6, 7, 8, 24]
        .iter()
        .fold(0u64, |m, c| m | (1 << c)); // CHOWN KILL SETGID SETUID SETPCAP SYS_RESOURCE
    assert_eq!(eff & !allowed, 0, "broker has extra capabilities: {eff:x}");
    assert!(stoa.log().contains("broker dropped its capabilities"));
    Ok(())
}

fn refusals() -> Result<(), Failed> {
    let stoa = Instance::start();
    let before = stoa.processes().len();
    let broker = stoa.broker_pid();
    let children_before = children_of(broker).len();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({ "unix_user": "root", "argv": ["id"] }), 403, "root"),
        (
            json!({ "unix_user": SERVICE, "argv": ["id"] }),
            403,
            "service-user",
        ),
        (
            json!({ "unix_user": CAROL, "argv": ["id"] }),
            403,
            "allow-group",
        ),
        (
            json!({ "unix_user": "stoa-t-nobody-here", "argv": ["id"] }),
            403,
            "unknown-user",
        ),
        (
            json!({ "unix_user": "daemon", "argv": ["id"] }),
            403,
            "uid-range",
        ),
        (
            json!({ "unix_user": ALICE, "argv": ["id"], "env": { "LD_PRELOAD": "/tmp/x.so" } }),
            403,
            "env-deny",
        ),
        (
            json!({ "unix_user": ALICE, "argv": ["id"], "env": { "HOME": "/root" } }),
            403,
            "env-deny",
        ),
        (
            json!({ "unix_user": ALICE, "argv": ["id"], "cwd": format!("/home/{BOB}") }),
            400,
            "working directory",
        ),
        (
            json!({ "unix_user": ALICE, "argv": ["id"], "cwd": "relative/dir" }),
            400,
            "not absolute",
        ),
        (
            json!({ "unix_user": ALICE, "argv": [] }),
            400,
            "argv is empty",
        ),
        (
            json!({ "unix_user": "../etc", "argv": ["id"] }),
            400,
            "invalid unix user",
        ),
    ];
    for (body, want_status, want) in cases {
        let (status, reply) = stoa.exec(body.clone());
        assert_eq!(status, want_status, "{body} -> {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        let rule = reply["rule"].as_str().unwrap_or_default();
        assert!(
            rule == want || error.contains(want),
            "{body}: expected {want:?} in {reply}"
        );
        assert!(!error.is_empty());
    }
    assert_eq!(
        stoa.processes().len(),
        before,
        "a refused spawn left a handle"
    );
    // The broker's children now include the workers of the users whose requests reached
    // the broker's spawn check (alice's: env, cwd and argv are checked there). A worker is
    // no spawned process (it retires by itself when idle), so it is not counted; but a user
    // the policy refuses gets none, and nothing else is left.
    let (workers, others): (Vec<i32>, Vec<i32>) = children_of(broker)
        .into_iter()
        .filter(|p| alive(*p))
        .partition(|p| is_worker(*p));
    assert_eq!(
        others.len(),
        children_before,
        "a refused spawn left a process: {:?}",
        others.iter().map(|p| cmdline(*p)).collect::<Vec<_>>()
    );
    let alice = uid_of(ALICE).to_string();
    for w in &workers {
        assert_eq!(
            status_field(*w, "Uid")
                .as_deref()
                .and_then(|u| u.split_whitespace().next()),
            Some(alice.as_str()),
            "a worker was started for a refused user"
        );
    }
    assert!(
        workers.len() <= 1,
        "more than one worker for alice: {workers:?}"
    );
    Ok(())
}

/// Whether `pid` is a per-user worker (`stoa __worker`): a process of its user that holds
/// that user's work, started by the broker, which retires by itself when idle.
fn is_worker(pid: i32) -> bool {
    cmdline(pid).get(1).map(String::as_str) == Some("__worker")
}

/// The pid of `user`'s running worker, if any.
fn worker_of(stoa: &Instance, user: &str) -> Option<i32> {
    let uid = uid_of(user).to_string();
    children_of(stoa.broker_pid()).into_iter().find(|p| {
        is_worker(*p)
            && alive(*p)
            && status_field(*p, "Uid").is_some_and(|u| u.split_whitespace().next() == Some(&uid))
    })
}

fn bad_requests() -> Result<(), Failed> {
    let stoa = Instance::start();
    let (status, v) = stoa.request(
        "POST",
        "/exec",
        None,
        Some(&json!({ "unix_user": ALICE, "argv": ["id"] })),
    );
    assert_eq!(status, 401);
    assert!(v["error"].is_string(), "{v}");
    let (status, v) = stoa.request(
        "POST",
        "/exec",
        Some("wrong-token"),
        Some(&json!({ "unix_user": ALICE, "argv": ["id"] })),
    );
    assert_eq!(status, 401, "{v}");
    let (status, v) = stoa.exec(json!({ "user": ALICE }));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].is_string(), "{v}");
    // A route that exists nowhere is a JSON 404, whoever asks: nobody, a user (whose
    // request the front forwards to their worker) or the admin (who has no worker). The
    // front knows its own routes and which ones are the workers', so neither a missing
    // token nor "use a user token" is the answer to a typo.
    let alice = stoa.api_user("alice", ALICE);
    for (who, token) in [
        ("nobody", None),
        ("alice", Some(&alice)),
        ("admin", Some(&stoa.token)),
    ] {
        for path in ["/nowhere", "/nowhere/at/all"] {
            let (status, v) = stoa.request("GET", path, token.map(String::as_str), None);
            assert_eq!(status, 404, "{who} GET {path}: {v}");
            assert!(v["error"].is_string(), "{who} GET {path}: {v}");
        }
    }
    let health = stoa.health().expect("health");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["isolation"], true);
    assert_eq!(health["broker_connected"], true);
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    Ok(())
}

fn exit_codes() -> Result<(), Failed> {
    let stoa = Instance::start();
    let r = stoa.sh(ALICE, "echo out; echo err >&2; exit 7");
    assert_eq!(
        (r["exit_code"].clone(), stdout(&r), r["stderr"].clone()),
        (json!(7), "out\n".into(), json!("err\n"))
    );
    let r = stoa.sh(ALICE, "kill -TERM $$");
    assert_eq!(
        (r["exit_code"].clone(), r["signal"].clone()),
        (Value::Null, json!(15)),
        "{r}"
    );
    let (_, r) =
        stoa.exec(json!({ "unix_user": ALICE, "argv": ["tr", "a-z", "A-Z"], "stdin": "hello" }));
    assert_eq!(stdout(&r), "HELLO");
    let (_, r) = stoa.exec(json!({ "unix_user": ALICE, "argv": ["no-such-program-xyz"] }));
    assert_eq!(r["exit_code"], 127, "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("No such file"),
        "{r}"
    );
    // Output past the limit is dropped, and said so; the program still runs to the end.
    let r = stoa.sh(ALICE, "head -c 3000000 /dev/zero; echo done >&2");
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stderr"], "done\n");
    // A timeout kills the process group.
    let (_, r) =
        stoa.exec(json!({ "unix_user": ALICE, "argv": ["sleep", "30"], "timeout_ms": 200 }));
    assert_eq!(
        (r["timed_out"].clone(), r["signal"].clone()),
        (json!(true), json!(9)),
        "{r}"
    );
    // A background child holding the output open: with cgroups it ends with the run (so
    // the output closes at once); without, it is cut off after the drain timeout.
    let r = stoa.sh(ALICE, "sleep 30 & echo started");
    assert_eq!(stdout(&r), "started\n");
    let cgroups = stoa.health().expect("healthy")["limits"]["cgroups"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let enforced = !cgroups.starts_with("not enforced");
    assert_eq!(r["truncated"], !enforced, "cgroups: {cgroups}; {r}");
    wait_until("orphaned sleep killed", Duration::from_secs(5), || {
        find_processes(ALICE, &["sleep", "30"]).is_empty()
    });
    Ok(())
}

fn cli_exec() -> Result<(), Failed> {
    let stoa = Instance::start();
    let out = std::process::Command::new(stoa.dir.join("bin/stoa"))
        .args([
            "exec",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "echo hi; id -un; exit 7",
        ])
        .env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &stoa.token)
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hi\n{ALICE}\n")
    );
    let out = std::process::Command::new(stoa.dir.join("bin/stoa"))
        .args(["exec", "-t", "--user", ALICE, "--", "tty"])
        .env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &stoa.token)
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"));
    let out = std::process::Command::new(stoa.dir.join("bin/stoa"))
        .args(["exec", "--user", "root", "--", "id"])
        .env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &stoa.token)
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rule root"));
    Ok(())
}

/// Starts `argv` as `user` through `/exec` in the background and returns its pid once it
/// runs. It lives only as long as its request: it ends with its HTTP client, and so with the
/// front that relayed it (use `start_terminal` for work that must outlive a restart).
fn start_background(stoa: &Instance, user: &'static str, argv: &'static [&'static str]) -> i32 {
    let port = stoa.port;
    let token = stoa.token.clone();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let _ = agent
            .post(format!("http://127.0.0.1:{port}/exec"))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(json!({ "unix_user": user, "argv": argv }));
    });
    let mut pids = Vec::new();
    wait_until("background process", Duration::from_secs(10), || {
        pids = find_processes(user, argv);
        !pids.is_empty()
    });
    pids[0]
}

/// Starts `argv` as `user` in a terminal (admin token): work that outlives the request that
/// started it, unlike `/exec`'s, which ends with its HTTP client. Returns the terminal's id
/// and the program's pid once it runs.
fn start_terminal(
    stoa: &Instance,
    user: &'static str,
    argv: &'static [&'static str],
) -> (String, i32) {
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(&stoa.token),
        Some(&json!({ "unix_user": user, "command": argv, "cols": 80, "rows": 24 })),
    );
    assert_eq!(status, 201, "{t}");
    let id = t["terminal_id"].as_str().expect("terminal_id").to_string();
    assert!(
        id.starts_with(&format!("u{}-", uid_of(user))),
        "a terminal id names its user's uid: {t}"
    );
    let pid = t["pid"].as_i64().expect("pid") as i32;
    wait_until("the terminal's program", Duration::from_secs(10), || {
        find_processes(user, argv).contains(&pid)
    });
    (id, pid)
}

/// A terminal as the new front shows it (admin token), asserting it answers.
fn terminal(stoa: &Instance, id: &str) -> Value {
    let (status, t) = stoa.request("GET", &format!("/terminals/{id}"), Some(&stoa.token), None);
    assert_eq!(status, 200, "{t}");
    t
}

fn frame(request: &Request) -> Vec<u8> {
    codec::encode(request).unwrap()
}

fn hostile_frames() -> Result<(), Failed> {
    let stoa = Instance::start();
    let broker = stoa.broker_pid();
    // Running work: terminals (they outlive their requests; an `/exec`'s process ends with
    // its HTTP client, which a front restart drops). They live in their users' workers.
    let (terminal_id, sleeper) = start_terminal(&stoa, BOB, &["sleep", "60"]);
    let (alice_terminal, alice_sleeper) = start_terminal(&stoa, ALICE, &["sleep", "60"]);
    let handle_of = |pid: i32| {
        stoa.processes()
            .iter()
            .find(|p| p["pid"] == pid)
            .and_then(|p| p["handle"].as_u64())
            .unwrap_or_else(|| panic!("no handle for pid {pid}"))
    };
    let (bobs_handle, alices_handle) =
        (Handle(handle_of(sleeper)), Handle(handle_of(alice_sleeper)));
    let bobs_worker = worker_of(&stoa, BOB).expect("bob's worker");
    let alices_worker = worker_of(&stoa, ALICE).expect("alice's worker");

    let spawn = Request {
        request_id: None,
        id: 9,
        body: RequestBody::Spawn(SpawnRequest {
            credential: stoa.token.clone(),
            unix_user: "root".into(),
            program: Program::Exec {
                argv: vec!["id".into()],
            },
            cwd: None,
            cwd_id: None,
            env: vec![],
            tty: None,
            stdin: false,
            keep_stdin: false,
            ring_bytes: 0,
            secrets: false,
            secret_names: None,
            purpose: stoa::wire::Purpose::Agent,
        }),
    };
    let truncated = {
        let mut f = frame(&spawn);
        f.truncate(f.len() - 3);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_be_bytes());
        f
    };
    // A request the front may send (`Stats`), made hostile only by what surrounds it.
    let stats = Request {
        request_id: None,
        id: 9,
        body: RequestBody::Stats,
    };
    let trailing = {
        let mut f = frame(&stats);
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_be_bytes());
        f
    };
    let unknown_variant = vec![0, 0, 0, 2, 9, 200];
    let request = |body: RequestBody| {
        frame(&Request {
            request_id: None,
            id: 9,
            body,
        })
    };
    let second_hello = request(RequestBody::Hello {
        protocol: stoa::wire::PROTOCOL_VERSION,
    });
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "oversized length",
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            false,
        ),
        ("truncated payload", truncated, false),
        ("trailing bytes", trailing, false),
        ("unknown variant", unknown_variant, false),
        // What only a worker may ask: the front can signal, list or adopt nothing, not even
        // a handle that exists.
        (
            "Kill of a live handle from the front",
            request(RequestBody::Kill {
                handle: bobs_handle,
                signal: Signal::Kill,
            }),
            false,
        ),
        (
            "ListHandles from the front",
            request(RequestBody::ListHandles { after: None }),
            false,
        ),
        (
            "Adopt from the front",
            request(RequestBody::Adopt {
                handle: bobs_handle,
            }),
            false,
        ),
        ("second hello", second_hello, false),
        ("unexpected fds", frame(&stats), true),
    ];
    let front_cases = cases.len();
    for (what, bytes, with_fd) in cases {
        let daemon = stoa.daemon_pid().expect("daemon");
        // Play the compromised front: take its end of the link and write to it.
        let link = UnixStream::from(sys::pidfd_getfd(daemon, 3)?);
        if with_fd {
            let devnull = std::fs::File::open("/dev/null")?;
            sys::send_with_fds(link.as_fd(), &bytes, &[devnull.as_fd()], false)?;
        } else {
            (&link).write_all(&bytes)?;
        }
        let new_daemon = stoa.wait_new_daemon(daemon);
        assert_ne!(new_daemon, daemon, "{what}");
        assert!(alive(broker), "the broker died on {what}");
        assert!(alive(sleeper), "bob's sleep died on {what}: {}", stoa.log());
        assert!(alive(alice_sleeper), "alice's sleep died on {what}");
        assert!(
            !alive(daemon) || state_and_ppid(daemon).map(|(_, p)| p) != Some(broker),
            "old daemon still there after {what}"
        );
        // Only the front was restarted: the workers, which hold the work, were not touched.
        assert_eq!(worker_of(&stoa, BOB), Some(bobs_worker), "{what}");
        assert_eq!(worker_of(&stoa, ALICE), Some(alices_worker), "{what}");
    }

    // A worker's link is bound to its user and to the handles it was given: bob's worker
    // naming a handle that does not exist, or alice's, is a violation too. Only that worker
    // is replaced (its user has live work, so at once); the new one takes bob's terminal
    // back; alice's work, her worker and the front are untouched.
    let front = stoa.daemon_pid().expect("daemon");
    let mut worker = bobs_worker;
    for (what, handle) in [
        ("unknown handle", Handle(987_654)),
        ("another user's handle", alices_handle),
    ] {
        let link = UnixStream::from(sys::pidfd_getfd(worker, 3)?);
        (&link).write_all(&request(RequestBody::Kill {
            handle,
            signal: Signal::Kill,
        }))?;
        drop(link);
        let old = worker;
        wait_until(
            &format!("bob's new worker after {what}"),
            Duration::from_secs(20),
            || {
                worker_of(&stoa, BOB).is_some_and(|w| w != old)
                    && terminal(&stoa, &terminal_id)["running"] == true
            },
        );
        worker = worker_of(&stoa, BOB).expect("bob's worker");
        assert!(!alive(old), "bob's old worker still runs after {what}");
        assert!(alive(broker), "the broker died on {what}");
        assert!(alive(sleeper), "bob's sleep died on {what}: {}", stoa.log());
        assert!(alive(alice_sleeper), "alice's sleep died on {what}");
        assert_eq!(worker_of(&stoa, ALICE), Some(alices_worker), "{what}");
        assert_eq!(stoa.daemon_pid(), Some(front), "{what}");
    }

    let log = stoa.log();
    assert_eq!(
        log.matches("PROTOCOL VIOLATION by the daemon").count(),
        front_cases,
        "{log}"
    );
    assert_eq!(
        log.matches("PROTOCOL VIOLATION by a worker").count(),
        2,
        "{log}"
    );
    // The root spawn inside the truncated frame never ran: no spawn of any kind as root.
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .all(|r| r["unix_user"] != "root"),
        "{audit}"
    );
    // The new front still works, and reaches the work that ran on: both terminals run, and
    // through it bob's is ended. (The front adopts nothing any more, so no process shows as
    // `adopted`: the workers kept their handles, or took them back.)
    let r = stoa.sh(ALICE, "id -un");
    assert_eq!(stdout(&r), format!("{ALICE}\n"));
    let procs = stoa.processes();
    for pid in [sleeper, alice_sleeper] {
        assert!(
            procs
                .iter()
                .any(|p| p["pid"] == pid && p["running"] == true),
            "{pid}: {procs:?}"
        );
    }
    assert_eq!(terminal(&stoa, &alice_terminal)["running"], true);
    let (status, v) = stoa.request(
        "DELETE",
        &format!("/terminals/{terminal_id}"),
        Some(&stoa.token),
        None,
    );
    assert_eq!(status, 204, "{v}");
    wait_until("bob's sleep ended", Duration::from_secs(10), || {
        !alive(sleeper)
    });
    let (status, v) = stoa.request(
        "DELETE",
        &format!("/terminals/{alice_terminal}"),
        Some(&stoa.token),
        None,
    );
    assert_eq!(status, 204, "{v}");
    Ok(())
}

fn thousand_spawns() -> Result<(), Failed> {
    let stoa = Instance::start();
    let broker = stoa.broker_pid();
    // Warm up, then wait for its Release (sent after the reply) to settle.
    stoa.sh(ALICE, "true");
    let settled = || {
        let mut last = fd_count(broker);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(50));
            let now = fd_count(broker);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    };
    let fds_before = settled();
    for i in 0..1000 {
        let tty = (i % 4 == 0).then(|| json!({ "rows": 24, "cols": 80 }));
        let (status, r) =
            stoa.exec(json!({ "unix_user": ALICE, "argv": ["/bin/true"], "tty": tty }));
        assert_eq!(
            (status, r["exit_code"].clone()),
            (200, json!(0)),
            "spawn {i}: {r}"
        );
    }
    // Releases are sent right after each reply; give the last one a moment.
    wait_until(
        "broker fds back to the start",
        Duration::from_secs(5),
        || fd_count(broker) <= fds_before,
    );
    assert_eq!(settled(), fds_before);
    assert_eq!(zombie_children(broker), 0);
    let daemon = stoa.daemon_pid().expect("daemon");
    assert_eq!(zombie_children(daemon), 0);
    Ok(())
}

fn daemon_kill_adopts() -> Result<(), Failed> {
    let stoa = Instance::start();
    // Work that outlives its request (an `/exec`'s process ends with its HTTP client, which
    // a killed front drops): a terminal, held by alice's worker.
    let (id, sleeper) = start_terminal(&stoa, ALICE, &["sleep", "8"]);
    let worker = worker_of(&stoa, ALICE).expect("alice's worker");
    let daemon = stoa.daemon_pid().expect("daemon");
    run("kill", &["-KILL", &daemon.to_string()]);
    let new_daemon = stoa.wait_new_daemon(daemon);
    assert_ne!(new_daemon, daemon);
    assert!(alive(sleeper), "the sleep died with the daemon");
    // The front held none of it: the worker that holds the work is the same one, and the
    // new front reaches it (it adopts nothing; there is nothing to adopt).
    assert_eq!(
        worker_of(&stoa, ALICE),
        Some(worker),
        "the worker was replaced"
    );
    assert_eq!(terminal(&stoa, &id)["running"], true);
    assert!(stoa.log().contains("daemon down"), "{}", stoa.log());

    // Adopting running work is the workers' part now: a killed worker is replaced at once
    // (its user has live work), and the new one takes the terminal back, up to its end.
    run("kill", &["-KILL", &worker.to_string()]);
    wait_until("alice's new worker", Duration::from_secs(20), || {
        worker_of(&stoa, ALICE).is_some_and(|w| w != worker)
    });
    assert!(alive(sleeper), "the sleep died with its worker");
    wait_until(
        "the sleep's exit at the new worker",
        Duration::from_secs(20),
        || {
            let t = terminal(&stoa, &id);
            t["running"] == false && t["exit_code"] == 0
        },
    );
    let log = stoa.log();
    assert!(log.contains("worker down"), "{log}");
    assert!(log.contains("took a terminal back"), "{log}");
    Ok(())
}

fn single_user_mode() -> Result<(), Failed> {
    let stoa = Instance::start_with(Options {
        as_user: Some(ALICE),
        ..Options::default()
    });
    let health = stoa.health().expect("health");
    assert_eq!(health["isolation"], false, "{health}");
    assert_eq!(health["mode"], "single-user");
    assert!(
        health["warning"]
            .as_str()
            .unwrap_or("")
            .contains("no isolation"),
        "{health}"
    );
    assert!(stoa.log().contains("SINGLE-USER MODE"));
    let r = stoa.sh(ALICE, "id -un");
    assert_eq!(stdout(&r), format!("{ALICE}\n"));
    let (status, r) = stoa.exec(json!({ "unix_user": BOB, "argv": ["id"] }));
    assert_eq!(
        (status, r["rule"].clone()),
        (403, json!("single-user")),
        "{r}"
    );
    Ok(())
}

fn systemd_notify() -> Result<(), Failed> {
    let path = format!("/run/stoa-test-notify-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let stoa = Instance::start_with(Options {
        env: vec![("NOTIFY_SOCKET".into(), path.clone())],
        ..Options::default()
    });
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.contains("READY=1"), "{first}");
    // READY comes once the daemon serves: it must already answer.
    assert!(stoa.health().is_some());
    drop(stoa);
    let n = sock.recv(&mut buf)?;
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn audit_log() -> Result<(), Failed> {
    let stoa = Instance::start();
    stoa.sh(ALICE, "true");
    stoa.sh(BOB, "exit 3");
    let (status, _) = stoa.exec(json!({ "unix_user": "root", "argv": ["id"] }));
    assert_eq!(status, 403);
    let daemon = stoa.daemon_pid().expect("daemon");
    let link = UnixStream::from(sys::pidfd_getfd(daemon, 3)?);
    (&link).write_all(&[0, 0, 0, 2, 9, 200])?;
    stoa.wait_new_daemon(daemon);
    let path = stoa.dir.join("broker/audit.jsonl");
    assert_eq!(
        run("stat", &["-c", "%U %a", path.to_str().unwrap()]).trim(),
        "root 600"
    );
    let records: Vec<Value> = std::fs::read_to_string(&path)?
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect();
    let of = |event: &str| {
        records
            .iter()
            .filter(|r| r["event"] == event)
            .cloned()
            .collect::<Vec<_>>()
    };
    let spawns = of("spawn");
    assert_eq!(spawns.len(), 2, "{records:?}");
    assert_eq!(spawns[0]["unix_user"], ALICE);
    assert_eq!(spawns[0]["api_user"], "admin");
    // The argv is summarised, never copied (it may be 128 KiB, or hold a prompt).
    let exec = &spawns[0]["program"]["exec"];
    assert_eq!((&exec["program"], &exec["args"]), (&json!("sh"), &json!(2)));
    assert_eq!(exec["argv_sha256"].as_str().map(str::len), Some(64));
    assert!(spawns[0]["pid"].as_i64().is_some() && spawns[0]["handle"].as_i64().is_some());
    let exits = of("exit");
    assert_eq!(exits.len(), 2, "{records:?}");
    assert!(exits
        .iter()
        .any(|e| e["unix_user"] == BOB && e["code"] == 3));
    let refused = of("refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0]["unix_user"].clone(), refused[0]["rule"].clone()),
        (json!("root"), json!("root"))
    );
    assert_eq!(of("violation").len(), 1);
    assert!(
        of("violation")[0]["what"]
            .as_str()
            .unwrap_or("")
            .contains("UnexpectedVariant"),
        "{records:?}"
    );
    assert_eq!(of("daemon_start").len(), 2);
    Ok(())
}

fn quotas() -> Result<(), Failed> {
    // Live executors per user: 200 concurrent spawns against a limit of 20.
    let stoa = Instance::start_with(Options {
        extra_policy: "max_executors_per_user = 20\nspawn_burst = 1000\n".into(),
        ..Options::default()
    });
    let broker = stoa.broker_pid();
    stoa.sh(ALICE, "true");
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = fd_count(broker);
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let (port, token) = (stoa.port, stoa.token.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut resp = agent
                    .post(format!("http://127.0.0.1:{port}/exec"))
                    .header("Authorization", format!("Bearer {token}"))
                    .send_json(json!({ "unix_user": ALICE, "argv": ["sleep", "1"] }))
                    .expect("request");
                let status = resp.status().as_u16();
                (
                    status,
                    resp.body_mut().read_json::<Value>().unwrap_or(Value::Null),
                )
            })
        })
        .collect();
    let replies: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = replies.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        ok + limited.len(),
        200,
        "other answers: {:?}",
        replies
            .iter()
            .filter(|(s, _)| *s != 200 && *s != 429)
            .collect::<Vec<_>>()
    );
    assert!((20..=40).contains(&ok), "{ok} ran (limit 20 at a time)");
    // Each 429 names its rule: the user's executor limit, or, once the user has been
    // refused a burst of times, the refusal rate (which also bounds the audit log).
    assert!(
        limited.iter().all(|v| {
            let e = v["error"].as_str().unwrap_or("");
            e.contains("executors-per-user") || e.contains("refusal-rate")
        }),
        "{limited:?}"
    );
    assert!(limited.iter().any(|v| v["error"]
        .as_str()
        .unwrap_or("")
        .contains("executors-per-user")));
    assert_eq!(stoa.health().expect("healthy")["status"], "ok");
    wait_until("broker fds back", Duration::from_secs(5), || {
        fd_count(broker) <= fds_before
    });
    assert_eq!(zombie_children(broker), 0);
    assert!(find_processes(ALICE, &["sleep", "1"]).is_empty());
    drop(stoa);

    // Spawn rate: a burst of 5, then 0.5 per second.
    let stoa = Instance::start_with(Options {
        extra_policy: "spawn_burst = 5\nspawn_rate_per_sec = 0.5\n".into(),
        ..Options::default()
    });
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            stoa.exec(json!({ "unix_user": ALICE, "argv": ["/bin/true"] }))
                .0
        })
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let (_, v) = stoa.exec(json!({ "unix_user": ALICE, "argv": ["/bin/true"] }));
    assert_eq!(
        v["error"].as_str().map(|e| e.contains("spawn-rate")),
        Some(true),
        "{v}"
    );
    // bob has his own bucket.
    assert_eq!(
        stoa.exec(json!({ "unix_user": BOB, "argv": ["/bin/true"] }))
            .0,
        200
    );
    Ok(())
}

/// Scrapes `/metrics` and returns (name, labels, value) of every sample.
fn scrape(stoa: &Instance) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(stoa.url("/metrics"))
        .header("Authorization", format!("Bearer {}", stoa.token))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.body_mut().read_to_string().unwrap();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    parsed
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            Some((
                s.metric,
                s.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                value,
            ))
        })
        .collect()
}

fn sample(
    samples: &[(String, std::collections::HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

fn metrics() -> Result<(), Failed> {
    let stoa = Instance::start();
    assert_eq!(stoa.request("GET", "/metrics", None, None).0, 401);
    let before = scrape(&stoa);
    let ok = |s: &[_]| {
        sample(
            s,
            "stoa_spawns_total",
            &[("kind", "exec"), ("result", "ok")],
        )
    };
    let refused = |s: &[_]| {
        sample(
            s,
            "stoa_spawns_total",
            &[("kind", "exec"), ("result", "refused")],
        )
    };
    for _ in 0..3 {
        stoa.sh(ALICE, "true");
    }
    stoa.exec(json!({ "unix_user": "root", "argv": ["id"] }));
    let sleeper = start_background(&stoa, BOB, &["sleep", "30"]);
    // The front's `/metrics` sums its own and every running worker's: alice's counted her
    // three execs, bob's his sleep, the front the refusal (at `OpenWorker`: root gets no
    // worker).
    let during = scrape(&stoa);
    assert_eq!(ok(&during) - ok(&before), 4.0, "3 execs and the sleep");
    assert_eq!(refused(&during) - refused(&before), 1.0, "root's refusal");
    assert_eq!(
        sample(&during, "stoa_live_executors", &[("unix_user", BOB)]),
        1.0,
        "bob's one sleep, counted once"
    );
    // Was `>= 5` (the refusal included): a refusal at `OpenWorker` never becomes a spawn
    // request to the broker, so it has no spawn time; the four that did are timed.
    assert!(sample(&during, "stoa_spawn_seconds_count", &[]) >= 4.0);
    assert!(
        sample(&during, "stoa_broker_frames_received_total", &[])
            > sample(&before, "stoa_broker_frames_received_total", &[])
    );
    // A protocol violation and the restart it causes are counted by the broker.
    let daemon = stoa.daemon_pid().expect("daemon");
    let link = UnixStream::from(sys::pidfd_getfd(daemon, 3)?);
    (&link).write_all(&[0xff, 0xff, 0xff, 0xff])?;
    stoa.wait_new_daemon(daemon);
    let after = scrape(&stoa);
    assert_eq!(
        sample(&after, "stoa_broker_protocol_violations_total", &[]),
        1.0
    );
    assert_eq!(sample(&after, "stoa_daemon_starts_total", &[]), 2.0);
    // A front restart touches no worker: the counts they keep carry on.
    assert_eq!(ok(&after) - ok(&before), 4.0, "the workers' counts");
    // The sleep's request went with the old front, and the sleep with it (an `/exec` ends
    // with its client); if it still runs, end it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper),
        nix::sys::signal::Signal::SIGKILL,
    );
    Ok(())
}

fn sighup() -> Result<(), Failed> {
    let stoa = Instance::start();
    assert_eq!(stdout(&stoa.sh(BOB, "echo hello world")), "hello world\n");
    // Work that outlives its request (an `/exec`'s process would end with the front its
    // request went through): a terminal of alice's.
    let (terminal_id, sleeper) = start_terminal(&stoa, ALICE, &["sleep", "5"]);
    // bob's uid is above alice's: cap the range at alice; cut output to 5 bytes.
    let mut policy = std::fs::read_to_string(stoa.dir.join("broker.toml"))?;
    policy.push_str(&format!("max_uid = {}\n", uid_of(ALICE)));
    std::fs::write(stoa.dir.join("broker.toml"), policy)?;
    let mut config = std::fs::read_to_string(stoa.dir.join("config.toml"))?;
    config.insert_str(0, "exec_output_limit = 5\n");
    std::fs::write(stoa.dir.join("config.toml"), config)?;
    let daemon = stoa.daemon_pid().expect("daemon");
    run("kill", &["-HUP", &stoa.broker_pid().to_string()]);
    stoa.wait_new_daemon(daemon);
    let (status, v) = stoa.exec(json!({ "unix_user": BOB, "argv": ["true"] }));
    assert_eq!(
        (status, v["rule"].clone()),
        (403, json!("uid-range")),
        "{v}"
    );
    let r = stoa.sh(ALICE, "echo hello world");
    assert_eq!(
        (stdout(&r), r["truncated"].clone()),
        ("hello".to_string(), json!(true))
    );
    // What ran meanwhile ran on, and its end is seen through the new front.
    assert!(alive(sleeper));
    wait_until("the sleep's exit", Duration::from_secs(10), || {
        let t = terminal(&stoa, &terminal_id);
        t["running"] == false && t["exit_code"] == 0
    });
    // A planned replacement is not a crash: no backoff, and said so.
    let log = stoa.log();
    assert!(
        log.contains("policy reloaded") && log.contains("replacing the daemon to apply its config"),
        "{log}"
    );
    Ok(())
}

/// A small tmpfs over a directory while it lives (unmounted on drop, even if the test fails).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "stoa-test-small",
                dir.to_str().unwrap(),
            ],
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn health_degraded() -> Result<(), Failed> {
    let stoa = Instance::start();
    let workers_dir = stoa.dir.join("workers");
    let h = stoa.health().expect("healthy");
    // The users' stores are their workers' (each checks its own on every write); the front
    // reports where they are, and checks the disk they are on.
    assert_eq!(
        (h["status"].clone(), h["workers_dir"].clone()),
        (json!("ok"), json!(workers_dir.to_str().unwrap())),
        "{h}"
    );
    assert!(h["state_dir_free_bytes"].as_u64().unwrap_or(0) > 0, "{h}");
    assert_eq!(h["limits"]["max_executors_per_user"], "64", "{h}");
    // What the cgroups enforce, or why not.
    let cgroups = h["limits"]["cgroups"].as_str().unwrap_or_default();
    assert!(
        ["v1 (", "v2 (", "not enforced: "]
            .iter()
            .any(|p| cgroups.starts_with(p)),
        "{h}"
    );
    assert!(h["limits"]["cgroup_memory_max"].is_string(), "{h}");
    // The disk the users' stores are on runs low (was: another writer held the daemon's
    // store, which the front no longer has): the front cannot promise the workers their
    // writes, and says so, and why.
    let disk = SmallDisk::mount(&workers_dir, "64m");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(stoa.url("/health"))
        .header("Authorization", format!("Bearer {}", stoa.token))
        .call()?;
    let status = resp.status().as_u16();
    let body: Value = resp.body_mut().read_json()?;
    assert_eq!(
        (status, body["status"].clone()),
        (503, json!("degraded")),
        "{body}"
    );
    assert!(
        body["state_dir_free_bytes"].as_u64().unwrap_or(u64::MAX) <= 64 << 20,
        "{body}"
    );
    let problem = body["problems"][0].as_str().unwrap_or("");
    assert!(
        problem.contains("MiB free in") && problem.contains(workers_dir.to_str().unwrap()),
        "{body}"
    );
    // Without a token: only that it is degraded, not why (paths are for users).
    let (status, brief) = stoa.request("GET", "/health", None, None);
    assert_eq!(
        (status, brief["status"].clone(), brief.get("problems")),
        (503, json!("degraded"), None),
        "{brief}"
    );
    drop(disk);
    assert_eq!(stoa.health().expect("healthy again")["status"], "ok");
    Ok(())
}
