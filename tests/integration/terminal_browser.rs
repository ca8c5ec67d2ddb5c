//! Issue 4: terminals (terminal_browser), issue 12: the web app, in a real browser.
//!
//! A `stoa serve` serving the page built into the binary (no `web_dir`: what a clone gets);
//! headless Debian Chromium (`/usr/bin/chromium`) driven by `playwright-core`
//! (`tests/browser/`).
//!
//! * `terminal-test.mjs`: enters alice's API token, opens a new terminal, types `id -un` into
//!   xterm.js and reads `stoa-t-alice` back from xterm's buffer; a refused "new terminal"
//!   leaves the open one working; then it resizes the window (`stty size` must follow),
//!   restarts the front (the page's socket, held by alice's worker, must not notice) and
//!   alice's worker (the page must reattach and resume without repeating output), opens
//!   the terminal read-only in a second tab (replay, live output, input refused), exits the
//!   shell (EXIT and a clean close) and kills a second terminal from the list.
//! * `web-app.mjs`: at 390×844, a session with a recorded agent (prompt, the transcript with
//!   the tool call and its result), a terminal from the phone's menu, the key bar (Esc,
//!   arrows, Tab, the sticky Ctrl, ^C); then the same page at 1280×800.
//! * `login-test.mjs`: a real Unix user's password (`POST /login`); wrong password, root and a
//!   user outside the policy refused with words; a session and a terminal over the cookie;
//!   log out. Until the tree has `/login` it reports itself ignored ("WAITING"), never passed.
//!
//! * `web_page_is_built_in_and_web_dir_replaces_it` (no browser): what `/` and `/static/…`
//!   serve, with and without `web_dir`, and that nothing else is reachable there.
//!
//! Screenshots are left in `target/browser-artifacts/` (each test prints where).
//! `.ci/run` installs Chromium and runs `npm ci` in `tests/browser/`; when something is
//! missing here the test tries the same, and prints `SKIPPED: ...` if it cannot.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "browser_page_opens_a_terminal_as_alice",
        page_opens_a_terminal,
    ),
    (
        "browser_web_app_on_a_phone_session_terminal_key_bar",
        web_app_on_a_phone,
    ),
    (
        "browser_login_with_a_unix_password_refusals_in_words",
        login_with_a_password,
    ),
    (
        "web_page_is_built_in_and_web_dir_replaces_it",
        web_page_built_in,
    ),
    (
        "browser_share_a_terminal_to_watch_and_stop_sharing",
        share_a_terminal,
    ),
];

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHROMIUM: &str = "/usr/bin/chromium";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

