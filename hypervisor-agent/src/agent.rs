//! The host agent: owns every sandbox VM on this host, from image to boot
//! (or restore from a template, or a warm pool) to sleep, wake and destroy,
//! and cleans up what a previous (crashed) agent left behind.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use rand::Rng;
use somna_images::{Image, ImageStore, ImageStoreConfig, RootDisk};
use somna_snapshotter::TemplateStore;
use tracing::{Instrument, info, info_span, warn};

use crate::accel::{self, AccelChoice};
use crate::config::{AgentConfig, ChannelMode, GuestArtifacts, VmmKind};
use crate::error::AgentError;
use crate::launch::{self, LaunchFailure};
use crate::pool::WarmPools;
use crate::record::SandboxRecord;
use crate::recovery;
use crate::rundir::VmDir;
use crate::sandbox::{
    Activity, LiveVm, MemoryMode, Sandbox, SandboxInfo, SandboxRequest, SandboxState, StartMode,
};
use crate::vmm::qemu::QemuVmm;
use crate::vmm::{DiskSpec, MemoryBacking, VmSpec, Vmm, VmmCapabilities};

/// How long a VMM gets to exit cleanly on destroy before it is killed.
pub(crate) const VMM_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The size of a VM: what templates and pools are keyed by (with the image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
}

pub struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) guest: GuestArtifacts,
    /// Hash of everything a snapshot depends on besides the image and size.
    pub(crate) guest_fingerprint: String,
    pub(crate) vmm: Arc<dyn Vmm>,
    accel: AccelChoice,
    /// Kernel parameters every guest gets on this host.
    kernel_args: String,
    images: ImageStore,
    pub(crate) templates: TemplateStore,
    pub(crate) template_state: std::sync::Mutex<crate::templates::TemplateState>,
    pub(crate) pools: WarmPools,
    pub(crate) network: crate::network::HostNetwork,
    sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    /// Ids whose create has begun and which `sandboxes` does not hold yet
    /// (pull, conversion, disk): reported so a control plane can tell a
    /// create that never arrived from a slow one.
    under_way: std::sync::Mutex<std::collections::HashSet<String>>,
    started_at: SystemTime,
    /// The VMM jail (also held by the driver); released at shutdown.
    jail: crate::jail::Jail,
}

/// What `somna host ls` shows about this host.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub id: String,
    pub accelerator: AccelChoice,
    pub vmm: &'static str,
    pub running: u32,
    pub sleeping: u32,
    pub templates: Vec<TemplateInfo>,
    pub warm_pools: Vec<PoolInfo>,
    /// What the scheduler may demand of this host (`gpu`: the driver does
    /// VFIO passthrough and a GPU is bound to `vfio-pci`).
    pub capabilities: Vec<String>,
    /// When this agent process started.
    pub started_at: SystemTime,
    /// Creates under way that [`Agent::list`] does not show yet.
    pub creates_under_way: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub image: String,
    pub image_digest: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub size_bytes: u64,
    pub created_at: SystemTime,
    pub clones: u64,
}

#[derive(Debug, Clone)]
pub struct PoolInfo {
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub target: u32,
    pub ready: u32,
}

