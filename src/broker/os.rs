//! The operating-system calls the broker's request handlers make, behind one trait (after
//! youki's syscall trait): [`RealOs`] makes them, [`super::os_double::RecordingOs`] records
//! them and answers from a script, so the real dispatcher runs in unit tests and in the
//! `broker_requests` fuzz target without root.
//!
//! | call             | real                                                             |
//! |------------------|------------------------------------------------------------------|
//! | `lookup_user`    | `getpwnam_r`, fresh `getgrouplist`                               |
//! | `landlock`       | the Landlock ABI probed at start (`landlock_create_ruleset` VERSION) |
//! | `launch`         | PTY (and its output ring's memfd) or pipes, the job on the control socket, fork (no wait) |
//! | `start_probe`    | fork a child that becomes the user and enters a directory        |
//! | `start_login_check` | fork the log-in helper (`stoa __pam-login`, root), the attempt on its stdin |
//! | `signal_group`   | a child with all the owner's ids sends `killpg` (not waited for; tracked by the caller) |
//! | `kill_pidfd`     | `pidfd_send_signal(SIGKILL)` (a child that did not reach exec)   |
//! | `reap`           | `waitpid(-1, WNOHANG)` until nothing is left                     |
//! | `cgroup_*`       | [`super::cgroup::Cgroups`]                                       |
#![forbid(unsafe_code)]

use std::os::fd::{BorrowedFd, OwnedFd};

