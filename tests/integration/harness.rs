//! Test fixtures: real Unix users, a real `stoa serve` per instance, and helpers to look at
//! real processes through /proc.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const GROUP: &str = "stoa-t-users";
pub const ALICE: &str = "stoa-t-alice";
pub const BOB: &str = "stoa-t-bob";
/// Has a normal uid but is not in the allowed group.
pub const CAROL: &str = "stoa-t-carol";
pub const SERVICE: &str = "stoa-t-svc";

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn uid_of(user: &str) -> u32 {
    run("id", &["-u", user]).trim().parse().expect("uid")
}

/// The users every test shares; removed (with their processes and homes) on drop. A run
/// holds a machine-wide lock meanwhile: two runs sharing these users would kill each
/// other's processes.
pub struct TestUsers {
    created_group: bool,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl TestUsers {
    pub fn create() -> TestUsers {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/stoa-integration-tests.lock")
            .expect("lock file");
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((file, _)) => {
                eprintln!("stoa integration tests: another run holds /run/stoa-integration-tests.lock; waiting");
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .expect("lock")
            }
        };
        let created_group = Command::new("getent")
            .args(["group", GROUP])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true);
        if created_group {
            run("groupadd", &[GROUP]);
        }
        for (user, in_group) in [(ALICE, true), (BOB, true), (CAROL, false)] {
            remove_user(user);
            let mut args = vec![
                "--create-home",
                "--shell",
                "/bin/sh",
                "--key",
                "UID_MIN=2000",
            ];
            if in_group {
                args.extend(["--groups", GROUP]);
            }
            args.push(user);
            run("useradd", &args);
            run("chmod", &["0700", &format!("/home/{user}")]);
        }
        TestUsers {
            created_group,
            _lock: lock,
        }
    }
}

fn remove_user(user: &str) {
    run_quiet("pkill", &["-KILL", "-u", user]);
    std::thread::sleep(Duration::from_millis(50));
    run_quiet("userdel", &["--remove", user]);
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for user in [ALICE, BOB, CAROL, SERVICE] {
            remove_user(user);
        }
        if self.created_group {
            run_quiet("groupdel", &[GROUP]);
        }
    }
}

/// The stoa binaries, copied into a root-owned directory (the broker refuses an executor
/// anyone else could replace, and the checkout may live somewhere writable).
fn binaries() -> (PathBuf, PathBuf) {
    let stoa = PathBuf::from(env!("CARGO_BIN_EXE_stoa"));
    let executor = stoa.with_file_name("stoa-executor");
    if !executor.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "stoa-executor"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build");
        assert!(status.success(), "building stoa-executor failed");
    }
    (stoa, executor)
}

/// A machine with only cgroup v2 (no v1 hierarchies) and systemd as init.
pub fn pure_cgroup_v2_with_systemd() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        && std::path::Path::new("/run/systemd/system").exists()
}

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// One `stoa serve` with its own directory, port and policy.
pub struct Instance {
    pub dir: PathBuf,
    pub port: u16,
    pub token: String,
    child: Child,
    /// Started through runuser (single-user mode), so the broker is its child.
    via_runuser: bool,
    agent: ureq::Agent,
}

