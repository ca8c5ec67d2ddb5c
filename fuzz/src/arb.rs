//! Structured requests for `broker_requests`: `arbitrary` mirrors of the wire types whose
//! strings can be long (a fill or a repeated piece) or picked from names that pass the
//! broker's checks, so a few input bytes reach every limit in `wire::limits`; credentials
//! can be the harness's real ones and handles the few an iteration issues. Also the
//! control operations ([`Op`]) that interleave with the frames, and the links ([`ALink`])
//! a request may come on.

use arbitrary::Arbitrary;

use stoa::wire::{
    limits, ApprovalStep, DirId, Handle, Program, Purpose, Request, RequestBody, Signal,
    SpawnRequest, WindowSize, PROTOCOL_VERSION,
};

use crate::harness::{CREDENTIALS, USERS};

/// The processes whose links the harness plays: the front and the workers of alice and
/// bob (the first two users of [`USERS`]).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ALink {
    Front,
    Alice,
    Bob,
}

impl ALink {
    pub const ALL: [ALink; 3] = [ALink::Front, ALink::Alice, ALink::Bob];

    /// The Unix user of a worker's link (`None`: the front's).
    pub fn user(self) -> Option<(&'static str, u32)> {
        match self {
            ALink::Front => None,
            ALink::Alice => Some((USERS[0].name, USERS[0].uid)),
            ALink::Bob => Some((USERS[1].name, USERS[1].uid)),
        }
    }

