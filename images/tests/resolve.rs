//! Resolving references in OCI image layouts.

mod common;

use std::fs;

use common::{Tar, World};
use serde_json::{Value, json};
use somna_images::mkimage::{LayerInput, set_tag, write_blob};
use somna_images::{
    ErrorKind, ImageConfig, ImageError, ImageReference, ImageSource, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

fn layer() -> Vec<u8> {
    Tar::new().file("f", b"x").build()
}

fn edit_index(w: &World, name: &str, f: impl FnOnce(&mut Value)) {
    let p = w.layout(name).join("index.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[tokio::test]
async fn resolves_tags_and_config() {
    let w = World::new();
    let config = ImageConfig {
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        entrypoint: vec![],
        cmd: vec!["sh".into()],
        working_dir: Some("/home/user".into()),
        user: Some("1000".into()),
        exposed_ports: vec!["8080/tcp".into()],
    };
    let latest = w.image_with("app", vec![LayerInput::tar(layer())], config.clone());
    let v2 = w.image_with(
        "app:v2",
        vec![LayerInput::tar(Tar::new().file("g", b"y").build())],
        ImageConfig::default(),
    );
    assert_ne!(latest.manifest_digest, v2.manifest_digest);
    let store = w.store();

    let image = store.resolve("app").await.unwrap();
    assert_eq!(image.reference.to_string(), "app:latest");
    assert_eq!(image.manifest_digest, latest.manifest_digest);
    assert_eq!(image.config_digest, latest.config_digest);
    assert_eq!(image.config, config);
    assert_eq!(
        image.source,
        ImageSource::Layout {
            dir: w.layout("app")
        }
    );
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].digest, latest.layers[0].0);
    assert_eq!(image.layers[0].size, latest.layers[0].1);
    assert_eq!(image.layers[0].diff_id, latest.layers[0].2);
    assert_eq!(
        image.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    assert_eq!(
        store.resolve("app:latest").await.unwrap().manifest_digest,
        latest.manifest_digest
    );
    assert_eq!(
        store.resolve("app:v2").await.unwrap().manifest_digest,
        v2.manifest_digest
    );
    // By digest.
    let by_digest = store
        .resolve(&format!("app@{}", v2.manifest_digest))
        .await
        .unwrap();
    assert_eq!(by_digest.manifest_digest, v2.manifest_digest);

    // A full name:tag in the annotation is accepted too.
    edit_index(&w, "app", |v| {
        for m in v["manifests"].as_array_mut().unwrap() {
            let a = &mut m["annotations"]["org.opencontainers.image.ref.name"];
            if a == "v2" {
                *a = json!("app:v3");
            }
        }
    });
    assert_eq!(
        store.resolve("app:v3").await.unwrap().manifest_digest,
        v2.manifest_digest
    );
}

#[tokio::test]
async fn rewriting_a_tag_replaces_it_and_collects_garbage() {
    let w = World::new();
    let first = w.image("app", vec![layer()]);
    let second = w.image("app", vec![Tar::new().file("other", b"z").build()]);
    let store = w.store();
    assert_eq!(
        store.resolve("app").await.unwrap().manifest_digest,
        second.manifest_digest
    );
    let index: Value =
        serde_json::from_slice(&fs::read(w.layout("app").join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let blobs = w.layout("app").join("blobs/sha256");
    assert!(
        !blobs.join(first.manifest_digest.hex()).exists(),
        "old manifest collected"
    );
    assert!(
        !blobs.join(first.layers[0].0.hex()).exists(),
        "old layer collected"
    );
    assert!(blobs.join(second.layers[0].0.hex()).exists());
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 3);
}

#[tokio::test]
async fn later_directories_are_searched() {
    let w = World::new();
    let second_dir = w.tmp.path().join("more-images");
    let written = somna_images::mkimage::write_image(
        &second_dir.join("tools"),
        &somna_images::mkimage::NewImage {
            reference: "tools:1".into(),
            config: ImageConfig::default(),
            layers: vec![LayerInput::tar(layer())],
        },
    )
    .unwrap();
    // "tools" also exists in the first dir, without tag 1.
    w.image("tools:0", vec![layer()]);
    let store = somna_images::ImageStore::new(somna_images::ImageStoreConfig {
        local_dirs: vec![w.images(), second_dir.clone()],
        cache_dir: w.cache(),
    })
    .unwrap();
    let image = store.resolve("tools:1").await.unwrap();
    assert_eq!(image.manifest_digest, written.manifest_digest);
    assert_eq!(
        image.source,
        ImageSource::Layout {
            dir: second_dir.join("tools")
        }
    );
}

#[tokio::test]
async fn nested_index_picks_linux_amd64() {
    let w = World::new();
    let amd = w.image("multi:amd", vec![layer()]);
    let layout = w.layout("multi");
    let other = write_blob(&layout, b"{}").unwrap();
    let index = |entries: Vec<Value>| {
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}),
        )
        .unwrap()
    };
    let arm = json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": other.to_string(), "size": 2,
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}});
    let attestation = json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": other.to_string(), "size": 2,
        "platform": {"architecture": "unknown", "os": "unknown"}});
    let amd_desc = json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": amd.manifest_digest.to_string(),
        "size": amd.manifest_size, "platform": {"architecture": "amd64", "os": "linux"}});

    let multi = index(vec![arm.clone(), amd_desc.clone(), attestation.clone()]);
    let multi_digest = write_blob(&layout, &multi).unwrap();
    set_tag(
        &layout,
        &ImageReference::parse("multi:latest").unwrap(),
        MEDIA_TYPE_OCI_INDEX,
        &multi_digest,
        multi.len() as u64,
    )
    .unwrap();
    // An index inside an index.
    let outer = index(vec![
        json!({"mediaType": MEDIA_TYPE_OCI_INDEX, "digest": multi_digest.to_string(), "size": multi.len()}),
    ]);
    let outer_digest = write_blob(&layout, &outer).unwrap();
    set_tag(
        &layout,
        &ImageReference::parse("multi:nested").unwrap(),
        MEDIA_TYPE_OCI_INDEX,
        &outer_digest,
        outer.len() as u64,
    )
    .unwrap();
    let arm_only = index(vec![arm, attestation]);
    let arm_digest = write_blob(&layout, &arm_only).unwrap();
    set_tag(
        &layout,
        &ImageReference::parse("multi:arm").unwrap(),
        MEDIA_TYPE_OCI_INDEX,
        &arm_digest,
        arm_only.len() as u64,
    )
    .unwrap();

    let store = w.store();
    assert_eq!(
        store.resolve("multi").await.unwrap().manifest_digest,
        amd.manifest_digest
    );
    assert_eq!(
        store.resolve("multi:nested").await.unwrap().manifest_digest,
        amd.manifest_digest
    );
    let e = store.resolve("multi:arm").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.contains("no linux/amd64 manifest") && msg.contains("linux/arm64/v8"),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_tag_and_unknown_image_errors() {
    let w = World::new();
    w.image("app:v1", vec![layer()]);
    w.image("app:v2", vec![layer()]);
    let store = w.store();

    let e = store.resolve("app:v9").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.contains("app:v9") && msg.contains("no manifest tagged v9") && msg.contains("v1, v2"),
        "{msg}"
    );
    assert!(
        msg.contains(&w.layout("app").display().to_string()),
        "{msg}"
    );

    let e = store.resolve("nosuch").await.unwrap_err();
    assert!(matches!(e, ImageError::ImageNotFound { .. }));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(msg.contains("nosuch:latest"), "{msg}");
    assert!(msg.contains(&w.images().display().to_string()), "{msg}");
    assert!(msg.contains("registry pulls are disabled"), "{msg}");

    // Bad references never touch the file system.
    for bad in ["", "../app", "App", "/abs", "app:", "a/../../b"] {
        let e = store.resolve(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
    }

    // A directory that is half a layout.
    fs::create_dir_all(w.images().join("broken")).unwrap();
    fs::write(w.images().join("broken/index.json"), b"{}").unwrap();
    let e = store.resolve("broken").await.unwrap_err();
    assert!(e.to_string().contains("oci-layout is missing"), "{e}");
}

