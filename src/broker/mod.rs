//! The broker: `stoa serve` as root. The only stoa process that can switch users.
//!
//! | file            | owns                                                                  |
//! |-----------------|-----------------------------------------------------------------------|
//! | `startup.rs`    | checks and setup before the loop (policy, accounts, dirs, capabilities) |
//! | `event_loop.rs` | the one thread's `poll` loop: signals, the daemon link, child reports  |
//! | `supervise.rs`  | the front (`__daemon`) process: start, restart with backoff, its link |
//! | `workers.rs`    | the per-user workers: start on demand, connections, restart, retire   |
//! | `table.rs`      | **the request table**: what the daemon may ask, when, what it must prove, who answers |
//! | `handlers/`     | one file per family of requests                                        |
//! | `admission.rs`  | quotas and rates                                                       |
//! | `handles.rs`    | the handle table (owner, pidfd, life of every spawn)                   |
//! | `shutdown.rs`   | the SIGTERM phases, a pure transition function                         |
//! | `os.rs`         | every OS call the handlers make, behind a trait (`os_double.rs`: the recording double) |
//! | `spawn.rs`      | building a spawn: account, environment, PTY or pipes, the job          |
//! | `legacy_store.rs` | splitting the one daemon's old store into the users' worker stores, once |
//! | `confine.rs`    | Landlock: the policy's `[confine]` and what each spawn gets           |
//! | `upgrade.rs`    | upgrade in place: the state carried across the broker's own exec, checked by the new binary first |
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
pub mod confine;
pub mod credentials;
mod event_loop;
pub mod handlers;
pub mod handles;
pub mod legacy_store;
pub mod link;
pub mod local_login;
pub mod login_helper;
pub mod notify;
pub mod os;
pub mod os_double;
pub mod policy;
pub mod shutdown;
pub mod spawn;
mod startup;
mod supervise;
pub mod table;
pub mod upgrade;
pub mod users;
mod workers;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::wire::{BrokerMessage, BrokerStats, Event};
use handles::HandleTable;
use policy::Policy;
use spawn::Account;

/// The daemon's fds: its end of the broker link, and the HTTP listener.
pub const DAEMON_LINK_FD: i32 = 3;
pub const DAEMON_LISTENER_FD: i32 = 4;
/// How often the cgroups of finished runs that still held dying processes are tried again.
const CGROUP_RETRY_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

pub struct ServeOptions {
    pub broker_config: PathBuf,
    pub config: PathBuf,
    /// Set by the broker itself when it re-execs for an upgrade in place: the sealed memfd
    /// with its state (`upgrade.rs`).
    pub resume_state_fd: Option<i32>,
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

/// Which process a link belongs to: what it may ask depends on it (`table.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    /// The network-facing front (`stoa __daemon`, the service user).
    Front,
    /// The worker of one Unix user (`stoa __worker`, running as that user).
    Worker { uid: u32, name: String },
}

/// A live link: whose it is and where it is in its conversation.
#[derive(Debug, Clone)]
pub struct Peer {
    pub kind: PeerKind,
    pub state: LinkState,
    /// A worker whose `Retire` was granted: new connections go to a new worker.
    pub retiring: bool,
}