    pub fn uid(self) -> Option<u32> {
        self.user().map(|(_, uid)| uid)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Bytes of strings one structured request may hold in all: above the largest limit
/// (`MAX_ARGV_BYTES`, 128 KiB), so every limit can be crossed, and small enough to keep
/// an execution cheap.
pub const BUDGET: usize = 192 * 1024;

#[derive(Arbitrary, Debug, Clone)]
pub enum AStr {
    Text(String),
    /// `len` copies of one character (`byte` as a Latin-1 code point; 0 is NUL).
    Fill {
        byte: u8,
        len: u16,
    },
    /// `piece`, `times` times.
    Repeat {
        piece: String,
        times: u16,
    },
}

/// Unix user names: the double's users (see [`USERS`]: allowed, and refused by each rule),
/// then names it does not know.
const OTHER_NAMES: [&str; 3] = ["nosuch", "a.b_c-d", "x"];
const ENV_NAMES: [&str; 12] = [
    "FOO",
    "LANG",
    "TERM",
    "ANTHROPIC_API_KEY",
    "_",
    "A1",
    "LD_PRELOAD",
    "HOME",
    "PATH",
    "STOA_TOKEN",
    "BASH_FUNC_x%%",
    "NODE_OPTIONS",
];

#[derive(Arbitrary, Debug, Clone)]
pub enum AName {
    Known(u8),
    Any(AStr),
}

/// A credential: one of the harness's ([`CREDENTIALS`]: the admin token, API users'
/// tokens, near misses) or anything.
#[derive(Arbitrary, Debug, Clone)]
pub enum ACred {
    Known(u8),
    Any(AStr),
}

/// A handle: mostly one of the first few an iteration issues.
#[derive(Arbitrary, Debug, Clone)]
pub enum AHandle {
    Small(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AEnvName {
    Known(u8),
    Any(AStr),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum APath {
    /// `/` followed by the string.
    Absolute(AStr),
    Any(AStr),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AArgv {
    List(Vec<AStr>),
    /// "sh", then `count` (at most 300) arguments `each`.
    Many {
        count: u16,
        each: AStr,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AEnv {
    List(Vec<(AEnvName, AStr)>),
    /// `prefix0=value`, `prefix1=value`, … (`count` of them, at most 100).
    Many {
        count: u16,
        prefix: AEnvName,
        value: AStr,
    },
}

/// A terminal's output ring: mostly at and around its limits.
#[derive(Arbitrary, Debug, Clone)]
pub enum ARing {
    Zero,
    Min,
    Max,
    BelowMin,
    AboveMax,
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AProgram {
    Exec(AArgv),
    Shell,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct ASpawn {
    pub credential: ACred,
    pub unix_user: AName,
    pub program: AProgram,
    pub cwd: Option<APath>,
    pub cwd_id: Option<(u64, u64, u32)>,
    pub env: AEnv,
    pub tty: Option<(u16, u16)>,
    pub ring: ARing,
    pub stdin: bool,
    pub keep_stdin: bool,
    pub secrets: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AProtocol {
    Current,
    Other(u32),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum ABody {
    Hello(AProtocol),
    Ready,
    Authenticate {
        credential: ACred,
        peer: Option<AStr>,
    },
    Spawn(ASpawn),
    CheckDir {
        credential: ACred,
        unix_user: AName,
        path: APath,
    },
    SetSecret {
        credential: ACred,
        name: AEnvName,
        value: AStr,
    },
    DeleteSecret {
        credential: ACred,
        name: AEnvName,
    },
    ListSecrets(ACred),
    Kill {
        handle: AHandle,
        signal: u8,
    },
    Release(AHandle),
    ListHandles,
    Adopt(AHandle),
    Stats,
    OpenWorker {
        credential: ACred,
        unix_user: AName,
        start: bool,
    },
    OpenWorkerAnonymous(AName),
    ListAll {
        credential: ACred,
        after: Option<AHandle>,
    },
    Retire,
    Login {
        username: AName,
        password: AStr,
        peer: Option<AStr>,
    },
    Logout(ACred),
    ListShares(ACred),
    OpenShared {
        credential: ACred,
        object: AStr,
    },
    Share {
        object: AStr,
        grantee: AName,
        input: bool,
        expires_at: Option<u64>,
    },
    Unshare {
        object: AStr,
        grantee: Option<AName>,
    },
    CloseStdin(AHandle),
    RunSecrets {
        credential: ACred,
        unix_user: AName,
        names: Option<Vec<AEnvName>>,
    },
    RecordApproval {
        credential: Option<ACred>,
        approval: AStr,
        tool: AStr,
        summary: AStr,
        step: u8,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub struct ARequest {
    pub id: u64,
    pub request_id: Option<AStr>,
    pub body: ABody,
    /// The link it comes on (`None`, also when the input runs out here: the one the last
    /// [`Op::On`] picked).
    pub link: Option<ALink>,
}

const STEPS: [ApprovalStep; 7] = [
    ApprovalStep::Asked,
    ApprovalStep::Allowed,
    ApprovalStep::AllowedForSession,
    ApprovalStep::AllowedBySession,
    ApprovalStep::Denied,
    ApprovalStep::Expired,
    ApprovalStep::Abandoned,
];

/// Turns mirrors into wire values, spending at most [`BUDGET`] bytes on strings.
pub struct Builder {
    left: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder { left: BUDGET }
    }
}

impl Builder {
    fn take(&mut self, mut s: String) -> String {
        if s.len() > self.left {
            let mut cut = self.left;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        self.left -= s.len();
        s
    }

    pub fn string(&mut self, a: &AStr) -> String {
        let s = match a {
            AStr::Text(t) => t.clone(),
            AStr::Fill { byte, len } => {
                let c = char::from(*byte);
                let n = (*len as usize).min(self.left / c.len_utf8());
                c.to_string().repeat(n)
            }
            AStr::Repeat { piece, times } => {
                let n = if piece.is_empty() {
                    0
                } else {
                    (*times as usize).min(self.left / piece.len())
                };
                piece.repeat(n)
            }
        };
        self.take(s)
    }

    fn name(&mut self, a: &AName) -> String {
        match a {
            AName::Known(i) => {
                let i = *i as usize % (USERS.len() + OTHER_NAMES.len());
                match USERS.get(i) {
                    Some(u) => u.name.to_string(),
                    None => OTHER_NAMES[i - USERS.len()].to_string(),
                }
            }
            AName::Any(s) => self.string(s),
        }
    }

    fn credential(&mut self, a: &ACred) -> String {
        match a {
            ACred::Known(i) => CREDENTIALS[*i as usize % CREDENTIALS.len()].to_string(),
            ACred::Any(s) => self.string(s),
        }
    }

    fn env_name(&mut self, a: &AEnvName) -> String {
        match a {
            AEnvName::Known(i) => ENV_NAMES[*i as usize % ENV_NAMES.len()].to_string(),
            AEnvName::Any(s) => self.string(s),
        }
    }

    fn path(&mut self, a: &APath) -> String {
        match a {
            APath::Absolute(s) => {
                let rest = self.string(s);
                format!("/{rest}")
            }
            APath::Any(s) => self.string(s),
        }
    }

    fn argv(&mut self, a: &AArgv) -> Vec<String> {
        match a {
            AArgv::List(list) => list.iter().map(|s| self.string(s)).collect(),
            AArgv::Many { count, each } => {
                let mut argv = vec!["sh".to_string()];
                // Past MAX_ARGS (256) more arguments add nothing.
                for _ in 0..(*count).min(300) {
                    argv.push(self.string(each));
                }
                argv
            }
        }
    }

    fn env(&mut self, a: &AEnv) -> Vec<(String, String)> {
        match a {
            AEnv::List(list) => list
                .iter()
                .map(|(n, v)| (self.env_name(n), self.string(v)))
                .collect(),
            AEnv::Many {
                count,
                prefix,
                value,
            } => {
                let prefix = self.env_name(prefix);
                let mut env = Vec::new();
                // Past MAX_ENV_VARS (64) more variables add nothing.
                for i in 0..(*count).min(100) {
                    let name = self.take(format!("{prefix}{i}"));
                    env.push((name, self.string(value)));
                }
                env
            }
        }
    }

    pub fn spawn(&mut self, a: &ASpawn) -> SpawnRequest {
        SpawnRequest {
            credential: self.credential(&a.credential),
            unix_user: self.name(&a.unix_user),
            program: match &a.program {
                AProgram::Exec(argv) => Program::Exec {
                    argv: self.argv(argv),
                },
                AProgram::Shell => Program::Shell,
            },
            cwd: a.cwd.as_ref().map(|p| self.path(p)),
            cwd_id: a.cwd_id.map(|(dev, ino, uid)| DirId { dev, ino, uid }),
            env: self.env(&a.env),
            tty: a.tty.map(|(rows, cols)| WindowSize { rows, cols }),
            ring_bytes: match a.ring {
                ARing::Zero => 0,
                ARing::Min => limits::MIN_RING_BYTES,
                ARing::Max => limits::MAX_RING_BYTES,
                ARing::BelowMin => limits::MIN_RING_BYTES - 1,
                ARing::AboveMax => limits::MAX_RING_BYTES + 1,
                ARing::Any(n) => n,
            },
            stdin: a.stdin,
            keep_stdin: a.keep_stdin,
            secrets: a.secrets,
            secret_names: None,
            purpose: Purpose::Agent,
        }
    }

    pub fn body(&mut self, a: &ABody) -> RequestBody {
        match a {
            ABody::Hello(p) => RequestBody::Hello {
                protocol: match p {
                    AProtocol::Current => PROTOCOL_VERSION,
                    AProtocol::Other(n) => *n,
                },
            },
            ABody::Ready => RequestBody::Ready,
            ABody::Authenticate { credential, peer } => RequestBody::Authenticate {
                credential: self.credential(credential),
                peer: peer.as_ref().map(|p| self.string(p)),
            },
            ABody::Spawn(s) => RequestBody::Spawn(self.spawn(s)),
            ABody::CheckDir {
                credential,
                unix_user,
                path,
            } => RequestBody::CheckDir {
                credential: self.credential(credential),
                unix_user: self.name(unix_user),
                path: self.path(path),
            },
            ABody::SetSecret {
                credential,
                name,
                value,
            } => RequestBody::SetSecret {
                credential: self.credential(credential),
                name: self.env_name(name),
                value: self.string(value),
            },
            ABody::DeleteSecret { credential, name } => RequestBody::DeleteSecret {
                credential: self.credential(credential),
                name: self.env_name(name),
            },
            ABody::ListSecrets(c) => RequestBody::ListSecrets {
                credential: self.credential(c),
            },
            ABody::Kill { handle, signal } => RequestBody::Kill {
                handle: handle_of(handle),
                signal: SIGNALS[*signal as usize % SIGNALS.len()],
            },
            ABody::Release(h) => RequestBody::Release {
                handle: handle_of(h),
            },
            ABody::ListHandles => RequestBody::ListHandles { after: None },
            ABody::Adopt(h) => RequestBody::Adopt {
                handle: handle_of(h),
            },
            ABody::Stats => RequestBody::Stats,
            ABody::OpenWorker {
                credential,
                unix_user,
                start,
            } => RequestBody::OpenWorker {
                credential: self.credential(credential),
                unix_user: self.name(unix_user),
                start: *start,
            },
            ABody::OpenWorkerAnonymous(name) => RequestBody::OpenWorkerAnonymous {
                unix_user: self.name(name),
            },
            ABody::ListAll { credential, after } => RequestBody::ListAll {
                credential: self.credential(credential),
                after: after.as_ref().map(handle_of),
            },
            ABody::Retire => RequestBody::Retire,
            ABody::Login {
                username,
                password,
                peer,
            } => RequestBody::Login {
                username: self.name(username),
                password: self.string(password),
                peer: peer.as_ref().map(|p| self.string(p)),
            },
            ABody::Logout(c) => RequestBody::Logout {
                credential: self.credential(c),
            },
            ABody::ListShares(c) => RequestBody::ListShares {
                credential: self.credential(c),
            },
            ABody::OpenShared { credential, object } => RequestBody::OpenShared {
                credential: self.credential(credential),
                object: self.string(object),
            },
            ABody::Share {
                object,
                grantee,
                input,
                expires_at,
            } => RequestBody::Share {
                object: self.string(object),
                grantee: self.name(grantee),
                input: *input,
                expires_at: *expires_at,
            },
            ABody::Unshare { object, grantee } => RequestBody::Unshare {
                object: self.string(object),
                grantee: grantee.as_ref().map(|g| self.name(g)),
            },
            ABody::CloseStdin(h) => RequestBody::CloseStdin {
                handle: handle_of(h),
            },
            ABody::RunSecrets {
                credential,
                unix_user,
                names,
            } => RequestBody::RunSecrets {
                credential: self.credential(credential),
                unix_user: self.name(unix_user),
                names: names
                    .as_ref()
                    .map(|n| n.iter().map(|e| self.env_name(e)).collect()),
            },
            ABody::RecordApproval {
                credential,
                approval,
                tool,
                summary,
                step,
            } => RequestBody::RecordApproval {
                credential: credential.as_ref().map(|c| self.credential(c)),
                approval: self.string(approval),
                session: "s".into(),
                task: "t".into(),
                tool: self.string(tool),
                step: STEPS[*step as usize % STEPS.len()],
                summary: self.string(summary),
            },
        }
    }

    pub fn request(&mut self, a: &ARequest) -> Request {
        let request_id = a.request_id.as_ref().map(|s| self.string(s));
        let body = self.body(&a.body);
        crate::request(a.id, request_id, body)
    }
}

fn handle_of(a: &AHandle) -> Handle {
    match a {
        // Handles are issued from 1 up in each iteration.
        AHandle::Small(n) => Handle(1 + u64::from(*n % 16)),
        AHandle::Any(n) => Handle(*n),
    }
}

/// A control operation: what happens between frames (see `harness::Harness::control`).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The loop reads the children's report pipes (`check_starting`, `check_probes`).
    Check,
    /// How the next children behave.
    Children(AChild),
    /// The `child`th child not yet reaped (in start order) ends and is reaped.
    Exit { child: u8, status: AStatus },
    /// A process the broker inherited as subreaper (none of its own) is reaped.
    StrayExit(u16),
    /// The `child`th child's process group is gone (signalling it answers ESRCH).
    Gone(u8),
    /// Every start and probe deadline passes, then the loop checks.
    Expire,
    /// That process goes (its link is dropped) and a new one connects on a new link.
    NewLink(ALink),
    /// SIGTERM: nothing new starts, the daemon is told.
    Shutdown,
    /// A shutdown phase: every running executor signalled (TERM, or KILL).
    SignalAll { kill: bool },
    /// An API user is removed from the user store, and the loop notices.
    Revoke(u8),
    /// The next frames (those whose request picks no link) come on this link.
    On(ALink),
    /// That process goes and none replaces it (a worker that exited) until a `NewLink`.
    Close(ALink),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AChild {
    Execs,
    Hangs,
    Fails {
        stage: u8,
        errno: i32,
    },
    /// Reports a directory (what only a probe should).
    Dir,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AStatus {
    Code(i32),
    Signal(i32),
}

const SIGNALS: [Signal; 11] = [
    Signal::Hup,
    Signal::Int,
    Signal::Quit,
    Signal::Kill,
    Signal::Usr1,
    Signal::Usr2,
    Signal::Term,
    Signal::Cont,
    Signal::Stop,
    Signal::Tstp,
    Signal::Winch,
];
