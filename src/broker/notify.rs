//! systemd readiness (`sd_notify`): `READY=1` once the first daemon serves HTTP,
//! `STOPPING=1` at shutdown, `STATUS=` on daemon restarts. A no-op without NOTIFY_SOCKET.
#![forbid(unsafe_code)]

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::warn;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name),
                None => SocketAddr::from_pathname(std::path::Path::new(&path)),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(sock), Ok(addr)) => Some((sock, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!("NOTIFY_SOCKET unusable: {e}");
                    None
                }
            }
        });
        Notifier { target }
    }

    pub fn notify(&self, message: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                warn!("sd_notify failed: {e}");
            }
        }
    }
}
