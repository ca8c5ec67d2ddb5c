//! Splitting the one daemon's store (before per-user workers) into each user's worker
//! store, once, at broker start. Each Unix user found in it gets a copy with only their
//! rows as `<workers_dir>/<uid>/stoa.db` (unless they have a store already); the old file
//! is renamed `stoa.db.before-workers` and kept. Ids from before keep working (the front
//! finds them by asking the user's worker, or every worker for an admin).
//!
//! Root reads a file the service user owns and writes where users have directories, so:
//! it runs once (a marker in the broker's own directory), the old store is opened
//! read-only and immutable (no journal files are created or followed) and only if it is a
//! plain file with one link; each copy is made in `workers_dir` itself (root's, 0755: no
//! user can plant a link there) under a fresh name, given to its user through its fd, and
//! renamed into the user's directory (a rename replaces a name, it never follows one).
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rusqlite::OpenFlags;
use tracing::{info, warn};

use super::spawn::Account;

const MARKER: &str = "old-store-split";

/// Splits `<daemon_state>/stoa.db` once; returns how many users got a store.
pub fn split(
    daemon_state: &Path,
    workers_dir: &Path,
    broker_state: &Path,
) -> Result<usize, String> {
    let old = daemon_state.join("stoa.db");
    let marker = broker_state.join(MARKER);
    if marker.exists() {
        return Ok(0);
    }
    let meta = match std::fs::symlink_metadata(&old) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot stat {}: {e}", old.display())),
    };
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(format!(
            "{} is not a plain file with one link: not splitting it",
            old.display()
        ));
    }
    let uri = format!("file:{}?mode=ro&immutable=1", old.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    let conn = rusqlite::Connection::open_with_flags(&uri, flags)
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
    let mut split = 0;
    for name in users {
        let Ok(Some(account)) = Account::lookup(&name) else {
            warn!(user = %name, "old store: no such Unix user now; its rows stay in the old file");
            continue;
        };
        match copy_for(&conn, workers_dir, &account) {
            Ok(true) => split += 1,
            Ok(false) => {}
            Err(e) => warn!(user = %name, "old store: cannot split out this user's rows: {e}"),
        }
    }
    drop(conn);
    std::fs::write(&marker, b"").map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    let kept = daemon_state.join("stoa.db.before-workers");
    if let Err(e) = std::fs::rename(&old, &kept) {
        warn!("cannot rename {}: {e}", old.display());
    }
    info!(users = split, kept = %kept.display(), "split the old store into the users' worker stores");
    Ok(split)
}

/// `account`'s rows into its store, unless it has one. `Ok(false)`: it had one.
fn copy_for(
    old: &rusqlite::Connection,
    workers_dir: &Path,
    account: &Account,
) -> Result<bool, String> {
    let dir = workers_dir.join(account.uid.to_string());
    if std::fs::symlink_metadata(dir.join("stoa.db")).is_ok() {
        return Ok(false);
    }
    let temp = workers_dir.join(format!(".split-{}-{}", account.uid, std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let result = (|| -> Result<(), String> {
        old.execute("VACUUM INTO ?1", [temp.to_string_lossy()])
            .map_err(|e| e.to_string())?;
        let copy = rusqlite::Connection::open(&temp).map_err(|e| e.to_string())?;
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
        let file = std::fs::File::open(&temp).map_err(|e| e.to_string())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        std::os::unix::fs::fchown(&file, Some(account.uid), Some(account.gid))
            .map_err(|e| e.to_string())?;
        if std::fs::symlink_metadata(&dir).is_err() {
            std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| e.to_string())?;
            std::fs::rename(&temp, dir.join("stoa.db")).map_err(|e| e.to_string())?;
            // Given to the user last, with its store in it.
            std::os::unix::fs::lchown(&dir, Some(account.uid), Some(account.gid))
                .map_err(|e| e.to_string())
        } else {
            std::fs::rename(&temp, dir.join("stoa.db")).map_err(|e| e.to_string())
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map(|()| true)
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
        assert_eq!(split(&state, &workers, &base).unwrap(), 1);
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
        // Done once: a second start finds nothing to split, even if the old file is back.
        std::fs::copy(state.join("stoa.db.before-workers"), state.join("stoa.db")).unwrap();
        assert_eq!(split(&state, &workers, &base).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&base);
    }
}
