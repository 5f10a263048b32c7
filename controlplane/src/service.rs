//! The control plane and its public `somna.v1.Sandboxes` service: every
//! call is authenticated to a tenant, every state change is written to the
//! store before the host acts, and placement goes through the scheduler.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use somna_proto::v1::sandboxes_server::Sandboxes;
use somna_proto::v1::{
    CreateSandboxRequest, DestroySandboxRequest, DestroySandboxResponse, ExecRequest, ExecResponse,
    FileChunk, FileInfo, GetSandboxRequest, ListFilesRequest, ListFilesResponse,
    ListSandboxesRequest, ListSandboxesResponse, MakeDirRequest, ReadFileRequest,
    RemoveFileRequest, RemoveFileResponse, RenameFileRequest, RenameFileResponse, Sandbox,
    SandboxState, SetSandboxTimeoutRequest, SleepSandboxRequest, StatFileRequest,
    UpdateSandboxNetworkRequest, WakeSandboxRequest, WriteFileRequest, WriteFileResponse,
    exec_request, write_file_request,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::auth::{Authenticator, Caller};
use crate::host::{Host, StatusStream};
use crate::hosts::HostRegistry;
use crate::scheduler::{self, Demand, HostView, Overcommit, Policy};
use crate::store::{SandboxRow, Store, StoreError, now_ms, random_token};
use crate::validate;

/// How the control plane behaves.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub policy: Policy,
    pub overcommit: Overcommit,
    /// How often hosts are asked for their state.
    pub heartbeat: Duration,
    /// A host that has not answered for this long is lost.
    pub lost_after: Duration,
    /// Sizes filled in when a request leaves them at 0.
    pub default_cpus: u32,
    pub default_memory_mib: u32,
    pub default_disk_mib: u32,
    /// Crash-consistency tests only: called at each named point of the
    /// control plane's own work (`controlplane.create.recorded`, ...), it
    /// may end the process there (the binary wires `SOMNA_FAULT` to it).
    /// `None` in production.
    pub fault: Option<fn(&'static str)>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            policy: Policy::Spread,
            overcommit: Overcommit::default(),
            heartbeat: Duration::from_secs(2),
            lost_after: Duration::from_secs(8),
            default_cpus: 1,
            default_memory_mib: 512,
            default_disk_mib: 1024,
            fault: None,
        }
    }
}

pub(crate) struct Inner {
    pub store: Store,
    pub auth: Authenticator,
    pub hosts: HostRegistry,
    pub config: ControlPlaneConfig,
    pub apps: crate::apps::Runtime,
}

/// The control plane. Clone it freely; clones share state.
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) inner: Arc<Inner>,
}

/// The store's name for a state, and back.
pub(crate) fn state_name(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Creating => "creating",
        SandboxState::Running => "running",
        SandboxState::Sleeping => "sleeping",
        SandboxState::Waking => "waking",
        SandboxState::Failed => "failed",
        SandboxState::Destroying => "destroying",
        SandboxState::Lost => "lost",
        SandboxState::Unspecified => "unknown",
    }
}

pub(crate) fn state_from_name(s: &str) -> SandboxState {
    match s {
        "creating" => SandboxState::Creating,
        "running" => SandboxState::Running,
        "sleeping" => SandboxState::Sleeping,
        "waking" => SandboxState::Waking,
        "failed" => SandboxState::Failed,
        "destroying" => SandboxState::Destroying,
        "lost" => SandboxState::Lost,
        _ => SandboxState::Unspecified,
    }
}

pub(crate) fn store_err(e: StoreError) -> Status {
    Status::unavailable(format!("{e}"))
}

/// Errors of the placement step.
pub(crate) enum PlaceError {
    Store(StoreError),
    Status(Status),
}

impl From<StoreError> for PlaceError {
    fn from(e: StoreError) -> Self {
        PlaceError::Store(e)
    }
}

impl From<PlaceError> for Status {
    fn from(e: PlaceError) -> Status {
        match e {
            PlaceError::Store(e) => store_err(e),
            PlaceError::Status(s) => s,
        }
    }
}

