//! The frame decoder (`executor/src/codec.rs`) on arbitrary bytes.
//!
//! Input: byte 0 picks how the stream is split into pieces (`stream::chunk_sizes`; bit 7
//! also makes the blocking reader answer `Interrupted` now and then), the rest is the
//! stream. Checked, against an independent reference framer:
//!
//! * every complete payload, decoded as each message a stoa channel carries (`Request`,
//!   the executor's `Job` and `Report`, `BrokerMessage`): no panic; a value that decodes
//!   re-encodes to a frame no longer than the original that decodes to an equal value;
//!   errors are the right kind; no single allocation above `MAX_FRAME`, and for `Request`
//!   and `Job` no more memory held at once than the limit plus a multiple of the payload;
//! * `codec::read_frame` on the stream arriving in pieces: the same results, frame by
//!   frame, then the right end (EOF, truncated, too large) without allocating a declared
//!   length above the limit;
//! * the broker's `Link` (non-blocking, fed through a socketpair piece by piece): exactly
//!   the reference payloads, in order; an oversized header is a violation on the very read
//!   that completes it, and no allocation grows with a declared length, only with the
//!   bytes that arrived; a violation stays one; an unfinished frame leaves the partial-frame
//!   deadline set.
#![no_main]

use std::fmt::Debug;
use std::io;

use bincode::{Decode, Encode};
use libfuzzer_sys::fuzz_target;

use stoa::wire::{BrokerMessage, Request};
use stoa_executor::codec::{self, FrameError, HEADER_LEN, MAX_FRAME};
use stoa_executor::job::{Job, Report};
use stoa_fuzz::alloc;
use stoa_fuzz::stream::{reference_frames, run_link, ChunkedReader, End, Framed};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let framed = reference_frames(stream);
    for payload in &framed.payloads {
        payload_as_every_message(payload);
    }
    if framed.payloads.is_empty() {
        // No frame structure: still decode the bytes themselves as a payload.
        payload_as_every_message(stream);
    }
    blocking_reader(stream, seed, &framed);
    broker_link(stream, seed, &framed);
});

fn payload_as_every_message(payload: &[u8]) {
    // Memory held at once: the limit, plus what decoded containers may keep (each element
    // needs at least one payload byte; 64 bytes is above any element's size).
    let bound = MAX_FRAME + 64 * payload.len() + 4096;
    round_trip::<Request>(payload, Some(bound));
    round_trip::<Job>(payload, Some(bound));
    round_trip::<Report>(payload, Some(bound));
    round_trip::<BrokerMessage>(payload, None);
}

fn round_trip<T: Encode + Decode<()> + PartialEq + Debug>(payload: &[u8], peak: Option<usize>) {
    let (decoded, usage) = alloc::measure(|| codec::decode::<T>(payload));
    assert!(
        usage.largest <= MAX_FRAME,
        "decoding {} bytes allocated {} at once",
        payload.len(),
        usage.largest
    );
    if let Some(bound) = peak {
        assert!(
            usage.peak <= bound,
            "decoding {} bytes held {} bytes",
            payload.len(),
            usage.peak
        );
    }
    match decoded {
        Ok(value) => {
            let frame = codec::encode(&value).expect("a decoded message re-encodes");
            let len = codec::payload_len(frame[..HEADER_LEN].try_into().unwrap())
                .expect("a re-encoded header is within the limit");
            assert_eq!(len, frame.len() - HEADER_LEN);
            assert!(
                len <= payload.len(),
                "re-encoding grew {} -> {len} bytes",
                payload.len()
            );
            let again: T = codec::decode(&frame[HEADER_LEN..]).expect("re-encoded payload");
            assert_eq!(again, value);
            let read: T = codec::read_frame(&mut &frame[..]).expect("re-encoded frame");
            assert_eq!(read, value);
        }
        Err(FrameError::Decode(_)) => {}
        Err(FrameError::Trailing { used, len }) => {
            assert_eq!(len, payload.len());
            assert!(used < len);
        }
        Err(FrameError::TooLarge(n)) => {
            assert!(payload.len() > MAX_FRAME && n == payload.len());
        }
        Err(e) => panic!("decode gave {e:?}"),
    }
}

fn blocking_reader(stream: &[u8], seed: u8, framed: &Framed<'_>) {
    let mut reader = ChunkedReader::new(stream, seed);
    for payload in &framed.payloads {
        let (got, usage) = alloc::measure(|| codec::read_frame::<_, Request>(&mut reader));
        assert!(usage.largest <= MAX_FRAME);
        match (got, codec::decode::<Request>(payload)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(FrameError::Decode(_)), Err(FrameError::Decode(_))) => {}
            (
                Err(FrameError::Trailing { used: a, len: l }),
                Err(FrameError::Trailing { used, len }),
            ) => {
                assert_eq!((a, l), (used, len))
            }
            (got, want) => panic!("read_frame gave {got:?}, decode {want:?}"),
        }
    }
    let (last, usage) = alloc::measure(|| codec::read_frame::<_, Request>(&mut reader));
    match (framed.end, last) {
        (End::Clean, Err(FrameError::Eof)) => {}
        (End::Partial(_), Err(FrameError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        (End::TooLarge { len, .. }, Err(FrameError::TooLarge(n))) => {
            assert_eq!(n, len);
            assert!(
                usage.largest < 4096,
                "a {len}-byte header made read_frame allocate {}",
                usage.largest
            );
        }
        (end, last) => panic!("stream ends {end:?}, read_frame gave {last:?}"),
    }
}

fn broker_link(stream: &[u8], seed: u8, framed: &Framed<'_>) {
    let run = run_link(stream, seed, |_| true);
    assert!(!run.stopped);
    // Payloads are a prefix of the reference (a batch read together with a violation is
    // dropped with the link).
    assert!(run.payloads.len() <= framed.payloads.len());
    for (got, want) in run.payloads.iter().zip(&framed.payloads) {
        assert_eq!(&got[..], *want, "the link reassembled a different payload");
    }
    // Memory follows the bytes that arrived, never a declared length.
    let bound = (64 * 1024).max(2 * stream.len() + 64);
    assert!(
        run.largest_allocation <= bound,
        "{} bytes in made the link allocate {}",
        stream.len(),
        run.largest_allocation
    );
    match (framed.end, &run.error) {
        (End::TooLarge { header_end, .. }, Some((before, after, what))) => {
            assert!(what.starts_with("violation"), "{what}");
            assert!(
                *before < header_end && header_end <= *after,
                "oversized header ending at {header_end} refused after bytes {before}..{after}"
            );
        }
        (End::TooLarge { header_end, .. }, None) => {
            panic!("oversized header ending at {header_end} was never refused")
        }
        (_, Some(e)) => panic!("the link failed on a well-framed stream: {e:?}"),
        (end, None) => {
            assert_eq!(run.delivered, stream.len());
            assert_eq!(
                run.payloads.len(),
                framed.payloads.len(),
                "the link lost frames"
            );
            assert_eq!(
                run.deadline_set,
                matches!(end, End::Partial(_)),
                "partial-frame deadline vs {end:?}"
            );
        }
    }
}
