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

/// Writes `stream` into a socketpair piece by piece and calls the broker's
/// `Link::read_payloads` after each piece, like the broker's poll loop would. `consume`
/// gets each batch of payloads and returns false to drop the link (as the broker does on a
/// violation).
pub fn run_link(stream: &[u8], seed: u8, mut consume: impl FnMut(&[Vec<u8>]) -> bool) -> LinkRun {
    let (ours, mut peer) = UnixStream::pair().expect("socketpair");
    let mut link = Link::new(ours).expect("Link::new");
    let mut run = LinkRun {
        delivered: 0,
        payloads: Vec::new(),
        error: None,
        deadline_set: false,
        largest_allocation: 0,
        stopped: false,
    };
    for size in chunk_sizes(seed, stream.len()) {
        let piece = &stream[run.delivered..run.delivered + size];
        peer.write_all(piece).expect("write into the socketpair");
        let before = run.delivered;
        run.delivered += size;
        let (got, usage) = alloc::measure(|| link.read_payloads());
        run.largest_allocation = run.largest_allocation.max(usage.largest);
        match got {
            Ok(batch) => {
                let go_on = consume(&batch);
                run.payloads.extend(batch);
                if !go_on {
                    run.stopped = true;
                    return run;
                }
            }
            Err(e) => {
                let what = match &e {
                    LinkError::Violation(v) => format!("violation: {v}"),
                    other => format!("{other:?}"),
                };
                // A violation stays one: the link never yields payloads again.
                let again = link.read_payloads();
                assert!(
                    again.is_err(),
                    "after {what}, read_payloads succeeded: {again:?}"
                );
                run.error = Some((before, run.delivered, what));
                return run;
            }
        }
    }
    run.deadline_set = link.deadline().is_some();
    run
}

/// Builds a frame (header + payload) for any payload, even one over `MAX_FRAME`.
pub fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}