use nix::sys::signal::{killpg, Signal as NixSignal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::error;

use stoa_executor::sys::{self, Identity, Rlimit, Started};

use super::cgroup::{Cgroups, JoinFds, SpawnCgroup};
use super::policy::CgroupLimits;
use super::spawn::{Account, Launched, Launcher};
use crate::wire::{ExitStatus, LimitHit, Signal, SpawnRequest};

/// What every launch shares, from the policy.
pub struct LaunchParams {
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    pub path: String,
    /// Landlock, applied in the child (`broker::confine`).
    pub confine: Option<sys::Confine>,
}

pub trait Os {
    fn lookup_user(&mut self, name: &str) -> Result<Option<Account>, String>;
    /// This kernel's Landlock ABI, or why there is none (probed once, at start).
    fn landlock(&self) -> super::confine::Kernel;
    /// Starts the executor for `req` as `account`; returns without waiting for its exec.
    fn launch(
        &mut self,
        account: &Account,
        req: &SpawnRequest,
        params: &LaunchParams,
        secrets: Vec<(String, String)>,
        cgroup: &JoinFds,
    ) -> Result<Launched, String>;
    /// Starts a child that, as `account`, enters `path` and reports what it is.
    fn start_probe(&mut self, account: &Account, path: &str) -> Result<Started, String>;
    /// Starts the log-in helper with `request` (`login_helper::request`) on its stdin;
    /// returns without waiting. Its answer comes on `LoginChild::answer`.
    fn start_login_check(&mut self, request: &[u8]) -> Result<LoginChild, String>;
    /// Signals the process group `pgid` of a live (unreaped) executor of `account`, with
    /// that account's identity; returns before the signal is sent, with the signalling
    /// child (`None`: sent directly, in single-user mode), which the caller must keep
    /// track of: it runs as the user, who may stop it.
    fn signal_group(
        &mut self,
        account: &Account,
        pgid: i32,
        signal: Signal,
    ) -> nix::Result<Option<Started>>;
    fn kill_pidfd(&mut self, pidfd: BorrowedFd<'_>);
    /// Every child that has ended since the last call.
    fn reap(&mut self) -> Vec<(i32, ExitStatus)>;
    /// The cgroup `leaf` below the user's (`h<handle>` for a spawn, `worker-<link>` for a
    /// worker), with what the child needs to get into it.
    fn cgroup_prepare(
        &mut self,
        uid: u32,
        leaf: &str,
    ) -> Result<Option<(SpawnCgroup, JoinFds)>, String>;
    fn cgroup_kill(&mut self, cgroup: &SpawnCgroup);
    /// The limit the run hit (read before what it left is killed).
    fn cgroup_limit_hit(&mut self, cgroup: &SpawnCgroup) -> Option<LimitHit>;
    /// What the run left killed and its cgroup removed.
    fn cgroup_finish(&mut self, cgroup: SpawnCgroup);
    fn cgroup_report(&self) -> Vec<(String, String)>;
    fn cgroup_set_limits(&mut self, limits: &CgroupLimits);
    /// At stop: everything in the tree killed and removed.
    fn cgroup_teardown(&mut self);
    /// Tries again to remove the cgroups of finished runs that still held dying processes
    /// (v2's `cgroup.kill` does not wait; killed orphans leave once the broker reaps
    /// them); true if some remain.
    fn cgroup_retry_leftovers(&mut self) -> bool;
}

/// A log-in helper started.
pub struct LoginChild {
    pub started: Started,
    /// The read end of its stdout, non-blocking.
    pub answer: OwnedFd,
}

pub struct RealOs {
    /// `stoa` itself, opened once at start (`O_PATH`): the log-in helper is `stoa
    /// __pam-login`.
    pub self_exe: OwnedFd,
    /// Root: children change identity. Not root (single-user mode): nothing does.
    pub isolated: bool,
    /// The executor, opened once at start (`O_PATH`), run with `execveat`.
    pub executor: OwnedFd,
    pub tty_gid: Option<u32>,
    pub cgroups: Cgroups,
    pub landlock: super::confine::Kernel,
}

impl Os for RealOs {
    fn lookup_user(&mut self, name: &str) -> Result<Option<Account>, String> {
        Account::lookup(name)
    }

    fn landlock(&self) -> super::confine::Kernel {
        self.landlock.clone()
    }

    fn launch(
        &mut self,
        account: &Account,
        req: &SpawnRequest,
        params: &LaunchParams,
        secrets: Vec<(String, String)>,
        cgroup: &JoinFds,
    ) -> Result<Launched, String> {
        let launcher = Launcher {
            executor: &self.executor,
            isolated: self.isolated,
            tty_gid: self.tty_gid,
            rlimits: params.rlimits.clone(),
            umask: params.umask,
            path: params.path.clone(),
            confine: params.confine.as_ref(),
        };
        let launched = launcher.launch(account, req, secrets, cgroup)?;
        self.cgroups.note_join(launched.started.cgroup_join);
        Ok(launched)
    }

    fn start_probe(&mut self, account: &Account, path: &str) -> Result<Started, String> {
        let path = std::ffi::CString::new(path).map_err(|_| "NUL in path".to_string())?;
        let identity: Option<Identity> = self.isolated.then(|| account.identity());
        sys::start_probe(identity.as_ref(), &path).map_err(|e| e.to_string())
    }

    fn start_login_check(&mut self, request: &[u8]) -> Result<LoginChild, String> {
        use nix::fcntl::OFlag;
        use std::os::fd::AsFd;
        let (stdin_read, stdin_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
        // A fresh pipe holds 64 KiB: the request (at most ~1.3 KiB) never blocks.
        std::io::Write::write_all(&mut std::fs::File::from(stdin_write), request)
            .map_err(|e| format!("cannot hand the attempt to the helper: {e}"))?;
        let (answer, answer_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| e.to_string())?;
        // Its write end blocks (the helper writes one short line).
        nix::fcntl::fcntl(
            answer_write.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
        )
        .map_err(|e| e.to_string())?;
        let stderr = std::io::stderr();
        // It stays root: PAM must read the shadow file (in single-user mode it is the one
        // user, and PAM can check only that user's own password).
        let spec = sys::ChildSpec::root_helper(
            self.self_exe.as_fd(),
            vec![c"stoa".into(), c"__pam-login".into()],
            vec![
                c"PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
                c"LANG=C".into(),
            ],
            [stdin_read.as_fd(), answer_write.as_fd(), stderr.as_fd()],
            Vec::new(),
        );
        let started = sys::start_child(&spec).map_err(|e| e.to_string())?;
        Ok(LoginChild { started, answer })
    }

    fn signal_group(
        &mut self,
        account: &Account,
        pgid: i32,
        signal: Signal,
    ) -> nix::Result<Option<Started>> {
        if !self.isolated {
            let sig = NixSignal::try_from(signal.number())?;
            return killpg(Pid::from_raw(pgid), sig).map(|()| None);
        }
        // A child with all the owner's ids sends it: the broker never takes a user's uid
        // itself (while it held one, that user could stop it), and the kernel refuses the
        // child anything that is not the owner's. Nobody waits for it; it is reaped as any
        // child is, and the caller bounds how many there are and how long they live.
        sys::start_signaller(&account.identity(), pgid, signal.number())
            .map(Some)
            .map_err(|e| {
                error!("cannot start the signalling child: {e}");
                nix::errno::Errno::EAGAIN
            })
    }

    fn kill_pidfd(&mut self, pidfd: BorrowedFd<'_>) {
        let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
    }

    fn reap(&mut self) -> Vec<(i32, ExitStatus)> {
        let mut ended = Vec::new();
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return ended,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    return ended;
                }
                Ok(ws) => ended.extend(exit_status(ws)),
            }
        }
    }

    fn cgroup_prepare(
        &mut self,
        uid: u32,
        leaf: &str,
    ) -> Result<Option<(SpawnCgroup, JoinFds)>, String> {
        self.cgroups.prepare(uid, leaf)
    }

    fn cgroup_kill(&mut self, cgroup: &SpawnCgroup) {
        self.cgroups.kill(cgroup);
    }

    fn cgroup_limit_hit(&mut self, cgroup: &SpawnCgroup) -> Option<LimitHit> {
        self.cgroups.limit_hit(cgroup)
    }

    fn cgroup_finish(&mut self, cgroup: SpawnCgroup) {
        self.cgroups.remove(cgroup);
    }

    fn cgroup_report(&self) -> Vec<(String, String)> {
        self.cgroups.report()
    }

    fn cgroup_set_limits(&mut self, limits: &CgroupLimits) {
        self.cgroups.set_limits(limits);
    }

    fn cgroup_retry_leftovers(&mut self) -> bool {
        self.cgroups.retry_leftovers();
        self.cgroups.has_leftovers()
    }

    fn cgroup_teardown(&mut self) {
        // What is killed there comes to the broker (the subreaper): it must be reaped
        // before its cgroup can go.
        self.cgroups.teardown(&mut || {
            while let Ok(ws) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                if ws == WaitStatus::StillAlive {
                    break;
                }
            }
        });
    }
}

/// `(pid, status)` of an ended child; `None` for stops and continues.
pub fn exit_status(ws: WaitStatus) -> Option<(i32, ExitStatus)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::Code(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), ExitStatus::Signal(sig as i32))),
        _ => None,
    }
}
