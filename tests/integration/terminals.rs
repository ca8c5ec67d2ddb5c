//! Issue 4: terminals on the server side — a PTY as the user, streamed over a WebSocket
//! (`stoa.term.v1`), with flow control, reattach, and survival across a daemon restart.
#![forbid(unsafe_code)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use stoa::terminal::protocol::{ClientFrame, Exit, ServerFrame, FROM_NOW};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    ("terminal_runs_as_the_user_on_their_own_pty", as_user),
    (
        "terminal_resize_ctrl_c_and_exit_code",
        resize_interrupt_exit,
    ),
    (
        "terminal_belongs_to_its_owner_and_viewers_may_be_read_only",
        owner_and_read_only,
    ),
    (
        "terminal_replays_output_written_while_nobody_watched",
        replay,
    ),
    (
        "terminal_output_is_exact_and_fully_drained_before_exit",
        exact_output,
    ),
    ("terminal_flood_is_held_back_by_a_stalled_viewer", flood),
    (
        "terminal_survives_a_sigkill_of_its_worker",
        survives_restart,
    ),
    (
        "terminal_output_is_contiguous_across_a_worker_restart",
        contiguous_across_restart,
    ),
    (
        "terminal_that_ends_while_its_worker_is_down_keeps_its_output_and_exit",
        ends_while_worker_down,
    ),
    (
        "terminal_browser_tickets_and_origin_checks",
        tickets_and_origin,
    ),
    (
        "terminal_big_paste_echoed_back_does_not_deadlock",
        big_paste,
    ),
    (
        "terminal_idle_timeout_ends_an_unwatched_terminal",
        idle_timeout,
    ),
];

pub(crate) fn open(stoa: &Instance, token: &str, body: Value) -> Value {
    let (status, t) = stoa.request("POST", "/terminals", Some(token), Some(&body));
    assert_eq!(status, 201, "{t}");
    t
}

/// A blocking `stoa.term.v1` client that keeps what it received.
pub(crate) struct Viewer {
    ws: tungstenite::WebSocket<TcpStream>,
    pub(crate) output: Vec<u8>,
    /// Offset just past the last OUTPUT byte received.
    pub(crate) offset: u64,
    exit: Option<Exit>,
    errors: Vec<String>,
    pub(crate) snapshots: usize,
    pub(crate) closed: bool,
    /// Send ACKs as output arrives.
    acking: bool,
    /// The window size HELLO announces (a writer's is applied).
    size: (u16, u16),
}

/// Connects; `Err(status)` if the upgrade is refused.
pub(crate) fn connect(
    stoa: &Instance,
    id: &str,
    token: Option<&str>,
    query: &str,
    origin: Option<&str>,
) -> Result<Viewer, u16> {
    let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws{query}", stoa.port);
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("Sec-WebSocket-Protocol", "stoa.term.v1".parse().unwrap());
    if let Some(t) = token {
        headers.insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(o) = origin {
        headers.insert("Origin", o.parse().unwrap());
    }
    let stream = TcpStream::connect(("127.0.0.1", stoa.port)).unwrap();
    match tungstenite::client::client(request, stream) {
        Ok((ws, response)) => {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok()),
                Some("stoa.term.v1")
            );
            ws.get_ref()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            Ok(Viewer {
                ws,
                output: Vec::new(),
                offset: 0,
                exit: None,
                errors: Vec::new(),
                snapshots: 0,
                closed: false,
                acking: true,
                size: (80, 24),
            })
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(r.status().as_u16())
        }
        Err(e) => panic!("handshake: {e}"),
    }
}

impl Viewer {
    fn send(&mut self, f: ClientFrame) {
        self.ws.send(Message::Binary(f.encode().into())).unwrap();
    }

    pub(crate) fn hello(&mut self, resume: u64, want_write: bool) -> ServerFrame {
        self.send(ClientFrame::Hello {
            resume,
            cols: self.size.0,
            rows: self.size.1,
            want_write,
        });
        match self.next(Duration::from_secs(10)) {
            Some(w @ ServerFrame::Welcome { .. }) => {
                if let ServerFrame::Welcome { current, .. } = w {
                    self.offset = if resume == FROM_NOW { current } else { resume };
                }
                w
            }
            Some(other) => panic!("expected WELCOME, got {other:?}"),
            None => panic!("no WELCOME"),
        }
    }

