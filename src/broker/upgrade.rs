//! Upgrade in place: `stoa daemon upgrade` (the unit's `ExecReload`) makes the broker
//! re-exec the binary installed where it was started from, keeping its pid, its children,
//! its subreaper role, its cgroups and every fd it holds. The new broker then replaces the
//! front and each worker, which adopt their handles as on any restart.
//!
//! | step     | where                 | what                                                    |
//! |----------|-----------------------|---------------------------------------------------------|
//! | ask      | `stoa daemon upgrade` | SIGUSR2 to the pid in the state lock file; waits for [`OUTCOME_FILE`] |
//! | quiesce  | the loop              | links and the local socket are no longer polled; what is in flight (children before exec, directory and password checks, signallers) ends within its own deadline, or the upgrade is refused after [`QUIESCE_DEADLINE`] |
//! | check    | the new binary        | a snapshot ([`State`]: handles with pidfds, kept fds and cgroups, log-ins, shares, local log-ins, listener, state lock, counters) in a sealed memfd ([`STATE_MAGIC`], [`STATE_VERSION`], bincode); `stoa __broker-check-state` reads it, the policy and the config as the new broker will, and says `ok`; anything else (or nothing within [`CHECK_DEADLINE`]) and the old broker keeps serving, undisturbed |
//! | retire   | the loop              | the front and the workers are asked to stop (each stores what it read: terminals into their rings, agent runs up to a line end) and not started again; waited for up to [`RETIRE_DEADLINE`] |
//! | commit   | `execveat`            | the final snapshot, checked again; the carried fds lose close-on-exec, the rest (links) close |
//! | resume   | `startup::resume`     | the new broker takes the fds back, starts a new front and the workers of users with work, which adopt |
//!
//! A refusal at the check leaves the old broker undisturbed; a failure after the retire (the
//! second check, or the exec itself: rare) leaves it serving too, with a new front and
//! workers started as after any restart. Either way every fd is close-on-exec again and
//! the outcome says why ([`OUTCOME_FILE`], the log, the audit log).
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use stoa_executor::sys::{self, ChildReport, ChildSpec};

use super::cgroup::SpawnCgroup;
use super::credentials::{Login, LoginKind};
use super::event_loop::Server;
use super::handlers::shares::Grant;
use super::handles::{Entry, HandleTable, Life};
use super::spawn::Account;
use crate::wire::{BrokerStats, ExitStatus, HandleInfo, Purpose, ShareInfo};

