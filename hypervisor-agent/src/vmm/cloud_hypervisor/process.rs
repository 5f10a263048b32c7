//! The Cloud Hypervisor process: finding and checking the binary, starting
//! it (in its jail, when there is one), waiting for its API socket, and
//! ending it. One task per process owns
//! the child and reaps it; kills are requests to that task, so a kill can
//! never hit a recycled PID.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::error::ChError;
use crate::jail::JailedLaunch;
use crate::process::ForeignProcess;
use crate::vmm::VmExit;

/// The absolute path of `binary`: as given when it names a path, else the
/// first match on `PATH`. Checks that it is an executable file.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, ChError> {
    let problem = |problem: String| ChError::Binary {
        binary: binary.to_path_buf(),
        problem,
    };
    let path = if binary.components().count() > 1 || binary.is_absolute() {
        std::path::absolute(binary).map_err(|e| problem(format!("cannot be resolved: {e}")))?
    } else {
        let search = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&search)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
            .ok_or_else(|| problem("was not found on PATH".into()))?
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(problem(format!("does not exist ({})", path.display())));
        }
        Err(e) => return Err(problem(format!("cannot be read: {e}"))),
    };
    if !meta.is_file() {
        return Err(problem("is not a file".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(problem(format!(
            "is not executable (mode {:o})",
            mode & 0o7777
        )));
    }
    Ok(path)
}

/// Where the process writes.
pub struct Outputs {
    /// The guest serial console (the VMM's stdout, `Tty` mode).
    pub stdout: std::fs::File,
    /// The VMM's own messages.
    pub stderr: std::fs::File,
}

/// A running (or ended) Cloud Hypervisor process.
#[derive(Debug)]
pub struct ChProcess {
    pid: u32,
    binary: PathBuf,
    exit: watch::Receiver<Option<VmExit>>,
    kill: Arc<Notify>,
}

impl ChProcess {
    /// Starts `binary --api-socket path=<api_socket> --seccomp true` in its
    /// own process group (a Ctrl-C meant for the agent must not reach it),
    /// inside `jail` when given; the jail (its uid and cgroup) is held
    /// until the process has been reaped.
    pub fn spawn(
        binary: &Path,
        api_socket: &Path,
        outputs: Outputs,
        jail: Option<Arc<JailedLaunch>>,
    ) -> Result<ChProcess, ChError> {
        let socket = api_socket.to_string_lossy();
        if socket.contains(',') {
            // `--api-socket` takes `key=value,...` options.
            return Err(ChError::Spawn {
                binary: binary.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the API socket path {socket} contains a comma"),
                ),
            });
        }
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--api-socket")
            .arg(format!("path={socket}"))
            // The default, stated: the VMM's own syscall filter is part of
            // the jail's layers.
            .arg("--seccomp")
            .arg("true")
            .stdin(Stdio::null())
            .stdout(outputs.stdout)
            .stderr(outputs.stderr)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(jail) = jail.clone() {
            // SAFETY: runs in the forked child before exec; `enter` makes
            // only system calls on data prepared in the parent.
            unsafe {
                command.pre_exec(move || jail.enter());
            }
        }
        let mut child = command.spawn().map_err(|source| ChError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let kill_rx = kill.clone();
        tokio::spawn(async move {
            // The uid and cgroup stay taken until the process is gone.
            let _jail = jail;
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx.notified() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    VmExit {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => VmExit {
                    code: None,
                    signal: None,
                },
            };
            let _ = tx.send(Some(exit));
        });
        tracing::debug!(pid, binary = %binary.display(), "cloud-hypervisor started");
        Ok(ChProcess {
            pid,
            binary: binary.to_path_buf(),
            exit: rx,
            kill,
        })
    }

    /// A VMM that a previous agent started (crash recovery), held through
    /// its pidfd: waited for and killed through that, never by pid alone.
    /// Its exit status belongs to its parent, so it is not known here.
    pub fn adopt(foreign: Arc<ForeignProcess>, binary: PathBuf) -> ChProcess {
        let pid = foreign.pid();
        let (tx, rx) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let kill_rx = kill.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = foreign.exited() => {}
                _ = kill_rx.notified() => {
                    if let Err(e) = foreign.kill_and_wait(Duration::from_secs(10)).await {
                        tracing::warn!(pid, error = %e, "cannot kill an adopted cloud-hypervisor");
                        return;
                    }
                }
            }
            let _ = tx.send(Some(VmExit {
                code: None,
                signal: None,
            }));
        });
        ChProcess {
            pid,
            binary,
            exit: rx,
            kill,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn try_exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Resolves once the process has exited and been reaped.
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(VmExit {
                code: None,
                signal: None,
            }),
            Err(_) => VmExit {
                code: None,
                signal: None,
            },
        }
    }

    /// SIGKILL (if still running) and wait until it is reaped.
    pub async fn kill(&self) -> VmExit {
        if self.try_exit().is_none() {
            self.kill.notify_one();
        }
        self.wait_exit().await
    }

    /// Waits until the API socket accepts connections. Fails (and leaves
    /// the process to the caller to kill) when the process exits first or
    /// `timeout` passes; `log` gives what the VMM printed, for the error.
    pub async fn wait_for_socket(
        &self,
        socket: &Path,
        timeout: Duration,
        log: impl Fn() -> String,
    ) -> Result<(), ChError> {
        let poll = async {
            // The socket appears within milliseconds of the start; poll
            // with a short, growing interval instead of a fixed sleep.
            let mut interval = Duration::from_millis(1);
            loop {
                if tokio::net::UnixStream::connect(socket).await.is_ok() {
                    return;
                }
                tokio::time::sleep(interval).await;
                interval = (interval * 2).min(Duration::from_millis(25));
            }
        };
        tokio::select! {
            _ = poll => Ok(()),
            exit = self.wait_exit() => Err(ChError::Exited {
                binary: self.binary.clone(),
                exit,
                call: format!("start-up (before its API socket {} appeared)", socket.display()),
                log: log(),
            }),
            _ = tokio::time::sleep(timeout) => Err(ChError::SocketTimeout {
                binary: self.binary.clone(),
                socket: socket.to_path_buf(),
                waited: timeout,
                log: log(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_problems_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cloud-hypervisor");
        let err = resolve_binary(&missing).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        std::fs::write(&missing, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_binary(&missing).unwrap_err().to_string();
        assert!(err.contains("is not executable (mode 644)"), "{err}");
        let err = resolve_binary(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a file"), "{err}");
        let err = resolve_binary(Path::new("somna-no-such-vmm"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found on PATH"), "{err}");
        assert_eq!(
            resolve_binary(Path::new("sh"))
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
    }
}
