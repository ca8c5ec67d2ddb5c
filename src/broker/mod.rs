//! The broker: `stoa serve` as root. The only stoa process that can switch users.
//!
//! One thread, one `poll` loop over two fds: a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP)
//! and the daemon link. Being single-threaded is what makes `fork` safe here, so this
//! process never starts a runtime or a thread. It re-execs its own binary as the daemon,
//! dropped to the service user, and restarts it (with backoff) when it exits, crashes or
//! breaks the protocol; executors keep running throughout and a new daemon adopts them.
//!
//! Started without root, the same loop runs in single-user mode: nothing changes identity
//! and only the invoking user may be run.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cgroup;
pub mod credentials;
pub mod link;
pub mod notify;
pub mod permit;
pub mod policy;
pub mod spawn;
pub mod users;

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal as NixSignal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Pid, Uid};
use tracing::{error, info, warn};

use stoa_executor::codec;
use stoa_executor::sys::{self, ChildSpec, Identity, Resource, Rlimit};

use crate::config::DaemonConfig;
use crate::wire::{
    BrokerError, BrokerMessage, ErrorKind, Event, ExitStatus, FdLayout, Handle, HandleInfo,
    Principal, Program, ReplyBody, Request, RequestBody, Signal, SpawnRequest, Welcome,
    PROTOCOL_VERSION,
};
use link::{Link, LinkError};
use permit::LinkState;
use policy::{Policy, Refusal, UserFacts};
use spawn::{Account, LaunchError, Launcher};

/// The daemon's fds: its end of the broker link, and the HTTP listener.
pub const DAEMON_LINK_FD: i32 = 3;
pub const DAEMON_LISTENER_FD: i32 = 4;

const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A daemon that ran this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// At shutdown, after the policy's grace: how long SIGTERM gets before SIGKILL, and how
/// long the daemon gets to record the ends and to exit.
const SHUTDOWN_TERM_WAIT: Duration = Duration::from_secs(5);
const SHUTDOWN_RECORD_WAIT: Duration = Duration::from_secs(10);
const SHUTDOWN_DAEMON_WAIT: Duration = Duration::from_secs(10);

/// Where a shutdown (SIGTERM) is. Each phase ends when its condition holds or its time
/// is up, whichever comes first.
///
/// | phase            | on entry                                       | ends when                    |
/// |------------------|------------------------------------------------|------------------------------|
/// | `Grace`          | daemon told (`ShuttingDown`), spawns refused, terminals hung up | no executor left, or `shutdown_grace_secs` |
/// | `Terminated`     | SIGTERM to every executor's process group      | no executor left, or 5 s     |
/// | `Killed`         | SIGKILL to every group and cgroup              | no executor left, or 5 s     |
/// | `Recording`      | –                                              | the daemon released every handle (so it stored every end), or 10 s |
/// | `Daemon` | SIGTERM to the daemon                          | it exited (else SIGKILL after 10 s); the broker exits 0 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    Grace,
    Terminated,
    Killed,
    Recording,
    Daemon,
}

#[derive(Debug, Clone, Copy)]
struct Shutdown {
    phase: Stopping,
    until: Instant,
}

pub struct ServeOptions {
    pub broker_config: PathBuf,
    pub config: PathBuf,
}

enum Mode {
    /// Root: executors run as their users, the daemon as `service`.
    Isolated { service: Account },
    /// Not root: everything runs as `me`.
    SingleUser { me: Account },
}

struct Entry {
    info: HandleInfo,
    /// Duplicates of what the daemon got (no stdin pipe), for a daemon that restarts.
    kept: Vec<OwnedFd>,
    /// The daemon is done with it; dropped once the process is also reaped.
    released: bool,
    /// Its cgroup, until the process is reaped.
    cgroup: Option<cgroup::SpawnCgroup>,
}

struct Daemon {
    pid: i32,
    link: Link,
    state: LinkState,
    started: Instant,
}

struct Broker {
    opts: ServeOptions,
    policy: Policy,
    allowed_gids: Vec<u32>,
    mode: Mode,
    credentials: credentials::Credentials,
    executor: OwnedFd,
    self_exe: OwnedFd,
    listener: OwnedFd,
    tty_gid: Option<u32>,
    daemon: Option<Daemon>,
    restart_at: Option<Instant>,
    restart_failures: u32,
    entries: BTreeMap<Handle, Entry>,
    by_pid: HashMap<i32, Handle>,
    next_handle: u64,
    signals: SignalFd,
    shutdown: Option<Shutdown>,
    notifier: notify::Notifier,
    /// systemd was told READY=1 (only the first daemon's Ready does that).
    announced: bool,
    audit: audit::Audit,
    /// Per uid: spawn tokens left and when they were counted.
    spawn_tokens: HashMap<u32, (f64, Instant)>,
    stats: crate::wire::BrokerStats,
    /// The daemon was asked to go (SIGHUP): no backoff, no violence.
    planned_restart: bool,
    /// The daemon's state directory, as resolved and created here.
    daemon_state_dir: PathBuf,
    cgroups: cgroup::Cgroups,
}

/// Runs the broker until SIGTERM/SIGINT.
pub fn serve(opts: ServeOptions) -> Result<(), String> {
    let mut broker = Broker::start(opts)?;
    broker.run();
    Ok(())
}

/// fds 0–2 must be open so no socket ever lands on a stdio number (OpenSSH
/// `sanitise_stdfd`): each closed one gets /dev/null, inheritable like a real stdio.
fn sanitize_stdio() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    loop {
        let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") else {
            return;
        };
        if null.as_raw_fd() > 2 {
            return; // 0–2 are all open; dropping closes this one
        }
        let _ = nix::fcntl::fcntl(
            &null,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        );
        let _ = null.into_raw_fd(); // stays open as that stdio fd
    }
}

/// Creates `path` (owned by uid:gid, `mode`) or checks the one that is there. An existing
/// directory of another owner is refused, not taken over: a mistyped `state_dir` must not
/// chown a system directory.
fn ensure_dir(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), String> {
    let created = match std::fs::symlink_metadata(path) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            true
        }
        Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
    };
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    if meta.uid() != uid || meta.gid() != gid {
        if !created {
            return Err(format!(
                "{} belongs to uid {} gid {}, expected {uid}:{gid}; fix its owner or choose another directory",
                path.display(),
                meta.uid(),
                meta.gid()
            ));
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The broker keeps two or three fds per live handle (for a daemon that restarts), so it
/// takes all the open files its hard limit allows. Its children get their own limits.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => info!(
                    from = soft,
                    to = hard,
                    "raised the broker's open-file limit"
                ),
                Err(e) => warn!("cannot raise the open-file limit from {soft}: {e}"),
            }
        }
    }
}

