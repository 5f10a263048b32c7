//! `somna controlplane`: the control plane alone, for hosts that join over
//! the network (`somna agent --join`). Several replicas may share one
//! PostgreSQL store.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use somna_controlplane::scheduler::{Overcommit, Policy};
use somna_controlplane::store::Store;
use somna_controlplane::{ControlPlane, ControlPlaneConfig};

use crate::agent_args::{Shutdown, init_tracing, write_secret};

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// Address for the public API.
    #[arg(long, default_value = "127.0.0.1:7477")]
    listen: String,
    /// Address host agents dial (`somna agent --join`).
    #[arg(long, default_value = "127.0.0.1:7478")]
    agent_listen: String,
    /// State store: sqlite:///path/state.db or postgres://user:pass@host/db
    /// (default: SQLite in the data directory).
    #[arg(long, env = "SOMNA_STORE")]
    store: Option<String>,
    /// Directory for the SQLite store and the first API key.
    #[arg(long, default_value = "/var/lib/somna-controlplane")]
    data_dir: PathBuf,
    /// A join token agents must present (added to the store); without it
    /// a token is generated on first start and printed.
    #[arg(long, env = "SOMNA_JOIN_TOKEN")]
    join_token: Option<String>,
    #[command(flatten)]
    scheduling: SchedulingArgs,
    #[command(flatten)]
    ingress: IngressArgs,
    /// Serve agents over mutual TLS: this certificate (PEM)...
    #[arg(long, requires_all = ["agent_tls_key", "agent_tls_client_ca"])]
    agent_tls_cert: Option<PathBuf>,
    /// ...its private key (PEM)...
    #[arg(long, requires = "agent_tls_cert")]
    agent_tls_key: Option<PathBuf>,
    /// ...and the CA that agents' client certificates must chain to.
    #[arg(long, requires = "agent_tls_cert")]
    agent_tls_client_ca: Option<PathBuf>,
}

/// The apps ingress, shared by `somna controlplane` and `somna up`.
#[derive(Args)]
pub struct IngressArgs {
    /// Address of the HTTP ingress that serves apps (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:7480")]
    ingress_listen: String,
    /// Apps are served at NAME.<domain> (point a wildcard DNS record at
    /// the ingress; *.localhost resolves to this machine).
    #[arg(long, default_value = "localhost")]
    app_domain: String,
    /// Serve the ingress over HTTPS with this certificate chain (PEM)...
    #[arg(long, requires = "ingress_tls_key")]
    ingress_tls_cert: Option<PathBuf>,
    /// ...and its private key (PEM).
    #[arg(long, requires = "ingress_tls_cert")]
    ingress_tls_key: Option<PathBuf>,
}

impl IngressArgs {
    /// Binds the ingress listener and loads its certificate.
    pub async fn bind(
        &self,
    ) -> anyhow::Result<(
        tokio::net::TcpListener,
        somna_controlplane::IngressConfig,
        String,
    )> {
        let listener = tokio::net::TcpListener::bind(&self.ingress_listen)
            .await
            .with_context(|| format!("cannot listen on {} (ingress)", self.ingress_listen))?;
        let tls = match (&self.ingress_tls_cert, &self.ingress_tls_key) {
            (Some(cert), Some(key)) => Some(
                somna_controlplane::tls::server_config(cert, key)
                    .context("loading the ingress certificate")?,
            ),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr()?);
        Ok((
            listener,
            somna_controlplane::IngressConfig {
                domain: self.app_domain.clone(),
                tls,
            },
            url,
        ))
    }
}

/// Placement and host-health flags, shared by `somna controlplane` and
/// `somna up`.
#[derive(Args)]
pub struct SchedulingArgs {
    /// Placement policy: spread or pack.
    #[arg(long, default_value = "spread")]
    policy: Policy,
    /// vCPUs that may be allocated per host CPU.
    #[arg(long, default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Guest memory that may be allocated per MiB of host memory.
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Seconds without an answer after which a host is lost.
    #[arg(long, default_value_t = 8)]
    lost_after: u64,
}

