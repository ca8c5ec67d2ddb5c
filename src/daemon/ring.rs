//! A terminal's output ring, kept in a memfd the broker created with the PTY and holds
//! with the handle (`FdLayout::Pty`'s third fd). Whoever holds the terminal maps it; when
//! that process dies (a daemon restart, a crash, SIGKILL) the next holder maps the same
//! memfd and finds the ring and its end offset as they were: a viewer resuming from its
//! last acknowledged offset gets exactly the bytes after it.
//!
//! | bytes   | what                                                                      |
//! |---------|---------------------------------------------------------------------------|
//! | 0..8    | magic `stoaring` (written last when a ring is set up)                      |
//! | 8..16   | version (1)                                                               |
//! | 16..24  | capacity: the data bytes, the memfd's size less this header               |
//! | 24..32  | start: no byte before this offset is claimed to be kept                   |
//! | 32..40  | end: the offset of the byte after the last one written                    |
//! | 40..64  | reserved (0)                                                              |
//! | 64..    | data, circular: offset `o` is at `64 + o % capacity`                      |
//!
//! Offsets are the terminal's own (they count its output since it started, plus any base a
//! fallback gave it). What the ring keeps is `[max(start, end - capacity), end)`.
//!
//! Order of writes, so that a holder killed at any point leaves a header that never claims
//! a byte that is not there (it loses at most what it had not yet published):
//! 1. if the new bytes overwrite kept ones, `start` moves past them first;
//! 2. the data;
//! 3. `end` (a `Release` store: whoever reads it with `Acquire` sees the data).
//!
//! The header is read once, when a holder takes the ring over, and checked (magic,
//! version, capacity against the mapping, `start <= end < 2^53`); from then on the holder
//! is its only writer and keeps `start` and `end` itself. Another process that can reach
//! the memfd (the broker, or one of the service user's) could scribble on it: that can
//! change the bytes viewers get, never make this code read outside the mapping.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;

use stoa_executor::sys::SharedMap;

/// Bytes before the data.
pub const HEADER_BYTES: usize = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"stoaring");
const VERSION: u64 = 1;
const AT_MAGIC: usize = 0;
const AT_VERSION: usize = 8;
const AT_CAPACITY: usize = 16;
const AT_START: usize = 24;
const AT_END: usize = 32;
/// Offsets stay below 2^53: exact in a browser's numbers.
const MAX_OFFSET: u64 = 1 << 53;

pub struct Ring {
    map: SharedMap,
    capacity: u64,
    /// Oldest offset kept.
    start: u64,
    /// Offset after the newest byte.
    end: u64,
}

impl Ring {
    /// Maps a ring's memfd (sealed against shrinking, or refused).
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<SharedMap> {
        SharedMap::new(fd)
    }

    /// The ring a previous holder left in `map`, if its header is valid; else the map back
    /// with the reason.
    pub fn resume(map: SharedMap) -> Result<Ring, (SharedMap, String)> {
        match Ring::check(&map) {
            Ok((capacity, start, end)) => Ok(Ring {
                map,
                capacity,
                start: start.max(end.saturating_sub(capacity)),
                end,
            }),
            Err(why) => Err((map, why)),
        }
    }

    fn check(map: &SharedMap) -> Result<(u64, u64, u64), String> {
        let word = |at| map.load_u64(at).map_err(|e| e.to_string());
        if word(AT_MAGIC)? != MAGIC {
            return Err("no ring header (never set up, or not finished)".into());
        }
        let version = word(AT_VERSION)?;
        if version != VERSION {
            return Err(format!("ring version {version}, expected {VERSION}"));
        }
        let capacity = word(AT_CAPACITY)?;
        let expected = map.len().saturating_sub(HEADER_BYTES) as u64;
        if capacity != expected || capacity == 0 {
            return Err(format!(
                "ring capacity {capacity} does not fit a {} byte memfd",
                map.len()
            ));
        }
        let (start, end) = (word(AT_START)?, word(AT_END)?);
        if start > end || end >= MAX_OFFSET {
            return Err(format!("ring offsets {start}..{end} are not valid"));
        }
        Ok((capacity, start, end))
    }

