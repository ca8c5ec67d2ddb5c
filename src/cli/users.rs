//! `stoa user add|list|remove|token`: API users, edited as root in the broker's store (the
//! broker notices the change by itself). Tokens are printed once and kept only as digests.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::broker::policy::{Policy, UserFacts};
use crate::broker::spawn::Account;
use crate::broker::users::{self, ApiUser, UserStore};
use crate::config;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create an API user acting as a Unix user; prints its token once.
    Add {
        /// The API user's name (letters, digits, '.', '_', '-').
        name: String,
        /// The Unix user its sessions and terminals run as.
        #[arg(long)]
        unix_user: String,
        /// May act as any Unix user the policy allows, and see everyone's sessions.
        #[arg(long)]
        admin: bool,
    },
    /// List API users (never tokens).
    List,
    /// Remove an API user; its token stops working at once.
    Remove {
        /// The API user's name.
        name: String,
    },
    /// Replace a user's token with a new one, printed once.
    Token {
        /// The API user's name.
        name: String,
    },
}

/// The admin token's name (`Principal::Admin`): no API user may look like it.
const RESERVED_NAME: &str = "admin";

fn policy_path() -> PathBuf {
    std::env::var_os("STOA_BROKER_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(config::default_broker_config)
}

fn policy() -> Result<Policy, String> {
    let euid = nix::unistd::geteuid().as_raw();
    Ok(Policy::load(&policy_path(), euid)?.0)
}

fn state_dir() -> Result<PathBuf, String> {
    Ok(policy()?.state_dir)
}

/// Why the broker's policy would refuse to run `account`, if it would (as the broker
/// judges it: see `broker::table::user_allowed`). Only as root: a broker not started as
/// root runs nobody but its own user.
fn policy_refusal(policy: &Policy, account: &Account) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let service = nix::unistd::User::from_name(&policy.service_user)
        .ok()
        .flatten();
    let (service_uid, service_gid) = service
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        .unwrap_or((u32::MAX, u32::MAX));
    let allowed_gids: Vec<u32> = policy
        .allow_groups
        .iter()
        .filter_map(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw())
        .collect();
    policy
        .check_user(&UserFacts {
            name: &account.name,
            uid: account.uid,
            gid: account.gid,
            groups: &account.groups,
            service_uid,
            service_gid,
            allowed_gids: &allowed_gids,
        })
        .err()
        .map(|r| format!("{} [rule {}]", r.message, r.rule))
}

fn update<T>(change: impl FnOnce(&mut UserStore) -> Result<T, String>) -> Result<T, String> {
    let dir = state_dir()?;
    if !dir.is_dir() {
        return Err(format!(
            "{} does not exist: start `stoa serve` once first",
            dir.display()
        ));
    }
    let owner = nix::unistd::geteuid().as_raw();
    let _lock = UserStore::lock(&dir)?;
    let mut store = UserStore::load(&dir, owner)?;
    // Any edit also gives ids to users from a store written before ids (the broker does
    // the same at start); ids are never changed once given.
    store.give_missing_ids()?;
    let result = change(&mut store)?;
    store.save(&dir)?;
    Ok(result)
}

