//! Snapshot directories: where `vm.snapshot` writes (`config.json`,
//! `state.json`, `memory-ranges`), and the per-VM directory a restore
//! reads from.
//!
//! `vm.restore` takes the VM configuration from the snapshot's
//! `config.json`, which names the paths of the VM that was snapshotted.
//! A template clone or a woken sandbox needs its own writable disk, vsock
//! socket and TAP, and a template's files must never change. So a restore
//! reads from `<run dir>/restore/`: a rewritten copy of `config.json`
//! ([`super::config::rewrite_for_restore`]), a copy of `state.json` (small:
//! device state), and a symlink to the source's `memory-ranges` (guest RAM,
//! which the VMM only reads: copies it, faults it in on demand, or maps it
//! privately).

use std::path::{Path, PathBuf};

use super::error::ChError;
use crate::vmm::VmSpec;

/// Files of a Cloud Hypervisor snapshot.
pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory-ranges";

/// `file://<absolute path>`, as the API wants directories.
pub fn file_url(dir: &Path) -> Result<String, ChError> {
    let abs = std::path::absolute(dir).map_err(ChError::io(format!(
        "resolve snapshot directory {}",
        dir.display()
    )))?;
    Ok(format!("file://{}", abs.display()))
}

/// An empty directory at `dir` for `vm.snapshot` to write into (the VMM
/// creates its files with O_EXCL). What was there before (a consumed
/// snapshot) is removed first; a running VM restored from it keeps its
/// open files.
pub fn prepare_destination(dir: &Path) -> Result<(), ChError> {
    remove_path(dir)?;
    std::fs::create_dir_all(dir).map_err(ChError::io(format!(
        "create snapshot directory {}",
        dir.display()
    )))
}

/// Moves the snapshot directory `from` to `to`, replacing what is there
/// (a consumed snapshot; a running VM restored from it keeps its open
/// files). A rename, or a copy where `to` is on another file system.
pub fn move_dir(from: &Path, to: &Path) -> Result<(), ChError> {
    remove_path(to)?;
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::create_dir_all(to).map_err(ChError::io(format!("create {}", to.display())))?;
            let entries =
                std::fs::read_dir(from).map_err(ChError::io(format!("list {}", from.display())))?;
            for entry in entries {
                let entry = entry.map_err(ChError::io(format!("list {}", from.display())))?;
                let dest = to.join(entry.file_name());
                std::fs::copy(entry.path(), &dest).map_err(ChError::io(format!(
                    "copy {} to {}",
                    entry.path().display(),
                    dest.display()
                )))?;
            }
            remove_path(from)?;
        }
        Err(e) => {
            return Err(ChError::io(format!(
                "move {} to {}",
                from.display(),
                to.display()
            ))(e));
        }
    }
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(ChError::io(format!("sync {}", parent.display())))?;
    }
    Ok(())
}

/// Removes a file or a directory tree; missing is fine.
pub fn remove_path(path: &Path) -> Result<(), ChError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(ChError::io(format!("remove {}", path.display())))
}

/// Writes the snapshot's files to disk (a sleeping sandbox's snapshot must
/// survive a host crash like QEMU's state file does).
pub fn sync_dir(dir: &Path) -> Result<(), ChError> {
    let entries = std::fs::read_dir(dir).map_err(ChError::io(format!(
        "list snapshot directory {}",
        dir.display()
    )))?;
    for entry in entries {
        let path = entry
            .map_err(ChError::io(format!(
                "list snapshot directory {}",
                dir.display()
            )))?
            .path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(ChError::io(format!("sync {}", path.display())))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ChError::io(format!("sync {}", dir.display())))
}

