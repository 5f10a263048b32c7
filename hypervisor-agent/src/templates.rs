//! Template snapshots on this host: built once per (image, size, guest
//! build) by booting a VM and snapshotting it, then restored copy-on-write
//! for every new sandbox of that image (and for warm pools).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use somna_images::{Image, RootDisk};
use somna_snapshotter::{MemoryLayout, Snapshot, SnapshotParts, Template, TemplateInputs};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agent::{Agent, Shape, TemplateInfo, VMM_STOP_GRACE};
use crate::config::{GuestArtifacts, TemplateMemory};
use crate::error::AgentError;
use crate::launch::{self, LaunchFailure};
use crate::network::SlotLease;
use crate::rundir::VmDir;
use crate::sandbox::{LiveVm, MemoryMode, SandboxInfo, SandboxRequest, StartMode};
use crate::vmm::{Accelerator, Incoming, MemoryBacking};

/// Per-process template bookkeeping.
#[derive(Default)]
pub(crate) struct TemplateState {
    /// Templates whose checksums were verified by this agent process.
    verified: HashSet<String>,
    /// Clones made per template key.
    clones: HashMap<String, u64>,
    /// Keys being built in the background.
    building: HashSet<String>,
}

/// Hash of what a snapshot depends on besides the image and its size.
pub(crate) fn guest_fingerprint(
    guest: &GuestArtifacts,
    vmm_version: &str,
    accelerator: Accelerator,
    kernel_args: &str,
) -> std::io::Result<String> {
    let kernel = somna_snapshotter::checksum::file_digest(&guest.kernel)?;
    let initramfs = somna_snapshotter::checksum::file_digest(&guest.initramfs)?;
    Ok(format!(
        "kernel={kernel};initramfs={initramfs};vmm={vmm_version};accel={accelerator};args={kernel_args}"
    ))
}

/// Identity of a root disk file: a rebuilt disk gets a new inode/mtime.
pub(crate) fn root_disk_id(root: &RootDisk) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(&root.path) {
        Ok(m) => format!(
            "{}:{}:{}:{}",
            root.digest,
            m.ino(),
            m.size(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ),
        Err(_) => format!("{}:missing", root.digest),
    }
}

