//! The public `somna.v1.Sandboxes` gRPC service.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::BoxStream;
use somna_proto::v1::sandboxes_server::Sandboxes;
use somna_proto::v1::{
    CreateSandboxRequest, DestroySandboxRequest, DestroySandboxResponse, ExecRequest, ExecResponse,
    FileChunk, FileInfo, GetSandboxRequest, ListFilesRequest, ListFilesResponse,
    ListSandboxesRequest, ListSandboxesResponse, MakeDirRequest, ReadFileRequest,
    RemoveFileRequest, RemoveFileResponse, RenameFileRequest, RenameFileResponse, Sandbox,
    SleepSandboxRequest, StatFileRequest, WakeSandboxRequest, WriteFileRequest, WriteFileResponse,
    exec_request, write_file_request,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::host::{Host, StatusStream};
use crate::registry::{MAX_TIMEOUT, Registry};

/// The control plane. Clone it freely; clones share state.
#[derive(Clone)]
pub struct ControlPlane {
    registry: Arc<Registry>,
}

impl ControlPlane {
    pub fn new(hosts: Vec<Arc<dyn Host>>) -> Self {
        ControlPlane {
            registry: Arc::new(Registry::new(hosts)),
        }
    }

    /// The images service, ready to add to a server.
    pub fn images_service(&self) -> somna_proto::v1::images_server::ImagesServer<ControlPlane> {
        somna_proto::v1::images_server::ImagesServer::new(self.clone())
    }

    /// The host that serves image calls (images are cached per host; with
    /// one host that is the host).
    fn image_host(&self) -> Result<Arc<dyn Host>, Status> {
        self.registry
            .place()
            .ok_or_else(|| Status::unavailable("no host agent is registered"))
    }

    /// The hosts service, ready to add to a server.
    pub fn hosts_service(&self) -> somna_proto::v1::hosts_server::HostsServer<ControlPlane> {
        somna_proto::v1::hosts_server::HostsServer::new(self.clone())
    }

    /// The tonic service, ready to add to a server.
    pub fn service(&self) -> somna_proto::v1::sandboxes_server::SandboxesServer<ControlPlane> {
        somna_proto::v1::sandboxes_server::SandboxesServer::new(self.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    fn host_of(&self, id: &str) -> Result<Arc<dyn Host>, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("sandbox_id is required"));
        }
        self.registry
            .host_of(id)
            .ok_or_else(|| Status::not_found(format!("sandbox {id} not found")))
    }

    fn with_expiry(&self, mut sandbox: Sandbox) -> Sandbox {
        sandbox.expires_at = self
            .registry
            .expires_at(&sandbox.id)
            .map(prost_types::Timestamp::from);
        sandbox
    }

    /// Destroys a sandbox and forgets it.
    async fn destroy(&self, id: &str, from_timer: bool) -> Result<(), Status> {
        let host = self.host_of(id)?;
        host.destroy_sandbox(id).await?;
        self.registry.remove(id, !from_timer);
        Ok(())
    }

    /// Arms the timer that destroys `id` after `timeout`.
    fn arm_timeout(&self, id: &str, timeout: Duration) -> tokio::task::AbortHandle {
        let cp = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            match cp.destroy(&id, true).await {
                Ok(()) => {
                    info!(%id, timeout_s = timeout.as_secs(), "sandbox timed out and was destroyed")
                }
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => warn!(%id, error = %e.message(), "destroying a timed-out sandbox failed"),
            }
        })
        .abort_handle()
    }

    /// Destroys every sandbox on every host (shutdown of `somna up`).
    pub async fn destroy_all(&self) {
        for host in self.registry.hosts() {
            let Ok(list) = host.list_sandboxes().await else {
                continue;
            };
            for sb in list {
                if let Err(e) = self.destroy(&sb.id, false).await {
                    warn!(id = %sb.id, error = %e.message(), "destroy at shutdown failed");
                }
            }
        }
    }
}

/// Takes the first message of a client stream, which must be of the
/// variant `pick` accepts; the rest of the stream ends at the first error.
async fn split_first<M: Send + 'static, F: Send + 'static>(
    mut stream: Streaming<M>,
    what: &str,
    pick: impl FnOnce(M) -> Option<F>,
) -> Result<(F, BoxStream<'static, M>), Status> {
    let first = stream.message().await?.ok_or_else(|| {
        Status::invalid_argument(format!(
            "{what} stream is empty; send the start message first"
        ))
    })?;
    let start = pick(first).ok_or_else(|| {
        Status::invalid_argument(format!("the first {what} message must be start"))
    })?;
    let rest = stream
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()))
        .boxed();
    Ok((start, rest))
}

