//! Crash recovery: at start-up the agent owns nothing, so every run
//! directory under `vms/` is a leftover from a previous agent process. Its
//! VMM (if still alive, and verifiably ours) is killed and the directory is
//! removed.

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use crate::process;
use crate::rundir;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMM processes that were still running and were killed.
    pub killed: usize,
    /// Run directories removed.
    pub removed: usize,
}

pub async fn reap_leftovers(vms_dir: &Path) -> RecoveryReport {
    let mut report = RecoveryReport::default();
    let dirs = match rundir::list(vms_dir) {
        Ok(d) => d,
        Err(e) => {
            warn!(dir = %vms_dir.display(), error = %e, "cannot list run directories");
            return report;
        }
    };
    for dir in dirs {
        if let Some(pid) = dir.read_pid()
            && process::is_vmm_of(pid, dir.path())
        {
            match process::kill_and_wait(pid, Duration::from_secs(10)).await {
                Ok(()) => {
                    info!(id = %dir.id(), pid, "killed orphaned VMM");
                    report.killed += 1;
                }
                Err(e) => {
                    // Keep the directory: its files are still in use.
                    warn!(id = %dir.id(), pid, error = %e, "cannot kill orphaned VMM");
                    continue;
                }
            }
        }
        match dir.remove() {
            Ok(()) => report.removed += 1,
            Err(e) => {
                warn!(dir = %dir.path().display(), error = %e, "cannot remove leftover run directory")
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rundir::VmDir;

    #[tokio::test]
    async fn kills_recorded_process_and_removes_dirs() {
        let root = tempfile::tempdir().unwrap();
        let live = VmDir::create(root.path(), "sbx-live").unwrap();
        let stale = VmDir::create(root.path(), "sbx-stale").unwrap();
        // A stand-in VMM whose command line names its run directory, as
        // every real VMM's does.
        let log = live.path().join("vmm.log");
        std::fs::write(&log, b"").unwrap();
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&log)
            .spawn()
            .unwrap();
        live.write_pid(child.id()).unwrap();
        // A pid file naming a process that is not ours must not be killed.
        stale.write_pid(std::process::id()).unwrap();

        crate::process::tests::wait_for_exec(child.id());
        let report = reap_leftovers(root.path()).await;
        assert_eq!(
            report,
            RecoveryReport {
                killed: 1,
                removed: 2
            }
        );
        assert!(child.wait().is_ok());
        assert!(rundir::list(root.path()).unwrap().is_empty());
    }
}
