//! `Kill`, `Release`, `ListHandles`, `Adopt`, and what happens when a child is reaped. The
//! table has checked that a named handle is one the daemon was given and has not released.
//!
//! Nothing is signalled or adopted once its process is reaped: a reaped pid may belong to
//! anyone by now. A live executor is signalled as its process group (the executor is a
//! session leader, so the group id is its pid, which cannot be reused while the broker has
//! not reaped it) by a child that has taken all of the owner's ids, so the kernel refuses
//! anything that is not the owner's; the broker itself never takes a user's uid (while it
//! held one, that user could stop it). What an executor left behind goes with its cgroup,
//! each member killed through a pidfd (`cgroup/tree.rs`).
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{error, info};

use super::super::admission::Record;
use super::super::handles::Life;
use super::super::table::{error, Ctx, Outcome};
use super::super::{Broker, PeerKind};
use crate::wire::{ErrorKind, Event, ExitStatus, FdLayout, Handle, ReplyBody, RequestBody, Signal};

/// The audit line of a request about `handle`. `signal` and `adopt` lines (which the daemon
/// may repeat at will) are written at most at the rate of the handle's principal
/// (`Admission::handle_op`); the rest are counted in the next one's `suppressed_before`.
fn audit_handle(b: &mut Broker, ctx: &Ctx, event: &str, handle: Handle, extra: serde_json::Value) {
    let Some(e) = b.handles.get(handle) else {
        return;
    };
    let suppressed = if event == "release" {
        None
    } else {
        let principal = e.principal.clone();
        match b.admission.handle_op(&principal) {
            Record::Write { suppressed } => Some(suppressed),
            Record::Count => return,
        }
    };
    let e = b.handles.get(handle).expect("looked up above");
    let mut record = json!({
        "handle": handle.0,
        "pid": e.info.pid,
        "unix_user": e.info.unix_user,
        "principal": e.principal,
        "request_id": ctx.request_id,
    });
    if let (Some(n), Some(r)) = (suppressed, record.as_object_mut()) {
        r.insert("suppressed_before".into(), json!(n));
    }
    if let (Some(r), serde_json::Value::Object(extra)) = (record.as_object_mut(), extra) {
        r.extend(extra);
    }
    b.audit.record(event, record);
}

pub fn kill(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Kill { handle, signal } = body else {
        unreachable!("the table routes only Kill here")
    };
    let entry = b.handles.visible(handle).expect("checked by the table");
    if !entry.running() {
        // The exit may be on its way to the daemon: not a violation, and nothing to do.
        return error(
            ErrorKind::Failed,
            format!("handle {} has exited; nothing was signalled", handle.0),
        );
    }
    let account = entry.account.clone();
    // Each signal is sent by a child of the owner's: it also counts against their spawn
    // rate, so a stream of Kills cannot keep the broker forking.
    let (rate, burst) = (b.policy.spawn_rate_per_sec, b.policy.spawn_burst);
    if !b.admission.take_spawn_token(account.uid, rate, burst) {
        return error(
            ErrorKind::Quota,
            format!(
                "refused by rule spawn-rate: signals to '{}' faster than {rate}/s (burst {burst})",
                account.name
            ),
        );
    }
    let reply = match signal_handle(b, handle, signal) {
        Ok(()) => Outcome::Reply(ReplyBody::Done, Vec::new()),
        Err(nix::errno::Errno::ESRCH) => error(ErrorKind::Failed, "no process left in that group"),
        Err(nix::errno::Errno::EBUSY) => error(
            ErrorKind::Failed,
            format!(
                "{MAX_SIGNALLERS_PER_HANDLE} signals to handle {} are still on their way; nothing more was sent",
                handle.0
            ),
        ),
        Err(e) => error(ErrorKind::Failed, format!("cannot signal: {e}")),
    };
    if signal == Signal::Kill {
        // Not just the process group: everything the spawn started.
        if let Some(cg) = b.handles.get(handle).and_then(|e| e.cgroup.as_ref()) {
            b.os.cgroup_kill(cg);
        }
    }
    audit_handle(
        b,
        ctx,
        "signal",
        handle,
        json!({ "signal": format!("{signal:?}") }),
    );
    reply
}

/// Most signalling children of one handle not yet reaped. Each is a process the broker
/// forks (outside the user's cgroup) and that runs as the owner, who may stop it: without
/// a bound, a daemon repeating `Kill` made the broker fork as fast as it could write (one
/// read of the link holds tens of thousands of them, all forked before any reap), and an
/// owner stopping them kept them all.
pub const MAX_SIGNALLERS_PER_HANDLE: usize = 2;
/// A signalling child still there after this is killed (it only has to take the owner's
/// ids and send one signal: only a stopped one takes this long).
pub const SIGNALLER_DEADLINE: Duration = Duration::from_secs(10);

