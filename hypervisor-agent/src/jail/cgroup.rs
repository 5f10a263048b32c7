//! Per-VMM cgroups: CPU quota and weight, a hard memory limit, a pids limit
//! and disk I/O throttling. cgroup v2 where the host has it; otherwise the
//! v1 hierarchies (these machines run the hybrid layout: controllers on
//! v1, an empty v2 at `/sys/fs/cgroup/unified`).
//!
//! On v1 each agent's subtree sits under the agent's own cgroup in every
//! hierarchy (so an operator's limits on the agent's service cover its
//! VMMs); on v2 under `/sys/fs/cgroup/somna/` (a v2 group with processes
//! cannot have controlled children).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{JailError, cstring};
use crate::vmm::{Accelerator, VmSpec};

const CGROUP_FS: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "blkio"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    V2,
    /// v1 hierarchies (pure v1 or hybrid).
    V1,
}

/// Default limits every sandbox's VMM gets (scaled by its size).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory above guest RAM for the VMM itself.
    pub vmm_overhead_mib: u32,
    /// More on TCG hosts, for the translation cache (QEMU's `tb-size`,
    /// which the driver caps at this).
    pub tcg_overhead_mib: u32,
    /// CPU on top of one core per vCPU, in percent of a core, for the
    /// VMM's I/O and main threads.
    pub cpu_headroom_pct: u32,
    pub pids_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            vmm_overhead_mib: 256,
            tcg_overhead_mib: 256,
            cpu_headroom_pct: 0,
            pids_max: 512,
        }
    }
}

/// The limits for one VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLimits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    /// cgroup v1 `cpu.shares` (v2's weight is derived).
    pub cpu_shares: u64,
    pub pids_max: u32,
    pub io: Option<IoLimit>,
}

/// Throttling of the whole disk `device` (major, minor), each direction:
/// the sandbox's [`crate::vmm::DiskIoLimit`] again, on the host disk that
/// holds its writable layer (v1 throttles only direct I/O there; the VMM's
/// own throttle is what holds on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoLimit {
    pub device: (u32, u32),
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
}

impl Limits {
    pub fn for_vm(&self, spec: &VmSpec) -> VmLimits {
        let mut overhead = u64::from(self.vmm_overhead_mib);
        if spec.accelerator == Accelerator::Tcg {
            overhead += u64::from(self.tcg_overhead_mib);
        }
        let period = 100_000;
        let cpus = u64::from(spec.cpus.max(1));
        let io = spec
            .disks
            .iter()
            .find(|d| !d.read_only)
            .and_then(|d| whole_disk_of(&d.path))
            .filter(|_| !spec.disk_io.is_unlimited())
            .map(|device| IoLimit {
                device,
                bytes_per_sec: spec.disk_io.bytes_per_sec,
                ops_per_sec: spec.disk_io.ops_per_sec,
            });
        VmLimits {
            memory_bytes: (u64::from(spec.memory_mib) + overhead) << 20,
            cpu_quota_us: period * (cpus * 100 + u64::from(self.cpu_headroom_pct)) / 100,
            cpu_period_us: period,
            cpu_shares: 1024 * cpus,
            pids_max: self.pids_max,
            io,
        }
    }
}

/// The block device (whole disk: I/O limits refuse partitions) holding
/// `path`; None on file systems without one (tmpfs, overlay).
fn whole_disk_of(path: &Path) -> Option<(u32, u32)> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.join("partition").exists() {
        return Some((major, minor));
    }
    let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
    let (a, b) = parent.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// This agent's subtree in each hierarchy.
