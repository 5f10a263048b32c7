//! Crash recovery: at start-up the agent owns nothing, so every run
//! directory under `vms/` is a leftover from a previous agent process.
//!
//! A directory with a sandbox record (`record`) holds a sandbox whose data
//! must not be lost: if its VMM still runs, the VMM is put to sleep through
//! its control socket (pause, save state, stop, seal), and the sandbox is
//! taken back asleep; if its VMM is gone but its snapshot is sealed, it is
//! taken back asleep as it is; if there is no snapshot to wake it from, it
//! is taken back FAILED with its writable disk, which a wake boots again.
//! Everything else (a create or destroy that was under way, a template
//! build, a warm-pool VM) is discarded: its VMM, if still alive and
//! verifiably ours, is killed and the directory removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use somna_snapshotter::{MemoryLayout, Snapshot};
use tracing::{info, warn};

use crate::agent::{Agent, Shape, VMM_STOP_GRACE};
use crate::lifecycle::{REBOOT_HINT, discard_memory, release_snapshot, seal_snapshot};
use crate::process::{self, ForeignProcess};
use crate::record::{RecordedMemory, SandboxRecord};
use crate::rundir::{self, VmDir};
use crate::sandbox::{SandboxRequest, SandboxState, StartMode};
use crate::vmm::qemu::QemuVm;
use crate::vmm::{Vm, VmmError, cloud_hypervisor};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMM processes that were still running and were killed.
    pub killed: usize,
    /// Run directories removed.
    pub removed: usize,
    /// Running sandboxes whose VMM was put to sleep to be taken back.
    pub rescued: usize,
}

/// What start-up found under `vms/`.
#[derive(Debug, Default)]
pub struct Recovery {
    pub report: RecoveryReport,
    /// Sandboxes to take back, with their records (state "sleeping" or
    /// "failed").
    pub kept: Vec<(VmDir, SandboxRecord)>,
}

/// Goes through every run directory a previous agent left (see the module
/// documentation).
pub async fn recover(vms_dir: &Path) -> Recovery {
    let mut out = Recovery::default();
    for dir in list(vms_dir) {
        let mut record = SandboxRecord::load(&dir);
        let mut rescued = false;
        if let Some(process) = recorded_vmm(&dir) {
            let outcome = match &record {
                Some(r) if RESCUABLE.contains(&r.vmm.as_str()) => {
                    rescue(Arc::new(process), &dir, r).await
                }
                _ => stop(&process, &dir).await.map(|()| false),
            };
            match outcome {
                Ok(true) => {
                    rescued = true;
                    out.report.rescued += 1;
                }
                Ok(false) => out.report.killed += 1,
                // Keep the directory: its files are still in use.
                Err(()) => continue,
            }
        }
        if let Some(r) = record.as_mut()
            && Snapshot::open(dir.path()).is_ok()
        {
            // Put to sleep just now, or sealed after the record was
            // written (the agent died at the end of a sleep).
            if rescued || r.was(SandboxState::Running) {
                r.state = SandboxState::Sleeping.as_str().into();
                r.sleep_count += 1;
                if let Err(e) = r.save(&dir) {
                    warn!(id = %r.id, error = %e, "cannot update the sandbox record");
                }
            }
            info!(id = %r.id, dir = %dir.path().display(), "taking back a sleeping sandbox");
            out.kept.push((dir, r.clone()));
            continue;
        }
        if let Some(r) = record.as_mut()
            && dir.rw_disk().exists()
        {
            if !r.was(SandboxState::Failed) {
                warn!(id = %r.id, "a sandbox's VMM was gone with no snapshot to wake it from; keeping its disk");
                discard_memory(&dir);
                r.state = SandboxState::Failed.as_str().into();
                r.failure = Some(format!(
                    "its VMM was gone when the host agent started again{REBOOT_HINT}"
                ));
                if let Err(e) = r.save(&dir) {
                    warn!(id = %r.id, error = %e, "cannot update the sandbox record");
                }
            }
            out.kept.push((dir, r.clone()));
            continue;
        }
        remove(&dir, &mut out.report);
    }
    out
}

/// Kills every VMM under `vms_dir` and removes every run directory (agent
/// shutdown, after the sandboxes were destroyed).
pub async fn reap_leftovers(vms_dir: &Path) -> RecoveryReport {
    let mut report = RecoveryReport::default();
    for dir in list(vms_dir) {
        if let Some(process) = recorded_vmm(&dir) {
            if stop(&process, &dir).await.is_err() {
                continue;
            }
            report.killed += 1;
        }
        remove(&dir, &mut report);
    }
    report
}

