//! Pulls from a real registry (Debian's docker-registry on loopback):
//! pull and convert, indexes and platforms, single flight, restarts
//! without network, authentication, and every way a pull can go wrong,
//! each leaving nothing in the cache.

mod common;

use std::sync::{Arc, Mutex};

use common::registry::{PASSWORD, Registry, USER, dead_addr};
use common::{Tar, World, cat, ls, require_root, stat};
use serde_json::json;
use somna_images::mkimage::{LayerInput, set_tag, write_blob};
use somna_images::{
    Digest, ErrorKind, ImageConfig, ImageError, ImageSource, LayerCompression,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, PullEvent,
};

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A two-layer image with what conversion must carry over, and a
/// whiteout and an opaque directory in the upper layer.
fn rich_layers() -> Vec<LayerInput> {
    let l1 = Tar::new()
        .dir("bin")
        .file_owned("bin/su", b"#!su", 0o4755, 0, 0)
        .file("bin/tool", b"tool v1")
        .hardlink("bin/tool-hl", "bin/tool")
        .symlink("bin/sh", "/bin/tool")
        .dir_owned("home/user", 0o750, 1000, 1000)
        .file_with_xattrs("bin/capped", b"cap", &[("user.somna", b"yes")])
        .dir("dev")
        .char_device("dev/null", 1, 3)
        .dir("etc")
        .file("etc/gone", b"x")
        .dir("opt")
        .file("opt/old", b"old")
        .build();
    let l2 = Tar::new()
        .whiteout("etc/gone")
        .opaque("opt")
        .file("opt/new", b"new")
        .file("etc/motd", b"hello from the registry")
        .build();
    let second = if cfg!(feature = "zstd") {
        LayerCompression::Zstd
    } else {
        LayerCompression::Gzip
    };
    vec![
        LayerInput::tar(l1),
        LayerInput::tar(l2).with_compression(second),
    ]
}

fn config() -> ImageConfig {
    ImageConfig {
        env: vec![
            ("PATH".into(), "/bin".into()),
            ("GREETING".into(), "hi".into()),
        ],
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo hi".into()],
        working_dir: Some("/home/user".into()),
        user: Some("1000:1000".into()),
        exposed_ports: vec!["8080/tcp".into()],
    }
}

