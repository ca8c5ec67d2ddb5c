//! The daemon process: started (re-exec'd from the broker's own binary, as the service
//! user, with its link at fd 3 and the HTTP listener at fd 4), restarted with backoff when
//! it exits, crashes or breaks the protocol, and replaced gently when asked (SIGHUP, a
//! restart request). Each daemon gets a new link number, so nothing meant for an earlier
//! one reaches it.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal as NixSignal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use stoa_executor::codec;
use stoa_executor::sys::{self, ChildSpec, Identity, Resource, Rlimit};

use super::event_loop::Server;
use super::link::{Link, LinkError};
use super::os::exit_status;
use super::startup::fit_rlimits;
use super::{spawn, table, Mode};
use crate::wire::{ExitStatus, Request};

const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A daemon that ran this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How long a new daemon has to say `Hello`. The broker does not wait for its exec (the
/// service user, which a compromised daemon is, could stop the child before it): a daemon
/// that failed before exec is reaped like any exit, one that never speaks is replaced.
pub const DAEMON_HELLO_DEADLINE: Duration = Duration::from_secs(10);

pub struct Daemon {
    pub pid: i32,
    pub link: Link,
    /// The link number the broker gave it.
    pub generation: u64,
    pub started: Instant,
}

/// The limits of the processes stoa runs of itself (the front, the workers): no core dumps
/// (they hold credentials and users' output), plenty of fds (connections, terminals).
pub fn service_rlimits() -> Vec<Rlimit> {
    fit_rlimits(vec![
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
    ])
}

impl Server {
    pub fn start_daemon(&mut self) {
        self.restart_at = None;
        let result = (|| -> Result<(i32, Link), String> {
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let (argv, env) = spawn::daemon_command(&self.opts.config, &self.daemon_state_dir);
            let identity = match &self.broker.mode {
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
                rlimits: service_rlimits(),
                umask: 0o077,
                cwd: Some(c"/".into()),
                cwd_id: None,
                parent_death_signal: Some(libc::SIGTERM),
                cgroup_procs: Vec::new(),
                confine: None,
                cgroup_dir: None,
            };
            // Not waited for: its report pipe is dropped; a failure before exec shows as its
            // exit (127), and silence as the Hello deadline.
            let pid = sys::start_child(&spec).map_err(|e| e.to_string())?.pid;
            let link = Link::new(ours).map_err(|e| e.to_string())?;
            Ok((pid, link))
        })();
        match result {
            Ok((pid, link)) => {
                self.broker.stats.daemon_starts += 1;
                let generation = self.broker.add_link(super::PeerKind::Front);
                info!(pid, "daemon started");
                self.broker
                    .audit
                    .record("daemon_start", serde_json::json!({ "pid": pid }));
                self.daemon = Some(Daemon {
                    pid,
                    link,
                    generation,
                    started: Instant::now(),
                });
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

    /// The daemon is finished: reap it (killing it unless it is leaving on request), then
    /// start a new one: at once after a clean exit, else with backoff.
    pub fn daemon_gone(&mut self, reason: &str, reaped: Option<ExitStatus>) {
        let Some(d) = self.daemon.take() else { return };
        // Its link is gone: nothing queued for it is sent to the next one.
        self.broker.drop_link(d.generation);
        warn!(pid = d.pid, "daemon down: {reason}");
        self.broker.audit.record(
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

    pub fn link_failed(&mut self, e: LinkError) {
        match e {
            LinkError::Closed => self.daemon_gone("it closed the link", None),
            LinkError::Io(e) => self.daemon_gone(&format!("link error: {e}"), None),
            LinkError::Violation(what) => {
                self.broker.stats.protocol_violations += 1;
                error!(violation = %what, "PROTOCOL VIOLATION by the daemon; dropping the link and restarting it");
                let pid = self.daemon.as_ref().map(|d| d.pid);
                self.broker.audit.record(
                    "violation",
                    serde_json::json!({ "what": table::clip(&what, 512), "daemon_pid": pid }),
                );
                self.daemon_gone("protocol violation", None);
            }
        }
    }

    /// Reads what the daemon sent and answers it through the request table.
    pub fn read_daemon(&mut self) {
        let Some(d) = &mut self.daemon else { return };
        let generation = d.generation;
        let payloads = match d.link.read_payloads() {
            Ok(p) => p,
            Err(e) => return self.link_failed(e),
        };
        for payload in payloads {
            self.broker.stats.frames_received += 1;
            let request: Request = match codec::decode(&payload) {
                Ok(r) => r,
                Err(e) => return self.link_failed(LinkError::Violation(e.to_string())),
            };
            if let Err(what) = self.dispatch_on(generation, request) {
                return self.link_failed(LinkError::Violation(what));
            }
            self.flush_outbox();
            if self.daemon.is_none() {
                return;
            }
        }
    }

    /// Answers one request that came on `link`, with the broker's view set to that link.
    pub fn dispatch_on(&mut self, link: u64, request: Request) -> Result<(), String> {
        let b = &mut self.broker;
        let Some(peer) = b.peers.get(&link) else {
            return Err(format!("a request on link {link}, which is gone"));
        };
        b.link = link;
        b.link_state = peer.state;
        let result = table::dispatch(b, request);
        if let Some(p) = b.peers.get_mut(&link) {
            p.state = b.link_state;
        }
        result
    }

    /// Sends what the broker queued, each message on its link; drops what was meant for a
    /// link that is gone.
    pub fn flush_outbox(&mut self) {
        self.deliver_connects();
        for out in std::mem::take(&mut self.broker.outbox) {
            if let Some(d) = &mut self.daemon {
                if out.link == d.generation {
                    let result = codec::encode(&out.message)
                        .map_err(LinkError::Io)
                        .and_then(|frame| d.link.send(frame, out.fds));
                    if let Err(e) = result {
                        self.link_failed(e);
                    }
                    continue;
                }
            }
            if let Some(w) = self.workers.by_link.get_mut(&out.link) {
                let result = codec::encode(&out.message)
                    .map_err(LinkError::Io)
                    .and_then(|frame| w.link.send(frame, out.fds));
                if let Err(e) = result {
                    self.worker_link_failed(out.link, e);
                }
            }
        }
    }
}
