//! `somna mcp`: the MCP server (sandboxes as tools for models) over stdio,
//! or over streamable HTTP with `--http ADDR`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use somna_mcp::{McpConfig, McpServer};
use tracing_subscriber::EnvFilter;

#[derive(Args)]
pub struct McpArgs {
    /// Serve streamable HTTP on this address (endpoint `/mcp`; port 0
    /// picks a free port) instead of stdio.
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<String>,
    /// Image for sandboxes created without one (and by run_code).
    #[arg(long, default_value = "python")]
    image: String,
    /// Destroy a sandbox after this many seconds without a tool call that
    /// uses it (HTTP sessions expire after it too).
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
    idle_timeout: u64,
    /// Server-side lifetime of the sandboxes it creates (a safety net if
    /// this process dies without cleaning up).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    sandbox_timeout: u64,
    /// Default time limit of run_code and exec_command.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    exec_timeout: u64,
    /// The most KiB of stdout (and of stderr) one tool result carries
    /// (longer output keeps its beginning and end).
    #[arg(long, default_value_t = 16, value_name = "KIB")]
    max_output_kib: usize,
}

pub async fn run(args: McpArgs, addr: &str, json: bool) -> anyhow::Result<i32> {
    // stdout is the protocol on stdio: logs go to stderr only.
    let filter = EnvFilter::try_from_env("SOMNA_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    for (name, v) in [
        ("--idle-timeout", args.idle_timeout),
        ("--sandbox-timeout", args.sandbox_timeout),
        ("--exec-timeout", args.exec_timeout),
        ("--max-output-kib", args.max_output_kib as u64),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    let config = McpConfig {
        addr: addr.to_string(),
        api_key: None,
        default_image: args.image,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        sandbox_timeout: Duration::from_secs(args.sandbox_timeout),
        exec_timeout: Duration::from_secs(args.exec_timeout),
        max_output_bytes: args.max_output_kib * 1024,
        ..McpConfig::default()
    };
    let server = McpServer::new(config);
    match args.http {
        None => server.serve_stdio().await.context("MCP over stdio")?,
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let local = listener
                .local_addr()
                .context("reading the listen address")?;
            let url = format!("http://{local}/mcp");
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "addr": url, "transport": "streamable-http" })
                );
            } else {
                println!("Somna MCP server at {url} (streamable HTTP; Ctrl-C to stop)");
            }
            server
                .serve_http(listener, shutdown_signal())
                .await
                .context("serving MCP over HTTP")?;
        }
    }
    Ok(0)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