    pub(crate) fn type_text(&mut self, text: &str) {
        self.send(ClientFrame::Input(text.as_bytes().to_vec()));
    }

    /// The next frame (recording output, exit and errors), or None after `wait`.
    pub(crate) fn next(&mut self, wait: Duration) -> Option<ServerFrame> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.closed {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let frame = ServerFrame::decode(&b).expect("server frame");
                    match &frame {
                        ServerFrame::Output { offset, bytes } => {
                            assert_eq!(
                                *offset, self.offset,
                                "output offsets must follow each other"
                            );
                            self.output.extend_from_slice(bytes);
                            self.offset += bytes.len() as u64;
                            if self.acking {
                                // The server may have gone since (a worker replaced):
                                // the next read says so.
                                let consumed = self.offset;
                                let ack = ClientFrame::Ack { consumed }.encode();
                                let _ = self.ws.send(Message::Binary(ack.into()));
                            }
                        }
                        ServerFrame::Snapshot { offset, .. } => {
                            self.snapshots += 1;
                            self.offset = *offset;
                        }
                        ServerFrame::Exit(e) => self.exit = Some(*e),
                        ServerFrame::Error { message, .. } => self.errors.push(message.clone()),
                        _ => {}
                    }
                    return Some(frame);
                }
                Ok(Message::Close(_)) => self.closed = true,
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

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Reads until the output contains `needle` at least `times` times.
    fn wait_for_count(&mut self, needle: &str, times: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?} {times} times in {:?}",
                self.text()
            );
            self.next(Duration::from_millis(200));
        }
    }

    /// Reads until the output contains `needle`.
    pub(crate) fn wait_for(&mut self, needle: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?} in {:?}",
                self.text()
            );
            self.next(Duration::from_millis(200));
        }
    }

    fn wait_exit(&mut self, wait: Duration) -> Exit {
        let deadline = Instant::now() + wait;
        while self.exit.is_none() {
            assert!(
                Instant::now() < deadline,
                "no EXIT; output {:?}",
                self.text()
            );
            self.next(Duration::from_millis(200));
        }
        self.exit.unwrap()
    }
}

fn as_user() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(&stoa, &alice, json!({ "cols": 120, "rows": 40 }));
    assert_eq!(t["unix_user"], ALICE);
    assert_eq!(t["running"], true);
    let id = t["terminal_id"].as_str().unwrap();
    let mut v = connect(&stoa, id, Some(&alice), "", None).unwrap();
    v.size = (120, 40);
    match v.hello(FROM_NOW, true) {
        ServerFrame::Welcome {
            can_write,
            cols,
            rows,
            ..
        } => assert_eq!((can_write, cols, rows), (true, 120, 40)),
        _ => unreachable!(),
    }
    v.type_text("id -un; tty; stat -c 'owner=%U group=%G mode=%a' $(tty); stty size; stty -a | grep -o iutf8 | head -1\n");
    v.wait_for("iutf8\r\n", Duration::from_secs(10));
    let out = v.text();
    assert!(out.contains(&format!("{ALICE}\r\n/dev/pts/")), "{out}");
    assert!(
        out.contains(&format!("owner={ALICE} group=tty mode=620")),
        "{out}"
    );
    assert!(
        out.contains("\r\n40 120\r\n"),
        "size set before the shell started: {out}"
    );
    // The shell is a login shell of alice's, in her home.
    v.type_text("echo $0 $HOME; pwd\n");
    v.wait_for(
        &format!("/home/{ALICE}\r\n/home/{ALICE}"),
        Duration::from_secs(10),
    );
    Ok(())
}

