//! The harness drives the real broker as documented (run from fuzz/: `cargo test`; the
//! fuzz targets themselves need `cargo fuzz`): a well-behaved session on the front's and
//! the workers' links is answered in full, Hello comes first and once on each link, the
//! limits are exact to the byte, every policy rule refuses, each link keeps to its rows
//! and its user, and the seeds and control records parse as meant.

use arbitrary::{Arbitrary, Unstructured};

use stoa::wire::{
    limits, Handle, Program, Request, RequestBody, Signal, SpawnRequest, PROTOCOL_VERSION,
};
use stoa_fuzz::arb::{AChild, ALink, AStatus, Op};
use stoa_fuzz::harness::{Harness, ADMIN_TOKEN, API_USERS};
use stoa_fuzz::{records, request, seeds};

fn harness() -> Harness {
    let mut h = Harness::new();
    h.tally = Some(Default::default());
    h
}

fn count(h: &Harness, key: &str) -> usize {
    h.tally.as_ref().unwrap().get(key).copied().unwrap_or(0)
}

/// Alice's worker's link welcomed (requests go there unless they say otherwise).
fn welcomed() -> Harness {
    let mut h = harness();
    h.request(seeds::hello()).unwrap();
    h
}

/// Every link welcomed; requests go to alice's worker.
fn all_welcomed() -> Harness {
    let mut h = harness();
    for at in ALink::ALL {
        h.request_on(at, seeds::hello()).unwrap();
    }
    h
}

fn spawn(id: u64, req: SpawnRequest) -> Request {
    request(id, None, RequestBody::Spawn(req))
}

/// `req` as alice with `credential`, then her child reports.
fn spawn_as(h: &mut Harness, credential: &str, user: &str) {
    let mut req = seeds::spawn_exec();
    req.credential = credential.into();
    req.unix_user = user.into();
    req.secrets = false;
    h.request(spawn(9, req)).unwrap();
    h.control(Op::Check);
}

#[test]
fn the_session_is_answered_in_full() {
    let mut h = harness();
    let input = seeds::input_of(3, &seeds::session());
    let (seed, recs) = records::parse(&input).unwrap();
    h.run(seed, &recs);
    assert_eq!(h.violations, 0, "{:?}", h.tally);
    assert_eq!(h.launches, 2);
    assert_eq!(count(&h, "Spawn -> Spawned"), 2, "{:?}", h.tally);
    assert_eq!(count(&h, "CheckDir -> Dir"), 1);
    assert_eq!(count(&h, "Kill -> Done"), 1);
    assert_eq!(count(&h, "Adopt -> Adopted"), 1);
    assert_eq!(count(&h, "Release -> Done"), 1);
    assert_eq!(count(&h, "SetSecret -> Done"), 1);
    assert_eq!(count(&h, "DeleteSecret -> Done"), 1);
    assert_eq!(count(&h, "OpenWorker -> Connection"), 1);
    assert_eq!(count(&h, "Retire -> Done"), 1);
    assert_eq!(
        count(&h, "ListAll -> Handles(1, more: false)"),
        1,
        "{:?}",
        h.tally
    );
}

#[test]
fn hello_first_and_once() {
    let mut h = harness();
    assert!(h.request(request(1, None, RequestBody::Stats)).is_err());
    let mut h = welcomed();
    assert!(h.request(seeds::hello()).is_err());
    // Each link has its own conversation.
    assert!(h
        .request_on(ALink::Front, request(1, None, RequestBody::Stats))
        .is_err());
    h.request_on(ALink::Front, seeds::hello()).unwrap();
    assert!(h.request_on(ALink::Front, seeds::hello()).is_err());
    let mut h = harness();
    let old = RequestBody::Hello {
        protocol: PROTOCOL_VERSION - 1,
    };
    assert!(h.request(request(1, None, old)).is_err());
}

#[test]
fn limits_are_exact() {
    let mut h = welcomed();
    h.request(spawn(2, seeds::spawn_at_limits())).unwrap();
    h.control(Op::Check);
    assert_eq!(h.launches, 1, "{:?}", h.tally);
    let over: [fn(&mut SpawnRequest); 8] = [
        |r| r.credential.push('c'),
        |r| r.unix_user = "u".repeat(limits::MAX_NAME_BYTES + 1),
        |r| {
            if let Program::Exec { argv } = &mut r.program {
                argv[1].push('a')
            }
        },
        |r| r.cwd.as_mut().unwrap().push('d'),
        |r| r.env[0].1.push('v'),
        |r| r.tty.as_mut().unwrap().rows += 1,
        |r| r.ring_bytes += 1,
        |r| r.ring_bytes = limits::MIN_RING_BYTES - 1,
    ];
    for f in over {
        let mut r = seeds::spawn_at_limits();
        f(&mut r);
        h.request(spawn(3, r)).unwrap();
    }
    let mut r = seeds::spawn_at_limits();
    r.env.push(("X".into(), String::new()));
    assert!(r.env.len() > limits::MAX_ENV_VARS);
    h.request(spawn(4, r)).unwrap();
    h.finish();
    assert_eq!(h.launches, 1, "{:?}", h.tally);
    // The long credential is no credential at all; the rest are malformed.
    assert_eq!(count(&h, "Spawn -> Unauthorized"), 1, "{:?}", h.tally);
    assert_eq!(count(&h, "Spawn -> BadRequest"), 8, "{:?}", h.tally);
}

