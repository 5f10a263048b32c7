//! The image store: resolves references to images (local layouts,
//! registries, `oci:` layouts, `docker-archive:` tarballs), keeps pulled
//! content in a content-addressed blob store, builds (once) the cached
//! read-only root disk of each image, tracks which images sandboxes use,
//! and collects garbage under a size budget.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::blobs::BlobStore;
use crate::config::ImageConfig;
use crate::convert;
use crate::digest::Digest;
use crate::error::{ImageError, IoContext};
use crate::gc;
use crate::layout::{LayerDescriptor, Layout, Resolved, blob_path, load_manifest};
use crate::options::{ImageStoreOptions, RootFsFormat};
use crate::records::{Record, RecordSource, Records, now_ns, to_system_time};
use crate::reference::{ImageReference, Transport};
use crate::registry::Registry;
use crate::singleflight::KeyedLocks;

/// Where the store looks for images and keeps what it builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStoreConfig {
    /// Directories holding OCI image layouts, one per image name:
    /// `<dir>/<name>/{oci-layout,index.json,blobs/}`. Searched in order,
    /// before any registry.
    pub local_dirs: Vec<PathBuf>,
    /// The cache: pulled blobs (`blobs/sha256/`), image records
    /// (`images/`), root disks (`disks/`) and work in progress (`tmp/`).
    /// One store per cache directory at a time (enforced with a lock file).
    pub cache_dir: PathBuf,
}

/// Where an image came from. Match with a wildcard arm: more may come.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageSource {
    /// A local OCI image layout directory; its blobs are read in place.
    Layout { dir: PathBuf },
    /// A registry; blobs are in the store's blob store.
    Registry {
        registry: String,
        repository: String,
    },
    /// An `oci:` layout, imported into the blob store.
    OciLayout { path: PathBuf },
    /// A `docker save` tarball, imported into the blob store.
    DockerArchive { path: PathBuf },
}

/// A resolved image: what a reference pointed to when it was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The reference as resolved: `busybox:latest` for a local layout,
    /// `docker.io/library/busybox:latest` for a registry image (the
    /// canonical form, which is also its name in [`ImageStore::list_images`]),
    /// `oci:/path:tag` or `docker-archive:/path` for the other transports.
    pub reference: ImageReference,
    /// Digest of the image manifest; identifies the image content.
    pub manifest_digest: Digest,
    /// Digest of the image config blob.
    pub config_digest: Digest,
    /// Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts.
    pub config: ImageConfig,
    /// Layers, lowest first.
    pub layers: Vec<LayerDescriptor>,
    pub source: ImageSource,
}

/// A built root disk: a file system image, never modified once built.
/// Attach it read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDisk {
    pub path: PathBuf,
    /// Size of the disk image in bytes (an ext4 file is sparse: it uses
    /// less).
    pub size_bytes: u64,
    /// The manifest digest of the image the disk was built from; the disk's
    /// content is a function of it.
    pub digest: Digest,
    /// The file system on it (the guest mounts it with this type).
    pub format: RootFsFormat,
}

/// Progress of a pull, for one progress bar per layer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullEvent {
    /// The image manifest is known: these layers (digest, compressed size),
    /// lowest first, are fetched next unless cached.
    Resolved {
        reference: String,
        manifest_digest: Digest,
        layers: Vec<(Digest, u64)>,
    },
    /// A layer's download progressed: `done` of `total` bytes. Sent at
    /// most every 100 ms per layer while downloading, and always once with
    /// `done == total` when the layer is complete; `cached` when it was
    /// already in the store (nothing downloaded).
    Layer {
        digest: Digest,
        done: u64,
        total: u64,
        cached: bool,
    },
    /// The image is complete in the cache.
    Done {
        reference: String,
        manifest_digest: Digest,
        /// Bytes downloaded (or imported) by this pull.
        downloaded_bytes: u64,
    },
}

