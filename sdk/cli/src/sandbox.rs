//! `somna sandbox ...`: create, exec, ls, get, rm, cp.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use somna_sdk::{Client, CreateOptions};

use crate::output::{age, sandbox_json, state_name, table};

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from an image and print its id.
    Create(CreateArgs),
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(crate::exec::ExecArgs),
    /// List sandboxes (across all hosts).
    #[command(alias = "list")]
    Ls {
        /// Only sandboxes with this label (K=V); repeatable (all must match).
        #[arg(long = "label", short = 'l', value_parser = parse_env)]
        labels: Vec<(String, String)>,
    },
    /// Show one sandbox.
    #[command(alias = "inspect")]
    Get { id: String },
    /// Put sandboxes into light sleep: memory and processes go to disk, the
    /// host's RAM is released.
    Sleep {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Wake sleeping sandboxes (exec and cp wake them by themselves), or boot
    /// one whose VMM died again on its kept disk.
    Wake {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Destroy the sandbox SECONDS from now (0: never destroy it by time).
    SetTimeout { id: String, seconds: u64 },
    /// Replace a running or sleeping sandbox's network policy (hosts
    /// running with --network); takes effect at once.
    SetNetwork {
        id: String,
        #[command(flatten)]
        policy: NetworkArgs,
    },
    /// Destroy sandboxes.
    #[command(alias = "destroy")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Copy files between this machine and a sandbox: `cp LOCAL ID:PATH` or
    /// `cp ID:PATH LOCAL` (`-` is stdin/stdout; directories are copied
    /// recursively).
    Cp(crate::cp::CpArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// Image reference, e.g. busybox or python.
    #[arg(long)]
    image: String,
    /// Virtual CPUs (default 1).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    cpus: u32,
    /// Memory in MiB (default 512).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    memory: u32,
    /// Writable disk in MiB (default 1024).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    disk: u32,
    /// Environment variable for every process (K=V); repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Label (K=V) to find the sandbox by (`sandbox ls --label`); repeatable.
    #[arg(long = "label", short = 'l', value_parser = parse_env)]
    labels: Vec<(String, String)>,
    /// Destroy the sandbox after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Put the sandbox to sleep after this many seconds without exec or
    /// file activity.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// How to start the VM: auto (warm pool, else template, else boot),
    /// cold-boot, template or warm-pool.
    #[arg(long, default_value = "auto", value_parser = parse_start_mode)]
    start: somna_sdk::proto::StartMode,
    /// A client-chosen id for this create: retrying with the same id
    /// returns the sandbox the first attempt made instead of a second one.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    network: NetworkArgs,
}

/// A sandbox's network policy (hosts running with --network).
#[derive(Args)]
pub struct NetworkArgs {
    /// No internet access.
    #[arg(long)]
    no_internet: bool,
    /// Allow this IPv4 CIDR even without internet or in a private range;
    /// repeatable.
    #[arg(long = "allow-out", value_name = "CIDR")]
    allow_out: Vec<String>,
    /// Deny this IPv4 CIDR; repeatable.
    #[arg(long = "deny-out", value_name = "CIDR")]
    deny_out: Vec<String>,
}

impl NetworkArgs {
    fn policy(self) -> somna_sdk::proto::NetworkPolicy {
        somna_sdk::proto::NetworkPolicy {
            no_internet: self.no_internet,
            allow_out: self.allow_out,
            deny_out: self.deny_out,
        }
    }
}

fn parse_start_mode(s: &str) -> Result<somna_sdk::proto::StartMode, String> {
    use somna_sdk::proto::StartMode as M;
    match s {
        "auto" => Ok(M::Auto),
        "cold-boot" | "boot" => Ok(M::ColdBoot),
        "template" => Ok(M::Template),
        "warm-pool" | "pool" => Ok(M::WarmPool),
        other => Err(format!(
            "{other:?}: use auto, cold-boot, template or warm-pool"
        )),
    }
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

pub async fn run(cmd: SandboxCommand, addr: &str, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect(addr).await?;
    match cmd {
        SandboxCommand::Create(args) => create(&client, args, json).await.map(|()| 0),
        SandboxCommand::Exec(args) => crate::exec::run(&client, args, json).await,
        SandboxCommand::Ls { labels } => ls(&client, labels, json).await.map(|()| 0),
        SandboxCommand::SetTimeout { id, seconds } => {
            set_timeout(&client, &id, seconds, json).await.map(|()| 0)
        }
        SandboxCommand::SetNetwork { id, policy } => {
            let sb = client.update_sandbox_network(&id, policy.policy()).await?;
            if json {
                println!("{}", sandbox_json(&sb));
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&sandbox_json(&sb)["network_policy"])?
                );
            }
            Ok(0)
        }
        SandboxCommand::Get { id } => get(&client, &id, json).await.map(|()| 0),
        SandboxCommand::Rm { ids } => rm(&client, &ids, json).await,
        SandboxCommand::Sleep { ids } => sleep_wake(&client, &ids, json, true).await,
        SandboxCommand::Wake { ids } => sleep_wake(&client, &ids, json, false).await,
        SandboxCommand::Cp(args) => crate::cp::run(&client, args, json).await.map(|()| 0),
    }
}

async fn create(client: &Client, args: CreateArgs, json: bool) -> anyhow::Result<()> {
    let mut opts = CreateOptions::new(&args.image)
        .cpus(args.cpus)
        .memory_mib(args.memory)
        .disk_mib(args.disk);
    for (k, v) in args.env {
        opts = opts.env(k, v);
    }
    for (k, v) in args.labels {
        opts = opts.label(k, v);
    }
    if let Some(r) = args.request_id {
        opts = opts.request_id(r);
    }
    if let Some(t) = args.idle_timeout {
        if t == 0 {
            bail!("--idle-timeout must be at least 1 second");
        }
        opts = opts.idle_timeout(Duration::from_secs(t));
    }
    opts = opts
        .start_mode(args.start)
        .no_internet(args.network.no_internet);
    for c in args.network.allow_out {
        opts = opts.allow_out(c);
    }
    for c in args.network.deny_out {
        opts = opts.deny_out(c);
    }
    if let Some(t) = args.timeout {
        if t == 0 {
            bail!("--timeout must be at least 1 second");
        }
        opts = opts.timeout(Duration::from_secs(t));
    }
    // A spinner on stderr while the VM boots (hidden when not a terminal).
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(format!("creating a sandbox from {}", args.image));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let result = client.create_sandbox(opts).await;
    spinner.finish_and_clear();
    let sandbox = result.with_context(|| format!("cannot create a sandbox from {}", args.image))?;
    if json {
        println!("{}", sandbox_json(sandbox.info()));
    } else {
        println!("{}", sandbox.id());
    }
    Ok(())
}

async fn ls(client: &Client, labels: Vec<(String, String)>, json: bool) -> anyhow::Result<()> {
    let list = client
        .list_sandboxes_with_labels(&labels.into_iter().collect())
        .await?;
    if json {
        println!(
            "{}",
            serde_json::Value::Array(list.iter().map(sandbox_json).collect())
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.image.clone(),
                state_name(s.state).to_string(),
                s.cpus.to_string(),
                format!("{}M", s.memory_mib),
                age(&s.created_at),
                s.host.clone(),
                s.accelerator.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "IMAGE", "STATE", "CPUS", "MEMORY", "AGE", "HOST", "ACCEL",
        ],
        &rows,
    );
    Ok(())
}

async fn set_timeout(client: &Client, id: &str, seconds: u64, json: bool) -> anyhow::Result<()> {
    let timeout = (seconds > 0).then(|| Duration::from_secs(seconds));
    let sb = client.set_sandbox_timeout(id, timeout).await?;
    if json {
        println!("{}", sandbox_json(&sb));
    } else {
        let expires = sandbox_json(&sb)["expires_at"].clone();
        match expires.as_str() {
            Some(at) => println!("{} expires at {at}", sb.id),
            None => println!("{} has no timeout", sb.id),
        }
    }
    Ok(())
}

async fn get(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let sandbox = client.sandbox(id).await?;
    let v = sandbox_json(sandbox.info());
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

async fn rm(client: &Client, ids: &[String], json: bool) -> anyhow::Result<i32> {
    let mut failed = 0;
    for id in ids {
        match client.destroy_sandbox(id).await {
            Ok(()) if json => println!("{}", serde_json::json!({ "id": id, "destroyed": true })),
            Ok(()) => println!("{id}"),
            Err(e) => {
                failed += 1;
                eprintln!("somna: cannot destroy {id}: {e}");
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

async fn sleep_wake(
    client: &Client,
    ids: &[String],
    json: bool,
    sleep: bool,
) -> anyhow::Result<i32> {
    let verb = if sleep { "sleep" } else { "wake" };
    let mut failed = 0;
    for id in ids {
        let started = std::time::Instant::now();
        let result = if sleep {
            client.sleep_sandbox(id).await
        } else {
            client.wake_sandbox(id).await
        };
        match result {
            Ok(sb) if json => {
                let mut v = sandbox_json(&sb);
                v["elapsed_ms"] = serde_json::json!(started.elapsed().as_secs_f64() * 1000.0);
                println!("{v}");
            }
            Ok(sb) => println!(
                "{} {} ({} ms)",
                sb.id,
                state_name(sb.state),
                started.elapsed().as_millis()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("somna: cannot {verb} {id}: {e}");
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
