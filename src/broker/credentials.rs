//! API credentials, verified in the broker: the daemon forwards what callers present, and
//! only the broker says who that is. (Issue 2: the admin token; per-user tokens follow.)
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::wire::Principal;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub struct Credentials {
    admin_sha256: [u8; 32],
    pub store: super::users::StoreCache,
    /// Log-ins with a Unix password (`Login`): in memory only (a broker restart ends them,
    /// as it ends everything else).
    pub logins: Logins,
}

/// The prefix of a log-in's credential (an API user's token has another).
pub const LOGIN_PREFIX: &str = "stoa_login_";
/// Most log-ins kept at once, and per Unix user; past either the oldest is ended.
pub const MAX_LOGINS: usize = 4096;
pub const MAX_LOGINS_PER_USER: usize = 16;

#[derive(Debug, Clone)]
pub struct Login {
    pub number: u64,
    pub uid: u32,
    pub unix_user: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    pub kind: LoginKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginKind {
    /// A password checked by PAM (`POST /login`): at most [`MAX_LOGINS_PER_USER`].
    Password,
    /// From the local socket (`local_login.rs`): lives while its connection does, and is
    /// bounded there.
    Local,
    /// Handed to a worker for an admin's connection to it (`workers::open`), so the admin's
    /// own credential never reaches a user's process: it acts as that one Unix user, for
    /// the admin whose owner key is `by` (named `name`). At most [`MAX_DELEGATIONS`].
    Delegated { by: String, name: String },
}

/// Most delegated credentials at once; past it the oldest is ended.
pub const MAX_DELEGATIONS: usize = 1024;

/// The live log-ins, by their credential's SHA-256.
#[derive(Default)]
pub struct Logins {
    by_digest: std::collections::HashMap<[u8; 32], Login>,
    next_number: u64,
    /// The live delegation for each (admin's owner key, uid), reused while it has more than
    /// half its life left: an admin's listings open a connection to every user's worker,
    /// and must not mint (and soon revoke) a credential each time.
    delegations: std::collections::HashMap<(String, u32), (String, [u8; 32])>,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Logins {
    /// A new log-in for `uid`: its credential (shown once) and what it is; and the log-ins
    /// ended to make room (their revocation keys must be sent).
    pub fn start(
        &mut self,
        uid: u32,
        unix_user: &str,
        lasts_secs: u64,
    ) -> Result<(String, Login, Vec<Login>), String> {
        let mut ended = Vec::new();
        loop {
            let password = |l: &&Login| l.kind == LoginKind::Password;
            let same_user = self
                .by_digest
                .values()
                .filter(password)
                .filter(|l| l.uid == uid)
                .count();
            let all = self.by_digest.values().filter(password).count();
            if same_user < MAX_LOGINS_PER_USER && all < MAX_LOGINS {
                break;
            }
            let crowded = same_user >= MAX_LOGINS_PER_USER;
            let oldest = self
                .by_digest
                .iter()
                .filter(|(_, l)| l.kind == LoginKind::Password && (!crowded || l.uid == uid))
                .min_by_key(|(_, l)| l.number)
                .map(|(d, _)| *d);
            match oldest.and_then(|d| self.by_digest.remove(&d)) {
                Some(l) => ended.push(l),
                None => break,
            }
        }
        let (credential, login) = self.insert(uid, unix_user, lasts_secs, LoginKind::Password)?;
        Ok((credential, login, ended))
    }

    /// What an upgrade in place carries (`upgrade.rs`): password and local log-ins by
    /// digest, and the last number given. Delegations are not carried: they end with the
    /// workers they were handed to, which the upgrade replaces.
    pub fn carried(&self) -> (Vec<([u8; 32], Login)>, u64) {
        let entries = self
            .by_digest
            .iter()
            .filter(|(_, l)| !matches!(l.kind, LoginKind::Delegated { .. }))
            .map(|(d, l)| (*d, l.clone()))
            .collect();
        (entries, self.next_number)
    }

    /// The log-ins an upgraded broker takes over (from [`Logins::carried`]).
    pub fn restore(entries: Vec<([u8; 32], Login)>, next_number: u64) -> Logins {
        Logins {
            by_digest: entries.into_iter().collect(),
            next_number,
            delegations: Default::default(),
        }
    }

    /// A log-in from the local socket (its caller bounds how many there are).
    pub fn start_local(
        &mut self,
        uid: u32,
        unix_user: &str,
        lasts_secs: u64,
    ) -> Result<(String, Login), String> {
        self.insert(uid, unix_user, lasts_secs, LoginKind::Local)
    }

    /// A credential for an admin's connection to `unix_user`'s worker; and the delegations
    /// ended to make room (their revocation keys must be sent).
    pub fn delegate(
        &mut self,
        uid: u32,
        unix_user: &str,
        by: &str,
        name: &str,
        lasts_secs: u64,
    ) -> Result<(String, Vec<Login>), String> {
        let key = (by.to_string(), uid);
        if let Some((credential, digest)) = self.delegations.get(&key) {
            let fresh = self
                .by_digest
                .get(digest)
                .is_some_and(|l| l.expires_at > now_secs() + lasts_secs / 2);
            if fresh {
                return Ok((credential.clone(), Vec::new()));
            }
        }
        let delegated = |l: &Login| matches!(l.kind, LoginKind::Delegated { .. });
        let mut ended = Vec::new();
        while self.by_digest.values().filter(|l| delegated(l)).count() >= MAX_DELEGATIONS {
            let oldest = self
                .by_digest
                .iter()
                .filter(|(_, l)| delegated(l))
                .min_by_key(|(_, l)| l.number)
                .map(|(d, _)| *d);
            match oldest.and_then(|d| self.by_digest.remove(&d)) {
                Some(l) => ended.push(l),
                None => break,
            }
        }
        let kind = LoginKind::Delegated {
            by: by.to_string(),
            name: name.to_string(),
        };
        let (credential, _) = self.insert(uid, unix_user, lasts_secs, kind)?;
        self.delegations
            .insert(key, (credential.clone(), sha256(&credential)));
        // Entries whose credential is gone (ended, expired and swept) go too.
        let live = &self.by_digest;
        self.delegations.retain(|_, (_, d)| live.contains_key(d));
        Ok((credential, ended))
    }

    fn insert(
        &mut self,
        uid: u32,
        unix_user: &str,
        lasts_secs: u64,
        kind: LoginKind,
    ) -> Result<(String, Login), String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a log-in: {e}"))?;
        let credential = format!("{LOGIN_PREFIX}{}", hex(&bytes));
        self.next_number += 1;
        let login = Login {
            number: self.next_number,
            uid,
            unix_user: unix_user.to_string(),
            expires_at: now_secs() + lasts_secs,
            kind,
        };
        self.by_digest.insert(sha256(&credential), login.clone());
        Ok((credential, login))
    }

