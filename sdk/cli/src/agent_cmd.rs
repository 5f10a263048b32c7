//! `somna agent --join ADDR --token T`: a host agent that dials the control
//! plane (so it works behind NAT) and serves its sandboxes over that
//! connection, redialling when it drops.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use somna_hypervisor_agent::Agent;

use crate::agent_args::{AgentArgs, init_tracing, shutdown_signal};
use crate::local_host::LocalHost;

#[derive(Args)]
pub struct AgentCmdArgs {
    /// The control plane's agent address (`somna controlplane --agent-listen`).
    #[arg(long)]
    join: String,
    /// The join token the control plane printed.
    #[arg(long, env = "SOMNA_JOIN_TOKEN")]
    token: String,
    #[command(flatten)]
    agent: AgentArgs,
}

pub async fn run(args: AgentCmdArgs, json: bool) -> anyhow::Result<()> {
    init_tracing();
    let agent = Agent::start(args.agent.config()).await.context("starting the host agent")?;
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
        println!("Somna agent {} joining {}", agent.host_id(), args.join);
    }
    let host: Arc<dyn somna_controlplane::Host> = Arc::new(LocalHost::new(agent.clone()));
    somna_controlplane::tunnel::run_agent(args.join, agent.host_id().to_string(), args.token, host, shutdown_signal())
        .await;
    tracing::info!("shutting down: destroying sandboxes");
    agent.destroy_all().await;
    Ok(())
}
