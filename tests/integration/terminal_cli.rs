//! Issue 4: terminals (terminal_cli): `stoa terminal open|list|attach|kill`, run under a
//! real terminal (tmux) or with pipes.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "cli_open_in_a_tty_size_user_resize_exit_code_and_tty_restored",
        open_in_tmux,
    ),
    ("cli_list_and_kill_end_a_login_shell", list_and_kill),
    ("cli_open_with_pipes_forwards_stdin_and_exit_code", pipes),
    (
        "cli_open_as_the_tokens_user_and_in_a_session_worktree",
        token_user_and_session,
    ),
    (
        "cli_attach_writer_and_viewer_share_a_terminal",
        attach_and_view,
    ),
    (
        "cli_detach_and_sigterm_restore_the_tty_and_leave_it_running",
        detach_and_sigterm,
    ),
    (
        "cli_reconnects_after_the_daemon_is_killed",
        reconnect_after_daemon_kill,
    ),
];

static TMUXES: AtomicU32 = AtomicU32::new(0);

/// A tmux server of our own (its own socket) running one script in a pane; killed on drop.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    pub fn start(dir: &Path, cols: u16, rows: u16, script: &str) -> Result<Tmux, Failed> {
        if Command::new("tmux").arg("-V").output().is_err() {
            return Err("tmux is not installed (.ci/run installs it)".into());
        }
        let n = TMUXES.fetch_add(1, Ordering::SeqCst);
        let script_path = dir.join(format!("tmux-{n}.sh"));
        std::fs::write(&script_path, script)?;
        let tmux = Tmux {
            socket: dir.join(format!("tmux-{n}.sock")),
        };
        let out = tmux.cmd(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            &format!("sh {}", script_path.display()),
        ]);
        if !out.status.success() {
            return Err(format!("tmux: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(tmux)
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux")
    }

    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend(keys);
        self.cmd(&args);
    }

    /// Waits until the screen satisfies `ok`; the screen in the error otherwise.
    pub fn wait_screen(&self, what: &str, ok: impl Fn(&str) -> bool) -> Result<String, Failed> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}; screen:\n{screen}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn cli(stoa: &Instance) -> Command {
    let mut c = Command::new(stoa.dir.join("bin/stoa"));
    c.env("STOA_URL", stoa.url(""))
        .env("STOA_TOKEN", &stoa.token);
    c
}

