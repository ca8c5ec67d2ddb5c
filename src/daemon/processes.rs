//! The daemon's view of what the broker runs for it: every handle it was given or adopted,
//! with a watch on its exit, and a short history of finished ones for `GET /processes`.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

use super::broker_link::LinkObserver;
use crate::wire::{Event, ExitStatus, FdLayout, Handle, HandleInfo, LimitHit, Program, ReplyBody};

const FINISHED_KEPT: usize = 256;

struct Tracked {
    info: HandleInfo,
    exit: watch::Sender<Option<ExitStatus>>,
    adopted: bool,
}

pub struct Processes {
    live: Mutex<HashMap<Handle, Tracked>>,
    finished: Mutex<VecDeque<ProcessView>>,
    /// `Some(grace)` once the broker said it is shutting down.
    shutdown: watch::Sender<Option<u64>>,
}

impl Default for Processes {
    fn default() -> Self {
        Processes {
            live: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            shutdown: watch::channel(None).0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessView {
    pub handle: u64,
    pub pid: i32,
    pub unix_user: String,
    pub kind: &'static str,
    pub argv: Option<Vec<String>>,
    pub tty: bool,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// A cgroup limit it ran into (out of memory, process limit).
    pub limit_hit: Option<String>,
    /// Taken over from an earlier daemon after a restart.
    pub adopted: bool,
    pub started_at: u64,
}

fn view(t: &Tracked) -> ProcessView {
    let mut v = view_of(&t.info, *t.exit.borrow());
    v.adopted = t.adopted;
    v
}

/// What `GET /processes` shows of a handle (`status`: its exit, if seen).
pub fn view_of(info: &HandleInfo, status: Option<ExitStatus>) -> ProcessView {
    let t = info;
    let (kind, argv) = match &t.program {
        Program::Exec { argv } => ("exec", Some(argv.clone())),
        Program::Shell => ("shell", None),
    };
    ProcessView {
        handle: t.handle.0,
        pid: t.pid,
        unix_user: t.unix_user.clone(),
        kind,
        argv,
        tty: t.fds == FdLayout::Pty,
        running: status.is_none(),
        exit_code: match status {
            Some(ExitStatus::Code(c)) => Some(c),
            _ => None,
        },
        signal: match status {
            Some(ExitStatus::Signal(s)) => Some(s),
            _ => None,
        },
        limit_hit: t.limit_hit.map(|l| l.to_string()),
        adopted: false,
        started_at: t.started_at,
    }
}

impl Processes {
    fn track(&self, info: &HandleInfo, adopted: bool) {
        let mut live = self.live.lock().expect("processes lock");
        let (tx, _) = watch::channel(info.exited);
        live.insert(
            info.handle,
            Tracked {
                info: info.clone(),
                exit: tx,
                adopted,
            },
        );
    }

    /// A receiver that holds the exit status once the broker reports it.
    pub fn exit_watch(&self, handle: Handle) -> Option<watch::Receiver<Option<ExitStatus>>> {
        self.live
            .lock()
            .expect("processes lock")
            .get(&handle)
            .map(|t| t.exit.subscribe())
    }

    /// The cgroup limit `handle`'s processes ran into, known once it has exited.
    pub fn limit_hit(&self, handle: Handle) -> Option<LimitHit> {
        self.live
            .lock()
            .expect("processes lock")
            .get(&handle)
            .and_then(|t| t.info.limit_hit)
    }

    /// Becomes `Some(grace_secs)` when the broker starts shutting down.
    pub fn shutdown_watch(&self) -> watch::Receiver<Option<u64>> {
        self.shutdown.subscribe()
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    /// The daemon is done with `handle`: keep it in the history.
    pub fn finish(&self, handle: Handle) {
        let removed = self.live.lock().expect("processes lock").remove(&handle);
        if let Some(t) = removed {
            let mut finished = self.finished.lock().expect("processes lock");
            if finished.len() == FINISHED_KEPT {
                finished.pop_front();
            }
            finished.push_back(view(&t));
        }
    }

    pub fn list(&self) -> Vec<ProcessView> {
        let mut all: Vec<ProcessView> = self
            .live
            .lock()
            .expect("processes lock")
            .values()
            .map(view)
            .collect();
        all.extend(
            self.finished
                .lock()
                .expect("processes lock")
                .iter()
                .cloned(),
        );
        all.sort_by_key(|v| v.handle);
        all
    }
}

impl LinkObserver for Processes {
    fn reply(&self, body: &ReplyBody) {
        match body {
            ReplyBody::Spawned(info) => self.track(info, false),
            ReplyBody::Adopted(info) => self.track(info, true),
            _ => {}
        }
    }

    fn event(&self, event: Event, _fds: Vec<std::os::fd::OwnedFd>) {
        match event {
            Event::Exited {
                handle,
                status,
                limit_hit,
            } => {
                if let Some(t) = self.live.lock().expect("processes lock").get_mut(&handle) {
                    // Before the exit is seen, so whoever sees it can ask for the limit.
                    t.info.limit_hit = limit_hit;
                    t.exit.send_replace(Some(status));
                }
            }
            Event::ShuttingDown { grace_secs } => {
                self.shutdown.send_replace(Some(grace_secs));
            }
            // Not a process matter: `daemon::Observer` hands revocations to `auth.rs`, which
            // purges the cache and ends the users' live connections.
            Event::Revoked { .. } => {}
            // Connections are the worker's (`worker.rs`), never the process table's.
            Event::Connection { .. } => {}
        }
    }
}
