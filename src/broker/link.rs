//! The broker's end of the daemon link: non-blocking, so a stalled or hostile daemon can
//! never stall the broker's loop (reaping, other work). Incoming bytes are framed here;
//! outgoing frames queue with the fds they carry until the socket takes them.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use stoa_executor::codec::{self, FrameError, HEADER_LEN, MAX_FRAME};
use stoa_executor::sys;

/// A frame that has started must finish within this time; a daemon that sends half a frame
/// and stops is broken or hostile.
pub const PARTIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes queued for a daemon that does not read before it is declared stuck.
const MAX_QUEUED_BYTES: usize = 32 * MAX_FRAME;

/// Why the link is finished.
#[derive(Debug)]
pub enum LinkError {
    /// The daemon closed its end.
    Closed,
    /// The daemon sent something it never legitimately could.
    Violation(String),
    Io(io::Error),
}

struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

pub struct Link {
    sock: UnixStream,
    inbuf: Vec<u8>,
    partial_since: Option<Instant>,
    out: VecDeque<Outgoing>,
    queued_bytes: usize,
}

impl Link {
    pub fn new(sock: UnixStream) -> io::Result<Link> {
        sock.set_nonblocking(true)?;
        Ok(Link {
            sock,
            inbuf: Vec::new(),
            partial_since: None,
            out: VecDeque::new(),
            queued_bytes: 0,
        })
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// File descriptors queued and not yet sent (a peer that does not read must not make
    /// the broker hold fds without bound).
    pub fn queued_fds(&self) -> usize {
        self.out.iter().map(|o| o.fds.len()).sum()
    }

    /// When the frame now in progress must be complete, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.partial_since.map(|t| t + PARTIAL_FRAME_TIMEOUT)
    }

    /// Reads what is available and returns the complete payloads, in order.
    pub fn read_payloads(&mut self) -> Result<Vec<Vec<u8>>, LinkError> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match sys::recv_with_fds(self.sock.as_fd(), &mut chunk, true) {
                Ok(r) => {
                    if !r.fds.is_empty() || r.truncated {
                        // Dropping `r.fds` closes them.
                        return Err(LinkError::Violation(format!(
                            "daemon sent {} file descriptor(s){}",
                            r.fds.len(),
                            if r.truncated {
                                " (control data truncated)"
                            } else {
                                ""
                            }
                        )));
                    }
                    if r.bytes == 0 {
                        return Err(LinkError::Closed);
                    }
                    self.inbuf.extend_from_slice(&chunk[..r.bytes]);
                    // Check the header as soon as it is here, before buffering a body.
                    self.check_header()?;
                    if self.inbuf.len() > HEADER_LEN + MAX_FRAME + chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LinkError::Io(e)),
            }
        }
        let mut payloads = Vec::new();
        loop {
            if self.inbuf.len() < HEADER_LEN {
                break;
            }
            let len = self.check_header()?;
            if self.inbuf.len() < HEADER_LEN + len {
                break;
            }
            payloads.push(self.inbuf[HEADER_LEN..HEADER_LEN + len].to_vec());
            self.inbuf.drain(..HEADER_LEN + len);
        }
        self.partial_since = if self.inbuf.is_empty() {
            None
        } else {
            Some(self.partial_since.unwrap_or_else(Instant::now))
        };
        Ok(payloads)
    }

    fn check_header(&self) -> Result<usize, LinkError> {
        if self.inbuf.len() < HEADER_LEN {
            return Ok(0);
        }
        let header: [u8; HEADER_LEN] = self.inbuf[..HEADER_LEN].try_into().expect("header");
        codec::payload_len(header).map_err(|e: FrameError| LinkError::Violation(e.to_string()))
    }

    /// Queues a frame (and the fds riding on its first byte), then tries to send.
    pub fn send(&mut self, frame: Vec<u8>, fds: Vec<OwnedFd>) -> Result<(), LinkError> {
        self.queued_bytes += frame.len();
        if self.queued_bytes > MAX_QUEUED_BYTES {
            return Err(LinkError::Violation(format!(
                "daemon is not reading: {} bytes queued",
                self.queued_bytes
            )));
        }
        self.out.push_back(Outgoing {
            bytes: frame,
            sent: 0,
            fds,
        });
        self.flush()
    }

    /// Sends as much of the queue as the socket takes now.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        while let Some(front) = self.out.front_mut() {
            let fds: Vec<_> = if front.sent == 0 {
                front.fds.iter().map(|f| f.as_fd()).collect()
            } else {
                Vec::new()
            };
            match sys::send_with_fds(self.sock.as_fd(), &front.bytes[front.sent..], &fds, true) {
                Ok(n) => {
                    front.sent += n;
                    if n > 0 {
                        // The fds went with the first byte; our copies can close.
                        front.fds.clear();
                    }
                    if front.sent == front.bytes.len() {
                        self.queued_bytes -= front.bytes.len();
                        self.out.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(LinkError::Closed),
                Err(e) => return Err(LinkError::Io(e)),
            }
        }
        Ok(())
    }
}
