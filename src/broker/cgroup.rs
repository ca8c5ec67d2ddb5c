//! Per-user cgroups: where the policy's `[cgroup]` limits are enforced, and what makes
//! stopping a spawn final (nothing it forked, double-forked or `setsid`-ed escapes).
//!
//! ```text
//! <base>/stoa.<pid ns>.<broker pid>/         the broker's root (v2: controllers enabled below)
//!     user-<uid>/                             one Unix user: memory, pids and cpu limits
//!         h<handle>/                          one spawn: the executor and all it starts
//! <base>/stoa.<pid ns>.<broker pid>.broker/  v2 only: the broker and the daemon (a v2
//!                                             cgroup with children may hold no processes)
//! ```
//! `<base>` is the broker's own cgroup (under systemd the unit's, delegated by
//! `Delegate=yes`), and on v1 a `stoa` directory in it. On cgroup v2 that is one tree; where only v1 controllers are mounted
//! (as on hybrid machines) the same tree is made in the memory, pids and cpu hierarchies.
//!
//! | when                    | what                                                         |
//! |-------------------------|--------------------------------------------------------------|
//! | broker start            | v2 or v1 found; roots of brokers no longer alive are emptied (their processes killed) and removed |
//! | a user's first spawn    | `user-<uid>` made and its limits written                     |
//! | every spawn             | `h<handle>` made; the child writes itself into it while still root, before it drops privileges |
//! | `Kill` with SIGKILL     | every process in `h<handle>` killed (`cgroup.kill` on v2)    |
//! | the executor is reaped  | the limit it hit read (OOM kill, failed fork), what it left killed, `h<handle>` removed |
//! | policy reload (SIGHUP)  | every user's limits rewritten                                 |
//! | broker stop             | everything killed, the tree removed                          |
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::policy::CgroupLimits;
use crate::wire::LimitHit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

#[derive(Debug)]
enum Layout {
    Off {
        reason: String,
    },
    /// One hierarchy; `root` is `<base>/stoa.<instance>`.
    V2 {
        root: PathBuf,
    },
    /// One root per mounted v1 controller, each `<mount><own path>/stoa/stoa.<instance>`.
    V1 {
        roots: Vec<(Controller, PathBuf)>,
    },
}

/// The limits as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Numbers {
    memory: Option<u64>,
    pids: Option<u64>,
    cpu_weight: u64,
    cpu_max_percent: Option<u64>,
}

impl Numbers {
    fn of(limits: &CgroupLimits) -> Result<Numbers, String> {
        Ok(Numbers {
            memory: limits.memory_max_bytes()?,
            pids: (limits.pids_max > 0).then_some(limits.pids_max),
            cpu_weight: limits.cpu_weight,
            cpu_max_percent: (limits.cpu_max_percent > 0).then_some(limits.cpu_max_percent),
        })
    }

    /// The controllers these limits need.
    fn needs(&self) -> Vec<Controller> {
        let mut v = Vec::new();
        if self.memory.is_some() {
            v.push(Controller::Memory);
        }
        if self.pids.is_some() {
            v.push(Controller::Pids);
        }
        if self.cpu_weight != 100 || self.cpu_max_percent.is_some() {
            v.push(Controller::Cpu);
        }
        v
    }
}

/// One spawn's cgroup: a directory per hierarchy.
#[derive(Debug)]
pub struct SpawnCgroup {
    dirs: Vec<PathBuf>,
}

pub struct Cgroups {
    layout: Layout,
    /// Controllers this machine lets us use.
    available: Vec<Controller>,
    numbers: Numbers,
    /// Users whose directory exists with the current limits.
    users: HashSet<u32>,
    /// Spawn directories that could not be removed yet (dying processes); retried.
    leftovers: Vec<PathBuf>,
}

const CGROUP_FS: &str = "/sys/fs/cgroup";
/// Rounds of "read the pids, kill them" before giving up on emptying a v1 cgroup whose
/// processes keep forking (each round kills all it saw; the pids limit bounds the rest).
const KILL_ROUNDS: usize = 200;

