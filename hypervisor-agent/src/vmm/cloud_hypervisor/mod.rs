//! The Cloud Hypervisor driver: an operator-supplied `cloud-hypervisor`
//! binary (v52.0 or newer, see [`MIN_VERSION`]) driven over its REST API on
//! a Unix socket, following its OpenAPI spec.
//!
//! One process per VM, started as `cloud-hypervisor --api-socket
//! path=<run dir>/api.sock --seccomp true` (so crash recovery recognises it
//! by its command line), in the VMM jail ([`crate::jail`]: its own uid,
//! namespaces, cgroup) unless the jail is off. The VMM never opens a TAP:
//! the agent opens the slot's TAP and passes it with the API request
//! ([`fds`]). Then:
//!
//! - boot: `vmm.ping` (version check) → `vm.create` (payload: kernel,
//!   initramfs, cmdline; vCPUs; memory; disks by serial; hybrid vsock;
//!   serial console) → `vm.add-net` with the TAP's fd → `vm.boot`;
//! - light sleep: `vm.pause` → `vm.snapshot` into a directory of the run
//!   directory (`config.json`, `state.json`, `memory-ranges`: RAM is always
//!   in the snapshot), handed to the agent's user and moved where the agent
//!   asked → `vm.shutdown` + `vmm.shutdown`;
//! - wake / template clone: a fresh process → `vm.restore` from a per-VM
//!   copy of the snapshot's small files ([`snapshot`]) with the TAP's fd
//!   (`net_fds`), `memory_restore_mode` `CopyOnWrite`, else `OnDemand`,
//!   else `Copy` (the mode used is logged and kept,
//!   [`crate::vmm::Vm::restore_mode`]) and `resume` as asked → `vm.info` to
//!   check the state;
//! - GPU groundwork: `vm.add-device` / `vm.remove-device` (VFIO) and
//!   [`VmmCapabilities`] (GPUs bound to `vfio-pci` on this host).
//!
//! The guest agent is reached over hybrid vsock
//! ([`crate::vmm::AgentEndpoint::HybridVsock`], [`vsock`]). Run directory:
//! `api.sock`, `vsock.sock`, `console.log` (serial console, appended across
//! restores), `vmm.log` (the VMM's stderr), `vmm.pid`, `restore/` (the
//! restore source), plus what the agent keeps there (`rw.ext4`, `state/`).
//!
//! Every error names the binary and the API call ([`ChError`]); on every
//! failed launch the VMM process is killed and reaped.
//!
//! `somna doctor` reports the configured binary and its version with
//! [`probe_binary`].

mod api;
mod config;
mod error;
pub mod fds;
mod process;
pub mod snapshot;
mod types;
mod version;
mod vfio;
mod vm;
pub mod vsock;

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{Instrument, info, info_span, warn};

pub use api::ApiClient;
pub use error::ChError;
pub use types::{MemoryRestoreMode, VmInfo, VmState};
pub use version::{ChVersion, MIN_VERSION, MIN_VERSION_WHY, Release};
pub use vfio::host_gpus;
pub use vm::ChVm;

use process::{ChProcess, Outputs, resolve_binary};
use types::{RestoreConfig, RestoredNetConfig};

use super::{
    Accelerator, AgentEndpoint, ChannelKind, Incoming, Vm, VmSpec, Vmm, VmmCapabilities, VmmError,
};
use crate::jail::{Jail, JailedLaunch, VmmFiles};
use crate::rundir::VmDir;

/// The API socket in a run directory.
pub fn api_socket(dir: &VmDir) -> PathBuf {
    dir.path().join("api.sock")
}

/// The hybrid vsock socket in a run directory.
pub fn vsock_socket(dir: &VmDir) -> PathBuf {
    dir.path().join("vsock.sock")
}

/// Where the host reaches the guest agent of the VM in a run directory.
fn agent_endpoint(dir: &VmDir) -> AgentEndpoint {
    AgentEndpoint::HybridVsock {
        socket: vsock_socket(dir),
        port: somna_proto::GUEST_VSOCK_PORT,
    }
}

/// Where a restore reads its (rewritten) snapshot from.
pub fn restore_dir(dir: &VmDir) -> PathBuf {
    dir.path().join("restore")
}