/// The first bytes of the state memfd.
pub const STATE_MAGIC: [u8; 8] = *b"STOASTAT";
/// This build's state format. A broker reads its own and the one before it (see
/// [`decode`]), so an upgrade from the previous release works; anything else is refused by
/// the check, before the old broker commits to the exec.
pub const STATE_VERSION: u32 = 1;
/// Far above any real state (a handle is a few hundred bytes), far below memory trouble.
const MAX_STATE_BYTES: usize = 64 << 20;
/// How long what is in flight may take to settle before the upgrade is refused.
pub const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the front and the workers have to stop before the exec goes ahead anyway (one
/// still there then exits when its link closes at the exec).
pub const RETIRE_DEADLINE: Duration = Duration::from_secs(5);
/// How long the new binary has to check the state.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(20);
/// Where each attempt's outcome is written, in the broker's state directory.
pub const OUTCOME_FILE: &str = "upgrade.json";
/// The most of the check's output kept for the error message.
const CHECK_OUTPUT_BYTES: usize = 16 * 1024;

/// Everything the broker carries across its exec. fds are numbers: they stay open (no
/// close-on-exec) and keep their numbers.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct State {
    pub from_version: String,
    /// The path the broker was started from (re-opened for each upgrade).
    pub exe_path: String,
    /// Which `stoa daemon upgrade` this is (for [`OUTCOME_FILE`]).
    pub attempt: u64,
    pub listener: RawFd,
    pub state_lock: RawFd,
    pub next_handle: u64,
    pub handles: Vec<HandleState>,
    pub logins: Vec<LoginState>,
    pub next_login: u64,
    pub shares: Vec<GrantState>,
    pub local: Option<LocalState>,
    /// The old front and workers (and workers already dying): reaped by the new broker.
    pub dying: Vec<DyingState>,
    pub made_files: Vec<String>,
    pub stats: BrokerStats,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct HandleState {
    pub info: HandleInfo,
    pub principal: String,
    pub account: AccountState,
    pub life: LifeState,
    pub pidfd: RawFd,
    pub kept: Vec<RawFd>,
    pub kept_stdin: bool,
    pub purpose: Purpose,
    pub released: bool,
    pub cgroup: Option<CgroupState>,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct AccountState {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    pub groups: Vec<u32>,
}

/// A handle's life; never `Starting`: the upgrade waits until no child is before its exec.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum LifeState {
    Running,
    Exited(ExitStatus),
    Failed,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct CgroupState {
    pub dirs: Vec<String>,
    pub user_pids_max_events: u64,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct LoginState {
    pub digest: [u8; 32],
    pub number: u64,
    pub uid: u32,
    pub unix_user: String,
    pub expires_at: u64,
    /// From the local socket (else a password log-in).
    pub local: bool,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct GrantState {
    pub info: ShareInfo,
    pub owner_uid: u32,
    pub grantee_uid: u32,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct LocalState {
    pub path: String,
    pub made_dir: bool,
    pub listener: RawFd,
    /// (connection, uid, log-in number)
    pub clients: Vec<(RawFd, u32, u64)>,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct DyingState {
    pub pid: i32,
    pub cgroup: Option<CgroupState>,
}

impl State {
    /// Every fd it names, in a fixed order.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener, self.state_lock];
        for h in &self.handles {
            fds.push(h.pidfd);
            fds.extend(&h.kept);
        }
        if let Some(local) = &self.local {
            fds.push(local.listener);
            fds.extend(local.clients.iter().map(|c| c.0));
        }
        fds
    }

    /// What a new broker checks before it takes anything: each fd named once and above
    /// stdio, each handle and pid once, a life a resumed table can hold.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        for fd in self.fds() {
            if fd <= 2 {
                return Err(format!("the state names fd {fd}, a stdio number"));
            }
            if !seen.insert(fd) {
                return Err(format!("the state names fd {fd} twice"));
            }
        }
        let mut handles = HashSet::new();
        let mut pids = HashSet::new();
        for h in &self.handles {
            if h.info.handle.0 == 0 || h.info.handle.0 >= self.next_handle {
                return Err(format!(
                    "handle {} is outside the table (next {})",
                    h.info.handle.0, self.next_handle
                ));
            }
            // An exited handle's pid may be another process's by now: only the unreaped
            // must be unique.
            let unreaped = !matches!(h.life, LifeState::Exited(_));
            if !handles.insert(h.info.handle)
                || (unreaped && !pids.insert(h.info.pid))
                || h.info.pid <= 1
            {
                return Err(format!(
                    "handle {} (pid {}) is named twice or has no pid of its own",
                    h.info.handle.0, h.info.pid
                ));
            }
            if h.account.uid != h.info.uid {
                return Err(format!("handle {} names two uids", h.info.handle.0));
            }
        }
        if self.exe_path.is_empty() || !self.exe_path.starts_with('/') {
            return Err("the state names no absolute program path".into());
        }
        Ok(())
    }
}

/// Header and payload.
pub fn encode(state: &State) -> Result<Vec<u8>, String> {
    let mut out = STATE_MAGIC.to_vec();
    out.extend(STATE_VERSION.to_be_bytes());
    let payload = bincode::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| format!("cannot encode the broker's state: {e}"))?;
    out.extend(payload);
    if out.len() > MAX_STATE_BYTES {
        return Err(format!(
            "the broker's state is {} bytes, over {MAX_STATE_BYTES}",
            out.len()
        ));
    }
    Ok(out)
}

/// Reads a state this build understands: its own [`STATE_VERSION`]. A later version that
/// changes [`State`] keeps the previous layout as a type of its own and converts it here
/// (`STATE_VERSION - 1 => decode that, then into State`), so version N reads N−1's state.
pub fn decode(bytes: &[u8]) -> Result<State, String> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(format!("the state is over {MAX_STATE_BYTES} bytes"));
    }
    let rest = bytes
        .strip_prefix(&STATE_MAGIC)
        .ok_or("not a stoa broker state (wrong magic)")?;
    let (version, payload) = rest
        .split_first_chunk::<4>()
        .ok_or("the state has no version")?;
    let version = u32::from_be_bytes(*version);
    match version {
        STATE_VERSION => {
            let config = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
            let (state, used): (State, usize) = bincode::decode_from_slice(payload, config)
                .map_err(|e| format!("the state (version {version}) does not decode: {e}"))?;
            if used != payload.len() {
                return Err(format!(
                    "the state has {} bytes after its end",
                    payload.len() - used
                ));
            }
            Ok(state)
        }
        other => Err(format!(
            "the running broker's state is version {other}; this build reads version \
             {STATE_VERSION}{}: upgrade through the releases in between, or restart \
             (which ends every user's processes)",
            if STATE_VERSION > 1 {
                format!(" and {}", STATE_VERSION - 1)
            } else {
                String::new()
            }
        )),
    }
}

/// The seals a state memfd must carry: nothing can change it once written.
fn all_seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
}

/// `bytes` in a memfd sealed against every change (close-on-exec until the commit).
pub fn seal(bytes: &[u8]) -> Result<OwnedFd, String> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"stoa-broker-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create: {e}"))?;
    let mut written = 0;
    while written < bytes.len() {
        written += nix::unistd::write(&fd, &bytes[written..])
            .map_err(|e| format!("writing the state memfd: {e}"))?;
    }
    fcntl(&fd, FcntlArg::F_ADD_SEALS(all_seals()))
        .map_err(|e| format!("sealing the state memfd: {e}"))?;
    Ok(fd)
}

/// The contents of a state memfd, refused unless it is sealed against every change (no
/// one can have altered it after the check read it).
pub fn read_sealed(fd: BorrowedFd<'_>) -> Result<Vec<u8>, String> {
    let seals = SealFlag::from_bits_truncate(
        fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| format!("the state fd is no memfd: {e}"))?,
    );
    if !seals.contains(all_seals()) {
        return Err(format!("the state memfd is not sealed ({seals:?})"));
    }
    let size = nix::sys::stat::fstat(fd)
        .map_err(|e| format!("fstat of the state memfd: {e}"))?
        .st_size as usize;
    if size > MAX_STATE_BYTES {
        return Err(format!("the state is over {MAX_STATE_BYTES} bytes"));
    }
    let mut bytes = vec![0u8; size];
    let mut read = 0;
    while read < size {
        let n = nix::sys::uio::pread(fd, &mut bytes[read..], read as i64)
            .map_err(|e| format!("reading the state memfd: {e}"))?;
        if n == 0 {
            return Err("the state memfd ended early".into());
        }
        read += n;
    }
    Ok(bytes)
}

