//! Files in a sandbox. Paths are resolved inside the sandbox's root.

use futures::{Stream, StreamExt};
use somna_proto::v1::{self as proto, write_file_request};
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

    /// The file's content as a stream of chunks.
    pub async fn read_file_stream(
        &self,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Vec<u8>>> + use<>> {
        let req = proto::ReadFileRequest {
            sandbox_id: self.id().to_string(),
            path: path.to_string(),
            offset: 0,
            length: 0,
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
