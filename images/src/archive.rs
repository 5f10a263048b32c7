//! Images without a registry: an OCI image layout anywhere on the host
//! (`oci:/path[:tag]`) and a `docker save` tarball
//! (`docker-archive:/path.tar`). Both are imported into the blob store, so
//! the cached image keeps working when the source goes away, and
//! conversion reads every image the same way.
//!
//! A docker archive is read as an index of its members (names, offsets,
//! sizes; nothing is extracted by name onto the disk), then
//! `manifest.json` says which member is the config and which are the
//! layers, in order. Classic archives (`<id>/layer.tar`, `<id>.json`) and
//! the OCI-layout flavour of Docker 25+ (`blobs/sha256/<hex>`) both list
//! their members there. Layers are stored as they are (uncompressed tars
//! usually; gzip or zstd when the archive holds them so) and an OCI
//! manifest is written for them. An uncompressed layer must match its
//! `diff_id` in the config right away; a compressed one is checked when
//! unpacked. A gzip-compressed archive (`docker save | gzip`) is
//! decompressed to a temporary file first, within the image size limit.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;
use tracing::info;

use crate::blobs::BlobWriteError;
use crate::digest::Digest;
use crate::error::{ImageError, IoContext};
use crate::layout::{
    LayerCompression, Layout, MAX_CONFIG_BYTES, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST,
    blob_path, load_manifest, read_index_json,
};
use crate::records::RecordSource;
use crate::reference::ImageReference;
use crate::store::{Image, ImageSource, Inner, PullEvent, image_of};

/// Members of an archive indexed at most.
const MAX_MEMBERS: usize = 1_000_000;
/// Symlinks between archive members followed at most.
const MAX_LINK_HOPS: usize = 8;
const MAX_MANIFEST_JSON: u64 = 1 << 20;

type Progress<'a> = &'a (dyn Fn(PullEvent) + Send + Sync);

impl Inner {
    pub(crate) async fn import_oci_layout(
        self: &Arc<Self>,
        reference: &ImageReference,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Image, ImageError> {
        let inner = self.clone();
        let (r, p) = (reference.clone(), path.to_path_buf());
        self.import(reference, progress, move |tx, new_blobs| {
            inner.import_oci_blocking(&r, &p, tx, new_blobs)
        })
        .await
    }

    pub(crate) async fn import_docker_archive(
        self: &Arc<Self>,
        reference: &ImageReference,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Image, ImageError> {
        let inner = self.clone();
        let (r, p) = (reference.clone(), path.to_path_buf());
        self.import(reference, progress, move |tx, new_blobs| {
            inner.import_docker_blocking(&r, &p, tx, new_blobs)
        })
        .await
    }

    /// Runs an import on a blocking thread, relaying its progress events,
    /// and removes the blobs it wrote when it fails.
    async fn import(
        self: &Arc<Self>,
        reference: &ImageReference,
        progress: Progress<'_>,
        work: impl FnOnce(&UnboundedSender<PullEvent>, &mut Vec<Digest>) -> Result<Image, ImageError>
        + Send
        + 'static,
    ) -> Result<Image, ImageError> {
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = self.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut new_blobs = Vec::new();
            let result = work(&tx, &mut new_blobs);
            if result.is_err() {
                inner.discard_blobs(&new_blobs);
            }
            result
        });
        while let Some(event) = rx.recv().await {
            progress(event);
        }
        let image = handle
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        self.stats.imports.fetch_add(1, Ordering::SeqCst);
        info!(
            image = %reference,
            digest = %image.manifest_digest,
            elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
            "image imported"
        );
        Ok(image)
    }