    /// Ends the log-ins with these numbers.
    pub fn end_numbers(&mut self, numbers: &[u64]) -> Vec<Login> {
        let mut ended = Vec::new();
        self.by_digest.retain(|_, l| {
            let gone = numbers.contains(&l.number);
            if gone {
                ended.push(l.clone());
            }
            !gone
        });
        ended
    }

    /// The live log-in whose credential this is.
    pub fn find(&self, credential: &str) -> Option<&Login> {
        self.by_digest
            .get(&sha256(credential))
            .filter(|l| l.expires_at > now_secs())
    }

    /// Ends the log-in whose credential this is.
    pub fn end(&mut self, credential: &str) -> Option<Login> {
        self.by_digest.remove(&sha256(credential))
    }

    /// Ends every log-in that expired (or whose user `keep` says no longer may log in).
    pub fn sweep(&mut self, mut keep: impl FnMut(&Login) -> bool) -> Vec<Login> {
        let now = now_secs();
        let gone: Vec<[u8; 32]> = self
            .by_digest
            .iter()
            .filter(|(_, l)| l.expires_at <= now || !keep(l))
            .map(|(d, _)| *d)
            .collect();
        gone.iter()
            .filter_map(|d| self.by_digest.remove(d))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// The Unix users with a log-in, each once.
    pub fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .by_digest
            .values()
            .map(|l| l.unix_user.clone())
            .collect();
        users.sort();
        users.dedup();
        users
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

impl Login {
    pub fn principal(&self) -> Principal {
        match &self.kind {
            LoginKind::Delegated { by, name } => Principal::Delegated {
                by: by.clone(),
                name: name.clone(),
                uid: self.uid,
                unix_user: self.unix_user.clone(),
                number: self.number,
            },
            LoginKind::Password | LoginKind::Local => Principal::Login {
                uid: self.uid,
                unix_user: self.unix_user.clone(),
                session: self.number,
            },
        }
    }
}

impl Credentials {
    /// Reads the admin token from `state_dir`, creating it (0600) on first start. Returns
    /// whether it was created, so the caller can print where it is.
    pub fn load_or_create(
        state_dir: &Path,
        owner: u32,
    ) -> Result<(Credentials, PathBuf, bool), String> {
        let path = state_dir.join(ADMIN_TOKEN_FILE);
        let created = match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                if !meta.is_file() || meta.uid() != owner || meta.mode() & 0o077 != 0 {
                    return Err(format!(
                        "{} must be a regular file owned by uid {owner} with mode 0600",
                        path.display()
                    ));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes)
                    .map_err(|e| format!("no randomness for a token: {e}"))?;
                let token = format!("stoa_admin_{}", hex(&bytes));
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                file.write_all(format!("{token}\n").as_bytes())
                    .and_then(|_| file.sync_all())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                true
            }
            Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
        };
        let token = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let token = token.trim();
        if token.len() < 32 {
            return Err(format!("{} holds no valid token", path.display()));
        }
        let store = super::users::StoreCache::new(state_dir.to_path_buf(), owner);
        let credentials = Credentials {
            admin_sha256: sha256(token),
            store,
            logins: Logins::default(),
        };
        Ok((credentials, path, created))
    }

