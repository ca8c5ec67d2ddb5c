//! A global allocator that forwards to [`System`] and, while armed, records the largest
//! single allocation (or reallocation) and the peak of bytes allocated minus bytes freed.
//!
//! The fuzz targets are single-threaded, so one set of counters is enough.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::Relaxed};

pub struct Tracking;

#[global_allocator]
static GLOBAL: Tracking = Tracking;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: usize, single: usize) {
    if ARMED.load(Relaxed) {
        LARGEST.fetch_max(single, Relaxed);
        let live = LIVE.fetch_add(by as isize, Relaxed) + by as isize;
        PEAK.fetch_max(live, Relaxed);
    }
}

fn shrank(by: usize) {
    if ARMED.load(Relaxed) {
        LIVE.fetch_sub(by as isize, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// bookkeeping only touches atomics and never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: forwarded; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size(), new_size);
        } else {
            shrank(layout.size() - new_size);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What [`measure`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The largest single allocation or reallocation, in bytes.
    pub largest: usize,
    /// The most bytes held at once (allocated minus freed since the start; frees of older
    /// memory can only make this smaller, so it is a lower bound of the true peak).
    pub peak: usize,
}

/// Runs `f` with the counters armed.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    LARGEST.store(0, Relaxed);
    LIVE.store(0, Relaxed);
    PEAK.store(0, Relaxed);
    ARMED.store(true, Relaxed);
    let out = f();
    ARMED.store(false, Relaxed);
    let usage = Usage {
        largest: LARGEST.load(Relaxed),
        peak: PEAK.load(Relaxed).max(0) as usize,
    };
    (out, usage)
}
