//! One VM snapshot on disk: the VMM's device-state file, the guest memory
//! (a separate memory file, or inside the state stream), the writable disk,
//! and `snapshot.json`, which records their checksums so a damaged or
//! missing part is found before anything is restored from it.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::checksum::file_digest;
use crate::error::SnapshotError;

/// Bumped whenever the layout or the meaning of a field changes.
pub const FORMAT_VERSION: u32 = 1;

const META_FILE: &str = "snapshot.json";

/// Where the guest memory of a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryLayout {
    /// In its own memory file (the VM ran with its RAM mapped shared from
    /// that file); the state file holds device state only.
    File,
    /// Inside the state stream (the VM ran with RAM it could not write back
    /// to a file of its own, e.g. a copy-on-write clone of a template).
    Stream,
}

/// A file that belongs to a snapshot, with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Path relative to the snapshot directory, or absolute.
    pub path: PathBuf,
    pub size: u64,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    pub memory: MemoryLayout,
    /// The VMM's saved device (and, for `Stream`, memory) state.
    pub state: Part,
    /// The memory file (layout `File`).
    pub memory_file: Option<Part>,
    /// The writable disk as it was when the VM stopped.
    pub disk: Part,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Identity of the read-only root disk the VM ran on; a restore must
    /// use the very same disk.
    pub root_disk: String,
    pub created_unix_ms: u64,
}

/// What to seal into a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotParts<'a> {
    pub memory: MemoryLayout,
    pub state: &'a Path,
    pub memory_file: Option<&'a Path>,
    pub disk: &'a Path,
    pub cpus: u32,
    pub memory_mib: u32,
    pub root_disk: String,
}

/// A sealed snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    meta: SnapshotMeta,
}