impl Agent {
    /// Starts the agent: reaps what a previous agent left, picks the
    /// accelerator (probing KVM in `auto` mode), opens the image and
    /// template stores, and starts the warm pools and the idle monitor.
    pub async fn start(mut config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        std::fs::create_dir_all(&config.data_dir).map_err(AgentError::io(format!(
            "create data directory {}",
            config.data_dir.display()
        )))?;
        config
            .make_paths_absolute()
            .map_err(AgentError::io("resolve configured paths"))?;
        let guest = GuestArtifacts::in_dir(&config.guest_dir).map_err(AgentError::Config)?;

        let recovered = recovery::recover(&config.vms_dir()).await;
        let report = recovered.report;
        if report.killed + report.removed + report.rescued > 0 || !recovered.kept.is_empty() {
            info!(
                killed = report.killed,
                removed = report.removed,
                rescued = report.rescued,
                kept = recovered.kept.len(),
                "recovered what a previous agent left"
            );
        }

        let network = crate::network::HostNetwork::start(config.network.clone()).await?;
        let jail = crate::jail::Jail::start(&config.jail, &config.data_dir)
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?;

        let (vmm, version, accel): (Arc<dyn Vmm>, String, AccelChoice) = match &config.vmm {
            // Cloud Hypervisor driver (issue 9): see driver.rs.
            VmmKind::CloudHypervisor { binary } => {
                crate::driver::cloud_hypervisor(
                    binary,
                    config.accel,
                    &guest,
                    &config.vms_dir(),
                    config.probe_timeout,
                    jail.clone(),
                )
                .await?
            }
            VmmKind::Qemu => {
                let channel = match config.channel {
                    ChannelMode::Auto => QemuVmm::default_channel(),
                    ChannelMode::Fixed(kind) => kind,
                };
                let qemu =
                    QemuVmm::new(config.qemu_binary.clone(), channel).with_jail(jail.clone());
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
                (Arc::new(qemu), version, accel)
            }
        };

        let kernel_args = [
            "console=ttyS0 quiet panic=-1",
            vmm.guest_kernel_args(),
            &accel::guest_kernel_args(accel.accelerator),
            &network.guest_kernel_args(),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
        let guest_fingerprint =
            crate::templates::guest_fingerprint(&guest, &version, accel.accelerator, &kernel_args)
                .map_err(AgentError::io("fingerprint the guest kernel and initramfs"))?;

        let images = ImageStore::with_options(
            ImageStoreConfig {
                local_dirs: config.image_dirs.clone(),
                cache_dir: config.image_cache_dir(),
            },
            config.images.clone(),
        )?;
        let templates =
            TemplateStore::open(&config.templates_dir()).map_err(AgentError::Snapshot)?;
        let stale = templates.remove_stale(&guest_fingerprint);
        if stale > 0 {
            info!(
                removed = stale,
                "removed templates built for another guest build"
            );
        }

        let agent = Arc::new(Agent {
            kernel_args,
            guest,
            guest_fingerprint,
            vmm,
            accel,
            images,
            templates,
            template_state: Default::default(),
            pools: WarmPools::new(&config.warm_pools),
            network,
            sandboxes: RwLock::new(HashMap::new()),
            under_way: Default::default(),
            started_at: SystemTime::now(),
            jail,
            config,
        });
        for (dir, record) in recovered.kept {
            agent.take_back(dir, record).await;
        }
        crate::lifecycle::spawn_idle_monitor(&agent);
        crate::pool::spawn_fillers(&agent);
        Ok(agent)
    }

    pub fn host_id(&self) -> &str {
        &self.config.host_id
    }

    /// The accelerator this host's VMs use, and why it was chosen.
    pub fn accelerator(&self) -> &AccelChoice {
        &self.accel
    }

    /// What this host's VMM driver can do (GPU passthrough: the scheduler
    /// places GPU sandboxes only where `gpu_host()`).
    pub fn vmm_capabilities(&self) -> VmmCapabilities {
        self.vmm.capabilities()
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// Creates a sandbox and returns once its guest agent answers.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        req: SandboxRequest,
    ) -> Result<SandboxInfo, AgentError> {
        let id = match &req.id {
            Some(id) => {
                validate_id(id)?;
                id.clone()
            }
            None => new_sandbox_id(),
        };
        let _under_way = self.begin_create(&id)?;
        let span =
            info_span!("create_sandbox", %id, image = %req.image, mode = req.start_mode.as_str());
        self.create_inner(id, req).instrument(span).await
    }

    /// Marks `id`'s create as under way until the guard drops (by then the
    /// sandbox is in the map, or the create failed).
    fn begin_create(&self, id: &str) -> Result<UnderWay<'_>, AgentError> {
        let mut under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        if self.lookup(id).is_ok() || !under_way.insert(id.to_string()) {
            return Err(AgentError::InvalidArgument(format!(
                "sandbox {id} already exists on this host"
            )));
        }
        Ok(UnderWay {
            agent: self,
            id: id.to_string(),
        })
    }

