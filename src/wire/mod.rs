//! The protocol between the broker and its links: the **front** (`stoa __daemon`, the
//! service user, all network input) and one **worker** per Unix user (`stoa __worker`,
//! running as that user, holding its terminals, tasks and store).
//!
//! Frames are [`stoa_executor::codec`] frames (u32 big-endian length + bincode 2 payload,
//! 1 MiB limit, no trailing bytes) on an `AF_UNIX` `SOCK_STREAM` socketpair. File
//! descriptors travel only broker -> front/worker, attached with `SCM_RIGHTS` to the first
//! byte of the frame that announces them; the broker accepts none.
//!
//! | request (`Request.body`)          | from   | broker reply (`ReplyBody`)       | fds with the reply            |
//! |-----------------------------------|--------|----------------------------------|-------------------------------|
//! | `Hello { protocol }` (first, once)| both   | `Welcome { .. }`                 | –                             |
//! | `Ready` (serving)                 | both   | `Done`                           | –                             |
//! | `Stats`                           | both   | `Stats(BrokerStats)`             | –                             |
//! | `Authenticate { credential, peer }` | front | `Principal(..)` / `Error`       | –                             |
//! | `OpenWorker { credential, unix_user }` | front | `Connection` / `Error`       | the front's end               |
//! | `OpenWorkerAnonymous { unix_user }` | front | `Connection` / `Error`          | the front's end               |
//! | `ListAll { credential, after }`   | front  | `Handles { list, more }` / `Error` | –                           |
//! | `Login { username, password, peer }` | front | `LoggedIn { .. }` / `Error` (later: a PAM helper checks) | – |
//! | `Logout { credential }`           | front  | `Done`                           | –                             |
//! | `ListShares { credential }`       | front  | `Shares(..)` (given and received) / `Error` | –                  |
//! | `OpenShared { credential, object }` | front | `Connection` / `Error`          | the front's end (to the owner's worker) |
//! | `Share { object, grantee, input, expires_at }` | worker | `Done` / `Error`   | –                             |
//! | `Unshare { object, grantee }`     | worker | `Done`                           | –                             |
//! | `Spawn(SpawnRequest)`             | worker | `Spawned(HandleInfo)` / `Error`  | per [`FdLayout`]              |
//! | `CheckDir { credential, .. }`     | worker | `Dir(DirId)` / `Error`           | –                             |
//! | `SetSecret { credential, .. }`    | worker | `Done` / `Error`                 | –                             |
//! | `DeleteSecret { credential, .. }` | worker | `Done` / `Error`                 | –                             |
//! | `ListSecrets { credential }`      | worker | `Names(Vec<String>)` / `Error`   | –                             |
//! | `RunSecrets { credential, .. }`   | worker | `Secrets(..)` / `Error` (direct path only) | –                   |
//! | `Kill { handle, signal }`         | worker | `Done` / `Error`                 | –                             |
//! | `Release { handle }`              | worker | `Done`                           | –                             |
//! | `ListHandles { after }`           | worker | `Handles { list, more }` (a page)| –                             |
//! | `Adopt { handle }`                | worker | `Adopted(HandleInfo)`            | per [`FdLayout`] (duplicates) |
//! | `CloseStdin { handle }`           | worker | `Done`                           | –                             |
//! | `RecordApproval { .. }`           | worker | `Done` / `Error`                 | –                             |
//! | `Retire`                          | worker | `Done` / `Error`                 | –                             |
//!
//! A terminal's fds ([`FdLayout::Pty`]) are `[control, pty master, ring]`: the ring is a
//! memfd of `SpawnRequest::ring_bytes` that the broker creates with the PTY, seals against
//! shrinking and growing, keeps with the handle, and never gives the executor. The
//! terminal's recent output lives there, so a restarted worker finds it.
//!
//! | broker event                      | to     | when                                                      |
//! |-----------------------------------|--------|-----------------------------------------------------------|
//! | `Exited { handle, status, limit_hit }` | the handle's worker | the broker reaped the executor's process (and ended what it left in its cgroup) |
//! | `ShuttingDown { grace_secs }`     | all    | SIGTERM: no new spawns; work gets `grace_secs`, then TERM, then KILL |
//! | `Revoked { keys }`                | all    | those credentials stopped working ([`Principal::revocation_key`]): API users removed or rotated, log-ins ended or expired |
//! | `Connection { principal }`        | worker | a connection the front opened (one fd: the worker's end)  |
//!
//! Requests carry an `id` that the reply echoes, and the HTTP request id they serve, if
//! any (it appears in the broker's log and audit lines); events carry none. The broker owns all
//! state: a worker names processes only by the opaque [`Handle`]s of its own Unix user,
//! never by pid or uid; the front names none. Anything a link could not legitimately send
//! (a frame before `Hello`, a request of the other kind of link, a handle of another user,
//! an undecodable payload) is a protocol violation: the broker drops the link and restarts
//! that process. See `broker::table` for the table of what is allowed when.
#![forbid(unsafe_code)]

