//! `cargo bench --bench terminal`: stoa's terminals against a bare PTY, in one run.
//!
//! 1. Throughput: `cat` of a 1 GiB text file (base64, 120-char lines) through a stoa
//!    terminal to a `stoa.term.v1` client in this process (ACK every 256 KiB, bytes
//!    counted until EXIT and checked against the file plus one `\r` per `\n`), against the
//!    same `cat` under `script -qc 'cat FILE' /dev/null > /dev/null`. The paths alternate,
//!    one round each per STOA_BENCH_ROUNDS; a last raw run through a pipe counts its bytes.
//! 2. Keystroke echo: a 1-byte INPUT until it comes back in an OUTPUT frame, through a
//!    terminal running `stty raw -echo; exec cat`. References: the same program on a bare
//!    PTY driven from Rust and from Python (`pty.fork`), and PING→PONG on the same socket
//!    (the WebSocket and daemon without the PTY).
//! 3. 1,000 idle terminals (`sleep 3600`): the daemon's RSS per terminal (idle terminals
//!    have empty rings), the broker's and the daemon's open fds, how long creating and
//!    deleting them took; at the end nothing of the user's may be left.
//!
//! The idle terminals come first, on a fresh daemon (after one terminal created and
//! deleted, so one-time allocations are not counted). Programs that print `READY` once
//! they are set up let the client start at a known point. As under systemd, stoa starts
//! with an open-file soft limit of 1024 (hard: 524288 where this process may raise it),
//! so a part of stoa that needs more fds has to raise its own.
//!
//! The broker's limits on executors and spawn rate are raised for the 1,000 terminals.
//!
//! It prints figures and ratios and asserts nothing; a part that fails is reported and the
//! others still run (the exit status is then 1). Needs root (without it: skipped).
//!
//! Environment: STOA_BENCH_ROUNDS (throughput rounds per path, default 2),
//! STOA_BENCH_FILE_MIB (default 1024), STOA_BENCH_ECHO (round trips, default 2000),
//! STOA_BENCH_TERMINALS (idle terminals, default 1000), STOA_BENCH_RING_KIB (the daemon's
//! `[terminal] ring_bytes`; unset: its default).
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
    let stoa = Stoa::new(&fixture)?;
    println!("terminal bench: {}", machine());
    println!("open-file limit stoa started with: {fd_limit}");
    if !ring.is_empty() {
        println!("daemon [terminal] {}", ring.trim());
    }
    for (name, pid) in [("broker", stoa.broker), ("daemon", stoa.daemon()?)] {
        println!("  {name} (pid {pid}): {}", max_open_files(pid));
    }

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

struct Stoa<'a> {
    fixture: &'a Fixture,
    agent: ureq::Agent,
    /// The API user's token (its terminals run as `USER`).
    token: String,
    port: u16,
    broker: i32,
    uid: u32,
}

