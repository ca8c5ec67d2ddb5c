//! The local log-in socket (`local_socket`, default `/run/stoa/local.sock`, mode 0666): a
//! local Unix user's `stoa` command gets a credential for exactly that user, with no token,
//! from the kernel's word on who connected (`SO_PEERCRED`), the way a local `ssh-agent` or
//! `systemd`'s private socket trust their peer.
//!
//! | step                      | rule                                                           |
//! |---------------------------|----------------------------------------------------------------|
//! | accept                    | at most [`ACCEPTS_PER_TURN`] per loop turn, never blocking     |
//! | who                       | the peer's uid from `SO_PEERCRED`; root and the service user get nothing (root reads the admin token) |
//! | how fast                  | each log-in takes one of the uid's spawn tokens (`spawn_rate_per_sec`, `spawn_burst`), before any lookup |
//! | how many                  | [`MAX_PER_USER`] open per uid, [`MAX_TOTAL`] in all; over it the oldest of that uid (or of all) is closed |
//! | policy                    | the uid's user must be one the policy allows (the refusal names the rule) |
//! | answer                    | one JSON line: `{"credential","unix_user","expires_at"}` or `{"error","rule"}`, written without blocking (a fresh socket's buffer holds it) |
//! | lifetime                  | the credential lives while the connection is open (and at most [`LIFETIME_SECS`]): the command keeps it open and its exit ends the log-in everywhere |
//!
//! A client that sends anything is closed: it has nothing to say.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::json;
use tracing::{info, warn};

use super::table::user_allowed;
use super::{Broker, Mode};
use crate::wire::Handle;

/// Where the socket is unless the policy says otherwise (as root).
pub const DEFAULT_SOCKET: &str = "/run/stoa/local.sock";
/// Most connections accepted per turn of the loop (the rest wait in the backlog).
pub const ACCEPTS_PER_TURN: usize = 16;
pub const MAX_PER_USER: usize = 64;
pub const MAX_TOTAL: usize = 1024;
/// The longest a local log-in lives, even with its connection open.
pub const LIFETIME_SECS: u64 = 7 * 86400;

/// An open local log-in: its connection and the log-in it holds.
pub struct Client {
    pub stream: UnixStream,
    pub uid: u32,
    pub login: u64,
}

pub struct LocalLogins {
    pub path: std::path::PathBuf,
    /// The broker made the socket's directory (removed again when it stops).
    pub made_dir: bool,
    pub listener: UnixListener,
    pub clients: Vec<Client>,
}

/// Binds the socket at `path` (its directory made root's 0755 if missing; a stale socket
/// replaced), mode 0666: who connects is the kernel's word, not a file permission.
pub fn bind(path: &Path) -> Result<(UnixListener, bool), String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut made_dir = false;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            made_dir = true;
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live broker answers on it: two brokers must not share one socket.
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{} is in use by another running broker",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove the stale {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket: not touching it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((listener, made_dir))
}

impl LocalLogins {
    /// At stop: the socket goes, and its directory if the broker made it (and it is empty).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        if self.made_dir {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// After each poll: new connections answered, closed ones' log-ins ended.
pub fn on_ready(b: &mut Broker) {
    let Some(local) = b.local.as_mut() else {
        return;
    };
    let mut accepted = Vec::new();
    for _ in 0..ACCEPTS_PER_TURN {
        match local.listener.accept() {
            Ok((stream, _)) => accepted.push(stream),
            Err(_) => break,
        }
    }
    let mut gone = Vec::new();
    local.clients.retain_mut(|c| {
        let mut buf = [0u8; 64];
        match c.stream.read(&mut buf) {
            // Open and silent: it stays.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            // Closed, broken, or talking: the log-in ends.
            _ => {
                gone.push(c.login);
                false
            }
        }
    });
    end(b, &gone);
    for stream in accepted {
        answer(b, stream);
    }
}

fn end(b: &mut Broker, numbers: &[u64]) {
    if numbers.is_empty() {
        return;
    }
    let ended = b.credentials.logins.end_numbers(numbers);
    super::handlers::login::revoke(b, &ended);
}

fn reply(stream: &mut UnixStream, value: serde_json::Value) -> bool {
    let mut line = value.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).is_ok()
}

/// The stoa run `pid` belongs to, from its cgroup (`…/user-<uid>/h<handle>`, in any
/// hierarchy): `None` for a process outside stoa's runs (a login shell, an ssh session).
fn run_of(pid: i32, uid: u32) -> Option<Handle> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    run_in_cgroups(&text, uid)
}

fn run_in_cgroups(text: &str, uid: u32) -> Option<Handle> {
    let user = format!("user-{uid}");
    text.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let parts: Vec<&str> = path.split('/').collect();
        parts.windows(2).find_map(|w| {
            let n = w[1].strip_prefix('h')?;
            (w[0] == user && !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
                .then(|| n.parse().ok().map(Handle))
                .flatten()
        })
    })
}