/// The outcome of one `stoa daemon upgrade`, in [`OUTCOME_FILE`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub attempt: u64,
    pub ok: bool,
    pub pid: u32,
    pub from: String,
    pub to: Option<String>,
    /// RFC 3339.
    pub at: String,
    pub error: Option<String>,
}

pub fn read_outcome(state_dir: &Path) -> Option<Outcome> {
    let text = std::fs::read_to_string(state_dir.join(OUTCOME_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_outcome(state_dir: &Path, outcome: &Outcome) {
    let path = state_dir.join(OUTCOME_FILE);
    let tmp = state_dir.join(format!("{OUTCOME_FILE}.tmp"));
    let text = serde_json::to_string(outcome).unwrap_or_default() + "\n";
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
        error!(path = %path.display(), "cannot write the upgrade's outcome: {e}");
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// An upgrade under way: where it is, and until when it may stay there.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub attempt: u64,
    pub phase: Phase,
    pub deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for what is in flight to settle (nothing new is read).
    Quiesce,
    /// The new binary accepted a first snapshot; the front and the workers were asked to
    /// stop (SIGTERM: a worker stores what it read, terminals into their rings, agents' output
    /// up to a line end) and the upgrade waits for them to be gone.
    Retire,
}

/// What is still in flight (the upgrade waits for none of it to be left), or `None`.
fn in_flight(s: &Server) -> Option<String> {
    let b = &s.broker;
    let starting = b
        .handles
        .iter()
        .filter(|(_, e)| matches!(e.life, Life::Starting(_)))
        .count();
    let parts: Vec<String> = [
        (starting, "children before their exec"),
        (b.probes.len(), "directory checks"),
        (b.login_checks.len(), "password checks"),
        (b.signallers.len(), "signallers"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn fd_of(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

fn cgroup_state(cg: &SpawnCgroup) -> CgroupState {
    let (dirs, user_pids_max_events) = cg.parts();
    CgroupState {
        dirs: dirs.iter().map(|d| d.display().to_string()).collect(),
        user_pids_max_events,
    }
}

fn cgroup_back(cg: CgroupState) -> SpawnCgroup {
    SpawnCgroup::from_parts(
        cg.dirs.into_iter().map(PathBuf::from).collect(),
        cg.user_pids_max_events,
    )
}

/// What the exec takes: the checked program, the sealed state, every fd to keep open, and
/// the version the new binary said it is.
struct Prepared {
    attempt: u64,
    exe: OwnedFd,
    memfd: OwnedFd,
    fds: Vec<RawFd>,
    to: String,
}

/// Marks `fds` inheritable (`true`, for the exec) or close-on-exec again.
fn set_inherit(fds: &[RawFd], inherit: bool) -> Result<(), String> {
    for &fd in fds {
        sys::set_fd_cloexec(fd, !inherit)
            .map_err(|e| format!("cannot set the flags of fd {fd}: {e}"))?;
    }
    Ok(())
}

impl Server {
    /// SIGUSR2 (`stoa daemon upgrade`): stop taking new requests and upgrade as soon as
    /// nothing is in flight.
    pub fn request_upgrade(&mut self) {
        if self.upgrade.is_some() {
            info!("upgrade in place: already under way");
            return;
        }
        let attempt = read_outcome(&self.broker.policy.state_dir).map_or(0, |o| o.attempt) + 1;
        if self.shutdown.is_some() {
            self.upgrade_failed(attempt, "the broker is shutting down".into());
            return;
        }
        info!(
            attempt,
            "upgrade in place requested: new requests wait until what is in flight settles"
        );
        self.upgrade = Some(Pending {
            attempt,
            phase: Phase::Quiesce,
            deadline: Instant::now() + QUIESCE_DEADLINE,
        });
    }

    /// Called every turn of the loop: moves the upgrade on as far as it can go now.
    /// Returns only if the broker stays this binary.
    pub fn advance_upgrade(&mut self) {
        let Some(pending) = self.upgrade else {
            return;
        };
        let now = Instant::now();
        if self.shutdown.is_some() {
            self.upgrade = None;
            self.upgrade_failed(pending.attempt, "a shutdown began".into());
            return;
        }
        match pending.phase {
            Phase::Quiesce => {
                if let Some(busy) = in_flight(self) {
                    if now >= pending.deadline {
                        self.upgrade = None;
                        self.upgrade_failed(
                            pending.attempt,
                            format!(
                                "still in flight after {QUIESCE_DEADLINE:?}: {busy}; try again"
                            ),
                        );
                    }
                    return;
                }
                // A first check, before anything is disturbed: a binary that refuses the
                // state costs nobody a reconnect.
                if let Err(e) = self.prepare_exec(pending.attempt) {
                    self.upgrade = None;
                    self.upgrade_failed(pending.attempt, e);
                    return;
                }
                self.retire_children();
                self.upgrade = Some(Pending {
                    phase: Phase::Retire,
                    deadline: now + RETIRE_DEADLINE,
                    ..pending
                });
            }
            Phase::Retire => {
                let left = self.workers.by_link.len()
                    + self.workers.dying.len()
                    + usize::from(self.daemon.is_some());
                if left > 0 && now < pending.deadline {
                    return;
                }
                if left > 0 {
                    info!(
                        processes = left,
                        "upgrade in place: not every front or worker stopped in time; their links close at the exec"
                    );
                }
                self.upgrade = None;
                let err = match self.prepare_exec(pending.attempt) {
                    Ok(prepared) => self.exec(prepared),
                    Err(e) => e,
                };
                // The front and the workers start again as after any restart.
                self.upgrade_failed(pending.attempt, err);
            }
        }
    }

    /// The front and the workers are asked to stop; they are not started again while the
    /// upgrade is under way (the new broker starts them).
    fn retire_children(&mut self) {
        if let Some(d) = &self.daemon {
            self.planned_restart = true;
            let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGTERM);
        }
        let links: Vec<u64> = self.workers.by_link.keys().copied().collect();
        for link in links {
            if let Some(p) = self.broker.peers.get_mut(&link) {
                p.retiring = true;
            }
        }
        self.signal_workers(NixSignal::SIGTERM);
        info!(
            workers = self.workers.by_link.len(),
            "upgrade in place: the new binary accepted the state; the front and the workers are stopping"
        );
    }

    /// Whether the loop may start a front or a worker now.
    pub fn may_start_children(&self) -> bool {
        self.upgrade.is_none()
    }

    fn upgrade_failed(&mut self, attempt: u64, error: String) {
        error!(
            attempt,
            "upgrade in place refused; this broker keeps serving: {error}"
        );
        self.broker.audit.record(
            "broker_upgrade_failed",
            serde_json::json!({ "attempt": attempt, "error": error }),
        );
        write_outcome(
            &self.broker.policy.state_dir,
            &Outcome {
                attempt,
                ok: false,
                pid: std::process::id(),
                from: env!("CARGO_PKG_VERSION").into(),
                to: None,
                at: now_rfc3339(),
                error: Some(error),
            },
        );
    }

    /// Snapshot, seal, and the new binary's check: what the exec needs.
    fn prepare_exec(&self, attempt: u64) -> Result<Prepared, String> {
        // Nothing new starts during an upgrade; a snapshot never leaves out a child before
        // its exec.
        if let Some(busy) = in_flight(self) {
            return Err(format!("in flight: {busy}"));
        }
        let euid = nix::unistd::geteuid().as_raw();
        let exe_path = self.exe_path.clone();
        super::policy::check_trusted_path(&exe_path, euid)
            .map_err(|e| format!("refusing the new binary {}: {e}", exe_path.display()))?;
        let exe = super::startup::open_program(&exe_path)?;
        let state = self.snapshot(attempt);
        state.validate()?;
        let memfd = seal(&encode(&state)?)?;
        let to = check_new_binary(&exe, &exe_path, &memfd, &self.opts)?;
        let mut fds = state.fds();
        fds.push(fd_of(&memfd));
        Ok(Prepared {
            attempt,
            exe,
            memfd,
            fds,
            to,
        })
    }

    /// The exec. Returns only on failure, with why (nothing is lost then).
    fn exec(&mut self, p: Prepared) -> String {
        let exe_path = self.exe_path.clone();
        let handles = self.broker.handles.len();
        info!(from = env!("CARGO_PKG_VERSION"), to = %p.to, handles, path = %exe_path.display(), "upgrade in place: the new binary checked the state; exec");
        self.broker.audit.record(
            "broker_upgrade",
            serde_json::json!({
                "attempt": p.attempt, "from": env!("CARGO_PKG_VERSION"), "to": p.to,
                "path": exe_path.display().to_string(), "handles": handles,
            }),
        );
        if let Err(e) = set_inherit(&p.fds, true) {
            let _ = set_inherit(&p.fds, false);
            return e;
        }
        let argv: Vec<CString> = [
            exe_path.as_os_str().to_os_string(),
            "serve".into(),
            "--broker-config".into(),
            self.opts.broker_config.clone().into_os_string(),
            "--config".into(),
            self.opts.config.clone().into_os_string(),
            "--resume-state-fd".into(),
            fd_of(&p.memfd).to_string().into(),
        ]
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
        let env: Vec<CString> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let err = sys::reexec(p.exe.as_fd(), &argv, &env);
        // Still here: the exec failed; nothing was lost.
        let _ = set_inherit(&p.fds, false);
        format!("exec of {} failed: {err}", exe_path.display())
    }

    /// The state to carry, naming the fds this server holds.
    fn snapshot(&self, attempt: u64) -> State {
        let b = &self.broker;
        let handles = b
            .handles
            .iter()
            .filter_map(|(_, e)| {
                let life = match &e.life {
                    Life::Starting(_) => return None, // none: the upgrade waited for them
                    Life::Running => LifeState::Running,
                    Life::Exited(s) => LifeState::Exited(*s),
                    Life::Failed => LifeState::Failed,
                };
                Some(HandleState {
                    info: e.info.clone(),
                    principal: e.principal.clone(),
                    account: AccountState {
                        name: e.account.name.clone(),
                        uid: e.account.uid,
                        gid: e.account.gid,
                        home: e.account.home.display().to_string(),
                        shell: e.account.shell.display().to_string(),
                        groups: e.account.groups.clone(),
                    },
                    life,
                    pidfd: fd_of(&e.pidfd),
                    kept: e.kept.iter().map(fd_of).collect(),
                    kept_stdin: e.kept_stdin,
                    purpose: e.purpose,
                    released: e.released,
                    cgroup: e.cgroup.as_ref().map(cgroup_state),
                })
            })
            .collect();
        let (logins, next_login) = b.credentials.logins.carried();
        let logins = logins
            .into_iter()
            .map(|(digest, l)| LoginState {
                digest,
                number: l.number,
                uid: l.uid,
                unix_user: l.unix_user,
                expires_at: l.expires_at,
                local: l.kind == LoginKind::Local,
            })
            .collect();
        let mut dying: Vec<DyingState> = self
            .workers
            .by_link
            .values()
            .map(|w| (w.pid, w.cgroup.as_ref()))
            .chain(self.workers.dying.iter().map(|(p, c)| (*p, c.as_ref())))
            .map(|(pid, cg)| DyingState {
                pid,
                cgroup: cg.map(cgroup_state),
            })
            .collect();
        if let Some(d) = &self.daemon {
            dying.push(DyingState {
                pid: d.pid,
                cgroup: None,
            });
        }
        State {
            from_version: env!("CARGO_PKG_VERSION").into(),
            exe_path: self.exe_path.display().to_string(),
            attempt,
            listener: fd_of(&self.listener),
            state_lock: self.state_lock.fd().as_raw_fd(),
            next_handle: b.handles.peek_next(),
            handles,
            logins,
            next_login,
            shares: b
                .shares
                .iter()
                .map(|g| GrantState {
                    info: g.info.clone(),
                    owner_uid: g.owner_uid,
                    grantee_uid: g.grantee_uid,
                })
                .collect(),
            local: b.local.as_ref().map(|l| LocalState {
                path: l.path.display().to_string(),
                made_dir: l.made_dir,
                listener: fd_of(&l.listener),
                clients: l
                    .clients
                    .iter()
                    .map(|c| (fd_of(&c.stream), c.uid, c.login))
                    .collect(),
            }),
            dying,
            made_files: self
                .made_files
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            stats: b.stats.clone(),
        }
    }
}

/// The check's output (at most [`CHECK_OUTPUT_BYTES`]), its exec report and its exit, within
/// [`CHECK_DEADLINE`]. On `Err` the caller kills and reaps it.
fn follow_check(
    started: &sys::Started,
    out_r: &OwnedFd,
) -> Result<(Vec<u8>, Option<ChildReport>, nix::sys::wait::WaitStatus), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + CHECK_DEADLINE;
    let pid = Pid::from_raw(started.pid);
    let late = || format!("the new binary did not finish its check within {CHECK_DEADLINE:?}");
    let mut output = Vec::new();
    let mut report = None;
    let (mut out_open, mut report_open) = (true, true);
    while out_open || report_open {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        let mut fds = Vec::new();
        if out_open {
            fds.push(PollFd::new(out_r.as_fd(), PollFlags::POLLIN));
        }
        if report_open {
            fds.push(PollFd::new(started.report.as_fd(), PollFlags::POLLIN));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| !f.revents().unwrap_or(PollFlags::empty()).is_empty())
            .collect();
        let mut i = 0;
        if out_open {
            if ready[i] {
                let mut buf = [0u8; 4096];
                match nix::unistd::read(out_r, &mut buf) {
                    Ok(0) => out_open = false,
                    Ok(n) if output.len() < CHECK_OUTPUT_BYTES => output.extend(&buf[..n]),
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(_) => out_open = false,
                }
            }
            i += 1;
        }
        if report_open && ready[i] {
            match sys::read_report(started.report.as_fd()) {
                Ok(Some(r)) => {
                    report = Some(r);
                    report_open = false;
                }
                Ok(None) => {}
                Err(_) => report_open = false,
            }
        }
    }
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(WaitStatus::StillAlive) => return Err(late()),
            Ok(status) => return Ok((output, report, status)),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("waiting for the check: {e}")),
        }
    }
}

/// Runs the new binary's `__broker-check-state` on the sealed state: its version on
/// success, else why (its own words, or how it failed to start).
fn check_new_binary(
    exe: &OwnedFd,
    exe_path: &Path,
    memfd: &OwnedFd,
    opts: &super::ServeOptions,
) -> Result<String, String> {
    let (out_r, out_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let cstr = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != "NOTIFY_SOCKET") // the check is not the service
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend(v.as_bytes());
            CString::new(kv).unwrap_or_default()
        })
        .collect();
    let argv = vec![
        cstr(exe_path.as_os_str()),
        c"__broker-check-state".into(),
        c"--broker-config".into(),
        cstr(opts.broker_config.as_os_str()),
        c"--config".into(),
        cstr(opts.config.as_os_str()),
    ];
    let stdio = [null.as_fd(), out_w.as_fd(), out_w.as_fd()];
    let spec = ChildSpec::root_helper(exe.as_fd(), argv, env, stdio, vec![memfd.as_fd()]);
    let started = sys::start_child(&spec).map_err(|e| format!("cannot start the check: {e}"))?;
    drop(out_w);
    let (output, report, status) = match follow_check(&started, &out_r) {
        Ok(ended) => ended,
        Err(e) => {
            // However it went wrong, the check leaves no process behind (its pidfd: never
            // another process that took the pid).
            let _ = sys::pidfd_send_signal(started.pidfd.as_fd(), libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(started.pid), None);
            return Err(e);
        }
    };
    if let Some(ChildReport::Failed { stage, errno }) = report {
        // execveat of an fd: a `#!` script's interpreter cannot open it (ENOENT).
        let hint = if errno == libc::ENOENT {
            " (a script cannot be run from the broker's fd: it must be stoa's binary)"
        } else {
            ""
        };
        return Err(format!(
            "the new binary {} cannot be started ({stage:?}: {}){hint}",
            exe_path.display(),
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    let text = String::from_utf8_lossy(&output);
    let verdict = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match (status, verdict.strip_prefix("ok ")) {
        (nix::sys::wait::WaitStatus::Exited(_, 0), Some(version)) => Ok(version.trim().into()),
        _ => {
            let how = match status {
                nix::sys::wait::WaitStatus::Exited(_, code) => format!("it exited with {code}"),
                nix::sys::wait::WaitStatus::Signaled(_, sig, _) => {
                    format!("it was killed by {sig}")
                }
                other => format!("{other:?}"),
            };
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let said = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
            Err(format!(
                "the new binary {} did not accept the state ({how}){}",
                exe_path.display(),
                if said.trim().is_empty() {
                    ", and said nothing".to_string()
                } else {
                    format!(": {said}")
                }
            ))
        }
    }
}

/// `stoa __broker-check-state`: as the new broker would, reads the state on fd 3, the
/// policy and the config; prints `ok <version>` and what it would take over.
pub fn check_state_main(broker_config: &Path, config: &Path) -> Result<String, String> {
    let fd = sys::inherited_fd(3).map_err(|e| format!("no state on fd 3: {e}"))?;
    let state = decode(&read_sealed(fd.as_fd())?)?;
    state.validate()?;
    let euid = nix::unistd::geteuid().as_raw();
    let (policy, _) = super::policy::Policy::load(broker_config, euid)?;
    crate::config::DaemonConfig::load(config)?;
    if euid == 0 {
        Account::lookup(&policy.service_user)?.ok_or_else(|| {
            format!(
                "the service user {} is gone (an upgrade does not create it)",
                policy.service_user
            )
        })?;
    }
    let executor = policy
        .executor_path
        .clone()
        .unwrap_or_else(super::policy::default_executor_path);
    super::policy::check_trusted_path(&executor, euid)
        .map_err(|e| format!("refusing executor {}: {e}", executor.display()))?;
    Ok(format!(
        "from {} ({} handles, {} log-ins, {} shares)\nok {}",
        state.from_version,
        state.handles.len(),
        state.logins.len(),
        state.shares.len(),
        env!("CARGO_PKG_VERSION")
    ))
}

/// What `startup::resume` takes from a state: the fds owned again, the tables rebuilt.
pub struct Resumed {
    pub state: State,
    pub listener: OwnedFd,
    pub state_lock: OwnedFd,
    pub local_listener: Option<OwnedFd>,
    pub local_clients: Vec<(OwnedFd, u32, u64)>,
    pub handles: HandleTable,
}

/// Reads the state on `fd` and takes every fd it names (once each; close-on-exec again).
pub fn take_state(fd: RawFd) -> Result<Resumed, String> {
    let memfd = sys::inherited_fd(fd).map_err(|e| format!("the state fd {fd}: {e}"))?;
    let state = decode(&read_sealed(memfd.as_fd())?)?;
    drop(memfd);
    state.validate()?;
    set_inherit(&state.fds(), false)?;
    let take = |fd: RawFd| sys::inherited_fd(fd).map_err(|e| format!("inherited fd {fd}: {e}"));
    let listener = take(state.listener)?;
    let state_lock = take(state.state_lock)?;
    let mut local_listener = None;
    let mut local_clients = Vec::new();
    if let Some(local) = &state.local {
        local_listener = Some(take(local.listener)?);
        for &(fd, uid, login) in &local.clients {
            local_clients.push((take(fd)?, uid, login));
        }
    }
    let mut handles = HandleTable::new();
    for h in &state.handles {
        let life = match &h.life {
            LifeState::Running => Life::Running,
            LifeState::Exited(s) => Life::Exited(*s),
            LifeState::Failed => Life::Failed,
        };
        handles.insert(Entry {
            info: h.info.clone(),
            principal: h.principal.clone(),
            account: Account {
                name: h.account.name.clone(),
                uid: h.account.uid,
                gid: h.account.gid,
                home: PathBuf::from(&h.account.home),
                shell: PathBuf::from(&h.account.shell),
                groups: h.account.groups.clone(),
            },
            life,
            pidfd: take(h.pidfd)?,
            kept: h.kept.iter().map(|&f| take(f)).collect::<Result<_, _>>()?,
            kept_stdin: h.kept_stdin,
            purpose: h.purpose,
            released: h.released,
            cgroup: h.cgroup.clone().map(cgroup_back),
        });
    }
    // An exited handle is not looked up by pid again (its pid may be reused), as in
    // `handlers::handles::on_reaped`.
    for h in &state.handles {
        if matches!(h.life, LifeState::Exited(_)) {
            handles.forget_pid(h.info.pid);
        }
    }
    handles.set_next(state.next_handle);
    Ok(Resumed {
        state,
        listener,
        state_lock,
        local_listener,
        local_clients,
        handles,
    })
}

/// The log-ins a state carries, as the credentials keep them.
pub fn logins_of(state: &State) -> Vec<([u8; 32], Login)> {
    state
        .logins
        .iter()
        .map(|l| {
            (
                l.digest,
                Login {
                    number: l.number,
                    uid: l.uid,
                    unix_user: l.unix_user.clone(),
                    expires_at: l.expires_at,
                    kind: if l.local {
                        LoginKind::Local
                    } else {
                        LoginKind::Password
                    },
                },
            )
        })
        .collect()
}

pub fn grants_of(state: &State) -> Vec<Grant> {
    state
        .shares
        .iter()
        .map(|g| Grant {
            info: g.info.clone(),
            owner_uid: g.owner_uid,
            grantee_uid: g.grantee_uid,
        })
        .collect()
}

pub fn dying_of(state: &State) -> Vec<(i32, Option<SpawnCgroup>)> {
    state
        .dying
        .iter()
        .map(|d| (d.pid, d.cgroup.clone().map(cgroup_back)))
        .collect()
}

impl Server {
    /// The first steps of a resumed broker: what is left of the old front and workers is killed, the
    /// workers of users with work are started at once, the outcome is written.
    pub fn resumed(&mut self, state: &State) {
        // They were asked to stop before the exec (and their links are closed): what is
        // left is killed, as a worker that goes is (`workers::worker_gone`); still
        // unreaped, so the pid is theirs.
        for d in &state.dying {
            let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGKILL);
        }
        let mut users: Vec<Account> = Vec::new();
        for (_, e) in self.broker.handles.iter() {
            if !e.released && !users.iter().any(|a| a.uid == e.account.uid) {
                users.push(e.account.clone());
            }
        }
        let now = Instant::now();
        for account in users {
            self.workers
                .restarts
                .insert(account.uid, super::workers::Restart { at: now, account });
        }
        let run = &mut self.broker.stats.broker;
        run.upgrades += 1;
        run.upgraded_at = Some(crate::broker::credentials::now_secs());
        run.version = env!("CARGO_PKG_VERSION").into();
        let (from, upgrades) = (state.from_version.clone(), run.upgrades);
        info!(
            from = %from,
            to = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            handles = self.broker.handles.len(),
            upgrades,
            "upgraded in place: same pid, new binary; replacing the front and the workers"
        );
        self.broker.audit.record(
            "broker_upgraded",
            serde_json::json!({
                "attempt": state.attempt, "from": from, "to": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(), "handles": self.broker.handles.len(),
            }),
        );
        self.broker.notifier.notify(&format!(
            "STATUS=upgraded in place to {}",
            env!("CARGO_PKG_VERSION")
        ));
        write_outcome(
            &self.broker.policy.state_dir,
            &Outcome {
                attempt: state.attempt,
                ok: true,
                pid: std::process::id(),
                from,
                to: Some(env!("CARGO_PKG_VERSION").into()),
                at: now_rfc3339(),
                error: None,
            },
        );
    }
}

/// `stoa daemon upgrade`: asks the broker whose state directory the policy names to
/// upgrade in place, and waits for its outcome. `Err((code, why))`: 1 when the broker
/// stayed on its binary, 2 when it could not be asked or did not answer.
pub fn ask(broker_config: &Path, timeout: Duration) -> Result<Outcome, (u8, String)> {
    let euid = nix::unistd::geteuid().as_raw();
    let (policy, _) = super::policy::Policy::load(broker_config, euid).map_err(|e| (2, e))?;
    let dir = &policy.state_dir;
    let pid = super::startup::StateLock::holder(dir)
        .map_err(|e| (2, e))?
        .ok_or_else(|| {
            (
                2,
                format!(
                    "no broker is running with the state directory {} (nothing to upgrade; \
                     start it: systemctl start stoa)",
                    dir.display()
                ),
            )
        })?;
    // A broker from before upgrade in place would die of SIGUSR2 (its default action):
    // only one that blocks it (its signalfd takes it) is asked.
    if !blocks_sigusr2(pid) {
        return Err((
            2,
            format!(
                "the running broker (pid {pid}) cannot upgrade in place (it predates it, or \
                 does not say so in /proc/{pid}/status); restart it once to run the new \
                 version: systemctl restart stoa (this ends every user's processes)"
            ),
        ));
    }
    let before = read_outcome(dir).map_or(0, |o| o.attempt);
    kill(Pid::from_raw(pid), NixSignal::SIGUSR2)
        .map_err(|e| (2, format!("cannot signal the broker (pid {pid}): {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(o) = read_outcome(dir).filter(|o| o.attempt > before) {
            return if o.ok {
                Ok(o)
            } else {
                let why = o.error.clone().unwrap_or_default();
                Err((1, format!("the broker (pid {pid}) was not upgraded and keeps serving version {}: {why}", o.from)))
            };
        }
        if Instant::now() >= deadline {
            return Err((
                2,
                format!(
                    "the broker (pid {pid}) gave no outcome within {timeout:?}; see its log \
                     (journalctl -u stoa)"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` blocks SIGUSR2 (`SigBlk` in `/proc/PID/status`): a broker that upgrades
/// in place takes it through its signalfd.
fn blocks_sigusr2(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    sigusr2_in_mask(&status)
}

/// `SigBlk` of a `/proc/PID/status` text has SIGUSR2 (signal 12: bit 11).
fn sigusr2_in_mask(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR2 - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            from_version: "0.1.0".into(),
            exe_path: "/usr/bin/stoa".into(),
            attempt: 1,
            listener: 5,
            state_lock: 6,
            next_handle: 3,
            handles: vec![],
            logins: vec![],
            next_login: 0,
            shares: vec![],
            local: Some(LocalState {
                path: "/run/stoa/local.sock".into(),
                made_dir: false,
                listener: 7,
                clients: vec![(8, 1001, 4)],
            }),
            dying: vec![],
            made_files: vec![],
            stats: BrokerStats::default(),
        }
    }

    /// A state with every kind of entry, as a running broker of this version writes it.
    fn full_state() -> State {
        use crate::wire::{Confinement, FdLayout, Handle, LimitHit, Program};
        let mut s = state();
        s.handles = vec![HandleState {
            info: HandleInfo {
                handle: Handle(2),
                pid: 4242,
                unix_user: "alice".into(),
                uid: 1001,
                program: Program::Exec {
                    argv: vec!["claude".into(), "-p".into()],
                },
                fds: FdLayout::Pipes { stdin: true },
                exited: Some(ExitStatus::Signal(9)),
                limit_hit: Some(LimitHit::Pids { max: 64 }),
                started_at: 1_790_000_000,
                confinement: Confinement::Landlock { abi: 6 },
            },
            principal: "unix:1001".into(),
            account: AccountState {
                name: "alice".into(),
                uid: 1001,
                gid: 1001,
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
                groups: vec![1001, 27],
            },
            life: LifeState::Exited(ExitStatus::Code(3)),
            pidfd: 10,
            kept: vec![11, 12],
            kept_stdin: true,
            purpose: Purpose::Agent,
            released: false,
            cgroup: Some(CgroupState {
                dirs: vec!["/sys/fs/cgroup/stoa.1.2/user-1001/h2".into()],
                user_pids_max_events: 7,
            }),
        }];
        s.logins = vec![LoginState {
            digest: [7; 32],
            number: 5,
            uid: 1001,
            unix_user: "alice".into(),
            expires_at: 1_790_086_400,
            local: true,
        }];
        s.next_login = 5;
        s.shares = vec![GrantState {
            info: ShareInfo {
                object: "u1001-t1".into(),
                owner: "unix:1001".into(),
                grantee: "unix:1002".into(),
                input: false,
                expires_at: None,
                granted_at: 1_790_000_001,
            },
            owner_uid: 1001,
            grantee_uid: 1002,
        }];
        s.dying = vec![DyingState {
            pid: 4000,
            cgroup: None,
        }];
        s.made_files = vec!["/run/stoa/gemini-settings.json".into()];
        s.stats.broker.upgrades = 2;
        s
    }

    /// The state this version writes, kept as bytes in the repository: a change to
    /// [`State`] that would stop a new broker from reading what the running (old) one hands
    /// it fails here. Then bump [`STATE_VERSION`], keep the old layout as a type of its own
    /// that [`decode`] converts, and add the new version's file beside this one.
    /// (`STOA_WRITE_STATE_FIXTURE=1` writes the file for a new version.)
    #[test]
    fn the_state_a_running_broker_of_this_version_hands_on_still_decodes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/broker-state-v{STATE_VERSION}.bin"));
        let bytes = encode(&full_state()).unwrap();
        if std::env::var_os("STOA_WRITE_STATE_FIXTURE").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let kept = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(decode(&kept).unwrap(), full_state());
        assert_eq!(
            kept, bytes,
            "the encoding of version {STATE_VERSION} changed"
        );
    }

    #[test]
    fn only_a_broker_that_blocks_sigusr2_is_asked() {
        let status = |blk: &str| format!("Name:\tstoa\nSigPnd:\t0\nSigBlk:\t{blk}\nSigIgn:\t0\n");
        // SIGCHLD, SIGTERM, SIGINT, SIGHUP and SIGUSR2, as the broker blocks them.
        assert!(sigusr2_in_mask(&status("0000000000014803")));
        // The same without SIGUSR2: a broker from before upgrade in place.
        assert!(!sigusr2_in_mask(&status("0000000000014003")));
        assert!(!sigusr2_in_mask("Name:\tstoa\n"));
        // This test process blocks nothing of the kind.
        assert!(!blocks_sigusr2(std::process::id() as i32));
    }

    #[test]
    fn a_state_round_trips_through_a_sealed_memfd() {
        let s = state();
        let fd = seal(&encode(&s).unwrap()).unwrap();
        assert_eq!(decode(&read_sealed(fd.as_fd()).unwrap()).unwrap(), s);
        // Sealed: it cannot be written again.
        assert!(nix::sys::uio::pwrite(&fd, b"X", 0).is_err());
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::write(&fd, &encode(&state()).unwrap()).unwrap();
        let e = read_sealed(fd.as_fd()).unwrap_err();
        assert!(e.contains("not sealed"), "{e}");
    }

    #[test]
    fn another_version_magic_or_trailing_bytes_are_refused_with_why() {
        let mut bytes = encode(&state()).unwrap();
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&(STATE_VERSION + 1).to_be_bytes());
        let e = decode(&other).unwrap_err();
        assert!(e.contains(&format!("version {}", STATE_VERSION + 1)), "{e}");
        assert!(e.contains("restart"), "{e}");
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(decode(&magic).unwrap_err().contains("magic"));
        bytes.push(0);
        assert!(decode(&bytes).unwrap_err().contains("after its end"));
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn a_state_naming_an_fd_twice_or_a_stdio_fd_is_refused() {
        let mut s = state();
        s.validate().unwrap();
        s.local.as_mut().unwrap().clients.push((5, 1002, 9));
        assert!(s.validate().unwrap_err().contains("fd 5 twice"));
        let mut s = state();
        s.listener = 1;
        assert!(s.validate().unwrap_err().contains("stdio"));
        let mut s = state();
        s.exe_path = "stoa".into();
        assert!(s.validate().is_err());
    }
}
