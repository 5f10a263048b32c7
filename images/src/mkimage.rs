//! Writing OCI image layouts: layers from directories (or ready tar
//! streams), the image config, the manifest and the tag in `index.json`.
//! `somna-mkimage` and the recipes use it; so do tests, to make small
//! images (a whiteout is just a file named `.wh.<name>` in a layer's
//! directory, or an entry in a hand-written tar).
//!
//! One writer per layout at a time: nothing here locks the layout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::config::ImageConfig;
use crate::digest::{Digest, DigestWriter};
use crate::error::{ImageError, IoContext};
use crate::layout::{
    ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, LayerCompression, MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST, blob_path,
};
use crate::reference::{ImageReference, check_tag};

/// Where a layer's content comes from.
#[derive(Clone, Debug)]
pub enum LayerSource {
    /// A directory tree, archived in a deterministic order with ownership,
    /// modes, mtimes, xattrs, symlinks, hard links and device nodes. The
    /// directory itself is not archived (the image root keeps 0755 root).
    Dir(PathBuf),
    /// A ready, uncompressed tar stream, used as is.
    Tar(Vec<u8>),
}

/// One layer to write.
#[derive(Clone, Debug)]
pub struct LayerInput {
    pub source: LayerSource,
    pub compression: LayerCompression,
}

impl LayerInput {
    /// A gzip layer from a directory.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        LayerInput {
            source: LayerSource::Dir(path.into()),
            compression: LayerCompression::Gzip,
        }
    }

    /// A gzip layer from an uncompressed tar stream.
    pub fn tar(tar: Vec<u8>) -> Self {
        LayerInput {
            source: LayerSource::Tar(tar),
            compression: LayerCompression::Gzip,
        }
    }

    pub fn with_compression(mut self, compression: LayerCompression) -> Self {
        self.compression = compression;
        self
    }
}

/// An image to write into a layout.
#[derive(Clone, Debug)]
pub struct NewImage {
    /// `name[:tag]`; the tag (default `latest`) is written to `index.json`,
    /// replacing any manifest that had it.
    pub reference: String,
    pub config: ImageConfig,
    /// Layers, lowest first.
    pub layers: Vec<LayerInput>,
}

/// What [`write_image`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenImage {
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    /// Per layer: (blob digest, blob size, diff_id).
    pub layers: Vec<(Digest, u64, Digest)>,
}

/// Writes `image` into the OCI layout at `layout_dir` (created if needed),
/// tags it, and removes blobs no tag reaches any more.
pub fn write_image(layout_dir: &Path, image: &NewImage) -> Result<WrittenImage, ImageError> {
    let reference = ImageReference::parse(&image.reference)?;
    if reference.digest().is_some() {
        return Err(ImageError::InvalidArgument(format!(
            "{}: give a name and tag to write, not a digest",
            image.reference
        )));
    }
    init_layout(layout_dir)?;

    let mut layers = Vec::new();
    let mut layer_descs = Vec::new();
    for layer in &image.layers {
        let (digest, size, diff_id) = write_layer(layout_dir, layer)?;
        layer_descs.push(json!({
            "mediaType": layer.compression.oci_media_type(),
            "digest": digest.to_string(),
            "size": size,
        }));
        layers.push((digest, size, diff_id));
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.2.to_string()).collect();
    let config = image.config.to_oci_json(&diff_ids);
    let config_digest = write_blob(layout_dir, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": layer_descs,
    });
    let manifest = serde_json::to_vec(&manifest).expect("serializing JSON values cannot fail");
    let manifest_digest = write_blob(layout_dir, &manifest)?;
    set_tag(
        layout_dir,
        &reference,
        MEDIA_TYPE_OCI_MANIFEST,
        &manifest_digest,
        manifest.len() as u64,
    )?;
    gc_layout(layout_dir)?;
    Ok(WrittenImage {
        manifest_digest,
        manifest_size: manifest.len() as u64,
        config_digest,
        layers,
    })
}

