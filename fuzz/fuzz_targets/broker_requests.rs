//! The broker's request handling, as far as it runs without root (see `stoa_fuzz::model`):
//! a stream of frames (`stoa_fuzz::records`: raw payloads, structured requests, lying
//! headers) arrives in pieces through the broker's real `Link` on a socketpair; every
//! payload goes through decode → request id → permit table (Hello first and once) → for
//! spawns `spawn::validate`, the env deny-list, the execve environment and the executor's
//! job. After a violation the link is dropped: nothing more is processed.
//!
//! Invariants (asserted in the model): no request is permitted before Hello, a second
//! Hello is refused, Hello is accepted at most once; whatever validation accepts respects
//! every limit in `wire::limits` and has no NUL (or `=` in a name) where it reaches execve;
//! identity variables cannot be overridden; nothing is dropped from the environment; the
//! job fits in a frame and the executor decodes exactly what the broker checked; a secret
//! name the broker would store is a valid environment variable name.
#![no_main]

use libfuzzer_sys::fuzz_target;

use stoa::broker::permit::LinkState;
use stoa_fuzz::model::{Model, Outcome};
use stoa_fuzz::records;
use stoa_fuzz::stream::run_link;

fuzz_target!(|data: &[u8]| {
    let Some((seed, recs)) = records::parse(data) else {
        return;
    };
    let stream = records::stream(&recs);
    let mut model = Model::new();
    let mut welcomed_at = None;
    let mut steps = 0usize;
    let run = run_link(&stream, seed, |batch| {
        for payload in batch {
            let before = model.state;
            let outcome = model.step(payload);
            steps += 1;
            match &outcome {
                Outcome::Welcomed => {
                    assert_eq!(before, LinkState::Fresh);
                    assert!(welcomed_at.is_none());
                    welcomed_at = Some(steps);
                }
                Outcome::SpawnAccepted | Outcome::SpawnRefused(_) | Outcome::Answered => {
                    assert_eq!(before, LinkState::Ready, "{outcome:?} before Hello");
                }
                Outcome::Violation(_) => {}
            }
            if model.dead.is_some() {
                // The broker drops the link: the rest of this batch and everything after
                // it is never looked at.
                return false;
            }
        }
        true
    });
    assert_eq!(model.state == LinkState::Ready, welcomed_at.is_some());
    assert_eq!(model.hellos as usize, usize::from(welcomed_at.is_some()));
    if run.error.is_some() {
        assert!(
            model.dead.is_none(),
            "the link kept going after the model died"
        );
    }
    if welcomed_at.is_none() {
        // Without an accepted Hello, only a Hello (with the wrong protocol) got past permit.
        assert_eq!(
            model.permitted, model.permitted_hellos,
            "requests permitted without a Hello"
        );
        assert!(model.permitted_hellos <= 1);
    }
});
