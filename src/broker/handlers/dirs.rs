//! `CheckDir`: can the Unix user enter a directory? The table has proven the credential
//! may act as that user and that the policy allows the user (so no question about root's
//! or the service user's paths is ever answered). The check runs in a child that has
//! become the user ([`stoa_executor::sys::start_probe`]): it opens the path, enters it and
//! reports the directory's device, inode and owner, which pin it for later spawns. The
//! broker only polls the child's report, so a path that hangs (a stopped FUSE server)
//! holds up nobody but that request, for at most `PROBE_DEADLINE`.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use tracing::warn;

use stoa_executor::sys::{self, ChildReport};

use super::super::handles::ReplyTo;
use super::super::spawn::start_failure;
use super::super::table::{clip, error, Ctx, Outcome};
use super::super::{Broker, Outgoing};
use crate::wire::{limits, BrokerError, BrokerMessage, DirId, ErrorKind, ReplyBody, RequestBody};

pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// Most directory checks in flight at once (each is a process).
pub const MAX_PROBES: usize = 64;
/// Most of them for one Unix user: a user can make their own checks hang (stop the child,
/// check a path that blocks) until `PROBE_DEADLINE`, and must not hold everyone's slots.
pub const MAX_PROBES_PER_USER: usize = 8;

pub struct Probe {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub report: OwnedFd,
    pub deadline: Instant,
    pub reply: ReplyTo,
    pub user: String,
    pub path: String,
    /// Reaped already (its report is complete).
    pub reaped: bool,
}

pub fn check_dir(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::CheckDir { path, .. } = body else {
        unreachable!("the table routes only CheckDir here")
    };
    let account = ctx.account.clone().expect("proven by the table");
    if !path.starts_with('/') || path.len() > limits::MAX_PATH_BYTES || path.contains('\0') {
        return error(
            ErrorKind::BadRequest,
            format!("{:?} is not an absolute path", clip(&path, 256)),
        );
    }
    if b.probes.iter().filter(|p| p.user == account.name).count() >= MAX_PROBES_PER_USER {
        return error(
            ErrorKind::Quota,
            format!(
                "refused by rule probes-per-user: {MAX_PROBES_PER_USER} directory checks of '{}' are running",
                account.name
            ),
        );
    }
    if b.probes.len() >= MAX_PROBES {
        return error(
            ErrorKind::Quota,
            format!("refused by rule probes-total: {MAX_PROBES} directory checks are running"),
        );
    }
    // A check is a process of the user's: it counts against their spawn rate.
    let (rate, burst) = (b.policy.spawn_rate_per_sec, b.policy.spawn_burst);
    if !b.admission.take_spawn_token(account.uid, rate, burst) {
        return error(
            ErrorKind::Quota,
            format!(
                "refused by rule spawn-rate: '{}' is starting processes faster than {rate}/s (burst {burst})",
                account.name
            ),
        );
    }
    match b.os.start_probe(&account, &path) {
        Ok(started) => {
            b.probes.push(Probe {
                pid: started.pid,
                pidfd: started.pidfd,
                report: started.report,
                deadline: Instant::now() + PROBE_DEADLINE,
                reply: ctx.reply,
                user: account.name,
                path,
                reaped: false,
            });
            Outcome::Later
        }
        Err(e) => error(
            ErrorKind::Failed,
            format!("cannot check the directory: {e}"),
        ),
    }
}

/// Reads every probe's report; kills those past their deadline.
pub fn check_probes(b: &mut Broker) {
    let mut i = 0;
    while i < b.probes.len() {
        let p = &b.probes[i];
        let outcome = match sys::read_report(p.report.as_fd()) {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) if Instant::now() >= p.deadline => {
                b.os.kill_pidfd(p.pidfd.as_fd());
                Some(Err(format!(
                    "checking {} as unix user '{}' did not finish within {PROBE_DEADLINE:?}",
                    clip(&p.path, 256),
                    p.user
                )))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e.to_string())),
        };
        match outcome {
            Some(result) => {
                let probe = b.probes.swap_remove(i);
                answer(b, probe, result);
            }
            None => i += 1,
        }
    }
}

/// A probe child was reaped: read what it reported, if that was not done yet.
pub fn on_reaped(b: &mut Broker, pid: i32) {
    if let Some(p) = b.probes.iter_mut().find(|p| p.pid == pid) {
        p.reaped = true;
    }
    check_probes(b);
    // A reaped probe with nothing to read ended without a report.
    if let Some(i) = b.probes.iter().position(|p| p.reaped) {
        let probe = b.probes.swap_remove(i);
        answer(b, probe, Err("the check ended without a report".into()));
    }
}

pub fn next_deadline(b: &Broker) -> Option<Instant> {
    b.probes.iter().map(|p| p.deadline).min()
}

fn answer(b: &mut Broker, probe: Probe, result: Result<ChildReport, String>) {
    let path = clip(&probe.path, 256);
    let body = match result {
        Ok(ChildReport::Dir { dev, ino, uid }) => ReplyBody::Dir(DirId { dev, ino, uid }),
        Ok(ChildReport::Failed { stage, errno }) => {
            let (kind, message) = start_failure(stage, errno, path, &probe.user);
            let kind = match kind {
                ErrorKind::Failed => ErrorKind::BadRequest,
                k => k,
            };
            ReplyBody::Error(BrokerError {
                kind,
                message: message.replace("working directory", "directory"),
            })
        }
        Ok(ChildReport::Execed) => ReplyBody::Error(BrokerError {
            kind: ErrorKind::Failed,
            message: "the directory check ended without a report".into(),
        }),
        Err(message) => {
            warn!(user = %probe.user, "directory check failed: {message}");
            ReplyBody::Error(BrokerError {
                kind: ErrorKind::Failed,
                message,
            })
        }
    };
    b.outbox.push(Outgoing {
        link: probe.reply.link,
        message: BrokerMessage::Reply {
            id: probe.reply.id,
            body,
        },
        fds: Vec::new(),
    });
}
