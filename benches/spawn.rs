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
//! nothing.
//!
//! It needs root: it creates a test user, a group and a service user, runs a broker from
//! a root-owned copy of the release binaries under `/run`, and removes all of that at the
//! end. Without root it says it is skipped and exits 0.
//!
//! Environment: `STOA_BENCH_ITERS` (measured runs per method, default 1000) and
//! `STOA_BENCH_WARMUP` (unmeasured runs per method first, default 50).
#![forbid(unsafe_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Group, Pid, User};
use serde_json::{json, Value};

/// The unprivileged user everything runs as.
const USER: &str = "stoa-bench-u";
/// The group the broker policy allows.
const GROUP: &str = "stoa-bench-users";
/// The account the stoa daemon runs as (the broker creates it).
const SERVICE_USER: &str = "stoa-bench-svc";
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
    let fixture = Fixture::start(&release)?;

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
        Some(health_runner(agent, &fixture.base_url)),
    );

    println!(
        "spawn bench: {TARGET} as '{USER}', {warmup} warm-up + {iters} measured runs per method, interleaved"
    );
    println!("machine: {}", machine());
    for m in methods.iter().filter(|m| m.runner.is_none()) {
        println!("{}: not installed, skipped", m.name);
    }
    let started = Instant::now();
    {
        let mut active: Vec<&mut Method> = methods
            .iter_mut()
            .filter(|m| m.runner.is_some())
            .chain(std::iter::once(&mut health))
            .collect();
        let n = active.len();
        for round in 0..warmup + iters {
            for k in 0..n {
                active[(round + k) % n].run_once(round >= warmup);
            }
        }
    }
    println!("({:.1} s in all)\n", started.elapsed().as_secs_f64());

    report(&methods, &health);
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

fn report(methods: &[Method], health: &Method) {
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
    for m in methods.iter().chain([health]) {
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
    if let Some(h) = health.stats() {
        println!(
            "\nfor scale, an HTTP round trip alone on the same connection (GET /health): p50 {}, p99 {}",
            ms(h.p50),
            ms(h.p99)
        );
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

fn health_runner(agent: ureq::Agent, base: &str) -> Runner {
    let url = format!("{base}/health");
    Box::new(move || get_health(&agent, &url).map(|_| ()))
}

fn get_health(agent: &ureq::Agent, url: &str) -> Result<Value, String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let reply: Value = response
        .body_mut()
        .read_json()
        .map_err(|e| format!("unreadable reply (HTTP {status}): {e}"))?;
    if status == 200 {
        Ok(reply)
    } else {
        Err(format!("HTTP {status}: {reply}"))
    }
}

/// `program` on PATH (plus the sbin directories, which root's PATH may lack).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    found
}

fn machine() -> String {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown OS".into());
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{os}, kernel {}, {cores} cores ({cpu})",
        read("/proc/sys/kernel/osrelease").trim()
    )
}

/// Builds the binaries as shipped (`scripts/build-release.sh`: a static `stoa-executor`)
/// and returns the directory they are in, `target/dist`.
fn build_binaries() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    eprintln!("spawn bench: scripts/build-release.sh");
    let status = Command::new(root.join("scripts/build-release.sh"))
        .status()
        .map_err(|e| format!("cannot run scripts/build-release.sh: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/build-release.sh: {status}"));
    }
    let dist = root.join("target/dist");
    if dist.join("stoa").is_file() && dist.join("stoa-executor").is_file() {
        return Ok(dist);
    }
    Err("built, but cannot find target/dist/stoa and stoa-executor".into())
}

/// The test accounts, and a running `stoa serve` as root; all of it undone on drop.
struct Fixture {
    dir: PathBuf,
    server: Option<Child>,
    base_url: String,
    token: String,
}

impl Fixture {
    fn start(release: &Path) -> Result<Fixture, String> {
        let dir = PathBuf::from(format!("/run/stoa-bench-{}", std::process::id()));
        // A run killed before its cleanup leaves these behind.
        remove_accounts();
        let mut fixture = Fixture {
            dir,
            server: None,
            base_url: String::new(),
            token: String::new(),
        };
        fixture.create_accounts()?;
        fixture.start_stoa(release)?;
        Ok(fixture)
    }

