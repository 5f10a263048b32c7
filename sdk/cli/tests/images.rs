//! Images from a real registry (Debian's docker-registry on loopback):
//! pull on create, one download for concurrent creates, the cache, and the
//! `somna image` commands.

use somna_sdk::{Command, CreateOptions, Error};
use somna_testkit::{Artifacts, Options, Platform, Registry};

#[tokio::test(flavor = "multi_thread")]
async fn registry_images_are_pulled_once_cached_and_protected() {
    let registry = Registry::start();
    let artifacts = Artifacts::from_env();
    registry.push_layout(
        &artifacts.image_dir.join("busybox"),
        "latest",
        "tools/busybox:1",
    );
    registry.push_layout(
        &artifacts.image_dir.join("python"),
        "latest",
        "lang/python:3",
    );
    let reference = registry.reference("tools/busybox:1");

    let mut opts = Options::new(env!("CARGO_BIN_EXE_somna"));
    opts.insecure_registries = vec![registry.addr.clone()];
    let p = Platform::start(opts);
    let client = p.client().await;

    // Two creates of an image the host has never seen: one download, one
    // conversion.
    let (a, b) = tokio::join!(
        client.create_sandbox(CreateOptions::new(reference.clone())),
        client.create_sandbox(CreateOptions::new(reference.clone())),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    for sb in [&a, &b] {
        let out = sb
            .exec(Command::from_argv(["echo", "from-registry"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"from-registry\n");
    }
    let stats = client.list_images().await.unwrap().stats.unwrap();
    assert_eq!(
        (stats.pulls, stats.blob_downloads, stats.conversions),
        (1, 2, 1),
        "{stats:?}"
    );

    // A third create is served from the cache: no pull, no conversion.
    let c = client
        .create_sandbox(CreateOptions::new(reference.clone()))
        .await
        .unwrap();
    let again = client.list_images().await.unwrap();
    let s = again.stats.unwrap();
    assert_eq!((s.pulls, s.blob_downloads, s.conversions), (1, 2, 1));
    let record = again
        .images
        .iter()
        .find(|i| i.reference == reference)
        .expect("image listed");
    assert_eq!(record.in_use, 3);
    assert_eq!(record.source, "registry");

    // An image in use cannot be removed; once its sandboxes are gone it can.
    match client.remove_image(&reference).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("tools/busybox"), "{m}"),
        other => panic!("removing an image in use: {other:?}"),
    }
    for sb in [a, b, c] {
        sb.destroy().await.unwrap();
    }
    let removed = client.remove_image(&reference).await.unwrap();
    assert!(removed.removed.iter().any(|r| r == &reference));

    // The CLI pulls with progress and lists the cache.
    let out = p
        .cli()
        .args(["--json", "image", "pull", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["reference"], reference.as_str());
    assert!(done["downloaded_bytes"].as_u64().unwrap() > 0);
    let out = p.cli().args(["image", "ls"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("tools/busybox:1"));

    // The python image, through the registry too.
    let py = client
        .create_sandbox(CreateOptions::new(registry.reference("lang/python:3")))
        .await
        .unwrap();
    let out = py
        .exec(Command::from_argv(["python3", "-c", "print(2**100)"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"1267650600228229401496703205376\n");
    py.destroy().await.unwrap();

    // A tag the registry does not have, and a registry that is not there.
    match client
        .create_sandbox(CreateOptions::new(registry.reference("tools/busybox:nope")))
        .await
    {
        Err(Error::NotFound(m)) => assert!(m.contains("tools/busybox:nope"), "{m}"),
        other => panic!("unknown tag: {:?}", other.err()),
    }
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    match client
        .create_sandbox(CreateOptions::new(format!("{dead}/x:1")))
        .await
    {
        Err(Error::Unavailable(m)) => assert!(m.contains(&dead), "{m}"),
        other => panic!("unreachable registry: {:?}", other.err()),
    }
    assert!(p.vm_dirs().is_empty());
}