/// Tunables; the defaults suit production.
#[derive(Debug, Clone)]
pub struct ChOptions {
    /// How long a new VMM may take to open its API socket.
    pub socket_timeout: Duration,
    /// Bound on ordinary API calls.
    pub api_timeout: Duration,
    /// Bound on `vm.snapshot` and `vm.restore` (they move guest RAM).
    pub snapshot_timeout: Duration,
    /// Memory restore modes to try, in order.
    pub restore_modes: Vec<MemoryRestoreMode>,
}

impl Default for ChOptions {
    fn default() -> Self {
        ChOptions {
            socket_timeout: Duration::from_secs(10),
            api_timeout: Duration::from_secs(30),
            snapshot_timeout: Duration::from_secs(300),
            restore_modes: MemoryRestoreMode::PREFERENCE.to_vec(),
        }
    }
}

/// Drives `cloud-hypervisor`.
pub struct CloudHypervisorVmm {
    binary: PathBuf,
    version: ChVersion,
    options: ChOptions,
    capabilities: VmmCapabilities,
    /// Modes this binary refused as unknown (not tried again) or could not
    /// use on this host (userfaultfd unavailable).
    refused_modes: std::sync::Mutex<HashSet<MemoryRestoreMode>>,
    jail: Jail,
}

impl std::fmt::Debug for CloudHypervisorVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudHypervisorVmm")
            .field("binary", &self.binary)
            .field("version", &self.version.version)
            .finish()
    }
}

/// Starts `binary` in a scratch directory, asks `vmm.ping` for its version
/// and shuts it down again; the process is always reaped. This is what
/// `somna doctor` calls to report the configured binary: it returns the
/// version of any binary that answers, supported or not (compare with
/// [`ChVersion::is_supported`] / [`MIN_VERSION`]); errors name the binary
/// (missing, not executable, no API socket, no answer).
pub async fn probe_binary(path: &Path) -> Result<ChVersion, ChError> {
    let binary = resolve_binary(path)?;
    probe_resolved(&binary, &ChOptions::default()).await
}

async fn probe_resolved(binary: &Path, options: &ChOptions) -> Result<ChVersion, ChError> {
    let scratch = std::env::temp_dir().join(format!(
        "somna-ch-probe-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&scratch).map_err(ChError::io(format!(
        "create probe directory {}",
        scratch.display()
    )))?;
    let dir = VmDir::open(scratch);
    let result = async {
        // Unjailed: it runs no guest and is asked only its version.
        let process = spawn(binary, &dir, None, true)?;
        let api = ApiClient::new(api_socket(&dir), binary.to_path_buf(), options.api_timeout);
        let version = async {
            process
                .wait_for_socket(api.socket(), options.socket_timeout, || dir.vmm_log_tail(5))
                .await?;
            let r = api.ping().await;
            version_of(binary, r.map_err(|e| vm::explain_exit(&process, e, &dir))?)
        }
        .await;
        if process.try_exit().is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(2), api.action("vmm.shutdown")).await;
            if tokio::time::timeout(Duration::from_secs(2), process.wait_exit())
                .await
                .is_err()
            {
                process.kill().await;
            }
        }
        version
    }
    .await;
    let _ = dir.remove();
    result
}

/// Starts the VMM with its outputs in `dir`: the serial console appended to
/// `console.log`, its messages in `vmm.log` (fresh, or appended for a
/// second attempt of one launch).
fn spawn(
    binary: &Path,
    dir: &VmDir,
    jail: Option<Arc<JailedLaunch>>,
    fresh_log: bool,
) -> Result<ChProcess, ChError> {
    for stale in [api_socket(dir), vsock_socket(dir)] {
        // Left by a previous VMM of this directory (it does not always
        // remove them); binding would fail.
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ChError::io(format!(
                    "remove stale socket {}",
                    stale.display()
                ))(e));
            }
            _ => {}
        }
    }
    let open_append = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(ChError::io(format!("open {}", p.display())))
    };
    let stdout = open_append(&dir.console_log())?;
    let stderr = if fresh_log {
        std::fs::File::create(dir.vmm_log())
            .map_err(ChError::io(format!("create {}", dir.vmm_log().display())))?
    } else {
        open_append(&dir.vmm_log())?
    };
    ChProcess::spawn(binary, &api_socket(dir), Outputs { stdout, stderr }, jail)
}

/// A VMM process that answers its API.
struct Started {
    process: ChProcess,
    api: ApiClient,
    version: ChVersion,
    /// Its jail's uid; None when unjailed.
    uid: Option<u32>,
}

