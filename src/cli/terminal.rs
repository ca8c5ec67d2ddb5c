//! `stoa terminal open|list|attach|kill`: a terminal on the server, in this terminal.
//!
//! `open` and `attach` speak `stoa.term.v1` (`crate::terminal::protocol`) over the
//! terminal's WebSocket. When stdin is a terminal it is put in raw mode (and always put
//! back: on exit, on errors, on SIGTERM/SIGHUP/SIGINT/SIGQUIT, on panics); its keys go to
//! the remote program as INPUT and its size changes (SIGWINCH) as RESIZE. OUTPUT goes to
//! stdout from a thread of its own and is acknowledged once written, so the server never
//! runs more than a window ahead of what this terminal shows. On EXIT the remote exit
//! status becomes ours (a signal: 128 + its number).
//!
//! A connection that ends without EXIT (the daemon restarted: the program keeps running)
//! is resumed from the last offset received, for up to [`RECONNECT_FOR`]. Enter `~` `.`
//! detaches, as in ssh (`~~` sends one `~`); the terminal keeps running. A viewer
//! (`attach --view`) detaches with `q` or Ctrl-C too.
//!
//! Without a terminal on stdin (pipes, scripts) stdin is forwarded as it is until its end,
//! which does not end the remote program; SIGINT, SIGTERM, SIGHUP or SIGQUIT is passed on
//! to it once (a second one detaches). With a terminal, they detach (the terminal keeps
//! running: `stoa terminal attach` it again).
//!
//! Exit codes: the remote program's; 0 after a detach; 125 for stoa's own errors (as
//! `stoa exec`), a lost connection included: 1 could be the program's own.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::client::Client;
use crate::terminal::protocol::{error, ClientFrame, Exit, ServerFrame, FROM_NOW, SUBPROTOCOL};

