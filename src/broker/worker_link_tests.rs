//! Abuse of the link model: what the front may not do, what a worker may not do for
//! another user, and where replies and events go. The real dispatcher and handlers,
//! driven through the recording double (no root, no process started).
#![cfg(test)]

use super::handlers::handles;
use super::os_double::Call;
use super::test_fixture::{self, Fixture};
use super::users::{digest_hex, new_token, ApiUser, UserStore};
use super::{Outgoing, PeerKind};
use crate::wire::{
    BrokerMessage, ErrorKind, Event, ExitStatus, Handle, Principal, ReplyBody, RequestBody, Signal,
};

const ALICE: (&str, u32) = ("alice", 2001);
const BOB: (&str, u32) = ("bob", 2002);

fn fixture(name: &str) -> Fixture {
    test_fixture::fixture(&format!("wl-{name}"))
}

/// API users of the store: alice's and bob's (not admins), and their tokens.
struct Tokens {
    alice: String,
    bob: String,
}

const ALICE_API_ID: u64 = 41;
const BOB_API_ID: u64 = 42;

fn api_users(f: &Fixture) -> Tokens {
    let (alice, bob) = (new_token().unwrap(), new_token().unwrap());
    let user = |id: u64, name: &str, unix_user: &str, token: &str| ApiUser {
        id,
        name: name.into(),
        unix_user: unix_user.into(),
        admin: false,
        token_sha256: digest_hex(token),
        created_at: 0,
    };
    UserStore {
        users: vec![
            user(ALICE_API_ID, "alice-api", "alice", &alice),
            user(BOB_API_ID, "bob-api", "bob", &bob),
        ],
        ..UserStore::default()
    }
    .save(&f.dir)
    .unwrap();
    Tokens { alice, bob }
}

fn alice_principal() -> Principal {
    Principal::User {
        id: ALICE_API_ID,
        name: "alice-api".into(),
        unix_user: "alice".into(),
        admin: false,
    }
}

/// What went out since the last look, with the link each went to.
fn out(f: &mut Fixture) -> Vec<Outgoing> {
    std::mem::take(&mut f.broker.outbox)
}

/// The one reply that went out, on the current link.
fn one_reply(f: &mut Fixture) -> (ReplyBody, usize) {
    let link = f.broker.link;
    match out(f).as_mut_slice() {
        [Outgoing {
            link: l,
            message: BrokerMessage::Reply { body, .. },
            fds,
        }] if *l == link => (body.clone(), fds.len()),
        other => panic!(
            "expected one reply on link {link}, got {:?}",
            other
                .iter()
                .map(|o| (o.link, &o.message))
                .collect::<Vec<_>>()
        ),
    }
}

