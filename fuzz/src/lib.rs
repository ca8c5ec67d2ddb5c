//! What stoa's fuzz targets (`fuzz_targets/`) share:
//!
//! * [`alloc`]: a global allocator that reports the largest allocation a piece of code made,
//!   so a target can check that a declared length was refused *before* being allocated.
//! * [`stream`]: splitting a byte stream into the chunks it arrives in, an independent
//!   reference framer, and the broker's real [`stoa::broker::link::Link`] driven over a
//!   socketpair.
//! * [`harness`]: the real broker (`broker::table::dispatch` and its handlers) over the
//!   recording double of the OS, fed frames on the front's and two workers' links, child
//!   reports, exits and processes coming and going, with the invariants checked after
//!   every step.
//! * [`arb`]: structured requests (`arbitrary`) that reach the request limits with small
//!   inputs, and the control operations; [`records`]: the input format of
//!   `broker_requests`.
//! * [`seeds`]: real frames for the seed corpora (`examples/gen_seeds.rs`).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod arb;
pub mod harness;
pub mod records;
pub mod seeds;
pub mod stream;

use stoa::wire::{Request, RequestBody};

/// The one place a [`Request`] is built (the wire struct changes more often than its body).
pub fn request(id: u64, request_id: Option<String>, body: RequestBody) -> Request {
    Request {
        id,
        request_id,
        body,
    }
}
