//! Plugs the host agent running in this process into the control plane
//! (`somna up`): each `Host` call becomes a direct call on the agent or its
//! guest client, with no network hop in between.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use somna_controlplane::{Host, StatusStream};
use somna_hypervisor_agent::{Agent, SandboxInfo, SandboxRequest, SandboxState};
use somna_proto::v1::{
    self as proto, CreateSandboxRequest, ExecRequest, ExecResponse, ExecStart, FileChunk, FileInfo,
    ListFilesRequest, ListFilesResponse, MakeDirRequest, ReadFileRequest, RemoveFileRequest,
    RenameFileRequest, StatFileRequest, WriteFileRequest, WriteFileResponse, WriteFileStart,
};
use tonic::Status;

pub struct LocalHost {
    agent: Arc<Agent>,
}

impl LocalHost {
    pub fn new(agent: Arc<Agent>) -> Self {
        LocalHost { agent }
    }

    fn to_proto(&self, info: SandboxInfo) -> proto::Sandbox {
        let state = match info.state {
            SandboxState::Creating => proto::SandboxState::Creating,
            SandboxState::Running => proto::SandboxState::Running,
            SandboxState::Failed => proto::SandboxState::Failed,
            SandboxState::Destroying => proto::SandboxState::Destroying,
        };
        proto::Sandbox {
            id: info.id,
            image: info.image,
            image_digest: info.image_digest,
            state: state as i32,
            cpus: info.cpus,
            memory_mib: info.memory_mib,
            disk_mib: info.disk_mib,
            env: info.env.into_iter().collect(),
            created_at: Some(info.created_at.into()),
            expires_at: None,
            host: self.agent.host_id().to_string(),
            accelerator: info.accelerator.to_string(),
            failure: info.failure.unwrap_or_default(),
            boot_ms: info.boot_ms,
        }
    }
}

#[async_trait]
impl Host for LocalHost {
    fn id(&self) -> &str {
        self.agent.host_id()
    }

    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<proto::Sandbox, Status> {
        let info = self
            .agent
            .create_sandbox(SandboxRequest {
                image: req.image,
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                disk_mib: req.disk_mib,
                env: req.env.into_iter().collect(),
            })
            .await?;
        Ok(self.to_proto(info))
    }

    async fn get_sandbox(&self, id: &str) -> Result<proto::Sandbox, Status> {
        Ok(self.to_proto(self.agent.get(id)?))
    }

    async fn list_sandboxes(&self) -> Result<Vec<proto::Sandbox>, Status> {
        Ok(self
            .agent
            .list()
            .into_iter()
            .map(|i| self.to_proto(i))
            .collect())
    }

    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status> {
        Ok(self.agent.destroy(id).await?)
    }

    async fn exec(
        &self,
        mut start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, Status> {
        let mut guest = self.agent.prepare_exec(&mut start)?;
        let first = ExecRequest {
            msg: Some(proto::exec_request::Msg::Start(start)),
        };
        Ok(guest.exec(relay(first, rest)).await?.into_inner().boxed())
    }

    async fn read_file(&self, req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status> {
        let mut guest = self.agent.guest(&req.sandbox_id)?;
        Ok(guest.read_file(req).await?.into_inner().boxed())
    }

    async fn write_file(
        &self,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, Status> {
        let mut guest = self.agent.guest(&start.sandbox_id)?;
        let first = WriteFileRequest {
            msg: Some(proto::write_file_request::Msg::Start(start)),
        };
        Ok(guest.write_file(relay(first, rest)).await?.into_inner())
    }

    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status> {
        Ok(self
            .agent
            .guest(&req.sandbox_id)?
            .stat_file(req)
            .await?
            .into_inner())
    }

    async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesResponse, Status> {
        Ok(self
            .agent
            .guest(&req.sandbox_id)?
            .list_files(req)
            .await?
            .into_inner())
    }

    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status> {
        Ok(self
            .agent
            .guest(&req.sandbox_id)?
            .make_dir(req)
            .await?
            .into_inner())
    }

    async fn remove_file(&self, req: RemoveFileRequest) -> Result<(), Status> {
        self.agent.guest(&req.sandbox_id)?.remove_file(req).await?;
        Ok(())
    }

    async fn rename_file(&self, req: RenameFileRequest) -> Result<(), Status> {
        self.agent.guest(&req.sandbox_id)?.rename_file(req).await?;
        Ok(())
    }
}

/// `first` followed by `rest`, as a concrete stream type. (Passing a
/// combinator chain over a boxed stream to the generated client trips a
/// compiler limitation with higher-ranked lifetimes inside async traits.)
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