fn one_error(f: &mut Fixture) -> ErrorKind {
    match one_reply(f) {
        (ReplyBody::Error(e), 0) => e.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn refused(rule: &str) -> ErrorKind {
    ErrorKind::Refused { rule: rule.into() }
}

fn launches(f: &Fixture) -> usize {
    f.os.calls()
        .iter()
        .filter(|c| {
            matches!(
                c,
                Call::Launch { .. } | Call::CgroupPrepare { .. } | Call::StartProbe { .. }
            )
        })
        .count()
}

fn signals(f: &Fixture) -> usize {
    f.os.calls()
        .iter()
        .filter(|c| matches!(c, Call::SignalGroup { .. }))
        .count()
}

fn reap(f: &mut Fixture, handle: Handle) {
    let pid = f.broker.handles.get(handle).unwrap().info.pid;
    f.os.0.borrow_mut().exits.push((pid, ExitStatus::Code(0)));
    for (pid, status) in f.broker.os.reap() {
        handles::on_reaped(&mut f.broker, pid, status);
    }
}

/// The handles a `ListHandles` / `ListAll` reply lists (in one page).
fn listed(body: ReplyBody) -> Vec<Handle> {
    match body {
        ReplyBody::Handles { list, more: false } => list.iter().map(|i| i.handle).collect(),
        other => panic!("expected one page of handles, got {other:?}"),
    }
}

fn open_worker(credential: &str, user: &str, start: bool) -> RequestBody {
    RequestBody::OpenWorker {
        credential: credential.into(),
        unix_user: user.into(),
        start,
    }
}

#[test]
fn the_front_may_not_spawn_signal_adopt_list_check_or_touch_secrets() {
    let mut f = fixture("front-violations");
    let tokens = api_users(&f);
    let handle = f.spawn_as("alice", &["sleep", "100"]);
    f.replies();
    f.on_worker(None);
    let (calls, admin) = (f.os.calls().len(), f.admin.clone());
    let spawn = f.spawn_req(&admin, "alice", vec!["id".into()]);
    for body in [
        spawn,
        RequestBody::Kill {
            handle,
            signal: Signal::Kill,
        },
        RequestBody::Release { handle },
        RequestBody::Adopt { handle },
        RequestBody::ListHandles { after: None },
        RequestBody::CheckDir {
            credential: admin.clone(),
            unix_user: "alice".into(),
            path: "/home/alice".into(),
        },
        RequestBody::SetSecret {
            credential: tokens.alice.clone(),
            name: "KEY".into(),
            value: "v".into(),
        },
        RequestBody::DeleteSecret {
            credential: tokens.alice.clone(),
            name: "KEY".into(),
        },
        RequestBody::ListSecrets {
            credential: tokens.alice.clone(),
        },
        RequestBody::Retire,
    ] {
        let what = format!("{body:?}");
        let err = f.send(body).expect_err(&what);
        assert!(err.contains("is not for a front link"), "{what}: {err}");
    }
    assert!(f.broker.outbox.is_empty(), "a violation is not answered");
    assert_eq!(f.os.calls().len(), calls, "no OS call, not even a lookup");
    let entry = f.broker.handles.get(handle).unwrap();
    assert!(entry.running() && !entry.released);
    assert!(f.broker.credentials.store.get().unwrap().secrets.is_empty());
    assert!(f.broker.connects.is_empty());
}

#[test]
fn open_worker_checks_the_credential_and_the_user_and_queues_one_connect() {
    let mut f = fixture("open-worker");
    let tokens = api_users(&f);
    f.on_worker(None);
    let front = f.broker.link;

    f.send(open_worker("not-a-token", "alice", true)).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Unauthorized);
    f.send(open_worker(&tokens.alice, "bob", true)).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Forbidden);
    assert!(f.broker.connects.is_empty(), "nothing opened for a refusal");

    f.send(open_worker(&tokens.alice, "alice", true)).unwrap();
    assert_eq!(f.broker.link, front);
    assert!(matches!(one_reply(&mut f), (ReplyBody::Connection, 1)));
    assert_eq!(f.broker.connects.len(), 1);
    let c = &f.broker.connects[0];
    assert_eq!((c.account.name.as_str(), c.account.uid), ALICE);
    assert_eq!(c.principal, Some(alice_principal()));
}

#[test]
fn open_worker_without_start_needs_a_running_worker() {
    let mut f = fixture("open-no-start");
    let tokens = api_users(&f);
    f.on_worker(None);
    // Bob has no worker link.
    assert!(f.broker.worker_link(BOB.1).is_none());
    f.send(open_worker(&tokens.bob, "bob", false)).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Unavailable);
    assert!(f.broker.connects.is_empty());
    // Alice has one (the fixture's).
    f.send(open_worker(&tokens.alice, "alice", false)).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Connection, 1)));
    assert_eq!(f.broker.connects.len(), 1);
    assert_eq!(f.broker.connects[0].account.uid, ALICE.1);
}

#[test]
fn anonymous_connections_only_reach_a_running_worker_and_carry_no_principal() {
    let mut f = fixture("open-anonymous");
    f.on_worker(None);
    for user in ["bob", "mallory", "root"] {
        f.send(RequestBody::OpenWorkerAnonymous {
            unix_user: user.into(),
        })
        .unwrap();
        assert_eq!(one_error(&mut f), ErrorKind::Unavailable, "{user}");
    }
    assert!(f.broker.connects.is_empty());
    f.send(RequestBody::OpenWorkerAnonymous {
        unix_user: "alice".into(),
    })
    .unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Connection, 1)));
    assert_eq!(f.broker.connects.len(), 1);
    assert_eq!(f.broker.connects[0].account.uid, ALICE.1);
    assert_eq!(f.broker.connects[0].principal, None);
}

