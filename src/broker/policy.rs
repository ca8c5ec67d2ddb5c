//! Who may be run, read from a root-owned TOML file (default `/etc/stoa/broker.toml`).
//!
//! | rule                 | refuses                                                              |
//! |----------------------|----------------------------------------------------------------------|
//! | `unknown-user`       | a name with no passwd entry                                          |
//! | `root`               | uid 0                                                                |
//! | `root-group`         | a user whose primary or supplementary groups include gid 0           |
//! | `service-user`       | the service user, or a user whose primary group is the service group |
//! | `uid-range`          | a uid outside `min_uid..=max_uid`                                    |
//! | `allow-group`        | a user in none of `allow_groups`                                     |
//! | `single-user`        | in single-user mode, anyone but the user running stoa                |
//! | `executors-per-user` | a spawn past `max_executors_per_user` live executors of that user    |
//! | `executors-total`    | a spawn past `max_executors_total` handles in the broker             |
//! | `spawn-rate`         | a user's spawns beyond `spawn_burst` at once, refilled at `spawn_rate_per_sec` |
//! | `confine.required`   | a run the policy confines, on a kernel that cannot (`broker::confine`) |
//!
//! `root`, `root-group` and `service-user` always apply. `uid-range` and `allow-group`
//! combine by `require`: `"all"` (the default: both must pass) or `"any"` (either may).
#![forbid(unsafe_code)]

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use stoa_executor::sys::{Resource, Rlimit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Require {
    #[default]
    All,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Core dump size in bytes (0: none).
    pub core: u64,
    /// Open files.
    pub nofile: u64,
    /// Processes of the user (RLIMIT_NPROC counts all of the user's processes).
    pub nproc: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            core: 0,
            nofile: 8192,
            nproc: 4096,
        }
    }
}

/// Per-user cgroup limits (see `broker::cgroup`): all of a Unix user's processes started
/// through stoa together, whatever the number of sessions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupLimits {
    /// Each user's processes in a cgroup of their own, each spawn in one below it (so
    /// stopping it ends everything it started). `false`: no cgroups at all.
    pub enabled: bool,
    /// Memory: bytes, with a K/M/G/T suffix, or a percentage of the machine's RAM;
    /// `"max"`: no limit.
    pub memory_max: String,
    /// Processes and threads; 0: no limit.
    pub pids_max: u64,
    /// CPU share against other users (cgroup v2 `cpu.weight`, 1–10000; 100 is the
    /// default every user gets; v1 `cpu.shares` = weight × 1024 / 100).
    pub cpu_weight: u64,
    /// CPU time at most, in percent of one CPU (200: two CPUs); 0: no quota.
    pub cpu_max_percent: u64,
    /// Refuse to start when a limit set here cannot be enforced on this machine (else the
    /// broker starts and `/health` and `stoa doctor` say what is not enforced).
    pub required: bool,
}

impl Default for CgroupLimits {
    fn default() -> Self {
        CgroupLimits {
            enabled: true,
            memory_max: "50%".into(),
            pids_max: 4096,
            cpu_weight: 100,
            cpu_max_percent: 0,
            required: false,
        }
    }
}

impl CgroupLimits {
    /// `memory_max` in bytes; `None`: no limit.
    pub fn memory_max_bytes(&self) -> Result<Option<u64>, String> {
        parse_memory(&self.memory_max, physical_memory)
    }
}

/// The machine's RAM in bytes (`MemTotal` of /proc/meminfo).
fn physical_memory() -> Result<u64, String> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no MemTotal in /proc/meminfo".to_string())
}

