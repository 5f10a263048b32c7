//! One VM snapshot on disk: the VMM's device state (a file, or a directory
//! of files: Cloud Hypervisor writes `config.json`, `state.json` and
//! `memory-ranges`), the guest memory (a separate memory file, or inside the
//! state), the writable disk, and `snapshot.json`, which records their
//! checksums (every file of a directory part) so a damaged, missing or
//! extra file is found before anything is restored from it.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::checksum::{dir_digest, file_digest};
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

/// A file (or directory) that belongs to a snapshot, with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Path relative to the snapshot directory, or absolute.
    pub path: PathBuf,
    /// Bytes; for a directory, the total of its files.
    pub size: u64,
    /// The file's checksum; for a directory, a checksum over its files'
    /// names, sizes and checksums.
    pub digest: String,
    /// Present when the part is a directory: every regular file in it
    /// (recursively), with paths relative to the directory, sorted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<Part>>,
}

impl Part {
    /// Records the file or directory at `path`; the part's path is
    /// `path` made relative to `base` when it lies inside it.
    pub fn of(path: &Path, base: &Path) -> Result<Part, SnapshotError> {
        let rel = path
            .strip_prefix(base)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf());
        let meta = std::fs::metadata(path).map_err(SnapshotError::io("stat", path))?;
        if !meta.is_dir() {
            let digest = file_digest(path).map_err(SnapshotError::io("checksum", path))?;
            return Ok(Part {
                path: rel,
                size: meta.len(),
                digest,
                files: None,
            });
        }
        let mut files = Vec::new();
        for file in crate::checksum::dir_files(path).map_err(SnapshotError::io("list", path))? {
            let full = path.join(&file);
            let size = std::fs::metadata(&full)
                .map_err(SnapshotError::io("stat", &full))?
                .len();
            let digest = file_digest(&full).map_err(SnapshotError::io("checksum", &full))?;
            files.push(Part {
                path: file,
                size,
                digest,
                files: None,
            });
        }
        Ok(Part {
            path: rel,
            size: files.iter().map(|f| f.size).sum(),
            digest: dir_digest(
                files
                    .iter()
                    .map(|f| (f.path.as_path(), f.size, f.digest.as_str())),
            ),
            files: Some(files),
        })
    }

    /// Checks the file or directory at `path` against this record.
    fn check(&self, path: &Path) -> Result<(), SnapshotError> {
        let Some(files) = &self.files else {
            return check_file(path, self.size, &self.digest);
        };
        let found = match crate::checksum::dir_files(path) {
            Ok(found) => found,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::Missing {
                    what: path.to_path_buf(),
                });
            }
            Err(e) => return Err(SnapshotError::io("list", path)(e)),
        };
        if let Some(extra) = found.iter().find(|f| !files.iter().any(|p| &p.path == *f)) {
            return Err(SnapshotError::Corrupt {
                path: path.join(extra),
                reason: "this file is not part of the snapshot that was sealed".into(),
            });
        }
        for file in files {
            check_file(&path.join(&file.path), file.size, &file.digest)?;
        }
        Ok(())
    }
}

