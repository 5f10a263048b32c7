//! Pulling an image from a registry into the blob store: manifest (an
//! index is followed to its linux/amd64 manifest), config, then the
//! layers, a few at a time, each verified against its digest and size as
//! it streams in. Size limits are checked from the descriptors before any
//! layer is downloaded, and enforced again byte by byte.
//!
//! Each blob is fetched under its digest's single-flight lock, so two
//! pulls (of one image, or of two images sharing a base layer) download it
//! once. A pull that fails removes the blobs it wrote that no other image
//! needs, and writes no record: nothing partial stays in the cache.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci_spec::image::{ImageIndex, ImageManifest};
use tracing::{Instrument, info, info_span};

use crate::blobs::BlobWriteError;
use crate::digest::Digest;
use crate::error::ImageError;
use crate::layout::{
    LayerDescriptor, MAX_CONFIG_BYTES, MAX_INDEX_DEPTH, MAX_MANIFEST_BYTES,
    MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, descriptor_digest,
    load_manifest, pick_platform,
};
use crate::records::RecordSource;
use crate::reference::ImageReference;
use crate::registry::{Remote, error_chain};
use crate::store::{Image, ImageSource, Inner, Pins, PullEvent, image_of};

/// How often a downloading layer reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

type Progress<'a> = &'a (dyn Fn(PullEvent) + Send + Sync);

impl Inner {
    /// Pulls `reference` (canonical, named) and records it.
    pub(crate) async fn pull_registry(
        &self,
        reference: &ImageReference,
        progress: Progress<'_>,
    ) -> Result<Image, ImageError> {
        let span = info_span!("image_pull", image = %reference);
        let start = Instant::now();
        let mut new_blobs = Vec::new();
        let mut pins = self.pins();
        let result = self
            .pull_registry_inner(reference, progress, &mut pins, &mut new_blobs)
            .instrument(span.clone())
            .await;
        drop(pins);
        match &result {
            Ok(image) => {
                let _s = span.enter();
                info!(
                    elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
                    digest = %image.manifest_digest,
                    new_blobs = new_blobs.len(),
                    "image pulled"
                );
            }
            Err(_) => self.discard_blobs(&new_blobs),
        }
        result
    }

    async fn pull_registry_inner(
        &self,
        reference: &ImageReference,
        progress: Progress<'_>,
        pins: &mut Pins<'_>,
        new_blobs: &mut Vec<Digest>,
    ) -> Result<Image, ImageError> {
        let display = reference.to_string();
        self.stats.pulls.fetch_add(1, Ordering::SeqCst);
        let remote = self.registry.open(reference).await?;

        // Manifest, following indexes to linux/amd64.
        let (mut bytes, mut digest) = remote.manifest(None, MAX_MANIFEST_BYTES).await?;
        let mut depth = 0;
        loop {
            let media_type = manifest_media_type(&bytes);
            match media_type.as_str() {
                MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => break,
                MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST if depth < MAX_INDEX_DEPTH => {
                    let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| {
                        ImageError::MalformedBlob {
                            what: format!("image index of {display}"),
                            digest: digest.to_string(),
                            reason: e.to_string(),
                        }
                    })?;
                    let all: Vec<_> = index.manifests().iter().collect();
                    let chosen = pick_platform(reference, &digest.to_string(), &all)?;
                    let want = descriptor_digest(chosen, "manifest")?;
                    let size = chosen.size();
                    let (b, d) = remote.manifest(Some(&want), MAX_MANIFEST_BYTES).await?;
                    if b.len() as u64 != size {
                        return Err(ImageError::BlobVerification {
                            reference: display,
                            what: "manifest".into(),
                            digest: want.to_string(),
                            reason: format!("{} bytes, the index announced {size}", b.len()),
                        });
                    }
                    (bytes, digest) = (b, d);
                    depth += 1;
                }
                other => {
                    return Err(ImageError::UnsupportedMediaType {
                        what: format!("image {display}: manifest {digest}"),
                        media_type: other.to_string(),
                    });
                }
            }
        }
        pins.add(&digest);
        if !self.blobs.has(&digest, bytes.len() as u64) {
            self.blobs
                .put(&digest, &bytes)
                .map_err(|e| e.into_image_error(&display, "manifest", &digest))?;
            new_blobs.push(digest.clone());
        }
        let manifest_size = bytes.len() as u64;