    async fn create_inner(
        self: &Arc<Self>,
        id: String,
        req: SandboxRequest,
    ) -> Result<SandboxInfo, AgentError> {
        let started = Instant::now();
        let shape = self.validate(&req)?;
        self.network.validate(&req.network)?;
        let image = self.images.resolve(&req.image).await?;
        let root = self.images.root_disk(&image).await?;

        if matches!(req.start_mode, StartMode::Auto | StartMode::WarmPool) {
            if let Some(pooled) = self.pools.claim(&image.manifest_digest.to_string(), shape) {
                match self
                    .adopt_pooled(pooled, &id, &req, &image, shape, started)
                    .await
                {
                    Ok(info) => return Ok(info),
                    Err(e) if req.start_mode == StartMode::Auto => {
                        warn!(error = %e, "warm-pool VM did not come up; falling back")
                    }
                    Err(e) => return Err(e),
                }
            } else if req.start_mode == StartMode::WarmPool {
                return Err(AgentError::NotReady(format!(
                    "no warm-pool VM of {} ({} vCPU, {} MiB) is ready on this host",
                    req.image, shape.cpus, shape.memory_mib
                )));
            }
        }
        let template = match req.start_mode {
            StartMode::Template => Some(self.ensure_template(&image, &root, shape).await?),
            StartMode::Auto if self.config.templates => self.ready_template(&image, &root, shape),
            _ => None,
        };
        match template {
            Some(t) => {
                self.create_from_template(id, &req, &image, &root, shape, &t, started)
                    .await
            }
            None => {
                let info = self
                    .create_cold(id, &req, &image, &root, shape, started)
                    .await?;
                if req.start_mode == StartMode::Auto && self.config.templates {
                    self.build_template_in_background(image, root, shape);
                }
                Ok(info)
            }
        }
    }

