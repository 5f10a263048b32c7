//! The control plane's view of a host agent. `somna up` plugs in the agent
//! running in the same process; remote agents (joining over the network)
//! implement the same trait.
//!
//! Requests and replies are the public `somna.v1` messages, and errors are
//! gRPC statuses, so a remote implementation is a thin relay.

use async_trait::async_trait;
use futures::stream::BoxStream;
use somna_proto::v1::{
    CreateSandboxRequest, ExecRequest, ExecResponse, ExecStart, FileChunk, FileInfo,
    ListFilesRequest, ListFilesResponse, MakeDirRequest, ReadFileRequest, RemoveFileRequest,
    RenameFileRequest, Sandbox, StatFileRequest, WriteFileRequest, WriteFileResponse,
    WriteFileStart,
};
use tonic::Status;

pub type StatusStream<T> = BoxStream<'static, Result<T, Status>>;

/// A byte stream to a TCP port of a sandbox (the ingress's upstream).
pub trait PortIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> PortIo for T {}
pub type PortStream = Box<dyn PortIo>;

#[async_trait]
pub trait Host: Send + Sync + 'static {
    /// The host's name.
    fn id(&self) -> &str;

    /// Boots sandbox `id` (chosen by the control plane); returns once it
    /// accepts exec. The request's `timeout_seconds`, `labels` and
    /// `request_id` are the control plane's business and are ignored.
    async fn create_sandbox(&self, id: &str, req: CreateSandboxRequest) -> Result<Sandbox, Status>;
    async fn get_sandbox(&self, id: &str) -> Result<Sandbox, Status>;
    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, Status>;
    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status>;
    /// Light sleep: snapshot the VM and give its RAM back to the host.
    async fn sleep_sandbox(&self, id: &str) -> Result<Sandbox, Status>;
    async fn wake_sandbox(&self, id: &str) -> Result<Sandbox, Status>;
    /// Replaces the sandbox's network policy (live if its VM runs).
    async fn update_network(
        &self,
        id: &str,
        policy: somna_proto::v1::NetworkPolicy,
    ) -> Result<Sandbox, Status>;
    /// Opens a connection to an exposed TCP `port` of sandbox `id`, waking
    /// it first if it sleeps; the sandbox counts as active while the
    /// connection is open.
    async fn connect_port(&self, id: &str, port: u16) -> Result<PortStream, Status> {
        let _ = (id, port);
        Err(Status::unimplemented(format!(
            "host {} cannot open connections to sandbox ports",
            self.id()
        )))
    }
    /// A health-check connection to an exposed port: not counted as
    /// activity, and None while the sandbox sleeps (it is never woken).
    async fn health_connect(&self, id: &str, port: u16) -> Result<Option<PortStream>, Status> {
        let _ = (id, port);
        Err(Status::unimplemented(format!(
            "host {} cannot health-check sandbox ports",
            self.id()
        )))
    }
    /// The host's state: accelerator, counts, templates, warm pools.
    async fn info(&self) -> Result<somna_proto::v1::Host, Status>;

    /// Pulls and converts an image into the host's cache.
    async fn pull_image(
        &self,
        reference: String,
    ) -> Result<StatusStream<somna_proto::v1::PullImageEvent>, Status>;
    async fn list_images(&self) -> Result<somna_proto::v1::ListImagesResponse, Status>;
    async fn remove_image(
        &self,
        reference: &str,
    ) -> Result<somna_proto::v1::RemoveImageResponse, Status>;

    /// Runs a process: `start` was the first message of the client's
    /// stream, `rest` are the messages after it.
    async fn exec(
        &self,
        start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, Status>;

    async fn read_file(&self, req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status>;
    /// `start` was the first message; `rest` carries the data chunks.
    async fn write_file(
        &self,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, Status>;
    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status>;
    async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesResponse, Status>;
    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status>;
    async fn remove_file(&self, req: RemoveFileRequest) -> Result<(), Status>;
    async fn rename_file(&self, req: RenameFileRequest) -> Result<(), Status>;
}
