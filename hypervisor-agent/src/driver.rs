//! Starting the Cloud Hypervisor driver for [`crate::Agent::start`]
//! (`VmmKind::CloudHypervisor`): check the binary and its version, and
//! decide whether KVM can run guests here. Cloud Hypervisor has no software
//! emulation, so there is no TCG fallback: `auto` boots a probe guest and
//! fails with the reason when it does not report in.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::accel::{AccelChoice, AccelMode, PROBE_MARKER};
use crate::config::GuestArtifacts;
use crate::error::AgentError;
use crate::jail::Jail;
use crate::rundir::VmDir;
use crate::vmm::cloud_hypervisor::{ChOptions, CloudHypervisorVmm};
use crate::vmm::{Accelerator, ChannelKind, MemoryBacking, VmSpec, Vmm};

/// The driver, its version (for template keys) and the accelerator.
pub(crate) async fn cloud_hypervisor(
    binary: &Path,
    mode: AccelMode,
    guest: &GuestArtifacts,
    vms_dir: &Path,
    probe_timeout: Duration,
    jail: Jail,
) -> Result<(Arc<dyn Vmm>, String, AccelChoice), AgentError> {
    let vmm = CloudHypervisorVmm::start(binary, ChOptions::default())
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let version = format!("cloud-hypervisor {}", vmm.version());
    let reason = match mode {
        AccelMode::Tcg => {
            return Err(AgentError::Config(
                "Cloud Hypervisor runs on KVM only; use --accel auto or kvm, or the QEMU driver for TCG".into(),
            ));
        }
        AccelMode::Kvm => {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(|e| {
                    AgentError::Accel(crate::accel::AccelError::KvmUnusable(format!(
                        "/dev/kvm: {e}"
                    )))
                })?;
            "forced by configuration (Cloud Hypervisor runs on KVM only)".to_string()
        }
        AccelMode::Auto => {
            let elapsed = probe_guest(&vmm, guest, vms_dir, probe_timeout)
                .await
                .map_err(|why| {
                    AgentError::Accel(crate::accel::AccelError::KvmUnusable(format!(
                        "a probe guest did not boot under {} ({why}); Cloud Hypervisor has no software emulation, use the QEMU driver on this host",
                        vmm.binary().display()
                    )))
                })?;
            format!(
                "probe guest booted under Cloud Hypervisor in {} ms",
                elapsed.as_millis()
            )
        }
    };
    let accel = AccelChoice {
        accelerator: Accelerator::Kvm,
        reason,
    };
    info!(
        accelerator = %accel.accelerator,
        reason = %accel.reason,
        vmm = %version,
        channel = ChannelKind::Vsock.cmdline_value(),
        "accelerator selected"
    );
    // The probe guest (Somna's own, never user code) ran unjailed, as the
    // QEMU accelerator probe does; every VM from here on is jailed.
    Ok((Arc::new(vmm.with_jail(jail)), version, accel))
}

/// Boots the guest in probe mode (`somna.probe=1`: it prints
/// [`PROBE_MARKER`] and powers off, so the VMM exits by itself) and checks
/// its console. The run directory is `<vms_dir>/ch-probe-*`, removed after
/// (crash recovery takes it otherwise).
pub async fn probe_guest(
    vmm: &CloudHypervisorVmm,
    guest: &GuestArtifacts,
    vms_dir: &Path,
    timeout: Duration,
) -> Result<Duration, String> {
    let id = format!("ch-probe-{:08x}", rand::random::<u32>());
    let dir = VmDir::create(vms_dir, &id).map_err(|e| format!("create {id}: {e}"))?;
    let spec = VmSpec {
        id: id.clone(),
        cpus: 1,
        memory_mib: 256,
        memory: MemoryBacking {
            path: dir.memory_file(),
            shared: true,
        },
        kernel: guest.kernel.clone(),
        initramfs: guest.initramfs.clone(),
        cmdline: format!(
            "console=ttyS0 quiet panic=-1 somna.probe=1 somna.id={id} somna.channel=vsock"
        ),
        disks: Vec::new(),
        disk_io: Default::default(),
        net: None,
        channel: ChannelKind::Vsock,
        accelerator: Accelerator::Kvm,
    };
    let started = Instant::now();
    let outcome = match vmm.launch(&spec, &dir, None).await {
        Err(e) => Err(e.to_string()),
        Ok(vm) => {
            let exit = tokio::time::timeout(timeout, vm.wait_exit()).await;
            let console = std::fs::read_to_string(dir.console_log()).unwrap_or_default();
            if console.contains(PROBE_MARKER) {
                vm.kill().await;
                Ok(started.elapsed())
            } else {
                let exit = match exit {
                    Ok(exit) => format!("the VMM {exit}"),
                    Err(_) => {
                        vm.kill().await;
                        format!("no report within {timeout:?}")
                    }
                };
                let log = dir.vmm_log_tail(3);
                Err(format!(
                    "{exit}; console: {:?}; VMM said: {:?}",
                    dir.console_tail(3),
                    log
                ))
            }
        }
    };
    let _ = dir.remove();
    outcome
}
