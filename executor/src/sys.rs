//! Every `unsafe` system call in stoa, each behind a safe function.
//!
//! The heart of it is [`start_child`]: fork, then the spawn-as-user sequence of
//! research/privsep.md §1 phase B, then exec. Everything the child needs is computed before
//! the fork; between fork and exec the child makes only async-signal-safe system calls on
//! that prepared data (no allocation, no locks, no NSS).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Highest signal number on Linux (`NSIG - 1`).
const LAST_SIGNAL: libc::c_int = 64;
/// How many fds a child may be given (0–2 plus extras).
const MAX_CHILD_FDS: usize = 8;
/// `close_range(2)` flag: mark close-on-exec instead of closing now.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// `capget/capset` header version 3 (two 32-bit words per set).
const CAP_VERSION_3: u32 = 0x2008_0522;

// ---------------------------------------------------------------------------------------
// Inherited fds

/// fds 0–63 already taken by [`take_inherited_fd`], so nothing owns one twice.
static TAKEN_FDS: AtomicU64 = AtomicU64::new(0);

/// Takes ownership of an fd this process inherited at a fixed number (the executor's control
/// socket at 3, the daemon's broker link at 3 and listener at 4). Each number can be taken
/// once; a closed number is an error.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if !(3..64).contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited fd out of range",
        ));
    }
    let bit = 1u64 << fd;
    if TAKEN_FDS.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "inherited fd already taken",
        ));
    }
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above), was handed to this process by its parent for
    // exactly this use, and the TAKEN_FDS bit guarantees no second OwnedFd for it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    Ok(owned)
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}

/// Duplicates fd `target` of process `pid` into this process (`pidfd_getfd(2)`, needs
/// ptrace rights over `pid`: root). Used by the tests that play a compromised daemon.
pub fn pidfd_getfd(pid: i32, target: RawFd) -> io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a fresh (close-on-exec) descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---------------------------------------------------------------------------------------
// Terminals

/// A new pseudo-terminal pair, both ends close-on-exec, the slave opened without becoming
/// anyone's controlling tty.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    /// `/dev/pts/N`
    pub path: String,
}

/// Opens `/dev/ptmx` and its peer through `TIOCGPTPEER`, so no path is looked up between
/// the two opens.
pub fn open_pty() -> io::Result<Pty> {
    use std::os::unix::fs::OpenOptionsExt;
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?
        .into();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one c_uint through a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd or -1.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER returned a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty {
        master,
        slave,
        path: format!("/dev/pts/{number}"),
    })
}

/// Sets a terminal's window size (works on the master; needs no privilege).
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a terminal's window size as (rows, cols).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through a valid pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_row, ws.ws_col))
}

/// Lets a closed pipe end this process quietly, as other command-line tools do (`stoa
/// doctor | head -1`): SIGPIPE back to its default action (Rust starts with it ignored, which
/// makes `println!` panic on a closed stdout). Only for commands with no state to restore.
pub fn default_sigpipe() -> io::Result<()> {
    // SAFETY: SIG_DFL installs no handler code; only the disposition of SIGPIPE changes.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shared memory (terminal output rings)

/// Largest memfd [`create_ring_memfd`] makes, and [`SharedMap`] maps.
pub const MAX_SHARED_MAP_BYTES: usize = 1 << 30;

/// A memfd of `bytes` (zero-filled), close-on-exec, sealed against shrinking and growing
/// and against further seals: a mapping of it can never fault (`SIGBUS`) because someone
/// truncated it, and nobody can seal it read-only under a writable mapping.
pub fn create_ring_memfd(bytes: usize) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    if bytes == 0 || bytes > MAX_SHARED_MAP_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a ring memfd must be 1 to {MAX_SHARED_MAP_BYTES} bytes, not {bytes}"),
        ));
    }
    let fd = memfd_create(
        c"stoa-ring",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    nix::unistd::ftruncate(&fd, bytes as libc::off_t)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// A whole file (a memfd sealed against shrinking, as [`create_ring_memfd`] makes) mapped
/// `MAP_SHARED` read/write: what is written here is in the file, seen by every other
/// mapping of it, and outlives this process. Unmapped on drop.
///
/// Nothing here hands out a reference into the mapping: bytes are copied in and out by
/// offset ([`SharedMap::write_at`], [`SharedMap::read_at`]) and header words go through
/// atomics ([`SharedMap::load_u64`], [`SharedMap::store_u64`]), every access bounds-checked.
/// Another process that holds the file (the broker, a later holder, any process of the
/// same user that reaches the fd) may write it at any time, so what is read is data to
/// validate, never something to trust.
pub struct SharedMap {
    ptr: ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value (no thread-local state); moving
// it to another thread changes nothing about how it is accessed.
unsafe impl Send for SharedMap {}
// SAFETY: through `&SharedMap` the mapping is only read (byte copies out, atomic loads);
// every write takes `&mut self`, so within this process a write never overlaps another
// access. (Other processes are covered by the copy-only design, see `read_at`.)
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps all of `fd`, which must be sealed against shrinking (`F_GET_SEALS`); its size
    /// comes from `fstat`.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<SharedMap> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let seals = SealFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GET_SEALS)?);
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file is not sealed against shrinking: a mapping of it could fault",
            ));
        }
        let size = nix::sys::stat::fstat(fd)?.st_size;
        let len = usize::try_from(size)
            .ok()
            .filter(|l| (1..=MAX_SHARED_MAP_BYTES).contains(l))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot map a file of {size} bytes"),
                )
            })?;
        let length = std::num::NonZeroUsize::new(len).expect("checked above");
        // SAFETY: a fresh mapping at an address the kernel chooses (so it replaces nothing
        // of ours), of `len` bytes of a file that cannot shrink below `len` (sealed, checked
        // above), so every byte of it stays backed: no access inside it can fault. The
        // pointer is only used through the bounds-checked copies below, and unmapped once,
        // on drop.
        let addr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(SharedMap {
            ptr: addr.cast(),
            len,
        })
    }

    /// The mapping's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are outside the {} byte mapping",
                    self.len
                ),
            )),
        }
    }

    /// Copies `bytes` into the mapping at `offset`.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        self.check(offset, bytes.len())?;
        // SAFETY: `offset + bytes.len() <= self.len` (checked), so the destination lies in
        // the mapping, which stays mapped and backed while `self` lives (see `new`); it
        // cannot overlap `bytes`, which is memory of ours outside any mapping we hand out.
        // No reference into the mapping exists anywhere (we never create one), so this
        // write invalidates no `&`/`&mut` the compiler reasons about. A concurrent writer
        // in another process can only leave other bytes there, which later readers treat
        // as untrusted data.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset), bytes.len())
        };
        Ok(())
    }

    /// Copies `out.len()` bytes from the mapping at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: the source lies in the mapping (checked), mapped and backed while `self`
        // lives, and `out` is our own memory, so the two cannot overlap. Another process of
        // the same user may write these bytes while we copy them: we never form a
        // reference to the mapping (whose "no one else writes this" promise that would
        // break), we only copy raw bytes out of it into our own buffer, and every bit
        // pattern is a valid `u8`. The worst a concurrent writer can do is make us copy
        // a mix of old and new bytes, which callers treat as untrusted input (they check
        // the header, and terminal output is opaque bytes).
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// The u64 at `offset` (a multiple of 8), loaded with `Acquire`: what was written before
    /// a matching [`SharedMap::store_u64`] (in any process) is visible after it.
    pub fn load_u64(&self, offset: usize) -> io::Result<u64> {
        Ok(self.word(offset)?.load(Ordering::Acquire))
    }

    /// Stores `value` at `offset` (a multiple of 8) with `Release`: every write to the
    /// mapping before it is visible to whoever loads this value.
    pub fn store_u64(&mut self, offset: usize, value: u64) -> io::Result<()> {
        self.word(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    fn word(&self, offset: usize) -> io::Result<&AtomicU64> {
        self.check(offset, 8)?;
        if offset % 8 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is not 8-byte aligned"),
            ));
        }
        // SAFETY: the 8 bytes lie in the mapping (checked), which starts on a page
        // boundary, so `offset % 8 == 0` makes them 8-byte aligned as AtomicU64 requires;
        // they stay mapped while `self` (and so the returned borrow) lives. An AtomicU64 may
        // be written concurrently by anyone (other threads, other processes sharing the
        // page: atomic instructions on shared memory are exactly that), so the reference
        // promises nothing a concurrent writer can break, and it never leaves this module.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast::<u64>()) })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: exactly the range `new` mapped, unmapped once; no reference into it
        // outlives `self` (`word`'s borrows end with the call that made them).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

impl fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMap").field("len", &self.len).finish()
    }
}

// ---------------------------------------------------------------------------------------
// Spawning

/// The identity a child takes, resolved by the caller (getpwnam_r, getgrouplist) before
/// the fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The complete supplementary group list (may be empty).
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Core,
    NoFile,
    NProc,
    As,
    FSize,
    Nice,
    RtPrio,
}

impl Resource {
    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Resource::Core => libc::RLIMIT_CORE,
            Resource::NoFile => libc::RLIMIT_NOFILE,
            Resource::NProc => libc::RLIMIT_NPROC,
            Resource::As => libc::RLIMIT_AS,
            Resource::FSize => libc::RLIMIT_FSIZE,
            Resource::Nice => libc::RLIMIT_NICE,
            Resource::RtPrio => libc::RLIMIT_RTPRIO,
        }
    }
}