/// A connection the front opened, for the loop to hand to the user's worker.
pub struct Connect {
    pub account: Account,
    pub principal: Option<crate::wire::Principal>,
    /// The SHA-256 of the credential the front showed.
    pub credential: Option<[u8; 32]>,
    /// For a share's grantee: what the connection may reach.
    pub share: Option<Box<crate::wire::ShareInfo>>,
    /// For an admin: the credential the worker uses instead of the admin's.
    pub delegated: Option<String>,
    /// Start the worker if it is not running (never for an anonymous connection).
    pub start: bool,
    pub fd: OwnedFd,
}

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every link that has said Hello.
    All,
    /// The current worker of this uid, if it has said Hello.
    User(u32),
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
    /// Password checks in flight (`Login`), and recent failures.
    pub login_checks: Vec<handlers::login::Check>,
    /// Live shares of users' terminals.
    pub shares: Vec<handlers::shares::Grant>,
    /// The daemon runs agents on the direct path (`execution.use_executor = false`): only
    /// then may a worker have a run's secrets (`RunSecrets`).
    pub direct_path: bool,
    /// Each user's budget of `RecordApproval` audit lines.
    pub approval_records: handlers::approvals::RecordBudget,
    /// The local log-in socket and its open connections (`None`: not listening).
    pub local: Option<local_login::LocalLogins>,
    pub login_throttle: handlers::login::Throttle,
    /// When live log-ins' users were last checked against the policy.
    pub logins_rechecked: std::time::Instant,
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
    /// The link whose request is being answered: its number and where it is (set by the
    /// loop from `peers` before each request, written back after).
    pub link: u64,
    pub link_state: LinkState,
    /// Every live link (front and workers), by number.
    pub peers: std::collections::BTreeMap<u64, Peer>,
    /// The last link number given out.
    pub last_link: u64,
    /// Connections opened by the front since the loop last looked.
    pub connects: Vec<Connect>,
    pub outbox: Vec<Outgoing>,
    /// API users and their token digests as last seen, to tell the daemon whose
    /// credentials stopped working.
    pub known_users: Option<std::collections::HashMap<u64, String>>,
    /// Cgroups of reaped runs, to be emptied and removed once their exits are sent (off the
    /// path between an exit and its report).
    pub cgroups_to_finish: Vec<cgroup::SpawnCgroup>,
    /// When to try again to remove cgroups that still held dying processes.
    pub cgroup_retry_at: Option<std::time::Instant>,
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
            login_checks: Vec::new(),
            shares: Vec::new(),
            approval_records: Default::default(),
            direct_path: false,
            local: None,
            login_throttle: Default::default(),
            logins_rechecked: std::time::Instant::now(),
            signallers: Vec::new(),
            admission: Default::default(),
            audit,
            notifier: notify::Notifier::from_env(),
            announced: false,
            stats: BrokerStats::default(),
            shutting_down: false,
            link: 0,
            link_state: LinkState::Fresh,
            peers: Default::default(),
            last_link: 0,
            connects: Vec::new(),
            outbox: Vec::new(),
            known_users: None,
            cgroups_to_finish: Vec::new(),
            cgroup_retry_at: None,
        }
    }

    /// Empties and removes the cgroups of reaped runs; those still holding dying
    /// processes are tried again shortly.
    pub fn finish_cgroups(&mut self) {
        let queued = !self.cgroups_to_finish.is_empty();
        for cg in std::mem::take(&mut self.cgroups_to_finish) {
            self.os.cgroup_finish(cg);
        }
        let now = std::time::Instant::now();
        if queued || self.cgroup_retry_at.is_some_and(|t| t <= now) {
            self.cgroup_retry_at = self
                .os
                .cgroup_retry_leftovers()
                .then(|| now + CGROUP_RETRY_EVERY);
        }
    }
}

impl Broker {
    pub fn isolated(&self) -> bool {
        matches!(self.mode, Mode::Isolated { .. })
    }

    /// Queues an event for the links it is meant for that have said Hello (a later
    /// process learns what it needs from `ListHandles`).
    pub fn send_event(&mut self, target: Target, event: Event) {
        let links: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| p.state == LinkState::Ready)
            .filter(|(_, p)| match (target, &p.kind) {
                (Target::All, _) => true,
                (Target::User(uid), PeerKind::Worker { uid: u, .. }) => uid == *u && !p.retiring,
                (Target::User(_), PeerKind::Front) => false,
            })
            .map(|(l, _)| *l)
            .collect();
        for link in links {
            self.outbox.push(Outgoing {
                link,
                message: BrokerMessage::Event(event.clone()),
                fds: Vec::new(),
            });
        }
    }

    /// A new link of `kind`: it starts from `Hello`.
    pub fn add_link(&mut self, kind: PeerKind) -> u64 {
        self.last_link += 1;
        self.peers.insert(
            self.last_link,
            Peer {
                kind,
                state: LinkState::Fresh,
                retiring: false,
            },
        );
        self.last_link
    }

    /// A link is gone: nothing more is sent on it.
    pub fn drop_link(&mut self, link: u64) {
        self.peers.remove(&link);
    }

    /// The current worker link of `uid` (not one that is retiring).
    pub fn worker_link(&self, uid: u32) -> Option<u64> {
        self.peers
            .iter()
            .find(|(_, p)| {
                !p.retiring && matches!(p.kind, PeerKind::Worker { uid: u, .. } if u == uid)
            })
            .map(|(l, _)| *l)
    }

    /// The kind of the link being answered.
    pub fn peer_kind(&self) -> Option<&PeerKind> {
        self.peers.get(&self.link).map(|p| &p.kind)
    }
}

#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod login_tests;
#[cfg(test)]
mod red_team_tests;
#[cfg(test)]
mod test_fixture;
#[cfg(test)]
mod worker_link_tests;
