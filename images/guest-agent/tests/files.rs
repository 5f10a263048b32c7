//! Files API against a dev-mode agent rooted at a temp directory, with a
//! marker file just outside the root that no request may read or write.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::PathBuf;

use common::{Agent, Client, SANDBOX_ID};
use somna_proto::v1::write_file_request::Msg;
use somna_proto::v1::{
    FileInfo, FileType, ListFilesRequest, MakeDirRequest, ReadFileRequest, RemoveFileRequest,
    RenameFileRequest, StatFileRequest, WriteFileRequest, WriteFileStart,
};
use tonic::Code;

const MARKER: &str = "outside the root";

struct Fixture {
    outer: tempfile::TempDir,
    _agent: Agent,
    client: Client,
}

impl Fixture {
    async fn new() -> Fixture {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(outer.path().join("marker"), MARKER).unwrap();
        let agent = Agent::start(&root);
        let client = agent.client().await;
        Fixture {
            outer,
            _agent: agent,
            client,
        }
    }

    fn root(&self) -> PathBuf {
        self.outer.path().join("root")
    }

    /// The marker outside the root is untouched and nothing new appeared
    /// beside the root.
    fn assert_outside_untouched(&self) {
        assert_eq!(
            std::fs::read_to_string(self.outer.path().join("marker")).unwrap(),
            MARKER
        );
        let mut names: Vec<String> = std::fs::read_dir(self.outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["marker", "root"]);
    }

    async fn read(&mut self, path: &str) -> Result<Vec<u8>, tonic::Status> {
        self.read_range(path, 0, 0).await
    }