impl Resource {
    /// This process's own (soft, hard) limit; `u64::MAX` means unlimited.
    pub fn current(self) -> io::Result<(u64, u64)> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit through a valid pointer.
        if unsafe { libc::getrlimit(self.raw(), &mut limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let conv = |v: libc::rlim_t| {
            if v == libc::RLIM_INFINITY {
                u64::MAX
            } else {
                v
            }
        };
        Ok((conv(limit.rlim_cur), conv(limit.rlim_max)))
    }
}

/// One resource limit; `u64::MAX` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

/// What to start and as whom. Borrowed fds stay owned by the caller, who closes its copies
/// of the child's ends after [`start_child`] returns.
pub struct ChildSpec<'a> {
    /// The program, opened by the caller (`O_PATH`); run with `execveat(AT_EMPTY_PATH)` so
    /// the file that was checked is the file that runs.
    pub exe: BorrowedFd<'a>,
    pub argv: Vec<CString>,
    /// The complete environment, `NAME=value`.
    pub env: Vec<CString>,
    /// Become fds 0, 1, 2; `None` keeps the caller's.
    pub stdio: Option<[BorrowedFd<'a>; 3]>,
    /// Become fds 3, 4, … in order.
    pub extra_fds: Vec<BorrowedFd<'a>>,
    /// Make fd 0 (a pty slave) the controlling terminal of the new session.
    pub controlling_tty: bool,
    /// `None`: keep the caller's identity (single-user mode, no privileges to drop).
    pub identity: Option<Identity>,
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    /// Entered after the identity change, with the user's own permissions.
    pub cwd: Option<CString>,
    /// The directory `cwd` must be (device, inode, owner): opened as the user, compared,
    /// entered by `fchdir`, so a path swapped since it was checked cannot redirect the run.
    pub cwd_id: Option<(u64, u64, u32)>,
    /// `PR_SET_PDEATHSIG`, set after the identity change (which clears it).
    pub parent_death_signal: Option<i32>,
    /// `cgroup.procs` files (opened for writing) the child writes itself into first, while
    /// still root, so everything it will ever start is inside these cgroups (cgroup v1).
    pub cgroup_procs: Vec<BorrowedFd<'a>>,
    /// Landlock write confinement, applied last before exec (after the identity change and
    /// `no_new_privs`, with the working directory entered).
    pub confine: Option<&'a Confine>,
    /// cgroup v2: the cgroup directory (`O_PATH` is enough) the child is born in
    /// (`clone3(CLONE_INTO_CGROUP)`): no migration, and it writes no `cgroup.procs`. Where
    /// the kernel cannot (`ENOSYS`, `E2BIG`, `EINVAL`: before 5.7, or a seccomp filter),
    /// the child writes itself into the directory's `cgroup.procs` instead.
    pub cgroup_dir: Option<BorrowedFd<'a>>,
}

impl<'a> ChildSpec<'a> {
    /// A short-lived helper of the broker that stays root (a password check; an upgrade's
    /// check of the new binary): no identity change, no limits, umask 077, in `/`, killed
    /// with its parent, in no run's cgroup, unconfined.
    pub fn root_helper(
        exe: BorrowedFd<'a>,
        argv: Vec<CString>,
        env: Vec<CString>,
        stdio: [BorrowedFd<'a>; 3],
        extra_fds: Vec<BorrowedFd<'a>>,
    ) -> ChildSpec<'a> {
        ChildSpec {
            exe,
            argv,
            env,
            stdio: Some(stdio),
            extra_fds,
            controlling_tty: false,
            identity: None,
            rlimits: Vec::new(),
            umask: 0o077,
            cwd: Some(c"/".into()),
            cwd_id: None,
            parent_death_signal: Some(libc::SIGKILL),
            cgroup_procs: Vec::new(),
            confine: None,
            cgroup_dir: None,
        }
    }
}

/// The step of the child's sequence that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStage {
    ResetSignals = 1,
    JoinCgroups,
    NewSession,
    ArrangeFds,
    ControllingTty,
    Rlimits,
    SetGroups,
    SetGid,
    DropBoundingSet,
    ClearAmbient,
    SetUid,
    VerifyIds,
    ClearCapabilities,
    VerifyCapabilities,
    NoNewPrivs,
    ParentDeathSignal,
    CloseFds,
    Chdir,
    VerifyCwd,
    Exec,
    Signal,
    Confine,
}

impl ChildStage {
    fn from_raw(raw: u32) -> Option<ChildStage> {
        use ChildStage::*;
        const ALL: [ChildStage; 22] = [
            ResetSignals,
            JoinCgroups,
            NewSession,
            ArrangeFds,
            ControllingTty,
            Rlimits,
            SetGroups,
            SetGid,
            DropBoundingSet,
            ClearAmbient,
            SetUid,
            VerifyIds,
            ClearCapabilities,
            VerifyCapabilities,
            NoNewPrivs,
            ParentDeathSignal,
            CloseFds,
            Chdir,
            VerifyCwd,
            Exec,
            Signal,
            Confine,
        ];
        ALL.into_iter().find(|s| *s as u32 == raw)
    }

    pub fn describe(self) -> &'static str {
        use ChildStage::*;
        match self {
            ResetSignals => "resetting signals",
            JoinCgroups => "joining the user's cgroup",
            NewSession => "starting a new session",
            ArrangeFds => "arranging file descriptors",
            ControllingTty => "acquiring the controlling terminal",
            Rlimits => "setting resource limits",
            SetGroups => "setting supplementary groups",
            SetGid => "setting the group id",
            DropBoundingSet => "dropping the capability bounding set",
            ClearAmbient => "clearing ambient capabilities",
            SetUid => "setting the user id",
            VerifyIds => "verifying the identity change",
            ClearCapabilities => "clearing capabilities",
            VerifyCapabilities => "verifying capabilities are empty",
            NoNewPrivs => "setting no_new_privs",
            ParentDeathSignal => "setting the parent-death signal",
            CloseFds => "closing inherited file descriptors",
            Chdir => "entering the working directory",
            VerifyCwd => {
                "checking the working directory is the one checked before (it was replaced)"
            }
            Exec => "executing the program",
            Signal => "sending the signal",
            Confine => "confining writes (Landlock)",
        }
    }
}

#[derive(Debug)]
pub enum SpawnError {
    /// Before or at fork, in the caller.
    Setup(io::Error),
    /// In the child, before exec; the child has been reaped. `errno` 0 means a
    /// verification found the wrong state.
    Child { stage: ChildStage, errno: i32 },
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Setup(e) => write!(f, "cannot start the child: {e}"),
            SpawnError::Child { stage, errno: 0 } => {
                write!(f, "failed {}: verification failed", stage.describe())
            }
            SpawnError::Child { stage, errno } => {
                write!(
                    f,
                    "failed {}: {}",
                    stage.describe(),
                    io::Error::from_raw_os_error(*errno)
                )
            }
        }
    }
}

impl std::error::Error for SpawnError {}

/// Threads in this process: /proc/self/task has one entry per thread (plus . and ..).
fn thread_count() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/task")?
        .nlink()
        .saturating_sub(2))
}

/// Facts about this process the child sequence needs, read once: they only change at
/// broker start (capabilities can only be dropped from the bounding set, so a cached list
/// is a superset of the live one, and dropping an absent cap is a no-op).
struct ProcessFacts {
    /// Capabilities still in this process's bounding set.
    bounding: Vec<u32>,
    /// Signals whose disposition is not the default. Handlers are reset by exec anyway,
    /// but SIG_IGN survives it (Rust ignores SIGPIPE at startup).
    non_default_signals: Vec<libc::c_int>,
}

static PROCESS_FACTS: std::sync::OnceLock<ProcessFacts> = std::sync::OnceLock::new();

fn process_facts() -> io::Result<&'static ProcessFacts> {
    if let Some(f) = PROCESS_FACTS.get() {
        return Ok(f);
    }
    let last_cap = last_capability()?;
    // SAFETY: PR_CAPBSET_READ takes a capability number and returns 0, 1 or -1.
    let bounding = (0..=last_cap)
        .filter(|c| unsafe { libc::prctl(libc::PR_CAPBSET_READ, *c, 0, 0, 0) } == 1)
        .collect();
    let non_default_signals = (1..=LAST_SIGNAL)
        .filter(|sig| {
            // SAFETY: zeroed is a valid sigaction; sigaction only writes through `old`.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a null new action only queries the current one.
            let rc = unsafe { libc::sigaction(*sig, ptr::null(), &mut old) };
            rc == 0 && old.sa_sigaction != libc::SIG_DFL
        })
        .collect();
    Ok(PROCESS_FACTS.get_or_init(|| ProcessFacts {
        bounding,
        non_default_signals,
    }))
}

/// The highest capability number this kernel knows.
pub fn last_capability() -> io::Result<u32> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("unreadable /proc/sys/kernel/cap_last_cap"))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Everything the child touches, built before the fork.
struct Prepared<'s> {
    argv: Vec<*const libc::c_char>,
    env: Vec<*const libc::c_char>,
    fd_sources: [RawFd; MAX_CHILD_FDS],
    fd_targets: [RawFd; MAX_CHILD_FDS],
    fd_count: usize,
    first_unkept_fd: RawFd,
    exe: RawFd,
    cgroup_procs: Vec<RawFd>,
    /// -1: none.
    cgroup_dir: RawFd,
    controlling_tty: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    identity: Option<&'s Identity>,
    groups_scratch: Vec<libc::gid_t>,
    /// The group list as getgroups reports it: the kernel keeps it sorted.
    groups_sorted: Vec<libc::gid_t>,
    facts: &'static ProcessFacts,
    umask: libc::mode_t,
    cwd: Option<&'s CStr>,
    cwd_id: Option<(u64, u64, u32)>,
    parent_death_signal: Option<i32>,
    parent_pid: libc::pid_t,
    /// Where the child keeps its report pipe once it has moved it out of the way of the
    /// fds it arranges (-1 until then).
    report_fd: RawFd,
    /// The fds above 2 the child's sequence uses (sorted; `fork_with` adds the report
    /// pipe). Everything else is closed first thing in the child, while it is still root
    /// and nobody else can stop it.
    keep_fds: Vec<RawFd>,
    confine: Option<&'s Confine>,
}

