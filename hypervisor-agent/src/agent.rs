//! The host agent: owns every sandbox VM on this host, from image to boot to
//! destroy, and cleans up what a previous (crashed) agent left behind.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use rand::Rng;
use somna_images::{ImageStore, ImageStoreConfig};
use somna_proto::guest::v1::guest_agent_client::GuestAgentClient;
use somna_proto::v1::ExecStart;
use tonic::transport::Channel;
use tracing::{Instrument, info, info_span, warn};

use crate::accel::{self, AccelChoice};
use crate::config::{AgentConfig, ChannelMode, GuestArtifacts};
use crate::error::AgentError;
use crate::guest::GuestClient;
use crate::recovery;
use crate::rundir::VmDir;
use crate::sandbox::{Sandbox, SandboxInfo, SandboxRequest, SandboxState};
use crate::vmm::qemu::QemuVmm;
use crate::vmm::{DiskSpec, VmSpec, Vmm};

/// How long a VMM gets to exit cleanly on destroy before it is killed.
const VMM_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Lines of guest console included in boot and crash errors.
const CONSOLE_TAIL_LINES: usize = 30;

pub struct Agent {
    config: AgentConfig,
    guest: GuestArtifacts,
    vmm: Arc<dyn Vmm>,
    accel: AccelChoice,
    /// Kernel parameters every guest gets on this host.
    kernel_args: String,
    images: ImageStore,
    sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
}