    /// An empty ring whose first byte will be offset `base`, replacing whatever `map` held.
    pub fn create(mut map: SharedMap, base: u64) -> io::Result<Ring> {
        let capacity = map.len().saturating_sub(HEADER_BYTES) as u64;
        if capacity == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {} byte memfd has no room for a ring", map.len()),
            ));
        }
        // Invalid until the magic goes in last: a holder killed halfway leaves no ring.
        map.store_u64(AT_MAGIC, 0)?;
        map.store_u64(AT_VERSION, VERSION)?;
        map.store_u64(AT_CAPACITY, capacity)?;
        map.store_u64(AT_START, base)?;
        map.store_u64(AT_END, base)?;
        map.store_u64(AT_MAGIC, MAGIC)?;
        Ok(Ring {
            map,
            capacity,
            start: base,
            end: base,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The oldest offset still kept.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The offset after the newest byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    fn store(&mut self, at: usize, value: u64) {
        self.map
            .store_u64(at, value)
            .expect("header words lie in the mapping");
    }

    /// Appends `bytes` (only the last `capacity` of them are kept), in the order the head
    /// of this file gives: a holder killed between writing the data and publishing `end`
    /// loses those bytes (already read from the PTY, never seen by a viewer), nothing else.
    pub fn append(&mut self, bytes: &[u8]) {
        let Some(new_end) = self.announce(bytes.len()) else {
            return;
        };
        self.write_data(new_end, bytes);
        self.publish(new_end);
    }

    /// Step 1: `start` moves past what the next `len` bytes overwrite (at most to `end`:
    /// the header never says `start > end`). Returns the new end (`None` for nothing).
    fn announce(&mut self, len: usize) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let new_end = self.end + len as u64;
        let new_start = self.start.max(new_end.saturating_sub(self.capacity));
        if new_start > self.start {
            let at = new_start.min(self.end);
            self.store(AT_START, at);
        }
        Some(new_end)
    }

    /// Step 2: the data (its last `capacity` bytes) where it belongs for `new_end`.
    fn write_data(&mut self, new_end: u64, bytes: &[u8]) {
        let kept = &bytes[bytes.len().saturating_sub(self.capacity as usize)..];
        let mut offset = new_end - kept.len() as u64;
        let mut rest = kept;
        while !rest.is_empty() {
            let pos = (offset % self.capacity) as usize;
            let n = rest.len().min(self.capacity as usize - pos);
            self.map
                .write_at(HEADER_BYTES + pos, &rest[..n])
                .expect("ring positions lie in the mapping");
            rest = &rest[n..];
            offset += n as u64;
        }
    }

    /// Step 3: the new end, published.
    fn publish(&mut self, new_end: u64) {
        self.store(AT_END, new_end);
        let new_start = self.start.max(new_end.saturating_sub(self.capacity));
        if new_start > self.end {
            // Everything before was overwritten: say where the kept bytes begin.
            self.store(AT_START, new_start);
        }
        (self.start, self.end) = (new_start, new_end);
    }

    /// The kept bytes from `from`, at most `len` of them (clamped to what is kept).
    pub fn read(&self, from: u64, len: usize) -> Vec<u8> {
        let from = from.clamp(self.start, self.end);
        let len = (len as u64).min(self.end - from) as usize;
        let mut out = vec![0u8; len];
        let mut filled = 0;
        let mut offset = from;
        while filled < len {
            let pos = (offset % self.capacity) as usize;
            let n = (len - filled).min(self.capacity as usize - pos);
            self.map
                .read_at(HEADER_BYTES + pos, &mut out[filled..filled + n])
                .expect("ring positions lie in the mapping");
            filled += n;
            offset += n as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use stoa_executor::sys::create_ring_memfd;

    fn memfd(capacity: usize) -> OwnedFd {
        create_ring_memfd(HEADER_BYTES + capacity).unwrap()
    }

    fn fresh(fd: &OwnedFd, base: u64) -> Ring {
        Ring::create(Ring::map(fd.as_fd()).unwrap(), base).unwrap()
    }

    fn remap(fd: &OwnedFd) -> Result<Ring, String> {
        Ring::resume(Ring::map(fd.as_fd()).unwrap()).map_err(|(_, why)| why)
    }

    /// Byte `i` of a test stream.
    fn stream(from: u64, len: usize) -> Vec<u8> {
        (from..from + len as u64).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn wraps_around_and_keeps_the_newest() {
        let fd = memfd(100);
        let mut ring = fresh(&fd, 0);
        assert_eq!((ring.capacity(), ring.start(), ring.end()), (100, 0, 0));
        ring.append(&stream(0, 70));
        assert_eq!((ring.start(), ring.end()), (0, 70));
        assert_eq!(ring.read(0, 70), stream(0, 70));
        ring.append(&stream(70, 70));
        assert_eq!((ring.start(), ring.end()), (40, 140));
        assert_eq!(ring.read(40, 100), stream(40, 100));
        // Reads across the wrap, clamped to what is kept.
        assert_eq!(ring.read(90, 30), stream(90, 30));
        assert_eq!(ring.read(0, 20), stream(40, 20));
        assert_eq!(ring.read(130, 50), stream(130, 10));
        assert!(ring.read(140, 10).is_empty());
        // More than the capacity at once: only its tail stays.
        ring.append(&stream(140, 250));
        assert_eq!((ring.start(), ring.end()), (290, 390));
        assert_eq!(ring.read(290, 100), stream(290, 100));
        // Many small appends around the ring.
        for i in 0..57 {
            let at = ring.end();
            ring.append(&stream(at, 1 + i % 13));
        }
        let end = ring.end();
        assert_eq!(ring.read(end - 100, 100), stream(end - 100, 100));
    }

    #[test]
    fn a_second_mapping_finds_the_same_ring() {
        let fd = memfd(4096);
        let mut ring = fresh(&fd, 1000);
        ring.append(&stream(1000, 3000));
        ring.append(&stream(4000, 3000));
        let again = remap(&fd).unwrap();
        assert_eq!(
            (again.capacity(), again.start(), again.end()),
            (4096, 7000 - 4096, 7000)
        );
        assert_eq!(again.read(again.start(), 4096), stream(7000 - 4096, 4096));
        // The holder may go (its mapping with it): the memfd keeps the ring.
        drop(ring);
        drop(again);
        let mut third = remap(&fd).unwrap();
        third.append(&stream(7000, 10));
        assert_eq!(third.read(6000, 1010), stream(6000, 1010));
        assert_eq!(remap(&fd).unwrap().end(), 7010);
    }

    #[test]
    fn a_bad_header_is_refused() {
        // A fresh memfd: no ring yet.
        let fd = memfd(256);
        assert!(remap(&fd).is_err());
        let corrupt = |at: usize, value: u64| {
            let fd = memfd(256);
            let mut ring = fresh(&fd, 0);
            ring.append(b"hello");
            assert!(remap(&fd).is_ok());
            let mut map = Ring::map(fd.as_fd()).unwrap();
            map.store_u64(at, value).unwrap();
            remap(&fd).err().expect("refused")
        };
        assert!(corrupt(AT_MAGIC, 0).contains("no ring header"));
        assert!(corrupt(AT_VERSION, 2).contains("version"));
        assert!(corrupt(AT_CAPACITY, 1 << 20).contains("capacity"));
        assert!(corrupt(AT_START, 6).contains("offsets"));
        assert!(corrupt(AT_END, 1 << 60).contains("offsets"));
        // A memfd too small for any data.
        let tiny = create_ring_memfd(HEADER_BYTES).unwrap();
        assert!(Ring::create(Ring::map(tiny.as_fd()).unwrap(), 0).is_err());
    }

    #[test]
    fn a_holder_killed_mid_append_loses_only_what_it_had_not_published() {
        for (capacity, before, len) in [(100, 250, 30), (100, 250, 150), (100, 40, 30)] {
            let fd = memfd(capacity);
            let mut ring = fresh(&fd, 0);
            ring.append(&stream(0, before));
            // Killed after the data went in, before the end was published.
            let new_end = ring.announce(len).unwrap();
            ring.write_data(new_end, &stream(before as u64, len));
            drop(ring);
            let found = remap(&fd).unwrap();
            assert_eq!(
                found.end(),
                before as u64,
                "capacity {capacity}, {len} bytes"
            );
            let kept = (found.end() - found.start()) as usize;
            assert_eq!(found.read(found.start(), kept), stream(found.start(), kept));
            assert!(kept <= capacity);
        }
    }
}
