//! Template snapshots: per (image, size, guest build), one VM booted once and
//! snapshotted, from which new sandboxes are cloned. A template's key hashes
//! everything its snapshot depends on, so a changed image, kernel, guest
//! agent, VMM or accelerator can never pick up a stale template.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SnapshotError;
use crate::snapshot::Snapshot;

const META_FILE: &str = "template.json";
const STAGING: &str = ".building-";

/// Everything a template snapshot depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TemplateInputs {
    /// The reference it was created for (for listings only; not keyed).
    pub image: String,
    pub image_digest: String,
    /// Identity of the root disk file the template VM ran on (a rebuilt
    /// disk may differ in layout, and the guest's cached metadata with it).
    pub root_disk: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// Hash of the guest kernel, initramfs (guest agent), VMM version,
    /// accelerator and machine options.
    pub guest_fingerprint: String,
}

impl TemplateInputs {
    /// The template's key: a hash of every input but the display name.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.image_digest.as_str(),
            &self.root_disk,
            &self.cpus.to_string(),
            &self.memory_mib.to_string(),
            &self.disk_mib.to_string(),
            &self.guest_fingerprint,
            &crate::snapshot::FORMAT_VERSION.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..12])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub inputs: TemplateInputs,
    pub created_unix_ms: u64,
    /// How long boot + snapshot took.
    pub build_ms: u64,
}

/// A ready template.
#[derive(Debug, Clone)]
pub struct Template {
    pub key: String,
    pub meta: TemplateMeta,
    pub snapshot: Snapshot,
}

impl Template {
    /// Allocated bytes of its files on disk (directory parts included).
    pub fn size_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.snapshot.dir();
        crate::checksum::dir_files(dir)
            .map(|files| {
                files
                    .iter()
                    .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// The templates under one directory.
pub struct TemplateStore {
    root: PathBuf,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TemplateStore {
    /// Opens `root`, removing half-built templates a crash left behind.
    pub fn open(root: &Path) -> Result<TemplateStore, SnapshotError> {
        std::fs::create_dir_all(root).map_err(SnapshotError::io("create", root))?;
        for entry in std::fs::read_dir(root)
            .map_err(SnapshotError::io("list", root))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().contains(STAGING) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(TemplateStore {
            root: root.to_path_buf(),
            building: Mutex::new(HashMap::new()),
        })
    }

    /// The ready template for `inputs`, if any.
    pub fn get(&self, inputs: &TemplateInputs) -> Option<Template> {
        let key = inputs.key();
        let t = self.load(&self.root.join(&key))?;
        (t.meta.inputs == *inputs || t.meta.inputs.key() == key).then_some(t)
    }

    fn load(&self, dir: &Path) -> Option<Template> {
        let meta: TemplateMeta =
            serde_json::from_slice(&std::fs::read(dir.join(META_FILE)).ok()?).ok()?;
        let snapshot = Snapshot::open(dir).ok()?;
        Some(Template {
            key: dir.file_name()?.to_string_lossy().into_owned(),
            meta,
            snapshot,
        })
    }

    /// Serialises builds of one key: hold the guard while checking for and
    /// building the template.
    pub fn build_lock(&self, inputs: &TemplateInputs) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.building.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(inputs.key()).or_default().clone()
    }

    /// A fresh directory to build the template for `inputs` in.
    pub fn staging_dir(&self, inputs: &TemplateInputs) -> Result<PathBuf, SnapshotError> {
        let nonce: u64 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let dir = self
            .root
            .join(format!("{}{STAGING}{nonce:x}", inputs.key()));
        std::fs::create_dir_all(&dir).map_err(SnapshotError::io("create", &dir))?;
        Ok(dir)
    }

    /// Publishes a staged, sealed snapshot as the template for `inputs`.
    pub fn commit(
        &self,
        staging: &Path,
        inputs: TemplateInputs,
        build_ms: u64,
    ) -> Result<Template, SnapshotError> {
        let key = inputs.key();
        let meta = TemplateMeta {
            inputs,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            build_ms,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotError::Invalid {
            dir: staging.to_path_buf(),
            reason: format!("cannot encode template metadata: {e}"),
        })?;
        let meta_path = staging.join(META_FILE);
        std::fs::write(&meta_path, json).map_err(SnapshotError::io("write", &meta_path))?;
        let dest = self.root.join(&key);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(SnapshotError::io("replace", &dest))?;
        }
        std::fs::rename(staging, &dest).map_err(SnapshotError::io("publish", &dest))?;
        self.load(&dest).ok_or_else(|| SnapshotError::Invalid {
            dir: dest.clone(),
            reason: "the template did not read back after publishing".into(),
        })
    }

    /// All ready templates.
    pub fn list(&self) -> Vec<Template> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut all: Vec<Template> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().contains(STAGING))
            .filter_map(|e| self.load(&e.path()))
            .collect();
        all.sort_by(|a, b| {
            a.meta
                .inputs
                .image
                .cmp(&b.meta.inputs.image)
                .then(a.key.cmp(&b.key))
        });
        all
    }