fn list_json(stoa: &Instance) -> Result<Vec<Value>, Failed> {
    let out = cli(stoa).args(["terminal", "list", "--json"]).output()?;
    if !out.status.success() {
        return Err(format!("list: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice::<Value>(&out.stdout)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The one terminal of `user` (there must be exactly one).
fn only_terminal(stoa: &Instance, user: &str) -> Result<Value, Failed> {
    let mine: Vec<Value> = list_json(stoa)?
        .into_iter()
        .filter(|t| t["unix_user"] == user)
        .collect();
    match mine.as_slice() {
        [t] => Ok(t.clone()),
        other => Err(format!("expected one terminal of {user}, got {other:?}").into()),
    }
}

fn wait_file(path: &Path) -> Result<String, Failed> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return Ok(text);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no {}", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shell script for tmux: the CLI with `args`, then its exit code and the tty's settings
/// before and after, into `dir`.
fn tmux_script(stoa: &Instance, dir: &Path, args: &str) -> String {
    let d = dir.display();
    format!(
        "export STOA_URL='{url}' STOA_TOKEN='{token}'\n\
         stty -g > {d}/before\n\
         {bin} terminal {args}\n\
         echo rc=$? > {d}/rc.tmp; mv {d}/rc.tmp {d}/rc\n\
         stty -g > {d}/after; stty -a > {d}/after-a\n\
         exec sleep 600\n",
        url = stoa.url(""),
        token = stoa.token,
        bin = stoa.dir.join("bin/stoa").display(),
    )
}

/// The tty is as it was before the CLI, and cooked (line editing, echo).
fn assert_tty_restored(dir: &Path) -> Result<(), Failed> {
    let before = std::fs::read_to_string(dir.join("before"))?;
    let after = wait_file(&dir.join("after"))?;
    assert_eq!(before, after, "the tty's settings changed");
    let settings = wait_file(&dir.join("after-a"))?;
    let words: Vec<&str> = settings.split([' ', ';', '\n']).collect();
    for flag in ["icanon", "echo", "isig", "opost", "icrnl"] {
        assert!(
            words.contains(&flag),
            "{flag} is not on after the CLI:\n{settings}"
        );
    }
    Ok(())
}

fn open_in_tmux() -> Result<(), Failed> {
    let stoa = Instance::start();
    let dir = stoa.dir.join("tty");
    std::fs::create_dir_all(&dir)?;
    let remote = "stty size; id -un; tty; echo term=$TERM; \
                  while read x; do case $x in q) exit 3;; *) stty size;; esac; done";
    let script = tmux_script(
        &stoa,
        &dir,
        &format!("open --user {ALICE} -- sh -c '{remote}'"),
    );
    let tmux = Tmux::start(&dir, 100, 30, &script)?;
    // What the program printed before the CLI attached is there, and it ran on a terminal
    // of the pane's size, as alice.
    let screen = tmux.wait_screen("the remote output", |s| {
        s.contains("30 100") && s.contains(ALICE) && s.contains("term=")
    })?;
    assert!(screen.contains("/dev/pts/"), "not a pty:\n{screen}");
    assert!(
        !screen.contains("term=xterm-256color"),
        "the local TERM was not passed:\n{screen}"
    );

    // The list shows it running, as alice.
    let t = only_terminal(&stoa, ALICE)?;
    let id = t["terminal_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(t["running"], true, "{t}");
    assert_eq!(
        (t["cols"].as_u64(), t["rows"].as_u64()),
        (Some(100), Some(30))
    );
    let pid = t["pid"].as_i64().unwrap_or_default() as i32;
    let uid = status_field(pid, "Uid").unwrap_or_default();
    assert_eq!(
        uid.split_whitespace().next(),
        Some(uid_of(ALICE).to_string().as_str()),
        "{t}"
    );
    let table = cli(&stoa).args(["terminal", "list"]).output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    let line = table
        .lines()
        .find(|l| l.contains(&id))
        .ok_or_else(|| format!("{id} not in the list:\n{table}"))?;
    assert!(
        line.contains(ALICE) && line.contains("running") && line.contains("100x30"),
        "{table}"
    );

    // A resize of the local terminal reaches the remote one.
    let resized = tmux.cmd(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    assert!(
        resized.status.success(),
        "{}",
        String::from_utf8_lossy(&resized.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tmux.keys(&["s", "Enter"]);
        std::thread::sleep(Duration::from_millis(200));
        if tmux.screen().contains("40 120") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the remote never saw 40 120:\n{}", tmux.screen()).into());
        }
    }
    let (status, t) = stoa.request("GET", &format!("/terminals/{id}"), Some(&stoa.token), None);
    assert_eq!(status, 200);
    assert_eq!(
        (t["cols"].as_u64(), t["rows"].as_u64()),
        (Some(120), Some(40))
    );

    // Its exit code is the CLI's, and the tty is put back.
    tmux.keys(&["q", "Enter"]);
    assert_eq!(wait_file(&dir.join("rc"))?.trim(), "rc=3");
    assert_tty_restored(&dir)?;
    let t = only_terminal(&stoa, ALICE)?;
    assert_eq!(
        (t["running"].as_bool(), t["exit_code"].as_i64()),
        (Some(false), Some(3)),
        "{t}"
    );
    let table = cli(&stoa).args(["terminal", "list"]).output()?;
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("exit 3"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    Ok(())
}

fn list_and_kill() -> Result<(), Failed> {
    let stoa = Instance::start();
    let dir = stoa.dir.join("tty");
    std::fs::create_dir_all(&dir)?;
    // No command: alice's login shell (/bin/sh).
    let script = tmux_script(&stoa, &dir, &format!("open --user {ALICE}"));
    let tmux = Tmux::start(&dir, 80, 24, &script)?;
    tmux.wait_screen("a prompt", |s| s.contains('$'))?;
    tmux.keys(&["echo hi-$((6*7)) $(id -un)", "Enter"]);
    tmux.wait_screen("the shell's answer", |s| {
        s.contains(&format!("hi-42 {ALICE}"))
    })?;
    let t = only_terminal(&stoa, ALICE)?;
    assert_eq!(t["command"], Value::Null, "{t}");
    let id = t["terminal_id"].as_str().unwrap_or_default().to_string();
    let pid = t["pid"].as_i64().unwrap_or_default() as i32;
    assert!(alive(pid), "the shell {pid} is not running");
    assert!(
        cmdline(pid).first().is_some_and(|a| a.ends_with("sh")),
        "{:?}",
        cmdline(pid)
    );

    let out = cli(&stoa).args(["terminal", "kill", &id]).output()?;
    assert!(
        out.status.success(),
        "kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the shell to be gone", Duration::from_secs(10), || {
        !alive(pid)
    });
    // The attached CLI ends with the shell's fate (SIGHUP: 128 + 1), the tty put back.
    assert_eq!(wait_file(&dir.join("rc"))?.trim(), "rc=129");
    assert_tty_restored(&dir)?;
    assert!(
        list_json(&stoa)?
            .iter()
            .all(|t| t["terminal_id"] != id.as_str()),
        "a killed terminal is still listed"
    );
    let out = cli(&stoa).args(["terminal", "kill", &id]).output()?;
    assert_eq!(out.status.code(), Some(125), "killing it twice");
    let out = cli(&stoa).args(["terminal", "attach", &id]).output()?;
    assert_eq!(out.status.code(), Some(125), "attaching to a killed one");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(tmux);
    Ok(())
}

/// Runs the CLI with `input` on a pipe; (status, stdout, stderr).
fn run_piped(
    stoa: &Instance,
    args: &[&str],
    input: &[u8],
) -> Result<(Option<i32>, String, String), Failed> {
    let mut child = cli(stoa)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(input)?;
    let out = wait_output(child, Duration::from_secs(30))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The child's output (read while it runs: a full pipe would hold it up); killed after
/// `timeout`.
fn wait_output(child: Child, timeout: Duration) -> Result<Output, Failed> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv()??;
            Err(format!(
                "the CLI did not exit; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into())
        }
    }
}

fn pipes() -> Result<(), Failed> {
    let stoa = Instance::start();
    let (code, out, err) = run_piped(
        &stoa,
        &["terminal", "open", "--user", ALICE, "--", "sh"],
        b"echo hi-$((6*7)) $(id -un); exit 7\n",
    )?;
    assert_eq!(code, Some(7), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("hi-42 {ALICE}")), "{out}");
    // No TERM of ours without a tty: the daemon's default.
    let (code, out, err) = run_piped(
        &stoa,
        &[
            "terminal",
            "open",
            "--user",
            ALICE,
            "--cwd",
            "/tmp",
            "-e",
            "GREETING=hey",
            "--",
            "sh",
            "-c",
            "echo $TERM $GREETING $(pwd); exit 0",
        ],
        b"",
    )?;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("xterm-256color hey /tmp"), "{out}");
    // A lot of output, through the flow control (more than a window), all of it, in order.
    let (code, out, err) = run_piped(
        &stoa,
        &[
            "terminal",
            "open",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "seq 1 200000; exit 5",
        ],
        b"",
    )?;
    assert_eq!(code, Some(5), "stderr:\n{err}");
    let numbers: Vec<&str> = out.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(numbers.len(), 200000, "lines lost or split");
    assert!(
        numbers
            .iter()
            .enumerate()
            .all(|(i, n)| *n == (i + 1).to_string()),
        "output out of order"
    );
    // Piped input much larger than the daemon queues (it drops what does not fit: the CLI
    // sends that again), to a program that reads it late: all of it, in order.
    let mut input = Vec::new();
    for i in 0..700_000 {
        input.extend(format!("line {i}\n").as_bytes());
    }
    let local = Command::new("sh")
        .args(["-c", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(&input)?;
            c.wait_with_output()
        })?;
    let sum = String::from_utf8_lossy(&local.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    input.push(4); // ^D: the end of the input
    let (code, out, err) = run_piped(
        &stoa,
        &[
            "terminal",
            "open",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "stty -echo; sleep 1; sha256sum; exit 8",
        ],
        &input,
    )?;
    assert_eq!(code, Some(8), "stderr:\n{err}");
    assert!(
        out.contains(&sum),
        "input lost or reordered: {sum} not in {:?}",
        &out[out.len().saturating_sub(200)..]
    );
    // Without a terminal, a signal to the CLI is passed on to the program.
    let mut child = cli(&stoa)
        .args([
            "terminal",
            "open",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let text = collect(&mut child);
    wait_text("the trap", &text, "ready")?;
    run("kill", &["-TERM", &child.id().to_string()]);
    let out = wait_output(child, Duration::from_secs(15))?;
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_text("the trap", &text, "got-term")?;
    // Errors: no such user is stoa's error, not the program's.
    let before = list_json(&stoa)?.len();
    let (code, _, err) = run_piped(
        &stoa,
        &["terminal", "open", "--user", "stoa-t-nobody", "--", "true"],
        b"",
    )?;
    assert_eq!(code, Some(125), "{err}");
    assert!(
        list_json(&stoa)?.len() == before,
        "a failed open left a terminal"
    );
    Ok(())
}

fn token_user_and_session() -> Result<(), Failed> {
    let stoa = Instance::start();
    let out = Command::new(stoa.dir.join("bin/stoa"))
        .args(["user", "add", "alice", "--unix-user", ALICE])
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let as_alice = |args: &[&str]| {
        let mut c = Command::new(stoa.dir.join("bin/stoa"));
        c.args(args)
            .env("STOA_URL", stoa.url(""))
            .env("STOA_TOKEN", &alice)
            .stdin(Stdio::null());
        c.output()
    };
    // No --user: the token's own.
    let out = as_alice(&["terminal", "open", "--", "sh", "-c", "echo user=$(id -un)"])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("user={ALICE}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // --session: in its worktree.
    let worktree = format!("/home/{ALICE}/wt-terminal");
    std::fs::create_dir_all(&worktree)?;
    run("chown", &[&format!("{ALICE}:"), &worktree]);
    let (status, session) = stoa.request(
        "POST",
        "/sessions",
        Some(&alice),
        Some(&json!({ "agentic_tool": "claude-code", "worktree": worktree })),
    );
    assert_eq!(status, 201, "{session}");
    let session = session["session_id"].as_str().unwrap_or_default();
    let out = as_alice(&[
        "terminal",
        "open",
        "--session",
        session,
        "--",
        "sh",
        "-c",
        "echo cwd=$(pwd)",
    ])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("cwd={worktree}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Alice's list has her two; an admin's terminal of bob is not hers to see or attach.
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(&stoa.token),
        Some(&json!({ "unix_user": BOB, "command": ["sleep", "60"], "cols": 80, "rows": 24 })),
    );
    assert_eq!(status, 201, "{t}");
    let bobs = t["terminal_id"].as_str().unwrap_or_default().to_string();
    let out = as_alice(&["terminal", "list"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(!table.contains(&bobs), "{table}");
    let out = as_alice(&["terminal", "attach", &bobs])?;
    assert_eq!(out.status.code(), Some(125));
    let out = as_alice(&["terminal", "kill", &bobs])?;
    assert_eq!(out.status.code(), Some(125));
    let out = cli(&stoa).args(["terminal", "kill", &bobs]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Collects a child's stdout as it comes.
fn collect(child: &mut Child) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

fn wait_text(what: &str, text: &Arc<Mutex<String>>, needle: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !text.lock().unwrap().contains(needle) {
        if Instant::now() > deadline {
            return Err(format!("{what}: no {needle:?} in:\n{}", text.lock().unwrap()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn attach_and_view() -> Result<(), Failed> {
    let stoa = Instance::start();
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(&stoa.token),
        Some(&json!({
            "unix_user": BOB,
            "command": ["sh", "-c", "echo started; while read x; do echo got-$x; done; exit 4"],
            "cols": 90, "rows": 20,
        })),
    );
    assert_eq!(status, 201, "{t}");
    let id = t["terminal_id"].as_str().unwrap_or_default().to_string();
    let spawn = |args: &[&str]| {
        cli(&stoa)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut viewer = spawn(&["terminal", "attach", &id, "--view"])?;
    let viewed = collect(&mut viewer);
    // An attach shows what the terminal printed before.
    wait_text("viewer", &viewed, "started")?;
    let mut writer = spawn(&["terminal", "attach", &id])?;
    let written = collect(&mut writer);
    let mut input = writer.stdin.take().expect("stdin");
    input.write_all(b"one\n")?;
    drop(input); // the end of our input is not the end of the terminal
    wait_text("viewer", &viewed, "got-one")?;
    wait_text("writer", &written, "got-one")?;
    // The viewer's keys go nowhere.
    viewer.stdin.take().expect("stdin").write_all(b"two\n")?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(writer.try_wait()?.is_none(), "stdin's end ended the writer");
    assert!(viewer.try_wait()?.is_none(), "the viewer ended");
    assert_eq!(only_terminal(&stoa, BOB)?["viewers"], 2);
    // A second writer ends the loop (^D): everyone gets the exit code.
    let (code, out, err) = run_piped(&stoa, &["terminal", "attach", &id], b"\x04")?;
    assert_eq!(code, Some(4), "stdout:\n{out}\nstderr:\n{err}");
    for (who, child) in [("writer", writer), ("viewer", viewer)] {
        let out = wait_output(child, Duration::from_secs(15))?;
        assert_eq!(
            out.status.code(),
            Some(4),
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        !viewed.lock().unwrap().contains("got-two"),
        "a viewer's input reached the program"
    );
    // Attaching to an ended terminal replays what it kept, then its exit code.
    let (code, out, err) = run_piped(&stoa, &["terminal", "attach", &id, "--view"], b"")?;
    assert_eq!(code, Some(4), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("started") && out.contains("got-one"), "{out}");
    Ok(())
}

/// The `stoa` process running in the pane.
fn cli_in_pane(tmux: &Tmux) -> Option<i32> {
    let out = tmux.cmd(&["list-panes", "-t", "t", "-F", "#{pane_pid}"]);
    let shell: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    children_of(shell)
        .into_iter()
        .find(|p| comm(*p).as_deref() == Some("stoa"))
}

fn detach_and_sigterm() -> Result<(), Failed> {
    let stoa = Instance::start();
    let first = stoa.dir.join("tty1");
    std::fs::create_dir_all(&first)?;
    let remote = "echo ready; while read x; do echo got-$x; done";
    let script = tmux_script(
        &stoa,
        &first,
        &format!("open --user {ALICE} -- sh -c '{remote}'"),
    );
    let tmux = Tmux::start(&first, 80, 24, &script)?;
    tmux.wait_screen("ready", |s| s.contains("ready"))?;
    // Enter ~ . detaches: exit 0, the tty back, the terminal still running.
    tmux.keys(&["Enter", "~", "."]);
    assert_eq!(wait_file(&first.join("rc"))?.trim(), "rc=0");
    assert_tty_restored(&first)?;
    let t = only_terminal(&stoa, ALICE)?;
    assert_eq!(t["running"], true, "{t}");
    let id = t["terminal_id"].as_str().unwrap_or_default().to_string();
    tmux.wait_screen("the detach message", |s| {
        s.contains(&format!("stoa terminal attach {id}"))
    })?;
    drop(tmux);

    // Attach again (what it printed is replayed), then SIGTERM the CLI: the tty is put
    // back, and the terminal still runs.
    let second = stoa.dir.join("tty2");
    std::fs::create_dir_all(&second)?;
    let script = tmux_script(&stoa, &second, &format!("attach {id}"));
    let tmux = Tmux::start(&second, 80, 24, &script)?;
    tmux.wait_screen("the replay", |s| s.contains("ready"))?;
    tmux.keys(&["x", "Enter"]);
    tmux.wait_screen("got-x", |s| s.contains("got-x"))?;
    let pid = cli_in_pane(&tmux).ok_or("no stoa in the pane")?;
    run("kill", &["-TERM", &pid.to_string()]);
    assert_eq!(wait_file(&second.join("rc"))?.trim(), "rc=143");
    assert_tty_restored(&second)?;
    assert_eq!(only_terminal(&stoa, ALICE)?["running"], true);
    drop(tmux);

    // A viewer leaves with q, the tty put back; its keys never reach the program.
    let third = stoa.dir.join("tty3");
    std::fs::create_dir_all(&third)?;
    let script = tmux_script(&stoa, &third, &format!("attach --view {id}"));
    let tmux = Tmux::start(&third, 80, 24, &script)?;
    tmux.wait_screen("the replay", |s| s.contains("got-x"))?;
    tmux.keys(&["y", "Enter", "q"]);
    assert_eq!(wait_file(&third.join("rc"))?.trim(), "rc=0");
    assert_tty_restored(&third)?;
    assert!(!tmux.screen().contains("got-y"), "{}", tmux.screen());
    let out = cli(&stoa).args(["terminal", "kill", &id]).output()?;
    assert!(out.status.success());
    Ok(())
}

fn reconnect_after_daemon_kill() -> Result<(), Failed> {
    let stoa = Instance::start();
    let mut child = cli(&stoa)
        .args([
            "terminal",
            "open",
            "--user",
            ALICE,
            "--",
            "sh",
            "-c",
            "while read x; do echo got-$x; done; exit 6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let text = collect(&mut child);
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(b"before\n")?;
    wait_text("before the restart", &text, "got-before")?;
    let daemon = stoa.daemon_pid().expect("daemon");
    run("kill", &["-KILL", &daemon.to_string()]);
    stoa.wait_new_daemon(daemon);
    // Typed while the daemon was away, and after.
    input.write_all(b"after\n")?;
    wait_text("after the restart", &text, "got-after")?;
    input.write_all(b"\x04")?;
    drop(input);
    let out = wait_output(child, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "stderr:\n{stderr}");
    assert!(!stderr.contains("connection lost;"), "{stderr}");
    let all = text.lock().unwrap().clone();
    assert_eq!(all.matches("got-before").count(), 1, "{all}");
    assert_eq!(all.matches("got-after").count(), 1, "{all}");
    Ok(())
}
