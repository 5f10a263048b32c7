//! Warm pools: per configured image, VMs restored from the template and
//! left paused, so a create only resumes one and gives it an identity.
//! A filler task per pool keeps it at its target size.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use somna_images::{Image, RootDisk};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::agent::{Agent, PoolInfo, Shape, VMM_STOP_GRACE, new_sandbox_id};
use crate::config::WarmPoolSpec;
use crate::error::AgentError;
use crate::launch;
use crate::rundir::VmDir;
use crate::sandbox::{LiveVm, MemoryMode, SandboxInfo, SandboxRequest, StartMode, lock};

/// A restored, paused VM waiting to become a sandbox.
pub(crate) struct PooledVm {
    pub dir: VmDir,
    pub live: LiveVm,
    pub root: RootDisk,
    /// Where its RAM lives (`Agent::clone_memory_mode`).
    pub memory: MemoryMode,
    /// Its network slot (dropped after the VM: field order).
    pub net: Option<crate::network::SlotLease>,
}

struct Pool {
    spec: WarmPoolSpec,
    shape: Option<Shape>,
    /// The image digest the ready VMs were cloned from.
    digest: Option<String>,
    ready: VecDeque<PooledVm>,
}

pub(crate) struct WarmPools {
    pools: std::sync::Mutex<Vec<Pool>>,
    /// Wakes the fillers after a claim.
    refill: Arc<Notify>,
}

impl WarmPools {
    pub(crate) fn new(specs: &[WarmPoolSpec]) -> WarmPools {
        WarmPools {
            pools: std::sync::Mutex::new(
                specs
                    .iter()
                    .map(|s| Pool {
                        spec: s.clone(),
                        shape: None,
                        digest: None,
                        ready: VecDeque::new(),
                    })
                    .collect(),
            ),
            refill: Arc::new(Notify::new()),
        }
    }

    /// Takes a ready VM of this image digest and shape, if any.
    pub(crate) fn claim(&self, digest: &str, shape: Shape) -> Option<PooledVm> {
        let mut pools = lock(&self.pools);
        let pool = pools.iter_mut().find(|p| {
            p.digest.as_deref() == Some(digest) && p.shape == Some(shape) && !p.ready.is_empty()
        })?;
        let vm = pool.ready.pop_front();
        drop(pools);
        self.refill.notify_waiters();
        vm
    }

    pub(crate) fn infos(&self) -> Vec<PoolInfo> {
        lock(&self.pools)
            .iter()
            .map(|p| PoolInfo {
                image: p.spec.image.clone(),
                cpus: p.shape.map(|s| s.cpus).unwrap_or(0),
                memory_mib: p.shape.map(|s| s.memory_mib).unwrap_or(0),
                disk_mib: p.shape.map(|s| s.disk_mib).unwrap_or(0),
                target: p.spec.size,
                ready: p.ready.len() as u32,
            })
            .collect()
    }

    /// Stops every pooled VM and removes its run directory.
    pub(crate) async fn drain(&self) {
        let vms: Vec<PooledVm> = lock(&self.pools)
            .iter_mut()
            .flat_map(|p| p.ready.drain(..))
            .collect();
        for vm in vms {
            vm.live.vm.stop(VMM_STOP_GRACE).await;
            let _ = vm.dir.remove();
        }
    }

    fn ready_count(&self, index: usize) -> usize {
        lock(&self.pools)
            .get(index)
            .map(|p| p.ready.len())
            .unwrap_or(0)
    }
}

/// Starts one filler task per pool.
pub(crate) fn spawn_fillers(agent: &Arc<Agent>) {
    let n = lock(&agent.pools.pools).len();
    for index in 0..n {
        tokio::spawn(fill(Arc::downgrade(agent), index));
    }
}

/// Keeps pool `index` full: resolves its image, builds the template if
/// needed, restores clones until the target is reached, then waits for a
/// claim. Errors are logged and retried after a pause.
async fn fill(agent: Weak<Agent>, index: usize) {
    loop {
        let Some(a) = agent.upgrade() else { return };
        let result = fill_once(&a, index).await;
        let wait = match result {
            Ok(()) => Duration::from_secs(30),
            Err(e) => {
                let image = lock(&a.pools.pools)[index].spec.image.clone();
                warn!(%image, error = %e, "warm pool could not be filled; retrying");
                Duration::from_secs(10)
            }
        };
        let refill = a.pools.refill.clone();
        drop(a);
        // Either a claim took a VM or it is time to re-check (the image may
        // have changed).
        let _ = tokio::time::timeout(wait, refill.notified()).await;
    }
}

async fn fill_once(agent: &Arc<Agent>, index: usize) -> Result<(), AgentError> {
    let (spec, shape) = {
        let pools = lock(&agent.pools.pools);
        (pools[index].spec.clone(), agent.default_shape())
    };
    let image: Image = agent.images().resolve(&spec.image).await?;
    let root = agent.images().root_disk(&image).await?;
    let digest = image.manifest_digest.to_string();
    let template = agent.ensure_template(&image, &root, shape).await?;
    // A new image digest makes the VMs of the old one useless.
    let stale: Vec<PooledVm> = {
        let mut pools = lock(&agent.pools.pools);
        let pool = &mut pools[index];
        if pool.digest.as_deref() == Some(digest.as_str()) {
            Vec::new()
        } else {
            pool.digest = Some(digest.clone());
            pool.shape = Some(shape);
            pool.ready.drain(..).collect()
        }
    };
    for vm in stale {
        vm.live.vm.stop(VMM_STOP_GRACE).await;
        let _ = vm.dir.remove();
    }
    while agent.pools.ready_count(index) < spec.size as usize {
        let id = new_sandbox_id();
        let started = Instant::now();
        let (dir, live, net) = agent.clone_paused(&id, &template, &root, shape).await?;
        info!(image = %spec.image, %id, restore_ms = started.elapsed().as_millis() as u64, "warm-pool VM ready");
        lock(&agent.pools.pools)[index].ready.push_back(PooledVm {
            dir,
            live,
            root: root.clone(),
            memory: agent.clone_memory_mode(&template),
            net,
        });
    }
    Ok(())
}

impl Agent {
    /// Turns a claimed warm-pool VM into the requested sandbox.
    pub(crate) async fn adopt_pooled(
        self: &Arc<Self>,
        pooled: PooledVm,
        id: &str,
        req: &SandboxRequest,
        image: &Image,
        shape: Shape,
        started: Instant,
    ) -> Result<SandboxInfo, AgentError> {
        // The VM keeps the run directory it was pooled with; the sandbox
        // takes the requested id, which the guest learns on wake.
        let PooledVm {
            dir,
            live,
            root,
            memory,
            net,
        } = pooled;
        let sandbox = self.new_sandbox(
            id,
            req,
            image,
            &root,
            shape,
            dir,
            StartMode::WarmPool,
            memory,
        );
        self.insert(sandbox.clone());
        if let Err(e) = sandbox.net.adopt(net) {
            live.vm.kill().await;
            let _ = self.fail_create(
                &sandbox,
                launch::LaunchFailure {
                    reason: e.to_string(),
                    console: String::new(),
                },
            );
            return Err(e);
        }
        let deadline = Instant::now() + self.config.boot_timeout;
        match launch::resume_and_wake(
            &live,
            &sandbox.dir,
            Some(launch::identity_for(id)),
            deadline,
        )
        .await
        {
            Ok(_) => Ok(self.mark_running(&sandbox, live, started)),
            Err(f) => Err(self.fail_create(&sandbox, f)),
        }
    }
}