    /// Who `credential` belongs to: the admin token, or an API user of the store.
    pub fn verify(&mut self, credential: &str) -> Option<Principal> {
        // Compare digests without an early exit.
        let digest = sha256(credential);
        let diff = digest
            .iter()
            .zip(self.admin_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            return Some(Principal::Admin);
        }
        if credential.starts_with(LOGIN_PREFIX) {
            return self.logins.find(credential).map(Login::principal);
        }
        match self.store.get() {
            Ok(store) => match store.find_by_token(credential) {
                // Written before ids, and not yet given one (`users::assign_missing_ids`):
                // every such user would be the owner `user:0`, so none of them is anyone.
                Some(u) if u.id == 0 => {
                    tracing::error!(
                        user = ?u.name,
                        "API user has no id yet; refused until the broker assigns one"
                    );
                    None
                }
                found => found.map(|u| Principal::User {
                    id: u.id,
                    name: u.name.clone(),
                    unix_user: u.unix_user.clone(),
                    admin: u.admin,
                }),
            },
            Err(e) => {
                tracing::error!("user store unreadable, only the admin token works: {e}");
                None
            }
        }
    }
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_found_until_it_ends_and_each_user_keeps_at_most_its_share() {
        let mut logins = Logins::default();
        let (c, l, ended) = logins.start(1001, "alice", 3600).unwrap();
        assert!(ended.is_empty());
        assert!(c.starts_with(LOGIN_PREFIX) && c.len() == LOGIN_PREFIX.len() + 64);
        assert_eq!(logins.find(&c).unwrap().number, l.number);
        assert!(logins.find("stoa_login_00").is_none());
        assert_eq!(logins.end(&c).unwrap().number, l.number);
        assert!(logins.find(&c).is_none());
        let first = logins.start(1001, "alice", 3600).unwrap();
        for _ in 1..MAX_LOGINS_PER_USER {
            assert!(logins.start(1001, "alice", 3600).unwrap().2.is_empty());
        }
        let bob = logins.start(1002, "bob", 3600).unwrap();
        let (_, _, ended) = logins.start(1001, "alice", 3600).unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].number, first.1.number, "alice's oldest goes");
        assert!(logins.find(&first.0).is_none());
        assert!(logins.find(&bob.0).is_some(), "bob's stays");
    }

    #[test]
    fn a_delegation_is_reused_for_the_same_admin_and_user_while_fresh() {
        let mut logins = Logins::default();
        let (a, ended) = logins
            .delegate(1001, "alice", "admin", "admin", 3600)
            .unwrap();
        assert!(ended.is_empty());
        let (again, _) = logins
            .delegate(1001, "alice", "admin", "admin", 3600)
            .unwrap();
        assert_eq!(a, again, "reused");
        let (bob, _) = logins
            .delegate(1002, "bob", "admin", "admin", 3600)
            .unwrap();
        assert_ne!(a, bob);
        let (other, _) = logins
            .delegate(1001, "alice", "user:7", "ops", 3600)
            .unwrap();
        assert_ne!(a, other, "another admin gets its own");
        assert!(matches!(
            logins.find(&a).unwrap().principal(),
            Principal::Delegated { uid: 1001, .. }
        ));
        // Ended (or expiring), it is not handed out again.
        logins.end(&a);
        let (fresh, _) = logins
            .delegate(1001, "alice", "admin", "admin", 3600)
            .unwrap();
        assert_ne!(a, fresh);
    }

    #[test]
    fn expired_logins_are_not_found_and_are_swept() {
        let mut logins = Logins::default();
        let (c, _, _) = logins.start(1001, "alice", 0).unwrap();
        assert!(logins.find(&c).is_none(), "expired at once");
        let (d, _, _) = logins.start(1002, "bob", 3600).unwrap();
        let gone = logins.sweep(|_| true);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].unix_user, "alice");
        assert!(logins.find(&d).is_some());
        let gone = logins.sweep(|l| l.unix_user != "bob");
        assert_eq!(gone.len(), 1, "a user no longer allowed is swept");
        assert!(logins.is_empty());
    }
}