#[test]
fn every_policy_rule_refuses() {
    let mut h = welcomed();
    for (user, rule) in [
        ("root", "root"),
        ("stoa", "service-user"),
        ("svcgrp", "service-user"),
        ("lp", "allow-group"),
        ("wheel", "root-group"),
        ("nosuch", "unknown-user"),
    ] {
        let key = format!("Spawn -> Refused({rule})");
        let before = count(&h, &key);
        spawn_as(&mut h, ADMIN_TOKEN, user);
        assert_eq!(count(&h, &key), before + 1, "{user}");
    }
    // An API user acts as its own Unix user only, unless it is an admin.
    spawn_as(&mut h, API_USERS[0].token, "bob");
    assert_eq!(count(&h, "Spawn -> Forbidden"), 1);
    spawn_as(&mut h, API_USERS[1].token, "alice");
    let mut env = seeds::spawn_exec();
    env.env.push(("LD_PRELOAD".into(), "/tmp/x.so".into()));
    h.request(spawn(10, env)).unwrap();
    assert_eq!(count(&h, "Spawn -> Refused(env-deny)"), 1);
    h.control(Op::Revoke(0));
    spawn_as(&mut h, API_USERS[0].token, "alice");
    assert_eq!(count(&h, "Spawn -> Unauthorized"), 1);
    h.finish();
    assert_eq!(h.launches, 1, "{:?}", h.tally);
}

#[test]
fn control_records_parse_as_meant() {
    let ops = [
        Op::Check,
        Op::Children(AChild::Execs),
        Op::Children(AChild::Hangs),
        Op::Children(AChild::Fails {
            stage: 17,
            errno: -3,
        }),
        Op::Children(AChild::Dir),
        Op::Exit {
            child: 3,
            status: AStatus::Code(7),
        },
        Op::Exit {
            child: 0,
            status: AStatus::Signal(9),
        },
        Op::StrayExit(513),
        Op::Gone(2),
        Op::Expire,
        Op::NewLink(ALink::Front),
        Op::NewLink(ALink::Bob),
        Op::Shutdown,
        Op::SignalAll { kill: true },
        Op::Revoke(1),
        Op::On(ALink::Front),
        Op::On(ALink::Alice),
        Op::On(ALink::Bob),
        Op::Close(ALink::Alice),
    ];
    for op in ops {
        let bytes = seeds::op_bytes(op);
        assert_eq!(Op::arbitrary(&mut Unstructured::new(&bytes)).unwrap(), op);
    }
}

#[test]
fn seeds_parse_and_run() {
    for (_, input) in seeds::frame_decoder() {
        assert!(!input.is_empty());
    }
    for (name, input) in seeds::broker_requests() {
        let (seed, recs) = records::parse(&input).unwrap();
        assert!(!recs.is_empty(), "{name}");
        harness().run(seed, &recs);
    }
}

/// A regression (found by this harness): reaping the child of a spawn whose daemon is
/// gone, before its exec report was read, made `launch::finish` signal the group of the
/// pid just reaped. The harness's invariant (no signal after the reap) now holds.
#[test]
fn a_reaped_orphan_is_not_signalled() {
    for check_first in [false, true] {
        let mut h = harness();
        let mut steps = seeds::orphan_reaped();
        if check_first {
            steps.insert(3, seeds::Step::Op(Op::Check));
        }
        let input = seeds::input_of(0, &steps);
        let (seed, recs) = records::parse(&input).unwrap();
        h.run(seed, &recs);
    }
}

/// A regression (found by this harness): `ListHandles` carried every handle's full argv
/// in one reply, so nine executors with 128 KiB argvs made a reply the broker could not
/// send. Now a page fits in a frame (the harness asserts every message does).
#[test]
fn a_long_listing_comes_in_pages() {
    let mut h = harness();
    for step in seeds::long_listing() {
        match step {
            seeds::Step::Req(r) => h.request(r).unwrap(),
            seeds::Step::Op(op) => h.control(op),
        }
    }
    assert_eq!(h.launches, 9);
}