#[test]
fn list_all_needs_an_admin_and_lists_every_user() {
    let mut f = fixture("list-all");
    let tokens = api_users(&f);
    let a = f.spawn_as("alice", &["sleep", "100"]);
    let b = f.spawn_as("bob", &["sleep", "100"]);
    f.replies();
    f.on_worker(None);
    let list_all = |credential: &str| RequestBody::ListAll {
        credential: credential.into(),
        after: None,
    };
    f.send(list_all("not-a-token")).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Unauthorized);
    f.send(list_all(&tokens.alice)).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Forbidden);
    // The refusal is audited, as the table says.
    let audit = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"event\":\"refused\"")
        && l.contains("\"request\":\"ListAll\"")
        && l.contains(&format!("\"principal\":\"user:{ALICE_API_ID}\""))));
    f.send(list_all(&f.admin.clone())).unwrap();
    assert_eq!(listed(one_reply(&mut f).0), vec![a, b]);
}

#[test]
fn a_worker_acts_for_no_other_user_even_with_the_admin_token() {
    let mut f = fixture("worker-user");
    let tokens = api_users(&f);
    f.on_worker(Some(ALICE));
    let admin = f.admin.clone();
    for credential in [&admin, &tokens.bob] {
        let spawn = f.spawn_req(credential, "bob", vec!["id".into()]);
        f.send(spawn).unwrap();
        assert_eq!(one_error(&mut f), refused("worker-user"));
        f.send(RequestBody::CheckDir {
            credential: credential.clone(),
            unix_user: "bob".into(),
            path: "/home/bob".into(),
        })
        .unwrap();
        assert_eq!(one_error(&mut f), refused("worker-user"));
    }
    f.send(RequestBody::SetSecret {
        credential: tokens.bob.clone(),
        name: "KEY".into(),
        value: "v".into(),
    })
    .unwrap();
    assert_eq!(one_error(&mut f), refused("worker-user"));
    f.send(RequestBody::ListSecrets {
        credential: tokens.bob.clone(),
    })
    .unwrap();
    assert_eq!(one_error(&mut f), refused("worker-user"));
    assert_eq!(launches(&f), 0, "nothing launched or probed for bob");
    assert!(f.broker.handles.starting().is_empty());
    assert!(f.broker.probes.is_empty());
    assert!(f.broker.credentials.store.get().unwrap().secrets.is_empty());
    // Her own user, with her own token, is served.
    let spawn = f.spawn_req(&tokens.alice, "alice", vec!["id".into()]);
    f.send(spawn).unwrap();
    super::handlers::launch::check_starting(&mut f.broker);
    assert!(matches!(one_reply(&mut f).0, ReplyBody::Spawned(i) if i.uid == ALICE.1));
}

#[test]
fn a_worker_may_not_name_another_users_handle() {
    let mut f = fixture("other-handle");
    let bobs = f.spawn_as("bob", &["sleep", "100"]);
    f.replies();
    f.on_worker(Some(ALICE));
    for body in [
        RequestBody::Kill {
            handle: bobs,
            signal: Signal::Kill,
        },
        RequestBody::Adopt { handle: bobs },
        RequestBody::Release { handle: bobs },
    ] {
        let what = format!("{body:?}");
        let err = f.send(body).expect_err(&what);
        assert!(err.contains("of another user"), "{what}: {err}");
    }
    assert!(f.broker.outbox.is_empty());
    assert_eq!(signals(&f), 0);
    assert!(!f.broker.handles.get(bobs).unwrap().released);
    // Bob's own worker may.
    f.on_worker(Some(BOB));
    f.send(RequestBody::Kill {
        handle: bobs,
        signal: Signal::Term,
    })
    .unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    assert_eq!(signals(&f), 1);
}

#[test]
fn list_handles_on_a_worker_link_lists_only_its_users_handles() {
    let mut f = fixture("list-own");
    let a1 = f.spawn_as("alice", &["sleep", "100"]);
    let b1 = f.spawn_as("bob", &["sleep", "100"]);
    let a2 = f.spawn_as("alice", &["sleep", "100"]);
    f.replies();
    f.on_worker(Some(ALICE));
    f.send(RequestBody::ListHandles { after: None }).unwrap();
    assert_eq!(listed(one_reply(&mut f).0), vec![a1, a2]);
    f.on_worker(Some(BOB));
    f.send(RequestBody::ListHandles { after: None }).unwrap();
    assert_eq!(listed(one_reply(&mut f).0), vec![b1]);
}

