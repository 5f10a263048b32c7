//! The VMM driver interface. A driver turns a [`VmSpec`] into a running VM
//! process and gives back a [`Vm`] handle; everything above it (sandboxes,
//! crash recovery, the guest client) is driver-independent.
//!
//! The shape follows what both supported VMMs can do: QEMU (command line +
//! QMP, [`qemu`]) and Cloud Hypervisor (REST API: `vm.create` with a
//! payload, disks, vsock, serial; `vm.boot`, `vm.pause`, `vm.snapshot`,
//! `vm.restore`, ...; [`cloud_hypervisor`]).

pub mod cloud_hypervisor;
pub mod qemu;
pub mod qmp;

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::rundir::VmDir;

/// How guest instructions are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (Tiny Code Generator).
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A block device for the guest. The guest finds disks by `serial`.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: String,
}

/// The transport of the host↔guest agent channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// A virtio-serial port backed by a Unix socket on the host. Works
    /// everywhere, including hosts without vhost-vsock.
    Serial,
    /// virtio-vsock (vhost-vsock in QEMU, hybrid vsock in Cloud Hypervisor).
    Vsock,
}

impl ChannelKind {
    /// The value of the guest's `somna.channel=` kernel parameter.
    pub fn cmdline_value(self) -> &'static str {
        match self {
            ChannelKind::Serial => "serial",
            ChannelKind::Vsock => "vsock",
        }
    }
}

/// Where guest RAM lives. It is always a file, so that a snapshot can leave
/// memory where it is (light sleep writes only device state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBacking {
    pub path: PathBuf,
    /// Shared mapping: guest writes go to the file (the VM owns it).
    /// Private mapping: the file is an immutable template; writes stay in
    /// the VMM's copy-on-write pages.
    pub shared: bool,
}

/// The VM's network device: a TAP device prepared by netd (in the slot's
/// network namespace) and the guest MAC address. The guest side (IP, MAC)
/// is the same on every slot, so a snapshot restores on any slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP device's name.
    pub tap: String,
    /// The network namespace the TAP lives in (`/run/netns/<name>`), if not
    /// the VMM's own.
    pub netns: Option<PathBuf>,
    /// The guest NIC's MAC address, `02:..` form.
    pub mac: String,
}

/// Opens the TAP of `spec.net` in its slot's namespace, with a
/// `virtio_net_hdr` (both VMMs' virtio-net use it for offloads), to pass to
/// the VMM, which never opens one itself. None without a network; the
/// error says what failed.
pub(crate) async fn open_tap(spec: &VmSpec) -> Result<Option<std::os::fd::OwnedFd>, String> {
    let Some(net) = spec.net.clone() else {
        return Ok(None);
    };
    let what = format!("opening TAP {} for {}", net.tap, spec.id);
    tokio::task::spawn_blocking(move || {
        somna_netd::open_vmm_tap(net.netns.as_deref(), &net.tap, true)
    })
    .await
    .map_err(|e| format!("{what}: {e}"))?
    .map(Some)
    .map_err(|e| format!("{what}: {e}"))
}

/// Restore instead of boot: the VMM loads this state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// What a previous `Vm::save_state` wrote: a file (QEMU's migration
    /// stream) or a directory (Cloud Hypervisor's snapshot directory).
    pub state: PathBuf,
    /// The state holds device state only; RAM comes from the memory file
    /// (QEMU's `x-ignore-shared`). False when RAM is inside the state.
    pub memory_in_file: bool,
    /// Run the VM as soon as its state is loaded (Cloud Hypervisor:
    /// `resume: true` in the same `vm.restore` call; QEMU: `cont` right
    /// after the incoming migration). False: it stays paused until
    /// [`Vm::resume`] (warm pools).
    pub resume: bool,
}

/// Everything a driver needs to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub memory: MemoryBacking,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The complete kernel command line.
    pub cmdline: String,
    pub disks: Vec<DiskSpec>,
    /// Throttling of all the VM's disks together, enforced by the VMM.
    pub disk_io: DiskIoLimit,
    /// No network device when None (loopback only in the guest).
    pub net: Option<NetSpec>,
    pub channel: ChannelKind,
    pub accelerator: Accelerator,
}

/// How fast one VM may use its disks, all of them together, in each
/// direction (reads and writes are counted apart). The VMM enforces it
/// (QEMU's throttle group, Cloud Hypervisor's rate-limit group), so it
/// holds for writes that go through the host's page cache, on cgroup v1
/// hosts as well; the jail's cgroup repeats it on the host disk. None: no
/// limit on that axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskIoLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
}

impl DiskIoLimit {
    /// 256 MiB/s and 10,000 operations/s each way.
    pub const DEFAULT: DiskIoLimit = DiskIoLimit {
        bytes_per_sec: Some(256 << 20),
        ops_per_sec: Some(10_000),
    };

    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

/// Where the host reaches the guest agent of a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket whose byte stream is the guest's virtio-serial port.
    SerialSocket(PathBuf),
    /// A kernel vsock address (QEMU with vhost-vsock).
    Vsock { cid: u32, port: u32 },
    /// Cloud Hypervisor's hybrid vsock: a Unix socket on the host; each
    /// connection starts with `CONNECT <port>\n`, answered `OK <n>\n`, then
    /// it is a plain byte stream to the guest's vsock `port`.
    HybridVsock { socket: PathBuf, port: u32 },
}

