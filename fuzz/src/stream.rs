//! Byte streams as they arrive: chunking, a reference framer, a chunked blocking reader,
//! and the broker's non-blocking [`Link`] fed through a real socketpair.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use stoa::broker::link::{Link, LinkError};
use stoa_executor::codec::{HEADER_LEN, MAX_FRAME};

use crate::alloc;

/// The largest piece written into the socketpair at once: far below the socket buffer, so
/// a blocking write never waits for the link (which is drained after every piece).
pub const MAX_CHUNK: usize = 32 * 1024;

/// A small deterministic generator (xorshift64*), seeded from the input.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// In `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next_u64() % max.max(1) as u64) as usize
    }
}

/// At most this many small pieces per stream; the rest arrives in [`MAX_CHUNK`] pieces.
/// (`Link::read_payloads` zeroes a 64 KiB buffer per call: thousands of one-byte reads
/// would make an execution take seconds.)
pub const MAX_PIECES: usize = 128;

/// How a stream of `total` bytes is split: `seed` 0 is one piece (up to [`MAX_CHUNK`]),
/// 1 is byte by byte, anything else pieces of random sizes up to a power of two the seed
/// picks (so splits inside headers are common); after [`MAX_PIECES`], big pieces.
pub fn chunk_sizes(seed: u8, total: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut left = total;
    let mut rng = Rng::new(u64::from(seed));
    let max = match seed {
        0 => MAX_CHUNK,
        1 => 1,
        s => 1usize << (s % 14),
    };
    while left > 0 {
        let max = if sizes.len() < MAX_PIECES {
            max
        } else {
            MAX_CHUNK
        };
        let n = rng.size(max).min(left).min(MAX_CHUNK);
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// How a stream ends, according to [`reference_frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte belongs to a complete frame.
    Clean,
    /// `n` (> 0) bytes of an unfinished frame (header or payload) are left.
    Partial(usize),
    /// A header announcing `len` > `MAX_FRAME` bytes ends at offset `header_end`.
    TooLarge { header_end: usize, len: usize },
}

#[derive(Debug)]
pub struct Framed<'a> {
    pub payloads: Vec<&'a [u8]>,
    pub end: End,
}

/// Splits a stream into frames without using stoa's code: a `u32` big-endian length, then
/// that many bytes; a length above `MAX_FRAME` ends the stream.
pub fn reference_frames(stream: &[u8]) -> Framed<'_> {
    let mut payloads = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.is_empty() {
            return Framed {
                payloads,
                end: End::Clean,
            };
        }
        if rest.len() < 4 {
            return Framed {
                payloads,
                end: End::Partial(rest.len()),
            };
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_FRAME {
            return Framed {
                payloads,
                end: End::TooLarge {
                    header_end: at + 4,
                    len,
                },
            };
        }
        if rest.len() < 4 + len {
            return Framed {
                payloads,
                end: End::Partial(rest.len()),
            };
        }
        payloads.push(&rest[4..4 + len]);
        at += 4 + len;
    }
}

/// A reader that hands out `data` in the given pieces (never more than one piece per
/// call), and, if `interrupt`, answers some calls with `Interrupted` first.
pub struct ChunkedReader<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
    rng: Rng,
    interrupt: bool,
}

impl<'a> ChunkedReader<'a> {
    pub fn new(data: &'a [u8], seed: u8) -> ChunkedReader<'a> {
        ChunkedReader {
            data,
            sizes: chunk_sizes(seed, data.len()),
            next: 0,
            rng: Rng::new(u64::from(seed) << 8),
            interrupt: seed & 0x80 != 0,
        }
    }
}

impl Read for ChunkedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.interrupt && self.rng.next_u64().is_multiple_of(4) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if buf.is_empty() || self.data.is_empty() {
            return Ok(0);
        }
        // The current piece, or what is left of it.
        let piece = self
            .sizes
            .get(self.next)
            .copied()
            .unwrap_or(self.data.len());
        let n = piece.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        if n == piece {
            self.next += 1;
        } else if let Some(s) = self.sizes.get_mut(self.next) {
            *s -= n;
        }
        Ok(n)
    }
}

