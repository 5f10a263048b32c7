//! Root disks (build, contents, cache, single flight) and writable disks.
//! Disk contents are read with debugfs; nothing is mounted.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use common::{Tar, World, cat, ls, require_root, stat};
use somna_images::mkimage::LayerInput;
use somna_images::{
    ErrorKind, ImageConfig, ImageError, ImageStore, ImageStoreConfig, LayerCompression,
    create_writable_disk,
};

/// A tree with every kind of thing mkfs.ext4 -d must carry over.
fn special_tree(dir: &std::path::Path) {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let set_mode = |p: &str, mode: u32| {
        fs::set_permissions(dir.join(p), fs::Permissions::from_mode(mode)).unwrap()
    };
    let chown = |p: &str, uid: u32, gid: u32| {
        std::os::unix::fs::lchown(dir.join(p), Some(uid), Some(gid)).unwrap()
    };
    fs::create_dir_all(dir.join("home/user")).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/su"), b"#!/bin/su").unwrap();
    chown("bin/su", 0, 0);
    set_mode("bin/su", 0o4755);
    fs::write(dir.join("bin/wall"), b"wall").unwrap();
    chown("bin/wall", 0, 5);
    set_mode("bin/wall", 0o2755);
    set_mode("tmp", 0o1777);
    chown("home/user", 1000, 1000);
    set_mode("home/user", 0o750);
    fs::write(dir.join("home/user/.profile"), b"export X=1\n").unwrap();
    chown("home/user/.profile", 1000, 1000);
    fs::write(dir.join("bin/busybox"), vec![7u8; 10_000]).unwrap();
    set_mode("bin/busybox", 0o755);
    fs::hard_link(dir.join("bin/busybox"), dir.join("bin/busybox-hl")).unwrap();
    symlink("/bin/busybox", dir.join("bin/sh")).unwrap();
    symlink("x".repeat(100), dir.join("bin/long-link")).unwrap();
    fs::write(dir.join("bin/capped"), b"ping").unwrap();
    xattr::set(dir.join("bin/capped"), "user.somna", b"hello").unwrap();
    xattr::set(dir.join("bin/capped"), "trusted.blob", &[0u8, 1, 2, 255]).unwrap();
    fs::create_dir(dir.join("dev")).unwrap();
    nix::sys::stat::mknod(
        &dir.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    set_mode("dev/null", 0o666);
    nix::sys::stat::mknod(
        &dir.join("dev/loop9"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        nix::sys::stat::makedev(7, 9),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &dir.join("dev/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    set_mode("dev/fifo", 0o620);
    // mtimes last (creating entries changes directory mtimes).
    for p in [
        "bin/su",
        "bin/busybox",
        "home/user/.profile",
        "dev/null",
        "dev/fifo",
        "home/user",
        "bin",
        "tmp",
    ] {
        let t = nix::sys::time::TimeSpec::new(1_500_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &dir.join(p),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    let t = nix::sys::time::TimeSpec::new(1_400_000_000, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &dir.join("bin/sh"),
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

#[tokio::test]
async fn root_disk_preserves_everything() {
    require_root();
    let w = World::new();
    let tree = w.tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    special_tree(&tree);
    w.image_with(
        "special:latest",
        vec![LayerInput::dir(&tree)],
        ImageConfig::default(),
    );
    let store = w.store();
    let image = store.resolve("special").await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(disk.digest, image.manifest_digest);
    assert!(disk.size_bytes >= somna_images::MIN_ROOT_DISK_BYTES);
    assert_eq!(
        disk.path,
        w.cache()
            .join("disks")
            .join(format!("{}.ext4", image.manifest_digest.hex()))
    );
    let img = &disk.path;

    let root = stat(img, "/").unwrap();
    assert_eq!((root.uid, root.gid, root.mode), (0, 0, 0o755));

    let su = stat(img, "/bin/su").unwrap();
    assert_eq!(
        (su.mode, su.uid, su.gid, su.mtime),
        (0o4755, 0, 0, 1_500_000_000)
    );
    let wall = stat(img, "/bin/wall").unwrap();
    assert_eq!((wall.mode, wall.gid), (0o2755, 5));
    let tmp = stat(img, "/tmp").unwrap();
    assert_eq!(
        (tmp.kind.as_str(), tmp.mode, tmp.mtime),
        ("directory", 0o1777, 1_500_000_000)
    );
    let home = stat(img, "/home/user").unwrap();
    assert_eq!(
        (home.mode, home.uid, home.gid, home.mtime),
        (0o750, 1000, 1000, 1_500_000_000)
    );
    let profile = stat(img, "/home/user/.profile").unwrap();
    assert_eq!((profile.uid, profile.gid, profile.size), (1000, 1000, 11));
    assert_eq!(cat(img, "/home/user/.profile"), b"export X=1\n");

    let bb = stat(img, "/bin/busybox").unwrap();
    let bb2 = stat(img, "/bin/busybox-hl").unwrap();
    assert_eq!(bb.inode, bb2.inode, "hard links share an inode");
    assert_eq!(bb.links, 2);
    assert_eq!(cat(img, "/bin/busybox-hl"), vec![7u8; 10_000]);

    let sh = stat(img, "/bin/sh").unwrap();
    assert_eq!(sh.kind, "symlink");
    assert_eq!(sh.symlink_target.as_deref(), Some("/bin/busybox"));
    assert_eq!(sh.mtime, 1_400_000_000);
    let long = stat(img, "/bin/long-link").unwrap();
    assert_eq!((long.kind.as_str(), long.size), ("symlink", 100));

    let capped = stat(img, "/bin/capped").unwrap();
    assert_eq!(
        capped.xattrs.get("user.somna").map(String::as_str),
        Some("hello")
    );
    assert_eq!(
        capped.xattrs.get("trusted.blob").map(|s| s.trim()),
        Some("00 01 02 ff")
    );

    let null = stat(img, "/dev/null").unwrap();
    assert_eq!(
        (null.kind.as_str(), null.mode, null.device),
        ("character special", 0o666, Some((1, 3)))
    );
    let lp = stat(img, "/dev/loop9").unwrap();
    assert_eq!(
        (lp.kind.as_str(), lp.device),
        ("block special", Some((7, 9)))
    );
    let fifo = stat(img, "/dev/fifo").unwrap();
    assert_eq!((fifo.kind.as_str(), fifo.mode), ("FIFO", 0o620));

    // Read-only disk: no journal, no reserved blocks, the right label.
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Filesystem volume name:   somna-root"),
        "{text}"
    );
    assert!(!text.contains("has_journal"), "{text}");
    assert!(text.contains("Reserved block count:     0"), "{text}");
    // fsck finds nothing to fix.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // Nothing left in the build area; the disk is read-only.
    assert_eq!(fs::read_dir(w.cache().join("tmp")).unwrap().count(), 0);
    assert_eq!(fs::metadata(img).unwrap().mode() & 0o777, 0o444);
}

#[tokio::test]
async fn layers_whiteouts_and_compressions_in_a_disk() {
    require_root();
    let w = World::new();
    let l1 = Tar::new()
        .dir("etc")
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .dir("opt")
        .file("opt/old", b"old")
        .build();
    let l2 = Tar::new()
        .whiteout("etc/a")
        .opaque("opt")
        .file("opt/new", b"new")
        .build();
    let l3 = Tar::new()
        .file("etc/c", b"c")
        .hardlink("etc/c2", "etc/b")
        .build();
    let third = if cfg!(feature = "zstd") {
        LayerCompression::Zstd
    } else {
        LayerCompression::Gzip
    };
    w.image_with(
        "multi:v1",
        vec![
            LayerInput::tar(l1).with_compression(LayerCompression::None),
            LayerInput::tar(l2),
            LayerInput::tar(l3).with_compression(third),
        ],
        ImageConfig::default(),
    );
    let store = w.store();
    let image = store.resolve("multi:v1").await.unwrap();
    let compressions: Vec<_> = image.layers.iter().map(|l| l.compression).collect();
    assert_eq!(
        compressions,
        [LayerCompression::None, LayerCompression::Gzip, third]
    );
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(ls(&disk.path, "/etc"), vec!["b", "c", "c2"]);
    assert_eq!(ls(&disk.path, "/opt"), vec!["new"]);
    assert_eq!(
        stat(&disk.path, "/etc/b").unwrap().inode,
        stat(&disk.path, "/etc/c2").unwrap().inode
    );
    assert_eq!(cat(&disk.path, "/etc/c2"), b"b");
}

#[tokio::test]
async fn cached_disk_is_not_rebuilt() {
    require_root();
    let w = World::new();
    w.image("app", vec![Tar::new().file("hello", b"hi").build()]);
    let store = w.store();
    let image = store.resolve("app").await.unwrap();
    assert_eq!(store.disk_builds(), 0);
    let first = store.root_disk(&image).await.unwrap();
    assert_eq!(store.disk_builds(), 1);
    let m1 = fs::metadata(&first.path).unwrap();

    let start = Instant::now();
    let second = store.root_disk(&image).await.unwrap();
    let hit = start.elapsed();
    assert_eq!(first, second);
    assert_eq!(store.disk_builds(), 1, "a cache hit builds nothing");
    let m2 = fs::metadata(&second.path).unwrap();
    assert_eq!(
        (m1.ino(), m1.mtime(), m1.mtime_nsec(), m1.ctime_nsec()),
        (m2.ino(), m2.mtime(), m2.mtime_nsec(), m2.ctime_nsec())
    );
    eprintln!("cache hit took {:?}", hit);

    // A new store on the same cache (after this one is gone) finds it too.
    drop(store);
    let store = w.store();
    let again = store.root_disk(&image).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(store.disk_builds(), 0);
    assert_eq!(fs::metadata(&again.path).unwrap().ino(), m1.ino());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_build_once() {
    require_root();
    let w = World::new();
    w.image(
        "app",
        vec![Tar::new().file("hello", &vec![1u8; 1 << 20]).build()],
    );
    let store = w.store();
    let image = store.resolve("app").await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        let image = image.clone();
        set.spawn(async move { store.root_disk(&image).await });
    }
    let mut disks = Vec::new();
    while let Some(r) = set.join_next().await {
        disks.push(r.unwrap().unwrap());
    }
    assert_eq!(disks.len(), 8);
    assert!(disks.iter().all(|d| *d == disks[0]));
    assert_eq!(store.disk_builds(), 1);
}

#[tokio::test]
async fn corrupt_layer_is_reported_and_nothing_is_cached() {
    require_root();
    let w = World::new();
    let written = w.image(
        "app",
        vec![Tar::new().file("f", &vec![3u8; 100_000]).build()],
    );
    let store = w.store();
    let image = store.resolve("app").await.unwrap();
    let (layer_digest, _, _) = &written.layers[0];
    let blob = w
        .layout("app")
        .join("blobs/sha256")
        .join(layer_digest.hex());
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&blob, &data).unwrap();

    let e = store.root_disk(&image).await.unwrap_err();
    assert!(
        matches!(e.cause(), ImageError::DigestMismatch { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("app:latest"), "{e}");
    assert_eq!(e.kind(), ErrorKind::DataLoss);
    let msg = e.to_string();
    assert!(
        msg.contains(&layer_digest.to_string()) && msg.contains("layer"),
        "{msg}"
    );
    assert!(!store.root_disk_path(&image.manifest_digest).exists());
    assert_eq!(fs::read_dir(w.cache().join("tmp")).unwrap().count(), 0);
    assert_eq!(store.disk_builds(), 0);

    // Truncated: the size is named.
    fs::write(&blob, &data[..10]).unwrap();
    let msg = store.root_disk(&image).await.unwrap_err().to_string();
    assert!(msg.contains("found 10 bytes"), "{msg}");

    // Missing.
    fs::remove_file(&blob).unwrap();
    let e = store.root_disk(&image).await.unwrap_err();
    assert!(matches!(e.cause(), ImageError::BlobMissing { .. }), "{e}");
}

#[tokio::test]
async fn startup_removes_leftovers_and_the_cache_is_exclusive() {
    let w = World::new();
    let store = w.store();
    let err = ImageStore::new(ImageStoreConfig {
        local_dirs: vec![],
        cache_dir: w.cache(),
    })
    .unwrap_err();
    assert!(matches!(err, ImageError::CacheBusy { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    drop(store);

    // What a crashed build leaves: a half-unpacked tree and a partial disk.
    let leftover = w.cache().join("tmp/0123456789abcdef-XXXX");
    fs::create_dir_all(leftover.join("rootfs/usr/bin")).unwrap();
    fs::write(leftover.join("disk.ext4"), b"partial").unwrap();
    fs::write(w.cache().join("tmp/stray"), b"").unwrap();
    let _store = w.store();
    assert_eq!(fs::read_dir(w.cache().join("tmp")).unwrap().count(), 0);
    assert_eq!(
        fs::metadata(w.cache().join("tmp")).unwrap().mode() & 0o777,
        0o700
    );
}

#[tokio::test]
async fn writable_disk_is_sparse_ext4_and_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rw.ext4");
    // Warm up (page cache for mkfs.ext4 and its libraries), then measure.
    create_writable_disk(&tmp.path().join("warm.ext4"), 64)
        .await
        .unwrap();
    let mut times = Vec::new();
    for (i, size) in [1024u64, 10 * 1024, 100 * 1024].into_iter().enumerate() {
        let p = tmp.path().join(format!("rw{i}.ext4"));
        let start = Instant::now();
        create_writable_disk(&p, size).await.unwrap();
        times.push((size, start.elapsed()));
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.len(), size << 20);
        // Sparse: a small fraction of the size is allocated.
        assert!(
            m.blocks() * 512 < (size << 20) / 8 + (8 << 20),
            "{} allocated",
            m.blocks() * 512
        );
    }
    eprintln!("writable disk creation: {times:?}");
    for (size, t) in &times {
        assert!(t.as_millis() < 2000, "{size} MiB took {t:?}");
    }

    create_writable_disk(&path, 2048).await.unwrap();
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Filesystem volume name:   somna-rw"),
        "{text}"
    );
    assert!(text.contains("Reserved block count:     0"), "{text}");
    assert!(text.contains("has_journal"), "{text}");
    assert!(text.contains("Block size:               4096"), "{text}");
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(ls(&path, "/"), vec!["lost+found"]);

    // Never clobbers; sizes are checked.
    let e = create_writable_disk(&path, 2048).await.unwrap_err();
    assert!(
        e.to_string().contains("File exists") || e.to_string().contains("exists"),
        "{e}"
    );
    let e = create_writable_disk(&tmp.path().join("tiny"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(!tmp.path().join("tiny").exists());
}

/// Incompressible bytes (xorshift), so the layer blob is as big as the file.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A cache on a full file system: the conversion fails with an error that
/// says so (RESOURCE_EXHAUSTED), no partial file is left behind, and the
/// same image converts once there is room.
#[tokio::test]
async fn a_full_cache_disk_fails_the_conversion_cleanly() {
    require_root();
    let w = World::new();
    w.image(
        "big:latest",
        vec![Tar::new().file("data", &noise(3 << 20)).build()],
    );
    let mount = somna_testkit::Tmpfs::mount(&w.cache(), "5m");
    let store = w.store();
    let err = match store.resolve("big").await {
        Ok(image) => store.root_disk(&image).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let (_, _, disks, tmp) = w.cache_counts();
    assert_eq!((disks, tmp), (0, 0), "partial files left behind");
    drop(store);
    drop(mount);

    let store = w.store();
    let image = store.resolve("big").await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(cat(&disk.path, "/data"), noise(3 << 20));
}