impl Agent {
    fn template_inputs(&self, image: &Image, root: &RootDisk, shape: Shape) -> TemplateInputs {
        TemplateInputs {
            image: image.reference.to_string(),
            image_digest: image.manifest_digest.to_string(),
            root_disk: root_disk_id(root),
            cpus: shape.cpus,
            memory_mib: shape.memory_mib,
            disk_mib: shape.disk_mib,
            guest_fingerprint: self.guest_fingerprint.clone(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TemplateState> {
        crate::sandbox::lock(&self.template_state)
    }

    /// The template for this image and size if it is built (and, once per
    /// agent process, verified).
    pub(crate) fn ready_template(
        &self,
        image: &Image,
        root: &RootDisk,
        shape: Shape,
    ) -> Option<Template> {
        let t = self
            .templates
            .get(&self.template_inputs(image, root, shape))?;
        self.checked(t).ok()
    }

    /// Verifies a template's checksums the first time this process uses
    /// it; a damaged template is removed (it is rebuilt on the next use).
    fn checked(&self, t: Template) -> Result<Template, AgentError> {
        if !self.config.verify_snapshots || self.state().verified.contains(&t.key) {
            return Ok(t);
        }
        let started = Instant::now();
        if let Err(e) = t.snapshot.verify() {
            warn!(key = %t.key, error = %e, "template is damaged; removing it");
            let _ = self.templates.remove(&t.key);
            return Err(AgentError::Snapshot(e));
        }
        info!(key = %t.key, elapsed_ms = started.elapsed().as_millis() as u64, "template verified");
        self.state().verified.insert(t.key.clone());
        Ok(t)
    }

    /// The template for this image and size, built now if missing.
    pub(crate) async fn ensure_template(
        &self,
        image: &Image,
        root: &RootDisk,
        shape: Shape,
    ) -> Result<Template, AgentError> {
        let inputs = self.template_inputs(image, root, shape);
        let lock = self.templates.build_lock(&inputs);
        let _guard = lock.lock().await;
        if let Some(t) = self.templates.get(&inputs) {
            return self.checked(t);
        }
        let span = info_span!("template_build", image = %inputs.image, key = %inputs.key());
        self.build_template(inputs).instrument(span).await
    }

    /// Builds the template in the background (after a cold boot, so the
    /// next create of this image restores instead of booting).
    pub(crate) fn build_template_in_background(
        self: &Arc<Self>,
        image: Image,
        root: RootDisk,
        shape: Shape,
    ) {
        let key = self.template_inputs(&image, &root, shape).key();
        if !self.state().building.insert(key.clone()) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.ensure_template(&image, &root, shape).await {
                warn!(image = %image.reference, error = %e, "building the template failed");
            }
            agent.state().building.remove(&key);
        });
    }

    async fn build_template(&self, inputs: TemplateInputs) -> Result<Template, AgentError> {
        let started = Instant::now();
        let key = inputs.key();
        let staging = self
            .templates
            .staging_dir(&inputs)
            .map_err(AgentError::Snapshot)?;
        let id = format!("tpl-{}", &key[..16]);
        let result = self.boot_and_snapshot(&id, &inputs, &staging).await;
        let dir = VmDir::open(self.config.vms_dir().join(&id));
        let _ = dir.remove();
        match result {
            Ok(()) => {
                let build_ms = started.elapsed().as_millis() as u64;
                let t = self
                    .templates
                    .commit(&staging, inputs, build_ms)
                    .map_err(AgentError::Snapshot)?;
                self.state().verified.insert(t.key.clone());
                info!(build_ms, size_bytes = t.size_bytes(), "template ready");
                Ok(t)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(e)
            }
        }
    }

    /// Boots the template VM, waits for its agent, and snapshots it into
    /// `staging` (memory file, state, writable disk; RAM inside the state
    /// when the driver cannot leave it in the memory file).
    async fn boot_and_snapshot(
        &self,
        id: &str,
        inputs: &TemplateInputs,
        staging: &Path,
    ) -> Result<(), AgentError> {
        let image = self.images().resolve(&inputs.image).await?;
        let root = self.images().root_disk(&image).await?;
        let shape = Shape {
            cpus: inputs.cpus,
            memory_mib: inputs.memory_mib,
            disk_mib: inputs.disk_mib,
        };
        let dir = VmDir::create(&self.config.vms_dir(), id).map_err(AgentError::io(format!(
            "create run directory for template VM {id}"
        )))?;
        let disk = staging.join("rw.ext4");
        somna_images::create_writable_disk(&disk, u64::from(shape.disk_mib)).await?;
        let mem = staging.join("mem");
        let spec = self.vm_spec(
            id,
            shape,
            &root,
            disk.clone(),
            MemoryBacking {
                path: mem.clone(),
                shared: true,
            },
        );
        let mut spec = spec;
        // Held until the VMM is gone (end of scope); the template's guest
        // needs no traffic.
        let _slot = self
            .network
            .attach(id, &crate::network::template_policy(), &mut spec)?;
        let deadline = Instant::now() + self.config.boot_timeout;
        let (live, _) = launch::boot(self.vmm.as_ref(), &spec, &dir, deadline)
            .await
            .map_err(|f| boot_failed(id, f))?;
        let state = staging.join("state");
        let in_file = self.vmm.ram_in_memory_file();
        let saved = async {
            live.vm.pause().await?;
            live.vm.save_state(&state, in_file).await
        }
        .await;
        live.vm.stop(VMM_STOP_GRACE).await;
        saved.map_err(|source| AgentError::Vmm {
            id: id.to_string(),
            source,
        })?;
        Snapshot::seal(
            staging,
            SnapshotParts {
                memory: if in_file {
                    MemoryLayout::File
                } else {
                    MemoryLayout::Stream
                },
                state: &state,
                memory_file: in_file.then_some(mem.as_path()),
                disk: &disk,
                cpus: shape.cpus,
                memory_mib: shape.memory_mib,
                root_disk: root_disk_id(&root),
            },
        )
        .map_err(AgentError::Snapshot)?;
        Ok(())
    }

    /// Restores a clone of `template` into a new run directory for `id`,
    /// left paused (the caller resumes it and gives it its identity).
    pub(crate) async fn clone_paused(
        &self,
        id: &str,
        template: &Template,
        root: &RootDisk,
        shape: Shape,
    ) -> Result<(VmDir, LiveVm, Option<SlotLease>), AgentError> {
        self.clone_vm(id, template, root, shape, false).await
    }

    /// Restores a clone of `template` into a new run directory for `id`,
    /// running if `resume`, else left paused.
    pub(crate) async fn clone_vm(
        &self,
        id: &str,
        template: &Template,
        root: &RootDisk,
        shape: Shape,
        resume: bool,
    ) -> Result<(VmDir, LiveVm, Option<SlotLease>), AgentError> {
        let dir = VmDir::create(&self.config.vms_dir(), id)
            .map_err(AgentError::io(format!("create run directory for {id}")))?;
        if let Err(e) =
            somna_snapshotter::copy::copy_sparse(&template.snapshot.disk_path(), &dir.rw_disk())
        {
            let _ = dir.remove();
            return Err(AgentError::io("copy the template's writable disk")(e));
        }
        // RAM: a copy of the template's memory file, or that file mapped
        // privately (`TemplateMemory`), or (layout Stream, Cloud
        // Hypervisor) inside the template's state, which the driver reads
        // without changing it.
        let (memory, memory_in_file) = match template.snapshot.memory_path() {
            Some(path) if self.clone_memory_mode(template) == MemoryMode::Own => {
                let copied = Instant::now();
                // Then every block, as for any memory file the VM owns.
                let made = somna_snapshotter::copy::copy_sparse(&path, &dir.memory_file())
                    .map_err(|source| AgentError::MemoryFile {
                        id: id.to_string(),
                        memory_mib: shape.memory_mib,
                        source,
                    })
                    .and_then(|()| self.allocate_memory(&dir, shape.memory_mib));
                if let Err(e) = made {
                    let _ = dir.remove();
                    return Err(e);
                }
                debug!(%id, copy_ms = copied.elapsed().as_millis() as u64, "template RAM copied");
                (
                    MemoryBacking {
                        path: dir.memory_file(),
                        shared: true,
                    },
                    true,
                )
            }
            Some(path) => (
                MemoryBacking {
                    path,
                    shared: false,
                },
                true,
            ),
            None => (
                MemoryBacking {
                    path: dir.memory_file(),
                    shared: true,
                },
                false,
            ),
        };
        let spec = self.vm_spec(id, shape, root, dir.rw_disk(), memory);
        let incoming = Incoming {
            state: template.snapshot.state_path(),
            memory_in_file,
            resume,
        };
        let mut spec = spec;
        // Paused clones get no traffic; the sandbox's policy is applied
        // when it takes the VM (`SandboxNet::adopt`).
        let slot = match self
            .network
            .attach(id, &crate::network::template_policy(), &mut spec)
        {
            Ok(s) => s,
            Err(e) => {
                let _ = dir.remove();
                return Err(e);
            }
        };
        match launch::restore(self.vmm.as_ref(), &spec, &dir, &incoming).await {
            Ok(live) => {
                *self.state().clones.entry(template.key.clone()).or_default() += 1;
                Ok((dir, live, slot))
            }
            Err(f) => {
                let _ = dir.remove();
                Err(boot_failed(id, f))
            }
        }
    }

    /// Where a clone of `template` keeps its RAM: its own copy of the
    /// template's memory file (`TemplateMemory::Copy`; it then sleeps and
    /// wakes as any sandbox with its own memory file), or the template's
    /// file, mapped privately.
    pub(crate) fn clone_memory_mode(&self, template: &Template) -> MemoryMode {
        match (template.snapshot.memory_path(), self.config.template_memory) {
            (Some(_), TemplateMemory::Copy) => MemoryMode::Own,
            _ => MemoryMode::TemplateCow,
        }
    }

    /// Creates a sandbox by restoring the image's template.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create_from_template(
        self: &Arc<Self>,
        id: String,
        req: &SandboxRequest,
        image: &Image,
        root: &RootDisk,
        shape: Shape,
        template: &Template,
        started: Instant,
    ) -> Result<SandboxInfo, AgentError> {
        let (dir, live, slot) = self.clone_vm(&id, template, root, shape, true).await?;
        let sandbox = self.new_sandbox(
            &id,
            req,
            image,
            root,
            shape,
            dir,
            StartMode::Template,
            self.clone_memory_mode(template),
        );
        self.insert(sandbox.clone());
        if let Err(e) = sandbox.net.adopt(slot) {
            live.vm.kill().await;
            let _ = self.fail_create(
                &sandbox,
                LaunchFailure {
                    reason: e.to_string(),
                    console: String::new(),
                },
            );
            return Err(e);
        }
        let deadline = Instant::now() + self.config.boot_timeout;
        match launch::wake_restored(
            &live,
            &sandbox.dir,
            Some(launch::identity_for(&id)),
            deadline,
        )
        .await
        {
            Ok(_) => Ok(self.mark_running(&sandbox, live, started)),
            Err(f) => Err(self.fail_create(&sandbox, f)),
        }
    }

    pub(crate) fn template_infos(&self) -> Vec<TemplateInfo> {
        let clones = self.state().clones.clone();
        self.templates
            .list()
            .into_iter()
            .map(|t| TemplateInfo {
                size_bytes: t.size_bytes(),
                clones: clones.get(&t.key).copied().unwrap_or(0),
                image: t.meta.inputs.image,
                image_digest: t.meta.inputs.image_digest,
                cpus: t.meta.inputs.cpus,
                memory_mib: t.meta.inputs.memory_mib,
                disk_mib: t.meta.inputs.disk_mib,
                created_at: UNIX_EPOCH + std::time::Duration::from_millis(t.meta.created_unix_ms),
            })
            .collect()
    }
}

pub(crate) fn boot_failed(id: &str, f: LaunchFailure) -> AgentError {
    AgentError::BootFailed {
        id: id.to_string(),
        reason: f.reason,
        console: f.console,
    }
}
