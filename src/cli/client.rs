//! The HTTP client behind the CLI's client commands.
//!
//! | what | from, first found wins |
//! |---|---|
//! | the daemon's URL ([`daemon_url`]) | `STOA_URL`; the `listen` of `STOA_CONFIG`, of the default daemon config, of `/etc/stoa/config.toml`; `http://127.0.0.1:7433` |
//! | the credential ([`credential`]) | `STOA_TOKEN`; the broker's admin token file |
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
        let base = daemon_url()?;
        let token = credential()?;
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
        self.finish(response)
    }

    /// POSTs `body` asking for a streamed reply of type `accept`; the body as it comes.
    pub fn post_stream(
        &self,
        path: &str,
        body: &Value,
        accept: &str,
    ) -> Result<impl std::io::Read, ClientError> {
        let response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", accept)
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(self.finish(Ok(response)).err().unwrap_or(ClientError {
                message: format!("HTTP {status}"),
                status: Some(status),
            }));
        }
        Ok(response.into_body().into_reader())
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(response)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(response)
    }

    pub fn put_text(&self, path: &str, body: &str) -> Result<Value, ClientError> {
        let response = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "text/plain")
            .send(body);
        self.finish(response)
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
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(self.finish(Ok(response)).err().unwrap_or(ClientError {
                message: format!("HTTP {status}"),
                status: Some(status),
            }));
        }
        Ok(response.into_body().into_reader())
    }

    /// The error for a daemon that did not answer: which URL was tried, and what to check.
    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError {
            message: format!(
                "cannot reach the stoa daemon at {}: {e} (is `stoa serve` running? set \
                 STOA_URL, or STOA_CONFIG to the config it reads)",
                self.base
            ),
            status: None,
        }
    }

    fn finish(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut response = response.map_err(|e| self.unreachable(e))?;
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

/// The daemon's base URL: `STOA_URL`, else the `listen` address of the daemon config
/// `stoa serve` would read (`STOA_CONFIG`, else the default paths), else the default URL.
pub fn daemon_url() -> Result<String, String> {
    if let Ok(url) = std::env::var("STOA_URL") {
        if !url.trim().is_empty() {
            return Ok(url.trim().trim_end_matches('/').to_string());
        }
    }
    if let Some(path) = std::env::var_os("STOA_CONFIG").filter(|p| !p.is_empty()) {
        // Named on purpose: a config that cannot be read is an error, not a default.
        let path = PathBuf::from(path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("STOA_CONFIG: cannot read {}: {e}", path.display()))?;
        return listen_url(&text).map_err(|e| format!("STOA_CONFIG {}: {e}", path.display()));
    }
    let system = PathBuf::from("/etc/stoa/config.toml");
    for path in [config::default_daemon_config(), system] {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return listen_url(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
    }
    Ok(config::DEFAULT_URL.into())
}

/// The URL a local client reaches a daemon configured with `text` at: a wildcard listen
/// address is reached on loopback.
fn listen_url(text: &str) -> Result<String, String> {
    local_base(&config::DaemonConfig::parse(text)?.listen)
}

/// `http://host:port` for a listen address; a wildcard address is reached on loopback.
pub fn local_base(listen: &str) -> Result<String, String> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| format!("listen {listen:?}: {e}"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Ok(format!(
        "http://{}",
        std::net::SocketAddr::new(ip, addr.port())
    ))
}

/// The bearer credential the CLI presents: `STOA_TOKEN`, else this machine's admin token
/// file (readable by root; in single-user mode by its user). The one place to add another
/// source.
pub fn credential() -> Result<String, String> {
    if let Ok(t) = std::env::var("STOA_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    // Root reads the admin token; anyone else logs in as themselves on the broker's local
    // socket (no token needed).
    let path = admin_token_path();
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.trim().to_string()),
        Err(e) => super::local_login::credential().map_err(|why| {
            format!(
                "no STOA_TOKEN set, the admin token {} is not readable ({e}), and no local \
                 log-in: {why} (set STOA_TOKEN to your API token; an admin makes one with \
                 `stoa user add`)",
                path.display()
            )
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_become_urls_a_local_client_reaches() {
        assert_eq!(
            listen_url("listen = \"0.0.0.0:9000\"").unwrap(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            listen_url("listen = \"[::]:9001\"").unwrap(),
            "http://[::1]:9001"
        );
        assert_eq!(
            listen_url("listen = \"10.1.2.3:80\"").unwrap(),
            "http://10.1.2.3:80"
        );
        assert_eq!(listen_url("").unwrap(), config::DEFAULT_URL);
        assert!(listen_url("listen = \"nowhere\"").is_err());
    }
}
