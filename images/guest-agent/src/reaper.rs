//! The one place that waits for child processes.
//!
//! As PID 1 (or a child subreaper in dev mode) the agent inherits every
//! orphan of the VM, so it must `waitpid(-1)` on each SIGCHLD or zombies pile
//! up. That loop would also steal the exit status of the processes that
//! `Exec` started, so the reaper hands statuses to them by pid.
//!
//! Why every spawn holds the reaper's lock: std's `Command::spawn` waits for
//! the child itself when `exec` fails (it learns that through a CLOEXEC pipe)
//! and asserts that its `waitpid(child)` succeeds. If the reaper's
//! `waitpid(-1)` reaped that child first, std would panic. Holding the same
//! mutex across `spawn()` and the reap loop rules this out, and it also makes
//! "the child exited before its pid was registered" impossible: the pid is
//! registered before the lock is released, so no "exited early" map is
//! needed (statuses of unregistered pids are orphans' and are dropped).
//!
//! Nothing else in the agent may wait for children: no `Command::output()`,
//! `status()`, `wait()` or `tokio::process`.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
}

pub struct Reaper {
    state: Mutex<State>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must run inside the tokio runtime, before
    /// the first spawn.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            state: Mutex::new(State::default()),
        });
        let r = reaper.clone();
        tokio::spawn(async move {
            // Children that exited before the handler existed sent their
            // SIGCHLD to nobody: sweep once first.
            r.reap();
            while sigchld.recv().await.is_some() {
                // Signals coalesce, so one SIGCHLD may stand for many exits:
                // reap() loops until nothing is left.
                r.reap();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every
        // operation on it is a single insert or remove), so poison is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reap(&self) {
        let mut state = self.lock();
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) => return,
                // Stops and continues are not exits (and are not requested).
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    return;
                }
            };
            match state.waiters.remove(&pid) {
                // The exec may have gone away meanwhile; that is fine.
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::debug!("reaped orphan {pid} ({exit:?})"),
            }
        }
    }

    /// Spawns `cmd` and returns the child and a receiver for its exit.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut state = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        state.waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }
}

/// Whether this process has any child left (alive or zombie). Uses
/// `WNOWAIT`, so it never takes a status from the reaper.
pub fn has_children() -> bool {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which outlives the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    !(rc < 0 && Errno::last() == Errno::ECHILD)
}
