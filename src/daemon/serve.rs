//! The daemon's accept loop: HTTP/1.1 with hyper, with a header-read timeout and
//! connection limits, so idle or half-sent connections cannot use up its file descriptors.
//!
//! A connection is *idle* while no request is in progress on it: before its first request
//! header is complete, and between keep-alive requests. Idle connections must send a whole
//! header within `http.header_read_timeout_secs` (hyper's timer runs while it waits for
//! one), and are capped: in total, per client address, and as part of all connections.
//! When a cap is reached the **oldest** idle connection is closed to make room. A local
//! attacker and legitimate loopback users share 127.0.0.1, so nothing is refused by address:
//! a legitimate client sends its request right after connecting and is no longer idle,
//! while a flood of idle connections only pushes out its own oldest ones.
//!
//! Requests in progress are never closed to make room; when every connection is busy and the
//! total is reached, new ones are closed at once. WebSockets leave this table when upgraded
//! (they are authenticated, and bounded per user by the terminal limits).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::config::HttpConfig;

/// The addresses of the connection a request came on (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

struct Conn {
    peer: IpAddr,
    /// Requests in progress (their response not yet written).
    busy: u32,
    /// Its place in the idle order while idle.
    idle_seq: Option<u64>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    conns: HashMap<u64, Conn>,
    /// Idle connections, oldest first: idle order -> connection.
    idle: BTreeMap<u64, u64>,
    idle_by_peer: HashMap<IpAddr, BTreeMap<u64, u64>>,
    next_id: u64,
    next_seq: u64,
}

/// Counts for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub open: usize,
    pub idle: usize,
}

pub struct Connections {
    table: Mutex<Table>,
    limits: HttpConfig,
}

impl Table {
    fn set_idle(&mut self, id: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.idle_seq.is_some() {
            return;
        }
        c.idle_seq = Some(seq);
        self.idle.insert(seq, id);
        self.idle_by_peer.entry(c.peer).or_default().insert(seq, id);
    }

    fn clear_idle(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if let Some(seq) = c.idle_seq.take() {
            self.idle.remove(&seq);
            if let Some(m) = self.idle_by_peer.get_mut(&c.peer) {
                m.remove(&seq);
                if m.is_empty() {
                    self.idle_by_peer.remove(&c.peer);
                }
            }
        }
    }

    /// Closes idle connection `id` (its task drops it) and forgets it.
    fn evict(&mut self, id: u64) {
        self.clear_idle(id);
        if let Some(c) = self.conns.remove(&id) {
            c.close.notify_one();
        }
    }

    fn oldest_idle(&self, peer: Option<IpAddr>) -> Option<u64> {
        match peer {
            Some(p) => self.idle_by_peer.get(&p)?.values().next().copied(),
            None => self.idle.values().next().copied(),
        }
    }
}

impl Connections {
    pub fn new(limits: HttpConfig) -> Connections {
        Connections {
            table: Mutex::new(Table::default()),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("connections lock")
    }

    pub fn counts(&self) -> Counts {
        let t = self.lock();
        Counts {
            open: t.conns.len(),
            idle: t.idle.len(),
        }
    }

    /// A new connection from `peer`, idle until its first request: makes room by closing the
    /// oldest idle ones, or says no (`None`) when every connection is busy.
    fn admit(&self, peer: IpAddr) -> Option<(u64, Arc<Notify>)> {
        let mut t = self.lock();
        let l = &self.limits;
        let peer_idle = t.idle_by_peer.get(&peer).map_or(0, |m| m.len());
        if peer_idle >= l.max_idle_per_peer {
            if let Some(victim) = t.oldest_idle(Some(peer)) {
                t.evict(victim);
            }
        }
        while t.idle.len() >= l.max_idle_connections || t.conns.len() >= l.max_connections {
            match t.oldest_idle(None) {
                Some(victim) => t.evict(victim),
                None => break,
            }
        }
        if t.conns.len() >= l.max_connections {
            return None;
        }
        let id = t.next_id;
        t.next_id += 1;
        let close = Arc::new(Notify::new());
        t.conns.insert(
            id,
            Conn {
                peer,
                busy: 0,
                idle_seq: None,
                close: close.clone(),
            },
        );
        t.set_idle(id);
        Some((id, close))
    }

    /// A request header on `id` is complete.
    fn request_started(&self, id: u64) {
        let mut t = self.lock();
        t.clear_idle(id);
        if let Some(c) = t.conns.get_mut(&id) {
            c.busy += 1;
        }
    }

    /// A response on `id` is written (or dropped).
    fn request_done(&self, id: u64) {
        let mut t = self.lock();
        let idle = match t.conns.get_mut(&id) {
            Some(c) => {
                c.busy = c.busy.saturating_sub(1);
                c.busy == 0
            }
            None => false,
        };
        if idle {
            t.set_idle(id);
        }
    }

    fn closed(&self, id: u64) {
        let mut t = self.lock();
        t.clear_idle(id);
        t.conns.remove(&id);
    }

    /// Closes the oldest idle connection (accept ran out of file descriptors).
    fn evict_oldest(&self) -> bool {
        let mut t = self.lock();
        match t.oldest_idle(None) {
            Some(victim) => {
                t.evict(victim);
                true
            }
            None => false,
        }
    }
}

/// Marks a request done when its response body is dropped (hyper drops it once written).
struct Done {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.conns.request_done(self.id);
    }
}

