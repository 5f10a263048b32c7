//! Agent configuration, with the embedded defaults `somna up` uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::accel::AccelMode;
use crate::vmm::ChannelKind;

/// Where the guest kernel and initramfs live (built by `scripts/setup.sh`).
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestArtifacts {
    /// `dir/vmlinux` and `dir/initramfs.img`, checked to exist.
    pub fn in_dir(dir: &Path) -> Result<Self, String> {
        let g = GuestArtifacts {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.img"),
        };
        for p in [&g.kernel, &g.initramfs] {
            if !p.is_file() {
                return Err(format!(
                    "guest artifact {} is missing: run scripts/setup.sh (it builds the guest kernel and initramfs) or point --guest-dir at them",
                    p.display()
                ));
            }
        }
        Ok(g)
    }
}

/// Sizes a sandbox gets when the request leaves them at 0, and the largest
/// sizes one sandbox may ask for.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    pub default_cpus: u32,
    pub default_memory_mib: u32,
    pub default_disk_mib: u32,
    pub max_cpus: u32,
    pub max_memory_mib: u32,
    pub max_disk_mib: u32,
    pub min_memory_mib: u32,
    pub min_disk_mib: u32,
    /// Disk throughput of each sandbox, all its disks together.
    pub disk_io: crate::vmm::DiskIoLimit,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        SandboxLimits {
            default_cpus: 1,
            default_memory_mib: 512,
            default_disk_mib: 1024,
            max_cpus: host_cpus.max(1),
            max_memory_mib: 64 * 1024,
            max_disk_mib: 256 * 1024,
            min_memory_mib: 128,
            min_disk_mib: 64,
            disk_io: crate::vmm::DiskIoLimit::DEFAULT,
        }
    }
}

/// How a template clone gets its RAM when the template's RAM is a file
/// (QEMU). Cloud Hypervisor clones read RAM from the template's state,
/// which their jail shows read-only, whichever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateMemory {
    /// A sparse copy of the template's RAM file (only the pages the
    /// template touched, ~75 MB for busybox) becomes the clone's own
    /// memory file. No clone can reach another's memory, and the clone's
    /// first sleep is a light one.
    #[default]
    Copy,
    /// Every clone maps the template's RAM file privately, so the pages it
    /// has not written are shared in the page cache (denser). QEMU 7.2
    /// opens that file read-write even so: a clone whose guest escaped
    /// into its VMM could change the RAM of the template's other clones.
    /// Only for hosts whose sandboxes all trust each other (one tenant).
    Shared,
}

impl std::str::FromStr for TemplateMemory {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "copy" => Ok(TemplateMemory::Copy),
            "shared" => Ok(TemplateMemory::Shared),
            other => Err(format!("{other:?}: give copy or shared")),
        }
    }
}

/// Which VMM runs this host's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VmmKind {
    /// QEMU `microvm` (`AgentConfig::qemu_binary`), KVM or TCG as probed.
    #[default]
    Qemu,
    /// Cloud Hypervisor (KVM only), from an operator-supplied binary:
    /// a path, or a name looked up on `PATH`.
    CloudHypervisor { binary: PathBuf },
}

