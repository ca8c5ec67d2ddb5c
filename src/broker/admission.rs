//! Admission: whether a spawn may start now (per-user and total executors, the per-user
//! spawn rate), and how much a principal may make the broker write about its refusals.
//!
//! | limit                        | key                 | when it is reached                        |
//! |------------------------------|---------------------|-------------------------------------------|
//! | `max_executors_per_user`     | Unix user           | 429, rule `executors-per-user`            |
//! | `max_executors_total`        | –                   | 429, rule `executors-total`               |
//! | `spawn_rate_per_sec`/`burst` | Unix user           | 429, rule `spawn-rate`                    |
//! | refusals (`REFUSALS_*`)      | API principal (or `anonymous` for a bad credential) | 429, rule `refusal-rate`; counted, not audited one by one |
//! | failed authentications       | – (the peer is the daemon's word) | counted, not audited one by one |
//! | `signal` and `adopt` lines (`HANDLE_OPS_*`) | the handle's API principal | counted, not audited one by one (the request is still served) |
//!
//! Every refusal takes a token from its principal's refusal bucket, so a refused request
//! costs as much as an accepted one: neither floods the audit log.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Instant;

/// Refusals one principal may have audited: a burst, then this many a second.
pub const REFUSALS_BURST: f64 = 100.0;
pub const REFUSALS_PER_SEC: f64 = 1.0;
/// Failed authentications audited one by one, broker-wide.
pub const AUTH_FAILURES_BURST: f64 = 50.0;
pub const AUTH_FAILURES_PER_SEC: f64 = 5.0;
/// `signal` and `adopt` lines one principal's handles may have written: a burst, then
/// this many a second. The daemon may repeat `Kill` and `Adopt` of a running handle at
/// will; without a rate each one was a line.
pub const HANDLE_OPS_BURST: f64 = 100.0;
pub const HANDLE_OPS_PER_SEC: f64 = 1.0;
/// Most principals tracked at once (an API user's key, `anonymous`): bounded memory even
/// for a daemon that makes up keys.
const MAX_TRACKED: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the audit log should say about a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Write the record; `suppressed` earlier ones of this key were only counted.
    Write { suppressed: u64 },
    /// Over the rate: count it, write nothing.
    Count,
}

#[derive(Default)]
pub struct Admission {
    spawn: HashMap<u32, Bucket>,
    refusals: HashMap<String, (Bucket, u64)>,
    handle_ops: HashMap<String, (Bucket, u64)>,
    auth_failures: Option<(Bucket, u64)>,
}

impl Admission {
    /// A spawn token of `uid`'s: `burst` at once, refilled at `rate` a second.
    pub fn take_spawn_token(&mut self, uid: u32, rate: f64, burst: u32) -> bool {
        let now = Instant::now();
        if self.spawn.len() >= MAX_TRACKED && !self.spawn.contains_key(&uid) {
            self.spawn.clear();
        }
        let burst = f64::from(burst);
        self.spawn
            .entry(uid)
            .or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    /// A refusal of `principal`'s: may it be written to the audit log?
    pub fn refusal(&mut self, principal: &str) -> Record {
        let now = Instant::now();
        if self.refusals.len() >= MAX_TRACKED && !self.refusals.contains_key(principal) {
            self.refusals.clear();
        }
        let (bucket, suppressed) = self
            .refusals
            .entry(principal.to_string())
            .or_insert_with(|| (Bucket::full(REFUSALS_BURST, now), 0));
        take_or_count(bucket, suppressed, REFUSALS_PER_SEC, REFUSALS_BURST, now)
    }

    /// A `Kill` or `Adopt` of a handle of `principal`'s: may its line be written?
    pub fn handle_op(&mut self, principal: &str) -> Record {
        let now = Instant::now();
        if self.handle_ops.len() >= MAX_TRACKED && !self.handle_ops.contains_key(principal) {
            self.handle_ops.clear();
        }
        let (bucket, suppressed) = self
            .handle_ops
            .entry(principal.to_string())
            .or_insert_with(|| (Bucket::full(HANDLE_OPS_BURST, now), 0));
        take_or_count(
            bucket,
            suppressed,
            HANDLE_OPS_PER_SEC,
            HANDLE_OPS_BURST,
            now,
        )
    }

    /// Whether `principal` is over its refusal rate right now (without taking a token):
    /// its requests are then answered 429 before any work.
    pub fn refusing(&self, principal: &str) -> bool {
        self.refusals.get(principal).is_some_and(|(b, _)| {
            let refill = b.at.elapsed().as_secs_f64() * REFUSALS_PER_SEC;
            b.tokens + refill < 1.0
        })
    }

    /// A failed authentication: may it be written to the audit log?
    pub fn auth_failure(&mut self) -> Record {
        let now = Instant::now();
        let (bucket, suppressed) = self
            .auth_failures
            .get_or_insert_with(|| (Bucket::full(AUTH_FAILURES_BURST, now), 0));
        take_or_count(
            bucket,
            suppressed,
            AUTH_FAILURES_PER_SEC,
            AUTH_FAILURES_BURST,
            now,
        )
    }
}

fn take_or_count(
    bucket: &mut Bucket,
    suppressed: &mut u64,
    rate: f64,
    burst: f64,
    now: Instant,
) -> Record {
    if bucket.take(rate, burst, now) {
        Record::Write {
            suppressed: std::mem::take(suppressed),
        }
    } else {
        *suppressed += 1;
        Record::Count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_audited_up_to_the_burst_then_counted() {
        let mut a = Admission::default();
        let written = (0..1000)
            .filter(|_| matches!(a.refusal("user:1"), Record::Write { .. }))
            .count();
        // The burst, plus whatever refilled while the loop ran (well under a second).
        assert!((100..=105).contains(&written), "{written}");
        assert!(a.refusing("user:1"));
        assert!(!a.refusing("user:2"));
        // Another principal has its own bucket.
        assert_eq!(a.refusal("user:2"), Record::Write { suppressed: 0 });
    }

    #[test]
    fn spawn_tokens_are_per_user() {
        let mut a = Admission::default();
        assert!((0..3).all(|_| a.take_spawn_token(1000, 0.0, 3)));
        assert!(!a.take_spawn_token(1000, 0.0, 3));
        assert!(a.take_spawn_token(1001, 0.0, 3));
    }
}