use bincode::{Decode, Encode};

/// Bumped on every incompatible change; the broker refuses a daemon that speaks another.
pub const PROTOCOL_VERSION: u32 = 7;

/// Limits on what one request may carry, checked by the broker (the frame limit bounds the
/// total; these bound each part so no single field can eat it).
pub mod limits {
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ARG_BYTES: usize = 16 * 1024;
    pub const MAX_ARGV_BYTES: usize = 128 * 1024;
    pub const MAX_ENV_VARS: usize = 64;
    pub const MAX_ENV_BYTES: usize = 32 * 1024;
    pub const MAX_PATH_BYTES: usize = 4096;
    pub const MAX_NAME_BYTES: usize = 64;
    pub const MAX_CREDENTIAL_BYTES: usize = 256;
    /// Names a spawn may ask secrets by.
    pub const MAX_SECRET_NAMES: usize = 64;
    /// A password given to `Login` (PAM modules see nothing longer).
    pub const MAX_PASSWORD_BYTES: usize = 1024;
    pub const MAX_TTY_DIMENSION: u16 = 4096;
    pub const MAX_REQUEST_ID_BYTES: usize = 64;
    pub const MAX_PEER_BYTES: usize = 64;
    /// A terminal's output ring (`SpawnRequest::ring_bytes`), in bytes.
    pub const MIN_RING_BYTES: u32 = 4 * 1024;
    pub const MAX_RING_BYTES: u32 = 64 * 1024 * 1024;
    /// `RecordApproval`'s summary of what was asked.
    pub const MAX_APPROVAL_SUMMARY_BYTES: usize = 1024;
}

/// An opaque name for something the broker spawned.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub u64);

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct Request {
    pub id: u64,
    /// The HTTP request this serves (`X-Request-Id`), for the broker's log and audit
    /// lines: at most [`limits::MAX_REQUEST_ID_BYTES`] of `[A-Za-z0-9._-]`.
    pub request_id: Option<String>,
    pub body: RequestBody,
}

