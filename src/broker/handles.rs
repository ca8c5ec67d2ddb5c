//! The handle table: everything the broker started for users, by the opaque [`Handle`]
//! the daemon names it with. Each entry carries its owner (Unix user and the API principal
//! that asked for it) and the pidfd taken at clone.
//!
//! | life       | entered when                         | the daemon may                        |
//! |------------|--------------------------------------|---------------------------------------|
//! | `Starting` | forked, exec not yet reported        | nothing: it has not heard of it       |
//! | `Running`  | the child reported its exec          | `Kill`, `Adopt`, `Release`, see it listed |
//! | `Exited`   | reaped (the exit went to the daemon) | `Release`, see it listed, `Adopt` (its fds and exit, to drain what it wrote); never signal |
//! | `Failed`   | the child failed before exec, or never reported | nothing; dropped when reaped |
//!
//! An entry goes when its process is reaped **and** the daemon released it (or never
//! heard of it).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::time::Instant;

use super::cgroup::SpawnCgroup;
use crate::wire::{ExitStatus, Handle, HandleInfo};

/// Where a reply waits to go: the request it answers, on the link it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Which daemon link (each new daemon gets a new one).
    pub link: u64,
    pub id: u64,
}

/// A spawn whose child has not reported its exec yet.
pub struct Starting {
    /// The child's report pipe (end of file on exec).
    pub report: OwnedFd,
    /// After this the child is killed and the spawn answered as failed: a user who stops
    /// the child can delay only their own spawn.
    pub deadline: Instant,
    pub reply: ReplyTo,
    /// The fds for the daemon, sent with the `Spawned` reply.
    pub for_daemon: Vec<OwnedFd>,
    /// The audit record, written once the outcome is known.
    pub record: serde_json::Value,
    /// The working directory, for the error message if it cannot be entered.
    pub cwd: String,
    /// The HTTP request it serves, for the log lines of its outcome.
    pub request_id: Option<String>,
}

pub enum Life {
    Starting(Box<Starting>),
    Running,
    Exited(ExitStatus),
    Failed,
}

pub struct Entry {
    pub info: HandleInfo,
    /// The owner key of the API principal that asked for it (`Principal::owner`).
    pub principal: String,
    /// The Unix account it runs as, as resolved at spawn: what signals to it are sent as.
    pub account: super::spawn::Account,
    pub life: Life,
    /// Taken at clone: what the broker signals the child through when it must die before
    /// its exec, and proof the pid is still this child's.
    pub pidfd: OwnedFd,
    /// Duplicates of what the daemon got, for a daemon that restarts: no stdin pipe
    /// unless `kept_stdin` (then it is second, after the control socket).
    pub kept: Vec<OwnedFd>,
    pub kept_stdin: bool,
    /// What it was started for (an agent's run may not log in on the local socket).
    pub purpose: crate::wire::Purpose,
    /// The daemon is done with it; dropped once the process is also reaped.
    pub released: bool,
    /// Its cgroup, until the process is reaped.
    pub cgroup: Option<SpawnCgroup>,
}

impl Entry {
    pub fn running(&self) -> bool {
        matches!(self.life, Life::Running)
    }

    /// Counts against the user's and the broker's limits (not yet reaped).
    pub fn live(&self) -> bool {
        matches!(self.life, Life::Starting(_) | Life::Running)
    }

    /// The daemon knows of it: reported, and not released.
    pub fn visible(&self) -> bool {
        !self.released && matches!(self.life, Life::Running | Life::Exited(_))
    }
}

#[derive(Default)]
pub struct HandleTable {
    entries: BTreeMap<Handle, Entry>,
    by_pid: HashMap<i32, Handle>,
    next: u64,
}

impl HandleTable {
    pub fn new() -> HandleTable {
        HandleTable {
            next: 1,
            ..HandleTable::default()
        }
    }

    /// The number the next handle will get (an upgrade in place carries it).
    pub fn peek_next(&self) -> u64 {
        self.next.max(1)
    }

    /// An upgraded broker's table goes on numbering where the old one stopped.
    pub fn set_next(&mut self, next: u64) {
        self.next = self.next.max(next);
    }

    pub fn next_handle(&mut self) -> Handle {
        let h = Handle(self.next.max(1));
        self.next = h.0 + 1;
        h
    }

    pub fn insert(&mut self, entry: Entry) {
        self.by_pid.insert(entry.info.pid, entry.info.handle);
        self.entries.insert(entry.info.handle, entry);
    }

    pub fn get(&self, handle: Handle) -> Option<&Entry> {
        self.entries.get(&handle)
    }

    pub fn get_mut(&mut self, handle: Handle) -> Option<&mut Entry> {
        self.entries.get_mut(&handle)
    }

    /// The entry the daemon may name: reported and not released.
    pub fn visible(&self, handle: Handle) -> Option<&Entry> {
        self.entries.get(&handle).filter(|e| e.visible())
    }

    pub fn visible_mut(&mut self, handle: Handle) -> Option<&mut Entry> {
        self.entries.get_mut(&handle).filter(|e| e.visible())
    }

    pub fn remove(&mut self, handle: Handle) -> Option<Entry> {
        let e = self.entries.remove(&handle)?;
        if self.by_pid.get(&e.info.pid) == Some(&handle) {
            self.by_pid.remove(&e.info.pid);
        }
        Some(e)
    }

    /// The handle of a child by pid, while it is not reaped.
    pub fn by_pid(&self, pid: i32) -> Option<Handle> {
        self.by_pid.get(&pid).copied()
    }

    /// A reaped child's pid is free for reuse: forget it.
    pub fn forget_pid(&mut self, pid: i32) {
        self.by_pid.remove(&pid);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Handle, &Entry)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Handle, &mut Entry)> {
        self.entries.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Unreaped children, in `Starting` or `Running`.
    pub fn live_count(&self) -> usize {
        self.entries.values().filter(|e| e.live()).count()
    }

    pub fn live_for_uid(&self, uid: u32) -> usize {
        self.entries
            .values()
            .filter(|e| e.info.uid == uid && e.live())
            .count()
    }

    /// Children not yet reaped at all (any life but `Exited`), by pid.
    pub fn unreaped(&self) -> usize {
        self.by_pid.len()
    }

    /// The handles of spawns still waiting for their child's report.
    pub fn starting(&self) -> Vec<Handle> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.life, Life::Starting(_)))
            .map(|(h, _)| *h)
            .collect()
    }
}
