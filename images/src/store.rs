//! The image store: resolves references to images and builds (once) the
//! cached read-only root disk of each.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, info_span};

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::error::{ImageError, IoContext};
use crate::ext4;
use crate::layers::{Unpacker, apply_layer_blob};
use crate::layout::{LayerDescriptor, Layout, blob_path};
use crate::reference::ImageReference;

/// Where the store looks for images and keeps what it builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStoreConfig {
    /// Directories holding OCI image layouts, one per image name:
    /// `<dir>/<name>/{oci-layout,index.json,blobs/}`. Searched in order.
    pub local_dirs: Vec<PathBuf>,
    /// Where root disks are cached (`disks/`) and built (`tmp/`). One
    /// store per cache directory at a time (enforced with a lock file).
    pub cache_dir: PathBuf,
}

/// Where an image was found. More sources (registries) will be added:
/// match with a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageSource {
    /// A local OCI image layout directory.
    Layout { dir: PathBuf },
}

/// A resolved image: what a reference pointed to when it was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The reference as resolved (normalized: `busybox` → `busybox:latest`).
    pub reference: ImageReference,
    /// Digest of the image manifest; identifies the image content.
    pub manifest_digest: Digest,
    /// Digest of the image config blob.
    pub config_digest: Digest,
    pub config: ImageConfig,
    /// Layers, lowest first.
    pub layers: Vec<LayerDescriptor>,
    pub source: ImageSource,
}

/// A built root disk: an ext4 image file, never modified once built. Attach
/// it read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDisk {
    pub path: PathBuf,
    /// Size of the disk image in bytes (the file is sparse: it uses less).
    pub size_bytes: u64,
    /// The manifest digest of the image the disk was built from; the disk's
    /// content is a function of it.
    pub digest: Digest,
}

