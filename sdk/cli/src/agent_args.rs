//! Flags of a host agent, shared by `somna up` and `somna agent`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use somna_hypervisor_agent::{AccelMode, AgentConfig, VmmKind};
use tracing_subscriber::EnvFilter;

#[derive(Args)]
pub struct AgentArgs {
    /// State directory (VM run directories, templates, image cache).
    #[arg(long, env = "SOMNA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory with the guest kernel (vmlinux) and initramfs.img.
    #[arg(long, env = "SOMNA_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Directory of local OCI image layouts (<dir>/<name>/); repeatable.
    #[arg(long = "image-dir", env = "SOMNA_IMAGE_DIRS", value_delimiter = ':')]
    image_dirs: Vec<PathBuf>,
    /// Accelerator: auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, env = "SOMNA_ACCEL", default_value = "auto")]
    accel: AccelMode,
    /// The QEMU binary.
    #[arg(long, env = "SOMNA_QEMU")]
    qemu: Option<PathBuf>,
    /// Run sandboxes with Cloud Hypervisor (KVM only, v52.0 or newer):
    /// the path of the operator-supplied `cloud-hypervisor` binary, or a
    /// name on PATH. QEMU is used when this is not given.
    #[arg(
        long = "cloud-hypervisor",
        env = "SOMNA_CLOUD_HYPERVISOR",
        value_name = "PATH"
    )]
    cloud_hypervisor: Option<PathBuf>,
    /// Seconds a guest may take to boot before create fails.
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Name of this host.
    #[arg(long)]
    pub host_id: Option<String>,
    /// Keep N restored, paused VMs of IMAGE ready (IMAGE=N); repeatable.
    #[arg(long = "warm-pool", value_name = "IMAGE=N")]
    warm_pools: Vec<somna_hypervisor_agent::WarmPoolSpec>,
    /// Do not build template snapshots (every create boots).
    #[arg(long)]
    no_templates: bool,
    /// How a template clone gets its RAM under QEMU: `copy` (its own sparse
    /// copy; clones cannot reach each other's memory) or `shared` (mapped
    /// from the template's file, denser, but QEMU 7.2 lets a clone whose
    /// guest escaped write it: single-tenant hosts only).
    #[arg(long, default_value = "copy")]
    template_memory: somna_hypervisor_agent::TemplateMemory,
    /// Run VMMs unjailed: as root, in the agent's namespaces, without
    /// cgroup limits (debugging only; see README "Jail").
    #[arg(long)]
    no_jail: bool,
    /// Cut off an exec's output (stdout and stderr together) after this
    /// many MiB, with a marker; requests may ask for less.
    #[arg(long, default_value_t = 64)]
    max_exec_output_mib: u64,
    /// Refuse file reads and writes larger than this many MiB.
    #[arg(long, default_value_t = 2048)]
    max_file_mib: u64,
    /// Each sandbox's disk throughput in MiB/s per direction, all its
    /// disks together (0: unlimited); the VMM enforces it.
    #[arg(long, default_value_t = 256)]
    disk_mib_per_sec: u64,
    /// Each sandbox's disk operations per second per direction (0:
    /// unlimited).
    #[arg(long, default_value_t = 10_000)]
    disk_iops: u64,
    /// Never contact a registry: only local layouts, oci: and
    /// docker-archive: images.
    #[arg(long)]
    no_registries: bool,
    /// Registry for names without one (default docker.io).
    #[arg(long)]
    default_registry: Option<String>,
    /// A registry (host[:port]) to reach over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Keep the image cache under this many MiB (least recently used
    /// images that no sandbox uses are removed).
    #[arg(long)]
    image_cache_mib: Option<u64>,
    /// Give sandboxes networking: isolated network slots with eBPF-enforced
    /// policy (needs root and an eBPF-capable kernel; start-up fails
    /// without them). Off by default: sandboxes have no network device.
    #[arg(long, env = "SOMNA_NETWORK")]
    network: bool,
    /// Network slots kept ready for instant creates (with --network).
    #[arg(long, default_value_t = 8, requires = "network")]
    network_pool: usize,
    /// Prefix of every network object the agent creates (namespaces,
    /// links, the nftables table); two agents on one host need different
    /// prefixes and host subnets (with --network).
    #[arg(long, requires = "network")]
    network_prefix: Option<String>,
    /// Host-side subnet of the network slots, one /30 per slot; must not
    /// overlap a network the host uses (with --network).
    #[arg(long, requires = "network")]
    network_subnet: Option<somna_netd::Ipv4Cidr>,
    /// Interface sandbox traffic leaves through (NAT); default: any.
    #[arg(long, requires = "network")]
    network_egress: Option<String>,
    /// Each sandbox's outbound bandwidth in Mbit/s (0: unlimited), so a
    /// guest flooding the network cannot starve its neighbours (with
    /// --network).
    #[arg(long, default_value_t = somna_netd::DEFAULT_EGRESS_RATE_MBIT, requires = "network")]
    network_egress_mbit: u32,
    /// Each sandbox's inbound bandwidth in Mbit/s (0: unlimited), so a
    /// flood aimed at one sandbox cannot starve its neighbours (with
    /// --network).
    #[arg(long, default_value_t = somna_netd::DEFAULT_INGRESS_RATE_MBIT, requires = "network")]
    network_ingress_mbit: u32,
}