/// Whether `id` is a request id the broker accepts (anything else is a violation).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= limits::MAX_REQUEST_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum RequestBody {
    Hello {
        protocol: u32,
    },
    /// The daemon serves HTTP (the broker tells systemd it is ready).
    Ready,
    Authenticate {
        credential: String,
        /// The client's address as the daemon saw it, for the audit line of a failure
        /// (at most [`limits::MAX_PEER_BYTES`]; the daemon's word, recorded as such).
        peer: Option<String>,
    },
    Spawn(SpawnRequest),
    /// Is `path` a directory `unix_user` can enter? Checked with that user's identity, for
    /// a user the policy allows; the reply pins the directory (`ReplyBody::Dir`).
    CheckDir {
        credential: String,
        unix_user: String,
        path: String,
    },
    /// Secrets belong to the credential's Unix user; values are never sent back.
    SetSecret {
        credential: String,
        name: String,
        value: String,
    },
    DeleteSecret {
        credential: String,
        name: String,
    },
    ListSecrets {
        credential: String,
    },
    /// Worker only, and only when the daemon runs agents on the direct path (without the
    /// executor): the secrets a run of `unix_user` gets (`names`: only these), to start it
    /// itself.
    RunSecrets {
        credential: String,
        unix_user: String,
        names: Option<Vec<String>>,
    },
    Kill {
        handle: Handle,
        signal: Signal,
    },
    Release {
        handle: Handle,
    },
    /// The handles after `after` (all with `None`), a page at a time: a page stays well
    /// inside the frame limit however many handles there are and whatever their argv.
    ListHandles {
        after: Option<Handle>,
    },
    Adopt {
        handle: Handle,
    },
    /// Worker only: the broker drops the duplicate of the handle's stdin pipe it kept
    /// (`SpawnRequest::keep_stdin`), so the program sees end-of-file once the worker closes
    /// its own.
    CloseStdin {
        handle: Handle,
    },
    /// Worker only: one step of a permission request of its user's agent, for the audit
    /// log (the broker adds the worker's user; it verifies `credential`, the answering
    /// caller's, when there is one).
    RecordApproval {
        credential: Option<String>,
        approval: String,
        session: String,
        task: String,
        tool: String,
        step: ApprovalStep,
        summary: String,
    },
    /// The broker's counters, for metrics.
    Stats,
    /// Front only: a connection to `unix_user`'s worker, for the principal whose
    /// credential this is (the broker starts the worker if it is not running). The worker
    /// is told who the connection was authenticated as.
    OpenWorker {
        credential: String,
        unix_user: String,
        /// Start the worker if it is not running (else: `Unavailable`).
        start: bool,
    },
    /// Front only: an unauthenticated connection to `unix_user`'s worker, if it is
    /// running, for what the worker authenticates itself (a terminal's one-time ticket).
    OpenWorkerAnonymous {
        unix_user: String,
    },
    /// Front only, with an admin credential: every handle, a page at a time (for the
    /// admin's process view).
    ListAll {
        credential: String,
        after: Option<Handle>,
    },
    /// Front only: check a Unix account's password (with PAM, in a short-lived helper
    /// process; never in the broker itself) and, if it is right and the policy allows the
    /// user, start a log-in: the reply carries a new credential for that user alone.
    Login {
        username: String,
        password: String,
        /// The client's address as the front saw it (audit, PAM's `PAM_RHOST`).
        peer: Option<String>,
    },
    /// Front only: end the log-in whose credential this is (nothing if it is none).
    Logout {
        credential: String,
    },
    /// Front only: the shares the credential's Unix user gave and was given.
    ListShares {
        credential: String,
    },
    /// Front only: a connection to the worker that holds `object` (another user's
    /// terminal), for the credential's Unix user, who must hold a live share of it. The
    /// worker is told the share: that connection may reach that object only.
    OpenShared {
        credential: String,
        object: String,
    },
    /// Worker only: its user shares one of its own objects (`u<uid>-…`) with `grantee`
    /// (read-only, or with input), until `expires_at` (seconds since the epoch) if set.
    Share {
        object: String,
        grantee: String,
        input: bool,
        expires_at: Option<u64>,
    },
    /// Worker only: its user ends the share of `object` with `grantee` (`None`: with all).
    Unshare {
        object: String,
        grantee: Option<String>,
    },
    /// Worker only: it has no live work and no connection and would like to exit. `Done`:
    /// it may (new connections for its user go to a new worker); an error: it must stay.
    Retire,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct SpawnRequest {
    /// The API caller's credential, verified by the broker on every spawn.
    pub credential: String,
    pub unix_user: String,
    pub program: Program,
    /// Absolute; entered as the user. `None`: the user's home directory.
    pub cwd: Option<String>,
    /// The directory `cwd` must still be (as `CheckDir` pinned it): the child opens `cwd`
    /// as the user without following symlinks and refuses to run anywhere else.
    pub cwd_id: Option<DirId>,
    /// Extra environment, checked against the policy's deny-list.
    pub env: Vec<(String, String)>,
    /// `Some`: run on a new pseudo-terminal of this size. `None`: pipes.
    pub tty: Option<WindowSize>,
    /// With pipes: give the daemon a pipe to the program's stdin (else /dev/null).
    pub stdin: bool,
    /// With `stdin`: the broker keeps a duplicate of that pipe with the handle, for a
    /// worker that restarts while the program still reads it (an agent waiting for an
    /// answer). The program sees end-of-file only after `CloseStdin`.
    pub keep_stdin: bool,
    /// With a tty: the size of the memfd the broker creates for the terminal's output ring
    /// and keeps with the handle ([`limits::MIN_RING_BYTES`] to
    /// [`limits::MAX_RING_BYTES`]); 0 with pipes.
    pub ring_bytes: u32,
    /// Hand the Unix user's stored secrets to the program as environment variables (on
    /// the control socket, never in argv).
    pub secrets: bool,
    /// With `secrets`: only these names (at most [`limits::MAX_SECRET_NAMES`]); `None`: all.
    pub secret_names: Option<Vec<String>>,
    /// What the run is for: the policy's `[confine]` says which kinds are confined. The
    /// worker's word, so it can only choose among what the policy lets its user run.
    pub purpose: Purpose,
}