fn parse_memory(
    value: &str,
    total: impl FnOnce() -> Result<u64, String>,
) -> Result<Option<u64>, String> {
    let v = value.trim();
    if v == "max" {
        return Ok(None);
    }
    let bad =
        || format!("memory_max {value:?}: expected bytes (e.g. 512M, 8G), a percentage or \"max\"");
    if let Some(pct) = v.strip_suffix('%') {
        let pct: f64 = pct.trim().parse().map_err(|_| bad())?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(format!(
                "memory_max {value:?}: a percentage must be in (0, 100]"
            ));
        }
        return Ok(Some((total()? as f64 * pct / 100.0) as u64));
    }
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&v[..i], v[i..].trim()),
        None => (v, ""),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(bad)?;
    // Below this, a shell cannot even start: surely a typo.
    if bytes < 16 << 20 {
        return Err(format!("memory_max {value:?} is below 16M"));
    }
    Ok(Some(bytes))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// The unprivileged account the daemon runs as (created if missing).
    pub service_user: String,
    /// The executor binary. Unset: `/usr/libexec/stoa/stoa-executor`, or, where that does
    /// not exist, `stoa-executor` beside the `stoa` binary, else `stoa` itself (run as
    /// `stoa-executor`). Either way it must be owned by root and writable by nobody else,
    /// up to `/`.
    pub executor_path: Option<PathBuf>,
    /// The broker's own root-only directory (admin token, users, audit log).
    pub state_dir: PathBuf,
    /// The audit log (JSON lines, root-only). Unset: `audit.jsonl` in `state_dir`.
    pub audit_log: Option<PathBuf>,
    /// Where each Unix user's worker keeps its store: `<workers_dir>/<uid>/`, owned by that
    /// user, mode 0700 (the directory itself is root's, 0755).
    pub workers_dir: PathBuf,
    pub allow_groups: Vec<String>,
    pub min_uid: u32,
    pub max_uid: u32,
    pub require: Require,
    pub max_executors_per_user: usize,
    pub max_executors_total: usize,
    /// Spawns per second each user regains, up to `spawn_burst` at once.
    pub spawn_rate_per_sec: f64,
    pub spawn_burst: u32,
    /// Octal, e.g. "077" (the default: what a run writes is its user's alone).
    pub umask: String,
    /// PATH for every executor.
    pub path: String,
    /// Environment names a request may not set; a trailing `*` matches a prefix.
    pub env_deny: Vec<String>,
    pub rlimits: Limits,
    pub cgroup: CgroupLimits,
    /// Landlock confinement of runs (`broker::confine`).
    pub confine: super::confine::ConfinePolicy,
    /// SIGTERM: how long running work may go on to finish before it is sent SIGTERM (and,
    /// 5 s later, SIGKILL). Terminals are hung up at once.
    pub shutdown_grace_secs: u64,
    /// How long a log-in with a Unix password (`POST /login`) lasts before its user must log
    /// in again.
    pub login_session_secs: u64,
    /// The local log-in socket: local users' `stoa` commands get a credential for their
    /// own Unix user there, with no token. Unset: `/run/stoa/local.sock` (single-user mode:
    /// `local.sock` in `state_dir`); empty: none.
    pub local_socket: Option<PathBuf>,
}

/// Identity variables the broker sets from the passwd entry; a request never overrides them.
pub const IDENTITY_VARS: [&str; 5] = ["HOME", "USER", "LOGNAME", "SHELL", "PATH"];

