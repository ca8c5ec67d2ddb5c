//! Logging in with a Unix account's password (`POST /login`, PAM in a helper process of
//! the broker's): the cookie acts as that user only, changes need the CSRF token, sockets
//! the same origin; root, the service user, users outside the policy, locked and expired
//! accounts are refused with words; every attempt is audited.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use libtest_mimic::Failed;
use serde_json::{json, Value};

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "login_with_a_unix_password_acts_as_that_user_only",
        login_acts_as_that_user,
    ),
    (
        "login_refuses_root_the_service_user_outsiders_locked_and_expired_accounts",
        login_refusals,
    ),
    (
        "local_user_runs_stoa_with_no_token_as_themself_only",
        local_login,
    ),
    (
        "an_agents_run_gets_no_local_login_a_users_exec_does",
        agent_gets_no_local_login,
    ),
];

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: String,
    pub(crate) body: Value,
}

/// One request on a fresh connection, with these extra header lines.
pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Small JSON bodies come whole or chunked in one piece.
    let json_text = rest
        .find('{')
        .map(|i| &rest[i..rest.rfind('}').map_or(rest.len(), |j| j + 1)])
        .unwrap_or("");
    Answer {
        status,
        headers: head.to_string(),
        body: serde_json::from_str(json_text).unwrap_or(Value::Null),
    }
}

pub(crate) fn set_password(user: &str, password: &str) {
    let mut child = std::process::Command::new("chpasswd")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("chpasswd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{user}:{password}\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "chpasswd {user}");
}

pub(crate) fn login(port: u16, user: &str, password: &str) -> Answer {
    http(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/json")],
        Some(&json!({ "username": user, "password": password })),
    )
}

pub(crate) fn cookie_of(a: &Answer) -> String {
    let line = a
        .headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a Set-Cookie header");
    let value = line.split_once(':').unwrap().1.trim();
    value.split(';').next().unwrap().to_string()
}

fn login_acts_as_that_user() -> Result<(), Failed> {
    let stoa = Instance::start();
    let port = stoa.port;
    set_password(ALICE, "correct horse 1");

    let wrong = login(port, ALICE, "battery staple");
    assert_eq!(wrong.status, 401, "{:?}", wrong.body);
    assert!(wrong.body["error"]
        .as_str()
        .unwrap()
        .contains("wrong user name or password"));
    let unknown = login(port, "stoa-t-nobody", "x");
    assert_eq!(unknown.status, 401);
    assert_eq!(
        unknown.body["error"], wrong.body["error"],
        "the same answer for both"
    );
    // A form another site could post is not JSON.
    let form = http(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(&json!("username=x")),
    );
    assert_eq!(form.status, 415);

    let ok = login(port, ALICE, "correct horse 1");
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["unix_user"], ALICE);
    let csrf = ok.body["csrf_token"].as_str().unwrap().to_string();
    let set_cookie = ok
        .headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "plain HTTP on loopback: {set_cookie}"
    );
    let cookie = cookie_of(&ok);
    let with_cookie = [("Cookie", cookie.as_str())];

    let me = http(port, "GET", "/users/me", &with_cookie, None);
    assert_eq!(me.status, 200);
    assert_eq!(me.body["unix_user"], ALICE);
    assert_eq!(me.body["admin"], false);
    assert_eq!(me.body["csrf_token"], csrf.as_str());

    // A change without the CSRF token: refused, by rule.
    let run = json!({ "unix_user": ALICE, "argv": ["id", "-un"] });
    let no_token = http(
        port,
        "POST",
        "/exec",
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        Some(&run),
    );
    assert_eq!(no_token.status, 403);
    assert_eq!(no_token.body["rule"], "csrf");
    let headers = [
        ("Cookie", cookie.as_str()),
        ("Content-Type", "application/json"),
        ("X-CSRF-Token", csrf.as_str()),
    ];
    let ran = http(port, "POST", "/exec", &headers, Some(&run));
    assert_eq!(ran.status, 200, "{:?}", ran.body);
    assert_eq!(ran.body["stdout"].as_str().unwrap().trim(), ALICE);
    // As alice only.
    let as_bob = http(
        port,
        "POST",
        "/exec",
        &headers,
        Some(&json!({ "unix_user": BOB, "argv": ["id"] })),
    );
    assert_eq!(as_bob.status, 403, "{:?}", as_bob.body);
    let processes = http(port, "GET", "/processes", &with_cookie, None);
    assert_eq!(processes.status, 403, "no admin view");
    // A terminal socket opened with the cookie from another site's page: refused.
    let ws = http(
        port,
        "GET",
        &format!(
            "/terminals/u{}-00000000-0000-0000-0000-000000000000/ws",
            uid_of(ALICE)
        ),
        &[
            ("Cookie", cookie.as_str()),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Origin", "http://evil.example"),
        ],
        None,
    );
    assert_eq!(ws.status, 403, "{}", ws.headers);

    // Log out: the cookie is cleared and stops working.
    let out = http(
        port,
        "POST",
        "/logout",
        &[("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())],
        None,
    );
    assert_eq!(out.status, 204);
    assert!(out.headers.contains("Max-Age=0"), "{}", out.headers);
    let after = http(port, "GET", "/users/me", &with_cookie, None);
    assert_eq!(after.status, 401);

    // Every attempt is in the audit log, never the password.
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    let logins: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "login")
        .collect();
    assert!(logins
        .iter()
        .any(|v| v["unix_user"] == ALICE && v["result"] == "ok"));
    assert!(logins
        .iter()
        .any(|v| v["unix_user"] == ALICE && v["result"] == "wrong password or unknown user"));
    assert!(audit.lines().any(|l| l.contains("\"logout\"")));
    assert!(!audit.contains("correct horse") && !audit.contains("battery staple"));
    assert!(!stoa.log().contains("correct horse") && !stoa.log().contains("battery staple"));
    Ok(())
}

