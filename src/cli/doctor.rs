//! `stoa doctor`: checks a real installation and says how to fix what it finds.
//!
//! Each check prints one line (`ok`, `info`, `warn` or `FAIL`), and for a problem the
//! command that fixes it. Any `FAIL` makes the exit status non-zero; warnings don't.
//! It reads the same files the broker reads (`STOA_BROKER_CONFIG` and `STOA_CONFIG`
//! override them) and asks the running daemon for `/health` (`STOA_URL` overrides the
//! address from `listen`). Run it as root: otherwise what only root may read is skipped.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::broker::credentials::ADMIN_TOKEN_FILE;
use crate::broker::policy::{check_trusted_path, default_executor_path, Policy, Require};
use crate::config::{self, DaemonConfig};

const INSTALLED_BROKER_CONFIG: &str = "/etc/stoa/broker.toml";
const INSTALLED_DAEMON_CONFIG: &str = "/etc/stoa/config.toml";
const INSTALLED_DAEMON_STATE: &str = "/var/lib/stoa";
const INSTALLED_BROKER_STATE: &str = "/var/lib/stoa-broker";
const INSTALLED_WORKERS_DIR: &str = "/var/lib/stoa-workers";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug)]
struct Finding {
    level: Level,
    what: String,
    fix: Option<String>,
}

#[derive(Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, level: Level, what: impl Into<String>, fix: Option<String>) {
        let finding = Finding {
            level,
            what: what.into(),
            fix,
        };
        let tag = match finding.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        println!("{tag}  {}", finding.what);
        if let Some(fix) = &finding.fix {
            println!("      fix: {fix}");
        }
        self.findings.push(finding);
    }

    fn ok(&mut self, what: impl Into<String>) {
        self.add(Level::Ok, what, None);
    }

    fn info(&mut self, what: impl Into<String>) {
        self.add(Level::Info, what, None);
    }

    fn warn(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Warn, what, Some(fix.into()));
    }

    fn fail(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Fail, what, Some(fix.into()));
    }

    fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }
}

pub fn run() -> ExitCode {
    let mut report = Report::default();
    let root = config::is_root();
    if !root {
        report.warn(
            "not running as root: what only root may read (the admin token) is not checked",
            "sudo stoa doctor",
        );
    }
    let broker_config = env_path("STOA_BROKER_CONFIG", INSTALLED_BROKER_CONFIG);
    let daemon_config = env_path("STOA_CONFIG", INSTALLED_DAEMON_CONFIG);

    let policy = check_policy(&mut report, &broker_config, root);
    let daemon = check_daemon_config(&mut report, &daemon_config, root);
    check_other_configs(&mut report, &broker_config, &daemon_config);
    let service = check_service_user(&mut report, &policy);
    check_groups(&mut report, &policy);
    check_daemon_state(&mut report, &daemon.state_dir, service.as_ref());
    check_broker_state(&mut report, &policy.state_dir, root);
    check_workers_dir(&mut report, &policy.workers_dir);
    check_private_files(&mut report, &policy);
    check_executor(&mut report, &policy);
    check_own_binary(&mut report);
    check_health(&mut report, &daemon.listen);
    check_unit(&mut report);
    report.info(cgroup_support());
    report.info(landlock_support());

    let (fails, warns) = (report.count(Level::Fail), report.count(Level::Warn));
    println!();
    if fails == 0 {
        println!("stoa doctor: no problems found ({warns} warning(s))");
        ExitCode::SUCCESS
    } else {
        println!("stoa doctor: {fails} problem(s), {warns} warning(s)");
        ExitCode::FAILURE
    }
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The fix for a file that must be root's and writable by nobody else, up to `/`: for the
/// first component [`check_trusted_path`] objects to (the file itself or a directory above).
fn trust_fix(path: &Path) -> String {
    let culprit = first_untrusted(path).unwrap_or_else(|| path.to_path_buf());
    format!(
        "chown root:root {p} && chmod go-w {p}",
        p = culprit.display()
    )
}

/// The first of `path` and its parents that is not root's or is writable by group or
/// others (a sticky directory protects what it does not own), as [`check_trusted_path`].
fn first_untrusted(path: &Path) -> Option<PathBuf> {
    let path = path.canonicalize().ok()?;
    let mut current = Some(path.as_path());
    let mut is_leaf = true;
    while let Some(p) = current {
        let meta = std::fs::metadata(p).ok()?;
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.uid() != 0 || (meta.mode() & 0o022 != 0 && (is_leaf || !sticky)) {
            return Some(p.to_path_buf());
        }
        is_leaf = false;
        current = p.parent();
    }
    None
}

fn check_policy(report: &mut Report, path: &Path, root: bool) -> Policy {
    let mut policy = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.info(format!(
                "policy {} does not exist: the broker uses the built-in defaults",
                path.display()
            ));
            Policy::default()
        }
        _ => {
            if let Err(e) = check_trusted_path(path, 0) {
                report.fail(
                    format!("policy: {e}; the broker refuses to start"),
                    trust_fix(path),
                );
            }
            // Parse and validate it even when its owner is wrong, to report both at once.
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|text| toml::from_str::<Policy>(&text).map_err(|e| e.to_string()))
                .and_then(|p| p.validate().map(|()| p));
            match parsed {
                Ok(p) => {
                    if check_trusted_path(path, 0).is_ok() {
                        // The broker's own reading, so nothing here disagrees with it.
                        if let Err(e) = Policy::load(path, 0) {
                            report.fail(e, format!("correct {}", path.display()));
                        } else {
                            report.ok(format!("policy {}: owned by root, valid", path.display()));
                        }
                    }
                    p
                }
                Err(e) => {
                    report.fail(
                        format!("policy {} is invalid: {e}", path.display()),
                        format!(
                            "correct {} (every key, with its default, is listed in the packaged file, commented out)",
                            path.display()
                        ),
                    );
                    Policy::default()
                }
            }
        }
    };
    if !root && policy.state_dir == config::default_broker_state_dir() {
        policy.state_dir = INSTALLED_BROKER_STATE.into();
    }
    if !root && policy.workers_dir == config::default_workers_dir() {
        policy.workers_dir = INSTALLED_WORKERS_DIR.into();
    }
    policy_sanity(report, &policy);
    policy
}

