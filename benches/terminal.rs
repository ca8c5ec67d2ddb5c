//! `cargo bench --bench terminal`: stoa's terminals against a bare PTY, in one run.
//!
//! Since per-user workers (issue 11) a terminal's bytes go PTY → the user's worker
//! (`stoa __worker`, which holds the PTY master and the ring) → the front (`stoa __daemon`,
//! which splices the WebSocket to the worker over a Unix socket) → the client.
//!
//! 1. Throughput: `cat` of a 1 GiB text file (base64, 120-char lines) through a stoa
//!    terminal to a `stoa.term.v1` client in this process (ACK every 256 KiB, bytes
//!    counted until EXIT and checked against the file plus one `\r` per `\n`), against the
//!    same `cat` under `script -qc 'cat FILE' /dev/null > /dev/null`. The paths alternate,
//!    one round each per STOA_BENCH_ROUNDS; a last raw run through a pipe counts its bytes.
//! 2. Keystroke echo: a 1-byte INPUT until it comes back in an OUTPUT frame, through a
//!    terminal running `stty raw -echo; exec cat`. References: the same program on a bare
//!    PTY driven from Rust and from Python (`pty.fork`), and PING→PONG on the same socket
//!    (the WebSocket, front and worker without the PTY).
//! 3. 1,000 idle terminals (`sleep 3600`) spread round-robin over 10 Unix users (the
//!    bench's `USER` and `stoa-bench-u1..9`, made like it, each with an API user of its
//!    own): the memory of every stoa process involved (the front and each user's worker;
//!    the broker shown apart), as PSS from /proc/PID/smaps_rollup (RSS where that cannot
//!    be read; the output says which), per terminal, measured from two baselines: before
//!    any worker ran, and with the 10 workers started (one terminal created and deleted
//!    per user). The rings are separated by measuring them: each terminal's WELCOME says
//!    how much output its ring holds (`current - oldest`), summed over all of them after
//!    the memory is read (rings are allocated as output arrives; `sleep` prints nothing).
//!    Also the fds of broker, front and workers, and how long creating and deleting them
//!    took; at the end no `sleep` of any of the users may be left.
//!
//! The idle terminals come first, on a fresh front. Programs that print `READY` once they
//! are set up let the client start at a known point. As under systemd, stoa starts with
//! an open-file soft limit of 1024 (hard: 524288 where this process may raise it), so a
//! part of stoa that needs more fds has to raise its own.
//!
//! The broker's limits on executors and spawn rate are raised for the 1,000 terminals.
//!
//! It prints figures and ratios and asserts nothing; a part that fails is reported and the
//! others still run (the exit status is then 1). Needs root (without it: skipped).
//!
//! Environment: STOA_BENCH_ROUNDS (throughput rounds per path, default 2),
//! STOA_BENCH_FILE_MIB (default 1024), STOA_BENCH_ECHO (round trips, default 2000),
//! STOA_BENCH_TERMINALS (idle terminals, default 1000), STOA_BENCH_USERS (Unix users they
//! are spread over, default 10), STOA_BENCH_RING_KIB (the `[terminal] ring_bytes`; unset:
//! its default).
#![forbid(unsafe_code)]

mod common;

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use stoa::terminal::protocol::{ClientFrame, Exit, ServerFrame, SUBPROTOCOL};

use common::*;

/// The client acknowledges output in steps of this much.
const ACK_EVERY: u64 = 256 * 1024;
const LINE_CHARS: usize = 120;
/// Unmeasured round trips before each echo measurement.
const WARMUP: usize = 200;
/// What the benched programs print once they are set up.
const READY: &[u8] = b"READY";
/// The echo program (the brief's `stty raw -echo; exec cat`, saying when it is raw).
const ECHO_PROGRAM: &str = "stty raw -echo; printf READY; exec cat";
const MB: f64 = 1e6;

const PY_ECHO: &str = r#"
import os, pty, sys, time
n, warm, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pid, fd = pty.fork()
if pid == 0:
    os.execvp("sh", ["sh", "-c", program])
seen = b""
while b"READY" not in seen:
    seen += os.read(fd, 1024)
times = []
for i in range(warm + n):
    b = bytes([97 + i % 26])
    t0 = time.perf_counter_ns()
    os.write(fd, b)
    got = os.read(fd, 1)
    t1 = time.perf_counter_ns()
    if got != b:
        sys.exit(f"echo: sent {b!r}, got {got!r}")
    if i >= warm:
        times.append(t1 - t0)
os.kill(pid, 9)
os.waitpid(pid, 0)
times.sort()
pct = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))]
print(pct(0.5), pct(0.9), pct(0.99))
"#;

/// One part of the bench; it adds its figures to the summary.
type Part<'a> = dyn Fn(&mut Vec<String>) -> Result<(), String> + 'a;

