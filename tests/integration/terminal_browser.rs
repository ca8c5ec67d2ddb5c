//! Issue 4: terminals (terminal_browser): the web page in a real browser.
//!
//! A `stoa serve` with `web_dir` pointing at the checkout's `web/`; headless Debian Chromium
//! (`/usr/bin/chromium`) driven by `playwright-core` through `tests/browser/terminal-test.mjs`.
//! The script enters alice's API token in the page, opens a new terminal, types `id -un`
//! into xterm.js and reads `stoa-t-alice` back from xterm's buffer; then it resizes the
//! window (`stty size` must follow), restarts the front (the page's socket, held by
//! alice's worker, must not notice) and alice's worker (the page must reattach and resume
//! without repeating output), opens the terminal read-only in a second tab (replay, live
//! output, input refused), exits the shell (EXIT and a clean close) and kills a second
//! terminal from the list. The screenshot is left in `target/test-artifacts/`.
//!
//! `.ci/run` installs Chromium and runs `npm ci` in `web/` and `tests/browser/`; when
//! something is missing here the test tries the same, and prints `SKIPPED: ...` if it
//! cannot.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::Value;

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "browser_page_opens_a_terminal_as_alice",
    page_opens_a_terminal,
)];

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHROMIUM: &str = "/usr/bin/chromium";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

fn skipped(why: &str) -> Result<(), Failed> {
    eprintln!("SKIPPED: browser_page_opens_a_terminal_as_alice: {why}");
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
    for (dir, needs) in [
        (
            "web",
            &[
                "node_modules/@xterm/xterm/lib/xterm.js",
                "node_modules/@xterm/addon-fit/lib/addon-fit.js",
            ][..],
        ),
        (
            "tests/browser",
            &["node_modules/playwright-core/package.json"][..],
        ),
    ] {
        let dir = Path::new(REPO).join(dir);
        if needs.iter().all(|f| dir.join(f).exists()) {
            continue;
        }
        eprintln!("terminal browser: npm ci in {}", dir.display());
        quiet(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir),
        );
        if let Some(f) = needs.iter().find(|f| !dir.join(f).exists()) {
            return Err(format!(
                "{} is missing and `npm ci` could not install it",
                dir.join(f).display()
            ));
        }
    }
    Ok(())
}

/// Whether every directory above `path` lets others through and `path` lets them read (the
/// daemon runs as the service user).
fn world_readable(path: &Path) -> bool {
    let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|p| mode(p) & 0o001 != 0)
}

/// The page's files where the daemon can read them: the checkout's `web/`, or a copy of what
/// it serves in /run when the checkout is private.
fn web_dir() -> (PathBuf, Option<PathBuf>) {
    let web = Path::new(REPO).join("web");
    if world_readable(&web) && world_readable(&web.join("node_modules/@xterm")) {
        return (web, None);
    }
    let copy = PathBuf::from(format!("/run/stoa-web-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&copy);
    fs::create_dir_all(copy.join("node_modules")).unwrap();
    run(
        "cp",
        &[
            "-R",
            web.join("node_modules/@xterm").to_str().unwrap(),
            copy.join("node_modules").to_str().unwrap(),
        ],
    );
    for f in ["index.html", "app.js", "app.css"] {
        fs::copy(web.join(f), copy.join(f)).unwrap();
    }
    run("chmod", &["-R", "a+rX", copy.to_str().unwrap()]);
    (copy.clone(), Some(copy))
}

fn page_opens_a_terminal() -> Result<(), Failed> {
    if let Err(why) = prepare() {
        return skipped(&why);
    }
    let (web, copy) = web_dir();
    let stoa = Instance::start_with(Options {
        extra_config: format!("web_dir = \"{}\"", web.display()),
        ..Default::default()
    });
    let token = stoa.api_user("browser-alice", ALICE);

    let artifacts = Path::new(REPO).join("target/test-artifacts");
    fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("terminal-browser.png");
    let _ = fs::remove_file(&screenshot);
    let out_dir = PathBuf::from(format!("/run/stoa-browser-out-{}", std::process::id()));
    fs::create_dir_all(&out_dir).unwrap();
    let (stdout_path, stderr_path) = (out_dir.join("stdout"), out_dir.join("stderr"));

    let mut child = Command::new("node")
        .arg(Path::new(REPO).join("tests/browser/terminal-test.mjs"))
        .args(["--url", &stoa.url("/")])
        .args(["--token", &token])
        .args(["--user", ALICE])
        .args(["--admin-token", &stoa.token])
        .arg("--screenshot")
        .arg(&screenshot)
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
    if let Some(copy) = copy {
        let _ = fs::remove_dir_all(copy);
    }
    let context = || {
        format!(
            "\n--- script stderr:\n{stderr}\n--- script stdout:\n{stdout}\n--- stoa log:\n{}",
            stoa.log()
        )
    };
    let Some(status) = status else {
        return Err(format!(
            "the browser script ran over {SCRIPT_TIMEOUT:?}{}",
            context()
        )
        .into());
    };
    let result: Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("no JSON from the browser script ({e}){}", context()))?;
    if !status.success() || result["ok"] != true {
        return Err(format!(
            "browser check failed: {}{}",
            result["error"].as_str().unwrap_or("(no error given)"),
            context()
        )
        .into());
    }
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