/// Which agent channel guests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelMode {
    /// vsock where the host has vhost-vsock, virtio-serial otherwise.
    Auto,
    Fixed(ChannelKind),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name of this host in listings.
    pub host_id: String,
    /// State: `vms/` (run directories), `images/` (cache), the probe cache.
    pub data_dir: PathBuf,
    /// Directory holding `vmlinux` and `initramfs.img`.
    pub guest_dir: PathBuf,
    /// Directories of local OCI image layouts (`<dir>/<name>/index.json`).
    pub image_dirs: Vec<PathBuf>,
    pub qemu_binary: PathBuf,
    /// The VMM driver (QEMU unless configured otherwise).
    pub vmm: VmmKind,
    pub accel: AccelMode,
    pub channel: ChannelMode,
    /// How long the KVM probe guest may take to report in.
    pub probe_timeout: Duration,
    /// How long a sandbox guest may take to answer after its VMM starts.
    pub boot_timeout: Duration,
    pub limits: SandboxLimits,
    /// Build a template snapshot per (image, size) and create sandboxes by
    /// restoring it.
    pub templates: bool,
    /// How a template clone gets its RAM (QEMU, where it is a file).
    pub template_memory: TemplateMemory,
    /// Warm pools of restored, paused VMs, per image (default sizes).
    pub warm_pools: Vec<WarmPoolSpec>,
    /// Check snapshot checksums before every wake (and templates once per
    /// agent process).
    pub verify_snapshots: bool,
    /// Registries, cache budget, size limits and root disk format.
    pub images: somna_images::ImageStoreOptions,
    /// Sandbox networking (network slots, eBPF policy); None: VMs get no
    /// network device (hosts without eBPF).
    pub network: Option<somna_netd::NetdConfig>,
    /// How VMM processes are jailed and limited.
    pub jail: crate::jail::JailConfig,
    /// Limits on exec output and file transfers.
    pub transfer: crate::transfer::TransferLimits,
}

/// A warm pool: `size` VMs of `image` kept restored and paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPoolSpec {
    pub image: String,
    pub size: u32,
}

impl std::str::FromStr for WarmPoolSpec {
    type Err = String;
    /// `IMAGE=N`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (image, size) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?} is not IMAGE=SIZE (e.g. busybox=2)"))?;
        let size: u32 = size
            .parse()
            .map_err(|_| format!("warm pool size {size:?} in {s:?} is not a number"))?;
        if image.is_empty() || size > 64 {
            return Err(format!("{s:?}: give an image and a size of 0..=64"));
        }
        Ok(WarmPoolSpec {
            image: image.to_string(),
            size,
        })
    }
}

impl AgentConfig {
    /// The embedded defaults: state under `/var/lib/somna`, guest artifacts
    /// in `/usr/local/lib/somna/guest`, images in `/var/lib/somna/oci`.
    pub fn with_defaults() -> Self {
        let data_dir = PathBuf::from("/var/lib/somna");
        AgentConfig {
            host_id: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into()),
            image_dirs: vec![data_dir.join("oci")],
            data_dir,
            guest_dir: PathBuf::from("/usr/local/lib/somna/guest"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            vmm: VmmKind::Qemu,
            accel: AccelMode::Auto,
            channel: ChannelMode::Auto,
            probe_timeout: Duration::from_secs(10),
            boot_timeout: Duration::from_secs(60),
            limits: SandboxLimits::default(),
            templates: true,
            template_memory: TemplateMemory::Copy,
            warm_pools: Vec::new(),
            verify_snapshots: true,
            images: somna_images::ImageStoreOptions::default(),
            network: None,
            jail: crate::jail::JailConfig::default(),
            transfer: crate::transfer::TransferLimits::default(),
        }
    }

    /// Makes every configured path absolute: VMM command lines name them,
    /// and crash recovery recognises a VMM by its run directory's path.
    pub fn make_paths_absolute(&mut self) -> std::io::Result<()> {
        self.data_dir = std::fs::canonicalize(&self.data_dir)?;
        self.guest_dir = std::path::absolute(&self.guest_dir)?;
        for d in &mut self.image_dirs {
            *d = std::path::absolute(&*d)?;
        }
        Ok(())
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }

    pub fn image_cache_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.data_dir.join("templates")
    }

    pub fn accel_cache_file(&self) -> PathBuf {
        self.data_dir.join("accel-probe.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_pool_specs() {
        let p: WarmPoolSpec = "busybox=3".parse().unwrap();
        assert_eq!(
            p,
            WarmPoolSpec {
                image: "busybox".into(),
                size: 3
            }
        );
        let p: WarmPoolSpec = "reg:5000/img:tag=1".parse().unwrap();
        assert_eq!(p.image, "reg:5000/img:tag");
        assert!(
            "busybox"
                .parse::<WarmPoolSpec>()
                .unwrap_err()
                .contains("IMAGE=SIZE")
        );
        assert!("busybox=x".parse::<WarmPoolSpec>().is_err());
        assert!("=2".parse::<WarmPoolSpec>().is_err());
    }
}