fn resize_interrupt_exit() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    let id = t["terminal_id"].as_str().unwrap();
    let mut v = connect(&stoa, id, Some(&alice), "", None).unwrap();
    // A writer's HELLO size is applied at once (the terminal was opened 80x24).
    v.size = (90, 30);
    v.hello(FROM_NOW, true);
    v.type_text("stty size\n");
    v.wait_for("30 90\r\n", Duration::from_secs(10));
    v.send(ClientFrame::Resize {
        cols: 100,
        rows: 33,
    });
    v.type_text("stty size\n");
    v.wait_for("33 100", Duration::from_secs(10));
    // Ctrl-C interrupts a foreground sleep at once (as a keystroke, and as a SIGNAL frame).
    let started = Instant::now();
    v.type_text("sleep 100; echo after-sleep-1\n");
    std::thread::sleep(Duration::from_millis(300));
    v.type_text("\x03");
    v.type_text("echo $((40 + 1))-interrupted\n");
    v.wait_for("41-interrupted", Duration::from_secs(5));
    v.type_text("sleep 100; echo after-sleep-2\n");
    std::thread::sleep(Duration::from_millis(300));
    v.send(ClientFrame::Signal(libc::SIGINT as u8));
    v.type_text("echo $((40 + 2))-interrupted\n");
    v.wait_for("42-interrupted", Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !v.text().contains("after-sleep-1\r\n") || v.text().matches("after-sleep").count() <= 2
    );
    // The exit code reaches the client, after the output.
    v.type_text("echo last words; exit 7\n");
    assert_eq!(v.wait_exit(Duration::from_secs(10)), Exit::Code(7));
    assert!(v.text().contains("last words"));
    let (_, info) = stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None);
    assert_eq!(
        (info["running"].clone(), info["exit_code"].clone()),
        (json!(false), json!(7)),
        "{info}"
    );
    Ok(())
}

fn owner_and_read_only() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let bob = stoa.api_user("bob", BOB);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    // bob: not listed, not visible, cannot attach, cannot kill.
    let (_, list) = stoa.request("GET", "/terminals", Some(&bob), None);
    assert_eq!(list, json!([]));
    assert_eq!(
        stoa.request("GET", &format!("/terminals/{id}"), Some(&bob), None)
            .0,
        404
    );
    assert_eq!(connect(&stoa, &id, Some(&bob), "", None).err(), Some(404));
    assert_eq!(
        stoa.request("DELETE", &format!("/terminals/{id}"), Some(&bob), None)
            .0,
        404
    );
    assert_eq!(
        stoa.request("POST", &format!("/terminals/{id}/ticket"), Some(&bob), None)
            .0,
        404
    );
    // bob may not open a terminal as alice.
    let (status, v) = stoa.request(
        "POST",
        "/terminals",
        Some(&bob),
        Some(&json!({ "cols": 80, "rows": 24, "unix_user": ALICE })),
    );
    assert_eq!(status, 403, "{v}");
    // A read-only viewer sees output but its input is ignored.
    let mut writer = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    writer.hello(FROM_NOW, true);
    let mut reader = connect(&stoa, &id, Some(&alice), "?mode=view", None).unwrap();
    match reader.hello(FROM_NOW, true) {
        ServerFrame::Welcome { can_write, .. } => assert!(!can_write),
        _ => unreachable!(),
    }
    reader.type_text("touch /tmp/stoa-t-readonly-$(id -u)\n");
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until && reader.errors.is_empty() {
        reader.next(Duration::from_millis(100));
    }
    assert!(
        reader.errors.iter().any(|e| e.contains("read-only")),
        "{:?}",
        reader.errors
    );
    writer.type_text("echo from-writer\n");
    reader.wait_for("from-writer", Duration::from_secs(5));
    let marker = format!("/tmp/stoa-t-readonly-{}", uid_of(ALICE));
    assert!(
        !std::path::Path::new(&marker).exists(),
        "read-only input ran"
    );
    let (_, info) = stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None);
    assert_eq!(info["viewers"], 2);
    // The owner kills it: its shell is gone.
    let pid = t["pid"].as_i64().unwrap() as i32;
    assert_eq!(
        stoa.request("DELETE", &format!("/terminals/{id}"), Some(&alice), None)
            .0,
        204
    );
    wait_until("the shell to be gone", Duration::from_secs(5), || {
        !alive(pid)
    });
    assert_eq!(
        stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None)
            .0,
        404
    );
    Ok(())
}

fn replay() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "echo before-anyone; sleep 0.5; echo while-away; exec sleep 30"] }),
    );
    let id = t["terminal_id"].as_str().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut v = connect(&stoa, id, Some(&alice), "", None).unwrap();
    v.hello(0, true);
    v.wait_for("while-away", Duration::from_secs(5));
    assert!(v.text().starts_with("before-anyone\r\n"), "{:?}", v.text());
    // Resuming from an offset skips what was already seen.
    let seen = "before-anyone\r\n".len() as u64;
    let mut again = connect(&stoa, id, Some(&alice), "", None).unwrap();
    again.hello(seen, false);
    again.wait_for("while-away", Duration::from_secs(5));
    assert_eq!(again.text(), "while-away\r\n");
    Ok(())
}

