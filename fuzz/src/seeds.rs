//! Real frames for the seed corpora (written by `examples/gen_seeds.rs`).

use stoa::wire::{
    limits, Handle, Program, Request, RequestBody, Signal, SpawnRequest, WindowSize,
    PROTOCOL_VERSION,
};
use stoa_executor::codec::{self, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::{Job, Report};

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
        credential: "stoa_0123456789abcdef".into(),
        unix_user: "alice".into(),
        program: Program::Exec {
            argv: vec!["claude".into(), "-p".into(), "--output-format=json".into()],
        },
        cwd: Some("/home/alice/src".into()),
        env: vec![
            ("FOO".into(), "bar".into()),
            ("LANG".into(), "en_US.UTF-8".into()),
        ],
        tty: None,
        stdin: true,
        secrets: true,
    }
}

pub fn spawn_shell() -> SpawnRequest {
    SpawnRequest {
        credential: "stoa_0123456789abcdef".into(),
        unix_user: "bob".into(),
        program: Program::Shell,
        cwd: None,
        env: Vec::new(),
        tty: Some(WindowSize { rows: 24, cols: 80 }),
        stdin: false,
        secrets: false,
    }
}

/// A spawn right at every limit (accepted by `validate`; about 170 KiB, too big for a seed
/// with the targets' `-max_len`, so `tests/model.rs` uses it).
pub fn spawn_at_limits() -> SpawnRequest {
    let arg = "a".repeat(limits::MAX_ARGV_BYTES / limits::MAX_ARGS - 1);
    let value_len = limits::MAX_ENV_BYTES / limits::MAX_ENV_VARS - 2 - 3;
    SpawnRequest {
        credential: "c".repeat(limits::MAX_CREDENTIAL_BYTES),
        unix_user: "u".repeat(limits::MAX_NAME_BYTES),
        program: Program::Exec {
            argv: vec![arg; limits::MAX_ARGS],
        },
        cwd: Some(format!("/{}", "d".repeat(limits::MAX_PATH_BYTES - 1))),
        env: (0..limits::MAX_ENV_VARS)
            .map(|i| (format!("V{i:02}"), "v".repeat(value_len)))
            .collect(),
        tty: Some(WindowSize {
            rows: limits::MAX_TTY_DIMENSION,
            cols: limits::MAX_TTY_DIMENSION,
        }),
        stdin: false,
        secrets: false,
    }
}

/// A whole well-behaved session, in order (Kill/Release/Adopt name a handle the broker
/// never issued, so they end a session in the model: they come last).
pub fn session() -> Vec<Request> {
    let cred = || "stoa_0123456789abcdef".to_string();
    let bodies = vec![
        RequestBody::Hello {
            protocol: PROTOCOL_VERSION,
        },
        RequestBody::Ready,
        RequestBody::Authenticate { credential: cred() },
        RequestBody::Spawn(spawn_exec()),
        RequestBody::Spawn(spawn_shell()),
        RequestBody::CheckDir {
            credential: cred(),
            unix_user: "alice".into(),
            path: "/home/alice/src".into(),
        },
        RequestBody::SetSecret {
            credential: cred(),
            name: "ANTHROPIC_API_KEY".into(),
            value: "sk-ant-xxx".into(),
        },
        RequestBody::ListSecrets { credential: cred() },
        RequestBody::DeleteSecret {
            credential: cred(),
            name: "ANTHROPIC_API_KEY".into(),
        },
        RequestBody::ListHandles,
        RequestBody::Stats,
        RequestBody::Kill {
            handle: Handle(1),
            signal: Signal::Term,
        },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let request_id = (i % 2 == 0).then(|| format!("req-{i}"));
            request(i as u64 + 1, request_id, body)
        })
        .collect()
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
    let session: Vec<Vec<u8>> = session().iter().map(enc).collect();
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
    vec![
        ("session", records::input(0, &raw(&session()))),
        ("session-bytewise", records::input(1, &raw(&session()))),
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
