//! Spawning, broker side: research/privsep.md phase A (resolve the user, fresh group list,
//! environment from empty, PTY or pipes, the job on the control socket), then
//! [`sys::start_child`] for phase B.
#![forbid(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User};

use stoa_executor::codec;
use stoa_executor::job::Job;
use stoa_executor::sys::{self, ChildSpec, ChildStage, Identity, Rlimit, SpawnError, Started};

use super::cgroup::JoinFds;
use crate::wire::{limits, ErrorKind, FdLayout, Program, SpawnRequest};

/// A Unix account as the broker resolved it, with its group list computed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Every group the account is in, primary first (fresh `getgrouplist`).
    pub groups: Vec<u32>,
}

impl Account {
    /// Looks a user up by name (`getpwnam_r`, then `getgrouplist`). `Ok(None)`: no such user.
    pub fn lookup(name: &str) -> Result<Option<Account>, String> {
        let user = match User::from_name(name) {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("cannot look up unix user '{name}': {e}")),
        };
        Account::from_user(user).map(Some)
    }

    pub fn lookup_uid(uid: u32) -> Result<Option<Account>, String> {
        match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => Account::from_user(u).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(format!("cannot look up uid {uid}: {e}")),
        }
    }

    fn from_user(user: User) -> Result<Account, String> {
        let cname = CString::new(user.name.as_bytes()).map_err(|_| "NUL in user name")?;
        let list = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("cannot list the groups of '{}': {e}", user.name))?;
        let mut groups = vec![user.gid.as_raw()];
        for g in list.iter().map(|g: &Gid| g.as_raw()) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Ok(Account {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            shell: user.shell,
            groups,
        })
    }

    pub fn identity(&self) -> Identity {
        Identity {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// Creates the service account if it does not exist: a system account with no login shell
/// and no home directory.
pub fn ensure_service_account(name: &str) -> Result<(Account, bool), String> {
    if let Some(account) = Account::lookup(name)? {
        return Ok((account, false));
    }
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
        ])
        .args([
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "stoa daemon",
            name,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .status()
        .map_err(|e| format!("cannot run useradd to create service user '{name}': {e}"))?;
    if !status.success() {
        return Err(format!(
            "useradd could not create service user '{name}' ({status})"
        ));
    }
    match Account::lookup(name)? {
        Some(account) => Ok((account, true)),
        None => Err(format!("service user '{name}' still missing after useradd")),
    }
}

/// Checks the request's shape; the frame limit bounds the total, this bounds each part.
pub fn validate(req: &SpawnRequest) -> Result<(), String> {
    if req.credential.len() > limits::MAX_CREDENTIAL_BYTES {
        return Err("credential too long".into());
    }
    let name_ok = !req.unix_user.is_empty()
        && req.unix_user.len() <= limits::MAX_NAME_BYTES
        && req
            .unix_user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !req.unix_user.starts_with('-');
    if !name_ok {
        return Err(format!("invalid unix user name {:?}", req.unix_user));
    }
    if let Program::Exec { argv } = &req.program {
        if argv.is_empty() {
            return Err("argv is empty".into());
        }
        if argv[0].is_empty() {
            return Err("argv[0] is empty".into());
        }
        if argv.len() > limits::MAX_ARGS {
            return Err(format!("more than {} arguments", limits::MAX_ARGS));
        }
        if argv.iter().any(|a| a.len() > limits::MAX_ARG_BYTES) {
            return Err(format!(
                "an argument is longer than {} bytes",
                limits::MAX_ARG_BYTES
            ));
        }
        if argv.iter().map(|a| a.len() + 1).sum::<usize>() > limits::MAX_ARGV_BYTES {
            return Err(format!("arguments exceed {} bytes", limits::MAX_ARGV_BYTES));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err("NUL byte in an argument".into());
        }
    }
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') {
            return Err(format!("cwd {cwd:?} is not absolute"));
        }
        if cwd.len() > limits::MAX_PATH_BYTES || cwd.contains('\0') {
            return Err("cwd too long or contains NUL".into());
        }
    }
    if req.env.len() > limits::MAX_ENV_VARS {
        return Err(format!(
            "more than {} environment variables",
            limits::MAX_ENV_VARS
        ));
    }
    if req
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        > limits::MAX_ENV_BYTES
    {
        return Err(format!(
            "environment exceeds {} bytes",
            limits::MAX_ENV_BYTES
        ));
    }
    for (name, value) in &req.env {
        let valid = name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if name.is_empty() || !valid {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        if value.contains('\0') {
            return Err(format!("NUL byte in environment variable {name}"));
        }
    }
    if let Some(names) = &req.secret_names {
        if names.len() > limits::MAX_SECRET_NAMES {
            return Err(format!(
                "more than {} secret names",
                limits::MAX_SECRET_NAMES
            ));
        }
        if let Some(bad) = names.iter().find(|n| !super::users::valid_secret_name(n)) {
            return Err(format!(
                "invalid secret name {:?}",
                super::table::clip(bad, 64)
            ));
        }
    }
    if let Some(ws) = req.tty {
        let ok = |d: u16| (1..=limits::MAX_TTY_DIMENSION).contains(&d);
        if !ok(ws.rows) || !ok(ws.cols) {
            return Err(format!(
                "terminal size {}x{} out of range",
                ws.rows, ws.cols
            ));
        }
        if !(limits::MIN_RING_BYTES..=limits::MAX_RING_BYTES).contains(&req.ring_bytes) {
            return Err(format!(
                "ring_bytes {} out of range: a terminal's output ring must be {} to {} bytes",
                req.ring_bytes,
                limits::MIN_RING_BYTES,
                limits::MAX_RING_BYTES
            ));
        }
    } else if req.ring_bytes != 0 {
        return Err(format!(
            "ring_bytes {} without a tty: only a terminal has an output ring (send 0)",
            req.ring_bytes
        ));
    }
    if req.keep_stdin && (!req.stdin || req.tty.is_some()) {
        return Err("keep_stdin needs a stdin pipe (stdin: true, no tty)".into());
    }
    Ok(())
}

/// The environment, built from empty: identity from the passwd entry, then the request's
/// (already policy-checked) variables.
pub fn environment(account: &Account, req: &SpawnRequest, path: &str) -> Vec<CString> {
    let mut vars: Vec<(String, Vec<u8>)> = vec![
        ("HOME".into(), account.home.as_os_str().as_bytes().to_vec()),
        ("USER".into(), account.name.clone().into_bytes()),
        ("LOGNAME".into(), account.name.clone().into_bytes()),
        (
            "SHELL".into(),
            account.shell.as_os_str().as_bytes().to_vec(),
        ),
        ("PATH".into(), path.as_bytes().to_vec()),
        (
            "TERM".into(),
            if req.tty.is_some() {
                b"xterm-256color".to_vec()
            } else {
                b"dumb".to_vec()
            },
        ),
        ("LANG".into(), b"C.UTF-8".to_vec()),
    ];
    for (name, value) in &req.env {
        match vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.as_bytes().to_vec(),
            None => vars.push((name.clone(), value.as_bytes().to_vec())),
        }
    }
    vars.into_iter()
        .filter_map(|(n, mut v)| {
            let mut entry = n.into_bytes();
            entry.push(b'=');
            entry.append(&mut v);
            CString::new(entry).ok()
        })
        .collect()
}