/// Creates `oci-layout`, `index.json` and `blobs/sha256/` if missing.
pub fn init_layout(layout_dir: &Path) -> Result<(), ImageError> {
    let blobs = layout_dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).ctx("cannot create", &blobs)?;
    let marker = layout_dir.join("oci-layout");
    if !marker.exists() {
        write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let index = layout_dir.join("index.json");
    if !index.exists() {
        let empty = json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []});
        write_atomic(&index, &serde_json::to_vec_pretty(&empty).expect("JSON"))?;
    }
    Ok(())
}

/// Stores `data` as a blob and returns its digest.
pub fn write_blob(layout_dir: &Path, data: &[u8]) -> Result<Digest, ImageError> {
    let digest = Digest::of(data);
    let path = blob_path(layout_dir, &digest);
    if !path.exists() {
        let dir = path.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).ctx("cannot create", dir)?;
        write_atomic(&path, data)?;
    }
    Ok(digest)
}

/// Points `reference`'s tag in `index.json` at a manifest (or index),
/// replacing what had that tag. Writes the tag as
/// `org.opencontainers.image.ref.name` and `name:tag` as
/// `io.containerd.image.name`.
pub fn set_tag(
    layout_dir: &Path,
    reference: &ImageReference,
    media_type: &str,
    digest: &Digest,
    size: u64,
) -> Result<(), ImageError> {
    let tag = reference.tag().unwrap_or(crate::reference::DEFAULT_TAG);
    check_tag(tag).map_err(ImageError::InvalidArgument)?;
    let full = format!("{}:{tag}", reference.name());
    init_layout(layout_dir)?;
    let path = layout_dir.join("index.json");
    let text = fs::read(&path).ctx("cannot read", &path)?;
    let mut index: Value =
        serde_json::from_slice(&text).map_err(|e| ImageError::InvalidLayout {
            path: layout_dir.to_path_buf(),
            reason: format!("index.json: {e}"),
        })?;
    let manifests = index
        .get_mut("manifests")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ImageError::InvalidLayout {
            path: layout_dir.to_path_buf(),
            reason: "index.json has no manifests array".into(),
        })?;
    manifests.retain(|m| {
        let name = m
            .get("annotations")
            .and_then(|a| a.get(ANNOTATION_REF_NAME))
            .and_then(Value::as_str);
        name != Some(tag) && name != Some(full.as_str())
    });
    let mut desc = json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": size,
        "annotations": { ANNOTATION_REF_NAME: tag, ANNOTATION_IMAGE_NAME: full },
    });
    if media_type == MEDIA_TYPE_OCI_MANIFEST || media_type == MEDIA_TYPE_DOCKER_MANIFEST {
        desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    }
    manifests.push(desc);
    write_atomic(&path, &serde_json::to_vec_pretty(&index).expect("JSON"))
}