impl<'s> Prepared<'s> {
    /// For a child that execs nothing (a directory check, a signal): the identity change
    /// alone, no fds kept, no limits, no working directory.
    fn bare(identity: Option<&'s Identity>) -> Result<Prepared<'s>, SpawnError> {
        let mut groups_sorted = identity.map(|id| id.groups.clone()).unwrap_or_default();
        groups_sorted.sort_unstable();
        groups_sorted.dedup();
        Ok(Prepared {
            argv: Vec::new(),
            env: Vec::new(),
            fd_sources: [-1; MAX_CHILD_FDS],
            fd_targets: [-1; MAX_CHILD_FDS],
            fd_count: 0,
            first_unkept_fd: 3,
            exe: -1,
            cgroup_procs: Vec::new(),
            cgroup_dir: -1,
            controlling_tty: false,
            rlimits: Vec::new(),
            identity,
            groups_scratch: vec![0; identity.map_or(0, |id| id.groups.len()) + 1],
            groups_sorted,
            facts: process_facts().map_err(SpawnError::Setup)?,
            umask: 0o077,
            cwd: None,
            cwd_id: None,
            parent_death_signal: None,
            // SAFETY: getpid has no preconditions.
            parent_pid: unsafe { libc::getpid() },
            report_fd: -1,
            keep_fds: Vec::new(),
            confine: None,
        })
    }
}

impl Prepared<'_> {
    fn report_fd_or(&self, original: RawFd) -> RawFd {
        if self.report_fd >= 0 {
            self.report_fd
        } else {
            original
        }
    }
}

/// How a child got into its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupJoin {
    /// None was asked for.
    None,
    /// Born in it (`clone3(CLONE_INTO_CGROUP)`).
    AtClone,
    /// It wrote itself into `cgroup.procs` files: v1, or v2 where clone3 cannot.
    Written,
}

/// A child that has been started and is running its sequence towards exec (or has
/// already exec'd or failed: [`read_report`] tells).
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    /// Taken at clone (`CLONE_PIDFD`): signals through it can never reach another process
    /// that reused the pid.
    pub pidfd: OwnedFd,
    /// The read end of the child's report pipe (close-on-exec on the child's side): end of
    /// file once the child exec'd, a [`ChildReport`] record if it failed before, or (for
    /// [`start_probe`]) what it found.
    pub report: OwnedFd,
    pub cgroup_join: CgroupJoin,
}

/// What a child wrote to its report pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildReport {
    /// End of file with nothing written: the exec succeeded.
    Execed,
    /// A step before exec failed; the child `_exit`ed (reap it as usual).
    Failed { stage: ChildStage, errno: i32 },
    /// [`start_probe`]: the directory exists and the user can enter it.
    Dir { dev: u64, ino: u64, uid: u32 },
}

/// One record on the report pipe: tag, stage or uid, errno, dev, ino.
const REPORT_BYTES: usize = 4 + 4 + 4 + 8 + 8;
const TAG_FAILED: u32 = 1;
const TAG_DIR: u32 = 2;

/// The bytes a child writes for `report` (`Execed` writes none: the pipe closes on exec).
/// Public for test doubles that stand in for a child.
pub fn encode_report(report: &ChildReport) -> Vec<u8> {
    let mut record = vec![0u8; REPORT_BYTES];
    match *report {
        ChildReport::Execed => return Vec::new(),
        ChildReport::Failed { stage, errno } => {
            record[..4].copy_from_slice(&TAG_FAILED.to_ne_bytes());
            record[4..8].copy_from_slice(&(stage as u32).to_ne_bytes());
            record[8..12].copy_from_slice(&errno.to_ne_bytes());
        }
        ChildReport::Dir { dev, ino, uid } => {
            record[..4].copy_from_slice(&TAG_DIR.to_ne_bytes());
            record[4..8].copy_from_slice(&uid.to_ne_bytes());
            record[12..20].copy_from_slice(&dev.to_ne_bytes());
            record[20..28].copy_from_slice(&ino.to_ne_bytes());
        }
    }
    record
}

/// Reads a child's report without blocking. `Ok(None)`: nothing yet (the child is still
/// on its way, or stopped: the caller bounds the wait and kills it through the pidfd).
pub fn read_report(report: BorrowedFd<'_>) -> io::Result<Option<ChildReport>> {
    let mut buf = [0u8; REPORT_BYTES];
    let mut got = 0;
    loop {
        match nix::unistd::read(report, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == REPORT_BYTES {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) if got == 0 => return Ok(None),
            // A record is written with one write(2) of less than PIPE_BUF: it arrives whole.
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let long = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    match (got, word(0)) {
        (0, _) => Ok(Some(ChildReport::Execed)),
        (REPORT_BYTES, TAG_FAILED) => Ok(Some(ChildReport::Failed {
            stage: ChildStage::from_raw(word(4)).unwrap_or(ChildStage::Exec),
            errno: word(8) as i32,
        })),
        (REPORT_BYTES, TAG_DIR) => Ok(Some(ChildReport::Dir {
            uid: word(4),
            dev: long(12),
            ino: long(20),
        })),
        _ => Err(io::Error::other(format!(
            "malformed child report ({got} bytes)"
        ))),
    }
}

/// Starts a child that runs the spawn sequence and then execs `spec.exe`, and returns at
/// once: the caller learns the outcome from [`Started::report`] (from its poll loop) and
/// the exit from `waitpid`.
///
/// The child is a plain fork (`clone3` with `CLONE_PIDFD`, falling back to `fork` and
/// `pidfd_open` on kernels without it): nothing is shared with it, and this thread never
/// waits for it. (Before, `CLONE_VM | CLONE_VFORK` suspended the caller until the exec,
/// so a user who stopped the child after its identity change froze the broker.) Only a
/// single-threaded process may run code in a forked child, so this refuses a process
/// with more than one thread; the broker is single-threaded by design.
pub fn start_child(spec: &ChildSpec<'_>) -> Result<Started, SpawnError> {
    let prepared = prepare(spec).map_err(SpawnError::Setup)?;
    fork_with(prepared, child_sequence)
}

/// [`start_child`], then waits up to `timeout` for the exec; on timeout the child is
/// killed. For tests and tools only: the broker never waits for a child (whoever may
/// signal it could stop it before its exec).
pub fn spawn_child(spec: &ChildSpec<'_>, timeout: std::time::Duration) -> Result<i32, SpawnError> {
    let started = start_child(spec)?;
    match wait_report(&started, timeout)? {
        ChildReport::Execed | ChildReport::Dir { .. } => Ok(started.pid),
        ChildReport::Failed { stage, errno } => {
            reap(started.pid);
            Err(SpawnError::Child { stage, errno })
        }
    }
}

/// Blocks (poll with a timeout) until the child reports; kills and reaps it on timeout.
fn wait_report(started: &Started, timeout: std::time::Duration) -> Result<ChildReport, SpawnError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(r) = read_report(started.report.as_fd()).map_err(SpawnError::Setup)? {
            return Ok(r);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            let _ = pidfd_send_signal(started.pidfd.as_fd(), libc::SIGKILL);
            reap(started.pid);
            return Err(SpawnError::Setup(io::Error::new(
                io::ErrorKind::TimedOut,
                "the child did not reach exec in time",
            )));
        }
        let ms = PollTimeout::try_from(left.as_millis().min(10_000) as i32 + 1)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(started.report.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(SpawnError::Setup(e.into())),
        }
    }
}

/// Starts a child that takes `identity` (the same steps as a spawn, no exec) and checks
/// that `path` is a directory it can enter: it opens the path as the user, `fchdir`s into
/// it, and reports the directory's device, inode and owner ([`ChildReport::Dir`]) or the
/// step that failed. Whatever the path does (a hung FUSE mount, a stopped child), only
/// this child waits on it.
pub fn start_probe(identity: Option<&Identity>, path: &CStr) -> Result<Started, SpawnError> {
    let mut prepared = Prepared::bare(identity)?;
    prepared.cwd = Some(path);
    fork_with(prepared, probe_sequence)
}

/// Starts a child that takes `identity` (real, effective and saved ids all the user's, no
/// capabilities) and sends `signal` to the process group `pgid`, so the kernel lets it
/// reach only what that user could signal. The caller does not wait for it: a user who
/// stops it stops only this signal. Its report is empty on success.
pub fn start_signaller(identity: &Identity, pgid: i32, signal: i32) -> Result<Started, SpawnError> {
    let mut prepared = Prepared::bare(Some(identity))?;
    // The target and the signal ride in fields this child has no other use for (they hold
    // numbers here, not fds: nothing is kept).
    prepared.exe = pgid;
    prepared.cgroup_procs = vec![signal];
    fork_with(prepared, signal_sequence)
}

/// [`start_signaller`]'s child.
fn signal_sequence(p: &mut Prepared<'_>, _report: RawFd) -> (ChildStage, i32) {
    let mut steps = || -> Step {
        reset_signals(p)?;
        become_user(p)?;
        // SAFETY: see the step functions' note; kill takes plain integers.
        let rc = unsafe { libc::kill(-p.exe, p.cgroup_procs[0]) };
        if rc < 0 {
            return Err((ChildStage::Signal, errno()));
        }
        // SAFETY: _exit is async-signal-safe; success is an empty report.
        unsafe { libc::_exit(0) }
    };
    match steps() {
        Ok(()) => (ChildStage::Signal, 0),
        Err(failed) => failed,
    }
}

