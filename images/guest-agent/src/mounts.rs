//! Filesystems of the VM: the initramfs's /dev, /proc and /sys, the sandbox
//! root (overlay of the read-only image disk and the writable disk), and the
//! switch into it.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

/// Serial of the image's read-only root disk.
pub const ROOT_DISK_SERIAL: &str = "somna-root";
/// Serial of the sandbox's writable disk.
pub const RW_DISK_SERIAL: &str = "somna-rw";

const LOWER: &str = "/.somna/lower";
const RW: &str = "/.somna/rw";
const NEW_ROOT: &str = "/sysroot";

fn mkdir(path: &str, mode: u32) -> Result<(), String> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("create directory {path}: {e}")),
    }
}

fn do_mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Errno> {
    mount(Some(source), target, fstype, flags, data)
}

fn mount_err(what: &str, target: &str) -> impl FnOnce(Errno) -> String {
    let msg = format!("mount {what} on {target}");
    move |e| format!("{msg}: {}", e.desc())
}

/// Mounts devtmpfs, proc and sysfs in the initramfs, and makes sure the
/// console is on fds 0-2.
pub fn mount_early() -> Result<(), String> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let mounts = [
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "proc",
            "/proc",
            "proc",
            nosuid_noexec | MsFlags::MS_NODEV,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid_noexec | MsFlags::MS_NODEV,
            None,
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        mkdir(target, 0o755)?;
        match do_mount(source, target, Some(fstype), flags, data) {
            // Already mounted (e.g. the kernel mounted devtmpfs itself).
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(mount_err(fstype, target)(e)),
        }
        if target == "/dev" {
            crate::init::ensure_console_fds();
        }
    }
    Ok(())
}

/// The device nodes of the two sandbox disks.
#[derive(Debug)]
pub struct Disks {
    pub root: PathBuf,
    pub rw: PathBuf,
}

/// Block devices by virtio serial (`/sys/block/*/serial`).
fn block_serials() -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) {
            found.insert(serial.trim().to_string(), name);
        }
    }
    found
}

/// Waits for both disks (by serial, never by name order) and their /dev
/// nodes.
pub fn find_disks(timeout: Duration) -> Result<Disks, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let serials = block_serials();
        let node = |serial: &str| {
            serials
                .get(serial)
                .map(|name| Path::new("/dev").join(name))
                .filter(|p| p.exists())
        };
        if let (Some(root), Some(rw)) = (node(ROOT_DISK_SERIAL), node(RW_DISK_SERIAL)) {
            tracing::debug!("disks: root {} rw {}", root.display(), rw.display());
            return Ok(Disks { root, rw });
        }
        if Instant::now() >= deadline {
            let missing: Vec<&str> = [ROOT_DISK_SERIAL, RW_DISK_SERIAL]
                .into_iter()
                .filter(|s| node(s).is_none())
                .collect();
            let seen: Vec<String> = serials.iter().map(|(s, n)| format!("{n}={s:?}")).collect();
            return Err(format!(
                "no virtio-blk disk with serial {} after {timeout:?} (block devices seen: [{}]); \
                 the VMM must attach the disks with these serials and the virtio_blk module must load",
                missing.join(" and "),
                seen.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mounts the image disk read-only, the writable disk, and their overlay at
/// /sysroot, then prepares /dev, /proc, /sys and friends in it.
pub fn mount_sandbox_root(disks: &Disks) -> Result<(), String> {
    mkdir(LOWER, 0o755)?;
    mkdir(RW, 0o755)?;
    mkdir(NEW_ROOT, 0o755)?;
    let root_dev = disks.root.to_string_lossy();
    let rw_dev = disks.rw.to_string_lossy();
    do_mount(&root_dev, LOWER, Some("ext4"), MsFlags::MS_RDONLY, None).map_err(mount_err(
        &format!("the image disk {root_dev} (ext4, read-only)"),
        LOWER,
    ))?;
    do_mount(&rw_dev, RW, Some("ext4"), MsFlags::MS_NOATIME, None)
        .map_err(mount_err(&format!("the writable disk {rw_dev} (ext4)"), RW))?;
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    mkdir(&upper, 0o755)?;
    mkdir(&work, 0o755)?;
    let opts = format!("lowerdir={LOWER},upperdir={upper},workdir={work}");
    do_mount(
        "overlay",
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )
    .map_err(mount_err(
        "the overlay (is the overlay module loaded?)",
        NEW_ROOT,
    ))?;
    prepare_new_root()
}

fn prepare_new_root() -> Result<(), String> {
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
    ] {
        let path = format!("{NEW_ROOT}/{dir}");
        if !Path::new(&path).exists() {
            mkdir(&path, mode)?;
            if dir == "tmp" {
                // DirBuilder's mode is filtered by the umask and drops the
                // sticky bit.
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
            }
        }
    }
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        do_mount(dir, &target, None, MsFlags::MS_MOVE, None)
            .map_err(mount_err(&format!("(move) {dir}"), &target))?;
    }

    let dev = format!("{NEW_ROOT}/dev");
    // A private devpts instance; /dev/ptmx must then point into it.
    mkdir(&format!("{dev}/pts"), 0o755)?;
    do_mount(
        "devpts",
        &format!("{dev}/pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(mount_err("devpts", "/dev/pts"))?;
    let ptmx = format!("{dev}/ptmx");
    let _ = std::fs::remove_file(&ptmx);
    std::os::unix::fs::symlink("pts/ptmx", &ptmx)
        .map_err(|e| format!("create /dev/ptmx symlink: {e}"))?;

    mkdir(&format!("{dev}/shm"), 0o1777)?;
    do_mount(
        "tmpfs",
        &format!("{dev}/shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(mount_err("tmpfs", "/dev/shm"))?;

    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, format!("{dev}/{name}")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("create /dev/{name} symlink: {e}")),
        }
    }
    Ok(())
}

/// Whether the sandbox's writable layer lacks `/etc/machine-id`, i.e. the
/// file the new root shows (if any) is the image's: every sandbox of the
/// image would share it. Call before [`switch_root`] (the layers are not
/// reachable after it). A whiteout in the writable layer counts as the
/// sandbox's own (the merged root then has no file at all).
pub fn machine_id_only_in_image() -> bool {
    std::fs::symlink_metadata(format!("{RW}/upper/etc/machine-id")).is_err()
}

/// Switches root to /sysroot like busybox's switch_root: free the
/// initramfs's files (they would pin memory forever), move the new root
/// over "/", chroot into it.
pub fn switch_root() -> Result<(), String> {
    free_initramfs();
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {e}"))?;
    do_mount(".", "/", None, MsFlags::MS_MOVE, None).map_err(mount_err(NEW_ROOT, "/"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot into the sandbox root: {}", e.desc()))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir / in the sandbox root: {e}"))?;
    Ok(())
}

/// Deletes the initramfs's own files, staying on its filesystem: mount
/// points below it (the disks, /sysroot) have another device number and
/// are skipped. Only when "/" really is the initramfs (ramfs or tmpfs).
fn free_initramfs() {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(st) = nix::sys::statfs::statfs("/") else {
        return;
    };
    let fs_type = st.filesystem_type().0;
    if fs_type != RAMFS_MAGIC && fs_type != TMPFS_MAGIC {
        tracing::debug!("/ is not an initramfs; not freeing it");
        return;
    }
    let Ok(meta) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_same_fs(Path::new("/"), meta.dev());
}

fn remove_same_fs(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_same_fs(&path, dev);
            // Fails for directories that hold mount points; that is fine.
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}