fn list(vms_dir: &Path) -> Vec<VmDir> {
    rundir::list(vms_dir).unwrap_or_else(|e| {
        warn!(dir = %vms_dir.display(), error = %e, "cannot list run directories");
        Vec::new()
    })
}

fn remove(dir: &VmDir, report: &mut RecoveryReport) {
    match dir.remove() {
        Ok(()) => report.removed += 1,
        Err(e) => {
            warn!(dir = %dir.path().display(), error = %e, "cannot remove leftover run directory")
        }
    }
}

/// The VMM recorded in the directory's pid file, if it still runs and is
/// verifiably the one started there (a recycled pid is left alone).
fn recorded_vmm(dir: &VmDir) -> Option<ForeignProcess> {
    let pid = dir.read_pid()?;
    if !process::is_vmm_of(pid, dir.path()) {
        return None;
    }
    ForeignProcess::open(pid).unwrap_or_else(|e| {
        warn!(id = %dir.id(), pid, error = %e, "cannot open the leftover VMM process");
        None
    })
}

async fn stop(process: &ForeignProcess, dir: &VmDir) -> Result<(), ()> {
    let pid = process.pid();
    match process.kill_and_wait(Duration::from_secs(10)).await {
        Ok(()) => {
            info!(id = %dir.id(), pid, "killed orphaned VMM");
            Ok(())
        }
        Err(e) => {
            warn!(id = %dir.id(), pid, error = %e, "cannot kill orphaned VMM");
            Err(())
        }
    }
}

/// The VMMs whose running sandboxes a restarted agent puts to sleep.
const RESCUABLE: [&str; 2] = ["qemu", "cloud-hypervisor"];

/// Puts a sandbox's still-running VMM to sleep the way `Agent::sleep`
/// would, and records it asleep. Ok(true): sealed; Ok(false): it could not
/// be saved and was killed; Err: it could not even be killed.
async fn rescue(
    process: Arc<ForeignProcess>,
    dir: &VmDir,
    record: &SandboxRecord,
) -> Result<bool, ()> {
    let started = std::time::Instant::now();
    // The VM ran after any earlier seal (an interrupted wake): that
    // snapshot no longer matches its memory.
    if let Ok(old) = Snapshot::open(dir.path()) {
        let _ = old.unseal();
    }
    let saved = match record.vmm.as_str() {
        "qemu" => save_qemu(&process, dir, record).await,
        _ => save_cloud_hypervisor(&process, dir).await,
    };
    let (vm, layout) = match saved {
        Ok(saved) => saved,
        Err(e) => {
            warn!(id = %record.id, error = %e, "cannot save a running sandbox left by the previous agent; it is discarded");
            return stop(&process, dir).await.map(|()| false);
        }
    };
    vm.stop(VMM_STOP_GRACE).await;
    if let Err(e) = seal_snapshot(
        dir,
        layout,
        record.cpus,
        record.memory_mib,
        record.root_disk.clone(),
    ) {
        warn!(id = %record.id, error = %e, "cannot seal the snapshot of a rescued sandbox; it is discarded");
        return Ok(false);
    }
    release_snapshot(dir, layout);
    info!(id = %record.id, vmm = %record.vmm, elapsed_ms = started.elapsed().as_millis() as u64, "put a running sandbox left by the previous agent to sleep");
    Ok(true)
}

/// Pauses an adopted QEMU and saves its state (device state only when its
/// RAM is its own memory file).
async fn save_qemu(
    process: &Arc<ForeignProcess>,
    dir: &VmDir,
    record: &SandboxRecord,
) -> Result<(Box<dyn Vm>, MemoryLayout), VmmError> {
    let layout = match record.memory {
        RecordedMemory::Own => MemoryLayout::File,
        RecordedMemory::TemplateCow => MemoryLayout::Stream,
    };
    let vm = QemuVm::adopt(process.clone(), dir);
    // A sleep saves the VM with the host connected to its guest channel.
    // Do the same: with nobody on the serial socket, data the guest has in
    // flight stalls its port, and the stall would be saved with it (the
    // guest agent would never answer after the wake).
    let _channel = tokio::net::UnixStream::connect(dir.agent_socket())
        .await
        .ok();
    vm.undo_finished_save().await?;
    vm.pause().await?;
    vm.save_state(&dir.state_file(), layout == MemoryLayout::File)
        .await?;
    Ok((Box::new(vm), layout))
}

