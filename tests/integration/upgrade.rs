//! Issue 14, upgrade in place: `stoa daemon upgrade` re-execs the broker into the binary now
//! installed, keeping its pid and every user's work; a broken new binary leaves the old
//! broker serving.
//!
//! alice has a terminal whose shell prints a numbered line every 20 ms and has a `sleep`
//! beside it, with a viewer attached; bob has an agent task mid-run (the fake agent's LONG
//! answer: a message every 4 s). The binary is replaced (a new file, as a package upgrade
//! does) and the broker upgraded: its pid stays, `/proc/PID/exe` is the new file, the shell,
//! the sleep and the agent are the same processes, the viewer reconnects and finds every
//! line (none lost, none repeated), the task completes with every message, `/health` says
//! when the broker upgraded. Then `/bin/false` and a truncated ELF as the new binary: the
//! command fails and says why, and the old broker goes on serving.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;
use crate::login::{cookie_of, http, login, set_password};
use crate::sessions::{
    assert_whole_bash_run, create_session, messages, prompt, wait_task, worktree, Fakes,
};
use crate::terminals::{connect, open, resume_every_line};

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "upgrade_in_place_keeps_every_users_work_and_a_broken_binary_changes_nothing",
        upgrade_in_place,
    ),
    (
        "upgrade_in_place_in_single_user_mode_by_that_user",
        single_user_upgrade,
    ),
];