/// Checks one file's size and checksum.
fn check_file(path: &Path, size: u64, digest: &str) -> Result<(), SnapshotError> {
    let found = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Err(SnapshotError::Corrupt {
                path: path.to_path_buf(),
                reason: "it is not a regular file".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing {
                what: path.to_path_buf(),
            });
        }
        Err(e) => return Err(SnapshotError::io("stat", path)(e)),
    };
    if found != size {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("size is {found} bytes, the snapshot recorded {size}"),
        });
    }
    let actual =
        crate::checksum::digest_like(path, digest).map_err(SnapshotError::io("checksum", path))?;
    if actual != digest {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("checksum is {actual}, the snapshot recorded {digest}"),
        });
    }
    Ok(())
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
        let part = |p: &Path| Part::of(p, dir);
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

    /// Checks that every part exists with its recorded size and checksum
    /// (for a directory part: every file, and no file besides them).
    pub fn verify(&self) -> Result<(), SnapshotError> {
        let parts = std::iter::once(&self.meta.state)
            .chain(self.meta.memory_file.as_ref())
            .chain(std::iter::once(&self.meta.disk));
        for part in parts {
            part.check(&self.path_of(part))?;
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

    /// A sealed snapshot of `parts` in `dir`, memory in its own file.
    fn sealed(dir: &Path) -> (Snapshot, PathBuf, PathBuf, PathBuf) {
        let (state, mem, disk) = parts(dir);
        let snap = Snapshot::seal(
            dir,
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
        (snap, state, mem, disk)
    }

    /// Flips a byte of `mem` at `at`; `snap.verify()` must name `mem` as
    /// corrupt with a reason containing `reason_has`.
    fn assert_damage_in_memory_is_found(snap: &Snapshot, mem: &Path, at: u64, reason_has: &str) {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(mem).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b"!").unwrap();
        match snap.verify() {
            Err(SnapshotError::Corrupt { path, reason }) => {
                assert_eq!(path, mem);
                assert!(reason.contains(reason_has), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn seal_open_verify_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (snap, state, mem, _) = sealed(dir.path());
        assert_eq!(snap.meta().state.path, PathBuf::from("state"));
        let snap = Snapshot::open(dir.path()).unwrap();
        snap.verify().unwrap();
        assert_eq!(snap.memory_path().unwrap(), mem);

        // A flipped byte in memory is found.
        assert_damage_in_memory_is_found(&snap, &mem, 1 << 20, "checksum");
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

    /// A snapshot sealed by an older agent (whole-stream digests) is
    /// verified by the method it recorded: a sandbox asleep across an
    /// upgrade wakes, and damage to it is still found.
    #[test]
    fn snapshots_sealed_with_the_older_digest_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (_, state, mem, disk) = sealed(dir.path());
        let meta_path = dir.path().join(META_FILE);
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        for (part, path) in [("state", &state), ("memory_file", &mem), ("disk", &disk)] {
            let old = crate::checksum::stream_digest(path).unwrap();
            assert_ne!(meta[part]["digest"], old.as_str());
            meta[part]["digest"] = old.into();
        }
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
        let snap = Snapshot::open(dir.path()).unwrap();
        snap.verify().unwrap();

        assert_damage_in_memory_is_found(&snap, &mem, 3 << 20, "recorded xxh3-128:");
    }

    /// Cloud Hypervisor's snapshot is a directory; every file in it is
    /// covered, and a changed, missing or extra file is found.
    #[test]
    fn directory_state_parts_are_checksummed_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("config.json"), br#"{"cpus":{}}"#).unwrap();
        std::fs::write(state.join("state.json"), b"{}").unwrap();
        let f = std::fs::File::create(state.join("memory-ranges")).unwrap();
        f.set_len(32 << 20).unwrap();
        let disk = dir.path().join("rw.ext4");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let snap = Snapshot::seal(
            dir.path(),
            SnapshotParts {
                memory: MemoryLayout::Stream,
                state: &state,
                memory_file: None,
                disk: &disk,
                cpus: 1,
                memory_mib: 32,
                root_disk: "disk".into(),
            },
        )
        .unwrap();
        let part = &snap.meta().state;
        assert_eq!(part.path, PathBuf::from("state"));
        let files: Vec<_> = part
            .files
            .as_ref()
            .unwrap()
            .iter()
            .map(|f| f.path.clone())
            .collect();
        assert_eq!(
            files,
            ["config.json", "memory-ranges", "state.json"].map(PathBuf::from)
        );
        assert_eq!(part.size, (32 << 20) + 2 + 11);
        let snap = Snapshot::open(dir.path()).unwrap();
        snap.verify().unwrap();
        assert_eq!(snap.state_path(), state);

        std::fs::write(state.join("state.json"), b"{ ").unwrap();
        match snap.verify() {
            Err(SnapshotError::Corrupt { path, reason }) => {
                assert_eq!(path, state.join("state.json"));
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        std::fs::write(state.join("state.json"), b"{}").unwrap();
        snap.verify().unwrap();
        std::fs::write(state.join("extra"), b"x").unwrap();
        match snap.verify() {
            Err(SnapshotError::Corrupt { path, reason }) => {
                assert_eq!(path, state.join("extra"));
                assert!(reason.contains("not part of the snapshot"), "{reason}");
            }
            other => panic!("expected an extra file, got {other:?}"),
        }
        std::fs::remove_file(state.join("extra")).unwrap();
        std::fs::remove_file(state.join("memory-ranges")).unwrap();
        match snap.verify() {
            Err(SnapshotError::Missing { what }) => assert_eq!(what, state.join("memory-ranges")),
            other => panic!("expected a missing file, got {other:?}"),
        }
        std::fs::remove_dir_all(&state).unwrap();
        match snap.verify() {
            Err(SnapshotError::Missing { what }) => assert_eq!(what, state),
            other => panic!("expected a missing directory, got {other:?}"),
        }
    }

    /// Snapshots sealed before directory parts existed still open.
    #[test]
    fn file_parts_serialise_as_before() {
        let part = Part {
            path: "state".into(),
            size: 1,
            digest: "d".into(),
            files: None,
        };
        let json = serde_json::to_string(&part).unwrap();
        assert_eq!(json, r#"{"path":"state","size":1,"digest":"d"}"#);
        assert_eq!(serde_json::from_str::<Part>(&json).unwrap(), part);
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
