//! SDK errors, one variant per API status that callers handle differently.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot connect to Somna at {addr}: {reason}; is `somna up` running? (set SOMNA_ADDR to its address)"
    )]
    Connect { addr: String, reason: String },
    #[error("invalid Somna address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Any other status from the server.
    #[error("{message} ({code:?})")]
    Api { code: Code, message: String },
    /// The server broke the protocol (e.g. an exec stream without an exit).
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    /// The gRPC code this error stands for, if it came from the API.
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Api { code, .. } => *code,
            _ => return None,
        })
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let m = s.message().to_string();
        match s.code() {
            Code::NotFound => Error::NotFound(m),
            Code::InvalidArgument => Error::InvalidArgument(m),
            Code::AlreadyExists => Error::AlreadyExists(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::PermissionDenied => Error::PermissionDenied(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::Unavailable => Error::Unavailable(m),
            Code::DeadlineExceeded => Error::DeadlineExceeded(m),
            code => Error::Api { code, message: m },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
