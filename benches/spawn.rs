//! `cargo bench --bench spawn`: how long it takes to run `/bin/true` as an unprivileged
//! user, by
//!
//! 1. raw fork+exec as root, no user switch (the reference),
//! 2. `setpriv --reuid U --regid U --init-groups`,
//! 3. `runuser -u U --`,
//! 4. `sudo -u U` (skipped where sudo is not installed),
//! 5. stoa's `POST /exec`, from one kept-alive HTTP connection.
//!
//! The methods are interleaved round-robin (rotating which goes first) so that they all
//! see the same machine. It prints p50/p99/mean per method and their ratios; it asserts
//! nothing. Two requests that run nothing show what of stoa's time is HTTP: `GET /health`
//! (answered by the front alone) and a `GET` of a terminal id of the user's that does not
//! exist (since per-user workers, issue 11: relayed like `POST /exec`, through the
//! broker's `OpenWorker` and a new connection to the user's worker, which answers 404).
//!
//! It needs root: it creates a test user, a group and a service user, runs a broker from
//! a root-owned copy of the release binaries under `/run`, and removes all of that at the
//! end. Without root it says it is skipped and exits 0.
//!
//! Environment: `STOA_BENCH_ITERS` (measured runs per method, default 1000) and
//! `STOA_BENCH_WARMUP` (unmeasured runs per method first, default 50).
#![forbid(unsafe_code)]

mod common;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

const TARGET: &str = "/bin/true";

type Runner = Box<dyn FnMut() -> Result<(), String>>;

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        println!("spawn bench: skipped (needs root: it creates a test user and runs the broker)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spawn bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let iters = env_count("STOA_BENCH_ITERS", 1000)?.max(1);
    let warmup = env_count("STOA_BENCH_WARMUP", 50)?;
    let release = build_binaries()?;

    // Dropping the fixture stops stoa and removes the users, also on error paths.
    // STOA_BENCH_POLICY is added to the broker's policy, e.g. "[cgroup]\nenabled = false"
    // to see what the per-run cgroups cost.
    let extra_policy = std::env::var("STOA_BENCH_POLICY").unwrap_or_default();
    let fixture = Fixture::start(&release, "", &extra_policy)?;
    if !extra_policy.is_empty() {
        println!("policy additions: {extra_policy:?}");
    }

    let mut methods = vec![Method::new(
        "raw fork+exec (root)",
        Some(command_runner(PathBuf::from(TARGET), &[])),
    )];
    for (label, program, args) in [
        (
            "setpriv",
            "setpriv",
            vec!["--reuid", USER, "--regid", USER, "--init-groups", TARGET],
        ),
        ("runuser", "runuser", vec!["-u", USER, "--", TARGET]),
        ("sudo", "sudo", vec!["-u", USER, TARGET]),
    ] {
        let runner = find_program(program).map(|path| command_runner(path, &args));
        methods.push(Method::new(label, runner));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    methods.push(Method::new(
        "stoa POST /exec",
        Some(stoa_runner(
            agent.clone(),
            &fixture.base_url,
            &fixture.token,
        )),
    ));
    // Not a way to run anything: the HTTP round trip alone, to show what of stoa's time
    // is HTTP.
    let mut health = Method::new(
        "(GET /health)",
        Some(health_runner(agent.clone(), &fixture.base_url)),
    );
    let uid = nix::unistd::User::from_name(USER)
        .ok()
        .flatten()
        .ok_or_else(|| format!("no user {USER}"))?
        .uid;
    let mut relayed = Method::new(
        "(GET relayed, 404)",
        Some(relayed_runner(
            agent.clone(),
            &fixture.base_url,
            &fixture.token,
            uid.as_raw(),
        )),
    );

    println!(
        "spawn bench: {TARGET} as '{USER}', {warmup} warm-up + {iters} measured runs per method, interleaved"
    );
    println!("machine: {}", machine());
    println!("load average at the start: {}", load_average());
    for m in methods.iter().filter(|m| m.runner.is_none()) {
        println!("{}: not installed, skipped", m.name);
    }
    let started = Instant::now();
    {
        let mut active: Vec<&mut Method> = methods
            .iter_mut()
            .filter(|m| m.runner.is_some())
            .chain([&mut health, &mut relayed])
            .collect();
        let n = active.len();
        for round in 0..warmup + iters {
            for k in 0..n {
                active[(round + k) % n].run_once(round >= warmup);
            }
        }
    }
    println!("({:.1} s in all)", started.elapsed().as_secs_f64());
    println!("load average at the end: {}", load_average());
    // What the runs went through: the cgroups in force and how the last run joined its
    // cgroup (`/health` with the admin token; older brokers say no cgroup_join).
    let limits = agent
        .get(format!("{}/health", fixture.base_url))
        .header("Authorization", format!("Bearer {}", fixture.token))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
        .map(|h| h["limits"].clone())
        .unwrap_or_default();
    println!(
        "cgroups: {}; {}\n",
        limits["cgroups"].as_str().unwrap_or("?"),
        limits["cgroup_join"]
            .as_str()
            .unwrap_or("cgroup_join not reported")
    );

    report(&methods, &[&health, &relayed]);
    drop(fixture);
    Ok(())
}

fn env_count(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a count")),
        Err(_) => Ok(default),
    }
}

/// One way of running the target, and what it measured.
struct Method {
    name: &'static str,
    /// `None`: the program is not installed.
    runner: Option<Runner>,
    samples: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
}

impl Method {
    fn new(name: &'static str, runner: Option<Runner>) -> Method {
        Method {
            name,
            runner,
            samples: Vec::new(),
            failures: 0,
            first_error: None,
        }
    }