#[derive(Debug)]
pub(super) struct CgroupRoot {
    layout: CgroupLayout,
    /// One per v1 controller in use; one on v2.
    dirs: Vec<PathBuf>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl CgroupRoot {
    pub(super) fn open(name: &str) -> Result<Self, JailError> {
        let fs = Path::new(CGROUP_FS);
        if fs.join("cgroup.controllers").exists() {
            let top = fs.join("somna");
            let dir = fs.join(name);
            std::fs::create_dir_all(&dir).map_err(JailError::io("create cgroup", &dir))?;
            // Controllers flow down level by level.
            for level in [fs, top.as_path(), dir.as_path()] {
                let f = level.join("cgroup.subtree_control");
                std::fs::write(&f, "+cpu +memory +pids +io")
                    .map_err(JailError::io("enable cgroup controllers in", &f))?;
            }
            return Ok(CgroupRoot {
                layout: CgroupLayout::V2,
                dirs: vec![dir],
            });
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(JailError::io("read", Path::new("/proc/self/cgroup")))?;
        let mut dirs = Vec::new();
        for controller in V1_CONTROLLERS {
            let hierarchy = fs.join(controller);
            if !hierarchy.join("cgroup.procs").exists() {
                continue;
            }
            let mine = own
                .lines()
                .filter_map(|l| {
                    let mut parts = l.splitn(3, ':').skip(1);
                    parts.next().zip(parts.next())
                })
                .find(|(ctrls, _)| ctrls.split(',').any(|c| c == controller))
                .map(|(_, path)| path.trim_start_matches('/').to_string())
                .unwrap_or_default();
            let dir = hierarchy.join(mine).join(name);
            std::fs::create_dir_all(&dir).map_err(JailError::io("create cgroup", &dir))?;
            dirs.push(dir);
        }
        if dirs.is_empty() {
            return Err(JailError::Io {
                what: "find cgroup controllers under",
                path: fs.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(CgroupRoot {
            layout: CgroupLayout::V1,
            dirs,
        })
    }

    pub(super) fn layout(&self) -> CgroupLayout {
        self.layout
    }

    /// A new cgroup for one VMM process of VM `id`, with `limits` set.
    pub(super) fn create(&self, id: &str, limits: &VmLimits) -> Result<Cgroup, JailError> {
        let leaf = format!("{id}.{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let mut group = Cgroup {
            layout: self.layout,
            dirs: Vec::new(),
        };
        for parent in &self.dirs {
            let dir = parent.join(&leaf);
            std::fs::create_dir(&dir).map_err(JailError::io("create cgroup", &dir))?;
            group.dirs.push(dir);
        }
        group.apply(limits)?;
        Ok(group)
    }

    /// Kills what runs in this agent's leftover cgroups (a previous agent
    /// process crashed with VMMs starting) and removes them.
    pub(super) async fn remove_leftovers(&self) {
        for parent in &self.dirs {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in entries.flatten() {
                if e.path().is_dir() {
                    remove_dir(&e.path(), true).await;
                }
            }
        }
    }
}

impl CgroupRoot {
    /// Removes this agent's subtree where it is empty (agent shutdown). A
    /// VMM that outlives the agent (taken over by the next one) keeps its
    /// leaf, and so the subtree, which that agent's start-up sweep then
    /// removes.
    pub(super) fn remove_if_empty(&self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::debug!(dir = %dir.display(), error = %e, "agent cgroup kept");
            }
        }
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        self.remove_if_empty();
    }
}

/// One VMM's cgroup (a directory per v1 hierarchy, one on v2). Removed
/// when dropped; the VMM must have exited.
#[derive(Debug)]
pub(super) struct Cgroup {
    layout: CgroupLayout,
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    pub(super) fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.clone()
    }

    pub(super) fn procs_files(&self) -> Result<Vec<CString>, JailError> {
        self.dirs
            .iter()
            .map(|d| cstring(&d.join("cgroup.procs")))
            .collect()
    }

    fn controller_dir(&self, controller: &str) -> Option<&Path> {
        match self.layout {
            CgroupLayout::V2 => self.dirs.first().map(PathBuf::as_path),
            CgroupLayout::V1 => self
                .dirs
                .iter()
                .find(|d| {
                    d.parent()
                        .is_some_and(|p| p.starts_with(Path::new(CGROUP_FS).join(controller)))
                })
                .map(PathBuf::as_path),
        }
    }

    fn set(&self, controller: &str, file: &str, value: &str) -> Result<(), JailError> {
        let Some(dir) = self.controller_dir(controller) else {
            return Ok(());
        };
        let path = dir.join(file);
        std::fs::write(&path, value).map_err(|source| JailError::Io {
            what: "set cgroup limit",
            path,
            source,
        })
    }

    fn apply(&self, l: &VmLimits) -> Result<(), JailError> {
        match self.layout {
            CgroupLayout::V2 => {
                self.set(
                    "cpu",
                    "cpu.max",
                    &format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
                )?;
                let weight = (l.cpu_shares * 100 / 1024).clamp(1, 10_000);
                self.set("cpu", "cpu.weight", &weight.to_string())?;
                self.set("memory", "memory.max", &l.memory_bytes.to_string())?;
                self.set("pids", "pids.max", &l.pids_max.to_string())?;
                if let Some(io) = &l.io {
                    let ((major, minor), bps, iops) = (io.device, io.bytes_per_sec, io.ops_per_sec);
                    let mut v = format!("{major}:{minor}");
                    if let Some(b) = bps {
                        v += &format!(" rbps={b} wbps={b}");
                    }
                    if let Some(o) = iops {
                        v += &format!(" riops={o} wiops={o}");
                    }
                    self.optional(self.set("io", "io.max", &v));
                }
            }
            CgroupLayout::V1 => {
                self.set("cpu", "cpu.cfs_period_us", &l.cpu_period_us.to_string())?;
                self.set("cpu", "cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
                self.set("cpu", "cpu.shares", &l.cpu_shares.to_string())?;
                self.set(
                    "memory",
                    "memory.limit_in_bytes",
                    &l.memory_bytes.to_string(),
                )?;
                self.set("pids", "pids.max", &l.pids_max.to_string())?;
                if let Some(io) = &l.io {
                    let ((major, minor), bps, iops) = (io.device, io.bytes_per_sec, io.ops_per_sec);
                    for (file, v) in [
                        ("blkio.throttle.read_bps_device", bps),
                        ("blkio.throttle.write_bps_device", bps),
                        ("blkio.throttle.read_iops_device", iops),
                        ("blkio.throttle.write_iops_device", iops),
                    ] {
                        if let Some(v) = v {
                            self.optional(self.set("blkio", file, &format!("{major}:{minor} {v}")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// I/O throttling depends on the device (virtual disks without a
    /// request queue refuse it): a VMM without it still starts.
    fn optional(&self, r: Result<(), JailError>) {
        if let Err(e) = r {
            tracing::debug!(error = %e, "no I/O limit for this VMM");
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                // Still busy: the next start-up's sweep removes it.
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a VMM cgroup");
            }
        }
    }
}

/// Kills the processes in `dir` (if `kill`), waits for it to empty and
/// removes it.
async fn remove_dir(dir: &Path, kill: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        if kill {
            for pid in &pids {
                // SAFETY: kill(2); these are VMMs a previous agent started.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(dir = %dir.display(), ?pids, "leftover VMM cgroup does not empty");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => tracing::info!(dir = %dir.display(), "removed a leftover VMM cgroup"),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a leftover VMM cgroup")
        }
    }
}