/// A host PCI device for VFIO passthrough (a GPU, typically), bound to
/// `vfio-pci` on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDevice {
    /// Its sysfs path, `/sys/bus/pci/devices/<domain:bus:dev.fn>`.
    pub path: PathBuf,
    /// The device id inside the VMM (chosen by the VMM when None).
    pub id: Option<String>,
}

/// A device attached to a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDevice {
    /// The VMM's id for it (what [`Vm::remove_device`] takes).
    pub id: String,
    /// Its guest PCI address (segment:bus:device.function), when reported.
    pub bdf: Option<String>,
}

/// What a driver (on this host) can do beyond booting, pausing and
/// snapshotting VMs. The scheduler places GPU sandboxes only on hosts
/// whose driver reports [`VmmCapabilities::gpu_host`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmCapabilities {
    /// The driver attaches host PCI devices through VFIO
    /// ([`Vm::add_device`] / [`Vm::remove_device`]).
    pub vfio: bool,
    /// GPUs on this host bound to `vfio-pci`, ready to pass through (found
    /// when the driver started; empty when `vfio` is false).
    pub gpus: Vec<VfioDevice>,
}

impl VmmCapabilities {
    /// This host can run GPU sandboxes: the driver does VFIO and there is
    /// at least one GPU bound to `vfio-pci`.
    pub fn gpu_host(&self) -> bool {
        self.vfio && !self.gpus.is_empty()
    }
}

/// How a VM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code, when the VMM exited by itself.
    pub code: Option<i32>,
    /// Signal number, when the VMM was killed.
    pub signal: Option<i32>,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exited with status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("ended"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "cannot start {binary}: {source}; install it (apt-get install qemu-system-x86) or set the VMM path"
    )]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("VMM for {id} failed: {what}")]
    Failed { id: String, what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::QmpError),
    /// Cloud Hypervisor errors name the binary and the API call.
    #[error(transparent)]
    CloudHypervisor(#[from] cloud_hypervisor::ChError),
    #[error("this VMM driver cannot {what}")]
    Unsupported { what: String },
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

/// A VMM driver.
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Short name for logs and `somna host ls` ("qemu", "cloud-hypervisor").
    fn name(&self) -> &'static str;

    /// The agent channel this driver gives guests on this host.
    fn channel(&self) -> ChannelKind;

    /// Kernel parameters the guest needs on this driver's machine model.
    fn guest_kernel_args(&self) -> &'static str;

    /// Whether a snapshot can leave guest RAM in the VM's shared memory
    /// file ([`MemoryBacking`], QEMU's `x-ignore-shared`). When false,
    /// [`Vm::save_state`] always writes RAM into the state (Cloud
    /// Hypervisor's `memory-ranges`), so callers seal snapshots with RAM
    /// inside the state and pass `memory_in_file: false`.
    fn ram_in_memory_file(&self) -> bool {
        true
    }

    /// What this driver can do on this host beyond the basics.
    fn capabilities(&self) -> VmmCapabilities {
        VmmCapabilities::default()
    }

    /// Start a VM for `spec`, with its sockets, logs and pid file in `dir`.
    /// Without `incoming` it boots and returns once the VMM process runs
    /// (the guest may still be booting). With `incoming` it restores that
    /// state and returns with the VM running if [`Incoming::resume`] is set,
    /// else paused, ready for [`Vm::resume`]. On error no VMM process is
    /// left behind (it is killed and reaped).
    async fn launch(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        incoming: Option<&Incoming>,
    ) -> Result<Box<dyn Vm>, VmmError>;
}

/// A running VM process.
#[async_trait]
pub trait Vm: Send + Sync {
    /// PID of the VMM process on the host.
    fn pid(&self) -> u32;

    /// Where the guest agent answers.
    fn agent_endpoint(&self) -> AgentEndpoint;

    /// Resolves when the VMM process has exited (immediately if it already has).
    async fn wait_exit(&self) -> VmExit;

    /// The exit, if the VMM has already exited.
    fn try_exit(&self) -> Option<VmExit>;

    /// Stop the VM now (SIGKILL to the VMM) and wait until the process is gone.
    async fn kill(&self) -> VmExit;

    /// Pause the vCPUs.
    async fn pause(&self) -> Result<(), VmmError>;

    /// Run the vCPUs again.
    async fn resume(&self) -> Result<(), VmmError>;

    /// Write the paused VM's state to `path`: a file (QEMU) or a directory
    /// (Cloud Hypervisor), replaced if it exists. With `memory_in_file`
    /// only device state is written (RAM stays in the shared memory file);
    /// otherwise RAM goes into the state too.
    async fn save_state(
        &self,
        path: &std::path::Path,
        memory_in_file: bool,
    ) -> Result<(), VmmError>;

    /// How the last restore brought guest memory back (Cloud Hypervisor's
    /// `memory_restore_mode`), for logs; None after a boot or when the
    /// driver has no such choice.
    fn restore_mode(&self) -> Option<String> {
        None
    }

    /// Hot-plug a host PCI device (VFIO) into the running VM.
    async fn add_device(&self, device: &VfioDevice) -> Result<AttachedDevice, VmmError> {
        Err(VmmError::Unsupported {
            what: format!(
                "attach VFIO device {} (use the Cloud Hypervisor driver)",
                device.path.display()
            ),
        })
    }

    /// Hot-unplug a device [`Vm::add_device`] attached.
    async fn remove_device(&self, id: &str) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            what: format!("detach device {id}"),
        })
    }

    /// Ask the VMM to exit through its control API (QMP `quit`, CH
    /// `vmm.shutdown`); kill it if it has not exited within `grace`.
    async fn stop(&self, grace: std::time::Duration) -> VmExit;
}