/// Opens a program to run later with `execveat`, so what was checked is what runs.
fn open_program(path: &Path) -> Result<OwnedFd, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(file.into())
}

fn resolve_gids(names: &[String]) -> Vec<u32> {
    names
        .iter()
        .filter_map(|name| match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            _ => {
                warn!(group = %name, "allowed group does not exist; nobody is allowed through it");
                None
            }
        })
        .collect()
}

/// Keeps only the capabilities the broker uses, in every set including the bounding set.
fn drop_capabilities() -> Result<(), String> {
    use caps::{CapSet, Capability};
    let wanted = [
        Capability::CAP_CHOWN,        // the user's pty slave
        Capability::CAP_KILL,         // the daemon (executors are signalled as their user)
        Capability::CAP_SETGID,       // identity changes
        Capability::CAP_SETUID,       // identity changes
        Capability::CAP_SETPCAP,      // children drop their bounding set
        Capability::CAP_SYS_RESOURCE, // rlimits above the broker's own
    ];
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| e.to_string())?;
    let keep: caps::CapsHashSet = wanted
        .into_iter()
        .filter(|c| permitted.contains(c))
        .collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clearing ambient caps: {e}"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| format!("clearing inheritable caps: {e}"))?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(|e| format!("setting effective caps: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(|e| format!("setting permitted caps: {e}"))?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    info!(capabilities = %names.join(","), "broker dropped its capabilities (bounding set too) to what it needs");
    Ok(())
}

/// Without CAP_SYS_RESOURCE no limit can go above the broker's own hard limit; lower
/// such a limit to it (and say so) instead of failing every spawn.
fn fit_rlimits(limits: Vec<Rlimit>) -> Vec<Rlimit> {
    if caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false)
    {
        return limits;
    }
    limits
        .into_iter()
        .map(|r| match r.resource.current() {
            Ok((_, hard)) if r.hard > hard => {
                warn!(resource = ?r.resource, wanted = r.hard, allowed = hard, "rlimit above the broker's own hard limit (no CAP_SYS_RESOURCE); lowered");
                Rlimit { resource: r.resource, soft: r.soft.min(hard), hard }
            }
            _ => r,
        })
        .collect()
}

/// Runs `op` with `uid` as the effective uid (when isolated), so the kernel refuses a
/// signal to anything not that user's (OpenSSH `temporarily_use_uid`).
fn as_user<T>(isolated: bool, uid: u32, op: impl FnOnce() -> T) -> T {
    if !isolated {
        return op();
    }
    let root = Uid::from_raw(0);
    if let Err(e) = nix::unistd::setresuid(root, Uid::from_raw(uid), root) {
        error!("cannot switch effective uid to {uid}: {e}");
    }
    let result = op();
    if let Err(e) = nix::unistd::setresuid(root, root, root) {
        // Carrying on with the wrong effective uid would break every later spawn.
        error!("cannot restore effective uid 0: {e}; exiting");
        std::process::exit(70);
    }
    result
}

/// Signals one process of `uid`'s as that user (a pid read from a cgroup may have been
/// reused since; as the user, no one else's process can be hit).
fn kill_as(isolated: bool, uid: u32, pid: i32, signal: NixSignal) {
    let _ = as_user(isolated, uid, || kill(Pid::from_raw(pid), signal));
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn exit_status(ws: WaitStatus) -> Option<(i32, ExitStatus)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::Code(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), ExitStatus::Signal(sig as i32))),
        _ => None,
    }
}

fn error_reply(kind: ErrorKind, message: impl Into<String>) -> (ReplyBody, Vec<OwnedFd>) {
    (
        ReplyBody::Error(BrokerError {
            kind,
            message: message.into(),
        }),
        Vec::new(),
    )
}

fn refused(r: Refusal) -> (ReplyBody, Vec<OwnedFd>) {
    let message = r.to_string();
    error_reply(
        ErrorKind::Refused {
            rule: r.rule.to_string(),
        },
        message,
    )
}