    /// Removes templates built for another guest (kernel, agent, VMM or
    /// accelerator) and unreadable leftovers. Returns how many went.
    pub fn remove_stale(&self, guest_fingerprint: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let keep = self.load(&e.path()).is_some_and(|t| {
                t.meta.inputs.guest_fingerprint == guest_fingerprint && t.meta.inputs.key() == t.key
            });
            if !keep && std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Removes one template.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let dir = self.root.join(key);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SnapshotError::io("remove", &dir)(e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{MemoryLayout, SnapshotParts};

    fn inputs(digest: &str, fp: &str) -> TemplateInputs {
        TemplateInputs {
            image: "busybox".into(),
            image_digest: digest.into(),
            root_disk: "disk-1".into(),
            cpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            guest_fingerprint: fp.into(),
        }
    }

    fn build(store: &TemplateStore, i: &TemplateInputs) -> Template {
        let dir = store.staging_dir(i).unwrap();
        for f in ["state", "mem", "rw.ext4"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        Snapshot::seal(
            &dir,
            SnapshotParts {
                memory: MemoryLayout::File,
                state: &dir.join("state"),
                memory_file: Some(&dir.join("mem")),
                disk: &dir.join("rw.ext4"),
                cpus: 1,
                memory_mib: 512,
                root_disk: "disk-1".into(),
            },
        )
        .unwrap();
        store.commit(&dir, i.clone(), 5).unwrap()
    }

    #[test]
    fn keys_cover_every_input() {
        let a = inputs("sha256:aa", "fp1");
        let mut b = a.clone();
        b.image = "other-name".into();
        assert_eq!(a.key(), b.key(), "the display name is not part of the key");
        for change in [
            |i: &mut TemplateInputs| i.image_digest = "sha256:bb".into(),
            |i: &mut TemplateInputs| i.root_disk = "disk-2".into(),
            |i: &mut TemplateInputs| i.cpus = 2,
            |i: &mut TemplateInputs| i.memory_mib = 256,
            |i: &mut TemplateInputs| i.disk_mib = 2048,
            |i: &mut TemplateInputs| i.guest_fingerprint = "fp2".into(),
        ] {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(a.key(), c.key());
        }
    }

    #[test]
    fn commit_get_list_and_stale_removal() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(root.path()).unwrap();
        let i1 = inputs("sha256:aa", "fp1");
        assert!(store.get(&i1).is_none());
        let t = build(&store, &i1);
        assert_eq!(t.key, i1.key());
        t.snapshot.verify().unwrap();
        assert_eq!(store.get(&i1).unwrap().key, i1.key());
        assert!(store.get(&inputs("sha256:aa", "fp2")).is_none());
        assert_eq!(store.list().len(), 1);

        // A half-built template from a crash is cleared at open.
        let _half = store.staging_dir(&inputs("sha256:cc", "fp1")).unwrap();
        let store = TemplateStore::open(root.path()).unwrap();
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);

        // A new guest build makes the old template stale.
        assert_eq!(store.remove_stale("fp2"), 1);
        assert!(store.list().is_empty());
    }
}
