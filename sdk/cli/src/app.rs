//! `somna app ...`: deploy, ls, get, logs, rm.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use somna_sdk::{AppOptions, Client, proto};

use crate::output::{age, state_name, table};
use crate::sandbox::parse_env;

#[derive(Subcommand)]
pub enum AppCommand {
    /// Deploy an app (or roll it over to a new image or settings): replicas
    /// behind the ingress at NAME.<domain>, asleep when idle, woken by the
    /// first request.
    Deploy(DeployArgs),
    /// List apps: state, replicas awake/asleep, URL.
    #[command(alias = "list")]
    Ls,
    /// Show one app and its replicas.
    Get { name: String },
    /// Print the app's output (stdout and stderr of its replicas).
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start with the last N lines of each replica.
        #[arg(long)]
        tail: Option<u32>,
    },
    /// Destroy an app and its replicas.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    /// App name: a DNS label, served at NAME.<domain>.
    name: String,
    /// Image reference, e.g. python.
    #[arg(long)]
    image: String,
    /// The TCP port the app listens on.
    #[arg(long)]
    port: u16,
    /// Environment variable (K=V); repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Replicas kept at all times (0: scale to one sleeping replica).
    #[arg(long, default_value_t = 0)]
    min_replicas: u32,
    /// Most replicas the autoscaler adds (default: max(1, min)).
    #[arg(long)]
    max_replicas: Option<u32>,
    /// Sleep a replica after this long without requests (30s, 5m, 1h).
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// HTTP path to health-check (default: a TCP connect).
    #[arg(long)]
    health_path: Option<String>,
    /// In-flight requests per replica above which one is added.
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    target_in_flight: u32,
    /// Virtual CPUs, memory and writable disk (MiB) of each replica.
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    cpus: u32,
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    memory: u32,
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    disk: u32,
    /// How long a new replica may take to listen (default 2m).
    #[arg(long, value_parser = parse_duration)]
    ready_timeout: Option<Duration>,
    /// The command to run (after `--`); default: the image's Entrypoint + Cmd.
    #[arg(last = true)]
    command: Vec<String>,
}

/// "30", "30s", "1500ms", "5m", "1h".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 1h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

pub async fn run(cmd: AppCommand, addr: &str, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect(addr).await?;
    match cmd {
        AppCommand::Deploy(args) => deploy(&client, args, json).await,
        AppCommand::Ls => ls(&client, json).await,
        AppCommand::Get { name } => {
            let app = client.app(&name).await?;
            if json {
                println!("{}", app_json(&app));
            } else {
                println!("{}", serde_json::to_string_pretty(&app_json(&app))?);
            }
            Ok(0)
        }
        AppCommand::Logs { name, follow, tail } => {
            logs(&client, &name, follow, tail.unwrap_or(0), json).await
        }
        AppCommand::Rm { names } => {
            let mut failed = 0;
            for name in &names {
                match client.delete_app(name).await {
                    Ok(()) if json => println!("{}", json!({"name": name, "deleted": true})),
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        failed += 1;
                        eprintln!("somna: cannot delete app {name}: {e}");
                    }
                }
            }
            Ok(i32::from(failed > 0))
        }
    }
}

async fn deploy(client: &Client, args: DeployArgs, json: bool) -> anyhow::Result<i32> {
    let mut opts = AppOptions::new(&args.image, args.port)
        .command(args.command)
        .replicas(args.min_replicas, args.max_replicas.unwrap_or(0));
    for (k, v) in args.env {
        opts = opts.env(k, v);
    }
    if let Some(d) = args.idle_timeout {
        opts = opts.idle_timeout(d);
    }
    if let Some(p) = args.health_path {
        opts = opts.health_path(p);
    }
    if let Some(d) = args.ready_timeout {
        opts = opts.ready_timeout(d);
    }
    opts.target_in_flight = args.target_in_flight;
    opts.cpus = args.cpus;
    opts.memory_mib = args.memory;
    opts.disk_mib = args.disk;
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(format!("deploying {} ({})", args.name, args.image));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let result = client.deploy_app(&args.name, opts).await;
    spinner.finish_and_clear();
    let app = result.with_context(|| format!("cannot deploy app {}", args.name))?;
    if json {
        println!("{}", app_json(&app));
    } else {
        println!(
            "{} version {} serving at {}",
            app.name, app.version, app.url
        );
    }
    Ok(0)
}

async fn ls(client: &Client, json: bool) -> anyhow::Result<i32> {
    let apps = client.list_apps().await?;
    if json {
        println!("{}", Value::Array(apps.iter().map(app_json).collect()));
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = apps
        .iter()
        .map(|a| {
            let spec = a.spec.clone().unwrap_or_default();
            vec![
                a.name.clone(),
                app_state(a.state).to_string(),
                a.version.to_string(),
                spec.image,
                format!("{}/{}", a.replicas_awake, a.replicas_asleep),
                age(&a.created_at),
                a.url.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "VERSION",
            "IMAGE",
            "AWAKE/ASLEEP",
            "AGE",
            "URL",
        ],
        &rows,
    );
    Ok(0)
}

async fn logs(
    client: &Client,
    name: &str,
    follow: bool,
    tail: u32,
    json: bool,
) -> anyhow::Result<i32> {
    let mut stream = client.app_logs(name, follow, tail).await?;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if json {
            let line = json!({
                "sandbox_id": chunk.sandbox_id,
                "data": String::from_utf8_lossy(&chunk.data),
            });
            writeln!(out, "{line}")?;
        } else {
            out.write_all(&chunk.data)?;
        }
        out.flush()?;
    }
    Ok(0)
}

fn app_state(state: i32) -> &'static str {
    match proto::AppState::try_from(state) {
        Ok(proto::AppState::Deploying) => "deploying",
        Ok(proto::AppState::Ready) => "ready",
        _ => "unknown",
    }
}

pub fn app_json(a: &proto::App) -> Value {
    let spec = a.spec.clone().unwrap_or_default();
    json!({
        "name": a.name,
        "state": app_state(a.state),
        "version": a.version,
        "url": a.url,
        "image": spec.image,
        "port": spec.port,
        "command": spec.command,
        "env": spec.env,
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "idle_timeout_seconds": spec.idle_timeout_seconds,
        "health_path": spec.health_path,
        "replicas_awake": a.replicas_awake,
        "replicas_asleep": a.replicas_asleep,
        "replicas": a.replicas.iter().map(|r| json!({
            "sandbox_id": r.sandbox_id,
            "version": r.version,
            "state": state_name(r.state),
            "host": r.host,
            "in_flight": r.in_flight,
            "ready": r.ready,
        })).collect::<Vec<_>>(),
        "last_error": a.last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
