//! A running Cloud Hypervisor VM: the [`Vm`] handle the agent holds.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use super::api::ApiClient;
use super::error::ChError;
use super::process::ChProcess;
use super::snapshot;
use super::types::{DeviceConfig, MemoryRestoreMode, VmSnapshotConfig};
use super::version::ChVersion;
use crate::jail::Jail;
use crate::rundir::VmDir;
use crate::vmm::{AgentEndpoint, AttachedDevice, VfioDevice, Vm, VmExit, VmmError};

/// One Cloud Hypervisor process running one VM.
pub struct ChVm {
    pub(super) id: String,
    pub(super) process: ChProcess,
    pub(super) api: ApiClient,
    /// The uid its jail runs it as; None when unjailed.
    pub(super) uid: Option<u32>,
    pub(super) jail: Jail,
    /// Bound on `vm.snapshot`.
    pub(super) snapshot_timeout: Duration,
    pub(super) endpoint: AgentEndpoint,
    pub(super) version: ChVersion,
    pub(super) restore_mode: Option<MemoryRestoreMode>,
    /// Its run directory (for the VMM log in errors).
    pub(super) dir: VmDir,
    /// VFIO devices attached now.
    pub(super) devices: std::sync::Mutex<Vec<AttachedDevice>>,
}

impl ChVm {
    /// The version `vmm.ping` reported when this VM's VMM started.
    pub fn version(&self) -> &ChVersion {
        &self.version
    }

    /// How guest memory came back, when the VM was restored.
    pub fn memory_restore_mode(&self) -> Option<MemoryRestoreMode> {
        self.restore_mode
    }

    /// `vm.info`.
    pub async fn info(&self) -> Result<super::types::VmInfo, ChError> {
        let r = self.api.info().await;
        self.explain(r)
    }

    /// `vm.pause`, unless the VM is paused already (a VM taken over from a
    /// previous agent that died in the middle of a sleep).
    pub async fn pause_unless_paused(&self) -> Result<(), VmmError> {
        if self.info().await?.state == super::types::VmState::Paused {
            return Ok(());
        }
        self.pause().await
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Vec<AttachedDevice>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A failed call to a VMM that has exited is reported as its exit.
    fn explain<T>(&self, r: Result<T, ChError>) -> Result<T, ChError> {
        r.map_err(|e| explain_exit(&self.process, e, &self.dir))
    }

    async fn action(&self, call: &'static str) -> Result<(), VmmError> {
        let r = self.api.action(call).await;
        Ok(self.explain(r)?)
    }
}

/// Where the VMM writes a snapshot, in its run directory.
const SNAPSHOT_OUT: &str = "snapshot.out";

/// When a call failed because the VMM is gone, say so (with its log).
pub(super) fn explain_exit(process: &ChProcess, e: ChError, dir: &VmDir) -> ChError {
    let call = match &e {
        ChError::Transport { call, .. } | ChError::Timeout { call, .. } => call.clone(),
        _ => return e,
    };
    match process.try_exit() {
        Some(exit) => ChError::Exited {
            binary: process.binary().to_path_buf(),
            exit,
            call,
            log: dir.vmm_log_tail(5),
        },
        None => e,
    }
}

#[async_trait]
impl Vm for ChVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn agent_endpoint(&self) -> AgentEndpoint {
        self.endpoint.clone()
    }

    async fn wait_exit(&self) -> VmExit {
        self.process.wait_exit().await
    }

    fn try_exit(&self) -> Option<VmExit> {
        self.process.try_exit()
    }

    async fn kill(&self) -> VmExit {
        self.process.kill().await
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.action("vm.pause").await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.action("vm.resume").await
    }