/// Exit code for stoa's own errors (as `stoa exec`).
const STOA_ERROR: u8 = 125;
/// Acknowledge at least every this many bytes written (less with a small window).
const ACK_EVERY: u64 = 64 * 1024;
/// How long to keep trying to reconnect after the connection was lost.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// Say that we are reconnecting when it takes longer than this.
const RECONNECT_QUIET: Duration = Duration::from_secs(1);
/// A PING this often; a connection silent for `DEAD_AFTER` is lost.
const PING_EVERY: Duration = Duration::from_secs(15);
const DEAD_AFTER: Duration = Duration::from_secs(45);
/// Most time for a connection and its handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most input in one frame.
const MAX_INPUT_FRAME: usize = 64 * 1024;
/// Waits before sending dropped input again.
const INPUT_RETRY_MIN: Duration = Duration::from_millis(10);
const INPUT_RETRY_MAX: Duration = Duration::from_millis(200);
/// Keep-alive PINGs have this bit set (input PINGs count from 1).
const KEEPALIVE: u64 = 1 << 63;
/// The same ERROR is shown at most this often.
const SAY_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// After EXIT, how long to wait for the server's close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Subcommand)]
pub enum TerminalCommand {
    /// Start a terminal on the server and use it from this one; exits with its exit code.
    /// Enter ~ . detaches (it keeps running; `stoa terminal attach` it again).
    Open {
        /// Start in this agent session's worktree, as its Unix user.
        #[arg(long, conflicts_with_all = ["user", "cwd"])]
        session: Option<String>,
        /// The Unix user (default: your token's; required with the admin token).
        #[arg(long, short)]
        user: Option<String>,
        /// Working directory (default: the user's home).
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment, NAME=VALUE (repeatable). TERM is this terminal's by default.
        #[arg(long = "env", short = 'e', value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// The command and its arguments, after `--` (default: the user's login shell).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Your terminals (admins: all).
    List {
        /// The full records, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Use a running terminal from this one. Enter ~ . detaches.
    Attach {
        /// The terminal's id (`stoa terminal list`).
        id: String,
        /// Watch only: keys are not sent (q or Ctrl-C detaches).
        #[arg(long)]
        view: bool,
    },
    /// End a terminal: SIGHUP, then SIGTERM, then SIGKILL to its processes.
    Kill {
        /// The terminal's id (`stoa terminal list`).
        id: String,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("stoa terminal: {message}");
    ExitCode::from(STOA_ERROR)
}

pub fn run(cmd: TerminalCommand) -> ExitCode {
    let client = match Client::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        TerminalCommand::Open {
            session,
            user,
            cwd,
            env,
            command,
        } => open(&client, session, user, cwd, env, command),
        TerminalCommand::List { json } => list(&client, json),
        TerminalCommand::Attach { id, view } => attach(&client, &id, view, false),
        TerminalCommand::Kill { id } => match client.delete(&format!("/terminals/{id}")) {
            Ok(_) => {
                eprintln!("terminal {id} ended");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.message),
        },
    }
}

fn open(
    client: &Client,
    session: Option<String>,
    user: Option<String>,
    cwd: Option<String>,
    env: Vec<(String, String)>,
    command: Vec<String>,
) -> ExitCode {
    let local = size_fd();
    let (cols, rows) = local_size(local.as_ref()).unwrap_or((80, 24));
    let mut vars = Map::new();
    if local.is_some() {
        // As ssh does: the remote programs should know what they are drawing on.
        for name in ["TERM", "COLORTERM"] {
            if let Ok(v) = std::env::var(name) {
                if !v.is_empty() {
                    vars.insert(name.into(), v.into());
                }
            }
        }
    }
    for (k, v) in env {
        vars.insert(k, v.into());
    }
    let mut body = json!({ "cols": cols, "rows": rows, "env": vars });
    if let Some(s) = session {
        body["session_id"] = s.into();
    }
    if let Some(u) = user {
        body["unix_user"] = u.into();
    }
    if let Some(d) = cwd {
        let d = match std::path::absolute(&d) {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => return fail(format!("--cwd {d}: {e}")),
        };
        body["cwd"] = d.into();
    }
    if !command.is_empty() {
        body["command"] = command.into();
    }
    let created = match client.post("/terminals", &body) {
        Ok(v) => v,
        Err(e) => return fail(e.message),
    };
    let Some(id) = created["terminal_id"].as_str() else {
        return fail(format!("unexpected reply: {created}"));
    };
    attach(client, id, false, true)
}

fn list(client: &Client, as_json: bool) -> ExitCode {
    let all = match client.get("/terminals") {
        Ok(v) => v,
        Err(e) => return fail(e.message),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let mut rows = Vec::new();
    for t in all.as_array().into_iter().flatten() {
        let status = match (t["running"].as_bool(), &t["exit_code"], &t["signal"]) {
            (Some(true), _, _) => "running".to_string(),
            (_, Value::Number(c), _) => format!("exit {c}"),
            (_, _, Value::Number(s)) => format!("signal {s}"),
            _ => "ended".to_string(),
        };
        let command = match t["command"].as_array() {
            Some(argv) => argv
                .iter()
                .map(|a| a.as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(" "),
            None => "(login shell)".into(),
        };
        let cell = super::table::cell;
        // Cells are escaped by the table: any user's command and names.
        rows.push(vec![
            cell(&t["terminal_id"]),
            cell(&t["unix_user"]),
            cell(&t["pid"]),
            format!("{}x{}", t["cols"], t["rows"]),
            status,
            cell(&t["viewers"]),
            command,
        ]);
    }
    super::table::print(
        &[
            "TERMINAL", "USER", "PID", "SIZE", "STATUS", "VIEWERS", "COMMAND",
        ],
        &rows,
    );
    ExitCode::SUCCESS
}

// ---- the local terminal -----------------------------------------------------------------

/// The terminal whose size is ours: stdin's, else stdout's.
fn size_fd() -> Option<OwnedFd> {
    if std::io::stdin().is_terminal() {
        std::io::stdin().as_fd().try_clone_to_owned().ok()
    } else if std::io::stdout().is_terminal() {
        std::io::stdout().as_fd().try_clone_to_owned().ok()
    } else {
        None
    }
}

/// (cols, rows) of a terminal.
fn local_size(fd: Option<&OwnedFd>) -> Option<(u16, u16)> {
    let (rows, cols) = stoa_executor::sys::window_size(fd?.as_fd()).ok()?;
    (rows > 0 && cols > 0).then_some((cols, rows))
}

/// stdin in raw mode while this lives; put back as it was when dropped.
struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode, String> {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("stdin: {e}"))?;
        let saved = termios::tcgetattr(&fd).map_err(|e| format!("terminal settings: {e}"))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSADRAIN, &raw).map_err(|e| format!("raw mode: {e}"))?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSANOW: never wait on a terminal that does not drain.
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// A piece of output for stdout; `end` is the offset after it.
struct Chunk {
    end: u64,
    bytes: Vec<u8>,
}

enum Written {
    Upto(u64),
    Failed(String),
}

/// Writes output to stdout (unbuffered, on a duplicate of its fd) and reports what is out.
fn spawn_writer(
    out: OwnedFd,
    chunks: std::sync::mpsc::Receiver<Chunk>,
    written: mpsc::UnboundedSender<Written>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut out = std::fs::File::from(out);
        for chunk in chunks {
            if let Err(e) = out.write_all(&chunk.bytes) {
                let _ = written.send(Written::Failed(e.to_string()));
                return;
            }
            let _ = written.send(Written::Upto(chunk.end));
        }
    })
}

/// Reads stdin until its end; the channel closes then. Not joined: a read of a terminal
/// cannot be interrupted, and the process exits around it.
fn spawn_stdin(tx: mpsc::Sender<Vec<u8>>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
}

/// Enter `~` `.` detaches; `~~` sends one `~`; a `~` followed by anything else is sent
/// as it is. Only at the start of a line (and of the session), as in ssh.
struct Escape {
    line_start: bool,
    tilde: bool,
}

impl Escape {
    fn new() -> Escape {
        Escape {
            line_start: true,
            tilde: false,
        }
    }

