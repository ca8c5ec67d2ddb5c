//! `Spawn`: admission, the cgroup, the fork (through `Os::launch`), and the reply once the
//! child reports its exec. The table has proven the credential and the policy's word on
//! the user before this runs.
//!
//! | step                         | on failure                                         |
//! |------------------------------|----------------------------------------------------|
//! | shutting down?               | 503 `Unavailable`                                  |
//! | `spawn::validate`, env deny  | 400, or refused by rule `env-deny`                 |
//! | confinement (`confine.rs`)   | refused by rule `confine.required`                 |
//! | admission (`admission.rs`)   | 429 with the rule                                  |
//! | cgroup, fork                 | 500 `Failed`; nothing left behind                  |
//! | the child's report (polled)  | its stage: cwd → 400, `worktree-replaced` → refused, else 500; no report in `START_DEADLINE` → killed, 500 |
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use stoa_executor::sys::{self, ChildReport};

use super::super::handles::{Entry, Life, Starting};
use super::super::os::LaunchParams;
use super::super::policy::Refusal;
use super::super::spawn::{self as build, Account};
use super::super::table::{clip, error, refused_kind, Ctx, Outcome};
use super::super::{Broker, Outgoing};
use super::secrets::secrets_of;
use super::session::audit_refusal;
use crate::wire::{
    BrokerMessage, ErrorKind, Handle, HandleInfo, Principal, Program, ReplyBody, RequestBody,
    SpawnRequest,
};

/// How long a child may take from fork to exec before it is killed and its spawn answered
/// as failed. Only a child stopped (or stuck in the user's own files) takes that long.
pub const START_DEADLINE: Duration = Duration::from_secs(10);

/// The audit record of a spawn: bounded whatever the request held (the argv summarised as
/// the program, the count and a digest; strings clipped).
pub fn spawn_record(
    req: &SpawnRequest,
    principal: &Principal,
    request_id: Option<&str>,
) -> serde_json::Value {
    let program = match &req.program {
        Program::Exec { argv } => {
            let mut digest = Sha256::new();
            for a in argv {
                digest.update((a.len() as u64).to_le_bytes());
                digest.update(a.as_bytes());
            }
            json!({ "exec": {
                "program": clip(argv.first().map_or("", String::as_str), 256),
                "args": argv.len().saturating_sub(1),
                "argv_sha256": super::super::credentials::hex(&digest.finalize()),
            }})
        }
        Program::Shell => json!("shell"),
    };
    json!({
        "api_user": clip(principal.name(), 64),
        "principal": principal.owner(),
        "unix_user": clip(&req.unix_user, 64),
        "program": program,
        "cwd": req.cwd.as_deref().map(|c| clip(c, 512)),
        "tty": req.tty.is_some(),
        "secrets": req.secrets,
        "purpose": req.purpose,
        "request_id": request_id,
    })
}

