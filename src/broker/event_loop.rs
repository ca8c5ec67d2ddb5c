//! The broker's one thread: a `poll` over the signalfd, the daemon link and the report
//! pipes of children still on their way to exec, with a timeout at the nearest deadline.
//! Every wait is bounded; nothing here blocks on a user's process.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::handlers::{dirs, handles, launch, login, session};
use super::link::{LinkError, PARTIAL_FRAME_TIMEOUT};
use super::policy::Policy;
use super::shutdown::{self, Action, Facts, Stopping};
use super::startup::resolve_gids;
use super::supervise::{Daemon, DAEMON_HELLO_DEADLINE};
use super::{Broker, LinkState, ServeOptions};
use crate::config::DaemonConfig;
use crate::wire::{Event, FdLayout, Signal};

/// How often the user store is compared with what was seen (removed users and rotated
/// tokens end their connections within this).
const USER_CHECK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    pub phase: Stopping,
    pub until: Instant,
}

pub struct Server {
    pub opts: ServeOptions,
    pub broker: Broker,
    pub self_exe: OwnedFd,
    pub listener: OwnedFd,
    pub daemon: Option<Daemon>,
    pub restart_at: Option<Instant>,
    pub restart_failures: u32,
    /// The daemon was asked to go (SIGHUP): no backoff, no violence.
    pub planned_restart: bool,
    /// The daemon's state directory, as resolved and created at start.
    pub daemon_state_dir: PathBuf,
    pub signals: SignalFd,
    pub shutdown: Option<Shutdown>,
    pub next_user_check: Instant,
    /// Held for the broker's life: no second broker uses its state directory meanwhile.
    pub state_lock: super::startup::StateLock,
    /// The path this broker was started from: an upgrade in place runs what is there now.
    pub exe_path: PathBuf,
    /// An upgrade in place asked for, waiting for what is in flight (`upgrade.rs`).
    pub upgrade: Option<super::upgrade::Pending>,
    pub workers: super::workers::Workers,
    /// What the broker made at start and removes at stop, in that order (gemini's
    /// settings file, its directory if it was not there).
    pub made_files: Vec<PathBuf>,
}