struct Settings {
    rounds: usize,
    file_bytes: u64,
    echo: usize,
    terminals: usize,
    users: usize,
}

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "terminal bench: skipped (needs root: it creates a test user and runs the broker)"
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("terminal bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env_count(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The work directory (the file to `cat`, the Python script): root-owned, readable by
/// the user, removed on drop.
struct Work(PathBuf);

impl Work {
    fn create() -> Result<Work, String> {
        let dir = PathBuf::from(format!("/run/stoa-bench-{}-terminal", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
        Ok(Work(dir))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("terminal bench: cannot remove {}: {e}", self.0.display());
        }
    }
}

fn run() -> Result<bool, String> {
    let settings = Settings {
        rounds: env_count("STOA_BENCH_ROUNDS", 2)?.max(1),
        file_bytes: (env_count("STOA_BENCH_FILE_MIB", 1024)?.max(1) as u64) << 20,
        echo: env_count("STOA_BENCH_ECHO", 2000)?.max(1),
        terminals: env_count("STOA_BENCH_TERMINALS", 1000)?.max(1),
        users: env_count("STOA_BENCH_USERS", 10)?.max(1),
    };
    let release = build_binaries()?;
    let fd_limit = systemd_fd_limit();
    let work = Work::create()?;
    let most = (settings.terminals * 2).max(2000);
    let ring = match env_count("STOA_BENCH_RING_KIB", 0)? {
        0 => String::new(),
        kib => format!("ring_bytes = {}\n", kib << 10),
    };
    let fixture = Fixture::start(
        &release,
        &format!("[terminal]\nmax_per_user = {most}\n{ring}"),
        &format!(
            "max_executors_per_user = {most}\nmax_executors_total = {}\n\
             spawn_rate_per_sec = 1000000.0\nspawn_burst = 1000000\n",
            (most * 2).max(4096)
        ),
    )?;
    let mut unix_users = vec![USER.to_string()];
    unix_users.extend(fixture.add_users(settings.users - 1)?);
    let stoa = Stoa::new(&fixture, &unix_users)?;
    println!("terminal bench: {}", machine());
    println!("load average at the start: {}", load_average());
    println!("open-file limit stoa started with: {fd_limit}");
    if !ring.is_empty() {
        println!("[terminal] {}", ring.trim());
    }
    for (name, pid) in [("broker", stoa.broker), ("front", stoa.front()?)] {
        println!("  {name} (pid {pid}): {}", max_open_files(pid));
    }
    println!(
        "  Unix users: {} (uids {}); workers running now: {}",
        unix_users.join(", "),
        stoa.users
            .iter()
            .map(|u| u.uid.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        stoa.workers().len()
    );

    let mut summary = Vec::new();
    let mut ok = true;
    let parts: [(&str, &Part); 3] = [
        ("idle terminals", &|s| idle(&stoa, &settings, s)),
        ("throughput", &|s| throughput(&stoa, &work.0, &settings, s)),
        ("echo latency", &|s| echo(&stoa, &work.0, &settings, s)),
    ];
    for (name, part) in parts {
        println!("\n== {name} ==");
        if let Err(e) = part(&mut summary) {
            ok = false;
            println!("{name}: FAILED: {e}");
            summary.push(format!("{name}: FAILED: {e}"));
        }
    }
    println!("\n== summary ==");
    println!("load average at the end: {}", load_average());
    for line in &summary {
        println!("{line}");
    }
    drop(fixture);
    drop(work);
    Ok(ok)
}

/// Starts stoa with systemd's default open-file limit (1024 soft, 524288 hard), not
/// whatever this shell has, so a component that needs more has to raise it itself.
fn systemd_fd_limit() -> String {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return "unknown (getrlimit failed)".into();
    };
    let set = setrlimit(Resource::RLIMIT_NOFILE, 1024, hard.max(524_288))
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard));
    match (set, getrlimit(Resource::RLIMIT_NOFILE)) {
        (Ok(()), Ok((soft, hard))) => format!("{soft} soft / {hard} hard"),
        (Err(e), _) | (_, Err(e)) => format!("unchanged (setrlimit: {e})"),
    }
}

// ---------------------------------------------------------------------------------------
// The server: HTTP, the processes, /proc.

/// A Unix user the bench's terminals run as, and the API user acting as it.
struct BenchUser {
    unix: String,
    uid: u32,
    /// Its API user's token (not an admin's: its requests go to its own worker).
    token: String,
}

struct Stoa<'a> {
    fixture: &'a Fixture,
    agent: ureq::Agent,
    /// `users[0]` is `USER`, the one throughput and echo run as.
    users: Vec<BenchUser>,
    port: u16,
    broker: i32,
}