pub fn spawn(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::Spawn(req) = body else {
        unreachable!("the table routes only Spawn here")
    };
    let principal = ctx.principal.clone().expect("proven by the table");
    let account = ctx.account.clone().expect("proven by the table");
    let key = principal.owner();
    let refuse = |b: &mut Broker, kind: ErrorKind, message: String| {
        let user = Some(account.name.as_str());
        audit_refusal(
            b,
            &key,
            "Spawn",
            ctx.request_id.as_deref(),
            user,
            &kind,
            &message,
        );
        error(kind, message)
    };
    if b.shutting_down {
        return refuse(
            b,
            ErrorKind::Unavailable,
            "stoa is shutting down: no new processes are started".into(),
        );
    }
    if let Err(e) = build::validate(&req) {
        return refuse(b, ErrorKind::BadRequest, e);
    }
    if let Some((name, _)) = req.env.iter().find(|(n, _)| b.policy.env_denied(n)) {
        let r = Refusal::new(
            "env-deny",
            format!("environment variable {name} may not be set (policy env_deny, or set by the broker)"),
        );
        return refuse(b, refused_kind(&r), r.to_string());
    }
    let (confine, confinement) =
        match b
            .policy
            .confine
            .decide(req.purpose, &b.os.landlock(), &account)
        {
            Ok(decided) => decided,
            Err(r) => return refuse(b, refused_kind(&r), r.to_string()),
        };
    if let Err(r) = admit(b, &account) {
        return refuse(b, ErrorKind::Quota, r.to_string());
    }
    let secrets = if req.secrets {
        let mut all = secrets_of(b, &account.name);
        if let Some(names) = &req.secret_names {
            all.retain(|(name, _)| names.contains(name));
        }
        all
    } else {
        Vec::new()
    };
    let handle = b.handles.next_handle();
    let (cgroup, cgroup_join) = match b.os.cgroup_prepare(account.uid, &format!("h{}", handle.0)) {
        Ok(Some((cg, fds))) => (Some(cg), fds),
        Ok(None) => (None, Default::default()),
        Err(e) => {
            error!(user = %account.name, "spawn failed: {e}");
            return refuse(b, ErrorKind::Failed, e);
        }
    };
    let params = LaunchParams {
        rlimits: super::super::startup::fit_rlimits(b.policy.rlimits()),
        umask: b.policy.umask_bits().unwrap_or(0o077),
        path: b.policy.path.clone(),
        confine,
    };
    let launched = b.os.launch(&account, &req, &params, secrets, &cgroup_join);
    drop(cgroup_join);
    let launched = match launched {
        Ok(l) => l,
        Err(e) => {
            if let Some(cg) = cgroup {
                b.os.cgroup_finish(cg);
            }
            error!(user = %account.name, "spawn failed: {e}");
            return refuse(b, ErrorKind::Failed, e);
        }
    };
    let mut record = spawn_record(&req, &principal, ctx.request_id.as_deref());
    record["confinement"] = json!(confinement.to_string());
    let (req_keeps_stdin, req_purpose) = (req.keep_stdin, req.purpose);
    let cwd = req
        .cwd
        .clone()
        .unwrap_or_else(|| account.home.display().to_string());
    let info = HandleInfo {
        handle,
        pid: launched.started.pid,
        unix_user: account.name.clone(),
        uid: account.uid,
        program: req.program,
        fds: launched.layout,
        exited: None,
        limit_hit: None,
        started_at: now_secs(),
        confinement,
    };
    b.handles.insert(Entry {
        info,
        principal: key,
        account: account.clone(),
        life: Life::Starting(Box::new(Starting {
            report: launched.started.report,
            deadline: Instant::now() + START_DEADLINE,
            reply: ctx.reply,
            for_daemon: launched.for_daemon,
            record,
            cwd,
            request_id: ctx.request_id.clone(),
        })),
        pidfd: launched.started.pidfd,
        kept: launched.kept,
        kept_stdin: req_keeps_stdin,
        purpose: req_purpose,
        released: false,
        cgroup,
    });
    Outcome::Later
}

/// The per-user, rate and total limits (`admission.rs`).
fn admit(b: &mut Broker, account: &Account) -> Result<(), Refusal> {
    let live_for_user = b.handles.live_for_uid(account.uid);
    if live_for_user >= b.policy.max_executors_per_user {
        return Err(Refusal::new(
            "executors-per-user",
            format!(
                "'{}' already has {live_for_user} live executors",
                account.name
            ),
        ));
    }
    let (rate, burst) = (b.policy.spawn_rate_per_sec, b.policy.spawn_burst);
    if !b.admission.take_spawn_token(account.uid, rate, burst) {
        return Err(Refusal::new(
            "spawn-rate",
            format!(
                "'{}' is spawning faster than {rate}/s (burst {burst})",
                account.name
            ),
        ));
    }
    if b.handles.len() >= b.policy.max_executors_total {
        return Err(Refusal::new(
            "executors-total",
            format!("the broker holds {} handles", b.handles.len()),
        ));
    }
    Ok(())
}

