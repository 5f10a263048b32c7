//! Reading OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/`)
//! and choosing the manifest a reference names.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::config::{ImageConfig, is_linux_amd64, platform_of};
use crate::digest::{Digest, Expected, read_verified};
use crate::error::{ImageError, IoContext};
use crate::reference::ImageReference;

/// Annotation holding a manifest's tag in `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's annotation holding the full `name:tag`.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const MAX_INDEX_BYTES: u64 = 4 << 20;
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;
pub(crate) const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// How deep image indexes may nest.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// The compression a layer media type implies; `None` (the Option) for
    /// media types that are not layers Somna can apply.
    pub fn from_media_type(media_type: &str) -> Option<LayerCompression> {
        match media_type {
            MEDIA_TYPE_LAYER_TAR
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerCompression::None),
            MEDIA_TYPE_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | MEDIA_TYPE_DOCKER_LAYER_GZIP
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(LayerCompression::Gzip)
            }
            MEDIA_TYPE_LAYER_ZSTD
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(LayerCompression::Zstd),
            _ => None,
        }
    }

    /// The OCI media type for a layer compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            LayerCompression::None => MEDIA_TYPE_LAYER_TAR,
            LayerCompression::Gzip => MEDIA_TYPE_LAYER_GZIP,
            LayerCompression::Zstd => MEDIA_TYPE_LAYER_ZSTD,
        }
    }
}

/// One layer of an image, as its manifest and config describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: String,
    pub compression: LayerCompression,
    /// Digest of the blob (compressed).
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
}

