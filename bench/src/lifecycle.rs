//! Light-sleep benchmarks: sleep and wake latency, create by cold boot vs
//! template vs warm pool, and host memory of running, sleeping and cloned
//! sandboxes.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use somna_sdk::proto::StartMode;
use somna_sdk::{Client, Command, CreateOptions, Sandbox};
use somna_testkit::{Platform, eventually, processes_mentioning};

use crate::{percentile, round, summary};

fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0)
}

async fn create(client: &Client, image: &str, mode: StartMode) -> anyhow::Result<Sandbox> {
    Ok(client
        .create_sandbox(CreateOptions::new(image).start_mode(mode))
        .await?)
}

async fn run_true(sb: &Sandbox) -> anyhow::Result<()> {
    let out = sb.exec(Command::new("true")).await?;
    anyhow::ensure!(out.exit_code == 0, "true failed: {out:?}");
    Ok(())
}

/// Sleep latency; wake latency as an explicit wake and as an exec on a
/// sleeping sandbox (API call to exec result); and a template clone's first
/// sleep (its RAM goes into the snapshot) and the wake after it.
pub async fn sleep_wake(client: &Client, image: &str, runs: usize) -> anyhow::Result<Value> {
    let sb = create(client, image, StartMode::ColdBoot).await?;
    let accelerator = sb.info().accelerator.clone();
    // A process whose state must survive, as in real use.
    sb.exec(Command::from_argv([
        "sh",
        "-c",
        "(while true; do sleep 1; done) >/dev/null 2>&1 &",
    ]))
    .await?;
    run_true(&sb).await?;
    let (mut sleeps, mut wakes, mut wake_execs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs * 2 {
        let t = Instant::now();
        client.sleep_sandbox(sb.id()).await?;
        sleeps.push(t.elapsed());
        let t = Instant::now();
        if i % 2 == 0 {
            client.wake_sandbox(sb.id()).await?;
            wakes.push(t.elapsed());
            run_true(&sb).await?;
        } else {
            // Exec on a sleeping sandbox: it wakes on its own.
            run_true(&sb).await?;
            wake_execs.push(t.elapsed());
        }
    }
    sb.destroy().await?;

    // A clone of a template: first sleep writes its RAM, then it owns a
    // memory file like any other sandbox.
    let clone = create(client, image, StartMode::Template).await?;
    run_true(&clone).await?;
    let t = Instant::now();
    client.sleep_sandbox(clone.id()).await?;
    let first_sleep = t.elapsed();
    let t = Instant::now();
    run_true(&clone).await?;
    let first_wake = t.elapsed();
    let t = Instant::now();
    client.sleep_sandbox(clone.id()).await?;
    let second_sleep = t.elapsed();
    clone.destroy().await?;

    Ok(json!({
        "bench": "sleep_wake",
        "accelerator": accelerator,
        "image": image,
        "sleep": summary("sleep", &accelerator, sleeps, json!({})),
        "wake": summary("wake", &accelerator, wakes, json!({ "what": "WakeSandbox API call" })),
        "wake_to_exec_result": summary("wake_to_exec_result", &accelerator, wake_execs,
            json!({ "what": "exec `true` on a sleeping sandbox: API call -> exec result" })),
        "template_clone": {
            "first_sleep_ms": ms(first_sleep),
            "first_wake_to_exec_result_ms": ms(first_wake),
            "second_sleep_ms": ms(second_sleep),
        },
    }))
}

/// Create → first exec result by cold boot, by template restore and by
/// warm-pool claim, side by side.
pub async fn create_modes(client: &Client, image: &str, runs: usize) -> anyhow::Result<Value> {
    // The template exists before timing starts.
    let first = create(client, image, StartMode::Template).await?;
    let accelerator = first.info().accelerator.clone();
    first.destroy().await?;
    let mut results = serde_json::Map::new();
    let mut p50 = Vec::new();
    for (name, mode) in [
        ("cold_boot", StartMode::ColdBoot),
        ("template", StartMode::Template),
        ("warm_pool", StartMode::WarmPool),
    ] {
        let mut samples = Vec::new();
        for _ in 0..runs {
            if mode == StartMode::WarmPool {
                let ready = eventually(Duration::from_secs(120), || async {
                    client
                        .list_hosts()
                        .await
                        .map(|h| h.iter().any(|h| h.warm_pools.iter().any(|p| p.ready > 0)))
                        .unwrap_or(false)
                })
                .await;
                anyhow::ensure!(
                    ready,
                    "the warm pool did not fill (start the platform with --warm-pool {image}=1)"
                );
            }
            let t = Instant::now();
            let sb = create(client, image, mode).await?;
            run_true(&sb).await?;
            samples.push(t.elapsed());
            sb.destroy().await?;
        }
        samples.sort();
        p50.push(percentile(&samples, 50.0));
        results.insert(name.into(), summary(name, &accelerator, samples, json!({})));
    }
    Ok(json!({
        "bench": "create_modes",
        "accelerator": accelerator,
        "image": image,
        "what": "create request -> first exec result (`true`)",
        "modes": results,
        "ratio_cold_over_template": round(p50[0] / p50[1]),
        "ratio_cold_over_warm_pool": round(p50[0] / p50[2]),
    }))
}

/// Rss and Pss (KiB) of a process, from smaps_rollup.
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

fn vmm_of(platform: &Platform, id: &str) -> Option<u32> {
    processes_mentioning(&platform.data_dir().join("vms").join(id))
        .first()
        .copied()
}

fn files_resident_kib(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| Platform::resident_bytes(&e.path()))
                .sum::<u64>()
                / 1024
        })
        .unwrap_or(0)
}

