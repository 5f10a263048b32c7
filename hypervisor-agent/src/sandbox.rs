//! One sandbox on this host: its record, its run directory, the VM while it
//! runs (none while it sleeps), and the image defaults merged into every
//! exec.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use somna_images::ImageConfig;
use somna_proto::v1::ExecStart;

use crate::guest::GuestClient;
use crate::rundir::VmDir;
use crate::vmm::{Accelerator, Vm, VmSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Creating,
    Running,
    Sleeping,
    Failed,
    Destroying,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Sleeping => "sleeping",
            SandboxState::Failed => "failed",
            SandboxState::Destroying => "destroying",
        }
    }
}

/// How a sandbox's VM came to life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMode {
    /// Warm pool, else template, else cold boot.
    #[default]
    Auto,
    ColdBoot,
    Template,
    WarmPool,
}

impl StartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Auto => "auto",
            StartMode::ColdBoot => "cold-boot",
            StartMode::Template => "template",
            StartMode::WarmPool => "warm-pool",
        }
    }
}

/// What a sandbox is asked to be.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    /// The sandbox id (chosen by the control plane); None: the agent picks.
    pub id: Option<String>,
    pub image: String,
    /// 0 means the host default.
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub env: BTreeMap<String, String>,
    /// Sleep after this long without exec or file activity.
    pub idle_timeout: Option<Duration>,
    pub start_mode: StartMode,
    /// Network policy (applies when the host has networking on).
    pub network: somna_netd::EgressPolicy,
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
    /// How the VM started (never `Auto`).
    pub start_mode: StartMode,
    pub idle_timeout: Option<Duration>,
    pub last_active_at: SystemTime,
    pub sleep_count: u64,
    pub wake_count: u64,
    /// The VMM process on the host (0 while asleep).
    pub vmm_pid: u32,
    /// The run directory on the host.
    pub run_dir: std::path::PathBuf,
    /// Traffic counters (None when the host has networking off); filled by
    /// `Agent::get` and `Agent::list`.
    pub network: Option<somna_netd::Counters>,
    /// The network policy in force (None when the host has networking
    /// off); filled like `network`.
    pub network_policy: Option<somna_netd::EgressPolicy>,
}

/// Where a sandbox's guest RAM lives while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemoryMode {
    /// Its own memory file in the run directory, mapped shared: sleep
    /// writes device state only.
    Own,
    /// A private (copy-on-write) mapping of a template's memory file: sleep
    /// must write RAM into the state stream; the next wake moves it into
    /// the sandbox's own memory file.
    TemplateCow,
}

/// A running VM and the client of its guest agent.
pub(crate) struct LiveVm {
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) guest: GuestClient,
}

/// Exec/file activity, for idle detection.
#[derive(Default)]
pub(crate) struct Activity {
    last_ms: AtomicU64,
    inflight: AtomicUsize,
}

impl Activity {
    pub(crate) fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts an exec stream as in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InflightGuard(self.clone())
    }
}

pub(crate) struct InflightGuard(Arc<Activity>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) struct Sandbox {
    pub(crate) info: Mutex<SandboxInfo>,
    pub(crate) dir: VmDir,
    pub(crate) image_config: ImageConfig,
    /// The VM's shape, to restore it with (its memory backing is set per
    /// launch).
    pub(crate) spec: VmSpec,
    /// Identity of the root disk it runs on (see `TemplateInputs`).
    pub(crate) root_disk_id: String,
    /// Keeps the image (and its root disk) out of garbage collection for
    /// as long as the sandbox exists, asleep or awake.
    pub(crate) _image_lease: somna_images::ImageLease,
    pub(crate) live: Mutex<Option<Arc<LiveVm>>>,
    pub(crate) memory: Mutex<MemoryMode>,
    /// Serialises sleep, wake and destroy.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    /// Bumped when the VM stops (sleep, destroy): exec streams of the old
    /// VM end with a clear error instead of a broken connection.
    pub(crate) epoch: tokio::sync::watch::Sender<u64>,
    pub(crate) activity: Arc<Activity>,
    /// Policy and network slot (held while the VMM runs).
    pub(crate) net: crate::network::SandboxNet,
    /// The VMM driver's name (snapshots are only good for the same one).
    pub(crate) vmm: &'static str,
}

impl Sandbox {
    pub(crate) fn info(&self) -> SandboxInfo {
        let mut info = lock(&self.info).clone();
        info.last_active_at = self.activity.last();
        info
    }

    pub(crate) fn state(&self) -> SandboxState {
        lock(&self.info).state
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SandboxInfo)) {
        f(&mut lock(&self.info));
    }

    pub(crate) fn live(&self) -> Option<Arc<LiveVm>> {
        lock(&self.live).clone()
    }

    pub(crate) fn set_live(&self, live: Option<Arc<LiveVm>>) {
        let pid = live.as_ref().map(|l| l.vm.pid()).unwrap_or(0);
        *lock(&self.live) = live;
        self.update(|i| i.vmm_pid = pid);
    }

    /// Writes the sandbox's record into its run directory, for a restarted
    /// agent to take it back (see `record`). Without it the sandbox still
    /// works; it just does not survive an agent crash.
    pub(crate) fn persist(&self) {
        if let Err(e) = crate::record::SandboxRecord::of(self, self.vmm).save(&self.dir) {
            tracing::warn!(id = %self.info().id, error = %e, "cannot write the sandbox record; it will not survive an agent crash");
        }
    }

    /// True when the sandbox failed but its writable disk was kept (its VMM
    /// died): a wake boots it again on that disk.
    pub(crate) fn can_reboot(&self) -> bool {
        self.state() == SandboxState::Failed && self.dir.rw_disk().exists()
    }

    pub(crate) fn memory_mode(&self) -> MemoryMode {
        lock(&self.memory).clone()
    }

    pub(crate) fn set_memory_mode(&self, mode: MemoryMode) {
        *lock(&self.memory) = mode;
    }

    /// Ends the exec streams of the current VM.
    pub(crate) fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Fills an exec request's unset fields from the image config and the
    /// sandbox env: env = image Env < sandbox env < request env; cwd = request
    /// or image WorkingDir or "/"; user = request or image User; an empty
    /// argv runs the image's Entrypoint + Cmd.
    pub(crate) fn apply_exec_defaults(&self, start: &mut ExecStart) {
        if start.argv.is_empty() {
            start.argv = self.image_config.default_argv();
        }
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

/// Locks a std mutex, recovering from poisoning (the data are plain records).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