fn skipped(test: &str, why: &str) -> Result<(), Failed> {
    eprintln!("SKIPPED: {test}: {why}");
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Chromium, node and the npm packages, installed the way `.ci/run` does when missing.
fn prepare() -> Result<(), String> {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("terminal browser: installing chromium (apt)");
        let apt = |args: &[&str]| {
            quiet(
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        if !apt(&["install", "-y", "-q", "chromium"]) {
            apt(&["update", "-q"]);
            apt(&["install", "-y", "-q", "chromium"]);
        }
        if !Path::new(CHROMIUM).exists() {
            return Err(format!(
                "{CHROMIUM} is missing and apt could not install it"
            ));
        }
    }
    if !have("node") || !have("npm") {
        return Err("node/npm are missing".into());
    }
    let dir = Path::new(REPO).join("tests/browser");
    let needs = "node_modules/playwright-core/package.json";
    if !dir.join(needs).exists() {
        eprintln!("terminal browser: npm ci in {}", dir.display());
        quiet(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir),
        );
        if !dir.join(needs).exists() {
            return Err(format!(
                "{} is missing and `npm ci` could not install it",
                dir.join(needs).display()
            ));
        }
    }
    Ok(())
}

/// Where the screenshots go (under the target dir), made if missing.
fn artifacts() -> PathBuf {
    let dir = Path::new(REPO).join("target/browser-artifacts");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `node tests/browser/<script> <args>`; its JSON result when it says `"ok": true`.
fn run_script(stoa: &Instance, script: &str, args: &[&str]) -> Result<Value, Failed> {
    let out_dir = PathBuf::from(format!(
        "/run/stoa-browser-out-{}-{}",
        std::process::id(),
        script.trim_end_matches(".mjs")
    ));
    fs::create_dir_all(&out_dir).unwrap();
    let (stdout_path, stderr_path) = (out_dir.join("stdout"), out_dir.join("stderr"));
    let mut child = Command::new("node")
        .arg(Path::new(REPO).join("tests/browser").join(script))
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .map_err(|e| format!("node: {e}"))?;
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = fs::remove_dir_all(&out_dir);
    let context = || {
        format!(
            "\n--- script stderr:\n{stderr}\n--- script stdout:\n{stdout}\n--- stoa log:\n{}",
            stoa.log()
        )
    };
    let Some(status) = status else {
        return Err(format!("{script} ran over {SCRIPT_TIMEOUT:?}{}", context()).into());
    };
    let result: Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("no JSON from {script} ({e}){}", context()))?;
    if !status.success() || result["ok"] != true {
        return Err(format!(
            "{script} failed: {}{}",
            result["error"].as_str().unwrap_or("(no error given)"),
            context()
        )
        .into());
    }
    Ok(result)
}

/// Every screenshot the script names is a PNG.
fn check_screenshots(result: &Value) {
    let shots = result["screenshots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!shots.is_empty(), "no screenshots: {result}");
    for s in shots {
        let path = s.as_str().unwrap_or_default();
        let png = fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{path} is not a PNG");
    }
}

// ---- a recorded agent (tests/fixtures/agents) ------------------------------------------

/// A stand-in agent CLI replaying a recorded stream ($1); a prompt with HANG: one line, then
/// it runs on until stopped; with HTML: an answer made of markup; with ASK: Claude Code's
/// recorded permission request, then, after stoa's answer on stdin, the recorded rest of an
/// allowed or a denied run.
const FAKE_AGENT: &str = r#"#!/bin/sh
fixture=$1; shift
dir=$(dirname "$fixture")
# One line: a conversation (Claude Code's stream-json) keeps stdin open until its result.
if [ -t 0 ]; then input=""; else IFS= read -r input || true; fi
case "$input $*" in
  *ASK*)
    head -n 3 "$dir/claude-code-2.1.197-approval-allow.jsonl"
    IFS= read -r answer || exit 1
    case "$answer" in
      *'"behavior":"allow"'*) tail -n +4 "$dir/claude-code-2.1.197-approval-allow.jsonl" ;;
      *) tail -n +4 "$dir/claude-code-2.1.197-approval-deny.jsonl" ;;
    esac ;;
  *HANG*) head -n 1 "$fixture"; exec sleep 3600 ;;
  *HTML*) printf '%s\n' '{"type":"assistant","message":{"content":[{"type":"text","text":"<img src=x onerror=\"window.pwned=1\"><b>bold</b>"}]}}' ;;
  *) cat "$fixture" ;;
esac
"#;
const FIXTURE: &str = "claude-code-2.1.197-bash-tool.jsonl";
const ASK_ALLOW: &str = "claude-code-2.1.197-approval-allow.jsonl";
const ASK_DENY: &str = "claude-code-2.1.197-approval-deny.jsonl";

/// The fake agent and its recording in a root-owned directory the users can read; removed
/// on drop.
struct RecordedAgent {
    dir: PathBuf,
}

