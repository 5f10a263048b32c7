//! Loading the kernel modules shipped in the initramfs.
//!
//! The initramfs builder lists the module files in `/lib/modules/load-order`
//! in dependency order, so no modprobe logic (or depmod data) is needed here.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself
/// (Linux 6.0+); used for `.ko.xz`/`.ko.zst`/`.ko.gz` files.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// The file names listed in a load-order file (blank lines and `#` comments
/// skipped).
pub fn parse_load_order(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Loads every module listed in `dir/load-order`. Failures are logged, not
/// fatal: a missing driver shows up later as a precise error (no disk, no
/// port), and a module that is built into the kernel is not a problem.
pub fn load_all(dir: &Path) {
    let list = dir.join("load-order");
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!("no kernel modules loaded ({}: {e})", list.display());
            return;
        }
    };
    let mut loaded = 0;
    for name in parse_load_order(&text) {
        match load(&dir.join(name)) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => tracing::debug!("module {name} already loaded"),
            Err(e) => tracing::warn!("loading kernel module {name} failed: {}", e.desc()),
        }
    }
    tracing::debug!("loaded {loaded} kernel modules");
}

fn load(path: &Path) -> Result<(), Errno> {
    let file =
        File::open(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = CString::default();
    // SAFETY: finit_module reads the fd and a NUL-terminated (empty) string
    // that outlives the call. Raw syscall because nix's ModuleInitFlags lacks
    // the compressed-file flag.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order() {
        let text = "virtio_blk.ko\n\n# comment\n  overlay.ko  \nvirtio_console.ko.xz\n";
        assert_eq!(
            parse_load_order(text),
            vec!["virtio_blk.ko", "overlay.ko", "virtio_console.ko.xz"]
        );
    }
}