fn exact_output() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    // Lots of output, then an exit: every byte arrives before EXIT.
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "seq 1 100000; exit 3"] }),
    );
    let mut v = connect(
        &stoa,
        t["terminal_id"].as_str().unwrap(),
        Some(&alice),
        "",
        None,
    )
    .unwrap();
    v.hello(0, true);
    assert_eq!(v.wait_exit(Duration::from_secs(30)), Exit::Code(3));
    let expected: String = (1..=100000).map(|i| format!("{i}\r\n")).collect();
    assert_eq!(v.output.len(), expected.len());
    assert!(v.text() == expected, "output differs");
    // Much more than the ring through a writing viewer: every byte, no SNAPSHOT (the reader
    // never reads past a writer's credit, so nothing it has not acknowledged is trimmed).
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "head -c 24000000 /dev/zero | tr '\\0' x | fold -w 100"] }),
    );
    let mut v = connect(
        &stoa,
        t["terminal_id"].as_str().unwrap(),
        Some(&alice),
        "",
        None,
    )
    .unwrap();
    v.hello(0, true);
    assert_eq!(v.wait_exit(Duration::from_secs(120)), Exit::Code(0));
    assert_eq!((v.output.len(), v.snapshots), (24_479_998, 0));
    // Binary and split UTF-8 pass unchanged (raw mode: no newline translation).
    let script = "stty raw -echo; printf '\\000\\001\\377\\376'; i=0; while [ $i -lt 3000 ]; do printf '\\342\\202\\254'; i=$((i+1)); done";
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", script] }),
    );
    let mut v = connect(
        &stoa,
        t["terminal_id"].as_str().unwrap(),
        Some(&alice),
        "",
        None,
    )
    .unwrap();
    v.hello(0, true);
    assert_eq!(v.wait_exit(Duration::from_secs(30)), Exit::Code(0));
    let mut want = vec![0u8, 1, 0xff, 0xfe];
    for _ in 0..3000 {
        want.extend_from_slice("€".as_bytes());
    }
    assert_eq!(v.output, want, "bytes changed on the way");
    // Children left holding the terminal: cut off after the drain timeout.
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "sleep 60 & echo started"] }),
    );
    let mut v = connect(
        &stoa,
        t["terminal_id"].as_str().unwrap(),
        Some(&alice),
        "",
        None,
    )
    .unwrap();
    v.hello(0, true);
    let started = Instant::now();
    assert_eq!(v.wait_exit(Duration::from_secs(10)), Exit::Code(0));
    assert!(v.text().contains("started"));
    assert!(started.elapsed() < Duration::from_secs(8));
    wait_until(
        "the left-behind sleep to be killed",
        Duration::from_secs(5),
        || find_processes(ALICE, &["sleep", "60"]).is_empty(),
    );
    Ok(())
}