/// `clone3` arguments (`struct clone_args` up to `cgroup`: version 2, 88 bytes; a kernel
/// that knows only an earlier version takes it while the fields it lacks are zero).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
/// Linux 5.7. (libc's constant is a truncated `c_int`: 0.)
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3` with fork semantics (no `CLONE_VM`), falling back to `fork` on `ENOSYS` when
/// `args` asks for nothing but a pidfd. Returns as fork does, in both processes.
///
/// # Safety
/// The caller must be single-threaded, and in the child (return value 0) run only
/// async-signal-safe code and never return into its caller's frames beyond its own.
unsafe fn clone_fork(args: &mut CloneArgs) -> libc::c_long {
    // SAFETY: `args` is a valid clone_args of the size passed; the rest is the caller's.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 && errno() == libc::ENOSYS && args.flags & CLONE_INTO_CGROUP == 0 {
        // SAFETY: as above; fork has no arguments.
        return unsafe { libc::fork() as libc::c_long };
    }
    pid
}

/// Forks; the child runs `sequence` (which returns only on failure, with the stage and
/// errno, written to the report pipe before `_exit`).
fn fork_with(
    mut prepared: Prepared<'_>,
    sequence: fn(&mut Prepared<'_>, RawFd) -> (ChildStage, i32),
) -> Result<Started, SpawnError> {
    let threads = thread_count().map_err(SpawnError::Setup)?;
    if threads != 1 {
        return Err(SpawnError::Setup(io::Error::other(format!(
            "starting a child needs a single-threaded process, this one has {threads} threads"
        ))));
    }
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| SpawnError::Setup(e.into()))?;
    // The child's end blocks (a report is one small write; the pipe is empty).
    nix::fcntl::fcntl(
        &report_write,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| SpawnError::Setup(e.into()))?;
    let write_fd = report_write.as_raw_fd();
    prepared.keep_fds.push(write_fd);
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        pidfd: (&mut pidfd as *mut RawFd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // cgroup v2: born in the cgroup. The child's copy of `prepared` says so (no
    // `cgroup.procs` to write); the fallback opens the directory's instead.
    let mut pid: libc::c_long = -1;
    let mut cgroup_join = if prepared.cgroup_procs.is_empty() {
        CgroupJoin::None
    } else {
        CgroupJoin::Written
    };
    let mut fallback_procs: Option<OwnedFd> = None;
    // Out here, so the child (which never returns from this function) frees nothing.
    let mut saved_procs: Vec<RawFd>;
    if prepared.cgroup_dir >= 0 {
        let mut into = CloneArgs {
            flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
            cgroup: prepared.cgroup_dir as u64,
            ..args
        };
        saved_procs = std::mem::take(&mut prepared.cgroup_procs);
        finish_keep_fds(&mut prepared);
        // SAFETY: single-threaded (checked above), so the child is a complete copy of this
        // process with no lock held by another thread. In the child (return value 0)
        // only `sequence` runs (async-signal-safe system calls on the prepared copy),
        // then the report write and `_exit`; it never returns into the caller's code.
        // `pidfd` outlives the call.
        pid = unsafe { clone_fork(&mut into) };
        if pid >= 0 {
            cgroup_join = CgroupJoin::AtClone;
        } else {
            let e = errno();
            if !matches!(e, libc::ENOSYS | libc::E2BIG | libc::EINVAL) {
                // EAGAIN: the cgroup's pids limit (the user's) is reached; a migration
                // would have ignored it, being born there does not.
                let why = if e == libc::EAGAIN {
                    " (its process limit, pids.max, may be reached)"
                } else {
                    ""
                };
                return Err(SpawnError::Setup(io::Error::new(
                    io::Error::from_raw_os_error(e).kind(),
                    format!(
                        "cannot start the child in its cgroup (clone3 CLONE_INTO_CGROUP): {}{why}",
                        io::Error::from_raw_os_error(e)
                    ),
                )));
            }
            prepared.cgroup_procs = std::mem::take(&mut saved_procs);
            let file = open_cgroup_procs(prepared.cgroup_dir).map_err(SpawnError::Setup)?;
            prepared.cgroup_procs.push(file.as_raw_fd());
            prepared.keep_fds.push(file.as_raw_fd());
            fallback_procs = Some(file);
            cgroup_join = CgroupJoin::Written;
        }
    }
    if prepared.cgroup_dir < 0 || fallback_procs.is_some() {
        finish_keep_fds(&mut prepared);
        // SAFETY: as above.
        pid = unsafe { clone_fork(&mut args) };
    }
    if pid == 0 {
        // Nothing of the caller's but what the sequence uses: every fd the broker holds
        // (other users' terminals and pipes, the daemon link) is copied into a fork, and a
        // child that has taken a user's uid can be stopped by that user and kept.
        let (stage, err) = match close_unkept(&prepared.keep_fds) {
            Ok(()) => sequence(&mut prepared, write_fd),
            Err(failed) => failed,
        };
        let mut record = [0u8; REPORT_BYTES];
        record[..4].copy_from_slice(&TAG_FAILED.to_ne_bytes());
        record[4..8].copy_from_slice(&(stage as u32).to_ne_bytes());
        record[8..12].copy_from_slice(&err.to_ne_bytes());
        // SAFETY: write and _exit are async-signal-safe; `record` is ours. `report_fd` is
        // wherever the sequence moved the pipe (it tracks it in `prepared`).
        unsafe {
            libc::write(
                prepared.report_fd_or(write_fd),
                record.as_ptr().cast(),
                REPORT_BYTES,
            );
            libc::_exit(127)
        }
    }
    if pid < 0 {
        return Err(SpawnError::Setup(io::Error::last_os_error()));
    }
    drop(report_write);
    drop(fallback_procs);
    let pid = pid as i32;
    let pidfd = if pidfd >= 0 {
        // SAFETY: clone3 stored a fresh descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    } else {
        // fork: the child cannot be reaped before this (only this thread waits), so the
        // pid is still the child's.
        pidfd_open(pid).map_err(SpawnError::Setup)?
    };
    Ok(Started {
        pid,
        pidfd,
        report: report_read,
        cgroup_join,
    })
}

/// The fds the child keeps: above 2, sorted, once each.
fn finish_keep_fds(prepared: &mut Prepared<'_>) {
    prepared.keep_fds.retain(|fd| *fd > 2);
    prepared.keep_fds.sort_unstable();
    prepared.keep_fds.dedup();
}

/// `cgroup.procs` of the cgroup directory `dir`, for writing.
fn open_cgroup_procs(dir: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated literal path relative to a directory fd the caller holds.
    let fd = unsafe {
        libc::openat(
            dir,
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot open the cgroup's cgroup.procs: {e}"),
        ));
    }
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// In a forked child: closes every fd above 2 but `keep` (sorted ascending, all above 2).
fn close_unkept(keep: &[RawFd]) -> Step {
    let close = |first: RawFd, last: libc::c_uint| -> Step {
        // SAFETY: close_range takes plain integers; this runs in the only thread of a
        // freshly forked child, whose fds in the range nothing in it uses.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, last, 0) };
        if rc < 0 {
            return Err((ChildStage::CloseFds, errno()));
        }
        Ok(())
    };
    let mut from: RawFd = 3;
    for &fd in keep {
        if fd > from {
            close(from, (fd - 1) as libc::c_uint)?;
        }
        from = fd + 1;
    }
    close(from, libc::c_uint::MAX)
}

/// A process's pidfd (`pidfd_open(2)`).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Signals the process behind `pidfd` (`pidfd_send_signal(2)`): never another process,
/// whatever became of the pid. `ESRCH` once it has exited.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: plain integers and a null siginfo (the kernel fills one in as for kill(2)).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process behind `pidfd` has exited (the pidfd polls readable then).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

fn prepare<'s>(spec: &'s ChildSpec<'_>) -> io::Result<Prepared<'s>> {
    if spec.argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    }
    let stdio_count = if spec.stdio.is_some() { 3 } else { 0 };
    let fd_count = stdio_count + spec.extra_fds.len();
    if fd_count > MAX_CHILD_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for the child",
        ));
    }
    let mut fd_sources = [-1; MAX_CHILD_FDS];
    let mut fd_targets = [-1; MAX_CHILD_FDS];
    let mut i = 0;
    if let Some(stdio) = &spec.stdio {
        for (n, fd) in stdio.iter().enumerate() {
            fd_sources[i] = fd.as_raw_fd();
            fd_targets[i] = n as RawFd;
            i += 1;
        }
    }
    for (n, fd) in spec.extra_fds.iter().enumerate() {
        fd_sources[i] = fd.as_raw_fd();
        fd_targets[i] = 3 + n as RawFd;
        i += 1;
    }
    let with_null = |v: &'s [CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(ptr::null()))
            .collect::<Vec<_>>()
    };
    let rlimits = spec
        .rlimits
        .iter()
        .map(|r| {
            let conv = |v: u64| {
                if v == u64::MAX {
                    libc::RLIM_INFINITY
                } else {
                    v as libc::rlim_t
                }
            };
            (
                r.resource.raw(),
                libc::rlimit {
                    rlim_cur: conv(r.soft),
                    rlim_max: conv(r.hard),
                },
            )
        })
        .collect();
    let groups_len = spec.identity.as_ref().map_or(0, |id| id.groups.len());
    Ok(Prepared {
        argv: with_null(&spec.argv),
        env: with_null(&spec.env),
        fd_sources,
        fd_targets,
        fd_count,
        first_unkept_fd: 3 + spec.extra_fds.len() as RawFd,
        exe: spec.exe.as_raw_fd(),
        cgroup_procs: spec.cgroup_procs.iter().map(|fd| fd.as_raw_fd()).collect(),
        cgroup_dir: spec.cgroup_dir.map_or(-1, |fd| fd.as_raw_fd()),
        controlling_tty: spec.controlling_tty,
        rlimits,
        identity: spec.identity.as_ref(),
        groups_scratch: vec![0; groups_len + 1],
        groups_sorted: {
            let mut g = spec
                .identity
                .as_ref()
                .map(|id| id.groups.clone())
                .unwrap_or_default();
            g.sort_unstable();
            g.dedup();
            g
        },
        facts: process_facts()?,
        umask: spec.umask as libc::mode_t,
        cwd: spec.cwd.as_deref(),
        cwd_id: spec.cwd_id,
        parent_death_signal: spec.parent_death_signal,
        report_fd: -1,
        // SAFETY: getpid has no preconditions.
        parent_pid: unsafe { libc::getpid() },
        keep_fds: fd_sources[..fd_count]
            .iter()
            .copied()
            .chain([spec.exe.as_raw_fd()])
            .chain(spec.cgroup_procs.iter().map(|fd| fd.as_raw_fd()))
            .collect(),
        confine: spec.confine,
    })
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Returns from the enclosing step function with the stage and errno when a call fails.
macro_rules! check {
    ($stage:expr, $call:expr) => {
        if $call < 0 {
            return Err(($stage, errno()));
        }
    };
}

type Step = Result<(), (ChildStage, i32)>;

/// The child's side, in the order of research/privsep.md phase B. Returns only on failure,
/// with the failing stage and errno (0: a verification found the wrong state).
fn child_sequence(p: &mut Prepared<'_>, report: RawFd) -> (ChildStage, i32) {
    let mut steps = || -> Step {
        reset_signals(p)?;
        join_cgroups(p)?;
        arrange_session_and_fds(p, report)?;
        become_user(p)?;
        finish_and_exec(p)
    };
    match steps() {
        Ok(()) => (ChildStage::Exec, 0),
        Err(failed) => failed,
    }
}

/// [`start_probe`]'s child: the identity change, then the directory, then the report.
fn probe_sequence(p: &mut Prepared<'_>, report: RawFd) -> (ChildStage, i32) {
    let mut steps = || -> Result<(u64, u64, u32), (ChildStage, i32)> {
        reset_signals(p)?;
        become_user(p)?;
        enter_cwd(p)
    };
    match steps() {
        Ok((dev, ino, uid)) => {
            let mut record = [0u8; REPORT_BYTES];
            record[..4].copy_from_slice(&TAG_DIR.to_ne_bytes());
            record[4..8].copy_from_slice(&uid.to_ne_bytes());
            record[12..20].copy_from_slice(&dev.to_ne_bytes());
            record[20..28].copy_from_slice(&ino.to_ne_bytes());
            // SAFETY: write and _exit are async-signal-safe; `record` is ours.
            unsafe {
                libc::write(report, record.as_ptr().cast(), REPORT_BYTES);
                libc::_exit(0)
            }
        }
        Err(failed) => failed,
    }
}

// SAFETY (for every unsafe block in the step functions below): they run only in the
// only thread of a freshly forked child. Each call is an async-signal-safe system call
// (signal(7) lists them, or raw syscalls/prctl) whose pointer arguments point into `p`,
// which the parent built before the fork, or into the step's own locals.

/// B1: default dispositions for every signal, then an empty mask (the broker blocks the
/// signals it reads through a signalfd; a blocked mask survives exec).
fn reset_signals(p: &Prepared<'_>) -> Step {
    // SAFETY: see above.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut action.sa_mask);
        for &sig in &p.facts.non_default_signals {
            check!(
                ChildStage::ResetSignals,
                libc::sigaction(sig, &action, ptr::null_mut())
            );
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check!(
            ChildStage::ResetSignals,
            libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut())
        );
    }
    Ok(())
}

/// Into the cgroups before anything else: "0" is the writer itself. Root writes here; the
/// user could not.
fn join_cgroups(p: &Prepared<'_>) -> Step {
    for &fd in &p.cgroup_procs {
        // SAFETY: see above.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        check!(ChildStage::JoinCgroups, written as libc::c_int);
    }
    Ok(())
}

/// B2/B3: a new session (also a new process group), the fds in place, the controlling
/// terminal, the user's rlimits. The report pipe moves above the kept range first.
fn arrange_session_and_fds(p: &mut Prepared<'_>, report: RawFd) -> Step {
    use ChildStage::*;
    // SAFETY: see above.
    unsafe {
        check!(NewSession, libc::setsid());
        p.report_fd = libc::fcntl(report, libc::F_DUPFD_CLOEXEC, p.first_unkept_fd);
        check!(ArrangeFds, p.report_fd);
        // First copy every source above the kept range (so one source cannot be
        // overwritten by another's dup2), then move each into place.
        let mut temps = [-1; MAX_CHILD_FDS];
        for (temp, source) in temps.iter_mut().zip(&p.fd_sources).take(p.fd_count) {
            *temp = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, p.first_unkept_fd);
            check!(ArrangeFds, *temp);
        }
        p.exe = libc::fcntl(p.exe, libc::F_DUPFD_CLOEXEC, p.first_unkept_fd);
        check!(ArrangeFds, p.exe);
        for (temp, target) in temps.iter().zip(&p.fd_targets).take(p.fd_count) {
            check!(ArrangeFds, libc::dup2(*temp, *target));
        }
        if p.controlling_tty {
            check!(ControllingTty, libc::ioctl(0, libc::TIOCSCTTY, 0));
        }
        // B4: the user's limits, not the broker's.
        for (resource, limit) in &p.rlimits {
            check!(Rlimits, libc::setrlimit(*resource, limit));
        }
    }
    Ok(())
}

/// B5–B8: groups, then gid, then (still privileged) the bounding and ambient sets, then
/// uid; verify all of it and that root cannot be regained; empty capabilities;
/// `no_new_privs`.
fn become_user(p: &mut Prepared<'_>) -> Step {
    use ChildStage::*;
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let zero = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // Raw system calls, not glibc's wrappers: those may try to coordinate an identity
    // change across threads (setxid), which has no place in this child.
    let raw = |r: libc::c_long| r as libc::c_int;
    let clear_ambient = || -> Step {
        // SAFETY: see above.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        if rc < 0 && errno() != libc::EINVAL {
            return Err((ClearAmbient, errno()));
        }
        Ok(())
    };
    // SAFETY: see above.
    unsafe {
        if let Some(id) = p.identity {
            check!(
                SetGroups,
                raw(libc::syscall(
                    libc::SYS_setgroups,
                    id.groups.len(),
                    id.groups.as_ptr()
                ))
            );
            check!(
                SetGid,
                raw(libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid))
            );
            for &cap in &p.facts.bounding {
                check!(
                    DropBoundingSet,
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0)
                );
            }
            clear_ambient()?;
            check!(
                SetUid,
                raw(libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid))
            );

            let (mut r, mut e, mut s) = (0, 0, 0);
            check!(VerifyIds, libc::getresuid(&mut r, &mut e, &mut s));
            if (r, e, s) != (id.uid, id.uid, id.uid) {
                return Err((VerifyIds, 0));
            }
            check!(VerifyIds, libc::getresgid(&mut r, &mut e, &mut s));
            if (r, e, s) != (id.gid, id.gid, id.gid) {
                return Err((VerifyIds, 0));
            }
            let n = libc::getgroups(
                p.groups_scratch.len() as libc::c_int,
                p.groups_scratch.as_mut_ptr(),
            );
            if n < 0 || p.groups_scratch[..n as usize] != p.groups_sorted[..] {
                return Err((VerifyIds, 0));
            }
            // Regaining root must fail (OpenSSH permanently_set_uid).
            if id.uid != 0
                && (libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0
                    || libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0)
            {
                return Err((VerifyIds, 0));
            }
        } else {
            clear_ambient()?;
        }
        check!(
            ClearCapabilities,
            libc::syscall(libc::SYS_capset, &mut header, zero.as_ptr()) as libc::c_int
        );
        let mut now = [CapData {
            effective: 1,
            permitted: 1,
            inheritable: 1,
        }; 2];
        check!(
            VerifyCapabilities,
            libc::syscall(libc::SYS_capget, &mut header, now.as_mut_ptr()) as libc::c_int
        );
        if now
            .iter()
            .any(|d| d.effective | d.permitted | d.inheritable != 0)
        {
            return Err((VerifyCapabilities, 0));
        }
        // The ambient set is a subset of permitted and inheritable, both now empty; the
        // bounding set never grows, so checking what was in it covers all of it.
        if p.identity.is_some() {
            for &cap in &p.facts.bounding {
                if libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) != 0 {
                    return Err((VerifyCapabilities, 0));
                }
            }
        }
        check!(
            NoNewPrivs,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
    }
    Ok(())
}

/// B12: the working directory, opened with the user's own permissions and entered by
/// `fchdir`; with a pinned identity, it must be that very directory. Returns its device,
/// inode and owner.
fn enter_cwd(p: &Prepared<'_>) -> Result<(u64, u64, u32), (ChildStage, i32)> {
    use ChildStage::*;
    let Some(cwd) = p.cwd else {
        return Ok((0, 0, 0));
    };
    // SAFETY: see above.
    unsafe {
        let fd = libc::open(
            cwd.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        check!(Chdir, fd);
        let mut st: libc::stat = std::mem::zeroed();
        check!(VerifyCwd, libc::fstat(fd, &mut st));
        if let Some((dev, ino, uid)) = p.cwd_id {
            if (st.st_dev, st.st_ino, st.st_uid) != (dev, ino, uid) {
                return Err((VerifyCwd, 0));
            }
        }
        check!(Chdir, libc::fchdir(fd));
        libc::close(fd);
        Ok((st.st_dev, st.st_ino, st.st_uid))
    }
}

/// B9–B13: the parent-death signal, only the kept fds, umask, the working directory, exec.
fn finish_and_exec(p: &Prepared<'_>) -> Step {
    use ChildStage::*;
    // SAFETY: see above.
    unsafe {
        // B9: after the identity change, which clears it; then make sure the parent did
        // not die before it was set.
        if let Some(sig) = p.parent_death_signal {
            check!(
                ParentDeathSignal,
                libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0)
            );
            if libc::getppid() != p.parent_pid {
                return Err((ParentDeathSignal, 0));
            }
        }
        // B10: nothing but the kept fds survives exec (the report pipe is close-on-exec).
        check!(
            CloseFds,
            libc::syscall(
                libc::SYS_close_range,
                p.first_unkept_fd,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC
            ) as libc::c_int
        );
        libc::umask(p.umask);
    }
    enter_cwd(p)?;
    if let Some(confine) = p.confine {
        confine_writes(confine)?;
    }
    // SAFETY: see above.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            p.exe,
            c"".as_ptr(),
            p.argv.as_ptr(),
            p.env.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    Err((Exec, errno()))
}

// ---------------------------------------------------------------------------------------
// Landlock (write confinement of a run)

/// Landlock's constants (`linux/landlock.h`); public for the tests that check the masks.
pub mod landlock {
    pub const CREATE_RULESET_VERSION: u32 = 1 << 0;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;

    pub const FS_EXECUTE: u64 = 1 << 0;
    pub const FS_WRITE_FILE: u64 = 1 << 1;
    pub const FS_READ_FILE: u64 = 1 << 2;
    pub const FS_READ_DIR: u64 = 1 << 3;
    pub const FS_REMOVE_DIR: u64 = 1 << 4;
    pub const FS_REMOVE_FILE: u64 = 1 << 5;
    pub const FS_MAKE_CHAR: u64 = 1 << 6;
    pub const FS_MAKE_DIR: u64 = 1 << 7;
    pub const FS_MAKE_REG: u64 = 1 << 8;
    pub const FS_MAKE_SOCK: u64 = 1 << 9;
    pub const FS_MAKE_FIFO: u64 = 1 << 10;
    pub const FS_MAKE_BLOCK: u64 = 1 << 11;
    pub const FS_MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const FS_REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const FS_TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const FS_IOCTL_DEV: u64 = 1 << 15;

    /// ABI 6.
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    /// ABI 6.
    pub const SCOPE_SIGNAL: u64 = 1 << 1;

    /// The lowest ABI stoa confines with: below 3 truncation (`truncate(2)`, `O_TRUNC`) is
    /// not covered, so a file outside the allowed paths could still be emptied.
    pub const MIN_ABI: u32 = 3;
    /// ABI 6: signals and abstract unix sockets can be scoped to the run's domain.
    pub const SCOPE_ABI: u32 = 6;
}

/// This kernel's Landlock ABI version. `Err`: none (`ENOSYS`: not built in, or a seccomp
/// filter of a container that predates it; `EOPNOTSUPP`: built in but not enabled at boot,
/// see `lsm=`).
pub fn landlock_abi() -> io::Result<u32> {
    // SAFETY: a null attribute with size 0 and the VERSION flag only asks for the version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            ptr::null::<libc::c_void>(),
            0usize,
            landlock::CREATE_RULESET_VERSION,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u32)
}

/// `struct landlock_ruleset_attr` as of ABI 6 (the kernel accepts the larger struct from
/// older ABIs as long as the fields it does not know are zero).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's header).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A run's write confinement, built before the fork. In the child, after the identity
/// change and `no_new_privs`, with the working directory entered: a ruleset that handles
/// every write right this ABI knows; the working directory, the linked git directories of
/// a git worktree (see [`allow_git_dirs`]) and each of `paths` allowed beneath; then
/// `landlock_restrict_self`. Paths are opened there, with the user's own rights; one the
/// user cannot open (or that does not exist) is left out. Reads are not handled: Unix
/// permissions govern them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    abi: u32,
    handled: u64,
    scoped: u64,
    paths: Vec<CString>,
}

impl Confine {
    /// `abi` as [`landlock_abi`] found it (at least [`landlock::MIN_ABI`]); `scope`: also
    /// scope signals and abstract unix sockets where the ABI can (6 and later).
    pub fn new(abi: u32, scope: bool, paths: Vec<CString>) -> io::Result<Confine> {
        use landlock::*;
        if abi < MIN_ABI {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("Landlock ABI {abi} is below {MIN_ABI}: truncation is not covered"),
            ));
        }
        let mut handled = FS_WRITE_FILE
            | FS_REMOVE_DIR
            | FS_REMOVE_FILE
            | FS_MAKE_CHAR
            | FS_MAKE_DIR
            | FS_MAKE_REG
            | FS_MAKE_SOCK
            | FS_MAKE_FIFO
            | FS_MAKE_BLOCK
            | FS_MAKE_SYM
            // Handled so that it can be granted: unhandled, a rename or link across
            // directories is always refused (EXDEV) under any ruleset.
            | FS_REFER
            | FS_TRUNCATE;
        if abi >= 5 {
            handled |= FS_IOCTL_DEV;
        }
        let scoped = if scope && abi >= SCOPE_ABI {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        };
        Ok(Confine {
            abi,
            handled,
            scoped,
            paths,
        })
    }

    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// The write rights the ruleset handles (all denied outside the allowed paths).
    pub fn handled_access(&self) -> u64 {
        self.handled
    }

    pub fn scoped(&self) -> u64 {
        self.scoped
    }

    pub fn paths(&self) -> &[CString] {
        &self.paths
    }

    /// What a directory allowed beneath gets: every handled right.
    pub fn dir_access(&self) -> u64 {
        self.handled
    }

    /// What a file (a device node) allowed gets: the rights that apply to a file.
    pub fn file_access(&self) -> u64 {
        use landlock::*;
        self.handled & (FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)
    }
}

/// The path in a git worktree's `.git` file (`gitdir: <path>`, one line), NUL-terminated
/// in place: the length of the path, or `None` if `buf[..len]` is not such a file.
/// `buf` must have a byte to spare after `len`.
pub fn parse_gitdir_file(buf: &mut [u8], len: usize) -> Option<usize> {
    const PREFIX: &[u8] = b"gitdir: ";
    if len >= buf.len() || !buf[..len].starts_with(PREFIX) {
        return None;
    }
    let rest = &buf[PREFIX.len()..len];
    let end = rest
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(rest.len());
    if end == 0 || rest[..end].contains(&0) {
        return None;
    }
    buf.copy_within(PREFIX.len()..PREFIX.len() + end, 0);
    buf[end] = 0;
    Some(end)
}

/// A path file as git writes them (one line, e.g. a worktree's back link `gitdir`),
/// NUL-terminated in place; `None` if empty or not one line.
fn parse_line_file(buf: &mut [u8], len: usize) -> Option<usize> {
    if len >= buf.len() {
        return None;
    }
    let end = buf[..len]
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(len);
    if end == 0 || buf[..end].contains(&0) {
        return None;
    }
    buf[end] = 0;
    Some(end)
}

/// The longest `.git` or `gitdir` file read (a path: `PATH_MAX`, and the prefix).
const GIT_FILE_BYTES: usize = 4096 + 16;

// SAFETY (for the unsafe blocks of the confinement steps below): as for the other step
// functions, they run in the only thread of a forked child, after its identity change;
// every call is a raw system call whose pointers point into `Confine` (built before the
// fork) or into the step's own stack.

/// In the child: the ruleset, its rules, `landlock_restrict_self`. The ruleset is created
/// here too, so the parent never shares one with a child.
fn confine_writes(c: &Confine) -> Step {
    use ChildStage::Confine as Stage;
    let attr = RulesetAttr {
        handled_access_fs: c.handled,
        handled_access_net: 0,
        scoped: c.scoped,
    };
    // SAFETY: see above.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    } as libc::c_int;
    check!(Stage, ruleset);
    let result = (|| -> Step {
        allow_beneath(c, ruleset, libc::AT_FDCWD, c".")?;
        for path in &c.paths {
            allow_beneath(c, ruleset, libc::AT_FDCWD, path)?;
        }
        allow_git_dirs(c, ruleset)?;
        // SAFETY: see above.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
        check!(Stage, rc as libc::c_int);
        Ok(())
    })();
    // SAFETY: see above; the ruleset is ours.
    unsafe { libc::close(ruleset) };
    result
}

/// Opens `path` (relative to `dir`) as the user with `O_PATH` and allows it; a path that
/// cannot be opened is left out (it grants nothing then).
fn allow_beneath(c: &Confine, ruleset: RawFd, dir: RawFd, path: &CStr) -> Step {
    // SAFETY: see above.
    let fd = unsafe { libc::openat(dir, path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Ok(());
    }
    let result = allow_fd(c, ruleset, fd);
    // SAFETY: see above; the fd is ours.
    unsafe { libc::close(fd) };
    result
}

/// Adds a rule for an open `O_PATH` fd: every handled right beneath a directory, the file
/// rights on anything else.
fn allow_fd(c: &Confine, ruleset: RawFd, fd: RawFd) -> Step {
    use ChildStage::Confine as Stage;
    // SAFETY: see above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    check!(Stage, unsafe { libc::fstat(fd, &mut st) });
    let allowed_access = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        c.dir_access()
    } else {
        c.file_access()
    };
    if allowed_access == 0 {
        return Ok(());
    }
    let attr = PathBeneathAttr {
        allowed_access,
        parent_fd: fd,
    };
    // SAFETY: see above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            landlock::RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    check!(Stage, rc as libc::c_int);
    Ok(())
}

/// Reads a small file relative to `dir` as the user (no symlink at the end, no blocking on
/// a FIFO, regular files only) into `buf`; the bytes read.
fn read_small_file(dir: RawFd, name: &CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: see above.
    unsafe {
        let fd = libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        let regular = libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG;
        let n = if regular {
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
        } else {
            -1
        };
        libc::close(fd);
        (n >= 0).then_some(n as usize)
    }
}

/// (device, inode) of an open fd.
fn fd_id(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: see above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Opens `path` relative to `dir` with `O_PATH` (following symlinks: it runs as the user).
fn open_path(dir: RawFd, path: *const libc::c_char, flags: libc::c_int) -> Option<RawFd> {
    // SAFETY: see above.
    let fd = unsafe { libc::openat(dir, path, libc::O_PATH | libc::O_CLOEXEC | flags) };
    (fd >= 0).then_some(fd)
}

/// A linked git worktree (`git worktree add`) writes to its own git directory
/// (`<repo>/.git/worktrees/<name>`) and to the repository's (`<repo>/.git`, objects and
/// refs), both outside the worktree. Its `.git` file names the first, and anyone who can
/// write the worktree can rewrite that file, so the name is trusted only when the
/// directory it names links back to this very `.git` file (its `gitdir` file, same device
/// and inode) and sits in a `worktrees` directory; the repository's is then the one two
/// levels up. A confined run cannot forge such a link anywhere it cannot already write.
/// Anything else (no `.git` file, a submodule, a broken link) allows nothing more.
fn allow_git_dirs(c: &Confine, ruleset: RawFd) -> Step {
    let mut buf = [0u8; GIT_FILE_BYTES];
    let Some(len) = read_small_file(libc::AT_FDCWD, c".git", &mut buf[..GIT_FILE_BYTES - 1]) else {
        return Ok(());
    };
    let Some(_) = parse_gitdir_file(&mut buf, len) else {
        return Ok(());
    };
    let Some(dot_git) = open_path(libc::AT_FDCWD, c".git".as_ptr(), libc::O_NOFOLLOW) else {
        return Ok(());
    };
    let own_id = fd_id(dot_git);
    // SAFETY: see above; the fd is ours.
    unsafe { libc::close(dot_git) };
    let Some(gitdir) = open_path(libc::AT_FDCWD, buf.as_ptr().cast(), libc::O_DIRECTORY) else {
        return Ok(());
    };
    let result = (|| -> Step {
        let mut back = [0u8; GIT_FILE_BYTES];
        let Some(len) = read_small_file(gitdir, c"gitdir", &mut back[..GIT_FILE_BYTES - 1]) else {
            return Ok(());
        };
        if parse_line_file(&mut back, len).is_none() {
            return Ok(());
        }
        let Some(linked) = open_path(gitdir, back.as_ptr().cast(), libc::O_NOFOLLOW) else {
            return Ok(());
        };
        let linked_id = fd_id(linked);
        // SAFETY: see above; the fd is ours.
        unsafe { libc::close(linked) };
        if own_id.is_none() || linked_id != own_id {
            return Ok(());
        }
        let (Some(parent), Some(common)) = (
            open_path(gitdir, c"..".as_ptr(), libc::O_DIRECTORY),
            open_path(gitdir, c"../..".as_ptr(), libc::O_DIRECTORY),
        ) else {
            return Ok(());
        };
        let worktrees = open_path(common, c"worktrees".as_ptr(), libc::O_DIRECTORY);
        let genuine = worktrees.is_some_and(|w| fd_id(w).is_some() && fd_id(w) == fd_id(parent));
        let result = if genuine {
            allow_fd(c, ruleset, gitdir).and_then(|()| allow_fd(c, ruleset, common))
        } else {
            Ok(())
        };
        // SAFETY: see above; the fds are ours.
        unsafe {
            for fd in [Some(parent), Some(common), worktrees]
                .into_iter()
                .flatten()
            {
                libc::close(fd);
            }
        }
        result
    })();
    // SAFETY: see above; the fd is ours.
    unsafe { libc::close(gitdir) };
    result
}

// ---------------------------------------------------------------------------------------
// The broker's re-exec (upgrade in place)

/// Takes ownership of `fd`, which this process inherited across its own exec (the broker's
/// upgrade in place lists them in its state). Refused unless it is open and above the stdio
/// numbers; the caller makes sure each number is taken once.
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is a stdio number, not an inherited one"),
        ));
    }
    // SAFETY: F_GETFD only reads the fd's flags; an fd that is not open gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (above), this process owns it (inherited; nothing else in it
    // knows the number), and the caller takes each number once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets or clears close-on-exec on `fd` (an fd of this process; the broker's upgrade marks
/// what it carries across its exec).
pub fn set_fd_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes the fd's flags; a number that is not open gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces this process's program by `exe` (`execveat(AT_EMPTY_PATH)`: the file that was
/// checked is the file that runs), keeping its pid, children and every fd not marked
/// close-on-exec. Returns only on failure, with the error.
pub fn reexec(exe: BorrowedFd<'_>, argv: &[CString], env: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(ptr::null());
    // SAFETY: both arrays are null-terminated and point into CStrings that outlive the
    // call; on success the call does not return.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            exe.as_raw_fd(),
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    io::Error::last_os_error()
}

// ---------------------------------------------------------------------------------------
// Passing fds over Unix sockets

/// What one `recvmsg` brought.
pub struct Received {
    pub bytes: usize,
    /// Every fd that arrived (close-on-exec), owned: dropping closes them.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped fds or control data that did not fit (`MSG_CTRUNC`).
    pub truncated: bool,
}

/// Most fds accepted in one `recvmsg`.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

/// `recvmsg` with room for [`MAX_FDS_PER_MESSAGE`] fds, `MSG_CMSG_CLOEXEC` always, and
/// `MSG_DONTWAIT` when `nonblocking`.
pub fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> io::Result<Received> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us
                // alone; wrapping each exactly once makes this the only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// `sendmsg` of `buf` with `fds` attached (`SCM_RIGHTS`), `MSG_NOSIGNAL`, and
/// `MSG_DONTWAIT` when `nonblocking`. Returns the bytes sent; the fds go with the first.
pub fn send_with_fds(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    Ok(sendmsg::<()>(
        fd.as_raw_fd(),
        &[io::IoSlice::new(buf)],
        &cmsgs,
        flags,
        None,
    )?)
}

/// Registers an owned fd (pipe, PTY master, socket) with tokio's reactor.
#[cfg(feature = "async")]
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that stays the same until the AsyncFd,
    // which now owns it, drops it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod shared_map_tests {
    use super::*;

    #[test]
    fn memfd_is_sealed_and_maps_shared() {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let fd = create_ring_memfd(10_000).unwrap();
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap());
        assert!(
            seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL)
        );
        // Sealed: it cannot be shrunk or grown, nor resealed.
        assert!(nix::unistd::ftruncate(&fd, 10).is_err());
        assert!(nix::unistd::ftruncate(&fd, 20_000).is_err());
        assert!(fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).is_err());
        let flags = fcntl(&fd, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);

        let mut a = SharedMap::new(fd.as_fd()).unwrap();
        assert_eq!(a.len(), 10_000);
        a.write_at(9_990, b"0123456789").unwrap();
        a.store_u64(8, 0xdead_beef).unwrap();
        // A second mapping of the same file sees the same bytes, and its writes show here.
        let mut b = SharedMap::new(fd.as_fd()).unwrap();
        let mut out = [0u8; 10];
        b.read_at(9_990, &mut out).unwrap();
        assert_eq!(&out, b"0123456789");
        assert_eq!(b.load_u64(8).unwrap(), 0xdead_beef);
        b.write_at(0, b"hi").unwrap();
        drop(b);
        let mut two = [0u8; 2];
        a.read_at(0, &mut two).unwrap();
        assert_eq!(&two, b"hi");
    }

    #[test]
    fn out_of_bounds_and_unaligned_are_refused() {
        let fd = create_ring_memfd(64).unwrap();
        let mut m = SharedMap::new(fd.as_fd()).unwrap();
        assert!(m.write_at(60, b"12345").is_err());
        assert!(m.write_at(usize::MAX, b"1").is_err());
        assert!(m.read_at(64, &mut [0u8; 1]).is_err());
        assert!(m.read_at(0, &mut [0u8; 64]).is_ok());
        assert!(m.load_u64(60).is_err());
        assert!(m.load_u64(4).is_err());
        assert!(m.store_u64(64, 1).is_err());
        assert!(m.store_u64(56, 1).is_ok());
    }

    #[test]
    fn unsealed_files_and_bad_sizes_are_refused() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let plain = memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, 4096).unwrap();
        assert!(SharedMap::new(plain.as_fd()).is_err());
        assert!(create_ring_memfd(0).is_err());
        assert!(create_ring_memfd(MAX_SHARED_MAP_BYTES + 1).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// PAM (the log-in helper's password check)

pub mod pam {
    //! Checking a Unix account's password with PAM, for the log-in helper (`stoa __pam-login`,
    //! a short-lived root process per attempt: PAM modules never load in the broker or the
    //! front).
    //!
    //! `libpam.so.0` is opened at run time (`dlopen`), so building stoa needs no `-dev` package:
    //! a fresh Debian has the library but not its headers or its `libpam.so` link. The
    //! declarations below follow Linux-PAM's `<security/_pam_types.h>`.
    //!
    //! | step                | call                                   | refusal it can give                    |
    //! |---------------------|----------------------------------------|----------------------------------------|
    //! | start               | `pam_start(service, user, conv)`       | PAM not usable (`Unavailable`)         |
    //! | where from          | `pam_set_item(PAM_RHOST)`              | –                                      |
    //! | the password        | `pam_authenticate(PAM_DISALLOW_NULL_AUTHTOK)` | wrong password or unknown user (one answer for both) |
    //! | the account         | `pam_acct_mgmt(PAM_DISALLOW_NULL_AUTHTOK)` | expired, locked by policy, password must change |
    //! | end                 | `pam_end`                              | –                                      |
    //!
    //! The conversation answers the first prompt that hides what is typed with the password, a
    //! visible prompt for the login name with the name, and any other prompt with a
    //! conversation error: the password is never given to a prompt it was not meant for (a
    //! second factor this helper cannot ask for fails closed).

    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::ptr;

    const PAM_SUCCESS: c_int = 0;
    const PAM_PERM_DENIED: c_int = 6;
    const PAM_AUTH_ERR: c_int = 7;
    const PAM_CRED_INSUFFICIENT: c_int = 8;
    const PAM_USER_UNKNOWN: c_int = 10;
    const PAM_MAXTRIES: c_int = 11;
    const PAM_NEW_AUTHTOK_REQD: c_int = 12;
    const PAM_CONV_ERR: c_int = 19;
    const PAM_BUF_ERR: c_int = 5;

    const PAM_PROMPT_ECHO_OFF: c_int = 1;
    const PAM_PROMPT_ECHO_ON: c_int = 2;
    const PAM_ERROR_MSG: c_int = 3;
    const PAM_TEXT_INFO: c_int = 4;

    const PAM_RHOST: c_int = 4;
    const PAM_DISALLOW_NULL_AUTHTOK: c_int = 0x0001;
    /// Most messages kept from the modules (each clipped), for the refusal's words.
    const MAX_MESSAGES: usize = 8;

    #[repr(C)]
    struct PamMessage {
        msg_style: c_int,
        msg: *const c_char,
    }

    #[repr(C)]
    struct PamResponse {
        resp: *mut c_char,
        resp_retcode: c_int,
    }

    type ConvFn = unsafe extern "C" fn(
        num_msg: c_int,
        msg: *mut *const PamMessage,
        resp: *mut *mut PamResponse,
        appdata: *mut c_void,
    ) -> c_int;

    #[repr(C)]
    struct PamConv {
        conv: ConvFn,
        appdata: *mut c_void,
    }

    type PamStart = unsafe extern "C" fn(
        service: *const c_char,
        user: *const c_char,
        conv: *const PamConv,
        handle: *mut *mut c_void,
    ) -> c_int;
    type PamStep = unsafe extern "C" fn(handle: *mut c_void, flags: c_int) -> c_int;
    type PamSetItem =
        unsafe extern "C" fn(handle: *mut c_void, item: c_int, value: *const c_void) -> c_int;
    type PamStrerror = unsafe extern "C" fn(handle: *mut c_void, errnum: c_int) -> *const c_char;

    /// Why a log-in was refused.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Refused {
        /// Wrong password, unknown user, a locked password: one answer, so nobody learns which.
        Credentials,
        /// The account may not log in now (expired, refused by the account policy).
        Account(String),
        /// The password is right but must be changed first.
        PasswordExpired,
        /// PAM could not be used at all (no library, a broken configuration).
        Unavailable(String),
    }

    /// What the conversation knows; lives on the caller's stack for the whole PAM run.
    struct Conversation {
        password: CString,
        username: CString,
        password_given: bool,
        messages: Vec<String>,
    }

    /// The conversation function PAM calls. Never unwinds (it is called from C).
    unsafe extern "C" fn converse(
        num_msg: c_int,
        msg: *mut *const PamMessage,
        resp: *mut *mut PamResponse,
        appdata: *mut c_void,
    ) -> c_int {
        if num_msg <= 0 || num_msg > 32 || msg.is_null() || resp.is_null() || appdata.is_null() {
            return PAM_CONV_ERR;
        }
        let count = num_msg as usize;
        // SAFETY: `appdata` is the `Conversation` `authenticate` passed to `pam_start`, alive
        // and not otherwise borrowed while PAM runs (PAM calls this only from inside the calls
        // `authenticate` makes).
        let conv = unsafe { &mut *(appdata as *mut Conversation) };
        // SAFETY: calloc of `count` zeroed responses; PAM frees the array and each `resp`
        // with free(3), so both come from the C allocator.
        let replies =
            unsafe { libc::calloc(count, std::mem::size_of::<PamResponse>()) } as *mut PamResponse;
        if replies.is_null() {
            return PAM_BUF_ERR;
        }
        let mut failed = false;
        for i in 0..count {
            // SAFETY: Linux-PAM passes an array of `num_msg` pointers to messages, each valid
            // for the length of this call.
            let m = unsafe { *msg.add(i) };
            if m.is_null() {
                failed = true;
                break;
            }
            // SAFETY: as above; `msg` is a NUL-terminated string or null.
            let (style, text) = unsafe {
                let m = &*m;
                let text = if m.msg.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(m.msg)
                        .to_string_lossy()
                        .chars()
                        .take(200)
                        .collect()
                };
                (m.msg_style, text)
            };
            let answer: Option<&CStr> = match style {
                PAM_PROMPT_ECHO_OFF if !conv.password_given => {
                    conv.password_given = true;
                    Some(&conv.password)
                }
                // A visible prompt that asks for the login name gets it; any other (a code a
                // second factor wants) fails the conversation.
                PAM_PROMPT_ECHO_ON
                    if {
                        let t = text.to_ascii_lowercase();
                        t.contains("login") || t.contains("user")
                    } =>
                {
                    Some(&conv.username)
                }
                PAM_ERROR_MSG | PAM_TEXT_INFO => {
                    if conv.messages.len() < MAX_MESSAGES && !text.is_empty() {
                        conv.messages.push(text);
                    }
                    None
                }
                _ => {
                    failed = true;
                    break;
                }
            };
            if let Some(answer) = answer {
                // SAFETY: strdup copies a NUL-terminated string into memory PAM frees.
                let copy = unsafe { libc::strdup(answer.as_ptr()) };
                if copy.is_null() {
                    failed = true;
                    break;
                }
                // SAFETY: `i < count`, inside the calloc'd array.
                unsafe { (*replies.add(i)).resp = copy };
            }
        }
        if failed {
            for i in 0..count {
                // SAFETY: each `resp` is null or a strdup'd string of ours; wiped, then freed.
                unsafe {
                    let r = (*replies.add(i)).resp;
                    if !r.is_null() {
                        libc::explicit_bzero(r as *mut c_void, libc::strlen(r));
                        libc::free(r as *mut c_void);
                    }
                }
            }
            // SAFETY: the array calloc'd above, not given to PAM.
            unsafe { libc::free(replies as *mut c_void) };
            return PAM_CONV_ERR;
        }
        // SAFETY: `resp` is PAM's out-pointer; it takes ownership of the array.
        unsafe { *resp = replies };
        PAM_SUCCESS
    }

    /// Checks `username`'s `password` with the PAM service `service` (its account checks too).
    /// `rhost`: where the attempt came from, for PAM's logs and modules.
    pub fn authenticate(
        service: &str,
        username: &str,
        password: &[u8],
        rhost: Option<&str>,
    ) -> Result<(), Refused> {
        let unavailable = |what: String| Refused::Unavailable(what);
        let service =
            CString::new(service).map_err(|_| unavailable("NUL in the service".into()))?;
        let user = CString::new(username).map_err(|_| Refused::Credentials)?;
        let password = CString::new(password).map_err(|_| Refused::Credentials)?;
        let rhost = rhost.and_then(|r| CString::new(r).ok());

        // SAFETY: loading Linux-PAM runs its initialisers, which are plain C library set-up.
        let library = unsafe { libloading::Library::new("libpam.so.0") }
            .map_err(|e| unavailable(format!("cannot load libpam.so.0: {e}")))?;
        // SAFETY: the signatures are Linux-PAM's (see the module comment); the symbols are used
        // only while `library` is loaded (it lives to the end of this function).
        let (start, auth, acct, end, set_item, strerror) = unsafe {
            (
                *library
                    .get::<PamStart>(b"pam_start\0")
                    .map_err(|e| unavailable(e.to_string()))?,
                *library
                    .get::<PamStep>(b"pam_authenticate\0")
                    .map_err(|e| unavailable(e.to_string()))?,
                *library
                    .get::<PamStep>(b"pam_acct_mgmt\0")
                    .map_err(|e| unavailable(e.to_string()))?,
                *library
                    .get::<PamStep>(b"pam_end\0")
                    .map_err(|e| unavailable(e.to_string()))?,
                *library
                    .get::<PamSetItem>(b"pam_set_item\0")
                    .map_err(|e| unavailable(e.to_string()))?,
                *library
                    .get::<PamStrerror>(b"pam_strerror\0")
                    .map_err(|e| unavailable(e.to_string()))?,
            )
        };
        let mut conversation = Box::new(Conversation {
            username: user.clone(),
            password,
            password_given: false,
            messages: Vec::new(),
        });
        let conv = PamConv {
            conv: converse,
            appdata: &mut *conversation as *mut Conversation as *mut c_void,
        };
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: valid NUL-terminated strings and a conversation that outlive the handle
        // (`pam_end` below runs before they are dropped).
        let rc = unsafe { start(service.as_ptr(), user.as_ptr(), &conv, &mut handle) };
        if rc != PAM_SUCCESS || handle.is_null() {
            return Err(unavailable(format!("pam_start failed ({rc})")));
        }
        if let Some(rhost) = &rhost {
            // SAFETY: PAM copies the string.
            unsafe { set_item(handle, PAM_RHOST, rhost.as_ptr() as *const c_void) };
        }
        // SAFETY: `handle` came from pam_start and is ended once, below.
        let mut rc = unsafe { auth(handle, PAM_DISALLOW_NULL_AUTHTOK) };
        let mut step_acct = false;
        if rc == PAM_SUCCESS {
            step_acct = true;
            // SAFETY: as above.
            rc = unsafe { acct(handle, PAM_DISALLOW_NULL_AUTHTOK) };
        }
        let words = if rc == PAM_SUCCESS {
            String::new()
        } else {
            // SAFETY: pam_strerror returns a static string for the handle.
            let text = unsafe { strerror(handle, rc) };
            if text.is_null() {
                format!("PAM error {rc}")
            } else {
                // SAFETY: a NUL-terminated string owned by PAM, copied at once.
                unsafe { CStr::from_ptr(text) }
                    .to_string_lossy()
                    .into_owned()
            }
        };
        // SAFETY: the handle from pam_start, ended once.
        unsafe { end(handle, rc) };
        // The password's bytes are wiped before they are freed.
        let mut bytes = std::mem::take(&mut conversation.password).into_bytes_with_nul();
        // SAFETY: a writable buffer of `bytes.len()` bytes that we own.
        unsafe { libc::explicit_bzero(bytes.as_mut_ptr() as *mut c_void, bytes.len()) };
        let said = conversation.messages.join("; ");
        let with_said = |w: String| {
            if said.is_empty() {
                w
            } else {
                format!("{w} ({said})")
            }
        };
        match (step_acct, rc) {
            (_, PAM_SUCCESS) => Ok(()),
            (
                false,
                PAM_AUTH_ERR
                | PAM_USER_UNKNOWN
                | PAM_MAXTRIES
                | PAM_CONV_ERR
                | PAM_PERM_DENIED
                | PAM_CRED_INSUFFICIENT,
            ) => Err(Refused::Credentials),
            // The modules could not check at all (an unreadable shadow file, a broken stack):
            // say so, never "wrong password".
            (false, _) => Err(Refused::Unavailable(with_said(words))),
            (true, PAM_NEW_AUTHTOK_REQD) => Err(Refused::PasswordExpired),
            (true, _) => Err(Refused::Account(with_said(words))),
        }
    }
}

#[cfg(test)]
mod landlock_tests {
    use super::*;

    fn parse(text: &[u8]) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        buf[..text.len()].copy_from_slice(text);
        let n = parse_gitdir_file(&mut buf, text.len())?;
        assert_eq!(buf[n], 0, "NUL-terminated");
        Some(buf[..n].to_vec())
    }

    #[test]
    fn gitdir_files() {
        assert_eq!(
            parse(b"gitdir: /r/.git/worktrees/a\n").unwrap(),
            b"/r/.git/worktrees/a"
        );
        assert_eq!(parse(b"gitdir: ../r/.git\r\n").unwrap(), b"../r/.git");
        assert_eq!(parse(b"gitdir: /x").unwrap(), b"/x");
        for bad in [
            &b"gitdir: \n"[..],
            b"gitdir:/x",
            b"/x",
            b"",
            b"gitdir: a\0b",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // No byte to spare after the content: refused, never written past the end.
        let mut full = *b"gitdir: /abc";
        assert_eq!(parse_gitdir_file(&mut full, 12), None);
    }

    #[test]
    fn rights_by_abi() {
        use landlock::*;
        assert!(Confine::new(2, true, vec![]).is_err());
        let c = Confine::new(3, true, vec![]).unwrap();
        assert_eq!(c.handled_access() & FS_IOCTL_DEV, 0);
        assert_ne!(c.handled_access() & FS_TRUNCATE, 0);
        assert_eq!(c.scoped(), 0);
        let c = Confine::new(6, false, vec![]).unwrap();
        assert_eq!(c.scoped(), 0);
        let c = Confine::new(6, true, vec![]).unwrap();
        assert_eq!(c.scoped(), SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET);
        assert_eq!(
            c.file_access() & !(FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV),
            0
        );
        assert_eq!(
            c.handled_access() & (FS_READ_FILE | FS_READ_DIR | FS_EXECUTE),
            0
        );
    }
}