impl Snapshot {
    /// Checksums the parts and writes `snapshot.json` into `dir` (atomically:
    /// a snapshot without it is not a snapshot).
    pub fn seal(dir: &Path, parts: SnapshotParts<'_>) -> Result<Snapshot, SnapshotError> {
        let started = Instant::now();
        let part = |p: &Path| -> Result<Part, SnapshotError> {
            let size = std::fs::metadata(p)
                .map_err(SnapshotError::io("stat", p))?
                .len();
            let digest = file_digest(p).map_err(SnapshotError::io("checksum", p))?;
            let rel = p
                .strip_prefix(dir)
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| p.to_path_buf());
            Ok(Part {
                path: rel,
                size,
                digest,
            })
        };
        if (parts.memory == MemoryLayout::File) != parts.memory_file.is_some() {
            return Err(SnapshotError::Invalid {
                dir: dir.to_path_buf(),
                reason: "a memory file is needed exactly when the memory layout is File".into(),
            });
        }
        let meta = SnapshotMeta {
            format: FORMAT_VERSION,
            memory: parts.memory,
            state: part(parts.state)?,
            memory_file: parts.memory_file.map(part).transpose()?,
            disk: part(parts.disk)?,
            cpus: parts.cpus,
            memory_mib: parts.memory_mib,
            root_disk: parts.root_disk,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotError::Invalid {
            dir: dir.to_path_buf(),
            reason: format!("cannot encode metadata: {e}"),
        })?;
        let tmp = dir.join(format!("{META_FILE}.tmp"));
        std::fs::write(&tmp, json).map_err(SnapshotError::io("write", &tmp))?;
        std::fs::rename(&tmp, dir.join(META_FILE)).map_err(SnapshotError::io("rename", &tmp))?;
        tracing::debug!(dir = %dir.display(), elapsed_ms = started.elapsed().as_millis() as u64, "snapshot sealed");
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// Reads `snapshot.json` in `dir`.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(META_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::Missing { what: path });
            }
            Err(e) => return Err(SnapshotError::io("read", &path)(e)),
        };
        let meta: SnapshotMeta =
            serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Invalid {
                dir: dir.to_path_buf(),
                reason: format!("snapshot.json is unreadable: {e}"),
            })?;
        if meta.format != FORMAT_VERSION {
            return Err(SnapshotError::Invalid {
                dir: dir.to_path_buf(),
                reason: format!(
                    "format {} is not the supported {FORMAT_VERSION}",
                    meta.format
                ),
            });
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Absolute path of a part.
    pub fn path_of(&self, part: &Part) -> PathBuf {
        if part.path.is_absolute() {
            part.path.clone()
        } else {
            self.dir.join(&part.path)
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.path_of(&self.meta.state)
    }

    pub fn memory_path(&self) -> Option<PathBuf> {
        self.meta.memory_file.as_ref().map(|p| self.path_of(p))
    }

    pub fn disk_path(&self) -> PathBuf {
        self.path_of(&self.meta.disk)
    }

    /// Checks that every part exists with its recorded size and checksum.
    pub fn verify(&self) -> Result<(), SnapshotError> {
        let parts = std::iter::once(&self.meta.state)
            .chain(self.meta.memory_file.as_ref())
            .chain(std::iter::once(&self.meta.disk));
        for part in parts {
            let path = self.path_of(part);
            let size = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SnapshotError::Missing { what: path });
                }
                Err(e) => return Err(SnapshotError::io("stat", &path)(e)),
            };
            if size != part.size {
                return Err(SnapshotError::Corrupt {
                    path,
                    reason: format!("size is {size} bytes, the snapshot recorded {}", part.size),
                });
            }
            let digest = file_digest(&path).map_err(SnapshotError::io("checksum", &path))?;
            if digest != part.digest {
                return Err(SnapshotError::Corrupt {
                    path,
                    reason: format!(
                        "checksum is {digest}, the snapshot recorded {}",
                        part.digest
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes `snapshot.json` (the parts stay; the caller owns them).
    pub fn unseal(&self) -> Result<(), SnapshotError> {
        let p = self.dir.join(META_FILE);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SnapshotError::io("remove", &p)(e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let state = dir.join("state");
        let mem = dir.join("mem");
        let disk = dir.join("rw.ext4");
        std::fs::write(&state, b"device state").unwrap();
        let f = std::fs::File::create(&mem).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        (state, mem, disk)
    }

    #[test]
    fn seal_open_verify_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (state, mem, disk) = parts(dir.path());
        let snap = Snapshot::seal(
            dir.path(),
            SnapshotParts {
                memory: MemoryLayout::File,
                state: &state,
                memory_file: Some(&mem),
                disk: &disk,
                cpus: 1,
                memory_mib: 64,
                root_disk: "disk".into(),
            },
        )
        .unwrap();
        assert_eq!(snap.meta().state.path, PathBuf::from("state"));
        let snap = Snapshot::open(dir.path()).unwrap();
        snap.verify().unwrap();
        assert_eq!(snap.memory_path().unwrap(), mem);

        // A flipped byte in memory is found.
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"!").unwrap();
        match snap.verify() {
            Err(SnapshotError::Corrupt { path, reason }) => {
                assert_eq!(path, mem);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        // A missing part is named.
        std::fs::remove_file(&state).unwrap();
        match snap.verify() {
            Err(SnapshotError::Missing { what }) => assert_eq!(what, state),
            other => panic!("expected a missing part, got {other:?}"),
        }
        // No metadata, no snapshot.
        snap.unseal().unwrap();
        assert!(matches!(
            Snapshot::open(dir.path()),
            Err(SnapshotError::Missing { .. })
        ));
    }

    #[test]
    fn layout_and_memory_file_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _mem, disk) = parts(dir.path());
        let err = Snapshot::seal(
            dir.path(),
            SnapshotParts {
                memory: MemoryLayout::File,
                state: &state,
                memory_file: None,
                disk: &disk,
                cpus: 1,
                memory_mib: 64,
                root_disk: "disk".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(err, SnapshotError::Invalid { .. }));
    }
}
