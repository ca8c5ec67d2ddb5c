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
//! | every spawn             | `h<handle>` made; v2: the child is born in it (`clone3(CLONE_INTO_CGROUP)`, no migration); v1 (and v2 kernels without it): the child writes itself into it while still root, before it drops privileges |
//! | `Kill` with SIGKILL     | every process in `h<handle>` killed (`cgroup.kill` on v2)    |
//! | the executor is reaped  | the limit it hit read (OOM kill, failed fork), what it left killed, `h<handle>` removed |
//! | policy reload (SIGHUP)  | every user's limits rewritten                                 |
//! | broker stop             | everything killed, the tree removed                          |
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::policy::CgroupLimits;
use tree::{counter, detect, empty_tree, kill_all, make_dir, write_file};

mod tree;
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
    /// The user's `pids.events` "max" count when the spawn started. Kernels from 6.12
    /// count a refused fork in the cgroup whose limit refused it (the user's) and its
    /// ancestors, no longer in the forking (spawn's) cgroup; so a rise during the spawn
    /// says the user's limit refused forks while it ran.
    user_pids_max_events: u64,
}

impl SpawnCgroup {
    /// What an upgrade in place carries (`upgrade.rs`): the directories and the count.
    pub fn parts(&self) -> (Vec<PathBuf>, u64) {
        (self.dirs.clone(), self.user_pids_max_events)
    }

    /// Back from [`SpawnCgroup::parts`] in the upgraded broker.
    pub fn from_parts(dirs: Vec<PathBuf>, user_pids_max_events: u64) -> SpawnCgroup {
        SpawnCgroup {
            dirs,
            user_pids_max_events,
        }
    }

    /// For the recording double.
    pub fn at(dirs: Vec<PathBuf>) -> SpawnCgroup {
        SpawnCgroup {
            dirs,
            user_pids_max_events: 0,
        }
    }

    fn user_pids_max_events(dirs: &[PathBuf]) -> u64 {
        dirs.iter()
            .filter_map(|d| d.parent())
            .map(|user| counter(&user.join("pids.events"), "max"))
            .max()
            .unwrap_or(0)
    }
}

/// What a child needs to get into its spawn's cgroup. v2: the directory, which the child
/// is born in (`sys::ChildSpec::cgroup_dir`); v1: the `cgroup.procs` files it writes
/// itself into, one per hierarchy.
#[derive(Debug, Default)]
pub struct JoinFds {
    pub dir: Option<OwnedFd>,
    pub procs: Vec<OwnedFd>,
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
    /// How the last run got into its cgroup (for `/health`).
    last_join: Option<stoa_executor::sys::CgroupJoin>,
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
            last_join: None,
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
                    last_join: None,
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
        if self.enabled() {
            use stoa_executor::sys::CgroupJoin;
            let how = match self.last_join {
                None => "no run yet",
                Some(CgroupJoin::AtClone) => "born in its cgroup (clone3 CLONE_INTO_CGROUP)",
                Some(CgroupJoin::Written) => "wrote itself into cgroup.procs",
                Some(CgroupJoin::None) => "joined no cgroup",
            };
            out.push(("cgroup_join".into(), format!("last run: {how}")));
        }
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
        // On v1 a run joins the cpu hierarchy only when a weight or quota is set (each join
        // is a migration): say so rather than report a weight nothing applies.
        let v1_cpu_unused = matches!(self.layout, Layout::V1 { .. })
            && !self.numbers.needs().contains(&Controller::Cpu);
        if v1_cpu_unused {
            out.push((
                "cgroup_cpu".into(),
                "not applied: runs stay in the broker's cpu cgroup (weight and quota at their defaults; set cpu_weight or cpu_max_percent to apply them)".into(),
            ));
            return out;
        }
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

    /// How the last run got into its cgroup.
    pub fn note_join(&mut self, how: stoa_executor::sys::CgroupJoin) {
        self.last_join = Some(how);
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

    /// Makes the spawn's cgroup and opens what the child needs to get into it: v2 the
    /// directory (the child is born there: no migration), v1 the `cgroup.procs` files.
    /// `Ok(None)`: cgroups are off.
    pub fn prepare(
        &mut self,
        uid: u32,
        leaf: &str,
    ) -> Result<Option<(SpawnCgroup, JoinFds)>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        self.retry_leftovers();
        self.ensure_user(uid)
            .map_err(|e| format!("cannot set up the cgroup of uid {uid}: {e}"))?;
        let dirs: Vec<PathBuf> = self
            .spawn_roots()
            .iter()
            .map(|root| root.join(format!("user-{uid}")).join(leaf))
            .collect();
        let spawn = SpawnCgroup {
            user_pids_max_events: SpawnCgroup::user_pids_max_events(&dirs),
            dirs,
        };
        let v2 = matches!(self.layout, Layout::V2 { .. });
        let opened = (|| -> io::Result<JoinFds> {
            let mut fds = JoinFds::default();
            for dir in &spawn.dirs {
                make_dir(dir)?;
                if v2 {
                    let file = fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                        .open(dir)?;
                    fds.dir = Some(file.into());
                    continue;
                }
                let file = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(dir.join("cgroup.procs"))?;
                fds.procs.push(file.into());
            }
            Ok(fds)
        })();
        match opened {
            Ok(fds) => Ok(Some((spawn, fds))),
            Err(e) => {
                // The user's directory may have gone (an operator's rmdir): redo it next time.
                self.users.remove(&uid);
                self.remove(spawn);
                Err(format!("cannot make the spawn's cgroup: {e}"))
            }
        }
    }

