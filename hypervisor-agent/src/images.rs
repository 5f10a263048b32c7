//! Image operations of the host: pull (and convert) with progress, list,
//! remove. Creates pull on demand; this is for doing it ahead of time.

use std::time::Instant;

use somna_images::{ImageInfo, PullEvent, RemovedImage, RootDisk, StoreStats};
use tracing::{Instrument, info, info_span};

use crate::agent::Agent;
use crate::error::AgentError;

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: String,
    pub digest: String,
    pub downloaded_bytes: u64,
    pub root_disk: RootDisk,
    pub pull_ms: u64,
    pub convert_ms: u64,
}

impl Agent {
    /// Pulls `reference` into the cache and builds its root disk;
    /// `progress` sees the pull's events, then `None` when conversion starts.
    pub async fn pull_image(
        &self,
        reference: &str,
        progress: &(dyn Fn(Option<PullEvent>) + Send + Sync),
    ) -> Result<PulledImage, AgentError> {
        let span = info_span!("pull_image", image = %reference);
        async {
            let started = Instant::now();
            let before = self.images().stats().bytes_downloaded;
            let image = self
                .images()
                .pull(reference, &|e| progress(Some(e)))
                .await?;
            let pull_ms = started.elapsed().as_millis() as u64;
            progress(None);
            let convert = Instant::now();
            let root_disk = self.images().root_disk(&image).await?;
            let convert_ms = convert.elapsed().as_millis() as u64;
            info!(pull_ms, convert_ms, digest = %image.manifest_digest, "image ready");
            Ok(PulledImage {
                reference: image.reference.to_string(),
                digest: image.manifest_digest.to_string(),
                downloaded_bytes: self
                    .images()
                    .stats()
                    .bytes_downloaded
                    .saturating_sub(before),
                root_disk,
                pull_ms,
                convert_ms,
            })
        }
        .instrument(span)
        .await
    }

    pub fn list_images(&self) -> Vec<ImageInfo> {
        self.images().list_images()
    }

    /// Removes an image no sandbox uses (its record, blobs and root disk).
    pub async fn remove_image(&self, reference: &str) -> Result<RemovedImage, AgentError> {
        Ok(self.images().remove_image(reference).await?)
    }

    pub fn image_stats(&self) -> StoreStats {
        self.images().stats()
    }
}
