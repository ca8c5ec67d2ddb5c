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