    /// The bytes to send, and whether to detach (what follows the escape is dropped).
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

/// Whether the remote program left the alternate screen on (vim, less, htop…), from the
/// last switch in `bytes`, if any.
fn alt_screen_switch(bytes: &[u8]) -> Option<bool> {
    bytes.windows(8).rev().find_map(|w| {
        let mode = w.starts_with(b"\x1b[?1049") || w.starts_with(b"\x1b[?1047");
        match (mode, w[7]) {
            (true, b'h') => Some(true),
            (true, b'l') => Some(false),
            _ => None,
        }
    })
}

// ---- the connection ---------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

enum ConnectError {
    /// Worth trying again (the daemon is restarting).
    Retry(String),
    Fatal(String),
}

/// The WebSocket of a terminal, with the token and the subprotocol.
async fn connect(url: &str, token: &str) -> Result<Ws, ConnectError> {
    // A daemon that is gone while its listening socket is not answers nothing.
    tokio::time::timeout(CONNECT_TIMEOUT, connect_now(url, token))
        .await
        .unwrap_or_else(|_| Err(ConnectError::Retry("the daemon does not answer".into())))
}

async fn connect_now(url: &str, token: &str) -> Result<Ws, ConnectError> {
    let fatal = |e: String| ConnectError::Fatal(e);
    let mut request = url
        .into_client_request()
        .map_err(|e| fatal(format!("{url}: {e}")))?;
    let headers = request.headers_mut();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| fatal("the token is not a valid header".into()))?,
    );
    headers.insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let uri = request.uri();
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| ConnectError::Retry(format!("cannot reach the stoa daemon: {e}")))?;
    let _ = tcp.set_nodelay(true);
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let text = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| "refused".into());
            let message = format!("{text} (HTTP {status})");
            if status >= 500 {
                Err(ConnectError::Retry(message))
            } else {
                Err(ConnectError::Fatal(message))
            }
        }
        Err(e @ (tungstenite::Error::Io(_) | tungstenite::Error::ConnectionClosed)) => {
            Err(ConnectError::Retry(e.to_string()))
        }
        Err(e) => Err(fatal(format!("WebSocket: {e}"))),
    }
}

