//! Kept-alive connections from the front to the workers, so a request does not cost a
//! broker round trip and a new connection each time.
//!
//! A connection is kept for exactly the credential and Unix user the broker opened it for
//! (keyed by the credential's digest): reusing it is what opening a new one with the same
//! credential would give. The worker still checks each request against revocations. At most
//! [`PER_KEY`] idle connections per key and [`TOTAL`] in all, each for at most [`IDLE`], and
//! none reused once [`MAX_AGE`] old (an admin's connection carries a credential the broker
//! delegated for an hour: `broker::handlers::workers::DELEGATION_SECS`);
//! a connection goes back only once its response has been read to the end (an event stream
//! never does), and never after an upgrade.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

const PER_KEY: usize = 8;
const TOTAL: usize = 512;
const IDLE: Duration = Duration::from_secs(30);
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// A connection to a worker and when it was opened.
pub struct Conn {
    pub sender: SendRequest<Body>,
    pub born: Instant,
}

impl Conn {
    pub fn new(sender: SendRequest<Body>) -> Conn {
        Conn {
            sender,
            born: Instant::now(),
        }
    }

    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.born.elapsed() < MAX_AGE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub credential: [u8; 32],
    pub user: String,
}

/// A connection and when it went idle.
type Idle = (Conn, Instant);

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl Pool {
    /// An idle connection for `key` that is still open, if there is one.
    pub fn take(&self, key: &Key) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(key)?;
        while let Some((conn, since)) = list.pop() {
            if conn.usable() && since.elapsed() < IDLE {
                return Some(conn);
            }
        }
        idle.remove(key);
        None
    }

    fn put(&self, key: Key, conn: Conn) {
        if !conn.usable() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let total: usize = idle.values().map(Vec::len).sum();
        if total >= TOTAL {
            // Make room: drop what has idled longest everywhere.
            idle.retain(|_, list| {
                list.retain(|(c, since)| c.usable() && since.elapsed() < IDLE);
                !list.is_empty()
            });
            if idle.values().map(Vec::len).sum::<usize>() >= TOTAL {
                return;
            }
        }
        let list = idle.entry(key).or_default();
        if list.len() < PER_KEY {
            list.push((conn, Instant::now()));
        }
    }

    /// Connections kept now (for tests and logs).
    pub fn len(&self) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A response body that gives its connection back to the pool once read to the end.
pub struct Returning {
    inner: Incoming,
    back: Option<(Arc<Pool>, Key, Conn)>,
}

impl Returning {
    pub fn new(inner: Incoming, pool: Arc<Pool>, key: Key, conn: Conn) -> Self {
        Returning {
            inner,
            back: Some((pool, key, conn)),
        }
    }

    fn give_back(&mut self) {
        if let Some((pool, key, conn)) = self.back.take() {
            pool.put(key, conn);
        }
    }
}

impl http_body::Body for Returning {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
