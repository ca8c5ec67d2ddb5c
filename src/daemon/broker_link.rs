//! The daemon's end of the broker link (front or worker). One reader task on the runtime
//! (`recvmsg` when the socket is readable, so fds are taken exactly as they arrive) routes
//! replies to their waiting requests and events to the observer; requests are written whole
//! under a lock. The reader is a task, not a thread: a reply wakes the request waiting for it
//! directly, with no hop between threads (measured on the spawn path, BENCHMARKS.md).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::error;

use stoa_executor::codec::{self, HEADER_LEN};
use stoa_executor::sys;

use crate::wire::{
    BrokerMessage, Event, ReplyBody, Request, RequestBody, Welcome, PROTOCOL_VERSION,
};

/// A reply and the fds that came with it.
pub struct Reply {
    pub body: ReplyBody,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug)]
pub struct LinkDown;

impl std::fmt::Display for LinkDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker link is down")
    }
}

type Waiter = oneshot::Sender<Reply>;

tokio::task_local! {
    /// The HTTP request being served (set by the HTTP layer, and by a task's run for the
    /// request that started it); every broker request made meanwhile carries it.
    pub static REQUEST_ID: String;
}

pub struct BrokerLink {
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    connected: AtomicBool,
    welcome: Welcome,
}

/// Called on the reader task for each reply before it is handed to its request, and for
/// each event. Used to record handles before anyone can see their exit.
pub trait LinkObserver: Send + Sync + 'static {
    fn reply(&self, body: &ReplyBody);
    /// `fds`: what came with it (a `Connection`'s socket).
    fn event(&self, event: Event, fds: Vec<OwnedFd>);
}

impl BrokerLink {
    /// Says Hello (blocking) and starts the reader task: call it inside the runtime
    /// (`Runtime::enter`).
    pub fn connect(
        sock: UnixStream,
        observer: Arc<dyn LinkObserver>,
    ) -> io::Result<Arc<BrokerLink>> {
        let mut reader = FrameReader::new(sock.try_clone()?);
        codec::write_frame(
            &mut &sock,
            &Request {
                id: 0,
                request_id: None,
                body: RequestBody::Hello {
                    protocol: PROTOCOL_VERSION,
                },
            },
        )?;
        let (msg, _) = reader.next_blocking()?;
        let welcome = match msg {
            BrokerMessage::Reply {
                id: 0,
                body: ReplyBody::Welcome(w),
            } => w,
            other => {
                return Err(io::Error::other(format!(
                    "broker answered Hello with {other:?}"
                )))
            }
        };
        let link = Arc::new(BrokerLink {
            writer: Mutex::new(sock),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            connected: AtomicBool::new(true),
            welcome,
        });
        let reader_link = link.clone();
        let socket = sys::async_fd(OwnedFd::from(reader.sock))?;
        let frames = Frames {
            buf: reader.buf,
            fds: reader.fds,
            chunk: reader.chunk,
        };
        tokio::spawn(async move { reader_link.read_loop(socket, frames, observer).await });
        Ok(link)
    }

    /// [`BrokerLink::connect`] on `runtime`, for a process's start: refuses to go on as
    /// root when the broker isolates (the front and the workers never run as root).
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        sock: UnixStream,
        observer: Arc<dyn LinkObserver>,
        who: &str,
    ) -> Result<Arc<BrokerLink>, String> {
        let link = {
            let _runtime = runtime.enter();
            BrokerLink::connect(sock, observer)
                .map_err(|e| format!("cannot greet the broker: {e}"))?
        };
        if link.welcome().isolation && nix::unistd::geteuid().is_root() {
            return Err(format!("{who} must not run as root"));
        }
        Ok(link)
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub async fn request(&self, body: RequestBody) -> Result<Reply, LinkDown> {
        if !self.connected() {
            return Err(LinkDown);
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let request_id = REQUEST_ID.try_with(|r| r.clone()).ok();
        let frame = codec::encode(&Request {
            id,
            request_id,
            body,
        })
        .map_err(|_| LinkDown)?;
        let written = self.writer.lock().expect("writer lock").write_all(&frame);
        if written.is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(LinkDown);
        }
        rx.await.map_err(|_| LinkDown)
    }

    async fn read_loop(
        &self,
        socket: tokio::io::unix::AsyncFd<OwnedFd>,
        mut frames: Frames,
        observer: Arc<dyn LinkObserver>,
    ) {
        let error = loop {
            match frames.next() {
                Ok(Some((BrokerMessage::Reply { id, body }, fds))) => {
                    observer.reply(&body);
                    let waiter = self.pending.lock().expect("pending lock").remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send(Reply { body, fds });
                    }
                    continue;
                }
                Ok(Some((BrokerMessage::Event(event), fds))) => {
                    observer.event(event, fds);
                    continue;
                }
                Ok(None) => {}
                Err(e) => break e,
            }
            let mut ready = match socket.readable().await {
                Ok(r) => r,
                Err(e) => break e,
            };
            // The socket itself stays blocking (requests are written to it with blocking
            // writes); this read does not wait (`MSG_DONTWAIT`).
            match ready.try_io(|s| frames.fill(s.get_ref().as_fd(), true)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => break e,
                Err(_would_block) => {}
            }
        };
        self.connected.store(false, Ordering::SeqCst);
        self.pending.lock().expect("pending lock").clear();
        // Without the broker this process can do nothing; the broker (if alive) starts a
        // fresh one.
        error!("broker link lost: {error}; exiting");
        std::process::exit(1);
    }
}

