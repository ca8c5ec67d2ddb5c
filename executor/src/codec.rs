//! Frames: a `u32` big-endian payload length, then a bincode 2 payload.
//!
//! The length is checked against [`MAX_FRAME`] before anything is allocated, bincode is
//! configured with the same byte limit (without it one hostile length prefix inside the
//! payload aborts the process, see research/deps.md §1), and trailing bytes are an error.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};

use bincode::{Decode, Encode};

/// The largest payload any stoa channel accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The one bincode configuration: little-endian varints, at most [`MAX_FRAME`] bytes claimed.
pub fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

#[derive(Debug)]
pub enum FrameError {
    /// The peer announced a payload larger than [`MAX_FRAME`].
    TooLarge(usize),
    /// The payload is not a valid message (unknown variant, truncated, over the limit).
    Decode(bincode::error::DecodeError),
    /// The payload decoded but left bytes unread.
    Trailing {
        used: usize,
        len: usize,
    },
    /// The channel closed cleanly before a frame started.
    Eof,
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge(n) => {
                write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            }
            FrameError::Decode(e) => write!(f, "undecodable payload: {e}"),
            FrameError::Trailing { used, len } => {
                write!(
                    f,
                    "payload has {} trailing bytes after a {used}-byte message",
                    len - used
                )
            }
            FrameError::Eof => write!(f, "channel closed"),
            FrameError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Encodes `msg` as a whole frame (header + payload).
pub fn encode<T: Encode>(msg: &T) -> io::Result<Vec<u8>> {
    let mut frame = vec![0u8; HEADER_LEN];
    bincode::encode_into_std_write(msg, &mut frame, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = frame.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            FrameError::TooLarge(len).to_string(),
        ));
    }
    frame[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Reads a frame header and returns the payload length it announces, checked.
pub fn payload_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one payload; every byte must belong to the message.
pub fn decode<T: Decode<()>>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let (msg, used) = bincode::decode_from_slice(payload, config()).map_err(FrameError::Decode)?;
    if used != payload.len() {
        return Err(FrameError::Trailing {
            used,
            len: payload.len(),
        });
    }
    Ok(msg)
}

/// Blocking read of one frame.
pub fn read_frame<R: Read, T: Decode<()>>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = payload_len(header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    decode(&payload)
}

/// Blocking write of one frame.
pub fn write_frame<W: Write, T: Encode>(w: &mut W, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Encode, Decode, Debug, PartialEq)]
    enum Msg {
        Bytes(Vec<u8>),
        Pair(u32, String),
    }

    #[test]
    fn round_trip() {
        let m = Msg::Pair(7, "x".into());
        let frame = encode(&m).unwrap();
        let got: Msg = read_frame(&mut &frame[..]).unwrap();
        assert_eq!(got, m);
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let frame = [0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(matches!(
            read_frame::<_, Msg>(&mut &frame[..]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn hostile_inner_length_is_refused() {
        // Variant 0 (Bytes) followed by a varint length of 2^40: without the limit bincode
        // would try to allocate a terabyte.
        let mut payload = vec![0u8, 253];
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode::<Msg>(&payload),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode(&Msg::Bytes(vec![1, 2])).unwrap();
        frame.push(9);
        assert!(matches!(
            decode::<Msg>(&frame[HEADER_LEN..]),
            Err(FrameError::Trailing { .. })
        ));
    }

    #[test]
    fn unknown_variant_is_refused() {
        assert!(matches!(decode::<Msg>(&[200]), Err(FrameError::Decode(_))));
    }

    #[test]
    fn truncated_payload_is_refused() {
        let frame = encode(&Msg::Pair(7, "hello".into())).unwrap();
        assert!(matches!(
            decode::<Msg>(&frame[HEADER_LEN..frame.len() - 2]),
            Err(FrameError::Decode(_))
        ));
    }
}