fn login_refusals() -> Result<(), Failed> {
    let stoa = Instance::start();
    let port = stoa.port;
    let root = login(port, "root", "anything");
    assert_eq!(
        (root.status, root.body["rule"].as_str()),
        (403, Some("root"))
    );
    let service = login(port, SERVICE, "anything");
    assert_eq!(service.status, 403);
    assert_eq!(service.body["rule"], "service-user");
    // carol has a password but is in none of the allowed groups: told the rule only
    // with the right password.
    set_password(CAROL, "carol pw 7");
    assert_eq!(login(port, CAROL, "not it").status, 401);
    let carol = login(port, CAROL, "carol pw 7");
    assert_eq!(carol.status, 403, "{:?}", carol.body);
    assert!(carol.body["rule"].is_string(), "{:?}", carol.body);
    assert!(
        carol.body["error"].as_str().unwrap().contains("group"),
        "{:?}",
        carol.body
    );
    // A locked password is a wrong password.
    set_password(BOB, "bob pw 9");
    run("usermod", &["-L", BOB]);
    assert_eq!(login(port, BOB, "bob pw 9").status, 401);
    run("usermod", &["-U", BOB]);
    // An expired account: refused, by the account rule, with words.
    run("chage", &["-E", "0", BOB]);
    let expired = login(port, BOB, "bob pw 9");
    run("chage", &["-E", "-1", BOB]);
    assert_eq!(expired.status, 403, "{:?}", expired.body);
    assert_eq!(expired.body["rule"], "account");
    assert!(
        login(port, BOB, "bob pw 9").status == 200,
        "and fine again once it is not"
    );
    Ok(())
}

/// `stoa` as `user`, with no token: only the instance's address and its policy file (where
/// the CLI finds the local log-in socket).
fn cli_as(stoa: &Instance, user: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(stoa.dir.join("bin/stoa"))
        .args(args)
        .env_remove("STOA_TOKEN")
        .env("STOA_URL", stoa.url(""))
        .env("STOA_BROKER_CONFIG", stoa.dir.join("broker.toml"))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runuser")
}

