//! Per-VM run directories: `<data_dir>/vms/<id>/` holds everything a VM has
//! on the host (VMM sockets, console log, writable disk, pid file), so that
//! destroying a VM and recovering from a crash are both "end the process
//! recorded in the pid file, then remove the directory".

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The run directory of one VM.
#[derive(Debug, Clone)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// Creates `<root>/<id>/` (fails if it exists: ids are unique).
    pub fn create(root: &Path, id: &str) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let path = root.join(id);
        std::fs::create_dir(&path)?;
        Ok(VmDir { path })
    }

    /// An existing run directory (crash recovery).
    pub fn open(path: PathBuf) -> Self {
        VmDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM id (the directory name).
    pub fn id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    /// The guest's serial console.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// The VMM's own stdout/stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }

    /// The sandbox's writable disk layer.
    pub fn rw_disk(&self) -> PathBuf {
        self.path.join("rw.ext4")
    }

    /// Guest RAM, when the VM owns its memory file.
    pub fn memory_file(&self) -> PathBuf {
        self.path.join("mem")
    }

    /// Gives the VM's memory file (created if missing) every block of its
    /// `memory_mib` up front, keeping what it holds. A guest page written
    /// to a block that cannot be allocated would kill the VMM with SIGBUS
    /// once the host's disk is full; this way a full disk is met here,
    /// with an error, before the VM runs.
    pub fn allocate_memory(&self, memory_mib: u32) -> io::Result<()> {
        let len = u64::from(memory_mib) * 1024 * 1024;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.memory_file())?;
        match nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            len as nix::libc::off_t,
        ) {
            Ok(()) => Ok(()),
            // A file system without fallocate: the VMM sizes the file.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The VMM state a sleep wrote.
    pub fn state_file(&self) -> PathBuf {
        self.path.join("state")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path.join("vmm.pid")
    }

    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        std::fs::write(self.pid_file(), format!("{pid}\n"))
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The last `max_lines` lines of the guest console (for error messages).
    pub fn console_tail(&self, max_lines: usize) -> String {
        tail_lines(&self.console_log(), max_lines)
    }

    /// The last lines the VMM printed itself.
    pub fn vmm_log_tail(&self, max_lines: usize) -> String {
        tail_lines(&self.vmm_log(), max_lines)
    }

    /// Removes the directory and everything in it. Missing is fine. A file
    /// that appears while it is being emptied (a VMM writing its log as it
    /// dies) gets another pass.
    pub fn remove(&self) -> io::Result<()> {
        let mut passes = 0;
        loop {
            match std::fs::remove_dir_all(&self.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && passes < 3 => {
                    passes += 1;
                }
                other => return other,
            }
        }
    }
}

/// All run directories under `root` (those left by a previous agent process
/// at start-up).
pub fn list(root: &Path) -> io::Result<Vec<VmDir>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(VmDir::open(entry.path()));
        }
    }
    Ok(dirs)
}

/// True when the file system holding `path` has no space left for an
/// unprivileged writer (what a VMM is).
pub fn disk_full(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path).is_ok_and(|s| s.blocks_available() == 0)
}

/// Reads at most the last 64 KiB of a log file and keeps its last lines.
fn tail_lines(path: &Path, max_lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(WINDOW))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_keeps_last_lines() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::create(root.path(), "sbx-1").unwrap();
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.console_log(), text).unwrap();
        assert_eq!(dir.console_tail(2), "line 98\nline 99");
        assert_eq!(dir.id(), "sbx-1");
    }

    #[test]
    fn allocate_memory_reserves_every_block_and_keeps_what_is_there() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::create(root.path(), "sbx-m").unwrap();
        dir.allocate_memory(4).unwrap();
        let meta = std::fs::metadata(dir.memory_file()).unwrap();
        assert_eq!(meta.len(), 4 << 20);
        assert!(meta.blocks() * 512 >= 4 << 20, "{} blocks", meta.blocks());
        // A woken VM's RAM is in the file: a second allocation keeps it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.memory_file())
            .unwrap();
        f.write_all_at(b"guest page", 1 << 20).unwrap();
        dir.allocate_memory(4).unwrap();
        let mut buf = [0u8; 10];
        std::fs::File::open(dir.memory_file())
            .unwrap()
            .read_exact_at(&mut buf, 1 << 20)
            .unwrap();
        assert_eq!(&buf, b"guest page");
    }

    #[test]
    fn create_refuses_existing_and_remove_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::create(root.path(), "a").unwrap();
        assert!(VmDir::create(root.path(), "a").is_err());
        dir.write_pid(42).unwrap();
        assert_eq!(dir.read_pid(), Some(42));
        assert_eq!(list(root.path()).unwrap().len(), 1);
        dir.remove().unwrap();
        dir.remove().unwrap();
        assert!(list(root.path()).unwrap().is_empty());
    }
}