/// How an attachment ended.
enum End {
    Exit(Exit),
    Detached,
    /// Our own process got this signal.
    Signal(i32),
    Lost(String),
    Failed(String),
}

/// How one connection ended.
enum Step {
    End(End),
    /// Closed without EXIT: reconnect, resuming (offsets only grow, also across daemon
    /// restarts).
    Lost(String),
}

/// The signals that end an attachment (the terminal keeps running).
struct Signals(Vec<(i32, Signal)>);

impl Signals {
    fn new() -> std::io::Result<Signals> {
        let mut v = Vec::new();
        for (n, kind) in [
            (libc::SIGTERM, SignalKind::terminate()),
            (libc::SIGHUP, SignalKind::hangup()),
            (libc::SIGINT, SignalKind::interrupt()),
            (libc::SIGQUIT, SignalKind::quit()),
        ] {
            v.push((n, signal(kind)?));
        }
        Ok(Signals(v))
    }

    async fn recv(&mut self) -> i32 {
        let waits = self.0.iter_mut().map(|(n, s)| {
            let n = *n;
            Box::pin(async move {
                s.recv().await;
                n
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct Session {
    url: String,
    token: String,
    want_write: bool,
    /// stdin is a terminal (raw mode, escape keys).
    interactive: bool,
    size_fd: Option<OwnedFd>,
    size: (u16, u16),
    /// Offset after the output handed to the writer.
    received: u64,
    /// HELLO's resume for the next connection.
    resume: u64,
    /// Set once a connection was welcomed (later failures are reconnected).
    attached: bool,
    /// The current connection was welcomed.
    welcomed: bool,
    /// "reconnecting…" was said.
    announced: bool,
    /// Signals passed on to the program (without a terminal).
    passed_on: Vec<i32>,
    /// When an ERROR of each code was last shown.
    said: HashMap<u16, Instant>,
    alt_screen: bool,
    out: std::sync::mpsc::Sender<Chunk>,
    written: mpsc::UnboundedReceiver<Written>,
    input: Option<mpsc::Receiver<Vec<u8>>>,
    escape: Escape,
    winch: Option<Signal>,
    signals: Signals,
}

impl Session {
    async fn run(&mut self) -> End {
        let mut lost_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let failure = match connect(&self.url, &self.token).await {
                Ok(ws) => match self.serve(ws).await {
                    Step::End(end) => return end,
                    Step::Lost(why) => {
                        if std::mem::take(&mut self.welcomed) {
                            // It worked for a while: a new loss, with a fresh allowance.
                            lost_since = None;
                            backoff = Duration::from_millis(100);
                        }
                        why
                    }
                },
                Err(ConnectError::Fatal(why)) => {
                    return match lost_since {
                        None => End::Failed(why),
                        Some(_) => End::Lost(why),
                    }
                }
                Err(ConnectError::Retry(why)) => why,
            };
            if !self.attached {
                return End::Failed(failure);
            }
            let since = *lost_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= RECONNECT_FOR {
                return End::Lost(failure);
            }
            if since.elapsed() >= RECONNECT_QUIET && !self.announced {
                self.announced = true;
                eprint!("\r\nstoa: connection lost ({failure}); reconnecting…\r\n");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                n = self.signals.recv() => return End::Signal(n),
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn queue(&mut self, end: u64, bytes: Vec<u8>) -> Result<(), Step> {
        if let Some(on) = alt_screen_switch(&bytes) {
            self.alt_screen = on;
        }
        self.received = end;
        self.out
            .send(Chunk { end, bytes })
            .map_err(|_| Step::End(End::Failed("the output writer stopped".into())))
    }

    /// One connection: HELLO, then frames both ways until EXIT or the connection ends.
    async fn serve(&mut self, ws: Ws) -> Step {
        let (sink, mut ws) = ws.split();
        let mut outbox = Outbox::start(sink);
        outbox.send(ClientFrame::Hello {
            resume: self.resume,
            cols: self.size.0,
            rows: self.size.1,
            want_write: self.want_write,
        });
        let mut welcomed = false;
        let mut can_write = false;
        let mut acked = self.received;
        let mut ack_every = ACK_EVERY;
        let mut exit: Option<Exit> = None;
        let mut exit_deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        let mut last_heard = Instant::now();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let mut pings = 0u64;
        let mut inflight: Option<Inflight> = None;
        let mut input_seq = 0u64;
        let mut retry_backoff = INPUT_RETRY_MIN;
        loop {
            tokio::select! {
                msg = ws.next() => {
                    let bytes = match msg {
                        Some(Ok(Message::Binary(b))) => b,
                        Some(Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_))) => {
                            // tungstenite answers both; the stream ends after a close.
                            last_heard = Instant::now();
                            continue;
                        }
                        Some(Ok(_)) => continue,
                        None | Some(Err(_)) => {
                            if let Some(e) = exit {
                                return Step::End(End::Exit(e));
                            }
                            let why = match msg {
                                Some(Err(e)) => e.to_string(),
                                _ => "the daemon closed the connection".into(),
                            };
                            return Step::Lost(why);
                        }
                    };
                    last_heard = Instant::now();
                    let frame = match ServerFrame::decode(&bytes) {
                        Ok(f) => f,
                        Err(e) => return Step::End(End::Failed(format!("bad frame from the daemon: {e}"))),
                    };
                    match frame {
                        ServerFrame::Welcome { can_write: w, window, oldest, current, cols, rows, .. } => {
                            welcomed = true;
                            self.welcomed = true;
                            self.attached = true;
                            if std::mem::take(&mut self.announced) {
                                eprint!("stoa: reconnected\r\n");
                            }
                            can_write = w;
                            ack_every = ACK_EVERY.min(u64::from(window) / 4).max(1);
                            if self.resume == FROM_NOW || self.resume > current {
                                self.received = current;
                            } else {
                                self.received = self.resume.max(oldest).min(current);
                            }
                            acked = self.received;
                            // HELLO's size is applied (a writer's), but ours may have changed
                            // since.
                            if can_write && self.size_fd.is_some() && self.size != (cols, rows) {
                                let (cols, rows) = self.size;
                                outbox.send(ClientFrame::Resize { cols, rows });
                            }
                        }
                        ServerFrame::Output { offset, mut bytes } => {
                            let end = offset + bytes.len() as u64;
                            if end <= self.received && !bytes.is_empty() {
                                continue; // had it (a resume overlapping)
                            }
                            let skip = self.received.saturating_sub(offset) as usize;
                            bytes.drain(..skip.min(bytes.len()));
                            if let Err(step) = self.queue(end, bytes) {
                                return step;
                            }
                        }
                        ServerFrame::Snapshot { offset, bytes, .. } => {
                            // A reset and redraw; output continues from its offset.
                            if let Err(step) = self.queue(offset, bytes) {
                                return step;
                            }
                        }
                        ServerFrame::Size { .. } => {}
                        ServerFrame::Pong(t) => {
                            if let Some(f) = inflight.as_mut().filter(|f| f.seq == t) {
                                if f.dropped {
                                    f.retry = Some(tokio::time::Instant::now() + retry_backoff);
                                    retry_backoff = (retry_backoff * 2).min(INPUT_RETRY_MAX);
                                } else {
                                    inflight = None;
                                    retry_backoff = INPUT_RETRY_MIN;
                                }
                            }
                        }
                        ServerFrame::Exit(e) => {
                            exit = Some(e);
                            exit_deadline = tokio::time::Instant::now() + CLOSE_WAIT;
                        }
                        ServerFrame::Error { code, .. } if code == error::INPUT_DROPPED && inflight.as_ref().is_some_and(|f| !f.dropped && f.retry.is_none()) => {
                            // About the frame in flight (its PONG comes next): sent again.
                            if let Some(f) = inflight.as_mut() {
                                f.dropped = true;
                            }
                        }
                        ServerFrame::Error { code, message } => {
                            if !welcomed {
                                return Step::End(End::Failed(format!("the daemon refused: {message} (error {code})")));
                            }
                            // Once in a while: a paste into a busy program may be refused
                            // chunk by chunk.
                            let now = Instant::now();
                            if self.said.get(&code).is_none_or(|t| now.duration_since(*t) >= SAY_AGAIN_AFTER) {
                                self.said.insert(code, now);
                                eprint!("\r\nstoa: {message}\r\n");
                            }
                        }
                    }
                    // The next connection resumes after what we have.
                    self.resume = self.received;
                }
                // Input one frame at a time (see `Inflight`): what is typed meanwhile
                // goes in the next one, a pipe waits.
                input = recv_opt(&mut self.input), if welcomed && exit.is_none() && inflight.is_none() => {
                    let Some(mut bytes) = input else {
                        self.input = None; // stdin ended: the program goes on
                        continue;
                    };
                    while bytes.len() < MAX_INPUT_FRAME {
                        match self.input.as_mut().map(|rx| rx.try_recv()) {
                            Some(Ok(more)) => bytes.extend(more),
                            _ => break,
                        }
                    }
                    let (bytes, detach) = if self.interactive {
                        self.escape.feed(&bytes)
                    } else {
                        (bytes, false)
                    };
                    let detach = detach
                        || (self.interactive && !self.want_write && bytes.iter().any(|b| matches!(b, b'q' | 0x03)));
                    if can_write && !bytes.is_empty() {
                        input_seq += 1;
                        outbox.input(bytes.clone(), input_seq);
                        inflight = Some(Inflight { bytes, seq: input_seq, dropped: false, retry: None });
                    }
                    if detach {
                        outbox.close().await;
                        return Step::End(End::Detached);
                    }
                }
                _ = async {
                    match inflight.as_ref().and_then(|f| f.retry) {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The daemon's input queue was full: the same bytes again.
                    if let Some(f) = inflight.as_mut() {
                        input_seq += 1;
                        f.seq = input_seq;
                        f.dropped = false;
                        f.retry = None;
                        outbox.input(f.bytes.clone(), f.seq);
                    }
                }
                _ = async { self.winch.as_mut()?.recv().await }, if self.winch.is_some() => {
                    if let Some(size) = local_size(self.size_fd.as_ref()) {
                        if size != self.size {
                            self.size = size;
                            if welcomed && can_write && exit.is_none() {
                                let (cols, rows) = size;
                                outbox.send(ClientFrame::Resize { cols, rows });
                            }
                        }
                    }
                }
                w = self.written.recv() => match w {
                    Some(Written::Upto(end)) => {
                        if welcomed && exit.is_none() && end > acked
                            && (end >= self.received || end - acked >= ack_every)
                        {
                            acked = end;
                            outbox.send(ClientFrame::Ack { consumed: end });
                        }
                    }
                    Some(Written::Failed(e)) => return Step::End(End::Failed(format!("cannot write to stdout: {e}"))),
                    None => return Step::End(End::Failed("the output writer stopped".into())),
                },
                n = self.signals.recv() => {
                    // Without a terminal (a script's `stoa terminal open`), a signal is
                    // passed on once, as `docker run` does; then it detaches.
                    if !self.interactive && can_write && exit.is_none() && !self.passed_on.contains(&n) {
                        self.passed_on.push(n);
                        outbox.send(ClientFrame::Signal(n as u8));
                        continue;
                    }
                    outbox.close().await;
                    return Step::End(End::Signal(n));
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= DEAD_AFTER {
                        return Step::Lost(format!("no answer from the daemon in {} s", DEAD_AFTER.as_secs()));
                    }
                    pings += 1;
                    outbox.send(ClientFrame::Ping(KEEPALIVE | pings));
                }
                _ = tokio::time::sleep_until(exit_deadline), if exit.is_some() => {
                    return Step::End(End::Exit(exit.expect("exit")));
                }
            }
        }
    }
}

/// The input frame the daemon has not yet taken. The daemon queues input for the program
/// and drops a frame, with an ERROR (INPUT_DROPPED), when its queue is full; it handles
/// frames in order, so the ERROR for an INPUT comes before the PONG of the PING sent
/// right after it. So each INPUT is followed by a PING, the next INPUT waits for its PONG,
/// and a dropped one is sent again a little later: piped input arrives whole and in order
/// however slowly the program reads (what was in flight when a connection is lost may
/// be lost with it).
struct Inflight {
    bytes: Vec<u8>,
    seq: u64,
    dropped: bool,
    /// When to send it again.
    retry: Option<tokio::time::Instant>,
}

/// The sending half of a connection, on a task of its own so that sending never stops
/// the reading (both sides blocked on full buffers would be a deadlock). Control frames
/// (ACK, RESIZE, PING, close) go before input.
struct Outbox {
    control: mpsc::UnboundedSender<Message>,
    input: mpsc::UnboundedSender<(Vec<u8>, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Outbox {
    fn start(mut sink: futures_util::stream::SplitSink<Ws, Message>) -> Outbox {
        let (control, mut control_rx) = mpsc::unbounded_channel::<Message>();
        let (input, mut input_rx) = mpsc::unbounded_channel::<(Vec<u8>, u64)>();
        let task = tokio::spawn(async move {
            loop {
                let msgs = tokio::select! {
                    biased;
                    m = control_rx.recv() => match m {
                        Some(m) => vec![m],
                        None => return,
                    },
                    b = input_rx.recv() => match b {
                        Some((bytes, seq)) => vec![
                            Message::Binary(ClientFrame::Input(bytes).encode().into()),
                            Message::Binary(ClientFrame::Ping(seq).encode().into()),
                        ],
                        None => return,
                    },
                };
                for msg in msgs {
                    let close = matches!(msg, Message::Close(_));
                    if sink.send(msg).await.is_err() || close {
                        return;
                    }
                }
            }
        });
        Outbox {
            control,
            input,
            task,
        }
    }

    /// Queues input, then a PING of `seq` that tells when the daemon took it (or not).
    fn input(&self, bytes: Vec<u8>, seq: u64) {
        let _ = self.input.send((bytes, seq));
    }

    /// Queues a frame (a broken connection shows on the reading side).
    fn send(&self, frame: ClientFrame) {
        let _ = self.control.send(Message::Binary(frame.encode().into()));
    }

    /// Says goodbye (a close frame), briefly waiting for it to go out.
    async fn close(&mut self) {
        let _ = self.control.send(Message::Close(None));
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.task).await;
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Attaches to terminal `id` until it exits, we detach, or the connection is lost for
/// good. `created`: we just made it (it is ended if we cannot attach at all).
fn attach(client: &Client, id: &str, view: bool, created: bool) -> ExitCode {
    let base = client.base();
    let url = match base
        .strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
    {
        Some(ws) => format!(
            "{ws}/terminals/{id}/ws{}",
            if view { "?mode=view" } else { "" }
        ),
        None => return fail(format!("{base}: only http:// daemon URLs are supported")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let interactive = std::io::stdin().is_terminal();
    let size_fd = size_fd();
    let handlers = runtime.block_on(async {
        let signals = Signals::new()?;
        let winch = match &size_fd {
            Some(_) => Some(signal(SignalKind::window_change())?),
            None => None,
        };
        Ok::<_, std::io::Error>((signals, winch))
    });
    let (signals, winch) = match handlers {
        Ok(h) => h,
        Err(e) => return fail(format!("signals: {e}")),
    };
    let stdout = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => return fail(format!("stdout: {e}")),
    };
    let raw = if interactive {
        match RawMode::enter() {
            Ok(r) => Some(r),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let (out_tx, out_rx) = std::sync::mpsc::channel();
    let (written_tx, written_rx) = mpsc::unbounded_channel();
    let writer = spawn_writer(stdout, out_rx, written_tx);
    let input = (interactive || !view).then(|| {
        let (tx, rx) = mpsc::channel(16);
        spawn_stdin(tx);
        rx
    });
    let mut session = Session {
        url,
        token: client.token().to_string(),
        want_write: !view,
        interactive,
        size: local_size(size_fd.as_ref()).unwrap_or((80, 24)),
        size_fd,
        received: 0,
        // From the start: what a new terminal printed before we got here, or the screen
        // of a running one (as much of it as the daemon keeps).
        resume: 0,
        attached: false,
        welcomed: false,
        announced: false,
        passed_on: Vec::new(),
        said: HashMap::new(),
        alt_screen: false,
        out: out_tx,
        written: written_rx,
        input,
        escape: Escape::new(),
        winch,
        signals,
    };
    let end = runtime.block_on(session.run());
    let (alt_screen, attached) = (session.alt_screen, session.attached);
    drop(session); // the writer finishes what it has
    let _ = writer.join();
    if !matches!(end, End::Exit(_)) && raw.is_some() && std::io::stdout().is_terminal() {
        // The program did not end its drawing: leave the alternate screen, show the
        // cursor, plain colours, no mouse reporting, no bracketed paste.
        let mut reset = String::new();
        if alt_screen {
            reset.push_str("\x1b[?1049l");
        }
        reset.push_str("\x1b[0m\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?2004l");
        let _ = std::io::stdout().write_all(reset.as_bytes());
        let _ = std::io::stdout().flush();
    }
    drop(raw);
    drop(runtime);
    let reattach = format!("reattach with `stoa terminal attach {id}`");
    match end {
        End::Exit(Exit::Code(c)) => ExitCode::from(c.clamp(0, 255) as u8),
        End::Exit(Exit::Signal(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        End::Detached => {
            eprintln!("\nstoa: detached from terminal {id}; {reattach}");
            ExitCode::SUCCESS
        }
        End::Signal(n) => {
            eprintln!(
                "\nstoa: signal {n}: detached from terminal {id}, which keeps running; {reattach}"
            );
            ExitCode::from((128 + n).clamp(0, 255) as u8)
        }
        End::Lost(why) => {
            eprintln!("\nstoa: connection lost ({why}); {reattach}");
            ExitCode::from(STOA_ERROR)
        }
        End::Failed(why) => {
            if !attached {
                if created {
                    // Nobody could ever have used it.
                    let _ = client.delete(&format!("/terminals/{id}"));
                }
                return fail(why);
            }
            fail(format!(
                "{why}\nterminal {id} keeps running (`stoa terminal kill {id}` ends it)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(e: &mut Escape, input: &[u8]) -> (Vec<u8>, bool) {
        e.feed(input)
    }

    #[test]
    fn enter_tilde_dot_detaches() {
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"~."), (vec![], true));
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"ls\r~."), (b"ls\r".to_vec(), true));
        // Split across reads.
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"ls\r~"), (b"ls\r".to_vec(), false));
        assert_eq!(feed(&mut e, b"."), (vec![], true));
    }

    #[test]
    fn other_tildes_go_through() {
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"a~.b"), (b"a~.b".to_vec(), false));
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"~~."), (b"~.".to_vec(), false));
        let mut e = Escape::new();
        assert_eq!(feed(&mut e, b"~/x\r"), (b"~/x\r".to_vec(), false));
        assert_eq!(feed(&mut e, b"~"), (vec![], false));
        assert_eq!(feed(&mut e, b"x"), (b"~x".to_vec(), false));
    }

    #[test]
    fn alternate_screen_is_tracked() {
        assert_eq!(alt_screen_switch(b"plain"), None);
        assert_eq!(alt_screen_switch(b"\x1b[?1049h\x1b[H"), Some(true));
        assert_eq!(alt_screen_switch(b"\x1b[?1049hvim\x1b[?1049l"), Some(false));
        assert_eq!(alt_screen_switch(b"x\x1b[?1047h"), Some(true));
    }
}