impl<'a> Stoa<'a> {
    /// An API user `bench` (then `bench1`, `bench2`, …) for each of `unix_users`.
    fn new(fixture: &'a Fixture, unix_users: &[String]) -> Result<Stoa<'a>, String> {
        let mut users = Vec::with_capacity(unix_users.len());
        for (i, unix) in unix_users.iter().enumerate() {
            let name = if i == 0 {
                "bench".to_string()
            } else {
                format!("bench{i}")
            };
            let out = Command::new(fixture.dir.join("bin/stoa"))
                .args(["user", "add", &name, "--unix-user", unix])
                .env("STOA_BROKER_CONFIG", fixture.dir.join("broker.toml"))
                .output()
                .map_err(|e| format!("stoa user add: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "stoa user add {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let uid = nix::unistd::User::from_name(unix)
                .ok()
                .flatten()
                .ok_or_else(|| format!("no user {unix}"))?
                .uid
                .as_raw();
            users.push(BenchUser {
                unix: unix.clone(),
                uid,
                token: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            });
        }
        let port = fixture
            .base_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no port in {}", fixture.base_url))?;
        Ok(Stoa {
            fixture,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
            users,
            port,
            broker: broker_pid(&fixture.dir)?,
        })
    }

    /// As `users[user]`: `(status, JSON body or Null)`; Err only when there is no HTTP
    /// answer.
    fn call(
        &self,
        user: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.fixture.base_url);
        let auth = format!("Bearer {}", self.users[user].token);
        let result = match (method, body) {
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(&b),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            _ => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut response = result.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let value = response.body_mut().read_json().unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// A terminal running `argv` as `users[user]`; its id.
    fn create(&self, user: usize, argv: &[&str]) -> Result<String, String> {
        let body = json!({ "cols": 120, "rows": 40, "command": argv });
        match self.call(user, "POST", "/terminals", Some(body))? {
            (201, t) => t["terminal_id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("POST /terminals: no terminal_id in {t}")),
            (status, t) => Err(format!("POST /terminals: HTTP {status}: {t}")),
        }
    }

    fn delete(&self, user: usize, id: &str) -> Result<(), String> {
        match self.call(user, "DELETE", &format!("/terminals/{id}"), None)? {
            (204, _) => Ok(()),
            (status, t) => Err(format!("DELETE /terminals/{id}: HTTP {status}: {t}")),
        }
    }

    fn list(&self, user: usize) -> Result<Vec<Value>, String> {
        match self.call(user, "GET", "/terminals", None)? {
            (200, Value::Array(a)) => Ok(a),
            (status, t) => Err(format!("GET /terminals: HTTP {status}: {t}")),
        }
    }

    /// Every user's terminals: (listed, running).
    fn list_all(&self) -> Result<(usize, usize), String> {
        let (mut listed, mut running) = (0, 0);
        for user in 0..self.users.len() {
            let list = self.list(user)?;
            listed += list.len();
            running += list.iter().filter(|t| t["running"] == true).count();
        }
        Ok((listed, running))
    }

    /// The front: the broker's child `stoa __daemon`.
    fn front(&self) -> Result<i32, String> {
        child_with_arg(self.broker, "__daemon")
            .into_iter()
            .next()
            .ok_or_else(|| {
                format!(
                    "no `stoa __daemon` child of the broker (pid {})",
                    self.broker
                )
            })
    }

    /// The workers: the broker's children `stoa __worker`, with their uids.
    fn workers(&self) -> Vec<(i32, u32)> {
        child_with_arg(self.broker, "__worker")
            .into_iter()
            .filter_map(|pid| Some((pid, process_uid(pid)?)))
            .collect()
    }

    /// `users[user]`'s worker.
    fn worker_of(&self, user: usize) -> Result<i32, String> {
        let uid = self.users[user].uid;
        self.workers()
            .into_iter()
            .find(|&(_, u)| u == uid)
            .map(|(pid, _)| pid)
            .ok_or_else(|| format!("no worker of {} running", self.users[user].unix))
    }

    /// Processes running as any of the bench's users, other than their workers:
    /// (all, named `name`).
    fn user_processes(&self, name: &str) -> (usize, usize) {
        let (mut all, mut named) = (0, 0);
        for pid in pids() {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let uid: Option<u32> =
                field(&status, "Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok());
            if uid.is_some_and(|uid| self.users.iter().any(|u| u.uid == uid))
                && !cmdline(pid).iter().any(|a| a == "__worker")
            {
                all += 1;
                if field(&status, "Name:").map(str::trim) == Some(name) {
                    named += 1;
                }
            }
        }
        (all, named)
    }

    /// The last `n` lines of stoa's log (broker, front and workers).
    fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.fixture.dir.join("stoa.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn field<'s>(status: &'s str, name: &str) -> Option<&'s str> {
    status.lines().find_map(|l| l.strip_prefix(name))
}

fn process_uid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&status, "Uid:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The fixture's `stoa serve`: the broker.
fn broker_pid(dir: &Path) -> Result<i32, String> {
    let config = dir.join("broker.toml").display().to_string();
    pids()
        .find(|&pid| {
            let args = cmdline(pid);
            args.iter().any(|a| a == "serve") && args.contains(&config)
        })
        .ok_or_else(|| format!("no `stoa serve` with {config} running"))
}

/// The children of `parent` with `arg` among their arguments.
fn child_with_arg(parent: i32, arg: &str) -> Vec<i32> {
    pids()
        .filter(|&pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            field(&status, "PPid:").and_then(|p| p.trim().parse().ok()) == Some(parent)
                && cmdline(pid).iter().any(|a| a == arg)
        })
        .collect()
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    format!("{} (2 cores busy = 2.0)", fields.join(" "))
}

/// A process's memory, in KiB.
#[derive(Clone, Copy, Default)]
struct Mem {
    /// PSS where smaps_rollup could be read, else RSS.
    kib: u64,
    rss: u64,
    pss: bool,
}

/// `pid`'s memory: `Pss:` of /proc/PID/smaps_rollup (shared pages, such as the stoa binary
/// every worker, the front and the broker map, divided among the processes sharing them),
/// or, if that cannot be read, `VmRSS:` of /proc/PID/status.
fn memory(pid: i32) -> Result<Mem, String> {
    let rss = status_kib(pid, "VmRSS:")?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let pss = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    Ok(match pss {
        Some(pss) => Mem {
            kib: pss,
            rss,
            pss: true,
        },
        None => Mem {
            kib: rss,
            rss,
            pss: false,
        },
    })
}

/// The memory and fds of the stoa processes at one moment.
struct Census {
    broker: Mem,
    front: Mem,
    /// (pid, uid, memory, fds) of each worker.
    workers: Vec<(i32, u32, Mem, usize)>,
    fds: (usize, usize),
}

impl Census {
    fn take(stoa: &Stoa) -> Result<Census, String> {
        let front = stoa.front()?;
        let mut workers = Vec::new();
        for (pid, uid) in stoa.workers() {
            workers.push((pid, uid, memory(pid)?, fd_count(pid)));
        }
        Ok(Census {
            broker: memory(stoa.broker)?,
            front: memory(front)?,
            workers,
            fds: (fd_count(stoa.broker), fd_count(front)),
        })
    }

    /// What is measured: "PSS", "RSS", or "PSS/RSS mixed" if some could not be read.
    fn kind(&self) -> &'static str {
        let all = [self.broker, self.front]
            .into_iter()
            .chain(self.workers.iter().map(|w| w.2));
        let (mut pss, mut rss) = (false, false);
        for m in all {
            if m.pss {
                pss = true;
            } else {
                rss = true;
            }
        }
        match (pss, rss) {
            (true, false) => "PSS",
            (false, true) => "RSS",
            _ => "PSS/RSS mixed",
        }
    }

    fn workers_kib(&self) -> u64 {
        self.workers.iter().map(|w| w.2.kib).sum()
    }

    /// The front and every worker (the processes that hold the terminals).
    fn front_and_workers(&self) -> u64 {
        self.front.kib + self.workers_kib()
    }

    fn workers_rss(&self) -> u64 {
        self.workers.iter().map(|w| w.2.rss).sum()
    }

    fn worker_fds(&self) -> usize {
        self.workers.iter().map(|w| w.3).sum()
    }

    fn describe(&self) -> String {
        format!(
            "{kind}: front {} KiB + {} workers {} KiB = {} KiB (broker {} KiB apart); RSS: \
             front {} KiB, workers {} KiB, broker {} KiB; fds: broker {}, front {}, workers {}",
            self.front.kib,
            self.workers.len(),
            self.workers_kib(),
            self.front_and_workers(),
            self.broker.kib,
            self.front.rss,
            self.workers_rss(),
            self.broker.rss,
            self.fds.0,
            self.fds.1,
            self.worker_fds(),
            kind = self.kind(),
        )
    }
}

/// A `kB` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: i32, name: &str) -> Result<u64, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    field(&status, name)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn max_open_files(pid: i32) -> String {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .map(|v| {
            let v: Vec<&str> = v.split_whitespace().collect();
            format!("open files {} soft / {} hard", v[0], v[1])
        })
        .unwrap_or_else(|| "open files unknown".into())
}

// ---------------------------------------------------------------------------------------
// A blocking stoa.term.v1 client.

struct Viewer {
    ws: tungstenite::WebSocket<TcpStream>,
    /// Offset just past the last OUTPUT byte received.
    offset: u64,
    acked: u64,
    exit: Option<Exit>,
    /// OUTPUT frames received.
    frames: u64,
    /// SNAPSHOTs received (a writing viewer should get none) and the output they skipped.
    snapshots: u64,
    skipped: u64,
}

impl Viewer {
    /// Connects as `USER`, says HELLO (from offset 0, writing) and reads the WELCOME.
    fn open(stoa: &Stoa, id: &str) -> Result<Viewer, String> {
        match Viewer::connect(stoa, 0, id, true)? {
            (
                viewer,
                ServerFrame::Welcome {
                    can_write: true, ..
                },
            ) => Ok(viewer),
            (_, other) => Err(format!("expected a writing WELCOME, got {other:?}")),
        }
    }

    /// Connects as `users[user]`, says HELLO (from offset 0) and returns what came back
    /// first (a WELCOME unless something is wrong).
    fn connect(
        stoa: &Stoa,
        user: usize,
        id: &str,
        want_write: bool,
    ) -> Result<(Viewer, ServerFrame), String> {
        let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws", stoa.port);
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        let value = |v: &str| v.parse().map_err(|e| format!("header: {e}"));
        headers.insert("Sec-WebSocket-Protocol", value(SUBPROTOCOL)?);
        headers.insert(
            "Authorization",
            value(&format!("Bearer {}", stoa.users[user].token))?,
        );
        let stream =
            TcpStream::connect(("127.0.0.1", stoa.port)).map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let (ws, response) = tungstenite::client::client(request, stream)
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let protocol = response.headers().get("sec-websocket-protocol");
        if protocol.and_then(|v| v.to_str().ok()) != Some(SUBPROTOCOL) {
            return Err(format!("server chose subprotocol {protocol:?}"));
        }
        let mut viewer = Viewer {
            ws,
            offset: 0,
            acked: 0,
            exit: None,
            frames: 0,
            snapshots: 0,
            skipped: 0,
        };
        viewer.send(ClientFrame::Hello {
            resume: 0,
            cols: 120,
            rows: 40,
            want_write,
        })?;
        let first = viewer.next()?;
        Ok((viewer, first))
    }

    fn send(&mut self, frame: ClientFrame) -> Result<(), String> {
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .map_err(|e| format!("WebSocket send: {e}"))
    }

    /// The next frame. OUTPUT must follow on from the last; it is acknowledged every
    /// `ACK_EVERY` bytes.
    fn next(&mut self) -> Result<ServerFrame, String> {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let frame = ServerFrame::decode(&b)?;
                    match &frame {
                        ServerFrame::Output { offset, bytes } => {
                            if *offset != self.offset {
                                return Err(format!(
                                    "OUTPUT at offset {offset}, expected {}",
                                    self.offset
                                ));
                            }
                            self.offset += bytes.len() as u64;
                            self.frames += 1;
                            if self.offset - self.acked >= ACK_EVERY {
                                self.acked = self.offset;
                                self.send(ClientFrame::Ack {
                                    consumed: self.offset,
                                })?;
                            }
                        }
                        // The output between is lost to this viewer (the server says so
                        // when it no longer has it): count it, go on from there.
                        ServerFrame::Snapshot { offset, .. } => {
                            self.snapshots += 1;
                            self.skipped += offset.saturating_sub(self.offset);
                            self.offset = *offset;
                        }
                        ServerFrame::Exit(e) => self.exit = Some(*e),
                        ServerFrame::Error { code, message } => {
                            return Err(format!("ERROR {code}: {message}"))
                        }
                        _ => {}
                    }
                    return Ok(frame);
                }
                Ok(Message::Close(c)) => return Err(format!("server closed: {c:?}")),
                Ok(_) => {}
                Err(e) => return Err(format!("WebSocket read: {e}")),
            }
        }
    }

