//! The cache without a registry: `oci:` and `docker-archive:` imports,
//! records that survive restarts, list/remove, leases, and garbage
//! collection under a budget.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Tar, World, cat, require_root};
use somna_images::mkimage::LayerInput;
use somna_images::{ErrorKind, ImageConfig, ImageError, ImageSource, ImageStoreOptions};

/// A layer of `n` bytes that gzip cannot shrink (so sizes are predictable).
fn incompressible(name: &str, n: usize, seed: u8) -> LayerInput {
    let mut data = vec![0u8; n];
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    LayerInput::tar(Tar::new().file(name, &data).build())
}

/// `docker save`-format archive of a layout's tag, made by skopeo.
fn docker_archive(layout: &Path, tag: &str, out: &Path, name_tag: &str) {
    let status = Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--quiet"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker-archive:{}:{name_tag}", out.display()))
        .status()
        .expect("run skopeo (apt-get install skopeo)");
    assert!(status.success());
}

#[tokio::test]
async fn oci_and_docker_archive_imports() {
    require_root();
    let w = World::new();
    let config = ImageConfig {
        env: vec![("A".into(), "b".into())],
        cmd: vec!["sh".into()],
        ..ImageConfig::default()
    };
    let written = w.src_image(
        "app:v1",
        vec![
            LayerInput::tar(Tar::new().file("etc/one", b"1").build()),
            LayerInput::tar(Tar::new().whiteout("etc/one").file("etc/two", b"2").build()),
        ],
        config.clone(),
    );
    let store = w.store_with(ImageStoreOptions::local_only());

    // oci: with and without a tag (the layout has one image).
    let src = w.src("app");
    let reference = format!("oci:{}:v1", src.display());
    let image = store.resolve(&reference).await.unwrap();
    assert_eq!(image.manifest_digest, written.manifest_digest);
    assert_eq!(image.source, ImageSource::OciLayout { path: src.clone() });
    let untagged = store
        .resolve(&format!("oci:{}", src.display()))
        .await
        .unwrap();
    assert_eq!(untagged.manifest_digest, written.manifest_digest);
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(cat(&disk.path, "/etc/two"), b"2");
    assert_eq!(store.stats().imports, 2);

    // The import is self-contained: the source can go.
    let archive = w.tmp.path().join("app.tar");
    docker_archive(&src, "v1", &archive, "app:v1");
    std::fs::remove_dir_all(&src).unwrap();
    drop(store);
    let store = w.store_with(ImageStoreOptions::local_only());
    assert_eq!(store.resolve(&reference).await.unwrap(), image);
    assert_eq!(store.stats().imports, 0);

    // docker-archive: plain and gzip-compressed.
    let plain = format!("docker-archive:{}", archive.display());
    let from_archive = store.resolve(&plain).await.unwrap();
    assert_eq!(from_archive.config, config);
    assert_eq!(from_archive.layers.len(), 2);
    let disk = store.root_disk(&from_archive).await.unwrap();
    assert_eq!(cat(&disk.path, "/etc/two"), b"2");
    assert!(common::stat(&disk.path, "/etc/one").is_none());

    let gz = w.tmp.path().join("app.tar.gz");
    let out = Command::new("gzip")
        .arg("-c")
        .arg(&archive)
        .output()
        .unwrap();
    std::fs::write(&gz, out.stdout).unwrap();
    let gzipped = store
        .resolve(&format!("docker-archive:{}", gz.display()))
        .await
        .unwrap();
    assert_eq!(gzipped.manifest_digest, from_archive.manifest_digest);

    // Docker 25+'s `docker save`: an OCI layout plus a manifest.json that
    // names blobs/sha256/... members (here with gzip layers).
    let written2 = w.src_image(
        "new:v1",
        vec![LayerInput::tar(Tar::new().file("etc/new", b"n").build())],
        ImageConfig::default(),
    );
    let new_style = w.tmp.path().join("new-style.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&new_style).unwrap());
        b.append_dir_all(".", w.src("new")).unwrap();
        let manifest = serde_json::json!([{
            "Config": format!("blobs/sha256/{}", written2.config_digest.hex()),
            "RepoTags": ["new:v1"],
            "Layers": written2.layers.iter().map(|l| format!("blobs/sha256/{}", l.0.hex())).collect::<Vec<_>>(),
        }])
        .to_string();
        let mut h = tar::Header::new_gnu();
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "manifest.json", manifest.as_bytes())
            .unwrap();
        b.finish().unwrap();
    }
    let image = store
        .resolve(&format!("docker-archive:{}", new_style.display()))
        .await
        .unwrap();
    assert_eq!(
        image.layers[0].compression,
        somna_images::LayerCompression::Gzip
    );
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(cat(&disk.path, "/etc/new"), b"n");

    // Bad archives: named, specific, nothing cached.
    let before = w.cache_counts();
    let missing = format!("docker-archive:{}", w.tmp.path().join("nope.tar").display());
    let e = store.resolve(&missing).await.unwrap_err();
    assert!(matches!(e, ImageError::SourceNotFound { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let junk = w.tmp.path().join("junk.tar");
    std::fs::write(&junk, vec![b'x'; 3000]).unwrap();
    let e = store
        .resolve(&format!("docker-archive:{}", junk.display()))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::InvalidArchive { .. }), "{e}");
    assert!(e.to_string().contains("junk.tar"), "{e}");
    // A corrupted layer inside the archive: its diff_id does not match.
    let mut bytes = std::fs::read(&archive).unwrap();
    let needle = b"etc/two";
    let pos = bytes
        .windows(needle.len())
        .rposition(|win| win == needle)
        .unwrap();
    bytes[pos] = b'X';
    let corrupt = w.tmp.path().join("corrupt.tar");
    std::fs::write(&corrupt, bytes).unwrap();
    let e = store
        .resolve(&format!("docker-archive:{}", corrupt.display()))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::InvalidArchive { .. }), "{e}");
    assert!(e.to_string().contains("diff_id"), "{e}");
    assert_eq!(w.cache_counts(), before);
}