impl Default for Policy {
    fn default() -> Self {
        Policy {
            service_user: "stoa".into(),
            executor_path: None,
            state_dir: crate::config::default_broker_state_dir(),
            audit_log: None,
            workers_dir: crate::config::default_workers_dir(),
            allow_groups: vec!["stoa-users".into()],
            min_uid: 1000,
            max_uid: 4_294_967_293,
            require: Require::All,
            max_executors_per_user: 64,
            max_executors_total: 1024,
            // A safety valve against runaway loops, not a throttle on normal work: the
            // broker itself spawns a few thousand a second.
            spawn_rate_per_sec: 500.0,
            spawn_burst: 1000,
            umask: "077".into(),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            env_deny: [
                "LD_*",
                "DYLD_*",
                "BASH_ENV",
                "ENV",
                "BASH_FUNC_*",
                "IFS",
                "CDPATH",
                "GCONV_PATH",
                "LOCPATH",
                "NLSPATH",
                "HOSTALIASES",
                "RES_OPTIONS",
                "LOCALDOMAIN",
                "MALLOC_*",
                "GLIBC_TUNABLES",
                "PYTHONPATH",
                "PYTHONSTARTUP",
                "PYTHONHOME",
                "PERL5LIB",
                "PERL5OPT",
                "PERLLIB",
                "RUBYLIB",
                "RUBYOPT",
                "NODE_OPTIONS",
                "JAVA_TOOL_OPTIONS",
                "PROMPT_COMMAND",
                "SHELLOPTS",
                "BASHOPTS",
                "PS4",
                "STOA_*",
            ]
            .map(String::from)
            .to_vec(),
            rlimits: Limits::default(),
            cgroup: CgroupLimits::default(),
            confine: Default::default(),
            shutdown_grace_secs: 30,
            login_session_secs: 12 * 3600,
            local_socket: None,
        }
    }
}

impl Policy {
    /// Reads the policy. A missing file gives the defaults (logged by the caller); a file
    /// that someone other than `owner` could change is refused.
    pub fn load(path: &Path, owner: u32) -> Result<(Policy, bool), String> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Policy::default(), false))
            }
            Err(e) => return Err(format!("cannot read policy {}: {e}", path.display())),
            Ok(_) => {}
        }
        check_trusted_path(path, owner)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy {}: {e}", path.display()))?;
        let policy: Policy =
            toml::from_str(&text).map_err(|e| format!("invalid policy {}: {e}", path.display()))?;
        policy
            .validate()
            .map_err(|e| format!("invalid policy {}: {e}", path.display()))?;
        Ok((policy, true))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.min_uid == 0 {
            return Err("min_uid must be at least 1: uid 0 is never allowed".into());
        }
        if self.min_uid > self.max_uid {
            return Err("min_uid is above max_uid".into());
        }
        self.umask_bits()?;
        if !(self.spawn_rate_per_sec > 0.0 && self.spawn_rate_per_sec.is_finite())
            || self.spawn_burst == 0
        {
            return Err("spawn_rate_per_sec and spawn_burst must be positive".into());
        }
        if self.max_executors_per_user == 0 || self.max_executors_total == 0 {
            return Err("executor limits must be at least 1".into());
        }
        self.cgroup.memory_max_bytes()?;
        if !(1..=10_000).contains(&self.cgroup.cpu_weight) {
            return Err("cgroup.cpu_weight must be within 1..=10000".into());
        }
        if !(60..=30 * 86400).contains(&self.login_session_secs) {
            return Err("login_session_secs is between 60 and 2592000 (30 days)".into());
        }
        if self.shutdown_grace_secs > 3600 {
            return Err("shutdown_grace_secs is at most 3600".into());
        }
        if !self.path.split(':').all(|p| p.starts_with('/')) {
            return Err("every PATH entry must be absolute".into());
        }
        self.confine.validate()?;
        Ok(())
    }

    pub fn umask_bits(&self) -> Result<u32, String> {
        u32::from_str_radix(&self.umask, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("umask {:?} is not an octal mode", self.umask))
    }

    pub fn rlimits(&self) -> Vec<Rlimit> {
        let both = |resource, v| Rlimit {
            resource,
            soft: v,
            hard: v,
        };
        vec![
            both(Resource::Core, self.rlimits.core),
            both(Resource::NoFile, self.rlimits.nofile),
            both(Resource::NProc, self.rlimits.nproc),
            // su's sanitize_prlimits: no inherited priority boosts.
            both(Resource::Nice, 0),
            both(Resource::RtPrio, 0),
        ]
    }

    /// True if `name` is refused by `env_deny` or is an identity variable.
    pub fn env_denied(&self, name: &str) -> bool {
        IDENTITY_VARS.contains(&name)
            || self.env_deny.iter().any(|pat| match pat.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pat,
            })
    }

    /// Checks the identity rules (not the counts) for a resolved user.
    pub fn check_user(&self, user: &UserFacts<'_>) -> Result<(), Refusal> {
        if user.uid == 0 {
            return Err(Refusal::new(
                "root",
                format!("unix user '{}' is root", user.name),
            ));
        }
        if user.gid == 0 || user.groups.contains(&0) {
            return Err(Refusal::new(
                "root-group",
                format!("unix user '{}' is in the root group (gid 0)", user.name),
            ));
        }
        if user.uid == user.service_uid || user.gid == user.service_gid {
            return Err(Refusal::new(
                "service-user",
                format!("unix user '{}' is stoa's service account", user.name),
            ));
        }
        let in_range = (self.min_uid..=self.max_uid).contains(&user.uid);
        let in_group = user.groups.iter().any(|g| user.allowed_gids.contains(g));
        let range_refusal = || {
            Refusal::new(
                "uid-range",
                format!(
                    "unix user '{}' has uid {}, outside the allowed range {}..={}",
                    user.name, user.uid, self.min_uid, self.max_uid
                ),
            )
        };
        let group_refusal = || {
            Refusal::new(
                "allow-group",
                format!(
                    "unix user '{}' is in none of the allowed groups ({})",
                    user.name,
                    self.allow_groups.join(", ")
                ),
            )
        };
        match self.require {
            Require::All if !in_range => Err(range_refusal()),
            Require::All if !in_group => Err(group_refusal()),
            Require::Any if !in_range && !in_group => Err(group_refusal()),
            _ => Ok(()),
        }
    }
}

