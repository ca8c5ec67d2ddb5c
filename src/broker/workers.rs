//! The per-user workers: `stoa __worker`, re-exec'd from the broker's own binary as one
//! Unix user (the executor's hardening: the user's ids, no capabilities, `no_new_privs`,
//! in the user's cgroup so its memory counts against that user's limits), holding that
//! user's terminals, tasks and store. A worker is started when the front opens a
//! connection for its user (with that user's credential) and restarted when it dies while
//! its user has live work; it retires by itself when idle (`Retire`). Each worker's link is
//! bound to its uid (`table.rs`).
//!
//! fd 3 is a worker's link, fd 4 a pipe with the daemon config's text (the worker may not
//! be able to read `/etc/stoa/config.toml`). Its store lives in `<workers_dir>/<uid>/`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal as NixSignal};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use stoa_executor::codec;
use stoa_executor::sys::{self, ChildSpec};

use super::cgroup::SpawnCgroup;
use super::event_loop::Server;
use super::link::{Link, LinkError, PARTIAL_FRAME_TIMEOUT};
use super::spawn::Account;
use super::{table, LinkState, Mode, Outgoing, PeerKind};
use crate::wire::{BrokerMessage, Event, ExitStatus, Request};

/// How long a new worker has to say `Hello`.
pub const WORKER_HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long a worker whose `Retire` was granted has to exit (its user may stop it).
pub const RETIRE_DEADLINE: Duration = Duration::from_secs(10);
/// A worker that ran this long resets its restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// Connections that may wait for a worker's Hello, or be queued for a worker that does not
/// read its link; more are dropped (the front answers 502, the client may retry).
const MAX_PENDING: usize = 256;
/// The config text a worker gets must fit in a pipe's buffer (never a blocking write).
const MAX_CONFIG_BYTES: usize = 60 * 1024;

/// A connection waiting for its worker's Hello: who, the credential's digest, the socket.
/// A connection waiting for its worker (`Connect` without its user and start).
pub type Pending = super::Connect;

pub struct WorkerProc {
    pub pid: i32,
    pub link: Link,
    pub account: Account,
    pub started: Instant,
    /// Connections that came before its Hello.
    pub pending: Vec<Pending>,
    pub cgroup: Option<SpawnCgroup>,
    /// When the loop first saw its `Retire` granted.
    pub retiring_since: Option<Instant>,
}

/// A worker to start again (its user has live work).
pub struct Restart {
    pub at: Instant,
    pub account: Account,
}

/// Workers, by link number; workers killed and not yet reaped; restarts due.
#[derive(Default)]
pub struct Workers {
    pub by_link: HashMap<u64, WorkerProc>,
    pub dying: Vec<(i32, Option<SpawnCgroup>)>,
    pub restarts: HashMap<u32, Restart>,
    /// Failures in a row, per uid (reset by a healthy run).
    pub failures: HashMap<u32, u32>,
}