fn refuse(mut stream: UnixStream, rule: &str, message: String) {
    let _ = reply(&mut stream, json!({ "error": message, "rule": rule }));
}

fn answer(b: &mut Broker, stream: UnixStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(peer) = getsockopt(&stream.as_fd(), PeerCredentials) else {
        return;
    };
    let uid = peer.uid();
    let service_uid = match &b.mode {
        Mode::Isolated { service } => Some(service.uid),
        Mode::SingleUser { .. } => None,
    };
    if uid == 0 {
        return refuse(
            stream,
            "root",
            "root gets no log-in here: root's stoa commands use the admin token".into(),
        );
    }
    if Some(uid) == service_uid {
        return refuse(
            stream,
            "service-user",
            "stoa's service user gets no log-in".into(),
        );
    }
    // An agent's run must not answer its own permission requests (nor start unconfined
    // runs): a process in an agent run's cgroup gets nothing here.
    if let Some(handle) = run_of(peer.pid(), uid) {
        let agent = b
            .handles
            .get(handle)
            .is_some_and(|e| e.purpose == crate::wire::Purpose::Agent);
        if agent {
            warn!(
                uid,
                handle = handle.0,
                "local log-in refused to an agent's run"
            );
            return refuse(
                stream,
                "agent-run",
                "refused by rule agent-run: an agent's run gets no log-in here (it could answer its own permission requests)".into(),
            );
        }
    }
    // Each log-in takes one of the user's spawn tokens: a user who floods the socket
    // spends their own budget, and the broker looks nobody up for it.
    let (rate, burst) = (b.policy.spawn_rate_per_sec, b.policy.spawn_burst);
    if !b.admission.take_spawn_token(uid, rate, burst) {
        return refuse(
            stream,
            "spawn-rate",
            format!("refused by rule spawn-rate: uid {uid} is logging in faster than {rate}/s (burst {burst})"),
        );
    }
    let name = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => {
            return refuse(
                stream,
                "unknown-user",
                format!("uid {uid} has no user name"),
            )
        }
    };
    let account = match b.os.lookup_user(&name) {
        Ok(Some(a)) if a.uid == uid => a,
        _ => {
            return refuse(
                stream,
                "unknown-user",
                format!("unix user '{name}' could not be looked up"),
            )
        }
    };
    if let Err(r) = user_allowed(b, &account) {
        warn!(user = %name, rule = r.rule, "local log-in refused: {}", r.message);
        return refuse(stream, r.rule, r.to_string());
    }
    // Room: the oldest of this user's (or of everyone's) goes.
    let local = b.local.as_mut().expect("on_ready checked");
    let mut closed = Vec::new();
    while local.clients.iter().filter(|c| c.uid == uid).count() >= MAX_PER_USER
        || local.clients.len() >= MAX_TOTAL
    {
        let crowded = local.clients.iter().filter(|c| c.uid == uid).count() >= MAX_PER_USER;
        let Some(i) = local.clients.iter().position(|c| !crowded || c.uid == uid) else {
            break;
        };
        closed.push(local.clients.remove(i).login);
    }
    end(b, &closed);
    let started = b
        .credentials
        .logins
        .start_local(account.uid, &account.name, LIFETIME_SECS);
    let (credential, login) = match started {
        Ok(s) => s,
        Err(e) => return refuse(stream, "failed", e),
    };
    let mut stream = stream;
    let sent = reply(
        &mut stream,
        json!({ "credential": credential, "unix_user": account.name, "expires_at": login.expires_at }),
    );
    if !sent {
        end(b, &[login.number]);
        return;
    }
    info!(user = %account.name, login = login.number, "local log-in");
    b.audit.record(
        "local_login",
        json!({ "unix_user": account.name, "uid": uid, "pid": peer.pid(), "login": login.number }),
    );
    if let Some(local) = b.local.as_mut() {
        local.clients.push(Client {
            stream,
            uid,
            login: login.number,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_found_by_its_cgroup_in_either_layout() {
        let v2 = "0::/stoa.slice/stoa.service/user-2001/h17\n";
        assert_eq!(run_in_cgroups(v2, 2001), Some(Handle(17)));
        let v1 = "12:pids:/stoa/user-2001/h5\n11:memory:/stoa/user-2001/h5\n0::/init.scope\n";
        assert_eq!(run_in_cgroups(v1, 2001), Some(Handle(5)));
        // Another user's run, a user's own (non-run) cgroup, a look-alike: none.
        assert_eq!(run_in_cgroups(v2, 2002), None);
        assert_eq!(run_in_cgroups("0::/stoa/user-2001/worker\n", 2001), None);
        assert_eq!(run_in_cgroups("0::/stoa/user-2001/h\n", 2001), None);
        assert_eq!(run_in_cgroups("0::/stoa/user-2001/hx1\n", 2001), None);
        assert_eq!(
            run_in_cgroups("0::/user.slice/user-2001.slice/session-3.scope\n", 2001),
            None
        );
    }
}