/// An agent (running as alice) must not answer its own permission requests: the local
/// socket gives nothing to a process in an agent run's cgroup. The same command from
/// alice's `exec` run (and from her own shell) logs in.
fn agent_gets_no_local_login() -> Result<(), Failed> {
    let dir = PathBuf::from(format!("/run/stoa-test-{}-agent-login", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run("chmod", &["0755", dir.to_str().unwrap()]);
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/agents/claude-code-2.1.197-text.jsonl");
    std::fs::copy(&fixture, dir.join("fixture.jsonl"))?;
    run(
        "chmod",
        &["0644", dir.join("fixture.jsonl").to_str().unwrap()],
    );
    let stoa = Instance::start_with(Options {
        extra_config: format!(
            "[agents.claude-code]\ncommand = [\"{}\", \"{}\"]\n",
            dir.join("agent").display(),
            dir.join("fixture.jsonl").display()
        ),
        ..Options::default()
    });
    let try_login = format!(
        "STOA_URL={url} STOA_LOCAL_SOCKET={sock} {stoa} approvals list > .login-try 2>&1; echo \"exit $?\" >> .login-try",
        url = stoa.url(""),
        sock = stoa.dir.join("local.sock").display(),
        stoa = stoa.dir.join("bin/stoa").display(),
    );
    std::fs::write(
        dir.join("agent"),
        format!("#!/bin/sh\nIFS= read -r input\n{try_login}\ncat \"$1\"\n"),
    )?;
    run("chmod", &["0755", dir.join("agent").to_str().unwrap()]);
    let alice = stoa.api_user("alice", ALICE);
    let wt = crate::sessions::worktree(ALICE);
    let session = crate::sessions::create_session(&stoa, &alice, "claude-code", &wt);
    let task = crate::sessions::prompt(&stoa, &alice, &session, "hi");
    let t = crate::sessions::wait_task(&stoa, &alice, &task);
    assert_eq!(t["status"], "completed", "{t}");
    let tried = std::fs::read_to_string(format!("{wt}/.login-try"))?;
    assert!(
        tried.contains("agent-run") && tried.trim_end().ends_with("exit 1"),
        "the agent's run got a log-in: {tried}"
    );
    // Alice's `exec` run is hers to use as she likes: it logs in.
    let (status, reply) = stoa.exec(json!({
        "unix_user": ALICE, "cwd": wt, "argv": ["sh", "-c", try_login]
    }));
    assert_eq!(status, 200, "{reply}");
    let tried = std::fs::read_to_string(format!("{wt}/.login-try"))?;
    assert!(tried.trim_end().ends_with("exit 0"), "{tried}");
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(audit.contains("\"local_login\""), "the exec run's log-in");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn local_login() -> Result<(), Failed> {
    let stoa = Instance::start();
    let socket = stoa.dir.join("local.sock");
    // A local user runs commands as themself, no token.
    let out = cli_as(&stoa, ALICE, &["exec", "--user", ALICE, "--", "id", "-un"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ALICE);
    // Not as anyone else.
    let out = cli_as(&stoa, ALICE, &["exec", "--user", BOB, "--", "id", "-un"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not act as"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A user outside the policy gets the rule, in words.
    let out = cli_as(&stoa, CAROL, &["exec", "--user", CAROL, "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root gets nothing here (root reads the admin token).
    let mut root = std::os::unix::net::UnixStream::connect(&socket)?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut root), &mut line)?;
    let v: Value = serde_json::from_str(&line)?;
    assert_eq!(v["rule"], "root", "{line}");

    // The credential lives as long as the connection: a holder that exits ends it.
    let mut holder = std::process::Command::new("runuser")
        .args(["-u", ALICE, "--", "python3", "-c"])
        .arg("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint(s.makefile().readline().strip(), flush=True)\nsys.stdin.read()")
        .arg(&socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut first,
    )?;
    let v: Value = serde_json::from_str(first.trim())?;
    let credential = v["credential"].as_str().expect("a credential").to_string();
    assert_eq!(v["unix_user"], ALICE);
    let (status, me) = stoa.request("GET", "/users/me", Some(&credential), None);
    assert_eq!((status, me["unix_user"].as_str()), (200, Some(ALICE)));
    drop(holder.stdin.take());
    holder.wait()?;
    wait_until(
        "the closed log-in to be revoked",
        Duration::from_secs(10),
        || stoa.request("GET", "/users/me", Some(&credential), None).0 == 401,
    );
    let audit = std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))?;
    assert!(audit.contains("\"local_login\""));
    Ok(())
}
