//! Control-plane benchmarks: placement decisions per second over simulated
//! hosts, and API create throughput/latency at several client counts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use somna_controlplane::scheduler::{self, Demand, HostView, Overcommit, Policy};
use somna_sdk::{Client, CreateOptions};

use crate::{percentile, round, summary};

/// `decisions` placements over `hosts` simulated hosts of mixed sizes and
/// locality; each placement is applied (the chosen host's allocation
/// grows) and a departure frees a random earlier one, so the fleet stays
/// partly full as in steady state.
pub fn scheduler_bench(hosts: usize, decisions: usize, policy: Policy) -> Value {
    let mut views: Vec<HostView> = (0..hosts)
        .map(|i| HostView {
            id: format!("host-{i:04}"),
            ready: i % 50 != 0,
            cpus: [16, 32, 64, 96][i % 4],
            memory_mib: [65536, 131072, 262144, 393216][i % 4],
            warm_pool_ready: i % 7 == 0,
            has_template: i % 3 == 0,
            image_cached: i % 2 == 0,
            capabilities: if i % 25 == 0 {
                vec!["gpu".into()]
            } else {
                vec![]
            },
            ..Default::default()
        })
        .collect();
    let over = Overcommit::default();
    let mut placed: Vec<(usize, Demand)> = Vec::new();
    let mut samples = Vec::with_capacity(decisions);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut ok, mut no_fit) = (0usize, 0usize);
    let started = Instant::now();
    for n in 0..decisions {
        let r = next();
        let demand = Demand {
            cpus: [1, 2, 4][(r % 3) as usize],
            memory_mib: [512, 1024, 2048, 4096][((r >> 8) % 4) as usize],
            capabilities: if r % 100 == 0 {
                vec!["gpu".into()]
            } else {
                vec![]
            },
        };
        let t = Instant::now();
        let d = scheduler::place(&demand, &views, policy, over);
        samples.push(t.elapsed());
        match d {
            Ok(d) => {
                ok += 1;
                let h = &mut views[d.host];
                h.cpus_allocated += demand.cpus;
                h.memory_allocated_mib += demand.memory_mib;
                placed.push((d.host, demand));
            }
            Err(_) => no_fit += 1,
        }
        // Departures keep about half of the fleet's capacity in use.
        if n % 2 == 1 && !placed.is_empty() {
            let (h, d) = placed.swap_remove((next() as usize) % placed.len());
            views[h].cpus_allocated -= d.cpus;
            views[h].memory_allocated_mib -= d.memory_mib;
        }
    }
    let elapsed = started.elapsed();
    let mut s = samples;
    s.sort();
    let us = |p: f64| round(percentile(&s, p) * 1000.0);
    json!({
        "bench": "scheduler",
        "accelerator": "none (no VMs)",
        "hosts": hosts,
        "policy": format!("{policy:?}").to_lowercase(),
        "count": decisions,
        "placed": ok,
        "no_fit": no_fit,
        "decisions_per_s": round(decisions as f64 / elapsed.as_secs_f64()),
        "p50_us": us(50.0),
        "p99_us": us(99.0),
    })
}

/// For each client count: that many clients each create and destroy
/// sandboxes in a loop until `creates` creates are done in all; create
/// latency is the API call alone (request to running sandbox).
pub async fn api_create(
    client: &Client,
    image: &str,
    levels: &[usize],
    creates: usize,
) -> anyhow::Result<Value> {
    // Warm up: the image conversion and template build are not measured.
    let first = client.create_sandbox(CreateOptions::new(image)).await?;
    let accelerator = first.info().accelerator.clone();
    first.destroy().await?;
    let mut results = Vec::new();
    for &clients in levels {
        let per_client = creates.div_ceil(clients);
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let client = client.clone();
                let image = image.to_string();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = Vec::new();
                    for _ in 0..per_client {
                        let t = Instant::now();
                        match client
                            .create_sandbox(CreateOptions::new(&image).memory_mib(256))
                            .await
                        {
                            Ok(sb) => {
                                lat.push(t.elapsed());
                                if let Err(e) = sb.destroy().await {
                                    errors.push(format!("destroy: {e}"));
                                }
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let mut lat: Vec<Duration> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        for t in tasks {
            let (l, e) = t.await?;
            lat.extend(l);
            errors.extend(e);
        }
        let elapsed = started.elapsed();
        let done = lat.len();
        let mut first_errors = errors.clone();
        first_errors.dedup();
        first_errors.truncate(3);
        results.push(summary(
            "api_create",
            &accelerator,
            lat,
            json!({
                "clients": clients,
                "errors": errors.len(),
                "first_errors": first_errors,
                "creates_per_s": round(done as f64 / elapsed.as_secs_f64()),
                "what": "create API call (auto mode: template restore) with a destroy after each",
            }),
        ));
    }
    Ok(
        json!({ "bench": "api_create", "accelerator": accelerator, "image": image, "levels": results }),
    )
}
