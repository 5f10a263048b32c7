//! Files in a sandbox. Paths are resolved inside the sandbox's root.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use somna_proto::v1::{self as proto, FileType, write_file_request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Error, Result, Sandbox};

/// Chunk size for uploads.
const CHUNK: usize = 256 * 1024;

/// How to write a file.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Permission bits for a new file (0 means 0o644).
    pub mode: u32,
    /// Create missing parent directories.
    pub create_parents: bool,
    /// Append instead of replacing.
    pub append: bool,
}

impl Sandbox {
    /// Reads a whole file.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out).await?;
        Ok(out)
    }

    /// Streams a file into `writer`; returns the number of bytes.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        mut writer: W,
    ) -> Result<u64> {
        let mut chunks = self.read_file_stream(path).await?;
        let mut n = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            writer.write_all(&chunk).await.map_err(|source| Error::Io {
                what: format!("write {path} locally"),
                source,
            })?;
        }
        writer.flush().await.map_err(|source| Error::Io {
            what: format!("write {path} locally"),
            source,
        })?;
        Ok(n)
    }

    /// Reads at most `length` bytes from `offset` (`length` 0: to the end).
    pub async fn read_file_range(&self, path: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut chunks = self.read_file_range_stream(path, offset, length).await?;
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next().await {
            out.extend(chunk?);
        }
        Ok(out)
    }

    /// The file's content as a stream of chunks.
    pub async fn read_file_stream(
        &self,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Vec<u8>>> + use<>> {
        self.read_file_range_stream(path, 0, 0).await
    }

    async fn read_file_range_stream(
        &self,
        path: &str,
        offset: u64,
        length: u64,
    ) -> Result<impl Stream<Item = Result<Vec<u8>>> + use<>> {
        let req = proto::ReadFileRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
            offset,
            length,
        };
        let stream = self.rpc().read_file(req).await?.into_inner();
        Ok(stream.map(|r| r.map(|c| c.data).map_err(Error::from)))
    }

    /// Writes (replaces) a file with `data`, creating missing parents.
    pub async fn write_file(&self, path: &str, data: Vec<u8>) -> Result<proto::FileInfo> {
        let opts = WriteOptions {
            create_parents: true,
            ..Default::default()
        };
        self.write_file_from(path, std::io::Cursor::new(data), opts)
            .await
    }

    /// Streams `reader` into a file.
    pub async fn write_file_from<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        path: &str,
        mut reader: R,
        options: WriteOptions,
    ) -> Result<proto::FileInfo> {
        let start = proto::WriteFileRequest {
            msg: Some(write_file_request::Msg::Start(proto::WriteFileStart {
                sandbox_id: self.id().to_string(),
                path: path.to_string(),
                mode: options.mode,
                create_parents: options.create_parents,
                append: options.append,
            })),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<proto::WriteFileRequest>(4);
        let what = format!("read local data for {path}");
        let pump = tokio::spawn(async move {
            if tx.send(start).await.is_err() {
                return Ok(());
            }
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(&mut reader, &mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                let msg = proto::WriteFileRequest {
                    msg: Some(write_file_request::Msg::Data(buf)),
                };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
        });
        let result = self
            .rpc()
            .write_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let read: std::io::Result<()> = pump
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        read.map_err(|source| Error::Io { what, source })?;
        result?
            .into_inner()
            .file
            .ok_or_else(|| Error::Protocol("write_file returned no file info".into()))
    }

    pub async fn stat(&self, path: &str) -> Result<proto::FileInfo> {
        let req = proto::StatFileRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
        };
        Ok(self.rpc().stat_file(req).await?.into_inner())
    }

    pub async fn list_files(&self, path: &str) -> Result<Vec<proto::FileInfo>> {
        let req = proto::ListFilesRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
        };
        Ok(self.rpc().list_files(req).await?.into_inner().entries)
    }

    /// Creates a directory; with `parents`, also missing parents (and no
    /// error if it exists).
    pub async fn make_dir(&self, path: &str, parents: bool) -> Result<proto::FileInfo> {
        let req = proto::MakeDirRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
            mode: 0,
            parents,
        };
        Ok(self.rpc().make_dir(req).await?.into_inner())
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let req = proto::RemoveFileRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
            recursive,
        };
        self.rpc().remove_file(req).await?;
        Ok(())
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let req = proto::RenameFileRequest {
            sandbox_id: self.id().to_string(),
            from: from.to_string(),
            to: to.to_string(),
        };
        self.rpc().rename_file(req).await?;
        Ok(())
    }
}

