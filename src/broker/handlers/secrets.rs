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
    let names = secrets_of(b, &owner(ctx))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    Outcome::Reply(ReplyBody::Names(names), Vec::new())
}

/// The secrets stored for `unix_user`, as environment variables.
pub fn secrets_of(b: &mut Broker, unix_user: &str) -> Vec<(String, String)> {
    match b.credentials.store.get() {
        Ok(store) => store
            .secrets
            .get(unix_user)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
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