    /// Reads until the program has printed READY; the offset just past it.
    fn ready(&mut self) -> Result<u64, String> {
        let mut seen = Vec::new();
        let start = self.offset;
        loop {
            if let ServerFrame::Output { bytes, .. } = self.next()? {
                seen.extend_from_slice(&bytes);
                if let Some(at) = seen.windows(READY.len()).position(|w| w == READY) {
                    return Ok(start + (at + READY.len()) as u64);
                }
            }
            if self.exit.is_some() {
                return Err(format!(
                    "exited before READY: {:?}",
                    String::from_utf8_lossy(&seen)
                ));
            }
        }
    }

    /// A close handshake (the server's, after EXIT, or ours).
    fn close(mut self) {
        let _ = self
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        let _ = self.ws.close(None);
        while self.ws.read().is_ok() {}
    }
}

// ---------------------------------------------------------------------------------------
// Figures.

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// p50, p90, p99 of `times`.
fn spread(times: &mut [Duration]) -> [Duration; 3] {
    times.sort();
    [0.5, 0.9, 0.99].map(|p| percentile(times, p))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{min:.1}–{max:.1}")
}

// ---------------------------------------------------------------------------------------
// 1. Throughput.

/// A text file of `bytes` bytes: base64 characters in 120-character lines (the last one
/// shorter). Returns how many lines it has.
fn generate(path: &Path, bytes: u64) -> Result<u64, String> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let error = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(error)?);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut fill = |buf: &mut [u8]| {
        for chunk in buf.chunks_mut(10) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut x = state;
            for c in chunk {
                *c = B64[(x & 63) as usize];
                x >>= 6;
            }
        }
    };
    let mut line = [b'\n'; LINE_CHARS + 1];
    let per_line = LINE_CHARS as u64 + 1;
    let full = bytes / per_line;
    for _ in 0..full {
        fill(&mut line[..LINE_CHARS]);
        out.write_all(&line).map_err(error)?;
    }
    let rest = (bytes % per_line) as usize;
    if rest > 0 {
        fill(&mut line[..rest - 1]);
        line[rest - 1] = b'\n';
        out.write_all(&line[..rest]).map_err(error)?;
    }
    out.into_inner()
        .map_err(|e| error(e.into_error()))?
        .sync_all()
        .map_err(error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(error)?;
    Ok(full + u64::from(rest > 0))
}

