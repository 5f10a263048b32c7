//! Cold pull + convert of the `python` test image from a local registry,
//! for ext4 and for erofs root disks, and the second use of the image.
//! Prints one JSON line.
//!
//!     target/release/pull-bench [LAYOUT]
//!
//! SOMNA_BENCH_RUNS (default 3) cold runs per format, alternating; the
//! medians are reported.
//!
//! LAYOUT defaults to `build/images/python` (made by `scripts/setup.sh
//! build`). Needs root, Debian's `docker-registry`, `skopeo`,
//! `erofs-utils`. The registry runs on a free loopback port and is killed
//! at the end. Read throughput is measured by loop-mounting each disk
//! read-only after dropping the page cache (skipped where that fails).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use somna_images::{ImageStore, ImageStoreConfig, ImageStoreOptions, RegistryConfig, RootFsFormat};

type BoxError = Box<dyn std::error::Error>;

/// Reads every file of a loop-mounted disk from a cold page cache:
/// (seconds, bytes).
fn cold_read(disk: &Path, fstype: &str) -> Option<(f64, u64)> {
    let mnt = tempfile::tempdir().ok()?;
    let ok = Command::new("mount")
        .args(["-t", fstype, "-o", "loop,ro"])
        .arg(disk)
        .arg(mnt.path())
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let result = (|| {
        std::fs::write("/proc/sys/vm/drop_caches", "3").ok()?;
        let start = Instant::now();
        let mut bytes = 0u64;
        let mut stack = vec![mnt.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).ok()?.flatten() {
                let ft = e.file_type().ok()?;
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() {
                    bytes += std::fs::read(e.path()).map(|d| d.len() as u64).unwrap_or(0);
                }
            }
        }
        Some((start.elapsed().as_secs_f64(), bytes))
    })();
    let _ = Command::new("umount").arg(mnt.path()).status();
    result
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // RUST_LOG=somna_images=info shows the unpack and mkfs spans (stderr).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let layout = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/images/python"));
    if !layout.join("index.json").exists() {
        return Err(format!(
            "{} is not an image layout: run scripts/setup.sh build (or pass a layout)",
            layout.display()
        )
        .into());
    }
    let work = tempfile::Builder::new()
        .prefix("somna-pull-bench")
        .tempdir()?;
    let registry = somna_testkit::Registry::start();
    registry.push_layout(&layout, "latest", "python:latest");
    let addr = registry.addr.clone();
    let reference = format!("{addr}/python:latest");

    let runs: usize = std::env::var("SOMNA_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut out = serde_json::Map::new();
    out.insert("image".into(), json!("python"));
    out.insert("runs".into(), json!(runs));
    let formats = [RootFsFormat::Ext4, RootFsFormat::Erofs];
    let mut pulls: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut converts: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut pulled_mb = 0.0;
    for run in 0..runs {
        // Alternate the order, so neither format always runs on the
        // page cache and write-back the other left.
        for k in 0..2 {
            let i = (run + k) % 2;
            let format = formats[i];
            let cache = work.path().join(format!("cache-{format}-{run}"));
            nix::unistd::sync();
            let store = ImageStore::with_options(
                ImageStoreConfig {
                    local_dirs: vec![],
                    cache_dir: cache.clone(),
                },
                options(&addr, &work, format),
            )?;
            let start = Instant::now();
            let image = store.resolve(&reference).await?;
            pulls[i].push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            store.root_disk(&image).await?;
            converts[i].push(start.elapsed().as_secs_f64());
            pulled_mb = store.stats().bytes_downloaded as f64 / 1e6;
            if run + 1 < runs {
                drop(store);
                std::fs::remove_dir_all(&cache)?;
            }
        }
    }
    for (i, format) in formats.iter().enumerate() {
        let f = format.as_str();
        let cache = work.path().join(format!("cache-{format}-{}", runs - 1));
        // Second use, by a restarted store: zero pulls, zero conversions.
        let store = ImageStore::with_options(
            ImageStoreConfig {
                local_dirs: vec![],
                cache_dir: cache,
            },
            options(&addr, &work, *format),
        )?;
        let start = Instant::now();
        let image = store.resolve(&reference).await?;
        let _lease = store.lease(&image);
        let disk = store.root_disk(&image).await?;
        let second_ms = start.elapsed().as_secs_f64() * 1e3;
        let second = store.stats();
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&disk.path)?) * 512;
        let pull_s = median(&mut pulls[i]);
        let convert_s = median(&mut converts[i]);
        out.insert(format!("{f}_cold_pull_s"), json!(round3(pull_s)));
        out.insert(format!("{f}_pull_mb"), json!(round3(pulled_mb)));
        out.insert(
            format!("{f}_pull_mb_per_s"),
            json!(round3(pulled_mb / pull_s)),
        );
        out.insert(format!("{f}_convert_s"), json!(round3(convert_s)));
        out.insert(format!("{f}_convert_s_min"), json!(round3(converts[i][0])));
        out.insert(
            format!("{f}_cold_total_s"),
            json!(round3(pull_s + convert_s)),
        );
        out.insert(
            format!("{f}_disk_apparent_mb"),
            json!(round3(disk.size_bytes as f64 / 1e6)),
        );
        out.insert(
            format!("{f}_disk_allocated_mb"),
            json!(round3(allocated as f64 / 1e6)),
        );
        out.insert(format!("{f}_second_use_ms"), json!(round3(second_ms)));
        out.insert(format!("{f}_second_use_pulls"), json!(second.pulls));
        out.insert(
            format!("{f}_second_use_conversions"),
            json!(second.conversions),
        );
        if let Some((secs, bytes)) = cold_read(&disk.path, f) {
            out.insert(format!("{f}_cold_read_s"), json!(round3(secs)));
            out.insert(
                format!("{f}_cold_read_mb_per_s"),
                json!(round3(bytes as f64 / 1e6 / secs)),
            );
        }
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

fn options(addr: &str, work: &tempfile::TempDir, format: RootFsFormat) -> ImageStoreOptions {
    ImageStoreOptions {
        registry: RegistryConfig {
            insecure_registries: vec![addr.to_string()],
            docker_config: Some(work.path().join("none.json")),
            ..RegistryConfig::default()
        },
        root_fs: format,
        ..ImageStoreOptions::default()
    }
}

/// Sorts and returns the median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
