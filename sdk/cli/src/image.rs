//! `somna image pull|ls|rm`.

use std::collections::HashMap;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use somna_sdk::Client;
use somna_sdk::proto::pull_image_event::Event;

use crate::output::{age, table};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image into the host's cache and convert it to a root disk
    /// (a registry reference, oci:/path/to/layout[:tag] or
    /// docker-archive:/path/to/image.tar).
    Pull { reference: String },
    /// List cached images.
    #[command(alias = "list")]
    Ls,
    /// Remove images no sandbox uses.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
}

pub async fn run(cmd: ImageCommand, addr: &str, json_out: bool) -> anyhow::Result<i32> {
    let client = Client::connect(addr).await?;
    match cmd {
        ImageCommand::Pull { reference } => pull(&client, &reference, json_out).await,
        ImageCommand::Ls => ls(&client, json_out).await,
        ImageCommand::Rm { references } => rm(&client, &references, json_out).await,
    }
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

async fn pull(client: &Client, reference: &str, json_out: bool) -> anyhow::Result<i32> {
    let mut events = client.pull_image(reference).await?;
    // One bar per layer (bytes, rate, ETA) and a spinner for the
    // conversion; hidden when stderr is not a terminal.
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut layers: HashMap<String, ProgressBar> = HashMap::new();
    let mut convert: Option<ProgressBar> = None;
    let bar_for = |digest: &str, total: u64, layers: &mut HashMap<String, ProgressBar>| {
        layers
            .entry(digest.to_string())
            .or_insert_with(|| {
                let b = bars.add(ProgressBar::new(total));
                b.set_style(style.clone());
                b.set_prefix(short(digest));
                b
            })
            .clone()
    };
    while let Some(msg) = events.message().await? {
        match msg.event {
            Some(Event::Resolved(r)) => {
                for l in r.layers {
                    bar_for(&l.digest, l.total_bytes, &mut layers);
                }
            }
            Some(Event::Layer(l)) => {
                let b = bar_for(&l.digest, l.total_bytes, &mut layers);
                b.set_length(l.total_bytes);
                b.set_position(l.done_bytes);
                if l.done_bytes >= l.total_bytes {
                    b.finish_with_message(if l.cached { "cached" } else { "done" });
                }
            }
            Some(Event::Converting(_)) => {
                let s = bars.add(ProgressBar::new_spinner());
                s.set_message("converting to a root disk");
                s.enable_steady_tick(Duration::from_millis(100));
                convert = Some(s);
            }
            Some(Event::Done(d)) => {
                if let Some(s) = convert.take() {
                    s.finish_and_clear();
                }
                for b in layers.values() {
                    b.finish();
                }
                if json_out {
                    println!(
                        "{}",
                        json!({
                            "reference": d.reference, "digest": d.digest,
                            "downloaded_bytes": d.downloaded_bytes, "disk_bytes": d.disk_bytes,
                            "pull_ms": d.pull_ms, "convert_ms": d.convert_ms,
                        })
                    );
                } else {
                    println!(
                        "{} {} ({} downloaded, pulled in {} ms, converted in {} ms)",
                        d.reference,
                        d.digest,
                        human(d.downloaded_bytes),
                        d.pull_ms,
                        d.convert_ms
                    );
                }
            }
            None => {}
        }
    }
    Ok(0)
}

async fn ls(client: &Client, json_out: bool) -> anyhow::Result<i32> {
    let resp = client.list_images().await?;
    if json_out {
        let stats = resp.stats.unwrap_or_default();
        let images: Vec<_> = resp
            .images
            .iter()
            .map(|i| {
                json!({
                    "reference": i.reference, "digest": i.digest, "source": i.source,
                    "size_bytes": i.size_bytes, "disk_bytes": i.disk_bytes,
                    "last_used_at": i.last_used_at.map(|t| t.to_string()),
                    "in_use": i.in_use,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "images": images,
                "stats": {
                    "pulls": stats.pulls, "imports": stats.imports, "blob_downloads": stats.blob_downloads,
                    "bytes_downloaded": stats.bytes_downloaded, "conversions": stats.conversions,
                },
            })
        );
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = resp
        .images
        .iter()
        .map(|i| {
            vec![
                i.reference.clone(),
                short(&i.digest),
                human(i.size_bytes),
                human(i.disk_bytes),
                format!("{} ago", age(&i.last_used_at)),
                i.in_use.to_string(),
            ]
        })
        .collect();
    table(
        &["IMAGE", "DIGEST", "SIZE", "DISK", "LAST USED", "IN USE"],
        &rows,
    );
    Ok(0)
}

async fn rm(client: &Client, references: &[String], json_out: bool) -> anyhow::Result<i32> {
    let mut failed = 0;
    for r in references {
        match client.remove_image(r).await {
            Ok(resp) if json_out => println!(
                "{}",
                json!({ "removed": resp.removed, "freed_bytes": resp.freed_bytes })
            ),
            Ok(resp) => println!(
                "{} (freed {})",
                resp.removed.join(", "),
                human(resp.freed_bytes)
            ),
            Err(e) => {
                failed += 1;
                eprintln!("somna: cannot remove {r}: {e}");
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
