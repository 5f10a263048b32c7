//! Errors of the Cloud Hypervisor driver. Each names the binary and, where
//! there is one, the API call, so an operator can tell which VMM said what.

use std::path::PathBuf;
use std::time::Duration;

use crate::vmm::VmExit;

use super::version::MIN_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// The configured binary cannot be used at all.
    #[error(
        "cloud-hypervisor binary {binary} {problem}; install Cloud Hypervisor v{MIN_VERSION} or newer and point the agent at it"
    )]
    Binary { binary: PathBuf, problem: String },

    #[error("cannot start cloud-hypervisor {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "cloud-hypervisor {binary} did not open its API socket {socket} within {waited:?}{}",
        said(log)
    )]
    SocketTimeout {
        binary: PathBuf,
        socket: PathBuf,
        waited: Duration,
        log: String,
    },

    /// The VMM process ended while we needed it.
    #[error("cloud-hypervisor {binary} {exit} during {call}{}", said(log))]
    Exited {
        binary: PathBuf,
        exit: VmExit,
        call: String,
        log: String,
    },

    /// The API answered with an error status.
    #[error("cloud-hypervisor {binary}: {call} failed with HTTP {status}: {message}")]
    Api {
        binary: PathBuf,
        call: String,
        status: u16,
        message: String,
    },

    /// The request did not get an answer (socket, HTTP).
    #[error("cloud-hypervisor {binary}: {call}: {reason}")]
    Transport {
        binary: PathBuf,
        call: String,
        reason: String,
    },

    #[error("cloud-hypervisor {binary}: {call} did not answer within {after:?}")]
    Timeout {
        binary: PathBuf,
        call: String,
        after: Duration,
    },

    /// An answer that does not match the API contract.
    #[error("cloud-hypervisor {binary}: {call} answered unexpectedly: {reason}")]
    BadResponse {
        binary: PathBuf,
        call: String,
        reason: String,
    },

    #[error(
        "cloud-hypervisor {binary} is version {found}; Somna needs v{MIN_VERSION} or newer: {why}"
    )]
    UnsupportedVersion {
        binary: PathBuf,
        found: String,
        why: &'static str,
    },

    /// A snapshot that cannot be restored as the VM asks.
    #[error("cloud-hypervisor snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },

    /// Every memory restore mode was tried and failed.
    #[error(
        "cloud-hypervisor {binary}: vm.restore from {source_dir} failed in every memory restore mode: {attempts}"
    )]
    RestoreFailed {
        binary: PathBuf,
        source_dir: PathBuf,
        attempts: String,
    },

    /// Asked for something this driver does not do.
    #[error("cloud-hypervisor {binary}: {what}")]
    Unsupported { binary: PathBuf, what: String },

    /// The jail for a VMM process could not be prepared.
    #[error("cloud-hypervisor {binary}: {source}")]
    Jail {
        binary: PathBuf,
        source: crate::jail::JailError,
    },

    /// The VM's TAP could not be opened in its network slot.
    #[error("{what}")]
    Tap { what: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl ChError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChError {
        let what = what.into();
        move |source| ChError::Io { what, source }
    }

    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ChError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `; it said: <log>` when the VMM printed something.
fn said(log: &str) -> String {
    let log = log.trim();
    if log.is_empty() {
        String::new()
    } else {
        format!("; it said: {log}")
    }
}