impl ControlPlane {
    /// A control plane on `store`; starts its heartbeat, expiry and
    /// host-health loops.
    pub fn new(store: Store, config: ControlPlaneConfig) -> Self {
        let cp = ControlPlane {
            inner: Arc::new(Inner {
                auth: Authenticator::new(store.clone()),
                store,
                hosts: HostRegistry::default(),
                config,
                apps: crate::apps::Runtime::default(),
            }),
        };
        crate::lifecycle::spawn(&cp);
        cp
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The tonic service, ready to add to a server.
    pub fn service(&self) -> somna_proto::v1::sandboxes_server::SandboxesServer<ControlPlane> {
        somna_proto::v1::sandboxes_server::SandboxesServer::new(self.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// Adds a host this replica can reach (in-process, or a tunnel that just
    /// came up) and takes its first report.
    pub async fn attach_host(&self, host: Arc<dyn Host>) {
        self.inner.hosts.attach(host.clone());
        crate::lifecycle::heartbeat(self, &host).await;
    }

    /// Checks an agent's join token.
    pub(crate) async fn check_join(&self, host_id: &str, token: &str) -> Result<(), String> {
        validate::host_id(host_id).map_err(|s| s.message().to_string())?;
        match self
            .inner
            .store
            .has_join_token(&crate::auth::hash(token))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err("invalid join token".into()),
            Err(e) => Err(format!("cannot check the join token: {e}")),
        }
    }

    /// The authenticated caller of a request.
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.inner.auth.caller(request).await
    }

    /// The caller's sandbox `id`, or NOT_FOUND (also for other tenants').
    pub(crate) async fn row(&self, caller: &Caller, id: &str) -> Result<SandboxRow, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("sandbox_id is required"));
        }
        self.inner
            .store
            .sandbox(Some(&caller.tenant_id), id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("sandbox {id} not found")))
    }

    /// The host serving a sandbox, for calls that need the VM.
    pub(crate) async fn route(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(SandboxRow, Arc<dyn Host>), Status> {
        let row = self.row(caller, id).await?;
        if row.state == "lost" {
            return Err(Status::unavailable(format!(
                "sandbox {id} is on host {} which is not answering (lost); it comes back if the host does",
                row.host_id
            )));
        }
        let host = self.inner.hosts.get(&row.host_id).ok_or_else(|| {
            Status::unavailable(format!(
                "sandbox {id}'s host {} is not connected to this control plane",
                row.host_id
            ))
        })?;
        Ok((row, host))
    }

    /// The sandbox as the API shows it: the host's record with the control
    /// plane's fields on top.
    pub(crate) fn view(row: &SandboxRow) -> Sandbox {
        let mut s = row.record.clone();
        s.id = row.id.clone();
        s.host = row.host_id.clone();
        s.state = state_from_name(&row.state) as i32;
        s.request_id = row.request_id.clone().unwrap_or_default();
        s.expires_at = row.expires_ms.map(|ms| {
            prost_types::Timestamp::from(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64))
        });
        s
    }

    /// Takes a host's fresh record of a sandbox into its row (keeping the
    /// control plane's own fields).
    pub(crate) fn absorb(row: &mut SandboxRow, from_host: Sandbox) {
        let labels = std::mem::take(&mut row.record.labels);
        row.state = state_name(
            SandboxState::try_from(from_host.state).unwrap_or(SandboxState::Unspecified),
        )
        .into();
        row.record = from_host;
        row.record.labels = labels;
    }

    pub(crate) async fn save(&self, row: &SandboxRow) -> Result<(), Status> {
        self.inner
            .store
            .update_sandbox(row)
            .await
            .map_err(store_err)
    }

    /// Scheduler views of the ready hosts, with what is placed on them.
    async fn host_views(
        &self,
        demand_image: &str,
    ) -> Result<(Vec<HostView>, Vec<Arc<dyn Host>>), Status> {
        let mut alloc: HashMap<String, (u32, u64)> = HashMap::new();
        for r in self.inner.store.sandboxes(None).await.map_err(store_err)? {
            if r.holds_capacity() {
                let e = alloc.entry(r.host_id.clone()).or_default();
                e.0 += r.cpus as u32;
                e.1 += r.memory_mib as u64;
            }
        }
        let image = normalize_image(demand_image);
        let mut views = Vec::new();
        let mut hosts = Vec::new();
        for c in self.inner.hosts.all() {
            let Some(info) = c.info else { continue };
            let (cpus_allocated, memory_allocated_mib) =
                alloc.get(c.host.id()).copied().unwrap_or_default();
            views.push(HostView {
                id: c.host.id().to_string(),
                ready: c.last_ok.elapsed() < self.inner.config.lost_after,
                cpus: info.cpus,
                memory_mib: info.memory_mib,
                cpus_allocated,
                memory_allocated_mib,
                warm_pool_ready: info
                    .warm_pools
                    .iter()
                    .any(|p| p.ready > 0 && normalize_image(&p.image) == image),
                has_template: info
                    .templates
                    .iter()
                    .any(|t| normalize_image(&t.image) == image),
                image_cached: info
                    .cached_images
                    .iter()
                    .any(|r| normalize_image(r) == image),
                capabilities: info.capabilities.clone(),
            });
            hosts.push(c.host);
        }
        Ok((views, hosts))
    }

    /// A named point for crash tests (see [`ControlPlaneConfig::fault`]).
    pub(crate) fn fault(&self, point: &'static str) {
        if let Some(fault) = self.inner.config.fault {
            fault(point);
        }
    }

    /// Runs a state-changing call to its end even if the client hangs up
    /// (tonic drops a handler whose client went away): cut short, it would
    /// leave a row `creating` or `waking` that only the heartbeat settles.
    pub(crate) async fn detached<T, F>(
        &self,
        call: impl FnOnce(ControlPlane) -> F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, Status>> + Send + 'static,
    {
        tokio::spawn(call(self.clone())).await.map_err(|e| {
            Status::internal(format!("the control plane's call ended abnormally: {e}"))
        })?
    }

    /// Wakes a sleeping sandbox on its host; the row says `waking` until
    /// the host answers.
    async fn wake_row(&self, mut row: SandboxRow, host: Arc<dyn Host>) -> Result<Sandbox, Status> {
        row.state = "waking".into();
        self.save(&row).await?;
        self.fault("controlplane.wake.recorded");
        match host.wake_sandbox(&row.id).await {
            Ok(record) => {
                Self::absorb(&mut row, record);
                self.save(&row).await?;
                Ok(Self::view(&row))
            }
            Err(e) => {
                // The host knows what became of it; the next heartbeat
                // corrects the row, this one sets it to what is likely.
                if let Ok(record) = host.get_sandbox(&row.id).await {
                    Self::absorb(&mut row, record);
                    let _ = self.save(&row).await;
                }
                Err(e)
            }
        }
    }

    /// Destroys a sandbox row's VM (if its host is reachable) and forgets
    /// it. A sandbox on an unreachable host stays `destroying` and is
    /// destroyed when the host answers again.
    pub(crate) async fn destroy_row(&self, mut row: SandboxRow) -> Result<(), Status> {
        row.state = "destroying".into();
        self.save(&row).await?;
        self.fault("controlplane.destroy.recorded");
        let Some(host) = self.inner.hosts.get(&row.host_id) else {
            return Ok(());
        };
        match host.destroy_sandbox(&row.id).await {
            Ok(()) => {}
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) if e.code() == tonic::Code::Unavailable => return Ok(()),
            Err(e) => return Err(e),
        }
        self.fault("controlplane.destroy.answered");
        self.inner
            .store
            .delete_sandbox(&row.id)
            .await
            .map_err(store_err)
    }

    /// Creates a sandbox for `caller`: validation, idempotency, quotas,
    /// placement, the row, then the host.
    pub(crate) async fn create_for(
        &self,
        caller: &Caller,
        mut req: CreateSandboxRequest,
    ) -> Result<Sandbox, Status> {
        validate::create(&req)?;
        let c = &self.inner.config;
        if req.cpus == 0 {
            req.cpus = c.default_cpus;
        }
        if req.memory_mib == 0 {
            req.memory_mib = c.default_memory_mib;
        }
        if req.disk_mib == 0 {
            req.disk_mib = c.default_disk_mib;
        }
        let store = &self.inner.store;
        let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
        if let Some(rid) = &request_id
            && let Some(existing) = store
                .sandbox_by_request(&caller.tenant_id, rid)
                .await
                .map_err(store_err)?
        {
            return Ok(Self::view(&existing));
        }
        let tenant = store
            .tenant(&caller.tenant_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::unauthenticated("the API key's tenant no longer exists"))?;
        let id = format!("sbx-{}", random_token(12));
        let now = now_ms();
        let expires_ms =
            (req.timeout_seconds > 0).then(|| now + (req.timeout_seconds as i64) * 1000);
        let demand = Demand {
            cpus: req.cpus,
            memory_mib: req.memory_mib as u64,
            capabilities: vec![],
        };
        let mut row = SandboxRow {
            id: id.clone(),
            tenant_id: tenant.id.clone(),
            host_id: String::new(),
            state: "creating".into(),
            request_id: request_id.clone(),
            cpus: req.cpus as i64,
            memory_mib: req.memory_mib as i64,
            created_ms: now,
            expires_ms,
            record: Sandbox {
                id: id.clone(),
                image: req.image.clone(),
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                disk_mib: req.disk_mib,
                env: req.env.clone(),
                labels: req.labels.clone(),
                created_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                ..Default::default()
            },
        };
        // Quota, placement and the insert happen under one lock, so two
        // creates never take the same capacity or quota.
        let placed = store
            .with_placement_lock(async || {
                let mine = store.sandboxes(Some(&tenant.id)).await?;
                let live: Vec<&SandboxRow> = mine.iter().filter(|r| r.state != "failed").collect();
                let q = tenant.quotas;
                let over = |what: &str, used: i64, want: i64, max: i64| {
                    PlaceError::Status(Status::resource_exhausted(format!(
                        "quota: {what} would be {} of {max} (in use: {used})",
                        used + want
                    )))
                };
                if live.len() as i64 + 1 > q.max_sandboxes {
                    return Err(over("sandboxes", live.len() as i64, 1, q.max_sandboxes));
                }
                let vcpus: i64 = live.iter().map(|r| r.cpus).sum();
                if vcpus + req.cpus as i64 > q.max_vcpus {
                    return Err(over("vCPUs", vcpus, req.cpus as i64, q.max_vcpus));
                }
                let mem: i64 = live.iter().map(|r| r.memory_mib).sum();
                if mem + req.memory_mib as i64 > q.max_memory_mib {
                    return Err(over("memory MiB", mem, req.memory_mib as i64, q.max_memory_mib));
                }
                let (views, hosts) = self.host_views(&req.image).await.map_err(PlaceError::Status)?;
                let decision = scheduler::place(&demand, &views, c.policy, c.overcommit)
                    .map_err(|e| PlaceError::Status(Status::resource_exhausted(e.to_string())))?;
                let host = hosts[decision.host].clone();
                row.host_id = host.id().to_string();
                if !store.insert_sandbox(&row).await? {
                    // The same request id won a race: answer with that one.
                    return Ok(None);
                }
                info!(%id, tenant = %tenant.name, image = %req.image, score = decision.score, "placed: {}", decision.reasons);
                Ok(Some(host))
            })
            .await
            .map_err(Status::from)?;
        let Some(host) = placed else {
            let rid = request_id.unwrap_or_default();
            let existing = store
                .sandbox_by_request(&caller.tenant_id, &rid)
                .await
                .map_err(store_err)?
                .ok_or_else(|| {
                    Status::aborted("a concurrent create with this request id failed; retry")
                })?;
            return Ok(Self::view(&existing));
        };
        self.fault("controlplane.create.recorded");
        if let Some(fault) = self.inner.config.fault {
            // Dies while the host works on the create.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                fault("controlplane.create.in_flight");
            });
        }
        match host.create_sandbox(&id, req).await {
            Ok(record) => {
                self.fault("controlplane.create.answered");
                Self::absorb(&mut row, record);
                self.save(&row).await?;
                Ok(Self::view(&row))
            }
            Err(e) => {
                if let Err(del) = store.delete_sandbox(&id).await {
                    warn!(%id, error = %del, "cannot remove the row of a failed create");
                }
                Err(e)
            }
        }
    }

    /// Destroys every sandbox placed on `host_id` (shutdown of `somna up`);
    /// apps stop replacing replicas first.
    pub async fn destroy_all_on(&self, host_id: &str) {
        self.inner.apps.stop();
        let Ok(rows) = self.inner.store.sandboxes_on_host(host_id).await else {
            return;
        };
        for row in rows {
            let id = row.id.clone();
            if let Err(e) = self.destroy_row(row).await {
                warn!(%id, error = %e.message(), "destroy at shutdown failed");
            }
        }
    }
}

