//! One sandbox on this host: its VM, run directory, guest client and the
//! image defaults merged into every exec.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use somna_images::ImageConfig;
use somna_proto::v1::ExecStart;

use crate::guest::GuestClient;
use crate::rundir::VmDir;
use crate::vmm::{Accelerator, Vm};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Creating,
    Running,
    Failed,
    Destroying,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Failed => "failed",
            SandboxState::Destroying => "destroying",
        }
    }
}

/// What a sandbox is asked to be.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    pub image: String,
    /// 0 means the host default.
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub env: BTreeMap<String, String>,
}

/// A snapshot of a sandbox's record.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub id: String,
    pub image: String,
    pub image_digest: String,
    pub state: SandboxState,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub env: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub accelerator: Accelerator,
    /// Why the sandbox failed (state Failed).
    pub failure: Option<String>,
    /// Milliseconds from the create request to the guest agent answering.
    pub boot_ms: u64,
    /// The VMM process on the host.
    pub vmm_pid: u32,
    /// The run directory on the host.
    pub run_dir: std::path::PathBuf,
}

pub(crate) struct Sandbox {
    pub(crate) info: Mutex<SandboxInfo>,
    pub(crate) dir: VmDir,
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) guest: GuestClient,
    pub(crate) image_config: ImageConfig,
}

impl Sandbox {
    pub(crate) fn info(&self) -> SandboxInfo {
        match self.info.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SandboxInfo)) {
        match self.info.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Fills an exec request's unset fields from the image config and the
    /// sandbox env: env = image Env < sandbox env < request env; cwd = request
    /// or image WorkingDir or "/"; user = request or image User.
    pub(crate) fn apply_exec_defaults(&self, start: &mut ExecStart) {
        let info = self.info();
        let mut env: BTreeMap<String, String> = self.image_config.env.iter().cloned().collect();
        env.extend(info.env);
        env.extend(std::mem::take(&mut start.env));
        start.env = env.into_iter().collect();
        if start.cwd.is_empty() {
            start.cwd = self
                .image_config
                .working_dir
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into());
        }
        if start.user.is_empty() {
            start.user = self.image_config.user.clone().unwrap_or_default();
        }
        start.sandbox_id = info.id;
    }
}