/// What the broker needs to start executors.
pub struct Launcher<'a> {
    pub executor: &'a OwnedFd,
    /// `None` in single-user mode: no identity change.
    pub isolated: bool,
    pub tty_gid: Option<u32>,
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    pub path: String,
    /// Landlock, applied in the child after the identity change.
    pub confine: Option<&'a sys::Confine>,
}

/// A started executor: forked, on its way to exec (its report says whether it got there).
pub struct Launched {
    pub started: Started,
    pub layout: FdLayout,
    /// Handed to the daemon now.
    pub for_daemon: Vec<OwnedFd>,
    /// Kept by the broker for a daemon that restarts: what the daemon got, the stdin pipe
    /// only when the request says `keep_stdin`.
    pub kept: Vec<OwnedFd>,
}

impl Launcher<'_> {
    /// `secrets` join the job's environment (only for `Program::Exec`); the child gets
    /// into its cgroup with `cgroup`.
    pub fn launch(
        &self,
        account: &Account,
        req: &SpawnRequest,
        secrets: Vec<(String, String)>,
        cgroup: &JoinFds,
    ) -> Result<Launched, String> {
        let other = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        // The job goes into the control socket before the executor exists, so it reads
        // exactly what the broker checked.
        let (control_daemon, control_executor) =
            UnixStream::pair().map_err(|e| other("cannot create the control socket", &e))?;
        let job = match &req.program {
            Program::Exec { argv } => Job::Exec {
                argv: argv.clone(),
                env: secrets,
            },
            Program::Shell => Job::Shell,
        };
        let frame = codec::encode(&job).map_err(|e| other("cannot encode the job", &e))?;
        control_daemon
            .set_nonblocking(true)
            .map_err(|e| other("control socket", &e))?;
        (&control_daemon)
            .write_all(&frame)
            .map_err(|e| other("cannot write the job to the control socket", &e))?;
        control_daemon
            .set_nonblocking(false)
            .map_err(|e| other("control socket", &e))?;

        let env = environment(account, req, &self.path);
        let cwd = req
            .cwd
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| account.home.clone());
        let cwd_c =
            CString::new(cwd.as_os_str().as_bytes()).map_err(|_| "NUL in cwd".to_string())?;
        let identity = self.isolated.then(|| account.identity());
        let spec_base = |stdio, controlling_tty| ChildSpec {
            exe: self.executor.as_fd(),
            argv: vec![CString::from(c"stoa-executor")],
            env: env.clone(),
            stdio: Some(stdio),
            extra_fds: vec![control_executor.as_fd()],
            controlling_tty,
            identity: identity.clone(),
            rlimits: self.rlimits.clone(),
            umask: self.umask,
            cwd: Some(cwd_c.clone()),
            cwd_id: req.cwd_id.map(|d| (d.dev, d.ino, d.uid)),
            parent_death_signal: None,
            cgroup_procs: cgroup.procs.iter().map(|fd| fd.as_fd()).collect(),
            cgroup_dir: cgroup.dir.as_ref().map(|fd| fd.as_fd()),
            confine: self.confine,
        };
        let control_kept: OwnedFd = control_daemon.into();
        let control_copy = control_kept.try_clone().map_err(|e| other("dup", &e))?;

        let launched = if let Some(size) = req.tty {
            let pty = sys::open_pty().map_err(|e| other("cannot open a pseudo-terminal", &e))?;
            let mut termios = nix::sys::termios::tcgetattr(&pty.slave)
                .map_err(|e| other("cannot read terminal settings", &e))?;
            termios.input_flags |= nix::sys::termios::InputFlags::IUTF8;
            nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)
                .map_err(|e| other("cannot set terminal settings", &e))?;
            sys::set_window_size(pty.master.as_fd(), size.rows, size.cols)
                .map_err(|e| other("cannot set the window size", &e))?;
            if self.isolated {
                // The user must own their tty (screen, write, pinentry reopen it by path).
                let (mode, group) = match self.tty_gid {
                    Some(g) => (0o620, g),
                    None => (0o600, account.gid),
                };
                nix::sys::stat::fchmod(&pty.slave, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| other("cannot chmod the tty", &e))?;
                nix::unistd::fchown(
                    &pty.slave,
                    Some(Uid::from_raw(account.uid)),
                    Some(Gid::from_raw(group)),
                )
                .map_err(|e| other("cannot chown the tty", &e))?;
            }
            // The terminal's output ring (`daemon::ring`): the broker's and the daemon's
            // only. Close-on-exec, and not among the fds the child keeps (`start_child`
            // closes every other fd before anything runs as the user), so the executor
            // never has it.
            let ring = sys::create_ring_memfd(req.ring_bytes as usize)
                .map_err(|e| other("cannot create the terminal's output ring", &e))?;
            let s = pty.slave.as_fd();
            let started = sys::start_child(&spec_base([s, s, s], true))
                .map_err(|e| other("cannot start the executor", &e))?;
            let master_kept = pty.master.try_clone().map_err(|e| other("dup", &e))?;
            let ring_kept = ring.try_clone().map_err(|e| other("dup", &e))?;
            Launched {
                started,
                layout: FdLayout::Pty,
                for_daemon: vec![control_copy, pty.master, ring],
                kept: vec![control_kept, master_kept, ring_kept],
            }
        } else {
            let pipe = || {
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| other("cannot create a pipe", &e))
            };
            let (stdin_child, stdin_daemon): (OwnedFd, Option<OwnedFd>) = if req.stdin {
                let (r, w) = pipe()?;
                (r, Some(w))
            } else {
                (
                    File::open("/dev/null")
                        .map_err(|e| other("/dev/null", &e))?
                        .into(),
                    None,
                )
            };
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            let started = sys::start_child(&spec_base(
                [stdin_child.as_fd(), stdout_w.as_fd(), stderr_w.as_fd()],
                false,
            ))
            .map_err(|e| other("cannot start the executor", &e))?;
            let mut kept = vec![control_kept];
            if let (true, Some(w)) = (req.keep_stdin, &stdin_daemon) {
                kept.push(w.try_clone().map_err(|e| other("dup", &e))?);
            }
            kept.push(stdout_r.try_clone().map_err(|e| other("dup", &e))?);
            kept.push(stderr_r.try_clone().map_err(|e| other("dup", &e))?);
            let mut for_daemon = vec![control_copy];
            let has_stdin = stdin_daemon.is_some();
            for_daemon.extend(stdin_daemon);
            for_daemon.push(stdout_r);
            for_daemon.push(stderr_r);
            Launched {
                started,
                layout: FdLayout::Pipes { stdin: has_stdin },
                for_daemon,
                kept,
            }
        };
        Ok(launched)
    }
}