/// Reads the report of every spawn still starting; kills those past their deadline.
pub fn check_starting(b: &mut Broker) {
    for handle in b.handles.starting() {
        let report = {
            let Some(Entry {
                life: Life::Starting(s),
                ..
            }) = b.handles.get(handle)
            else {
                continue;
            };
            match sys::read_report(std::os::fd::AsFd::as_fd(&s.report)) {
                Ok(Some(r)) => Some(Ok(r)),
                Ok(None) if Instant::now() >= s.deadline => None,
                Ok(None) => continue,
                Err(e) => Some(Err(e.to_string())),
            }
        };
        match report {
            Some(r) => finish(b, handle, r),
            None => {
                if let Some(e) = b.handles.get(handle) {
                    let pidfd = std::os::fd::AsFd::as_fd(&e.pidfd);
                    b.os.kill_pidfd(pidfd);
                }
                warn!(
                    handle = handle.0,
                    "the child did not reach exec in time; killed"
                );
                finish(
                    b,
                    handle,
                    Err(format!(
                        "the executor did not start within {START_DEADLINE:?} (was it stopped?); it was killed"
                    )),
                );
            }
        }
    }
}

/// The earliest deadline of the spawns still starting.
pub fn next_deadline(b: &Broker) -> Option<Instant> {
    b.handles
        .iter()
        .filter_map(|(_, e)| match &e.life {
            Life::Starting(s) => Some(s.deadline),
            _ => None,
        })
        .min()
}

/// The child of `handle` reported (or never will): answer the spawn.
pub fn finish(b: &mut Broker, handle: Handle, report: Result<ChildReport, String>) {
    let Some(entry) = b.handles.get_mut(handle) else {
        return;
    };
    let Life::Starting(starting) = std::mem::replace(&mut entry.life, Life::Failed) else {
        return;
    };
    let Starting {
        reply,
        for_daemon,
        mut record,
        cwd,
        request_id,
        ..
    } = *starting;
    let _span = tracing::info_span!("request", request_id = request_id.as_deref()).entered();
    let principal = entry.principal.clone();
    let user = entry.info.unix_user.clone();
    let failure = match report {
        Ok(ChildReport::Execed) => None,
        Ok(ChildReport::Failed { stage, errno }) => {
            Some(build::start_failure(stage, errno, clip(&cwd, 512), &user))
        }
        Ok(ChildReport::Dir { .. }) => Some((ErrorKind::Failed, "unexpected child report".into())),
        Err(e) => Some((ErrorKind::Failed, e)),
    };
    let body = match failure {
        None => {
            entry.life = Life::Running;
            let info = entry.info.clone();
            record["handle"] = json!(handle.0);
            record["pid"] = json!(info.pid);
            let what = match &info.program {
                // The program only: its arguments (a user's command line, a prompt) stay
                // out of the journal.
                Program::Exec { argv } => {
                    format!(
                        "exec {:?} with {} arguments",
                        clip(&argv[0], 256),
                        argv.len() - 1
                    )
                }
                Program::Shell => "shell".into(),
            };
            info!(handle = handle.0, pid = info.pid, user = %user, by = %principal, confinement = %info.confinement, "spawned {}", what.escape_debug());
            if !b.peers.contains_key(&reply.link) {
                // The worker that asked is gone: nobody will ever hear of this run.
                warn!(
                    handle = handle.0,
                    "spawned for a daemon that is gone; ending it"
                );
                entry.released = true;
                let pid = info.pid;
                // Only while it is not reaped (this runs from the reap too): a reaped
                // pid may be anyone's now. Its cgroup goes with the reap either way.
                if b.handles.by_pid(pid) == Some(handle) {
                    let _ = super::handles::signal_handle(b, handle, crate::wire::Signal::Kill);
                    if let Some(cg) = b.handles.get(handle).and_then(|e| e.cgroup.as_ref()) {
                        b.os.cgroup_kill(cg);
                    }
                }
                record["orphaned"] = json!(true);
            }
            b.audit.record("spawn", record);
            ReplyBody::Spawned(Box::new(info))
        }
        Some((kind, message)) => {
            // Reaped later; nobody else will name it.
            entry.released = true;
            error!(handle = handle.0, user = %user, "spawn failed: {message}");
            let id = request_id.as_deref();
            audit_refusal(b, &principal, "Spawn", id, Some(&user), &kind, &message);
            ReplyBody::Error(crate::wire::BrokerError { kind, message })
        }
    };
    let fds = match &body {
        ReplyBody::Spawned(_) => for_daemon,
        _ => Vec::new(),
    };
    b.outbox.push(Outgoing {
        link: reply.link,
        message: BrokerMessage::Reply { id: reply.id, body },
        fds,
    });
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
