//! Who a request is, and for how long: the auth cache, revocations and the throttle on
//! failed authentications. The broker verifies every credential; this only remembers its
//! answers briefly.
//!
//! * The cache is keyed by the credential's SHA-256 and indexed by revocation key (an API
//!   user's id, a log-in's number: `Principal::revocation_key`), so `Event::Revoked { keys }`
//!   purges their entries at once.
//! * Every revocation bumps a generation. Whatever was authenticated at generation `g` is
//!   revoked once its user was revoked after `g`; live connections (event streams, terminal
//!   WebSockets) wait on [`Auth::until_revoked`] and end then.
//! * Failed authentications are counted per client address over a minute; past the limit
//!   further failures are answered 429 (valid credentials still pass: loopback users share
//!   127.0.0.1 with whoever is guessing).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::wire::Principal;

/// How long a credential the broker accepted is trusted without asking again.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 1024;
/// The window failed authentications are counted over.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at once; past it those without a recent failure
/// are forgotten (an address keeps at most `limit + 1` timestamps).
const FAILURE_PEERS_MAX: usize = 16384;

pub type TokenKey = [u8; 32];

struct Cached {
    principal: Principal,
    at: Instant,
    generation: u64,
}

#[derive(Default)]
struct Inner {
    cache: HashMap<TokenKey, Cached>,
    by_user: HashMap<u64, HashSet<TokenKey>>,
    /// The generation at which each API user was last revoked.
    revoked_at: HashMap<u64, u64>,
    failures: HashMap<IpAddr, VecDeque<Instant>>,
}

pub struct Auth {
    inner: Mutex<Inner>,
    generation: watch::Sender<u64>,
    failure_limit: usize,
}

/// A request's verified identity: who, and at which revocation generation.
#[derive(Clone, Debug)]
pub struct Verified {
    pub principal: Principal,
    pub generation: u64,
}

impl Auth {
    pub fn new(failure_limit: u32) -> Auth {
        Auth {
            inner: Mutex::new(Inner::default()),
            generation: watch::channel(0).0,
            failure_limit: failure_limit as usize,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("auth lock")
    }

    /// The current revocation generation: take it *before* asking the broker.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    pub fn cached(&self, key: &TokenKey) -> Option<Verified> {
        let inner = self.lock();
        let c = inner.cache.get(key)?;
        (c.at.elapsed() < CACHE_TTL).then(|| Verified {
            principal: c.principal.clone(),
            generation: c.generation,
        })
    }

    /// Remembers the broker's answer, asked at `generation`. False (and nothing cached) if
    /// the user was revoked since: the answer may predate the revocation.
    pub fn insert(&self, key: TokenKey, principal: &Principal, generation: u64) -> bool {
        let mut inner = self.lock();
        let id = principal.revocation_key();
        if id.is_some_and(|id| inner.revoked_at.get(&id).is_some_and(|g| *g > generation)) {
            return false;
        }
        if inner.cache.len() >= CACHE_MAX {
            inner.cache.clear();
            inner.by_user.clear();
        }
        inner.cache.insert(
            key,
            Cached {
                principal: principal.clone(),
                at: Instant::now(),
                generation,
            },
        );
        if let Some(id) = id {
            inner.by_user.entry(id).or_default().insert(key);
        }
        true
    }

    /// The broker says these credentials (revocation keys) stopped working.
    pub fn revoke(&self, keys: &[u64]) {
        let mut inner = self.lock();
        let generation = self.generation() + 1;
        for id in keys {
            inner.revoked_at.insert(*id, generation);
            for key in inner.by_user.remove(id).unwrap_or_default() {
                inner.cache.remove(&key);
            }
        }
        drop(inner);
        self.generation.send_replace(generation);
    }

    pub fn revoked(&self, v: &Verified) -> bool {
        v.principal.revocation_key().is_some_and(|id| {
            self.lock()
                .revoked_at
                .get(&id)
                .is_some_and(|g| *g > v.generation)
        })
    }

    /// Resolves once `v`'s user is revoked (never for the machine's admin token).
    pub fn until_revoked(
        self: &Arc<Self>,
        v: Verified,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let auth = self.clone();
        let mut changes = self.generation.subscribe();
        async move {
            if v.principal.revocation_key().is_none() {
                return std::future::pending().await;
            }
            loop {
                if auth.revoked(&v) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Records a failed authentication from `peer`; returns how many it made in the last
    /// minute (at most the limit + 1) and whether that is over the limit.
    pub fn failed(&self, peer: IpAddr) -> (usize, bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.failures.len() >= FAILURE_PEERS_MAX && !inner.failures.contains_key(&peer) {
            inner
                .failures
                .retain(|_, times| times.back().is_some_and(|t| now - *t < FAILURE_WINDOW));
            if inner.failures.len() >= FAILURE_PEERS_MAX {
                inner.failures.clear();
            }
        }
        let times = inner.failures.entry(peer).or_default();
        times.push_back(now);
        while times
            .front()
            .is_some_and(|t| now - *t >= FAILURE_WINDOW || times.len() > self.failure_limit + 1)
        {
            times.pop_front();
        }
        let n = times.len();
        (n, n > self.failure_limit)
    }

    pub fn failure_limit(&self) -> usize {
        self.failure_limit
    }
}

/// What the front knows about the request being served: its client's address, and who it
/// authenticated as (set by `http::authenticate`), for the layers that follow it.
pub struct RequestContext {
    pub peer: Option<IpAddr>,
    pub verified: Mutex<Option<Verified>>,
}

tokio::task_local! {
    pub static REQUEST: Arc<RequestContext>;
}

/// The client address of the request being served, if known.
pub fn current_peer() -> Option<IpAddr> {
    REQUEST.try_with(|r| r.peer).ok().flatten()
}

/// Notes who the request being served authenticated as.
pub fn note_verified(v: &Verified) {
    let _ = REQUEST.try_with(|r| *r.verified.lock().expect("request lock") = Some(v.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64) -> Principal {
        Principal::User {
            id,
            name: format!("u{id}"),
            unix_user: "x".into(),
            admin: false,
        }
    }

    #[test]
    fn revocation_purges_by_id_and_refuses_stale_answers() {
        let auth = Auth::new(10);
        let g = auth.generation();
        assert!(auth.insert([1; 32], &user(7), g));
        assert!(auth.insert([2; 32], &user(8), g));
        auth.revoke(&[7]);
        assert!(auth.cached(&[1; 32]).is_none());
        assert!(auth.cached(&[2; 32]).is_some());
        // An answer asked for before the revocation is not cached.
        assert!(!auth.insert([3; 32], &user(7), g));
        let v = Verified {
            principal: user(7),
            generation: g,
        };
        assert!(auth.revoked(&v));
        // A new token for the same user (rotation) works again.
        assert!(auth.insert([4; 32], &user(7), auth.generation()));
    }

    #[test]
    fn failures_over_the_limit_are_flagged() {
        let auth = Auth::new(3);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let flags: Vec<bool> = (0..5).map(|_| auth.failed(peer).1).collect();
        assert_eq!(flags, [false, false, false, true, true]);
        assert!(!auth.failed("10.0.0.1".parse().unwrap()).1);
    }
}
