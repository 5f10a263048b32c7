//! The `somna.guest.v1.GuestAgent` service: maps RPCs onto [`exec`] and
//! [`files`], plus health and shutdown.

use std::sync::Arc;
use std::time::Duration;

use somna_proto::guest::v1::guest_agent_server::{GuestAgent, GuestAgentServer};
use somna_proto::guest::v1::{
    HealthRequest, HealthResponse, ShutdownRequest, ShutdownResponse, WakeRequest, WakeResponse,
};
use somna_proto::v1::write_file_request::Msg as WriteMsgProto;
use somna_proto::v1::{
    ExecRequest, FileChunk, FileInfo, ListFilesRequest, ListFilesResponse, MakeDirRequest,
    ReadFileRequest, RemoveFileRequest, RemoveFileResponse, RenameFileRequest, RenameFileResponse,
    StatFileRequest, WriteFileRequest, WriteFileResponse,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::exec::{self, ExecEnv, ExecStream};
use crate::files::{self, FsError, Root, WriteMsg};
use crate::identity;
use crate::wake::Waker;

/// The tonic service as served on every channel.
pub type AgentService = GuestAgentServer<Agent>;

/// Largest message the agent accepts (WriteFile chunks, stdin).
const MAX_MESSAGE: usize = 16 << 20;

/// What Shutdown does.
pub enum OnShutdown {
    /// PID 1: end every process, sync, power the VM off.
    PowerOff,
    /// Dev mode: stop serving (the notified main loop exits).
    Stop(Arc<Notify>),
}

pub struct Agent {
    exec: ExecEnv,
    on_shutdown: OnShutdown,
    waker: Arc<Waker>,
}

impl Agent {
    /// `vm`: the agent is PID 1 of a VM (Wake sets the clock and hostname).
    pub fn new(exec: ExecEnv, on_shutdown: OnShutdown, vm: bool) -> Agent {
        Agent {
            exec,
            on_shutdown,
            waker: Arc::new(Waker::new(vm)),
        }
    }

    pub fn into_service(self) -> AgentService {
        GuestAgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn root(&self) -> Arc<Root> {
        self.exec.root.clone()
    }

    fn check_sandbox(&self, id: &str) -> Result<(), Status> {
        self.exec.identity.check(id)
    }
}

/// Runs a blocking files operation on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("file operation task failed: {e}"))),
    }
}

#[tonic::async_trait]
impl GuestAgent for Agent {
    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let uptime_ms = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
            .unwrap_or(0);
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let root = self.root();
        let machine_id = tokio::task::spawn_blocking(move || identity::read_machine_id(&root))
            .await
            .unwrap_or_default();
        let id = self.exec.identity.get();
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            sandbox_id: id.sandbox_id,
            hostname: id.hostname,
            uptime_ms,
            kernel,
            machine_id,
            wake_count: self.waker.count(),
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        exec::exec(&self.exec, request.into_inner())
            .await
            .map(Response::new)
    }

    type ReadFileStream = ReceiverStream<Result<FileChunk, Status>>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        let path = req.path.clone();
        let file = blocking(move || files::open_read(&root, &path)).await?;
        // A few chunks in flight: the reader waits for the client beyond that.
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            files::stream_file(file, &req.path, req.offset, req.length, tx)
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let mut stream = request.into_inner();
        let start = match stream.message().await? {
            Some(WriteFileRequest {
                msg: Some(WriteMsgProto::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "the first WriteFile message must be `start`",
                ));
            }
        };
        self.check_sandbox(&start.sandbox_id)?;
        let root = self.root();
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::task::spawn_blocking(move || files::write_file(&root, &start, rx));
        let mut failure = None;
        loop {
            match stream.message().await {
                Ok(Some(WriteFileRequest {
                    msg: Some(WriteMsgProto::Data(data)),
                })) => {
                    // The writer stopped early (it failed): its error is
                    // the answer.
                    if tx.send(WriteMsg::Data(data)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {
                    failure = Some(Status::invalid_argument(
                        "WriteFile: `start` may only be the first message",
                    ));
                    break;
                }
                Ok(None) => {
                    let _ = tx.send(WriteMsg::Commit).await;
                    break;
                }
                Err(status) => {
                    failure = Some(status);
                    break;
                }
            }
        }
        // Without a Commit the writer discards its temp file.
        drop(tx);
        let result = writer
            .await
            .map_err(|e| Status::internal(format!("write task failed: {e}")))?;
        if let Some(status) = failure {
            return Err(status);
        }
        Ok(Response::new(WriteFileResponse {
            file: Some(result?),
        }))
    }

    async fn stat_file(
        &self,
        request: Request<StatFileRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        blocking(move || files::stat(&root, &req.path))
            .await
            .map(Response::new)
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        let entries = blocking(move || files::list(&root, &req.path)).await?;
        Ok(Response::new(ListFilesResponse { entries }))
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        blocking(move || files::make_dir(&root, &req.path, req.mode, req.parents))
            .await
            .map(Response::new)
    }

    async fn remove_file(
        &self,
        request: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        blocking(move || files::remove(&root, &req.path, req.recursive)).await?;
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn rename_file(
        &self,
        request: Request<RenameFileRequest>,
    ) -> Result<Response<RenameFileResponse>, Status> {
        let req = request.into_inner();
        self.check_sandbox(&req.sandbox_id)?;
        let root = self.root();
        blocking(move || files::rename(&root, &req.from, &req.to)).await?;
        Ok(Response::new(RenameFileResponse {}))
    }

    async fn wake(&self, request: Request<WakeRequest>) -> Result<Response<WakeResponse>, Status> {
        self.waker
            .wake(&self.exec, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn shutdown(
        &self,
        _request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        match &self.on_shutdown {
            OnShutdown::PowerOff => {
                tokio::spawn(async {
                    // Let the response reach the host before anything stops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    crate::init::shutdown_vm().await;
                });
            }
            OnShutdown::Stop(notify) => notify.notify_one(),
        }
        Ok(Response::new(ShutdownResponse {}))
    }
}