impl Server {
    pub fn run(&mut self) {
        session::check_revocations(&mut self.broker);
        loop {
            self.advance_shutdown();
            // Returns only if this binary goes on serving (no upgrade, or a refused one).
            self.advance_upgrade();
            let stopping_daemon = self.shutdown.map(|s| s.phase) == Some(Stopping::Daemon);
            if stopping_daemon && self.daemon.is_none() && self.workers.by_link.is_empty() {
                break;
            }
            let now = Instant::now();
            if self.daemon.is_none()
                && !stopping_daemon
                && self.may_start_children()
                && self.restart_at.is_none_or(|t| t <= now)
            {
                self.start_daemon();
            }
            let deadline = [
                self.daemon.as_ref().and_then(|d| d.link.deadline()),
                if self.daemon.is_none() {
                    self.restart_at
                } else {
                    None
                },
                self.shutdown.map(|s| s.until),
                launch::next_deadline(&self.broker),
                dirs::next_deadline(&self.broker),
                login::next_deadline(&self.broker),
                handles::next_signaller_deadline(&self.broker),
                self.hello_deadline(),
                self.worker_deadline(),
                Some(self.next_user_check),
                self.broker.cgroup_retry_at,
                self.upgrade.map(|u| u.deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = match deadline {
                Some(t) => {
                    let ms = t.saturating_duration_since(now).as_millis().min(60_000) as i32;
                    PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let (signalled, daemon_events, worker_events) = match self.wait(timeout) {
                Some(r) => r,
                None => continue,
            };
            if signalled {
                self.handle_signals();
            }
            // Nothing new is read while an upgrade is under way: `wait` polls no link then,
            // and this covers the turn in which SIGUSR2 came (the links were polled before).
            let reading = self.upgrade.is_none();
            if let Some(ev) = daemon_events {
                if reading
                    && ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                {
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
            for (link, ev) in worker_events {
                if reading
                    && ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                {
                    self.read_worker(link);
                }
                if ev.contains(PollFlags::POLLOUT) {
                    if let Some(w) = self.workers.by_link.get_mut(&link) {
                        if let Err(e) = w.link.flush() {
                            self.worker_link_failed(link, e);
                        }
                    }
                }
            }
            self.check_worker_deadlines();
            launch::check_starting(&mut self.broker);
            dirs::check_probes(&mut self.broker);
            login::check_logins(&mut self.broker);
            if reading {
                super::local_login::on_ready(&mut self.broker);
            }
            handles::check_signallers(&mut self.broker);
            if Instant::now() >= self.next_user_check {
                session::check_revocations(&mut self.broker);
                login::sweep(&mut self.broker);
                self.next_user_check = Instant::now() + USER_CHECK_EVERY;
            }
            self.flush_outbox();
            self.broker.finish_cgroups();
            if self.hello_deadline().is_some_and(|t| t <= Instant::now()) {
                self.daemon_gone(
                    &format!("it did not say Hello within {DAEMON_HELLO_DEADLINE:?}"),
                    None,
                );
            }
            if let Some(d) = &self.daemon {
                if d.link.deadline().is_some_and(|t| t <= Instant::now()) {
                    self.link_failed(LinkError::Violation(format!(
                        "a frame stayed incomplete for {PARTIAL_FRAME_TIMEOUT:?}"
                    )));
                }
            }
        }
        self.finish_shutdown();
    }

    /// When the current daemon must have said `Hello` by, while it has not.
    fn hello_deadline(&self) -> Option<Instant> {
        let d = self.daemon.as_ref()?;
        let fresh = self
            .broker
            .peers
            .get(&d.generation)
            .is_some_and(|p| p.state == LinkState::Fresh);
        fresh.then(|| d.started + DAEMON_HELLO_DEADLINE)
    }

    /// One `poll`: (a signal is waiting, the front link's events, each worker link's
    /// events). `None`: interrupted.
    #[allow(clippy::type_complexity)]
    fn wait(
        &self,
        timeout: PollTimeout,
    ) -> Option<(bool, Option<PollFlags>, Vec<(u64, PollFlags)>)> {
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        // While an upgrade is under way no link is read or written (what was sent waits in
        // the socket, and goes with the old links at the exec; a closed one would wake
        // every poll).
        let upgrading = self.upgrade.is_some();
        let daemon = self.daemon.as_ref().filter(|_| !upgrading);
        if let Some(d) = daemon {
            let mut events = PollFlags::POLLIN;
            if d.link.wants_write() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(d.link.socket().as_fd(), events));
        }
        let link_at = fds.len() - 1;
        let workers_at = fds.len();
        let worker_links: Vec<u64> = if upgrading {
            Vec::new()
        } else {
            self.workers.by_link.keys().copied().collect()
        };
        for link in &worker_links {
            let w = &self.workers.by_link[link];
            let mut events = PollFlags::POLLIN;
            if w.link.wants_write() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(w.link.socket().as_fd(), events));
        }
        for (_, e) in self.broker.handles.iter() {
            if let super::handles::Life::Starting(s) = &e.life {
                fds.push(PollFd::new(s.report.as_fd(), PollFlags::POLLIN));
            }
        }
        for p in &self.broker.probes {
            fds.push(PollFd::new(p.report.as_fd(), PollFlags::POLLIN));
        }
        for c in &self.broker.login_checks {
            fds.push(PollFd::new(c.answer.as_fd(), PollFlags::POLLIN));
        }
        if let Some(local) = self.broker.local.as_ref().filter(|_| !upgrading) {
            fds.push(PollFd::new(local.listener.as_fd(), PollFlags::POLLIN));
            for c in &local.clients {
                fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return None,
            Err(e) => {
                error!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return None;
            }
        }
        let revents = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
        let daemon = daemon.map(|_| revents(&fds[link_at]));
        let workers = worker_links
            .into_iter()
            .enumerate()
            .map(|(i, l)| (l, revents(&fds[workers_at + i])))
            .filter(|(_, e)| !e.is_empty())
            .collect();
        Some((
            revents(&fds[0]).contains(PollFlags::POLLIN),
            daemon,
            workers,
        ))
    }

    fn handle_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match NixSignal::try_from(info.ssi_signo as i32) {
                Ok(NixSignal::SIGCHLD) => self.reap(),
                Ok(NixSignal::SIGTERM) | Ok(NixSignal::SIGINT) => self.begin_shutdown(),
                Ok(NixSignal::SIGHUP) => self.reload(),
                Ok(NixSignal::SIGUSR2) => self.request_upgrade(),
                _ => {}
            }
        }
        // SIGCHLDs coalesce; reap whatever is there.
        self.reap();
    }

    fn reap(&mut self) {
        for (pid, status) in self.broker.os.reap() {
            if self.daemon.as_ref().is_some_and(|d| d.pid == pid) {
                self.daemon_gone(&format!("daemon exited ({status:?})"), Some(status));
            } else if !self.reaped_worker(pid, status) {
                handles::on_reaped(&mut self.broker, pid, status);
            }
        }
    }

    /// SIGHUP: reread the policy, and apply the daemon config by replacing the front and the
    /// workers (gracefully; running work survives, as on any restart).
    fn reload(&mut self) {
        let euid = nix::unistd::geteuid().as_raw();
        match Policy::load(&self.opts.broker_config, euid) {
            Ok((policy, _)) => {
                self.broker.allowed_gids = resolve_gids(&policy.allow_groups);
                self.broker.os.cgroup_set_limits(&policy.cgroup);
                self.broker.policy = policy;
                info!(path = %self.opts.broker_config.display(), "policy reloaded");
                self.broker
                    .audit
                    .record("policy_reloaded", serde_json::json!({}));
            }
            Err(e) => error!("policy not reloaded, keeping the old one: {e}"),
        }
        match DaemonConfig::load(&self.opts.config) {
            Ok(config) => {
                self.broker.direct_path = !config.execution.use_executor;
                if let Some(d) = &self.daemon {
                    info!(pid = d.pid, "replacing the daemon to apply its config");
                    self.planned_restart = true;
                    let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGTERM);
                }
                // Workers got the config at start: each is replaced too (a worker with live
                // work is started again at once and takes it back; an idle one on demand).
                info!(
                    workers = self.workers.by_link.len(),
                    "replacing the workers to apply the config"
                );
                self.signal_workers(NixSignal::SIGTERM);
            }
            Err(e) => error!("config not applied, the daemon keeps the old one: {e}"),
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
        let b = &mut self.broker;
        let grace = Duration::from_secs(b.policy.shutdown_grace_secs);
        let live = b.handles.live_count();
        info!(
            executors = live,
            ?grace,
            "shutting down: no new processes; running work may finish"
        );
        b.notifier
            .notify("STOPPING=1\nSTATUS=shutting down: waiting for running work");
        b.audit.record(
            "shutdown",
            serde_json::json!({ "executors": live, "grace_secs": grace.as_secs() }),
        );
        b.shutting_down = true;
        self.shutdown = Some(Shutdown {
            phase: Stopping::Grace,
            until: Instant::now() + grace,
        });
        b.send_event(
            super::Target::All,
            Event::ShuttingDown {
                grace_secs: grace.as_secs(),
            },
        );
        // Terminals do not finish by themselves: hang them up now.
        let terminals: Vec<_> = b
            .handles
            .iter()
            .filter(|(_, e)| e.running() && e.info.fds == FdLayout::Pty)
            .map(|(h, _)| *h)
            .collect();
        for handle in terminals {
            let _ = handles::signal_handle(b, handle, Signal::Hup);
        }
        self.flush_outbox();
    }

    /// Moves the shutdown on as far as it can go now (see `shutdown.rs`).
    fn advance_shutdown(&mut self) {
        while let Some(s) = self.shutdown {
            let facts = Facts {
                live: self.broker.handles.live_count(),
                handles: self.broker.handles.len(),
                due: Instant::now() >= s.until,
            };
            let Some((phase, lasts, action)) = shutdown::next(s.phase, facts) else {
                return;
            };
            info!(?phase, executors = facts.live, "shutdown");
            self.shutdown = Some(Shutdown {
                phase,
                until: Instant::now() + lasts,
            });
            match action {
                Action::Nothing => {}
                Action::TermAll => handles::signal_all(&mut self.broker, Signal::Term),
                Action::KillAll => handles::signal_all(&mut self.broker, Signal::Kill),
                Action::ReportSurvivors => {
                    error!(
                        executors = facts.live,
                        "shutdown: executors survived SIGKILL"
                    )
                }
                Action::StopDaemon => {
                    if facts.handles > 0 {
                        warn!(
                            handles = facts.handles,
                            "shutdown: the daemon did not release every handle in time"
                        );
                    }
                    if let Some(d) = &self.daemon {
                        info!(pid = d.pid, "shutdown: stopping the daemon");
                        let _ = kill(Pid::from_raw(d.pid), NixSignal::SIGTERM);
                        // It is asked to go: let it finish (see daemon_gone).
                        self.planned_restart = true;
                    }
                    self.signal_workers(NixSignal::SIGTERM);
                }
                Action::KillDaemon => {
                    self.signal_workers(NixSignal::SIGKILL);
                    let links: Vec<u64> = self.workers.by_link.keys().copied().collect();
                    for link in links {
                        self.worker_gone(link, "shutdown: it did not exit in time", None);
                    }
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
            }
        }
    }

    /// After the loop: whatever is still there is killed, the cgroups removed.
    fn finish_shutdown(&mut self) {
        handles::signal_all(&mut self.broker, Signal::Kill);
        // A worker whose link closed was sent SIGKILL (`worker_gone`) but may not be reaped
        // yet: the broker does not leave before its children are gone.
        self.signal_workers(NixSignal::SIGKILL);
        let deadline = Instant::now() + shutdown::TERM_WAIT;
        while (self.broker.handles.unreaped() > 0 || !self.workers.dying.is_empty())
            && Instant::now() < deadline
        {
            self.reap();
            std::thread::sleep(Duration::from_millis(20));
        }
        self.broker.finish_cgroups();
        self.broker.os.cgroup_teardown();
        if let Some(local) = self.broker.local.take() {
            local.remove();
        }
        for path in std::mem::take(&mut self.made_files) {
            // A directory only if empty: what else is there is not ours.
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir(&path));
        }
        self.broker.audit.record(
            "broker_stop",
            serde_json::json!({ "pid": std::process::id() }),
        );
        info!("broker stopped");
    }
}
