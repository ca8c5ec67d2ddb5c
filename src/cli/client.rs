//! The HTTP client behind the CLI's client commands.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde_json::Value;

use crate::broker::credentials::ADMIN_TOKEN_FILE;
use crate::broker::policy::Policy;
use crate::config;

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// An error to print, and the exit code that goes with it.
pub struct ClientError {
    pub message: String,
    pub status: Option<u16>,
}

impl Client {
    /// The daemon from `STOA_URL` (default the local one), the token from `STOA_TOKEN`, or,
    /// with neither token nor override, the admin token file of this machine's broker
    /// (readable by root; in single-user mode by its user).
    pub fn from_env() -> Result<Client, String> {
        let base = std::env::var("STOA_URL").unwrap_or_else(|_| config::DEFAULT_URL.into());
        let token = match std::env::var("STOA_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            // Root reads the admin token; anyone else logs in as themselves on the local
            // socket.
            _ => {
                let path = admin_token_path();
                match std::fs::read_to_string(&path) {
                    Ok(t) => t.trim().to_string(),
                    Err(e) => super::local_login::credential().map_err(|why| {
                        format!(
                            "no STOA_TOKEN set, the admin token {} is not readable ({e}), and no local log-in: {why}",
                            path.display()
                        )
                    })?,
                }
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    /// The daemon's base URL (`http://host:port`, no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        Self::finish(response)
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        Self::finish(response)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        Self::finish(response)
    }

    pub fn put_text(&self, path: &str, body: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "text/plain")
            .send(body);
        Self::finish(response)
    }

    /// A Server-Sent Events stream, resumed after `last_event_id`.
    pub fn stream(
        &self,
        path: &str,
        last_event_id: i64,
    ) -> Result<impl std::io::Read, ClientError> {
        let response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "text/event-stream")
            .header("Last-Event-ID", last_event_id.to_string())
            .call()
            .map_err(|e| ClientError {
                message: format!("cannot reach the stoa daemon: {e}"),
                status: None,
            })?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(Self::finish(Ok(response)).err().unwrap_or(ClientError {
                message: format!("HTTP {status}"),
                status: Some(status),
            }));
        }
        Ok(response.into_body().into_reader())
    }

    fn finish(
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut response = response.map_err(|e| ClientError {
            message: format!("cannot reach the stoa daemon: {e}"),
            status: None,
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError {
                message: format!("unreadable reply (HTTP {status}): {e}"),
                status: Some(status),
            })?;
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| ClientError {
                message: format!("unreadable reply (HTTP {status}): {e}"),
                status: Some(status),
            })?
        };
        if status >= 400 {
            let mut message = body["error"]
                .as_str()
                .unwrap_or("request failed")
                .to_string();
            if let Some(rule) = body["rule"].as_str() {
                message.push_str(&format!(" [rule {rule}]"));
            }
            return Err(ClientError {
                message: format!("{message} (HTTP {status})"),
                status: Some(status),
            });
        }
        Ok(body)
    }
}

fn admin_token_path() -> PathBuf {
    let broker_config = std::env::var_os("STOA_BROKER_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(config::default_broker_config);
    let state_dir = std::fs::read_to_string(&broker_config)
        .ok()
        .and_then(|text| toml::from_str::<Policy>(&text).ok())
        .map(|p| p.state_dir)
        .unwrap_or_else(config::default_broker_state_dir);
    state_dir.join(ADMIN_TOKEN_FILE)
}
