//! The request and response bodies the driver exchanges, named and shaped
//! after the component schemas of Cloud Hypervisor's OpenAPI spec
//! (`vmm/src/api/openapi/cloud-hypervisor.yaml`). Only the fields Somna
//! sets are here; absent optional fields are not sent, so the VMM's
//! defaults apply. The contract tests validate every body against the spec.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `VmConfig`: what `vm.create` takes.
#[derive(Debug, Clone, Serialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    /// One group, `io`, that all the disks share (absent when unlimited).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limit_groups: Vec<RateLimitGroupConfig>,
    pub disks: Vec<DiskConfig>,
    pub rng: RngConfig,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
    pub vsock: VsockConfig,
}

/// `CpusConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

/// `MemoryConfig`: anonymous, private guest RAM of `size` bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryConfig {
    pub size: u64,
}

/// `PayloadConfig`: direct kernel boot (PVH ELF `vmlinux`).
#[derive(Debug, Clone, Serialize)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
}

/// `DiskConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The virtio-blk serial the guest finds its disks by.
    pub serial: String,
    pub id: String,
    /// Always `Raw`: never let the VMM guess a format from the content.
    pub image_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
}

/// `RateLimitGroupConfig`: a rate limiter that several disks share.
#[derive(Debug, Clone, Serialize)]
pub struct RateLimitGroupConfig {
    pub id: String,
    pub rate_limiter_config: RateLimiterConfig,
}

/// `RateLimiterConfig`: a byte and an operation budget (reads and writes
/// together).
#[derive(Debug, Clone, Serialize)]
pub struct RateLimiterConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `TokenBucket`: `size` tokens, refilled in `refill_time` milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
}

/// `NetConfig` for `vm.add-net`: no TAP name, because the TAP goes with
/// the request as a file descriptor (the VMM never opens one itself).
#[derive(Debug, Clone, Serialize)]
pub struct NetConfig {
    pub mac: String,
    pub id: String,
}

/// `RngConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct RngConfig {
    pub src: PathBuf,
}

/// `ConsoleConfig` / `SerialConfig` (same fields for what Somna sets).
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleConfig {
    /// `ConsoleMode`: `Off`, `Pty`, `Tty`, `File`, `Socket`, `Null`.
    pub mode: &'static str,
}

/// `VsockConfig`: hybrid vsock on a Unix socket.
#[derive(Debug, Clone, Serialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
    pub id: String,
}

/// `VmSnapshotConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct VmSnapshotConfig {
    /// `file://<directory>`.
    pub destination_url: String,
}

/// `MemoryRestoreMode`: how `vm.restore` brings guest RAM back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// A private (copy-on-write) mapping of the snapshot's memory file:
    /// nothing is read up front and clones of one template share its
    /// pages. Not in the spec of the current release line; tried first and
    /// skipped once a binary refuses it.
    CopyOnWrite,
    /// Pages are read from the memory file when the guest first touches
    /// them (userfaultfd).
    OnDemand,
    /// All of guest RAM is read into the VMM before the VM runs.
    Copy,
}

impl MemoryRestoreMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryRestoreMode::CopyOnWrite => "CopyOnWrite",
            MemoryRestoreMode::OnDemand => "OnDemand",
            MemoryRestoreMode::Copy => "Copy",
        }
    }

    /// Fastest first: the order the driver tries them in by default.
    pub const PREFERENCE: [MemoryRestoreMode; 3] = [
        MemoryRestoreMode::CopyOnWrite,
        MemoryRestoreMode::OnDemand,
        MemoryRestoreMode::Copy,
    ];
}

impl fmt::Display for MemoryRestoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `RestoreConfig`.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreConfig {
    /// `file://<directory>`.
    pub source_url: String,
    pub memory_restore_mode: MemoryRestoreMode,
    pub resume: bool,
    /// The network devices that get new TAPs, passed with the request.
    /// The published OpenAPI spec omits this field, but the VMM reads it
    /// (`RestoreConfig::net_fds` in its `vmm/src/config.rs`,
    /// `docs/snapshot_restore.md`); the contract tests declare it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net_fds: Vec<RestoredNetConfig>,
}

/// One entry of `RestoreConfig::net_fds`: the device and how many of the
/// request's descriptors are its queues.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredNetConfig {
    pub id: String,
    pub num_fds: usize,
}

/// `DeviceConfig`: a VFIO device by its sysfs path.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceConfig {
    pub path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `VmRemoveDevice`.
#[derive(Debug, Clone, Serialize)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// `VmmPingResponse`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    #[serde(default)]
    pub build_version: Option<String>,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub features: Vec<String>,
}

/// `VmInfo` (the config is kept as JSON: only the state is read).
#[derive(Debug, Clone, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub memory_actual_size: Option<i64>,
}

/// `VmState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// `PciDeviceInfo`.
#[derive(Debug, Clone, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}