fn vm_rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn flood() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let daemon = stoa.daemon_pid().expect("daemon");
    let flood = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "exec yes"] }),
    );
    let flood_id = flood["terminal_id"].as_str().unwrap().to_string();
    let quiet = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    let quiet_id = quiet["terminal_id"].as_str().unwrap().to_string();
    // A writing viewer that never acknowledges and soon stops reading.
    let mut stalled = connect(&stoa, &flood_id, Some(&alice), "", None).unwrap();
    stalled.acking = false;
    stalled.hello(FROM_NOW, true);
    stalled.next(Duration::from_millis(300));
    let rss_start = vm_rss_kib(daemon);
    let mut rss_max = rss_start;
    let mut echo = connect(&stoa, &quiet_id, Some(&alice), "", None).unwrap();
    echo.hello(FROM_NOW, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    while Instant::now() < deadline {
        round += 1;
        echo.type_text(&format!("echo ping-{round}\n"));
        // Twice: once in the echoed command line, once as its output (which need not follow
        // a newline: the shell's first prompt may come after the typed-ahead line).
        echo.wait_for_count(&format!("ping-{round}\r\n"), 2, Duration::from_secs(2));
        rss_max = rss_max.max(vm_rss_kib(daemon));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Held back: at most about one window went out to the stalled viewer.
    assert!(
        stalled.output.len() <= (2 << 20) + (64 << 10),
        "stalled viewer got {} bytes",
        stalled.output.len()
    );
    let bound_kib = 16 * 1024; // ring + window + slack, in KiB
    assert!(
        rss_max - rss_start <= bound_kib,
        "daemon RSS grew {} KiB under the flood",
        rss_max - rss_start
    );
    // yes is blocked on its write, not spinning.
    let yes = find_processes(ALICE, &["yes"]);
    assert_eq!(yes.len(), 1);
    assert_eq!(
        state_and_ppid(yes[0]).map(|(s, _)| s),
        Some("S".to_string()),
        "yes is not blocked"
    );
    // Ctrl-C from another writer ends the flood at once.
    let mut second = connect(&stoa, &flood_id, Some(&alice), "", None).unwrap();
    second.acking = false;
    second.hello(FROM_NOW, true);
    second.send(ClientFrame::Signal(libc::SIGINT as u8));
    drop(stalled);
    let code = second.wait_exit_lenient(Duration::from_secs(10));
    assert_eq!(code, Exit::Signal(libc::SIGINT), "yes should die of the ^C");
    eprintln!(
        "flood: daemon RSS {} KiB -> max {} KiB over 10 s; {} echo round trips",
        rss_start, rss_max, round
    );
    Ok(())
}

impl Viewer {
    /// Like `wait_exit`, acknowledging everything so the program may finish.
    fn wait_exit_lenient(&mut self, wait: Duration) -> Exit {
        self.acking = true;
        self.wait_exit(wait)
    }
}

fn survives_restart() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let pid = t["pid"].as_i64().unwrap() as i32;
    let mut v = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    v.hello(FROM_NOW, true);
    v.type_text("MARK=kept-across; echo set\n");
    v.wait_for("set", Duration::from_secs(5));
    // The process holding the terminal is alice's worker: SIGKILL it (no chance to tidy
    // up); the broker starts a new one, which adopts the shell.
    let worker = stoa.worker_pid(ALICE).expect("alice's worker");
    run("kill", &["-KILL", &worker.to_string()]);
    stoa.wait_new_worker(ALICE, worker);
    assert!(alive(pid), "the shell died with the worker");
    let (status, info) = stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None);
    assert_eq!(
        (status, info["running"].clone()),
        (200, json!(true)),
        "{info}"
    );
    let old_offset = v.offset;
    let mut again = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    again.hello(FROM_NOW, true);
    again.type_text("echo $MARK\n");
    again.wait_for("kept-across", Duration::from_secs(5));
    // The ring outlived the daemon (SIGKILLed, so with no chance to tidy up): a viewer
    // resuming from where it was gets what followed, no SNAPSHOT.
    let mut resumed = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    match resumed.hello(old_offset, true) {
        ServerFrame::Welcome {
            oldest, current, ..
        } => assert!(
            oldest <= old_offset && old_offset <= current,
            "the ring was lost in the restart: {oldest}..{current}, resuming from {old_offset}"
        ),
        _ => unreachable!(),
    }
    resumed.wait_for("kept-across", Duration::from_secs(5));
    assert_eq!(resumed.snapshots, 0);
    assert!(
        resumed.text().contains("echo $MARK"),
        "{:?}",
        resumed.text()
    );
    assert!(stoa.log().contains("took a terminal back"));
    assert!(stoa.log().contains("output ring intact"));
    Ok(())
}

/// Whether any fd of `pid` is a terminal ring's memfd.
fn holds_ring(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().contains("memfd:stoa-ring"))
            })
        })
        .unwrap_or(false)
}

/// The numbers of the complete `line N` lines in `text`, in order.
pub(crate) fn line_numbers(text: &str) -> Vec<u64> {
    let mut lines: Vec<&str> = text.split("\r\n").collect();
    lines.pop(); // what follows the last line end: a line still being written
    lines
        .iter()
        .map(|l| {
            l.strip_prefix("line ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a numbered line: {l:?}"))
        })
        .collect()
}