/// Settings that are valid but probably not what anyone meant.
fn policy_sanity(report: &mut Report, policy: &Policy) {
    if policy.require == Require::All && policy.allow_groups.is_empty() {
        report.warn(
            "policy: allow_groups is empty and require = \"all\": nobody can be run",
            "set allow_groups (e.g. [\"stoa-users\"]) or require = \"any\" in the policy",
        );
    }
    if policy.min_uid < 1000 {
        report.warn(
            format!(
                "policy: min_uid = {} lets system accounts (uid < 1000) be run if they are in an allowed group",
                policy.min_uid
            ),
            "set min_uid = 1000 in the policy unless that is intended",
        );
    }
    if policy.rlimits.core != 0 {
        report.info(format!(
            "policy: core dumps of users' processes are allowed (rlimits.core = {})",
            policy.rlimits.core
        ));
    }
}

fn check_daemon_config(report: &mut Report, path: &Path, root: bool) -> DaemonConfig {
    let mut daemon = if path.exists() {
        let trusted = check_trusted_path(path, 0);
        if let Err(e) = &trusted {
            report.fail(
                format!("config: {e}; the broker refuses to start"),
                trust_fix(path),
            );
        }
        match DaemonConfig::load(path) {
            Ok(c) => {
                if trusted.is_ok() {
                    report.ok(format!("config {}: owned by root, valid", path.display()));
                }
                c
            }
            Err(e) => {
                report.fail(
                    e,
                    format!(
                        "correct {} (every key, with its default, is listed in the packaged file, commented out)",
                        path.display()
                    ),
                );
                DaemonConfig::default()
            }
        }
    } else {
        report.info(format!(
            "config {} does not exist: the daemon uses the built-in defaults",
            path.display()
        ));
        DaemonConfig::default()
    };
    if !root && daemon.state_dir == DaemonConfig::default().state_dir {
        daemon.state_dir = INSTALLED_DAEMON_STATE.into();
    }
    if !daemon.execution.use_executor {
        report.warn(
            "execution.use_executor = false: agents run on the direct path, started by each user's worker as that user, without the executor (no per-run cgroup, limits or confinement; workers get their users' secrets)".to_string(),
            "set execution.use_executor = true unless you mean it".to_string(),
        );
    }
    daemon
}