    fn import_oci_blocking(
        &self,
        reference: &ImageReference,
        dir: &Path,
        tx: &UnboundedSender<PullEvent>,
        new_blobs: &mut Vec<Digest>,
    ) -> Result<Image, ImageError> {
        let display = reference.to_string();
        let layout = Layout::open(dir)?.ok_or_else(|| ImageError::SourceNotFound {
            reference: display.clone(),
            path: dir.to_path_buf(),
            reason: "no OCI image layout there (oci-layout and index.json)".into(),
        })?;
        // No tag: the layout's only manifest, else the one tagged latest.
        let mut wanted = reference.clone();
        if reference.tag().is_none() && reference.digest().is_none() {
            let index = read_index_json(dir)?;
            wanted = match index.manifests().as_slice() {
                [only] => reference.with_digest(Digest::parse(only.digest().as_ref()).map_err(
                    |reason| ImageError::InvalidLayout {
                        path: dir.to_path_buf(),
                        reason,
                    },
                )?),
                _ => ImageReference::parse(&format!("{display}:latest"))?,
            };
        }
        let resolved = layout.resolve(&wanted)?;
        self.check_limits(&display, &resolved.layers)?;
        let digest = resolved.manifest_digest.clone();
        let _ = tx.send(PullEvent::Resolved {
            reference: display.clone(),
            manifest_digest: digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size))
                .collect(),
        });
        let manifest_path = blob_path(dir, &digest);
        let manifest_size = fs::metadata(&manifest_path)
            .ctx("cannot inspect", &manifest_path)?
            .len();
        let config_path = blob_path(dir, &resolved.config_digest);
        let config_size = fs::metadata(&config_path)
            .ctx("cannot inspect", &config_path)?
            .len();
        let mut blobs = vec![
            (digest.clone(), manifest_size),
            (resolved.config_digest.clone(), config_size),
        ];
        blobs.extend(resolved.layers.iter().map(|l| (l.digest.clone(), l.size)));
        let mut copied = 0;
        for (i, (d, size)) in blobs.iter().enumerate() {
            let is_layer = i >= 2;
            if self.blobs.has(d, *size) {
                if is_layer {
                    let _ = tx.send(layer_event(d, *size, *size, true));
                }
                continue;
            }
            let src = blob_path(dir, d);
            let mut file = fs::File::open(&src).ctx("cannot open blob", &src)?;
            let mut w = self.blobs.writer(d, *size)?;
            copy_blob(&mut file, &mut w, *size, &src, |done| {
                if is_layer {
                    let _ = tx.send(layer_event(d, done, *size, false));
                }
            })
            .and_then(|()| w.commit())
            .map_err(|e| e.into_image_error(&display, "blob", d))?;
            new_blobs.push(d.clone());
            copied += size;
        }
        self.save_record(
            display.clone(),
            RecordSource::OciLayout {
                path: dir.to_path_buf(),
            },
            &digest,
            manifest_size,
            blobs,
        )?;
        let _ = tx.send(PullEvent::Done {
            reference: display,
            manifest_digest: digest,
            downloaded_bytes: copied,
        });
        Ok(image_of(
            reference.clone(),
            resolved,
            ImageSource::OciLayout {
                path: dir.to_path_buf(),
            },
        ))
    }

    fn import_docker_blocking(
        &self,
        reference: &ImageReference,
        path: &Path,
        tx: &UnboundedSender<PullEvent>,
        new_blobs: &mut Vec<Digest>,
    ) -> Result<Image, ImageError> {
        let display = reference.to_string();
        let invalid = |reason: String| ImageError::InvalidArchive {
            reference: display.clone(),
            path: path.to_path_buf(),
            reason,
        };
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::SourceNotFound {
                    reference: display,
                    path: path.to_path_buf(),
                    reason: "no such file".into(),
                });
            }
            Err(e) => return Err(ImageError::io("cannot open", path, e)),
        };
        // Kept alive (and removed on drop) when the archive is compressed.
        let (mut file, _plain) = self.plain_archive(file, path, &invalid)?;
        let members =
            index_members(&mut file).map_err(|e| invalid(format!("cannot read it as tar: {e}")))?;

        let manifest_member = members.get("manifest.json").ok_or_else(|| {
            invalid(if members.contains_key("index.json") {
                "it has index.json but no manifest.json: an OCI archive, not a docker save archive (unpack it and use oci:DIR)".into()
            } else {
                "no manifest.json: not a docker save archive".into()
            })
        })?;
        let manifest_json = read_member(
            &mut file,
            &members,
            "manifest.json",
            manifest_member,
            MAX_MANIFEST_JSON,
        )
        .map_err(&invalid)?;
        let entries: serde_json::Value = serde_json::from_slice(&manifest_json)
            .map_err(|e| invalid(format!("manifest.json is not JSON: {e}")))?;
        let entries = entries
            .as_array()
            .ok_or_else(|| invalid("manifest.json is not a list".into()))?;
        let [entry] = entries.as_slice() else {
            return Err(invalid(format!(
                "it holds {} images; Somna imports archives of exactly one",
                entries.len()
            )));
        };
        let config_name = entry
            .get("Config")
            .and_then(|c| c.as_str())
            .ok_or_else(|| invalid("manifest.json has no Config".into()))?;
        let layer_names: Vec<&str> = entry
            .get("Layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| invalid("manifest.json has no Layers".into()))?
            .iter()
            .map(|l| {
                l.as_str()
                    .ok_or_else(|| invalid("a Layers entry is not a string".into()))
            })
            .collect::<Result<_, _>>()?;

        let config_member = resolve_member(&members, config_name).map_err(&invalid)?;
        let config = read_member(
            &mut file,
            &members,
            config_name,
            config_member,
            MAX_CONFIG_BYTES,
        )
        .map_err(&invalid)?;
        let config_digest = Digest::of(&config);
        let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&config)
            .ok()
            .and_then(|v| {
                v.get("rootfs")?.get("diff_ids")?.as_array().map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
            })
            .ok_or_else(|| invalid(format!("the config {config_name} has no rootfs.diff_ids")))?;
        if diff_ids.len() != layer_names.len() {
            return Err(invalid(format!(
                "the config lists {} diff_ids but manifest.json {} layers",
                diff_ids.len(),
                layer_names.len()
            )));
        }

        // Limits, from the member sizes, before copying anything.
        let limits = self.options.limits;
        let mut total = 0u64;
        let mut layer_members = Vec::new();
        for name in &layer_names {
            let m = resolve_member(&members, name).map_err(&invalid)?;
            if m.size > limits.max_layer_bytes {
                return Err(ImageError::TooLarge {
                    reference: display,
                    what: format!("layer {name}"),
                    limit: limits.max_layer_bytes,
                    detail: format!("{} bytes", m.size),
                });
            }
            total += m.size;
            layer_members.push(m);
        }
        if total > limits.max_image_bytes {
            return Err(ImageError::TooLarge {
                reference: display,
                what: "the image".into(),
                limit: limits.max_image_bytes,
                detail: format!("its layers are {total} bytes"),
            });
        }

        if !self.blobs.has(&config_digest, config.len() as u64) {
            self.blobs
                .put(&config_digest, &config)
                .map_err(|e| e.into_image_error(&display, "config", &config_digest))?;
            new_blobs.push(config_digest.clone());
        }
        let mut layer_descs = Vec::new();
        let mut blobs = vec![(config_digest.clone(), config.len() as u64)];
        let mut copied = 0;
        for (i, (name, m)) in layer_names.iter().zip(&layer_members).enumerate() {
            file.seek(SeekFrom::Start(m.offset))
                .ctx("cannot read", path)?;
            let mut magic = [0u8; 4];
            let n = read_up_to(&mut file, &mut magic).ctx("cannot read", path)?;
            let compression = sniff(&magic[..n]);
            file.seek(SeekFrom::Start(m.offset))
                .ctx("cannot read", path)?;
            let mut w = self.blobs.writer_unnamed(m.size)?;
            let what = format!("layer {name}");
            copy_blob(&mut (&mut file).take(m.size), &mut w, m.size, path, |_| {}).map_err(
                |e| match e {
                    BlobWriteError::Verification(r) => invalid(format!("{what}: {r}")),
                    BlobWriteError::Io(e) => e,
                },
            )?;
            let digest = w.commit_named().map_err(|e| match e {
                BlobWriteError::Verification(r) => invalid(format!("{what}: {r}")),
                BlobWriteError::Io(e) => e,
            })?;
            new_blobs.push(digest.clone());
            if compression == LayerCompression::None && digest.to_string() != diff_ids[i] {
                return Err(invalid(format!(
                    "{what} has digest {digest} but the config lists diff_id {} (corrupt archive)",
                    diff_ids[i]
                )));
            }
            let _ = tx.send(layer_event(&digest, m.size, m.size, false));
            copied += m.size;
            layer_descs.push(json!({
                "mediaType": compression.oci_media_type(),
                "digest": digest.to_string(),
                "size": m.size,
            }));
            blobs.push((digest, m.size));
        }

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
        let manifest = serde_json::to_vec(&manifest)
            .map_err(|e| invalid(format!("cannot encode its manifest: {e}")))?;
        let digest = Digest::of(&manifest);
        if !self.blobs.has(&digest, manifest.len() as u64) {
            self.blobs
                .put(&digest, &manifest)
                .map_err(|e| e.into_image_error(&display, "manifest", &digest))?;
            new_blobs.push(digest.clone());
        }
        blobs.insert(0, (digest.clone(), manifest.len() as u64));
        let resolved = load_manifest(self.blobs.root(), reference, &digest, manifest.len() as u64)?;
        let _ = tx.send(PullEvent::Resolved {
            reference: display.clone(),
            manifest_digest: digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size))
                .collect(),
        });
        self.save_record(
            display.clone(),
            RecordSource::DockerArchive {
                path: path.to_path_buf(),
            },
            &digest,
            manifest.len() as u64,
            blobs,
        )?;
        let _ = tx.send(PullEvent::Done {
            reference: display,
            manifest_digest: digest,
            downloaded_bytes: copied,
        });
        Ok(image_of(
            reference.clone(),
            resolved,
            ImageSource::DockerArchive {
                path: path.to_path_buf(),
            },
        ))
    }

    /// The archive as a seekable plain tar: the file itself, or its
    /// decompressed copy in the cache's tmp directory (returned too, so it
    /// lives as long as it is read).
    fn plain_archive(
        &self,
        mut file: fs::File,
        path: &Path,
        invalid: &dyn Fn(String) -> ImageError,
    ) -> Result<(fs::File, Option<tempfile::NamedTempFile>), ImageError> {
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).ctx("cannot read", path)?;
        file.seek(SeekFrom::Start(0)).ctx("cannot read", path)?;
        let compression = sniff(&magic[..n]);
        let decoder: Box<dyn Read> = match compression {
            LayerCompression::None => return Ok((file, None)),
            LayerCompression::Gzip => {
                Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file)))
            }
            #[cfg(feature = "zstd")]
            LayerCompression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(file)
                    .map_err(|e| invalid(format!("cannot decompress: {e}")))?,
            ),
            #[cfg(not(feature = "zstd"))]
            LayerCompression::Zstd => {
                return Err(invalid("zstd-compressed (built without zstd)".into()));
            }
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("archive-")
            .tempfile_in(&self.tmp_dir)
            .ctx("cannot create a temporary file in", &self.tmp_dir)?;
        // The decompressed archive holds the layers plus small metadata:
        // stop a decompression bomb at the image limit (plus slack for
        // the metadata and tar headers).
        let limit = self.options.limits.max_image_bytes.saturating_add(64 << 20);
        let n = io::copy(&mut decoder.take(limit + 1), tmp.as_file_mut())
            .map_err(|e| invalid(format!("cannot decompress: {e}")))?;
        if n > limit {
            return Err(ImageError::TooLarge {
                reference: format!("docker-archive:{}", path.display()),
                what: "the decompressed archive".into(),
                limit,
                detail: "decompression stopped there".into(),
            });
        }
        let plain = tmp.reopen().ctx("cannot reopen", tmp.path())?;
        Ok((plain, Some(tmp)))
    }
}