/// What a spawn is for (the policy's `[confine]` keys).
#[derive(
    Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// An agent's task (`confine.agents`).
    Agent,
    /// A web terminal (`confine.terminals`).
    Terminal,
    /// `POST /exec` (`confine.exec`).
    Exec,
}

/// Whether a run was confined (Landlock), as the broker applied it.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// Writes confined at this Landlock ABI.
    Landlock { abi: u32 },
    /// Not confined, and why (the policy does not confine this kind; the kernel has no
    /// usable Landlock).
    None { reason: String },
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confinement::Landlock { abi } => write!(f, "landlock abi {abi}"),
            Confinement::None { reason } => write!(f, "none ({reason})"),
        }
    }
}

/// The steps of a permission request the audit log records.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalStep {
    Asked,
    Allowed,
    /// Allowed, and the tool for the rest of the session.
    AllowedForSession,
    /// Allowed without asking: the session allows the tool.
    AllowedBySession,
    Denied,
    /// Nobody answered in time.
    Expired,
    /// The run ended before an answer.
    Abandoned,
}

impl ApprovalStep {
    pub fn name(self) -> &'static str {
        match self {
            ApprovalStep::Asked => "asked",
            ApprovalStep::Allowed => "allowed",
            ApprovalStep::AllowedForSession => "allowed_for_session",
            ApprovalStep::AllowedBySession => "allowed_by_session",
            ApprovalStep::Denied => "denied",
            ApprovalStep::Expired => "expired",
            ApprovalStep::Abandoned => "abandoned",
        }
    }
}

/// A directory's identity: device, inode and owner, as `fstat` reports them.
#[derive(
    Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
    /// The directory's owner then: an inode number freed and reused for another user's
    /// new directory does not match.
    pub uid: u32,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `argv[0]` is looked up in the PATH the broker builds.
    Exec { argv: Vec<String> },
    /// The user's login shell.
    Shell,
}

#[derive(
    Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The signals the daemon may ask for; anything else cannot even be encoded.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Hup,
    Int,
    Quit,
    Kill,
    Usr1,
    Usr2,
    Term,
    Cont,
    Stop,
    Tstp,
    Winch,
}

impl Signal {
    pub fn number(self) -> i32 {
        match self {
            Signal::Hup => libc::SIGHUP,
            Signal::Int => libc::SIGINT,
            Signal::Quit => libc::SIGQUIT,
            Signal::Kill => libc::SIGKILL,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Usr2 => libc::SIGUSR2,
            Signal::Term => libc::SIGTERM,
            Signal::Cont => libc::SIGCONT,
            Signal::Stop => libc::SIGSTOP,
            Signal::Tstp => libc::SIGTSTP,
            Signal::Winch => libc::SIGWINCH,
        }
    }
}

/// Messages from the broker.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum BrokerMessage {
    Reply { id: u64, body: ReplyBody },
    Event(Event),
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Welcome(Welcome),
    Principal(Principal),
    // Boxed: by far the largest reply, and replies travel in `Result`s.
    Spawned(Box<HandleInfo>),
    Adopted(Box<HandleInfo>),
    /// A page of `ListHandles`, in handle order; `more`: ask again after the last one.
    Handles {
        list: Vec<HandleInfo>,
        more: bool,
    },
    Names(Vec<String>),
    /// `RunSecrets`: names and values.
    Secrets(Vec<(String, String)>),
    Stats(BrokerStats),
    /// `CheckDir`: the directory the user can enter, pinned.
    Dir(DirId),
    /// `OpenWorker`: the front's end of a new connection to the worker (one fd).
    Connection,
    /// `ListShares`.
    Shares(Vec<ShareInfo>),
    /// `Login`: the log-in's credential (shown once; the broker keeps only its digest),
    /// for `unix_user`, valid until `expires_at` (seconds since the Unix epoch).
    LoggedIn {
        credential: String,
        unix_user: String,
        expires_at: u64,
    },
    Done,
    Error(BrokerError),
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct Welcome {
    pub version: String,
    /// False in single-user mode: everything runs as the one user who started stoa.
    pub isolation: bool,
    /// The user everything runs as in single-user mode.
    pub single_user: Option<String>,
    /// Where the workers keep each user's store (`<workers_dir>/<uid>`): the front lists it
    /// to find every user's sessions for an admin.
    pub workers_dir: String,
}

