//! `somna`: the command-line front door of Somna. `somna up` runs a
//! single-node platform (control plane + host agent); the other commands are
//! clients of the API at `$SOMNA_ADDR`.

mod agent_args;
mod agent_cmd;
mod app;
mod completions;
mod controlplane_cmd;
mod cp;
mod doctor;
mod exec;
mod host;
mod image;
mod key;
mod local_host;
mod mcp;
mod output;
mod sandbox;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "somna",
    version,
    about = "Somna: microVM sandboxes that start instantly"
)]
struct Cli {
    /// Address of the Somna API.
    #[arg(long, global = true, env = "SOMNA_ADDR", default_value = somna_sdk::DEFAULT_ADDR)]
    addr: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// API key (default: $SOMNA_API_KEY, else /var/lib/somna/api-key).
    #[arg(long, global = true, env = "SOMNA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a single-node platform: control plane and a host agent.
    Up(up::UpArgs),
    /// Run the control plane alone (hosts join with `somna agent`).
    Controlplane(controlplane_cmd::ControlPlaneArgs),
    /// Run a host agent that joins a control plane.
    Agent(agent_cmd::AgentCmdArgs),
    /// Create and revoke API keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Create, use, sleep, wake and destroy sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Deploy and manage apps: web servers that sleep when idle and wake
    /// on the first request.
    #[command(subcommand)]
    App(app::AppCommand),
    /// Hosts, their templates and warm pools.
    #[command(subcommand)]
    Host(host::HostCommand),
    /// Pull, list and remove images in the host's cache.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Serve sandboxes as MCP tools for models (stdio, or HTTP with --http).
    Mcp(mcp::McpArgs),
    /// Check that this host can run Somna, and say how to fix what cannot.
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client commands authenticate with the key from the flag, the
    // environment, or (for the local `somna up`) its key file.
    let key = cli.api_key.clone().or_else(|| {
        std::fs::read_to_string("/var/lib/somna/api-key")
            .ok()
            .map(|k| k.trim().to_string())
    });
    if let Some(k) = key {
        // SAFETY: no other thread exists yet (the runtime starts below).
        unsafe { std::env::set_var(somna_sdk::API_KEY_ENV, k) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("somna: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args, cli.json).await.map(|()| 0),
            Command::Controlplane(args) => controlplane_cmd::run(args, cli.json).await.map(|()| 0),
            Command::Agent(args) => agent_cmd::run(args, cli.json).await.map(|()| 0),
            Command::Key(cmd) => key::run(cmd, cli.json).await,
            Command::Sandbox(cmd) => sandbox::run(cmd, &cli.addr, cli.json).await,
            Command::App(cmd) => app::run(cmd, &cli.addr, cli.json).await,
            Command::Host(cmd) => host::run(cmd, &cli.addr, cli.json).await,
            Command::Image(cmd) => image::run(cmd, &cli.addr, cli.json).await,
            Command::Mcp(args) => mcp::run(args, &cli.addr, cli.json).await,
            Command::Doctor(args) => doctor::run(args, &cli.addr, cli.json).await,
            Command::Completions(args) => completions::run::<Cli>(args),
        }
    });
    // Do not wait for blocking readers (e.g. a stdin pump) to finish.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("somna: {e:#}");
            ExitCode::from(1)
        }
    }
}
