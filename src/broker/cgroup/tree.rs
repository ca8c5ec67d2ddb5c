//! The cgroup filesystem itself: finding the hierarchy (v2, or the v1 controllers), the
//! broker's root and stale roots, and the small file operations the rest is made of.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::{Controller, Layout, CGROUP_FS, KILL_ROUNDS};

/// `(layout, available controllers)` for this machine and this process.
pub(super) fn detect() -> Result<(Layout, Vec<Controller>), String> {
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
    let leaf_name = format!("{}.broker", me.root_name());
    // After an upgrade in place (the same pid, re-exec'd) the broker is already in its
    // leaf: the tree it set up is below the leaf's parent.
    let base = match base.parent() {
        Some(parent) if base.file_name().is_some_and(|n| *n == *leaf_name) => parent,
        _ => base,
    };
    clean_stale(base, me);
    let leaf = base.join(&leaf_name);
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
        let killed = empty_tree(&path, &mut || {});
        warn!(cgroup = %path.display(), killed, "removed the cgroup of a broker that is gone");
    }
}

/// Kills every process below `dir` and removes the directories, deepest first; returns
/// how many processes were signalled.
pub(super) fn empty_tree(dir: &Path, reap: &mut dyn FnMut()) -> usize {
    let mut killed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                killed += empty_tree(&entry.path(), reap);
            }
        }
    }
    killed += read_pids(dir).len();
    kill_all(dir);
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

pub(super) fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

pub(super) fn write_file(path: &Path, value: &str) -> io::Result<()> {
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
pub(super) fn kill_all(dir: &Path) -> bool {
    for round in 0..KILL_ROUNDS {
        let alive: Vec<i32> = read_pids(dir)
            .into_iter()
            .filter(|p| !is_zombie(*p))
            .collect();
        if alive.is_empty() {
            return true;
        }
        for pid in alive {
            kill_member(dir, pid);
        }
        if round > 2 {
            // SIGKILL takes effect when the target next runs: let it.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    false
}

/// SIGKILLs `pid` only if it is still a process of the cgroup `dir`: the pid was read from
/// `cgroup.procs` and may have been reused since. The pidfd pins one process; its
/// `/proc/<pid>/cgroup` is read while the pidfd shows it alive, so what was checked is
/// what is signalled, and no other process can be hit whatever its owner.
fn kill_member(dir: &Path, pid: i32) {
    use std::os::fd::AsFd;
    let Ok(pidfd) = stoa_executor::sys::pidfd_open(pid) else {
        return; // already gone
    };
    let member = fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines().any(|line| {
            let path = line.splitn(3, ':').nth(2).unwrap_or("");
            path.len() > 1 && dir.as_os_str().to_string_lossy().ends_with(path)
        })
    });
    if member && !stoa_executor::sys::pidfd_exited(pidfd.as_fd()) {
        let _ = stoa_executor::sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    }
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

pub(super) fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines); 0 if absent.
pub(super) fn counter(path: &Path, key: &str) -> u64 {
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
