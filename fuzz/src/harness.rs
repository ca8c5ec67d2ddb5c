//! The real broker without root: `broker::table::dispatch` and the handlers over the
//! recording double of the OS (`broker::os_double`), fed as the broker's loop feeds them
//! (`supervise.rs`, `workers.rs`, `event_loop.rs`): frames through the real `Link`,
//! decoded, dispatched with the broker's view set to the link they came on; between them
//! children report and exit, processes come and go, shutdown starts. After every step the
//! invariants below are checked against what the broker asked the OS to do
//! (`RecordingOs::calls`), the connections it opened (`Broker::connects`) and what it
//! queued for its links (`Broker::outbox`).
//!
//! Three links are played ([`ALink`]): the front's, and the workers' of alice and of bob.
//! Each has its own socketpair and its own conversation; a violation drops that link only.
//!
//! * Nothing before Hello, Hello once, on each link; a violation ends the link (the input
//!   stops feeding it) and leaves nothing launched, probed or signalled by that request.
//! * What a link may send goes by its kind (restated here from the table): the front
//!   authenticates, opens connections and lists everything (with an admin's credential);
//!   it spawns, checks, signals, adopts, releases, lists and touches secrets never. A
//!   worker does the rest, for its own Unix user only: a request naming another user's
//!   handle is a violation, and nothing runs, is probed or signalled for another user.
//! * A `Launch` only for a `Spawn` on the worker of its user, whose every field
//!   `spawn::validate` and `wire::limits` allow (restated here), with no variable the
//!   policy's env deny-list names, for a user the policy allows (never uid 0, the service
//!   user, a root-group or low uid), by a valid, unrevoked credential that may act as
//!   that user, not while shutting down, with that user's secrets only; its environment
//!   and job are what was checked.
//! * A `StartProbe` only for a `CheckDir` of such a user on its worker, with an absolute
//!   bounded path.
//! * A `SignalGroup` only for an executor that reported its exec and whose exit was not fed
//!   yet, as its own uid (from a `Kill`: on its user's worker); nothing is adopted after
//!   its exit, nor by another user's worker.
//! * A connection (`Connect`) only for an `OpenWorker` on the front by a valid, unrevoked
//!   credential that may act as an allowed user (with that principal), or an
//!   `OpenWorkerAnonymous` for an allowed user whose worker runs (no principal); one per
//!   `Connection` reply, which carries one fd. Without `start`, or while shutting down,
//!   only to a running worker.
//! * Every message fits in a frame; every reply answers a request that was dispatched on
//!   its link without a violation, with a body of that request's kind and the fds its
//!   layout says, exactly once (at the end every deadline passes, so everything is
//!   answered). Events go only to live, welcomed links: `Exited` once per handle, only to
//!   its user's current worker (not a retired one), and there whenever that worker is
//!   welcomed and the handle was not released; `ShuttingDown` and `Revoked` to every
//!   welcomed link; nothing to a dropped link.
//! * The audit log (`audit.jsonl`) never gains a line over 2 KiB, and every line is JSON.
//!
//! The state directory (admin token, `users.json` with API users, audit log) is made once
//! per process on tmpfs; the broker is built afresh for every input (cheap next to the
//! socketpair), with the store put back and the log emptied.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use stoa::broker::handlers::{dirs, handles, launch, login, session};
use stoa::broker::handles::Life;
use stoa::broker::os_double::{broker_for_tests, Call, ChildScript, RecordingOs};
use stoa::broker::policy::IDENTITY_VARS;
use stoa::broker::spawn::{self, Account};
use stoa::broker::users::{digest_hex, ApiUser, UserStore};
use stoa::broker::{table, Broker, Connect, LinkState, Outgoing, PeerKind, Target};
use stoa::wire::{
    limits, BrokerMessage, Event, ExitStatus, Handle, Principal, Program, ReplyBody, Request,
    RequestBody, Signal, SpawnRequest, PROTOCOL_VERSION,
};
use stoa_executor::codec::{self, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::Job;
use stoa_executor::sys::{ChildReport, ChildStage};

use crate::arb::{AChild, ALink, AStatus, Op};
use crate::records::{self, Record};
use crate::stream::{FeedEnd, Feeder};

/// A Unix user the double knows.
pub struct UserDef {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups besides `gid`.
    pub extra_group: Option<u32>,
}

/// The service user of `broker_for_tests`.
pub const SERVICE_UID: u32 = 999;

/// Allowed users first, then one refused by each identity rule of the policy.
pub const USERS: [UserDef; 8] = [
    user("alice", 2001, 2001, None),
    user("bob", 2002, 2002, None),
    user("carol", 3000, 3000, None),
    user("root", 0, 0, None),
    user("stoa", SERVICE_UID, SERVICE_UID, None),
    user("lp", 7, 7, None),
    user("wheel", 2003, 2003, Some(0)),
    user("svcgrp", 2004, SERVICE_UID, None),
];

const fn user(name: &'static str, uid: u32, gid: u32, extra_group: Option<u32>) -> UserDef {
    UserDef {
        name,
        uid,
        gid,
        extra_group,
    }
}

/// The policy's identity rules, stated independently of `policy.rs`.
pub fn allowed(uid: u32, gid: u32, groups: &[u32]) -> bool {
    (1000..=4_294_967_293).contains(&uid)
        && uid != SERVICE_UID
        && gid != 0
        && gid != SERVICE_UID
        && !groups.contains(&0)
}

/// Fixed, so inputs (and the dictionary) can hold them and a crash replays anywhere.
pub const ADMIN_TOKEN: &str =
    "stoa_admin_a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";

pub struct ApiUserDef {
    pub id: u64,
    pub name: &'static str,
    pub unix_user: &'static str,
    pub admin: bool,
    pub token: &'static str,
}

pub const API_USERS: [ApiUserDef; 4] = [
    api(
        11,
        "alice-api",
        "alice",
        false,
        "stoa_b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2",
    ),
    api(
        12,
        "ops",
        "bob",
        true,
        "stoa_c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3",
    ),
    api(
        13,
        "rooty",
        "root",
        false,
        "stoa_d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4",
    ),
    api(
        14,
        "wheelie",
        "wheel",
        false,
        "stoa_e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5",
    ),
];

const fn api(
    id: u64,
    name: &'static str,
    unix_user: &'static str,
    admin: bool,
    token: &'static str,
) -> ApiUserDef {
    ApiUserDef {
        id,
        name,
        unix_user,
        admin,
        token,
    }
}

/// What structured requests pick credentials from: the real ones, then near misses.
pub const CREDENTIALS: [&str; 8] = [
    ADMIN_TOKEN,
    API_USERS[0].token,
    API_USERS[1].token,
    API_USERS[2].token,
    API_USERS[3].token,
    "",
    "stoa_admin_a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a0",
    "stoa_admin_",
];

const STAGES: [ChildStage; 20] = [
    ChildStage::ResetSignals,
    ChildStage::JoinCgroups,
    ChildStage::NewSession,
    ChildStage::ArrangeFds,
    ChildStage::ControllingTty,
    ChildStage::Rlimits,
    ChildStage::SetGroups,
    ChildStage::SetGid,
    ChildStage::DropBoundingSet,
    ChildStage::ClearAmbient,
    ChildStage::SetUid,
    ChildStage::VerifyIds,
    ChildStage::ClearCapabilities,
    ChildStage::VerifyCapabilities,
    ChildStage::NoNewPrivs,
    ChildStage::ParentDeathSignal,
    ChildStage::CloseFds,
    ChildStage::Chdir,
    ChildStage::VerifyCwd,
    ChildStage::Exec,
];

/// The longest audit line allowed.
pub const MAX_AUDIT_LINE: usize = 2048;

/// The per-process state directory.
struct StateDir {
    dir: PathBuf,
    /// `users.json` as first written: (inode, mtime ns), to see when it must be put back.
    stamp: (u64, i64, i64),
}

thread_local! {
    static STATE: RefCell<Option<StateDir>> = const { RefCell::new(None) };
}

fn initial_store() -> UserStore {
    UserStore {
        users: API_USERS
            .iter()
            .map(|u| ApiUser {
                id: u.id,
                name: u.name.into(),
                unix_user: u.unix_user.into(),
                admin: u.admin,
                token_sha256: digest_hex(u.token),
                created_at: 0,
            })
            .collect(),
        ..UserStore::default()
    }
}

fn stamp(dir: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(UserStore::path(dir)).expect("users.json");
    (m.ino(), m.mtime(), m.mtime_nsec())
}

/// The state directory, made on the first call of this process (and `users.json` put
/// back and the audit log emptied on every call).
fn state_dir() -> PathBuf {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let state = s.get_or_insert_with(|| {
            let base = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            remove_stale(&base);
            // One per thread: `cargo test` runs harnesses side by side.
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("stoa-fuzz-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("state dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .expect("chmod state dir");
            let token = dir.join(stoa::broker::credentials::ADMIN_TOKEN_FILE);
            std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).expect("admin token");
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
                .expect("chmod token");
            initial_store().save(&dir).expect("users.json");
            let stamp = stamp(&dir);
            StateDir { dir, stamp }
        });
        if stamp(&state.dir) != state.stamp {
            initial_store().save(&state.dir).expect("users.json");
            state.stamp = stamp(&state.dir);
        }
        let audit = state.dir.join("audit.jsonl");
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&audit) {
            f.set_len(0).expect("truncate the audit log");
        }
        state.dir.clone()
    })
}