impl Broker {
    fn start(opts: ServeOptions) -> Result<Broker, String> {
        sanitize_stdio();
        let euid = nix::unistd::geteuid().as_raw();
        let (policy, found) = Policy::load(&opts.broker_config, euid)?;
        if !found {
            warn!(path = %opts.broker_config.display(), "no policy file; using the built-in defaults");
        }
        let daemon_config = DaemonConfig::load(&opts.config)?;
        if opts.config.exists() {
            policy::check_trusted_path(&opts.config, euid)?;
        }

        let mode = if euid == 0 {
            let (service, created) = spawn::ensure_service_account(&policy.service_user)?;
            if created {
                info!(user = %service.name, uid = service.uid, "created the service user (system account, no login shell, no home)");
            }
            if service.uid == 0 || service.gid == 0 {
                return Err(format!(
                    "service user '{}' must not be root or in group 0",
                    service.name
                ));
            }
            Mode::Isolated { service }
        } else {
            let me = Account::lookup_uid(euid)?
                .ok_or_else(|| format!("uid {euid} has no passwd entry"))?;
            warn!(user = %me.name, "SINGLE-USER MODE: not started as root, so there is no isolation: every session runs as '{}' and only '{}' may be named", me.name, me.name);
            Mode::SingleUser { me }
        };

        ensure_dir(
            &policy.state_dir,
            euid,
            nix::unistd::getegid().as_raw(),
            0o700,
        )?;
        policy::check_trusted_path(&policy.state_dir, euid)?;
        let (credentials, token_path, created) =
            credentials::Credentials::load_or_create(&policy.state_dir, euid)?;
        let audit_path = policy
            .audit_log
            .clone()
            .unwrap_or_else(|| policy.state_dir.join("audit.jsonl"));
        let mut audit = audit::Audit::open(&audit_path, euid)?;
        audit.record(
            "broker_start",
            serde_json::json!({ "pid": std::process::id(), "isolation": euid == 0 }),
        );
        if created {
            info!(path = %token_path.display(), "created the admin token");
            eprintln!("stoa: admin token written to {}", token_path.display());
        }
        let (svc_uid, svc_gid) = match &mode {
            Mode::Isolated { service } => (service.uid, service.gid),
            Mode::SingleUser { me } => (me.uid, me.gid),
        };
        ensure_dir(&daemon_config.state_dir, svc_uid, svc_gid, 0o700)?;

        let executor_path = policy
            .executor_path
            .clone()
            .unwrap_or_else(policy::default_executor_path);
        policy::check_trusted_path(&executor_path, euid)
            .map_err(|e| format!("refusing executor {}: {e}", executor_path.display()))?;
        let meta = std::fs::metadata(&executor_path).map_err(|e| format!("executor: {e}"))?;
        if !meta.is_file() || meta.mode() & 0o001 == 0 && euid == 0 {
            return Err(format!(
                "executor {} must be a regular file executable by others (mode 0755)",
                executor_path.display()
            ));
        }
        let executor = open_program(&executor_path)?;
        info!(path = %executor_path.display(), "executor");
        let self_path =
            std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
        let self_exe = open_program(&self_path)?;

        let listener = std::net::TcpListener::bind(&daemon_config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", daemon_config.listen))?;
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
        let tty_gid = nix::unistd::Group::from_name("tty")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        let allowed_gids = resolve_gids(&policy.allow_groups);

        // What an executor's processes leave orphaned comes to the broker, which reaps it:
        // killed leftovers never linger as zombies, whatever the machine's init does.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            warn!("cannot become a child subreaper: {e}");
        }
        let cgroups = cgroup::Cgroups::setup(&policy.cgroup, euid == 0);
        let missing = cgroups.missing();
        if !missing.is_empty() {
            let list = missing.join("; ");
            if policy.cgroup.required {
                return Err(format!(
                    "cgroup limits cannot be enforced (policy cgroup.required): {list}"
                ));
            }
            warn!("cgroup limits NOT enforced: {list}");
        }

        raise_fd_limit();
        if euid == 0 {
            drop_capabilities()?;
        }

        let mut mask = SigSet::empty();
        for s in [
            NixSignal::SIGCHLD,
            NixSignal::SIGTERM,
            NixSignal::SIGINT,
            NixSignal::SIGHUP,
        ] {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| format!("cannot block signals: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| format!("cannot create a signalfd: {e}"))?;

        Ok(Broker {
            opts,
            policy,
            allowed_gids,
            mode,
            credentials,
            executor,
            self_exe,
            listener: listener.into(),
            tty_gid,
            daemon: None,
            restart_at: None,
            restart_failures: 0,
            entries: BTreeMap::new(),
            by_pid: HashMap::new(),
            next_handle: 1,
            signals,
            shutdown: None,
            notifier: notify::Notifier::from_env(),
            announced: false,
            audit,
            spawn_tokens: HashMap::new(),
            stats: crate::wire::BrokerStats::default(),
            planned_restart: false,
            daemon_state_dir: daemon_config.state_dir.clone(),
            cgroups,
        })
    }

    fn run(&mut self) {
        loop {
            self.advance_shutdown();
            let stopping_daemon = self.shutdown.map(|s| s.phase) == Some(Stopping::Daemon);
            if stopping_daemon && self.daemon.is_none() {
                break;
            }
            let now = Instant::now();
            if self.daemon.is_none() && !stopping_daemon && self.restart_at.is_none_or(|t| t <= now)
            {
                self.start_daemon();
            }
            let deadline = match &self.daemon {
                Some(d) => d.link.deadline(),
                None => self.restart_at,
            };
            let deadline = match (deadline, self.shutdown.map(|s| s.until)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = match deadline {
                Some(t) => {
                    let ms = t.saturating_duration_since(now).as_millis().min(60_000) as i32;
                    PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let (signalled, daemon_events) = {
                let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
                if let Some(d) = &self.daemon {
                    let mut events = PollFlags::POLLIN;
                    if d.link.wants_write() {
                        events |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(d.link.socket().as_fd(), events));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        error!("poll failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let revents = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
                (
                    revents(&fds[0]).contains(PollFlags::POLLIN),
                    fds.get(1).map(revents),
                )
            };
            if signalled {
                self.handle_signals();
            }
            if let Some(ev) = daemon_events {
                if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    self.read_daemon();
                }
                if ev.contains(PollFlags::POLLOUT) {
                    if let Some(d) = &mut self.daemon {
                        if let Err(e) = d.link.flush() {
                            self.link_failed(e);
                        }
                    }
                }
            }
            if let Some(d) = &self.daemon {
                if d.link.deadline().is_some_and(|t| t <= Instant::now()) {
                    self.link_failed(LinkError::Violation(format!(
                        "a frame stayed incomplete for {:?}",
                        link::PARTIAL_FRAME_TIMEOUT
                    )));
                }
            }
        }
        self.finish_shutdown();
    }

    fn handle_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match NixSignal::try_from(info.ssi_signo as i32) {
                Ok(NixSignal::SIGCHLD) => self.reap(),
                Ok(NixSignal::SIGTERM) | Ok(NixSignal::SIGINT) => self.begin_shutdown(),
                Ok(NixSignal::SIGHUP) => self.reload(),
                _ => {}
            }
        }
        // SIGCHLDs coalesce; reap whatever is there.
        self.reap();
    }

    /// SIGHUP: reread the policy, and apply the daemon's config by replacing the daemon
    /// (gracefully; running work survives, as on any daemon restart).
    fn reload(&mut self) {
        let euid = nix::unistd::geteuid().as_raw();
        match Policy::load(&self.opts.broker_config, euid) {
            Ok((policy, _)) => {
                self.allowed_gids = resolve_gids(&policy.allow_groups);
                self.cgroups.set_limits(&policy.cgroup);
                self.policy = policy;
                info!(path = %self.opts.broker_config.display(), "policy reloaded");
                self.audit.record("policy_reloaded", serde_json::json!({}));
            }
            Err(e) => error!("policy not reloaded, keeping the old one: {e}"),
        }
        match DaemonConfig::load(&self.opts.config) {
            Ok(_) => {
                if let Some(d) = &self.daemon {
                    info!(pid = d.pid, "replacing the daemon to apply its config");
                    self.planned_restart = true;
                    let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGTERM);
                }
            }
            Err(e) => error!("config not applied, the daemon keeps the old one: {e}"),
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    return;
                }
                Ok(ws) => {
                    if let Some((pid, status)) = exit_status(ws) {
                        self.on_exit(pid, status);
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, pid: i32, status: ExitStatus) {
        if self.daemon.as_ref().is_some_and(|d| d.pid == pid) {
            self.daemon_gone(&format!("daemon exited ({status:?})"), Some(status));
            return;
        }
        let Some(handle) = self.by_pid.remove(&pid) else {
            return;
        };
        let Some(entry) = self.entries.get_mut(&handle) else {
            return;
        };
        entry.info.exited = Some(status);
        let user = entry.info.unix_user.clone();
        let uid = entry.info.uid;
        let released = entry.released;
        let spawn_cgroup = entry.cgroup.take();
        let mut limit_hit = None;
        if let Some(cg) = spawn_cgroup {
            // Read what it ran into before ending what it left behind.
            limit_hit = self.cgroups.limit_hit(&cg);
            let isolated = self.isolated();
            self.cgroups
                .remove(cg, &mut |p| kill_as(isolated, uid, p, NixSignal::SIGKILL));
        }
        if let Some(entry) = self.entries.get_mut(&handle) {
            entry.info.limit_hit = limit_hit;
        }
        info!(handle = handle.0, pid, user = %user, ?status, ?limit_hit, "executor exited");
        let (code, signal) = match status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(s) => (None, Some(s)),
        };
        self.audit.record(
            "exit",
            serde_json::json!({ "handle": handle.0, "pid": pid, "unix_user": user, "code": code, "signal": signal, "limit_hit": limit_hit.map(|l| l.to_string()) }),
        );
        if released {
            self.entries.remove(&handle);
            return;
        }
        self.send_event(Event::Exited {
            handle,
            status,
            limit_hit,
        });
    }

    fn send_event(&mut self, event: Event) {
        let Some(d) = &mut self.daemon else { return };
        if d.state != LinkState::Ready {
            return; // the next daemon learns it from ListHandles
        }
        let result = codec::encode(&BrokerMessage::Event(event))
            .map_err(LinkError::Io)
            .and_then(|frame| d.link.send(frame, Vec::new()));
        if let Err(e) = result {
            self.link_failed(e);
        }
    }

    fn start_daemon(&mut self) {
        self.restart_at = None;
        let result = (|| -> Result<Daemon, String> {
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let (argv, env) = spawn::daemon_command(&self.opts.config, &self.daemon_state_dir);
            let identity = match &self.mode {
                // No supplementary groups at all for the service user.
                Mode::Isolated { service } => Some(Identity {
                    uid: service.uid,
                    gid: service.gid,
                    groups: vec![],
                }),
                Mode::SingleUser { .. } => None,
            };
            let spec = ChildSpec {
                exe: self.self_exe.as_fd(),
                argv,
                env,
                stdio: None,
                extra_fds: vec![theirs.as_fd(), self.listener.as_fd()],
                controlling_tty: false,
                identity,
                rlimits: fit_rlimits(vec![
                    Rlimit {
                        resource: Resource::Core,
                        soft: 0,
                        hard: 0,
                    },
                    Rlimit {
                        resource: Resource::NoFile,
                        soft: 65536,
                        hard: 65536,
                    },
                ]),
                umask: 0o077,
                cwd: Some(c"/".into()),
                parent_death_signal: Some(libc::SIGTERM),
                cgroup_procs: Vec::new(),
            };
            let pid = sys::spawn_child(&spec).map_err(|e| e.to_string())?;
            let link = Link::new(ours).map_err(|e| e.to_string())?;
            Ok(Daemon {
                pid,
                link,
                state: LinkState::Fresh,
                started: Instant::now(),
            })
        })();
        match result {
            Ok(d) => {
                self.stats.daemon_starts += 1;
                info!(pid = d.pid, "daemon started");
                self.audit
                    .record("daemon_start", serde_json::json!({ "pid": d.pid }));
                self.daemon = Some(d);
            }
            Err(e) => {
                error!("cannot start the daemon: {e}");
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        let delay = RESTART_MIN
            .saturating_mul(1 << self.restart_failures.min(10))
            .min(RESTART_MAX);
        self.restart_failures += 1;
        self.restart_at = Some(Instant::now() + delay);
        info!(?delay, "daemon restart scheduled");
    }

    /// The daemon is finished: kill it if it is still there, reap it, schedule a new one.
    /// The daemon is finished: reap it (killing it unless it is leaving on request), then
    /// start a new one: at once after a clean exit, else with backoff.
    fn daemon_gone(&mut self, reason: &str, reaped: Option<ExitStatus>) {
        let Some(d) = self.daemon.take() else { return };
        warn!(pid = d.pid, "daemon down: {reason}");
        self.audit.record(
            "daemon_down",
            serde_json::json!({ "pid": d.pid, "reason": reason }),
        );
        let pid = Pid::from_raw(d.pid);
        let status = reaped.or_else(|| {
            if self.planned_restart {
                // It was asked to go: give it the moment it takes to finish its requests.
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline {
                    if let Ok(ws) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        if let Some((_, s)) = exit_status(ws) {
                            return Some(s);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = kill(pid, NixSignal::SIGKILL);
            waitpid(pid, None)
                .ok()
                .and_then(exit_status)
                .map(|(_, s)| s)
        });
        let clean =
            std::mem::take(&mut self.planned_restart) || status == Some(ExitStatus::Code(0));
        if clean || d.started.elapsed() >= HEALTHY_RUN {
            self.restart_failures = 0;
        }
        if clean {
            self.restart_at = Some(Instant::now());
        } else {
            self.schedule_restart();
        }
    }

    fn link_failed(&mut self, e: LinkError) {
        match e {
            LinkError::Closed => self.daemon_gone("it closed the link", None),
            LinkError::Io(e) => self.daemon_gone(&format!("link error: {e}"), None),
            LinkError::Violation(what) => {
                self.stats.protocol_violations += 1;
                error!(violation = %what, "PROTOCOL VIOLATION by the daemon; dropping the link and restarting it");
                let pid = self.daemon.as_ref().map(|d| d.pid);
                self.audit.record(
                    "violation",
                    serde_json::json!({ "what": what, "daemon_pid": pid }),
                );
                self.daemon_gone("protocol violation", None);
            }
        }
    }

    fn read_daemon(&mut self) {
        let Some(d) = &mut self.daemon else { return };
        let payloads = match d.link.read_payloads() {
            Ok(p) => p,
            Err(e) => return self.link_failed(e),
        };
        for payload in payloads {
            self.stats.frames_received += 1;
            let request: Request = match codec::decode(&payload) {
                Ok(r) => r,
                Err(e) => return self.link_failed(LinkError::Violation(e.to_string())),
            };
            if let Err(what) = self.handle_request(request) {
                return self.link_failed(LinkError::Violation(what));
            }
            if self.daemon.is_none() {
                return;
            }
        }
    }

    /// Answers one request. `Err` is a protocol violation.
    fn handle_request(&mut self, request: Request) -> Result<(), String> {
        let Some(d) = &mut self.daemon else {
            return Ok(());
        };
        permit::permit(d.state, &request.body)
            .map_err(|why| format!("{} not permitted: {why}", permit::name(&request.body)))?;
        if let Some(id) = &request.request_id {
            if !crate::wire::valid_request_id(id) {
                return Err(format!("invalid request id ({} bytes)", id.len()));
            }
        }
        // Every log line while answering names the HTTP request it serves.
        let request_id = request.request_id.clone();
        let _span = tracing::info_span!("request", request_id = request_id.as_deref()).entered();
        let (body, fds) = match request.body {
            RequestBody::Hello { protocol } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(format!(
                        "daemon speaks protocol {protocol}, broker {PROTOCOL_VERSION}"
                    ));
                }
                d.state = LinkState::Ready;
                let single_user = match &self.mode {
                    Mode::Isolated { .. } => None,
                    Mode::SingleUser { me } => Some(me.name.clone()),
                };
                let welcome = Welcome {
                    version: env!("CARGO_PKG_VERSION").into(),
                    isolation: single_user.is_none(),
                    single_user,
                };
                (ReplyBody::Welcome(welcome), Vec::new())
            }
            RequestBody::Ready => {
                info!(pid = d.pid, "daemon ready");
                if !self.announced {
                    self.notifier.notify("READY=1\nSTATUS=serving");
                    self.announced = true;
                } else {
                    self.notifier.notify("STATUS=serving (daemon restarted)");
                }
                (ReplyBody::Done, Vec::new())
            }
            RequestBody::Authenticate { credential, .. } => {
                match self.credentials.verify(&credential) {
                    Some(p) => (ReplyBody::Principal(p), Vec::new()),
                    None => error_reply(ErrorKind::Unauthorized, "invalid credential"),
                }
            }
            RequestBody::Spawn(_) if self.shutdown.is_some() => error_reply(
                ErrorKind::Unavailable,
                "stoa is shutting down: no new processes are started",
            ),
            RequestBody::Spawn(req) => {
                let mut record = serde_json::json!({
                    "unix_user": req.unix_user,
                    "program": match &req.program {
                        Program::Exec { argv } => serde_json::json!({ "exec": argv }),
                        Program::Shell => serde_json::json!("shell"),
                    },
                    "cwd": req.cwd,
                    "tty": req.tty.is_some(),
                    "secrets": req.secrets,
                    "request_id": request_id,
                });
                // One verification serves the audit record and the spawn's own check.
                let principal = self.credentials.verify(&req.credential);
                record["api_user"] =
                    serde_json::json!(principal.as_ref().map(|p| p.name().to_string()));
                let reply = self.spawn(req, principal);
                match &reply.0 {
                    ReplyBody::Spawned(info) => {
                        record["handle"] = serde_json::json!(info.handle.0);
                        record["pid"] = serde_json::json!(info.pid);
                        self.audit.record("spawn", record);
                    }
                    ReplyBody::Error(e) => {
                        record["error"] = serde_json::json!(e.message);
                        if let ErrorKind::Refused { rule } = &e.kind {
                            record["rule"] = serde_json::json!(rule);
                        }
                        self.audit.record("refused", record);
                    }
                    _ => {}
                }
                reply
            }
            RequestBody::CheckDir {
                credential,
                unix_user,
                path,
            } => self.check_dir(&credential, &unix_user, &path),
            RequestBody::SetSecret {
                credential,
                name,
                value,
            } => self.set_secret(&credential, &name, Some(value)),
            RequestBody::DeleteSecret { credential, name } => {
                self.set_secret(&credential, &name, None)
            }
            RequestBody::ListSecrets { credential } => self.list_secrets(&credential),
            RequestBody::Kill { handle, signal } => {
                let entry = self.live_entry(handle)?;
                let (uid, pid, user) =
                    (entry.info.uid, entry.info.pid, entry.info.unix_user.clone());
                let reply = self.signal_group(uid, pid, signal);
                if signal == Signal::Kill {
                    // Not just the process group: everything the spawn started.
                    self.kill_cgroup(handle, uid);
                }
                self.audit.record(
                    "signal",
                    serde_json::json!({ "handle": handle.0, "pid": pid, "unix_user": user, "signal": format!("{signal:?}"), "request_id": request_id }),
                );
                reply
            }
            RequestBody::Release { handle } => {
                let entry = self.entries.get_mut(&handle).filter(|e| !e.released);
                let entry =
                    entry.ok_or_else(|| format!("Release of unknown handle {}", handle.0))?;
                if entry.info.exited.is_some() {
                    self.entries.remove(&handle);
                } else {
                    entry.released = true;
                    entry.kept.clear();
                }
                (ReplyBody::Done, Vec::new())
            }
            RequestBody::Stats => {
                let p = &self.policy;
                let limits = [
                    (
                        "max_executors_per_user",
                        p.max_executors_per_user.to_string(),
                    ),
                    ("max_executors_total", p.max_executors_total.to_string()),
                    ("spawn_rate_per_sec", p.spawn_rate_per_sec.to_string()),
                    ("spawn_burst", p.spawn_burst.to_string()),
                    ("rlimit_nofile", p.rlimits.nofile.to_string()),
                    ("rlimit_nproc", p.rlimits.nproc.to_string()),
                    ("rlimit_core", p.rlimits.core.to_string()),
                ]
                .map(|(k, v)| (k.to_string(), v))
                .into_iter()
                .chain(self.cgroups.report())
                .collect();
                let stats = crate::wire::BrokerStats {
                    handles: self.entries.len() as u64,
                    limits,
                    ..self.stats.clone()
                };
                (ReplyBody::Stats(stats), Vec::new())
            }
            RequestBody::ListHandles => {
                let list = self
                    .entries
                    .values()
                    .filter(|e| !e.released)
                    .map(|e| e.info.clone())
                    .collect();
                (ReplyBody::Handles(list), Vec::new())
            }
            RequestBody::Adopt { handle } => {
                let entry = self.live_entry(handle)?;
                let fds: Result<Vec<OwnedFd>, _> =
                    entry.kept.iter().map(|f| f.try_clone()).collect();
                match fds {
                    Ok(fds) => {
                        let mut info = entry.info.clone();
                        if let FdLayout::Pipes { .. } = info.fds {
                            info.fds = FdLayout::Pipes { stdin: false };
                        }
                        (ReplyBody::Adopted(Box::new(info)), fds)
                    }
                    Err(e) => error_reply(ErrorKind::Failed, format!("cannot duplicate fds: {e}")),
                }
            }
        };
        let welcomed = matches!(body, ReplyBody::Welcome(_));
        let frame = codec::encode(&BrokerMessage::Reply {
            id: request.id,
            body,
        })
        .map_err(|e| format!("cannot encode a reply: {e}"))?;
        if let Some(d) = &mut self.daemon {
            if let Err(e) = d.link.send(frame, fds) {
                self.link_failed(e);
                return Ok(());
            }
        }
        if welcomed && self.shutdown.is_some() {
            // A daemon that starts during a shutdown must know it too.
            self.send_event(Event::ShuttingDown {
                grace_secs: self.policy.shutdown_grace_secs,
            });
        }
        Ok(())
    }

    fn live_entry(&self, handle: Handle) -> Result<&Entry, String> {
        self.entries
            .get(&handle)
            .filter(|e| !e.released)
            .ok_or_else(|| format!("unknown handle {}", handle.0))
    }

    /// Signals a process group with the owning user's identity as the effective uid, so
    /// the kernel refuses anything not that user's (OpenSSH `temporarily_use_uid`).
    fn signal_group(&self, uid: u32, pgid: i32, signal: Signal) -> (ReplyBody, Vec<OwnedFd>) {
        let sig = match NixSignal::try_from(signal.number()) {
            Ok(s) => s,
            Err(_) => return error_reply(ErrorKind::BadRequest, "unknown signal"),
        };
        let result = self.as_user(uid, || killpg(Pid::from_raw(pgid), sig));
        match result {
            Ok(()) => (ReplyBody::Done, Vec::new()),
            Err(nix::errno::Errno::ESRCH) => {
                error_reply(ErrorKind::Failed, "no process left in that group")
            }
            Err(e) => error_reply(ErrorKind::Failed, format!("cannot signal: {e}")),
        }
    }

    fn as_user<T>(&self, uid: u32, op: impl FnOnce() -> T) -> T {
        as_user(self.isolated(), uid, op)
    }

    /// SIGKILLs everything in `handle`'s cgroup, as its user `uid`.
    fn kill_cgroup(&self, handle: Handle, uid: u32) {
        if let Some(cg) = self.entries.get(&handle).and_then(|e| e.cgroup.as_ref()) {
            let isolated = self.isolated();
            self.cgroups
                .kill(cg, &mut |p| kill_as(isolated, uid, p, NixSignal::SIGKILL));
        }
    }

    fn isolated(&self) -> bool {
        matches!(self.mode, Mode::Isolated { .. })
    }

    /// The principal behind `credential`, if it may act as `unix_user`: its own Unix user,
    /// or any user for admins (the policy still decides which users may run at all).
    fn authorize(
        &mut self,
        credential: &str,
        unix_user: &str,
    ) -> Result<Principal, (ReplyBody, Vec<OwnedFd>)> {
        let principal = self.credentials.verify(credential);
        Self::may_act_as(principal, unix_user)
    }

    /// `principal` (a verified credential, if any) may act as `unix_user`.
    fn may_act_as(
        principal: Option<Principal>,
        unix_user: &str,
    ) -> Result<Principal, (ReplyBody, Vec<OwnedFd>)> {
        let Some(principal) = principal else {
            warn!(user = %unix_user.escape_debug(), "refused: invalid credential");
            return Err(error_reply(ErrorKind::Unauthorized, "invalid credential"));
        };
        if !principal.is_admin() && principal.unix_user() != Some(unix_user) {
            warn!(principal = %principal.name(), user = %unix_user.escape_debug(), "refused: credential of another user");
            return Err(error_reply(
                ErrorKind::Forbidden,
                format!(
                    "'{}' may not act as unix user '{}'",
                    principal.name(),
                    unix_user.escape_debug()
                ),
            ));
        }
        Ok(principal)
    }

    /// The secrets stored for `unix_user`, as environment variables.
    fn secrets_of(&mut self, unix_user: &str) -> Vec<(String, String)> {
        match self.credentials.store.get() {
            Ok(store) => store
                .secrets
                .get(unix_user)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            Err(e) => {
                error!("user store unreadable, spawning without secrets: {e}");
                Vec::new()
            }
        }
    }

    /// The Unix user a credential's secrets belong to.
    fn secret_owner(&mut self, credential: &str) -> Result<String, (ReplyBody, Vec<OwnedFd>)> {
        match self.credentials.verify(credential) {
            None => Err(error_reply(ErrorKind::Unauthorized, "invalid credential")),
            Some(p) => p.unix_user().map(str::to_string).ok_or_else(|| {
                error_reply(
                    ErrorKind::BadRequest,
                    "the admin token has no unix user, so no secrets; use a user token",
                )
            }),
        }
    }

    fn set_secret(
        &mut self,
        credential: &str,
        name: &str,
        value: Option<String>,
    ) -> (ReplyBody, Vec<OwnedFd>) {
        let owner = match self.secret_owner(credential) {
            Ok(o) => o,
            Err(e) => return e,
        };
        if !users::valid_secret_name(name) {
            return error_reply(
                ErrorKind::BadRequest,
                "secret names are environment variable names: A-Z, 0-9, _",
            );
        }
        if self.policy.env_denied(name) {
            return refused(Refusal::new(
                "env-deny",
                format!("{name} may not be set in an environment"),
            ));
        }
        if let Some(v) = &value {
            if v.len() > users::MAX_SECRET_BYTES || v.contains('\0') {
                return error_reply(
                    ErrorKind::BadRequest,
                    format!(
                        "a secret is at most {} bytes, without NUL",
                        users::MAX_SECRET_BYTES
                    ),
                );
            }
        }
        let deleting = value.is_none();
        let result = self.credentials.store.update(|store| {
            let mine = store.secrets.entry(owner.clone()).or_default();
            match value {
                Some(v) => {
                    if let Err(limit) = users::secrets_fit(mine, name, v.len()) {
                        return Ok(Err(limit));
                    }
                    mine.insert(name.to_string(), v);
                    Ok(Ok(true))
                }
                None => Ok(Ok(mine.remove(name).is_some())),
            }
        });
        match result {
            Ok(Err(limit)) => error_reply(ErrorKind::Quota, limit),
            Ok(Ok(true)) => {
                info!(user = %owner, secret = %name, deleted = deleting, "secret changed");
                let event = if deleting {
                    "secret_deleted"
                } else {
                    "secret_set"
                };
                self.audit.record(
                    event,
                    serde_json::json!({ "unix_user": owner, "name": name }),
                );
                (ReplyBody::Done, Vec::new())
            }
            Ok(Ok(false)) => error_reply(ErrorKind::BadRequest, format!("no secret named {name}")),
            Err(e) => error_reply(ErrorKind::Failed, e),
        }
    }

    fn list_secrets(&mut self, credential: &str) -> (ReplyBody, Vec<OwnedFd>) {
        let owner = match self.secret_owner(credential) {
            Ok(o) => o,
            Err(e) => return e,
        };
        let names = self
            .secrets_of(&owner)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        (ReplyBody::Names(names), Vec::new())
    }

    /// Whether `unix_user` can enter `path`, asked with that user's own identity.
    fn check_dir(
        &mut self,
        credential: &str,
        unix_user: &str,
        path: &str,
    ) -> (ReplyBody, Vec<OwnedFd>) {
        if let Err(e) = self.authorize(credential, unix_user) {
            return e;
        }
        if !path.starts_with('/')
            || path.len() > crate::wire::limits::MAX_PATH_BYTES
            || path.contains('\0')
        {
            return error_reply(
                ErrorKind::BadRequest,
                format!("{path:?} is not an absolute path"),
            );
        }
        let account = match Account::lookup(unix_user) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return refused(Refusal::new(
                    "unknown-user",
                    format!("unix user '{unix_user}' does not exist"),
                ))
            }
            Err(e) => return error_reply(ErrorKind::Failed, e),
        };
        let result = self.as_account(&account, || {
            let meta = std::fs::metadata(path)?;
            if !meta.is_dir() {
                return Err(std::io::Error::other("not a directory"));
            }
            // access(2) would ask about the real uid (root); AT_EACCESS asks about the user.
            nix::unistd::faccessat(
                nix::fcntl::AT_FDCWD,
                path,
                nix::unistd::AccessFlags::X_OK,
                nix::fcntl::AtFlags::AT_EACCESS,
            )
            .map_err(std::io::Error::from)
        });
        match result {
            Ok(()) => (ReplyBody::Done, Vec::new()),
            Err(e) => error_reply(
                ErrorKind::BadRequest,
                format!("unix user '{}' cannot enter {path}: {e}", account.name),
            ),
        }
    }

    /// Runs `op` with `account`'s groups, gid and uid as the effective identity (real and
    /// saved stay root, so the broker switches back), so the kernel applies that user's
    /// permissions to what `op` does.
    fn as_account<T>(
        &self,
        account: &Account,
        op: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid};
        if !matches!(self.mode, Mode::Isolated { .. }) {
            return op();
        }
        let root_u = Uid::from_raw(0);
        let root_g = Gid::from_raw(0);
        let groups: Vec<Gid> = account.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        let switched = setgroups(&groups)
            .and_then(|_| setresgid(root_g, Gid::from_raw(account.gid), root_g))
            .and_then(|_| setresuid(root_u, Uid::from_raw(account.uid), root_u));
        let result = match switched {
            Ok(()) => op(),
            Err(e) => Err(std::io::Error::other(format!(
                "cannot take the user's identity: {e}"
            ))),
        };
        let restored = setresuid(root_u, root_u, root_u)
            .and_then(|_| setresgid(root_g, root_g, root_g))
            .and_then(|_| setgroups(&[]));
        if let Err(e) = restored {
            error!("cannot restore the broker's identity: {e}; exiting");
            std::process::exit(70);
        }
        result
    }

    fn spawn(
        &mut self,
        req: SpawnRequest,
        principal: Option<Principal>,
    ) -> (ReplyBody, Vec<OwnedFd>) {
        let principal = match Self::may_act_as(principal, &req.unix_user) {
            Ok(p) => p,
            Err(e) => return e,
        };
        if let Err(e) = spawn::validate(&req) {
            return error_reply(ErrorKind::BadRequest, e);
        }
        if let Some((name, _)) = req.env.iter().find(|(n, _)| self.policy.env_denied(n)) {
            return refused(Refusal::new(
                "env-deny",
                format!("environment variable {name} may not be set (policy env_deny, or set by the broker)"),
            ));
        }
        let account = match Account::lookup(&req.unix_user) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return refused(Refusal::new(
                    "unknown-user",
                    format!("unix user '{}' does not exist", req.unix_user),
                ))
            }
            Err(e) => return error_reply(ErrorKind::Failed, e),
        };
        let check = match &self.mode {
            Mode::Isolated { service } => self.policy.check_user(&UserFacts {
                name: &account.name,
                uid: account.uid,
                gid: account.gid,
                groups: &account.groups,
                service_uid: service.uid,
                service_gid: service.gid,
                allowed_gids: &self.allowed_gids,
            }),
            Mode::SingleUser { me } if me.uid != account.uid => Err(Refusal::new(
                "single-user",
                format!("single-user mode: only '{}' may be run", me.name),
            )),
            Mode::SingleUser { .. } => Ok(()),
        };
        if let Err(r) = check {
            warn!(user = %account.name, rule = r.rule, "spawn refused: {}", r.message);
            return refused(r);
        }
        let live_for_user = self
            .entries
            .values()
            .filter(|e| e.info.uid == account.uid && e.info.exited.is_none())
            .count();
        if live_for_user >= self.policy.max_executors_per_user {
            return error_reply(
                ErrorKind::Quota,
                Refusal::new(
                    "executors-per-user",
                    format!(
                        "'{}' already has {live_for_user} live executors",
                        account.name
                    ),
                )
                .to_string(),
            );
        }
        if !self.take_spawn_token(account.uid) {
            return error_reply(
                ErrorKind::Quota,
                Refusal::new(
                    "spawn-rate",
                    format!(
                        "'{}' is spawning faster than {}/s (burst {})",
                        account.name, self.policy.spawn_rate_per_sec, self.policy.spawn_burst
                    ),
                )
                .to_string(),
            );
        }
        if self.entries.len() >= self.policy.max_executors_total {
            return error_reply(
                ErrorKind::Quota,
                Refusal::new(
                    "executors-total",
                    format!("the broker holds {} handles", self.entries.len()),
                )
                .to_string(),
            );
        }
        let secrets = if req.secrets {
            self.secrets_of(&account.name)
        } else {
            Vec::new()
        };
        let handle = Handle(self.next_handle);
        self.next_handle += 1;
        let (spawn_cgroup, cgroup_procs) = match self.cgroups.prepare(account.uid, handle.0) {
            Ok(Some((cg, fds))) => (Some(cg), fds),
            Ok(None) => (None, Vec::new()),
            Err(e) => {
                error!(user = %account.name, "spawn failed: {e}");
                return error_reply(ErrorKind::Failed, e);
            }
        };
        let umask = self.policy.umask_bits().unwrap_or(0o022);
        let launcher = Launcher {
            executor: &self.executor,
            isolated: matches!(self.mode, Mode::Isolated { .. }),
            tty_gid: self.tty_gid,
            rlimits: fit_rlimits(self.policy.rlimits()),
            umask,
            path: self.policy.path.clone(),
        };
        let launched = launcher.launch(&account, &req, secrets, &cgroup_procs);
        drop(cgroup_procs);
        let launched = match launched {
            Ok(l) => l,
            Err(e) => {
                if let Some(cg) = spawn_cgroup {
                    let isolated = self.isolated();
                    let uid = account.uid;
                    self.cgroups
                        .remove(cg, &mut |p| kill_as(isolated, uid, p, NixSignal::SIGKILL));
                }
                return match e {
                    LaunchError::Cwd(msg) => error_reply(ErrorKind::BadRequest, msg),
                    LaunchError::Other(msg) => {
                        error!(user = %account.name, "spawn failed: {msg}");
                        error_reply(ErrorKind::Failed, msg)
                    }
                };
            }
        };
        let info = HandleInfo {
            handle,
            pid: launched.pid,
            unix_user: account.name.clone(),
            uid: account.uid,
            program: req.program.clone(),
            fds: launched.layout,
            exited: None,
            limit_hit: None,
            started_at: now_secs(),
        };
        let what = match &req.program {
            // The program only: its arguments (a user's command line, a prompt) go to the
            // root-only audit log, not to the journal.
            Program::Exec { argv } => {
                format!("exec {:?} with {} arguments", argv[0], argv.len() - 1)
            }
            Program::Shell => "shell".into(),
        };
        info!(handle = handle.0, pid = launched.pid, user = %account.name, by = %principal.name(), tty = req.tty.is_some(), "spawned {}", what.escape_debug());
        self.by_pid.insert(launched.pid, handle);
        self.entries.insert(
            handle,
            Entry {
                info: info.clone(),
                kept: launched.kept,
                released: false,
                cgroup: spawn_cgroup,
            },
        );
        (ReplyBody::Spawned(Box::new(info)), launched.for_daemon)
    }

    /// A token bucket per user: `spawn_burst` at once, refilled at `spawn_rate_per_sec`.
    fn take_spawn_token(&mut self, uid: u32) -> bool {
        let (rate, burst) = (
            self.policy.spawn_rate_per_sec,
            self.policy.spawn_burst as f64,
        );
        let now = Instant::now();
        let (tokens, at) = self.spawn_tokens.entry(uid).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// SIGTERM/SIGINT: the first starts the shutdown; another cuts the grace short.
    fn begin_shutdown(&mut self) {
        if let Some(s) = &mut self.shutdown {
            if s.phase == Stopping::Grace {
                info!("second shutdown request: not waiting for running work any longer");
                s.until = Instant::now();
            }
            return;
        }
        let grace = Duration::from_secs(self.policy.shutdown_grace_secs);
        let live = self.live_executors();
        info!(
            executors = live.len(),
            ?grace,
            "shutting down: no new processes; running work may finish"
        );
        self.notifier
            .notify("STOPPING=1\nSTATUS=shutting down: waiting for running work");
        self.audit.record(
            "shutdown",
            serde_json::json!({ "executors": live.len(), "grace_secs": grace.as_secs() }),
        );
        self.shutdown = Some(Shutdown {
            phase: Stopping::Grace,
            until: Instant::now() + grace,
        });
        self.send_event(Event::ShuttingDown {
            grace_secs: grace.as_secs(),
        });
        // Terminals do not finish by themselves: hang them up now.
        let terminals: Vec<(u32, i32)> = self
            .entries
            .values()
            .filter(|e| e.info.exited.is_none() && e.info.fds == FdLayout::Pty)
            .map(|e| (e.info.uid, e.info.pid))
            .collect();
        for (uid, pgid) in terminals {
            self.signal_group(uid, pgid, Signal::Hup);
        }
    }

    /// (uid, pgid, handle) of every executor not yet reaped.
    fn live_executors(&self) -> Vec<(u32, i32, Handle)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.info.exited.is_none())
            .map(|(h, e)| (e.info.uid, e.info.pid, *h))
            .collect()
    }

    /// Moves the shutdown on as far as it can go now (see [`Stopping`]).
    fn advance_shutdown(&mut self) {
        loop {
            let Some(s) = self.shutdown else { return };
            let now = Instant::now();
            let live = self.live_executors();
            let due = now >= s.until;
            let next = match s.phase {
                Stopping::Grace if live.is_empty() || due => {
                    info!(
                        executors = live.len(),
                        "shutdown: SIGTERM to what still runs"
                    );
                    for &(uid, pgid, _) in &live {
                        self.signal_group(uid, pgid, Signal::Term);
                    }
                    (Stopping::Terminated, SHUTDOWN_TERM_WAIT)
                }
                Stopping::Terminated if live.is_empty() || due => {
                    info!(
                        executors = live.len(),
                        "shutdown: SIGKILL to what still runs"
                    );
                    for &(uid, pgid, handle) in &live {
                        self.signal_group(uid, pgid, Signal::Kill);
                        self.kill_cgroup(handle, uid);
                    }
                    (Stopping::Killed, SHUTDOWN_TERM_WAIT)
                }
                Stopping::Killed if live.is_empty() || due => {
                    if !live.is_empty() {
                        error!(
                            executors = live.len(),
                            "shutdown: executors survived SIGKILL"
                        );
                    }
                    (Stopping::Recording, SHUTDOWN_RECORD_WAIT)
                }
                Stopping::Recording if self.entries.is_empty() || due => {
                    if !self.entries.is_empty() {
                        warn!(
                            handles = self.entries.len(),
                            "shutdown: the daemon did not release every handle in time"
                        );
                    }
                    if let Some(d) = &self.daemon {
                        info!(pid = d.pid, "shutdown: stopping the daemon");
                        let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGTERM);
                        // It is asked to go: let it finish (see daemon_gone).
                        self.planned_restart = true;
                    }
                    (Stopping::Daemon, SHUTDOWN_DAEMON_WAIT)
                }
                Stopping::Daemon if due => {
                    if let Some(d) = self.daemon.take() {
                        warn!(
                            pid = d.pid,
                            "shutdown: the daemon did not exit in time; SIGKILL"
                        );
                        let pid = Pid::from_raw(d.pid);
                        let _ = kill(pid, NixSignal::SIGKILL);
                        let _ = waitpid(pid, None);
                    }
                    return;
                }
                _ => return,
            };
            self.shutdown = Some(Shutdown {
                phase: next.0,
                until: now + next.1,
            });
        }
    }

    /// After the loop: whatever is still there is killed, the cgroups removed.
    fn finish_shutdown(&mut self) {
        for (uid, pgid, _) in self.live_executors() {
            self.signal_group(uid, pgid, Signal::Kill);
        }
        let deadline = Instant::now() + SHUTDOWN_TERM_WAIT;
        while !self.by_pid.is_empty() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(20));
        }
        // Only what stoa's executors started is in these cgroups. What is killed there
        // comes to the broker (the subreaper): it must be reaped before its cgroup can go.
        self.cgroups.teardown(
            &mut |p| {
                let _ = kill(Pid::from_raw(p), NixSignal::SIGKILL);
            },
            &mut || {
                while let Ok(ws) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                    if ws == WaitStatus::StillAlive {
                        break;
                    }
                }
            },
        );
        self.audit.record(
            "broker_stop",
            serde_json::json!({ "pid": std::process::id() }),
        );
        info!("broker stopped");
    }
}
