//! The crate's error type.

use std::path::PathBuf;

/// What kind of failure an [`ImageError`] is, for callers that map errors to
/// API status codes (e.g. gRPC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller passed something malformed (a bad reference, a bad size).
    InvalidArgument,
    /// The image, tag or platform does not exist where we looked.
    NotFound,
    /// The host is not set up for this (a tool is missing, the cache is in
    /// use by another process, an unsupported format).
    FailedPrecondition,
    /// Stored content is corrupt or inconsistent (digest or size mismatch,
    /// malformed JSON or tar).
    DataLoss,
    /// A registry could not be reached or failed (connection refused, DNS,
    /// TLS, timeouts, 5xx): worth retrying later.
    Unavailable,
    /// The registry refused the credentials (or demanded some and none
    /// were configured).
    Unauthenticated,
    /// A size limit was hit (image or layer over the configured limit, a
    /// decompression bomb).
    ResourceExhausted,
    /// Anything else (I/O errors).
    Internal,
}

/// Everything that can go wrong in this crate. Messages say what failed and,
/// where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "image {reference} not found: no OCI image layout {name}/ (with oci-layout and index.json) in {}, \
         and registry pulls are disabled in this image store; build a local layout \
         (somna-mkimage, or the recipes in images/recipes/) or enable registries",
        format_dirs(searched)
    )]
    ImageNotFound {
        reference: String,
        name: String,
        searched: Vec<PathBuf>,
    },

    #[error(
        "image {reference}: the layout {} has no manifest tagged {wanted} (tags present: {})",
        layout.display(),
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    TagNotFound {
        reference: String,
        wanted: String,
        layout: PathBuf,
        available: Vec<String>,
    },

    #[error(
        "image {reference}: index {index} has no linux/amd64 manifest (platforms present: {})",
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    PlatformNotFound {
        reference: String,
        index: String,
        available: Vec<String>,
    },

    #[error("image {reference} is for {platform}; Somna runs linux/amd64 guests only")]
    UnsupportedPlatform { reference: String, platform: String },

    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("{path}: not a valid OCI image layout: {reason}", path = path.display())]
    InvalidLayout { path: PathBuf, reason: String },

    #[error(
        "blob {digest} ({what}) at {path} is corrupt: expected {expected_size} bytes with that digest, \
         found {actual_size} bytes with digest {actual}; re-create the image layout",
        path = path.display()
    )]
    DigestMismatch {
        what: String,
        digest: String,
        path: PathBuf,
        expected_size: u64,
        actual_size: u64,
        actual: String,
    },

    #[error(
        "layer {digest}: its uncompressed content has digest {actual} but the image config lists diff_id {expected}; \
         the image is inconsistent, re-create it"
    )]
    DiffIdMismatch {
        digest: String,
        expected: String,
        actual: String,
    },

    #[error("blob {digest} ({what}) is missing: {path} does not exist; the image layout is incomplete",
        path = path.display())]
    BlobMissing {
        what: String,
        digest: String,
        path: PathBuf,
    },

    #[error(
        "blob {digest} ({what}) is {size} bytes, over the limit of {limit} bytes for that kind of blob"
    )]
    BlobTooLarge {
        what: String,
        digest: String,
        size: u64,
        limit: u64,
    },

    #[error("{what} {digest}: malformed: {reason}")]
    MalformedBlob {
        what: String,
        digest: String,
        reason: String,
    },

    #[error("layer {layer}: entry {entry:?}: {reason}")]
    InvalidLayerEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    #[error("layer {layer}: {reason}")]
    InvalidLayer { layer: String, reason: String },

    #[error("{tool} not found (looked in PATH, /usr/sbin and /sbin): install {package}")]
    ToolMissing { tool: String, package: String },

    #[error("{tool} failed ({status}) {what}: {stderr}")]
    ToolFailed {
        tool: String,
        what: String,
        status: String,
        stderr: String,
    },

    #[error(
        "the image cache {path} is in use by another process (lock file {path}/.lock is held); \
         run one image store per cache directory",
        path = path.display()
    )]
    CacheBusy { path: PathBuf },

    #[error("image {reference}: registry {registry} is unreachable: {reason}")]
    RegistryUnreachable {
        reference: String,
        registry: String,
        reason: String,
    },

    #[error(
        "image {reference}: registry {registry} refused access: {reason} \
         (check the credentials configured for {registry}, or in the docker config file)"
    )]
    AuthFailed {
        reference: String,
        registry: String,
        reason: String,
    },

    #[error(
        "image {reference}: registry {registry} has no such image (manifest unknown): {reason}"
    )]
    ManifestUnknown {
        reference: String,
        registry: String,
        reason: String,
    },

    #[error("image {reference}: registry {registry} failed: {reason}")]
    RegistryFailed {
        reference: String,
        registry: String,
        reason: String,
    },

    #[error("image {reference}: {what} {digest} failed verification: {reason}; nothing was cached")]
    BlobVerification {
        reference: String,
        what: String,
        digest: String,
        reason: String,
    },

    #[error(
        "image {reference}: {what} is over the limit of {limit} bytes ({detail}); nothing was cached"
    )]
    TooLarge {
        reference: String,
        what: String,
        limit: u64,
        detail: String,
    },

    #[error(
        "layer {layer}: the unpacked image grew past the limit of {limit} bytes; unpacking stopped \
         (a decompression bomb, or an image larger than this store allows)"
    )]
    UnpackedTooLarge { layer: String, limit: u64 },

    #[error("image {reference}: {path}: not a usable image archive: {reason}", path = path.display())]
    InvalidArchive {
        reference: String,
        path: PathBuf,
        reason: String,
    },

    #[error("image {reference}: {path}: {reason}", path = path.display())]
    SourceNotFound {
        reference: String,
        path: PathBuf,
        reason: String,
    },

    #[error("image {reference} is in use by {leases} sandbox(es); remove it once they are gone")]
    ImageInUse { reference: String, leases: usize },

    #[error("image {reference} is not in the image cache")]
    NotCached { reference: String },

    #[error("image {reference}: cannot build its root disk: {source}")]
    Conversion {
        reference: String,
        #[source]
        source: Box<ImageError>,
    },

    #[error("{what} {path}: {source}", path = path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn format_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directories (no local image directory is configured)".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ImageError {
    /// The kind of failure, for mapping to status codes.
    pub fn kind(&self) -> ErrorKind {
        use ImageError::*;
        match self {
            InvalidReference { .. } | InvalidArgument(_) => ErrorKind::InvalidArgument,
            ImageNotFound { .. } | TagNotFound { .. } | PlatformNotFound { .. } => {
                ErrorKind::NotFound
            }
            UnsupportedPlatform { .. }
            | UnsupportedMediaType { .. }
            | ToolMissing { .. }
            | CacheBusy { .. } => ErrorKind::FailedPrecondition,
            InvalidLayout { .. }
            | DigestMismatch { .. }
            | DiffIdMismatch { .. }
            | BlobMissing { .. }
            | BlobTooLarge { .. }
            | MalformedBlob { .. }
            | InvalidLayerEntry { .. }
            | InvalidLayer { .. } => ErrorKind::DataLoss,
            // A full cache file system is the host running out of a
            // resource, not a bug.
            Io { source, .. } if is_disk_full(source) => ErrorKind::ResourceExhausted,
            ToolFailed { stderr, .. } if stderr.contains("No space left on device") => {
                ErrorKind::ResourceExhausted
            }
            ToolFailed { .. } | Io { .. } => ErrorKind::Internal,
            RegistryUnreachable { .. } | RegistryFailed { .. } => ErrorKind::Unavailable,
            AuthFailed { .. } => ErrorKind::Unauthenticated,
            ManifestUnknown { .. } | NotCached { .. } | SourceNotFound { .. } => {
                ErrorKind::NotFound
            }
            BlobVerification { .. } | InvalidArchive { .. } => ErrorKind::DataLoss,
            TooLarge { .. } | UnpackedTooLarge { .. } => ErrorKind::ResourceExhausted,
            ImageInUse { .. } => ErrorKind::FailedPrecondition,
            Conversion { source, .. } => source.kind(),
        }
    }

    /// The innermost error: for [`ImageError::Conversion`], what made the
    /// conversion fail; otherwise the error itself.
    pub fn cause(&self) -> &ImageError {
        match self {
            ImageError::Conversion { source, .. } => source.cause(),
            other => other,
        }
    }

    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}

/// Adds "what, where" context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &std::path::Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: &str, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(what, path, e))
    }
}

/// ENOSPC or EDQUOT: the file system (or the quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
    ) || e.kind() == std::io::ErrorKind::StorageFull
}
