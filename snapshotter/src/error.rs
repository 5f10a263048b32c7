//! Snapshot errors: each names the file and what is wrong with it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot part {what} is missing")]
    Missing { what: PathBuf },
    #[error("snapshot part {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot in {dir} is not usable: {reason}")]
    Invalid { dir: PathBuf, reason: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { what, path, source }
    }
}
