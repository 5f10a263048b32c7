//! `somna-images`: from OCI images to the disks a Somna sandbox boots with.
//!
//! This crate owns:
//!
//! - **Image references** ([`ImageReference`]): `name`, `name:tag`,
//!   `name@sha256:…`, validated so a name is always a safe relative path.
//! - **Image resolution** ([`ImageStore::resolve`]): a reference is looked up
//!   as an OCI image layout `<local_dir>/<name>/` in each configured local
//!   directory; the tag is the `org.opencontainers.image.ref.name`
//!   annotation in `index.json`, and image indexes are followed to their
//!   linux/amd64 manifest. Every blob read is verified against its digest
//!   and size. Registry pulls are not supported yet; they will be another
//!   [`ImageSource`].
//! - **Root disks** ([`ImageStore::root_disk`]): the image's layers applied
//!   in order (whiteouts, opaque directories, ownership, modes, xattrs,
//!   links, device nodes; see [`layers`]) and turned into a read-only ext4
//!   image with `mkfs.ext4 -d`, cached per manifest digest under
//!   `<cache_dir>/disks/`, built at most once at a time per image and
//!   moved into place atomically. The host attaches it read-only with
//!   virtio serial `somna-root` (see ARCHITECTURE.md, "The guest contract").
//! - **Writable disks** ([`create_writable_disk`]): the per-sandbox sparse
//!   ext4 disk (`somna-rw`) the guest puts the overlay's upper layer on.
//! - **Image building** ([`mkimage`], binary `somna-mkimage`): writing OCI
//!   layouts from directory trees, used by the recipes in
//!   `images/recipes/` and by tests.
//!
//! Needs e2fsprogs (`mkfs.ext4`) on the host, and root to build root disks
//! (layer ownership and device nodes).

mod config;
mod digest;
mod error;
mod ext4;
pub mod layers;
mod layout;
pub mod mkimage;
mod reference;
mod store;
mod writable;

pub use config::ImageConfig;
pub use digest::Digest;
pub use error::{ErrorKind, ImageError};
pub use ext4::MIN_ROOT_DISK_BYTES;
pub use layers::{LayerStats, Unpacker};
pub use layout::{
    ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, LayerCompression, LayerDescriptor,
    MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
pub use reference::{DEFAULT_TAG, ImageReference};
pub use store::{Image, ImageSource, ImageStore, ImageStoreConfig, RootDisk};
pub use writable::{MAX_WRITABLE_DISK_MIB, MIN_WRITABLE_DISK_MIB, create_writable_disk};