/// What resolving a reference in a layout yields.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfig,
    pub layers: Vec<LayerDescriptor>,
}

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Opens the layout at `dir`: `Ok(None)` when there is no layout there
    /// at all, an error when there is a broken one.
    pub(crate) fn open(dir: &Path) -> Result<Option<Layout>, ImageError> {
        let marker = dir.join("oci-layout");
        let index = dir.join("index.json");
        let has_marker = exists(&marker)?;
        let has_index = exists(&index)?;
        if !has_marker && !has_index {
            return Ok(None);
        }
        let invalid = |reason: String| ImageError::InvalidLayout {
            path: dir.to_path_buf(),
            reason,
        };
        if !has_marker {
            return Err(invalid(
                "index.json is there but oci-layout is missing".into(),
            ));
        }
        if !has_index {
            return Err(invalid(
                "oci-layout is there but index.json is missing".into(),
            ));
        }
        let text = std::fs::read(&marker).ctx("cannot read", &marker)?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("oci-layout is not JSON: {e}")))?;
        match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(ver) if ver.starts_with("1.") => {}
            Some(ver) => return Err(invalid(format!("unsupported imageLayoutVersion {ver:?}"))),
            None => return Err(invalid("oci-layout has no imageLayoutVersion".into())),
        }
        Ok(Some(Layout {
            dir: dir.to_path_buf(),
        }))
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn read_index_json(&self) -> Result<ImageIndex, ImageError> {
        read_index_json(&self.dir)
    }

    /// Finds the manifest `reference` names and loads its config.
    pub(crate) fn resolve(&self, reference: &ImageReference) -> Result<Resolved, ImageError> {
        let index = self.read_index_json()?;
        let chosen = if let Some(digest) = reference.digest() {
            match self.find_by_digest(index.manifests(), digest, 0)? {
                Some(d) => d,
                None => {
                    return Err(ImageError::TagNotFound {
                        reference: reference.to_string(),
                        wanted: digest.to_string(),
                        layout: self.dir.clone(),
                        available: tags_of(&index),
                    });
                }
            }
        } else {
            let tag = reference.tag().unwrap_or(crate::reference::DEFAULT_TAG);
            let full = format!("{}:{}", reference.name(), tag);
            let candidates: Vec<&Descriptor> = index
                .manifests()
                .iter()
                .filter(|d| ref_name(d).is_some_and(|n| n == tag || n == full))
                .collect();
            if candidates.is_empty() {
                return Err(ImageError::TagNotFound {
                    reference: reference.to_string(),
                    wanted: tag.to_string(),
                    layout: self.dir.clone(),
                    available: tags_of(&index),
                });
            }
            if candidates.len() == 1 {
                candidates[0].clone()
            } else {
                pick_platform(reference, "index.json", &candidates)?.clone()
            }
        };
        self.resolve_descriptor(reference, &chosen, 0)
    }

    /// Follows a descriptor (manifest, or index → its linux/amd64 manifest)
    /// to a manifest, and loads that.
    fn resolve_descriptor(
        &self,
        reference: &ImageReference,
        desc: &Descriptor,
        depth: usize,
    ) -> Result<Resolved, ImageError> {
        let media_type = desc.media_type().to_string();
        let digest = descriptor_digest(desc, "descriptor")?;
        match media_type.as_str() {
            MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {
                self.load_manifest(reference, &digest, desc.size())
            }
            MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(ImageError::MalformedBlob {
                        what: "image index".into(),
                        digest: digest.to_string(),
                        reason: format!("image indexes nest more than {MAX_INDEX_DEPTH} deep"),
                    });
                }
                let index = self.load_index(&digest, desc.size())?;
                let all: Vec<&Descriptor> = index.manifests().iter().collect();
                let chosen = pick_platform(reference, &digest.to_string(), &all)?;
                self.resolve_descriptor(reference, chosen, depth + 1)
            }
            other => Err(ImageError::UnsupportedMediaType {
                what: format!("image {reference}: descriptor {digest}"),
                media_type: other.to_string(),
            }),
        }
    }

    fn find_by_digest(
        &self,
        descs: &[Descriptor],
        digest: &Digest,
        depth: usize,
    ) -> Result<Option<Descriptor>, ImageError> {
        for d in descs {
            if descriptor_digest(d, "descriptor")? == *digest {
                return Ok(Some(d.clone()));
            }
        }
        if depth >= MAX_INDEX_DEPTH {
            return Ok(None);
        }
        for d in descs {
            let mt = d.media_type().to_string();
            if mt == MEDIA_TYPE_OCI_INDEX || mt == MEDIA_TYPE_DOCKER_LIST {
                let idx = self.load_index(&descriptor_digest(d, "descriptor")?, d.size())?;
                if let Some(found) = self.find_by_digest(idx.manifests(), digest, depth + 1)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    fn load_index(&self, digest: &Digest, size: u64) -> Result<ImageIndex, ImageError> {
        load_index(&self.dir, digest, size)
    }

    fn load_manifest(
        &self,
        reference: &ImageReference,
        digest: &Digest,
        size: u64,
    ) -> Result<Resolved, ImageError> {
        load_manifest(&self.dir, reference, digest, size)
    }
}

/// Reads and verifies the image index blob `digest` under `dir`'s
/// `blobs/`.
pub(crate) fn load_index(dir: &Path, digest: &Digest, size: u64) -> Result<ImageIndex, ImageError> {
    let path = blob_path(dir, digest);
    let data = read_verified(
        &path,
        &Expected {
            what: "image index",
            digest,
            size,
        },
        MAX_MANIFEST_BYTES,
    )?;
    ImageIndex::from_reader(&data[..]).map_err(|e| ImageError::MalformedBlob {
        what: "image index".into(),
        digest: digest.to_string(),
        reason: e.to_string(),
    })
}

/// Reads and verifies the manifest blob `digest` and its config under
/// `dir`'s `blobs/` (a layout, or the cache's blob store), checking that
/// it is a linux/amd64 container image whose layers Somna can apply.
pub(crate) fn load_manifest(
    dir: &Path,
    reference: &ImageReference,
    digest: &Digest,
    size: u64,
) -> Result<Resolved, ImageError> {
    let path = blob_path(dir, digest);
    let data = read_verified(
        &path,
        &Expected {
            what: "image manifest",
            digest,
            size,
        },
        MAX_MANIFEST_BYTES,
    )?;
    let malformed = |reason: String| ImageError::MalformedBlob {
        what: "image manifest".into(),
        digest: digest.to_string(),
        reason,
    };
    let manifest = ImageManifest::from_reader(&data[..]).map_err(|e| malformed(e.to_string()))?;

    let config_desc = manifest.config();
    let config_media_type = config_desc.media_type().to_string();
    if config_media_type != MEDIA_TYPE_OCI_CONFIG && config_media_type != MEDIA_TYPE_DOCKER_CONFIG {
        return Err(ImageError::UnsupportedMediaType {
            what: format!(
                "image {reference}: the config of manifest {digest} (not a container image)"
            ),
            media_type: config_media_type,
        });
    }
    let config_digest = descriptor_digest(config_desc, "image config")?;
    let config_path = blob_path(dir, &config_digest);
    let config_data = read_verified(
        &config_path,
        &Expected {
            what: "image config",
            digest: &config_digest,
            size: config_desc.size(),
        },
        MAX_CONFIG_BYTES,
    )?;
    let config = ImageConfiguration::from_reader(&config_data[..]).map_err(|e| {
        ImageError::MalformedBlob {
            what: "image config".into(),
            digest: config_digest.to_string(),
            reason: e.to_string(),
        }
    })?;
    if !is_linux_amd64(&config) {
        return Err(ImageError::UnsupportedPlatform {
            reference: reference.to_string(),
            platform: platform_of(&config),
        });
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::MalformedBlob {
            what: "image config".into(),
            digest: config_digest.to_string(),
            reason: format!(
                "it lists {} diff_ids but manifest {digest} has {} layers",
                diff_ids.len(),
                manifest.layers().len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (l, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let media_type = l.media_type().to_string();
        let layer_digest = descriptor_digest(l, "layer")?;
        let Some(compression) = LayerCompression::from_media_type(&media_type) else {
            return Err(ImageError::UnsupportedMediaType {
                what: format!("image {reference}: layer {layer_digest}"),
                media_type,
            });
        };
        if compression == LayerCompression::Zstd && !cfg!(feature = "zstd") {
            return Err(ImageError::UnsupportedMediaType {
                what: format!(
                    "image {reference}: layer {layer_digest} (somna-images was built without the zstd feature)"
                ),
                media_type,
            });
        }
        let diff_id = Digest::parse(diff_id).map_err(|e| ImageError::MalformedBlob {
            what: "image config".into(),
            digest: config_digest.to_string(),
            reason: format!("bad diff_id: {e}"),
        })?;
        layers.push(LayerDescriptor {
            media_type,
            compression,
            digest: layer_digest,
            size: l.size(),
            diff_id,
        });
    }
    Ok(Resolved {
        manifest_digest: digest.clone(),
        config_digest,
        config: ImageConfig::from_oci(&config),
        layers,
    })
}

pub(crate) fn blob_path(layout_dir: &Path, digest: &Digest) -> PathBuf {
    layout_dir.join("blobs").join("sha256").join(digest.hex())
}

pub(crate) fn read_index_json(dir: &Path) -> Result<ImageIndex, ImageError> {
    let path = dir.join("index.json");
    let meta = std::fs::metadata(&path).ctx("cannot read", &path)?;
    if meta.len() > MAX_INDEX_BYTES {
        return Err(ImageError::InvalidLayout {
            path: dir.to_path_buf(),
            reason: format!("index.json is over {MAX_INDEX_BYTES} bytes"),
        });
    }
    let data = std::fs::read(&path).ctx("cannot read", &path)?;
    ImageIndex::from_reader(&data[..]).map_err(|e| ImageError::InvalidLayout {
        path: dir.to_path_buf(),
        reason: format!("index.json: {e}"),
    })
}

fn exists(path: &Path) -> Result<bool, ImageError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(ImageError::io("cannot inspect", path, e)),
    }
}

pub(crate) fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a: &HashMap<String, String>| a.get(ANNOTATION_REF_NAME))
        .map(|s| s.as_str())
}

fn tags_of(index: &ImageIndex) -> Vec<String> {
    let mut tags: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| ref_name(d).map(str::to_string))
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

pub(crate) fn descriptor_digest(d: &Descriptor, what: &str) -> Result<Digest, ImageError> {
    Digest::parse(d.digest().as_ref()).map_err(|reason| ImageError::MalformedBlob {
        what: what.to_string(),
        digest: d.digest().to_string(),
        reason,
    })
}

/// Chooses the linux/amd64 entry among `descs`. Entries without a platform
/// are taken only when no entry has one (then the last, the newest).
pub(crate) fn pick_platform<'a>(
    reference: &ImageReference,
    index: &str,
    descs: &[&'a Descriptor],
) -> Result<&'a Descriptor, ImageError> {
    if descs.iter().all(|d| d.platform().is_none())
        && let Some(last) = descs.last()
    {
        return Ok(last);
    }
    let found = descs.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            *p.os() == oci_spec::image::Os::Linux
                && *p.architecture() == oci_spec::image::Arch::Amd64
        })
    });
    match found {
        Some(d) => Ok(d),
        None => Err(ImageError::PlatformNotFound {
            reference: reference.to_string(),
            index: index.to_string(),
            available: descs
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect(),
        }),
    }
}
