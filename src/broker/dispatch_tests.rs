//! The real dispatcher and handlers, driven through the recording double: no root, no
//! process started. Each test is one of the red-team findings or a rule of the table.
#![cfg(test)]

use std::os::unix::fs::PermissionsExt;

use super::handlers::{dirs, handles, launch};
use super::os_double::{broker_for_tests, Call, ChildScript, RecordingOs};
use super::table;
use super::test_fixture::{self, error_kind, Fixture};
use crate::wire::{
    BrokerMessage, ErrorKind, Event, ExitStatus, Handle, ReplyBody, Request, RequestBody, Signal,
    PROTOCOL_VERSION,
};

fn fixture(name: &str) -> Fixture {
    test_fixture::fixture(&format!("dispatch-{name}"))
}

trait SpawnAlice {
    fn spawn_alice(&mut self) -> Handle;
}

impl SpawnAlice for Fixture {
    /// Spawns `true` as alice with the admin token; returns the handle.
    fn spawn_alice(&mut self) -> Handle {
        self.spawn_as("alice", &["true"])
    }
}

#[test]
fn nothing_but_hello_before_hello_and_no_unknown_handle_ever() {
    let dir = std::env::temp_dir().join(format!("stoa-dispatch-fresh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (mut b, _) = broker_for_tests(RecordingOs::new(&[]), &dir).unwrap();
    let req = |body| Request {
        id: 1,
        request_id: None,
        body,
    };
    assert!(table::dispatch(&mut b, req(RequestBody::ListHandles { after: None })).is_err());
    let _ = std::fs::remove_dir_all(&dir);

    let mut f = fixture("violations");
    assert!(f
        .send(RequestBody::Hello {
            protocol: PROTOCOL_VERSION
        })
        .is_err());
    for body in [
        RequestBody::Kill {
            handle: Handle(77),
            signal: Signal::Kill,
        },
        RequestBody::Adopt { handle: Handle(77) },
        RequestBody::Release { handle: Handle(77) },
    ] {
        assert!(f.send(body).unwrap_err().contains("unknown handle"));
    }
    assert!(f
        .os
        .calls()
        .iter()
        .all(|c| !matches!(c, Call::SignalGroup { .. })));
}

#[test]
fn a_reaped_handle_is_never_signalled_but_adopted_for_its_output_and_exit() {
    let mut f = fixture("reaped");
    let handle = f.spawn_alice();
    let pid = f.broker.handles.get(handle).unwrap().info.pid;
    f.os.0.borrow_mut().exits.push((pid, ExitStatus::Code(0)));
    for (pid, status) in f.broker.os.reap() {
        handles::on_reaped(&mut f.broker, pid, status);
    }
    assert!(matches!(
        f.replies().as_slice(),
        [BrokerMessage::Event(Event::Exited { .. })]
    ));
    let before = f.os.calls().len();
    f.send(RequestBody::Kill {
        handle,
        signal: Signal::Kill,
    })
    .unwrap();
    f.send(RequestBody::Adopt { handle }).unwrap();
    let replies = f.replies();
    assert_eq!(error_kind(&replies[0]), Some(ErrorKind::Failed));
    // Adopted with its exit: what it wrote may still wait in its pipes.
    match &replies[1] {
        BrokerMessage::Reply {
            body: ReplyBody::Adopted(info),
            ..
        } => assert_eq!(info.exited, Some(ExitStatus::Code(0))),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.os.calls().len(), before, "no OS call after the reap");
    f.send(RequestBody::Release { handle }).unwrap();
    assert!(
        f.send(RequestBody::Release { handle }).is_err(),
        "gone for good"
    );
}

#[test]
fn a_running_handle_is_signalled_as_its_owner_and_audited_with_its_principal() {
    let mut f = fixture("signal");
    let handle = f.spawn_alice();
    f.send(RequestBody::Kill {
        handle,
        signal: Signal::Term,
    })
    .unwrap();
    let pid = f.broker.handles.get(handle).unwrap().info.pid;
    assert!(f.os.calls().contains(&Call::SignalGroup {
        uid: 2001,
        pgid: pid,
        signal: Signal::Term
    }));
    let audit = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    let line = audit.lines().find(|l| l.contains("\"signal\"")).unwrap();
    assert!(line.contains("\"principal\":\"admin\"") && line.contains("\"unix_user\":\"alice\""));
}

#[test]
fn refused_spawns_cost_a_bounded_audit_line_each_and_then_429() {
    let mut f = fixture("flood");
    let huge: Vec<String> = (0..8).map(|_| "x".repeat(16 * 1024)).collect();
    let start = f.audit_bytes();
    let mut quota = 0;
    for _ in 0..5000 {
        let body = f.spawn_req("not-a-token", "alice", huge.clone());
        f.send(body).unwrap();
        for m in f.replies() {
            match error_kind(&m) {
                Some(ErrorKind::Quota) => quota += 1,
                Some(ErrorKind::Unauthorized) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    let grown = f.audit_bytes() - start;
    // The burst of 100 audited refusals (plus a few refilled), each well under 1 KiB.
    assert!(grown < 100 * 1024, "audit grew {grown} bytes");
    assert!(quota > 4000, "{quota} answered 429");
    // Refused requests of alice's (a real user) take her refusal tokens too.
    let body = f.spawn_req(&f.admin.clone(), "root", vec!["id".into()]);
    f.send(body).unwrap();
    assert_eq!(
        error_kind(&f.replies()[0]),
        Some(ErrorKind::Refused {
            rule: "root".into()
        })
    );
    // A valid credential still works.
    f.spawn_alice();
    let text = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(text.lines().all(|l| l.len() < 2048));
    assert!(!text.contains(&"x".repeat(300)), "no argv in the audit log");
}

#[test]
fn the_audit_record_of_a_spawn_summarises_its_argv() {
    let mut f = fixture("summary");
    let body = f.spawn_req(
        &f.admin.clone(),
        "alice",
        vec!["gemini".into(), "-p".into(), "SECRET-PROMPT".into()],
    );
    f.send(body).unwrap();
    launch::check_starting(&mut f.broker);
    let text = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("\"event\":\"spawn\""))
        .unwrap();
    assert!(line.contains("\"program\":\"gemini\"") && line.contains("\"args\":2"));
    assert!(line.contains("argv_sha256") && !line.contains("SECRET-PROMPT"));
}

#[test]
fn a_child_that_never_reaches_exec_is_killed_at_its_deadline() {
    let mut f = fixture("deadline");
    f.os.0.borrow_mut().children = ChildScript::Hangs;
    let body = f.spawn_req(&f.admin.clone(), "alice", vec!["true".into()]);
    f.send(body).unwrap();
    launch::check_starting(&mut f.broker);
    assert!(
        f.replies().is_empty(),
        "no answer while the child may still exec"
    );
    let handle = f.broker.handles.starting()[0];
    if let Some(super::handles::Entry {
        life: super::handles::Life::Starting(s),
        ..
    }) = f.broker.handles.get_mut(handle)
    {
        s.deadline = std::time::Instant::now();
    }
    launch::check_starting(&mut f.broker);
    assert!(f.os.calls().contains(&Call::KillPidfd));
    let replies = f.replies();
    assert_eq!(error_kind(&replies[0]), Some(ErrorKind::Failed));
    // It is nobody's handle: the daemon cannot name it.
    assert!(f
        .send(RequestBody::Kill {
            handle,
            signal: Signal::Kill
        })
        .is_err());
}

#[test]
fn a_spawn_finished_after_its_daemon_went_is_ended_not_handed_to_the_next() {
    let mut f = fixture("orphan");
    let body = f.spawn_req(&f.admin.clone(), "alice", vec!["sleep".into(), "9".into()]);
    f.send(body).unwrap();
    f.replace_worker();
    launch::check_starting(&mut f.broker);
    let out = std::mem::take(&mut f.broker.outbox);
    assert!(out.iter().all(|o| o.link != f.broker.link));
    assert!(f.os.calls().iter().any(|c| matches!(
        c,
        Call::SignalGroup {
            signal: Signal::Kill,
            ..
        }
    )));
}

#[test]
fn checkdir_obeys_the_policy_and_runs_as_the_user() {
    let mut f = fixture("checkdir");
    for (user, rule) in [("root", "root"), ("stoa", "service-user")] {
        f.send(RequestBody::CheckDir {
            credential: f.admin.clone(),
            unix_user: user.into(),
            path: "/root/.ssh".into(),
        })
        .unwrap();
        let replies = f.replies();
        assert_eq!(
            error_kind(&replies[0]),
            Some(ErrorKind::Refused { rule: rule.into() }),
            "{user}"
        );
    }
    assert!(!f
        .os
        .calls()
        .iter()
        .any(|c| matches!(c, Call::StartProbe { .. })));
    f.send(RequestBody::CheckDir {
        credential: f.admin.clone(),
        unix_user: "alice".into(),
        path: "/home/alice/work".into(),
    })
    .unwrap();
    dirs::check_probes(&mut f.broker);
    let replies = f.replies();
    assert!(matches!(
        &replies[0],
        BrokerMessage::Reply {
            body: ReplyBody::Dir(d),
            ..
        } if d.uid == 2001
    ));
}

#[test]
fn removed_and_rotated_users_are_revoked_to_the_daemon() {
    use super::handlers::session::check_revocations;
    use super::users::{ApiUser, UserStore};
    let mut f = fixture("revoke");
    let user = |id: u64, name: &str, digest: &str| ApiUser {
        id,
        name: name.into(),
        unix_user: "alice".into(),
        admin: false,
        token_sha256: digest.into(),
        created_at: 0,
    };
    let mut store = UserStore {
        users: vec![user(5, "a", "aa"), user(6, "b", "bb"), user(7, "c", "cc")],
        ..UserStore::default()
    };
    store.save(&f.dir).unwrap();
    // Revocations go to every link that said Hello: the front (which authenticates) and
    // each worker (which holds its connections' principals); not to a fresh one.
    let alice = f.broker.link;
    f.on_worker(None);
    let front = f.broker.link;
    let fresh = f.broker.add_link(super::PeerKind::Worker {
        uid: 2002,
        name: "bob".into(),
    });
    // Each Ready link got exactly one `Revoked`, of these users.
    let revoked_to_every_ready_link = |f: &mut Fixture, users: Vec<u64>| {
        let out = std::mem::take(&mut f.broker.outbox);
        let mut links: Vec<u64> = out
            .iter()
            .map(|o| match &o.message {
                BrokerMessage::Event(Event::Revoked { keys }) => {
                    let mut got = keys.clone();
                    got.sort();
                    assert_eq!(got, users);
                    o.link
                }
                other => panic!("{other:?}"),
            })
            .collect();
        links.sort();
        assert_eq!(links, vec![alice, front]);
        assert!(!links.contains(&fresh));
    };
    check_revocations(&mut f.broker);
    assert!(f.replies().is_empty());
    // b removed, c's token rotated, a untouched.
    std::thread::sleep(std::time::Duration::from_millis(10));
    store.users = vec![user(5, "a", "aa"), user(7, "c", "cc2")];
    store.save(&f.dir).unwrap();
    check_revocations(&mut f.broker);
    revoked_to_every_ready_link(&mut f, vec![6, 7]);
    // A user added and removed between two looks, whose token was used meanwhile (the
    // front authenticates: it is the one link that may).
    let token = super::users::new_token().unwrap();
    store
        .users
        .push(user(8, "d", &super::users::digest_hex(&token)));
    store.save(&f.dir).unwrap();
    f.send(RequestBody::Authenticate {
        credential: token,
        peer: None,
    })
    .unwrap();
    assert!(matches!(
        std::mem::take(&mut f.broker.outbox).as_slice(),
        [super::Outgoing {
            message: BrokerMessage::Reply {
                body: ReplyBody::Principal(_),
                ..
            },
            link,
            ..
        }] if *link == front
    ));
    store.users.pop();
    store.save(&f.dir).unwrap();
    check_revocations(&mut f.broker);
    revoked_to_every_ready_link(&mut f, vec![8]);
}

#[test]
fn a_spawn_whose_daemon_went_and_whose_child_is_reaped_signals_nothing() {
    let mut f = fixture("orphan-reaped");
    let body = f.spawn_req(&f.admin.clone(), "alice", vec!["true".into()]);
    f.send(body).unwrap();
    f.replace_worker();
    // The child exec'd and exited before its report was read.
    let handle = f.broker.handles.starting()[0];
    let pid = f.broker.handles.get(handle).unwrap().info.pid;
    f.os.0.borrow_mut().exits.push((pid, ExitStatus::Code(0)));
    for (pid, status) in f.broker.os.reap() {
        handles::on_reaped(&mut f.broker, pid, status);
    }
    assert!(!f
        .os
        .calls()
        .iter()
        .any(|c| matches!(c, Call::SignalGroup { .. })));
    assert!(f.broker.handles.get(handle).is_none(), "nothing left of it");
}

#[test]
fn handles_are_listed_a_page_at_a_time_within_the_frame_limit() {
    let mut f = fixture("pages");
    let argv: Vec<String> = (0..8)
        .map(|i| format!("{i}{}", "x".repeat(16 * 1024 - 2)))
        .collect();
    for _ in 0..20 {
        let body = f.spawn_req(&f.admin.clone(), "alice", argv.clone());
        f.send(body).unwrap();
    }
    launch::check_starting(&mut f.broker);
    f.replies();
    let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
    loop {
        f.send(RequestBody::ListHandles { after }).unwrap();
        let out = std::mem::take(&mut f.broker.outbox);
        let frame = stoa_executor::codec::encode(&out[0].message).unwrap();
        assert!(frame.len() < 1024 * 1024, "a page of {} bytes", frame.len());
        let BrokerMessage::Reply {
            body: ReplyBody::Handles { list, more },
            ..
        } = &out[0].message
        else {
            panic!("{:?}", out[0].message)
        };
        pages += 1;
        seen.extend(list.iter().map(|i| i.handle));
        after = list.last().map(|i| i.handle);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 20);
    assert!(pages > 1);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn a_terminal_needs_a_ring_within_the_limits_and_gets_its_fds_back_on_adopt() {
    use crate::wire::{limits, FdLayout, WindowSize};
    let mut f = fixture("ring");
    let admin = f.admin.clone();
    let spawn = |f: &Fixture, tty: bool, ring_bytes: u32| {
        let RequestBody::Spawn(mut req) = f.spawn_req(&admin, "alice", vec!["sh".into()]) else {
            unreachable!()
        };
        req.tty = tty.then_some(WindowSize { rows: 24, cols: 80 });
        req.ring_bytes = ring_bytes;
        RequestBody::Spawn(req)
    };
    let refused = [
        (true, 0),
        (true, limits::MIN_RING_BYTES - 1),
        (true, limits::MAX_RING_BYTES + 1),
        (false, limits::MIN_RING_BYTES),
    ];
    for (tty, ring_bytes) in refused {
        let body = spawn(&f, tty, ring_bytes);
        f.send(body).unwrap();
        match &f.replies()[..] {
            [m @ BrokerMessage::Reply {
                body: ReplyBody::Error(e),
                ..
            }] => {
                assert_eq!(error_kind(m), Some(ErrorKind::BadRequest));
                assert!(e.message.contains("ring_bytes"), "{}", e.message);
            }
            other => panic!("tty {tty}, ring {ring_bytes}: {other:?}"),
        }
    }
    assert!(!f
        .os
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Launch { .. })));
    // In range: a terminal with three fds, and three again (duplicates) on Adopt.
    let body = spawn(&f, true, limits::MIN_RING_BYTES);
    f.send(body).unwrap();
    launch::check_starting(&mut f.broker);
    let handle = match f.broker.outbox.pop() {
        Some(super::Outgoing {
            message:
                BrokerMessage::Reply {
                    body: ReplyBody::Spawned(info),
                    ..
                },
            fds,
            ..
        }) => {
            assert_eq!((info.fds, fds.len()), (FdLayout::Pty, 3));
            info.handle
        }
        _ => panic!("expected Spawned"),
    };
    f.send(RequestBody::Adopt { handle }).unwrap();
    match f.broker.outbox.pop() {
        Some(super::Outgoing {
            message:
                BrokerMessage::Reply {
                    body: ReplyBody::Adopted(info),
                    ..
                },
            fds,
            ..
        }) => assert_eq!((info.fds, fds.len()), (FdLayout::Pty, 3)),
        _ => panic!("expected Adopted"),
    }
}

/// Sends a spawn for `purpose` as alice and lets its child report; the last reply.
fn spawn_for(f: &mut Fixture, purpose: crate::wire::Purpose) -> Option<super::Outgoing> {
    let admin = f.admin.clone();
    let RequestBody::Spawn(mut req) = f.spawn_req(&admin, "alice", vec!["true".into()]) else {
        unreachable!()
    };
    req.purpose = purpose;
    f.send(RequestBody::Spawn(req)).unwrap();
    launch::check_starting(&mut f.broker);
    f.broker.outbox.pop()
}

fn launched_confine(f: &Fixture) -> Vec<Option<(u32, Vec<String>)>> {
    f.os.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Launch { confine, .. } => Some(confine),
            _ => None,
        })
        .collect()
}

#[test]
fn agents_are_confined_by_the_policy_and_the_reply_says_so() {
    use crate::wire::{Confinement, Purpose};
    let mut f = fixture("confine");
    match spawn_for(&mut f, Purpose::Agent).map(|o| o.message) {
        Some(BrokerMessage::Reply {
            body: ReplyBody::Spawned(info),
            ..
        }) => assert_eq!(info.confinement, Confinement::Landlock { abi: 7 }),
        other => panic!("{other:?}"),
    }
    let launched = launched_confine(&f);
    let Some(Some((7, paths))) = launched.first() else {
        panic!("the agent's launch was not confined: {launched:?}")
    };
    for want in ["/home/alice", "/tmp", "/dev/null"] {
        assert!(paths.iter().any(|p| p == want), "{want}: {paths:?}");
    }
    // The policy leaves exec and terminals alone by default, and says why.
    match spawn_for(&mut f, Purpose::Exec).map(|o| o.message) {
        Some(BrokerMessage::Reply {
            body: ReplyBody::Spawned(info),
            ..
        }) => assert!(
            matches!(&info.confinement, Confinement::None { reason } if reason.contains("confine.exec = false")),
            "{:?}",
            info.confinement
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(launched_confine(&f).get(1), Some(&None));
    // Turned on for exec: confined too.
    f.broker.policy.confine.exec = true;
    spawn_for(&mut f, Purpose::Exec).unwrap();
    assert!(matches!(launched_confine(&f).get(2), Some(Some((7, _)))));
    // The audit line carries it.
    let audit = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"confinement\":\"landlock abi 7\""),
        "{audit}"
    );
}

#[test]
fn required_confinement_without_landlock_refuses_and_starts_nothing() {
    use crate::wire::{Confinement, Purpose};
    let mut f = fixture("confine-required");
    f.os.0.borrow_mut().landlock =
        Err("this kernel has no Landlock (landlock_create_ruleset: ENOSYS)".into());
    // Not required: the run starts, unconfined, and says why.
    match spawn_for(&mut f, Purpose::Agent).map(|o| o.message) {
        Some(BrokerMessage::Reply {
            body: ReplyBody::Spawned(info),
            ..
        }) => assert!(
            matches!(&info.confinement, Confinement::None { reason } if reason.contains("no Landlock")),
            "{:?}",
            info.confinement
        ),
        other => panic!("{other:?}"),
    }
    let launches = launched_confine(&f).len();
    f.broker.policy.confine.required = true;
    let reply = spawn_for(&mut f, Purpose::Agent).expect("a reply");
    assert_eq!(
        error_kind(&reply.message),
        Some(ErrorKind::Refused {
            rule: "confine.required".into()
        })
    );
    let BrokerMessage::Reply {
        body: ReplyBody::Error(e),
        ..
    } = &reply.message
    else {
        panic!("{:?}", reply.message)
    };
    assert!(
        e.message.contains("this kernel has no Landlock"),
        "{}",
        e.message
    );
    assert_eq!(
        launched_confine(&f).len(),
        launches,
        "a refused run launched"
    );
    // A run the policy does not confine still starts.
    assert!(matches!(
        spawn_for(&mut f, Purpose::Exec).map(|o| o.message),
        Some(BrokerMessage::Reply {
            body: ReplyBody::Spawned(_),
            ..
        })
    ));
}

#[test]
fn a_run_is_born_in_its_v2_cgroup_and_writes_cgroup_procs_only_on_v1() {
    use super::os_double::CgroupScript;
    for (script, dir, procs) in [
        (CgroupScript::V2, true, 0),
        (CgroupScript::V1, false, 3),
        (CgroupScript::Off, false, 0),
    ] {
        let mut f = fixture(&format!("cgroup-{script:?}"));
        f.os.0.borrow_mut().cgroups = script;
        f.spawn_alice();
        let launches: Vec<(bool, usize)> =
            f.os.calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::Launch {
                        cgroup_dir,
                        cgroup_procs,
                        ..
                    } => Some((cgroup_dir, cgroup_procs)),
                    _ => None,
                })
                .collect();
        assert_eq!(launches, vec![(dir, procs)], "{script:?}");
    }
}
