//! somna-mkimage and the layout writer.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::{World, require_root};
use somna_images::Unpacker;
use somna_images::mkimage::tar_directory;

fn sample_tree(dir: &std::path::Path) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("home/user")).unwrap();
    fs::write(dir.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("bin-su"), b"su").unwrap();
    fs::set_permissions(dir.join("bin-su"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::lchown(dir.join("home/user"), Some(1000), Some(1000)).unwrap();
    fs::hard_link(dir.join("bin-su"), dir.join("bin-su2")).unwrap();
    std::os::unix::fs::symlink("etc/passwd", dir.join("pw")).unwrap();
    xattr::set(dir.join("etc/passwd"), "user.k", b"v").unwrap();
    // Long names take GNU extension headers.
    let long = "d".repeat(120);
    fs::create_dir_all(dir.join(&long)).unwrap();
    fs::write(dir.join(&long).join("f".repeat(150)), b"long").unwrap();
    std::os::unix::fs::symlink("t".repeat(200), dir.join("longlink")).unwrap();
}

#[test]
fn tar_directory_is_deterministic_and_round_trips() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_tree(&src);
    let a = tar_directory(&src, Vec::new()).unwrap();
    let b = tar_directory(&src, Vec::new()).unwrap();
    assert_eq!(a, b);

    let dst = tmp.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let mut u = Unpacker::new(&dst).unwrap();
    u.apply("test", &a[..]).unwrap();
    u.finish().unwrap();
    let m = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap();
    assert_eq!(m("bin-su").mode() & 0o7777, 0o4755);
    assert_eq!(m("bin-su").ino(), m("bin-su2").ino());
    assert_eq!((m("home/user").uid(), m("home/user").gid()), (1000, 1000));
    assert_eq!(
        fs::read_link(dst.join("pw")).unwrap().to_str().unwrap(),
        "etc/passwd"
    );
    assert_eq!(
        xattr::get(dst.join("etc/passwd"), "user.k")
            .unwrap()
            .unwrap(),
        b"v"
    );
    assert_eq!(
        fs::read(dst.join("d".repeat(120)).join("f".repeat(150))).unwrap(),
        b"long"
    );
    assert_eq!(
        fs::read_link(dst.join("longlink"))
            .unwrap()
            .to_str()
            .unwrap(),
        "t".repeat(200)
    );
    for p in ["etc/passwd", "bin-su", "home/user", "pw"] {
        assert_eq!(
            m(p).mtime(),
            fs::symlink_metadata(src.join(p)).unwrap().mtime(),
            "{p}"
        );
    }
    // Entry order is sorted.
    let mut archive = tar::Archive::new(&a[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    let top: Vec<&String> = names.iter().filter(|n| !n.contains('/')).collect();
    let mut sorted = top.clone();
    sorted.sort();
    assert_eq!(top, sorted);
}

#[tokio::test]
async fn cli_writes_a_layout_the_store_resolves() {
    require_root();
    let w = World::new();
    let rootfs = w.tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let layout = w.layout("tool");
    let run = |tag: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_somna-mkimage"))
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--layout")
            .arg(&layout)
            .args(["--tag", tag])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(
        "tool:1.0",
        &[
            "--env",
            "PATH=/usr/bin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--entrypoint",
            "/bin/sh",
            "--entrypoint",
            "-c",
            "--cmd",
            "echo hi",
            "--workdir",
            "/home/user",
            "--user",
            "1000:1000",
            "--expose",
            "8080/tcp",
        ],
    );
    assert!(out.contains("tool:1.0 sha256:"), "{out}");
    let store = w.store();
    let image = store.resolve("tool:1.0").await.unwrap();
    let c = &image.config;
    assert_eq!(
        c.env,
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("LANG".into(), "C.UTF-8".into())
        ]
    );
    assert_eq!(c.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(c.cmd, vec!["echo hi"]);
    assert_eq!(c.working_dir.as_deref(), Some("/home/user"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.exposed_ports, vec!["8080/tcp"]);

    // Same input, same image; a second tag adds to the layout.
    let again = run(
        "tool:1.0",
        &[
            "--env",
            "PATH=/usr/bin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--entrypoint",
            "/bin/sh",
            "--entrypoint",
            "-c",
            "--cmd",
            "echo hi",
            "--workdir",
            "/home/user",
            "--user",
            "1000:1000",
            "--expose",
            "8080/tcp",
        ],
    );
    assert_eq!(
        out.split_whitespace().nth(1),
        again.split_whitespace().nth(1)
    );
    run("tool:other", &["--cmd", "true"]);
    assert_eq!(
        store.resolve("tool:1.0").await.unwrap().manifest_digest,
        image.manifest_digest
    );
    assert_eq!(
        store.resolve("tool:other").await.unwrap().config.cmd,
        vec!["true"]
    );

    // Bad input: clear errors, non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_somna-mkimage"))
        .args(["--rootfs", "/nonexistent", "--layout"])
        .arg(&layout)
        .args(["--tag", "Tool"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lowercase"));
}