pub fn run(command: UserCommand) -> ExitCode {
    let result = match command {
        UserCommand::Add {
            name,
            unix_user,
            admin,
        } => add(name, unix_user, admin),
        UserCommand::List => list(),
        UserCommand::Remove { name } => update(|store| {
            let before = store.users.len();
            store.users.retain(|u| u.name != name);
            if store.users.len() == before {
                return Err(format!("no API user named '{name}'"));
            }
            eprintln!("removed API user '{name}'");
            Ok(())
        }),
        UserCommand::Token { name } => update(|store| {
            let user = store
                .users
                .iter_mut()
                .find(|u| u.name == name)
                .ok_or(format!("no API user named '{name}'"))?;
            // Only the token changes: the id, and so everything the user owns, stays.
            let token = users::new_token()?;
            user.token_sha256 = users::digest_hex(&token);
            eprintln!(
                "new token for '{name}' (the old one no longer works; it is shown only now):"
            );
            println!("{token}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa user: {e}");
            ExitCode::FAILURE
        }
    }
}

fn add(name: String, unix_user: String, admin: bool) -> Result<(), String> {
    if !users::valid_name(&name) {
        return Err(format!(
            "invalid name {name:?}: use letters, digits, '.', '_' and '-'"
        ));
    }
    if name.eq_ignore_ascii_case(RESERVED_NAME) {
        return Err(format!(
            "the name '{name}' is reserved: it is how the machine's admin token is shown"
        ));
    }
    let account =
        Account::lookup(&unix_user)?.ok_or(format!("unix user '{unix_user}' does not exist"))?;
    if account.uid == 0 {
        return Err("an API user may not act as root".into());
    }
    let refusal = policy_refusal(&policy()?, &account);
    update(|store| {
        if store.find(&name).is_some() {
            return Err(format!(
                "API user '{name}' exists already (rotate its token with `stoa user token {name}`)"
            ));
        }
        let token = users::new_token()?;
        store.users.push(ApiUser {
            id: users::new_id()?,
            name: name.clone(),
            unix_user: account.name.clone(),
            admin,
            token_sha256: users::digest_hex(&token),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        eprintln!(
            "created API user '{name}' acting as unix user '{}'{}; its token (shown only now):",
            account.name,
            if admin { ", admin" } else { "" }
        );
        println!("{token}");
        if let Some(why) = &refusal {
            eprintln!(
                "warning: the broker's policy ({}) refuses this unix user: {why}; its \
                 sessions, terminals and commands will fail until the policy allows it \
                 (allow_groups, min_uid/max_uid)",
                policy_path().display()
            );
        }
        Ok(())
    })
}

fn list() -> Result<(), String> {
    let dir = state_dir()?;
    let store = UserStore::load(&dir, nix::unistd::geteuid().as_raw())?;
    let rows: Vec<Vec<String>> = store
        .users
        .iter()
        .map(|u| {
            let created = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(u.created_at),
            );
            vec![
                u.name.clone(),
                u.unix_user.clone(),
                if u.admin { "yes" } else { "no" }.into(),
                created.to_string(),
            ]
        })
        .collect();
    super::table::print(&["NAME", "UNIX USER", "ADMIN", "CREATED"], &rows);
    Ok(())
}

/// Secrets an admin provides for everyone (`stoa secret set --default`): kept in the
/// broker's store, used for a name a user has no secret of their own by, never shown. Root
/// only (the store is root's); every change goes to the audit log.
pub mod defaults {
    use super::*;

    /// All defaults together are at most this: with a user's own (at most
    /// `MAX_SECRETS_TOTAL_BYTES`) they still fit the executor's job.
    const MAX_DEFAULTS_BYTES: usize = users::MAX_SECRETS_TOTAL_BYTES / 2;

    fn audit(event: &str, name: &str) -> Result<(), String> {
        let policy = policy()?;
        let path = policy
            .audit_log
            .clone()
            .unwrap_or_else(|| policy.state_dir.join("audit.jsonl"));
        let mut log = crate::broker::audit::Audit::open(&path, nix::unistd::geteuid().as_raw())?;
        // Who, as far as this process can tell: root, and the login that became root.
        let by = std::env::var("SUDO_USER")
            .ok()
            .map(|u| format!("root (sudo from {u})"))
            .unwrap_or_else(|| "root".into());
        log.record(
            event,
            serde_json::json!({ "name": name, "by": by, "via": "cli" }),
        );
        Ok(())
    }

    pub fn set(name: &str, value: &str) -> Result<(), String> {
        // What the broker checks for a user's own secret, it checks here.
        if policy()?.env_denied(name) {
            return Err(format!(
                "{name} may not be a secret: the policy's env_deny (or the broker) sets it"
            ));
        }
        if value.contains('\0') {
            return Err("a secret's value holds no NUL byte".into());
        }
        if value.len() > users::MAX_SECRET_BYTES {
            return Err(format!(
                "a secret's value is at most {} bytes",
                users::MAX_SECRET_BYTES
            ));
        }
        update(|store| {
            let mut sized = store.default_secrets.clone();
            sized.retain(|n, _| n != name);
            let others: usize = sized.iter().map(|(n, v)| n.len() + v.len()).sum();
            if others + name.len() + value.len() > MAX_DEFAULTS_BYTES {
                return Err(format!(
                    "default secrets together are at most {MAX_DEFAULTS_BYTES} bytes ({others} in the others)"
                ));
            }
            users::secrets_fit(&store.default_secrets, name, value.len())?;
            store
                .default_secrets
                .insert(name.to_string(), value.to_string());
            Ok(())
        })?;
        audit("default_secret_set", name)
    }

    pub fn remove(name: &str) -> Result<bool, String> {
        let removed = update(|store| Ok(store.default_secrets.remove(name).is_some()))?;
        if removed {
            audit("default_secret_deleted", name)?;
        }
        Ok(removed)
    }

    pub fn names() -> Result<Vec<String>, String> {
        let store = UserStore::load(&state_dir()?, nix::unistd::geteuid().as_raw())?;
        Ok(store.default_secrets.keys().cloned().collect())
    }
}
