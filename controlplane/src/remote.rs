//! The host protocol (`somna.host.v1.HostAgent`) on both ends: [`RemoteHost`]
//! is the control plane's [`Host`] for an agent reached over the network,
//! and [`host_agent_service`] serves any [`Host`] (the agent's local one)
//! to the control plane.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use somna_proto::host::v1::host_agent_client::HostAgentClient;
use somna_proto::host::v1::host_agent_server::{HostAgent, HostAgentServer};
use somna_proto::host::v1::{CreateOnHostRequest, InfoRequest};
use somna_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::host::{Host, PortStream, StatusStream};
use crate::service::split_first;

mod port_relay;

/// A host agent reached over its tunnel.
#[derive(Clone)]
pub struct RemoteHost {
    id: String,
    client: HostAgentClient<Channel>,
}

impl RemoteHost {
    pub fn new(id: String, channel: Channel) -> Self {
        RemoteHost {
            id,
            client: HostAgentClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        }
    }

    fn rpc(&self) -> HostAgentClient<Channel> {
        self.client.clone()
    }
}

/// `first` followed by `rest`, as a concrete stream type. (Passing a
/// combinator chain over a boxed stream to a generated client trips a
/// compiler limitation with higher-ranked lifetimes in async traits.)
fn relay<T: Send + 'static>(
    first: T,
    mut rest: BoxStream<'static, T>,
) -> tokio_stream::wrappers::ReceiverStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        while let Some(item) = rest.next().await {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl Host for RemoteHost {
    fn id(&self) -> &str {
        &self.id
    }

    async fn create_sandbox(
        &self,
        id: &str,
        spec: CreateSandboxRequest,
    ) -> Result<Sandbox, Status> {
        let req = CreateOnHostRequest {
            sandbox_id: id.to_string(),
            spec: Some(spec),
        };
        Ok(self.rpc().create_sandbox(req).await?.into_inner())
    }

    async fn get_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        Ok(self
            .rpc()
            .get_sandbox(GetSandboxRequest { id: id.into() })
            .await?
            .into_inner())
    }

    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, Status> {
        Ok(self
            .rpc()
            .list_sandboxes(ListSandboxesRequest::default())
            .await?
            .into_inner()
            .sandboxes)
    }

    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status> {
        self.rpc()
            .destroy_sandbox(DestroySandboxRequest { id: id.into() })
            .await?;
        Ok(())
    }

    async fn sleep_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        Ok(self
            .rpc()
            .sleep_sandbox(SleepSandboxRequest { id: id.into() })
            .await?
            .into_inner())
    }

    async fn wake_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        Ok(self
            .rpc()
            .wake_sandbox(WakeSandboxRequest { id: id.into() })
            .await?
            .into_inner())
    }

    async fn update_network(&self, id: &str, policy: NetworkPolicy) -> Result<Sandbox, Status> {
        Ok(self
            .rpc()
            .update_sandbox_network(UpdateSandboxNetworkRequest {
                id: id.into(),
                policy: Some(policy),
            })
            .await?
            .into_inner())
    }

    async fn info(&self) -> Result<somna_proto::v1::Host, Status> {
        Ok(self.rpc().info(InfoRequest {}).await?.into_inner())
    }

    async fn pull_image(&self, reference: String) -> Result<StatusStream<PullImageEvent>, Status> {
        Ok(self
            .rpc()
            .pull_image(PullImageRequest { reference })
            .await?
            .into_inner()
            .boxed())
    }

    async fn list_images(&self) -> Result<ListImagesResponse, Status> {
        Ok(self
            .rpc()
            .list_images(ListImagesRequest {})
            .await?
            .into_inner())
    }

    async fn remove_image(&self, reference: &str) -> Result<RemoveImageResponse, Status> {
        let req = RemoveImageRequest {
            reference: reference.into(),
        };
        Ok(self.rpc().remove_image(req).await?.into_inner())
    }

    async fn exec(
        &self,
        start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, Status> {
        let first = ExecRequest {
            msg: Some(exec_request::Msg::Start(start)),
        };
        Ok(self
            .rpc()
            .exec(relay(first, rest))
            .await?
            .into_inner()
            .boxed())
    }

    async fn read_file(&self, req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status> {
        Ok(self.rpc().read_file(req).await?.into_inner().boxed())
    }

    async fn connect_port(&self, id: &str, port: u16) -> Result<PortStream, Status> {
        port_relay::dial(self.rpc(), id, port, false).await
    }

    async fn health_connect(&self, id: &str, port: u16) -> Result<Option<PortStream>, Status> {
        match port_relay::dial(self.rpc(), id, port, true).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if port_relay::is_not_running(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn write_file(
        &self,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, Status> {
        let first = WriteFileRequest {
            msg: Some(write_file_request::Msg::Start(start)),
        };
        Ok(self
            .rpc()
            .write_file(relay(first, rest))
            .await?
            .into_inner())
    }

    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status> {
        Ok(self.rpc().stat_file(req).await?.into_inner())
    }

    async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesResponse, Status> {
        Ok(self.rpc().list_files(req).await?.into_inner())
    }

    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status> {
        Ok(self.rpc().make_dir(req).await?.into_inner())
    }

    async fn remove_file(&self, req: RemoveFileRequest) -> Result<(), Status> {
        self.rpc().remove_file(req).await?;
        Ok(())
    }

    async fn rename_file(&self, req: RenameFileRequest) -> Result<(), Status> {
        self.rpc().rename_file(req).await?;
        Ok(())
    }
}

/// Serves `host` as `somna.host.v1.HostAgent`.
pub fn host_agent_service(host: Arc<dyn Host>) -> HostAgentServer<HostAdapter> {
    HostAgentServer::new(HostAdapter { host })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

pub struct HostAdapter {
    host: Arc<dyn Host>,
}

#[tonic::async_trait]
impl HostAgent for HostAdapter {
    async fn create_sandbox(
        &self,
        r: Request<CreateOnHostRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let r = r.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        Ok(Response::new(
            self.host.create_sandbox(&r.sandbox_id, spec).await?,
        ))
    }

    async fn get_sandbox(
        &self,
        r: Request<GetSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        Ok(Response::new(
            self.host.get_sandbox(&r.into_inner().id).await?,
        ))
    }

    async fn list_sandboxes(
        &self,
        _r: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.host.list_sandboxes().await?,
            next_page_token: String::new(),
        }))
    }

    async fn destroy_sandbox(
        &self,
        r: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        self.host.destroy_sandbox(&r.into_inner().id).await?;
        Ok(Response::new(DestroySandboxResponse {}))
    }

    async fn sleep_sandbox(
        &self,
        r: Request<SleepSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        Ok(Response::new(
            self.host.sleep_sandbox(&r.into_inner().id).await?,
        ))
    }

    async fn wake_sandbox(
        &self,
        r: Request<WakeSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        Ok(Response::new(
            self.host.wake_sandbox(&r.into_inner().id).await?,
        ))
    }

    async fn update_sandbox_network(
        &self,
        r: Request<UpdateSandboxNetworkRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let r = r.into_inner();
        Ok(Response::new(
            self.host
                .update_network(&r.id, r.policy.unwrap_or_default())
                .await?,
        ))
    }

    async fn info(
        &self,
        _r: Request<InfoRequest>,
    ) -> Result<Response<somna_proto::v1::Host>, Status> {
        Ok(Response::new(self.host.info().await?))
    }

    type ExecStream = StatusStream<ExecResponse>;

    async fn exec(
        &self,
        r: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let (start, rest) = split_first(r.into_inner(), "exec", |m: ExecRequest| match m.msg {
            Some(exec_request::Msg::Start(s)) => Some(s),
            _ => None,
        })
        .await?;
        Ok(Response::new(self.host.exec(start, rest).await?))
    }

    type ConnectPortStream = StatusStream<somna_proto::host::v1::PortData>;

    async fn connect_port(
        &self,
        r: Request<Streaming<somna_proto::host::v1::PortData>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        Ok(Response::new(
            port_relay::serve(self.host.as_ref(), r.into_inner()).await?,
        ))
    }

    type ReadFileStream = StatusStream<FileChunk>;

    async fn read_file(
        &self,
        r: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        Ok(Response::new(self.host.read_file(r.into_inner()).await?))
    }

    async fn write_file(
        &self,
        r: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let (start, rest) = split_first(
            r.into_inner(),
            "write_file",
            |m: WriteFileRequest| match m.msg {
                Some(write_file_request::Msg::Start(s)) => Some(s),
                _ => None,
            },
        )
        .await?;
        Ok(Response::new(self.host.write_file(start, rest).await?))
    }

    async fn stat_file(&self, r: Request<StatFileRequest>) -> Result<Response<FileInfo>, Status> {
        Ok(Response::new(self.host.stat_file(r.into_inner()).await?))
    }

    async fn list_files(
        &self,
        r: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        Ok(Response::new(self.host.list_files(r.into_inner()).await?))
    }

    async fn make_dir(&self, r: Request<MakeDirRequest>) -> Result<Response<FileInfo>, Status> {
        Ok(Response::new(self.host.make_dir(r.into_inner()).await?))
    }

    async fn remove_file(
        &self,
        r: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        self.host.remove_file(r.into_inner()).await?;
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn rename_file(
        &self,
        r: Request<RenameFileRequest>,
    ) -> Result<Response<RenameFileResponse>, Status> {
        self.host.rename_file(r.into_inner()).await?;
        Ok(Response::new(RenameFileResponse {}))
    }

    type PullImageStream = StatusStream<PullImageEvent>;

    async fn pull_image(
        &self,
        r: Request<PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        Ok(Response::new(
            self.host.pull_image(r.into_inner().reference).await?,
        ))
    }

    async fn list_images(
        &self,
        _r: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        Ok(Response::new(self.host.list_images().await?))
    }

    async fn remove_image(
        &self,
        r: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        Ok(Response::new(
            self.host.remove_image(&r.into_inner().reference).await?,
        ))
    }
}