/// Pauses an adopted Cloud Hypervisor (unless a sleep already had) and
/// snapshots it, RAM included, then takes the snapshot back from the
/// VMM's uid as the jail would.
async fn save_cloud_hypervisor(
    process: &Arc<ForeignProcess>,
    dir: &VmDir,
) -> Result<(Box<dyn Vm>, MemoryLayout), VmmError> {
    let (uid, gid) = process::owner(process.pid()).map_err(|source| VmmError::Io {
        what: format!("reading the owner of VMM process {}", process.pid()),
        source,
    })?;
    let jailed = uid != 0;
    let vm = cloud_hypervisor::adopt(process.clone(), dir, jailed.then_some(uid)).await?;
    vm.pause_unless_paused().await?;
    // What a sleep that died after saving left (it is saved again).
    let state = dir.state_file();
    let _ = cloud_hypervisor::snapshot::remove_path(&state);
    vm.save_state(&state, false).await?;
    if jailed {
        crate::jail::reclaim_for_group(&state, gid)?;
    }
    Ok((Box::new(vm), MemoryLayout::Stream))
}

impl Agent {
    /// Takes back a sandbox that sleeps in `dir`, or failed with its disk
    /// kept (see [`recover`]). One whose image is gone cannot wake again
    /// and is discarded.
    pub(crate) async fn take_back(&self, dir: VmDir, record: SandboxRecord) {
        let id = record.id.clone();
        if record.vmm != self.vmm.name() {
            warn!(%id, slept_under = %record.vmm, now = self.vmm.name(), "cannot take back a sleeping sandbox: its snapshot is another VMM's");
            let _ = dir.remove();
            return;
        }
        let image = match self.images().resolve(&record.image).await {
            Ok(i) => i,
            Err(e) => {
                warn!(%id, error = %e, "cannot take back a sleeping sandbox: its image is gone");
                let _ = dir.remove();
                return;
            }
        };
        let root = match self.images().root_disk(&image).await {
            Ok(r) => r,
            Err(e) => {
                warn!(%id, error = %e, "cannot take back a sleeping sandbox: no root disk for its image");
                let _ = dir.remove();
                return;
            }
        };
        let req = SandboxRequest {
            id: Some(id.clone()),
            image: record.image.clone(),
            cpus: record.cpus,
            memory_mib: record.memory_mib,
            disk_mib: record.disk_mib,
            env: record.env.clone(),
            idle_timeout: record.idle_timeout_ms.map(Duration::from_millis),
            start_mode: StartMode::Auto,
            network: record.network.clone(),
        };
        let shape = Shape {
            cpus: record.cpus,
            memory_mib: record.memory_mib,
            disk_mib: record.disk_mib,
        };
        let sandbox = self.new_sandbox(
            &id,
            &req,
            &image,
            &root,
            shape,
            dir,
            record.start_mode(),
            record.memory_mode(),
        );
        let failed = record.was(SandboxState::Failed);
        sandbox.update(|i| {
            if failed {
                i.state = SandboxState::Failed;
                i.failure = record.failure.clone();
            } else {
                i.state = SandboxState::Sleeping;
            }
            // The digest it ran on (a wake on another one is refused).
            i.image_digest = record.image_digest.clone();
            i.created_at = record.created_at();
            i.boot_ms = record.boot_ms;
            i.sleep_count = record.sleep_count;
            i.wake_count = record.wake_count;
        });
        self.insert(sandbox);
        info!(%id, state = %record.state, "took back a sandbox");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rundir::VmDir;

    /// A stand-in VMM whose command line names its run directory, as every
    /// real VMM's does.
    fn stand_in_vmm(dir: &VmDir) -> std::process::Child {
        let log = dir.path().join("vmm.log");
        std::fs::write(&log, b"").unwrap();
        let child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&log)
            .spawn()
            .unwrap();
        dir.write_pid(child.id()).unwrap();
        crate::process::tests::wait_for_exec(child.id());
        child
    }

    fn record(id: &str, vmm: &str, state: &str) -> SandboxRecord {
        let json = serde_json::json!({
            "version": 1, "id": id, "vmm": vmm, "image": "busybox",
            "image_digest": "sha256:00", "cpus": 1, "memory_mib": 256,
            "disk_mib": 512, "env": {}, "created_unix_ms": 1, "boot_ms": 1,
            "start_mode": "cold-boot", "idle_timeout_ms": null,
            "sleep_count": 0, "wake_count": 0, "state": state,
            "memory": "own", "root_disk": "disk", "network": {}
        });
        serde_json::from_value(json).unwrap()
    }