impl Server {
    /// Starts `account`'s worker. `None`: it could not be started (logged).
    pub fn start_worker(&mut self, account: &Account) -> Option<u64> {
        self.workers.restarts.remove(&account.uid);
        let link_no = self.broker.last_link + 1;
        let mut cgroup = None;
        let result = (|| -> Result<(i32, Link), String> {
            let state_dir = user_dir(&self.broker.policy.workers_dir, account)?;
            let config = std::fs::read_to_string(&self.opts.config).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(String::new())
                } else {
                    Err(format!("cannot read {}: {e}", self.opts.config.display()))
                }
            })?;
            let config_pipe = config_pipe(&config)?;
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let join = match self
                .broker
                .os
                .cgroup_prepare(account.uid, &format!("worker-{link_no}"))?
            {
                Some((cg, fds)) => {
                    cgroup = Some(cg);
                    fds
                }
                None => Default::default(),
            };
            let (argv, env) = worker_command(&state_dir, account);
            let identity = match &self.broker.mode {
                Mode::Isolated { .. } => Some(account.identity()),
                Mode::SingleUser { .. } => None,
            };
            let spec = ChildSpec {
                exe: self.self_exe.as_fd(),
                argv,
                env,
                stdio: None,
                extra_fds: vec![theirs.as_fd(), config_pipe.as_fd()],
                controlling_tty: false,
                identity,
                rlimits: super::supervise::service_rlimits(),
                umask: 0o077,
                cwd: Some(c"/".into()),
                cwd_id: None,
                parent_death_signal: Some(libc::SIGTERM),
                cgroup_procs: join.procs.iter().map(|f| f.as_fd()).collect(),
                cgroup_dir: join.dir.as_ref().map(|f| f.as_fd()),
                confine: None,
            };
            // Not waited for, like the front: a failure before exec shows as its exit, and
            // silence as the Hello deadline. It runs as the user, who may stop it.
            let pid = sys::start_child(&spec).map_err(|e| e.to_string())?.pid;
            let link = Link::new(ours).map_err(|e| e.to_string())?;
            Ok((pid, link))
        })();
        match result {
            Ok((pid, link)) => {
                let id = self.broker.add_link(PeerKind::Worker {
                    uid: account.uid,
                    name: account.name.clone(),
                });
                debug_assert_eq!(id, link_no);
                info!(pid, user = %account.name, "worker started");
                self.broker.audit.record(
                    "worker_start",
                    serde_json::json!({ "pid": pid, "unix_user": account.name, "uid": account.uid }),
                );
                self.workers.by_link.insert(
                    id,
                    WorkerProc {
                        pid,
                        link,
                        account: account.clone(),
                        started: Instant::now(),
                        pending: Vec::new(),
                        cgroup,
                        retiring_since: None,
                    },
                );
                Some(id)
            }
            Err(e) => {
                error!(user = %account.name, "cannot start the worker: {e}");
                if let Some(cg) = cgroup {
                    self.broker.os.cgroup_finish(cg);
                }
                None
            }
        }
    }

    /// Hands the connections the front opened to their workers (starting them as needed).
    pub fn deliver_connects(&mut self) {
        for c in std::mem::take(&mut self.broker.connects) {
            // A worker that keeps dying is started again only when its backoff is over.
            let backing_off = self
                .workers
                .restarts
                .get(&c.account.uid)
                .is_some_and(|r| r.at > Instant::now());
            let link = match self.broker.worker_link(c.account.uid) {
                Some(l) => Some(l),
                None if self.broker.shutting_down || backing_off || !c.start => None,
                None => self.start_worker(&c.account),
            };
            // Dropping the fd closes the connection: the front sees it end at once.
            let Some(link) = link else { continue };
            let ready = self
                .broker
                .peers
                .get(&link)
                .is_some_and(|p| p.state == LinkState::Ready);
            let queued = self
                .workers
                .by_link
                .get(&link)
                .map_or(0, |w| w.link.queued_fds());
            if ready && queued < MAX_PENDING {
                self.broker.outbox.push(connection_event(link, c));
            } else if let Some(w) = self.workers.by_link.get_mut(&link) {
                if w.pending.len() < MAX_PENDING {
                    w.pending.push(c);
                }
            }
        }
    }

    /// Reads what a worker sent and answers it through the request table.
    pub fn read_worker(&mut self, link: u64) {
        let Some(w) = self.workers.by_link.get_mut(&link) else {
            return;
        };
        let payloads = match w.link.read_payloads() {
            Ok(p) => p,
            Err(e) => return self.worker_link_failed(link, e),
        };
        for payload in payloads {
            self.broker.stats.frames_received += 1;
            let request: Request = match codec::decode(&payload) {
                Ok(r) => r,
                Err(e) => {
                    return self.worker_link_failed(link, LinkError::Violation(e.to_string()))
                }
            };
            if let Err(what) = self.dispatch_on(link, request) {
                return self.worker_link_failed(link, LinkError::Violation(what));
            }
            // Connections that waited for its Hello go out right behind the Welcome.
            let ready = self
                .broker
                .peers
                .get(&link)
                .is_some_and(|p| p.state == LinkState::Ready);
            if ready {
                if let Some(w) = self.workers.by_link.get_mut(&link) {
                    for pending in std::mem::take(&mut w.pending) {
                        self.broker.outbox.push(connection_event(link, pending));
                    }
                }
            }
            self.flush_outbox();
            if !self.workers.by_link.contains_key(&link) {
                return;
            }
        }
    }

    pub fn worker_link_failed(&mut self, link: u64, e: LinkError) {
        match e {
            LinkError::Closed => self.worker_gone(link, "it closed the link", None),
            LinkError::Io(e) => self.worker_gone(link, &format!("link error: {e}"), None),
            LinkError::Violation(what) => {
                self.broker.stats.protocol_violations += 1;
                let (pid, user) = self
                    .workers
                    .by_link
                    .get(&link)
                    .map(|w| (w.pid, w.account.name.clone()))
                    .unwrap_or_default();
                error!(violation = %what, %user, "PROTOCOL VIOLATION by a worker; dropping its link and restarting it");
                self.broker.audit.record(
                    "violation",
                    serde_json::json!({ "what": table::clip(&what, 512), "worker_pid": pid, "unix_user": user }),
                );
                self.worker_gone(link, "protocol violation", None);
            }
        }
    }

    /// A worker is finished: its link is dropped, it is killed unless reaped (and reaped
    /// later: it runs as its user, who could keep it from dying at once), and started again
    /// if its user has live work.
    pub fn worker_gone(&mut self, link: u64, reason: &str, reaped: Option<ExitStatus>) {
        let Some(w) = self.workers.by_link.remove(&link) else {
            return;
        };
        let retiring = self.broker.peers.get(&link).is_some_and(|p| p.retiring);
        self.broker.drop_link(link);
        if retiring && reaped == Some(ExitStatus::Code(0)) {
            info!(pid = w.pid, user = %w.account.name, "worker retired");
        } else {
            warn!(pid = w.pid, user = %w.account.name, "worker down: {reason}");
            self.broker.audit.record(
                "worker_down",
                serde_json::json!({ "pid": w.pid, "unix_user": w.account.name, "reason": reason }),
            );
        }
        match reaped {
            Some(_) => {
                if let Some(cg) = w.cgroup {
                    self.broker.cgroups_to_finish.push(cg);
                }
            }
            None => {
                let _ = kill(Pid::from_raw(w.pid), NixSignal::SIGKILL);
                self.workers.dying.push((w.pid, w.cgroup));
            }
        }
        let uid = w.account.uid;
        // Only a run that lasted, or a retirement, resets the backoff: the user can make
        // their worker exit 0 at will (SIGTERM) and must not make the broker spin.
        let failures = self.workers.failures.entry(uid).or_insert(0);
        if w.started.elapsed() >= HEALTHY_RUN || retiring {
            *failures = 0;
        } else {
            *failures += 1;
        }
        let live = self
            .broker
            .handles
            .iter()
            .any(|(_, e)| e.account.uid == uid && !e.released);
        if live && !self.broker.shutting_down && self.broker.worker_link(uid).is_none() {
            let delay = match *failures {
                0 | 1 => Duration::ZERO,
                n => Duration::from_millis(100)
                    .saturating_mul(1 << (n - 1).min(10))
                    .min(RESTART_MAX),
            };
            info!(user = %w.account.name, ?delay, "worker restart scheduled: its user has live work");
            self.workers.restarts.insert(
                uid,
                Restart {
                    at: Instant::now() + delay,
                    account: w.account,
                },
            );
        }
    }

    /// Starts the workers whose restart is due.
    pub fn start_due_workers(&mut self) {
        if !self.may_start_children() {
            return; // an upgrade in place: the new broker starts them
        }
        let now = Instant::now();
        let due: Vec<u32> = self
            .workers
            .restarts
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(u, _)| *u)
            .collect();
        for uid in due {
            let Some(r) = self.workers.restarts.remove(&uid) else {
                continue;
            };
            if self.broker.worker_link(uid).is_none() && !self.broker.shutting_down {
                self.start_worker(&r.account);
            }
        }
    }

    /// Whether `pid` was a worker; if so it is accounted for.
    pub fn reaped_worker(&mut self, pid: i32, status: ExitStatus) -> bool {
        if let Some(link) = self
            .workers
            .by_link
            .iter()
            .find(|(_, w)| w.pid == pid)
            .map(|(l, _)| *l)
        {
            self.worker_gone(link, &format!("worker exited ({status:?})"), Some(status));
            return true;
        }
        if let Some(i) = self.workers.dying.iter().position(|(p, _)| *p == pid) {
            let (_, cg) = self.workers.dying.swap_remove(i);
            if let Some(cg) = cg {
                self.broker.cgroups_to_finish.push(cg);
            }
            return true;
        }
        false
    }

    /// The nearest deadline of any worker: a Hello, a partial frame, a restart.
    pub fn worker_deadline(&self) -> Option<Instant> {
        let links = self.workers.by_link.iter().flat_map(|(l, w)| {
            let fresh = self
                .broker
                .peers
                .get(l)
                .is_some_and(|p| p.state == LinkState::Fresh);
            [
                w.link.deadline(),
                fresh.then(|| w.started + WORKER_HELLO_DEADLINE),
                w.retiring_since.map(|t| t + RETIRE_DEADLINE),
            ]
        });
        links
            .chain(self.workers.restarts.values().map(|r| Some(r.at)))
            .flatten()
            .min()
    }

    /// Ends the workers that missed a deadline.
    pub fn check_worker_deadlines(&mut self) {
        let now = Instant::now();
        for (l, w) in self.workers.by_link.iter_mut() {
            if w.retiring_since.is_none() && self.broker.peers.get(l).is_some_and(|p| p.retiring) {
                w.retiring_since = Some(now);
            }
        }
        let late: Vec<(u64, String)> = self
            .workers
            .by_link
            .iter()
            .filter_map(|(l, w)| {
                let fresh = self
                    .broker
                    .peers
                    .get(l)
                    .is_some_and(|p| p.state == LinkState::Fresh);
                if fresh && w.started + WORKER_HELLO_DEADLINE <= now {
                    Some((
                        *l,
                        format!("it did not say Hello within {WORKER_HELLO_DEADLINE:?}"),
                    ))
                } else if w.retiring_since.is_some_and(|t| t + RETIRE_DEADLINE <= now) {
                    Some((
                        *l,
                        format!("it retired and did not exit within {RETIRE_DEADLINE:?}"),
                    ))
                } else if w.link.deadline().is_some_and(|t| t <= now) {
                    Some((
                        *l,
                        format!("a frame stayed incomplete for {PARTIAL_FRAME_TIMEOUT:?}"),
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (link, why) in late {
            self.worker_gone(link, &why, None);
        }
        self.start_due_workers();
    }

    /// Signals every worker (shutdown).
    pub fn signal_workers(&mut self, signal: NixSignal) {
        for w in self.workers.by_link.values() {
            let _ = kill(Pid::from_raw(w.pid), signal);
        }
        for (pid, _) in &self.workers.dying {
            let _ = kill(Pid::from_raw(*pid), signal);
        }
    }
}

fn connection_event(link: u64, c: Pending) -> Outgoing {
    Outgoing {
        link,
        message: BrokerMessage::Event(Event::Connection {
            principal: c.principal,
            credential: c.credential,
            share: c.share,
            delegated: c.delegated,
        }),
        fds: vec![c.fd],
    }
}

/// `<workers_dir>/<uid>`: made for the user (0700) if missing; one owned by anyone else is
/// refused, not taken over.
fn user_dir(workers_dir: &Path, account: &Account) -> Result<PathBuf, String> {
    let dir = workers_dir.join(account.uid.to_string());
    match std::fs::symlink_metadata(&dir) {
        Ok(m) => {
            if !m.is_dir() || m.uid() != account.uid {
                return Err(format!(
                    "{} is not a directory owned by uid {}; fix or remove it",
                    dir.display(),
                    account.uid
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
            std::os::unix::fs::lchown(&dir, Some(account.uid), Some(account.gid))
                .map_err(|e| format!("cannot chown {}: {e}", dir.display()))?;
        }
        Err(e) => return Err(format!("cannot stat {}: {e}", dir.display())),
    }
    Ok(dir)
}

/// A pipe holding `text`, its write end closed: the worker reads it to the end.
fn config_pipe(text: &str) -> Result<OwnedFd, String> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "the daemon config is over {MAX_CONFIG_BYTES} bytes, too large to hand to a worker"
        ));
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| format!("pipe: {e}"))?;
    let mut file = std::fs::File::from(write);
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| format!("config pipe: {e}"))?;
    Ok(read)
}

/// The argv and environment of a worker.
pub fn worker_command(state_dir: &Path, account: &Account) -> (Vec<CString>, Vec<CString>) {
    let bytes = |p: &[u8]| CString::new(p).unwrap_or_else(|_| CString::from(c"/dev/null"));
    let argv = vec![
        CString::from(c"stoa"),
        CString::from(c"__worker"),
        CString::from(c"--state-dir"),
        bytes(state_dir.as_os_str().as_bytes()),
    ];
    let mut env = vec![CString::from(c"PATH=/usr/bin:/bin")];
    for (k, v) in [
        ("HOME", account.home.as_os_str().as_bytes()),
        ("USER", account.name.as_bytes()),
        ("LOGNAME", account.name.as_bytes()),
    ] {
        let mut e = k.as_bytes().to_vec();
        e.push(b'=');
        e.extend_from_slice(v);
        env.extend(CString::new(e).ok());
    }
    for name in ["RUST_LOG", "STOA_LOG", "NO_COLOR"] {
        if let Some(v) = std::env::var_os(name) {
            let mut e = name.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            env.extend(CString::new(e).ok());
        }
    }
    (argv, env)
}