#[tokio::test]
async fn corrupt_manifest_and_config_are_detected() {
    let w = World::new();
    let written = w.image("app", vec![layer()]);
    let store = w.store();
    let blobs = w.layout("app").join("blobs/sha256");

    // Config: same size, one byte changed.
    let config_path = blobs.join(written.config_digest.hex());
    let original = fs::read(&config_path).unwrap();
    let mut bad = original.clone();
    let i = bad.iter().position(|&b| b == b'l').unwrap();
    bad[i] = b'L';
    fs::write(&config_path, &bad).unwrap();
    let e = store.resolve("app").await.unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::DataLoss);
    let msg = e.to_string();
    assert!(
        msg.contains(&written.config_digest.to_string()) && msg.contains("image config"),
        "{msg}"
    );
    fs::write(&config_path, &original).unwrap();
    store.resolve("app").await.unwrap();

    // Manifest: longer than its descriptor says.
    let manifest_path = blobs.join(written.manifest_digest.hex());
    let mut longer = fs::read(&manifest_path).unwrap();
    longer.push(b'\n');
    fs::write(&manifest_path, &longer).unwrap();
    let msg = store.resolve("app").await.unwrap_err().to_string();
    assert!(
        msg.contains("image manifest") && msg.contains(&written.manifest_digest.to_string()),
        "{msg}"
    );

    // Missing blob.
    fs::remove_file(&manifest_path).unwrap();
    let e = store.resolve("app").await.unwrap_err();
    assert!(matches!(e, ImageError::BlobMissing { .. }), "{e}");
}

