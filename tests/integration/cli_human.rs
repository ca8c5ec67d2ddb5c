//! Issue 12: a CLI for people (cli_human). Human output under a real terminal (tmux) and
//! `--json` for scripts; `session follow`; `exec` streamed and binary-safe; the CLI's
//! errors, config and secrets; a second broker on a held state directory.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::Value;

use crate::harness::*;
use crate::sessions::{start, worktree, Fakes};
use crate::terminal_cli::Tmux;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "cli_human_output_json_log_and_follow_in_a_terminal",
        human_and_follow,
    ),
    (
        "cli_exec_streams_passes_bytes_unchanged_and_keeps_its_limits",
        exec_streams,
    ),
    (
        "cli_closed_pipe_config_url_secrets_and_policy_warnings",
        errors_config_secrets,
    ),
    (
        "cli_second_broker_refuses_a_held_state_directory",
        second_broker,
    ),
];

/// `stoa` with the test instance's files: the URL from its config (no STOA_URL), `token`.
fn cli(stoa: &Instance, token: &str) -> Command {
    let mut c = Command::new(stoa.dir.join("bin/stoa"));
    c.env_remove("STOA_URL")
        .env("STOA_CONFIG", stoa.dir.join("config.toml"))
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .env("STOA_TOKEN", token)
        .stdin(Stdio::null());
    c
}

