//! Plugs the host agent running in this process into the control plane
//! (`somna up`): each `Host` call becomes a direct call on the agent, with
//! no network hop in between.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use somna_controlplane::{Host, PortStream, StatusStream};
use somna_hypervisor_agent::{
    Agent, EgressPolicy, HostInfo, NetworkCounters, SandboxInfo, SandboxRequest, SandboxState,
    StartMode,
};
use somna_images::{ImageSource, PullEvent};
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

    /// Runs a state-changing call to the end even if its caller goes away
    /// (a client that hangs up, a control plane that dies mid-call): cut
    /// short, it would leave a VMM, a run directory or a half-made
    /// snapshot that only the next start-up reconciles.
    async fn detached<T, F>(&self, call: impl FnOnce(Arc<Agent>) -> F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, somna_hypervisor_agent::AgentError>> + Send + 'static,
    {
        tokio::spawn(call(self.agent.clone()))
            .await
            .map_err(|e| Status::internal(format!("the host's call ended abnormally: {e}")))?
            .map_err(Status::from)
    }

    fn to_proto(&self, info: SandboxInfo) -> proto::Sandbox {
        let state = match info.state {
            SandboxState::Creating => proto::SandboxState::Creating,
            SandboxState::Running => proto::SandboxState::Running,
            SandboxState::Sleeping => proto::SandboxState::Sleeping,
            SandboxState::Failed => proto::SandboxState::Failed,
            SandboxState::Destroying => proto::SandboxState::Destroying,
        };
        let exposed_ports = info
            .network_policy
            .as_ref()
            .map(|p| p.exposed_tcp_ports.iter().map(|&p| p as u32).collect())
            .unwrap_or_default();
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
            start_mode: start_mode_to_proto(info.start_mode) as i32,
            idle_timeout_seconds: info.idle_timeout.map(|d| d.as_secs()).unwrap_or(0),
            last_active_at: Some(info.last_active_at.into()),
            sleep_count: info.sleep_count,
            wake_count: info.wake_count,
            network: info.network.map(network_to_proto),
            network_policy: info.network_policy.map(|p| proto::NetworkPolicy {
                no_internet: !p.internet,
                allow_out: p.allow_out.iter().map(ToString::to_string).collect(),
                deny_out: p.deny_out.iter().map(ToString::to_string).collect(),
            }),
            exposed_ports,
            ..Default::default()
        }
    }
}

/// The create request's network fields as a policy; bad CIDRs are
/// INVALID_ARGUMENT naming the field.
fn network_policy(
    no_internet: bool,
    allow_out: &[String],
    deny_out: &[String],
) -> Result<EgressPolicy, Status> {
    EgressPolicy::from_args(no_internet, allow_out, deny_out)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The create request's `expose_ports` as TCP ports.
fn exposed_ports(ports: &[u32]) -> Result<Vec<u16>, Status> {
    ports
        .iter()
        .map(|&p| {
            u16::try_from(p).ok().filter(|&p| p > 0).ok_or_else(|| {
                Status::invalid_argument(format!("expose_ports: {p} is not a TCP port (1-65535)"))
            })
        })
        .collect()
}

fn network_to_proto(c: NetworkCounters) -> proto::NetworkCounters {
    proto::NetworkCounters {
        rx_bytes: c.rx_bytes,
        tx_bytes: c.tx_bytes,
        rx_packets: c.rx_packets,
        tx_packets: c.tx_packets,
        last_activity_at: c
            .last_activity_unix_ms
            .map(|ms| (std::time::UNIX_EPOCH + Duration::from_millis(ms)).into()),
    }
}

fn start_mode_to_proto(m: StartMode) -> proto::StartMode {
    match m {
        StartMode::Auto => proto::StartMode::Auto,
        StartMode::ColdBoot => proto::StartMode::ColdBoot,
        StartMode::Template => proto::StartMode::Template,
        StartMode::WarmPool => proto::StartMode::WarmPool,
    }
}

fn start_mode_from_proto(m: i32) -> Result<StartMode, Status> {
    Ok(match proto::StartMode::try_from(m) {
        Ok(proto::StartMode::Auto) => StartMode::Auto,
        Ok(proto::StartMode::ColdBoot) => StartMode::ColdBoot,
        Ok(proto::StartMode::Template) => StartMode::Template,
        Ok(proto::StartMode::WarmPool) => StartMode::WarmPool,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "start_mode {m} is not a known StartMode"
            )));
        }
    })
}

