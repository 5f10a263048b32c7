//! Somna's benchmarks. Each prints one JSON summary line (p50/p99, counts,
//! the accelerator the VMs ran on). Not tests: nothing here asserts timings.
//!
//!   somna-bench cold-boot [--runs 10]      create → first exec result
//!   somna-bench exec-rtt [--runs 200]      exec of `true` on a running sandbox
//!   somna-bench stat-rtt [--runs 200]      file stat: the channel alone
//!   somna-bench files [--size-mib 100]     file write/read throughput
//!   somna-bench sleep-wake [--runs 20]     sleep, wake, wake-on-exec latency
//!   somna-bench create-modes [--runs 20]   cold boot vs template vs warm pool
//!   somna-bench memory [--clones 10]       host memory: running, asleep, clones
//!   somna-bench scheduler [--hosts 1000]   placement decisions/s (no VMs)
//!   somna-bench api-create [--clients 1,10,50] creates/s and latency per client count
//!
//! Without `--addr` each run starts its own `somna up` (the binary next to
//! this one) on the artifacts from `scripts/setup.sh build`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

mod controlplane;
mod lifecycle;
use somna_sdk::{Client, Command, CreateOptions};
use somna_testkit::{Options, Platform};

#[derive(Parser)]
struct Cli {
    /// Use a running Somna instead of starting one.
    #[arg(long, env = "SOMNA_BENCH_ADDR")]
    addr: Option<String>,
    /// Accelerator for the platform this starts (auto, kvm, tcg).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Image to use.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Start the platform with `--no-jail` (to measure what the VMM jail
    /// costs).
    #[arg(long)]
    no_jail: bool,
    /// The platform's `--template-memory` (copy, shared): what template
    /// clones' RAM costs either way.
    #[arg(long, default_value = "copy")]
    template_memory: String,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    ColdBoot {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    ExecRtt {
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    /// Round trip of a file stat: the host↔guest channel without a process.
    StatRtt {
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    SleepWake {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    CreateModes {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    Memory {
        #[arg(long, default_value_t = 10)]
        clones: usize,
    },
    /// Placement decisions per second over simulated hosts (no platform).
    Scheduler {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
        #[arg(long, default_value = "spread")]
        policy: somna_controlplane::scheduler::Policy,
    },
    /// Creates per second and create latency at several client counts.
    ApiCreate {
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        clients: Vec<usize>,
        /// Creates per client count.
        #[arg(long, default_value_t = 100)]
        creates: usize,
    },
    Files {
        #[arg(long, default_value_t = 100)]
        size_mib: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

/// p-th percentile (nearest rank) of sorted samples, in milliseconds.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1000.0
}

pub(crate) fn summary(
    name: &str,
    accelerator: &str,
    mut samples: Vec<Duration>,
    extra: serde_json::Value,
) -> serde_json::Value {
    samples.sort();
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len().max(1) as f64
        * 1000.0;
    let mut v = json!({
        "bench": name,
        "accelerator": accelerator,
        "count": samples.len(),
        "p50_ms": round(percentile(&samples, 50.0)),
        "p99_ms": round(percentile(&samples, 99.0)),
        "min_ms": round(samples.first().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)),
        "max_ms": round(samples.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)),
        "mean_ms": round(mean),
    });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    v
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Bench::Scheduler {
        hosts,
        decisions,
        policy,
    } = &cli.bench
    {
        println!(
            "{}",
            controlplane::scheduler_bench(*hosts, *decisions, *policy)
        );
        return Ok(());
    }
    let platform = match &cli.addr {
        Some(_) => None,
        None => {
            let somna = std::env::current_exe()?.with_file_name("somna");
            let mut opts = Options::new(somna);
            opts.accel = cli.accel.clone();
            opts.templates = true;
            if matches!(cli.bench, Bench::CreateModes { .. }) {
                opts.extra_args = vec!["--warm-pool".into(), format!("{}=1", cli.image)];
            }
            if let Bench::ApiCreate { clients, .. } = &cli.bench {
                // Room for every client's sandbox at once on one host.
                let most = clients.iter().copied().max().unwrap_or(1);
                opts.extra_args = vec!["--cpu-overcommit".into(), (most as f64).to_string()];
            }
            if let Bench::Memory { clones } = &cli.bench {
                // The running sandbox, its template and every clone, on a
                // host that may have two cores.
                opts.extra_args = vec!["--cpu-overcommit".into(), (clones + 2).to_string()];
            }
            if cli.no_jail {
                opts.extra_args.push("--no-jail".into());
            }
            opts.extra_args
                .extend(["--template-memory".into(), cli.template_memory.clone()]);
            Some(Platform::start(opts))
        }
    };
    let addr = cli
        .addr
        .clone()
        .or_else(|| platform.as_ref().map(|p| p.addr.clone()))
        .context("no address")?;
    let client = match &platform {
        Some(p) => Client::connect_with_key(&addr, Some(&p.api_key)).await?,
        None => Client::connect(&addr).await?,
    };
    let mut result = match cli.bench {
        Bench::ColdBoot { runs } => cold_boot(&client, &cli.image, runs).await?,
        Bench::ExecRtt { runs } => exec_rtt(&client, &cli.image, runs).await?,
        Bench::StatRtt { runs } => stat_rtt(&client, &cli.image, runs).await?,
        Bench::SleepWake { runs } => lifecycle::sleep_wake(&client, &cli.image, runs).await?,
        Bench::CreateModes { runs } => lifecycle::create_modes(&client, &cli.image, runs).await?,
        Bench::Memory { clones } => {
            let p = platform
                .as_ref()
                .context("the memory benchmark needs its own platform (no --addr)")?;
            lifecycle::memory(&client, p, &cli.image, clones).await?
        }
        Bench::Files { size_mib, runs } => files(&client, &cli.image, size_mib, runs).await?,
        Bench::ApiCreate { clients, creates } => {
            controlplane::api_create(&client, &cli.image, &clients, creates).await?
        }
        Bench::Scheduler { .. } => anyhow::bail!("the scheduler benchmark runs without a platform"),
    };
    if let Some(o) = result.as_object_mut()
        && cli.addr.is_none()
    {
        o.insert("jail".into(), json!(!cli.no_jail));
        o.insert("template_memory".into(), json!(cli.template_memory));
    }
    println!("{result}");
    Ok(())
}

async fn cold_boot(client: &Client, image: &str, runs: usize) -> anyhow::Result<serde_json::Value> {
    // One untimed create first, so the image conversion (cached after the
    // first use) is not counted as boot time.
    let warm = client.create_sandbox(CreateOptions::new(image)).await?;
    let accelerator = warm.info().accelerator.clone();
    warm.destroy().await?;
    let mut samples = Vec::new();
    let mut guest_boot = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let sb = client
            .create_sandbox(
                CreateOptions::new(image).start_mode(somna_sdk::proto::StartMode::ColdBoot),
            )
            .await?;
        let out = sb.exec(Command::new("true")).await?;
        samples.push(start.elapsed());
        anyhow::ensure!(out.exit_code == 0, "true failed: {out:?}");
        guest_boot.push(Duration::from_millis(sb.info().boot_ms));
        sb.destroy().await?;
    }
    guest_boot.sort();
    let extra = json!({
        "image": image,
        "what": "create request -> first exec result (`true`)",
        "create_p50_ms": round(percentile(&guest_boot, 50.0)),
    });
    Ok(summary("cold_boot", &accelerator, samples, extra))
}

async fn exec_rtt(client: &Client, image: &str, runs: usize) -> anyhow::Result<serde_json::Value> {
    let sb = client.create_sandbox(CreateOptions::new(image)).await?;
    // Warm the channel and the guest's page cache.
    for _ in 0..5 {
        sb.exec(Command::new("true")).await?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = sb.exec(Command::new("true")).await?;
        samples.push(start.elapsed());
        anyhow::ensure!(out.exit_code == 0, "true failed: {out:?}");
    }
    let accelerator = sb.info().accelerator.clone();
    sb.destroy().await?;
    Ok(summary(
        "exec_rtt",
        &accelerator,
        samples,
        json!({ "image": image, "what": "exec `true` round trip" }),
    ))
}

async fn stat_rtt(client: &Client, image: &str, runs: usize) -> anyhow::Result<serde_json::Value> {
    let sb = client.create_sandbox(CreateOptions::new(image)).await?;
    for _ in 0..5 {
        sb.stat("/").await?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        sb.stat("/etc/passwd").await?;
        samples.push(start.elapsed());
    }
    let accelerator = sb.info().accelerator.clone();
    sb.destroy().await?;
    Ok(summary(
        "stat_rtt",
        &accelerator,
        samples,
        json!({ "image": image, "what": "stat of a file round trip" }),
    ))
}

async fn files(
    client: &Client,
    image: &str,
    size_mib: usize,
    runs: usize,
) -> anyhow::Result<serde_json::Value> {
    let sb = client
        .create_sandbox(CreateOptions::new(image).disk_mib((size_mib as u32) * 3 + 256))
        .await?;
    let data: Vec<u8> = (0..size_mib * 1024 * 1024)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let start = Instant::now();
        sb.write_file("/tmp/bench.bin", data.clone()).await?;
        writes.push(start.elapsed());
        let start = Instant::now();
        let back = sb.read_file("/tmp/bench.bin").await?;
        reads.push(start.elapsed());
        anyhow::ensure!(
            back.len() == data.len(),
            "read back {} bytes, wrote {}",
            back.len(),
            data.len()
        );
    }
    let accelerator = sb.info().accelerator.clone();
    sb.destroy().await?;
    let mibps = |d: &[Duration]| {
        let mut v: Vec<f64> = d
            .iter()
            .map(|t| size_mib as f64 / t.as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        round(v[v.len() / 2])
    };
    Ok(json!({
        "bench": "file_throughput",
        "accelerator": accelerator,
        "size_mib": size_mib,
        "count": runs,
        "write_mib_s_p50": mibps(&writes),
        "read_mib_s_p50": mibps(&reads),
        "write": summary("write", &accelerator, writes, json!({})),
        "read": summary("read", &accelerator, reads, json!({})),
    }))
}