fn ok(out: Output, what: &str) -> Result<String, Failed> {
    if !out.status.success() {
        return Err(format!(
            "{what}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A shell line that runs the instance's `stoa` with its environment (for tmux scripts).
fn env_line(stoa: &Instance, token: &str) -> String {
    format!(
        "unset STOA_URL; export STOA_CONFIG={} STOA_BROKER_CONFIG={} STOA_TOKEN={token}; stoa={}",
        stoa.dir.join("config.toml").display(),
        stoa.dir.join("broker.toml").display(),
        stoa.dir.join("bin/stoa").display()
    )
}

/// The value of a `name: value` line of human output.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
}

/// Each line's columns start where the header's do.
fn aligned(table: &str, header: &[&str]) -> Result<(), Failed> {
    let mut lines = table.lines();
    let head = lines.next().ok_or("empty table")?;
    let starts: Vec<usize> = header
        .iter()
        .map(|h| head.find(h).ok_or(format!("no {h} in {head:?}")))
        .collect::<Result<_, _>>()?;
    for line in lines {
        for &s in &starts[1..] {
            let before = line.chars().nth(s - 1);
            let at = line.chars().nth(s);
            if before != Some(' ') || at == Some(' ') || at.is_none() {
                return Err(format!("column at {s} not aligned in:\n{table}").into());
            }
        }
    }
    Ok(())
}

fn human_and_follow() -> Result<(), Failed> {
    let fakes = Fakes::install();
    let stoa = start(&fakes, "");
    let alice = stoa.api_user("human-alice", ALICE);
    let wt = worktree(ALICE);

    // create: human by default, JSON with --json.
    let shown = ok(
        cli(&stoa, &alice)
            .args(["session", "create", "--worktree", &wt])
            .output()?,
        "session create",
    )?;
    assert!(
        field(&shown, "session").is_some() && field(&shown, "worktree") == Some(wt.clone()),
        "{shown}"
    );
    assert!(
        serde_json::from_str::<Value>(&shown).is_err(),
        "not JSON: {shown}"
    );
    let created: Value = serde_json::from_str(&ok(
        cli(&stoa, &alice)
            .args(["session", "create", "--worktree", &wt, "--json"])
            .output()?,
        "session create --json",
    )?)?;
    let id = created["session_id"].as_str().ok_or("no id")?.to_string();

    // follow, in a terminal: the agent's messages appear while the task runs (SLOW: a line
    // a second), then the task's end.
    let tmux = Tmux::start(
        &stoa.dir,
        160,
        40,
        &format!(
            // The shell outlives the Ctrl-C that ends follow (a trap, not an ignore: follow
            // gets the default action).
            "{}\ntrap true INT\n\"$stoa\" session follow {id}\necho FOLLOW-ENDED\nsleep 60\n",
            env_line(&stoa, &alice)
        ),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let prompted = ok(
        cli(&stoa, &alice)
            .args(["session", "prompt", &id, "SLOW please"])
            .output()?,
        "session prompt",
    )?;
    let task_id = field(&prompted, "task").ok_or(format!("no task id in {prompted}"))?;
    assert!(field(&prompted, "status").is_some(), "{prompted}");
    let started = Instant::now();
    tmux.wait_screen("the first message while the task runs", |s| {
        s.contains("[tool Bash]")
    })?;
    let task: Value = serde_json::from_str(&ok(
        cli(&stoa, &alice)
            .args(["task", "show", &task_id, "--json"])
            .output()?,
        "task show --json",
    )?)?;
    assert_eq!(
        task["status"],
        "running",
        "follow showed a message only once the task had ended ({:?}): {task}",
        started.elapsed()
    );
    let screen = tmux.wait_screen("the task's end", |s| {
        s.contains("Hello from the mock server.")
            && s.contains(&format!("[task {task_id} completed]"))
    })?;
    assert!(
        !screen.contains("FOLLOW-ENDED"),
        "follow stopped by itself:\n{screen}"
    );
    tmux.keys(&["C-c"]);
    tmux.wait_screen("follow ends on Ctrl-C", |s| s.contains("FOLLOW-ENDED"))?;

    // list, show, log, task show: human and aligned; --json exact.
    let table = ok(
        cli(&stoa, &alice).args(["session", "list"]).output()?,
        "session list",
    )?;
    aligned(&table, &["SESSION", "TOOL", "USER", "STATUS", "WORKTREE"])?;
    assert!(table.contains(&id) && table.contains(ALICE), "{table}");
    let listed: Value = serde_json::from_str(&ok(
        cli(&stoa, &alice)
            .args(["session", "list", "--json"])
            .output()?,
        "session list --json",
    )?)?;
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["session_id"] == id.as_str())),
        "{listed}"
    );
    let shown = ok(
        cli(&stoa, &alice).args(["session", "show", &id]).output()?,
        "session show",
    )?;
    assert_eq!(field(&shown, "session"), Some(id.clone()), "{shown}");
    let tasks_table = shown
        .split_once("\n\n")
        .map(|(_, t)| t)
        .ok_or(format!("no task table in:\n{shown}"))?;
    aligned(tasks_table, &["TASK", "STATUS", "CREATED", "PROMPT"])?;
    assert!(tasks_table.contains(&task_id) && tasks_table.contains("completed"));
    let full: Value = serde_json::from_str(&ok(
        cli(&stoa, &alice)
            .args(["session", "show", &id, "--json"])
            .output()?,
        "session show --json",
    )?)?;
    assert_eq!(full["tasks"][0]["task_id"], task_id.as_str(), "{full}");
    let log = ok(
        cli(&stoa, &alice).args(["session", "log", &id]).output()?,
        "session log",
    )?;
    assert!(
        log.contains("[tool Bash]") && log.contains("Hello from the mock server."),
        "{log}"
    );
    let log_json = ok(
        cli(&stoa, &alice)
            .args(["session", "log", &id, "--json"])
            .output()?,
        "session log --json",
    )?;
    let seqs: Vec<i64> = log_json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).map(|v| v["seq"].as_i64().unwrap_or(-1)))
        .collect::<Result<_, _>>()?;
    assert!(
        !seqs.is_empty() && seqs.windows(2).all(|w| w[0] < w[1]),
        "{log_json}"
    );
    let task = ok(
        cli(&stoa, &alice)
            .args(["task", "show", &task_id])
            .output()?,
        "task show",
    )?;
    assert_eq!(
        field(&task, "status").as_deref(),
        Some("completed"),
        "{task}"
    );

    // daemon status: human, and JSON with --json.
    let status = ok(
        cli(&stoa, &stoa.token)
            .args(["daemon", "status"])
            .output()?,
        "daemon status",
    )?;
    assert!(
        field(&status, "status").as_deref() == Some("ok")
            && field(&status, "mode").as_deref() == Some("multi-user"),
        "{status}"
    );
    let health: Value = serde_json::from_str(&ok(
        cli(&stoa, &stoa.token)
            .args(["daemon", "status", "--json"])
            .output()?,
        "daemon status --json",
    )?)?;
    assert_eq!(health["status"], "ok");

    // --wait still follows one task to its end; a failed task is a failed command.
    let out = cli(&stoa, &alice)
        .args(["session", "prompt", &id, "FAIL now", "--wait"])
        .output()?;
    assert!(!out.status.success(), "a failed task exited 0");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("task failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn exec_streams() -> Result<(), Failed> {
    let stoa = Instance::start();
    let token = stoa.token.clone();

    // Output appears as it comes, in a terminal: "first" long before the command ends.
    let tmux = Tmux::start(
        &stoa.dir,
        100,
        20,
        &format!(
            "{}\n\"$stoa\" exec --user {ALICE} -- sh -c 'echo first; sleep 4; echo second'\necho EXIT=$?\nsleep 60\n",
            env_line(&stoa, &token)
        ),
    )?;
    let started = Instant::now();
    let screen = tmux.wait_screen("the first line", |s| s.contains("first"))?;
    assert!(
        !screen.contains("second") && started.elapsed() < Duration::from_secs(4),
        "output was held back until the end:\n{screen}"
    );
    tmux.wait_screen("the end", |s| s.contains("second") && s.contains("EXIT=0"))?;

    // `-t` with an interactive shell at a terminal: pointed to `stoa terminal open`.
    let tmux = Tmux::start(
        &stoa.dir,
        160,
        20,
        &format!(
            "{}\n\"$stoa\" exec -t --user {ALICE} -- bash\necho EXIT=$?\nsleep 60\n",
            env_line(&stoa, &token)
        ),
    )?;
    tmux.wait_screen("the pointer to terminal open", |s| {
        s.contains("stoa terminal open") && s.contains("EXIT=125")
    })?;

    // Every byte value in and out, unchanged (stdin and stdout are not text).
    let bytes: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let mut child = cli(&stoa, &token)
        .args(["exec", "--user", ALICE, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("stdin")?;
    let input = bytes.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| "writer panicked")??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == bytes,
        "bytes changed on the way ({} out)",
        out.stdout.len()
    );
    // stdout and stderr kept apart; the exit code is the command's.
    let out = cli(&stoa, &token)
        .args([
            "exec",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "printf '\\377\\000o'; printf e >&2; exit 3",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"\xff\x00o");
    assert_eq!(out.stderr, b"e");

    // The limits stay: output past exec_output_limit is dropped and said so; a timeout
    // kills (exit 128 + 9).
    let out = cli(&stoa, &token)
        .args([
            "exec",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "head -c 3000000 /dev/zero; echo done >&2",
        ])
        .output()?;
    assert_eq!(out.stdout.len(), 1 << 20);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("done\n") && stderr.contains("truncated"),
        "{stderr}"
    );
    let out = cli(&stoa, &token)
        .args([
            "exec",
            "--user",
            ALICE,
            "--timeout",
            "0.3",
            "--",
            "sleep",
            "30",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    // Abuse: a client that goes away mid-stream kills its command; nothing is left.
    let mut child = cli(&stoa, &token)
        .args([
            "exec",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 301",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().ok_or("stdout")?),
        &mut line,
    )?;
    assert_eq!(line, "up\n");
    wait_until("the sleep runs", Duration::from_secs(5), || {
        !find_processes(ALICE, &["sleep", "301"]).is_empty()
    });
    child.kill()?;
    child.wait()?;
    wait_until(
        "the sleep is killed with its client",
        Duration::from_secs(10),
        || find_processes(ALICE, &["sleep", "301"]).is_empty(),
    );

    // Abuse: bad input is refused with words, and runs nothing.
    let (status, r) = stoa.exec(serde_json::json!({
        "unix_user": ALICE, "argv": ["true"], "stdin": "a", "stdin_base64": "YQ=="
    }));
    assert_eq!(status, 400, "{r}");
    let (status, r) = stoa.exec(serde_json::json!({
        "unix_user": ALICE, "argv": ["true"], "stdin_base64": "not base64!"
    }));
    assert_eq!(status, 400, "{r}");
    assert!(r["error"].as_str().unwrap_or("").contains("base64"), "{r}");
    // The old JSON form is unchanged.
    let r = stoa.sh(ALICE, "printf hi");
    assert_eq!(r["stdout"], "hi");
    Ok(())
}

fn errors_config_secrets() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("cfg-alice", ALICE);

    // A closed pipe ends the command quietly (by SIGPIPE, as other tools): no panic. The
    // reader is gone before stoa starts, so its first line meets a closed pipe.
    let err_file = stoa.dir.join("doctor.err");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{{ sleep 0.3; exec {} doctor 2>{}; }} | true; echo ${{PIPESTATUS[0]}}",
            stoa.dir.join("bin/stoa").display(),
            err_file.display()
        ))
        .env("STOA_CONFIG", stoa.dir.join("config.toml"))
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .output()?;
    let err = std::fs::read_to_string(&err_file)?;
    assert!(
        !err.contains("panicked"),
        "stoa doctor | true panicked:\n{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "141",
        "stoa doctor did not end by SIGPIPE; stderr: {err}"
    );

    // The daemon's address comes from STOA_CONFIG (cli() sets no STOA_URL); a daemon that
    // is not there is named.
    ok(
        cli(&stoa, &alice).args(["session", "list"]).output()?,
        "session list by STOA_CONFIG",
    )?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let other = stoa.dir.join("other.toml");
    std::fs::write(&other, format!("listen = \"0.0.0.0:{dead}\"\n"))?;
    let out = cli(&stoa, &alice)
        .env("STOA_CONFIG", &other)
        .args(["session", "list"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("http://127.0.0.1:{dead}")),
        "{stderr}"
    );

    // config get: the file's value, else the default in force; an unknown key is refused.
    let out = cli(&stoa, &alice)
        .args(["config", "get", "exec_output_limit"])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    assert!(String::from_utf8_lossy(&out.stderr).contains("default"));
    let out = cli(&stoa, &alice)
        .args(["config", "get", "no_such.setting"])
        .output()?;
    assert!(!out.status.success());
    // config set: an env value is the text typed; a command is a path or a list.
    ok(
        cli(&stoa, &alice)
            .args(["config", "set", "agents.codex.env.RETRIES", "123"])
            .output()?,
        "config set env",
    )?;
    ok(
        cli(&stoa, &alice)
            .args([
                "config",
                "set",
                "agents.codex.command",
                "/opt/my tools/codex",
            ])
            .output()?,
        "config set command (path)",
    )?;
    ok(
        cli(&stoa, &alice)
            .args([
                "config",
                "set",
                "agents.gemini.command",
                "[\"npx\", \"gemini\"]",
            ])
            .output()?,
        "config set command (list)",
    )?;
    let text = std::fs::read_to_string(stoa.dir.join("config.toml"))?;
    assert!(
        text.contains("RETRIES = \"123\"")
            && text.contains("command = \"/opt/my tools/codex\"")
            && text.contains("command = [\"npx\", \"gemini\"]"),
        "{text}"
    );
    stoa_cfg_loads(&stoa)?;

    // Secrets: a bad name is refused with words and stores nothing; typed at a terminal the
    // value is not shown.
    let out = cli(&stoa, &alice)
        .args(["secret", "set", "bad-name"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("capital letters"),
        "{stderr}"
    );
    let tmux = Tmux::start(
        &stoa.dir,
        120,
        20,
        &format!(
            "{}\n\"$stoa\" secret set MY_KEY\necho EXIT=$?\nsleep 60\n",
            env_line(&stoa, &alice)
        ),
    )?;
    tmux.wait_screen("the prompt", |s| s.contains("value for MY_KEY"))?;
    tmux.keys(&["-l", "hunter2-not-shown"]);
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_screen("stored", |s| s.contains("EXIT="))?;
    assert!(
        screen.contains("EXIT=0") && !screen.contains("hunter2"),
        "the secret was shown or not stored:\n{screen}"
    );
    let names = ok(
        cli(&stoa, &alice).args(["secret", "list"]).output()?,
        "secret list",
    )?;
    assert_eq!(names.trim(), "MY_KEY");

    // user add warns when the policy would refuse the Unix user (carol: not in the group).
    let out = Command::new(stoa.dir.join("bin/stoa"))
        .args(["user", "add", "carol-api", "--unix-user", CAROL])
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("warning") && stderr.contains("allow-group"),
        "{stderr}"
    );
    let out = Command::new(stoa.dir.join("bin/stoa"))
        .args(["user", "add", "bob-api", "--unix-user", BOB])
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .output()?;
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users = ok(
        Command::new(stoa.dir.join("bin/stoa"))
            .args(["user", "list"])
            .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
            .output()?,
        "user list",
    )?;
    aligned(&users, &["NAME", "UNIX USER", "ADMIN", "CREATED"])?;
    Ok(())
}