#[tokio::test]
async fn gc_keeps_leased_images_and_removes_lru_down_to_budget() {
    let w = World::new();
    // Three images, ~1 MiB each, sharing nothing.
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        w.src_image(
            &format!("{name}:v1"),
            vec![incompressible("data", 1 << 20, i as u8)],
            ImageConfig::default(),
        );
    }
    let r = |name: &str| format!("oci:{}:v1", w.src(name).display());
    let store = w.store_with(ImageStoreOptions::local_only());
    let a = store.resolve(&r("a")).await.unwrap();
    let b = store.resolve(&r("b")).await.unwrap();
    let _c = store.resolve(&r("c")).await.unwrap();
    let full = store.cache_usage_bytes().unwrap();
    assert!(full > 3 << 20, "{full}");
    // Use order now: a (oldest, but leased), b, c; then b again.
    let lease_a = store.lease(&a);
    store.resolve(&r("c")).await.unwrap();
    store.resolve(&r("b")).await.unwrap();
    let listed: Vec<String> = store
        .list_images()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(
        listed,
        vec![r("b"), r("c"), r("a")],
        "most recently used first"
    );
    assert_eq!(
        store
            .list_images()
            .iter()
            .find(|i| i.reference == r("a"))
            .unwrap()
            .in_use,
        1
    );

    // Removing a leased image is refused.
    let e = store.remove_image(&r("a")).await.unwrap_err();
    assert!(matches!(e, ImageError::ImageInUse { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    // (A lease keeps its store, and the cache lock, alive.)
    drop(lease_a);
    drop(store);

    // A budget for two images: the LRU unleased one (c) goes, a stays.
    let budget = full * 2 / 3 + (64 << 10);
    let store = w.store_with(ImageStoreOptions {
        cache_budget_bytes: Some(budget),
        ..ImageStoreOptions::local_only()
    });
    // (A new store has no leases: take a's again before collecting.)
    let a = store.resolve(&r("a")).await.unwrap();
    let lease_a = store.lease(&a);
    let b_digest = b.manifest_digest.clone();
    let report = store.gc().await.unwrap();
    assert_eq!(report.removed, vec![r("c")], "{report:?}");
    assert!(report.usage_bytes <= budget, "{report:?}");
    let left: Vec<String> = store
        .list_images()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert!(left.contains(&r("a")) && left.contains(&r("b")), "{left:?}");

    // A tiny budget: everything but the leased image goes, and a stays
    // usable.
    drop(lease_a);
    drop(store);
    let store = w.store_with(ImageStoreOptions {
        cache_budget_bytes: Some(1),
        ..ImageStoreOptions::local_only()
    });
    let a = store.resolve(&r("a")).await.unwrap();
    let lease = store.lease(&a);
    let report = store.gc().await.unwrap();
    assert_eq!(report.removed, vec![r("b")], "{report:?}");
    assert!(
        store
            .list_images()
            .iter()
            .all(|i| i.manifest_digest != b_digest)
    );
    assert_eq!(store.resolve(&r("a")).await.unwrap(), a);
    drop(lease);

    // remove_image by name; then it is not cached.
    let removed = store.remove_image(&r("a")).await.unwrap();
    assert_eq!(removed.references, vec![r("a")]);
    assert!(removed.freed_bytes >= 1 << 20);
    let e = store.remove_image(&r("a")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(w.cache_counts().1, 0, "no blobs left");
}

#[tokio::test]
async fn local_layouts_are_listed_and_their_disks_collected() {
    require_root();
    let w = World::new();
    w.image("app", vec![Tar::new().file("f", b"x").build()]);
    let store = w.store();
    let image = store.resolve("app").await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    let listed = store.list_images();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reference, "app:latest");
    assert_eq!(listed[0].size_bytes, 0, "blobs stay in the layout");
    assert!(listed[0].disk_bytes.is_some());
    store.remove_image("app").await.unwrap();
    assert!(!disk.path.exists());
    assert!(
        w.layout("app").join("index.json").exists(),
        "the layout is untouched"
    );
}

#[tokio::test]
async fn fetches_collect_automatically_over_budget() {
    let w = World::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        w.src_image(
            &format!("{name}:v1"),
            vec![incompressible("data", 1 << 20, i as u8)],
            ImageConfig::default(),
        );
    }
    let r = |name: &str| format!("oci:{}:v1", w.src(name).display());
    let store = w.store_with(ImageStoreOptions {
        cache_budget_bytes: Some((5 << 20) / 2),
        ..ImageStoreOptions::local_only()
    });
    let a = store.resolve(&r("a")).await.unwrap();
    let _lease = store.lease(&a);
    store.resolve(&r("b")).await.unwrap();
    // Over budget now: b is the least recently used image nobody holds.
    store.resolve(&r("c")).await.unwrap();
    let left: Vec<String> = store
        .list_images()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(left, vec![r("c"), r("a")]);
    assert!(store.cache_usage_bytes().unwrap() <= (5 << 20) / 2);
}