/// What happened when a stream went through a [`Link`].
#[derive(Debug)]
pub struct LinkRun {
    /// Bytes written into the socket.
    pub delivered: usize,
    /// Every payload the link returned, in order.
    pub payloads: Vec<Vec<u8>>,
    /// The violation (or other error) that ended it, with `delivered` before and after
    /// the piece that caused it.
    pub error: Option<(usize, usize, String)>,
    /// The link's partial-frame deadline after the last read, if it ended without error.
    pub deadline_set: bool,
    /// The largest allocation any `read_payloads` call made.
    pub largest_allocation: usize,
    /// The consumer asked to stop early.
    pub stopped: bool,
}

/// How one [`Feeder::feed`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEnd {
    /// Every byte was written and read.
    Done,
    /// The consumer asked to stop (the broker drops the link).
    Stopped,
    /// The link failed (what, as the broker would log it); it is finished.
    Failed(String),
}

/// The broker's end of a daemon link ([`Link`] on a socketpair) and the daemon's end,
/// kept across several [`Feeder::feed`]s: a frame may start in one and end in the next.
pub struct Feeder {
    link: Link,
    peer: UnixStream,
    /// Bytes written into the socket so far.
    pub delivered: usize,
    /// The largest allocation any `read_payloads` call made.
    pub largest_allocation: usize,
    /// `delivered` before and after the piece that made the link fail.
    pub failed_at: Option<(usize, usize)>,
}

impl Feeder {
    pub fn new() -> Feeder {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        Feeder {
            link: Link::new(ours).expect("Link::new"),
            peer,
            delivered: 0,
            largest_allocation: 0,
            failed_at: None,
        }
    }

    /// The link's partial-frame deadline is set (a frame has started and not ended).
    pub fn deadline_set(&self) -> bool {
        self.link.deadline().is_some()
    }

    /// Writes `bytes` into the socket piece by piece (split as `seed` says) and calls the
    /// broker's `Link::read_payloads` after each piece, like the broker's poll loop would.
    /// `consume` gets each batch and returns false to drop the link (as the broker does on
    /// a violation).
    pub fn feed(
        &mut self,
        bytes: &[u8],
        seed: u8,
        mut consume: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> FeedEnd {
        assert!(self.failed_at.is_none(), "fed a failed link");
        let mut at = 0;
        for size in chunk_sizes(seed, bytes.len()) {
            self.peer
                .write_all(&bytes[at..at + size])
                .expect("write into the socketpair");
            at += size;
            let before = self.delivered;
            self.delivered += size;
            let (got, usage) = alloc::measure(|| self.link.read_payloads());
            self.largest_allocation = self.largest_allocation.max(usage.largest);
            match got {
                Ok(batch) => {
                    if !consume(&batch) {
                        return FeedEnd::Stopped;
                    }
                }
                Err(e) => {
                    let what = match &e {
                        LinkError::Violation(v) => format!("violation: {v}"),
                        other => format!("{other:?}"),
                    };
                    // A violation stays one: the link never yields payloads again.
                    let again = self.link.read_payloads();
                    assert!(
                        again.is_err(),
                        "after {what}, read_payloads succeeded: {again:?}"
                    );
                    self.failed_at = Some((before, self.delivered));
                    return FeedEnd::Failed(what);
                }
            }
        }
        FeedEnd::Done
    }
}

impl Default for Feeder {
    fn default() -> Self {
        Feeder::new()
    }
}

/// `stream` through a fresh [`Feeder`] in one go; `consume` as in [`Feeder::feed`].
pub fn run_link(stream: &[u8], seed: u8, mut consume: impl FnMut(&[Vec<u8>]) -> bool) -> LinkRun {
    let mut feeder = Feeder::new();
    let mut payloads = Vec::new();
    let end = feeder.feed(stream, seed, |batch| {
        let go_on = consume(batch);
        payloads.extend_from_slice(batch);
        go_on
    });
    let error = match &end {
        FeedEnd::Failed(what) => {
            let (before, after) = feeder.failed_at.expect("set on failure");
            Some((before, after, what.clone()))
        }
        _ => None,
    };
    LinkRun {
        delivered: feeder.delivered,
        payloads,
        deadline_set: end == FeedEnd::Done && feeder.deadline_set(),
        largest_allocation: feeder.largest_allocation,
        stopped: end == FeedEnd::Stopped,
        error,
    }
}

/// Builds a frame (header + payload) for any payload, even one over `MAX_FRAME`.
pub fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}
