//! Issue 14, Landlock: a confined run writes only beneath its allowed paths (EACCES
//! elsewhere, even where its user may write), and cannot signal its user's processes
//! outside it; the task, the exec result and `/health` say whether and at which ABI.
//!
//! `confine.required` on a kernel without Landlock: `stoa serve` runs under a seccomp filter
//! that answers the Landlock system calls with ENOSYS (`tests/tools/without-landlock.c`,
//! compiled here with `cc`), which is what a kernel built without it, or a container
//! runtime's older seccomp profile, answers.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;
use crate::sessions::worktree;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "landlock_agents_write_only_where_allowed_and_exec_when_the_policy_says",
        confined_writes,
    ),
    (
        "landlock_a_confined_run_cannot_signal_its_users_other_processes",
        scoped_signals,
    ),
    (
        "landlock_required_refuses_where_the_kernel_has_none",
        required_without_landlock,
    ),
];

/// `tests/tools/without-landlock.c`, compiled into a root-owned directory; `None` (and
/// why) when there is no C compiler.
fn without_landlock() -> Result<PathBuf, String> {
    let dir = PathBuf::from(format!("/run/stoa-test-{}-no-landlock", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let bin = dir.join("without-landlock");
    // Built beforehand where this machine has no compiler (the cgroup v2 VM: ci-stage.sh).
    if let Some(prebuilt) = std::env::var_os("STOA_TEST_WITHOUT_LANDLOCK") {
        std::fs::copy(&prebuilt, &bin).map_err(|e| format!("{prebuilt:?}: {e}"))?;
        return Ok(bin);
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/without-landlock.c");
    let out = std::process::Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("no C compiler (cc): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // It works: under it, a program sees no Landlock.
    let probe = std::process::Command::new(&bin)
        .args(["sh", "-c", "exit 0"])
        .status()
        .map_err(|e| e.to_string())?;
    if !probe.success() {
        return Err("without-landlock does not run here (seccomp refused?)".into());
    }
    Ok(bin)
}

fn required_without_landlock() -> Result<(), Failed> {
    let wrapper = match without_landlock() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("SKIPPED: landlock_required_refuses_where_the_kernel_has_none: {why}");
            return Ok(());
        }
    };
    let outside = Outside::new(ALICE);
    let out = outside.0.display().to_string();
    let script = probe_script(&out);
    let home = format!("/home/{ALICE}");
    // Required: a run the policy confines is refused in words, and nothing runs.
    let stoa = Instance::start_with(Options {
        extra_policy: "[confine]\nexec = true\nrequired = true\n".into(),
        wrapper: Some(wrapper.clone()),
        ..Options::default()
    });
    let health = stoa.wait_healthy(Duration::from_secs(20));
    let landlock = health["limits"]["landlock"].as_str().unwrap_or("");
    assert!(landlock.starts_with("not enforced"), "{health}");
    let (status, reply) = stoa.exec(json!({
        "unix_user": ALICE, "cwd": home, "argv": ["sh", "-c", script]
    }));
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["rule"], "confine.required", "{reply}");
    let error = reply["error"].as_str().unwrap_or("");
    assert!(
        error.contains("requires confined runs"),
        "the refusal says why: {reply}"
    );
    assert!(!outside.0.join("written").exists(), "nothing ran");
    drop(stoa);
    // Not required: the run goes on unconfined, and says so.
    let stoa = Instance::start_with(Options {
        extra_policy: "[confine]\nexec = true\n".into(),
        wrapper: Some(wrapper.clone()),
        ..Options::default()
    });
    let reply = exec_probe(&stoa, &home, &script);
    check_probe(reply["stdout"].as_str().unwrap(), false);
    assert!(
        reply["confinement"]
            .as_str()
            .is_some_and(|c| c.starts_with("none")),
        "{reply}"
    );
    drop(stoa);
    let _ = std::fs::remove_dir_all(wrapper.parent().unwrap());
    Ok(())
}

/// Writes attempted by a run, each reported as "<name> ok" or "<name> denied: <error>".
fn probe_script(outside: &str) -> String {
    format!(
        r#"try() {{ if err=$(sh -c "$2" 2>&1); then echo "$1 ok"; else echo "$1 denied: $err"; fi; }}
try outside 'echo x > {outside}/written'
try home 'echo x > "$HOME/.stoa-ll-probe"'
try tmp 'echo x > /tmp/stoa-ll-probe-$$ && rm /tmp/stoa-ll-probe-$$'
try cwd 'echo x > cwd-probe'
try devnull 'echo x > /dev/null'
"#
    )
}

/// A directory the user owns outside every allowed path: unconfined, she can write it.
struct Outside(PathBuf);

impl Outside {
    fn new(user: &str) -> Outside {
        let dir = PathBuf::from("/srv/stoa-ll-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chown", &[&format!("{user}:"), dir.to_str().unwrap()]);
        Outside(dir)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_probe(report: &str, confined: bool) {
    let line = |name: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line in {report:?}"))
            .to_string()
    };
    for allowed in ["home", "tmp", "cwd", "devnull"] {
        assert_eq!(line(allowed), format!("{allowed} ok"), "{report}");
    }
    let outside = line("outside");
    if confined {
        assert!(
            outside.starts_with("outside denied") && outside.contains("Permission denied"),
            "a confined run wrote outside (or not with EACCES): {report}"
        );
    } else {
        assert_eq!(
            outside, "outside ok",
            "unconfined, alice can write there: {report}"
        );
    }
}

fn exec_probe(stoa: &Instance, cwd: &str, script: &str) -> Value {
    let (status, reply) = stoa.exec(json!({
        "unix_user": ALICE, "cwd": cwd, "argv": ["sh", "-c", script]
    }));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["exit_code"], 0, "{reply}");
    reply
}

fn confined_writes() -> Result<(), Failed> {
    let outside = Outside::new(ALICE);
    let out = outside.0.display().to_string();
    let script = probe_script(&out);
    // The agent: the probe, then a recorded answer, so the task completes.
    let agent_dir = PathBuf::from(format!("/run/stoa-test-{}-ll-agent", std::process::id()));
    let _ = std::fs::remove_dir_all(&agent_dir);
    std::fs::create_dir_all(&agent_dir).unwrap();
    run("chmod", &["0755", agent_dir.to_str().unwrap()]);
    let agent = agent_dir.join("probe-agent");
    std::fs::write(
        &agent,
        format!("#!/bin/sh\n{{\n{script}}} > .probe 2>&1\ncat \"$1\"\n"),
    )
    .unwrap();
    run("chmod", &["0755", agent.to_str().unwrap()]);
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/agents/claude-code-2.1.197-bash-tool.jsonl");
    std::fs::copy(&fixture, agent_dir.join("fixture.jsonl")).unwrap();
    run(
        "chmod",
        &["0644", agent_dir.join("fixture.jsonl").to_str().unwrap()],
    );
    let config = format!(
        "[agents.claude-code]\ncommand = [\"{}\", \"{}\"]\n",
        agent.display(),
        agent_dir.join("fixture.jsonl").display()
    );
    let stoa = Instance::start_with(Options {
        extra_config: format!("{config}\n"),
        ..Options::default()
    });

    // /health says what the broker applies.
    let health = stoa.wait_healthy(Duration::from_secs(20));
    let landlock = health["limits"]["landlock"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(landlock.starts_with("abi "), "{health}");
    // "abi 7 (writes; …)": what a run reports is "landlock abi 7".
    let landlock: String = landlock.split(' ').take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(
        health["limits"]["confine"],
        "agents on, terminals off, exec off; required no"
    );

    // exec is not confined by default: alice can write the outside directory.
    let home = format!("/home/{ALICE}");
    let reply = exec_probe(&stoa, &home, &script);
    check_probe(reply["stdout"].as_str().unwrap(), false);
    assert!(
        reply["confinement"]
            .as_str()
            .unwrap_or("")
            .contains("confine.exec = false"),
        "{reply}"
    );
    std::fs::remove_file(outside.0.join("written")).unwrap();

    // An agent's task is: it writes its worktree, home, /tmp, /dev/null, and not there.
    let alice = stoa.api_user("alice", ALICE);
    let wt = worktree(ALICE);
    let session = crate::sessions::create_session(&stoa, &alice, "claude-code", &wt);
    let task = crate::sessions::prompt(&stoa, &alice, &session, "probe");
    let t = crate::sessions::wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(
        t["confinement"],
        format!("landlock {landlock}").as_str(),
        "{t}"
    );
    let report = std::fs::read_to_string(format!("{wt}/.probe")).unwrap_or_default();
    check_probe(&report, true);
    assert!(!outside.0.join("written").exists());
    drop(stoa);

    // With `exec = true`, exec is confined too.
    let stoa = Instance::start_with(Options {
        extra_policy: "[confine]\nexec = true\n".into(),
        ..Options::default()
    });
    let reply = exec_probe(&stoa, &home, &script);
    check_probe(reply["stdout"].as_str().unwrap(), true);
    assert_eq!(
        reply["confinement"],
        format!("landlock {landlock}").as_str()
    );
    assert!(!outside.0.join("written").exists());
    let _ = std::fs::remove_dir_all(&agent_dir);
    Ok(())
}

fn scoped_signals() -> Result<(), Failed> {
    let stoa = Instance::start_with(Options {
        extra_policy: "[confine]\nexec = true\n".into(),
        ..Options::default()
    });
    let health = stoa.wait_healthy(Duration::from_secs(20));
    let abi: u32 = health["limits"]["landlock"]
        .as_str()
        .and_then(|l| l.strip_prefix("abi "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if abi < 6 {
        return Err(format!(
            "WAITING: this kernel's Landlock ABI is {abi}: signal scoping needs 6"
        )
        .into());
    }
    // One of alice's processes outside stoa, unconfined.
    let mut sleeper = std::process::Command::new("runuser")
        .args(["-u", ALICE, "--", "sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(&pid) = find_processes(ALICE, &["sleep", "60"]).first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "alice's sleep did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let home = format!("/home/{ALICE}");
    let reply = exec_probe(
        &stoa,
        &home,
        &format!("if kill -TERM {pid} 2>err; then echo sent; else cat err; fi; rm -f err"),
    );
    let said = reply["stdout"].as_str().unwrap_or("").to_string();
    assert!(
        alive(pid),
        "a confined run killed alice's process outside it: {said}"
    );
    assert!(said.contains("not permitted"), "not EPERM: {said}");
    drop(stoa);
    // Unconfined, the same run can (the test can fail).
    let stoa = Instance::start();
    let reply = exec_probe(&stoa, &home, &format!("kill -TERM {pid} && echo sent"));
    assert_eq!(
        reply["stdout"].as_str().unwrap_or("").trim(),
        "sent",
        "{reply}"
    );
    let _ = sleeper.wait();
    Ok(())
}
