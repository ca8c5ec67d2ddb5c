//! The broker: `stoa serve` as root. The only stoa process that can switch users.
//!
//! | file            | owns                                                                  |
//! |-----------------|-----------------------------------------------------------------------|
//! | `startup.rs`    | checks and setup before the loop (policy, accounts, dirs, capabilities) |
//! | `event_loop.rs` | the one thread's `poll` loop: signals, the daemon link, child reports  |
//! | `supervise.rs`  | the daemon process: start, restart with backoff, its link             |
//! | `table.rs`      | **the request table**: what the daemon may ask, when, what it must prove, who answers |
//! | `handlers/`     | one file per family of requests                                        |
//! | `admission.rs`  | quotas and rates                                                       |
//! | `handles.rs`    | the handle table (owner, pidfd, life of every spawn)                   |
//! | `shutdown.rs`   | the SIGTERM phases, a pure transition function                         |
//! | `os.rs`         | every OS call the handlers make, behind a trait (`os_double.rs`: the recording double) |
//! | `spawn.rs`      | building a spawn: account, environment, PTY or pipes, the job          |
//! | `cgroup/`, `policy.rs`, `credentials.rs`, `users.rs`, `audit.rs`, `link.rs`, `notify.rs` | as named |
//!
//! One thread, never a runtime: being single-threaded is what makes `fork` safe here. The
//! broker never waits on anything a user controls: children are forked (not vforked) and
//! report their exec through a pipe the loop polls, each with a deadline; directory checks
//! run in a child that has become the user.
//!
//! Started without root, the same loop runs in single-user mode: nothing changes identity
//! and only the invoking user may be run.
#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod cgroup;
pub mod credentials;
mod event_loop;
pub mod handlers;
pub mod handles;
pub mod link;
pub mod notify;
pub mod os;
pub mod os_double;
pub mod policy;
pub mod shutdown;
pub mod spawn;
mod startup;
mod supervise;
pub mod table;
pub mod users;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::wire::{BrokerMessage, BrokerStats, Event};
use handles::HandleTable;
use policy::Policy;
use spawn::Account;

/// The daemon's fds: its end of the broker link, and the HTTP listener.
pub const DAEMON_LINK_FD: i32 = 3;
pub const DAEMON_LISTENER_FD: i32 = 4;

pub struct ServeOptions {
    pub broker_config: PathBuf,
    pub config: PathBuf,
}

/// Runs the broker until SIGTERM/SIGINT.
pub fn serve(opts: ServeOptions) -> Result<(), String> {
    let mut server = startup::start(opts)?;
    server.run();
    Ok(())
}

pub enum Mode {
    /// Root: executors run as their users, the daemon as `service`.
    Isolated { service: Account },
    /// Not root: everything runs as `me`.
    SingleUser { me: Account },
}

/// Where the link to the current daemon is in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connected, no `Hello` yet.
    Fresh,
    /// `Hello` accepted.
    Ready,
}

/// A message for the daemon, on the link it is meant for.
pub struct Outgoing {
    pub link: u64,
    pub message: BrokerMessage,
    pub fds: Vec<OwnedFd>,
}

/// The broker's state and the handlers' view of the world: everything a request can
/// change. The event loop feeds it requests, child reports and exits, and sends what it
/// puts in the outbox.
pub struct Broker {
    pub policy: Policy,
    pub allowed_gids: Vec<u32>,
    pub mode: Mode,
    pub credentials: credentials::Credentials,
    pub os: Box<dyn os::Os>,
    pub handles: HandleTable,
    pub probes: Vec<handlers::dirs::Probe>,
    /// Children sending a signal as a handle's owner, until they are reaped.
    pub signallers: Vec<handlers::handles::Signaller>,
    pub admission: admission::Admission,
    pub audit: audit::Audit,
    pub notifier: notify::Notifier,
    /// systemd was told READY=1 (only the first daemon's Ready does that).
    pub announced: bool,
    pub stats: BrokerStats,
    /// SIGTERM came: nothing new starts.
    pub shutting_down: bool,
    /// The current daemon link: its number and where it is.
    pub link: u64,
    pub link_state: LinkState,
    pub outbox: Vec<Outgoing>,
    /// API users and their token digests as last seen, to tell the daemon whose
    /// credentials stopped working.
    pub known_users: Option<std::collections::HashMap<u64, String>>,
    /// Cgroups of reaped runs, to be emptied and removed once their exits are sent (off the
    /// path between an exit and its report).
    pub cgroups_to_finish: Vec<cgroup::SpawnCgroup>,
}

impl Broker {
    /// A broker with nothing running and no daemon yet.
    pub fn new(
        policy: Policy,
        allowed_gids: Vec<u32>,
        mode: Mode,
        credentials: credentials::Credentials,
        os: Box<dyn os::Os>,
        audit: audit::Audit,
    ) -> Broker {
        Broker {
            policy,
            allowed_gids,
            mode,
            credentials,
            os,
            handles: HandleTable::new(),
            probes: Vec::new(),
            signallers: Vec::new(),
            admission: Default::default(),
            audit,
            notifier: notify::Notifier::from_env(),
            announced: false,
            stats: BrokerStats::default(),
            shutting_down: false,
            link: 0,
            link_state: LinkState::Fresh,
            outbox: Vec::new(),
            known_users: None,
            cgroups_to_finish: Vec::new(),
        }
    }

    /// Empties and removes the cgroups of reaped runs.
    pub fn finish_cgroups(&mut self) {
        for cg in std::mem::take(&mut self.cgroups_to_finish) {
            self.os.cgroup_finish(cg);
        }
    }
}

impl Broker {
    pub fn isolated(&self) -> bool {
        matches!(self.mode, Mode::Isolated { .. })
    }

    /// Queues an event for the current daemon, if it has said Hello (a later daemon learns
    /// what it needs from `ListHandles`).
    pub fn send_event(&mut self, event: Event) {
        if self.link_state != LinkState::Ready {
            return;
        }
        self.outbox.push(Outgoing {
            link: self.link,
            message: BrokerMessage::Event(event),
            fds: Vec::new(),
        });
    }

    /// A new daemon link: it starts from `Hello`.
    pub fn new_link(&mut self) -> u64 {
        self.link += 1;
        self.link_state = LinkState::Fresh;
        self.link
    }
}

#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod red_team_tests;
#[cfg(test)]
mod test_fixture;
