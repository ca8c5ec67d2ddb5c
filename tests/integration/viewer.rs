//! A `stoa.term.v1` client for the tests: a terminal's WebSocket, the output it received
//! (with offsets, jumps and snapshots) and whether it was closed.
#![forbid(unsafe_code)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use stoa::terminal::protocol::{ClientFrame, ServerFrame, FROM_NOW};

use crate::harness::Instance;

pub struct Viewer {
    pub ws: tungstenite::WebSocket<TcpStream>,
    pub output: Vec<u8>,
    /// Offset just past the last OUTPUT byte received.
    pub offset: u64,
    pub snapshots: usize,
    /// OUTPUT frames that did not start where the previous one ended: (expected, got).
    pub jumps: Vec<(u64, u64)>,
    /// The connection ended (a close frame, or the stream cut).
    pub closed: bool,
    /// The server sent a close frame.
    pub close_frame: bool,
    pub acking: bool,
}

pub fn connect(stoa: &Instance, id: &str, token: &str) -> Viewer {
    let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws", stoa.port);
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("Sec-WebSocket-Protocol", "stoa.term.v1".parse().unwrap());
    headers.insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", stoa.port)).unwrap();
    let (ws, _) = tungstenite::client::client(request, stream)
        .unwrap_or_else(|e| panic!("WebSocket to terminal {id}: {e}"));
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    Viewer {
        ws,
        output: Vec::new(),
        offset: 0,
        snapshots: 0,
        jumps: Vec::new(),
        closed: false,
        close_frame: false,
        acking: true,
    }
}

impl Viewer {
    pub fn send(&mut self, f: ClientFrame) {
        self.ws.send(Message::Binary(f.encode().into())).unwrap();
    }

    /// HELLO; returns the WELCOME's (oldest, current).
    pub fn hello(&mut self, resume: u64, want_write: bool) -> (u64, u64) {
        self.send(ClientFrame::Hello {
            resume,
            cols: 80,
            rows: 24,
            want_write,
        });
        match self.next(Duration::from_secs(10)) {
            Some(ServerFrame::Welcome {
                oldest, current, ..
            }) => {
                self.offset = if resume == FROM_NOW { current } else { resume };
                (oldest, current)
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    pub fn type_text(&mut self, text: &str) {
        self.send(ClientFrame::Input(text.as_bytes().to_vec()));
    }

    /// The next frame (recording output), or None after `wait` or once closed.
    pub fn next(&mut self, wait: Duration) -> Option<ServerFrame> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.closed {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let frame = ServerFrame::decode(&b).expect("server frame");
                    match &frame {
                        ServerFrame::Output { offset, bytes } => {
                            if *offset != self.offset {
                                self.jumps.push((self.offset, *offset));
                            }
                            self.output.extend_from_slice(bytes);
                            self.offset = offset + bytes.len() as u64;
                            if self.acking {
                                let consumed = self.offset;
                                let _ = self.ws.send(Message::Binary(
                                    ClientFrame::Ack { consumed }.encode().into(),
                                ));
                            }
                        }
                        ServerFrame::Snapshot { offset, .. } => {
                            self.snapshots += 1;
                            self.offset = *offset;
                        }
                        _ => {}
                    }
                    return Some(frame);
                }
                Ok(Message::Close(_)) => {
                    self.close_frame = true;
                    self.closed = true;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
        None
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    pub fn wait_for(&mut self, needle: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline && !self.closed,
                "never saw {needle:?} (closed: {}) in {:?}",
                self.closed,
                self.text()
            );
            self.next(Duration::from_millis(100));
        }
    }
}