#[test]
fn retire_is_refused_while_the_user_has_unreleased_handles() {
    let mut f = fixture("retire");
    let running = f.spawn_as("alice", &["sleep", "100"]);
    let exited = f.spawn_as("alice", &["true"]);
    reap(&mut f, exited);
    f.replies();
    let alice = f.broker.link;
    for release in [running, exited] {
        f.send(RequestBody::Retire).unwrap();
        assert_eq!(one_error(&mut f), refused("live-work"));
        assert!(!f.broker.peers[&alice].retiring);
        assert_eq!(f.broker.worker_link(ALICE.1), Some(alice));
        f.send(RequestBody::Release { handle: release }).unwrap();
        assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    }
    f.send(RequestBody::Retire).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    assert!(f.broker.peers[&alice].retiring);
    assert_eq!(f.broker.worker_link(ALICE.1), None);
    // A retiring worker starts nothing new (its exit would reach nobody).
    let launches = f.os.calls().len();
    let body = f.spawn_req(&f.admin.clone(), "alice", vec!["true".into()]);
    f.send(body).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Unavailable);
    assert!(!f.os.calls()[launches..]
        .iter()
        .any(|c| matches!(c, Call::Launch { .. })));
    // New connections no longer reach the retiring worker.
    f.on_worker(None);
    f.send(RequestBody::OpenWorkerAnonymous {
        unix_user: "alice".into(),
    })
    .unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Unavailable);
}

#[test]
fn a_worker_may_not_authenticate_open_workers_or_list_everything() {
    let mut f = fixture("worker-violations");
    let tokens = api_users(&f);
    f.on_worker(Some(ALICE));
    let admin = f.admin.clone();
    for body in [
        RequestBody::Authenticate {
            credential: tokens.alice.clone(),
            peer: None,
        },
        open_worker(&tokens.alice, "alice", true),
        open_worker(&admin, "bob", true),
        RequestBody::OpenWorkerAnonymous {
            unix_user: "bob".into(),
        },
        RequestBody::ListAll {
            credential: admin.clone(),
            after: None,
        },
    ] {
        let what = format!("{body:?}");
        let err = f.send(body).expect_err(&what);
        assert!(err.contains("is not for a worker link"), "{what}: {err}");
    }
    assert!(f.broker.outbox.is_empty());
    assert!(f.broker.connects.is_empty());
}

#[test]
fn an_exit_goes_only_to_its_users_current_worker() {
    let mut f = fixture("exit-routing");
    f.on_worker(None);
    let front = f.broker.link;
    let bob_handle = f.spawn_as("bob", &["sleep", "100"]);
    let handle = f.spawn_as("alice", &["true"]);
    let alice = f.broker.link;
    f.replies();
    // A fresh link (no Hello yet) hears nothing.
    let fresh = f.broker.add_link(PeerKind::Worker {
        uid: 2003,
        name: "carol".into(),
    });
    reap(&mut f, handle);
    match out(&mut f).as_slice() {
        [Outgoing {
            link,
            message: BrokerMessage::Event(Event::Exited { handle: h, .. }),
            fds,
        }] => {
            assert_eq!((*link, *h, fds.len()), (alice, handle, 0));
            assert!(*link != front && *link != fresh);
        }
        other => panic!(
            "{:?}",
            other
                .iter()
                .map(|o| (o.link, &o.message))
                .collect::<Vec<_>>()
        ),
    }
    // A restarted worker hears its user's exits; the link it replaced hears nothing.
    f.on_worker(Some(BOB));
    let old = f.broker.link;
    f.replace_worker();
    let new = f.broker.link;
    reap(&mut f, bob_handle);
    let sent = out(&mut f);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].link, new);
    assert!(sent[0].link != old);
    assert!(matches!(
        sent[0].message,
        BrokerMessage::Event(Event::Exited { handle: h, .. }) if h == bob_handle
    ));
}

