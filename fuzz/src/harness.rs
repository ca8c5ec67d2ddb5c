//! The real broker without root: `broker::table::dispatch` and the handlers over the
//! recording double of the OS (`broker::os_double`), fed as the broker's loop feeds them
//! (`supervise.rs`, `event_loop.rs`): frames through the real `Link`, decoded, dispatched;
//! between them children report and exit, daemons come and go, shutdown starts. After
//! every step the invariants below are checked against what the broker asked the OS to do
//! (`RecordingOs::calls`) and what it queued for the daemon (`Broker::outbox`).
//!
//! * Nothing before Hello, Hello once; a violation ends the link (the input stops feeding
//!   it) and leaves nothing launched, probed or signalled by that request.
//! * A `Launch` only for a `Spawn` whose every field `spawn::validate` and `wire::limits`
//!   allow (restated here), with no variable the policy's env deny-list names, for a user
//!   the policy allows (never uid 0, the service user, a root-group or low uid), by a
//!   valid, unrevoked credential that may act as that user, not while shutting down, with
//!   that user's secrets only; its environment and job are what was checked.
//! * A `StartProbe` only for a `CheckDir` of such a user, with an absolute bounded path.
//! * A `SignalGroup` only for an executor that reported its exec and whose exit was not fed
//!   yet, as its own uid; nothing is adopted after its exit.
//! * Every message fits in a frame; every reply answers a request that was dispatched on
//!   its link without a violation, with a body of that request's kind and the fds its
//!   layout says, exactly once (at the end every deadline passes, so everything is
//!   answered); events go to the current, welcomed link, `Exited` once per handle.
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