/// A response body that carries the [`Done`] guard.
struct Tracked {
    inner: Body,
    _done: Done,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Given the first request head of a connection (as read, possibly with more after it),
/// a connection to the worker the whole client connection may go to (`None`: the front
/// serves it).
pub type Handover = Arc<
    dyn Fn(Vec<u8>, ConnInfo) -> Pin<Box<dyn std::future::Future<Output = Option<OwnedFd>> + Send>>
        + Send
        + Sync,
>;

/// Most bytes of a first request head the front reads to decide where a connection goes.
const MAX_HEAD: usize = 16 * 1024;

/// Reads until a whole request head is in (or `MAX_HEAD`, or end of file).
async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while head.len() < MAX_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// Passes the client's connection to a worker over `worker`: `T`, the length of what was
/// read, the bytes, and the connection's fd alongside.
fn hand_over(worker: OwnedFd, head: &[u8], client: &tokio::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let mut message = Vec::with_capacity(5 + head.len());
    message.push(b'T');
    message.extend_from_slice(&(head.len() as u32).to_be_bytes());
    message.extend_from_slice(head);
    // A fresh socketpair: the message (at most 16 KiB and a few bytes) fits its buffer.
    let sent =
        stoa_executor::sys::send_with_fds(worker.as_fd(), &message, &[client.as_fd()], true)?;
    if sent != message.len() {
        return Err(std::io::Error::other(
            "the handover did not fit in one message",
        ));
    }
    Ok(())
}

/// Serves `app` on `listener` until `stop` turns true; then stops accepting, asks every
/// connection to finish its request in progress, and returns once all are closed. With a
/// `handover`, a connection whose first request it accepts goes to a worker whole.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: HttpConfig,
    conns: Arc<Connections>,
    mut stop: watch::Receiver<bool>,
    handover: Option<Handover>,
) {
    let header_timeout = Duration::from_secs(limits.header_read_timeout_secs);
    let (tasks_tx, mut tasks_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of fds (or a connection gone before accept): free the oldest idle
                // connection, or wait a moment.
                if !conns.evict_oldest() {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
        };
        let Some((id, close)) = conns.admit(peer.ip()) else {
            debug!(%peer, "all connections busy (http.max_connections): closing a new one");
            drop(stream);
            continue;
        };
        let local = match stream.local_addr() {
            Ok(l) => l,
            Err(_) => {
                conns.closed(id);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo { peer, local };
        let app = app.clone();
        let conns2 = conns.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            conns2.request_started(id);
            let done = Done {
                conns: conns2.clone(),
                id,
            };
            req.extensions_mut().insert(info);
            let mut app = app.clone();
            async move {
                let response = tower_service::Service::call(&mut app, req.map(Body::new)).await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| Body::new(Tracked { inner, _done: done })),
                )
            }
        });
        let mut stop = stop.clone();
        let conns = conns.clone();
        let alive = tasks_tx.clone();
        let handover = handover.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let mut stream = stream;
            // The first request head, within the header-read timeout (an idle connection
            // may still be closed to make room meanwhile).
            let head = tokio::select! {
                h = tokio::time::timeout(header_timeout, read_head(&mut stream)) => match h {
                    Ok(Ok(h)) if !h.is_empty() => h,
                    _ => {
                        conns.closed(id);
                        return;
                    }
                },
                _ = close.notified() => {
                    conns.closed(id);
                    return;
                }
            };
            if let Some(handover) = handover {
                if let Some(worker) = handover(head.clone(), info).await {
                    match hand_over(worker, &head, &stream) {
                        Ok(()) => {
                            conns.closed(id);
                            return;
                        }
                        Err(e) => debug!(%peer, "handover failed, serving here: {e}"),
                    }
                }
            }
            let stream = super::prefixed::Prefixed::new(head, stream);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, "connection: {e}");
                    }
                }
                _ = close.notified() => {
                    debug!(%peer, "closed to make room (idle connection limits)");
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            conns.closed(id);
        });
    }
    drop(tasks_tx);
    // Every connection task holds a sender: this returns when the last one ends.
    let _ = tasks_rx.changed().await;
}