/// What [`Policy::check_user`] looks at, resolved by the broker.
pub struct UserFacts<'a> {
    pub name: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub service_uid: u32,
    pub service_gid: u32,
    /// gids of `allow_groups` that exist.
    pub allowed_gids: &'a [u32],
}

/// A spawn the policy refused, naming the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(rule: &'static str, message: String) -> Refusal {
        Refusal { rule, message }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused by policy rule '{}': {}",
            self.rule, self.message
        )
    }
}

/// Refuses a file that anyone but `owner` (or root) could replace: the file and every
/// directory above it must belong to `owner` or root and be writable by nobody else
/// (a sticky directory, like /tmp, protects entries it does not own).
pub fn check_trusted_path(path: &Path, owner: u32) -> Result<(), String> {
    let path = path
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    let mut current = Some(path.as_path());
    let mut is_leaf = true;
    while let Some(p) = current {
        let meta = std::fs::metadata(p).map_err(|e| format!("cannot stat {}: {e}", p.display()))?;
        if meta.uid() != 0 && meta.uid() != owner {
            return Err(format!(
                "{} is owned by uid {}, not by root{}",
                p.display(),
                meta.uid(),
                if owner != 0 { " or you" } else { "" }
            ));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && (is_leaf || !sticky) {
            return Err(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                meta.mode() & 0o7777
            ));
        }
        is_leaf = false;
        current = p.parent();
    }
    Ok(())
}