fn contiguous_across_restart() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.01; done"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let pid = t["pid"].as_i64().unwrap() as i32;
    // The ring's memfd is the broker's and the worker's: never the user's other processes,
    // nor the front.
    let worker = stoa.worker_pid(ALICE).expect("alice's worker");
    let front = stoa.daemon_pid().expect("front");
    assert!(holds_ring(stoa.broker_pid()), "the broker keeps no ring");
    let maps = std::fs::read_to_string(format!("/proc/{worker}/maps")).unwrap();
    assert!(maps.contains("memfd:stoa-ring"), "the worker maps no ring");
    assert!(!holds_ring(front), "the front holds a ring");
    let front_maps = std::fs::read_to_string(format!("/proc/{front}/maps")).unwrap();
    assert!(
        !front_maps.contains("memfd:stoa-ring"),
        "the front maps a ring"
    );
    let users = std::iter::once(pid).chain(find_processes(ALICE, &["sleep", "0.01"]));
    for p in users {
        assert!(!holds_ring(p), "process {p} of the user holds the ring");
    }
    let mut v = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    v.hello(0, true);
    v.wait_for("line 30\r\n", Duration::from_secs(10));
    // A planned restart of alice's worker, while the output flows.
    let (status, body) = stoa.request(
        "POST",
        &format!("/workers/{ALICE}/restart"),
        Some(&stoa.token),
        Some(&json!({})),
    );
    assert_eq!(status, 202, "{body}");
    stoa.wait_new_worker(ALICE, worker);
    let (acked, last, total) = resume_every_line(&stoa, &id, &alice, &mut v, "the restart");
    assert!(stoa.log().contains("output ring intact"));
    assert!(!stoa.log().contains("not every terminal reader stopped"));
    eprintln!("restart: lines 0..={last} before, {total} in all; resumed at offset {acked}");
    Ok(())
}

/// A viewer `v` of a terminal printing `line N` lines, whose worker went: waits until its
/// socket closes, resumes on a new connection from the offset it acknowledged, and checks
/// that both together hold every line once, in order, from line 0 (nothing lost in `what`,
/// nothing repeated, no SNAPSHOT). Returns (the offset, the last line before, lines in all).
pub(crate) fn resume_every_line(
    stoa: &Instance,
    id: &str,
    token: &str,
    v: &mut Viewer,
    what: &str,
) -> (u64, u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !v.closed {
        assert!(Instant::now() < deadline, "the old worker kept the socket");
        v.next(Duration::from_millis(100));
    }
    assert_eq!(v.snapshots, 0);
    // It acknowledged every byte it got.
    let acked = v.offset;
    let last = *line_numbers(&v.text())
        .last()
        .unwrap_or_else(|| panic!("lines before {what}"));
    let mut again = connect(stoa, id, Some(token), "", None).unwrap();
    match again.hello(acked, true) {
        ServerFrame::Welcome {
            oldest, current, ..
        } => assert!(
            oldest <= acked && acked <= current,
            "the ring was lost in {what}: {oldest}..{current}, resuming from {acked}"
        ),
        other => panic!("{other:?}"),
    }
    again.wait_for(&format!("line {}\r\n", last + 30), Duration::from_secs(20));
    assert_eq!(again.snapshots, 0, "a SNAPSHOT after {what}");
    let mut all = v.output.clone();
    all.extend_from_slice(&again.output);
    let numbers = line_numbers(&String::from_utf8_lossy(&all));
    let expected: Vec<u64> = (0..numbers.len() as u64).collect();
    assert!(
        numbers == expected,
        "lines lost or repeated across {what} (resumed at offset {acked}, after line {last}): {:?}",
        numbers
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .collect::<Vec<_>>()
    );
    (acked, last, numbers.len())
}

/// The shell ends while its user's worker is down (stopped, then killed): the next worker
/// adopts the ended terminal, so what it printed meanwhile and its exit code are still there.
fn ends_while_worker_down() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24,
            "command": ["sh", "-c", "echo before; sleep 2; echo printed-while-down; exit 3"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let pid = t["pid"].as_i64().unwrap() as i32;
    let mut v = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    v.hello(0, true);
    v.wait_for("before", Duration::from_secs(10));
    let worker = stoa.worker_pid(ALICE).expect("alice's worker");
    run("kill", &["-STOP", &worker.to_string()]);
    wait_until("the shell to end", Duration::from_secs(20), || !alive(pid));
    run("kill", &["-KILL", &worker.to_string()]);
    stoa.wait_new_worker(ALICE, worker);
    let mut info = Value::Null;
    wait_until("the exit recorded", Duration::from_secs(20), || {
        let (status, i) = stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None);
        info = i;
        status == 200 && info["running"] == false
    });
    assert_eq!(info["exit_code"], 3, "{info}");
    let mut again = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    again.hello(0, false);
    again.wait_for("printed-while-down", Duration::from_secs(10));
    Ok(())
}