/// Takes over the VM that a previous agent's Cloud Hypervisor runs in
/// `dir` (crash recovery), through its API socket and a pidfd. It is
/// handled as unjailed (the agent's jail is not up yet): a snapshot it
/// saves goes first to the VMM's `uid`, and the caller takes it back.
pub async fn adopt(
    foreign: Arc<crate::process::ForeignProcess>,
    dir: &VmDir,
    uid: Option<u32>,
) -> Result<ChVm, ChError> {
    // For messages only; a jailed VMM's path is the one in its jail.
    let binary = std::fs::read_link(format!("/proc/{}/exe", foreign.pid()))
        .unwrap_or_else(|_| PathBuf::from("cloud-hypervisor"));
    let options = ChOptions::default();
    let process = ChProcess::adopt(foreign, binary.clone());
    let api = ApiClient::new(api_socket(dir), binary.clone(), options.api_timeout);
    let r = api.ping().await;
    let version = version_of(&binary, r.map_err(|e| vm::explain_exit(&process, e, dir))?)?;
    Ok(ChVm {
        id: dir.id(),
        process,
        api,
        uid,
        jail: Jail::disabled(),
        snapshot_timeout: options.snapshot_timeout,
        endpoint: agent_endpoint(dir),
        version,
        restore_mode: None,
        dir: dir.clone(),
        devices: Default::default(),
    })
}

fn version_of(binary: &Path, ping: types::VmmPingResponse) -> Result<ChVersion, ChError> {
    let release = Release::parse(&ping.version).ok_or_else(|| ChError::BadResponse {
        binary: binary.to_path_buf(),
        call: "vmm.ping".into(),
        reason: format!("version {:?} is not a release number", ping.version),
    })?;
    Ok(ChVersion {
        release,
        version: ping.version,
        build_version: ping.build_version,
        features: ping.features,
    })
}

