//! `stoa.term.v1`: the terminal WebSocket protocol. Binary frames only; each frame is a
//! 1-byte type and fixed little-endian fields, then (for some types) raw bytes to the end.
//! Offsets count the terminal's output bytes since it started.
//!
//! | type | direction | name     | fields                                                                  |
//! |------|-----------|----------|-------------------------------------------------------------------------|
//! | 0x01 | c → s     | HELLO    | resume: u64 (`u64::MAX`: from now), cols: u16, rows: u16, want_write: u8 |
//! | 0x02 | c → s     | INPUT    | bytes (ignored, with one ERROR, for a read-only viewer)                  |
//! | 0x03 | c → s     | RESIZE   | cols: u16, rows: u16                                                    |
//! | 0x04 | c → s     | ACK      | consumed: u64 (cumulative offset the client has processed)              |
//! | 0x05 | c → s     | SIGNAL   | signal: u8 (Linux number; HUP INT QUIT KILL TERM CONT STOP TSTP WINCH)  |
//! | 0x06 | c → s     | PING     | t: u64                                                                  |
//! | 0x81 | s → c     | WELCOME  | can_write: u8, window: u32, oldest: u64, current: u64, cols: u16, rows: u16, exit: EXIT body or nothing |
//! | 0x82 | s → c     | OUTPUT   | offset: u64, bytes                                                      |
//! | 0x83 | s → c     | SNAPSHOT | offset: u64, cols: u16, rows: u16, bytes (a screen redraw)              |
//! | 0x84 | s → c     | SIZE     | cols: u16, rows: u16                                                    |
//! | 0x85 | s → c     | EXIT     | kind: u8 (0 exited, 1 killed by a signal), code: i32                    |
//! | 0x86 | s → c     | PONG     | t: u64                                                                  |
//! | 0x87 | s → c     | ERROR    | code: u16 (1 read-only, 2 bad frame, 3 signal refused, 4 input dropped), UTF-8 message |
//!
//! HELLO comes first; a writing viewer's HELLO size is applied like a RESIZE. A viewer may
//! have at most `window` bytes sent and not acknowledged; while a writing viewer is out of
//! credit the server stops reading the terminal (a flood blocks, and input still goes
//! through). A read-only viewer never holds the program up: when it falls behind what the
//! server keeps, it gets a SNAPSHOT and continues from there. EXIT comes only after all
//! output was read; the server then closes (1000) and waits for the client's close.
//!
//! Frames from a client are handled in order, and answered in order: so a PING sent after an
//! INPUT gets its PONG after any ERROR for that INPUT. Input a program does not read is held
//! up to 4 MiB per terminal; beyond that an INPUT is dropped with ERROR 4 (input dropped),
//! and a client that must not lose input sends it again (PING after INPUT tells it when to
//! look).
//!
//! Offsets only grow, also across a daemon restart, and stay below 2^53 (exact in a
//! browser's numbers). The output kept lives in a ring the broker holds for the terminal,
//! so a restarted daemon continues from the same offsets with the same bytes: a client
//! resuming from the last offset it received gets exactly what followed. (Should that ring
//! be unusable, the restarted daemon continues 4 GiB past the last offset it recorded, at
//! most a second before.) A client resuming from an offset the server no longer holds
//! always gets a SNAPSHOT (a terminal reset, then the output still kept), never skipped
//! output.
#![forbid(unsafe_code)]

pub const SUBPROTOCOL: &str = "stoa.term.v1";

/// Offset meaning "no resume: start from what is current".
pub const FROM_NOW: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Hello {
        resume: u64,
        cols: u16,
        rows: u16,
        want_write: bool,
    },
    Input(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    Ack {
        consumed: u64,
    },
    Signal(u8),
    Ping(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Welcome {
        can_write: bool,
        window: u32,
        oldest: u64,
        current: u64,
        cols: u16,
        rows: u16,
        exit: Option<Exit>,
    },
    Output {
        offset: u64,
        bytes: Vec<u8>,
    },
    Snapshot {
        offset: u64,
        cols: u16,
        rows: u16,
        bytes: Vec<u8>,
    },
    Size {
        cols: u16,
        rows: u16,
    },
    Exit(Exit),
    Pong(u64),
    Error {
        code: u16,
        message: String,
    },
}

/// Error codes in ERROR frames.
pub mod error {
    pub const READ_ONLY: u16 = 1;
    pub const BAD_FRAME: u16 = 2;
    pub const SIGNAL_REFUSED: u16 = 3;
    /// Input arrived faster than the program reads it, past the server's queue.
    pub const INPUT_DROPPED: u16 = 4;
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("frame too short".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes).to_vec()
    }
    fn end(&self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes in frame".into())
        }
    }
}

