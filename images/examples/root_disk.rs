//! Resolves an image and builds its root disk, printing the timings.
//!
//!     cargo run --release -p somna-images --example root_disk -- IMAGES_DIR CACHE_DIR REFERENCE
//!
//! Set RUST_LOG=info to see the unpack and mkfs spans.

use std::time::Instant;

use somna_images::{ImageStore, ImageStoreConfig, create_writable_disk};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [images, cache, reference] = args.as_slice() else {
        return Err("usage: root_disk IMAGES_DIR CACHE_DIR REFERENCE".into());
    };
    let store = ImageStore::new(ImageStoreConfig {
        local_dirs: vec![images.into()],
        cache_dir: cache.into(),
    })?;
    let start = Instant::now();
    let image = store.resolve(reference).await?;
    println!(
        "resolved {} -> {} in {:?}",
        image.reference,
        image.manifest_digest,
        start.elapsed()
    );
    let start = Instant::now();
    let disk = store.root_disk(&image).await?;
    println!(
        "root disk {} ({} MiB) in {:?} (builds: {})",
        disk.path.display(),
        disk.size_bytes >> 20,
        start.elapsed(),
        store.disk_builds()
    );
    let start = Instant::now();
    let disk = store.root_disk(&image).await?;
    println!("again: {} in {:?}", disk.path.display(), start.elapsed());

    let rw = std::path::Path::new(cache.as_str()).join("example-rw.ext4");
    let _ = std::fs::remove_file(&rw);
    let start = Instant::now();
    create_writable_disk(&rw, 10 * 1024).await?;
    println!("writable disk (10 GiB) in {:?}", start.elapsed());
    std::fs::remove_file(&rw)?;
    Ok(())
}