        // Config: small, fetched before any layer so a foreign platform or
        // an unknown layer type fails before the big downloads.
        let manifest =
            ImageManifest::from_reader(&bytes[..]).map_err(|e| ImageError::MalformedBlob {
                what: format!("image manifest of {display}"),
                digest: digest.to_string(),
                reason: e.to_string(),
            })?;
        let config_desc = manifest.config();
        let config_media_type = config_desc.media_type().to_string();
        if config_media_type != MEDIA_TYPE_OCI_CONFIG
            && config_media_type != MEDIA_TYPE_DOCKER_CONFIG
        {
            return Err(ImageError::UnsupportedMediaType {
                what: format!(
                    "image {display}: the config of manifest {digest} (not a container image)"
                ),
                media_type: config_media_type,
            });
        }
        let config_digest = descriptor_digest(config_desc, "image config")?;
        if config_desc.size() > MAX_CONFIG_BYTES {
            return Err(ImageError::TooLarge {
                reference: display,
                what: format!("the image config {config_digest}"),
                limit: MAX_CONFIG_BYTES,
                detail: format!("{} bytes", config_desc.size()),
            });
        }
        pins.add(&config_digest);
        if self
            .fetch_blob(
                &remote,
                "config",
                &config_digest,
                config_desc.size(),
                &config_media_type,
                None,
            )
            .await?
        {
            new_blobs.push(config_digest.clone());
        }

        let root = self.blobs.root().to_path_buf();
        let (r, d) = (reference.clone(), digest.clone());
        let resolved =
            tokio::task::spawn_blocking(move || load_manifest(&root, &r, &d, manifest_size))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        self.check_limits(&display, &resolved.layers)?;