/// What only the front may ask is a violation on a worker's link and the other way round;
/// the harness checks every answer against its own restatement of the table.
#[test]
fn each_link_keeps_to_its_rows() {
    let admin = || ADMIN_TOKEN.to_string();
    let front_only = [
        RequestBody::Authenticate {
            credential: admin(),
            peer: None,
        },
        RequestBody::OpenWorker {
            credential: admin(),
            unix_user: "alice".into(),
            start: true,
        },
        RequestBody::OpenWorkerAnonymous {
            unix_user: "alice".into(),
        },
        RequestBody::ListAll {
            credential: admin(),
            after: None,
        },
    ];
    for body in front_only {
        let mut h = all_welcomed();
        assert!(
            h.request(request(2, None, body.clone())).is_err(),
            "{body:?}"
        );
        h.request_on(ALink::Front, request(2, None, body.clone()))
            .unwrap();
        h.finish();
    }
    let mut exec = seeds::spawn_exec();
    exec.secrets = false;
    let worker_only = [
        RequestBody::Spawn(exec),
        RequestBody::CheckDir {
            credential: admin(),
            unix_user: "alice".into(),
            path: "/home/alice".into(),
        },
        RequestBody::ListSecrets {
            credential: API_USERS[0].token.into(),
        },
        RequestBody::ListHandles { after: None },
        RequestBody::Retire,
    ];
    for body in worker_only {
        let mut h = all_welcomed();
        assert!(
            h.request_on(ALink::Front, request(2, None, body.clone()))
                .is_err(),
            "{body:?}"
        );
        h.request(request(2, None, body.clone())).unwrap();
        h.control(Op::Check);
        h.finish();
    }
}

/// Alice's worker acts for alice only: a spawn or a check as bob is refused (even with the
/// admin token), bob's handle is not hers to name; bob's worker may.
#[test]
fn a_worker_acts_for_its_own_user_only() {
    let mut h = all_welcomed();
    h.request_on(
        ALink::Bob,
        spawn(2, {
            let mut shell = seeds::spawn_shell();
            shell.credential = ADMIN_TOKEN.into();
            shell
        }),
    )
    .unwrap();
    h.control(Op::Check);
    assert_eq!(h.launches, 1);
    spawn_as(&mut h, ADMIN_TOKEN, "bob");
    spawn_as(&mut h, API_USERS[1].token, "bob");
    assert_eq!(
        count(&h, "Spawn -> Refused(worker-user)"),
        2,
        "{:?}",
        h.tally
    );
    h.request(request(
        3,
        None,
        RequestBody::CheckDir {
            credential: ADMIN_TOKEN.into(),
            unix_user: "bob".into(),
            path: "/home/bob".into(),
        },
    ))
    .unwrap();
    assert_eq!(count(&h, "CheckDir -> Refused(worker-user)"), 1);
    let kill = |id| {
        request(
            id,
            None,
            RequestBody::Kill {
                handle: Handle(1),
                signal: Signal::Term,
            },
        )
    };
    assert!(h.request(kill(4)).is_err());
    h.request_on(ALink::Bob, kill(4)).unwrap();
    assert_eq!(count(&h, "Kill -> Done"), 1);
    h.finish();
    assert_eq!(h.launches, 1, "{:?}", h.tally);
}

/// An exit goes to its user's current worker, also after a restart; a retired or closed
/// worker hears nothing (the harness asserts where each event goes, and that it goes).
#[test]
fn exits_follow_their_users_worker() {
    let mut h = all_welcomed();
    spawn_as(&mut h, ADMIN_TOKEN, "alice");
    spawn_as(&mut h, ADMIN_TOKEN, "alice");
    assert_eq!(h.launches, 2);
    // Alice's worker restarts: the new one hears the first exit once it said Hello.
    h.control(Op::NewLink(ALink::Alice));
    h.request(seeds::hello()).unwrap();
    h.control(Op::Exit {
        child: 0,
        status: AStatus::Code(0),
    });
    // Then it goes: nobody hears the second.
    h.control(Op::Close(ALink::Alice));
    h.control(Op::Exit {
        child: 0,
        status: AStatus::Code(1),
    });
    h.finish();
}

/// The dictionary's control records switch links and restart processes as named.
#[test]
fn the_dictionary_names_the_links() {
    let dict = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dicts/broker_requests.dict"
    ))
    .unwrap();
    let escaped =
        |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("\\x{b:02X}")).collect() };
    for at in ALink::ALL {
        for (what, op) in [("on", Op::On(at)), ("new_link", Op::NewLink(at))] {
            let name = format!("{what}_{at:?}").to_lowercase();
            let entry = format!("{name}=\"\\xA7FR\\xA7C{}\"", escaped(&seeds::op_bytes(op)));
            assert!(dict.lines().any(|l| l == entry), "missing: {entry}");
        }
    }
}
