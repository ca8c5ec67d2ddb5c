//! What the benches share: the test accounts, the release build, and a running
//! `stoa serve` as root, all undone on drop.
#![forbid(unsafe_code)]
#![allow(dead_code)] // each bench uses its own part

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Group, Pid, User};
use serde_json::Value;

/// The unprivileged user everything runs as.
pub const USER: &str = "stoa-bench-u";
/// The group the broker policy allows.
pub const GROUP: &str = "stoa-bench-users";
/// The account the stoa daemon runs as (the broker creates it).
pub const SERVICE_USER: &str = "stoa-bench-svc";

/// The `i`-th further Unix user (`i` ≥ 1) a bench may add with [`Fixture::add_users`]:
/// `stoa-bench-u1`, `stoa-bench-u2`, … (in `GROUP`, like `USER`).
pub fn extra_user(i: usize) -> String {
    format!("{USER}{i}")
}

pub fn get_health(agent: &ureq::Agent, url: &str) -> Result<Value, String> {
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
pub fn find_program(program: &str) -> Option<PathBuf> {
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

pub fn machine() -> String {
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
pub fn build_binaries() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Built beforehand (the test VM has no cargo: scripts/vm/bench.sh).
    if let Some(dist) = std::env::var_os("STOA_BENCH_DIST").map(PathBuf::from) {
        eprintln!("bench: the binaries in {}", dist.display());
        return Ok(dist);
    }
    eprintln!("bench: scripts/build-release.sh");
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
pub struct Fixture {
    pub dir: PathBuf,
    /// The broker policy's `workers_dir` (each user's worker keeps its store in
    /// `<workers_dir>/<uid>/`): root's, 0755, inside `dir`.
    pub workers_dir: PathBuf,
    server: Option<Child>,
    pub base_url: String,
    pub token: String,
}

impl Fixture {
    /// `extra_config` is appended to the daemon's config.toml, `extra_policy` to the
    /// broker's broker.toml.
    pub fn start(
        release: &Path,
        extra_config: &str,
        extra_policy: &str,
    ) -> Result<Fixture, String> {
        let dir = PathBuf::from(format!("/run/stoa-bench-{}", std::process::id()));
        // A run killed before its cleanup leaves these behind.
        remove_accounts();
        let mut fixture = Fixture {
            workers_dir: dir.join("workers"),
            dir,
            server: None,
            base_url: String::new(),
            token: String::new(),
        };
        fixture.create_accounts()?;
        fixture.start_stoa(release, extra_config, extra_policy)?;
        Ok(fixture)
    }

    fn create_accounts(&self) -> Result<(), String> {
        run_admin("groupadd", &[GROUP])?;
        create_user(USER)
    }

    /// Adds the Unix users [`extra_user`]`(1..=n)`, made like `USER` (a home, in `GROUP`);
    /// they are removed on drop with the others. Their names.
    pub fn add_users(&self, n: usize) -> Result<Vec<String>, String> {
        (1..=n)
            .map(|i| {
                let name = extra_user(i);
                create_user(&name).map(|()| name)
            })
            .collect()
    }

    fn start_stoa(
        &mut self,
        release: &Path,
        extra_config: &str,
        extra_policy: &str,
    ) -> Result<(), String> {
        let dir = &self.dir;
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
        let set_mode = |path: &Path, mode: u32| {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
        };
        set_mode(dir, 0o755)?;
        set_mode(&bin, 0o755)?;
        // Not the default /var/lib/stoa-workers: everything of the bench's stays in `dir`.
        fs::create_dir_all(&self.workers_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.workers_dir.display()))?;
        set_mode(&self.workers_dir, 0o755)?;
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
                "executor_path = {:?}\nstate_dir = {:?}\nworkers_dir = {:?}\n\
                 service_user = {SERVICE_USER:?}\nallow_groups = [{GROUP:?}]\nmin_uid = 1000\n\
                 {extra_policy}\n",
                bin.join("stoa-executor"),
                broker_state,
                self.workers_dir,
            ),
        )?;
        write(
            &daemon_config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n{extra_config}\n",
                dir.join("daemon")
            ),
        )?;

        let log_path = dir.join("stoa.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("cannot create log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        // On a pure cgroup-v2 machine with systemd: a scope of its own with Delegate=yes,
        // as stoa.service has (a v2 cgroup with controllers below holds no processes, so
        // the broker cannot share the bench's). systemd-run --scope execs stoa.
        let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            && Path::new("/run/systemd/system").exists();
        let mut command = if pure_v2 {
            let mut c = Command::new("systemd-run");
            c.args([
                "--scope",
                "--quiet",
                "--collect",
                "-p",
                "Delegate=yes",
                "--",
            ])
            .arg(bin.join("stoa"));
            c
        } else {
            Command::new(bin.join("stoa"))
        };
        let child = command
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
                // Without a token /health says only its status: "ok" once the broker is
                // connected and the store writable.
                if reply["status"] == "ok" {
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
        eprintln!("bench: stoa ignored SIGTERM for 15 s; killing it");
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
                eprintln!("bench: cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// Creates `name` with a home, in `GROUP`; it must get a uid the policy allows.
fn create_user(name: &str) -> Result<(), String> {
    run_admin("useradd", &["--create-home", "--groups", GROUP, name])?;
    let uid = User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| format!("user {name} missing after useradd"))?
        .uid
        .as_raw();
    if uid < 1000 {
        return Err(format!(
            "useradd gave {name} uid {uid}, below the policy's 1000"
        ));
    }
    Ok(())
}

/// `USER` and every [`extra_user`] in /etc/passwd (where useradd puts them).
fn bench_users() -> Vec<String> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let extra = passwd.lines().filter_map(|l| {
        let name = l.split(':').next()?;
        let n = name.strip_prefix(USER)?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| name.to_string())
    });
    std::iter::once(USER.to_string()).chain(extra).collect()
}

/// Removes the test users (with their homes), the service user and the group, first
/// killing any process left running as them. Quiet about what does not exist.
pub fn remove_accounts() {
    let users = bench_users();
    for user in users.iter().map(String::as_str).chain([SERVICE_USER]) {
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
        let args: &[&str] = if users.iter().any(|u| u == user) {
            &["--remove", user]
        } else {
            &[user]
        };
        if let Err(e) = run_admin("userdel", args) {
            eprintln!("bench: {e}");
        }
    }
    // userdel removes each user's own group; what is left is ours.
    for group in [GROUP, SERVICE_USER]
        .into_iter()
        .chain(users.iter().map(String::as_str))
    {
        if Group::from_name(group).ok().flatten().is_some() {
            if let Err(e) = run_admin("groupdel", &[group]) {
                eprintln!("bench: {e}");
            }
        }
    }
}

/// Runs an account tool (useradd, userdel, ...) quietly; stderr only on failure.
pub fn run_admin(program: &str, args: &[&str]) -> Result<(), String> {
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