/// The edited config still loads: the daemon restarts on it and answers.
fn stoa_cfg_loads(stoa: &Instance) -> Result<(), Failed> {
    let before = stoa.daemon_pid().ok_or("no daemon")?;
    ok(
        cli(stoa, &stoa.token)
            .args(["daemon", "restart"])
            .output()?,
        "daemon restart on the edited config",
    )?;
    assert_ne!(stoa.wait_new_daemon(before), before);
    Ok(())
}

fn second_broker() -> Result<(), Failed> {
    let mut stoa = Instance::start();
    // Same policy (so the same state directory), a config of its own (another port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = stoa.dir.join("second.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n",
            stoa.dir.join("daemon2").display()
        ),
    )?;
    let token_before = std::fs::read(stoa.dir.join("broker/admin.token"))?;
    let mut second = Command::new(stoa.dir.join("bin/stoa"))
        .arg("serve")
        .arg("--broker-config")
        .arg(stoa.dir.join("broker.toml"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            return Err("a second broker on the same state directory kept running".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = second.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success() && stderr.contains("another stoa broker"),
        "{status:?}: {stderr}"
    );
    // The first one was not disturbed, and nothing of the second is left.
    assert_eq!(
        std::fs::read(stoa.dir.join("broker/admin.token"))?,
        token_before
    );
    assert!(
        stoa.health().is_some(),
        "the first broker stopped answering"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // Once the first is gone the directory is free again.
    let pid = stoa.broker_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    stoa.wait_exit(Duration::from_secs(20))
        .ok_or("the first broker did not stop")?;
    let mut third = Command::new(stoa.dir.join("bin/stoa"))
        .arg("serve")
        .arg("--broker-config")
        .arg(stoa.dir.join("broker.toml"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let up = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        ureq::get(format!("http://127.0.0.1:{port}/health"))
            .call()
            .is_ok()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(third.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = third.wait();
    assert!(
        up,
        "a broker could not take the state directory once it was free"
    );
    Ok(())
}