/// One image in the cache, as [`ImageStore::list_images`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's name in the cache (see [`Image::reference`]).
    pub reference: String,
    pub manifest_digest: Digest,
    pub source: ImageSource,
    /// Compressed bytes of its blobs in the store (0 for local layouts,
    /// whose blobs stay in the layout); blobs shared with other images are
    /// counted for each.
    pub size_bytes: u64,
    /// Allocated bytes of its root disk, when built.
    pub disk_bytes: Option<u64>,
    pub created: SystemTime,
    pub last_used: SystemTime,
    /// Leases held on it (sandboxes using it).
    pub in_use: usize,
}

/// What [`ImageStore::remove_image`] removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedImage {
    pub references: Vec<String>,
    pub freed_bytes: u64,
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Images removed, least recently used first.
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    /// Cache bytes (blobs and allocated root disk bytes) afterwards.
    pub usage_bytes: u64,
    pub budget_bytes: Option<u64>,
}

/// Counters since the store was opened, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Registry pulls (a manifest fetched from a registry).
    pub pulls: u64,
    /// Imports from `oci:` layouts and `docker-archive:` tarballs.
    pub imports: u64,
    /// Blobs downloaded from registries (cache misses).
    pub blob_downloads: u64,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
    /// Root disks built (conversions).
    pub conversions: u64,
}

/// A sandbox's hold on an image: while any lease on an image exists,
/// garbage collection keeps it (its record, blobs and root disk) and
/// [`ImageStore::remove_image`] refuses it. Dropping the lease releases it
/// (and marks the image used now). Leases live in memory: a restarted
/// store starts with none (its sandboxes are gone too). A lease keeps its
/// store, and so the cache lock, alive.
#[must_use = "the image is protected only while the lease is held"]
pub struct ImageLease {
    inner: Arc<Inner>,
    digest: Digest,
}

impl std::fmt::Debug for ImageLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageLease")
            .field("digest", &self.digest)
            .finish()
    }
}

impl ImageLease {
    pub fn manifest_digest(&self) -> &Digest {
        &self.digest
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(n) = st.leases.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                st.leases.remove(&self.digest);
            }
        }
        // Used until now. Persisted best effort: a lost time only shifts
        // this image's place in the LRU order.
        let keys = st.keys_for(&self.digest);
        for k in keys {
            self.inner.touch_locked(&mut st, &k, false);
        }
    }
}

/// How long opening a store waits for a cache lock that is held. A lock
/// is an open file description: a child this process forks (mkfs, tar, a
/// VMM) shares it until its exec closes it, so a store dropped and reopened
/// in one process can find its own old lock held for that moment. Another
/// store holding it holds it far longer than this.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(1);

fn take_cache_lock(lock: &fs::File, lock_path: &Path, cache: &Path) -> Result<(), ImageError> {
    let deadline = Instant::now() + CACHE_LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ImageError::CacheBusy {
                    path: cache.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(ImageError::io("cannot lock", lock_path, e));
            }
        }
    }
}

/// Resolves image references, pulls and imports images, builds cached
/// root disks, and collects garbage. Cheap to clone (clones share the
/// cache and its single-flight state).
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ImageStoreConfig,
    pub(crate) options: ImageStoreOptions,
    disks_dir: PathBuf,
    pub(crate) tmp_dir: PathBuf,
    records: Records,
    pub(crate) blobs: BlobStore,
    pub(crate) registry: Registry,
    /// Holds the cache directory's lock for the store's lifetime.
    _lock: fs::File,
    state: Mutex<State>,
    building: KeyedLocks<Digest>,
    pub(crate) fetching: KeyedLocks<Digest>,
    pulling: KeyedLocks<String>,
    pub(crate) stats: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub pulls: AtomicU64,
    pub imports: AtomicU64,
    pub blob_downloads: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub conversions: AtomicU64,
}

#[derive(Default)]
pub(crate) struct State {
    records: HashMap<String, Record>,
    /// Leases per manifest digest.
    leases: HashMap<Digest, usize>,
    /// Blobs and manifest digests (disks) in use by pulls and builds.
    pins: HashMap<Digest, usize>,
    /// Last timestamp handed out: keeps last-used times strictly
    /// increasing, so LRU order is the order of use.
    last_stamp: u64,
}