/// `script -qc 'cat FILE' /dev/null`, its output to /dev/null or counted through a pipe.
fn raw_cat(file: &Path, count: bool) -> Result<(Duration, Option<u64>, CpuUse), String> {
    let mut command = Command::new("script");
    command
        .args(["-qc", &format!("cat {}", file.display()), "/dev/null"])
        .stdin(Stdio::null());
    if count {
        command.stdout(Stdio::piped());
    } else {
        command.stdout(File::create("/dev/null").map_err(|e| e.to_string())?);
    }
    let cpu = CpuClock::start(None, None);
    let t0 = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("script: {e}"))?;
    let counted = match child.stdout.take() {
        Some(mut out) => {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match out.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading script's output: {e}")),
                }
            }
            Some(n)
        }
        None => None,
    };
    let status = child.wait().map_err(|e| e.to_string())?;
    let elapsed = t0.elapsed();
    let cpu = cpu.stop(elapsed);
    if !status.success() {
        return Err(format!("script -qc 'cat …': {status}"));
    }
    Ok((elapsed, counted, cpu))
}

/// One `cat` through a stoa terminal.
struct CatRun {
    elapsed: Duration,
    /// Bytes received after READY (without what SNAPSHOTs skipped).
    received: u64,
    frames: u64,
    snapshots: u64,
    skipped: u64,
    cpu: CpuUse,
}

/// `cat FILE` in a stoa terminal: from the keystroke that starts it to EXIT.
fn stoa_cat(stoa: &Stoa, file: &Path) -> Result<CatRun, String> {
    // The program waits for a line, so none of cat's output goes before the client is
    // there; with echo off the line is not printed.
    let program = format!(
        "stty -echo; printf READY; read x; exec cat {}",
        file.display()
    );
    let id = stoa.create(0, &["sh", "-c", &program])?;
    let result = (|| {
        let mut viewer = Viewer::open(stoa, &id)?;
        let start = viewer.ready()?;
        let (frames, snapshots, skipped) = (viewer.frames, viewer.snapshots, viewer.skipped);
        let cpu = CpuClock::start(stoa.front()?, stoa.worker_of(0)?);
        let t0 = Instant::now();
        viewer.send(ClientFrame::Input(b"\r".to_vec()))?;
        while viewer.exit.is_none() {
            viewer.next()?;
        }
        let elapsed = t0.elapsed();
        let cpu = cpu.stop(elapsed);
        let run = CatRun {
            elapsed,
            received: viewer.offset - start - (viewer.skipped - skipped),
            frames: viewer.frames - frames,
            snapshots: viewer.snapshots - snapshots,
            skipped: viewer.skipped - skipped,
            cpu,
        };
        let exit = viewer.exit;
        viewer.close();
        if exit != Some(Exit::Code(0)) {
            return Err(format!("cat ended with {exit:?}"));
        }
        Ok(run)
    })();
    let deleted = stoa.delete(0, &id);
    let result = result?;
    deleted?;
    Ok(result)
}

/// CPU seconds used while something ran: by the front, by the user's worker, by this
/// process (the client), by this process's waited-for children, and by the whole machine
/// (in cores busy).
#[derive(Default)]
struct CpuUse {
    front: f64,
    worker: f64,
    client: f64,
    children: f64,
    cores_busy: f64,
}

struct CpuClock {
    front: Option<i32>,
    worker: Option<i32>,
    at: [f64; 5],
}

impl CpuClock {
    fn start(front: impl Into<Option<i32>>, worker: impl Into<Option<i32>>) -> CpuClock {
        let (front, worker) = (front.into(), worker.into());
        CpuClock {
            at: Self::now(front, worker),
            front,
            worker,
        }
    }

    fn now(front: Option<i32>, worker: Option<i32>) -> [f64; 5] {
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        // utime + stime of /proc/<pid>/stat (fields 14 and 15).
        let process = |pid: &str| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<f64> = after
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0.0))
                .collect();
            fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)
        };
        let children = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .map_or(0.0, |r| {
                let t =
                    |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
                t(r.user_time()) + t(r.system_time())
            });
        // Busy time of all cores: the first line of /proc/stat without idle and iowait.
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let all: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        let busy =
            all.iter().sum::<f64>() - all.get(3).unwrap_or(&0.0) - all.get(4).unwrap_or(&0.0);
        [
            front.map_or(0.0, |p| process(&p.to_string())) / tick,
            worker.map_or(0.0, |p| process(&p.to_string())) / tick,
            process("self") / tick,
            children,
            busy / tick,
        ]
    }

    fn stop(self, elapsed: Duration) -> CpuUse {
        let now = Self::now(self.front, self.worker);
        let d = |i: usize| now[i] - self.at[i];
        CpuUse {
            front: d(0),
            worker: d(1),
            client: d(2),
            children: d(3),
            cores_busy: d(4) / elapsed.as_secs_f64(),
        }
    }
}