impl AgentArgs {
    pub fn config(self) -> AgentConfig {
        let mut config = AgentConfig::with_defaults();
        if let Some(d) = self.data_dir {
            config.image_dirs = vec![d.join("oci")];
            config.data_dir = d;
        }
        if let Some(d) = self.guest_dir {
            config.guest_dir = d;
        }
        if !self.image_dirs.is_empty() {
            config.image_dirs = self.image_dirs;
        }
        if let Some(q) = self.qemu {
            config.qemu_binary = q;
        }
        if let Some(binary) = self.cloud_hypervisor {
            config.vmm = VmmKind::CloudHypervisor { binary };
        }
        if let Some(s) = self.boot_timeout {
            config.boot_timeout = Duration::from_secs(s);
        }
        if let Some(h) = self.host_id {
            config.host_id = h;
        }
        config.accel = self.accel;
        config.warm_pools = self.warm_pools;
        config.templates = !self.no_templates;
        config.template_memory = self.template_memory;
        config.jail.enabled = !self.no_jail;
        config.transfer.max_exec_output_bytes = self.max_exec_output_mib << 20;
        config.transfer.max_file_bytes = self.max_file_mib << 20;
        config.limits.disk_io = somna_hypervisor_agent::DiskIoLimit {
            bytes_per_sec: (self.disk_mib_per_sec > 0).then_some(self.disk_mib_per_sec << 20),
            ops_per_sec: (self.disk_iops > 0).then_some(self.disk_iops),
        };
        config.images.registry.enabled = !self.no_registries;
        if let Some(r) = self.default_registry {
            config.images.registry.default_registry = r;
        }
        config.images.registry.insecure_registries = self.insecure_registries;
        config.images.cache_budget_bytes = self.image_cache_mib.map(|m| m * 1024 * 1024);
        if self.network {
            let mut net = somna_netd::NetdConfig {
                pool_size: self.network_pool,
                egress_rate_mbit: self.network_egress_mbit,
                ingress_rate_mbit: self.network_ingress_mbit,
                ..Default::default()
            };
            if let Some(p) = self.network_prefix {
                net.name_prefix = p;
            }
            if let Some(s) = self.network_subnet {
                net.host_subnet = s;
            }
            if let Some(i) = self.network_egress {
                net.egress = somna_netd::Egress::Interface(i);
            }
            config.network = Some(net);
        }
        config
    }
}

/// Logs to stderr; `SOMNA_LOG` sets the filter (default info).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_env("SOMNA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
/// Ctrl-C or SIGTERM, seen by every listener that waits on it.
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    pub fn on_signal() -> Shutdown {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// Resolves once the signal came.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Writes a secret to `path`, readable by its owner only.
pub fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn cloud_hypervisor_flag_selects_the_driver() {
        let config = Cli::parse_from(["somna", "--cloud-hypervisor", "/opt/ch/cloud-hypervisor"])
            .agent
            .config();
        assert_eq!(
            config.vmm,
            VmmKind::CloudHypervisor {
                binary: "/opt/ch/cloud-hypervisor".into()
            }
        );
        if std::env::var_os("SOMNA_CLOUD_HYPERVISOR").is_none() {
            assert_eq!(Cli::parse_from(["somna"]).agent.config().vmm, VmmKind::Qemu);
        }
    }
}