/// Resolves image references and builds cached root disks. Cheap to clone
/// (clones share the cache and its single-flight state).
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: ImageStoreConfig,
    disks_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Holds the cache directory's lock for the store's lifetime.
    _lock: fs::File,
    /// One async mutex per manifest digest being (or once) built.
    building: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    builds: AtomicU64,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens the store: creates the cache directories, takes the cache lock
    /// (failing with [`ImageError::CacheBusy`] when another store holds it),
    /// and removes whatever interrupted builds left in `<cache_dir>/tmp/`.
    /// Does blocking file system work.
    pub fn new(config: ImageStoreConfig) -> Result<Self, ImageError> {
        let cache = &config.cache_dir;
        let disks_dir = cache.join("disks");
        let tmp_dir = cache.join("tmp");
        fs::create_dir_all(&disks_dir).ctx("cannot create cache directory", &disks_dir)?;
        fs::create_dir_all(&tmp_dir).ctx("cannot create cache directory", &tmp_dir)?;
        // Builds unpack setuid binaries and device nodes here: keep others out.
        fs::set_permissions(&tmp_dir, fs::Permissions::from_mode(0o700))
            .ctx("cannot set mode of", &tmp_dir)?;

        let lock_path = cache.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("cannot open cache lock", &lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ImageError::CacheBusy {
                    path: cache.clone(),
                });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(ImageError::io("cannot lock", &lock_path, e));
            }
        }

        for entry in fs::read_dir(&tmp_dir).ctx("cannot list", &tmp_dir)? {
            let entry = entry.ctx("cannot list", &tmp_dir)?;
            let path = entry.path();
            let res = if entry.file_type().ctx("cannot inspect", &path)?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.ctx("cannot remove leftover of an interrupted build", &path)?;
            info!(path = %path.display(), "removed leftover of an interrupted build");
        }

        Ok(ImageStore {
            inner: Arc::new(Inner {
                config,
                disks_dir,
                tmp_dir,
                _lock: lock,
                building: Mutex::new(HashMap::new()),
                builds: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &ImageStoreConfig {
        &self.inner.config
    }

    /// Resolves `reference` (`name`, `name:tag`, `name@sha256:…`) to an
    /// image: the first local directory holding a layout `<dir>/<name>/`
    /// with the tag wins. Blobs read on the way (index, manifest, config)
    /// are verified.
    pub async fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        let reference = ImageReference::parse(reference)?;
        let dirs = self.inner.config.local_dirs.clone();
        tokio::task::spawn_blocking(move || resolve_local(&dirs, reference))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Where the root disk of an image with this manifest digest is (or
    /// will be) cached.
    pub fn root_disk_path(&self, manifest_digest: &Digest) -> PathBuf {
        self.inner
            .disks_dir
            .join(format!("{}.ext4", manifest_digest.hex()))
    }

    /// Returns the image's root disk, building it first if it is not
    /// cached. Concurrent calls for one image share one build; once built,
    /// a call only looks at the file. A build that fails leaves nothing
    /// under the final name, and the next call tries again.
    pub async fn root_disk(&self, image: &Image) -> Result<RootDisk, ImageError> {
        let path = self.root_disk_path(&image.manifest_digest);
        if let Some(disk) = existing_disk(&path, &image.manifest_digest).await? {
            return Ok(disk);
        }
        let lock = {
            let mut building = self
                .inner
                .building
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            building
                .entry(image.manifest_digest.clone())
                .or_default()
                .clone()
        };
        let guard = lock.lock_owned().await;
        if let Some(disk) = existing_disk(&path, &image.manifest_digest).await? {
            return Ok(disk);
        }
        let inner = self.inner.clone();
        let image = image.clone();
        // The guard moves into the build, so a caller that gives up (drops
        // this future) does not let a second build start beside this one.
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            inner.build(&image, &path)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// How many root disks this store has built (cache misses that
    /// completed).
    pub fn disk_builds(&self) -> u64 {
        self.inner.builds.load(Ordering::SeqCst)
    }
}

async fn existing_disk(path: &Path, digest: &Digest) -> Result<Option<RootDisk>, ImageError> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.is_file() => Ok(Some(RootDisk {
            path: path.to_path_buf(),
            size_bytes: m.len(),
            digest: digest.clone(),
        })),
        Ok(_) => Err(ImageError::InvalidArgument(format!(
            "{} is in the way of a root disk (not a regular file); remove it",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImageError::io("cannot inspect", path, e)),
    }
}

fn resolve_local(dirs: &[PathBuf], reference: ImageReference) -> Result<Image, ImageError> {
    let mut first_miss = None;
    for dir in dirs {
        let candidate = dir.join(reference.name());
        let Some(layout) = Layout::open(&candidate)? else {
            continue;
        };
        match layout.resolve(&reference) {
            Ok(r) => {
                return Ok(Image {
                    reference,
                    manifest_digest: r.manifest_digest,
                    config_digest: r.config_digest,
                    config: r.config,
                    layers: r.layers,
                    source: ImageSource::Layout {
                        dir: layout.dir().to_path_buf(),
                    },
                });
            }
            // A later directory may have the tag.
            Err(e @ ImageError::TagNotFound { .. }) => {
                first_miss.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(first_miss.unwrap_or_else(|| ImageError::ImageNotFound {
        reference: reference.to_string(),
        name: reference.name().to_string(),
        searched: dirs.to_vec(),
    }))
}

impl Inner {
    fn build(&self, image: &Image, final_path: &Path) -> Result<RootDisk, ImageError> {
        let digest = &image.manifest_digest;
        let span = info_span!("root_disk_build", image = %image.reference, digest = %digest);
        let _span = span.enter();
        let total = Instant::now();

        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", &digest.hex()[..16]))
            .tempdir_in(&self.tmp_dir)
            .ctx("cannot create build directory in", &self.tmp_dir)?;
        let rootfs = work.path().join("rootfs");
        fs::create_dir(&rootfs).ctx("cannot create", &rootfs)?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
            .ctx("cannot set mode of", &rootfs)?;

        {
            let _s = info_span!("unpack", layers = image.layers.len()).entered();
            let start = Instant::now();
            let mut unpacker = Unpacker::new(&rootfs)?;
            let (mut entries, mut bytes) = (0, 0);
            for layer in &image.layers {
                let path = match &image.source {
                    ImageSource::Layout { dir } => blob_path(dir, &layer.digest),
                };
                let stats = apply_layer_blob(&mut unpacker, &path, layer)?;
                entries += stats.entries;
                bytes += stats.bytes;
            }
            unpacker.finish()?;
            info!(
                elapsed_ms = ms(start),
                layers = image.layers.len(),
                entries,
                bytes,
                "unpacked image layers"
            );
        }

        let disk_tmp = work.path().join("disk.ext4");
        {
            let _s = info_span!("mkfs").entered();
            let start = Instant::now();
            let usage = ext4::measure_tree(&rootfs)?;
            let (mut size, mut inodes) = ext4::root_disk_geometry(usage);
            let uuid = ext4::uuid_from_hex(digest.hex());
            if let Err(e) = ext4::mkfs_root(&rootfs, &disk_tmp, size, inodes, &uuid) {
                let ImageError::ToolFailed { .. } = e else {
                    return Err(e);
                };
                // The size estimate is generous, but a tree it misjudges
                // (many large xattrs, say) gets one more try at twice it.
                tracing::warn!(error = %e, size, inodes, "mkfs.ext4 failed; retrying with twice the size and inodes");
                fs::remove_file(&disk_tmp).ctx("cannot remove", &disk_tmp)?;
                size *= 2;
                inodes *= 2;
                ext4::mkfs_root(&rootfs, &disk_tmp, size, inodes, &uuid)?;
            }
            info!(
                elapsed_ms = ms(start),
                size_bytes = size,
                inodes,
                "made root disk"
            );
        }

        let file = fs::File::open(&disk_tmp).ctx("cannot open", &disk_tmp)?;
        file.sync_all().ctx("cannot sync", &disk_tmp)?;
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .ctx("cannot set mode of", &disk_tmp)?;
        let size_bytes = file.metadata().ctx("cannot inspect", &disk_tmp)?.len();
        drop(file);
        fs::rename(&disk_tmp, final_path).ctx("cannot move root disk into place at", final_path)?;
        fs::File::open(&self.disks_dir)
            .and_then(|d| d.sync_all())
            .ctx("cannot sync", &self.disks_dir)?;
        self.builds.fetch_add(1, Ordering::SeqCst);
        info!(elapsed_ms = ms(total), path = %final_path.display(), "root disk ready");
        // `work` (the unpacked tree) is removed on drop.
        Ok(RootDisk {
            path: final_path.to_path_buf(),
            size_bytes,
            digest: digest.clone(),
        })
    }
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