/// Counters the broker keeps across daemon restarts.
#[derive(Encode, Decode, Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub frames_received: u64,
    pub protocol_violations: u64,
    pub daemon_starts: u64,
    pub handles: u64,
    /// The limits the broker enforces now, as (name, value) for `/health`.
    pub limits: Vec<(String, String)>,
    /// The broker process: its version, since when, and its upgrades in place.
    pub broker: BrokerRun,
}

/// The running broker, for `/health`: an upgrade in place keeps the pid and changes the
/// version.
#[derive(Encode, Decode, Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerRun {
    pub version: String,
    pub pid: u32,
    /// Seconds since the Unix epoch: when this pid started (an upgrade keeps it).
    pub started_at: u64,
    /// When it last re-exec'd a new binary (`stoa daemon upgrade`), if ever.
    pub upgraded_at: Option<u64>,
    pub upgrades: u64,
}

/// Who a credential belongs to.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The machine's admin token: may act as any user the policy allows.
    Admin,
    /// An API user (`stoa user add`): acts as its Unix user, or, with `admin`, as any user
    /// the policy allows. `id` is given once, at `stoa user add`, and never reused: objects
    /// belong to it, not to the name.
    User {
        id: u64,
        name: String,
        unix_user: String,
        admin: bool,
    },
    /// A person logged in with their Unix account (their password through PAM): acts as
    /// that Unix user only, never as an admin. Objects belong to the Unix user (`unix:<uid>`),
    /// so every log-in of the same person sees the same terminals and sessions. `session`
    /// names this log-in (for its revocation).
    Login {
        uid: u32,
        unix_user: String,
        session: u64,
    },
    /// An admin acting in one user's worker: the broker hands this to the worker with the
    /// admin's connection (`Event::Connection::delegated`), so the admin's own credential
    /// never reaches a user's process. It acts as `unix_user` only and is no admin anywhere
    /// (stolen by that user, it gives them nothing they lack); what it creates belongs to
    /// the admin (`by`, the admin's owner key; `name` for logs).
    Delegated {
        by: String,
        name: String,
        uid: u32,
        unix_user: String,
        number: u64,
    },
}

/// Revocation keys of log-ins (and delegations) have this bit set; API users' ids never do.
pub const LOGIN_KEY_BIT: u64 = 1 << 63;

impl Principal {
    pub fn is_admin(&self) -> bool {
        match self {
            Principal::Admin => true,
            Principal::User { admin, .. } => *admin,
            Principal::Login { .. } | Principal::Delegated { .. } => false,
        }
    }

    /// The name, for logs and display only: ownership goes by [`Principal::owner`].
    pub fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::User { name, .. } => name,
            Principal::Login { unix_user, .. } => unix_user,
            Principal::Delegated { name, .. } => name,
        }
    }

    /// The immutable key objects are owned by: `admin` for the admin token, `user:<id>` for
    /// an API user. A user removed and added again under the same name is another owner.
    pub fn owner(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::User { id, .. } => format!("user:{id}"),
            Principal::Login { uid, .. } => format!("unix:{uid}"),
            Principal::Delegated { by, .. } => by.clone(),
        }
    }

    /// What `Event::Revoked` names to end this principal's credential: the API user's id,
    /// or the log-in's number with [`LOGIN_KEY_BIT`]; none for the admin token.
    pub fn revocation_key(&self) -> Option<u64> {
        match self {
            Principal::Admin => None,
            Principal::User { id, .. } => Some(*id),
            Principal::Login { session, .. } => Some(LOGIN_KEY_BIT | session),
            Principal::Delegated { number, .. } => Some(LOGIN_KEY_BIT | number),
        }
    }

    /// Whether this principal may use an object owned by `owner` that runs as `unix_user`:
    /// admins may use all; anyone else only what their own id created as their Unix user.
    pub fn may_use(&self, owner: &str, unix_user: &str) -> bool {
        self.is_admin() || (self.owner() == owner && self.unix_user() == Some(unix_user))
    }

    /// The Unix user this principal acts as by default.
    pub fn unix_user(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::User { unix_user, .. }
            | Principal::Login { unix_user, .. }
            | Principal::Delegated { unix_user, .. } => Some(unix_user),
        }
    }
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct HandleInfo {
    pub handle: Handle,
    pub pid: i32,
    pub unix_user: String,
    pub uid: u32,
    pub program: Program,
    pub fds: FdLayout,
    /// Set once the broker has reaped the process.
    pub exited: Option<ExitStatus>,
    /// A resource limit the process's cgroup ran into, as read when it was reaped.
    pub limit_hit: Option<LimitHit>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    /// Whether (and at which Landlock ABI) the run's writes are confined.
    pub confinement: Confinement,
}