#[tonic::async_trait]
impl Sandboxes for ControlPlane {
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let req = request.into_inner();
        if req.image.trim().is_empty() {
            return Err(Status::invalid_argument(
                "image is required (e.g. \"busybox\")",
            ));
        }
        let timeout = Duration::from_secs(req.timeout_seconds);
        if timeout > MAX_TIMEOUT {
            return Err(Status::invalid_argument(format!(
                "timeout_seconds={} is more than the maximum {}",
                req.timeout_seconds,
                MAX_TIMEOUT.as_secs()
            )));
        }
        let host = self
            .registry
            .place()
            .ok_or_else(|| Status::unavailable("no host agent is registered"))?;
        let sandbox = host.create_sandbox(req).await?;
        let (expires_at, timer) = if timeout.is_zero() {
            (None, None)
        } else {
            (
                Some(SystemTime::now() + timeout),
                Some(self.arm_timeout(&sandbox.id, timeout)),
            )
        };
        self.registry
            .insert(sandbox.id.clone(), host, expires_at, timer);
        Ok(Response::new(self.with_expiry(sandbox)))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let id = request.into_inner().id;
        let host = self.host_of(&id)?;
        Ok(Response::new(
            self.with_expiry(host.get_sandbox(&id).await?),
        ))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let mut sandboxes = Vec::new();
        for host in self.registry.hosts() {
            sandboxes.extend(
                host.list_sandboxes()
                    .await?
                    .into_iter()
                    .map(|s| self.with_expiry(s)),
            );
        }
        Ok(Response::new(ListSandboxesResponse { sandboxes }))
    }

    async fn sleep_sandbox(
        &self,
        request: Request<SleepSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let id = request.into_inner().id;
        let host = self.host_of(&id)?;
        Ok(Response::new(
            self.with_expiry(host.sleep_sandbox(&id).await?),
        ))
    }

    async fn wake_sandbox(
        &self,
        request: Request<WakeSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let id = request.into_inner().id;
        let host = self.host_of(&id)?;
        Ok(Response::new(
            self.with_expiry(host.wake_sandbox(&id).await?),
        ))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        self.destroy(&request.into_inner().id, false).await?;
        Ok(Response::new(DestroySandboxResponse {}))
    }

    type ExecStream = StatusStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let (start, rest) =
            split_first(request.into_inner(), "exec", |m: ExecRequest| match m.msg {
                Some(exec_request::Msg::Start(s)) => Some(s),
                _ => None,
            })
            .await?;
        let host = self.host_of(&start.sandbox_id)?;
        Ok(Response::new(host.exec(start, rest).await?))
    }

    type ReadFileStream = StatusStream<FileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let req = request.into_inner();
        let host = self.host_of(&req.sandbox_id)?;
        Ok(Response::new(host.read_file(req).await?))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let (start, rest) = split_first(
            request.into_inner(),
            "write_file",
            |m: WriteFileRequest| match m.msg {
                Some(write_file_request::Msg::Start(s)) => Some(s),
                _ => None,
            },
        )
        .await?;
        let host = self.host_of(&start.sandbox_id)?;
        Ok(Response::new(host.write_file(start, rest).await?))
    }

    async fn stat_file(
        &self,
        request: Request<StatFileRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.host_of(&req.sandbox_id)?.stat_file(req).await?,
        ))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.host_of(&req.sandbox_id)?.list_files(req).await?,
        ))
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.host_of(&req.sandbox_id)?.make_dir(req).await?,
        ))
    }

    async fn remove_file(
        &self,
        request: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        let req = request.into_inner();
        self.host_of(&req.sandbox_id)?.remove_file(req).await?;
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn rename_file(
        &self,
        request: Request<RenameFileRequest>,
    ) -> Result<Response<RenameFileResponse>, Status> {
        let req = request.into_inner();
        self.host_of(&req.sandbox_id)?.rename_file(req).await?;
        Ok(Response::new(RenameFileResponse {}))
    }
}

#[tonic::async_trait]
impl somna_proto::v1::hosts_server::Hosts for ControlPlane {
    async fn list_hosts(
        &self,
        _request: Request<somna_proto::v1::ListHostsRequest>,
    ) -> Result<Response<somna_proto::v1::ListHostsResponse>, Status> {
        let mut hosts = Vec::new();
        for host in self.registry.hosts() {
            hosts.push(host.info().await?);
        }
        Ok(Response::new(somna_proto::v1::ListHostsResponse { hosts }))
    }
}

#[tonic::async_trait]
impl somna_proto::v1::images_server::Images for ControlPlane {
    type PullImageStream = StatusStream<somna_proto::v1::PullImageEvent>;

    async fn pull_image(
        &self,
        request: Request<somna_proto::v1::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let reference = request.into_inner().reference;
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference is required (e.g. \"busybox\")",
            ));
        }
        Ok(Response::new(
            self.image_host()?.pull_image(reference).await?,
        ))
    }

    async fn list_images(
        &self,
        _request: Request<somna_proto::v1::ListImagesRequest>,
    ) -> Result<Response<somna_proto::v1::ListImagesResponse>, Status> {
        Ok(Response::new(self.image_host()?.list_images().await?))
    }

    async fn remove_image(
        &self,
        request: Request<somna_proto::v1::RemoveImageRequest>,
    ) -> Result<Response<somna_proto::v1::RemoveImageResponse>, Status> {
        let reference = request.into_inner().reference;
        Ok(Response::new(
            self.image_host()?.remove_image(&reference).await?,
        ))
    }
}
