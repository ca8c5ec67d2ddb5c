//! The recording double of [`Os`]: no privilege, no process started. It records every call
//! and answers from a script, with real pipes for the fds and the children's reports, so
//! the real dispatcher ([`super::table::dispatch`]) and handlers run in unit tests and in
//! the `broker_requests` fuzz target exactly as in the broker.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use stoa_executor::sys::{encode_report, CgroupJoin, ChildReport, Started};

use super::cgroup::{JoinFds, SpawnCgroup};
use super::os::{LaunchParams, Os};
use super::policy::{CgroupLimits, Policy};
use super::spawn::{Account, Launched};
use super::{audit, credentials, Broker, Mode};
use crate::wire::{DirId, ExitStatus, FdLayout, LimitHit, Program, Signal, SpawnRequest};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    LookupUser(String),
    Launch {
        user: String,
        program: Program,
        cwd: Option<String>,
        cwd_id: Option<DirId>,
        /// The secrets handed on (names and values: a test double, never a log).
        secrets: Vec<(String, String)>,
        /// The Landlock confinement the child was to apply: (ABI, the paths besides its
        /// working directory).
        confine: Option<(u32, Vec<String>)>,
        /// Whether the child was to be born in a cgroup directory (v2)...
        cgroup_dir: bool,
        /// ...and how many `cgroup.procs` files it was to write (v1).
        cgroup_procs: usize,
    },
    StartProbe {
        user: String,
        path: String,
    },
    /// The log-in helper, for this user name (the password is never recorded).
    StartLoginCheck {
        user: String,
    },
    SignalGroup {
        uid: u32,
        pgid: i32,
        signal: Signal,
    },
    KillPidfd,
    CgroupPrepare {
        uid: u32,
    },
    CgroupKill,
    CgroupFinish,
}

/// How the next children behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildScript {
    /// Reports its exec at once.
    Execs,
    /// Reports this.
    Reports(ChildReport),
    /// Never reports (stopped before exec): the broker's deadline must deal with it.
    Hangs,
}

pub struct Script {
    pub calls: Vec<Call>,
    pub users: HashMap<String, Account>,
    pub next_pid: i32,
    /// What the next `reap` returns.
    pub exits: Vec<(i32, ExitStatus)>,
    pub children: ChildScript,
    /// The write ends of hanging children's report pipes, held open.
    pub held: Vec<OwnedFd>,
    /// Pids whose group is gone (`signal_group` answers ESRCH).
    pub gone: Vec<i32>,
    /// The pid of the last signalling child (from `SIGNALLER_PIDS`).
    pub next_signaller: i32,
    /// Passwords the double's log-in helper accepts, by user name (others: wrong).
    pub passwords: HashMap<String, String>,
    /// The write ends of log-in helpers that never answer (with `ChildScript::Hangs`).
    pub held_answers: Vec<OwnedFd>,
    /// What `landlock` answers (ABI 7 unless a test says otherwise).
    pub landlock: super::confine::Kernel,
    pub cgroups: CgroupScript,
}

/// What the double's `cgroup_prepare` answers, as the real one would on each layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupScript {
    /// Cgroups off: nothing.
    Off,
    /// A `cgroup.procs` file per hierarchy (three).
    V1,
    /// The spawn's cgroup directory.
    V2,
}

/// Where the double's signalling children's pids start.
pub const SIGNALLER_PIDS: i32 = 5_000_000;

#[derive(Clone)]
pub struct RecordingOs(pub Rc<RefCell<Script>>);

impl RecordingOs {
    /// Knows `users` (name, uid); children exec at once.
    pub fn new(users: &[(&str, u32)]) -> RecordingOs {
        let users = users
            .iter()
            .map(|(name, uid)| {
                let account = Account {
                    name: name.to_string(),
                    uid: *uid,
                    gid: *uid,
                    home: PathBuf::from(format!("/home/{name}")),
                    shell: PathBuf::from("/bin/sh"),
                    groups: vec![*uid],
                };
                (name.to_string(), account)
            })
            .collect();
        RecordingOs(Rc::new(RefCell::new(Script {
            calls: Vec::new(),
            users,
            next_pid: 10_000,
            exits: Vec::new(),
            children: ChildScript::Execs,
            held: Vec::new(),
            gone: Vec::new(),
            next_signaller: SIGNALLER_PIDS,
            passwords: HashMap::new(),
            held_answers: Vec::new(),
            landlock: Ok(7),
            cgroups: CgroupScript::Off,
        })))
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.borrow().calls.clone()
    }