/// Any other `*.toml` beside the configs (a `.dpkg-dist` is not read, so it is not checked).
fn check_other_configs(report: &mut Report, broker_config: &Path, daemon_config: &Path) {
    let Some(dir) = broker_config.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut others: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| p != broker_config && p != daemon_config)
        .collect();
    others.sort();
    for p in others {
        match check_trusted_path(&p, 0) {
            Ok(()) => report.ok(format!("{}: owned by root", p.display())),
            Err(e) => report.fail(e, trust_fix(&p)),
        }
    }
}

struct ServiceAccount {
    name: String,
    uid: u32,
    gid: u32,
}

fn check_service_user(report: &mut Report, policy: &Policy) -> Option<ServiceAccount> {
    let name = &policy.service_user;
    let create = format!(
        "systemd-sysusers stoa.conf (or: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {name}); the broker also creates it when it starts"
    );
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            report.fail(format!("service user '{name}' does not exist"), create);
            return None;
        }
        Err(e) => {
            report.fail(format!("cannot look up service user '{name}': {e}"), create);
            return None;
        }
    };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    if uid == 0 || gid == 0 {
        report.fail(
            format!("service user '{name}' is root or in group 0 (uid {uid}, gid {gid}); the broker refuses to start"),
            format!("give the service a dedicated account: set service_user in the policy, or recreate '{name}' as a system user"),
        );
    } else {
        report.ok(format!("service user '{name}' (uid {uid}, gid {gid})"));
    }
    let shell = user.shell.to_string_lossy();
    if !(shell.ends_with("/nologin") || shell.ends_with("/false")) {
        report.warn(
            format!("service user '{name}' has a login shell ({shell})"),
            format!("usermod --shell /usr/sbin/nologin {name}"),
        );
    }
    Some(ServiceAccount {
        name: name.clone(),
        uid,
        gid,
    })
}

fn check_groups(report: &mut Report, policy: &Policy) {
    for name in &policy.allow_groups {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => {
                let members = g.mem.len();
                report.ok(format!(
                    "allowed group '{name}' (gid {}), {members} listed member(s)",
                    g.gid
                ));
                if members == 0 {
                    report.info(format!(
                        "nobody is in '{name}' yet: add people with `usermod -aG {name} NAME`"
                    ));
                }
            }
            _ => report.fail(
                format!("allowed group '{name}' does not exist: nobody is allowed through it"),
                format!("systemd-sysusers stoa.conf (or: groupadd --system {name})"),
            ),
        }
    }
}

/// Owner, group and mode of a directory, or what is wrong with it.
fn dir_facts(path: &Path) -> Result<(u32, u32, u32), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("is not a directory".into());
    }
    Ok((meta.uid(), meta.gid(), meta.mode() & 0o7777))
}

fn check_daemon_state(report: &mut Report, dir: &Path, service: Option<&ServiceAccount>) {
    let create = format!(
        "systemd-tmpfiles --create stoa.conf (the broker also creates {} when it starts)",
        dir.display()
    );
    let (uid, gid, mode) = match dir_facts(dir) {
        Ok(f) => f,
        Err(e) => {
            report.fail(format!("daemon state {}: {e}", dir.display()), create);
            return;
        }
    };
    let Some(service) = service else {
        report.info(format!(
            "daemon state {}: owner not checked (no service user)",
            dir.display()
        ));
        return;
    };
    if uid != service.uid || gid != service.gid || mode != 0o700 {
        report.fail(
            format!(
                "daemon state {}: owner {uid}:{gid} mode {mode:04o}, want {}:{} ({}) mode 0700",
                dir.display(),
                service.uid,
                service.gid,
                service.name
            ),
            format!(
                "chown {n}:{g} {d} && chmod 0700 {d}",
                n = service.name,
                g = service.gid,
                d = dir.display()
            ),
        );
    } else {
        report.ok(format!(
            "daemon state {}: owned by {}, mode 0700",
            dir.display(),
            service.name
        ));
    }
}

