//! Async reads and writes on raw fds the broker handed over (pipes, PTY masters, control
//! sockets), through tokio's `AsyncFd`. A PTY master reports `EIO` once every slave fd is
//! closed; that is its end-of-file.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;

fn nonblocking(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    stoa_executor::sys::async_fd(fd)
}

/// What reading an fd to its end gave.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    /// Up to `limit` bytes.
    pub bytes: Vec<u8>,
    /// Bytes read past the limit and dropped.
    pub dropped: u64,
}

pub struct FdReader {
    fd: AsyncFd<OwnedFd>,
}

impl FdReader {
    pub fn new(fd: OwnedFd) -> io::Result<FdReader> {
        Ok(FdReader {
            fd: nonblocking(fd)?,
        })
    }

    /// Reads some bytes; `Ok(0)` at end of file (or `EIO` on a PTY master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is there now without waiting: `Ok(None)` if nothing is.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let result = self.fd.try_io(tokio::io::Interest::READABLE, |fd| {
            nix::unistd::read(fd, buf).map_err(io::Error::from)
        });
        match result {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }

    /// Reads to the end, keeping at most `limit` bytes.
    pub async fn collect(&self, limit: usize) -> io::Result<Collected> {
        let mut out = Collected::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            let room = limit.saturating_sub(out.bytes.len());
            let keep = n.min(room);
            out.bytes.extend_from_slice(&buf[..keep]);
            out.dropped += (n - keep) as u64;
        }
    }
}

/// Writes all of `data`, then closes the fd (so a pipe reader sees end-of-file).
pub async fn write_all_and_close(fd: OwnedFd, data: &[u8]) -> io::Result<()> {
    let fd = nonblocking(fd)?;
    let mut written = 0;
    while written < data.len() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| {
            nix::unistd::write(fd.get_ref().as_fd(), &data[written..]).map_err(io::Error::from)
        }) {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Async writes to an fd (a PTY master's input side).
pub struct FdWriter {
    fd: AsyncFd<OwnedFd>,
}

impl FdWriter {
    pub fn new(fd: OwnedFd) -> io::Result<FdWriter> {
        Ok(FdWriter {
            fd: nonblocking(fd)?,
        })
    }

    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        let mut written = 0;
        while written < data.len() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref(), &data[written..]).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// One write without waiting: `Ok(None)` if the fd takes nothing now.
    pub fn try_write(&self, data: &[u8]) -> io::Result<Option<usize>> {
        let result = self.fd.try_io(tokio::io::Interest::WRITABLE, |fd| {
            nix::unistd::write(fd, data).map_err(io::Error::from)
        });
        match result {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn raw(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
