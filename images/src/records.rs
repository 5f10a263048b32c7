//! Image records: what the cache knows about each image it holds, one JSON
//! file per reference under `<cache_dir>/images/`, written atomically
//! (temporary file, rename). They are what lets a restarted store find its
//! images without any network, and what `list`, `remove` and garbage
//! collection work from.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ImageError, IoContext};

const RECORD_VERSION: u32 = 1;

/// Where an image's content came from (and so where its blobs are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum RecordSource {
    /// A local layout; blobs stay in it.
    Layout { dir: PathBuf },
    /// Pulled from a registry into the blob store.
    Registry {
        registry: String,
        repository: String,
    },
    /// Imported from an `oci:` layout into the blob store.
    OciLayout { path: PathBuf },
    /// Imported from a `docker save` archive into the blob store.
    DockerArchive { path: PathBuf },
}

/// One blob of the store an image uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BlobRef {
    pub digest: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub version: u32,
    /// The key: the reference as resolved (canonical for registries).
    pub reference: String,
    pub source: RecordSource,
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// Blobs in the store this image needs (manifest, config, layers);
    /// empty for local layouts.
    pub blobs: Vec<BlobRef>,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub last_used_ns: u64,
    /// When the source was last contacted for this reference.
    pub pulled_ns: u64,
}

impl Record {
    pub(crate) fn new(
        reference: String,
        source: RecordSource,
        manifest_digest: &Digest,
        manifest_size: u64,
        blobs: Vec<(Digest, u64)>,
        now: u64,
    ) -> Self {
        Record {
            version: RECORD_VERSION,
            reference,
            source,
            manifest_digest: manifest_digest.to_string(),
            manifest_size,
            blobs: blobs
                .into_iter()
                .map(|(d, size)| BlobRef {
                    digest: d.to_string(),
                    size,
                })
                .collect(),
            created_ns: now,
            last_used_ns: now,
            pulled_ns: now,
        }
    }

    /// The manifest digest (validated when the record was loaded).
    pub(crate) fn digest(&self) -> Digest {
        Digest::parse(&self.manifest_digest).unwrap_or_else(|_| Digest::of(b""))
    }

    pub(crate) fn blob_digests(&self) -> impl Iterator<Item = Digest> + '_ {
        self.blobs
            .iter()
            .filter_map(|b| Digest::parse(&b.digest).ok())
    }

    /// Bytes of this image's blobs (shared ones counted in full).
    pub(crate) fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }

    fn valid(&self) -> bool {
        self.version == RECORD_VERSION
            && Digest::parse(&self.manifest_digest).is_ok()
            && self.blobs.iter().all(|b| Digest::parse(&b.digest).is_ok())
    }
}

/// The record directory.
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    pub(crate) fn open(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).ctx("cannot create cache directory", dir)?;
        Ok(Records {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, reference: &str) -> PathBuf {
        // Hashed: references hold '/' and ':' and may be long.
        self.dir
            .join(format!("{}.json", Digest::of(reference.as_bytes()).hex()))
    }

    /// Loads every record. Unreadable or stale ones are removed (they are
    /// cache, and the image is pulled again when next used).
    pub(crate) fn load_all(&self) -> Result<HashMap<String, Record>, ImageError> {
        let mut out = HashMap::new();
        for entry in fs::read_dir(&self.dir).ctx("cannot list", &self.dir)? {
            let entry = entry.ctx("cannot list", &self.dir)?;
            let path = entry.path();
            let is_record = path.extension().is_some_and(|e| e == "json");
            let parsed = if is_record {
                fs::read(&path)
                    .ok()
                    .and_then(|d| serde_json::from_slice::<Record>(&d).ok())
                    .filter(|r| r.valid() && self.path(&r.reference) == path)
            } else {
                None
            };
            match parsed {
                Some(r) => {
                    out.insert(r.reference.clone(), r);
                }
                None => {
                    tracing::warn!(path = %path.display(), "removing an unreadable image record");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(out)
    }

    /// Writes a record atomically. `durable`: also fsync (for new images;
    /// a lost last-used time after a crash does not matter).
    pub(crate) fn save(&self, record: &Record, durable: bool) -> Result<(), ImageError> {
        let path = self.path(&record.reference);
        let data = serde_json::to_vec_pretty(record).map_err(|e| {
            ImageError::io("cannot encode image record", &path, io::Error::other(e))
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".record-")
            .tempfile_in(&self.dir)
            .ctx("cannot write image record in", &self.dir)?;
        tmp.write_all(&data)
            .ctx("cannot write image record", &path)?;
        if durable {
            tmp.as_file()
                .sync_all()
                .ctx("cannot sync image record", &path)?;
        }
        tmp.persist(&path)
            .map_err(|e| ImageError::io("cannot write image record", &path, e.error))?;
        if durable {
            fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .ctx("cannot sync", &self.dir)?;
        }
        Ok(())
    }

    pub(crate) fn delete(&self, reference: &str) -> Result<(), ImageError> {
        let path = self.path(reference);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("cannot remove image record", &path, e)),
        }
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn to_system_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_junk_removed() {
        let t = tempfile::tempdir().unwrap();
        let records = Records::open(t.path()).unwrap();
        let r = Record::new(
            "docker.io/library/busybox:latest".into(),
            RecordSource::Registry {
                registry: "docker.io".into(),
                repository: "library/busybox".into(),
            },
            &Digest::of(b"m"),
            10,
            vec![(Digest::of(b"c"), 3)],
            42,
        );
        records.save(&r, true).unwrap();
        fs::write(t.path().join("junk.json"), b"{").unwrap();
        let all = records.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[&r.reference], r);
        assert!(!t.path().join("junk.json").exists());
        records.delete(&r.reference).unwrap();
        assert!(records.load_all().unwrap().is_empty());
    }
}