/// The users' stores: root's directory (0755), and in it one per uid, that user's, 0700
/// (another owner or wider modes let other users read or change someone's sessions).
/// What runs write should be their user's alone: the policy's umask, and the homes of the
/// allowed groups' members (agents keep transcripts, rollouts and databases there).
fn check_private_files(report: &mut Report, policy: &Policy) {
    match policy.umask_bits() {
        Ok(bits) if bits & 0o077 == 0o077 => report.ok(format!(
            "umask {:03o}: what runs write is their user's alone",
            bits
        )),
        Ok(bits) => report.warn(
            format!("umask {bits:03o}: files that runs write (agents' transcripts and databases) are readable by other users"),
            "set umask = \"077\" in the broker policy",
        ),
        Err(e) => report.fail(e, "fix umask in the broker policy"),
    }
    let mut open_homes = Vec::new();
    for group in &policy.allow_groups {
        let Ok(Some(g)) = nix::unistd::Group::from_name(group) else {
            continue;
        };
        for member in g.mem {
            let Ok(Some(u)) = nix::unistd::User::from_name(&member) else {
                continue;
            };
            if let Ok(meta) = std::fs::metadata(&u.dir) {
                if meta.mode() & 0o005 != 0 {
                    open_homes.push(format!(
                        "{} ({:04o})",
                        u.dir.display(),
                        meta.mode() & 0o7777
                    ));
                }
            }
        }
    }
    open_homes.sort();
    open_homes.dedup();
    if !open_homes.is_empty() {
        report.warn(
            format!(
                "homes other users can read: {} (files an agent wrote there before umask 077 may be readable)",
                open_homes.join(", ")
            ),
            "chmod 0750 (or 0700) each of them",
        );
    }
}

fn check_workers_dir(report: &mut Report, dir: &Path) {
    let (uid, _gid, mode) = match dir_facts(dir) {
        Ok(f) => f,
        Err(e) => {
            report.info(format!(
                "workers {}: {e} (the broker creates it when it starts)",
                dir.display()
            ));
            return;
        }
    };
    if uid != 0 || mode & 0o022 != 0 {
        report.fail(
            format!(
                "workers {}: owner uid {uid} mode {mode:04o}, want root and not writable by others",
                dir.display()
            ),
            format!("chown root: {d} && chmod 0755 {d}", d = dir.display()),
        );
        return;
    }
    let mut bad = Vec::new();
    let mut stores = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        match (name.parse::<u32>(), dir_facts(&path)) {
            (Ok(owner), Ok((u, _, m))) if u == owner && m & 0o077 == 0 => stores += 1,
            (Ok(_), Ok((u, _, m))) => {
                bad.push(format!("{} (owner {u}, mode {m:04o})", path.display()))
            }
            _ => bad.push(format!("{} (not a user's store)", path.display())),
        }
    }
    if bad.is_empty() {
        report.ok(format!(
            "workers {}: root's, {stores} user stores, each its user's and private",
            dir.display()
        ));
    } else {
        report.fail(
            format!("workers {}: {}", dir.display(), bad.join("; ")),
            "each <uid> directory must belong to that uid with mode 0700 (chown UID: DIR && chmod 0700 DIR)",
        );
    }
}

fn check_broker_state(report: &mut Report, dir: &Path, root: bool) {
    let (uid, _gid, mode) = match dir_facts(dir) {
        Ok(f) => f,
        Err(e) => {
            report.fail(
                format!("broker state {}: {e}", dir.display()),
                format!(
                    "systemd-tmpfiles --create stoa.conf (the broker also creates {} when it starts)",
                    dir.display()
                ),
            );
            return;
        }
    };
    let trusted = check_trusted_path(dir, 0);
    if uid != 0 || mode != 0o700 || trusted.is_err() {
        let why = trusted.err().map(|e| format!(" ({e})")).unwrap_or_default();
        report.fail(
            format!(
                "broker state {}: owner uid {uid} mode {mode:04o}, want root and 0700{why}",
                dir.display()
            ),
            format!("chown root:root {d} && chmod 0700 {d}", d = dir.display()),
        );
        return;
    }
    report.ok(format!(
        "broker state {}: owned by root, mode 0700",
        dir.display()
    ));
    if !root {
        return;
    }
    let token = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::symlink_metadata(&token) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.info(format!(
            "no admin token yet ({}): the broker creates it when it first starts",
            token.display()
        )),
        Err(e) => report.fail(
            format!("admin token {}: {e}", token.display()),
            "remove it; the broker creates a new one when it starts",
        ),
        Ok(meta) if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 => {
            report.fail(
                format!(
                    "admin token {}: must be a regular file of root's with mode 0600 (is owner uid {}, mode {:04o}); the broker refuses to start",
                    token.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
                format!("chown root:root {t} && chmod 0600 {t}", t = token.display()),
            )
        }
        Ok(_) => report.ok(format!("admin token {}: root only", token.display())),
    }
}

