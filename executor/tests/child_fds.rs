//! The children the broker forks (spawn, directory check) hold none of its fds but the
//! ones they use. Every fd the broker has (other users' terminals and pipes, the daemon
//! link) is copied into a fork, and a child that has taken a user's uid can be stopped by
//! that user and kept: it must have closed them first.
//!
//! No test harness: forking needs a process with one thread. Each child is asked to enter
//! `/proc/self/fd/N`, where N is a directory fd the caller holds (close-on-exec, like
//! everything the broker opens): had the child still held it, it could enter it.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};

use stoa_executor::sys::{self, ChildReport, ChildSpec, ChildStage, SpawnError};

fn main() {
    let held = std::fs::File::open("/").expect("open / (the caller's fd)");
    let path = CString::new(format!("/proc/self/fd/{}", held.as_raw_fd())).unwrap();

    // A directory check.
    let probe = sys::start_probe(None, &path).expect("start the probe");
    let report = loop {
        let mut fds = [nix::poll::PollFd::new(
            probe.report.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
        if let Some(r) = sys::read_report(probe.report.as_fd()).expect("read the report") {
            break r;
        }
    };
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(probe.pid), None);
    assert!(
        matches!(
            report,
            ChildReport::Failed {
                stage: ChildStage::Chdir,
                errno: libc::ENOENT
            }
        ),
        "the directory check could reach its parent's fd: {report:?}"
    );

    // A spawn (it keeps its stdio and extras; nothing else of the caller's).
    let exe = nix::fcntl::open(
        "/bin/true",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /bin/true");
    let spec = ChildSpec {
        exe: exe.as_fd(),
        argv: vec![c"true".into()],
        env: vec![],
        stdio: None,
        extra_fds: vec![],
        controlling_tty: false,
        identity: None,
        rlimits: vec![],
        umask: 0o022,
        cwd: Some(path.clone()),
        cwd_id: None,
        parent_death_signal: None,
        cgroup_procs: vec![],
        confine: None,
        cgroup_dir: None,
    };
    match sys::spawn_child(&spec, std::time::Duration::from_secs(60)) {
        // ENOENT, or ENOTDIR where the child's own report pipe took the freed number.
        Err(SpawnError::Child {
            stage: ChildStage::Chdir,
            errno: libc::ENOENT | libc::ENOTDIR,
        }) => {}
        Ok(pid) => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            panic!("the spawn child could reach its parent's fd (it entered it and ran)");
        }
        Err(e) => panic!("unexpected: {e}"),
    }
    println!("child_fds: ok");
}