#[derive(Default)]
pub struct Options {
    pub extra_policy: String,
    /// Run as this user (single-user mode) instead of root.
    pub as_user: Option<&'static str>,
    /// Extra environment for `stoa serve`.
    pub env: Vec<(String, String)>,
    /// Appended verbatim to the daemon's config.toml.
    pub extra_config: String,
    /// Started through this program (it execs the rest of its arguments), as root.
    pub wrapper: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Instance {
    pub fn start() -> Instance {
        Instance::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Instance {
        let n = INSTANCES.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/run/stoa-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let (stoa, executor) = binaries();
        for (src, name) in [(&stoa, "stoa"), (&executor, "stoa-executor")] {
            let dst = dir.join("bin").join(name);
            fs::copy(src, &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = free_port();
        // In single-user mode the files belong to that user, in a directory of theirs.
        let conf_dir = match opts.as_user {
            None => dir.clone(),
            Some(user) => {
                let d = dir.join(format!("home-{user}"));
                fs::create_dir_all(&d).unwrap();
                run("chown", &[&format!("{user}:"), d.to_str().unwrap()]);
                d
            }
        };
        // Tests stop stoa often: a short shutdown grace, unless the test sets its own.
        let grace = if opts.extra_policy.contains("shutdown_grace_secs") {
            ""
        } else {
            "shutdown_grace_secs = 2\n"
        };
        let policy = format!(
            "executor_path = \"{}\"\nstate_dir = \"{}\"\nworkers_dir = \"{}\"\nlocal_socket = \"{}\"\nservice_user = \"{SERVICE}\"\nallow_groups = [\"{GROUP}\"]\nmin_uid = 1000\n{grace}{}\n",
            dir.join("bin/stoa-executor").display(),
            conf_dir.join("broker").display(),
            conf_dir.join("workers").display(),
            conf_dir.join("local.sock").display(),
            opts.extra_policy
        );
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n{}\n",
            conf_dir.join("daemon").display(),
            opts.extra_config
        );
        fs::write(conf_dir.join("broker.toml"), policy).unwrap();
        fs::write(conf_dir.join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        let mut cmd = match opts.as_user {
            None => {
                // The command line: [systemd-run scope] [wrapper] stoa.
                let mut line: Vec<PathBuf> = Vec::new();
                if pure_cgroup_v2_with_systemd() {
                    // As stoa.service runs there: a cgroup of its own with Delegate=yes (a v2
                    // cgroup whose children have controllers may hold no processes, so the
                    // broker cannot share this test's). systemd-run --scope execs the
                    // command: the child is the broker (or the wrapper that execs it).
                    let scope = ["systemd-run", "--scope", "--quiet", "--collect"];
                    line.extend(scope.iter().map(PathBuf::from));
                    line.extend(["-p", "Delegate=yes", "--"].iter().map(PathBuf::from));
                }
                line.extend(opts.wrapper.iter().cloned());
                line.push(dir.join("bin/stoa"));
                let mut c = Command::new(&line[0]);
                c.args(&line[1..]);
                c
            }
            Some(user) => {
                for f in ["broker.toml", "config.toml"] {
                    run(
                        "chown",
                        &[&format!("{user}:"), conf_dir.join(f).to_str().unwrap()],
                    );
                }
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(dir.join("bin/stoa"));
                c
            }
        };
        cmd.arg("serve")
            .arg("--broker-config")
            .arg(conf_dir.join("broker.toml"))
            .arg("--config")
            .arg(conf_dir.join("config.toml"))
            .env("STOA_LOG", "info")
            .env("NO_COLOR", "1")
            .env("HOME", &conf_dir)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("start stoa serve");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut instance = Instance {
            dir,
            port,
            token: String::new(),
            child,
            via_runuser: opts.as_user.is_some(),
            agent,
        };
        instance.wait_healthy(Duration::from_secs(20));
        let token_path = conf_dir.join("broker").join("admin.token");
        instance.token = fs::read_to_string(&token_path)
            .expect("admin token")
            .trim()
            .to_string();
        instance
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The pid of `stoa serve` (with `runuser` in between in single-user mode).
    pub fn broker_pid(&self) -> i32 {
        let pid = self.child.id() as i32;
        if !self.via_runuser {
            return pid;
        }
        children_of(pid)
            .into_iter()
            .find(|p| comm(*p).as_deref() == Some("stoa"))
            .unwrap_or(pid)
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        children_of(self.broker_pid())
            .into_iter()
            .find(|p| cmdline(*p).iter().any(|a| a == "__daemon"))
    }

    /// The worker of `user` (a `stoa __worker` child of the broker running as that user).
    pub fn worker_pid(&self, user: &str) -> Option<i32> {
        let uid = uid_of(user).to_string();
        children_of(self.broker_pid()).into_iter().find(|p| {
            cmdline(*p).iter().any(|a| a == "__worker")
                && status_field(*p, "Uid")
                    .is_some_and(|u| u.split_whitespace().next() == Some(uid.as_str()))
        })
    }

    /// Waits until a worker of `user` other than `old` runs and has adopted its user's work
    /// (it says Ready to the broker after adopting).
    pub fn wait_new_worker(&self, user: &str, old: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = self.worker_pid(user).filter(|p| *p != old) {
                // Ready comes after adoption; its log line is the signal.
                if self.log().contains(&format!("worker {pid} ready")) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no new worker for {user}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/health`, with the admin token once it is known (without one it says only status
    /// and version).
    pub fn health(&self) -> Option<Value> {
        let mut req = self.agent.get(self.url("/health"));
        if !self.token.is_empty() {
            req = req.header("Authorization", format!("Bearer {}", self.token));
        }
        let mut resp = req.call().ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.body_mut().read_json().ok()
    }

    pub fn wait_healthy(&self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.health() {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "stoa did not become healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a daemon other than `old` answers.
    pub fn wait_new_daemon(&self, old: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = self.daemon_pid().filter(|p| *p != old) {
                if self.health().is_some() {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no new daemon; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("DELETE", _) => {
                let mut req = self.agent.delete(self.url(path));
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            ("POST", None) => {
                let mut req = self.agent.post(self.url(path));
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send_empty()
            }
            ("POST", Some(b)) => {
                let mut req = self.agent.post(self.url(path));
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send_json(b)
            }
            _ => {
                let mut req = self.agent.get(self.url(path));
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let value = resp.body_mut().read_json().unwrap_or(Value::Null);
        (status, value)
    }

    /// A request with a plain-text body.
    pub fn request_text(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        let req = match method {
            "PUT" => self.agent.put(self.url(path)),
            _ => self.agent.post(self.url(path)),
        };
        let mut resp = req
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "text/plain")
            .send(body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }

    /// Creates an API user acting as `unix_user` (through the real `stoa user add`) and
    /// returns its token.
    pub fn api_user(&self, name: &str, unix_user: &str) -> String {
        let out = Command::new(self.dir.join("bin/stoa"))
            .args(["user", "add", name, "--unix-user", unix_user])
            .env("STOA_BROKER_CONFIG", self.dir.join("broker.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stoa user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `POST /exec` with the admin token.
    pub fn exec(&self, body: Value) -> (u16, Value) {
        self.request("POST", "/exec", Some(&self.token.clone()), Some(&body))
    }

    /// Runs `sh -c script` as `user` and returns the reply, asserting HTTP 200.
    pub fn sh(&self, user: &str, script: &str) -> Value {
        let (status, reply) = self.exec(json!({ "unix_user": user, "argv": ["sh", "-c", script] }));
        assert_eq!(status, 200, "exec failed: {reply}");
        reply
    }

    pub fn processes(&self) -> Vec<Value> {
        let (status, v) = self.request("GET", "/processes", Some(&self.token.clone()), None);
        assert_eq!(status, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }
}

impl Instance {
    /// Waits for `stoa serve` to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.broker_pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---- /proc -------------------------------------------------------------------------

pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let close = stat.rfind(')')?;
    let mut fields = vec![stat[..close + 1].to_string()];
    fields.extend(stat[close + 2..].split(' ').map(String::from));
    Some(fields)
}

/// (state, ppid) of a process.
pub fn state_and_ppid(pid: i32) -> Option<(String, i32)> {
    let f = stat_fields(pid)?;
    Some((f[1].clone(), f[2].parse().ok()?))
}

pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

pub fn children_of(ppid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| state_and_ppid(*p).map(|(_, pp)| pp) == Some(ppid))
        .collect()
}

pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub fn status_field(pid: i32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_string())
    })
}

pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn zombie_children(pid: i32) -> usize {
    children_of(pid)
        .into_iter()
        .filter(|p| state_and_ppid(*p).map(|(s, _)| s == "Z").unwrap_or(false))
        .count()
}

/// Processes of `user` whose command line is exactly `argv`.
pub fn find_processes(user: &str, argv: &[&str]) -> Vec<i32> {
    let uid = uid_of(user).to_string();
    all_pids()
        .into_iter()
        .filter(|p| {
            status_field(*p, "Uid")
                .is_some_and(|u| u.split_whitespace().next() == Some(uid.as_str()))
        })
        .filter(|p| cmdline(*p) == argv)
        .collect()
}

pub fn alive(pid: i32) -> bool {
    state_and_ppid(pid).is_some_and(|(s, _)| s != "Z")
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