/// `busybox` and `busybox:latest` are the same image for locality.
fn normalize_image(r: &str) -> String {
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') || r.contains('@') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

/// Takes the first message of a client stream, which must be of the
/// variant `pick` accepts; the rest of the stream ends at the first error.
pub(crate) async fn split_first<M: Send + 'static, F: Send + 'static>(
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

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[tonic::async_trait]
impl Sandboxes for ControlPlane {
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let created = self
            .detached(move |cp| async move { cp.create_for(&caller, req).await })
            .await?;
        Ok(Response::new(created))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let mut row = self.row(&caller, &request.into_inner().id).await?;
        // The host's record is fresher than the last heartbeat's (a VMM
        // that just died, a wake by exec or file call, an idle sleep).
        if matches!(row.state.as_str(), "running" | "sleeping" | "waking")
            && let Some(host) = self.inner.hosts.get(&row.host_id)
            && let Ok(record) = host.get_sandbox(&row.id).await
        {
            Self::absorb(&mut row, record);
            self.save(&row).await?;
        }
        Ok(Response::new(Self::view(&row)))
    }

    async fn list_sandboxes(
        &self,
        request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        validate::labels("labels", &req.labels)?;
        let page = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "page_size {n} is more than {MAX_PAGE}"
                )));
            }
            n => n,
        };
        let rows = self
            .inner
            .store
            .sandboxes(Some(&caller.tenant_id))
            .await
            .map_err(store_err)?;
        let matching: Vec<&SandboxRow> = rows
            .iter()
            .filter(|r| {
                req.labels
                    .iter()
                    .all(|(k, v)| r.record.labels.get(k) == Some(v))
            })
            .collect();
        let start = if req.page_token.is_empty() {
            0
        } else {
            matching
                .iter()
                .position(|r| r.id == req.page_token)
                .map(|p| p + 1)
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "page_token is not from this listing (or its sandbox is gone)",
                    )
                })?
        };
        let slice = &matching[start.min(matching.len())..];
        let taken: Vec<Sandbox> = slice.iter().take(page).map(|r| Self::view(r)).collect();
        let next_page_token = if slice.len() > page {
            taken.last().map(|s| s.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: taken,
            next_page_token,
        }))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        let caller = self.caller(&request).await?;
        let row = self.row(&caller, &request.into_inner().id).await?;
        self.detached(move |cp| async move { cp.destroy_row(row).await })
            .await?;
        Ok(Response::new(DestroySandboxResponse {}))
    }

    async fn sleep_sandbox(
        &self,
        request: Request<SleepSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let (mut row, host) = self.route(&caller, &request.into_inner().id).await?;
        let slept = self
            .detached(move |cp| async move {
                let record = host.sleep_sandbox(&row.id).await?;
                cp.fault("controlplane.sleep.answered");
                Self::absorb(&mut row, record);
                cp.save(&row).await?;
                Ok(Self::view(&row))
            })
            .await?;
        Ok(Response::new(slept))
    }

    async fn wake_sandbox(
        &self,
        request: Request<WakeSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let (row, host) = self.route(&caller, &request.into_inner().id).await?;
        let woken = self
            .detached(move |cp| async move { cp.wake_row(row, host).await })
            .await?;
        Ok(Response::new(woken))
    }

    async fn set_sandbox_timeout(
        &self,
        request: Request<SetSandboxTimeoutRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        validate::timeout("timeout_seconds", req.timeout_seconds)?;
        let mut row = self.row(&caller, &req.id).await?;
        row.expires_ms =
            (req.timeout_seconds > 0).then(|| now_ms() + (req.timeout_seconds as i64) * 1000);
        self.save(&row).await?;
        Ok(Response::new(Self::view(&row)))
    }

    async fn update_sandbox_network(
        &self,
        request: Request<UpdateSandboxNetworkRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let policy = req
            .policy
            .ok_or_else(|| Status::invalid_argument("policy is required"))?;
        let (mut row, host) = self.route(&caller, &req.id).await?;
        let record = host.update_network(&row.id, policy).await?;
        Self::absorb(&mut row, record);
        self.save(&row).await?;
        Ok(Response::new(Self::view(&row)))
    }

    type ExecStream = StatusStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let caller = self.caller(&request).await?;
        let (start, rest) =
            split_first(request.into_inner(), "exec", |m: ExecRequest| match m.msg {
                Some(exec_request::Msg::Start(s)) => Some(s),
                _ => None,
            })
            .await?;
        let (_, host) = self.route(&caller, &start.sandbox_id).await?;
        Ok(Response::new(host.exec(start, rest).await?))
    }

    type ReadFileStream = StatusStream<FileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        Ok(Response::new(host.read_file(req).await?))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (start, rest) = split_first(
            request.into_inner(),
            "write_file",
            |m: WriteFileRequest| match m.msg {
                Some(write_file_request::Msg::Start(s)) => Some(s),
                _ => None,
            },
        )
        .await?;
        let (_, host) = self.route(&caller, &start.sandbox_id).await?;
        Ok(Response::new(host.write_file(start, rest).await?))
    }

    async fn stat_file(
        &self,
        request: Request<StatFileRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        Ok(Response::new(host.stat_file(req).await?))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        Ok(Response::new(host.list_files(req).await?))
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<FileInfo>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        Ok(Response::new(host.make_dir(req).await?))
    }

    async fn remove_file(
        &self,
        request: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        host.remove_file(req).await?;
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn rename_file(
        &self,
        request: Request<RenameFileRequest>,
    ) -> Result<Response<RenameFileResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let (_, host) = self.route(&caller, &req.sandbox_id).await?;
        host.rename_file(req).await?;
        Ok(Response::new(RenameFileResponse {}))
    }
}
