//! Real frames for the seed corpora (written by `examples/gen_seeds.rs`).

use stoa::wire::{
    limits, DirId, Handle, Program, Purpose, Request, RequestBody, Signal, SpawnRequest,
    WindowSize, PROTOCOL_VERSION,
};
use stoa_executor::codec::{self, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::{Job, Report};

use crate::arb::{AChild, ALink, AStatus, Op};
use crate::harness::{ADMIN_TOKEN, API_USERS};
use crate::records;
use crate::request;

pub fn hello() -> Request {
    request(
        1,
        None,
        RequestBody::Hello {
            protocol: PROTOCOL_VERSION,
        },
    )
}

pub fn spawn_exec() -> SpawnRequest {
    SpawnRequest {
        credential: ADMIN_TOKEN.into(),
        unix_user: "alice".into(),
        program: Program::Exec {
            argv: vec!["claude".into(), "-p".into(), "--output-format=json".into()],
        },
        cwd: Some("/home/alice/src".into()),
        cwd_id: Some(DirId {
            dev: 1,
            ino: 2,
            uid: 2001,
        }),
        env: vec![
            ("FOO".into(), "bar".into()),
            ("LANG".into(), "en_US.UTF-8".into()),
        ],
        tty: None,
        ring_bytes: 0,
        purpose: Purpose::Agent,
        stdin: true,
        keep_stdin: false,
        secrets: true,
        secret_names: None,
    }
}

/// A shell for bob, by the admin API user `ops`.
pub fn spawn_shell() -> SpawnRequest {
    SpawnRequest {
        credential: API_USERS[1].token.into(),
        unix_user: "bob".into(),
        program: Program::Shell,
        cwd: None,
        cwd_id: None,
        env: Vec::new(),
        tty: Some(WindowSize { rows: 24, cols: 80 }),
        ring_bytes: 1 << 20,
        purpose: Purpose::Agent,
        stdin: false,
        keep_stdin: false,
        secrets: false,
        secret_names: None,
    }
}

/// A spawn right at every limit (accepted by `validate`; about 170 KiB, too big for a seed
/// with the targets' `-max_len`, so `tests/harness.rs` uses it), for alice (on her worker).
pub fn spawn_at_limits() -> SpawnRequest {
    let arg = "a".repeat(limits::MAX_ARGV_BYTES / limits::MAX_ARGS - 1);
    let value_len = limits::MAX_ENV_BYTES / limits::MAX_ENV_VARS - 2 - 3;
    SpawnRequest {
        credential: ADMIN_TOKEN.into(),
        unix_user: "alice".into(),
        program: Program::Exec {
            argv: vec![arg; limits::MAX_ARGS],
        },
        cwd: Some(format!("/{}", "d".repeat(limits::MAX_PATH_BYTES - 1))),
        cwd_id: None,
        env: (0..limits::MAX_ENV_VARS)
            .map(|i| (format!("V{i:02}"), "v".repeat(value_len)))
            .collect(),
        tty: Some(WindowSize {
            rows: limits::MAX_TTY_DIMENSION,
            cols: limits::MAX_TTY_DIMENSION,
        }),
        ring_bytes: limits::MAX_RING_BYTES,
        purpose: Purpose::Agent,
        stdin: false,
        keep_stdin: false,
        secrets: false,
        secret_names: None,
    }
}

/// One step of a scripted session: a request on the link, or something between frames.
#[derive(Debug, Clone)]
pub enum Step {
    Req(Request),
    Op(Op),
}

/// A whole well-behaved session, in order, each request on the link it belongs to: the
/// front authenticates and opens a connection to alice's worker; the workers pin a
/// directory, set secrets, spawn (answered once their children report), signal, adopt;
/// an exit, a release, alice's worker retires, the front lists everything. Every request
/// is answered and none is a violation.
pub fn session() -> Vec<Step> {
    let alice = || API_USERS[0].token.to_string();
    let hello = || {
        Ok(RequestBody::Hello {
            protocol: PROTOCOL_VERSION,
        })
    };
    let steps = vec![
        Err(Op::On(ALink::Front)),
        hello(),
        Ok(RequestBody::Ready),
        Ok(RequestBody::Authenticate {
            credential: alice(),
            peer: Some("192.0.2.7:50000".into()),
        }),
        Ok(RequestBody::OpenWorker {
            credential: alice(),
            unix_user: "alice".into(),
            start: true,
        }),
        Err(Op::On(ALink::Alice)),
        hello(),
        Ok(RequestBody::Ready),
        Ok(RequestBody::SetSecret {
            credential: alice(),
            name: "ANTHROPIC_API_KEY".into(),
            value: "sk-ant-xxx".into(),
        }),
        Ok(RequestBody::CheckDir {
            credential: alice(),
            unix_user: "alice".into(),
            path: "/home/alice/src".into(),
        }),
        Err(Op::Check),
        Ok(RequestBody::Spawn(spawn_exec())),
        Err(Op::On(ALink::Bob)),
        hello(),
        Ok(RequestBody::Spawn(spawn_shell())),
        Err(Op::Check),
        Err(Op::On(ALink::Alice)),
        Ok(RequestBody::ListSecrets {
            credential: alice(),
        }),
        Ok(RequestBody::ListHandles { after: None }),
        Ok(RequestBody::Stats),
        Ok(RequestBody::Kill {
            handle: Handle(1),
            signal: Signal::Term,
        }),
        Err(Op::On(ALink::Bob)),
        Ok(RequestBody::Adopt { handle: Handle(2) }),
        // Alice's executor (the probe is child 0): the Exited goes to her worker.
        Err(Op::Exit {
            child: 1,
            status: AStatus::Signal(15),
        }),
        Err(Op::On(ALink::Alice)),
        Ok(RequestBody::Release { handle: Handle(1) }),
        Ok(RequestBody::DeleteSecret {
            credential: alice(),
            name: "ANTHROPIC_API_KEY".into(),
        }),
        Ok(RequestBody::Retire),
        Err(Op::On(ALink::Front)),
        Ok(RequestBody::ListAll {
            credential: ADMIN_TOKEN.into(),
            after: None,
        }),
    ];
    let mut id = 0;
    steps
        .into_iter()
        .map(|s| match s {
            Ok(body) => {
                id += 1;
                let request_id = (id % 2 == 0).then(|| format!("req-{id}"));
                Step::Req(request(id, request_id, body))
            }
            Err(op) => Step::Op(op),
        })
        .collect()
}

/// The requests of [`session`] alone (on whichever link).
pub fn session_requests() -> Vec<Request> {
    session()
        .into_iter()
        .filter_map(|s| match s {
            Step::Req(r) => Some(r),
            Step::Op(_) => None,
        })
        .collect()
}

/// The bytes `arbitrary` turns into `op` (a `C` record's body): an enum's variant `i` of
/// `n` is the u32 `ceil(i * 2^32 / n)`, integers are little-endian.
pub fn op_bytes(op: Op) -> Vec<u8> {
    fn variant(out: &mut Vec<u8>, i: u64, n: u64) {
        out.extend_from_slice(&(((i << 32).div_ceil(n)) as u32).to_le_bytes());
    }
    let link = |at: ALink| {
        let mut f = Vec::new();
        variant(&mut f, at as u64, 3);
        f
    };
    let mut out = Vec::new();
    let (i, fields): (u64, Vec<u8>) = match op {
        Op::Check => (0, vec![]),
        Op::Children(c) => {
            let mut f = Vec::new();
            match c {
                AChild::Execs => variant(&mut f, 0, 4),
                AChild::Hangs => variant(&mut f, 1, 4),
                AChild::Fails { stage, errno } => {
                    variant(&mut f, 2, 4);
                    f.push(stage);
                    f.extend_from_slice(&errno.to_le_bytes());
                }
                AChild::Dir => variant(&mut f, 3, 4),
            }
            (1, f)
        }
        Op::Exit { child, status } => {
            let mut f = vec![child];
            let (v, n) = match status {
                AStatus::Code(c) => (0, c),
                AStatus::Signal(s) => (1, s),
            };
            variant(&mut f, v, 2);
            f.extend_from_slice(&n.to_le_bytes());
            (2, f)
        }
        Op::StrayExit(n) => (3, n.to_le_bytes().to_vec()),
        Op::Gone(c) => (4, vec![c]),
        Op::Expire => (5, vec![]),
        Op::NewLink(at) => (6, link(at)),
        Op::Shutdown => (7, vec![]),
        Op::SignalAll { kill } => (8, vec![u8::from(kill)]),
        Op::Revoke(i) => (9, vec![i]),
        Op::On(at) => (10, link(at)),
        Op::Close(at) => (11, link(at)),
    };
    variant(&mut out, i, 12);
    out.extend_from_slice(&fields);
    out
}

/// The known finding: a spawn whose worker goes before its child's exec is read, and
/// the child is reaped before the loop reads it; the broker signals the reaped pid's group.
pub fn orphan_reaped() -> Vec<Step> {
    vec![
        Step::Req(hello()),
        Step::Req(request(2, None, RequestBody::Spawn(spawn_exec()))),
        Step::Op(Op::NewLink(ALink::Alice)),
        Step::Op(Op::Exit {
            child: 0,
            status: AStatus::Code(0),
        }),
    ]
}

/// Nine live executors with 128 KiB argvs, then `ListHandles` (a regression: the reply
/// once held them all and did not fit in a frame; now it comes a page at a time).
pub fn long_listing() -> Vec<Step> {
    let mut steps = vec![Step::Req(hello())];
    for i in 0..9 {
        let mut req = spawn_exec();
        req.secrets = false;
        req.program = Program::Exec {
            argv: vec!["x".repeat(limits::MAX_ARG_BYTES - 1); 8],
        };
        steps.push(Step::Req(request(10 + i, None, RequestBody::Spawn(req))));
        steps.push(Step::Op(Op::Check));
    }
    steps.push(Step::Req(request(
        99,
        None,
        RequestBody::ListHandles { after: None },
    )));
    steps
}

/// A `broker_requests` input of `steps`, requests as raw payloads.
pub fn input_of(seed: u8, steps: &[Step]) -> Vec<u8> {
    let recs: Vec<(u8, Vec<u8>)> = steps
        .iter()
        .map(|s| match s {
            Step::Req(r) => (b'R', payload(r)),
            Step::Op(op) => (b'C', op_bytes(*op)),
        })
        .collect();
    records::input(seed, &recs)
}

fn enc<T: bincode::Encode>(msg: &T) -> Vec<u8> {
    codec::encode(msg).expect("seed encodes")
}

fn payload<T: bincode::Encode>(msg: &T) -> Vec<u8> {
    enc(msg)[HEADER_LEN..].to_vec()
}

/// `frame_decoder` seeds: a chunk seed byte, then a stream of frames.
pub fn frame_decoder() -> Vec<(&'static str, Vec<u8>)> {
    let stream = |frames: &[Vec<u8>]| frames.concat();
    let session: Vec<Vec<u8>> = session_requests().iter().map(enc).collect();
    let job_exec = enc(&Job::Exec {
        argv: vec!["claude".into(), "-p".into()],
        env: vec![("ANTHROPIC_API_KEY".into(), "sk-ant-xxx".into())],
    });
    let report = enc(&Report::ExecFailed {
        program: "claude".into(),
        error: "No such file or directory (os error 2)".into(),
    });
    let mut trailing = enc(&hello());
    trailing.push(0);
    let len = (trailing.len() - HEADER_LEN) as u32;
    trailing[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    let mut out = vec![
        ("session-whole", [vec![0], stream(&session)].concat()),
        ("session-bytewise", [vec![1], stream(&session)].concat()),
        ("session-random", [vec![7], stream(&session)].concat()),
        (
            "session-interrupted",
            [vec![0x85], stream(&session)].concat(),
        ),
        (
            "job-exec-shell-report",
            [
                vec![3],
                job_exec,
                enc(&Job::Shell),
                report,
                enc(&request(9, None, RequestBody::Spawn(spawn_exec()))),
            ]
            .concat(),
        ),
        ("trailing-byte", [vec![2], trailing].concat()),
    ];
    // A header just over the limit, then a little body; and one at the limit, unfinished.
    let over = (MAX_FRAME as u32 + 1).to_be_bytes();
    let at = (MAX_FRAME as u32).to_be_bytes();
    out.push((
        "oversized-header",
        [vec![5], enc(&hello()), over.to_vec(), vec![0; 16]].concat(),
    ));
    out.push((
        "partial-at-limit",
        [vec![4], at.to_vec(), vec![0; 32]].concat(),
    ));
    out
}

/// `broker_requests` seeds: see [`records`].
pub fn broker_requests() -> Vec<(&'static str, Vec<u8>)> {
    let raw = |reqs: &[Request]| -> Vec<(u8, Vec<u8>)> {
        reqs.iter().map(|r| (b'R', payload(r))).collect()
    };
    let spawn = |s: SpawnRequest| request(2, Some("abc".into()), RequestBody::Spawn(s));
    let hello_step = || Step::Req(hello());
    let req = |id: u64, body: RequestBody| Step::Req(request(id, None, body));
    let spawn_step = |id: u64| req(id, RequestBody::Spawn(spawn_exec()));
    let on = |at: ALink| Step::Op(Op::On(at));
    vec![
        ("session", input_of(0, &session())),
        ("regression-orphan-reaped", input_of(0, &orphan_reaped())),
        ("session-bytewise", input_of(1, &session())),
        ("session-random", input_of(7, &session())),
        (
            "hangs-then-deadline",
            input_of(
                4,
                &[
                    Step::Op(Op::Children(AChild::Hangs)),
                    hello_step(),
                    spawn_step(2),
                    Step::Op(Op::Check),
                    Step::Op(Op::Expire),
                ],
            ),
        ),
        (
            "exec-fails",
            input_of(
                5,
                &[
                    Step::Op(Op::Children(AChild::Fails {
                        stage: 17,
                        errno: 2,
                    })),
                    hello_step(),
                    spawn_step(2),
                    Step::Op(Op::Check),
                ],
            ),
        ),
        (
            "daemon-restart",
            input_of(
                0,
                &[
                    hello_step(),
                    spawn_step(2),
                    Step::Op(Op::Check),
                    Step::Op(Op::NewLink(ALink::Alice)),
                    hello_step(),
                    req(2, RequestBody::ListHandles { after: None }),
                    req(3, RequestBody::Adopt { handle: Handle(1) }),
                    Step::Op(Op::Exit {
                        child: 0,
                        status: AStatus::Code(0),
                    }),
                    req(4, RequestBody::Release { handle: Handle(1) }),
                ],
            ),
        ),
        (
            "revoked-then-shutdown",
            input_of(
                3,
                &[
                    hello_step(),
                    Step::Op(Op::Revoke(0)),
                    req(
                        2,
                        RequestBody::ListSecrets {
                            credential: API_USERS[0].token.into(),
                        },
                    ),
                    Step::Op(Op::Shutdown),
                    spawn_step(3),
                    Step::Op(Op::SignalAll { kill: true }),
                ],
            ),
        ),
        (
            "front",
            input_of(
                2,
                &[
                    on(ALink::Front),
                    hello_step(),
                    req(
                        2,
                        RequestBody::Authenticate {
                            credential: API_USERS[1].token.into(),
                            peer: None,
                        },
                    ),
                    req(
                        3,
                        RequestBody::OpenWorker {
                            credential: API_USERS[1].token.into(),
                            unix_user: "alice".into(),
                            start: false,
                        },
                    ),
                    req(
                        4,
                        RequestBody::OpenWorkerAnonymous {
                            unix_user: "bob".into(),
                        },
                    ),
                    req(
                        5,
                        RequestBody::ListAll {
                            credential: API_USERS[0].token.into(),
                            after: None,
                        },
                    ),
                    req(
                        6,
                        RequestBody::ListAll {
                            credential: API_USERS[1].token.into(),
                            after: None,
                        },
                    ),
                    // Not the front's to ask: the link is dropped.
                    spawn_step(7),
                    Step::Op(Op::NewLink(ALink::Front)),
                    hello_step(),
                ],
            ),
        ),
        (
            "other-users-worker",
            input_of(
                0,
                &[
                    on(ALink::Bob),
                    hello_step(),
                    req(2, RequestBody::Spawn(spawn_shell())),
                    Step::Op(Op::Check),
                    on(ALink::Alice),
                    hello_step(),
                    req(
                        2,
                        RequestBody::Spawn(SpawnRequest {
                            unix_user: "bob".into(),
                            ..spawn_exec()
                        }),
                    ),
                    req(
                        3,
                        RequestBody::CheckDir {
                            credential: ADMIN_TOKEN.into(),
                            unix_user: "bob".into(),
                            path: "/home/bob".into(),
                        },
                    ),
                    req(
                        4,
                        RequestBody::Kill {
                            handle: Handle(1),
                            signal: Signal::Kill,
                        },
                    ),
                ],
            ),
        ),
        (
            "worker-retires",
            input_of(
                0,
                &[
                    hello_step(),
                    spawn_step(2),
                    Step::Op(Op::Check),
                    req(3, RequestBody::Retire),
                    req(4, RequestBody::Release { handle: Handle(1) }),
                    req(5, RequestBody::Retire),
                    on(ALink::Front),
                    hello_step(),
                    req(
                        2,
                        RequestBody::OpenWorkerAnonymous {
                            unix_user: "alice".into(),
                        },
                    ),
                    Step::Op(Op::Close(ALink::Alice)),
                    req(
                        3,
                        RequestBody::OpenWorker {
                            credential: API_USERS[0].token.into(),
                            unix_user: "alice".into(),
                            start: true,
                        },
                    ),
                    Step::Op(Op::NewLink(ALink::Alice)),
                    on(ALink::Alice),
                    hello_step(),
                    req(2, RequestBody::ListHandles { after: None }),
                ],
            ),
        ),
        (
            "spawn-before-hello",
            records::input(9, &raw(&[spawn(spawn_exec()), hello()])),
        ),
        ("two-hellos", records::input(3, &raw(&[hello(), hello()]))),
        (
            "old-protocol",
            records::input(
                2,
                &raw(&[request(
                    1,
                    None,
                    RequestBody::Hello {
                        protocol: PROTOCOL_VERSION.wrapping_sub(1),
                    },
                )]),
            ),
        ),
        (
            "structured",
            records::input(
                6,
                &[
                    (b'R', payload(&hello())),
                    (
                        b'S',
                        b"\x00\x00\x00\x01spawn\x03\x10\x00\x00\x40alice\x00\x30".to_vec(),
                    ),
                    (b'S', vec![0x30; 64]),
                    (b'S', vec![0xc0; 96]),
                ],
            ),
        ),
        (
            "oversized-header",
            records::input(
                0,
                &[
                    (b'R', payload(&hello())),
                    (
                        b'H',
                        [(MAX_FRAME as u32 + 1).to_be_bytes().to_vec(), vec![0; 8]].concat(),
                    ),
                ],
            ),
        ),
    ]
}