#[test]
fn a_revocation_goes_to_every_ready_link_and_no_dropped_one() {
    use super::handlers::session::check_revocations;
    let mut f = fixture("revoked-routing");
    let tokens = api_users(&f);
    let alice = f.broker.link;
    f.on_worker(None);
    let front = f.broker.link;
    f.on_worker(Some(BOB));
    let bob = f.broker.link;
    let fresh = f.broker.add_link(PeerKind::Worker {
        uid: 2003,
        name: "carol".into(),
    });
    check_revocations(&mut f.broker);
    assert!(out(&mut f).is_empty());
    let revoked_to = |f: &mut Fixture, id: u64| {
        let mut links: Vec<u64> = out(f)
            .iter()
            .map(|o| match &o.message {
                BrokerMessage::Event(Event::Revoked { keys }) => {
                    assert_eq!(keys, &vec![id]);
                    o.link
                }
                other => panic!("{other:?}"),
            })
            .collect();
        links.sort();
        links
    };
    // Bob's API user removed.
    std::thread::sleep(std::time::Duration::from_millis(10));
    let mut store = f.broker.credentials.store.get().unwrap().clone();
    store.users.retain(|u| u.id != BOB_API_ID);
    store.save(&f.dir).unwrap();
    check_revocations(&mut f.broker);
    assert_eq!(revoked_to(&mut f, BOB_API_ID), vec![alice, front, bob]);
    assert!(!f.broker.outbox.iter().any(|o| o.link == fresh));
    // Bob's worker is gone; then alice's token is rotated.
    f.broker.drop_link(bob);
    std::thread::sleep(std::time::Duration::from_millis(10));
    store.users[0].token_sha256 = digest_hex(&tokens.bob);
    store.save(&f.dir).unwrap();
    check_revocations(&mut f.broker);
    assert_eq!(revoked_to(&mut f, ALICE_API_ID), vec![alice, front]);
}

#[test]
fn a_worker_shares_only_its_own_users_objects_and_the_grantee_alone_gets_a_connection() {
    let mut f = fixture("shares");
    let tokens = api_users(&f);
    let share = |object: &str, grantee: &str| RequestBody::Share {
        object: object.into(),
        grantee: grantee.into(),
        input: false,
        expires_at: None,
    };
    f.on_worker(Some(ALICE));
    // Another user's object: a violation (a worker speaks for its user only).
    assert!(f.send(share("u2002-bobs", "bob")).is_err());
    f.on_worker(Some(ALICE));
    for (grantee, why) in [
        ("root", "root"),
        ("alice", "the owner"),
        ("nobody-x", "unknown"),
    ] {
        f.send(share("u2001-t1", grantee)).unwrap();
        assert_eq!(one_error(&mut f), refused("share-grantee"), "{why}");
    }
    f.send(share("u2001-t1", "bob")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));

    // The front: bob's credential opens a connection to alice's worker naming the share;
    // alice's own credential is no grantee, and another object is not shared.
    f.on_worker(None);
    let open = |credential: &str, object: &str| RequestBody::OpenShared {
        credential: credential.into(),
        object: object.into(),
    };
    f.send(open(&tokens.alice, "u2001-t1")).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Forbidden);
    f.send(open(&tokens.bob, "u2001-other")).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Forbidden);
    f.send(open(&tokens.bob, "u2001-t1")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Connection, 1)));
    let c = f.broker.connects.pop().expect("one connect");
    assert_eq!(c.account.uid, 2001, "to alice's worker");
    assert!(c.credential.is_none(), "bob's credential does not go there");
    let s = c.share.expect("the share rides along");
    assert_eq!(
        (s.object.as_str(), s.grantee.as_str(), s.input),
        ("u2001-t1", "bob", false)
    );
    assert_eq!(
        c.principal.and_then(|p| p.unix_user().map(str::to_string)),
        Some("bob".into())
    );

    // Revoked by alice's worker: bob's next open is refused.
    f.on_worker(Some(ALICE));
    f.send(RequestBody::Unshare {
        object: "u2001-t1".into(),
        grantee: Some("bob".into()),
    })
    .unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    f.on_worker(None);
    f.send(open(&tokens.bob, "u2001-t1")).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::Forbidden);
}