/// Builds `restore_dir` from the snapshot in `source` for the VM `spec`
/// (see the module docs). `source` is never written to.
pub fn prepare_restore(
    source: &Path,
    restore_dir: &Path,
    spec: &VmSpec,
    vsock_socket: &Path,
) -> Result<PathBuf, ChError> {
    let bad = |reason: String| ChError::Snapshot {
        path: source.to_path_buf(),
        reason,
    };
    if !source.is_dir() {
        return Err(bad("it is not a snapshot directory".into()));
    }
    let config_path = source.join(CONFIG_FILE);
    let bytes =
        std::fs::read(&config_path).map_err(|e| bad(format!("cannot read {CONFIG_FILE}: {e}")))?;
    let mut config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("{CONFIG_FILE} is not valid JSON: {e}")))?;
    super::config::rewrite_for_restore(&mut config, spec, vsock_socket)
        .map_err(|reason| bad(format!("cannot be restored as {}: {reason}", spec.id)))?;

    remove_path(restore_dir)?;
    std::fs::create_dir_all(restore_dir).map_err(ChError::io(format!(
        "create restore directory {}",
        restore_dir.display()
    )))?;
    let out = serde_json::to_vec(&config).map_err(|e| bad(format!("cannot encode: {e}")))?;
    let target = restore_dir.join(CONFIG_FILE);
    std::fs::write(&target, out).map_err(ChError::io(format!("write {}", target.display())))?;

    let entries = std::fs::read_dir(source).map_err(|e| bad(format!("cannot list it: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("cannot list it: {e}")))?;
        let name = entry.file_name();
        if name == CONFIG_FILE {
            continue;
        }
        let from = entry.path();
        let to = restore_dir.join(&name);
        if name == STATE_FILE {
            std::fs::copy(&from, &to).map_err(ChError::io(format!(
                "copy {} to {}",
                from.display(),
                to.display()
            )))?;
        } else {
            // memory-ranges (and whatever else the VMM wrote): read-only
            // for the VMM, so shared with the source.
            let abs = std::path::absolute(&from)
                .map_err(ChError::io(format!("resolve {}", from.display())))?;
            std::os::unix::fs::symlink(&abs, &to).map_err(ChError::io(format!(
                "link {} to {}",
                to.display(),
                abs.display()
            )))?;
        }
    }
    for needed in [STATE_FILE, MEMORY_FILE] {
        if !restore_dir.join(needed).exists() {
            return Err(bad(format!("{needed} is missing")));
        }
    }
    Ok(restore_dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{Accelerator, ChannelKind, DiskSpec, MemoryBacking};

    fn spec(rw: &Path) -> VmSpec {
        VmSpec {
            id: "sbx-2".into(),
            cpus: 1,
            memory_mib: 128,
            memory: MemoryBacking {
                path: "/unused".into(),
                shared: true,
            },
            kernel: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.img".into(),
            cmdline: "somna.id=sbx-2".into(),
            disks: vec![DiskSpec {
                path: rw.to_path_buf(),
                read_only: false,
                serial: "somna-rw".into(),
            }],
            disk_io: Default::default(),
            net: None,
            channel: ChannelKind::Vsock,
            accelerator: Accelerator::Kvm,
        }
    }

    #[test]
    fn restore_dir_rewrites_config_and_never_touches_the_source() {
        let t = tempfile::tempdir().unwrap();
        let source = t.path().join("template/state");
        std::fs::create_dir_all(&source).unwrap();
        let old = spec(&t.path().join("template/rw.ext4"));
        let config = super::super::config::vm_config(&old, &t.path().join("tpl/vsock.sock"));
        std::fs::write(
            source.join(CONFIG_FILE),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        std::fs::write(source.join(STATE_FILE), b"{\"state\":1}").unwrap();
        std::fs::write(source.join(MEMORY_FILE), vec![9u8; 8192]).unwrap();
        let before: Vec<_> = [CONFIG_FILE, STATE_FILE, MEMORY_FILE]
            .iter()
            .map(|f| std::fs::read(source.join(f)).unwrap())
            .collect();

        let run = t.path().join("vms/sbx-2");
        let new = spec(&run.join("rw.ext4"));
        let dir =
            prepare_restore(&source, &run.join("restore"), &new, &run.join("vsock.sock")).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(
            cfg["disks"][0]["path"],
            run.join("rw.ext4").display().to_string()
        );
        assert_eq!(
            cfg["vsock"]["socket"],
            run.join("vsock.sock").display().to_string()
        );
        assert_eq!(
            std::fs::read(dir.join(STATE_FILE)).unwrap(),
            b"{\"state\":1}"
        );
        assert!(
            std::fs::symlink_metadata(dir.join(MEMORY_FILE))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(dir.join(MEMORY_FILE)).unwrap().len(), 8192);
        // Twice (a second restore attempt) is fine.
        prepare_restore(&source, &run.join("restore"), &new, &run.join("vsock.sock")).unwrap();
        let after: Vec<_> = [CONFIG_FILE, STATE_FILE, MEMORY_FILE]
            .iter()
            .map(|f| std::fs::read(source.join(f)).unwrap())
            .collect();
        assert_eq!(before, after, "the source snapshot is never written");

        std::fs::remove_file(source.join(MEMORY_FILE)).unwrap();
        let err = prepare_restore(&source, &run.join("restore"), &new, &run.join("v"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory-ranges is missing"), "{err}");
        assert_eq!(file_url(Path::new("/a/b")).unwrap(), "file:///a/b");
    }
}
