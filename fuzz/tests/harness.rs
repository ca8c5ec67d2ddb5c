//! The model and the seeds agree with what the broker is documented to do (run from fuzz/:
//! `cargo test`; the fuzz targets themselves need `cargo fuzz`).

use stoa::broker::permit::LinkState;
use stoa::wire::{limits, Program, RequestBody};
use stoa_fuzz::model::{Model, Outcome};
use stoa_fuzz::seeds;

fn spawn_outcome(req: stoa::wire::SpawnRequest) -> Outcome {
    let mut m = Model::new();
    assert_eq!(m.request(seeds::hello()), Outcome::Welcomed);
    m.request(stoa_fuzz::request(2, None, RequestBody::Spawn(req)))
}

#[test]
fn session_runs_until_the_unknown_handle() {
    let mut m = Model::new();
    let session = seeds::session();
    let n = session.len();
    for (i, req) in session.into_iter().enumerate() {
        let out = m.request(req);
        if i == n - 1 {
            assert!(matches!(out, Outcome::Violation(_)), "{out:?}");
        } else {
            assert!(!matches!(out, Outcome::Violation(_)), "{i}: {out:?}");
        }
    }
    assert_eq!(m.state, LinkState::Ready);
    assert_eq!(m.accepted_spawns, 2);
}

#[test]
fn hello_first_and_once() {
    let mut m = Model::new();
    assert!(matches!(
        m.request(seeds::session()[1].clone()),
        Outcome::Violation(_)
    ));
    let mut m = Model::new();
    m.request(seeds::hello());
    assert!(matches!(m.request(seeds::hello()), Outcome::Violation(_)));
}

#[test]
fn limits_are_exact() {
    assert_eq!(
        spawn_outcome(seeds::spawn_at_limits()),
        Outcome::SpawnAccepted
    );
    let over: [fn(&mut stoa::wire::SpawnRequest); 6] = [
        |r| r.credential.push('c'),
        |r| r.unix_user.push('u'),
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
        assert!(matches!(spawn_outcome(r), Outcome::SpawnRefused(_)));
    }
    let mut r = seeds::spawn_at_limits();
    r.env.push(("X".into(), String::new()));
    assert!(r.env.len() > limits::MAX_ENV_VARS);
    assert!(matches!(spawn_outcome(r), Outcome::SpawnRefused(_)));
}

#[test]
fn seeds_decode() {
    for (_, input) in seeds::frame_decoder() {
        assert!(!input.is_empty());
    }
    for (name, input) in seeds::broker_requests() {
        let (_, recs) = stoa_fuzz::records::parse(&input).unwrap();
        assert!(!recs.is_empty(), "{name}");
    }
}
