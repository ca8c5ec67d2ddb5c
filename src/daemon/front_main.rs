//! The front's start-up and state: `stoa __daemon`, started by the broker as the service
//! user with its link at fd 3 and the HTTP listener at fd 4. It holds no user's processes,
//! fds or store: what it serves for a user it forwards to that user's worker
//! (`proxy.rs`).
#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::info;

use stoa_executor::sys;

use super::broker_link::{BrokerLink, LinkObserver};
use super::{auth, http, metrics, serve};
use crate::broker::{DAEMON_LINK_FD, DAEMON_LISTENER_FD};
use crate::config::DaemonConfig;
use crate::wire::{Event, ReplyBody, RequestBody};

/// How long requests in flight get after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct FrontState {
    pub link: Arc<BrokerLink>,
    pub config: DaemonConfig,
    /// The auth cache, revocations and the failed-authentication throttle.
    pub auth: Arc<auth::Auth>,
    /// Open HTTP connections (see `serve.rs`).
    pub connections: Arc<serve::Connections>,
    pub metrics: metrics::Metrics,
    pub shutting_down: Arc<AtomicBool>,
    /// Kept-alive connections to the workers.
    pub pool: Arc<super::worker_pool::Pool>,
}

impl FrontState {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// What the broker tells the front unasked.
struct Observer {
    auth: Arc<auth::Auth>,
    shutting_down: Arc<AtomicBool>,
}

impl LinkObserver for Observer {
    fn reply(&self, _body: &ReplyBody) {}

    fn event(&self, event: Event, _fds: Vec<std::os::fd::OwnedFd>) {
        match event {
            Event::Revoked { keys } => {
                info!(?keys, "credentials revoked: ending their connections");
                self.auth.revoke(&keys);
            }
            Event::ShuttingDown { .. } => self.shutting_down.store(true, Ordering::SeqCst),
            // Processes and connections are the workers'.
            Event::Exited { .. } | Event::Connection { .. } => {}
        }
    }
}

pub fn run(config_path: &Path, state_dir: Option<std::path::PathBuf>) -> Result<(), String> {
    let mut config = DaemonConfig::load(config_path)?;
    if let Some(dir) = state_dir {
        config.state_dir = dir;
    }
    let link_fd = sys::take_inherited_fd(DAEMON_LINK_FD).map_err(|e| {
        format!(
            "no broker link on fd {DAEMON_LINK_FD} ({e}): the daemon is started by `stoa serve`"
        )
    })?;
    let listener_fd = sys::take_inherited_fd(DAEMON_LISTENER_FD)
        .map_err(|e| format!("no listener on fd {DAEMON_LISTENER_FD}: {e}"))?;
    let auth = Arc::new(auth::Auth::new(config.http.auth_failures_per_minute));
    let shutting_down = Arc::new(AtomicBool::new(false));
    let observer = Arc::new(Observer {
        auth: auth.clone(),
        shutting_down: shutting_down.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let link = BrokerLink::start(&runtime, UnixStream::from(link_fd), observer, "the front")?;
    info!(
        uid = nix::unistd::geteuid().as_raw(),
        isolation = link.welcome().isolation,
        "front connected to the broker"
    );
    let state = Arc::new(FrontState {
        link,
        config: config.clone(),
        auth,
        connections: Arc::new(serve::Connections::new(config.http.clone())),
        metrics: metrics::Metrics::default(),
        shutting_down,
        pool: Default::default(),
    });
    runtime.block_on(async move {
        let std_listener = std::net::TcpListener::from(listener_fd);
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let listener =
            tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
        let app = http::router(state.clone());
        if let Err(e) = state.link.request(RequestBody::Ready).await {
            return Err(format!("cannot tell the broker we are ready: {e}"));
        }
        // On SIGTERM: stop accepting, give requests in flight a moment, then go; keep-alive
        // connections must not hold a restart or shutdown hostage.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        tokio::spawn(async move {
            term.recv().await;
            info!("front stopping (SIGTERM)");
            let _ = stop_tx.send(true);
        });
        let mut stopped = stop_rx.clone();
        let server = serve::serve(
            listener,
            app,
            state.config.http.clone(),
            state.connections.clone(),
            stop_rx,
            Some(super::proxy::handover(state.clone())),
        );
        tokio::select! {
            _ = server => {}
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {}
        }
        Ok(())
    })
}