impl SchedulingArgs {
    pub fn config(&self) -> ControlPlaneConfig {
        ControlPlaneConfig {
            policy: self.policy,
            overcommit: Overcommit {
                cpu: self.cpu_overcommit,
                memory: self.memory_overcommit,
            },
            lost_after: std::time::Duration::from_secs(self.lost_after),
            // Crash-consistency tests name the control plane's points in
            // the same variable as the agent's.
            fault: std::env::var_os("SOMNA_FAULT")
                .is_some()
                .then_some(somna_hypervisor_agent::fault::point as fn(&'static str)),
            ..Default::default()
        }
    }
}

pub async fn run(args: ControlPlaneArgs, json: bool) -> anyhow::Result<()> {
    init_tracing();
    std::fs::create_dir_all(&args.data_dir).context("creating the data directory")?;
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("state.db").display()));
    let store = Store::open(&url).await.context("opening the state store")?;

    let new_token = match &args.join_token {
        Some(t) => {
            store
                .add_join_token(&somna_controlplane::auth::hash(t))
                .await?;
            None
        }
        None if store.join_token_count().await? == 0 => {
            let t = somna_controlplane::store::random_token(32);
            store
                .add_join_token(&somna_controlplane::auth::hash(&t))
                .await?;
            write_secret(&args.data_dir.join("join-token"), &t)?;
            Some(t)
        }
        None => None,
    };
    // The first start makes the `default` tenant and a key for it.
    let key_file = args.data_dir.join("api-key");
    let new_key = if key_file.exists() {
        None
    } else {
        let tenant = store.ensure_tenant("default", None).await?;
        let key = somna_controlplane::auth::create_key(&store, &tenant.id).await?;
        write_secret(&key_file, &key.key)?;
        Some(key.key)
    };

    let cp = ControlPlane::new(store, args.scheduling.config());
    let api = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let agents = tokio::net::TcpListener::bind(&args.agent_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.agent_listen))?;
    let (api_addr, agent_addr) = (api.local_addr()?, agents.local_addr()?);
    let (ingress, ingress_config, ingress_url) = args.ingress.bind().await?;
    let tls = match (
        args.agent_tls_cert,
        args.agent_tls_key,
        args.agent_tls_client_ca,
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(
            somna_controlplane::tls::acceptor(&somna_controlplane::tls::TlsFiles { cert, key, ca })
                .context("setting up TLS for agents")?,
        ),
        _ => None,
    };
    let tls_on = tls.is_some();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "addr": format!("http://{api_addr}"),
                "agent_addr": agent_addr.to_string(),
                "agent_tls": tls_on,
                "ingress": ingress_url,
                "api_key": new_key,
                "join_token": new_token,
            })
        );
    } else {
        println!(
            "Somna control plane at http://{api_addr}; agents join at {agent_addr}; apps at {ingress_url}"
        );
        if let Some(k) = &new_key {
            println!(
                "  API key (default tenant): {k}  (also in {})",
                key_file.display()
            );
        }
        if let Some(t) = &new_token {
            println!("  join token: {t}  (somna agent --join {agent_addr} --token {t})");
        }
    }
    // One signal stops every listener.
    let stop = Shutdown::on_signal();
    let agents_task = tokio::spawn(somna_controlplane::tunnel::serve_agents(
        cp.clone(),
        agents,
        tls,
        stop.wait(),
    ));
    let ingress_task = tokio::spawn(somna_controlplane::serve_ingress(
        cp.clone(),
        ingress,
        ingress_config,
        stop.wait(),
    ));
    somna_controlplane::serve(cp, api, stop.wait())
        .await
        .context("serving the API")?;
    let _ = agents_task.await;
    let _ = ingress_task.await;
    Ok(())
}