/// What a child that failed before exec means for the request: the working directory
/// (the user cannot enter it, or it is no longer the directory that was checked) is the
/// caller's to fix; anything else is the broker's failure.
pub fn start_failure(stage: ChildStage, errno: i32, cwd: &str, user: &str) -> (ErrorKind, String) {
    let why = || std::io::Error::from_raw_os_error(errno);
    match stage {
        ChildStage::Chdir => (
            ErrorKind::BadRequest,
            format!("cannot enter working directory {cwd} as unix user '{user}': {}", why()),
        ),
        ChildStage::VerifyCwd => (
            ErrorKind::Refused {
                rule: "worktree-replaced".into(),
            },
            format!(
                "refused by rule worktree-replaced: {cwd} is no longer the directory that was checked for unix user '{user}' (it was moved, replaced or recreated); nothing was run"
            ),
        ),
        _ => (
            ErrorKind::Failed,
            format!(
                "cannot start the executor as '{user}': {}",
                SpawnError::Child { stage, errno }
            ),
        ),
    }
}

/// The argv and environment of the daemon, which the broker re-execs from its own binary.
/// `state_dir` is the daemon's state directory as the broker resolved (and created) it:
/// the daemon, not being root, would resolve the defaults differently.
pub fn daemon_command(
    config: &std::path::Path,
    state_dir: &std::path::Path,
) -> (Vec<CString>, Vec<CString>) {
    let path_arg = |p: &std::path::Path| {
        CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| CString::from(c"/dev/null"))
    };
    let argv = vec![
        CString::from(c"stoa"),
        CString::from(c"__daemon"),
        CString::from(c"--config"),
        path_arg(config),
        CString::from(c"--state-dir"),
        path_arg(state_dir),
    ];
    let mut env = vec![
        CString::from(c"PATH=/usr/bin:/bin"),
        CString::from(c"HOME=/"),
    ];
    for name in ["RUST_LOG", "STOA_LOG", "NO_COLOR"] {
        if let Some(v) = std::env::var_os(name) {
            let mut entry = OsStr::new(name).as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            env.extend(CString::new(entry).ok());
        }
    }
    (argv, env)
}