impl Cgroups {
    /// Finds the hierarchy and prepares the broker's root. Never fails: when cgroups
    /// cannot be used the reason is kept for `/health`; the caller decides whether that
    /// is fatal ([`Cgroups::missing`]).
    pub fn setup(limits: &CgroupLimits, isolated: bool) -> Cgroups {
        let numbers = Numbers::of(limits).unwrap_or(Numbers {
            memory: None,
            pids: None,
            cpu_weight: 100,
            cpu_max_percent: None,
        });
        let off = |reason: String| Cgroups {
            layout: Layout::Off { reason },
            available: Vec::new(),
            numbers,
            users: HashSet::new(),
            leftovers: Vec::new(),
        };
        if !limits.enabled {
            return off("disabled by the policy (cgroup.enabled = false)".into());
        }
        if !isolated {
            return off("single-user mode (not root)".into());
        }
        match detect() {
            Ok((layout, available)) => {
                let cgroups = Cgroups {
                    layout,
                    available,
                    numbers,
                    users: HashSet::new(),
                    leftovers: Vec::new(),
                };
                info!(cgroups = %cgroups.describe(), "cgroups");
                cgroups
            }
            Err(reason) => {
                warn!("cgroups not used: {reason}");
                off(reason)
            }
        }
    }

    /// Limits the policy sets that this machine cannot enforce, with why.
    pub fn missing(&self) -> Vec<String> {
        let why = match &self.layout {
            Layout::Off { reason } => reason.clone(),
            _ => "controller not available".into(),
        };
        self.numbers
            .needs()
            .into_iter()
            .filter(|c| !self.available.contains(c))
            .map(|c| format!("{}: {why}", c.name()))
            .collect()
    }