/// Whether `message` contains `word` as a whole word (not inside a longer
/// identifier: `Copy` is not in "CopyOnWrite").
fn mentions_word(message: &str, word: &str) -> bool {
    message.match_indices(word).any(|(i, _)| {
        let before = message[..i].chars().next_back();
        let after = message[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

impl CloudHypervisorVmm {
    /// Checks `binary` (exists, executable, answers `vmm.ping`, at least
    /// [`MIN_VERSION`]) and looks for GPUs bound to `vfio-pci`.
    pub async fn start(binary: &Path, options: ChOptions) -> Result<Self, ChError> {
        let binary = resolve_binary(binary)?;
        let version = probe_resolved(&binary, &options).await?;
        if !version.is_supported() {
            return Err(ChError::UnsupportedVersion {
                binary,
                found: version.to_string(),
                why: MIN_VERSION_WHY,
            });
        }
        let gpus = host_gpus();
        info!(binary = %binary.display(), version = %version, gpus = gpus.len(), "cloud-hypervisor driver ready");
        Ok(CloudHypervisorVmm {
            binary,
            version,
            options,
            capabilities: VmmCapabilities { vfio: true, gpus },
            refused_modes: Default::default(),
            jail: Jail::disabled(),
        })
    }

    /// Runs every VMM in `jail`.
    pub fn with_jail(mut self, jail: Jail) -> Self {
        self.jail = jail;
        self
    }

    /// The resolved binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The version `vmm.ping` reported at start.
    pub fn version(&self) -> &ChVersion {
        &self.version
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashSet<MemoryRestoreMode>> {
        self.refused_modes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new VMM process for `dir` (in its jail, which also shows it
    /// `restore_from`), answering its API with a supported version. On
    /// error nothing is left running.
    async fn start_process(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        fresh_log: bool,
        restore_from: Option<&Path>,
    ) -> Result<Started, ChError> {
        let files = VmmFiles {
            read_only: restore_from.into_iter().collect(),
            ..Default::default()
        };
        let jailed = self
            .jail
            .prepare(spec, dir, &self.binary, &files)
            .map_err(|source| ChError::Jail {
                binary: self.binary.clone(),
                source,
            })?
            .map(Arc::new);
        let uid = jailed.as_ref().map(|j| j.uid());
        let process = spawn(&self.binary, dir, jailed, fresh_log)?;
        let api = ApiClient::new(
            api_socket(dir),
            self.binary.clone(),
            self.options.api_timeout,
        );
        let ready = async {
            dir.write_pid(process.pid()).map_err(ChError::io(format!(
                "write pid file {}",
                dir.pid_file().display()
            )))?;
            process
                .wait_for_socket(api.socket(), self.options.socket_timeout, || {
                    dir.vmm_log_tail(5)
                })
                .await?;
            let r = api.ping().await;
            let version = version_of(
                &self.binary,
                r.map_err(|e| vm::explain_exit(&process, e, dir))?,
            )?;
            if !version.is_supported() {
                return Err(ChError::UnsupportedVersion {
                    binary: self.binary.clone(),
                    found: version.to_string(),
                    why: MIN_VERSION_WHY,
                });
            }
            Ok(version)
        }
        .await;
        match ready {
            Ok(version) => Ok(Started {
                process,
                api,
                version,
                uid,
            }),
            Err(e) => {
                process.kill().await;
                Err(e)
            }
        }
    }

    fn vm(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        started: Started,
        restore_mode: Option<MemoryRestoreMode>,
    ) -> ChVm {
        let Started {
            process,
            api,
            version,
            uid,
        } = started;
        ChVm {
            id: spec.id.clone(),
            process,
            api,
            uid,
            jail: self.jail.clone(),
            snapshot_timeout: self.options.snapshot_timeout,
            endpoint: agent_endpoint(dir),
            version,
            restore_mode,
            dir: dir.clone(),
            devices: Default::default(),
        }
    }

    async fn boot(&self, spec: &VmSpec, dir: &VmDir) -> Result<ChVm, ChError> {
        let tap = super::open_tap(spec)
            .await
            .map_err(|what| ChError::Tap { what })?;
        let started = self.start_process(spec, dir, true, None).await?;
        let (process, api) = (&started.process, &started.api);
        let config = config::vm_config(spec, &vsock_socket(dir));
        let booted = async {
            api.create(&config).await?;
            if let (Some(net), Some(tap)) = (config::net_config(spec), &tap) {
                api.add_net(&net, tap.as_fd()).await?;
            }
            api.action("vm.boot").await
        }
        .await;
        // The VMM holds its own copy of the TAP now.
        drop(tap);
        if let Err(e) = booted {
            let e = vm::explain_exit(process, e, dir);
            process.kill().await;
            return Err(e);
        }
        info!(
            pid = process.pid(),
            uid = started.uid,
            "cloud-hypervisor VM booting"
        );
        Ok(self.vm(spec, dir, started, None))
    }

    /// Restores `incoming` with the first memory restore mode that works.
    /// A mode refused with 400 (unknown to this build, or an invalid
    /// request) leaves the VMM untouched, so the next mode is tried on the
    /// same process; any other failure may leave a half-created VM behind,
    /// so that process is killed and the next mode gets a fresh one.
    async fn restore(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        incoming: &Incoming,
    ) -> Result<ChVm, ChError> {
        if incoming.memory_in_file {
            return Err(ChError::Unsupported {
                binary: self.binary.clone(),
                what: "cannot restore RAM from a separate memory file; its snapshots hold RAM themselves".into(),
            });
        }
        let source = snapshot::prepare_restore(
            &incoming.state,
            &restore_dir(dir),
            spec,
            &vsock_socket(dir),
        )?;
        let source_url = snapshot::file_url(&source)?;
        let tap = super::open_tap(spec)
            .await
            .map_err(|what| ChError::Tap { what })?;
        let taps: Vec<_> = tap.iter().map(|t| t.as_fd()).collect();
        let net_fds: Vec<RestoredNetConfig> = tap
            .iter()
            .map(|_| RestoredNetConfig {
                id: config::NET_ID.into(),
                num_fds: 1,
            })
            .collect();
        let modes: Vec<MemoryRestoreMode> = {
            let refused = self.refused();
            self.options
                .restore_modes
                .iter()
                .copied()
                .filter(|m| !refused.contains(m))
                .collect()
        };
        let mut attempts = Vec::new();
        let mut current: Option<Started> = None;
        let mut fresh_log = true;
        for mode in modes {
            let started = match current.take() {
                Some(c) => c,
                None => {
                    let started = self
                        .start_process(spec, dir, fresh_log, Some(&incoming.state))
                        .await?;
                    fresh_log = false;
                    started
                }
            };
            let (process, api) = (&started.process, &started.api);
            let request = RestoreConfig {
                source_url: source_url.clone(),
                memory_restore_mode: mode,
                resume: incoming.resume,
                net_fds: net_fds.clone(),
            };
            let restored = api
                .with_timeout(self.options.snapshot_timeout)
                .restore(&request, &taps)
                .await;
            let e = match restored {
                Ok(()) => match self.settle(api, incoming.resume).await {
                    Ok(()) => {
                        info!(pid = process.pid(), uid = started.uid, memory_restore_mode = %mode, resumed = incoming.resume, "cloud-hypervisor VM restored");
                        return Ok(self.vm(spec, dir, started, Some(mode)));
                    }
                    Err(e) => {
                        let e = vm::explain_exit(process, e, dir);
                        process.kill().await;
                        return Err(e);
                    }
                },
                Err(e) => vm::explain_exit(process, e, dir),
            };
            let message = match &e {
                ChError::Api {
                    status, message, ..
                } => format!("HTTP {status}: {message}"),
                other => other.to_string(),
            };
            let unknown_mode = e.status() == Some(400) && mentions_word(&message, mode.as_str());
            let no_uffd = mode == MemoryRestoreMode::OnDemand && message.contains("userfaultfd");
            if unknown_mode || no_uffd {
                warn!(memory_restore_mode = %mode, reason = %message, "cloud-hypervisor cannot restore in this mode; not trying it again");
                self.refused().insert(mode);
            } else {
                warn!(memory_restore_mode = %mode, reason = %message, "vm.restore failed; trying the next mode");
            }
            attempts.push(format!("{mode}: {message}"));
            if e.status() == Some(400) {
                current = Some(started);
            } else {
                started.process.kill().await;
            }
        }
        if let Some(started) = current {
            started.process.kill().await;
        }
        Err(ChError::RestoreFailed {
            binary: self.binary.clone(),
            source_dir: incoming.state.clone(),
            attempts: if attempts.is_empty() {
                "no memory restore mode is left to try".into()
            } else {
                attempts.join("; ")
            },
        })
    }

    /// After `vm.restore`: the VM must be running (resume) or paused.
    /// A build that ignored `resume` is resumed explicitly.
    async fn settle(&self, api: &ApiClient, resume: bool) -> Result<(), ChError> {
        let state = api.info().await?.state;
        match (resume, state) {
            (true, VmState::Running) | (false, VmState::Paused) => Ok(()),
            (true, VmState::Paused) => {
                warn!("cloud-hypervisor ignored resume in vm.restore; resuming explicitly");
                api.action("vm.resume").await
            }
            (false, VmState::Running) => api.action("vm.pause").await,
            (_, other) => Err(ChError::BadResponse {
                binary: self.binary.clone(),
                call: "vm.info".into(),
                reason: format!("the VM is {other:?} after vm.restore"),
            }),
        }
    }
}

#[async_trait]
impl Vmm for CloudHypervisorVmm {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    /// Always hybrid vsock (no vhost module needed).
    fn channel(&self) -> ChannelKind {
        ChannelKind::Vsock
    }

    /// Nothing beyond the common arguments: devices are virtio-pci, so no
    /// `pci=off`; the console is the 8250 serial port (`console=ttyS0`).
    fn guest_kernel_args(&self) -> &'static str {
        ""
    }

    fn ram_in_memory_file(&self) -> bool {
        false
    }

    fn capabilities(&self) -> VmmCapabilities {
        self.capabilities.clone()
    }

    async fn launch(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        incoming: Option<&Incoming>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        if spec.channel != ChannelKind::Vsock {
            return Err(ChError::Unsupported {
                binary: self.binary.clone(),
                what: "gives guests a vsock agent channel only (somna.channel=vsock)".into(),
            }
            .into());
        }
        if spec.accelerator != Accelerator::Kvm {
            return Err(ChError::Unsupported {
                binary: self.binary.clone(),
                what: format!("runs on KVM only, not {}", spec.accelerator),
            }
            .into());
        }
        let span =
            info_span!("cloud_hypervisor_launch", id = %spec.id, restore = incoming.is_some());
        let vm = async {
            match incoming {
                None => self.boot(spec, dir).await,
                Some(incoming) => self.restore(spec, dir, incoming).await,
            }
        }
        .instrument(span)
        .await?;
        Ok(Box::new(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_match_whole_words() {
        let m = "Failed to deserialize JSON: unknown variant `CopyOnWrite`, expected `Copy` or `OnDemand`";
        assert!(mentions_word(m, "CopyOnWrite"));
        assert!(mentions_word(m, "Copy"));
        assert!(!mentions_word("unknown variant `CopyOnWrite`", "Copy"));
        assert!(!mentions_word("OnDemandX", "OnDemand"));
    }
}
