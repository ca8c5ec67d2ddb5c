//! The shutdown (SIGTERM) as a pure transition function: given the phase and what is true
//! now, the next phase, how long it may last, and what to do on entering it. The event
//! loop applies the action; nothing here touches the system.
//!
//! | phase        | on entry (`Action`)                              | ends when                     |
//! |--------------|--------------------------------------------------|-------------------------------|
//! | `Grace`      | daemon told (`ShuttingDown`), spawns refused, terminals hung up | no executor left, or `shutdown_grace_secs` |
//! | `Terminated` | `TermAll`: SIGTERM to every executor's group     | no executor left, or 5 s      |
//! | `Killed`     | `KillAll`: SIGKILL to every group and cgroup     | no executor left, or 5 s      |
//! | `Recording`  | –                                                | the daemon released every handle (so it stored every end), or 10 s |
//! | `Daemon`     | `StopDaemon`: SIGTERM to the daemon              | it exited (else `KillDaemon` after 10 s); the broker exits 0 |
#![forbid(unsafe_code)]

use std::time::Duration;

/// At shutdown, after the policy's grace: how long SIGTERM gets before SIGKILL, and how
/// long the daemon gets to record the ends and to exit.
pub const TERM_WAIT: Duration = Duration::from_secs(5);
pub const RECORD_WAIT: Duration = Duration::from_secs(10);
pub const DAEMON_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    Grace,
    Terminated,
    Killed,
    Recording,
    Daemon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    TermAll,
    KillAll,
    /// Executors survived SIGKILL: say so.
    ReportSurvivors,
    StopDaemon,
    KillDaemon,
}

/// What is true now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Executors not yet reaped.
    pub live: usize,
    /// Handles the daemon has not released.
    pub handles: usize,
    /// The phase's time is up.
    pub due: bool,
}

/// The next phase, its duration and the action on entering it; `None`: stay.
pub fn next(phase: Stopping, f: Facts) -> Option<(Stopping, Duration, Action)> {
    use Stopping::*;
    let done = f.live == 0 || f.due;
    match phase {
        Grace if done => Some((Terminated, TERM_WAIT, Action::TermAll)),
        Terminated if done => Some((Killed, TERM_WAIT, Action::KillAll)),
        Killed if done => Some((
            Recording,
            RECORD_WAIT,
            if f.live > 0 {
                Action::ReportSurvivors
            } else {
                Action::Nothing
            },
        )),
        Recording if f.handles == 0 || f.due => Some((Daemon, DAEMON_WAIT, Action::StopDaemon)),
        Daemon if f.due => Some((Daemon, DAEMON_WAIT, Action::KillDaemon)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(live: usize, handles: usize, due: bool) -> Facts {
        Facts { live, handles, due }
    }

    #[test]
    fn work_that_finishes_in_the_grace_skips_to_recording_without_violence() {
        let (p, _, a) = next(Stopping::Grace, facts(0, 1, false)).unwrap();
        assert_eq!((p, a), (Stopping::Terminated, Action::TermAll));
        let (p, _, a) = next(p, facts(0, 1, false)).unwrap();
        assert_eq!((p, a), (Stopping::Killed, Action::KillAll));
        let (p, _, a) = next(p, facts(0, 1, false)).unwrap();
        assert_eq!((p, a), (Stopping::Recording, Action::Nothing));
        assert_eq!(next(p, facts(0, 1, false)), None, "waits for the releases");
        let (p, _, a) = next(p, facts(0, 0, false)).unwrap();
        assert_eq!((p, a), (Stopping::Daemon, Action::StopDaemon));
        assert_eq!(next(p, facts(0, 0, false)), None);
        assert_eq!(next(p, facts(0, 0, true)).unwrap().2, Action::KillDaemon);
    }

    #[test]
    fn running_work_waits_for_the_grace_then_each_phase_its_time() {
        assert_eq!(next(Stopping::Grace, facts(2, 2, false)), None);
        assert_eq!(
            next(Stopping::Grace, facts(2, 2, true)).unwrap().2,
            Action::TermAll
        );
        assert_eq!(next(Stopping::Terminated, facts(1, 2, false)), None);
        let (p, _, a) = next(Stopping::Killed, facts(1, 2, true)).unwrap();
        assert_eq!((p, a), (Stopping::Recording, Action::ReportSurvivors));
        assert_eq!(next(p, facts(1, 2, true)).unwrap().2, Action::StopDaemon);
    }
}