/// Which fds ride with a `Spawned`/`Adopted` reply, in this order.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLayout {
    /// `[control, pty master, ring]`: the ring is a memfd of `ring_bytes` (sealed against
    /// shrinking and growing) that holds the terminal's recent output, so whoever holds the
    /// terminal next finds it (see `daemon::ring`). Never given to the executor.
    Pty,
    /// `[control, stdin write end (if `stdin`), stdout read end, stderr read end]`.
    /// A stdin pipe is handed out once and never kept, so the program sees end-of-file
    /// when the daemon closes it; an adopting daemon gets no stdin.
    Pipes { stdin: bool },
}

impl FdLayout {
    pub fn count(self) -> usize {
        match self {
            FdLayout::Pty => 3,
            FdLayout::Pipes { stdin } => 3 + usize::from(stdin),
        }
    }
}

#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// A limit of the user's cgroup that a process ran into (see `broker::cgroup`).
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel's OOM killer ended a process of this spawn at the user's memory limit.
    Memory { max_bytes: u64 },
    /// A fork failed at the user's process limit.
    Pids { max: u64 },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { max_bytes } => write!(
                f,
                "out of memory: a process was killed at the user's memory limit ({} MiB)",
                max_bytes / (1024 * 1024)
            ),
            LimitHit::Pids { max } => write!(
                f,
                "process limit: a fork failed at the user's limit of {max} processes"
            ),
        }
    }
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum Event {
    Exited {
        handle: Handle,
        status: ExitStatus,
        limit_hit: Option<LimitHit>,
    },
    /// The broker is shutting down: no new spawns; running work has `grace_secs` to
    /// finish before it is signalled. Sent once, and again to a daemon that starts later.
    ShuttingDown { grace_secs: u64 },
    /// These credentials stopped working ([`Principal::revocation_key`]: an API user
    /// removed or its token rotated, a log-in ended or expired): the front and workers
    /// forget what they cached for them and end their live connections (WebSockets,
    /// terminal attachments, event streams) at once.
    Revoked { keys: Vec<u64> },
    /// To a worker: a new connection (one fd), authenticated by the broker as `principal`
    /// (`None`: anonymous; only what the worker authenticates itself may be served on it),
    /// with the SHA-256 of the credential it showed: every request on the connection must
    /// carry that same credential.
    Connection {
        principal: Option<Principal>,
        credential: Option<[u8; 32]>,
        /// Set for a connection opened for a share (`OpenShared`): it may reach only that
        /// object, as that share allows; it carries no credential.
        share: Option<Box<ShareInfo>>,
        /// For an admin's connection: a credential for this worker's user alone
        /// (`Principal::Delegated`), which the worker uses where the broker wants one
        /// (spawns, directory checks); requests on it come without the admin's.
        delegated: Option<String>,
    },
}

/// One share: `owner` lets `grantee` view (or, with `input`, type into) `object`.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShareInfo {
    pub object: String,
    pub owner: String,
    pub grantee: String,
    pub input: bool,
    /// Seconds since the Unix epoch; `None`: until revoked.
    pub expires_at: Option<u64>,
    pub granted_at: u64,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct BrokerError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The credential is unknown.
    Unauthorized,
    /// The credential is valid but may not do this.
    Forbidden,
    /// The policy refuses; `rule` names the rule (see `broker::policy`).
    Refused { rule: String },
    /// The request is malformed (bad path, bad env name, empty argv…).
    BadRequest,
    /// The user or the broker is at a limit.
    Quota,
    /// Something failed in the broker or in the child before exec.
    Failed,
    /// The broker is shutting down and starts nothing new.
    Unavailable,
}
