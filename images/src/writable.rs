//! Per-sandbox writable disks: sparse files formatted as empty ext4.

use std::path::Path;
use std::time::Instant;

use crate::error::{ImageError, IoContext};
use crate::ext4;

/// Smallest writable disk accepted, in MiB.
pub const MIN_WRITABLE_DISK_MIB: u64 = 16;
/// Largest writable disk accepted, in MiB (16 TiB, ext4 with 4 KiB blocks
/// and no 64bit-only features stays well inside it).
pub const MAX_WRITABLE_DISK_MIB: u64 = 16 << 20;

/// Creates the sandbox's writable disk at `path` (which must not exist): a
/// sparse file of `size_mib` MiB holding an empty ext4 file system labelled
/// `somna-rw`, with no reserved blocks and lazily initialised inode tables
/// and journal. It takes a few milliseconds whatever the size, and uses
/// almost no space until the guest writes. The guest makes the overlay's
/// `upper` and `work` directories itself.
pub async fn create_writable_disk(path: &Path, size_mib: u64) -> Result<(), ImageError> {
    if !(MIN_WRITABLE_DISK_MIB..=MAX_WRITABLE_DISK_MIB).contains(&size_mib) {
        return Err(ImageError::InvalidArgument(format!(
            "writable disk size {size_mib} MiB is outside {MIN_WRITABLE_DISK_MIB}..={MAX_WRITABLE_DISK_MIB} MiB"
        )));
    }
    let start = Instant::now();
    let cmd = ext4::mkfs_writable_command(path)?;
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .ctx("cannot create writable disk", path)?;
    let sized = file
        .set_len(size_mib << 20)
        .await
        .ctx("cannot size writable disk", path);
    drop(file);
    let result = match sized {
        Ok(()) => match tokio::process::Command::from(cmd).output().await {
            Ok(out) => ext4::check_output(
                &out,
                "mkfs.ext4",
                &format!("formatting the writable disk {}", path.display()),
            ),
            Err(e) => Err(ImageError::io("cannot run mkfs.ext4 for", path, e)),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(path).await;
        return Err(e);
    }
    tracing::debug!(
        path = %path.display(),
        size_mib,
        elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
        "created writable disk"
    );
    Ok(())
}
