//! Red-team findings against the restructured broker, each driven through the real
//! dispatcher and the recording double (no root, no process started).
#![cfg(test)]

use super::handlers::dirs;
use super::os_double::{Call, ChildScript};
use super::test_fixture::{self, error_kind, Fixture};
use crate::wire::{BrokerMessage, ErrorKind, Handle, ReplyBody, RequestBody, Signal};

fn fixture(name: &str) -> Fixture {
    test_fixture::fixture(&format!("red-{name}"))
}

trait Red {
    fn spawn(&mut self, user: &str) -> Handle;
    fn signallers_started(&self) -> usize;
}

impl Red for Fixture {
    /// Spawns `sleep` as `user` with the admin token; returns the handle.
    fn spawn(&mut self, user: &str) -> Handle {
        self.spawn_as(user, &["sleep", "1000"])
    }

    fn signallers_started(&self) -> usize {
        self.os
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::SignalGroup { .. }))
            .count()
    }
}

#[test]
fn a_kill_flood_starts_a_bounded_number_of_signallers() {
    let mut f = fixture("kill-flood");
    let handle = f.spawn("alice");
    for _ in 0..10_000 {
        f.send(RequestBody::Kill {
            handle,
            signal: Signal::Term,
        })
        .unwrap();
    }
    f.replies();
    let started = f.signallers_started();
    assert!(
        started <= super::handlers::handles::MAX_SIGNALLERS_PER_HANDLE,
        "{started} signalling children started for one handle while none was reaped"
    );
}

/// A signaller its owner stopped is killed at its deadline, and once reaped the handle may
/// be signalled again.
#[test]
fn a_stopped_signaller_is_killed_at_its_deadline_and_frees_its_slot() {
    let mut f = fixture("signaller-deadline");
    let handle = f.spawn("alice");
    let kill = |f: &mut Fixture| {
        f.send(RequestBody::Kill {
            handle,
            signal: Signal::Term,
        })
        .unwrap();
        f.replies()
    };
    for _ in 0..super::handlers::handles::MAX_SIGNALLERS_PER_HANDLE {
        assert!(matches!(
            kill(&mut f).as_slice(),
            [BrokerMessage::Reply {
                body: ReplyBody::Done,
                ..
            }]
        ));
    }
    assert_eq!(error_kind(&kill(&mut f)[0]), Some(ErrorKind::Failed));
    // Past their deadline they are killed through their pidfds.
    for s in &mut f.broker.signallers {
        s.deadline = std::time::Instant::now();
    }
    let kills_before =
        f.os.calls()
            .iter()
            .filter(|c| **c == Call::KillPidfd)
            .count();
    super::handlers::handles::check_signallers(&mut f.broker);
    let kills =
        f.os.calls()
            .iter()
            .filter(|c| **c == Call::KillPidfd)
            .count();
    assert_eq!(
        kills - kills_before,
        super::handlers::handles::MAX_SIGNALLERS_PER_HANDLE
    );
    // Reaped: the slots are free again.
    let pids: Vec<i32> = f.broker.signallers.iter().map(|s| s.pid).collect();
    for pid in pids {
        super::handlers::handles::on_reaped(&mut f.broker, pid, crate::wire::ExitStatus::Signal(9));
    }
    assert!(f.broker.signallers.is_empty());
    assert!(matches!(
        kill(&mut f).as_slice(),
        [BrokerMessage::Reply {
            body: ReplyBody::Done,
            ..
        }]
    ));
}

/// `signal` and `adopt` lines were written one per request, with no rate: a compromised
/// daemon filled the disk by repeating `Adopt` (or `Kill`) of any running handle, which
/// SECURITY.md says it cannot do.
#[test]
fn adopt_and_kill_floods_cannot_grow_the_audit_log_without_bound() {
    let mut f = fixture("audit-flood");
    let handle = f.spawn("alice");
    let start = f.audit_bytes();
    for _ in 0..20_000 {
        f.send(RequestBody::Adopt { handle }).unwrap();
        f.send(RequestBody::Kill {
            handle,
            signal: Signal::Cont,
        })
        .unwrap();
        f.replies();
    }
    let grown = f.audit_bytes() - start;
    assert!(
        grown < 100 * 1024,
        "40,000 requests grew the audit log by {grown} bytes"
    );
    let text = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(
        text.lines().any(|l| l.contains("\"suppressed_before\"")
            && (l.contains("\"event\":\"adopt\"") || l.contains("\"event\":\"signal\""))),
        "what was not written is counted"
    );
}

/// `MAX_PROBES` was one pool for everyone: alice, by stopping her own directory-check
/// children (or checking a path that hangs), held every slot and bob's `CheckDir` was
/// refused (`probes-total`) for as long as she kept it up.
#[test]
fn one_user_cannot_take_every_directory_check_slot() {
    let mut f = fixture("probe-slots");
    f.os.0.borrow_mut().children = ChildScript::Hangs;
    for i in 0..dirs::MAX_PROBES {
        f.send(RequestBody::CheckDir {
            credential: f.admin.clone(),
            unix_user: "alice".into(),
            path: format!("/home/alice/hang{i}"),
        })
        .unwrap();
    }
    f.replies();
    // Bob's checks come from his own worker (alice's would refuse them: `worker-user`).
    f.on_worker(Some(("bob", 2002)));
    f.send(RequestBody::CheckDir {
        credential: f.admin.clone(),
        unix_user: "bob".into(),
        path: "/home/bob/work".into(),
    })
    .unwrap();
    let refused = f.replies().iter().any(|m| error_kind(m).is_some());
    assert!(!refused, "bob's check was answered with an error");
    assert!(
        f.os.calls().contains(&Call::StartProbe {
            user: "bob".into(),
            path: "/home/bob/work".into()
        }),
        "bob's check was never started"
    );
}