#[tokio::test]
async fn foreign_platform_and_unknown_media_types_are_refused() {
    let w = World::new();
    let layout = w.layout("arm");
    let layer_blob = Tar::new().build();
    let layer_digest = write_blob(&layout, &layer_blob).unwrap();
    let config = serde_json::to_vec(&json!({"architecture": "arm64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]}}))
    .unwrap();
    let config_digest = write_blob(&layout, &config).unwrap();
    let manifest = |layer_type: &str| {
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": layer_type, "digest": layer_digest.to_string(), "size": layer_blob.len()}]})).unwrap()
    };
    let m = manifest("application/vnd.oci.image.layer.v1.tar");
    let md = write_blob(&layout, &m).unwrap();
    set_tag(
        &layout,
        &ImageReference::parse("arm").unwrap(),
        MEDIA_TYPE_OCI_MANIFEST,
        &md,
        m.len() as u64,
    )
    .unwrap();
    let store = w.store();
    let e = store.resolve("arm").await.unwrap_err();
    assert!(matches!(e, ImageError::UnsupportedPlatform { .. }), "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");

    // Same with an amd64 config but a layer type nobody knows.
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]}}))
    .unwrap();
    let config_digest = write_blob(&layout, &config).unwrap();
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/x-squashfs", "digest": layer_digest.to_string(), "size": layer_blob.len()}]})).unwrap();
    let md = write_blob(&layout, &m).unwrap();
    set_tag(
        &layout,
        &ImageReference::parse("arm:odd").unwrap(),
        MEDIA_TYPE_OCI_MANIFEST,
        &md,
        m.len() as u64,
    )
    .unwrap();
    let e = store.resolve("arm:odd").await.unwrap_err();
    assert!(matches!(e, ImageError::UnsupportedMediaType { .. }), "{e}");
    assert!(e.to_string().contains("application/x-squashfs"), "{e}");
}