/// What an upload or download moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub bytes: u64,
    pub files: u64,
    /// Entries that are neither regular files nor directories (symlinks,
    /// devices): not copied.
    pub skipped: u64,
}

impl Sandbox {
    /// Whether `path` exists in the sandbox (a dangling symlink counts).
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.stat(path).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound(m)) if !m.starts_with("sandbox ") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Copies a local file or directory tree to exactly `remote` (a tree
    /// becomes the directory `remote`), keeping permission bits and
    /// creating missing parents. Symlinks and special files are skipped.
    pub async fn upload(&self, local: &Path, remote: &str) -> Result<TransferStats> {
        let meta = tokio::fs::symlink_metadata(local)
            .await
            .map_err(io_err(format!("cannot read {}", local.display())))?;
        let mut stats = TransferStats::default();
        if meta.is_file() {
            stats.bytes = self.upload_file(local, remote, &meta).await?;
            stats.files = 1;
            return Ok(stats);
        }
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a regular file or directory",
                local.display()
            )));
        }
        let mut stack = vec![(local.to_path_buf(), remote.to_string())];
        while let Some((dir, rdir)) = stack.pop() {
            self.make_dir(&rdir, true).await?;
            let mut entries = tokio::fs::read_dir(&dir)
                .await
                .map_err(io_err(format!("cannot read {}", dir.display())))?;
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(io_err(format!("cannot read {}", dir.display())))?
            {
                let path = entry.path();
                let rpath = join(&rdir, &entry.file_name().to_string_lossy());
                let meta = tokio::fs::symlink_metadata(&path)
                    .await
                    .map_err(io_err(format!("cannot read {}", path.display())))?;
                if meta.is_dir() {
                    stack.push((path, rpath));
                } else if meta.is_file() {
                    stats.bytes += self.upload_file(&path, &rpath, &meta).await?;
                    stats.files += 1;
                } else {
                    stats.skipped += 1;
                }
            }
        }
        Ok(stats)
    }

    async fn upload_file(
        &self,
        local: &Path,
        remote: &str,
        meta: &std::fs::Metadata,
    ) -> Result<u64> {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::open(local)
            .await
            .map_err(io_err(format!("cannot open {}", local.display())))?;
        let opts = WriteOptions {
            mode: meta.permissions().mode() & 0o7777,
            create_parents: true,
            append: false,
        };
        Ok(self.write_file_from(remote, file, opts).await?.size)
    }

    /// Copies a sandbox file or directory tree to exactly `local`, keeping
    /// permission bits and creating missing local parents. Symlinks and
    /// special files are skipped.
    pub async fn download(&self, remote: &str, local: &Path) -> Result<TransferStats> {
        let info = self.stat(remote).await?;
        let mut stats = TransferStats::default();
        match info.r#type() {
            FileType::File => {
                if let Some(parent) = local.parent().filter(|p| !p.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(io_err(format!("cannot create {}", parent.display())))?;
                }
                stats.bytes = self.download_file(remote, local, info.mode).await?;
                stats.files = 1;
                return Ok(stats);
            }
            FileType::Directory => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{remote} is not a regular file or directory"
                )));
            }
        }
        let mut stack: Vec<(String, PathBuf)> = vec![(remote.to_string(), local.to_path_buf())];
        while let Some((rdir, dir)) = stack.pop() {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(io_err(format!("cannot create {}", dir.display())))?;
            for entry in self.list_files(&rdir).await? {
                let target = dir.join(&entry.name);
                match entry.r#type() {
                    FileType::Directory => stack.push((entry.path.clone(), target)),
                    FileType::File => {
                        stats.bytes += self.download_file(&entry.path, &target, entry.mode).await?;
                        stats.files += 1;
                    }
                    _ => stats.skipped += 1,
                }
            }
        }
        Ok(stats)
    }

    async fn download_file(&self, remote: &str, local: &Path, mode: u32) -> Result<u64> {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::create(local)
            .await
            .map_err(io_err(format!("cannot create {}", local.display())))?;
        let n = self.read_file_to(remote, file).await?;
        if mode != 0 {
            tokio::fs::set_permissions(local, std::fs::Permissions::from_mode(mode & 0o7777))
                .await
                .map_err(io_err(format!("cannot chmod {}", local.display())))?;
        }
        Ok(n)
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

/// Fills `buf` unless EOF comes first; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
