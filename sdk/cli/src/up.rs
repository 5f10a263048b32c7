//! `somna up`: the control plane (SQLite store) and one host agent in one
//! process. The first start creates the `default` tenant and an API key,
//! prints it, and keeps it in `<data-dir>/api-key` (mode 0600), where the
//! CLI on this machine finds it.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use somna_controlplane::ControlPlane;
use somna_controlplane::store::Store;
use somna_hypervisor_agent::Agent;

use crate::agent_args::{AgentArgs, Shutdown, init_tracing, write_secret};
use crate::local_host::LocalHost;

#[derive(Args)]
pub struct UpArgs {
    /// Address for the public API (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7477")]
    listen: String,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    scheduling: crate::controlplane_cmd::SchedulingArgs,
    #[command(flatten)]
    ingress: crate::controlplane_cmd::IngressArgs,
}

pub async fn run(args: UpArgs, json: bool) -> anyhow::Result<()> {
    init_tracing();
    let config = args.agent.config();
    let data_dir = config.data_dir.clone();
    let agent = Agent::start(config)
        .await
        .context("starting the host agent")?;

    std::fs::create_dir_all(&data_dir).context("creating the data directory")?;
    let store_url = format!("sqlite://{}", data_dir.join("state.db").display());
    let store = Store::open(&store_url)
        .await
        .context("opening the state store")?;
    let api_key = local_api_key(&store, &data_dir.join("api-key")).await?;

    let control_plane = ControlPlane::new(store, args.scheduling.config());
    let host: Arc<dyn somna_controlplane::Host> = Arc::new(LocalHost::new(agent.clone()));
    control_plane.attach_host(host).await;

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let (ingress, ingress_config, ingress_url) = args.ingress.bind().await?;
    let accel = agent.accelerator();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "addr": format!("http://{addr}"),
                "host": agent.host_id(),
                "accelerator": accel.accelerator.as_str(),
                "accelerator_reason": accel.reason,
                "api_key": api_key,
                "ingress": ingress_url,
            })
        );
    } else {
        println!(
            "Somna is up at http://{addr} (host {}, accelerator {}: {})",
            agent.host_id(),
            accel.accelerator,
            accel.reason
        );
        println!(
            "  API key: {api_key}  (also in {})",
            data_dir.join("api-key").display()
        );
        println!("  apps: {ingress_url} (NAME.{})", ingress_config.domain);
        println!("  try: somna sandbox create --image busybox");
    }
    // One signal stops the API and the ingress.
    let stop = Shutdown::on_signal();
    let ingress_task = tokio::spawn(somna_controlplane::serve_ingress(
        control_plane.clone(),
        ingress,
        ingress_config,
        stop.wait(),
    ));

    somna_controlplane::serve(control_plane.clone(), listener, stop.wait())
        .await
        .context("serving the API")?;
    let _ = ingress_task.await;
    tracing::info!("shutting down: destroying sandboxes");
    control_plane.destroy_all_on(agent.host_id()).await;
    agent.destroy_all().await;
    Ok(())
}

/// The local user's key: the one in `path` if it still works, else a new
/// one for the `default` tenant (written to `path`).
async fn local_api_key(store: &Store, path: &std::path::Path) -> anyhow::Result<String> {
    let tenant = store
        .ensure_tenant("default", None)
        .await
        .context("creating the default tenant")?;
    if let Ok(existing) = std::fs::read_to_string(path) {
        let key = existing.trim().to_string();
        let auth = somna_controlplane::auth::Authenticator::new(store.clone());
        if auth.verify(&key).await.is_ok() {
            return Ok(key);
        }
    }
    let key = somna_controlplane::auth::create_key(store, &tenant.id)
        .await
        .context("creating an API key")?;
    write_secret(path, &key.key).with_context(|| format!("writing {}", path.display()))?;
    Ok(key.key)
}
