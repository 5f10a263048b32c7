//! Turning an image into its read-only root disk: unpack the layers in
//! order into a private temporary tree (see [`crate::layers`] for whiteouts,
//! confinement and metadata), then make an ext4 or erofs image of the tree,
//! and move it into the cache under its final name only once complete.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, info_span};

use crate::digest::Digest;
use crate::error::{ImageError, IoContext};
use crate::layers::{Unpacker, apply_layer_blob};
use crate::layout::LayerDescriptor;
use crate::options::RootFsFormat;
use crate::{erofs, ext4};

/// What to build.
pub(crate) struct Job<'a> {
    /// For messages and spans.
    pub reference: &'a str,
    pub manifest_digest: &'a Digest,
    /// Layers, lowest first, each with the file holding its blob.
    pub layers: Vec<(&'a LayerDescriptor, PathBuf)>,
    pub format: RootFsFormat,
    /// Unpack limit: see [`Unpacker::with_limit`].
    pub max_bytes: u64,
    /// A private directory for the unpacked tree (0700).
    pub tmp_dir: &'a Path,
    pub final_path: &'a Path,
}

/// Builds the disk; returns its size in bytes. On failure nothing is left
/// under `final_path` and the temporary tree is removed.
pub(crate) fn build(job: &Job<'_>) -> Result<u64, ImageError> {
    let digest = job.manifest_digest;
    let span = info_span!("root_disk_build", image = %job.reference, digest = %digest, format = %job.format);
    let _span = span.enter();
    let total = Instant::now();

    let work = tempfile::Builder::new()
        .prefix(&format!("{}-", &digest.hex()[..16]))
        .tempdir_in(job.tmp_dir)
        .ctx("cannot create build directory in", job.tmp_dir)?;
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).ctx("cannot create", &rootfs)?;
    fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
        .ctx("cannot set mode of", &rootfs)?;

    {
        let _s = info_span!("unpack", layers = job.layers.len()).entered();
        let start = Instant::now();
        let mut unpacker = Unpacker::new(&rootfs)?.with_limit(job.max_bytes);
        let (mut entries, mut bytes) = (0, 0);
        for (layer, path) in &job.layers {
            let stats = apply_layer_blob(&mut unpacker, path, layer)?;
            entries += stats.entries;
            bytes += stats.bytes;
        }
        unpacker.finish()?;
        info!(
            elapsed_ms = ms(start),
            layers = job.layers.len(),
            entries,
            bytes,
            "unpacked image layers"
        );
    }

    let disk_tmp = work.path().join(format!("disk.{}", job.format));
    let uuid = ext4::uuid_from_hex(digest.hex());
    {
        let _s = info_span!("mkfs", format = %job.format).entered();
        let start = Instant::now();
        match job.format {
            RootFsFormat::Ext4 => mkfs_ext4(&rootfs, &disk_tmp, &uuid)?,
            RootFsFormat::Erofs => erofs::mkfs_root(&rootfs, &disk_tmp, &uuid)?,
        }
        info!(elapsed_ms = ms(start), "made root disk");
    }

    let sync_start = Instant::now();
    let file = fs::File::open(&disk_tmp).ctx("cannot open", &disk_tmp)?;
    // Durable before it gets its final name: a crash must not leave a
    // complete-looking name on an incomplete disk.
    file.sync_all().ctx("cannot sync", &disk_tmp)?;
    file.set_permissions(fs::Permissions::from_mode(0o444))
        .ctx("cannot set mode of", &disk_tmp)?;
    let size_bytes = file.metadata().ctx("cannot inspect", &disk_tmp)?.len();
    drop(file);
    fs::rename(&disk_tmp, job.final_path)
        .ctx("cannot move root disk into place at", job.final_path)?;
    if let Some(dir) = job.final_path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx("cannot sync", dir)?;
    }
    let sync_ms = ms(sync_start);
    let cleanup = Instant::now();
    drop(work); // the unpacked tree
    info!(
        elapsed_ms = ms(total),
        sync_ms,
        cleanup_ms = ms(cleanup),
        path = %job.final_path.display(),
        size_bytes,
        "root disk ready"
    );
    Ok(size_bytes)
}

fn mkfs_ext4(rootfs: &Path, out: &Path, uuid: &str) -> Result<(), ImageError> {
    let usage = ext4::measure_tree(rootfs)?;
    let (mut size, mut inodes) = ext4::root_disk_geometry(usage);
    if let Err(e) = ext4::mkfs_root(rootfs, out, size, inodes, uuid) {
        let ImageError::ToolFailed { .. } = e else {
            return Err(e);
        };
        // The size estimate is generous, but a tree it misjudges (many
        // large xattrs, say) gets one more try at twice it.
        tracing::warn!(error = %e, size, inodes, "mkfs.ext4 failed; retrying with twice the size and inodes");
        fs::remove_file(out).ctx("cannot remove", out)?;
        size *= 2;
        inodes *= 2;
        ext4::mkfs_root(rootfs, out, size, inodes, uuid)?;
    }
    info!(size_bytes = size, inodes, "ext4 geometry");
    Ok(())
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
