//! The broker's real request handling without root (`stoa_fuzz::harness`): a stream of
//! frames (`stoa_fuzz::records`: raw payloads, structured requests, lying headers) arrives
//! in pieces through the broker's real `Link` on a socketpair, one per link played (the
//! front's, alice's worker's, bob's worker's); every payload is decoded and goes through
//! `broker::table::dispatch` and the real handlers, over the recording double of the OS.
//! Between frames the input picks what else happens: the link the next frames take,
//! children report, fail, hang past their deadline or exit, stray children are reaped, a
//! process goes and a new one connects, shutdown starts, API users are revoked. After a
//! violation the input stops feeding that link (the broker drops it).
//!
//! Invariants (asserted in the harness after every step, listed at the top of
//! `src/harness.rs`): nothing before Hello; each link asks only what its kind may, a
//! worker for its own user only; a launch only for a valid spawn within every limit, with
//! no denied variable, for a user the policy allows, by a credential that may act as them,
//! on that user's worker; nothing launched, probed or signalled by a violation; signals
//! only for a running executor not yet reaped, as its owner; connections only for a
//! credential that may act as the user; every message sendable; every reply answers a
//! request sent on its link, exactly once; events only to live, welcomed links (`Exited`
//! to the handle's user's worker only); audit lines at most 2 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;

use stoa_fuzz::harness::Harness;
use stoa_fuzz::records;

fuzz_target!(|data: &[u8]| {
    let Some((seed, recs)) = records::parse(data) else {
        return;
    };
    Harness::new().run(seed, &recs);
});
