//! erofs file systems made with erofs-utils' `mkfs.erofs`.
//!
//! erofs is a read-only file system built for images: no free space to
//! reserve, no journal, no inode tables sized in advance (so no size
//! estimate and no retry as with ext4), compact inodes. The image is
//! written uncompressed: the guest reads it without decompressing (which
//! under TCG emulation would cost guest CPU), and the host page cache
//! shares it between sandboxes as is.
//!
//! With erofs-utils 1.5 (Debian 12) `mkfs.erofs` keeps numeric ownership,
//! the full mode, xattrs (`security.capability` included), hard links,
//! symlinks, device nodes and fifos; `--preserve-mtime` keeps per-file
//! mtimes (the default would give most files the build time).

use std::path::Path;
use std::process::Command;

use crate::error::{ImageError, IoContext};
use crate::ext4::check_output;

/// Makes a read-only erofs image at `out` (which must not exist) from the
/// directory `src`.
pub(crate) fn mkfs_root(src: &Path, out: &Path, uuid: &str) -> Result<(), ImageError> {
    let mkfs = crate::ext4::find_tool("mkfs.erofs").map_err(|_| ImageError::ToolMissing {
        tool: "mkfs.erofs".into(),
        package: "erofs-utils".into(),
    })?;
    // mkfs.erofs truncates an existing file; create it first so a stray one
    // in the way is an error, as with ext4.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .ctx("cannot create", out)?;
    let mut cmd = Command::new(&mkfs);
    cmd.arg("--quiet")
        .arg("--preserve-mtime")
        .arg(format!("-U{uuid}"))
        .arg(out)
        .arg(src);
    let output = cmd
        .output()
        .map_err(|e| ImageError::io("cannot run mkfs.erofs", &mkfs, e))?;
    check_output(
        &output,
        "mkfs.erofs",
        &format!("making the root disk {}", out.display()),
    )
}