fn host_to_proto(h: HostInfo) -> proto::Host {
    let ts = |t: SystemTime| Some(prost_types::Timestamp::from(t));
    proto::Host {
        id: h.id,
        accelerator: h.accelerator.accelerator.to_string(),
        accelerator_reason: h.accelerator.reason,
        vmm: h.vmm.to_string(),
        sandboxes_running: h.running,
        sandboxes_sleeping: h.sleeping,
        templates: h
            .templates
            .into_iter()
            .map(|t| proto::Template {
                image: t.image,
                image_digest: t.image_digest,
                cpus: t.cpus,
                memory_mib: t.memory_mib,
                disk_mib: t.disk_mib,
                size_bytes: t.size_bytes,
                created_at: ts(t.created_at),
                clones: t.clones,
            })
            .collect(),
        warm_pools: h
            .warm_pools
            .into_iter()
            .map(|p| proto::WarmPool {
                image: p.image,
                cpus: p.cpus,
                memory_mib: p.memory_mib,
                disk_mib: p.disk_mib,
                target: p.target,
                ready: p.ready,
            })
            .collect(),
        capabilities: h.capabilities,
        agent_started_at: ts(h.started_at),
        creates_under_way: h.creates_under_way,
        ..Default::default()
    }
}

#[async_trait]
impl Host for LocalHost {
    fn id(&self) -> &str {
        self.agent.host_id()
    }

    async fn create_sandbox(
        &self,
        id: &str,
        req: CreateSandboxRequest,
    ) -> Result<proto::Sandbox, Status> {
        let request = SandboxRequest {
            id: Some(id.to_string()),
            image: req.image,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disk_mib: req.disk_mib,
            env: req.env.into_iter().collect(),
            idle_timeout: (req.idle_timeout_seconds > 0)
                .then(|| Duration::from_secs(req.idle_timeout_seconds)),
            start_mode: start_mode_from_proto(req.start_mode)?,
            network: EgressPolicy {
                exposed_tcp_ports: exposed_ports(&req.expose_ports)?,
                ..network_policy(req.no_internet, &req.allow_out, &req.deny_out)?
            },
        };
        let info = self
            .detached(move |agent| async move { agent.create_sandbox(request).await })
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
        let id = id.to_string();
        self.detached(move |agent| async move { agent.destroy(&id).await })
            .await
    }

    async fn sleep_sandbox(&self, id: &str) -> Result<proto::Sandbox, Status> {
        let id = id.to_string();
        let info = self
            .detached(move |agent| async move { agent.sleep(&id).await })
            .await?;
        Ok(self.to_proto(info))
    }

    async fn wake_sandbox(&self, id: &str) -> Result<proto::Sandbox, Status> {
        let id = id.to_string();
        let info = self
            .detached(move |agent| async move { agent.wake(&id).await })
            .await?;
        Ok(self.to_proto(info))
    }

    async fn connect_port(&self, id: &str, port: u16) -> Result<PortStream, Status> {
        Ok(Box::new(self.agent.connect_port(id, port).await?))
    }

    async fn health_connect(&self, id: &str, port: u16) -> Result<Option<PortStream>, Status> {
        Ok(self
            .agent
            .health_check_connect(id, port)
            .await?
            .map(|s| Box::new(s) as PortStream))
    }

    async fn update_network(
        &self,
        id: &str,
        policy: proto::NetworkPolicy,
    ) -> Result<proto::Sandbox, Status> {
        let policy = network_policy(policy.no_internet, &policy.allow_out, &policy.deny_out)?;
        Ok(self.to_proto(self.agent.update_network(id, policy)?))
    }

    async fn info(&self) -> Result<proto::Host, Status> {
        let mut h = host_to_proto(self.agent.host_info());
        h.cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        h.memory_mib = host_memory_mib();
        h.cached_images = self
            .agent
            .list_images()
            .into_iter()
            .map(|i| i.reference)
            .collect();
        h.state = "ready".into();
        Ok(h)
    }

