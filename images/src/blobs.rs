//! The content-addressed blob store shared by every image in a cache:
//! `<cache_dir>/blobs/sha256/<hex>`, the same shape as an OCI layout's
//! `blobs/`, so manifests and configs in it are read with the layout code.
//!
//! A blob only ever appears under its name complete and verified: it is
//! written to a temporary file in `<cache_dir>/tmp/` (removed on drop, and
//! swept at start-up), checked against its digest and size, and renamed
//! into place. Writes stop as soon as more bytes arrive than the
//! descriptor announced, so a lying or hostile source cannot fill the disk.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{ImageError, IoContext};

#[derive(Clone, Debug)]
pub(crate) struct BlobStore {
    /// The cache directory: blobs live under `<root>/blobs/sha256/`.
    root: PathBuf,
    dir: PathBuf,
    tmp: PathBuf,
}

/// Why a blob write was refused.
#[derive(Debug)]
pub(crate) enum BlobWriteError {
    /// More bytes than expected, or the wrong digest: `reason` says which.
    Verification(String),
    Io(ImageError),
}

impl BlobStore {
    pub(crate) fn open(root: &Path, tmp: &Path) -> Result<Self, ImageError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).ctx("cannot create cache directory", &dir)?;
        Ok(BlobStore {
            root: root.to_path_buf(),
            dir,
            tmp: tmp.to_path_buf(),
        })
    }

    /// The directory that holds `blobs/sha256/` (a layout-shaped root).
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is present with the expected size. Blobs are
    /// verified when written and when read, so the size is enough here.
    pub(crate) fn has(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Starts writing a blob expected to be `size` bytes with `digest`.
    pub(crate) fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, ImageError> {
        let file = tempfile::Builder::new()
            .prefix(&format!("blob-{}-", &digest.hex()[..12]))
            .tempfile_in(&self.tmp)
            .ctx("cannot create a temporary blob in", &self.tmp)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            count: 0,
            digest: Some(digest.clone()),
            size,
            dir: self.dir.clone(),
        })
    }

    /// Starts writing a blob of `size` bytes whose digest is not known in
    /// advance (content from an archive that names no digest): it is
    /// stored under the digest of what was written.
    pub(crate) fn writer_unnamed(&self, size: u64) -> Result<BlobWriter, ImageError> {
        let file = tempfile::Builder::new()
            .prefix("blob-import-")
            .tempfile_in(&self.tmp)
            .ctx("cannot create a temporary blob in", &self.tmp)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            count: 0,
            digest: None,
            size,
            dir: self.dir.clone(),
        })
    }

    /// Stores a small blob held in memory.
    pub(crate) fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), BlobWriteError> {
        let mut w = self
            .writer(digest, data.len() as u64)
            .map_err(BlobWriteError::Io)?;
        w.write(data)?;
        w.commit()
    }

    /// Every blob present: digest and size. Names that are not digests
    /// (nothing this store writes) are skipped.
    pub(crate) fn list(&self) -> Result<Vec<(Digest, u64)>, ImageError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).ctx("cannot list", &self.dir)? {
            let entry = entry.ctx("cannot list", &self.dir)?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((digest, len));
        }
        Ok(out)
    }

    /// Removes a blob; absent is fine. Returns the bytes freed.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<u64, ImageError> {
        let path = self.path(digest);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ImageError::io("cannot inspect", &path, e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ImageError::io("cannot remove blob", &path, e)),
        }
    }
}

/// A blob being written; dropped without [`BlobWriter::commit`], it leaves
/// nothing behind.
pub(crate) struct BlobWriter {
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    count: u64,
    /// `None`: named after its content at commit.
    digest: Option<Digest>,
    size: u64,
    dir: PathBuf,
}

