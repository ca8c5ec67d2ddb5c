//! Sharing a terminal: alice shares hers with bob read-only (he sees it, cannot type), then
//! with input for a while; before a share and after its revocation bob finds nothing; alice
//! revokes and bob's viewers end at once; every grant, attach and revocation is audited.
#![forbid(unsafe_code)]

use std::time::Duration;

use libtest_mimic::Failed;
use serde_json::{json, Value};

use stoa::terminal::protocol::{ServerFrame, FROM_NOW};

use crate::harness::*;
use crate::viewer::connect;

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "share_a_terminal_read_only_then_with_input_and_revoke",
    share_and_revoke,
)];

fn audit_count(stoa: &Instance, event: &str) -> usize {
    std::fs::read_to_string(stoa.dir.join("broker/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .count()
}

fn share_and_revoke() -> Result<(), Failed> {
    let stoa = Instance::start();
    let alice = stoa.api_user("alice-sh", ALICE);
    let bob = stoa.api_user("bob-sh", BOB);
    let (status, t) = stoa.request(
        "POST",
        "/terminals",
        Some(&alice),
        Some(&json!({ "cols": 80, "rows": 24, "unix_user": ALICE })),
    );
    assert_eq!(status, 201, "{t}");
    let id = t["terminal_id"].as_str().unwrap().to_string();

    // Before any share bob finds nothing.
    let (status, _) = stoa.request("GET", &format!("/terminals/{id}/ws"), Some(&bob), None);
    assert_eq!(status, 404);

    // Only its owner shares it; a share with input needs a time limit.
    let shares = format!("/terminals/{id}/shares");
    let (status, _) = stoa.request(
        "POST",
        &shares,
        Some(&bob),
        Some(&json!({ "unix_user": BOB })),
    );
    assert_eq!(status, 404, "bob cannot share alice's terminal");
    let (status, e) = stoa.request(
        "POST",
        &shares,
        Some(&alice),
        Some(&json!({ "unix_user": BOB, "input": true })),
    );
    assert_eq!(status, 400, "{e}");
    let (status, e) = stoa.request(
        "POST",
        &shares,
        Some(&alice),
        Some(&json!({ "unix_user": "root" })),
    );
    assert_eq!(
        (status, e["rule"].as_str()),
        (403, Some("share-grantee")),
        "{e}"
    );
    let (status, g) = stoa.request(
        "POST",
        &shares,
        Some(&alice),
        Some(&json!({ "unix_user": BOB })),
    );
    assert_eq!(status, 201, "{g}");

    // Both sides see it.
    for token in [&alice, &bob] {
        let (status, list) = stoa.request("GET", "/shares", Some(token), None);
        assert_eq!(status, 200);
        let list = list.as_array().unwrap().clone();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["object"], id.as_str());
        assert_eq!(
            (list[0]["owner"].as_str(), list[0]["grantee"].as_str()),
            (Some(ALICE), Some(BOB))
        );
        assert_eq!(list[0]["input"], false);
    }

    // alice types; bob sees it, read-only: his input is refused and runs nothing.
    let mut owner = connect(&stoa, &id, &alice);
    owner.hello(FROM_NOW, true);
    let mut viewer = connect(&stoa, &id, &bob);
    viewer.send(stoa::terminal::protocol::ClientFrame::Hello {
        resume: 0,
        cols: 80,
        rows: 24,
        want_write: true,
    });
    match viewer.next(Duration::from_secs(10)) {
        Some(ServerFrame::Welcome { can_write, .. }) => assert!(!can_write, "read-only share"),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    owner.type_text("echo SHARED-$((6*7))\n");
    viewer.wait_for("SHARED-42", Duration::from_secs(10));
    let _ = std::fs::remove_file("/tmp/stoa-share-bob-typed");
    viewer.type_text("touch /tmp/stoa-share-bob-typed\n");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!std::path::Path::new("/tmp/stoa-share-bob-typed").exists());
    // The process runs as its owner, whoever watches.
    owner.type_text("id -un\n");
    viewer.wait_for(ALICE, Duration::from_secs(10));

    // With input for a while: bob types, it runs as alice.
    let (status, g) = stoa.request(
        "POST",
        &shares,
        Some(&alice),
        Some(&json!({ "unix_user": BOB, "input": true, "minutes": 5 })),
    );
    assert_eq!(status, 201, "{g}");
    assert!(g["expires_at"].as_u64().is_some());
    let mut typist = connect(&stoa, &id, &bob);
    typist.send(stoa::terminal::protocol::ClientFrame::Hello {
        resume: FROM_NOW,
        cols: 80,
        rows: 24,
        want_write: true,
    });
    match typist.next(Duration::from_secs(10)) {
        Some(ServerFrame::Welcome { can_write, .. }) => assert!(can_write, "a share with input"),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    typist.type_text("echo TYPED-BY-BOB-$(id -un)\n");
    owner.wait_for(&format!("TYPED-BY-BOB-{ALICE}"), Duration::from_secs(10));

    // alice revokes: bob's open viewer ends now, and he cannot come back.
    let (status, _) = stoa.request("DELETE", &format!("{shares}/{BOB}"), Some(&alice), None);
    assert_eq!(status, 204);
    crate::harness::wait_until(
        "bob's viewers to be closed",
        Duration::from_secs(10),
        || {
            typist.next(Duration::from_millis(100));
            viewer.next(Duration::from_millis(100));
            typist.closed && viewer.closed
        },
    );
    // (Each is sent a close frame saying why; through the front's relay a reset can
    // overtake it, so only the end itself is asserted.)
    let (status, _) = stoa.request("GET", &format!("/terminals/{id}/ws"), Some(&bob), None);
    assert_eq!(status, 404);
    let (_, list) = stoa.request("GET", "/shares", Some(&bob), None);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    // alice's own viewer is untouched.
    owner.type_text("echo STILL-$((2+3))\n");
    owner.wait_for("STILL-5", Duration::from_secs(10));

    assert!(audit_count(&stoa, "share_grant") >= 2);
    assert!(audit_count(&stoa, "share_attach") >= 2);
    assert_eq!(audit_count(&stoa, "share_revoke"), 1);
    Ok(())
}