    async fn pull_image(
        &self,
        reference: String,
    ) -> Result<StatusStream<proto::PullImageEvent>, Status> {
        use proto::pull_image_event::Event;
        let (tx, rx) =
            tokio::sync::mpsc::unbounded_channel::<Result<proto::PullImageEvent, Status>>();
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let send = |e: Event| {
                let _ = tx.send(Ok(proto::PullImageEvent { event: Some(e) }));
            };
            let progress = |e: Option<PullEvent>| match e {
                Some(PullEvent::Resolved {
                    reference,
                    manifest_digest,
                    layers,
                }) => send(Event::Resolved(proto::PullResolved {
                    reference,
                    digest: manifest_digest.to_string(),
                    layers: layers
                        .into_iter()
                        .map(|(d, size)| proto::LayerProgress {
                            digest: d.to_string(),
                            total_bytes: size,
                            ..Default::default()
                        })
                        .collect(),
                })),
                Some(PullEvent::Layer {
                    digest,
                    done,
                    total,
                    cached,
                }) => send(Event::Layer(proto::LayerProgress {
                    digest: digest.to_string(),
                    done_bytes: done,
                    total_bytes: total,
                    cached,
                })),
                Some(_) => {}
                None => send(Event::Converting(proto::PullConverting {})),
            };
            match agent.pull_image(&reference, &progress).await {
                Ok(p) => {
                    use std::os::unix::fs::MetadataExt;
                    let disk_bytes = std::fs::metadata(&p.root_disk.path)
                        .map(|m| m.blocks() * 512)
                        .unwrap_or(0);
                    send(Event::Done(proto::PullDone {
                        reference: p.reference,
                        digest: p.digest,
                        downloaded_bytes: p.downloaded_bytes,
                        disk_bytes,
                        pull_ms: p.pull_ms,
                        convert_ms: p.convert_ms,
                    }));
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_status()));
                }
            }
        });
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }

    async fn list_images(&self) -> Result<proto::ListImagesResponse, Status> {
        let ts = |t: SystemTime| Some(prost_types::Timestamp::from(t));
        let images = self
            .agent
            .list_images()
            .into_iter()
            .map(|i| proto::ImageRecord {
                reference: i.reference,
                digest: i.manifest_digest.to_string(),
                source: match i.source {
                    ImageSource::Registry { .. } => "registry",
                    ImageSource::OciLayout { .. } => "oci-layout",
                    ImageSource::DockerArchive { .. } => "docker-archive",
                    _ => "local-layout",
                }
                .to_string(),
                size_bytes: i.size_bytes,
                disk_bytes: i.disk_bytes.unwrap_or(0),
                created_at: ts(i.created),
                last_used_at: ts(i.last_used),
                in_use: i.in_use as u32,
            })
            .collect();
        let s = self.agent.image_stats();
        Ok(proto::ListImagesResponse {
            images,
            stats: Some(proto::ImageStats {
                pulls: s.pulls,
                imports: s.imports,
                blob_downloads: s.blob_downloads,
                bytes_downloaded: s.bytes_downloaded,
                conversions: s.conversions,
            }),
        })
    }

    async fn remove_image(&self, reference: &str) -> Result<proto::RemoveImageResponse, Status> {
        let r = self.agent.remove_image(reference).await?;
        Ok(proto::RemoveImageResponse {
            removed: r.references,
            freed_bytes: r.freed_bytes,
        })
    }

    async fn exec(
        &self,
        start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, Status> {
        Ok(self.agent.exec(start, rest).await?)
    }

    async fn read_file(&self, req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status> {
        Ok(self.agent.read_file(req).await?)
    }

    async fn write_file(
        &self,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, Status> {
        Ok(self.agent.write_file(start, rest).await?)
    }

    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status> {
        Ok(self
            .agent
            .files(&req.sandbox_id)
            .await?
            .stat_file(req)
            .await?
            .into_inner())
    }

    async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesResponse, Status> {
        Ok(self
            .agent
            .files(&req.sandbox_id)
            .await?
            .list_files(req)
            .await?
            .into_inner())
    }

    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status> {
        Ok(self
            .agent
            .files(&req.sandbox_id)
            .await?
            .make_dir(req)
            .await?
            .into_inner())
    }

    async fn remove_file(&self, req: RemoveFileRequest) -> Result<(), Status> {
        self.agent
            .files(&req.sandbox_id)
            .await?
            .remove_file(req)
            .await?;
        Ok(())
    }

    async fn rename_file(&self, req: RenameFileRequest) -> Result<(), Status> {
        self.agent
            .files(&req.sandbox_id)
            .await?
            .rename_file(req)
            .await?;
        Ok(())
    }
}

/// MemTotal from /proc/meminfo, in MiB.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