impl BlobWriter {
    /// Appends a chunk; refuses (and writes nothing) once the blob would
    /// grow past its expected size.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), BlobWriteError> {
        let after = self.count + chunk.len() as u64;
        if after > self.size {
            return Err(BlobWriteError::Verification(format!(
                "the source sent more than the {} bytes its descriptor announced; download stopped",
                self.size
            )));
        }
        self.file.write_all(chunk).map_err(|e| {
            BlobWriteError::Io(ImageError::io(
                "cannot write blob",
                self.file.get_ref().path(),
                e,
            ))
        })?;
        self.hasher.update(chunk);
        self.count = after;
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.count
    }

    /// Checks size and digest and moves the blob into place.
    pub(crate) fn commit(self) -> Result<(), BlobWriteError> {
        self.commit_named().map(|_| ())
    }

    /// [`BlobWriter::commit`], returning the blob's digest.
    pub(crate) fn commit_named(self) -> Result<Digest, BlobWriteError> {
        if self.count != self.size {
            return Err(BlobWriteError::Verification(format!(
                "got {} bytes, the descriptor announced {} (truncated)",
                self.count, self.size
            )));
        }
        let actual = Digest::from_hex(&hex::encode(self.hasher.finalize()))
            .map_err(|e| BlobWriteError::Verification(e.to_string()))?;
        if let Some(expected) = &self.digest
            && actual != *expected
        {
            return Err(BlobWriteError::Verification(format!(
                "its content has digest {actual} (corrupt or tampered with)"
            )));
        }
        let final_path = self.dir.join(actual.hex());
        let file = self.file.into_inner().map_err(|e| {
            let (err, w) = e.into_parts();
            BlobWriteError::Io(ImageError::io("cannot write blob", w.get_ref().path(), err))
        })?;
        let tmp_path = file.path().to_path_buf();
        file.as_file()
            .sync_all()
            .map_err(|e| BlobWriteError::Io(ImageError::io("cannot sync blob", &tmp_path, e)))?;
        file.persist(&final_path).map_err(|e| {
            BlobWriteError::Io(ImageError::io(
                "cannot move blob into place at",
                &final_path,
                e.error,
            ))
        })?;
        Ok(actual)
    }
}

impl From<ImageError> for BlobWriteError {
    fn from(e: ImageError) -> Self {
        BlobWriteError::Io(e)
    }
}

impl BlobWriteError {
    /// The crate error for this failure, naming the image and blob.
    pub(crate) fn into_image_error(
        self,
        reference: &str,
        what: &str,
        digest: &Digest,
    ) -> ImageError {
        match self {
            BlobWriteError::Verification(reason) => ImageError::BlobVerification {
                reference: reference.to_string(),
                what: what.to_string(),
                digest: digest.to_string(),
                reason,
            },
            BlobWriteError::Io(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let t = tempfile::tempdir().unwrap();
        let tmp = t.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let s = BlobStore::open(t.path(), &tmp).unwrap();
        (t, s)
    }

    #[test]
    fn verified_blobs_land_and_bad_ones_leave_nothing() {
        let (t, s) = store();
        let d = Digest::of(b"hello");
        s.put(&d, b"hello").unwrap();
        assert!(s.has(&d, 5));
        assert_eq!(s.list().unwrap(), vec![(d.clone(), 5)]);

        let d2 = Digest::of(b"world");
        // Wrong content.
        assert!(matches!(
            s.put(&d2, b"worlx"),
            Err(BlobWriteError::Verification(_))
        ));
        // Too long: refused at the first byte past the size.
        let mut w = s.writer(&d2, 5).unwrap();
        w.write(b"wor").unwrap();
        assert!(matches!(
            w.write(b"ldX"),
            Err(BlobWriteError::Verification(_))
        ));
        drop(w);
        // Truncated.
        let mut w = s.writer(&d2, 5).unwrap();
        w.write(b"wor").unwrap();
        assert!(
            matches!(w.commit(), Err(BlobWriteError::Verification(m)) if m.contains("truncated"))
        );
        assert!(!s.has(&d2, 5));
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(s.remove(&d).unwrap(), 5);
        assert_eq!(s.remove(&d).unwrap(), 0);
    }
}
