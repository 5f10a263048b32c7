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
    /// List sandboxes.
    #[command(alias = "list")]
    Ls,
    /// Show one sandbox.
    #[command(alias = "inspect")]
    Get { id: String },
    /// Put sandboxes into light sleep: memory and processes go to disk, the
    /// host's RAM is released.
    Sleep {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Wake sleeping sandboxes (exec and cp wake them by themselves).
    Wake {
        #[arg(required = true)]
        ids: Vec<String>,
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
    /// No internet access (hosts running with --network).
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
        SandboxCommand::Exec(args) => crate::exec::run(&client, args).await,
        SandboxCommand::Ls => ls(&client, json).await.map(|()| 0),
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
    if let Some(t) = args.idle_timeout {
        if t == 0 {
            bail!("--idle-timeout must be at least 1 second");
        }
        opts = opts.idle_timeout(Duration::from_secs(t));
    }
    opts = opts.start_mode(args.start).no_internet(args.no_internet);
    for c in args.allow_out {
        opts = opts.allow_out(c);
    }
    for c in args.deny_out {
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

async fn ls(client: &Client, json: bool) -> anyhow::Result<()> {
    let list = client.list_sandboxes().await?;
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
                s.accelerator.clone(),
            ]
        })
        .collect();
    table(
        &["ID", "IMAGE", "STATE", "CPUS", "MEMORY", "AGE", "ACCEL"],
        &rows,
    );
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