/// State directories of processes that are gone (libFuzzer cannot clean up after itself).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("stoa-fuzz-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Executor,
    Probe,
    /// The log-in helper (root, started for a `Login`).
    LoginCheck,
}

/// A child the double started, as the harness saw it.
#[derive(Debug)]
struct Child {
    kind: Kind,
    uid: u32,
    /// Its spawn was answered `Spawned` with this handle (it reported its exec).
    handle: Option<Handle>,
    /// That answer went to a link that was gone by then (the broker ends such a run).
    orphaned: bool,
    /// Its exit was fed (it is reaped).
    exited: bool,
}

/// Where the OS calls and the pids were before a step.
struct Mark {
    calls: usize,
    next_pid: i32,
}

/// What a step was, for the checks of what it made the broker do.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// A request on that link, dispatched with this result.
    Request(&'a RequestBody, bool, ALink),
    Control(Op),
}

/// One of the processes the harness plays, and its link.
#[derive(Default)]
struct Slot {
    /// Its link, while it has one (`None`: it failed or went, and nothing replaced it).
    link: Option<u64>,
    /// The process's end of the link, made at its first frame; `None` while it is fed.
    feeder: Option<Feeder>,
    /// A worker whose `Retire` was granted: no event of its user goes to it any more.
    retired: bool,
}