impl RecordedAgent {
    fn install(name: &str) -> RecordedAgent {
        let dir = PathBuf::from(format!("/run/stoa-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("fake-agent"), FAKE_AGENT).unwrap();
        for fixture in [FIXTURE, ASK_ALLOW, ASK_DENY] {
            fs::copy(
                Path::new(REPO).join("tests/fixtures/agents").join(fixture),
                dir.join(fixture),
            )
            .expect("fixture (tests/fixtures/agents)");
            run("chmod", &["0644", dir.join(fixture).to_str().unwrap()]);
        }
        run("chmod", &["0755", dir.to_str().unwrap()]);
        run("chmod", &["0755", dir.join("fake-agent").to_str().unwrap()]);
        RecordedAgent { dir }
    }

    fn config(&self) -> String {
        format!(
            "[agents.claude-code]\ncommand = [\"{}\", \"{}\"]\n",
            self.dir.join("fake-agent").display(),
            self.dir.join(FIXTURE).display()
        )
    }
}

impl Drop for RecordedAgent {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory of `user`'s in their home.
fn worktree(user: &str, name: &str) -> String {
    let dir = format!("/home/{user}/{name}");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    run("chown", &[&format!("{user}:"), &dir]);
    dir
}

fn page_opens_a_terminal() -> Result<(), Failed> {
    if let Err(why) = prepare() {
        return skipped("browser_page_opens_a_terminal_as_alice", &why);
    }
    let stoa = Instance::start();
    let token = stoa.api_user("browser-alice", ALICE);
    let screenshot = artifacts().join("terminal-browser.png");
    let _ = fs::remove_file(&screenshot);
    let result = run_script(
        &stoa,
        "terminal-test.mjs",
        &[
            "--url",
            &stoa.url("/"),
            "--token",
            &token,
            "--user",
            ALICE,
            "--admin-token",
            &stoa.token,
            "--screenshot",
            screenshot.to_str().unwrap(),
        ],
    )?;
    // The script saw the user's name on the screen before the restart test reset it.
    let steps: Vec<&str> = result["steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        steps
            .iter()
            .any(|s| s.contains("id -un") && s.contains("unix user")),
        "the browser never checked `id -un`: {steps:?}"
    );
    let png = fs::read(&screenshot).map_err(|e| format!("{}: {e}", screenshot.display()))?;
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        screenshot.display()
    );

    // What the page did is what the server has: the first terminal exited, the second was
    // deleted.
    let (status, list) = stoa.request("GET", "/terminals", Some(&token), None);
    assert_eq!(status, 200, "{list}");
    let first = result["terminal_id"].as_str().unwrap_or_default();
    for t in list.as_array().cloned().unwrap_or_default() {
        assert_eq!(
            t["running"], false,
            "still running after the page ended it: {t}"
        );
        if t["terminal_id"] == first {
            assert_eq!(t["exit_code"], 0, "{t}");
        }
    }
    eprintln!(
        "terminal browser: screenshot in {} (steps: {})",
        screenshot.display(),
        result["steps"]
    );
    Ok(())
}

fn web_app_on_a_phone() -> Result<(), Failed> {
    let name = "browser_web_app_on_a_phone_session_terminal_key_bar";
    if let Err(why) = prepare() {
        return skipped(name, &why);
    }
    let agent = RecordedAgent::install("browser-agent");
    let stoa = Instance::start_with(Options {
        extra_config: agent.config(),
        ..Default::default()
    });
    let token = stoa.api_user("browser-phone", ALICE);
    let worktree = worktree(ALICE, "browser-wt");
    let artifacts = artifacts();
    let result = run_script(
        &stoa,
        "web-app.mjs",
        &[
            "--url",
            &stoa.url("/"),
            "--token",
            &token,
            "--user",
            ALICE,
            "--worktree",
            &worktree,
            "--artifacts",
            artifacts.to_str().unwrap(),
        ],
    )?;
    check_screenshots(&result);

    // What the page showed is what the server has: one session in that worktree, its task
    // completed as alice, and the transcript the page read.
    let id = result["session_id"].as_str().unwrap_or_default();
    let (status, session) = stoa.request("GET", &format!("/sessions/{id}"), Some(&token), None);
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["worktree"], worktree.as_str(), "{session}");
    assert_eq!(session["unix_user"], ALICE, "{session}");
    let (status, tasks) = stoa.request("GET", &format!("/sessions/{id}/tasks"), Some(&token), None);
    assert_eq!(status, 200, "{tasks}");
    let tasks = tasks.as_array().cloned().unwrap_or_default();
    assert_eq!(tasks.len(), 5, "{tasks:?}");
    assert_eq!(tasks[0]["status"], "completed", "{tasks:?}");
    assert_eq!(tasks[0]["prompt"], "say hello and run id", "{tasks:?}");
    assert_eq!(tasks[1]["status"], "stopped", "{tasks:?}");
    // The two that asked permission, answered in the page: allowed, then denied.
    for (task, decision) in [(&tasks[2], "allowed"), (&tasks[3], "denied")] {
        assert_eq!(task["status"], "completed", "{tasks:?}");
        let (_, messages) = stoa.request(
            "GET",
            &format!("/sessions/{id}/messages"),
            Some(&token),
            None,
        );
        let said: Vec<&Value> = messages
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["task_id"] == task["task_id"])
            .map(|m| &m["event"])
            .collect();
        assert!(
            said.iter()
                .any(|e| e["kind"] == "permission_decision" && e["decision"] == decision),
            "{decision}: {said:?}"
        );
    }
    let _ = fs::remove_dir_all(&worktree);
    eprintln!(
        "web app: screenshots {} (steps: {})",
        result["screenshots"], result["steps"]
    );
    Ok(())
}