fn tickets_and_origin() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh"] }),
    );
    let id = t["terminal_id"].as_str().unwrap();
    // Without the subprotocol.
    let url = format!("ws://127.0.0.1:{}/terminals/{id}/ws", stoa.port);
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {alice}").parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", stoa.port)).unwrap();
    match tungstenite::client::client(request, stream) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status().as_u16(), 400)
        }
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    // No credential at all.
    assert_eq!(connect(&stoa, id, None, "", None).err(), Some(401));
    // A cross-site page may not open it, even with a token.
    assert_eq!(
        connect(&stoa, id, Some(&alice), "", Some("http://evil.example")).err(),
        Some(403)
    );
    // The daemon's own origin with a one-time ticket (what a browser does).
    let (status, ticket) = stoa.request(
        "POST",
        &format!("/terminals/{id}/ticket"),
        Some(&alice),
        None,
    );
    assert_eq!(status, 200, "{ticket}");
    let ticket = ticket["ticket"].as_str().unwrap();
    let origin = format!("http://127.0.0.1:{}", stoa.port);
    let mut v = connect(&stoa, id, None, &format!("?ticket={ticket}"), Some(&origin)).unwrap();
    v.hello(FROM_NOW, true);
    v.type_text("echo via-ticket\n");
    v.wait_for("via-ticket", Duration::from_secs(5));
    // Tickets work once.
    assert_eq!(
        connect(&stoa, id, None, &format!("?ticket={ticket}"), Some(&origin)).err(),
        Some(401)
    );
    Ok(())
}

fn big_paste() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sh", "-c", "stty raw -echo; exec cat"] }),
    );
    let mut v = connect(
        &stoa,
        t["terminal_id"].as_str().unwrap(),
        Some(&alice),
        "",
        None,
    )
    .unwrap();
    v.hello(0, true);
    std::thread::sleep(Duration::from_millis(300));
    // More than a window, all at once: cat echoes it back while the paste is still being
    // written, so output must keep flowing (and ACKs be read) while input waits.
    let total = 3_000_000usize;
    let chunk: Vec<u8> = (0..65536).map(|i| b'a' + (i % 26) as u8).collect();
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        v.send(ClientFrame::Input(chunk[..n].to_vec()));
        sent += n;
        v.next(Duration::from_millis(1));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while v.output.len() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} bytes came back",
            v.output.len()
        );
        v.next(Duration::from_millis(200));
    }
    assert_eq!(v.output.len(), total);
    assert!(v.errors.is_empty(), "{:?}", v.errors);
    Ok(())
}

fn idle_timeout() -> Result<(), Failed> {
    let stoa = Instance::start_with(Options {
        extra_config: "[terminal]\nidle_timeout_secs = 1\n".into(),
        ..Options::default()
    });
    let alice = stoa.api_user("alice", ALICE);
    let t = open(
        &stoa,
        &alice,
        json!({ "cols": 80, "rows": 24, "command": ["sleep", "300"] }),
    );
    let id = t["terminal_id"].as_str().unwrap().to_string();
    let pid = t["pid"].as_i64().unwrap() as i32;
    // Watched: it lives on past the timeout.
    let mut v = connect(&stoa, &id, Some(&alice), "", None).unwrap();
    v.hello(0, true);
    std::thread::sleep(Duration::from_secs(3));
    assert!(alive(pid), "a watched terminal was ended");
    // Unwatched: ended (SIGHUP first) within a few seconds.
    drop(v);
    wait_until("the idle terminal to end", Duration::from_secs(15), || {
        !alive(pid)
    });
    let (_, info) = stoa.request("GET", &format!("/terminals/{id}"), Some(&alice), None);
    assert_eq!(
        (info["running"].clone(), info["signal"].clone()),
        (json!(false), json!(libc::SIGHUP)),
        "{info}"
    );
    Ok(())
}
