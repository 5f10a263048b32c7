//! `somna up`: the control plane and one host agent in one process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use somna_controlplane::ControlPlane;
use somna_hypervisor_agent::{AccelMode, Agent, AgentConfig};
use tracing_subscriber::EnvFilter;

use crate::local_host::LocalHost;

#[derive(Args)]
pub struct UpArgs {
    /// Address for the public API (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7477")]
    listen: String,
    /// State directory (VM run directories, image cache).
    #[arg(long, env = "SOMNA_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
    /// Seconds a guest may take to boot before create fails.
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Name of this host.
    #[arg(long)]
    host_id: Option<String>,
    /// Keep N restored, paused VMs of IMAGE ready (IMAGE=N); repeatable.
    #[arg(long = "warm-pool", value_name = "IMAGE=N")]
    warm_pools: Vec<somna_hypervisor_agent::WarmPoolSpec>,
    /// Do not build template snapshots (every create boots).
    #[arg(long)]
    no_templates: bool,
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
}

pub async fn run(args: UpArgs, json: bool) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("SOMNA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let mut config = AgentConfig::with_defaults();
    if let Some(d) = args.data_dir {
        config.image_dirs = vec![d.join("oci")];
        config.data_dir = d;
    }
    if let Some(d) = args.guest_dir {
        config.guest_dir = d;
    }
    if !args.image_dirs.is_empty() {
        config.image_dirs = args.image_dirs;
    }
    if let Some(q) = args.qemu {
        config.qemu_binary = q;
    }
    if let Some(s) = args.boot_timeout {
        config.boot_timeout = Duration::from_secs(s);
    }
    if let Some(h) = args.host_id {
        config.host_id = h;
    }
    config.accel = args.accel;
    config.warm_pools = args.warm_pools;
    config.templates = !args.no_templates;
    config.images.registry.enabled = !args.no_registries;
    if let Some(r) = args.default_registry {
        config.images.registry.default_registry = r;
    }
    config.images.registry.insecure_registries = args.insecure_registries;
    config.images.cache_budget_bytes = args.image_cache_mib.map(|m| m * 1024 * 1024);

    let agent = Agent::start(config)
        .await
        .context("starting the host agent")?;
    let control_plane = ControlPlane::new(vec![Arc::new(LocalHost::new(agent.clone()))]);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let accel = agent.accelerator();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "addr": format!("http://{addr}"),
                "host": agent.host_id(),
                "accelerator": accel.accelerator.as_str(),
                "accelerator_reason": accel.reason,
            })
        );
    } else {
        println!(
            "Somna is up at http://{addr} (host {}, accelerator {}: {})",
            agent.host_id(),
            accel.accelerator,
            accel.reason
        );
        println!("  try: somna sandbox create --image busybox");
    }

    somna_controlplane::serve(control_plane, listener, shutdown_signal())
        .await
        .context("serving the API")?;
    tracing::info!("shutting down: destroying sandboxes");
    agent.destroy_all().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
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
