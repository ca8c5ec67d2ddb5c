//! `SetSecret`, `DeleteSecret`, `ListSecrets`: a user credential's own Unix user's secrets
//! (the table has proven the credential). Values are never sent back.
#![forbid(unsafe_code)]

use serde_json::json;
use tracing::{error, info};

use super::super::policy::Refusal;
use super::super::table::{error, refused_kind, Ctx, Outcome};
use super::super::{users, Broker};
use crate::wire::{ErrorKind, ReplyBody, RequestBody};

fn owner(ctx: &Ctx) -> String {
    ctx.principal
        .as_ref()
        .and_then(|p| p.unix_user())
        .expect("the table proved a user credential")
        .to_string()
}

pub fn set(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::SetSecret { name, value, .. } = body else {
        unreachable!("the table routes only SetSecret here")
    };
    change(b, ctx, &name, Some(value))
}

pub fn delete(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::DeleteSecret { name, .. } = body else {
        unreachable!("the table routes only DeleteSecret here")
    };
    change(b, ctx, &name, None)
}

pub fn list(b: &mut Broker, ctx: &Ctx, _body: RequestBody) -> Outcome {
    // The user's own: a default the admin provides is used, never shown.
    let names = match b.credentials.store.get() {
        Ok(store) => store
            .secrets
            .get(&owner(ctx))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Outcome::Reply(ReplyBody::Names(names), Vec::new())
}

/// The secrets of a run the worker starts itself (the daemon's direct path): only when the
/// daemon's config says so, only for the worker's own user (the table proved it), only the
/// names the tool may have. Audited with the names, never the values.
pub fn for_run(b: &mut Broker, ctx: &Ctx, body: RequestBody) -> Outcome {
    let RequestBody::RunSecrets { names, .. } = body else {
        unreachable!("the table routes only RunSecrets here")
    };
    if !b.direct_path {
        let r = Refusal::new(
            "direct-path-only",
            "secrets go to the executor with each run; a worker gets them only when the daemon runs agents without it (execution.use_executor = false)".into(),
        );
        return error(refused_kind(&r), r.to_string());
    }
    if names
        .as_ref()
        .is_some_and(|n| n.len() > crate::wire::limits::MAX_SECRET_NAMES)
    {
        return error(ErrorKind::BadRequest, "too many secret names");
    }
    let account = ctx.account.as_ref().expect("the table proved the account");
    // Each is an audit line: bounded like the worker's other records.
    if !b
        .approval_records
        .take(account.uid, std::time::Instant::now())
    {
        return error(
            ErrorKind::Quota,
            "too many audited requests from this worker; try again shortly",
        );
    }
    let mut all = secrets_of(b, &account.name);
    if let Some(names) = &names {
        all.retain(|(name, _)| names.contains(name));
    }
    let handed: Vec<&String> = all.iter().map(|(n, _)| n).collect();
    b.audit.record(
        "secrets_handed",
        json!({
            "user": account.name,
            "names": handed,
            "by": ctx.principal.as_ref().map(|p| p.owner()),
            "request_id": ctx.request_id,
        }),
    );
    info!(user = %account.name, count = all.len(), "secrets handed to a worker for a direct run");
    Outcome::Reply(ReplyBody::Secrets(all), Vec::new())
}

/// The secrets for `unix_user`, as environment variables: the user's own, and the admin's
/// defaults (`stoa secret set --default`) for names the user has none of.
pub fn secrets_of(b: &mut Broker, unix_user: &str) -> Vec<(String, String)> {
    match b.credentials.store.get() {
        Ok(store) => {
            let mut merged = store.default_secrets.clone();
            if let Some(own) = store.secrets.get(unix_user) {
                merged.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            merged.into_iter().collect()
        }
        Err(e) => {
            error!("user store unreadable, spawning without secrets: {e}");
            Vec::new()
        }
    }
}

fn change(b: &mut Broker, ctx: &Ctx, name: &str, value: Option<String>) -> Outcome {
    let owner = owner(ctx);
    if !users::valid_secret_name(name) {
        return error(
            ErrorKind::BadRequest,
            "secret names are environment variable names: A-Z, 0-9, _",
        );
    }
    if b.policy.env_denied(name) {
        let r = Refusal::new(
            "env-deny",
            format!("{name} may not be set in an environment"),
        );
        return error(refused_kind(&r), r.to_string());
    }
    if let Some(v) = &value {
        if v.len() > users::MAX_SECRET_BYTES || v.contains('\0') {
            return error(
                ErrorKind::BadRequest,
                format!(
                    "a secret is at most {} bytes, without NUL",
                    users::MAX_SECRET_BYTES
                ),
            );
        }
    }
    let deleting = value.is_none();
    let result = b.credentials.store.update(|store| {
        let mine = store.secrets.entry(owner.clone()).or_default();
        match value {
            Some(v) => {
                if let Err(limit) = users::secrets_fit(mine, name, v.len()) {
                    return Ok(Err(limit));
                }
                mine.insert(name.to_string(), v);
                Ok(Ok(true))
            }
            None => Ok(Ok(mine.remove(name).is_some())),
        }
    });
    match result {
        Ok(Err(limit)) => error(ErrorKind::Quota, limit),
        Ok(Ok(true)) => {
            info!(user = %owner, secret = %name, deleted = deleting, "secret changed");
            let event = if deleting {
                "secret_deleted"
            } else {
                "secret_set"
            };
            b.audit
                .record(event, json!({ "unix_user": owner, "name": name }));
            Outcome::Reply(ReplyBody::Done, Vec::new())
        }
        Ok(Ok(false)) => error(ErrorKind::BadRequest, format!("no secret named {name}")),
        Err(e) => error(ErrorKind::Failed, e),
    }
}
