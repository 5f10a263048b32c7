//! `somna agent --join ADDR --token T`: a host agent that dials the control
//! plane (so it works behind NAT) and serves its sandboxes over that
//! connection, redialling when it drops.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use somna_controlplane::tls;
use somna_controlplane::tunnel::AgentTls;
use somna_hypervisor_agent::Agent;

use crate::agent_args::{AgentArgs, init_tracing, shutdown_signal};
use crate::local_host::LocalHost;

#[derive(Args)]
pub struct AgentCmdArgs {
    /// The control plane's agent address (`somna controlplane
    /// --agent-listen`); repeat it for every replica of a replicated
    /// control plane: the agent serves each of them.
    #[arg(long, required = true)]
    join: Vec<String>,
    /// The join token the control plane printed.
    #[arg(long, env = "SOMNA_JOIN_TOKEN")]
    token: String,
    /// Dial the control plane over mutual TLS: the CA to verify it with
    /// (PEM)...
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// ...this agent's certificate (PEM)...
    #[arg(long, requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// ...and its private key (PEM).
    #[arg(long, requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// The name in the control plane's certificate (default: the host part
    /// of each --join address).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    #[command(flatten)]
    agent: AgentArgs,
}

pub async fn run(args: AgentCmdArgs, json: bool) -> anyhow::Result<()> {
    init_tracing();
    let connector = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(
            tls::connector(&tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })
            .context("setting up TLS to the control plane")?,
        ),
        _ => None,
    };
    // Check every address's TLS name before starting VMs.
    let mut tunnels_tls = Vec::new();
    for addr in &args.join {
        tunnels_tls.push(match &connector {
            Some(c) => Some(AgentTls {
                connector: c.clone(),
                server_name: tls::server_name(addr, args.tls_server_name.as_deref())?,
            }),
            None => None,
        });
    }
    let agent = Agent::start(args.agent.config())
        .await
        .context("starting the host agent")?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "host": agent.host_id(),
                "join": args.join,
                "accelerator": agent.accelerator().accelerator.as_str(),
            })
        );
    } else {
        println!(
            "Somna agent {} joining {}",
            agent.host_id(),
            args.join.join(", ")
        );
    }
    let host: Arc<dyn somna_controlplane::Host> = Arc::new(LocalHost::new(agent.clone()));
    // One tunnel per replica, all stopped by the one signal.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tunnels: Vec<_> = args
        .join
        .iter()
        .zip(tunnels_tls)
        .map(|(addr, tls)| {
            let mut rx = rx.clone();
            tokio::spawn(somna_controlplane::tunnel::run_agent(
                addr.clone(),
                agent.host_id().to_string(),
                args.token.clone(),
                host.clone(),
                tls,
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                },
            ))
        })
        .collect();
    shutdown_signal().await;
    let _ = tx.send(true);
    for t in tunnels {
        let _ = t.await;
    }
    tracing::info!("shutting down: destroying sandboxes");
    agent.destroy_all().await;
    Ok(())
}
