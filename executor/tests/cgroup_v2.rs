//! cgroup v2: a child is born in its cgroup (`clone3(CLONE_INTO_CGROUP)`) and never writes
//! `cgroup.procs`. It is handed only the cgroup's directory (no `cgroup.procs` fd), and
//! its first command reads `/proc/self/cgroup`: the leaf. Where clone3 cannot (old
//! kernels) the child must have written itself in instead, and says so.
//!
//! Needs root and a cgroup2 `/sys/fs/cgroup` (the test VM, scripts/vm/); elsewhere it says
//! SKIPPED. No test harness: forking needs a process with one thread.

use std::io::Read;
use std::os::fd::AsFd;

use stoa_executor::sys::{self, CgroupJoin, ChildReport, ChildSpec};

fn main() {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if !nix::unistd::geteuid().is_root() || !root.join("cgroup.controllers").exists() {
        println!("cgroup_v2: SKIPPED (needs root on a cgroup v2 machine)");
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a v2 cgroup");
    let rel = format!(
        "{}/stoa-clone3-test-{}",
        own.trim_end_matches('/'),
        std::process::id()
    );
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::create_dir(&dir).expect("create the test cgroup");
    let result = std::panic::catch_unwind(|| born_in(&dir, &rel));
    let _ = std::fs::remove_dir(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    println!("cgroup_v2: ok");
}

fn born_in(dir: &std::path::Path, rel: &str) {
    let cgroup = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open the cgroup directory");
    let exe = nix::fcntl::open(
        "/bin/cat",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /bin/cat");
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let spec = ChildSpec {
        exe: exe.as_fd(),
        argv: vec![c"cat".into(), c"/proc/self/cgroup".into()],
        env: vec![],
        stdio: Some([null.as_fd(), out_w.as_fd(), null.as_fd()]),
        extra_fds: vec![],
        controlling_tty: false,
        identity: None,
        rlimits: vec![],
        umask: 0o022,
        cwd: Some(c"/".into()),
        cwd_id: None,
        parent_death_signal: None,
        cgroup_procs: vec![],
        cgroup_dir: Some(cgroup.as_fd()),
        confine: None,
    };
    let started = sys::start_child(&spec).expect("start the child");
    drop(out_w);
    let report = loop {
        let mut fds = [nix::poll::PollFd::new(
            started.report.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
        if let Some(r) = sys::read_report(started.report.as_fd()).expect("read the report") {
            break r;
        }
    };
    let mut out = String::new();
    std::fs::File::from(out_r)
        .read_to_string(&mut out)
        .expect("read the child's output");
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(started.pid), None);
    assert_eq!(report, ChildReport::Execed, "the child failed");
    assert_eq!(out.trim(), format!("0::{rel}"), "the child ran elsewhere");
    // A 6.12 kernel has clone3 with CLONE_INTO_CGROUP (5.7): no fallback expected here.
    assert_eq!(
        started.cgroup_join,
        CgroupJoin::AtClone,
        "the child was not born in its cgroup"
    );
    println!("cgroup_v2: the child was born in {rel}");
}
