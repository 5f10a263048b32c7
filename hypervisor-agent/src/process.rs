//! Host process helpers: recognising a VMM we started (by its command line,
//! so a recycled PID is never killed) and ending processes that are not our
//! children (left by a previous agent) by waiting on a pidfd.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

/// The argv of a live process, or None if it does not exist.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// True when `pid` is alive and its command line mentions `run_dir`: every
/// VMM Somna starts gets paths inside its run directory as arguments.
pub fn is_vmm_of(pid: u32, run_dir: &Path) -> bool {
    let dir = run_dir.to_string_lossy();
    cmdline(pid).is_some_and(|args| args.iter().any(|a| a.contains(dir.as_ref())))
}

/// The effective uid and gid of `pid` (those a jailed VMM runs as).
pub fn owner(pid: u32) -> io::Result<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no {name} line in /proc/{pid}/status"),
                )
            })
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A process this agent did not start (a VMM left by a previous agent),
/// held through a pidfd: it is signalled and waited for by that fd, so a
/// recycled pid is never touched.
pub struct ForeignProcess {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl ForeignProcess {
    /// Opens `pid`; None when it no longer exists.
    pub fn open(pid: u32) -> io::Result<Option<ForeignProcess>> {
        let fd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // A pidfd becomes readable when the process exits.
        // SAFETY: the AsyncFd takes ownership of the pidfd, so the fd stays
        // open (and is not reused) for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Some(ForeignProcess { pid, fd }))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has exited.
    pub async fn exited(&self) {
        // Readiness is sticky for an exited process; an error here means
        // the runtime is going away, which ends the wait just the same.
        let _ = self.fd.readable().await;
    }

    /// Sends SIGKILL (nothing if it has exited already).
    pub fn kill(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number,
        // a null siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends SIGKILL and waits until the process has exited.
    pub async fn kill_and_wait(&self, timeout: Duration) -> io::Result<()> {
        self.kill()?;
        tokio::time::timeout(timeout, self.exited())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "process {} did not exit within {timeout:?} after SIGKILL",
                        self.pid
                    ),
                )
            })
    }
}

/// Sends SIGKILL to `pid` and waits until it has exited. The process need
/// not be our child. Returns Ok if it is gone (or was already gone).
pub async fn kill_and_wait(pid: u32, timeout: Duration) -> io::Result<()> {
    match ForeignProcess::open(pid)? {
        Some(p) => p.kill_and_wait(timeout).await,
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Right after spawn, /proc/<pid>/cmdline can still be empty while the
    /// child is inside execve; wait until the new program's argv shows.
    pub(crate) fn wait_for_exec(pid: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cmdline(pid).is_some_and(|a| a.is_empty()) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} never finished exec"
            );
            std::thread::yield_now();
        }
    }

    #[tokio::test]
    async fn kills_a_process_that_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        std::fs::write(&marker, b"").unwrap();
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&marker)
            .spawn()
            .unwrap();
        let pid = child.id();
        wait_for_exec(pid);
        assert!(is_vmm_of(pid, dir.path()));
        assert!(!is_vmm_of(pid, Path::new("/nonexistent-somna-dir")));
        // The process stays a zombie until reaped, but the pidfd reports exit.
        kill_and_wait(pid, Duration::from_secs(10)).await.unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(cmdline(pid).is_none());
        kill_and_wait(pid, Duration::from_secs(1)).await.unwrap();
    }
}