use stoa::broker::handlers::{dirs, handles, launch, session};
use stoa::broker::handles::Life;
use stoa::broker::os_double::{broker_for_tests, Call, ChildScript, RecordingOs};
use stoa::broker::policy::IDENTITY_VARS;
use stoa::broker::spawn::{self, Account};
use stoa::broker::users::{digest_hex, ApiUser, UserStore};
use stoa::broker::{table, Broker, LinkState, Outgoing};
use stoa::wire::{
    limits, BrokerMessage, Event, ExitStatus, Handle, Program, ReplyBody, Request, RequestBody,
    Signal, SpawnRequest, PROTOCOL_VERSION,
};
use stoa_executor::codec::{self, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::Job;
use stoa_executor::sys::{ChildReport, ChildStage};

use crate::arb::{AChild, AStatus, Op};
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
        secrets: BTreeMap::new(),
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
    /// A request, dispatched with this result.
    Request(&'a RequestBody, bool),
    Control(Op),
}

pub struct Harness {
    pub broker: Broker,
    pub os: RecordingOs,
    pub dir: PathBuf,
    /// The current daemon's link; `None` once it failed (nothing more is fed to it), and
    /// while it is being fed.
    feeder: Option<Feeder>,
    /// The current link failed.
    dead: bool,
    seed: u8,
    /// Requests dispatched without a violation and not yet answered, by (link, id).
    pending: HashMap<(u64, u64), Vec<&'static str>>,
    /// The request being dispatched, until it is answered.
    current: Option<((u64, u64), &'static str)>,
    children: BTreeMap<i32, Child>,
    /// Handles answered `Spawned`, and their pids.
    issued: HashMap<Handle, i32>,
    exit_events: HashSet<Handle>,
    revoked: Vec<u64>,
    /// Counts of what happened (`outcomes` example); `None` while fuzzing.
    pub tally: Option<BTreeMap<String, usize>>,
    pub violations: usize,
    pub launches: usize,
}

impl Harness {
    /// A broker over a fresh double, its first daemon link open (not yet welcomed).
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
        Harness {
            broker,
            os,
            dir,
            feeder: Some(Feeder::new()),
            dead: false,
            seed: 0,
            pending: HashMap::new(),
            current: None,
            children: BTreeMap::new(),
            issued: HashMap::new(),
            exit_events: HashSet::new(),
            revoked: Vec::new(),
            tally: None,
            violations: 0,
            launches: 0,
        }
    }

    /// One `broker_requests` input: frame records go through the link (consecutive ones
    /// as one stream, split as `seed` says), control records happen in between; then every
    /// deadline passes and the final checks run.
    pub fn run(&mut self, seed: u8, recs: &[Record<'_>]) {
        self.seed = seed;
        let mut stream = Vec::new();
        for r in recs {
            match r {
                Record::Control(op) => {
                    self.feed(&std::mem::take(&mut stream));
                    self.control(*op);
                }
                r => stream.extend_from_slice(&records::frame(r)),
            }
        }
        self.feed(&stream);
        self.finish();
    }

    /// Whether the current link still takes frames.
    pub fn link_alive(&self) -> bool {
        !self.dead
    }

    /// Bytes through the current link, each payload decoded and dispatched as the
    /// broker's `read_daemon` does; a dead link reads nothing.
    pub fn feed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let Some(mut feeder) = self.feeder.take() else {
            return;
        };
        let mut failed = None;
        let end = feeder.feed(bytes, self.seed, |batch| {
            for payload in batch {
                if let Err(why) = self.payload(payload) {
                    failed = Some(why);
                    return false;
                }
            }
            true
        });
        match end {
            FeedEnd::Done => self.feeder = Some(feeder),
            FeedEnd::Stopped => self.violation(&failed.expect("stopped on a violation")),
            FeedEnd::Failed(what) => {
                if let Some(t) = &mut self.tally {
                    *t.entry(format!("link: {}", gist(&what))).or_default() += 1;
                }
                self.violation(&what)
            }
        }
    }

    /// One payload off the link. `Err`: a violation (the link is dropped).
    fn payload(&mut self, payload: &[u8]) -> Result<(), String> {
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
        self.request(request)
    }

    /// One decoded request through the real dispatcher, then the checks.
    pub fn request(&mut self, request: Request) -> Result<(), String> {
        assert!(self.link_alive(), "a request on a link that failed");
        let mark = self.mark();
        let name = table::name(&request.body);
        let (link, id) = (self.broker.link, request.id);
        let before = self.broker.link_state;
        let id_ok = request
            .request_id
            .as_deref()
            .is_none_or(stoa::wire::valid_request_id);
        let body = request.body.clone();
        let result = table::dispatch(&mut self.broker, request);
        let is_hello = name == "Hello";
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
        self.after(mark, Step::Request(&body, result.is_ok()));
        if let Some((key, name)) = self.current.take() {
            self.pending.entry(key).or_default().push(name);
        }
        result
    }

    /// The link failed as `supervise::link_failed` handles it: counted, audited, the daemon
    /// gone (a new link number); nothing more is read from it.
    fn violation(&mut self, what: &str) {
        self.violations += 1;
        self.broker.stats.protocol_violations += 1;
        self.broker.audit.record(
            "violation",
            serde_json::json!({ "what": table::clip(what, 512), "daemon_pid": 1 }),
        );
        assert!(!self.dead, "a link failed twice");
        self.dead = true;
        self.feeder = None;
        self.daemon_gone();
    }

    fn daemon_gone(&mut self) {
        self.broker.new_link();
        self.broker.audit.record(
            "daemon_down",
            serde_json::json!({ "pid": 1, "reason": "fuzz" }),
        );
    }

    /// Something that happens between frames.
    pub fn control(&mut self, op: Op) {
        let mark = self.mark();
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
                    self.children.get_mut(&pid).expect("listed").exited = true;
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
            Op::NewLink => {
                if !self.dead {
                    self.daemon_gone();
                }
                self.dead = false;
                self.broker.stats.daemon_starts += 1;
                self.broker.new_link();
                self.broker
                    .audit
                    .record("daemon_start", serde_json::json!({ "pid": 1 }));
                self.feeder = Some(Feeder::new());
            }
            Op::Shutdown => {
                if !self.broker.shutting_down {
                    let grace = self.broker.policy.shutdown_grace_secs;
                    self.broker.audit.record(
                        "shutdown",
                        serde_json::json!({ "executors": self.broker.handles.live_count(), "grace_secs": grace }),
                    );
                    self.broker.shutting_down = true;
                    self.broker
                        .send_event(Event::ShuttingDown { grace_secs: grace });
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
                }
                session::check_revocations(&mut self.broker);
            }
        }
        self.after(mark, Step::Control(op));
    }

    /// The loop's look at the report pipes.
    fn check(&mut self) {
        launch::check_starting(&mut self.broker);
        dirs::check_probes(&mut self.broker);
        handles::check_signallers(&mut self.broker);
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

    /// The checks of one step: what it queued, then what it asked the OS.
    fn after(&mut self, mark: Mark, step: Step<'_>) {
        for out in std::mem::take(&mut self.broker.outbox) {
            self.message(out);
        }
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
                } => {
                    let Step::Request(RequestBody::Spawn(req), ok) = step else {
                        panic!("a launch outside a Spawn: {call:?}");
                    };
                    assert!(ok, "a Spawn that was a violation launched");
                    assert_eq!(
                        (user, program, cwd, cwd_id),
                        (&req.unix_user, &req.program, &req.cwd, &req.cwd_id),
                        "launched something else than asked"
                    );
                    let uid = self.check_launch(req, *secrets);
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
                    ) = step
                    else {
                        panic!("a probe outside a CheckDir: {call:?}");
                    };
                    assert!(ok, "a CheckDir that was a violation started a probe");
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
                Call::SignalGroup { uid, pgid, .. } => {
                    if let Step::Request(body, ok) = step {
                        assert!(
                            ok && matches!(body, RequestBody::Kill { .. }),
                            "{call:?} for a {}",
                            table::name(body)
                        );
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
                        matches!(step, Step::Request(RequestBody::Spawn(_), true)),
                        "{call:?} outside a Spawn"
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

    fn account(&self, user: &str) -> Option<Account> {
        self.os.0.borrow().users.get(user).cloned()
    }

    /// One message the broker queued for a daemon.
    fn message(&mut self, out: Outgoing) {
        let frame = codec::encode(&out.message);
        assert!(
            frame.is_ok(),
            "the broker queued a message that cannot be sent ({}): {:?}",
            frame.unwrap_err(),
            describe(&out.message)
        );
        assert!(out.link <= self.broker.link, "a message for a future link");
        match out.message {
            BrokerMessage::Reply { id, body } => self.reply(out.link, id, body, out.fds.len()),
            BrokerMessage::Event(event) => {
                assert_eq!(out.link, self.broker.link, "an event for an old link");
                assert_eq!(
                    self.broker.link_state,
                    LinkState::Ready,
                    "an event before Hello"
                );
                assert!(out.fds.is_empty(), "fds with an event");
                match event {
                    Event::Exited { handle, .. } => {
                        let pid = self
                            .issued
                            .get(&handle)
                            .unwrap_or_else(|| panic!("Exited for unissued handle {handle:?}"));
                        assert!(self.children[pid].exited, "Exited before it was reaped");
                        assert!(self.exit_events.insert(handle), "Exited twice");
                    }
                    Event::ShuttingDown { .. } => assert!(self.broker.shutting_down),
                    Event::Revoked { api_users } => {
                        for id in api_users {
                            assert!(self.revoked.contains(&id), "user {id} revoked");
                        }
                    }
                }
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
        match body {
            ReplyBody::Spawned(info) => {
                assert_eq!(fds, info.fds.count(), "fds of {:?}", info.fds);
                let child = self
                    .children
                    .get_mut(&info.pid)
                    .expect("Spawned names a child the broker launched");
                assert_eq!(child.kind, Kind::Executor);
                assert_eq!(child.uid, info.uid);
                assert!(child.handle.is_none(), "one child, two handles");
                child.handle = Some(info.handle);
                child.orphaned = link != self.broker.link;
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
                assert!(!self.children[pid].exited, "adopted after its exit");
            }
            ReplyBody::Handles { list, .. } => {
                assert_eq!(fds, 0);
                for info in list {
                    assert!(self.issued.contains_key(&info.handle), "listed {info:?}");
                }
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
        _ => false,
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
            Step::Request(body, ok) => write!(f, "{} (ok: {ok})", table::name(body)),
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