    fn create_accounts(&self) -> Result<(), String> {
        run_admin("groupadd", &[GROUP])?;
        run_admin("useradd", &["--create-home", "--groups", GROUP, USER])?;
        let uid = User::from_name(USER)
            .ok()
            .flatten()
            .ok_or_else(|| format!("user {USER} missing after useradd"))?
            .uid
            .as_raw();
        if uid < 1000 {
            return Err(format!(
                "useradd gave {USER} uid {uid}, below the policy's 1000"
            ));
        }
        Ok(())
    }

    fn start_stoa(&mut self, release: &Path) -> Result<(), String> {
        let dir = &self.dir;
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
        let set_mode = |path: &Path, mode: u32| {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
        };
        set_mode(dir, 0o755)?;
        set_mode(&bin, 0o755)?;
        for name in ["stoa", "stoa-executor"] {
            let to = bin.join(name);
            fs::copy(release.join(name), &to)
                .map_err(|e| format!("cannot copy {name} to {}: {e}", to.display()))?;
            set_mode(&to, 0o755)?;
        }

        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let broker_state = dir.join("broker");
        let broker_config = dir.join("broker.toml");
        let daemon_config = dir.join("config.toml");
        let write = |path: &Path, text: String| {
            fs::write(path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
                .and_then(|()| set_mode(path, 0o644))
        };
        write(
            &broker_config,
            format!(
                "executor_path = {:?}\nstate_dir = {:?}\nservice_user = {SERVICE_USER:?}\n\
                 allow_groups = [{GROUP:?}]\nmin_uid = 1000\n",
                bin.join("stoa-executor"),
                broker_state,
            ),
        )?;
        write(
            &daemon_config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n",
                dir.join("daemon")
            ),
        )?;

        let log_path = dir.join("stoa.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("cannot create log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin.join("stoa"))
            .arg("serve")
            .arg("--broker-config")
            .arg(&broker_config)
            .arg("--config")
            .arg(&daemon_config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start stoa: {e}"))?;
        let server = self.server.insert(child);
        self.base_url = format!("http://127.0.0.1:{port}");

        let fail = |why: String| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            format!("{why}\n--- {} ---\n{log}", log_path.display())
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let health_url = format!("{}/health", self.base_url);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = server.try_wait() {
                return Err(fail(format!("stoa serve exited at start: {status}")));
            }
            if let Ok(reply) = get_health(&agent, &health_url) {
                if reply["broker_connected"] == Value::Bool(true) {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(fail("stoa did not become healthy within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let token_path = broker_state.join("admin.token");
        self.token = fs::read_to_string(&token_path)
            .map_err(|e| fail(format!("cannot read {}: {e}", token_path.display())))?
            .trim()
            .to_string();
        Ok(())
    }

    fn stop_stoa(&mut self) {
        let Some(mut child) = self.server.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        // The broker gives the daemon, then executors, 5 s each.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("spawn bench: stoa ignored SIGTERM for 15 s; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop_stoa();
        remove_accounts();
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("spawn bench: cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// Removes the test user (with its home), the service user and the group, first killing
/// any process left running as them. Quiet about what does not exist.
fn remove_accounts() {
    for user in [USER, SERVICE_USER] {
        let Some(uid) = User::from_name(user).ok().flatten().map(|u| u.uid.as_raw()) else {
            continue;
        };
        let uid = uid.to_string();
        for _ in 0..50 {
            let _ = Command::new("pkill").args(["-KILL", "-U", &uid]).status();
            // pgrep exits 1 once nothing runs as this uid.
            let still_running = Command::new("pgrep")
                .args(["-U", &uid])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !still_running {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The service user has no home to remove.
        let args: &[&str] = if user == USER {
            &["--remove", user]
        } else {
            &[user]
        };
        if let Err(e) = run_admin("userdel", args) {
            eprintln!("spawn bench: {e}");
        }
    }
    // userdel removes each user's own group; what is left is ours.
    for group in [GROUP, USER, SERVICE_USER] {
        if Group::from_name(group).ok().flatten().is_some() {
            if let Err(e) = run_admin("groupdel", &[group]) {
                eprintln!("spawn bench: {e}");
            }
        }
    }
}

/// Runs an account tool (useradd, userdel, ...) quietly; stderr only on failure.
fn run_admin(program: &str, args: &[&str]) -> Result<(), String> {
    let path = find_program(program).ok_or_else(|| format!("{program} not found"))?;
    let out = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