fn layer_event(d: &Digest, done: u64, total: u64, cached: bool) -> PullEvent {
    PullEvent::Layer {
        digest: d.clone(),
        done,
        total,
        cached,
    }
}

/// Streams `size` bytes of `src` into a blob writer.
fn copy_blob(
    src: &mut impl Read,
    w: &mut crate::blobs::BlobWriter,
    size: u64,
    path: &Path,
    mut on_progress: impl FnMut(u64),
) -> Result<(), BlobWriteError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut last = Instant::now();
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlobWriteError::Io(ImageError::io("cannot read", path, e))),
        };
        w.write(&buf[..n])?;
        if last.elapsed().as_millis() >= 100 {
            last = Instant::now();
            on_progress(w.written());
        }
    }
    on_progress(w.written().min(size));
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Compression from magic bytes.
fn sniff(magic: &[u8]) -> LayerCompression {
    match magic {
        [0x1f, 0x8b, ..] => LayerCompression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => LayerCompression::Zstd,
        _ => LayerCompression::None,
    }
}

#[derive(Clone, Debug)]
struct Member {
    /// Offset of the data in the archive file.
    offset: u64,
    size: u64,
    /// For symlinks and hard links: the member they point to.
    link: Option<String>,
}

/// Lists the archive's regular files and links by normalized name.
fn index_members(file: &mut fs::File) -> io::Result<HashMap<String, Member>> {
    file.seek(SeekFrom::Start(0))?;
    let mut archive = tar::Archive::new(&*file);
    let mut out = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if out.len() >= MAX_MEMBERS {
            return Err(io::Error::other(format!("more than {MAX_MEMBERS} members")));
        }
        let kind = entry.header().entry_type();
        let Some(name) = normalize(&String::from_utf8_lossy(&entry.path_bytes())) else {
            continue;
        };
        let link = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => None,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let target = if kind == tar::EntryType::Symlink {
                    // Relative to the link's directory.
                    let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    format!("{dir}/{target}")
                } else {
                    target
                };
                Some(normalize(&target).unwrap_or_default())
            }
            _ => continue,
        };
        out.insert(
            name,
            Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
                link,
            },
        );
    }
    Ok(out)
}