    fn run_once(&mut self, measured: bool) {
        let Some(runner) = &mut self.runner else {
            return;
        };
        let start = Instant::now();
        let result = runner();
        let elapsed = start.elapsed();
        match result {
            Ok(()) if measured => self.samples.push(elapsed),
            Ok(()) => {}
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn stats(&self) -> Option<Stats> {
        Stats::of(&self.samples)
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Stats {
    fn of(samples: &[Duration]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        // Nearest rank.
        let pct = |p: usize| sorted[(sorted.len() * p).div_ceil(100).max(1) - 1];
        Some(Stats {
            p50: pct(50),
            p99: pct(99),
            mean: sorted.iter().sum::<Duration>() / sorted.len() as u32,
        })
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    format!(
        "{} ({} cores)",
        fields.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

fn report(methods: &[Method], references: &[&Method]) {
    let raw = methods[0].stats();
    println!(
        "{:<22} {:>5} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "method", "runs", "fail", "p50", "p99", "mean", "p50/raw", "p99/raw"
    );
    for m in methods.iter().filter(|m| m.runner.is_some()) {
        let Some(s) = m.stats() else {
            println!(
                "{:<22} {:>5} {:>5}   (no successful run)",
                m.name, 0, m.failures
            );
            continue;
        };
        let (r50, r99) = match &raw {
            Some(r) => (ratio(s.p50, r.p50), ratio(s.p99, r.p99)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<22} {:>5} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8}",
            m.name,
            m.samples.len(),
            m.failures,
            ms(s.p50),
            ms(s.p99),
            ms(s.mean),
            r50,
            r99
        );
    }
    for m in methods.iter().chain(references.iter().copied()) {
        if let Some(e) = &m.first_error {
            println!("{}: {} failed runs; the first: {e}", m.name, m.failures);
        }
    }

    let stoa = methods.last().and_then(Method::stats);
    if let Some(stoa) = &stoa {
        println!("\nstoa p50 against each (below 1× is faster):");
        for m in &methods[..methods.len() - 1] {
            match m.stats() {
                Some(s) => println!("  stoa / {:<22} {}", m.name, ratio(stoa.p50, s.p50)),
                None => println!("  stoa / {:<22} - (not measured)", m.name),
            }
        }
    }
    println!("\nfor scale, HTTP round trips alone on the same connection:");
    for m in references {
        if let Some(h) = m.stats() {
            println!(
                "  {:<22} p50 {}, p99 {}{}",
                m.name,
                ms(h.p50),
                ms(h.p99),
                match &raw {
                    Some(r) => format!(" ({} raw fork+exec at p50)", ratio(h.p50, r.p50)),
                    None => String::new(),
                }
            );
        }
    }
    if let (Some(stoa), Some(raw)) = (&stoa, &raw) {
        let setpriv = methods
            .iter()
            .find(|m| m.name == "setpriv")
            .and_then(Method::stats);
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!("\ntargets (reported, not asserted):");
        println!(
            "  stoa p50 <= 2.5× raw fork+exec: {} ({})",
            verdict(stoa.p50.as_secs_f64() <= 2.5 * raw.p50.as_secs_f64()),
            ratio(stoa.p50, raw.p50)
        );
        if let Some(setpriv) = setpriv {
            println!(
                "  stoa p50 < setpriv p50:         {} ({} vs {})",
                verdict(stoa.p50 < setpriv.p50),
                ms(stoa.p50),
                ms(setpriv.p50)
            );
        }
    }
}

/// Runs `program args`, stdio on /dev/null, and wants exit status 0.
fn command_runner(program: PathBuf, args: &[&str]) -> Runner {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Box::new(move || {
        let status = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{} exited with {status}", program.display()))
        }
    })
}

/// `POST /exec` of the target as the test user; wants `exit_code` 0.
fn stoa_runner(agent: ureq::Agent, base: &str, token: &str) -> Runner {
    let url = format!("{base}/exec");
    let auth = format!("Bearer {token}");
    let body = json!({ "unix_user": USER, "argv": [TARGET] });
    Box::new(move || {
        let mut response = agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(&body)
            .map_err(|e| format!("POST /exec: {e}"))?;
        let status = response.status().as_u16();
        let reply: Value = response
            .body_mut()
            .read_json()
            .map_err(|e| format!("POST /exec: unreadable reply (HTTP {status}): {e}"))?;
        if status == 200 && reply["exit_code"].as_i64() == Some(0) {
            Ok(())
        } else {
            Err(format!("POST /exec: HTTP {status}: {reply}"))
        }
    })
}

/// `GET /terminals/u<uid>-none` with the admin token: the front relays it to the user's
/// worker (`OpenWorker` through the broker, then HTTP over the connection it hands back),
/// which has no such terminal: 404 is the expected answer.
fn relayed_runner(agent: ureq::Agent, base: &str, token: &str, uid: u32) -> Runner {
    let url = format!("{base}/terminals/u{uid}-none");
    let auth = format!("Bearer {token}");
    Box::new(move || {
        let mut response = agent
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        // Read to the end, so the connection is kept for the next request.
        let _ = response.body_mut().read_to_string();
        match response.status().as_u16() {
            404 => Ok(()),
            status => Err(format!("GET {url}: HTTP {status}, expected 404")),
        }
    })
}

fn health_runner(agent: ureq::Agent, base: &str) -> Runner {
    let url = format!("{base}/health");
    Box::new(move || get_health(&agent, &url).map(|_| ()))
}
