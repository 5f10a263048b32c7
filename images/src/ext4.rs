//! ext4 file systems made with e2fsprogs' `mkfs.ext4`.
//!
//! Root disks are made with `mkfs.ext4 -d DIR`, which copies a directory
//! tree into the new file system without mounting anything. With
//! e2fsprogs 1.47 that copy keeps numeric ownership, the full mode
//! (setuid/setgid/sticky included), extended attributes, hard links,
//! symlinks, device nodes, fifos, sockets and mtimes (see the tests in
//! `tests/ext4.rs`). The root directory's owner is set with
//! `-E root_owner=0:0`.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;
/// Smallest root disk made.
pub const MIN_ROOT_DISK_BYTES: u64 = 64 * MIB;

/// Finds an e2fsprogs tool in `PATH`, `/usr/sbin` or `/sbin` (sbin is often
/// not in the PATH of services).
pub(crate) fn find_tool(name: &str) -> Result<PathBuf, ImageError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
            && m.mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    Err(ImageError::ToolMissing {
        tool: name.to_string(),
        package: "e2fsprogs".to_string(),
    })
}

/// What a directory tree needs on ext4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TreeUsage {
    /// Distinct inodes (hard links counted once).
    pub inodes: u64,
    /// Data and directory blocks, in bytes, rounded up to blocks.
    pub data_bytes: u64,
}

/// Walks `root` (never following symlinks) and estimates its ext4 needs.
pub(crate) fn measure_tree(root: &Path) -> Result<TreeUsage, ImageError> {
    let mut usage = TreeUsage::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    let round = |n: u64| n.div_ceil(BLOCK) * BLOCK;
    while let Some(dir) = stack.pop() {
        usage.inodes += 1;
        let mut dir_bytes = 24; // "." and ".."
        for entry in std::fs::read_dir(&dir).ctx("cannot list", &dir)? {
            let entry = entry.ctx("cannot list", &dir)?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).ctx("cannot inspect", &path)?;
            // ext4 directory entry: 8 bytes + name, 4-byte aligned.
            dir_bytes += (8 + entry.file_name().len() as u64).div_ceil(4) * 4;
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            let ft = meta.file_type();
            if ft.is_file() {
                usage.data_bytes += round(meta.len());
                // Extent tree blocks for big, fragmented files.
                usage.data_bytes += meta.len() / (128 * MIB) * BLOCK;
            } else if ft.is_symlink() && meta.len() >= 60 {
                usage.data_bytes += BLOCK; // too long to live in the inode
            }
            if has_xattrs(&path) {
                usage.data_bytes += BLOCK; // may not fit in the inode
            }
        }
        // Hash-tree directories use a little more than the entries need.
        usage.data_bytes += round(dir_bytes + dir_bytes / 4);
    }
    Ok(usage)
}

fn has_xattrs(path: &Path) -> bool {
    xattr::list(path)
        .map(|mut l| l.next().is_some())
        .unwrap_or(false)
}

/// Size and inode count for a read-only root disk holding `usage`: the data
/// plus inode tables plus ext4 metadata plus generous slack (25% and
/// 32 MiB; the disk file is sparse, so slack costs little), at least
/// [`MIN_ROOT_DISK_BYTES`], whole MiB.
pub(crate) fn root_disk_geometry(usage: TreeUsage) -> (u64, u64) {
    let inodes = (usage.inodes + usage.inodes / 4 + 1024).next_multiple_of(1024);
    let raw = usage.data_bytes + inodes * INODE_SIZE;
    let size = (raw + raw / 4 + 32 * MIB)
        .max(MIN_ROOT_DISK_BYTES)
        .next_multiple_of(MIB);
    (size, inodes)
}

/// Makes a read-only root file system image at `out` (which must not
/// exist) from the directory `src`.
pub(crate) fn mkfs_root(
    src: &Path,
    out: &Path,
    size_bytes: u64,
    inodes: u64,
    uuid: &str,
) -> Result<(), ImageError> {
    let mkfs = find_tool("mkfs.ext4")?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .ctx("cannot create", out)?;
    file.set_len(size_bytes).ctx("cannot size", out)?;
    drop(file);
    let mut cmd = Command::new(&mkfs);
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
    ])
    .args(["-L", "somna-root", "-O", "^has_journal", "-U", uuid])
    .arg("-N")
    .arg(inodes.to_string())
    .arg("-E")
    .arg(format!("root_owner=0:0,hash_seed={uuid},nodiscard"))
    .arg("-d")
    .arg(src)
    .arg(out);
    run(
        cmd,
        "mkfs.ext4",
        &format!("making the root disk {}", out.display()),
    )
}

/// Formats `path` (an existing, typically sparse, file) as an empty
/// writable ext4 file system. Journal and inode tables are not zeroed: the
/// file was created empty, so they read as zeros already.
pub(crate) fn mkfs_writable_command(path: &Path) -> Result<Command, ImageError> {
    let mkfs = find_tool("mkfs.ext4")?;
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-L", "somna-rw"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1,nodiscard,root_owner=0:0",
        ])
        .arg(path);
    Ok(cmd)
}

fn run(mut cmd: Command, tool: &str, what: &str) -> Result<(), ImageError> {
    let out = cmd
        .output()
        .map_err(|e| ImageError::io(format!("cannot run {tool}"), cmd.get_program(), e))?;
    check_output(&out, tool, what)
}

pub(crate) fn check_output(
    out: &std::process::Output,
    tool: &str,
    what: &str,
) -> Result<(), ImageError> {
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(ImageError::ToolFailed {
        tool: tool.to_string(),
        what: what.to_string(),
        status: out.status.to_string(),
        stderr,
    })
}

/// A UUID (as text) made from the first 16 bytes of a hex digest, so the
/// same image always gets the same file system UUID.
pub(crate) fn uuid_from_hex(hex: &str) -> String {
    let h = &hex[..32];
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_has_floor_and_slack() {
        let (size, inodes) = root_disk_geometry(TreeUsage {
            inodes: 10,
            data_bytes: 4096,
        });
        assert_eq!(size, MIN_ROOT_DISK_BYTES);
        assert!(inodes >= 1024);
        let (size, inodes) = root_disk_geometry(TreeUsage {
            inodes: 100_000,
            data_bytes: 1 << 30,
        });
        assert!(size > (1 << 30) + 100_000 * 256);
        assert_eq!(size % MIB, 0);
        assert!(inodes >= 125_000);
    }

    #[test]
    fn uuid_format() {
        let u = uuid_from_hex(&"0123456789abcdef".repeat(4));
        assert_eq!(u, "01234567-89ab-cdef-0123-456789abcdef");
    }
}
