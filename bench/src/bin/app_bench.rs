//! Apps through the ingress (root: needs `--network`): request → first
//! byte for an awake replica, for a sleeping one (each request wakes it),
//! and for the same replica called directly at its slot address (the
//! proxy's overhead). Prints one JSON line.
//!
//!   app-bench [--awake 200] [--wakes 20] [--accel auto]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use somna_netd::Egress;
use somna_netd::testing::Internet;
use somna_sdk::AppOptions;
use somna_testkit::{Options, Platform, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 200)]
    awake: usize,
    #[arg(long, default_value_t = 20)]
    wakes: usize,
    #[arg(long, default_value = "auto")]
    accel: String,
}

const SUBNET: &str = "100.124.9.0/24";

/// Sends a GET and returns the time to the first response byte.
async fn first_byte(addr: SocketAddr, host: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut b = [0u8; 1];
    if s.read(&mut b).await? == 0 {
        bail!("no answer from {addr}");
    }
    let elapsed = t.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    if !(b[0] == b'H' && String::from_utf8_lossy(&rest).contains(" 200 ")) {
        bail!("{addr} answered {:?}", String::from_utf8_lossy(&rest));
    }
    Ok(elapsed)
}

fn ms(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort();
    let p = |q: f64| {
        let rank = ((q / 100.0) * samples.len() as f64).ceil().max(1.0) as usize;
        (samples[rank.min(samples.len()) - 1].as_secs_f64() * 1e6).round() / 1e3
    };
    json!({ "count": samples.len(), "p50_ms": p(50.0), "p99_ms": p(99.0) })
}

/// The replica's slot address: the one sandbox address of the bench's
/// subnet that answers on the app port.
async fn slot_addr(port: u16) -> Option<SocketAddr> {
    for k in 0..64u8 {
        let a = SocketAddr::from((Ipv4Addr::new(100, 124, 9, 4 * k + 2), port));
        let c = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(a),
        );
        if let Ok(Ok(_)) = c.await {
            return Some(a);
        }
    }
    None
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("app-bench needs root (sandbox networking)");
    }
    let inet = Internet::create("somnabi", "203.0.113.200/30".parse()?)?;
    let Egress::Interface(uplink) = inet.egress() else {
        bail!("no egress interface");
    };
    let somna = std::env::current_exe()?
        .parent()
        .context("no bin dir")?
        .join("somna");
    let mut o = Options::new(somna);
    o.accel = cli.accel.clone();
    o.extra_args = [
        "--network",
        "--network-prefix",
        "somnabap",
        "--network-subnet",
        SUBNET,
        "--network-egress",
        &uplink,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let platform = Platform::start(o);
    let client = platform.client().await;
    let script = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www";
    let app = client
        .deploy_app(
            "bench",
            AppOptions::new("busybox", 8080)
                .command(["sh", "-c", script])
                .idle_timeout(Duration::from_secs(3600)),
        )
        .await?;
    let id = app.replicas[0].sandbox_id.clone();
    let ingress: SocketAddr = platform.ingress.trim_start_matches("http://").parse()?;
    let host = format!("bench.localhost:{}", ingress.port());

    // Warm up, then awake through the ingress and directly, interleaved.
    for _ in 0..5 {
        first_byte(ingress, &host).await?;
    }
    let direct = slot_addr(8080)
        .await
        .context("cannot find the replica's slot address")?;
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    for _ in 0..cli.awake {
        via.push(first_byte(ingress, &host).await?);
        straight.push(first_byte(direct, "bench").await?);
    }

    // Asleep: each request wakes the replica.
    let mut woken = Vec::new();
    for _ in 0..cli.wakes {
        client.sleep_sandbox(&id).await?;
        let gone = eventually(Duration::from_secs(30), || async {
            platform.vmm_pids().is_empty()
        })
        .await;
        if !gone {
            bail!("the replica's VMM did not exit after sleep");
        }
        woken.push(first_byte(ingress, &host).await?);
    }
    let (p_via, p_direct) = (ms(&mut via), ms(&mut straight));
    let overhead =
        p_via["p50_ms"].as_f64().unwrap_or(0.0) - p_direct["p50_ms"].as_f64().unwrap_or(0.0);
    println!(
        "{}",
        json!({
            "bench": "app-ingress",
            "accelerator": platform.accelerator,
            "awake_via_ingress": p_via,
            "awake_direct": p_direct,
            "proxy_overhead_p50_ms": (overhead * 1000.0).round() / 1000.0,
            "asleep_via_ingress": ms(&mut woken),
        })
    );
    client.delete_app("bench").await?;
    drop(platform);
    drop(inet);
    Ok(())
}