    /// The VM shape of a sandbox with its RAM in its own memory file.
    pub(crate) fn vm_spec(
        &self,
        id: &str,
        shape: Shape,
        root: &RootDisk,
        rw_disk: std::path::PathBuf,
        memory: MemoryBacking,
    ) -> VmSpec {
        VmSpec {
            id: id.to_string(),
            cpus: shape.cpus,
            memory_mib: shape.memory_mib,
            memory,
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
                    path: rw_disk,
                    read_only: false,
                    serial: "somna-rw".into(),
                },
            ],
            disk_io: self.config.limits.disk_io,
            net: None,
            channel: self.vmm.channel(),
            accelerator: self.accel.accelerator,
        }
    }

    /// A new sandbox record (state Creating) for a VM in `dir`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_sandbox(
        &self,
        id: &str,
        req: &SandboxRequest,
        image: &Image,
        root: &RootDisk,
        shape: Shape,
        dir: VmDir,
        mode: StartMode,
        memory: MemoryMode,
    ) -> Arc<Sandbox> {
        let spec = self.vm_spec(
            id,
            shape,
            root,
            dir.rw_disk(),
            MemoryBacking {
                path: dir.memory_file(),
                shared: true,
            },
        );
        let activity = Arc::new(Activity::default());
        activity.touch();
        Arc::new(Sandbox {
            info: std::sync::Mutex::new(SandboxInfo {
                id: id.to_string(),
                image: req.image.clone(),
                image_digest: image.manifest_digest.to_string(),
                state: SandboxState::Creating,
                cpus: shape.cpus,
                memory_mib: shape.memory_mib,
                disk_mib: shape.disk_mib,
                env: req.env.clone(),
                created_at: SystemTime::now(),
                accelerator: self.accel.accelerator,
                failure: None,
                boot_ms: 0,
                start_mode: mode,
                idle_timeout: req.idle_timeout,
                last_active_at: SystemTime::now(),
                sleep_count: 0,
                wake_count: 0,
                vmm_pid: 0,
                run_dir: dir.path().to_path_buf(),
                network: None,
                network_policy: None,
            }),
            root_disk_id: crate::templates::root_disk_id(root),
            _image_lease: self.images.lease(image),
            image_config: image.config.clone(),
            spec,
            live: std::sync::Mutex::new(None),
            memory: std::sync::Mutex::new(memory),
            lifecycle: tokio::sync::Mutex::new(()),
            epoch: tokio::sync::watch::channel(0).0,
            activity,
            net: crate::network::SandboxNet::new(req.network.clone()),
            vmm: self.vmm.name(),
            dir,
        })
    }

    /// Boots a fresh VM for a new sandbox.
    async fn create_cold(
        self: &Arc<Self>,
        id: String,
        req: &SandboxRequest,
        image: &Image,
        root: &RootDisk,
        shape: Shape,
        started: Instant,
    ) -> Result<SandboxInfo, AgentError> {
        let dir = VmDir::create(&self.config.vms_dir(), &id)
            .map_err(AgentError::io(format!("create run directory for {id}")))?;
        if let Err(e) = self.allocate_memory(&dir, shape.memory_mib) {
            let _ = dir.remove();
            return Err(e);
        }
        if let Err(e) =
            somna_images::create_writable_disk(&dir.rw_disk(), u64::from(shape.disk_mib)).await
        {
            let _ = dir.remove();
            return Err(e.into());
        }
        let sandbox = self.new_sandbox(
            &id,
            req,
            image,
            root,
            shape,
            dir,
            StartMode::ColdBoot,
            MemoryMode::Own,
        );
        self.write_map().insert(id.clone(), sandbox.clone());
        let mut spec = sandbox.spec.clone();
        if let Err(e) = sandbox.net.attach(&self.network, &id, &mut spec) {
            self.write_map().remove(&id);
            let _ = sandbox.dir.remove();
            return Err(e);
        }
        let deadline = started + self.config.boot_timeout;
        let (live, health) =
            match launch::boot(self.vmm.as_ref(), &spec, &sandbox.dir, deadline).await {
                Ok(ok) => ok,
                Err(f) => return Err(self.fail_create(&sandbox, f)),
            };
        crate::fault::point("create.booted");
        if health.sandbox_id != id {
            live.vm.kill().await;
            let f = LaunchFailure {
                reason: format!(
                    "the guest reports sandbox id {:?}, expected {id}",
                    health.sandbox_id
                ),
                console: sandbox.dir.console_tail(30),
            };
            return Err(self.fail_create(&sandbox, f));
        }
        Ok(self.mark_running(&sandbox, live, started))
    }

    /// Allocates the memory file in `dir` in full when the VMM keeps guest
    /// RAM there, so that a full host disk fails this call instead of
    /// killing the running VM later (see [`VmDir::allocate_memory`]).
    pub(crate) fn allocate_memory(&self, dir: &VmDir, memory_mib: u32) -> Result<(), AgentError> {
        if !self.vmm.ram_in_memory_file() {
            return Ok(());
        }
        dir.allocate_memory(memory_mib)
            .map_err(|source| AgentError::MemoryFile {
                id: dir.id(),
                memory_mib,
                source,
            })
    }

    /// Makes a freshly started sandbox `running` and watches its VMM.
    pub(crate) fn mark_running(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        live: LiveVm,
        started: Instant,
    ) -> SandboxInfo {
        let boot_ms = started.elapsed().as_millis() as u64;
        let live = Arc::new(live);
        sandbox.set_live(Some(live.clone()));
        sandbox.update(|i| {
            i.state = SandboxState::Running;
            i.boot_ms = boot_ms;
        });
        sandbox.activity.touch();
        sandbox.persist();
        let info = sandbox.info();
        info!(
            boot_ms,
            mode = info.start_mode.as_str(),
            pid = info.vmm_pid,
            "sandbox running"
        );
        tokio::spawn(crate::lifecycle::watch_vmm(sandbox.clone(), live));
        info
    }

    /// Tears down a sandbox whose VM did not come up and explains why.
    pub(crate) fn fail_create(&self, sandbox: &Arc<Sandbox>, f: LaunchFailure) -> AgentError {
        let id = sandbox.info().id;
        self.write_map().remove(&id);
        sandbox.net.release();
        if let Err(e) = sandbox.dir.remove() {
            warn!(error = %e, dir = %sandbox.dir.path().display(), "cannot remove run directory");
        }
        warn!(%id, reason = %f.reason, "sandbox failed to start");
        AgentError::BootFailed {
            id,
            reason: f.reason,
            console: f.console,
        }
    }

    fn validate(&self, req: &SandboxRequest) -> Result<Shape, AgentError> {
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
        Ok(Shape {
            cpus,
            memory_mib: memory,
            disk_mib: disk,
        })
    }

    /// The default shape (what warm pools hold).
    pub(crate) fn default_shape(&self) -> Shape {
        let l = &self.config.limits;
        Shape {
            cpus: l.default_cpus,
            memory_mib: l.default_memory_mib,
            disk_mib: l.default_disk_mib,
        }
    }

    pub fn get(&self, id: &str) -> Result<SandboxInfo, AgentError> {
        let sandbox = self.lookup(id)?;
        Ok(self.info_of(&sandbox))
    }

    /// A sandbox's record with its network counters.
    fn info_of(&self, sandbox: &Sandbox) -> SandboxInfo {
        let mut info = sandbox.info();
        info.network = sandbox.net.counters(&self.network);
        if self.network.enabled() {
            info.network_policy = Some(sandbox.net.policy());
        }
        info
    }

    /// All sandboxes on this host, oldest first.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = self.read_map().values().map(|s| self.info_of(s)).collect();
        all.sort_by_key(|i| i.created_at);
        all
    }

    /// Stops the VM (if it runs) and removes every file the sandbox had on
    /// the host, its snapshot included.
    pub async fn destroy(&self, id: &str) -> Result<(), AgentError> {
        let sandbox = self.lookup(id)?;
        let _lifecycle = sandbox.lifecycle.lock().await;
        sandbox.update(|i| i.state = SandboxState::Destroying);
        // From here on a crash discards the sandbox instead of adopting it.
        if let Err(e) = SandboxRecord::remove(&sandbox.dir) {
            warn!(%id, error = %e, "cannot remove the sandbox record");
        }
        sandbox.bump_epoch();
        let started = Instant::now();
        let exit = match sandbox.live() {
            Some(live) => {
                sandbox.set_live(None);
                live.vm.stop(VMM_STOP_GRACE).await.to_string()
            }
            None => "not running".to_string(),
        };
        crate::fault::point("destroy.vmm_stopped");
        sandbox.net.release();
        sandbox.dir.remove().map_err(AgentError::io(format!(
            "remove run directory {}",
            sandbox.dir.path().display()
        )))?;
        self.write_map().remove(id);
        info!(%id, vmm = %exit, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox destroyed");
        Ok(())
    }

    /// Destroys every sandbox and warm-pool VM (agent shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = self.read_map().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                warn!(%id, error = %e, "destroy at shutdown failed");
            }
        }
        self.pools.drain().await;
        // Whatever else still runs under vms/ (a template being built) goes
        // the way crash recovery would take it.
        crate::recovery::reap_leftovers(&self.config.vms_dir()).await;
        self.network.shutdown().await;
        self.jail.release();
    }

    /// This host's state for listings.
    pub fn host_info(&self) -> HostInfo {
        let all = self.list();
        let count = |s: SandboxState| all.iter().filter(|i| i.state == s).count() as u32;
        HostInfo {
            id: self.config.host_id.clone(),
            accelerator: self.accel.clone(),
            vmm: self.vmm.name(),
            running: count(SandboxState::Running),
            sleeping: count(SandboxState::Sleeping),
            templates: self.template_infos(),
            warm_pools: self.pools.infos(),
            capabilities: capability_names(&self.vmm.capabilities()),
            started_at: self.started_at,
            creates_under_way: {
                let under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
                under_way.iter().cloned().collect()
            },
        }
    }

    pub(crate) fn lookup(&self, id: &str) -> Result<Arc<Sandbox>, AgentError> {
        self.read_map()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::SandboxNotFound(id.to_string()))
    }

    pub(crate) fn sandboxes(&self) -> Vec<Arc<Sandbox>> {
        self.read_map().values().cloned().collect()
    }

    pub(crate) fn insert(&self, sandbox: Arc<Sandbox>) {
        let id = sandbox.info().id;
        self.write_map().insert(id, sandbox);
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ids become directory names and kernel parameters: keep them plain.
fn validate_id(id: &str) -> Result<(), AgentError> {
    let ok =
        (4..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "sandbox id {id:?} must be 4-64 of [A-Za-z0-9-]"
        )))
    }
}

