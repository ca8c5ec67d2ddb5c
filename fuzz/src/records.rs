//! The input format of `broker_requests`: byte 0 picks how the stream is split into the
//! pieces the link receives ([`crate::stream::chunk_sizes`]); the rest is a list of
//! records separated by [`SEP`], each turned into one frame on the wire, or, for `C`, into
//! something that happens between frames. A record's first byte says what it is:
//!
//! * `C`: an [`Op`] built with `arbitrary` from the rest (a child reports or exits, a new
//!   daemon link, a shutdown…);
//! * `S`: an [`ARequest`] built with `arbitrary` from the rest, encoded (even past the
//!   frame limit, which the link must refuse), on the link it picks if it picks one;
//! * `H`: four header bytes taken as they are, then the rest as they are (a lying or
//!   oversized length);
//! * anything else (`R` in the seeds): the rest is one payload, framed with its true length.
//!
//! Frames go on the link the last `C` record's [`Op::On`] picked (alice's worker's at the
//! start), unless a structured request picks its own ([`ARequest::link`]).
//!
//! A separator keeps the records apart under mutation far better than lengths would.

use arbitrary::{Arbitrary, Unstructured};

use stoa_executor::codec;

use crate::arb::{ALink, ARequest, Builder, Op};
use crate::stream::frame_of;

pub const SEP: &[u8] = b"\xA7FR\xA7";

#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Control(Op),
    Raw(&'a [u8]),
    Structured(&'a [u8]),
    Header([u8; 4], &'a [u8]),
}

/// The chunk seed and the records (`None` for an empty input).
pub fn parse(data: &[u8]) -> Option<(u8, Vec<Record<'_>>)> {
    let (&seed, mut rest) = data.split_first()?;
    let mut records = Vec::new();
    loop {
        let (piece, next) = match find(rest, SEP) {
            Some(i) => (&rest[..i], Some(&rest[i + SEP.len()..])),
            None => (rest, None),
        };
        records.push(record(piece));
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    Some((seed, records))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn record(piece: &[u8]) -> Record<'_> {
    match piece.split_first() {
        Some((b'C', rest)) => {
            Record::Control(Op::arbitrary(&mut Unstructured::new(rest)).unwrap_or(Op::Check))
        }
        Some((b'S', rest)) => Record::Structured(rest),
        Some((b'H', rest)) if rest.len() >= 4 => {
            Record::Header([rest[0], rest[1], rest[2], rest[3]], &rest[4..])
        }
        Some((_, rest)) => Record::Raw(rest),
        None => Record::Raw(&[]),
    }
}

/// The bytes the records put on the wire, in order (control records put none).
pub fn stream(records: &[Record<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&frame(r));
    }
    out
}

/// The bytes a record puts on the wire.
pub fn frame(record: &Record<'_>) -> Vec<u8> {
    frame_on(record).1
}

/// The link a record picks for itself (only a structured request may) and the bytes it
/// puts on the wire.
pub fn frame_on(record: &Record<'_>) -> (Option<ALink>, Vec<u8>) {
    match record {
        Record::Control(_) => (None, Vec::new()),
        Record::Raw(payload) => (None, frame_of(payload)),
        Record::Structured(bytes) => {
            let mut u = Unstructured::new(bytes);
            match ARequest::arbitrary(&mut u) {
                Ok(a) => {
                    let req = Builder::default().request(&a);
                    let payload = bincode::encode_to_vec(&req, codec::config())
                        .expect("a request always encodes");
                    (a.link, frame_of(&payload))
                }
                Err(_) => (None, frame_of(bytes)),
            }
        }
        Record::Header(header, rest) => {
            let mut out = header.to_vec();
            out.extend_from_slice(rest);
            (None, out)
        }
    }
}

/// An input from a chunk seed and `(kind, body)` records (for the seed corpus).
pub fn input(seed: u8, records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![seed];
    for (i, (kind, body)) in records.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SEP);
        }
        out.push(*kind);
        out.extend_from_slice(body);
    }
    out
}