#[test]
fn a_run_gets_the_secrets_its_tool_may_have_the_users_own_over_the_admins_defaults() {
    let mut f = fixture("secret-names");
    let mut store = UserStore::load(&f.dir, nix::unistd::geteuid().as_raw()).unwrap();
    store.secrets.insert(
        "alice".into(),
        [
            ("A".into(), "alice-a".into()),
            ("B".into(), "alice-b".into()),
        ]
        .into(),
    );
    store.default_secrets = [
        ("A".into(), "default-a".into()),
        ("C".into(), "default-c".into()),
    ]
    .into();
    store.save(&f.dir).unwrap();
    let admin = f.admin.clone();
    let handed = |f: &mut Fixture, names: Option<Vec<&str>>| {
        f.on_worker(Some(ALICE));
        let RequestBody::Spawn(mut req) = f.spawn_req(&admin, "alice", vec!["true".into()]) else {
            unreachable!()
        };
        req.secrets = true;
        req.secret_names = names.map(|n| n.into_iter().map(String::from).collect());
        f.send(RequestBody::Spawn(req)).unwrap();
        f.replies();
        match f
            .os
            .calls()
            .into_iter()
            .rev()
            .find(|c| matches!(c, Call::Launch { .. }))
        {
            Some(Call::Launch { secrets, .. }) => secrets,
            other => panic!("{other:?}"),
        }
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        handed(&mut f, None),
        pairs(&[("A", "alice-a"), ("B", "alice-b"), ("C", "default-c")])
    );
    assert_eq!(
        handed(&mut f, Some(vec!["A", "C"])),
        pairs(&[("A", "alice-a"), ("C", "default-c")])
    );
    assert_eq!(handed(&mut f, Some(vec![])), pairs(&[]));
    // A name that is no environment variable name is refused.
    f.on_worker(Some(ALICE));
    let RequestBody::Spawn(mut req) = f.spawn_req(&admin, "alice", vec!["true".into()]) else {
        unreachable!()
    };
    req.secrets = true;
    req.secret_names = Some(vec!["bad name".into()]);
    f.send(RequestBody::Spawn(req)).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::BadRequest);
}

#[test]
fn a_kept_stdin_comes_back_on_adopt_until_the_worker_closes_it() {
    let mut f = fixture("keep-stdin");
    let admin = f.admin.clone();
    f.on_worker(Some(ALICE));
    let RequestBody::Spawn(mut req) = f.spawn_req(&admin, "alice", vec!["cat".into()]) else {
        unreachable!()
    };
    // Kept stdin needs a stdin pipe.
    req.keep_stdin = true;
    f.send(RequestBody::Spawn(req.clone())).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::BadRequest);
    req.stdin = true;
    f.send(RequestBody::Spawn(req)).unwrap();
    super::handlers::launch::check_starting(&mut f.broker);
    let handle = match f.replies().pop() {
        Some(BrokerMessage::Reply {
            body: ReplyBody::Spawned(info),
            ..
        }) => info.handle,
        other => panic!("expected Spawned, got {other:?}"),
    };
    let adopt = |f: &mut Fixture| {
        f.send(RequestBody::Adopt { handle }).unwrap();
        match one_reply(f) {
            (ReplyBody::Adopted(info), fds) => (info.fds, fds),
            other => panic!("{other:?}"),
        }
    };
    // A restarted worker gets the stdin pipe back: control, stdin, stdout, stderr.
    assert_eq!(
        adopt(&mut f),
        (crate::wire::FdLayout::Pipes { stdin: true }, 4)
    );
    // Bob's worker may not close it.
    f.on_worker(Some(BOB));
    let err = f.send(RequestBody::CloseStdin { handle }).unwrap_err();
    assert!(err.contains("of another user"), "{err}");
    f.on_worker(Some(ALICE));
    f.send(RequestBody::CloseStdin { handle }).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    assert_eq!(
        adopt(&mut f),
        (crate::wire::FdLayout::Pipes { stdin: false }, 3)
    );
    // Closing twice is harmless.
    f.send(RequestBody::CloseStdin { handle }).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
}