        progress(PullEvent::Resolved {
            reference: display.clone(),
            manifest_digest: digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size))
                .collect(),
        });
        for l in &resolved.layers {
            pins.add(&l.digest);
        }
        // Whatever this pull is about to write goes if it fails (unless
        // another image needs it by then).
        new_blobs.extend(
            resolved
                .layers
                .iter()
                .filter(|l| !self.blobs.has(&l.digest, l.size))
                .map(|l| l.digest.clone()),
        );
        // The futures are made up front (not in a stream closure, whose
        // borrow of the layer would not be Send-provable) and run a few at
        // a time.
        let fetches: Vec<_> = resolved
            .layers
            .iter()
            .map(|l| async {
                let fetched = self
                    .fetch_blob(
                        &remote,
                        "layer",
                        &l.digest,
                        l.size,
                        &l.media_type,
                        Some(progress),
                    )
                    .await?;
                Ok::<_, ImageError>((l.digest.clone(), fetched, l.size))
            })
            .collect();
        let downloaded: Vec<(Digest, bool, u64)> = futures::stream::iter(fetches)
            .buffer_unordered(self.options.registry.max_concurrent_downloads.max(1))
            .try_collect()
            .await?;
        let mut downloaded_bytes = 0;
        for (_, fetched, size) in downloaded {
            if fetched {
                downloaded_bytes += size;
            }
        }

        let (registry, repository) = reference
            .registry_repository(&self.options.registry.default_registry)
            .unwrap_or_default();
        let mut blobs = vec![
            (digest.clone(), manifest_size),
            (config_digest, config_desc.size()),
        ];
        blobs.extend(resolved.layers.iter().map(|l| (l.digest.clone(), l.size)));
        self.save_record(
            display.clone(),
            RecordSource::Registry {
                registry: registry.clone(),
                repository: repository.clone(),
            },
            &digest,
            manifest_size,
            blobs,
        )?;
        progress(PullEvent::Done {
            reference: display,
            manifest_digest: digest,
            downloaded_bytes,
        });
        Ok(image_of(
            reference.clone(),
            resolved,
            ImageSource::Registry {
                registry,
                repository,
            },
        ))
    }

    /// Fetches layers of a recorded registry image that are missing from
    /// the store (the caller pinned them).
    pub(crate) async fn refetch_layers(
        &self,
        reference: &ImageReference,
        layers: &[&LayerDescriptor],
    ) -> Result<(), ImageError> {
        let remote = self.registry.open(reference).await?;
        for l in layers {
            self.fetch_blob(&remote, "layer", &l.digest, l.size, &l.media_type, None)
                .await?;
        }
        Ok(())
    }

    /// The per-layer and whole-image limits, from the descriptors alone.
    pub(crate) fn check_limits(
        &self,
        reference: &str,
        layers: &[LayerDescriptor],
    ) -> Result<(), ImageError> {
        let limits = self.options.limits;
        for l in layers {
            if l.size > limits.max_layer_bytes {
                return Err(ImageError::TooLarge {
                    reference: reference.to_string(),
                    what: format!("layer {}", l.digest),
                    limit: limits.max_layer_bytes,
                    detail: format!("{} bytes compressed", l.size),
                });
            }
        }
        let total: u64 = layers.iter().map(|l| l.size).sum();
        if total > limits.max_image_bytes {
            return Err(ImageError::TooLarge {
                reference: reference.to_string(),
                what: "the image".into(),
                limit: limits.max_image_bytes,
                detail: format!("its layers are {total} bytes compressed"),
            });
        }
        Ok(())
    }

    /// Downloads one blob into the store unless it is there. Returns
    /// whether it downloaded.
    async fn fetch_blob(
        &self,
        remote: &Remote<'_>,
        what: &str,
        digest: &Digest,
        size: u64,
        media_type: &str,
        progress: Option<Progress<'_>>,
    ) -> Result<bool, ImageError> {
        let _flight = self.fetching.lock(digest.clone()).await;
        let report = |done: u64, cached: bool| {
            if let Some(p) = progress {
                p(PullEvent::Layer {
                    digest: digest.clone(),
                    done,
                    total: size,
                    cached,
                });
            }
        };
        if self.blobs.has(digest, size) {
            report(size, true);
            return Ok(false);
        }
        let verification = |reason: String| ImageError::BlobVerification {
            reference: remote.reference.clone(),
            what: what.to_string(),
            digest: digest.to_string(),
            reason,
        };
        let start = Instant::now();
        let mut sized = remote.blob(digest, size, media_type).await?;
        if let Some(len) = sized.content_length
            && len != size
        {
            return Err(verification(format!(
                "the registry announces {len} bytes, the descriptor {size} ({}); not downloaded",
                if len < size { "truncated" } else { "too long" }
            )));
        }
        let mut writer = self.blobs.writer(digest, size)?;
        report(0, false);
        let mut last = Instant::now();
        while let Some(chunk) = sized.stream.next().await {
            match chunk {
                Ok(bytes) => writer
                    .write(&bytes)
                    .map_err(|e| e.into_image_error(&remote.reference, what, digest))?,
                Err(e) => {
                    // oci-client checks the digest at the end of the
                    // stream; with every byte here, the store's own check
                    // says what is wrong more precisely.
                    if writer.written() == size {
                        writer
                            .commit()
                            .map_err(|e| e.into_image_error(&remote.reference, what, digest))?;
                        return Err(verification(error_chain(&e)));
                    }
                    // The server sent all it announced, and that is short.
                    if sized.content_length == Some(writer.written()) {
                        return Err(verification(format!(
                            "got {} bytes, the descriptor announced {size} (truncated)",
                            writer.written()
                        )));
                    }
                    return Err(ImageError::RegistryUnreachable {
                        reference: remote.reference.clone(),
                        registry: remote.registry.clone(),
                        reason: format!(
                            "the download of {what} {digest} broke off after {} of {size} bytes: {}",
                            writer.written(),
                            error_chain(&e)
                        ),
                    });
                }
            }
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                report(writer.written(), false);
            }
        }
        writer.commit().map_err(|e| match e {
            BlobWriteError::Verification(reason) => verification(reason),
            BlobWriteError::Io(e) => e,
        })?;
        report(size, false);
        self.stats.blob_downloads.fetch_add(1, Ordering::SeqCst);
        self.stats
            .bytes_downloaded
            .fetch_add(size, Ordering::SeqCst);
        tracing::debug!(
            blob = %digest,
            size,
            elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
            "blob downloaded"
        );
        Ok(true)
    }
}

/// The media type a manifest document declares, or the one its shape
/// implies when it declares none (OCI allows leaving it out).
fn manifest_media_type(bytes: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return "(not JSON)".to_string();
    };
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return mt.to_string();
    }
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return "application/vnd.docker.distribution.manifest.v1+json".to_string();
    }
    if v.get("manifests").is_some() {
        MEDIA_TYPE_OCI_INDEX.to_string()
    } else if v.get("config").is_some() {
        MEDIA_TYPE_OCI_MANIFEST.to_string()
    } else {
        "(unknown)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_of_manifests() {
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"manifests":[]}"#),
            MEDIA_TYPE_OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"config":{},"layers":[]}"#),
            MEDIA_TYPE_OCI_MANIFEST
        );
        assert_eq!(
            manifest_media_type(br#"{"mediaType":"application/x-foo"}"#),
            "application/x-foo"
        );
        assert!(manifest_media_type(br#"{"schemaVersion":1}"#).contains("v1"));
        assert_eq!(manifest_media_type(b"<html>"), "(not JSON)");
    }
}