fn check_executor(report: &mut Report, policy: &Policy) {
    let path = policy
        .executor_path
        .clone()
        .unwrap_or_else(default_executor_path);
    let fix = format!(
        "chown root:root {p} && chmod 0755 {p}; reinstall the package if it is missing",
        p = path.display()
    );
    if let Err(e) = check_trusted_path(&path, 0) {
        let fix = match first_untrusted(&path) {
            Some(dir) if dir != path => trust_fix(&path),
            _ => fix,
        };
        report.fail(format!("executor: {e}; the broker refuses to start"), fix);
        return;
    }
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => {
            report.fail(format!("executor {}: {e}", path.display()), fix);
            return;
        }
    };
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() || mode & 0o001 == 0 {
        report.fail(
            format!(
                "executor {}: must be a regular file executable by others (mode 0755), is mode {mode:04o}; the broker refuses to start",
                path.display()
            ),
            fix,
        );
    } else if mode & 0o6000 != 0 {
        report.fail(
            format!(
                "executor {}: is set-user-ID or set-group-ID (mode {mode:04o})",
                path.display()
            ),
            format!("chmod 0755 {}", path.display()),
        );
    } else {
        report.ok(format!(
            "executor {}: owned by root, mode {mode:04o}, nothing above it writable by others",
            path.display()
        ));
    }
}

/// The broker re-executes its own binary as the daemon, so it must be root's too.
fn check_own_binary(report: &mut Report) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    match check_trusted_path(&exe, 0) {
        Ok(()) => report.ok(format!("{}: owned by root", exe.display())),
        Err(e) => report.fail(
            format!("{e}: as root, the broker runs this binary (and re-executes it as the daemon)"),
            trust_fix(&exe),
        ),
    }
}

/// `http://host:port` for a listen address; a wildcard address is asked on loopback.
fn health_base(listen: &str) -> String {
    super::client::local_base(listen).unwrap_or_else(|_| format!("http://{listen}"))
}