#[tokio::test]
async fn pull_convert_and_reuse_without_network() {
    require_root();
    provider();
    let w = World::new();
    let mut reg = Registry::start();
    let written = w.src_image("rich:v1", rich_layers(), config());
    reg.push_layout(&w.src("rich"), "v1", "team/rich:v1");

    let store = w.store_with(reg.options());
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let reference = reg.reference("team/rich:v1");
    let image = store
        .pull(&reference, &move |e| ev.lock().unwrap().push(e))
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, written.manifest_digest);
    assert_eq!(image.reference.to_string(), reference);
    assert_eq!(image.config, config());
    assert_eq!(
        image.source,
        ImageSource::Registry {
            registry: reg.addr.clone(),
            repository: "team/rich".into()
        }
    );
    let stats = store.stats();
    assert_eq!((stats.pulls, stats.blob_downloads), (1, 3), "{stats:?}");

    // Progress: the layer list, each layer to completion, then done.
    let events = events.lock().unwrap().clone();
    let Some(PullEvent::Resolved { layers, .. }) = events.first() else {
        panic!("{events:?}")
    };
    assert_eq!(layers.len(), 2);
    for (digest, size) in layers {
        assert!(events.iter().any(|e| matches!(e,
            PullEvent::Layer { digest: d, done, total, cached: false } if d == digest && done == total && total == size)));
    }
    assert!(matches!(events.last(), Some(PullEvent::Done { .. })));

    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(ls(&disk.path, "/etc"), vec!["motd"]);
    assert_eq!(ls(&disk.path, "/opt"), vec!["new"]);
    assert_eq!(cat(&disk.path, "/etc/motd"), b"hello from the registry");
    let su = stat(&disk.path, "/bin/su").unwrap();
    assert_eq!(su.mode & 0o7777, 0o4755);
    assert_eq!(
        stat(&disk.path, "/bin/tool").unwrap().inode,
        stat(&disk.path, "/bin/tool-hl").unwrap().inode
    );
    assert_eq!(
        stat(&disk.path, "/bin/sh")
            .unwrap()
            .symlink_target
            .as_deref(),
        Some("/bin/tool")
    );
    assert_eq!(stat(&disk.path, "/dev/null").unwrap().device, Some((1, 3)));
    assert_eq!(stat(&disk.path, "/home/user").unwrap().uid, 1000);
    assert_eq!(
        stat(&disk.path, "/bin/capped")
            .unwrap()
            .xattrs
            .get("user.somna")
            .map(String::as_str),
        Some("yes")
    );

    // By digest, and a second resolve: from the cache, no pull.
    let pinned = format!("{}/team/rich@{}", reg.addr, written.manifest_digest);
    assert_eq!(
        store.resolve(&pinned).await.unwrap().manifest_digest,
        written.manifest_digest
    );
    let stats_before = store.stats();
    store.resolve(&reference).await.unwrap();
    assert_eq!(store.stats().pulls, stats_before.pulls);

    // A restarted store, with the registry gone: everything from the cache.
    drop(store);
    reg.stop();
    let store = w.store_with(reg.options());
    let again = store.resolve(&reference).await.unwrap();
    assert_eq!(again, image);
    let disk2 = store.root_disk(&again).await.unwrap();
    assert_eq!(disk2, disk);
    let s = store.stats();
    assert_eq!((s.pulls, s.blob_downloads, s.conversions), (0, 0, 0));
    let listed = store.list_images();
    assert!(
        listed
            .iter()
            .any(|i| i.reference == reference && i.disk_bytes.is_some()),
        "{listed:?}"
    );

    // An explicit pull must ask the registry, which is gone now.
    let e = store.pull(&reference, &|_| {}).await.unwrap_err();
    assert!(matches!(e, ImageError::RegistryUnreachable { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_download_once() {
    require_root();
    provider();
    let w = World::new();
    let reg = Registry::start();
    w.src_image("app:v1", rich_layers(), ImageConfig::default());
    reg.push_layout(&w.src("app"), "v1", "app:v1");
    let store = w.store_with(reg.options());
    let reference = reg.reference("app:v1");
    let create = |store: somna_images::ImageStore, reference: String| async move {
        let image = store.resolve(&reference).await?;
        let _lease = store.lease(&image);
        store.root_disk(&image).await
    };
    let (a, b) = tokio::join!(
        tokio::spawn(create(store.clone(), reference.clone())),
        tokio::spawn(create(store.clone(), reference.clone()))
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a, b);
    let s = store.stats();
    assert_eq!(s.pulls, 1, "{s:?}");
    assert_eq!(s.blob_downloads, 3, "config and two layers, once: {s:?}");
    assert_eq!(s.conversions, 1, "{s:?}");
}

#[tokio::test]
async fn multi_arch_index_picks_linux_amd64() {
    provider();
    let w = World::new();
    let reg = Registry::start();
    // Two images in one layout, then an index naming them by platform.
    let amd = w.src_image(
        "multi:amd",
        vec![LayerInput::tar(Tar::new().file("arch", b"amd64").build())],
        ImageConfig::default(),
    );
    let arm_config =
        br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layout = w.src("multi");
    let arm_config_digest = write_blob(&layout, arm_config).unwrap();
    let arm_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": arm_config_digest.to_string(), "size": arm_config.len()},
        "layers": []
    }))
    .unwrap();
    let arm_digest = write_blob(&layout, &arm_manifest).unwrap();
    let index_for = |entries: Vec<serde_json::Value>| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries
        }))
        .unwrap()
    };
    let arm_entry = json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": arm_digest.to_string(), "size": arm_manifest.len(), "platform": {"architecture": "arm64", "os": "linux"}});
    let amd_entry = json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": amd.manifest_digest.to_string(), "size": amd.manifest_size, "platform": {"architecture": "amd64", "os": "linux"}});
    let both = index_for(vec![arm_entry.clone(), amd_entry]);
    let both_digest = write_blob(&layout, &both).unwrap();
    let arm_only = index_for(vec![arm_entry]);
    let arm_only_digest = write_blob(&layout, &arm_only).unwrap();
    let tag = |t: &str, d: &Digest, n: usize| {
        set_tag(
            &layout,
            &format!("multi:{t}").parse().unwrap(),
            MEDIA_TYPE_OCI_INDEX,
            d,
            n as u64,
        )
        .unwrap()
    };
    tag("both", &both_digest, both.len());
    tag("armonly", &arm_only_digest, arm_only.len());
    reg.push_layout(&layout, "both", "multi:both");
    reg.push_layout(&layout, "armonly", "multi:armonly");

    let store = w.store_with(reg.options());
    let image = store.resolve(&reg.reference("multi:both")).await.unwrap();
    assert_eq!(image.manifest_digest, amd.manifest_digest);

    let before = w.cache_counts();
    let e = store
        .resolve(&reg.reference("multi:armonly"))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::PlatformNotFound { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.contains("multi:armonly") && msg.contains("linux/arm64"),
        "{msg}"
    );
    assert_eq!(w.cache_counts(), before, "nothing cached");

    // A plain arm64 manifest (no index): refused once its config is read.
    reg.push_raw(
        "armplain:v1",
        &[arm_config.to_vec()],
        &arm_manifest,
        MEDIA_TYPE_OCI_MANIFEST,
    )
    .await;
    let e = store
        .resolve(&reg.reference("armplain:v1"))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::UnsupportedPlatform { .. }), "{e}");
    assert!(e.to_string().contains("armplain:v1"), "{e}");
    assert_eq!(w.cache_counts(), before, "nothing cached");
}