/// A child sending a signal as a handle's owner (`Os::signal_group`).
pub struct Signaller {
    pub pid: i32,
    /// Taken at clone: it is killed through this at its deadline.
    pub pidfd: OwnedFd,
    pub handle: Handle,
    pub deadline: Instant,
    /// Killed at its deadline; it goes when it is reaped.
    pub killed: bool,
}

/// Signals the process group of `handle`'s executor, which must be running and not reaped,
/// as its owner; `EBUSY` while [`MAX_SIGNALLERS_PER_HANDLE`] earlier signals to it are
/// still on their way.
pub fn signal_handle(b: &mut Broker, handle: Handle, signal: Signal) -> nix::Result<()> {
    let Some(entry) = b.handles.get(handle) else {
        return Err(nix::errno::Errno::ESRCH);
    };
    let (account, pgid) = (entry.account.clone(), entry.info.pid);
    if b.signallers.iter().filter(|s| s.handle == handle).count() >= MAX_SIGNALLERS_PER_HANDLE {
        return Err(nix::errno::Errno::EBUSY);
    }
    if let Some(child) = b.os.signal_group(&account, pgid, signal)? {
        b.signallers.push(Signaller {
            pid: child.pid,
            pidfd: child.pidfd,
            handle,
            deadline: Instant::now() + SIGNALLER_DEADLINE,
            killed: false,
        });
    }
    Ok(())
}

/// Kills the signalling children past their deadline (they go when reaped).
pub fn check_signallers(b: &mut Broker) {
    let now = Instant::now();
    for i in 0..b.signallers.len() {
        let s = &b.signallers[i];
        if !s.killed && now >= s.deadline {
            b.os.kill_pidfd(s.pidfd.as_fd());
            b.signallers[i].killed = true;
        }
    }
}

/// The earliest deadline of the signalling children not yet killed.
pub fn next_signaller_deadline(b: &Broker) -> Option<Instant> {
    b.signallers
        .iter()
        .filter(|s| !s.killed)
        .map(|s| s.deadline)
        .min()
}