/// Host memory of an idle running sandbox, of the same sandbox asleep, and
/// of `clones` clones of one template (shared pages show in Pss).
pub async fn memory(
    client: &Client,
    platform: &Platform,
    image: &str,
    clones: usize,
) -> anyhow::Result<Value> {
    let sb = create(client, image, StartMode::ColdBoot).await?;
    let accelerator = sb.info().accelerator.clone();
    run_true(&sb).await?;
    let pid = vmm_of(platform, sb.id()).ok_or_else(|| anyhow::anyhow!("no VMM process found"))?;
    let (rss, pss) = rss_pss_kib(pid);
    client.sleep_sandbox(sb.id()).await?;
    let asleep_vmm = vmm_of(platform, sb.id()).map(rss_pss_kib).unwrap_or((0, 0));
    let asleep_cache = files_resident_kib(&platform.data_dir().join("vms").join(sb.id()));
    sb.destroy().await?;

    let mut sandboxes = Vec::new();
    for _ in 0..clones {
        let c = create(client, image, StartMode::Template).await?;
        run_true(&c).await?;
        sandboxes.push(c);
    }
    let (mut rss_sum, mut pss_sum) = (0, 0);
    for c in &sandboxes {
        if let Some(pid) = vmm_of(platform, c.id()) {
            let (r, p) = rss_pss_kib(pid);
            rss_sum += r;
            pss_sum += p;
        }
    }
    let template_cache = files_resident_kib(
        &platform
            .data_dir()
            .join("templates")
            .read_dir()?
            .flatten()
            .next()
            .map(|e| e.path())
            .unwrap_or_default(),
    );
    for c in sandboxes {
        c.destroy().await?;
    }
    Ok(json!({
        "bench": "memory",
        "accelerator": accelerator,
        "image": image,
        "running_idle": { "vmm_rss_kib": rss, "vmm_pss_kib": pss },
        "sleeping": { "vmm_rss_kib": asleep_vmm.0, "snapshot_files_in_page_cache_kib": asleep_cache },
        "clones": {
            "count": clones,
            "rss_sum_kib": rss_sum,
            "pss_sum_kib": pss_sum,
            "pss_per_clone_kib": if clones > 0 { pss_sum / clones as u64 } else { 0 },
            "template_files_in_page_cache_kib": template_cache,
        },
    }))
}
