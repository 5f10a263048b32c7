//! Getting a VM to the point where its guest agent answers: a cold boot, or
//! a restore from a snapshot followed by the guest's wake fix-ups.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use somna_proto::guest::v1::{HealthResponse, Identity, WakeRequest, WakeResponse};

use crate::guest::GuestClient;
use crate::rundir::VmDir;
use crate::sandbox::LiveVm;
use crate::vmm::{Incoming, VmSpec, Vmm};

/// Why a VM did not come up, with what the guest and the VMM printed.
#[derive(Debug)]
pub(crate) struct LaunchFailure {
    pub reason: String,
    pub console: String,
}

impl LaunchFailure {
    fn new(dir: &VmDir, reason: String) -> Self {
        let vmm_log = dir.vmm_log_tail(5);
        let reason = if vmm_log.trim().is_empty() {
            reason
        } else {
            format!("{reason}; VMM said: {}", vmm_log.trim())
        };
        LaunchFailure {
            reason,
            console: dir.console_tail(30),
        }
    }
}

/// Boots `spec` and waits until its guest agent answers; on failure the VM
/// is killed (the caller removes `dir`).
pub(crate) async fn boot(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    dir: &VmDir,
    deadline: Instant,
) -> Result<(LiveVm, HealthResponse), LaunchFailure> {
    let vm = vmm
        .launch(spec, dir, None)
        .await
        .map_err(|e| LaunchFailure::new(dir, e.to_string()))?;
    let live = LiveVm {
        guest: GuestClient::new(vm.agent_endpoint()),
        vm,
    };
    let health = wait_ready(&live, dir, deadline).await?;
    Ok((live, health))
}

/// Restores `spec` from `incoming`; the VM runs if `incoming.resume`,
/// else it is left paused.
pub(crate) async fn restore(
    vmm: &dyn Vmm,
    spec: &VmSpec,
    dir: &VmDir,
    incoming: &Incoming,
) -> Result<LiveVm, LaunchFailure> {
    let vm = vmm
        .launch(spec, dir, Some(incoming))
        .await
        .map_err(|e| LaunchFailure::new(dir, e.to_string()))?;
    Ok(LiveVm {
        guest: GuestClient::new(vm.agent_endpoint()),
        vm,
    })
}

/// Resumes a restored, paused VM, waits for its guest agent and runs the
/// wake fix-ups (clock, RNG, and for clones the new identity).
pub(crate) async fn resume_and_wake(
    live: &LiveVm,
    dir: &VmDir,
    identity: Option<Identity>,
    deadline: Instant,
) -> Result<WakeResponse, LaunchFailure> {
    wake(live, dir, identity, deadline, false).await
}

/// [`resume_and_wake`] for a VM restored with `Incoming::resume` (already
/// running).
pub(crate) async fn wake_restored(
    live: &LiveVm,
    dir: &VmDir,
    identity: Option<Identity>,
    deadline: Instant,
) -> Result<WakeResponse, LaunchFailure> {
    wake(live, dir, identity, deadline, true).await
}

async fn wake(
    live: &LiveVm,
    dir: &VmDir,
    identity: Option<Identity>,
    deadline: Instant,
    running: bool,
) -> Result<WakeResponse, LaunchFailure> {
    if !running && let Err(e) = live.vm.resume().await {
        live.vm.kill().await;
        return Err(LaunchFailure::new(
            dir,
            format!("cannot resume the restored VM: {e}"),
        ));
    }
    wait_ready(live, dir, deadline).await?;
    let mut entropy = vec![0u8; 64];
    rand::rng().fill_bytes(&mut entropy);
    let req = WakeRequest {
        unix_time_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        entropy,
        identity,
    };
    match live.guest.rpc().wake(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => {
            live.vm.kill().await;
            Err(LaunchFailure::new(
                dir,
                format!(
                    "the guest agent refused the wake fix-ups: {}",
                    status.message()
                ),
            ))
        }
    }
}

async fn wait_ready(
    live: &LiveVm,
    dir: &VmDir,
    deadline: Instant,
) -> Result<HealthResponse, LaunchFailure> {
    let ready = tokio::select! {
        r = live.guest.wait_ready(deadline) => r.map_err(|s| format!("the guest agent did not answer: {}", s.message())),
        exit = live.vm.wait_exit() => Err(format!("the VMM {exit} while the guest was starting")),
    };
    match ready {
        Ok(h) => Ok(h),
        Err(reason) => {
            live.vm.kill().await;
            Err(LaunchFailure::new(dir, reason))
        }
    }
}

/// A fresh guest identity for sandbox `id`.
pub(crate) fn identity_for(id: &str) -> Identity {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    Identity {
        sandbox_id: id.to_string(),
        hostname: id.to_string(),
        machine_id: bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}