impl Agent {
    /// Starts the agent: reaps what a previous agent left, picks the
    /// accelerator (probing KVM in `auto` mode) and opens the image store.
    pub async fn start(mut config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        std::fs::create_dir_all(&config.data_dir).map_err(AgentError::io(format!(
            "create data directory {}",
            config.data_dir.display()
        )))?;
        config
            .make_paths_absolute()
            .map_err(AgentError::io("resolve configured paths"))?;
        let guest = GuestArtifacts::in_dir(&config.guest_dir).map_err(AgentError::Config)?;

        let report = recovery::reap_leftovers(&config.vms_dir()).await;
        if report.killed + report.removed > 0 {
            info!(
                killed = report.killed,
                removed = report.removed,
                "reaped VMs left by a previous agent"
            );
        }

        let channel = match config.channel {
            ChannelMode::Auto => QemuVmm::default_channel(),
            ChannelMode::Fixed(kind) => kind,
        };
        let qemu = QemuVmm::new(config.qemu_binary.clone(), channel);
        let version = qemu
            .version()
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?;

        let span = info_span!("accelerator_probe", mode = ?config.accel);
        let started = Instant::now();
        let accel = accel::select(
            config.accel,
            &config.qemu_binary,
            &guest,
            &config.accel_cache_file(),
            config.probe_timeout,
        )
        .instrument(span)
        .await?;
        info!(
            accelerator = %accel.accelerator,
            reason = %accel.reason,
            elapsed_ms = started.elapsed().as_millis() as u64,
            qemu = %version,
            channel = channel.cmdline_value(),
            "accelerator selected"
        );

        let images = ImageStore::new(ImageStoreConfig {
            local_dirs: config.image_dirs.clone(),
            cache_dir: config.image_cache_dir(),
        })?;

        let kernel_args = [
            "console=ttyS0 quiet panic=-1",
            qemu.guest_kernel_args(),
            &accel::guest_kernel_args(accel.accelerator),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");

        Ok(Arc::new(Agent {
            kernel_args,
            guest,
            vmm: Arc::new(qemu),
            accel,
            images,
            sandboxes: RwLock::new(HashMap::new()),
            config,
        }))
    }

    pub fn host_id(&self) -> &str {
        &self.config.host_id
    }

    /// The accelerator this host's VMs use, and why it was chosen.
    pub fn accelerator(&self) -> &AccelChoice {
        &self.accel
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// Creates a sandbox and returns once its guest agent answers.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        req: SandboxRequest,
    ) -> Result<SandboxInfo, AgentError> {
        let id = new_sandbox_id();
        let span = info_span!("create_sandbox", %id, image = %req.image);
        self.create_inner(id, req).instrument(span).await
    }

    async fn create_inner(
        self: &Arc<Self>,
        id: String,
        req: SandboxRequest,
    ) -> Result<SandboxInfo, AgentError> {
        let started = Instant::now();
        let (cpus, memory_mib, disk_mib) = self.validate(&req)?;
        let image = self.images.resolve(&req.image).await?;
        let root = self.images.root_disk(&image).await?;

        let dir = VmDir::create(&self.config.vms_dir(), &id)
            .map_err(AgentError::io(format!("create run directory for {id}")))?;
        somna_images::create_writable_disk(&dir.rw_disk(), u64::from(disk_mib))
            .await
            .inspect_err(|_| {
                let _ = dir.remove();
            })?;

        let spec = VmSpec {
            id: id.clone(),
            cpus,
            memory_mib,
            kernel: self.guest.kernel.clone(),
            initramfs: self.guest.initramfs.clone(),
            cmdline: format!(
                "{} somna.id={id} somna.channel={}",
                self.kernel_args,
                self.vmm.channel().cmdline_value()
            ),
            disks: vec![
                DiskSpec {
                    path: root.path.clone(),
                    read_only: true,
                    serial: "somna-root".into(),
                },
                DiskSpec {
                    path: dir.rw_disk(),
                    read_only: false,
                    serial: "somna-rw".into(),
                },
            ],
            channel: self.vmm.channel(),
            accelerator: self.accel.accelerator,
        };
        let vm = match self.vmm.launch(&spec, &dir).await {
            Ok(vm) => vm,
            Err(source) => {
                let _ = dir.remove();
                return Err(AgentError::Vmm { id, source });
            }
        };
        let sandbox = Arc::new(Sandbox {
            info: std::sync::Mutex::new(SandboxInfo {
                id: id.clone(),
                image: req.image.clone(),
                image_digest: image.manifest_digest.to_string(),
                state: SandboxState::Creating,
                cpus,
                memory_mib,
                disk_mib,
                env: req.env.clone(),
                created_at: SystemTime::now(),
                accelerator: self.accel.accelerator,
                failure: None,
                boot_ms: 0,
                vmm_pid: vm.pid(),
                run_dir: dir.path().to_path_buf(),
            }),
            guest: GuestClient::new(vm.agent_endpoint()),
            image_config: image.config.clone(),
            dir,
            vm,
        });
        self.write_map().insert(id.clone(), sandbox.clone());

        let deadline = started + self.config.boot_timeout;
        let ready = tokio::select! {
            r = sandbox.guest.wait_ready(deadline) => r.map_err(|s| format!("the guest agent did not answer: {}", s.message())),
            exit = sandbox.vm.wait_exit() => Err(format!("the VMM {exit} while the guest was booting")),
        };
        let health = match ready {
            Ok(h) if h.sandbox_id == id => h,
            Ok(h) => {
                let reason = format!(
                    "the guest reports sandbox id {:?}, expected {id}",
                    h.sandbox_id
                );
                return self.fail_boot(&sandbox, reason);
            }
            Err(reason) => return self.fail_boot(&sandbox, reason),
        };
        let boot_ms = started.elapsed().as_millis() as u64;
        sandbox.update(|i| {
            i.state = SandboxState::Running;
            i.boot_ms = boot_ms;
        });
        info!(boot_ms, guest_kernel = %health.kernel, pid = sandbox.vm.pid(), "sandbox running");
        tokio::spawn(watch_vmm(sandbox.clone()));
        Ok(sandbox.info())
    }

    /// Tears down a sandbox whose guest did not come up and explains why.
    fn fail_boot<T>(&self, sandbox: &Arc<Sandbox>, reason: String) -> Result<T, AgentError> {
        let id = sandbox.info().id;
        let sandbox = sandbox.clone();
        let console = sandbox.dir.console_tail(CONSOLE_TAIL_LINES);
        let vmm_log = sandbox.dir.vmm_log_tail(5);
        self.write_map().remove(&id);
        // Killing and removing must finish even if the caller goes away.
        tokio::spawn(async move {
            sandbox.vm.kill().await;
            if let Err(e) = sandbox.dir.remove() {
                warn!(error = %e, dir = %sandbox.dir.path().display(), "cannot remove run directory");
            }
        });
        let reason = if vmm_log.trim().is_empty() {
            reason
        } else {
            format!("{reason}; VMM said: {}", vmm_log.trim())
        };
        warn!(%id, %reason, "sandbox failed to boot");
        Err(AgentError::BootFailed {
            id,
            reason,
            console,
        })
    }

    fn validate(&self, req: &SandboxRequest) -> Result<(u32, u32, u32), AgentError> {
        let l = &self.config.limits;
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        let cpus = or(req.cpus, l.default_cpus);
        let memory = or(req.memory_mib, l.default_memory_mib);
        let disk = or(req.disk_mib, l.default_disk_mib);
        if req.image.trim().is_empty() {
            return Err(AgentError::InvalidArgument("image is required".into()));
        }
        if cpus > l.max_cpus {
            return Err(AgentError::InvalidArgument(format!(
                "cpus={cpus} is more than this host allows per sandbox ({})",
                l.max_cpus
            )));
        }
        if memory < l.min_memory_mib || memory > l.max_memory_mib {
            return Err(AgentError::InvalidArgument(format!(
                "memory_mib={memory} is outside {}..={} MiB",
                l.min_memory_mib, l.max_memory_mib
            )));
        }
        if disk < l.min_disk_mib || disk > l.max_disk_mib {
            return Err(AgentError::InvalidArgument(format!(
                "disk_mib={disk} is outside {}..={} MiB",
                l.min_disk_mib, l.max_disk_mib
            )));
        }
        for key in req.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(AgentError::InvalidArgument(format!(
                    "env name {key:?} is not valid"
                )));
            }
        }
        Ok((cpus, memory, disk))
    }

    pub fn get(&self, id: &str) -> Result<SandboxInfo, AgentError> {
        Ok(self.lookup(id)?.info())
    }

    /// All sandboxes on this host, oldest first.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = self.read_map().values().map(|s| s.info()).collect();
        all.sort_by_key(|i| i.created_at);
        all
    }

    /// Stops the VM and removes every file the sandbox had on the host.
    pub async fn destroy(&self, id: &str) -> Result<(), AgentError> {
        let sandbox = self.lookup(id)?;
        sandbox.update(|i| i.state = SandboxState::Destroying);
        let started = Instant::now();
        let exit = sandbox.vm.stop(VMM_STOP_GRACE).await;
        sandbox.dir.remove().map_err(AgentError::io(format!(
            "remove run directory {}",
            sandbox.dir.path().display()
        )))?;
        self.write_map().remove(id);
        info!(%id, vmm = %exit, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox destroyed");
        Ok(())
    }

    /// Destroys every sandbox (agent shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = self.read_map().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                warn!(%id, error = %e, "destroy at shutdown failed");
            }
        }
    }

    /// The guest-agent client of a running sandbox.
    pub fn guest(&self, id: &str) -> Result<GuestAgentClient<Channel>, AgentError> {
        let sandbox = self.running(id)?;
        Ok(sandbox.guest.rpc())
    }

    /// Checks that the sandbox runs, fills the exec request's defaults from
    /// the image and sandbox, and returns the client to run it with.
    pub fn prepare_exec(
        &self,
        start: &mut ExecStart,
    ) -> Result<GuestAgentClient<Channel>, AgentError> {
        if start.argv.is_empty() || start.argv[0].is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec needs a command (argv is empty)".into(),
            ));
        }
        let sandbox = self.running(&start.sandbox_id)?;
        sandbox.apply_exec_defaults(start);
        Ok(sandbox.guest.rpc())
    }

    fn running(&self, id: &str) -> Result<Arc<Sandbox>, AgentError> {
        let sandbox = self.lookup(id)?;
        let info = sandbox.info();
        if info.state != SandboxState::Running {
            return Err(AgentError::NotRunning {
                id: id.to_string(),
                state: info.state.as_str(),
                detail: info.failure.map(|f| format!(": {f}")).unwrap_or_default(),
            });
        }
        Ok(sandbox)
    }

    fn lookup(&self, id: &str) -> Result<Arc<Sandbox>, AgentError> {
        self.read_map()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::SandboxNotFound(id.to_string()))
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks a sandbox failed and reclaims its host resources when its VMM dies
/// without being asked to.
async fn watch_vmm(sandbox: Arc<Sandbox>) {
    let exit = sandbox.vm.wait_exit().await;
    if sandbox.info().state != SandboxState::Running {
        return;
    }
    let console = sandbox.dir.console_tail(CONSOLE_TAIL_LINES);
    let failure =
        format!("the VMM {exit} unexpectedly; last lines of the guest console:\n{console}");
    sandbox.update(|i| {
        if i.state == SandboxState::Running {
            i.state = SandboxState::Failed;
            i.failure = Some(failure);
        }
    });
    let id = sandbox.info().id;
    warn!(%id, vmm = %exit, "sandbox VMM died; sandbox marked failed");
    if let Err(e) = sandbox.dir.remove() {
        warn!(%id, error = %e, "cannot remove run directory of failed sandbox");
    }
}

/// `sbx-` and 12 random lowercase letters and digits.
fn new_sandbox_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sbx-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_unique_and_well_formed() {
        let a = new_sandbox_id();
        let b = new_sandbox_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.starts_with("sbx-"));
        assert!(
            a[4..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}
