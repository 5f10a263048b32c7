//! The files API against real microVMs.

use sha2::{Digest, Sha256};
use somna_sdk::proto::FileType;
use somna_sdk::{Command, CreateOptions, Error};
use somna_testkit::{Options, Platform};

fn sha256_of(path: &std::path::Path) -> String {
    let data = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&data))
}

/// The cached read-only root disks of this platform.
fn root_disks(platform: &Platform) -> Vec<std::path::PathBuf> {
    let dir = platform.data_dir().join("images/disks");
    let mut disks: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ext4"))
        .collect();
    disks.sort();
    disks
}

#[tokio::test(flavor = "multi_thread")]
async fn files_round_trip_and_isolation() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let client = platform.client().await;
    let a = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .expect("create a");
    let disks = root_disks(&platform);
    assert_eq!(disks.len(), 1, "one cached root disk for busybox");
    let disk_hash = sha256_of(&disks[0]);

    // 10 MiB, byte-identical both ways.
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let info = a.write_file("/data/blob.bin", data.clone()).await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    let back = a.read_file("/data/blob.bin").await.unwrap();
    assert!(back == data, "the 10 MiB file did not read back identical");
    // The process view agrees with the API.
    let out = a
        .exec(Command::from_argv(["wc", "-c", "/data/blob.bin"]))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("10485760"),
        "{out:?}"
    );

    // stat / list / mkdir / rename / remove.
    let st = a.stat("/data/blob.bin").await.unwrap();
    assert_eq!(
        (st.r#type(), st.size, st.mode),
        (FileType::File, 10485760, 0o644)
    );
    a.make_dir("/data/sub/deeper", true).await.unwrap();
    a.write_file("/data/sub/note.txt", b"hi".to_vec())
        .await
        .unwrap();
    let names: Vec<String> = a
        .list_files("/data")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["blob.bin", "sub"]);
    a.rename("/data/sub/note.txt", "/data/note.txt")
        .await
        .unwrap();
    assert_eq!(a.read_file("/data/note.txt").await.unwrap(), b"hi");
    let err = a.remove("/data/sub", false).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    a.remove("/data/sub", true).await.unwrap();
    assert!(matches!(
        a.stat("/data/sub").await.unwrap_err(),
        Error::NotFound(_)
    ));

    // Missing files are NOT_FOUND and say which path.
    match a.read_file("/no/such/file").await.unwrap_err() {
        Error::NotFound(m) => assert!(m.contains("/no/such/file"), "{m}"),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Paths stay inside the sandbox root, whatever the path or symlinks say.
    a.write_file("/../../escape.txt", b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(a.read_file("/escape.txt").await.unwrap(), b"x");
    let out = a
        .exec(Command::from_argv(["ln", "-s", "/", "/tmp/rootlink"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(
        a.read_file("/tmp/rootlink/../../escape.txt").await.unwrap(),
        b"x"
    );
    assert!(
        a.read_file("/../../../etc/passwd")
            .await
            .unwrap()
            .starts_with(b"root:")
    );

    // A second sandbox of the same image does not see the first one's files,
    // and the cached image disk is unchanged.
    let b = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .expect("create b");
    assert!(matches!(
        b.stat("/data/blob.bin").await.unwrap_err(),
        Error::NotFound(_)
    ));
    assert!(matches!(
        b.stat("/escape.txt").await.unwrap_err(),
        Error::NotFound(_)
    ));
    assert_eq!(
        root_disks(&platform),
        disks,
        "no second conversion for a cached image"
    );
    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
    assert_eq!(
        sha256_of(&disks[0]),
        disk_hash,
        "the cached image disk was modified"
    );
}
