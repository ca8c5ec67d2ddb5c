//! A credential for the caller's own Unix user from the broker's local log-in socket
//! (`broker::local_login`): no token needed. The connection stays open while this process
//! runs; the broker ends the log-in when it closes.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::policy::Policy;
use crate::config;

/// The open connection that keeps this process's log-in alive.
static HELD: Mutex<Option<UnixStream>> = Mutex::new(None);

#[derive(Deserialize)]
struct Answer {
    credential: Option<String>,
    error: Option<String>,
}

/// Where the socket is: `STOA_LOCAL_SOCKET`, else the policy's `local_socket`, else the
/// default.
pub fn socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("STOA_LOCAL_SOCKET") {
        return PathBuf::from(p);
    }
    let broker_config = std::env::var_os("STOA_BROKER_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(config::default_broker_config);
    std::fs::read_to_string(&broker_config)
        .ok()
        .and_then(|text| toml::from_str::<Policy>(&text).ok())
        .and_then(|p| p.local_socket)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from(crate::broker::local_login::DEFAULT_SOCKET))
}

/// A credential for this Unix user, or why there is none.
pub fn credential() -> Result<String, String> {
    let path = socket_path();
    let stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the local log-in socket {}: {e}",
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new((&stream).take(4096))
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let answer: Answer = serde_json::from_str(&line)
        .map_err(|e| format!("{}: unreadable answer: {e}", path.display()))?;
    match (answer.credential, answer.error) {
        (Some(c), _) => {
            *HELD.lock().expect("held lock") = Some(stream);
            Ok(c)
        }
        (None, Some(e)) => Err(e),
        (None, None) => Err(format!("{}: an empty answer", path.display())),
    }
}
