//! The harness drives the real broker as documented (run from fuzz/: `cargo test`; the
//! fuzz targets themselves need `cargo fuzz`): a well-behaved session is answered in full,
//! Hello comes first and once, the limits are exact to the byte, every policy rule
//! refuses, and the seeds and control records parse as meant.

use arbitrary::{Arbitrary, Unstructured};

use stoa::wire::{limits, Program, Request, RequestBody, SpawnRequest, PROTOCOL_VERSION};
use stoa_fuzz::arb::{AChild, AStatus, Op};
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

fn welcomed() -> Harness {
    let mut h = harness();
    h.request(seeds::hello()).unwrap();
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
}

#[test]
fn hello_first_and_once() {
    let mut h = harness();
    assert!(h.request(request(1, None, RequestBody::Stats)).is_err());
    let mut h = welcomed();
    assert!(h.request(seeds::hello()).is_err());
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
    let over: [fn(&mut SpawnRequest); 6] = [
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
    assert_eq!(count(&h, "Spawn -> BadRequest"), 6, "{:?}", h.tally);
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
        Op::NewLink,
        Op::Shutdown,
        Op::SignalAll { kill: true },
        Op::Revoke(1),
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