fn throughput(
    stoa: &Stoa,
    work: &Path,
    settings: &Settings,
    summary: &mut Vec<String>,
) -> Result<(), String> {
    let file = work.join("cat.txt");
    let t0 = Instant::now();
    let lines = generate(&file, settings.file_bytes)?;
    let expected = settings.file_bytes + lines;
    println!(
        "file: {} ({} bytes, {lines} lines, written in {:.1} s); expected through a PTY \
         (ONLCR): {expected} bytes",
        file.display(),
        settings.file_bytes,
        t0.elapsed().as_secs_f64()
    );
    let result = measure_throughput(stoa, &file, settings, expected, summary);
    if let Err(e) = fs::remove_file(&file) {
        eprintln!("terminal bench: cannot remove {}: {e}", file.display());
    }
    result
}

fn measure_throughput(
    stoa: &Stoa,
    file: &Path,
    settings: &Settings,
    expected: u64,
    summary: &mut Vec<String>,
) -> Result<(), String> {
    let size = settings.file_bytes as f64;
    let rate = |d: Duration| size / MB / d.as_secs_f64();
    let (mut raw, mut via_stoa) = (Vec::new(), Vec::new());
    let mut wrong = Vec::new();
    for round in 0..settings.rounds {
        // Alternate which goes first.
        for path in [round % 2, 1 - round % 2] {
            if path == 0 {
                let (d, _, cpu) = raw_cat(file, false)?;
                raw.push(rate(d));
                println!(
                    "round {}: raw PTY (script > /dev/null) {:>6.1} MB/s ({:.2} s); CPU s: \
                     script+cat {:.2}; machine {:.2} of {} cores busy",
                    round + 1,
                    rate(d),
                    d.as_secs_f64(),
                    cpu.children,
                    cpu.cores_busy,
                    cores()
                );
            } else {
                let run = stoa_cat(stoa, file)?;
                via_stoa.push(rate(run.elapsed));
                let check = if run.received == expected && run.snapshots == 0 {
                    "all bytes".to_string()
                } else {
                    wrong.push(format!(
                        "round {}: {} of {expected} bytes, {} skipped by {} SNAPSHOTs",
                        round + 1,
                        run.received,
                        run.skipped,
                        run.snapshots
                    ));
                    format!(
                        "WRONG: {} bytes received, {expected} expected; {} SNAPSHOTs \
                         skipped {} bytes",
                        run.received, run.snapshots, run.skipped
                    )
                };
                println!(
                    "round {}: stoa terminal → WS client {:>6.1} MB/s ({:.2} s, {check}); \
                     {} OUTPUT frames of {:.1} KiB average; CPU s: worker {:.2}, front {:.2}, client \
                     {:.2}; machine {:.2} of {} cores busy",
                    round + 1,
                    rate(run.elapsed),
                    run.elapsed.as_secs_f64(),
                    run.frames,
                    run.received as f64 / run.frames.max(1) as f64 / 1024.0,
                    run.cpu.worker,
                    run.cpu.front,
                    run.cpu.client,
                    run.cpu.cores_busy,
                    cores()
                );
            }
        }
    }
    let (d, counted, _) = raw_cat(file, true)?;
    let counted = counted.unwrap_or(0);
    println!(
        "raw PTY through a pipe (counted): {:.1} MB/s, {counted} bytes ({})",
        rate(d),
        if counted == expected {
            "as expected"
        } else {
            "NOT the expected count"
        }
    );
    let ratio = mean(&via_stoa) / mean(&raw) * 100.0;
    // Other load only ever slows a run down: the best runs are the least disturbed.
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let best_ratio = best(&via_stoa) / best(&raw) * 100.0;
    // Within a round the two ran back to back, on about the same machine.
    let per_round: Vec<String> = raw
        .iter()
        .zip(&via_stoa)
        .map(|(r, s)| format!("{:.0} %", s / r * 100.0))
        .collect();
    summary.push(format!(
        "throughput ({} MiB cat, {} rounds): raw PTY {:.1} MB/s [{}], stoa {:.1} MB/s [{}], \
         stoa/raw {ratio:.0} % of means, {best_ratio:.0} % of bests, per round {} (target \
         ≥ 90 %); stoa byte counts {}",
        settings.file_bytes >> 20,
        settings.rounds,
        mean(&raw),
        range(&raw),
        mean(&via_stoa),
        range(&via_stoa),
        per_round.join(", "),
        if wrong.is_empty() {
            "exact".to_string()
        } else {
            format!("WRONG in {} rounds: {}", wrong.len(), wrong.join("; "))
        }
    ));
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

// ---------------------------------------------------------------------------------------
// 2. Echo latency.

/// 1-byte INPUT → OUTPUT, then PING → PONG, on one terminal running the echo program.
fn stoa_echo(stoa: &Stoa, n: usize) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let id = stoa.create(0, &["sh", "-c", ECHO_PROGRAM])?;
    let result = (|| {
        let mut viewer = Viewer::open(stoa, &id)?;
        viewer.ready()?;
        let mut echo = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let byte = b'a' + (i % 26) as u8;
            let t0 = Instant::now();
            viewer.send(ClientFrame::Input(vec![byte]))?;
            loop {
                if let ServerFrame::Output { bytes, .. } = viewer.next()? {
                    if bytes != [byte] {
                        return Err(format!("echo: sent {byte:?}, got {bytes:?}"));
                    }
                    break;
                }
            }
            if i >= WARMUP {
                echo.push(t0.elapsed());
            }
        }
        let mut ping = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let t0 = Instant::now();
            viewer.send(ClientFrame::Ping(i as u64))?;
            loop {
                if let ServerFrame::Pong(t) = viewer.next()? {
                    if t != i as u64 {
                        return Err(format!("PONG {t}, expected {i}"));
                    }
                    break;
                }
            }
            if i >= WARMUP {
                ping.push(t0.elapsed());
            }
        }
        viewer.close();
        Ok((echo, ping))
    })();
    let deleted = stoa.delete(0, &id);
    let result = result?;
    deleted?;
    Ok(result)
}