    async fn read_range(
        &mut self,
        path: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, tonic::Status> {
        let req = ReadFileRequest {
            sandbox_id: SANDBOX_ID.into(),
            path: path.into(),
            offset,
            length,
        };
        let mut stream = self.client.read_file(req).await?.into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    async fn write_opts(
        &mut self,
        start: WriteFileStart,
        data: &[u8],
    ) -> Result<FileInfo, tonic::Status> {
        let mut msgs = vec![WriteFileRequest {
            msg: Some(Msg::Start(start)),
        }];
        for chunk in data.chunks(1 << 20) {
            msgs.push(WriteFileRequest {
                msg: Some(Msg::Data(chunk.to_vec())),
            });
        }
        let resp = self
            .client
            .write_file(tokio_stream::iter(msgs))
            .await?
            .into_inner();
        Ok(resp.file.expect("file info"))
    }

    async fn write(&mut self, path: &str, data: &[u8]) -> Result<FileInfo, tonic::Status> {
        self.write_opts(
            WriteFileStart {
                path: path.into(),
                ..Default::default()
            },
            data,
        )
        .await
    }

    async fn stat(&mut self, path: &str) -> Result<FileInfo, tonic::Status> {
        Ok(self
            .client
            .stat_file(StatFileRequest {
                sandbox_id: String::new(),
                path: path.into(),
            })
            .await?
            .into_inner())
    }

    async fn list(&mut self, path: &str) -> Result<Vec<FileInfo>, tonic::Status> {
        Ok(self
            .client
            .list_files(ListFilesRequest {
                sandbox_id: String::new(),
                path: path.into(),
            })
            .await?
            .into_inner()
            .entries)
    }

    async fn mkdir(&mut self, path: &str, parents: bool) -> Result<FileInfo, tonic::Status> {
        let req = MakeDirRequest {
            sandbox_id: String::new(),
            path: path.into(),
            mode: 0,
            parents,
        };
        Ok(self.client.make_dir(req).await?.into_inner())
    }

    async fn remove(&mut self, path: &str, recursive: bool) -> Result<(), tonic::Status> {
        self.client
            .remove_file(RemoveFileRequest {
                sandbox_id: String::new(),
                path: path.into(),
                recursive,
            })
            .await?;
        Ok(())
    }

    async fn rename(&mut self, from: &str, to: &str) -> Result<(), tonic::Status> {
        self.client
            .rename_file(RenameFileRequest {
                sandbox_id: String::new(),
                from: from.into(),
                to: to.into(),
            })
            .await?;
        Ok(())
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

#[tokio::test]
async fn ten_mib_round_trip() {
    let mut f = Fixture::new().await;
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let info = f.write("/big.bin", &data).await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.r#type, FileType::File as i32);
    assert_eq!(info.mode, 0o644);
    assert_eq!(info.path, "/big.bin");
    let back = f.read("/big.bin").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "read back byte-identical");
    assert!(std::fs::read(f.root().join("big.bin")).unwrap() == data);
    // Offset and length.
    assert_eq!(
        f.read_range("big.bin", 1000, 10).await.unwrap(),
        &data[1000..1010]
    );
    assert_eq!(
        f.read_range("big.bin", data.len() as u64 - 5, 0)
            .await
            .unwrap(),
        &data[data.len() - 5..]
    );
    assert!(
        f.read_range("big.bin", data.len() as u64 + 5, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn write_replaces_and_appends() {
    let mut f = Fixture::new().await;
    f.write("/a.txt", b"one\n").await.unwrap();
    std::fs::set_permissions(
        f.root().join("a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    f.write("/a.txt", b"two\n").await.unwrap();
    assert_eq!(f.read("/a.txt").await.unwrap(), b"two\n");
    // Replacing keeps the existing mode.
    assert_eq!(f.stat("/a.txt").await.unwrap().mode, 0o600);
    let info = f
        .write_opts(
            WriteFileStart {
                path: "/a.txt".into(),
                append: true,
                ..Default::default()
            },
            b"three\n",
        )
        .await
        .unwrap();
    assert_eq!(info.size, 10);
    assert_eq!(f.read("/a.txt").await.unwrap(), b"two\nthree\n");
    // Append creates a missing file with the requested mode.
    let info = f
        .write_opts(
            WriteFileStart {
                path: "/new.txt".into(),
                append: true,
                mode: 0o640,
                ..Default::default()
            },
            b"x",
        )
        .await
        .unwrap();
    assert_eq!(info.size, 1);
    // No temp files are left behind.
    let names: Vec<String> = f
        .list("/")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".somna-tmp")),
        "{names:?}"
    );
}

#[tokio::test]
async fn write_modes_and_parents() {
    let mut f = Fixture::new().await;
    let info = f
        .write_opts(
            WriteFileStart {
                path: "/bin/tool".into(),
                mode: 0o755,
                create_parents: true,
                ..Default::default()
            },
            b"#!",
        )
        .await
        .unwrap();
    assert_eq!(info.mode, 0o755);
    assert_eq!(f.stat("/bin").await.unwrap().mode, 0o755);
    assert_eq!(
        code(f.write("/missing/dir/file", b"x").await),
        Code::NotFound
    );
    assert_eq!(code(f.write("/bin", b"x").await), Code::InvalidArgument);
    assert_eq!(code(f.write("/", b"x").await), Code::InvalidArgument);
    // First message must be start.
    let msgs = vec![WriteFileRequest {
        msg: Some(Msg::Data(b"x".to_vec())),
    }];
    assert_eq!(
        code(f.client.write_file(tokio_stream::iter(msgs)).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn list_stat_mkdir_remove_rename() {
    let mut f = Fixture::new().await;
    let d = f.mkdir("/work", false).await.unwrap();
    assert_eq!(d.r#type, FileType::Directory as i32);
    assert_eq!(d.mode, 0o755);
    assert_eq!(code(f.mkdir("/work", false).await), Code::AlreadyExists);
    f.mkdir("/work", true).await.unwrap();
    assert_eq!(code(f.mkdir("/x/y/z", false).await), Code::NotFound);
    f.mkdir("/x/y/z", true).await.unwrap();
    assert_eq!(
        f.stat("/x/y/z").await.unwrap().r#type,
        FileType::Directory as i32
    );

    f.write("/work/b.txt", b"bb").await.unwrap();
    f.write("/work/a.txt", b"a").await.unwrap();
    symlink("a.txt", f.root().join("work/link")).unwrap();
    let entries = f.list("/work").await.unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["a.txt", "b.txt", "link"]);
    assert_eq!(entries[1].path, "/work/b.txt");
    assert_eq!(entries[1].size, 2);
    assert_eq!(entries[2].r#type, FileType::Symlink as i32);
    assert_eq!(entries[2].symlink_target, "a.txt");
    let rel = f.list("work/").await.unwrap();
    assert_eq!(rel[0].path, "work/a.txt");

    let st = f.stat("/work/link").await.unwrap();
    assert_eq!(
        (st.r#type, st.symlink_target.as_str()),
        (FileType::Symlink as i32, "a.txt")
    );
    let st = f.stat("/work/b.txt").await.unwrap();
    assert_eq!((st.name.as_str(), st.size), ("b.txt", 2));
    assert!(st.modified_unix_ms > 1_600_000_000_000);
    assert_eq!(
        f.stat("/").await.unwrap().r#type,
        FileType::Directory as i32
    );
    assert_eq!(code(f.stat("/nope").await), Code::NotFound);
    assert_eq!(code(f.list("/work/a.txt").await), Code::FailedPrecondition);
    assert_eq!(code(f.read("/work").await), Code::InvalidArgument);

    f.rename("/work/b.txt", "/work/c.txt").await.unwrap();
    assert_eq!(f.read("work/c.txt").await.unwrap(), b"bb");
    assert_eq!(code(f.stat("/work/b.txt").await), Code::NotFound);
    assert_eq!(code(f.rename("/nope", "/work/d").await), Code::NotFound);

    let err = f.remove("/work", false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("directory not empty; set recursive"),
        "{}",
        err.message()
    );
    f.remove("/work/link", false).await.unwrap();
    assert!(
        f.root().join("work/a.txt").exists(),
        "removing a symlink leaves its target"
    );
    f.remove("/work", true).await.unwrap();
    assert!(!f.root().join("work").exists());
    f.remove("/x/y/z", false).await.unwrap();
    assert_eq!(code(f.remove("/x/y/z", false).await), Code::NotFound);
}

#[tokio::test]
async fn invalid_paths() {
    let mut f = Fixture::new().await;
    assert_eq!(code(f.stat("").await), Code::InvalidArgument);
    assert_eq!(code(f.stat("/etc/..").await), Code::InvalidArgument);
    assert_eq!(code(f.remove("/", true).await), Code::InvalidArgument);
    assert_eq!(code(f.remove(".", true).await), Code::InvalidArgument);
    assert_eq!(code(f.rename("/", "/x").await), Code::InvalidArgument);
    assert_eq!(code(f.rename("/etc", "/..").await), Code::InvalidArgument);
    let err = f
        .client
        .stat_file(StatFileRequest {
            sandbox_id: "other".into(),
            path: "/".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    f.assert_outside_untouched();
}

#[tokio::test]
async fn dot_dot_stays_inside() {
    let mut f = Fixture::new().await;
    assert_eq!(
        f.read("../../etc/passwd").await.unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(
        f.read("/../../../etc/passwd").await.unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(code(f.read("../marker").await), Code::NotFound);
    assert_eq!(code(f.stat("/../marker").await), Code::NotFound);
    f.write("../marker", b"written").await.unwrap();
    assert_eq!(std::fs::read(f.root().join("marker")).unwrap(), b"written");
    f.mkdir("../escaped/dir", true).await.unwrap();
    assert!(f.root().join("escaped/dir").is_dir());
    f.rename("/marker", "../../moved").await.unwrap();
    assert!(f.root().join("moved").exists());
    f.remove("../moved", false).await.unwrap();
    f.assert_outside_untouched();
}

#[tokio::test]
async fn absolute_symlink_to_slash_stays_inside() {
    let mut f = Fixture::new().await;
    symlink("/", f.root().join("slash")).unwrap();
    symlink("/../marker", f.root().join("marker-link")).unwrap();
    assert_eq!(
        f.read("/slash/etc/passwd").await.unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(code(f.read("/slash/../marker").await), Code::NotFound);
    assert_eq!(code(f.read("/marker-link").await), Code::NotFound);
    // The listing through the link is the root's, not the host's "/".
    let mut names: Vec<String> = f
        .list("/slash")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["etc", "marker-link", "slash"]);
    // Writing through the links lands inside.
    f.write("/slash/../marker", b"w1").await.unwrap();
    assert_eq!(std::fs::read(f.root().join("marker")).unwrap(), b"w1");
    f.write("/marker-link", b"w2").await.unwrap();
    assert_eq!(std::fs::read(f.root().join("marker")).unwrap(), b"w2");
    assert_eq!(
        f.stat("/marker-link").await.unwrap().r#type,
        FileType::Symlink as i32,
        "the link itself stays"
    );
    f.write_opts(
        WriteFileStart {
            path: "/slash/../marker".into(),
            append: true,
            ..Default::default()
        },
        b"+",
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(f.root().join("marker")).unwrap(), b"w2+");
    f.mkdir("/slash/../newdir", false).await.unwrap();
    assert!(f.root().join("newdir").is_dir());
    f.remove("/slash/../newdir", false).await.unwrap();
    f.assert_outside_untouched();
}

#[tokio::test]
async fn symlink_chain_stays_inside() {
    let mut f = Fixture::new().await;
    // hop1 -> hop2 -> up/../marker, up -> ../../../.. (clamped at the root)
    symlink("hop2", f.root().join("hop1")).unwrap();
    symlink("/up/../marker", f.root().join("hop2")).unwrap();
    symlink("../../../..", f.root().join("up")).unwrap();
    assert_eq!(code(f.read("/hop1").await), Code::NotFound);
    assert_eq!(
        f.read("/up/up/etc/passwd").await.unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    f.write("/hop1", b"via chain").await.unwrap();
    assert_eq!(
        std::fs::read(f.root().join("marker")).unwrap(),
        b"via chain"
    );
    // A directory symlink chain as a parent.
    symlink("/up", f.root().join("dirlink")).unwrap();
    f.write("/dirlink/../../chained.txt", b"c").await.unwrap();
    assert!(f.root().join("chained.txt").exists());
    // Loops are reported, not followed forever.
    symlink("loop2", f.root().join("loop1")).unwrap();
    symlink("loop1", f.root().join("loop2")).unwrap();
    assert_eq!(code(f.read("/loop1").await), Code::InvalidArgument);
    f.assert_outside_untouched();
}

#[tokio::test]
async fn recursive_remove_does_not_follow_symlinks() {
    let mut f = Fixture::new().await;
    let keep = f.outer.path().join("root/keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("precious"), "x").unwrap();
    f.mkdir("/tree/a/b", true).await.unwrap();
    f.write("/tree/a/b/file", b"1").await.unwrap();
    symlink("/keep", f.root().join("tree/a/keep-link")).unwrap();
    symlink(f.outer.path(), f.root().join("tree/outer-link")).unwrap();
    f.remove("/tree", true).await.unwrap();
    assert!(!f.root().join("tree").exists());
    assert!(keep.join("precious").exists());
    f.assert_outside_untouched();
}