    fn record(&self, call: Call) {
        self.0.borrow_mut().calls.push(call);
    }

    /// A child as scripted: its pid, a stand-in pidfd, and its report pipe.
    fn child(&self, report: ChildReport) -> std::io::Result<Started> {
        let mut s = self.0.borrow_mut();
        s.next_pid += 1;
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        // `report` is what a child that does its job says (Execed: nothing, the pipe
        // closes); the script may make it fail or hang instead.
        match s.children {
            ChildScript::Execs => File::from(write).write_all(&encode_report(&report))?,
            ChildScript::Reports(r) => File::from(write).write_all(&encode_report(&r))?,
            ChildScript::Hangs => s.held.push(write),
        }
        Ok(Started {
            pid: s.next_pid,
            pidfd: File::open("/dev/null")?.into(),
            report: read,
            cgroup_join: CgroupJoin::None,
        })
    }
}

fn pipes(n: usize) -> Result<Vec<OwnedFd>, String> {
    (0..n)
        .map(|_| {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map(|(r, _)| r)
                .map_err(|e| e.to_string())
        })
        .collect()
}

impl Os for RecordingOs {
    fn lookup_user(&mut self, name: &str) -> Result<Option<Account>, String> {
        self.record(Call::LookupUser(name.to_string()));
        Ok(self.0.borrow().users.get(name).cloned())
    }

    fn landlock(&self) -> super::confine::Kernel {
        self.0.borrow().landlock.clone()
    }

    fn launch(
        &mut self,
        account: &Account,
        req: &SpawnRequest,
        params: &LaunchParams,
        secrets: Vec<(String, String)>,
        cgroup: &JoinFds,
    ) -> Result<Launched, String> {
        let confine = params.confine.as_ref().map(|c| {
            let paths = c.paths().iter().map(|p| p.to_string_lossy().into_owned());
            (c.abi(), paths.collect())
        });
        self.record(Call::Launch {
            user: account.name.clone(),
            program: req.program.clone(),
            cwd: req.cwd.clone(),
            cwd_id: req.cwd_id,
            secrets,
            confine,
            cgroup_dir: cgroup.dir.is_some(),
            cgroup_procs: cgroup.procs.len(),
        });
        let layout = match req.tty {
            Some(_) => FdLayout::Pty,
            None => FdLayout::Pipes { stdin: req.stdin },
        };
        // Kept: `[control, master, ring]` or `[control, (stdin,) stdout, stderr]`; pipes
        // stand in for every fd, the ring's memfd too.
        let kept = 3 + usize::from(req.keep_stdin);
        Ok(Launched {
            started: self.child(ChildReport::Execed).map_err(|e| e.to_string())?,
            layout,
            for_daemon: pipes(layout.count())?,
            kept: pipes(kept)?,
        })
    }

    fn start_probe(&mut self, account: &Account, path: &str) -> Result<Started, String> {
        self.record(Call::StartProbe {
            user: account.name.clone(),
            path: path.to_string(),
        });
        let report = ChildReport::Dir {
            dev: 1,
            ino: 2,
            uid: account.uid,
        };
        self.child(report).map_err(|e| e.to_string())
    }

    fn start_login_check(&mut self, request: &[u8]) -> Result<super::os::LoginChild, String> {
        let mut fields = request.split(|b| *b == 0);
        let user = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
        let password = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
        let _rhost = fields.next();
        let service_uid: Option<u32> = std::str::from_utf8(fields.next().unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok());
        self.record(Call::StartLoginCheck { user: user.clone() });
        let started = self.child(ChildReport::Execed).map_err(|e| e.to_string())?;
        let (answer, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| e.to_string())?;
        let mut s = self.0.borrow_mut();
        if s.children == ChildScript::Hangs {
            s.held_answers.push(write);
        } else {
            use super::login_helper::Answer;
            // As the helper: root's and the service user's names are refused unchecked.
            let uid = s.users.get(&user).map(|a| a.uid);
            let line = if uid == Some(0) {
                Answer::Refused("root".into())
            } else if uid.is_some() && uid == service_uid {
                Answer::Refused("service-user".into())
            } else if s.passwords.get(&user) == Some(&password) {
                Answer::Ok
            } else {
                Answer::Credentials
            };
            File::from(write)
                .write_all(line.line().as_bytes())
                .map_err(|e| e.to_string())?;
        }
        Ok(super::os::LoginChild { started, answer })
    }

