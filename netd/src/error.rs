//! The crate's error type. [`NetError::kind`] maps every error onto the API
//! status the caller should return (`INVALID_ARGUMENT`, ...).

/// How a caller should surface a [`NetError`] (gRPC status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: an invalid CIDR, conflicting rules, a bad configuration.
    /// [`NetError::field`] names the offending field.
    InvalidArgument,
    /// The host cannot provide isolated networking (no eBPF, missing
    /// capability or tool). Not retryable without fixing the host.
    FailedPrecondition,
    /// Every slot of the host subnet is in use.
    ResourceExhausted,
    /// The slot is unknown or not claimed.
    NotFound,
    /// Something failed on the host (a command, a syscall, a map update).
    Internal,
}

/// Errors of somna-netd. Every message says what failed and, where there is
/// one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad input, naming the field (e.g. `allow_out`).
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// The host cannot enforce sandbox network isolation.
    #[error("sandbox network isolation is unavailable on this host: {0}")]
    Unsupported(String),
    #[error(
        "no free network slot: all {0} slots of the host subnet are in use (configure a larger host subnet)"
    )]
    Exhausted(usize),
    #[error(
        "network slot {0} is not claimed (unknown, already released, or from before a restart)"
    )]
    UnknownSlot(u32),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An external command (`ip`, `nft`, `conntrack`) failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// A BPF syscall (load, attach, map update) failed.
    #[error("eBPF: {context}: {detail}")]
    Bpf { context: String, detail: String },
    #[error("netd has been shut down")]
    ShutDown,
}

impl NetError {
    /// The API status to map this error onto.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NetError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            NetError::Unsupported(_) => ErrorKind::FailedPrecondition,
            NetError::Exhausted(_) => ErrorKind::ResourceExhausted,
            NetError::UnknownSlot(_) => ErrorKind::NotFound,
            NetError::ShutDown => ErrorKind::FailedPrecondition,
            NetError::Io { .. } | NetError::Command { .. } | NetError::Bpf { .. } => {
                ErrorKind::Internal
            }
        }
    }

    /// The request field an `InvalidArgument` error is about.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            NetError::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        NetError::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NetError::Io {
            context: context.into(),
            source,
        }
    }

    /// A BPF failure with the whole error chain (aya puts the verifier log
    /// and the errno in the sources).
    pub(crate) fn bpf(context: impl Into<String>, err: &dyn std::error::Error) -> Self {
        NetError::Bpf {
            context: context.into(),
            detail: chain(err),
        }
    }
}

/// `err: source: source...`
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;
