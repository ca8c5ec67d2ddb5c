//! The broker's root-only store of API users (tokens kept as SHA-256 digests) and of each
//! Unix user's secrets. One JSON file, `users.json` in the broker's state directory, mode
//! 0600, replaced atomically; `stoa user …` (as root) edits it under a lock and the broker
//! rereads it when it changes.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const USERS_FILE: &str = "users.json";
const LOCK_FILE: &str = "users.lock";
/// Most secrets one Unix user may keep, and their sizes.
pub const MAX_SECRETS_PER_USER: usize = 64;
pub const MAX_SECRET_BYTES: usize = 16 * 1024;
/// All of one user's secrets together (names and values). They travel in the job the
/// broker writes into the executor's control socket before the executor runs, so job and
/// argv (at most `wire::limits::MAX_ARGV_BYTES`) must fit in a socket buffer (~208 KiB by
/// default): this keeps them well inside it.
pub const MAX_SECRETS_TOTAL_BYTES: usize = 48 * 1024;

/// Whether setting `name` to a value of `value_len` bytes keeps `secrets` within the
/// limits; the error says which one.
pub fn secrets_fit(
    secrets: &BTreeMap<String, String>,
    name: &str,
    value_len: usize,
) -> Result<(), String> {
    if !secrets.contains_key(name) && secrets.len() >= MAX_SECRETS_PER_USER {
        return Err(format!("at most {MAX_SECRETS_PER_USER} secrets per user"));
    }
    let others: usize = secrets
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .map(|(n, v)| n.len() + v.len())
        .sum();
    if others + name.len() + value_len > MAX_SECRETS_TOTAL_BYTES {
        return Err(format!(
            "a user's secrets together are at most {MAX_SECRETS_TOTAL_BYTES} bytes ({others} in the others)"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiUser {
    /// Given at `stoa user add` (random, never 0) and never changed or reused: what the
    /// daemon's objects belong to. 0 in a store written before ids existed (see `load`).
    #[serde(default)]
    pub id: u64,
    pub name: String,
    pub unix_user: String,
    pub admin: bool,
    /// Hex SHA-256 of the token (tokens are 256 random bits, so a fast digest is enough).
    pub token_sha256: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserStore {
    #[serde(default)]
    pub users: Vec<ApiUser>,
    /// Unix user -> secret name -> value. Keyed by Unix user so a secret only ever reaches
    /// processes running as that user.
    #[serde(default)]
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// Secrets the admin provides for everyone (`stoa secret set --default NAME`): a run
    /// gets one where its user has none of that name. Never shown.
    #[serde(default)]
    pub default_secrets: BTreeMap<String, String>,
}

pub fn digest_hex(token: &str) -> String {
    crate::broker::credentials::hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh API-user id: 64 random bits, never 0 (0 marks a store written before ids).
pub fn new_id() -> Result<u64, String> {
    loop {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for an id: {e}"))?;
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// A fresh token: 256 random bits.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a token: {e}"))?;
    Ok(format!("stoa_{}", crate::broker::credentials::hex(&bytes)))
}

/// Valid API user and secret names: short, plain, and safe to print.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('-')
}

/// Secret names become environment variable names.
pub fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_uppercase() || (i > 0 && b.is_ascii_digit()))
}

/// Holds the store's lock while it lives.
pub struct StoreLock {
    _flock: nix::fcntl::Flock<File>,
}

impl UserStore {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(USERS_FILE)
    }

    /// Takes the exclusive lock for a read-modify-write.
    pub fn lock(state_dir: &Path) -> Result<StoreLock, String> {
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))?;
        Ok(StoreLock { _flock: flock })
    }

    /// Reads the store; a missing file is an empty store. The file must belong to `owner`
    /// and be readable by nobody else.
    pub fn load(state_dir: &Path, owner: u32) -> Result<UserStore, String> {
        let path = UserStore::path(state_dir);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UserStore::default()),
            Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
        };
        if !meta.is_file() || meta.uid() != owner || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} must be a regular file owned by uid {owner}, mode 0600",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is corrupt: {e}", path.display()))
    }

    /// Writes the store atomically (a 0600 temporary file, fsync, rename).
    pub fn save(&self, state_dir: &Path) -> Result<(), String> {
        let path = UserStore::path(state_dir);
        let tmp = state_dir.join(format!(".{USERS_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        file.write_all(&text)
            .and_then(|_| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
        if let Ok(dir) = File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    pub fn find_by_token(&self, token: &str) -> Option<&ApiUser> {
        let digest = digest_hex(token);
        // Compare every entry without an early exit on the first byte that differs.
        self.users.iter().find(|u| {
            u.token_sha256.len() == digest.len()
                && u.token_sha256
                    .bytes()
                    .zip(digest.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }

    pub fn find(&self, name: &str) -> Option<&ApiUser> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Gives every user without an id (0: written before ids existed) a fresh one, unused
    /// by any other user. Returns how many it gave.
    pub fn give_missing_ids(&mut self) -> Result<usize, String> {
        let mut given = 0;
        for i in 0..self.users.len() {
            if self.users[i].id != 0 {
                continue;
            }
            let id = loop {
                let id = new_id()?;
                if !self.users.iter().any(|u| u.id == id) {
                    break id;
                }
            };
            self.users[i].id = id;
            given += 1;
        }
        Ok(given)
    }
}

/// Gives every API user of the store in `state_dir` that has no id yet (a store written
/// before ids) a fresh one, under the store's lock, and saves it atomically if anything
/// changed. The broker calls it at start: until then such users cannot authenticate (two
/// of them would share the owner key `user:0`). Returns how many ids it gave.
pub fn assign_missing_ids(state_dir: &Path, owner_uid: u32) -> Result<usize, String> {
    let _lock = UserStore::lock(state_dir)?;
    let mut store = UserStore::load(state_dir, owner_uid)?;
    let given = store.give_missing_ids()?;
    if given > 0 {
        store.save(state_dir)?;
    }
    Ok(given)
}

/// The broker's cached view of the store, reread whenever the file changes.
pub struct StoreCache {
    state_dir: PathBuf,
    owner: u32,
    stamp: Option<(u64, u64, i64, i64)>,
    store: UserStore,
}

impl StoreCache {
    pub fn new(state_dir: PathBuf, owner: u32) -> StoreCache {
        StoreCache {
            state_dir,
            owner,
            stamp: None,
            store: UserStore::default(),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The current store (one stat to see whether it changed).
    pub fn get(&mut self) -> Result<&UserStore, String> {
        let stamp = std::fs::metadata(UserStore::path(&self.state_dir))
            .ok()
            .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec()));
        if stamp != self.stamp || stamp.is_none() {
            self.store = UserStore::load(&self.state_dir, self.owner)?;
            self.stamp = stamp;
        }
        Ok(&self.store)
    }

    /// Applies `change` under the lock to the freshest store and saves it.
    pub fn update<T>(
        &mut self,
        change: impl FnOnce(&mut UserStore) -> Result<T, String>,
    ) -> Result<T, String> {
        let _lock = UserStore::lock(&self.state_dir)?;
        let mut store = UserStore::load(&self.state_dir, self.owner)?;
        let result = change(&mut store)?;
        store.save(&self.state_dir)?;
        self.stamp = None;
        self.store = store;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("alice") && valid_name("a.b-c_1"));
        assert!(!valid_name("") && !valid_name("-x") && !valid_name("a b") && !valid_name("a/b"));
        assert!(valid_secret_name("ANTHROPIC_API_KEY") && valid_secret_name("_X1"));
        assert!(
            !valid_secret_name("1X") && !valid_secret_name("lower") && !valid_secret_name("A-B")
        );
    }

    #[test]
    fn tokens_are_found_by_digest() {
        let token = new_token().unwrap();
        let store = UserStore {
            users: vec![ApiUser {
                id: 7,
                name: "alice".into(),
                unix_user: "alice".into(),
                admin: false,
                token_sha256: digest_hex(&token),
                created_at: 0,
            }],
            ..UserStore::default()
        };
        assert_eq!(
            store.find_by_token(&token).map(|u| u.name.as_str()),
            Some("alice")
        );
        assert!(store.find_by_token("stoa_wrong").is_none());
        assert!(!serde_json::to_string(&store).unwrap().contains(&token));
    }

    #[test]
    fn missing_ids_are_given_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("stoa-users-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let owner = nix::unistd::geteuid().as_raw();
        // A store as written before ids: no `id` field at all.
        let old = r#"{"users":[
            {"name":"a","unix_user":"a","admin":false,"token_sha256":"00","created_at":0},
            {"name":"b","unix_user":"b","admin":false,"token_sha256":"11","created_at":0},
            {"id":42,"name":"c","unix_user":"c","admin":false,"token_sha256":"22","created_at":0}]}"#;
        std::fs::write(UserStore::path(&dir), old).unwrap();
        std::fs::set_permissions(
            UserStore::path(&dir),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(assign_missing_ids(&dir, owner).unwrap(), 2);
        let store = UserStore::load(&dir, owner).unwrap();
        let ids: Vec<u64> = store.users.iter().map(|u| u.id).collect();
        assert!(ids.iter().all(|id| *id != 0), "{ids:?}");
        assert_ne!(ids[0], ids[1]);
        assert_eq!(ids[2], 42);
        // Nothing left to give: the ids stay as they are.
        assert_eq!(assign_missing_ids(&dir, owner).unwrap(), 0);
        assert_eq!(UserStore::load(&dir, owner).unwrap(), store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_stay_within_count_and_total() {
        let mut secrets = BTreeMap::new();
        assert!(secrets_fit(&secrets, "A", MAX_SECRET_BYTES).is_ok());
        for i in 0..2 {
            secrets.insert(format!("BIG{i}"), "x".repeat(MAX_SECRET_BYTES));
        }
        // A third 16 KiB secret would go past the 48 KiB total; replacing one counts it once.
        assert!(secrets_fit(&secrets, "BIG3", MAX_SECRET_BYTES).is_err());
        assert!(secrets_fit(&secrets, "BIG0", MAX_SECRET_BYTES).is_ok());
        let many: BTreeMap<String, String> = (0..MAX_SECRETS_PER_USER)
            .map(|i| (format!("S{i}"), String::new()))
            .collect();
        assert!(secrets_fit(&many, "NEW", 1).is_err());
        assert!(secrets_fit(&many, "S1", 1).is_ok());
    }
}
