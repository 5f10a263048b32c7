//! erofs root disks: built with mkfs.erofs and checked by loop-mounting
//! them read-only (the kernel's view), always unmounted afterwards.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Tar, World, require_root};
use somna_images::mkimage::LayerInput;
use somna_images::{ImageConfig, ImageStoreOptions, RootFsFormat};

/// A read-only loop mount, unmounted on drop (also on panic).
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(image: &Path, fstype: &str) -> Option<Mount> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", fstype, "-o", "loop,ro"])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "cannot loop-mount {fstype} here ({}): skipping the mounted checks",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Mount { dir })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn erofs_disk_keeps_everything() {
    require_root();
    let w = World::new();
    let l1 = Tar::new()
        .dir("bin")
        .file_owned("bin/su", b"#!su", 0o4755, 0, 0)
        .file("bin/tool", b"tool")
        .hardlink("bin/tool-hl", "bin/tool")
        .symlink("bin/sh", "/bin/tool")
        .dir_owned("home/user", 0o750, 1000, 1000)
        .file_with_xattrs("bin/capped", b"cap", &[("user.somna", b"yes")])
        .char_device("null", 1, 3)
        .fifo("fifo")
        .file("gone", b"x")
        .build();
    let l2 = Tar::new().whiteout("gone").file("new", b"new").build();
    w.image_with(
        "app:v1",
        vec![LayerInput::tar(l1), LayerInput::tar(l2)],
        ImageConfig::default(),
    );
    let store = w.store_with(ImageStoreOptions {
        root_fs: RootFsFormat::Erofs,
        ..ImageStoreOptions::local_only()
    });
    let image = store.resolve("app:v1").await.unwrap();
    let disk = store.root_disk(&image).await.unwrap();
    assert_eq!(disk.format, RootFsFormat::Erofs);
    assert!(disk.path.to_str().unwrap().ends_with(".erofs"));
    // erofs's magic at offset 1024.
    let data = fs::read(&disk.path).unwrap();
    assert_eq!(&data[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    assert_eq!(fs::metadata(&disk.path).unwrap().mode() & 0o777, 0o444);

    let Some(m) = Mount::new(&disk.path, "erofs") else {
        return;
    };
    let su = fs::symlink_metadata(m.path("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(
        fs::metadata(m.path("bin/tool")).unwrap().ino(),
        fs::metadata(m.path("bin/tool-hl")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(m.path("bin/sh")).unwrap(),
        Path::new("/bin/tool")
    );
    let home = fs::metadata(m.path("home/user")).unwrap();
    assert_eq!(
        (home.uid(), home.gid(), home.mode() & 0o777),
        (1000, 1000, 0o750)
    );
    assert_eq!(
        xattr::get(m.path("bin/capped"), "user.somna")
            .unwrap()
            .as_deref(),
        Some(&b"yes"[..])
    );
    let null = fs::symlink_metadata(m.path("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(
        fs::symlink_metadata(m.path("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(!m.path("gone").exists());
    assert_eq!(fs::read(m.path("new")).unwrap(), b"new");
    assert_eq!(
        fs::symlink_metadata(m.path("bin/tool")).unwrap().mtime(),
        1_600_000_000
    );
}