/// The Hello exchange, read blocking before the reader task starts.
struct FrameReader {
    sock: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    chunk: Box<[u8]>,
}

impl FrameReader {
    fn new(sock: UnixStream) -> FrameReader {
        FrameReader {
            sock,
            buf: Vec::new(),
            fds: VecDeque::new(),
            chunk: vec![0u8; CHUNK].into_boxed_slice(),
        }
    }

    fn next_blocking(&mut self) -> io::Result<(BrokerMessage, Vec<OwnedFd>)> {
        let mut frames = Frames {
            buf: std::mem::take(&mut self.buf),
            fds: std::mem::take(&mut self.fds),
            chunk: std::mem::take(&mut self.chunk),
        };
        let result = loop {
            match frames.next() {
                Ok(Some(frame)) => break Ok(frame),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match frames.fill(self.sock.as_fd(), false) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
                Ok(()) => {}
            }
        };
        (self.buf, self.fds, self.chunk) = (frames.buf, frames.fds, frames.chunk);
        result
    }
}

/// Most bytes taken from the link in one `recvmsg`.
const CHUNK: usize = 64 * 1024;

/// Frames from the link's bytes, with the fds that arrive alongside them.
struct Frames {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Kept: one allocation for the link's life, not one per read.
    chunk: Box<[u8]>,
}

impl Frames {
    /// One `recvmsg` into the buffer (end of file is an error: the broker is gone).
    fn fill(&mut self, sock: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
        let r = sys::recv_with_fds(sock, &mut self.chunk, nonblocking)?;
        if r.truncated {
            return Err(io::Error::other("fds from the broker were truncated"));
        }
        if r.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&self.chunk[..r.bytes]);
        self.fds.extend(r.fds);
        Ok(())
    }

    /// The next whole frame, if one is in.
    fn next(&mut self) -> io::Result<Option<(BrokerMessage, Vec<OwnedFd>)>> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header: [u8; HEADER_LEN] = self.buf[..HEADER_LEN].try_into().expect("header");
        let len = codec::payload_len(header).map_err(|e| io::Error::other(e.to_string()))?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg: BrokerMessage = codec::decode(&self.buf[HEADER_LEN..HEADER_LEN + len])
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.buf.drain(..HEADER_LEN + len);
        let wanted = match &msg {
            BrokerMessage::Reply {
                body: ReplyBody::Spawned(info) | ReplyBody::Adopted(info),
                ..
            } => info.fds.count(),
            BrokerMessage::Reply {
                body: ReplyBody::Connection,
                ..
            }
            | BrokerMessage::Event(Event::Connection { .. }) => 1,
            _ => 0,
        };
        // The fds of a frame arrive with its first byte, which is already read.
        if self.fds.len() < wanted {
            return Err(io::Error::other(format!(
                "broker announced {wanted} fds, {} arrived",
                self.fds.len()
            )));
        }
        Ok(Some((msg, self.fds.drain(..wanted).collect())))
    }
}

/// `tokio::spawn`, keeping the current [`REQUEST_ID`] (if any) for the spawned work: a
/// task's run or a terminal's lifetime still belongs to the request that started it.
pub fn spawn_traced<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match REQUEST_ID.try_with(|r| r.clone()) {
        Ok(id) => tokio::spawn(REQUEST_ID.scope(id, work)),
        Err(_) => tokio::spawn(work),
    }
}