impl State {
    fn keys_for(&self, digest: &Digest) -> Vec<String> {
        self.records
            .values()
            .filter(|r| r.digest() == *digest)
            .map(|r| r.reference.clone())
            .collect()
    }

    fn stamp(&mut self) -> u64 {
        self.last_stamp = now_ns().max(self.last_stamp + 1);
        self.last_stamp
    }
}

/// Blobs (or disks) pinned while a pull or build uses them; unpinned on
/// drop, so a cancelled pull leaves nothing pinned.
pub(crate) struct Pins<'a> {
    inner: &'a Inner,
    digests: Vec<Digest>,
}

impl Pins<'_> {
    pub(crate) fn add(&mut self, digest: &Digest) {
        *self.inner.state().pins.entry(digest.clone()).or_default() += 1;
        self.digests.push(digest.clone());
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        for d in self.digests.drain(..) {
            if let Some(n) = st.pins.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(&d);
                }
            }
        }
    }
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("config", &self.inner.config)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens a store that uses local layouts only (no registry is ever
    /// contacted): [`ImageStore::with_options`] with
    /// [`ImageStoreOptions::local_only`].
    pub fn new(config: ImageStoreConfig) -> Result<Self, ImageError> {
        Self::with_options(config, ImageStoreOptions::local_only())
    }

    /// Opens the store: creates the cache directories, takes the cache lock
    /// (failing with [`ImageError::CacheBusy`] when another store holds it),
    /// removes whatever interrupted work left in `<cache_dir>/tmp/`, loads
    /// the image records, and removes blobs and disks no record needs (left
    /// by a crash). Does blocking file system work.
    pub fn with_options(
        config: ImageStoreConfig,
        options: ImageStoreOptions,
    ) -> Result<Self, ImageError> {
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
        take_cache_lock(&lock, &lock_path, cache)?;

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

        let blobs = BlobStore::open(cache, &tmp_dir)?;
        let records = Records::open(&cache.join("images"))?;
        let loaded = records.load_all()?;
        let registry = Registry::new(&options.registry);
        let store = ImageStore {
            inner: Arc::new(Inner {
                config,
                options,
                disks_dir,
                tmp_dir,
                records,
                blobs,
                registry,
                _lock: lock,
                state: Mutex::new(State {
                    records: loaded,
                    ..State::default()
                }),
                building: KeyedLocks::new(),
                fetching: KeyedLocks::new(),
                pulling: KeyedLocks::new(),
                stats: Counters::default(),
            }),
        };
        // Only what no record references: evicting images down to the
        // budget waits for a pull, a build or gc(), so a restart alone
        // never throws images away.
        let report = store.inner.collect(None, None)?;
        if report.freed_bytes > 0 {
            info!(freed_bytes = report.freed_bytes, removed = ?report.removed, "cache cleaned at start-up");
        }
        Ok(store)
    }

    pub fn config(&self) -> &ImageStoreConfig {
        &self.inner.config
    }

    pub fn options(&self) -> &ImageStoreOptions {
        &self.inner.options
    }

    /// Resolves `reference` to an image, fetching it when it is not
    /// cached (without progress reports):
    ///
    /// - `name[:tag][@digest]`: the first local directory holding a layout
    ///   `<dir>/<name>/` with the tag wins (read in place, every blob
    ///   verified). Otherwise, when registries are enabled, the registry
    ///   image by Docker's rules, from the cache when a previous pull
    ///   recorded it (no network), else pulled.
    /// - `oci:/path[:tag]`, `docker-archive:/path.tar`: from the cache, else
    ///   imported.
    ///
    /// Concurrent calls for the same uncached image fetch it once.
    pub async fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        self.fetch(reference, &|_| {}, false).await
    }

    /// Like [`ImageStore::resolve`], but always asks the source again (a
    /// tag may have moved), reporting progress per layer; blobs already in
    /// the store are not downloaded again. A name found in a local layout
    /// is not pulled (local layouts come first).
    pub async fn pull(
        &self,
        reference: &str,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<Image, ImageError> {
        self.fetch(reference, progress, true).await
    }

    async fn fetch(
        &self,
        reference: &str,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
        force: bool,
    ) -> Result<Image, ImageError> {
        let parsed = ImageReference::parse(reference)?;
        let key_ref = match parsed.transport() {
            Transport::Named => {
                let dirs = self.inner.config.local_dirs.clone();
                let local = parsed.clone();
                let found = tokio::task::spawn_blocking(move || resolve_local(&dirs, local))
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                match found {
                    Ok(image) => {
                        self.inner.record_local(&image)?;
                        if force {
                            progress(PullEvent::Done {
                                reference: image.reference.to_string(),
                                manifest_digest: image.manifest_digest.clone(),
                                downloaded_bytes: 0,
                            });
                        }
                        return Ok(image);
                    }
                    Err(
                        e @ (ImageError::ImageNotFound { .. } | ImageError::TagNotFound { .. }),
                    ) if !self.inner.options.registry.enabled => {
                        return Err(e);
                    }
                    Err(ImageError::ImageNotFound { .. } | ImageError::TagNotFound { .. }) => {
                        parsed.canonical(&self.inner.options.registry.default_registry)
                    }
                    Err(e) => return Err(e),
                }
            }
            Transport::OciLayout(_) | Transport::DockerArchive(_) => parsed,
        };
        let key = key_ref.to_string();
        let started = now_ns();
        let _flight = self.inner.pulling.lock(key.clone()).await;
        // Cached, or fetched by a concurrent caller while this one waited.
        let cached = self.inner.state().records.get(&key).cloned();
        if let Some(record) = cached
            && (!force || record.pulled_ns >= started)
        {
            match self.inner.image_from_record(&record).await {
                Ok(image) => {
                    self.inner.touch(&key);
                    if force {
                        progress(PullEvent::Done {
                            reference: key.clone(),
                            manifest_digest: image.manifest_digest.clone(),
                            downloaded_bytes: 0,
                        });
                    }
                    return Ok(image);
                }
                Err(e) => {
                    warn!(image = %key, error = %e, "cached image is incomplete; fetching it again");
                }
            }
        }
        let image = match key_ref.transport() {
            Transport::Named => self.inner.pull_registry(&key_ref, progress).await?,
            Transport::OciLayout(path) => {
                self.inner
                    .import_oci_layout(&key_ref, path, progress)
                    .await?
            }
            Transport::DockerArchive(path) => {
                self.inner
                    .import_docker_archive(&key_ref, path, progress)
                    .await?
            }
        };
        self.inner.maybe_collect(&image.manifest_digest).await;
        Ok(image)
    }

    /// Where the root disk of an image with this manifest digest is (or
    /// will be) cached, in the store's root file system format.
    pub fn root_disk_path(&self, manifest_digest: &Digest) -> PathBuf {
        self.inner.disk_path(manifest_digest)
    }

    /// Returns the image's root disk, building it first if it is not
    /// cached. Concurrent calls for one image share one build; once built,
    /// a call only looks at the file. A build that fails leaves nothing
    /// under the final name, and the next call tries again. Blobs of a
    /// registry image that garbage collection removed are fetched again.
    ///
    /// Take the image's [`lease`](ImageStore::lease) first, so the disk
    /// cannot be collected between this call and its use.
    pub async fn root_disk(&self, image: &Image) -> Result<RootDisk, ImageError> {
        let path = self.root_disk_path(&image.manifest_digest);
        let format = self.inner.options.root_fs;
        if let Some(disk) = existing_disk(&path, &image.manifest_digest, format).await? {
            return Ok(disk);
        }
        let guard = self
            .inner
            .building
            .lock(image.manifest_digest.clone())
            .await;
        if let Some(disk) = existing_disk(&path, &image.manifest_digest, format).await? {
            return Ok(disk);
        }
        let reference = image.reference.to_string();
        let wrap = |e: ImageError| ImageError::Conversion {
            reference: reference.clone(),
            source: Box::new(e),
        };
        let mut pins = self.inner.pins();
        pins.add(&image.manifest_digest);
        let layer_paths = self
            .inner
            .layer_blobs(image, &mut pins)
            .await
            .map_err(|e| match e {
                // Already names the image.
                e @ (ImageError::RegistryUnreachable { .. }
                | ImageError::AuthFailed { .. }
                | ImageError::ManifestUnknown { .. }
                | ImageError::RegistryFailed { .. }
                | ImageError::BlobVerification { .. }) => e,
                e => wrap(e),
            })?;
        let inner = self.inner.clone();
        let image_c = image.clone();
        let max_bytes = self.inner.options.limits.max_image_bytes;
        // The guards move into the build, so a caller that gives up (drops
        // this future) does not let a second build start beside this one,
        // nor GC take the blobs from under it.
        let size_bytes = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let job = convert::Job {
                reference: &image_c.reference.to_string(),
                manifest_digest: &image_c.manifest_digest,
                layers: image_c.layers.iter().zip(layer_paths).collect(),
                format,
                max_bytes,
                tmp_dir: &inner.tmp_dir,
                final_path: &inner.disk_path(&image_c.manifest_digest),
            };
            convert::build(&job)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(wrap)?;
        drop(pins);
        self.inner.stats.conversions.fetch_add(1, Ordering::SeqCst);
        self.inner.maybe_collect(&image.manifest_digest).await;
        Ok(RootDisk {
            path,
            size_bytes,
            digest: image.manifest_digest.clone(),
            format,
        })
    }

    /// How many root disks this store has built (cache misses that
    /// completed).
    pub fn disk_builds(&self) -> u64 {
        self.inner.stats.conversions.load(Ordering::SeqCst)
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.stats;
        StoreStats {
            pulls: s.pulls.load(Ordering::SeqCst),
            imports: s.imports.load(Ordering::SeqCst),
            blob_downloads: s.blob_downloads.load(Ordering::SeqCst),
            bytes_downloaded: s.bytes_downloaded.load(Ordering::SeqCst),
            conversions: s.conversions.load(Ordering::SeqCst),
        }
    }

    /// Protects `image` from garbage collection and removal until the
    /// lease is dropped, and marks it used now.
    pub fn lease(&self, image: &Image) -> ImageLease {
        let mut st = self.inner.state();
        *st.leases.entry(image.manifest_digest.clone()).or_default() += 1;
        for k in st.keys_for(&image.manifest_digest) {
            self.inner.touch_locked(&mut st, &k, false);
        }
        ImageLease {
            inner: self.inner.clone(),
            digest: image.manifest_digest.clone(),
        }
    }

    /// The images in the cache, most recently used first.
    pub fn list_images(&self) -> Vec<ImageInfo> {
        let st = self.inner.state();
        let mut out: Vec<ImageInfo> = st
            .records
            .values()
            .map(|r| {
                let digest = r.digest();
                ImageInfo {
                    reference: r.reference.clone(),
                    manifest_digest: digest.clone(),
                    source: source_of(&r.source),
                    size_bytes: r.blob_bytes(),
                    disk_bytes: allocated(&self.inner.disk_path(&digest)),
                    created: to_system_time(r.created_ns),
                    last_used: to_system_time(r.last_used_ns),
                    in_use: st.leases.get(&digest).copied().unwrap_or(0),
                }
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        out
    }

    /// Removes an image from the cache: its record, and its blobs and root
    /// disk unless another image needs them. `reference` is a name as
    /// [`ImageStore::list_images`] shows it or as given to `resolve`
    /// (`busybox` finds `docker.io/library/busybox:latest`), or a manifest
    /// digest (`sha256:…`, every name for it). Fails with
    /// [`ImageError::ImageInUse`] while a sandbox holds a lease on it.
    /// Local layouts themselves are never touched.
    pub async fn remove_image(&self, reference: &str) -> Result<RemovedImage, ImageError> {
        let inner = self.inner.clone();
        let reference = reference.to_string();
        tokio::task::spawn_blocking(move || inner.remove(&reference))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Collects garbage now: removes what no image needs and, when a
    /// budget is configured, least recently used images (never leased
    /// ones) until the cache fits it. Also runs by itself after each pull
    /// and build while the cache is over budget.
    pub async fn gc(&self) -> Result<GcReport, ImageError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.collect(None, inner.options.cache_budget_bytes))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Bytes the cache uses: blobs plus allocated root disk bytes.
    pub fn cache_usage_bytes(&self) -> Result<u64, ImageError> {
        Ok(self.inner.files()?.usage())
    }
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn pins(&self) -> Pins<'_> {
        Pins {
            inner: self,
            digests: Vec::new(),
        }
    }

    fn disk_path(&self, digest: &Digest) -> PathBuf {
        self.disks_dir
            .join(format!("{}.{}", digest.hex(), self.options.root_fs))
    }

    /// Marks `key` used now and saves its record.
    fn touch(&self, key: &str) {
        let mut st = self.state();
        self.touch_locked(&mut st, key, true);
    }

    fn touch_locked(&self, st: &mut State, key: &str, log: bool) {
        let stamp = st.stamp();
        if let Some(r) = st.records.get_mut(key) {
            r.last_used_ns = stamp;
            if let Err(e) = self.records.save(r, false)
                && log
            {
                warn!(image = key, error = %e, "cannot save the image's last-used time");
            }
        }
    }

    /// Records a newly fetched image (durably) and forgets anything it
    /// replaces under the same name.
    pub(crate) fn save_record(
        &self,
        reference: String,
        source: RecordSource,
        resolved_digest: &Digest,
        manifest_size: u64,
        blobs: Vec<(Digest, u64)>,
    ) -> Result<(), ImageError> {
        let mut st = self.state();
        let now = st.stamp();
        let mut record = Record::new(
            reference.clone(),
            source,
            resolved_digest,
            manifest_size,
            blobs,
            now,
        );
        if let Some(old) = st.records.get(&reference) {
            record.created_ns = old.created_ns;
        }
        self.records.save(&record, true)?;
        st.records.insert(reference, record);
        Ok(())
    }

    /// Records (or refreshes) a local layout image, so it is listed,
    /// counted and collected like any other.
    fn record_local(&self, image: &Image) -> Result<(), ImageError> {
        let ImageSource::Layout { dir } = &image.source else {
            return Ok(());
        };
        let key = image.reference.to_string();
        let mut st = self.state();
        let stamp = st.stamp();
        let record = match st.records.get(&key) {
            Some(r) if r.digest() == image.manifest_digest => {
                let mut r = r.clone();
                r.last_used_ns = stamp;
                r
            }
            Some(_) | None => Record::new(
                key.clone(),
                RecordSource::Layout { dir: dir.clone() },
                &image.manifest_digest,
                0,
                Vec::new(),
                stamp,
            ),
        };
        self.records.save(&record, false)?;
        st.records.insert(key, record);
        Ok(())
    }

    /// The image a record describes, read (and verified) from the blob
    /// store.
    async fn image_from_record(&self, record: &Record) -> Result<Image, ImageError> {
        let reference = ImageReference::parse(&record.reference)?;
        let source = source_of(&record.source);
        let root = match &record.source {
            RecordSource::Layout { dir } => dir.clone(),
            _ => self.blobs.root().to_path_buf(),
        };
        let digest = record.digest();
        let size = record.manifest_size;
        let r = reference.clone();
        let resolved = tokio::task::spawn_blocking(move || load_manifest(&root, &r, &digest, size))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        Ok(image_of(reference, resolved, source))
    }

    /// The files holding the image's layer blobs, pinned; registry blobs
    /// missing from the store (collected, or removed by hand) are fetched
    /// again.
    async fn layer_blobs(
        &self,
        image: &Image,
        pins: &mut Pins<'_>,
    ) -> Result<Vec<PathBuf>, ImageError> {
        if let ImageSource::Layout { dir } = &image.source {
            return Ok(image
                .layers
                .iter()
                .map(|l| blob_path(dir, &l.digest))
                .collect());
        }
        for l in &image.layers {
            pins.add(&l.digest);
        }
        let missing: Vec<&LayerDescriptor> = image
            .layers
            .iter()
            .filter(|l| !self.blobs.has(&l.digest, l.size))
            .collect();
        if !missing.is_empty()
            && let ImageSource::Registry { .. } = image.source
        {
            info!(image = %image.reference, missing = missing.len(), "fetching layers missing from the store");
            self.refetch_layers(&image.reference, &missing).await?;
        }
        Ok(image
            .layers
            .iter()
            .map(|l| self.blobs.path(&l.digest))
            .collect())
    }

    /// Deletes blobs a failed fetch wrote, unless something else needs
    /// them, so a failure leaves no partial image in the cache.
    pub(crate) fn discard_blobs(&self, new_blobs: &[Digest]) {
        let st = self.state();
        let referenced: HashSet<Digest> = st
            .records
            .values()
            .flat_map(|r| r.blob_digests().collect::<Vec<_>>())
            .collect();
        for d in new_blobs {
            if referenced.contains(d) || st.pins.contains_key(d) {
                continue;
            }
            if let Err(e) = self.blobs.remove(d) {
                warn!(blob = %d, error = %e, "cannot remove the blob of a failed pull");
            }
        }
    }

    /// Blobs and root disks (of the current format) present, with sizes;
    /// and disks of the other format (no record of this store can use
    /// them: the format is fixed per store).
    fn files(&self) -> Result<CacheFiles, ImageError> {
        let blobs: HashMap<Digest, u64> = self.blobs.list()?.into_iter().collect();
        let mut disks = HashMap::new();
        let mut stale = Vec::new();
        let ext = self.options.root_fs.as_str();
        for entry in fs::read_dir(&self.disks_dir).ctx("cannot list", &self.disks_dir)? {
            let entry = entry.ctx("cannot list", &self.disks_dir)?;
            let name = entry.file_name();
            let Some((hex, e)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            let Ok(digest) = Digest::from_hex(hex) else {
                continue;
            };
            let size = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            if e == ext {
                disks.insert(digest, size);
            } else if e.parse::<RootFsFormat>().is_ok() {
                stale.push((entry.path(), size));
            }
        }
        Ok(CacheFiles {
            blobs,
            disks,
            stale,
        })
    }

    /// Runs garbage collection; `keep` is protected besides leases and
    /// pins (the image a pull or build just made).
    fn collect(&self, keep: Option<&Digest>, budget: Option<u64>) -> Result<GcReport, ImageError> {
        let files = self.files()?;
        let mut st = self.state();
        let mut protected: HashSet<Digest> = st.leases.keys().cloned().collect();
        protected.extend(st.pins.keys().cloned());
        protected.extend(keep.cloned());
        let pinned: HashSet<Digest> = st.pins.keys().cloned().collect();
        let plan = gc::plan(&gc::Snapshot {
            records: &st.records,
            protected_manifests: &protected,
            pinned_blobs: &pinned,
            blob_files: &files.blobs,
            disk_files: &files.disks,
            budget,
        });
        // Carried out under the state lock: a pull pins a blob before it
        // looks for it, so nothing planned here can be picked up meanwhile.
        for key in &plan.records {
            self.records.delete(key)?;
            st.records.remove(key);
            info!(image = %key, "image collected (least recently used)");
        }
        for d in &plan.blobs {
            self.blobs.remove(d)?;
        }
        let mut freed = plan.freed_bytes;
        let disk_paths = plan.disks.iter().map(|d| self.disk_path(d));
        for (path, size) in disk_paths
            .map(|p| (p, 0))
            .chain(files.stale.iter().cloned())
        {
            match fs::remove_file(&path) {
                Ok(()) => freed += size,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("cannot remove root disk", &path, e)),
            }
        }
        if plan.usage_after > budget.unwrap_or(u64::MAX) {
            warn!(
                usage_bytes = plan.usage_after,
                budget_bytes = budget,
                "image cache is over its budget, but everything left is in use"
            );
        }
        Ok(GcReport {
            removed: plan.records,
            freed_bytes: freed,
            usage_bytes: plan.usage_after,
            budget_bytes: budget,
        })
    }

    /// Collects when a budget is set and the cache is over it.
    pub(crate) async fn maybe_collect(self: &Arc<Self>, keep: &Digest) {
        let Some(budget) = self.options.cache_budget_bytes else {
            return;
        };
        let inner = self.clone();
        let keep = keep.clone();
        let result = tokio::task::spawn_blocking(move || {
            if inner.files()?.usage() <= budget {
                return Ok(None);
            }
            inner.collect(Some(&keep), Some(budget)).map(Some)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match result {
            Ok(Some(r)) => {
                info!(removed = ?r.removed, freed_bytes = r.freed_bytes, usage_bytes = r.usage_bytes, "image cache collected")
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "image cache collection failed"),
        }
    }

    fn remove(&self, reference: &str) -> Result<RemovedImage, ImageError> {
        let keys: Vec<String> = {
            let st = self.state();
            if let Ok(digest) = Digest::parse(reference) {
                st.keys_for(&digest)
            } else {
                let parsed = ImageReference::parse(reference)?;
                let mut candidates = vec![parsed.to_string()];
                candidates.push(
                    parsed
                        .canonical(&self.options.registry.default_registry)
                        .to_string(),
                );
                candidates
                    .into_iter()
                    .find(|k| st.records.contains_key(k))
                    .into_iter()
                    .collect()
            }
        };
        if keys.is_empty() {
            return Err(ImageError::NotCached {
                reference: reference.to_string(),
            });
        }
        {
            let mut st = self.state();
            for k in &keys {
                let Some(r) = st.records.get(k) else { continue };
                let digest = r.digest();
                let leases = st.leases.get(&digest).copied().unwrap_or(0);
                if leases > 0 {
                    return Err(ImageError::ImageInUse {
                        reference: k.clone(),
                        leases,
                    });
                }
            }
            for k in &keys {
                self.records.delete(k)?;
                st.records.remove(k);
            }
        }
        let report = self.collect(None, None)?;
        Ok(RemovedImage {
            references: keys,
            freed_bytes: report.freed_bytes,
        })
    }
}

struct CacheFiles {
    blobs: HashMap<Digest, u64>,
    disks: HashMap<Digest, u64>,
    /// Disks of the other root file system format, and their sizes.
    stale: Vec<(PathBuf, u64)>,
}

impl CacheFiles {
    fn usage(&self) -> u64 {
        self.blobs.values().sum::<u64>()
            + self.disks.values().sum::<u64>()
            + self.stale.iter().map(|s| s.1).sum::<u64>()
    }
}

pub(crate) fn image_of(reference: ImageReference, r: Resolved, source: ImageSource) -> Image {
    Image {
        reference,
        manifest_digest: r.manifest_digest,
        config_digest: r.config_digest,
        config: r.config,
        layers: r.layers,
        source,
    }
}

fn source_of(s: &RecordSource) -> ImageSource {
    match s {
        RecordSource::Layout { dir } => ImageSource::Layout { dir: dir.clone() },
        RecordSource::Registry {
            registry,
            repository,
        } => ImageSource::Registry {
            registry: registry.clone(),
            repository: repository.clone(),
        },
        RecordSource::OciLayout { path } => ImageSource::OciLayout { path: path.clone() },
        RecordSource::DockerArchive { path } => ImageSource::DockerArchive { path: path.clone() },
    }
}

fn allocated(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

async fn existing_disk(
    path: &Path,
    digest: &Digest,
    format: RootFsFormat,
) -> Result<Option<RootDisk>, ImageError> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.is_file() => Ok(Some(RootDisk {
            path: path.to_path_buf(),
            size_bytes: m.len(),
            digest: digest.clone(),
            format,
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
                let source = ImageSource::Layout {
                    dir: layout.dir().to_path_buf(),
                };
                return Ok(image_of(reference, r, source));
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