    /// One line for logs and `/health`.
    pub fn describe(&self) -> String {
        let names = |v: &[Controller]| v.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
        match &self.layout {
            Layout::Off { reason } => format!("not enforced: {reason}"),
            Layout::V2 { root } => format!("v2 ({}) at {}", names(&self.available), root.display()),
            Layout::V1 { roots } => format!(
                "v1 ({}) at {}",
                names(&self.available),
                roots
                    .iter()
                    .map(|(_, p)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// (name, value) pairs for `/health`: each limit, or why it is not enforced.
    pub fn report(&self) -> Vec<(String, String)> {
        let mut out = vec![("cgroups".to_string(), self.describe())];
        let enforced = |c: Controller| self.available.contains(&c);
        let show = |c: Controller, what: String| {
            if enforced(c) {
                what
            } else {
                format!("{what} (not enforced)")
            }
        };
        let n = &self.numbers;
        out.push((
            "cgroup_memory_max".into(),
            show(
                Controller::Memory,
                n.memory
                    .map(|b| format!("{} MiB per user", b >> 20))
                    .unwrap_or_else(|| "none".into()),
            ),
        ));
        out.push((
            "cgroup_pids_max".into(),
            show(
                Controller::Pids,
                n.pids
                    .map(|p| format!("{p} per user"))
                    .unwrap_or_else(|| "none".into()),
            ),
        ));
        out.push((
            "cgroup_cpu".into(),
            show(
                Controller::Cpu,
                format!(
                    "weight {}, {}",
                    n.cpu_weight,
                    n.cpu_max_percent
                        .map(|p| format!("at most {p}% of a CPU per user"))
                        .unwrap_or_else(|| "no quota".into())
                ),
            ),
        ));
        out
    }

    pub fn enabled(&self) -> bool {
        !matches!(self.layout, Layout::Off { .. })
    }

    /// New limits (SIGHUP): rewritten for every user at once.
    pub fn set_limits(&mut self, limits: &CgroupLimits) {
        match Numbers::of(limits) {
            Ok(n) => self.numbers = n,
            Err(e) => return warn!("cgroup limits not changed: {e}"),
        }
        for uid in self.users.drain().collect::<Vec<_>>() {
            if let Err(e) = self.ensure_user(uid) {
                warn!(uid, "cannot rewrite the limits of a user's cgroup: {e}");
            }
        }
    }

    fn roots(&self) -> Vec<(Option<Controller>, &Path)> {
        match &self.layout {
            Layout::Off { .. } => Vec::new(),
            Layout::V2 { root } => vec![(None, root.as_path())],
            Layout::V1 { roots } => roots.iter().map(|(c, p)| (Some(*c), p.as_path())).collect(),
        }
    }

    /// Where a run's own cgroups go. On v1 every hierarchy a process joins costs a
    /// migration (~0.17 ms each here, measured: see BENCHMARKS.md), so a run joins only
    /// the hierarchies whose limits are set, plus one to follow and kill it by: pids where
    /// mounted. That one comes first.
    fn spawn_roots(&self) -> Vec<&Path> {
        let Layout::V1 { roots } = &self.layout else {
            return self.roots().into_iter().map(|(_, p)| p).collect();
        };
        let needs = self.numbers.needs();
        let tracker = roots
            .iter()
            .find(|(c, _)| *c == Controller::Pids)
            .or(roots.first())
            .map(|(c, _)| *c);
        let mut out: Vec<&Path> = Vec::new();
        for (c, p) in roots {
            if Some(*c) == tracker {
                out.insert(0, p);
            } else if needs.contains(c) {
                out.push(p);
            }
        }
        out
    }

    /// The user's directory in every hierarchy, with the current limits written.
    fn ensure_user(&mut self, uid: u32) -> io::Result<()> {
        if self.users.contains(&uid) {
            return Ok(());
        }
        let n = self.numbers;
        let v2 = matches!(self.layout, Layout::V2 { .. });
        for (controller, root) in self.roots() {
            let dir = root.join(format!("user-{uid}"));
            make_dir(&dir)?;
            let has = |c: Controller| {
                self.available.contains(&c) && controller.is_none_or(|own| own == c)
            };
            if v2 {
                // Below the user, per spawn: memory.events and pids.events to read.
                let sub: Vec<String> = [Controller::Memory, Controller::Pids]
                    .into_iter()
                    .filter(|c| self.available.contains(c))
                    .map(|c| format!("+{}", c.name()))
                    .collect();
                if !sub.is_empty() {
                    write_file(&dir.join("cgroup.subtree_control"), &sub.join(" "))?;
                }
            }
            if has(Controller::Memory) {
                let (file, value) = match (v2, n.memory) {
                    (true, Some(b)) => ("memory.max", b.to_string()),
                    (true, None) => ("memory.max", "max".into()),
                    (false, Some(b)) => ("memory.limit_in_bytes", b.to_string()),
                    (false, None) => ("memory.limit_in_bytes", "-1".into()),
                };
                write_file(&dir.join(file), &value)?;
            }
            if has(Controller::Pids) {
                let value = n.pids.map_or("max".to_string(), |p| p.to_string());
                write_file(&dir.join("pids.max"), &value)?;
            }
            if has(Controller::Cpu) {
                const PERIOD_US: u64 = 100_000;
                let quota = n.cpu_max_percent.map(|p| p * PERIOD_US / 100);
                if v2 {
                    write_file(&dir.join("cpu.weight"), &n.cpu_weight.to_string())?;
                    let max = quota.map_or("max".to_string(), |q| q.to_string());
                    write_file(&dir.join("cpu.max"), &format!("{max} {PERIOD_US}"))?;
                } else {
                    let shares = (n.cpu_weight * 1024 / 100).max(2);
                    write_file(&dir.join("cpu.shares"), &shares.to_string())?;
                    write_file(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                    let q = quota.map_or("-1".to_string(), |q| q.to_string());
                    write_file(&dir.join("cpu.cfs_quota_us"), &q)?;
                }
            }
        }
        self.users.insert(uid);
        Ok(())
    }

    /// Makes the spawn's cgroup and opens its `cgroup.procs` files for the child to
    /// write itself into. `Ok(None)`: cgroups are off.
    pub fn prepare(
        &mut self,
        uid: u32,
        handle: u64,
    ) -> Result<Option<(SpawnCgroup, Vec<OwnedFd>)>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        self.retry_leftovers();
        self.ensure_user(uid)
            .map_err(|e| format!("cannot set up the cgroup of uid {uid}: {e}"))?;
        let dirs: Vec<PathBuf> = self
            .spawn_roots()
            .iter()
            .map(|root| root.join(format!("user-{uid}")).join(format!("h{handle}")))
            .collect();
        let spawn = SpawnCgroup { dirs };
        let opened = (|| -> io::Result<Vec<OwnedFd>> {
            let mut fds = Vec::new();
            for dir in &spawn.dirs {
                make_dir(dir)?;
                let file = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(dir.join("cgroup.procs"))?;
                fds.push(file.into());
            }
            Ok(fds)
        })();
        match opened {
            Ok(fds) => Ok(Some((spawn, fds))),
            Err(e) => {
                // The user's directory may have gone (an operator's rmdir): redo it next time.
                self.users.remove(&uid);
                self.remove(spawn, &mut |_| {});
                Err(format!("cannot make the spawn's cgroup: {e}"))
            }
        }
    }

    /// Kills every process in the spawn's cgroup. `kill_pid` signals one pid (v1, and v2
    /// kernels without `cgroup.kill`); the caller does it with the user's identity.
    pub fn kill(&self, spawn: &SpawnCgroup, kill_pid: &mut dyn FnMut(i32)) {
        let Some(dir) = self.kill_dir(spawn) else {
            return;
        };
        if dir.join("cgroup.kill").exists() && write_file(&dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if !kill_all(&dir, kill_pid) {
            warn!(cgroup = %dir.display(), "processes still alive after {KILL_ROUNDS} rounds of SIGKILL");
        }
    }

    /// The directory whose `cgroup.procs` lists every process of the spawn (on v1 each
    /// hierarchy the run joined holds all of it; the first is the tracker).
    fn kill_dir(&self, spawn: &SpawnCgroup) -> Option<PathBuf> {
        spawn.dirs.first().cloned()
    }

    /// Which limit the spawn's processes ran into, if any.
    pub fn limit_hit(&self, spawn: &SpawnCgroup) -> Option<LimitHit> {
        let v2 = matches!(self.layout, Layout::V2 { .. });
        let mut memory = false;
        let mut pids = false;
        for dir in &spawn.dirs {
            let oom_file = if v2 {
                "memory.events"
            } else {
                "memory.oom_control"
            };
            memory |= counter(&dir.join(oom_file), "oom_kill") > 0;
            pids |= counter(&dir.join("pids.events"), "max") > 0
                || counter(&dir.join("pids.events.local"), "max") > 0;
        }
        if memory {
            if let Some(max_bytes) = self.numbers.memory {
                return Some(LimitHit::Memory { max_bytes });
            }
        }
        if pids {
            if let Some(max) = self.numbers.pids {
                return Some(LimitHit::Pids { max });
            }
        }
        None
    }

    /// Kills what is left and removes the spawn's directories (later, if processes are
    /// still dying).
    pub fn remove(&mut self, spawn: SpawnCgroup, kill_pid: &mut dyn FnMut(i32)) {
        self.kill(&spawn, kill_pid);
        for dir in spawn.dirs {
            if let Err(e) = fs::remove_dir(&dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    self.leftovers.push(dir);
                }
            }
        }
    }

    pub fn retry_leftovers(&mut self) {
        self.leftovers.retain(
            |dir| matches!(fs::remove_dir(dir), Err(e) if e.kind() != io::ErrorKind::NotFound),
        );
    }

    /// At stop: kills everything in the tree and removes it; `reap` collects the killed
    /// (a dead process leaves its cgroup only once reaped).
    pub fn teardown(&mut self, kill_pid: &mut dyn FnMut(i32), reap: &mut dyn FnMut()) {
        let roots: Vec<PathBuf> = self.roots().iter().map(|(_, p)| p.to_path_buf()).collect();
        for root in &roots {
            empty_tree(root, kill_pid, reap);
        }
        // (v2: the broker's own leaf stays while the broker lives; the next broker
        // removes it as stale.)
        self.users.clear();
        self.leftovers.clear();
    }
}

/// `(layout, available controllers)` for this machine and this process.
fn detect() -> Result<(Layout, Vec<Controller>), String> {
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mounts = parse_mountinfo(&mounts);
    let me = Instance::mine();

    // v2 first, where it has any controller we use.
    let v2_mount = mounts.iter().find(|m| m.fstype == "cgroup2");
    let v2_path = own.lines().find_map(|l| l.strip_prefix("0::"));
    if let (Some(m), Some(path)) = (v2_mount, v2_path) {
        let base = join_cgroup(&m.mount_point, path);
        let offered = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        let available: Vec<Controller> = Controller::ALL
            .into_iter()
            .filter(|c| offered.split_whitespace().any(|o| o == c.name()))
            .collect();
        if !available.is_empty() {
            let root = setup_v2(&base, &me, &available)?;
            return Ok((Layout::V2 { root }, available));
        }
    }

    let mut roots = Vec::new();
    for c in Controller::ALL {
        let Some(m) = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == c.name()))
        else {
            continue;
        };
        // "4:cpu,cpuacct:/system.slice/stoa.service"
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == c.name()).then_some(path)
        });
        let Some(path) = path else { continue };
        let base = join_cgroup(&m.mount_point, path);
        match setup_v1(&base, &me, c) {
            Ok(root) => roots.push((c, root)),
            Err(e) => warn!(controller = c.name(), "cgroup v1 controller not used: {e}"),
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "no memory, pids or cpu controller is available to this process under {CGROUP_FS}"
        ));
    }
    let available = roots.iter().map(|(c, _)| *c).collect();
    Ok((Layout::V1 { roots }, available))
}