fn check_health(report: &mut Report, listen: &str) {
    let base = std::env::var("STOA_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| health_base(listen));
    let url = format!("{}/health", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let start_fix =
        "systemctl start stoa (see: systemctl status stoa; journalctl -u stoa), or run `stoa serve` as root";
    // Without a token /health says only status and version: send the admin token (or
    // STOA_TOKEN) when this user can read it.
    let token = super::client::Client::from_env()
        .ok()
        .map(|c| c.token().to_string());
    let mut request = agent.get(&url);
    if let Some(t) = &token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(e) => {
            report.fail(format!("broker: nothing answers {url}: {e}"), start_fix);
            return;
        }
    };
    let status = response.status().as_u16();
    let body: Value = match response.body_mut().read_json() {
        Ok(v) => v,
        Err(e) => {
            report.fail(
                format!("broker: {url} answered HTTP {status} but not as stoa: {e}"),
                format!("something else listens there: free the address, or set listen in {INSTALLED_DAEMON_CONFIG}"),
            );
            return;
        }
    };
    for problem in health_problems(&body) {
        report.fail(format!("broker ({url}): {problem}"), start_fix);
    }
    if health_problems(&body).is_empty() {
        report.ok(format!(
            "broker answers {url}: {}, {}, version {}",
            body["status"].as_str().unwrap_or("?"),
            body["mode"].as_str().unwrap_or("?"),
            body["version"].as_str().unwrap_or("?")
        ));
    }
    report_limits(report, &body["limits"]);
    report_confinement(report, &body["limits"]);
    let mine = env!("CARGO_PKG_VERSION");
    if let Some(running) = body["version"].as_str() {
        if running != mine {
            report.warn(
                format!("the running stoa is version {running}, this binary is {mine}"),
                "systemctl reload stoa (stoa daemon upgrade: the broker re-execs the new binary, every user's work goes on)",
            );
        }
    }
}

/// What the running broker enforces, from `/health`'s `limits`: cgroups on or why not,
/// and each per-user limit, marked when this machine cannot enforce it.
fn report_limits(report: &mut Report, limits: &Value) {
    let Some(cgroups) = limits["cgroups"].as_str() else {
        return;
    };
    let fix = "run stoa as the systemd unit (Delegate=yes) on a machine whose cgroups offer the memory, pids and cpu controllers; or set cgroup.enabled = false in the policy to run without them";
    if cgroups.starts_with("not enforced") {
        report.warn(format!("per-user resource limits: cgroups {cgroups}"), fix);
        return;
    }
    let each: Vec<String> = ["cgroup_memory_max", "cgroup_pids_max", "cgroup_cpu"]
        .iter()
        .filter_map(|k| {
            limits[*k]
                .as_str()
                .map(|v| format!("{}: {v}", k.trim_start_matches("cgroup_")))
        })
        .collect();
    report.ok(format!(
        "per-user resource limits: cgroups {cgroups}; {}",
        each.join("; ")
    ));
    for line in each.iter().filter(|l| l.contains("(not enforced)")) {
        report.warn(
            format!("per-user resource limit not enforced here: {line}"),
            fix,
        );
    }
}

/// Whether the running broker confines runs (Landlock), from `/health`'s `limits`.
fn report_confinement(report: &mut Report, limits: &Value) {
    let (Some(landlock), Some(confine)) = (limits["landlock"].as_str(), limits["confine"].as_str())
    else {
        return;
    };
    let line = format!("confinement of runs: Landlock {landlock}; {confine}");
    if landlock.starts_with("not enforced") {
        let required = confine.contains("required yes");
        let fix = "a kernel with Landlock ABI 3 or later (Linux 6.2+, landlock in the lsm= boot parameter)";
        if required {
            report.fail(
                format!("{line}: confine.required refuses every run the policy confines"),
                fix,
            );
        } else {
            report.warn(line, fix);
        }
    } else {
        report.ok(line);
    }
}

/// One line on what Landlock this kernel offers (what stoa applies: the broker's line).
fn landlock_support() -> String {
    match stoa_executor::sys::landlock_abi() {
        Ok(abi) => format!("Landlock: ABI {abi} (what this kernel offers)"),
        Err(e) => format!("Landlock: none ({e})"),
    }
}

/// What is wrong with a `/health` answer.
fn health_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if body.get("broker_connected").is_none() && body.get("version").is_some() {
        // The brief answer (no valid token): only the status to judge.
        if body["status"].as_str() != Some("ok") {
            problems.push(format!("status is {}", body["status"]));
        }
        return problems;
    }
    if body["broker_connected"].as_bool() != Some(true) {
        problems.push("the daemon has no connection to the broker".to_string());
    }
    if body["isolation"].as_bool() != Some(true) {
        problems.push(format!(
            "no isolation ({}): stoa was not started as root",
            body["warning"].as_str().unwrap_or("single-user mode")
        ));
    }
    if body["status"].as_str() != Some("ok") && problems.is_empty() {
        problems.push(format!("status is {}", body["status"]));
    }
    problems
}