pub fn release(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Release { handle } = body else {
        unreachable!("the table routes only Release here")
    };
    audit_handle(b, ctx, "release", handle, json!({}));
    let entry = b.handles.get_mut(handle).expect("checked by the table");
    if matches!(entry.life, Life::Exited(_)) {
        b.handles.remove(handle);
    } else {
        entry.released = true;
        entry.kept.clear();
    }
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

/// How much of a `ListHandles` page is handle records (the frame limit is 1 MiB; one
/// record, with an argv at its limit, is under 140 KiB).
pub const LIST_PAGE_BYTES: usize = 256 * 1024;

/// `ListHandles` from a worker: its own user's handles, a page at a time.
pub fn list(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::ListHandles { after } = body else {
        unreachable!("the table routes only ListHandles here")
    };
    let uid = match b.peer_kind() {
        Some(PeerKind::Worker { uid, .. }) => Some(*uid),
        _ => return Outcome::Violation("ListHandles from a link that is not a worker".into()),
    };
    list_page(b, after, uid)
}

/// A page of the handles after `after`, of `uid` only or (`None`) of everyone.
pub fn list_page(b: &Broker, after: Option<Handle>, uid: Option<u32>) -> Outcome {
    let (mut list, mut bytes, mut more) = (Vec::new(), 0, false);
    let after_start = |h: &Handle| after.is_none_or(|a| *h > a);
    for (_, e) in b
        .handles
        .iter()
        .filter(|(h, e)| e.visible() && after_start(h) && uid.is_none_or(|u| e.account.uid == u))
    {
        let size = stoa_executor::codec::encode(&e.info).map_or(usize::MAX, |f| f.len());
        if !list.is_empty() && bytes + size > LIST_PAGE_BYTES {
            more = true;
            break;
        }
        bytes += size;
        list.push(e.info.clone());
    }
    Outcome::Reply(ReplyBody::Handles { list, more }, Vec::new())
}

pub fn adopt(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Adopt { handle } = body else {
        unreachable!("the table routes only Adopt here")
    };
    // An exited handle is adopted too: what it wrote may still wait in its pipes or PTY
    // (it ended while its worker was being replaced), and its exit status comes with it.
    let entry = b.handles.visible(handle).expect("checked by the table");
    let fds: Result<Vec<OwnedFd>, _> = entry.kept.iter().map(|f| f.try_clone()).collect();
    let mut info = entry.info.clone();
    match fds {
        Ok(fds) => {
            if let FdLayout::Pipes { .. } = info.fds {
                info.fds = FdLayout::Pipes {
                    stdin: entry.kept_stdin,
                };
            }
            audit_handle(b, ctx, "adopt", handle, json!({}));
            Outcome::Reply(ReplyBody::Adopted(Box::new(info)), fds)
        }
        Err(e) => error(ErrorKind::Failed, format!("cannot duplicate fds: {e}")),
    }
}

/// The worker is done writing to the program: the broker's duplicate of its stdin goes.
pub fn close_stdin(b: &mut Broker, _ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::CloseStdin { handle } = body else {
        unreachable!("the table routes only CloseStdin here")
    };
    let entry = b.handles.visible_mut(handle).expect("checked by the table");
    if entry.kept_stdin {
        // Kept as [control, stdin, stdout, stderr].
        drop(entry.kept.remove(1));
        entry.kept_stdin = false;
    }
    Outcome::Reply(ReplyBody::Done, Vec::new())
}

/// A child was reaped: a spawn's executor (its exit goes to the daemon), or a probe.
pub fn on_reaped(b: &mut Broker, pid: i32, status: ExitStatus) {
    let Some(handle) = b.handles.by_pid(pid) else {
        if let Some(i) = b.signallers.iter().position(|s| s.pid == pid) {
            b.signallers.swap_remove(i);
            return;
        }
        if !super::login::on_reaped(b, pid) {
            super::dirs::on_reaped(b, pid);
        }
        return;
    };
    b.handles.forget_pid(pid);
    if matches!(
        b.handles.get(handle).map(|e| &e.life),
        Some(Life::Starting(_))
    ) {
        // It died before its report was read: the report is complete now.
        let report = b
            .handles
            .get(handle)
            .and_then(|e| match &e.life {
                Life::Starting(s) => Some(stoa_executor::sys::read_report(
                    std::os::fd::AsFd::as_fd(&s.report),
                )),
                _ => None,
            })
            .map(|r| match r {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err("the executor ended without a report".to_string()),
                Err(e) => Err(e.to_string()),
            });
        if let Some(report) = report {
            super::launch::finish(b, handle, report);
        }
    }
    let Some(entry) = b.handles.get_mut(handle) else {
        return;
    };
    let reported = matches!(entry.life, Life::Running);
    entry.life = Life::Exited(status);
    entry.info.exited = Some(status);
    let cgroup = entry.cgroup.take();
    // The limit it hit is read now (the exit carries it); what it left behind is killed
    // and its cgroup removed once the exit is on its way (`Broker::finish_cgroups`).
    let limit_hit = cgroup.and_then(|cg| {
        let hit = b.os.cgroup_limit_hit(&cg);
        b.cgroups_to_finish.push(cg);
        hit
    });
    let entry = b.handles.get_mut(handle).expect("still there");
    entry.info.limit_hit = limit_hit;
    let (user, released) = (entry.info.unix_user.clone(), entry.released);
    if !reported {
        // Failed before exec: its spawn was answered; nobody else knows it.
        b.handles.remove(handle);
        return;
    }
    info!(handle = handle.0, pid, user = %user, ?status, ?limit_hit, "executor exited");
    let (code, signal) = match status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    b.audit.record(
        "exit",
        json!({ "handle": handle.0, "pid": pid, "unix_user": user, "code": code, "signal": signal, "limit_hit": limit_hit.map(|l| l.to_string()) }),
    );
    if released {
        b.handles.remove(handle);
        return;
    }
    let uid = b.handles.get(handle).map_or(u32::MAX, |e| e.info.uid);
    b.send_event(
        super::super::Target::User(uid),
        Event::Exited {
            handle,
            status,
            limit_hit,
        },
    );
}

/// Every executor that has exec'd and is not reaped.
pub fn running(b: &Broker) -> Vec<Handle> {
    b.handles
        .iter()
        .filter(|(_, e)| e.running())
        .map(|(h, _)| *h)
        .collect()
}

/// Signals every running executor's group (shutdown); with SIGKILL, their cgroups too.
pub fn signal_all(b: &mut Broker, signal: Signal) {
    for handle in running(b) {
        if let Err(e) = signal_handle(b, handle, signal) {
            if e != nix::errno::Errno::ESRCH {
                error!(handle = handle.0, "cannot signal: {e}");
            }
        }
        if signal == Signal::Kill {
            // The executor itself through its pidfd, as root: the stop must not depend on
            // signalling children its owner could have stopped (nor on cgroups being on).
            if let Some(e) = b.handles.get(handle) {
                b.os.kill_pidfd(std::os::fd::AsFd::as_fd(&e.pidfd));
            }
            if let Some(cg) = b.handles.get(handle).and_then(|e| e.cgroup.as_ref()) {
                b.os.cgroup_kill(cg);
            }
        }
    }
    // Children still before exec are the broker's own: through their pidfds.
    if signal == Signal::Kill {
        for handle in b.handles.starting() {
            if let Some(e) = b.handles.get(handle) {
                b.os.kill_pidfd(std::os::fd::AsFd::as_fd(&e.pidfd));
            }
        }
    }
}