impl ClientFrame {
    pub fn decode(frame: &[u8]) -> Result<ClientFrame, String> {
        let (&kind, body) = frame.split_first().ok_or("empty frame")?;
        let mut r = Reader { bytes: body };
        let f = match kind {
            0x01 => ClientFrame::Hello {
                resume: r.u64()?,
                cols: r.u16()?,
                rows: r.u16()?,
                want_write: r.u8()? != 0,
            },
            0x02 => return Ok(ClientFrame::Input(r.rest())),
            0x03 => ClientFrame::Resize {
                cols: r.u16()?,
                rows: r.u16()?,
            },
            0x04 => ClientFrame::Ack { consumed: r.u64()? },
            0x05 => ClientFrame::Signal(r.u8()?),
            0x06 => ClientFrame::Ping(r.u64()?),
            other => return Err(format!("unknown frame type 0x{other:02x}")),
        };
        r.end()?;
        Ok(f)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ClientFrame::Hello {
                resume,
                cols,
                rows,
                want_write,
            } => {
                out.push(0x01);
                out.extend(resume.to_le_bytes());
                out.extend(cols.to_le_bytes());
                out.extend(rows.to_le_bytes());
                out.push(u8::from(*want_write));
            }
            ClientFrame::Input(bytes) => {
                out.push(0x02);
                out.extend(bytes);
            }
            ClientFrame::Resize { cols, rows } => {
                out.push(0x03);
                out.extend(cols.to_le_bytes());
                out.extend(rows.to_le_bytes());
            }
            ClientFrame::Ack { consumed } => {
                out.push(0x04);
                out.extend(consumed.to_le_bytes());
            }
            ClientFrame::Signal(sig) => out.extend([0x05, *sig]),
            ClientFrame::Ping(t) => {
                out.push(0x06);
                out.extend(t.to_le_bytes());
            }
        }
        out
    }
}

fn encode_exit(out: &mut Vec<u8>, exit: Exit) {
    let (kind, code) = match exit {
        Exit::Code(c) => (0u8, c),
        Exit::Signal(s) => (1u8, s),
    };
    out.push(kind);
    out.extend(code.to_le_bytes());
}

fn decode_exit(r: &mut Reader<'_>) -> Result<Exit, String> {
    match (r.u8()?, r.i32()?) {
        (0, c) => Ok(Exit::Code(c)),
        (1, s) => Ok(Exit::Signal(s)),
        (k, _) => Err(format!("unknown exit kind {k}")),
    }
}