/// The echo program on a bare PTY, from Rust: write 1 byte to the master, read it back.
fn pty_echo(n: usize) -> Result<Vec<Duration>, String> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    let slave = |fd: &std::os::fd::OwnedFd| {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("dup: {e}"))
    };
    let mut child = Command::new("sh")
        .args(["-c", ECHO_PROGRAM])
        .stdin(slave(&pty.slave)?)
        .stdout(slave(&pty.slave)?)
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let mut master = File::from(pty.master);
    let result = (|| {
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        while !seen.windows(READY.len()).any(|w| w == READY) {
            let k = master
                .read(&mut buf)
                .map_err(|e| format!("pty read: {e}"))?;
            if k == 0 {
                return Err("the echo program ended".to_string());
            }
            seen.extend_from_slice(&buf[..k]);
        }
        let mut times = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let byte = b'a' + (i % 26) as u8;
            let t0 = Instant::now();
            master
                .write_all(&[byte])
                .map_err(|e| format!("pty write: {e}"))?;
            let k = master
                .read(&mut buf)
                .map_err(|e| format!("pty read: {e}"))?;
            if buf[..k] != [byte] {
                return Err(format!("echo: sent {byte:?}, got {:?}", &buf[..k]));
            }
            if i >= WARMUP {
                times.push(t0.elapsed());
            }
        }
        Ok(times)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The same from Python (`pty.fork`): its p50/p90/p99.
fn python_echo(work: &Path, n: usize) -> Result<[Duration; 3], String> {
    let script = work.join("echo.py");
    fs::write(&script, PY_ECHO).map_err(|e| format!("{}: {e}", script.display()))?;
    let out = Command::new("python3")
        .arg(&script)
        .args([n.to_string(), WARMUP.to_string(), ECHO_PROGRAM.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python3: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ns: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match ns[..] {
        [a, b, c] => Ok([a, b, c].map(Duration::from_nanos)),
        _ => Err(format!("python3 printed {text:?}")),
    }
}

fn echo(
    stoa: &Stoa,
    work: &Path,
    settings: &Settings,
    summary: &mut Vec<String>,
) -> Result<(), String> {
    let n = settings.echo;
    let line = |name: &str, p: [Duration; 3]| {
        format!(
            "{name:<42} p50 {:>9}  p90 {:>9}  p99 {:>9}",
            us(p[0]),
            us(p[1]),
            us(p[2])
        )
    };
    let (mut echo, mut ping) = stoa_echo(stoa, n)?;
    let stoa_p = spread(&mut echo);
    let ping_p = spread(&mut ping);
    let bare_p = spread(&mut pty_echo(n)?);
    let python_p = python_echo(work, n);
    println!("{n} round trips each, after {WARMUP} unmeasured:");
    let lines = [
        line("stoa: INPUT → OUTPUT (WS+front+worker+PTY)", stoa_p),
        line("stoa: PING → PONG (WS+front+worker)", ping_p),
        line("bare PTY, Rust", bare_p),
        match &python_p {
            Ok(p) => line("bare PTY, Python pty.fork", *p),
            Err(e) => format!("bare PTY, Python: not measured: {e}"),
        },
    ];
    for l in &lines {
        println!("{l}");
    }
    summary.push(format!(
        "echo ({n} round trips): stoa p50 {} p90 {} p99 {} (targets p50 ≤ 150 µs, p99 ≤ 2 ms); \
         bare PTY p50 {} p99 {} (Rust){}; PING→PONG p50 {} p99 {}; stoa − bare PTY at p50: {}",
        us(stoa_p[0]),
        us(stoa_p[1]),
        us(stoa_p[2]),
        us(bare_p[0]),
        us(bare_p[2]),
        match &python_p {
            Ok(p) => format!(", p50 {} p99 {} (Python)", us(p[0]), us(p[2])),
            Err(_) => String::new(),
        },
        us(ping_p[0]),
        us(ping_p[2]),
        us(stoa_p[0].saturating_sub(bare_p[0])),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. Idle terminals.

const IDLE_PROGRAM: [&str; 2] = ["sleep", "3600"];

fn idle(stoa: &Stoa, settings: &Settings, summary: &mut Vec<String>) -> Result<(), String> {
    let n = settings.terminals;
    let users = stoa.users.len();
    // Cold: the front has answered /health only, and no worker has run yet.
    let cold = Census::take(stoa)?;
    println!("before any terminal: {}", cold.describe());
    // Warm: one terminal created and deleted per user starts each user's worker (and what
    // the front allocates once), so that is not counted per terminal. A worker retires
    // after 60 s without work or connections: well after the terminals below are made.
    let t0 = Instant::now();
    for user in 0..users {
        let id = stoa.create(user, &IDLE_PROGRAM)?;
        stoa.delete(user, &id)?;
    }
    let warmed_in = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let warm = Census::take(stoa)?;
    println!(
        "after one terminal created and deleted per user ({:.2} s): {}",
        warmed_in.as_secs_f64(),
        warm.describe()
    );
    if warm.workers.len() != users {
        return Err(format!(
            "{} workers running after a terminal of each of the {users} users",
            warm.workers.len()
        ));
    }

    // Round-robin over the users: n / users terminals each.
    let mut ids: Vec<(usize, String)> = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let t0 = Instant::now();
    let mut failed = None;
    for i in 0..n {
        let user = i % users;
        let t = Instant::now();
        match stoa.create(user, &IDLE_PROGRAM) {
            Ok(id) => ids.push((user, id)),
            Err(e) => {
                failed = Some(format!(
                    "terminal {} of {n} (as {}): {e}",
                    i + 1,
                    stoa.users[user].unix
                ));
                break;
            }
        }
        times.push(t.elapsed());
    }
    let created_in = t0.elapsed();
    let result = match failed {
        None => measure_idle(stoa, &ids, [&cold, &warm], created_in, &mut times, summary),
        Some(e) => {
            let front_now = stoa.front();
            println!(
                "creating failed at {e}\n  broker pid {}: {} fds, {}\n  front {front_now:?}: \
                 {} fds\n  workers: {:?}\n--- the end of stoa.log ---\n{}",
                stoa.broker,
                fd_count(stoa.broker),
                max_open_files(stoa.broker),
                front_now.as_ref().map_or(0, |&p| fd_count(p)),
                stoa.workers(),
                stoa.log_tail(15)
            );
            Err(e)
        }
    };

    // Delete them all, and check nothing of the users' is left but their idle workers.
    let t0 = Instant::now();
    let mut delete_errors = Vec::new();
    for (user, id) in &ids {
        if let Err(e) = stoa.delete(*user, id) {
            delete_errors.push(e);
        }
    }
    let deleted_in = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut listed, mut left) = (usize::MAX, (usize::MAX, 0));
    while Instant::now() < deadline {
        listed = stoa.list_all().map_or(usize::MAX, |(l, _)| l);
        left = stoa.user_processes("sleep");
        if listed == 0 && left.0 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = Census::take(stoa)?;
    let after = format!(
        "deleted {} in {:.2} s ({} errors{}); left: {listed} terminals listed, {} processes \
         of the {users} users besides their workers; {}",
        ids.len(),
        deleted_in.as_secs_f64(),
        delete_errors.len(),
        delete_errors
            .first()
            .map_or(String::new(), |e| format!(", first: {e}")),
        left.0,
        after.describe(),
    );
    println!("{after}");
    summary.push(format!("idle terminals, cleanup: {after}"));
    result?;
    if listed != 0 || left.0 != 0 || !delete_errors.is_empty() {
        return Err(format!("not all cleaned up: {after}"));
    }
    Ok(())
}

/// What the output in every terminal's ring takes: the sum of `current - oldest` from
/// each one's WELCOME (read-only viewers, as the terminal's own user), in bytes.
fn ring_bytes(stoa: &Stoa, ids: &[(usize, String)]) -> Result<u64, String> {
    let mut total = 0;
    for (user, id) in ids {
        match Viewer::connect(stoa, *user, id, false)? {
            (
                viewer,
                ServerFrame::Welcome {
                    oldest, current, ..
                },
            ) => {
                total += current - oldest;
                viewer.close();
            }
            (_, other) => return Err(format!("terminal {id}: expected a WELCOME, got {other:?}")),
        }
    }
    Ok(total)
}

fn measure_idle(
    stoa: &Stoa,
    ids: &[(usize, String)],
    [cold, warm]: [&Census; 2],
    created_in: Duration,
    times: &mut [Duration],
    summary: &mut Vec<String>,
) -> Result<(), String> {
    let n = ids.len();
    let users = stoa.users.len();
    let create_p = spread(times);
    // Wait until all are there and running: listed, and one `sleep` each.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (listed, running) = stoa.list_all()?;
        let (all, sleeps) = stoa.user_processes("sleep");
        if running == n && sleeps == n {
            println!(
                "all {n} listed and running; {all} processes of the {users} users besides \
                 their workers ({sleeps} `sleep`)"
            );
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 60 s: {listed} listed, {running} running, {sleeps} `sleep` processes"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let full = Census::take(stoa)?;
    println!("with {n}: {}", full.describe());
    let mut per_worker: Vec<String> = full
        .workers
        .iter()
        .map(|(pid, uid, m, fds)| format!("uid {uid} (pid {pid}) {} KiB, {fds} fds", m.kib))
        .collect();
    per_worker.sort();
    println!("  each worker ({}): {}", full.kind(), per_worker.join("; "));
    if full.workers.len() != users {
        return Err(format!(
            "{} workers running with terminals of {users} users",
            full.workers.len()
        ));
    }
    // After the memory is read: the viewers these need allocate too.
    let t0 = Instant::now();
    let rings = ring_bytes(stoa, ids)?;
    let rings_kib = rings as f64 / 1024.0;
    println!(
        "rings: {rings} bytes of output held in all {n} (read from each one's WELCOME in \
         {:.2} s); subtracted below",
        t0.elapsed().as_secs_f64()
    );

    let kind = full.kind();
    let per = |after: u64, before: u64| (after as f64 - before as f64 - rings_kib) / n as f64;
    let all = |c: &Census| c.broker.kib + c.front_and_workers();
    let from_warm = per(all(&full), all(warm));
    let from_cold = per(all(&full), all(cold));
    // The parts, each from the warm baseline (rings counted in the workers' part).
    let part = |after: u64, before: u64| (after as f64 - before as f64) / n as f64;
    let front = part(full.front.kib, warm.front.kib);
    let workers = part(full.workers_kib(), warm.workers_kib());
    let broker = part(full.broker.kib, warm.broker.kib);
    let per_worker_start = (all(warm) as f64 - all(cold) as f64) / users as f64;
    println!(
        "per terminal, beyond the rings ({kind}, broker + front + {users} workers): \
         {from_warm:.1} KiB with the workers already running, {from_cold:.1} KiB counting \
         their start too; of the first: front {front:.1}, workers {workers:.1}, broker \
         {broker:.1} KiB; a worker's start added {per_worker_start:.0} KiB ({kind}, all \
         processes)"
    );
    println!(
        "created in {:.2} s ({:.0} per second); each: p50 {} p90 {} p99 {}",
        created_in.as_secs_f64(),
        n as f64 / created_in.as_secs_f64(),
        us(create_p[0]),
        us(create_p[1]),
        us(create_p[2])
    );
    summary.push(format!(
        "idle terminals ({n} × sleep 3600 over {users} users, {} per worker), {kind} of \
         broker + front + workers: {} → {} KiB = {from_warm:.1} KiB per terminal beyond the \
         rings ({rings} ring bytes in all) with the workers running (front {front:.1}, \
         workers {workers:.1}, broker {broker:.1}); {} → {} KiB = {from_cold:.1} KiB per \
         terminal counting the {users} workers' start (target ≤ 100 KiB); fds: broker {}, \
         front {}, workers {}; created in {:.2} s (p50 {} p99 {} each)",
        n / users,
        all(warm),
        all(&full),
        all(cold),
        all(&full),
        full.fds.0,
        full.fds.1,
        full.worker_fds(),
        created_in.as_secs_f64(),
        us(create_p[0]),
        us(create_p[2])
    ));
    Ok(())
}