/// Removes blobs that nothing in `index.json` reaches (and leftovers of
/// interrupted writes). Returns how many files it removed.
pub fn gc_layout(layout_dir: &Path) -> Result<u64, ImageError> {
    let index_path = layout_dir.join("index.json");
    let text = fs::read(&index_path).ctx("cannot read", &index_path)?;
    let index: Value = serde_json::from_slice(&text).map_err(|e| ImageError::InvalidLayout {
        path: layout_dir.to_path_buf(),
        reason: format!("index.json: {e}"),
    })?;
    let mut reachable = HashSet::new();
    mark(layout_dir, &index, &mut reachable, 0);
    let mut removed = 0;
    let blobs = layout_dir.join("blobs").join("sha256");
    for entry in fs::read_dir(&blobs).ctx("cannot list", &blobs)? {
        let entry = entry.ctx("cannot list", &blobs)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale_tmp = name.starts_with(TMP_PREFIX);
        let unreachable = Digest::from_hex(&name).is_ok_and(|d| !reachable.contains(&d));
        if stale_tmp || unreachable {
            fs::remove_file(entry.path()).ctx("cannot remove", &entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Marks the blobs an index/manifest document reaches.
fn mark(layout_dir: &Path, doc: &Value, reachable: &mut HashSet<Digest>, depth: usize) {
    if depth > 8 {
        return;
    }
    let descs = doc
        .get("manifests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(doc.get("config"))
        .chain(
            doc.get("layers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        );
    for desc in descs {
        let Some(digest) = desc
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| Digest::parse(d).ok())
        else {
            continue;
        };
        if !reachable.insert(digest.clone()) {
            continue;
        }
        let mt = desc.get("mediaType").and_then(Value::as_str).unwrap_or("");
        if [
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_LIST,
        ]
        .contains(&mt)
            && let Ok(data) = fs::read(blob_path(layout_dir, &digest))
            && let Ok(child) = serde_json::from_slice::<Value>(&data)
        {
            mark(layout_dir, &child, reachable, depth + 1);
        }
    }
}

const TMP_PREFIX: &str = ".tmp-";

/// Writes a file via a temporary file and a rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().expect("paths written have a parent");
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)
        .ctx("cannot create a temporary file in", dir)?;
    set_blob_mode(&tmp)?;
    tmp.write_all(data).ctx("cannot write", tmp.path())?;
    tmp.as_file().sync_all().ctx("cannot sync", tmp.path())?;
    tmp.persist(path)
        .map_err(|e| ImageError::io("cannot write", path, e.error))?;
    Ok(())
}

/// Layout files are world-readable (temporary files start as 0600), so a
/// store running as another user can read them.
fn set_blob_mode(tmp: &tempfile::NamedTempFile) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .ctx("cannot set mode of", tmp.path())
}

/// The output end of a layer: compressed (or not), hashed, counted.
enum Compressor {
    None(DigestWriter<fs::File>),
    Gzip(flate2::write::GzEncoder<DigestWriter<fs::File>>),
    #[cfg(feature = "zstd")]
    Zstd(zstd::stream::write::Encoder<'static, DigestWriter<fs::File>>),
}

impl Compressor {
    fn new(file: fs::File, compression: LayerCompression) -> io::Result<Self> {
        let out = DigestWriter::new(file);
        Ok(match compression {
            LayerCompression::None => Compressor::None(out),
            LayerCompression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
            #[cfg(feature = "zstd")]
            LayerCompression::Zstd => Compressor::Zstd(zstd::stream::write::Encoder::new(out, 3)?),
            #[cfg(not(feature = "zstd"))]
            LayerCompression::Zstd => {
                return Err(io::Error::other(
                    "somna-images was built without the zstd feature",
                ));
            }
        })
    }

    fn finish(self) -> io::Result<DigestWriter<fs::File>> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Gzip(w) => w.finish(),
            #[cfg(feature = "zstd")]
            Compressor::Zstd(w) => w.finish(),
        }
    }
}

impl Write for Compressor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            #[cfg(feature = "zstd")]
            Compressor::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            #[cfg(feature = "zstd")]
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

/// Writes one layer blob; returns (digest, size, diff_id).
fn write_layer(layout_dir: &Path, layer: &LayerInput) -> Result<(Digest, u64, Digest), ImageError> {
    let blobs = layout_dir.join("blobs").join("sha256");
    let tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(&blobs)
        .ctx("cannot create a temporary file in", &blobs)?;
    set_blob_mode(&tmp)?;
    let file = tmp.reopen().ctx("cannot open", tmp.path())?;
    let compressor =
        Compressor::new(file, layer.compression).ctx("cannot start compressing", tmp.path())?;
    let mut tar_out = DigestWriter::new(io::BufWriter::with_capacity(1 << 20, compressor));
    match &layer.source {
        LayerSource::Dir(dir) => {
            tar_out = tar_directory(dir, tar_out)?;
        }
        LayerSource::Tar(data) => tar_out.write_all(data).ctx("cannot write", tmp.path())?,
    }
    let (buf, diff_id, _) = tar_out.finish();
    let compressor = buf
        .into_inner()
        .map_err(|e| ImageError::io("cannot write", tmp.path(), e.into_error()))?;
    let out = compressor.finish().ctx("cannot write", tmp.path())?;
    let (file, digest, size) = out.finish();
    file.sync_all().ctx("cannot sync", tmp.path())?;
    let path = blob_path(layout_dir, &digest);
    tmp.persist(&path)
        .map_err(|e| ImageError::io("cannot write", &path, e.error))?;
    Ok((digest, size, diff_id))
}

/// Archives the tree under `dir` (not `dir` itself) as an uncompressed tar
/// into `out`, entries in byte order of their paths (depth first), so the
/// same tree always gives the same bytes. Keeps numeric ownership, modes
/// (setuid/sticky too), mtimes (whole seconds), xattrs (as
/// `SCHILY.xattr.*` PAX records), symlinks, hard links (the first path in
/// that order holds the data), device nodes and fifos; sockets are skipped.
pub fn tar_directory<W: Write>(dir: &Path, out: W) -> Result<W, ImageError> {
    let meta = fs::symlink_metadata(dir).ctx("cannot read layer directory", dir)?;
    if !meta.is_dir() {
        return Err(ImageError::InvalidArgument(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut links = HashMap::new();
    append_tree(&mut builder, dir, Path::new(""), &mut links)?;
    builder.into_inner().ctx("cannot finish tar of", dir)
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx("cannot list", &dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .ctx("cannot list", &dir)?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let rel_path = rel.join(&name);
        let path = root.join(&rel_path);
        let meta = fs::symlink_metadata(&path).ctx("cannot inspect", &path)?;
        let ft = meta.file_type();
        if ft.is_socket() {
            tracing::warn!(path = %path.display(), "skipping socket");
            continue;
        }
        let werr = |e: io::Error| ImageError::io("cannot archive", &path, e);

        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid() as u64);
        header.set_gid(meta.gid() as u64);
        header.set_mtime(meta.mtime().max(0) as u64);
        header.set_size(0);

        if ft.is_file() && meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                header.set_entry_type(tar::EntryType::Link);
                builder
                    .append_link(&mut header, &rel_path, first)
                    .map_err(werr)?;
                continue;
            }
            links.insert((meta.dev(), meta.ino()), rel_path.clone());
        }

        let xattrs = read_xattrs(&path)?;
        if !xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .map_err(werr)?;
        }

        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            builder
                .append_data(&mut header, &rel_path, io::empty())
                .map_err(werr)?;
            append_tree(builder, root, &rel_path, links)?;
        } else if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = fs::File::open(&path).map_err(werr)?;
            builder
                .append_data(&mut header, &rel_path, file)
                .map_err(werr)?;
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(&path).map_err(werr)?;
            builder
                .append_link(&mut header, &rel_path, &target)
                .map_err(werr)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            header.set_entry_type(kind);
            if kind != tar::EntryType::Fifo {
                let rdev = meta.rdev();
                header
                    .set_device_major(nix::sys::stat::major(rdev) as u32)
                    .map_err(werr)?;
                header
                    .set_device_minor(nix::sys::stat::minor(rdev) as u32)
                    .map_err(werr)?;
            }
            builder
                .append_data(&mut header, &rel_path, io::empty())
                .map_err(werr)?;
        }
    }
    Ok(())
}

/// A path's extended attributes (not following symlinks), sorted by name.
fn read_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, ImageError> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32) => return Ok(out),
        Err(e) => {
            return Err(ImageError::io(
                "cannot list extended attributes of",
                path,
                e,
            ));
        }
    };
    for name in names {
        let Some(key) = name.to_str() else {
            tracing::warn!(path = %path.display(), ?name, "skipping extended attribute with a non-UTF-8 name");
            continue;
        };
        if let Some(value) =
            xattr::get(path, &name).ctx("cannot read extended attributes of", path)?
        {
            out.insert(key.to_string(), value);
        }
    }
    Ok(out)
}