impl ServerFrame {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ServerFrame::Welcome {
                can_write,
                window,
                oldest,
                current,
                cols,
                rows,
                exit,
            } => {
                out.push(0x81);
                out.push(u8::from(*can_write));
                out.extend(window.to_le_bytes());
                out.extend(oldest.to_le_bytes());
                out.extend(current.to_le_bytes());
                out.extend(cols.to_le_bytes());
                out.extend(rows.to_le_bytes());
                if let Some(e) = exit {
                    encode_exit(&mut out, *e);
                }
            }
            ServerFrame::Output { offset, bytes } => {
                out.reserve(9 + bytes.len());
                out.push(0x82);
                out.extend(offset.to_le_bytes());
                out.extend(bytes);
            }
            ServerFrame::Snapshot {
                offset,
                cols,
                rows,
                bytes,
            } => {
                out.push(0x83);
                out.extend(offset.to_le_bytes());
                out.extend(cols.to_le_bytes());
                out.extend(rows.to_le_bytes());
                out.extend(bytes);
            }
            ServerFrame::Size { cols, rows } => {
                out.push(0x84);
                out.extend(cols.to_le_bytes());
                out.extend(rows.to_le_bytes());
            }
            ServerFrame::Exit(e) => {
                out.push(0x85);
                encode_exit(&mut out, *e);
            }
            ServerFrame::Pong(t) => {
                out.push(0x86);
                out.extend(t.to_le_bytes());
            }
            ServerFrame::Error { code, message } => {
                out.push(0x87);
                out.extend(code.to_le_bytes());
                out.extend(message.as_bytes());
            }
        }
        out
    }

    pub fn decode(frame: &[u8]) -> Result<ServerFrame, String> {
        let (&kind, body) = frame.split_first().ok_or("empty frame")?;
        let mut r = Reader { bytes: body };
        let f = match kind {
            0x81 => {
                let (can_write, window, oldest, current, cols, rows) = (
                    r.u8()? != 0,
                    r.u32()?,
                    r.u64()?,
                    r.u64()?,
                    r.u16()?,
                    r.u16()?,
                );
                let exit = if r.bytes.is_empty() {
                    None
                } else {
                    Some(decode_exit(&mut r)?)
                };
                ServerFrame::Welcome {
                    can_write,
                    window,
                    oldest,
                    current,
                    cols,
                    rows,
                    exit,
                }
            }
            0x82 => {
                return Ok(ServerFrame::Output {
                    offset: r.u64()?,
                    bytes: r.rest(),
                })
            }
            0x83 => {
                let (offset, cols, rows) = (r.u64()?, r.u16()?, r.u16()?);
                return Ok(ServerFrame::Snapshot {
                    offset,
                    cols,
                    rows,
                    bytes: r.rest(),
                });
            }
            0x84 => ServerFrame::Size {
                cols: r.u16()?,
                rows: r.u16()?,
            },
            0x85 => ServerFrame::Exit(decode_exit(&mut r)?),
            0x86 => ServerFrame::Pong(r.u64()?),
            0x87 => {
                let code = r.u16()?;
                return Ok(ServerFrame::Error {
                    code,
                    message: String::from_utf8_lossy(&r.rest()).into_owned(),
                });
            }
            other => return Err(format!("unknown frame type 0x{other:02x}")),
        };
        r.end()?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_round_trip() {
        for f in [
            ClientFrame::Hello {
                resume: FROM_NOW,
                cols: 80,
                rows: 24,
                want_write: true,
            },
            ClientFrame::Input(b"ls\r".to_vec()),
            ClientFrame::Input(vec![]),
            ClientFrame::Resize {
                cols: 120,
                rows: 40,
            },
            ClientFrame::Ack { consumed: 1 << 40 },
            ClientFrame::Signal(2),
            ClientFrame::Ping(7),
        ] {
            assert_eq!(ClientFrame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn server_frames_round_trip() {
        for f in [
            ServerFrame::Welcome {
                can_write: true,
                window: 2 << 20,
                oldest: 3,
                current: 9,
                cols: 80,
                rows: 24,
                exit: None,
            },
            ServerFrame::Welcome {
                can_write: false,
                window: 1,
                oldest: 0,
                current: 0,
                cols: 1,
                rows: 1,
                exit: Some(Exit::Signal(9)),
            },
            ServerFrame::Output {
                offset: 5,
                bytes: vec![0xe2, 0x82],
            },
            ServerFrame::Snapshot {
                offset: 5,
                cols: 80,
                rows: 24,
                bytes: b"\x1b[H".to_vec(),
            },
            ServerFrame::Size { cols: 1, rows: 2 },
            ServerFrame::Exit(Exit::Code(3)),
            ServerFrame::Pong(1),
            ServerFrame::Error {
                code: error::READ_ONLY,
                message: "read-only".into(),
            },
        ] {
            assert_eq!(ServerFrame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(ClientFrame::decode(&[]).is_err());
        assert!(ClientFrame::decode(&[0x01, 1, 2]).is_err());
        assert!(ClientFrame::decode(&[0x03, 1, 0, 2, 0, 9]).is_err());
        assert!(ClientFrame::decode(&[0x7f]).is_err());
    }
}