impl<'a> Stoa<'a> {
    fn new(fixture: &'a Fixture) -> Result<Stoa<'a>, String> {
        let out = Command::new(fixture.dir.join("bin/stoa"))
            .args(["user", "add", "bench", "--unix-user", USER])
            .env("STOA_BROKER_CONFIG", fixture.dir.join("broker.toml"))
            .output()
            .map_err(|e| format!("stoa user add: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "stoa user add: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = fixture
            .base_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no port in {}", fixture.base_url))?;
        let uid = nix::unistd::User::from_name(USER)
            .ok()
            .flatten()
            .ok_or_else(|| format!("no user {USER}"))?
            .uid
            .as_raw();
        Ok(Stoa {
            fixture,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
            token: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            port,
            broker: broker_pid(&fixture.dir)?,
            uid,
        })
    }

    /// `(status, JSON body or Null)`; Err only when there is no HTTP answer.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.fixture.base_url);
        let auth = format!("Bearer {}", self.token);
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

    /// A terminal running `argv` as `USER`; its id.
    fn create(&self, argv: &[&str]) -> Result<String, String> {
        let body = json!({ "cols": 120, "rows": 40, "command": argv });
        match self.call("POST", "/terminals", Some(body))? {
            (201, t) => t["terminal_id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("POST /terminals: no terminal_id in {t}")),
            (status, t) => Err(format!("POST /terminals: HTTP {status}: {t}")),
        }
    }

    fn delete(&self, id: &str) -> Result<(), String> {
        match self.call("DELETE", &format!("/terminals/{id}"), None)? {
            (204, _) => Ok(()),
            (status, t) => Err(format!("DELETE /terminals/{id}: HTTP {status}: {t}")),
        }
    }

    fn list(&self) -> Result<Vec<Value>, String> {
        match self.call("GET", "/terminals", None)? {
            (200, Value::Array(a)) => Ok(a),
            (status, t) => Err(format!("GET /terminals: HTTP {status}: {t}")),
        }
    }

    fn daemon(&self) -> Result<i32, String> {
        daemon_pid(self.broker)
    }

    /// Processes running as `USER`: (all, named `name`).
    fn user_processes(&self, name: &str) -> (usize, usize) {
        let (mut all, mut named) = (0, 0);
        for pid in pids() {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let uid =
                field(&status, "Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok());
            if uid == Some(self.uid) {
                all += 1;
                if field(&status, "Name:").map(str::trim) == Some(name) {
                    named += 1;
                }
            }
        }
        (all, named)
    }

    /// The last `n` lines of stoa's log (broker and daemon).
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

/// The broker's child `stoa __daemon`.
fn daemon_pid(broker: i32) -> Result<i32, String> {
    pids()
        .find(|&pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            field(&status, "PPid:").and_then(|p| p.trim().parse().ok()) == Some(broker)
                && cmdline(pid).iter().any(|a| a == "__daemon")
        })
        .ok_or_else(|| format!("no `stoa __daemon` child of the broker (pid {broker})"))
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
    /// Connects, says HELLO (from offset 0, writing) and reads the WELCOME.
    fn open(stoa: &Stoa, id: &str) -> Result<Viewer, String> {
        let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws", stoa.port);
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        let value = |v: &str| v.parse().map_err(|e| format!("header: {e}"));
        headers.insert("Sec-WebSocket-Protocol", value(SUBPROTOCOL)?);
        headers.insert("Authorization", value(&format!("Bearer {}", stoa.token))?);
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
            want_write: true,
        })?;
        match viewer.next()? {
            ServerFrame::Welcome {
                can_write: true, ..
            } => Ok(viewer),
            other => Err(format!("expected a writing WELCOME, got {other:?}")),
        }
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
    let cpu = CpuClock::start(None);
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
    let id = stoa.create(&["sh", "-c", &program])?;
    let result = (|| {
        let mut viewer = Viewer::open(stoa, &id)?;
        let start = viewer.ready()?;
        let (frames, snapshots, skipped) = (viewer.frames, viewer.snapshots, viewer.skipped);
        let cpu = CpuClock::start(stoa.daemon()?);
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
    let deleted = stoa.delete(&id);
    let result = result?;
    deleted?;
    Ok(result)
}

/// CPU seconds used while something ran: by the daemon, by this process (the client),
/// by this process's waited-for children, and by the whole machine (in cores busy).
#[derive(Default)]
struct CpuUse {
    daemon: f64,
    client: f64,
    children: f64,
    cores_busy: f64,
}

struct CpuClock {
    daemon: Option<i32>,
    at: [f64; 4],
}

impl CpuClock {
    fn start(daemon: impl Into<Option<i32>>) -> CpuClock {
        let daemon = daemon.into();
        CpuClock {
            at: Self::now(daemon),
            daemon,
        }
    }

    fn now(daemon: Option<i32>) -> [f64; 4] {
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
            daemon.map_or(0.0, |p| process(&p.to_string())) / tick,
            process("self") / tick,
            children,
            busy / tick,
        ]
    }

    fn stop(self, elapsed: Duration) -> CpuUse {
        let now = Self::now(self.daemon);
        let d = |i: usize| now[i] - self.at[i];
        CpuUse {
            daemon: d(0),
            client: d(1),
            children: d(2),
            cores_busy: d(3) / elapsed.as_secs_f64(),
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
                     {} OUTPUT frames of {:.1} KiB average; CPU s: daemon {:.2}, client \
                     {:.2}; machine {:.2} of {} cores busy",
                    round + 1,
                    rate(run.elapsed),
                    run.elapsed.as_secs_f64(),
                    run.frames,
                    run.received as f64 / run.frames.max(1) as f64 / 1024.0,
                    run.cpu.daemon,
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
    summary.push(format!(
        "throughput ({} MiB cat, {} rounds): raw PTY {:.1} MB/s [{}], stoa {:.1} MB/s [{}], \
         stoa/raw {ratio:.0} % of means, {best_ratio:.0} % of bests (target ≥ 90 %); \
         stoa byte counts {}",
        settings.file_bytes >> 20,
        settings.rounds,
        mean(&raw),
        range(&raw),
        mean(&via_stoa),
        range(&via_stoa),
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
    let id = stoa.create(&["sh", "-c", ECHO_PROGRAM])?;
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
    let deleted = stoa.delete(&id);
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
            "{name:<34} p50 {:>9}  p90 {:>9}  p99 {:>9}",
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
        line("stoa: INPUT → OUTPUT (WS+daemon+PTY)", stoa_p),
        line("stoa: PING → PONG (WS+daemon)", ping_p),
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

fn idle(stoa: &Stoa, settings: &Settings, summary: &mut Vec<String>) -> Result<(), String> {
    let n = settings.terminals;
    // One terminal first, so what is allocated once is not counted per terminal.
    let first = stoa.create(&["sleep", "3600"])?;
    stoa.delete(&first)?;
    std::thread::sleep(Duration::from_millis(500));
    let daemon = stoa.daemon()?;
    let rss_before = status_kib(daemon, "VmRSS:")?;
    let anon_before = status_kib(daemon, "RssAnon:")?;
    let fds_before = (fd_count(stoa.broker), fd_count(daemon));
    println!(
        "before: daemon (pid {daemon}) VmRSS {rss_before} KiB (RssAnon {anon_before} KiB), \
         fds: broker {} daemon {}",
        fds_before.0, fds_before.1
    );

    let mut ids = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let t0 = Instant::now();
    let mut failed = None;
    for i in 0..n {
        let t = Instant::now();
        match stoa.create(&["sleep", "3600"]) {
            Ok(id) => ids.push(id),
            Err(e) => {
                failed = Some(format!("terminal {} of {n}: {e}", i + 1));
                break;
            }
        }
        times.push(t.elapsed());
    }
    let created_in = t0.elapsed();
    let result = match failed {
        None => measure_idle(stoa, n, rss_before, created_in, &mut times, summary),
        Some(e) => {
            let daemon_now = stoa.daemon();
            println!(
                "creating failed at {e}\n  broker pid {}: {} fds, {}\n  daemon {daemon_now:?}: \
                 {} fds\n--- the end of stoa.log ---\n{}",
                stoa.broker,
                fd_count(stoa.broker),
                max_open_files(stoa.broker),
                daemon_now.as_ref().map_or(0, |&p| fd_count(p)),
                stoa.log_tail(15)
            );
            Err(e)
        }
    };

    // Delete them all, and check nothing of the user's is left.
    let t0 = Instant::now();
    let mut delete_errors = Vec::new();
    for id in &ids {
        if let Err(e) = stoa.delete(id) {
            delete_errors.push(e);
        }
    }
    let deleted_in = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut listed, mut left) = (usize::MAX, (usize::MAX, 0));
    while Instant::now() < deadline {
        listed = stoa.list().map_or(usize::MAX, |l| l.len());
        left = stoa.user_processes("sleep");
        if listed == 0 && left.0 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let daemon = stoa.daemon()?;
    let after = format!(
        "deleted {} in {:.2} s ({} errors{}); left: {listed} terminals listed, {} processes of \
         {USER}; daemon VmRSS {} KiB, fds: broker {} daemon {}",
        ids.len(),
        deleted_in.as_secs_f64(),
        delete_errors.len(),
        delete_errors
            .first()
            .map_or(String::new(), |e| format!(", first: {e}")),
        left.0,
        status_kib(daemon, "VmRSS:")?,
        fd_count(stoa.broker),
        fd_count(daemon),
    );
    println!("{after}");
    summary.push(format!("idle terminals, cleanup: {after}"));
    result?;
    if listed != 0 || left.0 != 0 || !delete_errors.is_empty() {
        return Err(format!("not all cleaned up: {after}"));
    }
    Ok(())
}

fn measure_idle(
    stoa: &Stoa,
    n: usize,
    rss_before: u64,
    created_in: Duration,
    times: &mut [Duration],
    summary: &mut Vec<String>,
) -> Result<(), String> {
    let create_p = spread(times);
    // Wait until all are there and running: listed, and one `sleep` each.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = stoa.list()?;
        let running = list.iter().filter(|t| t["running"] == true).count();
        let (all, sleeps) = stoa.user_processes("sleep");
        if running == n && sleeps == n {
            println!("all {n} listed and running; {all} processes of {USER} ({sleeps} `sleep`)");
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 60 s: {} listed, {running} running, {sleeps} `sleep` processes",
                list.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let daemon = stoa.daemon()?;
    let rss = status_kib(daemon, "VmRSS:")?;
    let anon = status_kib(daemon, "RssAnon:")?;
    let (broker_fds, daemon_fds) = (fd_count(stoa.broker), fd_count(daemon));
    let per = (rss as f64 - rss_before as f64) / n as f64;
    println!(
        "with {n}: daemon VmRSS {rss} KiB (RssAnon {anon} KiB), {per:.1} KiB per terminal; \
         fds: broker {broker_fds} daemon {daemon_fds}"
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
        "idle terminals ({n} × sleep 3600): daemon RSS {rss_before} → {rss} KiB = {per:.1} KiB \
         per terminal (target ≤ 100 KiB); broker fds {broker_fds}, daemon fds {daemon_fds}; \
         created in {:.2} s (p50 {} p99 {} each)",
        created_in.as_secs_f64(),
        us(create_p[0]),
        us(create_p[2])
    ));
    Ok(())
}
