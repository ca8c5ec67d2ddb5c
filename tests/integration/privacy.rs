//! What runs write is their user's alone by default (umask 077): an agent's transcripts,
//! rollouts and databases in a home that other users can enter stay unreadable to them.
#![forbid(unsafe_code)]

use libtest_mimic::Failed;
use serde_json::json;

use crate::harness::*;

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "what_a_run_writes_in_its_users_home_others_cannot_read",
    umask_keeps_files_private,
)];

fn umask_keeps_files_private() -> Result<(), Failed> {
    let stoa = Instance::start();
    let home = format!("/home/{ALICE}");
    // A home others may enter and list, as many machines have.
    run("chmod", &["0755", &home]);
    let wrote = stoa.sh(
        ALICE,
        "umask; mkdir -p ~/.codex/sessions && echo 'the prompt and the answer' > ~/.codex/sessions/rollout.jsonl && stat -c %a ~/.codex ~/.codex/sessions/rollout.jsonl",
    );
    let out = wrote["stdout"].as_str().unwrap().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["0077", "700", "600"], "{out}");
    let (status, read) = stoa.exec(json!({
        "unix_user": BOB,
        "argv": ["cat", format!("{home}/.codex/sessions/rollout.jsonl")],
    }));
    run("chmod", &["0700", &home]);
    assert_eq!(status, 200, "{read}");
    assert_ne!(read["exit_code"], 0, "bob read alice's file: {read}");
    assert!(
        read["stderr"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{read}"
    );
    Ok(())
}
