//! Before the loop: the policy and config read and checked, the service account, the state
//! and audit files, the executor opened, the listener bound, cgroups found, capabilities
//! cut to what the broker uses, signals routed to a signalfd.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::signal::{SigSet, Signal as NixSignal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{error, info, warn};

use stoa_executor::sys::Rlimit;

use super::event_loop::Server;
use super::policy::{self, Policy};
use super::spawn::{self, Account};
use super::{audit, cgroup, credentials, os, Broker, Mode, ServeOptions};
use crate::config::DaemonConfig;

pub fn start(opts: ServeOptions) -> Result<Server, String> {
    match opts.resume_state_fd {
        None => build(opts, None),
        Some(fd) => {
            // Upgraded in place: the old broker's state, checked by this binary before the
            // exec; any failure from here on ends the broker (systemd restarts it).
            let resumed = super::upgrade::take_state(fd)?;
            let state = resumed.state.clone();
            let mut server = build(opts, Some(resumed))?;
            server.resumed(&state);
            Ok(server)
        }
    }
}

fn build(opts: ServeOptions, resumed: Option<super::upgrade::Resumed>) -> Result<Server, String> {
    use super::upgrade;
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
        let me =
            Account::lookup_uid(euid)?.ok_or_else(|| format!("uid {euid} has no passwd entry"))?;
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
    let state_lock = match &resumed {
        Some(r) => StateLock::inherited(r.state_lock.try_clone().map_err(|e| e.to_string())?)?,
        None => StateLock::take(&policy.state_dir)?,
    };
    let (mut credentials, token_path, created) =
        credentials::Credentials::load_or_create(&policy.state_dir, euid)?;
    if let Some(r) = &resumed {
        credentials.logins =
            credentials::Logins::restore(upgrade::logins_of(&r.state), r.state.next_login);
    }
    // Users from a store written before API users had ids get one now: what the daemon
    // stores belongs to the id, and an id-0 user does not authenticate.
    match super::users::assign_missing_ids(&policy.state_dir, euid) {
        Ok(0) => {}
        Ok(n) => info!(users = n, "gave API users from an older store their ids"),
        Err(e) => warn!("cannot give API users their ids: {e}"),
    }
    let audit_path = policy
        .audit_log
        .clone()
        .unwrap_or_else(|| policy.state_dir.join("audit.jsonl"));
    let mut audit = audit::Audit::open(&audit_path, euid)?;
    if resumed.is_none() {
        audit.record(
            "broker_start",
            serde_json::json!({ "pid": std::process::id(), "isolation": euid == 0 }),
        );
    }
    if created {
        info!(path = %token_path.display(), "created the admin token");
        eprintln!("stoa: admin token written to {}", token_path.display());
    }
    let (svc_uid, svc_gid) = match &mode {
        Mode::Isolated { service } => (service.uid, service.gid),
        Mode::SingleUser { me } => (me.uid, me.gid),
    };
    ensure_dir(&daemon_config.state_dir, svc_uid, svc_gid, 0o700)?;
    // Each user's worker keeps its store in a directory of its own below this one.
    ensure_dir(
        &policy.workers_dir,
        euid,
        nix::unistd::getegid().as_raw(),
        0o755,
    )?;
    policy::check_trusted_path(&policy.workers_dir, euid)?;
    // Before capabilities are dropped: the old store is the service user's. (Not after an
    // upgrade in place: the first start did it, and the capabilities are gone.)
    if resumed.is_none() {
        let split = super::legacy_store::split(
            &daemon_config.state_dir,
            &policy.workers_dir,
            &policy.state_dir,
        );
        if let Err(e) = split {
            warn!("the old store was not split into the users' stores: {e}");
        }
    }

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
    let self_path = match &resumed {
        Some(r) => PathBuf::from(&r.state.exe_path),
        None => std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?,
    };
    if executor_path == self_path {
        warn!(
            "no stoa-executor beside {}: stoa itself runs as the executor (slower to start; `cargo build --release --workspace` builds it)",
            self_path.display()
        );
    }
    let self_exe = open_program(&self_path)?;

    let listener = match &resumed {
        Some(r) => std::net::TcpListener::from(r.listener.try_clone().map_err(|e| e.to_string())?),
        None => std::net::TcpListener::bind(&daemon_config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", daemon_config.listen))?,
    };
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

    let mut made_files = vec![];
    if let Some(r) = &resumed {
        made_files = r.state.made_files.iter().map(PathBuf::from).collect();
    } else if euid == 0 {
        // Gemini needs its auth type in a settings file only root can write (see
        // agents::gemini): a user with no ~/.gemini then runs it from stoa's config alone.
        let path = Path::new(stoa_executor::agents::gemini::SYSTEM_SETTINGS_PATH);
        match stoa_executor::agents::gemini::write_system_settings(path) {
            Ok(made) => {
                info!(path = %path.display(), "gemini system settings");
                made_files = made;
            }
            Err(e) => warn!("Gemini CLI runs with a base_url will need the user's own ~/.gemini/settings.json: {e}"),
        }
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
        NixSignal::SIGUSR2,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("cannot create a signalfd: {e}"))?;

    let isolated = matches!(mode, Mode::Isolated { .. });
    let landlock = super::confine::probe_kernel();
    let confine_report = policy.confine.report(&landlock);
    match (&landlock, policy.confine.required) {
        (Ok(abi), _) if *abi >= stoa_executor::sys::landlock::MIN_ABI => {
            info!(landlock = %confine_report[0].1, confine = %confine_report[1].1, "confinement")
        }
        (_, true) => error!(
            "confine.required: {}; every run the policy confines will be refused",
            confine_report[0].1
        ),
        (_, false) => warn!("runs are NOT confined: Landlock {}", confine_report[0].1),
    }
    let os = Box::new(os::RealOs {
        self_exe: self_exe
            .try_clone()
            .map_err(|e| format!("cannot duplicate the program's fd: {e}"))?,
        isolated,
        executor,
        tty_gid,
        cgroups,
        landlock,
    });
    let local_socket = match &policy.local_socket {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None if isolated => Some(PathBuf::from(super::local_login::DEFAULT_SOCKET)),
        None => Some(policy.state_dir.join("local.sock")),
    };
    let mut broker = Broker::new(policy, allowed_gids, mode, credentials, os, audit);
    broker.direct_path = !daemon_config.execution.use_executor;
    if broker.direct_path {
        warn!("execution.use_executor = false: agents run on the direct path, started by each user's worker as that user, without the executor (no per-run cgroup, limits or confinement); their workers get their secrets");
    }
    let mut resumed = resumed;
    if let Some(r) = resumed.as_mut() {
        broker.handles = std::mem::take(&mut r.handles);
        broker.shares = upgrade::grants_of(&r.state);
        broker.stats = r.state.stats.clone();
        broker.announced = true;
        if let (Some(local), Some(listener)) = (&r.state.local, r.local_listener.take()) {
            broker.local = Some(super::local_login::LocalLogins {
                path: PathBuf::from(&local.path),
                made_dir: local.made_dir,
                listener: listener.into(),
                clients: std::mem::take(&mut r.local_clients)
                    .into_iter()
                    .map(|(fd, uid, login)| super::local_login::Client {
                        stream: fd.into(),
                        uid,
                        login,
                    })
                    .collect(),
            });
        }
    } else {
        broker.stats.broker = crate::wire::BrokerRun {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at: credentials::now_secs(),
            upgraded_at: None,
            upgrades: 0,
        };
    }
    if let Some(path) = local_socket.filter(|_| resumed.is_none()) {
        match super::local_login::bind(&path) {
            Ok((listener, made_dir)) => {
                info!(path = %path.display(), "local log-in socket");
                broker.local = Some(super::local_login::LocalLogins {
                    path: path.clone(),
                    made_dir,
                    listener,
                    clients: Vec::new(),
                });
            }
            // Tokens and passwords still work: a warning, not a failure.
            Err(e) => warn!("no local log-in socket: {e}"),
        }
    }
    Ok(Server {
        opts,
        broker,
        self_exe,
        listener: listener.into(),
        daemon: None,
        restart_at: None,
        restart_failures: 0,
        planned_restart: false,
        daemon_state_dir: daemon_config.state_dir.clone(),
        signals,
        shutdown: None,
        next_user_check: Instant::now(),
        workers: super::workers::Workers {
            dying: resumed
                .as_ref()
                .map(|r| upgrade::dying_of(&r.state))
                .unwrap_or_default(),
            ..Default::default()
        },
        made_files,
        state_lock,
        exe_path: self_path,
        upgrade: None,
    })
}

/// The file in the broker's state directory a live broker holds locked.
const STATE_LOCK_FILE: &str = "broker.lock";

/// An exclusive lock on the broker's state directory (its token, API users, audit log):
/// two brokers sharing one would hand out each other's credentials and race on its files.
/// The kernel lets it go when the broker dies, however it dies.
pub struct StateLock {
    flock: nix::fcntl::Flock<std::fs::File>,
}

impl StateLock {
    /// Its fd, for an upgrade in place to carry (the lock stays held across the exec: it
    /// belongs to the open file, not to the program).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.flock.as_fd()
    }

    /// The lock an upgraded broker inherited: still held (checked), its pid written again.
    pub fn inherited(fd: std::os::fd::OwnedFd) -> Result<StateLock, String> {
        let file = std::fs::File::from(fd);
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(StateLock { flock }),
            Err((_, e)) => Err(format!("the inherited state lock: {e}")),
        }
    }

    /// The pid of the broker holding the lock on `state_dir` (`stoa daemon upgrade`):
    /// `Ok(None)` when no broker holds it.
    pub fn holder(state_dir: &Path) -> Result<Option<i32>, String> {
        let path = state_dir.join(STATE_LOCK_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => Ok(None),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                text.trim().parse().map(Some).map_err(|_| {
                    format!(
                        "{} is locked but names no pid (a broker older than upgrade in place?)",
                        path.display()
                    )
                })
            }
            Err((_, e)) => Err(format!("cannot check {}: {e}", path.display())),
        }
    }

    /// Writes this process's pid into the locked file, for [`StateLock::holder`].
    fn write_pid(&self) -> Result<(), String> {
        use std::io::{Seek, Write};
        let mut f: &std::fs::File = &self.flock;
        f.set_len(0)
            .and_then(|_| f.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| writeln!(f, "{}", std::process::id()))
            .map_err(|e| format!("cannot write the broker's pid into its lock file: {e}"))
    }

    pub fn take(state_dir: &Path) -> Result<StateLock, String> {
        let path = state_dir.join(STATE_LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(flock) => {
                let lock = StateLock { flock };
                lock.write_pid()?;
                Ok(lock)
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(format!(
                "another stoa broker is running with the state directory {} (it holds {}); \
                 stop it first (systemctl stop stoa), or give this one a state_dir of its own \
                 in its policy file",
                state_dir.display(),
                path.display()
            )),
            Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
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
pub fn open_program(path: &Path) -> Result<OwnedFd, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(file.into())
}

pub fn resolve_gids(names: &[String]) -> Vec<u32> {
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
pub fn fit_rlimits(limits: Vec<Rlimit>) -> Vec<Rlimit> {
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
