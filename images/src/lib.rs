//! `somna-images`: from OCI images to the disks a Somna sandbox boots with.
//!
//! This crate owns:
//!
//! - **Image references** ([`ImageReference`]): `name`, `name:tag`,
//!   `name@sha256:…`, validated so a name is always a safe relative path.
//! - **Image resolution and pulls** ([`ImageStore::resolve`],
//!   [`ImageStore::pull`]): a name is first looked up as an OCI image layout
//!   `<local_dir>/<name>/` in each configured local directory (read in
//!   place; the tag is the `org.opencontainers.image.ref.name` annotation
//!   in `index.json`). Otherwise, when registries are enabled
//!   ([`RegistryConfig::enabled`]), it is pulled from a registry by
//!   Docker's rules (`busybox` is `docker.io/library/busybox:latest`) with
//!   `oci-client`: anonymous, basic or bearer-token auth (credentials from
//!   [`RegistryConfig::credentials`] or a docker `config.json`), HTTPS, or
//!   plain HTTP for [`RegistryConfig::insecure_registries`]. Image indexes
//!   are followed to their linux/amd64 manifest. `oci:/path[:tag]` and
//!   `docker-archive:/file.tar` import a layout or a `docker save` tarball.
//!   Every blob is verified against its digest and size; size limits
//!   ([`ImageLimits`]) are checked before downloading and while
//!   downloading and unpacking (decompression bombs stop at the limit).
//!   A failed pull leaves nothing in the cache. See `pull`, `archive`.
//! - **The cache** (`<cache_dir>`): a content-addressed blob store
//!   (`blobs/sha256/`) shared by all images; one JSON record per image
//!   (`images/`), so a restarted store reuses everything without network;
//!   root disks per manifest digest (`disks/`). Concurrent requests for one
//!   image, blob or disk do the work once (single flight, see
//!   [`StoreStats`]). [`ImageStore::lease`] protects an image a sandbox
//!   uses; garbage collection ([`ImageStore::gc`], and automatically after
//!   pulls and builds over [`ImageStoreOptions::cache_budget_bytes`])
//!   removes least recently used images down to the budget, never leased
//!   ones. [`ImageStore::list_images`], [`ImageStore::remove_image`].
//! - **Root disks** ([`ImageStore::root_disk`]): the image's layers applied
//!   in order (whiteouts, opaque directories, ownership, modes, xattrs,
//!   links, device nodes, confinement to the root; see [`layers`]) and
//!   turned into a read-only ext4 (`mkfs.ext4 -d`, the default) or erofs
//!   (`mkfs.erofs`) image ([`RootFsFormat`], where the choice is
//!   explained), cached per manifest digest, built at most once at a time
//!   per image and moved into place atomically. The host attaches it
//!   read-only with virtio serial `somna-root` (see ARCHITECTURE.md, "The
//!   guest contract").
//! - **Writable disks** ([`create_writable_disk`]): the per-sandbox sparse
//!   ext4 disk (`somna-rw`) the guest puts the overlay's upper layer on.
//! - **Image building** ([`mkimage`], binary `somna-mkimage`): writing OCI
//!   layouts from directory trees, used by the recipes in
//!   `images/recipes/` and by tests.
//!
//! Needs e2fsprogs (`mkfs.ext4`) on the host (erofs-utils for erofs disks),
//! and root to build root disks (layer ownership and device nodes). The
//! tests also use Debian's docker-registry, apache2-utils and skopeo.

mod archive;
mod blobs;
mod config;
mod convert;
mod credentials;
mod digest;
mod erofs;
mod error;
mod ext4;
mod gc;
pub mod layers;
mod layout;
pub mod mkimage;
mod options;
mod pull;
mod records;
mod reference;
mod registry;
mod singleflight;
mod store;
mod writable;

pub use config::ImageConfig;
pub use digest::Digest;
pub use error::{ErrorKind, ImageError, is_disk_full};
pub use ext4::MIN_ROOT_DISK_BYTES;
pub use layers::{LayerStats, Unpacker};
pub use layout::{
    ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, LayerCompression, LayerDescriptor,
    MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
pub use options::{
    ImageLimits, ImageStoreOptions, RegistryConfig, RegistryCredentials, RootFsFormat,
};
pub use reference::{DEFAULT_TAG, DOCKER_HUB, ImageReference, Transport};
pub use store::{
    GcReport, Image, ImageInfo, ImageLease, ImageSource, ImageStore, ImageStoreConfig, PullEvent,
    RemovedImage, RootDisk, StoreStats,
};
pub use writable::{MAX_WRITABLE_DISK_MIB, MIN_WRITABLE_DISK_MIB, create_writable_disk};
