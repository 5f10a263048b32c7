//! The agent's error type and its mapping to gRPC status codes.

use somna_images::is_disk_full;
use tonic::{Code, Status};

use crate::accel::AccelError;
use crate::vmm::VmmError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("sandbox {id} is {state}{detail}")]
    NotRunning {
        id: String,
        state: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Image(#[from] somna_images::ImageError),
    #[error(
        "sandbox {id} did not boot: {reason}\n--- last lines of the guest console ---\n{console}"
    )]
    BootFailed {
        id: String,
        reason: String,
        console: String,
    },
    #[error("cannot start the VM of sandbox {id}: {source}")]
    Vmm { id: String, source: VmmError },
    #[error(
        "cannot put sandbox {id} to sleep, so it keeps running: {reason}{}",
        if *disk_full { " (the host's disk is full; the partial snapshot was removed)" } else { "" }
    )]
    SleepFailed {
        id: String,
        reason: String,
        disk_full: bool,
    },
    #[error(
        "cannot allocate the {memory_mib} MiB memory file of sandbox {id}: {source}{}",
        if is_disk_full(source) { " (the host's disk is full; free space in the agent's data directory or ask for less memory)" } else { "" }
    )]
    MemoryFile {
        id: String,
        memory_mib: u32,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("agent configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Snapshot(#[from] somna_snapshotter::SnapshotError),
    /// What was asked for is not ready on this host (e.g. no warm-pool VM).
    #[error("{0}")]
    NotReady(String),
    /// Sandbox networking (netd), with the status its kind maps onto.
    #[error("{0}")]
    Network(String, somna_netd::ErrorKind),
    /// An error status from the guest agent, passed on unchanged.
    #[error("{}", .0.message())]
    Guest(Status),
}

impl AgentError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    /// The gRPC status clients should see.
    pub fn to_status(&self) -> Status {
        let code = match self {
            AgentError::SandboxNotFound(_) => Code::NotFound,
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::NotRunning { .. } => Code::FailedPrecondition,
            AgentError::Image(e) => image_code(e),
            AgentError::BootFailed { .. } => Code::Internal,
            AgentError::SleepFailed {
                disk_full: true, ..
            } => Code::ResourceExhausted,
            AgentError::SleepFailed { .. } => Code::Internal,
            AgentError::MemoryFile { source, .. } if is_disk_full(source) => {
                Code::ResourceExhausted
            }
            AgentError::MemoryFile { .. } => Code::Internal,
            AgentError::Vmm { .. } | AgentError::Io { .. } | AgentError::Config(_) => {
                Code::Internal
            }
            AgentError::Accel(_) => Code::FailedPrecondition,
            AgentError::Snapshot(_) => Code::DataLoss,
            AgentError::NotReady(_) => Code::FailedPrecondition,
            AgentError::Network(_, kind) => crate::network::code(*kind),
            AgentError::Guest(s) => return s.clone(),
        };
        Status::new(code, self.to_string())
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        e.to_status()
    }
}

fn image_code(e: &somna_images::ImageError) -> Code {
    use somna_images::ErrorKind as K;
    match e.kind() {
        K::InvalidArgument => Code::InvalidArgument,
        K::NotFound => Code::NotFound,
        K::FailedPrecondition => Code::FailedPrecondition,
        K::DataLoss => Code::DataLoss,
        K::Unavailable => Code::Unavailable,
        K::Unauthenticated => Code::Unauthenticated,
        K::ResourceExhausted => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}