#[tokio::test]
async fn authentication_right_wrong_and_missing() {
    provider();
    let w = World::new();
    let reg = Registry::start_with_auth();
    w.src_image(
        "private:v1",
        vec![LayerInput::tar(Tar::new().file("secret", b"s").build())],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("private"), "v1", "private:v1");
    let reference = reg.reference("private:v1");

    for (options, what) in [
        (reg.options(), "no credentials"),
        (
            reg.options_with_credentials(USER, "wrong"),
            "wrong password",
        ),
        (
            reg.options_with_credentials("mallory", PASSWORD),
            "wrong user",
        ),
    ] {
        let store = w.store_with(options);
        let e = store.resolve(&reference).await.unwrap_err();
        assert!(matches!(e, ImageError::AuthFailed { .. }), "{what}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unauthenticated);
        assert!(e.to_string().contains("private:v1"), "{e}");
        assert_eq!(w.cache_counts(), (0, 0, 0, 0), "{what}: nothing cached");
    }

    let store = w.store_with(reg.options_with_credentials(USER, PASSWORD));
    store.resolve(&reference).await.unwrap();
    drop(store);

    // Credentials from a docker config.json (what `docker login` writes).
    let w2 = World::new();
    let config = w2.tmp.path().join("docker-config.json");
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{USER}:{PASSWORD}"),
    );
    std::fs::write(
        &config,
        json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let mut options = reg.options();
    options.registry.docker_config = Some(config);
    let store = w2.store_with(options);
    store.resolve(&reference).await.unwrap();
}

#[tokio::test]
async fn bearer_token_flow() {
    provider();
    let w = World::new();
    let reg = Registry::start_with_token();
    w.src_image(
        "private:v1",
        vec![LayerInput::tar(Tar::new().file("secret", b"s").build())],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("private"), "v1", "team/private:v1");
    let reference = reg.reference("team/private:v1");
    let token = reg.token.as_ref().unwrap();

    for (options, what) in [
        (reg.options(), "anonymous"),
        (
            reg.options_with_credentials(USER, "wrong"),
            "wrong password",
        ),
    ] {
        let store = w.store_with(options);
        let e = store.resolve(&reference).await.unwrap_err();
        assert!(matches!(e, ImageError::AuthFailed { .. }), "{what}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unauthenticated);
        assert!(e.to_string().contains("team/private:v1"), "{e}");
        assert_eq!(w.cache_counts(), (0, 0, 0, 0), "{what}: nothing cached");
    }
    let before = token.issued.load(std::sync::atomic::Ordering::SeqCst);
    let store = w.store_with(reg.options_with_credentials(USER, PASSWORD));
    let image = store.resolve(&reference).await.unwrap();
    assert_eq!(image.layers.len(), 1);
    assert!(
        token.issued.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the pull went through the token server"
    );
}

#[tokio::test]
async fn unknown_image_tag_and_unreachable_registry() {
    provider();
    let w = World::new();
    let reg = Registry::start();
    w.src_image(
        "app:v1",
        vec![LayerInput::tar(Tar::new().file("f", b"x").build())],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("app"), "v1", "app:v1");
    let store = w.store_with(reg.options());

    for r in [reg.reference("app:nope"), reg.reference("nothing:v1")] {
        let e = store.resolve(&r).await.unwrap_err();
        assert!(matches!(e, ImageError::ManifestUnknown { .. }), "{r}: {e}");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains(&r), "{e}");
    }
    let dead = dead_addr();
    let mut options = reg.options();
    options.registry.insecure_registries.push(dead.clone());
    drop(store);
    let store = w.store_with(options);
    let r = format!("{dead}/app:v1");
    let e = store.resolve(&r).await.unwrap_err();
    assert!(matches!(e, ImageError::RegistryUnreachable { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.to_string().contains(&r), "{e}");
    assert_eq!(w.cache_counts(), (0, 0, 0, 0));

    // A registry not marked insecure is spoken to over HTTPS, which a
    // plain-HTTP registry cannot answer.
    drop(store);
    let mut options = reg.options();
    options.registry.insecure_registries.clear();
    let store = w.store_with(options);
    let e = store.resolve(&reg.reference("app:v1")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(w.cache_counts(), (0, 0, 0, 0));
}

#[tokio::test]
async fn corrupt_and_truncated_blobs_are_refused_and_not_kept() {
    provider();
    let w = World::new();
    let reg = Registry::start();
    let written = w.src_image(
        "app:v1",
        vec![
            LayerInput::tar(Tar::new().file("a", &[1u8; 50_000]).build()),
            LayerInput::tar(Tar::new().file("b", &[2u8; 50_000]).build()),
        ],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("app"), "v1", "app:v1");
    let store = w.store_with(reg.options());
    let reference = reg.reference("app:v1");
    let blob = reg.blob_file(&written.layers[1].0);
    let good = std::fs::read(&blob).unwrap();

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    let e = store.resolve(&reference).await.unwrap_err();
    assert!(matches!(e, ImageError::BlobVerification { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::DataLoss);
    let msg = e.to_string();
    assert!(
        msg.contains("app:v1") && msg.contains(&written.layers[1].0.to_string()),
        "{msg}"
    );
    assert_eq!(
        w.cache_counts(),
        (0, 0, 0, 0),
        "the good layer and the manifest are gone too"
    );

    std::fs::write(&blob, &good[..good.len() / 3]).unwrap();
    let e = store.resolve(&reference).await.unwrap_err();
    assert!(matches!(e, ImageError::BlobVerification { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(w.cache_counts(), (0, 0, 0, 0));

    std::fs::write(&blob, &good).unwrap();
    store.resolve(&reference).await.unwrap();
}

#[tokio::test]
async fn corrupt_compressed_layers_fail_conversion_naming_the_image() {
    require_root();
    provider();
    let w = World::new();
    let reg = Registry::start();
    // Well-formed blobs (their digests match) holding broken gzip/zstd:
    // only unpacking can tell.
    let tar = Tar::new().file("f", &[5u8; 200_000]).build();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    let truncated_gz = gz[..gz.len() / 2].to_vec();
    let mut garbage_gz = gz.clone();
    for b in &mut garbage_gz[20..60] {
        *b ^= 0x55;
    }
    let diff_id = Digest::of(&tar);
    let mut cases = vec![
        (
            "truncgz",
            truncated_gz,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "badgz",
            garbage_gz,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
    ];
    #[cfg(feature = "zstd")]
    {
        let z = zstd::encode_all(&tar[..], 3).unwrap();
        cases.push((
            "truncz",
            z[..z.len() / 2].to_vec(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ));
    }
    let store = w.store_with(reg.options());
    for (name, layer, media_type) in cases {
        let config = serde_json::to_vec(&json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[diff_id.to_string()]}})).unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": media_type, "digest": Digest::of(&layer).to_string(), "size": layer.len()}]
        })).unwrap();
        reg.push_raw(
            &format!("{name}:v1"),
            &[config, layer],
            &manifest,
            MEDIA_TYPE_OCI_MANIFEST,
        )
        .await;
        let image = store
            .resolve(&reg.reference(&format!("{name}:v1")))
            .await
            .unwrap();
        let e = store.root_disk(&image).await.unwrap_err();
        assert!(matches!(e, ImageError::Conversion { .. }), "{name}: {e}");
        assert!(
            matches!(
                e.cause(),
                ImageError::InvalidLayer { .. } | ImageError::DiffIdMismatch { .. }
            ),
            "{name}: {e}"
        );
        assert_eq!(e.kind(), ErrorKind::DataLoss, "{name}");
        assert!(e.to_string().contains(&format!("{name}:v1")), "{e}");
        assert!(!store.root_disk_path(&image.manifest_digest).exists());
        assert_eq!(w.cache_counts().3, 0, "tmp is empty");
    }
}

#[tokio::test]
async fn unknown_media_types_are_refused_before_download() {
    provider();
    let w = World::new();
    let reg = Registry::start();
    let store = w.store_with(reg.options());
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#.to_vec();
    let layer = b"not a tar".to_vec();
    let manifest = |config_type: &str, layer_type: &str| {
        serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": Digest::of(&config).to_string(), "size": config.len()},
        "layers": [{"mediaType": layer_type, "digest": Digest::of(&layer).to_string(), "size": layer.len()}]
    })).unwrap()
    };
    reg.push_raw(
        "weird:layer",
        &[config.clone(), layer.clone()],
        &manifest(
            "application/vnd.oci.image.config.v1+json",
            "application/x-somna-unknown",
        ),
        MEDIA_TYPE_OCI_MANIFEST,
    )
    .await;
    reg.push_raw(
        "weird:artifact",
        &[config.clone(), layer.clone()],
        &manifest(
            "application/vnd.cncf.helm.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar",
        ),
        MEDIA_TYPE_OCI_MANIFEST,
    )
    .await;
    for tag in ["weird:layer", "weird:artifact"] {
        let e = store.resolve(&reg.reference(tag)).await.unwrap_err();
        assert!(
            matches!(e, ImageError::UnsupportedMediaType { .. }),
            "{tag}: {e}"
        );
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains(tag), "{e}");
    }
    assert_eq!(
        store.stats().blob_downloads,
        1,
        "only the first image's config was fetched"
    );
    assert_eq!(w.cache_counts(), (0, 0, 0, 0));
}

#[tokio::test]
async fn size_limits_and_decompression_bombs() {
    require_root();
    provider();
    let w = World::new();
    let reg = Registry::start();
    // 64 MiB of zeros: a few dozen KiB gzipped.
    let bomb = Tar::new().file("zeros", &vec![0u8; 64 << 20]).build();
    let written = w.src_image(
        "bomb:v1",
        vec![LayerInput::tar(bomb)],
        ImageConfig::default(),
    );
    assert!(written.layers[0].1 < 1 << 20);
    reg.push_layout(&w.src("bomb"), "v1", "bomb:v1");
    let reference = reg.reference("bomb:v1");

    // A per-layer limit under the compressed size: refused before download.
    let mut options = reg.options();
    options.limits.max_layer_bytes = 1000;
    let store = w.store_with(options);
    let e = store.resolve(&reference).await.unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
    assert!(e.to_string().contains("bomb:v1"), "{e}");
    assert_eq!(store.stats().blob_downloads, 1, "the config only");
    assert_eq!(w.cache_counts(), (0, 0, 0, 0));
    drop(store);

    // An image limit the compressed layer fits but the unpacked one does
    // not: unpacking stops at the limit.
    let mut options = reg.options();
    options.limits.max_image_bytes = 8 << 20;
    let store = w.store_with(options);
    let image = store.resolve(&reference).await.unwrap();
    let e = store.root_disk(&image).await.unwrap_err();
    assert!(
        matches!(e.cause(), ImageError::UnpackedTooLarge { .. }),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
    assert!(e.to_string().contains("bomb:v1"), "{e}");
    assert!(!store.root_disk_path(&image.manifest_digest).exists());
    assert_eq!(w.cache_counts().3, 0, "the unpacked tree is gone");
}

#[tokio::test]
async fn hostile_layers_never_write_outside_the_image() {
    require_root();
    provider();
    let w = World::new();
    let reg = Registry::start();
    let store = w.store_with(reg.options());
    let outside = w.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let outside_s = outside.to_str().unwrap();

    // Symlinks planted to point out of the root, then written through:
    // resolved inside the root (as the guest would see them).
    let plant = Tar::new()
        .symlink("escape", outside_s)
        .symlink("up", "../../../../../../..")
        .build();
    let through = Tar::new()
        .file("escape/pwned", b"x")
        .file(&format!("up{outside_s}/pwned2"), b"x")
        .build();
    w.src_image(
        "links:v1",
        vec![LayerInput::tar(plant), LayerInput::tar(through)],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("links"), "v1", "links:v1");
    let image = store.resolve(&reg.reference("links:v1")).await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert_eq!(cat(&disk.path, &format!("{outside_s}/pwned")), b"x");
    assert_eq!(cat(&disk.path, &format!("{outside_s}/pwned2")), b"x");

    // `..`, absolute paths and hard links out of the root are refused.
    for (name, layer) in [
        ("dotdot", Tar::new().raw_file(b"../../evil", b"x").build()),
        (
            "absolute",
            Tar::new()
                .raw_file(format!("{outside_s}/evil").as_bytes(), b"x")
                .build(),
        ),
        (
            "hardlink",
            Tar::new().raw_hardlink("h", b"../../../etc/passwd").build(),
        ),
        (
            "hardlink-abs",
            Tar::new().raw_hardlink("h", b"/etc/passwd").build(),
        ),
    ] {
        let tag = format!("{name}:v1");
        w.src_image(&tag, vec![LayerInput::tar(layer)], ImageConfig::default());
        reg.push_layout(&w.src(name), "v1", &tag);
        let image = store.resolve(&reg.reference(&tag)).await.unwrap();
        let e = store.root_disk(&image).await.unwrap_err();
        assert!(
            matches!(e.cause(), ImageError::InvalidLayerEntry { .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains(&tag), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    // Device nodes and setuid files stay what they are, inside the disk;
    // while unpacking they live in the cache's private (0700) tmp.
    let special = Tar::new()
        .char_device("mem", 1, 1)
        .file_owned("suid", b"x", 0o6755, 0, 0)
        .build();
    w.src_image(
        "special:v1",
        vec![LayerInput::tar(special)],
        ImageConfig::default(),
    );
    reg.push_layout(&w.src("special"), "v1", "special:v1");
    let image = store.resolve(&reg.reference("special:v1")).await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(stat(&disk.path, "/mem").unwrap().device, Some((1, 1)));
    assert_eq!(stat(&disk.path, "/suid").unwrap().mode & 0o7777, 0o6755);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(w.cache().join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

/// The project's own test images (scripts/setup.sh builds them and sets
/// SOMNA_TEST_IMAGE_DIR for `setup.sh test`): pushed with skopeo, pulled
/// and converted.
#[tokio::test]
async fn project_images_through_the_registry() {
    require_root();
    provider();
    let Some(dir) = std::env::var_os("SOMNA_TEST_IMAGE_DIR").map(std::path::PathBuf::from) else {
        eprintln!("SOMNA_TEST_IMAGE_DIR is not set: skipping the busybox/python registry test");
        return;
    };
    let w = World::new();
    let reg = Registry::start();
    let store = w.store_with(reg.options());
    for (name, probe) in [("busybox", "/bin/busybox"), ("python", "/usr/bin/python3")] {
        let layout = dir.join(name);
        if !layout.join("index.json").exists() {
            eprintln!("{} missing: skipping {name}", layout.display());
            continue;
        }
        reg.push_layout(&layout, "latest", &format!("{name}:latest"));
        let image = store
            .resolve(&reg.reference(&format!("{name}:latest")))
            .await
            .unwrap();
        let disk = store.root_disk(&image).await.unwrap();
        assert!(
            stat(&disk.path, probe).is_some(),
            "{name}: {probe} in the disk"
        );
    }
}