/// A member name made canonical: no `.`, `..` resolved within the
/// archive (never above its top), no leading `/`. `None` for the top.
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

/// The regular member `name` refers to, following links inside the archive.
fn resolve_member<'a>(
    members: &'a HashMap<String, Member>,
    name: &str,
) -> Result<&'a Member, String> {
    let mut current = normalize(name).ok_or_else(|| format!("{name:?} is not a member name"))?;
    for _ in 0..MAX_LINK_HOPS {
        let m = members
            .get(&current)
            .ok_or_else(|| format!("{name:?} is listed in manifest.json but not in the archive"))?;
        match &m.link {
            None => return Ok(m),
            Some(target) => current = target.clone(),
        }
    }
    Err(format!("{name:?}: too many links"))
}

fn read_member(
    file: &mut fs::File,
    members: &HashMap<String, Member>,
    name: &str,
    m: &Member,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let m = if m.link.is_some() {
        resolve_member(members, name)?
    } else {
        m
    };
    if m.size > limit {
        return Err(format!(
            "{name} is {} bytes, over the limit of {limit}",
            m.size
        ));
    }
    file.seek(SeekFrom::Start(m.offset))
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    let mut data = Vec::with_capacity(m.size as usize);
    file.take(m.size)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if data.len() as u64 != m.size {
        return Err(format!("{name} is truncated"));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_stay_inside_the_archive() {
        assert_eq!(normalize("./a/b.tar").as_deref(), Some("a/b.tar"));
        assert_eq!(normalize("../../etc/passwd").as_deref(), Some("etc/passwd"));
        assert_eq!(normalize("/x/../y").as_deref(), Some("y"));
        assert_eq!(normalize("./"), None);
        let mut members = HashMap::new();
        members.insert(
            "a/layer.tar".to_string(),
            Member {
                offset: 512,
                size: 10,
                link: None,
            },
        );
        members.insert(
            "b/layer.tar".to_string(),
            Member {
                offset: 0,
                size: 0,
                link: Some("a/layer.tar".into()),
            },
        );
        members.insert(
            "loop".to_string(),
            Member {
                offset: 0,
                size: 0,
                link: Some("loop".into()),
            },
        );
        assert_eq!(resolve_member(&members, "b/layer.tar").unwrap().offset, 512);
        assert!(
            resolve_member(&members, "loop")
                .unwrap_err()
                .contains("too many")
        );
        assert!(
            resolve_member(&members, "c")
                .unwrap_err()
                .contains("not in the archive")
        );
    }
}