    fn signal_group(
        &mut self,
        account: &Account,
        pgid: i32,
        signal: Signal,
    ) -> nix::Result<Option<Started>> {
        let uid = account.uid;
        self.record(Call::SignalGroup { uid, pgid, signal });
        if self.0.borrow().gone.contains(&pgid) {
            return Err(nix::errno::Errno::ESRCH);
        }
        // A signalling child, from pids of its own (children that `next_pid` counts are
        // launches and probes); it is reaped only when a test or the fuzz target says so.
        let mut s = self.0.borrow_mut();
        s.next_signaller += 1;
        let (report, _) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let pidfd = File::open("/dev/null")
            .map_err(|_| nix::errno::Errno::EIO)?
            .into();
        Ok(Some(Started {
            pid: s.next_signaller,
            pidfd,
            report,
            cgroup_join: CgroupJoin::None,
        }))
    }

    fn kill_pidfd(&mut self, _pidfd: BorrowedFd<'_>) {
        self.record(Call::KillPidfd);
    }

    fn reap(&mut self) -> Vec<(i32, ExitStatus)> {
        std::mem::take(&mut self.0.borrow_mut().exits)
    }

    fn cgroup_prepare(
        &mut self,
        uid: u32,
        leaf: &str,
    ) -> Result<Option<(SpawnCgroup, JoinFds)>, String> {
        self.record(Call::CgroupPrepare { uid });
        let spawn = SpawnCgroup::at(vec![PathBuf::from(format!("/double/user-{uid}/{leaf}"))]);
        match self.0.borrow().cgroups {
            CgroupScript::Off => Ok(None),
            CgroupScript::V1 => Ok(Some((
                spawn,
                JoinFds {
                    dir: None,
                    procs: pipes(3)?,
                },
            ))),
            CgroupScript::V2 => {
                // Any directory stands in for the cgroup's.
                let dir = File::open("/").map_err(|e| e.to_string())?;
                Ok(Some((
                    spawn,
                    JoinFds {
                        dir: Some(dir.into()),
                        procs: Vec::new(),
                    },
                )))
            }
        }
    }

    fn cgroup_kill(&mut self, _cgroup: &SpawnCgroup) {
        self.record(Call::CgroupKill);
    }

    fn cgroup_limit_hit(&mut self, _cgroup: &SpawnCgroup) -> Option<LimitHit> {
        None
    }

    fn cgroup_finish(&mut self, _cgroup: SpawnCgroup) {
        self.record(Call::CgroupFinish);
    }

    fn cgroup_report(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn cgroup_set_limits(&mut self, _limits: &CgroupLimits) {}

    fn cgroup_teardown(&mut self) {}

    fn cgroup_retry_leftovers(&mut self) -> bool {
        false
    }
}

/// A broker over `os` with the built-in policy but any uid from 1000 allowed, isolated (service user `stoa`, uid 999),
/// its admin token, user store and audit log in `state_dir` (which must exist, owned by
/// the caller). Returns the broker and the admin token.
pub fn broker_for_tests(os: RecordingOs, state_dir: &Path) -> Result<(Broker, String), String> {
    let euid = nix::unistd::geteuid().as_raw();
    let (credentials, token_path, _) = credentials::Credentials::load_or_create(state_dir, euid)?;
    let token = std::fs::read_to_string(token_path)
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    let audit = audit::Audit::open(&state_dir.join("audit.jsonl"), euid)?;
    let service = Account {
        name: "stoa".into(),
        uid: 999,
        gid: 999,
        home: "/nonexistent".into(),
        shell: "/usr/sbin/nologin".into(),
        groups: vec![999],
    };
    // Users with uids from 1000 are allowed (the test users), nobody below.
    let policy = Policy {
        allow_groups: Vec::new(),
        require: super::policy::Require::Any,
        ..Policy::default()
    };
    let mode = Mode::Isolated { service };
    let mut broker = Broker::new(policy, Vec::new(), mode, credentials, Box::new(os), audit);
    // The requests of a test come on alice's worker link unless it picks another
    // (`test_fixture::Fixture::on_worker`).
    broker.link = broker.add_link(super::PeerKind::Worker {
        uid: 2001,
        name: "alice".into(),
    });
    Ok((broker, token))
}