pub struct Harness {
    pub broker: Broker,
    pub os: RecordingOs,
    pub dir: PathBuf,
    /// The front's, alice's worker's and bob's worker's (by [`ALink::index`]).
    slots: [Slot; 3],
    /// Every link ever made, and whose it was.
    owners: HashMap<u64, ALink>,
    /// Where frames go that pick no link.
    on: ALink,
    seed: u8,
    /// Requests dispatched without a violation and not yet answered, by (link, id).
    pending: HashMap<(u64, u64), Vec<&'static str>>,
    /// The request being dispatched, until it is answered.
    current: Option<((u64, u64), &'static str)>,
    /// The reply (body, fds) that answered it during its step.
    answer: Option<(ReplyBody, usize)>,
    children: BTreeMap<i32, Child>,
    /// Handles answered `Spawned`, and their pids.
    issued: HashMap<Handle, i32>,
    /// Handles whose `Release` was answered `Done`.
    released: HashSet<Handle>,
    exit_events: HashSet<Handle>,
    /// The events of the current step: (link, what).
    events: Vec<(u64, &'static str)>,
    revoked: Vec<u64>,
    /// Counts of what happened (`outcomes` example); `None` while fuzzing.
    pub tally: Option<BTreeMap<String, usize>>,
    pub violations: usize,
    pub launches: usize,
}

impl Harness {
    /// A broker over a fresh double, with the front's link and alice's and bob's workers'
    /// open (none welcomed yet).
    pub fn new() -> Harness {
        let dir = state_dir();
        let pairs: Vec<(&str, u32)> = USERS.iter().map(|u| (u.name, u.uid)).collect();
        let os = RecordingOs::new(&pairs);
        for u in &USERS {
            let mut script = os.0.borrow_mut();
            let account = script.users.get_mut(u.name).expect("known user");
            account.gid = u.gid;
            account.groups = std::iter::once(u.gid).chain(u.extra_group).collect();
        }
        let (mut broker, token) = broker_for_tests(os.clone(), &dir).expect("broker_for_tests");
        assert_eq!(token, ADMIN_TOKEN);
        // As the loop does before it first waits: what the store holds now is known.
        session::check_revocations(&mut broker);
        let mut h = Harness {
            broker,
            os,
            dir,
            slots: Default::default(),
            owners: HashMap::new(),
            on: ALink::Alice,
            seed: 0,
            pending: HashMap::new(),
            current: None,
            answer: None,
            children: BTreeMap::new(),
            issued: HashMap::new(),
            released: HashSet::new(),
            exit_events: HashSet::new(),
            events: Vec::new(),
            revoked: Vec::new(),
            tally: None,
            violations: 0,
            launches: 0,
        };
        // `broker_for_tests` made alice's worker's link; the others connect now.
        let alice = h.broker.link;
        assert_eq!(
            h.broker.peers[&alice].kind,
            kind_of(ALink::Alice),
            "broker_for_tests starts on alice's worker"
        );
        h.slots[ALink::Alice.index()].link = Some(alice);
        h.owners.insert(alice, ALink::Alice);
        for at in [ALink::Front, ALink::Bob] {
            h.connect(at);
        }
        h
    }

    fn slot(&self, at: ALink) -> &Slot {
        &self.slots[at.index()]
    }

    fn slot_mut(&mut self, at: ALink) -> &mut Slot {
        &mut self.slots[at.index()]
    }

    /// A new process of `at` connects: a new link, from Hello.
    fn connect(&mut self, at: ALink) {
        let link = self.broker.add_link(kind_of(at));
        self.owners.insert(link, at);
        *self.slot_mut(at) = Slot {
            link: Some(link),
            feeder: None,
            retired: false,
        };
        let (event, pid) = match at {
            ALink::Front => {
                self.broker.stats.daemon_starts += 1;
                ("daemon_start", serde_json::json!({ "pid": 1 }))
            }
            _ => (
                "worker_start",
                serde_json::json!({ "pid": 1, "unix_user": at.user().map(|u| u.0) }),
            ),
        };
        self.broker.audit.record(event, pid);
    }

    /// The process of `at` goes: its link is dropped (the loop sends nothing more on it).
    fn disconnect(&mut self, at: ALink, reason: &str) {
        let slot = self.slot_mut(at);
        slot.feeder = None;
        let Some(link) = slot.link.take() else {
            return;
        };
        self.broker.drop_link(link);
        let event = match at {
            ALink::Front => "daemon_down",
            _ => "worker_down",
        };
        self.broker
            .audit
            .record(event, serde_json::json!({ "pid": 1, "reason": reason }));
    }

    /// The live, not retired worker link of `uid`, as the harness played it.
    fn worker_of(&self, uid: u32) -> Option<(ALink, u64)> {
        ALink::ALL
            .into_iter()
            .filter(|at| at.uid() == Some(uid))
            .find_map(|at| {
                let slot = self.slot(at);
                slot.link.filter(|_| !slot.retired).map(|l| (at, l))
            })
    }

    fn ready(&self, link: u64) -> bool {
        self.broker
            .peers
            .get(&link)
            .is_some_and(|p| p.state == LinkState::Ready)
    }

    /// One `broker_requests` input: frame records go through their links (consecutive
    /// ones for one link as one stream, split as `seed` says), control records happen in
    /// between; then every deadline passes and the final checks run.
    pub fn run(&mut self, seed: u8, recs: &[Record<'_>]) {
        self.seed = seed;
        let mut stream = Vec::new();
        let mut stream_on = self.on;
        for r in recs {
            match r {
                Record::Control(op) => {
                    self.feed_on(stream_on, &std::mem::take(&mut stream));
                    self.control(*op);
                }
                r => {
                    let (pick, frame) = records::frame_on(r);
                    let at = pick.unwrap_or(self.on);
                    if at != stream_on {
                        self.feed_on(stream_on, &std::mem::take(&mut stream));
                    }
                    stream_on = at;
                    stream.extend_from_slice(&frame);
                }
            }
        }
        self.feed_on(stream_on, &stream);
        self.finish();
    }

    /// Whether the link frames go to now still takes them.
    pub fn link_alive(&self) -> bool {
        self.slot(self.on).link.is_some()
    }

    /// Bytes through the link frames go to now; see [`Harness::feed_on`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.feed_on(self.on, bytes);
    }

    /// Bytes through `at`'s link, each payload decoded and dispatched as the broker's
    /// `read_daemon` and `read_worker` do; a link that failed or went reads nothing.
    pub fn feed_on(&mut self, at: ALink, bytes: &[u8]) {
        if bytes.is_empty() || self.slot(at).link.is_none() {
            return;
        }
        let mut feeder = self.slot_mut(at).feeder.take().unwrap_or_default();
        let mut failed = None;
        let end = feeder.feed(bytes, self.seed, |batch| {
            for payload in batch {
                if let Err(why) = self.payload(at, payload) {
                    failed = Some(why);
                    return false;
                }
            }
            true
        });
        match end {
            FeedEnd::Done => self.slot_mut(at).feeder = Some(feeder),
            FeedEnd::Stopped => self.violation(at, &failed.expect("stopped on a violation")),
            FeedEnd::Failed(what) => {
                if let Some(t) = &mut self.tally {
                    *t.entry(format!("link: {}", gist(&what))).or_default() += 1;
                }
                self.violation(at, &what)
            }
        }
    }

    /// One payload off `at`'s link. `Err`: a violation (the link is dropped).
    fn payload(&mut self, at: ALink, payload: &[u8]) -> Result<(), String> {
        assert!(
            payload.len() <= MAX_FRAME,
            "the link passed an oversized payload"
        );
        self.broker.stats.frames_received += 1;
        let request: Request = codec::decode(payload).map_err(|e| {
            if let Some(t) = &mut self.tally {
                *t.entry("violation: undecodable".into()).or_default() += 1;
            }
            e.to_string()
        })?;
        self.request_on(at, request)
    }

    /// One decoded request on the link frames go to now; see [`Harness::request_on`].
    pub fn request(&mut self, request: Request) -> Result<(), String> {
        self.request_on(self.on, request)
    }

    /// From now on, frames and requests that pick no link go on `at`'s.
    pub fn on(&mut self, at: ALink) {
        self.on = at;
    }

    /// One decoded request on `at`'s link through the real dispatcher (the broker's view
    /// set to that link, as `dispatch_on` does), then the checks.
    pub fn request_on(&mut self, at: ALink, request: Request) -> Result<(), String> {
        let link = self
            .slot(at)
            .link
            .unwrap_or_else(|| panic!("a request on the {at:?} link, which is gone"));
        let mark = self.mark();
        let name = table::name(&request.body);
        let id = request.id;
        let before = self.broker.peers[&link].state;
        self.broker.link = link;
        self.broker.link_state = before;
        let id_ok = request
            .request_id
            .as_deref()
            .is_none_or(stoa::wire::valid_request_id);
        let body = request.body.clone();
        // What `start: false` and anonymous connections need: a worker that runs.
        let worker_ran = |h: &Harness, user: &str| {
            h.account(user)
                .is_some_and(|a| h.worker_of(a.uid).is_some())
        };
        let ran = match &body {
            RequestBody::OpenWorker { unix_user, .. }
            | RequestBody::OpenWorkerAnonymous { unix_user } => worker_ran(self, unix_user),
            _ => false,
        };
        let result = table::dispatch(&mut self.broker, request);
        if let Some(p) = self.broker.peers.get_mut(&link) {
            p.state = self.broker.link_state;
        }
        let is_hello = name == "Hello";
        if !may_send(at, name) {
            assert!(result.is_err(), "{name} accepted on the {at:?} link");
        }
        if let (Some(uid), Some(handle)) = (at.uid(), handle_named(&body)) {
            if let Some(pid) = self.issued.get(&handle) {
                if self.children[pid].uid != uid {
                    assert!(
                        result.is_err(),
                        "{name} of a handle of uid {} accepted on the {at:?} link",
                        self.children[pid].uid
                    );
                }
            }
        }
        match (&result, before) {
            (Ok(()), LinkState::Fresh) => {
                assert!(is_hello, "{name} dispatched before Hello");
                assert_eq!(self.broker.link_state, LinkState::Ready);
            }
            (Ok(()), LinkState::Ready) => assert!(!is_hello, "a second Hello was accepted"),
            (Err(_), _) => {}
        }
        if result.is_ok() {
            assert!(id_ok, "an invalid request id got past the table");
            if let RequestBody::Hello { protocol } = &body {
                assert_eq!(*protocol, PROTOCOL_VERSION);
            }
            // Its answer now, if it has one, comes in `after`; else it waits.
            self.current = Some(((link, id), name));
        } else {
            assert_eq!(
                self.broker.link_state, before,
                "a violation changed the link"
            );
        }
        if let (Some(t), Err(why)) = (&mut self.tally, &result) {
            *t.entry(format!("violation: {name}: {}", gist(why)))
                .or_default() += 1;
        }
        self.answer = None;
        let step = Step::Request(&body, result.is_ok(), at);
        self.after(mark, step);
        if let Some((key, name)) = self.current.take() {
            self.pending.entry(key).or_default().push(name);
        }
        let answer = self.answer.take();
        self.check_answer(at, &body, answer, ran);
        result
    }

    /// What a request answered at once says about who asked (the reply's own checks are
    /// in `check_reply`).
    fn check_answer(
        &mut self,
        at: ALink,
        body: &RequestBody,
        answer: Option<(ReplyBody, usize)>,
        worker_ran: bool,
    ) {
        let Some((reply, _)) = answer else {
            return;
        };
        let own = at.user().map(|u| u.0);
        match (body, &reply) {
            (RequestBody::Release { handle }, ReplyBody::Done) => {
                self.released.insert(*handle);
            }
            (RequestBody::Retire, ReplyBody::Done) => {
                let uid = at.uid().expect("only a worker retires");
                let unreleased: Vec<&Handle> = self
                    .issued
                    .iter()
                    .filter(|(h, pid)| {
                        let c = &self.children[*pid];
                        c.uid == uid && !c.orphaned && !self.released.contains(h)
                    })
                    .map(|(h, _)| h)
                    .collect();
                assert!(
                    unreleased.is_empty(),
                    "the {at:?} worker retired with handles {unreleased:?} unreleased"
                );
                self.slot_mut(at).retired = true;
            }
            (
                RequestBody::SetSecret { credential, .. }
                | RequestBody::DeleteSecret { credential, .. }
                | RequestBody::ListSecrets { credential },
                ReplyBody::Done | ReplyBody::Names(_),
            ) => {
                let api = self
                    .api_user(credential)
                    .expect("secrets with a credential that is no API user's");
                assert_eq!(
                    Some(api.unix_user),
                    own,
                    "{}'s secrets on the {at:?} link",
                    api.name
                );
            }
            (RequestBody::ListAll { credential, .. }, ReplyBody::Handles { .. }) => {
                assert!(
                    credential == ADMIN_TOKEN || self.api_user(credential).is_some_and(|u| u.admin),
                    "ListAll for a credential that is no admin's"
                );
            }
            (RequestBody::OpenWorker { start, .. }, ReplyBody::Connection) => {
                assert!(*start || worker_ran, "a worker started without `start`");
                assert!(
                    worker_ran || !self.broker.shutting_down,
                    "a worker started while shutting down"
                );
            }
            (RequestBody::OpenWorkerAnonymous { .. }, ReplyBody::Connection) => {
                assert!(worker_ran, "an anonymous connection started a worker");
            }
            _ => {}
        }
    }

    /// A valid, unrevoked API user's credential.
    fn api_user(&self, credential: &str) -> Option<&'static ApiUserDef> {
        API_USERS
            .iter()
            .find(|u| u.token == credential && !self.revoked.contains(&u.id))
    }

    /// The link failed as `supervise::link_failed` and `workers::worker_link_failed`
    /// handle it: counted, audited, the link dropped; nothing more is read from it (its
    /// process comes back with a `NewLink`).
    fn violation(&mut self, at: ALink, what: &str) {
        self.violations += 1;
        self.broker.stats.protocol_violations += 1;
        self.broker.audit.record(
            "violation",
            serde_json::json!({ "what": table::clip(what, 512), "pid": 1, "link": format!("{at:?}") }),
        );
        assert!(self.slot(at).link.is_some(), "a link failed twice");
        self.disconnect(at, "protocol violation");
    }

    /// Something that happens between frames.
    pub fn control(&mut self, op: Op) {
        let mark = self.mark();
        // Events this step must send to every welcomed link, or to one.
        let mut expect_everywhere = None;
        let mut expect_exit = None;
        if let Some(t) = &mut self.tally {
            let what = format!("{op:?}");
            let what = what.split([' ', '(']).next().unwrap_or("").to_string();
            *t.entry(format!("control: {what}")).or_default() += 1;
        }
        match op {
            Op::Check => self.check(),
            Op::Children(c) => {
                self.os.0.borrow_mut().children = match c {
                    AChild::Execs => ChildScript::Execs,
                    AChild::Hangs => ChildScript::Hangs,
                    AChild::Fails { stage, errno } => ChildScript::Reports(ChildReport::Failed {
                        stage: STAGES[stage as usize % STAGES.len()],
                        errno,
                    }),
                    AChild::Dir => ChildScript::Reports(ChildReport::Dir {
                        dev: 1,
                        ino: 2,
                        uid: 4242,
                    }),
                }
            }
            Op::Exit { child, status } => {
                let live: Vec<i32> = self
                    .children
                    .iter()
                    .filter(|(_, c)| !c.exited)
                    .map(|(p, _)| *p)
                    .collect();
                if !live.is_empty() {
                    let pid = live[child as usize % live.len()];
                    let c = self.children.get_mut(&pid).expect("listed");
                    c.exited = true;
                    // An executor whose spawn was answered, not released: its user's
                    // worker hears of its exit if it has said Hello.
                    if let (Some(handle), false) = (c.handle, c.orphaned) {
                        let uid = c.uid;
                        if !self.released.contains(&handle) {
                            expect_exit = self
                                .worker_of(uid)
                                .filter(|(_, l)| self.ready(*l))
                                .map(|(_, l)| (handle, l));
                        }
                    }
                    self.reap(pid, status);
                }
            }
            // Below the double's pids (10 001 up): never one of the broker's own.
            Op::StrayExit(n) => self.reap(i32::from(n) + 2, AStatus::Code(0)),
            Op::Gone(child) => {
                let pids: Vec<i32> = self.children.keys().copied().collect();
                if !pids.is_empty() {
                    let pid = pids[child as usize % pids.len()];
                    self.os.0.borrow_mut().gone.push(pid);
                }
            }
            Op::Expire => self.expire(),
            Op::NewLink(at) => {
                self.disconnect(at, "fuzz");
                self.connect(at);
            }
            Op::Close(at) => self.disconnect(at, "fuzz"),
            Op::On(at) => self.on = at,
            Op::Shutdown => {
                if !self.broker.shutting_down {
                    let grace = self.broker.policy.shutdown_grace_secs;
                    self.broker.audit.record(
                        "shutdown",
                        serde_json::json!({ "executors": self.broker.handles.live_count(), "grace_secs": grace }),
                    );
                    self.broker.shutting_down = true;
                    self.broker
                        .send_event(Target::All, Event::ShuttingDown { grace_secs: grace });
                    expect_everywhere = Some("ShuttingDown");
                }
            }
            Op::SignalAll { kill } => {
                let signal = if kill { Signal::Kill } else { Signal::Term };
                handles::signal_all(&mut self.broker, signal);
            }
            Op::Revoke(i) => {
                let u = &API_USERS[i as usize % API_USERS.len()];
                if !self.revoked.contains(&u.id) {
                    self.broker
                        .credentials
                        .store
                        .update(|s| {
                            s.users.retain(|x| x.id != u.id);
                            Ok(())
                        })
                        .expect("update the user store");
                    self.revoked.push(u.id);
                    expect_everywhere = Some("Revoked");
                }
                session::check_revocations(&mut self.broker);
            }
        }
        self.after(mark, Step::Control(op));
        if let Some(what) = expect_everywhere {
            let mut got: Vec<u64> = self
                .events
                .iter()
                .filter(|(_, w)| *w == what)
                .map(|(l, _)| *l)
                .collect();
            got.sort();
            let ready: Vec<u64> = self
                .broker
                .peers
                .keys()
                .copied()
                .filter(|l| self.ready(*l))
                .collect();
            assert_eq!(got, ready, "{what} to links {got:?}, welcomed: {ready:?}");
        }
        if let Some((handle, link)) = expect_exit {
            assert!(
                self.events.contains(&(link, "Exited")),
                "the exit of handle {handle:?} was not sent to its worker's link {link}"
            );
        }
    }

    /// The loop's look at the report pipes.
    fn check(&mut self) {
        launch::check_starting(&mut self.broker);
        dirs::check_probes(&mut self.broker);
        handles::check_signallers(&mut self.broker);
        login::check_logins(&mut self.broker);
    }

    /// Every start and probe deadline passes; the loop looks.
    fn expire(&mut self) {
        let now = Instant::now();
        for (_, e) in self.broker.handles.iter_mut() {
            if let Life::Starting(s) = &mut e.life {
                s.deadline = now;
            }
        }
        for p in &mut self.broker.probes {
            p.deadline = now;
        }
        for s in &mut self.broker.signallers {
            s.deadline = now;
        }
        for c in &mut self.broker.login_checks {
            c.deadline = now;
        }
        self.check();
    }

    /// `pid` ends; the loop reaps it (SIGCHLD).
    fn reap(&mut self, pid: i32, status: AStatus) {
        let status = match status {
            AStatus::Code(c) => ExitStatus::Code(c),
            AStatus::Signal(s) => ExitStatus::Signal(s),
        };
        self.os.0.borrow_mut().exits.push((pid, status));
        for (pid, st) in self.broker.os.reap() {
            handles::on_reaped(&mut self.broker, pid, st);
        }
    }

    /// The end of an input: every deadline passes, so every request must be answered.
    pub fn finish(&mut self) {
        let mark = self.mark();
        self.expire();
        self.after(mark, Step::Control(Op::Expire));
        assert!(
            self.broker.handles.starting().is_empty(),
            "a spawn still starting"
        );
        assert!(
            self.broker.probes.is_empty(),
            "a directory check still running"
        );
        let mut unanswered: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, names)| !names.is_empty())
            .collect();
        unanswered.sort();
        assert!(
            unanswered.is_empty(),
            "requests never answered (link, id): {unanswered:?}"
        );
        self.check_audit();
    }

    fn check_audit(&self) {
        let text = std::fs::read(self.dir.join("audit.jsonl")).expect("audit log");
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(
                line.len() <= MAX_AUDIT_LINE,
                "an audit line of {} bytes: {}",
                line.len(),
                String::from_utf8_lossy(&line[..200])
            );
            let v: serde_json::Value = serde_json::from_slice(line).expect("an audit line is JSON");
            assert!(v.is_object());
        }
    }

    fn mark(&self) -> Mark {
        let s = self.os.0.borrow();
        Mark {
            calls: s.calls.len(),
            next_pid: s.next_pid,
        }
    }

    /// The checks of one step: what it queued, the connections it opened, then what it
    /// asked the OS.
    fn after(&mut self, mark: Mark, step: Step<'_>) {
        self.events.clear();
        for out in std::mem::take(&mut self.broker.outbox) {
            self.message(out);
        }
        let connects = std::mem::take(&mut self.broker.connects);
        self.check_connects(step, connects);
        let (calls, next_pid) = {
            let s = self.os.0.borrow();
            (s.calls[mark.calls..].to_vec(), s.next_pid)
        };
        let mut pids = mark.next_pid + 1..=next_pid;
        let mut started = 0;
        for call in &calls {
            match call {
                Call::Launch {
                    user,
                    program,
                    cwd,
                    cwd_id,
                    secrets,
                    ..
                } => {
                    let Step::Request(RequestBody::Spawn(req), ok, at) = step else {
                        panic!("a launch outside a Spawn: {call:?}");
                    };
                    assert!(ok, "a Spawn that was a violation launched");
                    assert_eq!(
                        at.user().map(|u| u.0),
                        Some(user.as_str()),
                        "{user} launched from the {at:?} link"
                    );
                    assert_eq!(
                        (user, program, cwd, cwd_id),
                        (&req.unix_user, &req.program, &req.cwd, &req.cwd_id),
                        "launched something else than asked"
                    );
                    let uid = self.check_launch(req, secrets.len());
                    let pid = pids.next().expect("a pid for the launch");
                    self.children.insert(
                        pid,
                        Child {
                            kind: Kind::Executor,
                            uid,
                            handle: None,
                            orphaned: false,
                            exited: false,
                        },
                    );
                    self.launches += 1;
                    started += 1;
                }
                Call::StartProbe { user, path } => {
                    let Step::Request(
                        RequestBody::CheckDir {
                            credential,
                            unix_user,
                            path: asked,
                        },
                        ok,
                        at,
                    ) = step
                    else {
                        panic!("a probe outside a CheckDir: {call:?}");
                    };
                    assert!(ok, "a CheckDir that was a violation started a probe");
                    assert_eq!(
                        at.user().map(|u| u.0),
                        Some(user.as_str()),
                        "{user}'s directory checked from the {at:?} link"
                    );
                    assert_eq!((user, path), (unix_user, asked));
                    assert!(
                        path.starts_with('/')
                            && path.len() <= limits::MAX_PATH_BYTES
                            && !path.contains('\0'),
                        "probe of path {:?}",
                        table::clip(path, 64)
                    );
                    let uid = self.check_user(user, credential);
                    let pid = pids.next().expect("a pid for the probe");
                    self.children.insert(
                        pid,
                        Child {
                            kind: Kind::Probe,
                            uid,
                            handle: None,
                            orphaned: false,
                            exited: false,
                        },
                    );
                    started += 1;
                }
                Call::StartLoginCheck { user } => {
                    // Only the front logs anyone in, and only with a `Login`.
                    let Step::Request(RequestBody::Login { username, .. }, ok, at) = step else {
                        panic!("a password check outside a Login: {call:?}");
                    };
                    assert!(ok, "a Login that was a violation started a check");
                    assert!(at.user().is_none(), "a password check from a worker link");
                    assert_eq!(user, username);
                    let pid = pids.next().expect("a pid for the password check");
                    self.children.insert(
                        pid,
                        Child {
                            kind: Kind::LoginCheck,
                            uid: 0,
                            handle: None,
                            orphaned: false,
                            exited: false,
                        },
                    );
                    started += 1;
                }
                Call::SignalGroup { uid, pgid, .. } => {
                    if let Step::Request(body, ok, at) = step {
                        assert!(
                            ok && matches!(body, RequestBody::Kill { .. }),
                            "{call:?} for a {}",
                            table::name(body)
                        );
                        assert_eq!(Some(*uid), at.uid(), "{call:?} from the {at:?} link");
                    }
                    let child = self
                        .children
                        .get(pgid)
                        .unwrap_or_else(|| panic!("{call:?}: not a child of the broker"));
                    assert_eq!(child.kind, Kind::Executor, "{call:?}: a probe");
                    assert!(
                        child.handle.is_some(),
                        "{call:?}: it never reported its exec"
                    );
                    assert!(
                        !child.exited,
                        "{call:?}: after its exit was reaped ({step:?})"
                    );
                    assert_eq!(*uid, child.uid, "{call:?}: not as its owner");
                    assert!(*uid != 0 && *uid != SERVICE_UID);
                }
                Call::CgroupPrepare { uid } => {
                    assert!(
                        matches!(step, Step::Request(RequestBody::Spawn(_), true, at) if at.uid() == Some(*uid)),
                        "{call:?} outside a Spawn on its user's worker"
                    );
                    assert!(*uid != 0 && *uid != SERVICE_UID);
                }
                Call::KillPidfd => {
                    assert!(
                        matches!(step, Step::Control(_)),
                        "a pidfd killed by a request"
                    );
                }
                Call::LookupUser(_) | Call::CgroupKill | Call::CgroupFinish => {}
            }
        }
        assert!(started <= 1 || matches!(step, Step::Control(_)));
        assert!(
            pids.next().is_none(),
            "a child started without a launch call"
        );
    }

    /// A launched spawn, checked against the request that asked for it; its uid.
    fn check_launch(&self, req: &SpawnRequest, secrets: usize) -> u32 {
        assert!(!self.broker.shutting_down, "a launch while shutting down");
        spawn::validate(req).expect("a launched spawn passes validate");
        assert_within_limits(req);
        for (name, _) in &req.env {
            assert!(
                !self.broker.policy.env_denied(name),
                "{name} got past the env deny-list"
            );
            assert!(!IDENTITY_VARS.contains(&name.as_str()), "{name} overridden");
        }
        let uid = self.check_user(&req.unix_user, &req.credential);
        if req.secrets {
            let owner = std::fs::metadata(&self.dir).expect("state dir").uid();
            let store = UserStore::load(&self.dir, owner).expect("user store");
            let stored = store.secrets.get(&req.unix_user).map_or(0, |m| m.len());
            assert_eq!(secrets, stored, "secrets handed on");
        } else {
            assert_eq!(secrets, 0, "secrets without asking");
        }
        let account = self.account(&req.unix_user).expect("a known user");
        check_what_reaches_execve(req, &account, &self.broker.policy.path);
        uid
    }

    /// `user` may be run, and `credential` (valid, unrevoked) may act as them; their uid.
    fn check_user(&self, user: &str, credential: &str) -> u32 {
        let a = self
            .account(user)
            .unwrap_or_else(|| panic!("{user:?} is not a known user"));
        assert!(
            allowed(a.uid, a.gid, &a.groups),
            "{user} (uid {}, gid {}, groups {:?}) was run",
            a.uid,
            a.gid,
            a.groups
        );
        if credential != ADMIN_TOKEN {
            let api = API_USERS
                .iter()
                .find(|u| u.token == credential)
                .expect("run with an invalid credential");
            assert!(!self.revoked.contains(&api.id), "run with a revoked token");
            assert!(
                api.admin || api.unix_user == user,
                "{} acted as {user}",
                api.name
            );
        }
        a.uid
    }

    /// The connections a step opened: one per `Connection` reply to an `OpenWorker` (for
    /// the credential's principal) or `OpenWorkerAnonymous` (for nobody) on the front, for
    /// an allowed user; none otherwise.
    fn check_connects(&mut self, step: Step<'_>, connects: Vec<Connect>) {
        let connection = matches!(self.answer, Some((ReplyBody::Connection, _)));
        let (Step::Request(body, true, ALink::Front), true) = (step, connection) else {
            assert!(connects.is_empty(), "a connection opened by {step:?}");
            return;
        };
        assert_eq!(
            connects.len(),
            1,
            "{} connections for one reply",
            connects.len()
        );
        let c = &connects[0];
        let user = match body {
            RequestBody::OpenWorker {
                credential,
                unix_user,
                ..
            } => {
                self.check_user(unix_user, credential);
                let principal = principal_of(credential);
                // An admin's credential never goes to a worker: a delegated one does.
                if principal.is_admin() {
                    assert!(c.credential.is_none() && c.delegated.is_some(), "admin's");
                } else {
                    assert!(c.credential.is_some() && c.delegated.is_none(), "user's");
                }
                assert!(c.share.is_none());
                assert_eq!(c.principal, Some(principal), "principal");
                unix_user
            }
            RequestBody::OpenShared { credential, object } => {
                // To the owner's running worker, for the grantee, naming the share, with
                // no credential of theirs.
                let share = c
                    .share
                    .as_ref()
                    .expect("a shared connection names its share");
                assert_eq!(&share.object, object);
                let grantee = principal_of(credential);
                assert_eq!(grantee.unix_user(), Some(share.grantee.as_str()));
                assert_eq!(c.principal.as_ref(), Some(&grantee));
                assert!(c.credential.is_none() && c.delegated.is_none());
                assert!(!c.start, "a share starts no worker");
                assert_eq!(
                    object.strip_prefix('u').and_then(|r| r.split('-').next()),
                    Some(c.account.uid.to_string().as_str()),
                    "a connection to the worker of the object's owner"
                );
                return;
            }
            RequestBody::OpenWorkerAnonymous { unix_user } => {
                assert_eq!(
                    c.principal, None,
                    "an anonymous connection with a principal"
                );
                // Only to a running worker, found by name without a lookup: uid and name
                // are all it carries, and it never starts one.
                assert!(!c.start, "an anonymous connection may start a worker");
                let a = self
                    .account(unix_user)
                    .expect("a connection for a known user");
                assert_eq!(
                    (c.account.uid, &c.account.name),
                    (a.uid, &a.name),
                    "a connection to another user's worker"
                );
                return;
            }
            other => panic!("a connection opened by {}", table::name(other)),
        };
        let a = self.account(user).expect("a connection for a known user");
        assert_eq!(c.account, a, "a connection to another user's worker");
        assert!(
            allowed(a.uid, a.gid, &a.groups),
            "a connection to {user}'s worker"
        );
    }

    fn account(&self, user: &str) -> Option<Account> {
        self.os.0.borrow().users.get(user).cloned()
    }

    /// One message the broker queued for one of its links.
    fn message(&mut self, out: Outgoing) {
        let frame = codec::encode(&out.message);
        assert!(
            frame.is_ok(),
            "the broker queued a message that cannot be sent ({}): {:?}",
            frame.unwrap_err(),
            describe(&out.message)
        );
        let at = *self
            .owners
            .get(&out.link)
            .unwrap_or_else(|| panic!("a message for link {}, never made", out.link));
        match out.message {
            BrokerMessage::Reply { id, body } => self.reply(out.link, id, body, out.fds.len()),
            BrokerMessage::Event(event) => {
                assert!(
                    self.broker.peers.contains_key(&out.link),
                    "an event for the {at:?} link {} that was dropped: {event:?}",
                    out.link
                );
                assert_eq!(
                    self.slot(at).link,
                    Some(out.link),
                    "an event for an old link"
                );
                assert!(self.ready(out.link), "an event before Hello");
                assert!(out.fds.is_empty(), "fds with an event");
                let what = match event {
                    Event::Exited { handle, .. } => {
                        let pid = self
                            .issued
                            .get(&handle)
                            .unwrap_or_else(|| panic!("Exited for unissued handle {handle:?}"));
                        let child = &self.children[pid];
                        assert!(child.exited, "Exited before it was reaped");
                        assert_eq!(
                            at.uid(),
                            Some(child.uid),
                            "Exited of a handle of uid {} to the {at:?} link",
                            child.uid
                        );
                        assert!(!self.slot(at).retired, "Exited to a retired worker");
                        assert!(!self.released.contains(&handle), "Exited after Release");
                        assert!(self.exit_events.insert(handle), "Exited twice");
                        "Exited"
                    }
                    Event::ShuttingDown { .. } => {
                        assert!(self.broker.shutting_down);
                        "ShuttingDown"
                    }
                    Event::Revoked { keys } => {
                        for id in keys {
                            // Log-ins and delegations end by themselves (logout, room).
                            assert!(
                                id & stoa::wire::LOGIN_KEY_BIT != 0 || self.revoked.contains(&id),
                                "user {id} revoked"
                            );
                        }
                        "Revoked"
                    }
                    Event::Connection { .. } => {
                        panic!("a Connection event from a handler (the loop delivers those)")
                    }
                };
                if let Some(t) = &mut self.tally {
                    *t.entry(format!("event: {what} -> {at:?}")).or_default() += 1;
                }
                self.events.push((out.link, what));
            }
        }
    }

    fn reply(&mut self, link: u64, id: u64, body: ReplyBody, fds: usize) {
        // A reply queued while a request is dispatched answers that one (ids may repeat:
        // an earlier request with the same id is answered only by a later step).
        let name = match self.current {
            Some((key, name)) if key == (link, id) => {
                assert!(
                    answers(name, &body),
                    "{} answers a {name}",
                    describe_body(&body)
                );
                self.current = None;
                self.answer = Some((body.clone(), fds));
                name
            }
            _ => self.waiting(link, id, &body),
        };
        if let Some(t) = &mut self.tally {
            *t.entry(format!("{name} -> {}", describe_body(&body)))
                .or_default() += 1;
        }
        self.check_reply(body, fds, link);
    }

    /// The waiting request on `link` with `id` that `body` answers, taken off the list.
    fn waiting(&mut self, link: u64, id: u64, body: &ReplyBody) -> &'static str {
        let names = self.pending.get_mut(&(link, id)).unwrap_or_else(|| {
            panic!("a reply to request {id} on link {link}, never dispatched there")
        });
        let at = names
            .iter()
            .position(|n| answers(n, body))
            .unwrap_or_else(|| {
                panic!(
                    "{} answers none of {names:?} (request {id} on link {link})",
                    describe_body(body)
                )
            });
        names.remove(at)
    }

    fn check_reply(&mut self, body: ReplyBody, fds: usize, link: u64) {
        let at = self.owners[&link];
        match body {
            ReplyBody::Spawned(info) => {
                assert_eq!(fds, info.fds.count(), "fds of {:?}", info.fds);
                let child = self
                    .children
                    .get_mut(&info.pid)
                    .expect("Spawned names a child the broker launched");
                assert_eq!(child.kind, Kind::Executor);
                assert_eq!(child.uid, info.uid);
                assert_eq!(Some(child.uid), at.uid(), "Spawned to the {at:?} link");
                assert!(child.handle.is_none(), "one child, two handles");
                child.handle = Some(info.handle);
                // The broker ends a run whose worker went before it was answered.
                child.orphaned = !self.broker.peers.contains_key(&link);
                assert!(
                    self.issued.insert(info.handle, info.pid).is_none(),
                    "handle {:?} issued twice",
                    info.handle
                );
            }
            ReplyBody::Adopted(info) => {
                assert_eq!(fds, info.fds.count(), "fds of {:?}", info.fds);
                let pid = self
                    .issued
                    .get(&info.handle)
                    .expect("adopted an issued handle");
                // A reaped run is adopted for its output, with its exit.
                if info.exited.is_some() {
                    assert!(self.children[pid].exited, "an exit the child did not have");
                }
                assert_eq!(
                    Some(self.children[pid].uid),
                    at.uid(),
                    "adopted by the {at:?} link"
                );
            }
            ReplyBody::Handles { list, .. } => {
                assert_eq!(fds, 0);
                for info in list {
                    let pid = self
                        .issued
                        .get(&info.handle)
                        .unwrap_or_else(|| panic!("listed {info:?}"));
                    // A worker sees its own user's; the front (`ListAll`) everyone's.
                    if let Some(uid) = at.uid() {
                        assert_eq!(self.children[pid].uid, uid, "listed to the {at:?} link");
                    }
                }
            }
            ReplyBody::Connection => {
                assert_eq!(at, ALink::Front, "a connection to the {at:?} link");
                assert_eq!(fds, 1, "a connection with {fds} fds");
            }
            _ => assert_eq!(fds, 0, "fds with {}", describe_body(&body)),
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

/// Whether `body` may answer a request called `name`.
fn answers(name: &str, body: &ReplyBody) -> bool {
    let error = matches!(body, ReplyBody::Error(_));
    match name {
        "Hello" => matches!(body, ReplyBody::Welcome(_)),
        "Ready" | "Release" => matches!(body, ReplyBody::Done),
        "Authenticate" => error || matches!(body, ReplyBody::Principal(_)),
        "Spawn" => error || matches!(body, ReplyBody::Spawned(_)),
        "CheckDir" => error || matches!(body, ReplyBody::Dir(_)),
        "SetSecret" | "DeleteSecret" | "Kill" => error || matches!(body, ReplyBody::Done),
        "ListSecrets" => error || matches!(body, ReplyBody::Names(_)),
        "ListHandles" => matches!(body, ReplyBody::Handles { .. }),
        "Adopt" => error || matches!(body, ReplyBody::Adopted(_)),
        "Stats" => matches!(body, ReplyBody::Stats(_)),
        "OpenWorker" | "OpenWorkerAnonymous" => error || matches!(body, ReplyBody::Connection),
        "ListAll" => error || matches!(body, ReplyBody::Handles { .. }),
        "Retire" => error || matches!(body, ReplyBody::Done),
        "Login" => error || matches!(body, ReplyBody::LoggedIn { .. }),
        "Logout" | "Unshare" | "CloseStdin" => matches!(body, ReplyBody::Done),
        "RecordApproval" => error || matches!(body, ReplyBody::Done),
        "RunSecrets" => error || matches!(body, ReplyBody::Secrets(_)),
        "Share" => error || matches!(body, ReplyBody::Done),
        "ListShares" => error || matches!(body, ReplyBody::Shares(_)),
        "OpenShared" => error || matches!(body, ReplyBody::Connection),
        _ => false,
    }
}

/// The kind of `at`'s link, as the loop makes it.
pub fn kind_of(at: ALink) -> PeerKind {
    match at.user() {
        None => PeerKind::Front,
        Some((name, uid)) => PeerKind::Worker {
            uid,
            name: name.into(),
        },
    }
}

/// What `at`'s link may send at all, restated from the request table (`Who`).
pub fn may_send(at: ALink, name: &str) -> bool {
    let front = matches!(
        name,
        "Hello"
            | "Ready"
            | "Stats"
            | "Authenticate"
            | "OpenWorker"
            | "OpenWorkerAnonymous"
            | "ListAll"
            | "Login"
            | "Logout"
            | "ListShares"
            | "OpenShared"
    );
    let worker = matches!(
        name,
        "Hello"
            | "Ready"
            | "Stats"
            | "Spawn"
            | "CheckDir"
            | "SetSecret"
            | "DeleteSecret"
            | "ListSecrets"
            | "Kill"
            | "Release"
            | "ListHandles"
            | "Adopt"
            | "Retire"
            | "Share"
            | "Unshare"
            | "CloseStdin"
            | "RecordApproval"
            | "RunSecrets"
    );
    match at {
        ALink::Front => front,
        _ => worker,
    }
}

/// The handle a request names, if it names one.
fn handle_named(body: &RequestBody) -> Option<Handle> {
    match body {
        RequestBody::Kill { handle, .. }
        | RequestBody::Release { handle }
        | RequestBody::Adopt { handle }
        | RequestBody::CloseStdin { handle } => Some(*handle),
        _ => None,
    }
}

/// The principal a valid credential is (the admin token, or an API user).
fn principal_of(credential: &str) -> Principal {
    if credential == ADMIN_TOKEN {
        return Principal::Admin;
    }
    let u = API_USERS
        .iter()
        .find(|u| u.token == credential)
        .expect("a known credential");
    Principal::User {
        id: u.id,
        name: u.name.into(),
        unix_user: u.unix_user.into(),
        admin: u.admin,
    }
}

/// A reply without its particulars, for messages and the tally.
pub fn describe_body(body: &ReplyBody) -> String {
    match body {
        ReplyBody::Error(e) => match &e.kind {
            stoa::wire::ErrorKind::Refused { rule } => format!("Refused({rule})"),
            k => format!("{k:?}"),
        },
        ReplyBody::Handles { list, more } => format!("Handles({}, more: {more})", list.len()),
        other => format!("{other:?}")
            .split(['(', ' '])
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

fn describe(m: &BrokerMessage) -> String {
    match m {
        BrokerMessage::Reply { id, body } => format!("reply {id}: {}", describe_body(body)),
        BrokerMessage::Event(e) => format!("{e:?}"),
    }
}

/// A reason without its particulars (quoted values, numbers).
pub fn gist(why: &str) -> String {
    why.split(['"', '{', '('])
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(48)
        .collect::<String>()
        .trim()
        .to_string()
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Request(body, ok, at) => {
                write!(f, "{} on the {at:?} link (ok: {ok})", table::name(body))
            }
            Step::Control(op) => write!(f, "{op:?}"),
        }
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, non-empty (so no `=` and no NUL).
pub fn valid_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0] == b'_' || b[0].is_ascii_alphabetic())
        && b.iter().all(|c| *c == b'_' || c.is_ascii_alphanumeric())
}

/// Every limit in `wire::limits`, restated: what was launched must obey them.
pub fn assert_within_limits(req: &SpawnRequest) {
    assert!(req.credential.len() <= limits::MAX_CREDENTIAL_BYTES);
    let u = &req.unix_user;
    assert!(
        !u.is_empty() && u.len() <= limits::MAX_NAME_BYTES,
        "unix_user length {}",
        u.len()
    );
    assert!(
        u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !u.starts_with('-'),
        "unix_user {u:?}"
    );
    if let Program::Exec { argv } = &req.program {
        assert!(!argv.is_empty() && argv.len() <= limits::MAX_ARGS);
        assert!(!argv[0].is_empty(), "empty argv[0]");
        let mut total = 0usize;
        for a in argv {
            assert!(
                a.len() <= limits::MAX_ARG_BYTES,
                "argument of {} bytes",
                a.len()
            );
            assert!(!a.contains('\0'), "NUL in an argument");
            total += a.len() + 1;
        }
        assert!(total <= limits::MAX_ARGV_BYTES, "argv of {total} bytes");
    }
    if let Some(cwd) = &req.cwd {
        assert!(cwd.starts_with('/'), "relative cwd");
        assert!(
            cwd.len() <= limits::MAX_PATH_BYTES,
            "cwd of {} bytes",
            cwd.len()
        );
        assert!(!cwd.contains('\0'), "NUL in cwd");
    }
    assert!(
        req.env.len() <= limits::MAX_ENV_VARS,
        "{} env vars",
        req.env.len()
    );
    let mut env_bytes = 0usize;
    for (name, value) in &req.env {
        assert!(valid_env_name(name), "env name {name:?}");
        assert!(!value.contains('\0'), "NUL in env value of {name}");
        env_bytes += name.len() + value.len() + 2;
    }
    assert!(
        env_bytes <= limits::MAX_ENV_BYTES,
        "env of {env_bytes} bytes"
    );
    if let Some(ws) = req.tty {
        for d in [ws.rows, ws.cols] {
            assert!((1..=limits::MAX_TTY_DIMENSION).contains(&d), "tty {ws:?}");
        }
        assert!(
            (limits::MIN_RING_BYTES..=limits::MAX_RING_BYTES).contains(&req.ring_bytes),
            "a ring of {} bytes",
            req.ring_bytes
        );
    } else {
        assert_eq!(req.ring_bytes, 0, "a ring without a tty");
    }
}

/// A launched spawn, followed to the strings it hands the kernel and the executor.
fn check_what_reaches_execve(req: &SpawnRequest, account: &Account, path: &str) {
    let env = spawn::environment(account, req, path);
    // Nothing dropped (environment() silently skips entries with a NUL), no duplicate
    // names, identity variables from the account, the request's other variables as sent
    // (the last of a repeated name wins).
    let mut names: Vec<String> = Vec::new();
    for entry in &env {
        let bytes = entry.as_bytes();
        let eq = bytes
            .iter()
            .position(|b| *b == b'=')
            .expect("an environment entry without '='");
        let name = std::str::from_utf8(&bytes[..eq]).expect("utf-8 name");
        assert!(valid_env_name(name), "environment name {name:?}");
        assert!(!names.iter().any(|n| n == name), "{name} set twice");
        names.push(name.to_string());
        let value = &bytes[eq + 1..];
        let expect: Option<Vec<u8>> = match name {
            "HOME" => Some(account.home.display().to_string().into_bytes()),
            "USER" | "LOGNAME" => Some(account.name.clone().into_bytes()),
            "SHELL" => Some(account.shell.display().to_string().into_bytes()),
            "PATH" => Some(path.as_bytes().to_vec()),
            _ => req
                .env
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone().into_bytes()),
        };
        if let Some(expect) = expect {
            assert_eq!(value, &expect[..], "value of {name}");
        }
    }
    for (name, _) in &req.env {
        assert!(
            names.contains(name),
            "{name} was dropped from the environment"
        );
    }
    for base in IDENTITY_VARS.iter().chain(&["TERM", "LANG"]) {
        assert!(names.iter().any(|n| n == base), "{base} missing");
    }
    // The job the broker writes to the control socket, as the executor reads it back.
    let job = match &req.program {
        Program::Exec { argv } => Job::Exec {
            argv: argv.clone(),
            env: Vec::new(),
        },
        Program::Shell => Job::Shell,
    };
    let frame = codec::encode(&job).expect("a launched spawn's job fits in a frame");
    assert!(frame.len() - HEADER_LEN <= MAX_FRAME);
    let back: Job = codec::read_frame(&mut &frame[..]).expect("the executor reads the job");
    assert_eq!(back, job, "the executor runs what the broker checked");
}