fn setup_v1(base: &Path, me: &Instance, c: Controller) -> Result<PathBuf, String> {
    // A v1 hierarchy's top directory is mode 0555: only CAP_DAC_OVERRIDE, which the
    // broker drops after start, may create or remove entries there. So the roots live in
    // a `stoa` directory of the broker's own (root's, 0755), which it can always tidy.
    let base = &base.join("stoa");
    make_dir(base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    clean_stale(base, me);
    let root = base.join(me.root_name());
    make_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if c == Controller::Memory {
        // Limits of a v1 memory cgroup bind its children only with use_hierarchy.
        let _ = write_file(&root.join("memory.use_hierarchy"), "1");
        let on = fs::read_to_string(root.join("memory.use_hierarchy"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        if !on {
            let _ = fs::remove_dir(&root);
            return Err("memory.use_hierarchy cannot be turned on".into());
        }
    }
    Ok(root)
}

fn setup_v2(base: &Path, me: &Instance, available: &[Controller]) -> Result<PathBuf, String> {
    clean_stale(base, me);
    let leaf = base.join(format!("{}.broker", me.root_name()));
    let root = base.join(me.root_name());
    let ctx = |what: &str, p: &Path, e: io::Error| format!("{what} {}: {e}", p.display());
    // A v2 cgroup that delegates controllers to children may hold no processes itself:
    // the broker moves into a leaf of its own (its daemon will start there too).
    if !read_pids(base).is_empty() {
        make_dir(&leaf).map_err(|e| ctx("cannot create", &leaf, e))?;
        write_file(&leaf.join("cgroup.procs"), "0")
            .map_err(|e| ctx("cannot move the broker into", &leaf, e))?;
        let others = read_pids(base);
        if !others.is_empty() {
            return Err(format!(
                "{} holds other processes ({} of them), so controllers cannot be enabled below it: run stoa as a systemd service with Delegate=yes",
                base.display(),
                others.len()
            ));
        }
    }
    let enable: Vec<String> = available.iter().map(|c| format!("+{}", c.name())).collect();
    let enable = enable.join(" ");
    write_file(&base.join("cgroup.subtree_control"), &enable)
        .map_err(|e| ctx("cannot enable controllers in", base, e))?;
    make_dir(&root).map_err(|e| ctx("cannot create", &root, e))?;
    write_file(&root.join("cgroup.subtree_control"), &enable)
        .map_err(|e| ctx("cannot enable controllers in", &root, e))?;
    Ok(root)
}

/// Which broker a root belongs to: its pid, and its pid namespace (a broker in a container
/// sees the same cgroup tree with other pids: it must never take another namespace's
/// live broker for a dead one).
#[derive(Debug, PartialEq, Eq)]
struct Instance {
    pid_ns: u64,
    pid: u32,
}

impl Instance {
    fn mine() -> Instance {
        use std::os::unix::fs::MetadataExt;
        Instance {
            pid_ns: fs::metadata("/proc/self/ns/pid")
                .map(|m| m.ino())
                .unwrap_or(0),
            pid: std::process::id(),
        }
    }

    fn root_name(&self) -> String {
        format!("stoa.{}.{}", self.pid_ns, self.pid)
    }

    /// `stoa.<ns>.<pid>` or `stoa.<ns>.<pid>.broker`.
    fn parse(name: &str) -> Option<Instance> {
        let rest = name.strip_prefix("stoa.")?;
        let rest = rest.strip_suffix(".broker").unwrap_or(rest);
        let (ns, pid) = rest.split_once('.')?;
        Some(Instance {
            pid_ns: ns.parse().ok()?,
            pid: pid.parse().ok()?,
        })
    }
}

/// Roots left by brokers of this pid namespace that are gone (a crash, a kill): their
/// processes are killed (nobody can take them back) and the directories removed.
fn clean_stale(base: &Path, me: &Instance) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(other) = name.to_str().and_then(Instance::parse) else {
            continue;
        };
        if other.pid_ns != me.pid_ns
            || other.pid == me.pid
            || Path::new(&format!("/proc/{}", other.pid)).exists()
        {
            continue;
        }
        let path = entry.path();
        // Not our children: their new parent reaps them.
        let killed = empty_tree(
            &path,
            &mut |p| {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            },
            &mut || {},
        );
        warn!(cgroup = %path.display(), killed, "removed the cgroup of a broker that is gone");
    }
}

/// Kills every process below `dir` and removes the directories, deepest first; returns
/// how many processes were signalled.
fn empty_tree(dir: &Path, kill_pid: &mut dyn FnMut(i32), reap: &mut dyn FnMut()) -> usize {
    let mut killed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                killed += empty_tree(&entry.path(), kill_pid, reap);
            }
        }
    }
    killed += read_pids(dir).len();
    kill_all(dir, kill_pid);
    // Killed processes leave their cgroup when they are gone: give them a moment.
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                reap();
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => break,
        }
    }
    killed
}