#[test]
fn approval_records_say_who_answered_and_are_bounded() {
    let mut f = fixture("approval-records");
    let tokens = api_users(&f);
    let record = |credential: Option<&str>, summary: &str| RequestBody::RecordApproval {
        credential: credential.map(String::from),
        approval: "u2001-a".into(),
        session: "u2001-s".into(),
        task: "u2001-t".into(),
        tool: "Bash".into(),
        step: crate::wire::ApprovalStep::Allowed,
        summary: summary.into(),
    };
    // Only a worker may record.
    f.on_worker(None);
    assert!(f.send(record(None, "x")).is_err());
    f.on_worker(Some(ALICE));
    let lines = |f: &Fixture| -> Vec<serde_json::Value> {
        std::fs::read_to_string(f.dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "approval")
            .collect()
    };
    f.send(record(Some(&tokens.alice), "Bash: ls")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    // Bob's credential answers nothing in alice's worker: recorded as not believed.
    f.send(record(Some(&tokens.bob), "Bash: ls")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    f.send(record(None, "Bash: ls")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
    let written = lines(&f);
    assert_eq!(written.len(), 3);
    assert_eq!(written[0]["by"], alice_principal().owner());
    assert_eq!(written[0]["user"], "alice");
    assert_eq!(written[0]["uid"], 2001);
    assert_eq!(written[0]["step"], "allowed");
    assert_eq!(written[1]["by"], "unverified");
    assert!(written[2]["by"].is_null());
    // Too long: refused, nothing written.
    f.send(record(None, &"x".repeat(2000))).unwrap();
    assert_eq!(one_error(&mut f), ErrorKind::BadRequest);
    // A worker cannot fill root's disk: past its burst, records are refused.
    let mut refused = 0;
    for _ in 0..100 {
        f.send(record(None, "Bash: ls")).unwrap();
        if let (ReplyBody::Error(e), _) = one_reply(&mut f) {
            assert_eq!(e.kind, ErrorKind::Quota);
            refused += 1;
        }
    }
    assert!(refused >= 40, "{refused} of 100 refused");
    assert!(lines(&f).len() <= 3 + 61, "{}", lines(&f).len());
    // Another user's budget is their own.
    f.on_worker(Some(BOB));
    f.send(record(None, "Bash: ls")).unwrap();
    assert!(matches!(one_reply(&mut f), (ReplyBody::Done, 0)));
}

#[test]
fn a_worker_has_its_users_secrets_only_on_the_direct_path() {
    let mut f = fixture("run-secrets");
    let tokens = api_users(&f);
    let mut store = UserStore::load(&f.dir, nix::unistd::geteuid().as_raw()).unwrap();
    store.secrets.insert(
        "alice".into(),
        [
            ("A".into(), "alice-a".into()),
            ("B".into(), "alice-b".into()),
        ]
        .into(),
    );
    store.save(&f.dir).unwrap();
    let ask = |names: Option<Vec<&str>>, user: &str, token: &str| RequestBody::RunSecrets {
        credential: token.into(),
        unix_user: user.into(),
        names: names.map(|n| n.into_iter().map(String::from).collect()),
    };
    // With the executor, secrets go with each spawn: a worker never holds them.
    f.on_worker(Some(ALICE));
    f.send(ask(None, "alice", &tokens.alice)).unwrap();
    assert_eq!(one_error(&mut f), refused("direct-path-only"));
    f.broker.direct_path = true;
    f.send(ask(Some(vec!["B"]), "alice", &tokens.alice))
        .unwrap();
    assert_eq!(
        one_reply(&mut f),
        (ReplyBody::Secrets(vec![("B".into(), "alice-b".into())]), 0)
    );
    // Another user's secrets, through alice's worker: not with bob's token, nor for bob.
    f.send(ask(None, "bob", &tokens.bob)).unwrap();
    assert_eq!(one_error(&mut f), refused("worker-user"));
    f.send(ask(None, "alice", &tokens.bob)).unwrap();
    assert!(matches!(
        one_error(&mut f),
        ErrorKind::Forbidden | ErrorKind::Refused { .. }
    ));
    // The audit log names what was handed, never a value.
    let audit = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"secrets_handed\""));
    assert!(!audit.contains("alice-b"));
}