    /// `vm.snapshot` of the paused VM into the directory `path`. RAM always
    /// goes into the snapshot (`memory-ranges`): Cloud Hypervisor has no
    /// way to leave it in a shared memory file. The jailed VMM sees only
    /// its run directory, so it writes into `snapshot.out` there, which the
    /// agent then takes back from its uid and moves to `path`.
    async fn save_state(&self, path: &Path, memory_in_file: bool) -> Result<(), VmmError> {
        let binary = self.process.binary().to_path_buf();
        if memory_in_file {
            return Err(ChError::Unsupported {
                binary,
                what: "cannot leave guest RAM in a memory file; a snapshot always holds it (memory-ranges)".into(),
            }
            .into());
        }
        let attached: Vec<String> = self.devices().iter().map(|d| d.id.clone()).collect();
        if !attached.is_empty() {
            return Err(ChError::Unsupported {
                binary,
                what: format!(
                    "cannot snapshot {} with VFIO devices attached ({}); light sleep of GPU sandboxes is not supported yet",
                    self.id,
                    attached.join(", ")
                ),
            }
            .into());
        }
        let out = self.dir.path().join(SNAPSHOT_OUT);
        snapshot::prepare_destination(&out)?;
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(&out, Some(uid), None)
                .map_err(ChError::io(format!("hand {} to uid {uid}", out.display())))?;
        }
        let request = VmSnapshotConfig {
            destination_url: snapshot::file_url(&out)?,
        };
        let r = self
            .api
            .with_timeout(self.snapshot_timeout)
            .snapshot(&request)
            .await;
        let taken = async {
            self.explain(r)?;
            self.jail.reclaim(&out).map_err(|source| ChError::Jail {
                binary: self.process.binary().to_path_buf(),
                source,
            })?;
            snapshot::move_dir(&out, path)?;
            snapshot::sync_dir(path)
        }
        .await;
        if let Err(e) = taken {
            // Keep no half-written snapshot around (it can be as large as RAM).
            let _ = snapshot::remove_path(&out);
            let _ = snapshot::remove_path(path);
            return Err(e.into());
        }
        Ok(())
    }

    async fn stop(&self, grace: Duration) -> VmExit {
        if let Some(exit) = self.process.try_exit() {
            return exit;
        }
        let asked = tokio::time::timeout(grace, async {
            // Stop the guest's devices cleanly, then the VMM; the VM may be
            // paused or not booted, so a refusal of the first is fine.
            if let Err(e) = self.api.action("vm.shutdown").await {
                tracing::debug!(pid = self.pid(), error = %e, "vm.shutdown refused");
            }
            self.api.action("vmm.shutdown").await
        })
        .await;
        if let Ok(Err(e)) = &asked {
            tracing::debug!(pid = self.pid(), error = %e, "vmm.shutdown failed; killing");
        }
        match tokio::time::timeout(grace, self.process.wait_exit()).await {
            Ok(exit) => exit,
            Err(_) => self.process.kill().await,
        }
    }

    fn restore_mode(&self) -> Option<String> {
        self.restore_mode.map(|m| m.to_string())
    }

    async fn add_device(&self, device: &VfioDevice) -> Result<AttachedDevice, VmmError> {
        let request = DeviceConfig {
            path: device.path.clone(),
            id: device.id.clone(),
        };
        let r = self.api.add_device(&request).await;
        let attached = match (self.explain(r)?, &device.id) {
            (Some(info), _) => AttachedDevice {
                id: info.id,
                bdf: Some(info.bdf),
            },
            (None, Some(id)) => AttachedDevice {
                id: id.clone(),
                bdf: None,
            },
            (None, None) => {
                return Err(ChError::BadResponse {
                    binary: self.process.binary().to_path_buf(),
                    call: "vm.add-device".into(),
                    reason: "no device info in the answer and no id was asked for".into(),
                }
                .into());
            }
        };
        tracing::info!(id = %self.id, device = %attached.id, path = %device.path.display(), "VFIO device attached");
        self.devices().push(attached.clone());
        Ok(attached)
    }

    async fn remove_device(&self, id: &str) -> Result<(), VmmError> {
        let r = self.api.remove_device(id).await;
        self.explain(r)?;
        self.devices().retain(|d| d.id != id);
        tracing::info!(id = %self.id, device = %id, "device detached");
        Ok(())
    }
}