/// Whether systemd manages stoa here (informational when systemd is not PID 1).
fn check_unit(report: &mut Report) {
    if !Path::new("/run/systemd/system").exists() {
        report.info("systemd is not running as init here: start `stoa serve` yourself");
        return;
    }
    let ask = |what: &str| {
        std::process::Command::new("systemctl")
            .args([what, "stoa.service"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let (enabled, active) = (ask("is-enabled"), ask("is-active"));
    if enabled == "enabled" {
        report.ok(format!("stoa.service is enabled and {active}"));
    } else {
        report.warn(
            format!("stoa.service is {enabled} (and {active}): it does not start at boot"),
            "systemctl enable --now stoa",
        );
    }
}

/// One line on what cgroups this machine offers (what stoa enforces: the broker's line above).
fn cgroup_support() -> String {
    let root = Path::new("/sys/fs/cgroup");
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    if let Some(controllers) = read(root.join("cgroup.controllers")) {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        return format!(
            "cgroups: v2 (unified); controllers: {}; memory {}, pids {} (what the machine offers)",
            if controllers.is_empty() {
                "none"
            } else {
                &controllers
            },
            yes_no(has("memory")),
            yes_no(has("pids"))
        );
    }
    let v1 = |c: &str| root.join(c).join("tasks").exists();
    let unified = read(root.join("unified/cgroup.controllers"));
    format!(
        "cgroups: v1{}; v1 memory {}, v1 pids {}{} (what the machine offers)",
        if unified.is_some() { " (hybrid)" } else { "" },
        yes_no(v1("memory")),
        yes_no(v1("pids")),
        match unified {
            Some(c) if !c.is_empty() => format!("; v2 controllers: {c}"),
            Some(_) => "; v2 controllers: none".to_string(),
            None => String::new(),
        }
    )
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcard_listen_is_asked_on_loopback() {
        assert_eq!(health_base("127.0.0.1:7433"), "http://127.0.0.1:7433");
        assert_eq!(health_base("0.0.0.0:80"), "http://127.0.0.1:80");
        assert_eq!(health_base("[::]:7433"), "http://[::1]:7433");
        assert_eq!(health_base("[::1]:7433"), "http://[::1]:7433");
    }

    #[test]
    fn the_fix_names_the_culprit() {
        let dir = std::env::temp_dir().join(format!("stoa-doctor-test-{}", std::process::id()));
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let file = sub.join("x.toml");
        std::fs::write(&file, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let found = first_untrusted(&file);
        if config::is_root() {
            // Root owns the files; the group/other-writable directory is the culprit
            // (unless the temp dir above is not root's either).
            let culprit = found.unwrap();
            assert!(culprit == sub.canonicalize().unwrap() || !culprit.starts_with(&dir));
        } else {
            // Not root: the file itself is not root's.
            assert_eq!(found, Some(file.canonicalize().unwrap()));
        }
        assert!(trust_fix(&file).starts_with("chown root:root /"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn health_answers_are_judged() {
        let good = json!({"status": "ok", "isolation": true, "mode": "multi-user", "broker_connected": true});
        assert!(health_problems(&good).is_empty());
        let single = json!({"status": "ok", "isolation": false, "broker_connected": true, "warning": "single-user mode: x"});
        assert_eq!(health_problems(&single).len(), 1);
        let down = json!({"status": "degraded", "isolation": true, "broker_connected": false});
        assert_eq!(health_problems(&down).len(), 1);
        assert_eq!(health_problems(&json!({})).len(), 2);
        // The brief answer to a caller without a token.
        assert!(health_problems(&json!({"status": "ok", "version": "0.1.0"})).is_empty());
        let brief_down = json!({"status": "degraded", "version": "0.1.0"});
        assert_eq!(health_problems(&brief_down).len(), 1);
    }

    /// The packaged defaults, with every setting uncommented: what a commented line
    /// (`#key = ...`, `#[table]`, or a `#  "string",` continuation) would set.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) => {
                    let t = rest.trim_start();
                    let key = t.split_once(" = ").map(|(k, _)| k).unwrap_or("");
                    let is_setting = (!key.is_empty()
                        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        && !rest.starts_with(' '))
                        || (t.starts_with('[') && !rest.starts_with(' '))
                        || t.starts_with('"');
                    if is_setting {
                        rest.to_string()
                    } else {
                        String::new()
                    }
                }
                None => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn packaged_policy_shows_the_defaults() {
        let text = include_str!("../../packaging/etc/broker.toml");
        let commented: Policy = toml::from_str(text).unwrap();
        let mut expected = Policy {
            state_dir: INSTALLED_BROKER_STATE.into(),
            ..Policy::default()
        };
        let mut commented_fixed = commented.clone();
        commented_fixed.state_dir = INSTALLED_BROKER_STATE.into();
        assert_eq!(commented_fixed, expected, "as shipped: all defaults");
        let all: Policy = toml::from_str(&uncommented(text)).unwrap();
        expected.executor_path = Some("/usr/libexec/stoa/stoa-executor".into());
        assert_eq!(all, expected, "every commented value is the default");
        all.validate().unwrap();
    }

    #[test]
    fn packaged_config_shows_the_defaults() {
        let text = include_str!("../../packaging/etc/config.toml");
        let expected = DaemonConfig {
            state_dir: INSTALLED_DAEMON_STATE.into(),
            ..DaemonConfig::default()
        };
        let mut commented = DaemonConfig::parse(text).unwrap();
        commented.state_dir = INSTALLED_DAEMON_STATE.into();
        assert_eq!(commented, expected);
        let all = DaemonConfig::parse(&uncommented(text)).unwrap();
        let expected = DaemonConfig {
            web_dir: Some("/srv/stoa-web".into()),
            ..expected
        };
        assert_eq!(all, expected, "every commented value is the default");
    }
}
