//! `stoa user add|list|remove|token`: API users, edited as root in the broker's store (the
//! broker notices the change by itself). Tokens are printed once and kept only as digests.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::broker::policy::Policy;
use crate::broker::spawn::Account;
use crate::broker::users::{self, ApiUser, UserStore};
use crate::config;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create an API user acting as a Unix user; prints its token once.
    Add {
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
    Remove { name: String },
    /// Replace a user's token with a new one, printed once.
    Token { name: String },
}

/// The admin token's name (`Principal::Admin`): no API user may look like it.
const RESERVED_NAME: &str = "admin";

fn state_dir() -> Result<PathBuf, String> {
    let path = std::env::var_os("STOA_BROKER_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(config::default_broker_config);
    let euid = nix::unistd::geteuid().as_raw();
    let (policy, _) = Policy::load(&path, euid)?;
    Ok(policy.state_dir)
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
        Ok(())
    })
}

fn list() -> Result<(), String> {
    let dir = state_dir()?;
    let store = UserStore::load(&dir, nix::unistd::geteuid().as_raw())?;
    println!("{:<24} {:<24} {:<6} created", "NAME", "UNIX USER", "ADMIN");
    for u in &store.users {
        let created = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(u.created_at),
        );
        println!(
            "{:<24} {:<24} {:<6} {created}",
            super::escape::field(&u.name),
            super::escape::field(&u.unix_user),
            if u.admin { "yes" } else { "no" }
        );
    }
    Ok(())
}