/// `sbx-` and 12 random lowercase letters and digits.
/// A create under way; see [`Agent::begin_create`].
struct UnderWay<'a> {
    agent: &'a Agent,
    id: String,
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        let mut under_way = self
            .agent
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        under_way.remove(&self.id);
    }
}

pub(crate) fn new_sandbox_id() -> String {
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

/// The Host proto's capability names for what the driver can do here.
pub fn capability_names(caps: &VmmCapabilities) -> Vec<String> {
    let mut names = Vec::new();
    if caps.gpu_host() {
        names.push("gpu".to_string());
    }
    names
}

#[cfg(test)]
mod capability_tests {
    use super::*;
    use crate::vmm::VfioDevice;

    #[test]
    fn gpu_only_with_vfio_and_a_bound_gpu() {
        assert!(capability_names(&VmmCapabilities::default()).is_empty());
        let gpu = VfioDevice {
            path: "/sys/bus/pci/devices/0000:65:00.0".into(),
            id: None,
        };
        let no_vfio = VmmCapabilities {
            vfio: false,
            gpus: vec![gpu.clone()],
        };
        assert!(capability_names(&no_vfio).is_empty());
        let host = VmmCapabilities {
            vfio: true,
            gpus: vec![gpu],
        };
        assert_eq!(capability_names(&host), ["gpu"]);
    }
}