    /// Kills every process in the spawn's cgroup: `cgroup.kill` where the kernel has it,
    /// else each member through a pidfd, checked to be a member while pinned.
    pub fn kill(&self, spawn: &SpawnCgroup) {
        let Some(dir) = self.kill_dir(spawn) else {
            return;
        };
        if dir.join("cgroup.kill").exists() && write_file(&dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if !kill_all(&dir) {
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
        pids |= SpawnCgroup::user_pids_max_events(&spawn.dirs) > spawn.user_pids_max_events;
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
    pub fn remove(&mut self, spawn: SpawnCgroup) {
        self.kill(&spawn);
        for dir in spawn.dirs {
            if let Err(e) = fs::remove_dir(&dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    self.leftovers.push(dir);
                }
            }
        }
    }

    pub fn has_leftovers(&self) -> bool {
        !self.leftovers.is_empty()
    }

    pub fn retry_leftovers(&mut self) {
        self.leftovers.retain(
            |dir| matches!(fs::remove_dir(dir), Err(e) if e.kind() != io::ErrorKind::NotFound),
        );
    }

    /// At stop: kills everything in the tree and removes it; `reap` collects the killed
    /// (a dead process leaves its cgroup only once reaped).
    pub fn teardown(&mut self, reap: &mut dyn FnMut()) {
        let roots: Vec<PathBuf> = self.roots().iter().map(|(_, p)| p.to_path_buf()).collect();
        for root in &roots {
            empty_tree(root, reap);
        }
        // (v2: the broker's own leaf stays while the broker lives; the next broker
        // removes it as stale.)
        self.users.clear();
        self.leftovers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn cgroups(layout: Layout) -> Cgroups {
        Cgroups {
            layout,
            available: Vec::new(),
            numbers: Numbers {
                memory: None,
                pids: None,
                cpu_weight: 100,
                cpu_max_percent: None,
            },
            users: HashSet::new(),
            leftovers: Vec::new(),
            last_join: None,
        }
    }

    /// v2: the child gets the run's directory to be born in, and no `cgroup.procs` to
    /// write; v1: the `cgroup.procs` files, and no directory. (Plain directories stand in
    /// for the cgroup filesystem; v1's `cgroup.procs` is made beforehand, as the kernel
    /// makes it.)
    #[test]
    fn v2_hands_over_the_directory_and_v1_the_procs_files() {
        let base = std::env::temp_dir().join(format!("stoa-cgroup-join-{}", std::process::id()));
        let v2_root = base.join("v2");
        fs::create_dir_all(&v2_root).unwrap();
        let mut v2 = cgroups(Layout::V2 {
            root: v2_root.clone(),
        });
        let (_, fds) = v2.prepare(1000, "h1").unwrap().expect("cgroups on");
        assert!(fds.procs.is_empty(), "v2 handed over cgroup.procs files");
        let dir = fds.dir.expect("v2 handed over no directory");
        let leaf = fs::metadata(v2_root.join("user-1000/h1")).unwrap();
        let opened = nix::sys::stat::fstat(&dir).unwrap();
        assert_eq!(
            (opened.st_dev, opened.st_ino),
            (leaf.dev(), leaf.ino()),
            "not the run's directory"
        );

        let v1_root = base.join("v1");
        fs::create_dir_all(v1_root.join("user-1000/h1")).unwrap();
        fs::write(v1_root.join("user-1000/h1/cgroup.procs"), "").unwrap();
        let mut v1 = cgroups(Layout::V1 {
            roots: vec![(Controller::Pids, v1_root)],
        });
        let (_, fds) = v1.prepare(1000, "h1").unwrap().expect("cgroups on");
        assert!(fds.dir.is_none(), "v1 handed over a directory");
        assert_eq!(fds.procs.len(), 1);
        fs::remove_dir_all(&base).unwrap();
    }
}