/// Where the executor binary is, if `configured` is unset: the installed one, else
/// `stoa-executor` beside `stoa`, else `stoa` itself (which runs as the executor when its
/// argv[0] is `stoa-executor`; `cargo run -- serve` builds no `stoa-executor`).
pub fn default_executor_path() -> PathBuf {
    let installed = PathBuf::from("/usr/libexec/stoa/stoa-executor");
    if installed.exists() {
        return installed;
    }
    let Ok(exe) = std::env::current_exe() else {
        return installed;
    };
    match exe.parent().map(|d| d.join("stoa-executor")) {
        Some(beside) if beside.exists() => beside,
        _ => exe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(uid: u32, gid: u32, groups: &'a [u32], allowed: &'a [u32]) -> UserFacts<'a> {
        UserFacts {
            name: "u",
            uid,
            gid,
            groups,
            service_uid: 990,
            service_gid: 990,
            allowed_gids: allowed,
        }
    }

    #[test]
    fn rules_name_themselves() {
        let p = Policy::default();
        let rule = |f: UserFacts<'_>| p.check_user(&f).err().map(|r| r.rule);
        assert_eq!(rule(facts(0, 0, &[0], &[1500])), Some("root"));
        assert_eq!(rule(facts(1001, 0, &[0], &[1500])), Some("root-group"));
        assert_eq!(
            rule(facts(1001, 1001, &[1001, 0], &[1500])),
            Some("root-group")
        );
        assert_eq!(rule(facts(990, 990, &[990], &[1500])), Some("service-user"));
        assert_eq!(
            rule(facts(1001, 990, &[990], &[1500])),
            Some("service-user")
        );
        assert_eq!(
            rule(facts(500, 500, &[500, 1500], &[1500])),
            Some("uid-range")
        );
        assert_eq!(
            rule(facts(1001, 1001, &[1001], &[1500])),
            Some("allow-group")
        );
        assert_eq!(rule(facts(1001, 1001, &[1001, 1500], &[1500])), None);
    }

    #[test]
    fn require_any_accepts_either() {
        let p = Policy {
            require: Require::Any,
            ..Policy::default()
        };
        assert!(p
            .check_user(&facts(500, 500, &[500, 1500], &[1500]))
            .is_ok());
        assert!(p.check_user(&facts(1001, 1001, &[1001], &[1500])).is_ok());
        assert_eq!(
            p.check_user(&facts(500, 500, &[500], &[1500]))
                .unwrap_err()
                .rule,
            "allow-group"
        );
    }

    #[test]
    fn env_deny_matches_prefixes_and_identity() {
        let p = Policy::default();
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "HOME",
            "PATH",
            "STOA_TOKEN",
        ] {
            assert!(p.env_denied(name), "{name} should be denied");
        }
        for name in ["FOO", "LANG", "TERM", "LDX"] {
            assert!(!p.env_denied(name), "{name} should be allowed");
        }
    }

    #[test]
    fn policy_parses_and_validates() {
        let p: Policy = toml::from_str(
            "min_uid = 2000\nallow_groups = []\nrequire = \"any\"\n[rlimits]\nnofile = 100\n",
        )
        .unwrap();
        assert_eq!(p.min_uid, 2000);
        assert_eq!(p.rlimits.nofile, 100);
        assert_eq!(p.rlimits.core, 0);
        assert!(Policy {
            min_uid: 0,
            ..Policy::default()
        }
        .validate()
        .is_err());
        assert!(Policy {
            umask: "9".into(),
            ..Policy::default()
        }
        .validate()
        .is_err());
        assert!(toml::from_str::<Policy>("bogus = 1").is_err());
    }

    #[test]
    fn memory_sizes() {
        let total = || Ok(8u64 << 30);
        assert_eq!(parse_memory("max", total), Ok(None));
        assert_eq!(parse_memory("512M", total), Ok(Some(512 << 20)));
        assert_eq!(parse_memory("8G", total), Ok(Some(8 << 30)));
        assert_eq!(parse_memory("2GiB", total), Ok(Some(2 << 30)));
        assert_eq!(parse_memory("50%", total), Ok(Some(4 << 30)));
        assert_eq!(parse_memory("134217728", total), Ok(Some(128 << 20)));
        for bad in [
            "",
            "G",
            "12Q",
            "-5M",
            "0%",
            "150%",
            "1K",
            "99999999999999999999T",
        ] {
            assert!(parse_memory(bad, total).is_err(), "{bad:?} accepted");
        }
    }
}