    #[tokio::test]
    async fn kills_recorded_process_and_removes_dirs() {
        let root = tempfile::tempdir().unwrap();
        let live = VmDir::create(root.path(), "sbx-live").unwrap();
        let stale = VmDir::create(root.path(), "sbx-stale").unwrap();
        let mut child = stand_in_vmm(&live);
        // A pid file naming a process that is not ours must not be killed.
        stale.write_pid(std::process::id()).unwrap();

        let report = reap_leftovers(root.path()).await;
        assert_eq!(
            report,
            RecoveryReport {
                killed: 1,
                removed: 2,
                rescued: 0,
            }
        );
        assert!(child.wait().is_ok());
        assert!(rundir::list(root.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn takes_back_sealed_sandboxes_and_discards_the_rest() {
        let root = tempfile::tempdir().unwrap();
        // Asleep (sealed) with its record: taken back, counted as a sleep
        // when the record still said running.
        let asleep = VmDir::create(root.path(), "pool-7").unwrap();
        for f in [asleep.state_file(), asleep.memory_file(), asleep.rw_disk()] {
            std::fs::write(f, b"x").unwrap();
        }
        seal_snapshot(&asleep, MemoryLayout::File, 1, 256, "disk".into()).unwrap();
        record("sbx-asleep", "qemu", "running")
            .save(&asleep)
            .unwrap();
        // Its VMM still runs but cannot be saved (a driver without rescue):
        // killed; no snapshot, so discarded.
        let running = VmDir::create(root.path(), "sbx-running").unwrap();
        let mut child = stand_in_vmm(&running);
        record("sbx-running", "cloud-hypervisor", "running")
            .save(&running)
            .unwrap();
        // A record but neither VMM, snapshot nor disk: discarded.
        let dead = VmDir::create(root.path(), "sbx-dead").unwrap();
        record("sbx-dead", "qemu", "running").save(&dead).unwrap();
        // Its VMM died with no snapshot, its disk is there: kept, failed,
        // its memory file dropped.
        let crashed = VmDir::create(root.path(), "sbx-crashed").unwrap();
        std::fs::write(crashed.rw_disk(), b"files").unwrap();
        std::fs::write(crashed.memory_file(), b"ram").unwrap();
        record("sbx-crashed", "qemu", "running")
            .save(&crashed)
            .unwrap();
        // A sealed snapshot without a record (a template build): discarded.
        let other = VmDir::create(root.path(), "tpl-1").unwrap();
        for f in [other.state_file(), other.memory_file(), other.rw_disk()] {
            std::fs::write(f, b"x").unwrap();
        }
        seal_snapshot(&other, MemoryLayout::File, 1, 256, "disk".into()).unwrap();

        let found = recover(root.path()).await;
        assert_eq!(
            found.report,
            RecoveryReport {
                killed: 1,
                removed: 3,
                rescued: 0,
            }
        );
        assert!(child.wait().is_ok());
        let mut kept: Vec<_> = found.kept.iter().collect();
        kept.sort_by_key(|(_, r)| r.id.clone());
        assert_eq!(kept.len(), 2);
        let (dir, r) = kept[0];
        assert_eq!(dir.path(), asleep.path());
        assert_eq!(
            (r.id.as_str(), r.state.as_str(), r.sleep_count),
            ("sbx-asleep", "sleeping", 1)
        );
        assert_eq!(SandboxRecord::load(&asleep).unwrap(), *r);
        let (dir, r) = kept[1];
        assert_eq!(dir.path(), crashed.path());
        assert_eq!((r.id.as_str(), r.state.as_str()), ("sbx-crashed", "failed"));
        assert!(
            r.failure.as_deref().unwrap().contains("files are kept"),
            "{r:?}"
        );
        assert_eq!(SandboxRecord::load(&crashed).unwrap(), *r);
        assert!(crashed.rw_disk().exists() && !crashed.memory_file().exists());
        let mut left: Vec<_> = rundir::list(root.path())
            .unwrap()
            .iter()
            .map(VmDir::id)
            .collect();
        left.sort();
        assert_eq!(left, ["pool-7", "sbx-crashed"]);
    }
}