/// Without root (one user, no isolation) the same: that user asks, the broker keeps its pid
/// and the user's terminal; someone else cannot ask.
fn single_user_upgrade() -> Result<(), Failed> {
    let stoa = Instance::start_with(Options {
        as_user: Some(ALICE),
        ..Options::default()
    });
    let broker = stoa.broker_pid();
    let t = open(
        &stoa,
        &stoa.token,
        json!({ "unix_user": ALICE, "cols": 80, "rows": 24, "command": ["sleep", "1000"] }),
    );
    let shell = t["pid"].as_i64().unwrap() as i32;
    let installed = stoa.dir.join("bin/stoa");
    install(&installed.clone(), &installed, b"\0single-user build 2");
    let config = stoa.dir.join(format!("home-{ALICE}/broker.toml"));
    let ask = |user: &str| {
        Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(&installed)
            .args(["daemon", "upgrade", "--timeout", "60", "--broker-config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    // Bob cannot even read where the broker is.
    let refused = ask(BOB);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let out = ask(ALICE);
    assert!(out.status.success(), "{out:?}\n{}", stoa.log());
    assert_eq!(stoa.broker_pid(), broker);
    assert_eq!(
        exe_of(broker).1,
        std::fs::metadata(&installed).unwrap().ino()
    );
    let health = stoa.wait_healthy(Duration::from_secs(20));
    assert_eq!(health["broker"]["upgrades"], 1, "{health}");
    assert_eq!(health["mode"], "single-user");
    let (status, r) = stoa.exec(json!({ "unix_user": ALICE, "argv": ["id", "-un"] }));
    assert_eq!(
        (status, r["stdout"].as_str()),
        (200, Some(&*format!("{ALICE}\n")))
    );
    assert!(alive(shell), "the terminal's process is gone");
    Ok(())
}

/// Puts `from` at `installed` the way a package manager does: a new file renamed over the
/// old one (a new inode; the running broker's old file is then "deleted").
fn install(from: &Path, installed: &Path, extra: &[u8]) {
    let tmp = installed.with_extension("new");
    let mut bytes = std::fs::read(from).unwrap();
    // Trailing bytes make a different file with the same program (the loader ignores them).
    bytes.extend_from_slice(extra);
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, installed).unwrap();
}

/// `stoa daemon upgrade` with the instance's policy: (exit code, stderr).
fn upgrade(stoa: &Instance, program: &Path) -> (i32, String) {
    let out = Command::new(program)
        .args(["daemon", "upgrade", "--timeout", "90", "--broker-config"])
        .arg(stoa.dir.join("broker.toml"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exe_of(pid: i32) -> (String, u64) {
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .display()
        .to_string();
    let ino = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino();
    (link, ino)
}

fn upgrade_in_place() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = crate::sessions::start(&fakes, "");
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let installed = stoa.dir.join("bin/stoa");
    // A copy of the first binary to install again later (the instance's own is replaced).
    let pristine = stoa.dir.join("stoa.pristine");
    std::fs::copy(&installed, &pristine).unwrap();

    // alice: a shell printing numbered lines, a sleep beside it, a viewer from line 0.
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c",
            "sleep 1000 & i=0; while :; do echo line $i; i=$((i+1)); sleep 0.02; done"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let shell = t["pid"].as_i64().unwrap() as i32;
    let mut v = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    v.hello(0, true);
    v.wait_for("line 20\r\n", Duration::from_secs(10));
    let sleeps = find_processes(ALICE, &["sleep", "1000"]);
    assert_eq!(sleeps.len(), 1, "{sleeps:?}");

    // bob: an agent task mid-run (five messages, one a second).
    let session = create_session(&stoa, &bob, "claude-code", &worktree(BOB));
    // Five messages, one every 4 s: it runs through the upgrade even on a slow machine.
    let task = prompt(&stoa, &bob, &session, "LONG");
    wait_until("bob's task under way", Duration::from_secs(10), || {
        !messages(&stoa, &bob, &session).is_empty()
    });
    let agent: Vec<i32> = crate::sessions::live_processes_of(BOB)
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a.ends_with("fake-agent")))
        .map(|(p, _)| p)
        .collect();
    assert!(!agent.is_empty(), "bob's agent is not running");

    // alice also logged in with her password (a browser's cookie): the log-in is carried.
    set_password(ALICE, "upgrade horse 1");
    let logged_in = login(stoa.port, ALICE, "upgrade horse 1");
    assert_eq!(logged_in.status, 200, "{:?}", logged_in.body);
    let cookie = cookie_of(&logged_in);
    let as_cookie = |stoa: &Instance| {
        http(
            stoa.port,
            "GET",
            "/terminals",
            &[("Cookie", cookie.as_str())],
            None,
        )
    };
    assert_eq!(as_cookie(&stoa).status, 200);

    let broker = stoa.broker_pid();
    let (old_exe, old_ino) = exe_of(broker);
    let front = stoa.daemon_pid().expect("front");
    let alice_worker = stoa.worker_pid(ALICE).expect("alice's worker");
    let bob_worker = stoa.worker_pid(BOB).expect("bob's worker");
    let before = stoa.wait_healthy(Duration::from_secs(10));
    assert_eq!(before["broker"]["upgrades"], 0, "{before}");
    assert_eq!(before["broker"]["pid"], broker, "{before}");
    assert_eq!(before["broker"]["upgraded_at"], Value::Null, "{before}");

    // The package manager puts a new build in place; the operator reloads.
    install(&pristine, &installed, b"\0stoa-upgrade-test-build-2");
    let new_ino = std::fs::metadata(&installed).unwrap().ino();
    assert_ne!(new_ino, old_ino);
    let asked = Instant::now();
    let (code, said) = upgrade(&stoa, &installed);
    let took = asked.elapsed();
    eprintln!("upgrade in place: the command took {took:?}");
    assert_eq!(code, 0, "{said}\n{}", stoa.log());
    assert!(said.contains("upgraded in place"), "{said}");

    // The same broker process, now running the new file.
    assert_eq!(stoa.broker_pid(), broker);
    let (exe, ino) = exe_of(broker);
    assert_eq!(ino, new_ino, "the broker runs {exe}, not the new file");
    assert_eq!(exe, old_exe, "{exe}");
    assert!(!exe.ends_with("(deleted)"), "{exe}");
    // Every user's processes are the same ones.
    assert!(alive(shell), "alice's shell is gone");
    assert_eq!(find_processes(ALICE, &["sleep", "1000"]), sleeps);
    for p in &agent {
        assert!(alive(*p), "bob's agent {p} is gone");
    }
    // The front and the workers are replaced by the new binary.
    let new_front = stoa.wait_new_daemon(front);
    assert_ne!(new_front, front);
    let new_alice = stoa.wait_new_worker(ALICE, alice_worker);
    stoa.wait_new_worker(BOB, bob_worker);
    for p in [new_front, new_alice] {
        assert_eq!(exe_of(p).1, new_ino, "process {p} runs the old binary");
    }
    let health = stoa.wait_healthy(Duration::from_secs(20));
    eprintln!(
        "upgrade in place: serving again (/health) {:?} after it was asked",
        asked.elapsed()
    );
    assert_eq!(health["broker"]["upgrades"], 1, "{health}");
    let listed = as_cookie(&stoa);
    assert_eq!(listed.status, 200, "the log-in was lost: {:?}", listed.body);
    assert_eq!(health["broker"]["pid"], broker, "{health}");
    assert!(health["broker"]["upgraded_at"].is_string(), "{health}");
    assert_eq!(
        health["broker"]["started_at"],
        before["broker"]["started_at"]
    );

    // The viewer was cut when alice's worker went; it reconnects from what it had and
    // finds every line since, none lost, none twice.
    resume_every_line(&stoa, &id, &alice, &mut v, "the upgrade");

    // bob's task completes, every message once, in order.
    let t = wait_task(&stoa, &bob, &task);
    assert_eq!(t["status"], "completed", "{t}");
    let msgs = messages(&stoa, &bob, &session);
    assert_whole_bash_run(&msgs);

    // The audit log has both sides of it.
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl")).unwrap();
    assert!(audit.contains("\"event\":\"broker_upgrade\""), "{audit}");
    assert!(audit.contains("\"event\":\"broker_upgraded\""), "{audit}");

    // A broken new binary: a program that exits 1, then a truncated ELF. The command
    // fails and says why; the broker is the same, on the same file, and serves.
    let pristine_bytes = std::fs::read(&pristine).unwrap();
    let truncated = stoa.dir.join("stoa.truncated");
    std::fs::write(&truncated, &pristine_bytes[..4096]).unwrap();
    for (broken, why) in [
        (
            Path::new("/bin/false"),
            "did not accept the state (it exited with 1)",
        ),
        // Killed by a signal, or refused by exec, depending on where the cut falls.
        (truncated.as_path(), ""),
    ] {
        install(broken, &installed, b"");
        let (code, said) = upgrade(&stoa, &pristine);
        assert_eq!(code, 1, "{broken:?}: {said}");
        assert!(
            said.contains(why)
                && (said.contains("did not accept the state")
                    || said.contains("cannot be started")),
            "{broken:?}: {said}"
        );
        assert!(said.contains("keeps serving"), "{said}");
        assert_eq!(stoa.broker_pid(), broker);
        assert_eq!(exe_of(broker).1, new_ino, "the broker left its binary");
        assert!(alive(shell));
        let health = stoa.wait_healthy(Duration::from_secs(10));
        assert_eq!(health["broker"]["upgrades"], 1, "{health}");
        let (status, out) = stoa.exec(json!({ "unix_user": ALICE, "argv": ["id", "-un"] }));
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["stdout"].as_str().unwrap().trim(), ALICE);
    }
    // The terminal is still there after all that, and still typed into.
    let mut last_view = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    last_view.hello(stoa::terminal::protocol::FROM_NOW, true);
    last_view.wait_for("line ", Duration::from_secs(10));
    let outcome: Value = serde_json::from_str(
        &std::fs::read_to_string(stoa.dir.join("broker/upgrade.json")).unwrap(),
    )?;
    assert_eq!(outcome["ok"], false, "{outcome}");
    assert_eq!(outcome["attempt"], 3, "{outcome}");
    Ok(())
}
