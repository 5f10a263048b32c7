//! The sandbox record kept in its run directory (`sandbox.json`): what a
//! restarted agent needs to take a sandbox back after a crash. It is
//! written once the sandbox runs and after every sleep and wake, and
//! removed first thing on destroy, so a run directory without it is never
//! adopted (a create or destroy that was under way, a template build, a
//! warm-pool VM).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::rundir::VmDir;
use crate::sandbox::{MemoryMode, Sandbox, SandboxState, StartMode};

const FILE: &str = "sandbox.json";

/// Bumped when a field changes meaning; a record of another version is not
/// adopted.
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordedMemory {
    /// RAM in the sandbox's own shared memory file.
    Own,
    /// A copy-on-write mapping of a template's memory file.
    TemplateCow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub version: u32,
    /// The sandbox id (a warm-pool VM keeps the run directory it was
    /// pooled in, so this is not always the directory's name).
    pub id: String,
    /// The VMM driver that ran it ("qemu", "cloud-hypervisor").
    pub vmm: String,
    pub image: String,
    pub image_digest: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub env: BTreeMap<String, String>,
    pub created_unix_ms: u64,
    pub boot_ms: u64,
    pub start_mode: String,
    pub idle_timeout_ms: Option<u64>,
    pub sleep_count: u64,
    pub wake_count: u64,
    /// "running", "sleeping" or "failed" (its VMM died; the disk is kept).
    pub state: String,
    /// Why it failed (state "failed").
    #[serde(default)]
    pub failure: Option<String>,
    pub memory: RecordedMemory,
    /// Identity of the root disk it runs on (what a snapshot is sealed
    /// against).
    pub root_disk: String,
    pub network: somna_netd::EgressPolicy,
}

impl SandboxRecord {
    pub(crate) fn of(sandbox: &Sandbox, vmm: &str) -> SandboxRecord {
        let info = sandbox.info();
        SandboxRecord {
            version: VERSION,
            id: info.id,
            vmm: vmm.to_string(),
            image: info.image,
            image_digest: info.image_digest,
            cpus: info.cpus,
            memory_mib: info.memory_mib,
            disk_mib: info.disk_mib,
            env: info.env,
            created_unix_ms: unix_ms(info.created_at),
            boot_ms: info.boot_ms,
            start_mode: info.start_mode.as_str().to_string(),
            idle_timeout_ms: info.idle_timeout.map(|d| d.as_millis() as u64),
            sleep_count: info.sleep_count,
            wake_count: info.wake_count,
            state: info.state.as_str().to_string(),
            failure: info.failure,
            memory: match sandbox.memory_mode() {
                MemoryMode::Own => RecordedMemory::Own,
                MemoryMode::TemplateCow => RecordedMemory::TemplateCow,
            },
            root_disk: sandbox.root_disk_id.clone(),
            network: sandbox.net.policy(),
        }
    }

    pub fn path(dir: &VmDir) -> PathBuf {
        dir.path().join(FILE)
    }

    /// Writes the record atomically (a crash leaves the old one or the new
    /// one, never half of one).
    pub fn save(&self, dir: &VmDir) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let path = Self::path(dir);
        let tmp = path.with_extension("json.tmp");
        write_synced(&tmp, &json)?;
        std::fs::rename(&tmp, &path)
    }

    /// The record in `dir`, if there is a readable one of this version.
    pub fn load(dir: &VmDir) -> Option<SandboxRecord> {
        let bytes = std::fs::read(Self::path(dir)).ok()?;
        let record: SandboxRecord = serde_json::from_slice(&bytes).ok()?;
        (record.version == VERSION).then_some(record)
    }

    /// Removes the record: from now on a crash discards the directory.
    pub fn remove(dir: &VmDir) -> io::Result<()> {
        match std::fs::remove_file(Self::path(dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub(crate) fn start_mode(&self) -> StartMode {
        match self.start_mode.as_str() {
            "cold-boot" => StartMode::ColdBoot,
            "template" => StartMode::Template,
            "warm-pool" => StartMode::WarmPool,
            _ => StartMode::Auto,
        }
    }

    pub(crate) fn memory_mode(&self) -> MemoryMode {
        match self.memory {
            RecordedMemory::Own => MemoryMode::Own,
            RecordedMemory::TemplateCow => MemoryMode::TemplateCow,
        }
    }

    pub(crate) fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }

    pub(crate) fn was(&self, state: SandboxState) -> bool {
        self.state == state.as_str()
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SandboxRecord {
        SandboxRecord {
            version: VERSION,
            id: "sbx-abc".into(),
            vmm: "qemu".into(),
            image: "busybox".into(),
            image_digest: "sha256:00".into(),
            cpus: 1,
            memory_mib: 256,
            disk_mib: 512,
            env: BTreeMap::from([("A".into(), "1".into())]),
            created_unix_ms: 1_700_000_000_000,
            boot_ms: 900,
            start_mode: "template".into(),
            idle_timeout_ms: Some(30_000),
            sleep_count: 2,
            wake_count: 1,
            state: "sleeping".into(),
            failure: None,
            memory: RecordedMemory::TemplateCow,
            root_disk: "disk".into(),
            network: somna_netd::EgressPolicy::default(),
        }
    }

    #[test]
    fn round_trips_and_ignores_other_versions() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::create(root.path(), "pool-1").unwrap();
        assert_eq!(SandboxRecord::load(&dir), None);
        let r = record();
        r.save(&dir).unwrap();
        let back = SandboxRecord::load(&dir).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.start_mode(), StartMode::Template);
        assert_eq!(back.memory_mode(), MemoryMode::TemplateCow);
        assert!(back.was(SandboxState::Sleeping));

        let mut other = r.clone();
        other.version = VERSION + 1;
        other.save(&dir).unwrap();
        assert_eq!(SandboxRecord::load(&dir), None);

        std::fs::write(SandboxRecord::path(&dir), b"{ half").unwrap();
        assert_eq!(SandboxRecord::load(&dir), None);
        SandboxRecord::remove(&dir).unwrap();
        SandboxRecord::remove(&dir).unwrap();
        assert!(!SandboxRecord::path(&dir).exists());
    }
}