/// A random password for a test user (letters and digits: nothing `chpasswd` treats
/// specially).
fn password() -> String {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).unwrap();
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn set_password(user: &str, password: &str) {
    let mut child = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .expect("chpasswd");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{user}:{password}\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "chpasswd {user}");
}

/// Puts back the locked password `useradd` gave (no password login) on drop.
struct PasswordsSet(&'static [&'static str]);

impl Drop for PasswordsSet {
    fn drop(&mut self) {
        for user in self.0 {
            let _ = Command::new("usermod")
                .args(["-p", "!", user])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn login_with_a_password() -> Result<(), Failed> {
    let name = "browser_login_with_a_unix_password_refusals_in_words";
    if let Err(why) = prepare() {
        return skipped(name, &why);
    }
    let agent = RecordedAgent::install("browser-login-agent");
    let stoa = Instance::start_with(Options {
        extra_config: agent.config(),
        ..Default::default()
    });
    // POST /login is the lead's (in parallel): until it exists, this test waits (reported
    // ignored, not passed). Without the route the request lands on the API's token check.
    let (status, body) = stoa.request(
        "POST",
        "/login",
        None,
        Some(&serde_json::json!({ "username": ALICE, "password": "" })),
    );
    let no_route = status == 404
        || status == 405
        || (status == 401 && body.to_string().contains("Authorization"));
    if no_route {
        return Err(format!(
            "WAITING: this tree has no POST /login yet (it answered {status} {body})"
        )
        .into());
    }
    let _restore = PasswordsSet(&[ALICE, CAROL]);
    let (alice_pw, carol_pw) = (password(), password());
    set_password(ALICE, &alice_pw);
    set_password(CAROL, &carol_pw);
    let worktree = worktree(ALICE, "browser-login-wt");
    let artifacts = artifacts();
    let result = run_script(
        &stoa,
        "login-test.mjs",
        &[
            "--url",
            &stoa.url("/"),
            "--user",
            ALICE,
            "--password",
            &alice_pw,
            "--outside",
            CAROL,
            "--outside-password",
            &carol_pw,
            "--worktree",
            &worktree,
            "--artifacts",
            artifacts.to_str().unwrap(),
        ],
    )?;
    check_screenshots(&result);
    let _ = fs::remove_dir_all(&worktree);
    eprintln!(
        "login: screenshots {} (steps: {})",
        result["screenshots"], result["steps"]
    );
    Ok(())
}

/// alice shares a terminal with bob to watch, in two browsers logged in with passwords:
/// bob sees its output live, cannot type, and loses it when alice stops sharing.
fn share_a_terminal() -> Result<(), Failed> {
    let name = "browser_share_a_terminal_to_watch_and_stop_sharing";
    if let Err(why) = prepare() {
        return skipped(name, &why);
    }
    let stoa = Instance::start();
    let _restore = PasswordsSet(&[ALICE, BOB]);
    let (alice_pw, bob_pw) = (password(), password());
    set_password(ALICE, &alice_pw);
    set_password(BOB, &bob_pw);
    let artifacts = artifacts();
    let result = run_script(
        &stoa,
        "share-test.mjs",
        &[
            "--url",
            &stoa.url("/"),
            "--owner",
            ALICE,
            "--owner-password",
            &alice_pw,
            "--viewer",
            BOB,
            "--viewer-password",
            &bob_pw,
            "--artifacts",
            artifacts.to_str().unwrap(),
        ],
    )?;
    check_screenshots(&result);
    let audit = fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    for event in ["share_grant", "share_attach", "share_revoke"] {
        assert!(
            audit.contains(&format!("\"{event}\"")),
            "no {event} in the audit log"
        );
    }
    eprintln!(
        "share: screenshots {} (steps: {})",
        result["screenshots"], result["steps"]
    );
    Ok(())
}

/// `(status, content type, body)` of a GET, with no credential.
fn get(url: &str) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (resp.status().as_u16(), kind, body)
}

/// The page and xterm.js come from the binary, with no files and no npm; paths outside
/// what is built in are 404 (no file of the machine is reachable through `/static`); a
/// `web_dir` replaces all of it.
fn web_page_built_in() -> Result<(), Failed> {
    let stoa = Instance::start();
    let (status, kind, html) = get(&stoa.url("/"));
    assert_eq!(status, 200, "{html}");
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(html.contains("/static/vendor/xterm/xterm.js"), "{html}");
    let page = Path::new(REPO).join("web");
    for (path, file, want_kind) in [
        ("/static/app.js", "app.js", "text/javascript"),
        ("/static/app.css", "app.css", "text/css"),
        (
            "/static/vendor/xterm/xterm.js",
            "vendor/xterm/xterm.js",
            "text/javascript",
        ),
        (
            "/static/vendor/addon-fit/addon-fit.js",
            "vendor/addon-fit/addon-fit.js",
            "text/javascript",
        ),
        (
            "/static/vendor/xterm/LICENSE",
            "vendor/xterm/LICENSE",
            "text/plain",
        ),
    ] {
        let (status, kind, body) = get(&stoa.url(path));
        assert_eq!(status, 200, "{path}: {body}");
        assert!(kind.starts_with(want_kind), "{path}: {kind}");
        assert_eq!(body, fs::read_to_string(page.join(file)).unwrap(), "{path}");
    }
    for path in [
        "/static/../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/static/%2e%2e%2fCargo.toml",
        "/static//etc/passwd",
        "/static/vendor/xterm/",
        "/static/index.html/..",
        "/static/node_modules/@xterm/xterm/lib/xterm.js",
    ] {
        let (status, _, body) = get(&stoa.url(path));
        assert!(
            status == 404 || status == 400,
            "{path} answered {status}: {}",
            &body[..body.len().min(200)]
        );
        assert!(!body.contains("root:"), "{path} leaked a file");
    }
    drop(stoa);

    // web_dir replaces the built-in page.
    let dir = PathBuf::from(format!("/run/stoa-test-{}-web-dir", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("index.html"),
        "<!doctype html><title>a page of our own</title>",
    )
    .unwrap();
    fs::write(dir.join("app.js"), "// ours").unwrap();
    run("chmod", &["-R", "a+rX", dir.to_str().unwrap()]);
    let stoa = Instance::start_with(Options {
        extra_config: format!("web_dir = \"{}\"", dir.display()),
        ..Default::default()
    });
    let (status, _, html) = get(&stoa.url("/"));
    let (js_status, _, js) = get(&stoa.url("/static/app.js"));
    let (xterm_status, _, _) = get(&stoa.url("/static/vendor/xterm/xterm.js"));
    drop(stoa);
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(
        (status, html.contains("a page of our own")),
        (200, true),
        "{html}"
    );
    assert_eq!((js_status, js.as_str()), (200, "// ours"));
    assert_eq!(
        xterm_status, 404,
        "web_dir has no xterm.js, yet it was served"
    );
    Ok(())
}
