//! Splitting the one daemon's store (before per-user workers) into each user's worker
//! store, once, at broker start (as root, before capabilities are dropped: the old store is
//! the service user's, 0600). Each Unix user found in it gets a copy with only their rows
//! in `<workers_dir>/<uid>/stoa.db` (unless that store exists already); the old file is
//! renamed `stoa.db.before-workers` and kept. Nothing is lost: ids from before keep working
//! (the front finds them by asking the user's worker, or every worker for an admin).
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::{info, warn};

use super::spawn::Account;

/// Splits `<daemon_state>/stoa.db` if it is there; returns how many users got a store.
pub fn split(daemon_state: &Path, workers_dir: &Path) -> Result<usize, String> {
    let old = daemon_state.join("stoa.db");
    if !old.exists() {
        return Ok(0);
    }
    let users: Vec<String> = {
        let conn = rusqlite::Connection::open(&old)
            .map_err(|e| format!("cannot open {}: {e}", old.display()))?;
        let mut users = Vec::new();
        for table in ["sessions", "terminals"] {
            let sql = format!("SELECT DISTINCT unix_user FROM {table}");
            let Ok(mut stmt) = conn.prepare(&sql) else {
                continue;
            };
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| e.to_string())?;
            users.extend(rows.flatten());
        }
        users.sort();
        users.dedup();
        users
    };
    let mut split = 0;
    for name in users {
        let Ok(Some(account)) = Account::lookup(&name) else {
            warn!(user = %name, "old store: no such Unix user now; its rows stay in the old file");
            continue;
        };
        let dir = workers_dir.join(account.uid.to_string());
        let target = dir.join("stoa.db");
        if target.exists() {
            continue;
        }
        if let Err(e) = copy_for(&old, &dir, &target, &account) {
            warn!(user = %name, "old store: cannot split out this user's rows: {e}");
            let _ = std::fs::remove_file(&target);
            continue;
        }
        split += 1;
    }
    let kept = daemon_state.join("stoa.db.before-workers");
    std::fs::rename(&old, &kept).map_err(|e| format!("cannot rename {}: {e}", old.display()))?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(daemon_state.join(format!("stoa.db{suffix}")));
    }
    info!(users = split, kept = %kept.display(), "split the old store into the users' worker stores");
    Ok(split)
}

fn copy_for(old: &Path, dir: &Path, target: &Path, account: &Account) -> Result<(), String> {
    if !dir.exists() {
        std::fs::create_dir(dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        std::os::unix::fs::lchown(dir, Some(account.uid), Some(account.gid))
            .map_err(|e| e.to_string())?;
    }
    let conn = rusqlite::Connection::open(old).map_err(|e| e.to_string())?;
    conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])
        .map_err(|e| e.to_string())?;
    drop(conn);
    let copy = rusqlite::Connection::open(target).map_err(|e| e.to_string())?;
    let others = "SELECT session_id FROM sessions WHERE unix_user != ?1";
    for sql in [
        format!("DELETE FROM messages WHERE session_id IN ({others})"),
        format!("DELETE FROM tasks WHERE unix_user != ?1 OR session_id IN ({others})"),
        "DELETE FROM sessions WHERE unix_user != ?1".to_string(),
        "DELETE FROM terminals WHERE unix_user != ?1".to_string(),
        "DELETE FROM output_usage WHERE unix_user != ?1".to_string(),
    ] {
        // A table an old schema did not have yet is fine.
        if let Err(e) = copy.execute(&sql, [&account.name]) {
            if !e.to_string().contains("no such table") {
                return Err(e.to_string());
            }
        }
    }
    copy.execute_batch("VACUUM").map_err(|e| e.to_string())?;
    drop(copy);
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    std::os::unix::fs::lchown(target, Some(account.uid), Some(account.gid))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_store_is_split_by_unix_user_and_kept() {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap();
        let base = std::env::temp_dir().join(format!("stoa-legacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (state, workers) = (base.join("daemon"), base.join("workers"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&workers).unwrap();
        crate::daemon::store::Store::open(&state.join("stoa.db")).unwrap();
        let old = rusqlite::Connection::open(state.join("stoa.db")).unwrap();
        for (id, user) in [
            ("s-mine", me.name.as_str()),
            ("s-other", "stoa-no-such-user-x"),
        ] {
            old.execute(
                "INSERT INTO sessions (session_id, owner, unix_user, agentic_tool, worktree, status, created_at, updated_at) \
                 VALUES (?1, 'user:1', ?2, 'claude-code', '/tmp', 'idle', 't', 't')",
                [id, user],
            )
            .unwrap();
        }
        drop(old);
        assert_eq!(split(&state, &workers).unwrap(), 1);
        let mine = workers.join(me.uid.to_string()).join("stoa.db");
        let copy = rusqlite::Connection::open(&mine).unwrap();
        let ids: Vec<String> = copy
            .prepare("SELECT session_id FROM sessions")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(ids, ["s-mine"]);
        assert!(state.join("stoa.db.before-workers").exists());
        assert!(!state.join("stoa.db").exists());
        // Done once: a second start finds nothing to split.
        assert_eq!(split(&state, &workers).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&base);
    }
}