struct Mount {
    mount_point: PathBuf,
    fstype: String,
    options: String,
}

/// mountinfo(5): `id parent maj:min root mount-point options [optional…] - fstype source super-options`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let _source = r.next()?;
            let options = r.next().unwrap_or("").to_string();
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fstype,
                options,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn join_cgroup(mount: &Path, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

/// SIGKILLs what lives in `dir` until nothing does (a process may fork between the read
/// and the signal, so this goes round; zombies are dead already and are skipped). False
/// if processes were still alive after [`KILL_ROUNDS`] rounds.
fn kill_all(dir: &Path, kill_pid: &mut dyn FnMut(i32)) -> bool {
    for round in 0..KILL_ROUNDS {
        let alive: Vec<i32> = read_pids(dir)
            .into_iter()
            .filter(|p| !is_zombie(*p))
            .collect();
        if alive.is_empty() {
            return true;
        }
        for pid in alive {
            kill_pid(pid);
        }
        if round > 2 {
            // SIGKILL takes effect when the target next runs: let it.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    false
}

fn is_zombie(pid: i32) -> bool {
    // "pid (comm) S ...": the state follows the last ')'.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X")
        })
        .unwrap_or(true)
}

fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines); 0 if absent.
fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text =
            "30 24 0:26 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory\n\
                    31 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    32 24 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    33 24 0:29 / /mnt/with\\040space rw - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[0].fstype, "cgroup");
        assert!(m[1].options.split(',').any(|o| o == "cpu"));
        assert_eq!(m[2].fstype, "cgroup2");
        assert_eq!(m[3].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn counters() {
        let dir = std::env::temp_dir().join(format!("stoa-cgroup-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("memory.events");
        fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(counter(&f, "oom_kill"), 2);
        assert_eq!(counter(&f, "oom"), 1);
        assert_eq!(counter(&f, "absent"), 0);
        assert_eq!(counter(&dir.join("nope"), "max"), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn instance_names() {
        let me = Instance {
            pid_ns: 4026531836,
            pid: 42,
        };
        assert_eq!(me.root_name(), "stoa.4026531836.42");
        assert_eq!(Instance::parse("stoa.4026531836.42"), Some(me));
        assert_eq!(
            Instance::parse("stoa.7.9.broker"),
            Some(Instance { pid_ns: 7, pid: 9 })
        );
        for other in ["stoa.42", "stoa", "user-1000", "stoa.x.1", "stoa.1.2.3"] {
            assert_eq!(Instance::parse(other), None, "{other}");
        }
    }

    #[test]
    fn joins() {
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup"), "/"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            join_cgroup(Path::new("/sys/fs/cgroup"), "/system.slice/stoa.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/stoa.service")
        );
    }
}
