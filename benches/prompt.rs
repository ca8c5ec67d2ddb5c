//! `cargo bench --bench prompt`: from `POST /sessions/:id/prompt` to the agent process
//! running, through the executor (as the session's user) against the direct path (the
//! daemon runs the agent itself), in one run.
//!
//! The agent is a small shell script that first writes one byte into a FIFO the bench
//! reads (that moment is "started"), then replays a recorded Claude Code stream, so each
//! task completes normally. Both paths run the same script, so its own start-up cost is
//! in both. The paths alternate in blocks, switched with `stoa config set
//! execution.use_executor …` and `stoa daemon restart`. It prints p50/p99/mean per path
//! and the executor's extra time; it asserts nothing. Needs root (without it: skipped).
//!
//! Environment: `STOA_BENCH_ITERS` (prompts per path, default 200).
#![forbid(unsafe_code)]

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

const BLOCK: usize = 50;

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        println!("prompt bench: skipped (needs root: it creates a test user and runs the broker)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prompt bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {token}");
        let result = match body {
            Some(b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(&b),
            None if method == "POST" => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
            None => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut resp = result.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let value: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status >= 400 {
            return Err(format!("{method} {path}: HTTP {status}: {value}"));
        }
        Ok(value)
    }
}

fn run() -> Result<(), String> {
    let iters = std::env::var("STOA_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200usize)
        .max(1);
    let release = build_binaries()?;
    // The agent, its recording and the FIFO, readable by the user and the service user.
    let work = std::path::PathBuf::from(format!("/run/stoa-bench-{}-prompt", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("wt")).map_err(|e| e.to_string())?;
    let chmod = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())
    };
    chmod(&work, 0o755)?;
    chmod(&work.join("wt"), 0o777)?;
    let recording = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/agents/claude-code-2.1.197-text.jsonl");
    fs::copy(&recording, work.join("stream.jsonl"))
        .map_err(|e| format!("{}: {e}", recording.display()))?;
    chmod(&work.join("stream.jsonl"), 0o644)?;
    let fifo = work.join("started");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666))
        .map_err(|e| e.to_string())?;
    chmod(&fifo, 0o666)?;
    let script = format!(
        "#!/bin/sh\nprintf x > {}\ncat > /dev/null\ncat {}\n",
        fifo.display(),
        work.join("stream.jsonl").display()
    );
    fs::write(work.join("agent"), script).map_err(|e| e.to_string())?;
    chmod(&work.join("agent"), 0o755)?;
    let result = measure(&release, &work, iters);
    let _ = fs::remove_dir_all(&work);
    result
}

fn measure(release: &Path, work: &Path, iters: usize) -> Result<(), String> {
    let config = format!(
        "[agents.claude-code]\ncommand = [\"{}\"]\n",
        work.join("agent").display()
    );
    let fixture = Fixture::start(release, &config, "")?;
    let stoa = fixture.dir.join("bin/stoa");
    let out = Command::new(&stoa)
        .args(["user", "add", "bench", "--unix-user", USER])
        .env("STOA_BROKER_CONFIG", fixture.dir.join("broker.toml"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "stoa user add: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let client = Client {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into(),
        base: fixture.base_url.clone(),
    };
    let session = client.call(
        "POST",
        "/sessions",
        &token,
        Some(json!({ "agentic_tool": "claude-code", "worktree": work.join("wt") })),
    )?;
    let session = session["session_id"]
        .as_str()
        .ok_or("no session id")?
        .to_string();
    // Read end of the FIFO, opened read-write so opening never blocks.
    let mut started = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(work.join("started"))
        .map_err(|e| e.to_string())?;

    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let names = ["executor", "direct"];
    let mut round = 0;
    while times.iter().any(|t| t.len() < iters) {
        let path = round % 2;
        round += 1;
        switch(&stoa, &fixture, &client, path == 0)?;
        // One unmeasured prompt after each restart.
        for i in 0..=BLOCK.min(iters - times[path].len()) {
            let t0 = Instant::now();
            let task = client.call(
                "POST",
                &format!("/sessions/{session}/prompt"),
                &token,
                Some(json!({ "prompt": "hi" })),
            )?;
            let mut byte = [0u8; 1];
            started.read_exact(&mut byte).map_err(|e| e.to_string())?;
            let elapsed = t0.elapsed();
            let id = task["task_id"].as_str().ok_or("no task id")?;
            let done = wait_task(&client, &token, id)?;
            if done["status"] != "completed" || done["executed_via"] != names[path] {
                return Err(format!("unexpected task end: {done}"));
            }
            if i > 0 {
                times[path].push(elapsed);
            }
        }
    }
    report(&names, &times);
    Ok(())
}

/// Sets `execution.use_executor` and restarts the daemon so it takes effect.
fn switch(stoa: &Path, fixture: &Fixture, client: &Client, executor: bool) -> Result<(), String> {
    let out = Command::new(stoa)
        .args([
            "config",
            "set",
            "execution.use_executor",
            if executor { "true" } else { "false" },
        ])
        .env("STOA_CONFIG", fixture.dir.join("config.toml"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "stoa config set: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let before = client.call("POST", "/daemon/restart", &fixture.token, None)?["pid"].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(h) = get_health(&client.agent, &format!("{}/health", client.base)) {
            // A new daemon answers once the old one's pid is gone.
            if h["status"] == "ok" && !Path::new(&format!("/proc/{before}")).exists() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the daemon did not come back after a restart".into());
        }
    }
}

fn wait_task(client: &Client, token: &str, id: &str) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = client.call("GET", &format!("/tasks/{id}"), token, None)?;
        if ["completed", "failed", "stopped"].contains(&t["status"].as_str().unwrap_or("")) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(format!("task {id} did not end"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(names: &[&str; 2], times: &[Vec<Duration>; 2]) {
    println!(
        "prompt bench: POST /sessions/:id/prompt -> agent process started, {}",
        machine()
    );
    println!(
        "{:<10} {:>6} {:>10} {:>10} {:>10}",
        "path", "runs", "p50", "p99", "mean"
    );
    let mut p50 = [Duration::ZERO; 2];
    for (i, t) in times.iter().enumerate() {
        let mut sorted = t.clone();
        sorted.sort();
        let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
        p50[i] = percentile(&sorted, 0.5);
        let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1000.0);
        println!(
            "{:<10} {:>6} {:>10} {:>10} {:>10}",
            names[i],
            sorted.len(),
            ms(p50[i]),
            ms(percentile(&sorted, 0.99)),
            ms(mean)
        );
    }
    let extra = p50[0].as_secs_f64() * 1000.0 - p50[1].as_secs_f64() * 1000.0;
    println!("executor path extra at p50: {extra:.3} ms (target, not asserted: <= 5 ms)");
}
