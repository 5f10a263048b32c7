//! Control-plane tests against recording test doubles of hosts, through the
//! real gRPC server on loopback, with a real SQLite store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use somna_proto::v1::sandboxes_client::SandboxesClient;
use somna_proto::v1::*;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::store::{Store, TenantQuotas};
use crate::{ControlPlane, ControlPlaneConfig, Host, StatusStream};

/// A host that keeps sandboxes as records; `down` makes it stop answering.
struct FakeHost {
    id: String,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    /// Reported as creates under way.
    under_way: Mutex<Vec<String>>,
    down: AtomicBool,
}

impl FakeHost {
    fn new(id: &str) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            id: id.into(),
            sandboxes: Mutex::new(HashMap::new()),
            under_way: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
        })
    }
    fn check(&self) -> Result<(), Status> {
        if self.down.load(Ordering::SeqCst) {
            Err(Status::unavailable("host down"))
        } else {
            Ok(())
        }
    }
    fn count(&self) -> usize {
        self.sandboxes.lock().unwrap().len()
    }
}

#[async_trait]
impl Host for FakeHost {
    fn id(&self) -> &str {
        &self.id
    }
    async fn create_sandbox(&self, id: &str, req: CreateSandboxRequest) -> Result<Sandbox, Status> {
        self.check()?;
        if req.image == "missing" {
            return Err(Status::not_found("image missing not found"));
        }
        let s = Sandbox {
            id: id.into(),
            image: req.image,
            state: SandboxState::Running as i32,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            ..Default::default()
        };
        self.sandboxes.lock().unwrap().insert(id.into(), s.clone());
        Ok(s)
    }
    async fn get_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        self.check()?;
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(id.to_string()))
    }
    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, Status> {
        self.check()?;
        Ok(self.sandboxes.lock().unwrap().values().cloned().collect())
    }
    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status> {
        self.check()?;
        self.sandboxes
            .lock()
            .unwrap()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Status::not_found(id.to_string()))
    }
    async fn update_network(
        &self,
        id: &str,
        policy: somna_proto::v1::NetworkPolicy,
    ) -> Result<Sandbox, Status> {
        self.check()?;
        let mut m = self.sandboxes.lock().unwrap();
        let s = m
            .get_mut(id)
            .ok_or_else(|| Status::not_found(id.to_string()))?;
        s.network_policy = Some(policy);
        Ok(s.clone())
    }
    async fn sleep_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        self.check()?;
        let mut m = self.sandboxes.lock().unwrap();
        let s = m
            .get_mut(id)
            .ok_or_else(|| Status::not_found(id.to_string()))?;
        s.state = SandboxState::Sleeping as i32;
        Ok(s.clone())
    }
    async fn wake_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        self.check()?;
        let mut m = self.sandboxes.lock().unwrap();
        let s = m
            .get_mut(id)
            .ok_or_else(|| Status::not_found(id.to_string()))?;
        s.state = SandboxState::Running as i32;
        Ok(s.clone())
    }
    async fn info(&self) -> Result<somna_proto::v1::Host, Status> {
        self.check()?;
        Ok(somna_proto::v1::Host {
            id: self.id.clone(),
            cpus: 4,
            memory_mib: 8192,
            creates_under_way: self.under_way.lock().unwrap().clone(),
            ..Default::default()
        })
    }
    async fn pull_image(&self, reference: String) -> Result<StatusStream<PullImageEvent>, Status> {
        let done = PullImageEvent {
            event: Some(pull_image_event::Event::Done(PullDone {
                reference,
                ..Default::default()
            })),
        };
        Ok(futures::stream::iter(vec![Ok(done)]).boxed())
    }
    async fn list_images(&self) -> Result<ListImagesResponse, Status> {
        Ok(ListImagesResponse::default())
    }
    async fn remove_image(&self, reference: &str) -> Result<RemoveImageResponse, Status> {
        Err(Status::not_found(format!("image {reference} not found")))
    }
    async fn exec(
        &self,
        start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, Status> {
        // Echo: argv joined, then every stdin chunk, then exit 0.
        let head = ExecResponse {
            event: Some(exec_response::Event::Stdout(
                start.argv.join(" ").into_bytes(),
            )),
        };
        let echoed = rest.filter_map(|m| async move {
            match m.msg {
                Some(exec_request::Msg::Stdin(b)) => Some(Ok(ExecResponse {
                    event: Some(exec_response::Event::Stdout(b)),
                })),
                _ => None,
            }
        });
        let exit = ExecResponse {
            event: Some(exec_response::Event::Exit(ExecExit::default())),
        };
        Ok(futures::stream::once(async { Ok(head) })
            .chain(echoed)
            .chain(futures::stream::once(async { Ok(exit) }))
            .boxed())
    }
    async fn read_file(&self, _req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn write_file(
        &self,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, Status> {
        let size: usize = rest
            .map(|m| match m.msg {
                Some(write_file_request::Msg::Data(d)) => d.len(),
                _ => 0,
            })
            .fold(0, |a, b| async move { a + b })
            .await;
        Ok(WriteFileResponse {
            file: Some(FileInfo {
                path: start.path,
                size: size as u64,
                ..Default::default()
            }),
        })
    }
    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status> {
        Ok(FileInfo {
            path: req.path,
            ..Default::default()
        })
    }
    async fn list_files(&self, _req: ListFilesRequest) -> Result<ListFilesResponse, Status> {
        Ok(ListFilesResponse::default())
    }
    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status> {
        Ok(FileInfo {
            path: req.path,
            ..Default::default()
        })
    }
    async fn remove_file(&self, _req: RemoveFileRequest) -> Result<(), Status> {
        Ok(())
    }
    async fn rename_file(&self, _req: RenameFileRequest) -> Result<(), Status> {
        Ok(())
    }
}

#[derive(Clone)]
struct Key(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Key {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = SandboxesClient<InterceptedService<Channel, Key>>;

/// The store a case runs on: every case runs on both.
enum Db {
    Sqlite,
    /// URL of a fresh database on the suite's PostgreSQL server.
    Postgres(String),
}

struct Env {
    _dir: Option<tempfile::TempDir>,
    store: Store,
    cp: ControlPlane,
    addr: String,
    key: String,
}

fn fast_config() -> ControlPlaneConfig {
    ControlPlaneConfig {
        heartbeat: Duration::from_millis(100),
        lost_after: Duration::from_millis(1500),
        ..Default::default()
    }
}

impl Env {
    async fn start(db: &Db, hosts: &[Arc<FakeHost>]) -> Env {
        Self::start_with(db, hosts, fast_config()).await
    }

    async fn start_with(db: &Db, hosts: &[Arc<FakeHost>], config: ControlPlaneConfig) -> Env {
        let (dir, url) = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("state.db").display());
                (Some(dir), url)
            }
            Db::Postgres(url) => (None, url.clone()),
        };
        let store = Store::open(&url).await.unwrap();
        Self::on_with(dir, store, hosts, config).await
    }

    async fn on(dir: Option<tempfile::TempDir>, store: Store, hosts: &[Arc<FakeHost>]) -> Env {
        Self::on_with(dir, store, hosts, fast_config()).await
    }

    async fn on_with(
        dir: Option<tempfile::TempDir>,
        store: Store,
        hosts: &[Arc<FakeHost>],
        config: ControlPlaneConfig,
    ) -> Env {
        let tenant = store.ensure_tenant("default", None).await.unwrap();
        let key = crate::auth::create_key(&store, &tenant.id)
            .await
            .unwrap()
            .key;
        let cp = ControlPlane::new(store.clone(), config);
        for h in hosts {
            cp.attach_host(h.clone() as Arc<dyn Host>).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(crate::serve(cp.clone(), listener, std::future::pending()));
        Env {
            _dir: dir,
            store,
            cp,
            addr,
            key,
        }
    }

    async fn client_with(&self, key: Option<&str>) -> Client {
        let channel = Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let value = key.map(|k| format!("Bearer {k}").parse().unwrap());
        SandboxesClient::with_interceptor(channel, Key(value))
    }

    async fn client(&self) -> Client {
        let key = self.key.clone();
        self.client_with(Some(&key)).await
    }

    /// A second tenant's client.
    async fn other_tenant(&self, quotas: Option<TenantQuotas>) -> Client {
        let t = self.store.ensure_tenant("other", quotas).await.unwrap();
        let k = crate::auth::create_key(&self.store, &t.id)
            .await
            .unwrap()
            .key;
        self.client_with(Some(&k)).await
    }
}

fn create(image: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        image: image.into(),
        ..Default::default()
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn keys_are_required_and_checked(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let mut anon = env.client_with(None).await;
    let err = anon
        .list_sandboxes(ListSandboxesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = env.client_with(Some("somna_nope_nope")).await;
    assert_eq!(
        wrong
            .get_sandbox(GetSandboxRequest { id: "x".into() })
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

async fn create_validates_and_maps_errors(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    let err = c.create_sandbox(create("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("image"), "{}", err.message());
    let mut r = create("busybox");
    r.timeout_seconds = 10 * 365 * 24 * 3600;
    let err = c.create_sandbox(r).await.unwrap_err();
    assert!(
        err.message().starts_with("timeout_seconds"),
        "{}",
        err.message()
    );
    let err = c.create_sandbox(create("missing")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The failed create left no row.
    assert!(
        c.list_sandboxes(ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sandboxes
            .is_empty()
    );
}

async fn tenants_only_see_their_own_and_quotas_hold(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let mut a = env.client().await;
    let sb = a
        .create_sandbox(create("busybox"))
        .await
        .unwrap()
        .into_inner();
    let mut b = env
        .other_tenant(Some(TenantQuotas {
            max_sandboxes: 1,
            max_vcpus: 2,
            max_memory_mib: 1024,
        }))
        .await;
    let err = b
        .get_sandbox(GetSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        b.list_sandboxes(ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sandboxes
            .is_empty()
    );
    let exec = vec![ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            sandbox_id: sb.id.clone(),
            argv: vec!["true".into()],
            ..Default::default()
        })),
    }];
    assert_eq!(
        b.exec(futures::stream::iter(exec))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    b.create_sandbox(create("busybox")).await.unwrap();
    let err = b.create_sandbox(create("busybox")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("sandboxes"), "{}", err.message());
    let mut big = create("busybox");
    big.memory_mib = 4096;
    let mut c = env
        .other_tenant(Some(TenantQuotas {
            max_sandboxes: 10,
            max_vcpus: 2,
            max_memory_mib: 1024,
        }))
        .await;
    let err = c.create_sandbox(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("memory"), "{}", err.message());
}

async fn request_ids_make_creates_idempotent(db: &Db) {
    let host = FakeHost::new("h1");
    let env = Env::start(db, std::slice::from_ref(&host)).await;
    let mut c = env.client().await;
    let mut r = create("busybox");
    r.request_id = "req-1".into();
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(c2.create_sandbox(r.clone()), c.create_sandbox(r.clone()));
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(a.id, b.id);
    assert_eq!(a.request_id, "req-1");
    assert_eq!(host.count(), 1, "one VM for two retries");
}

async fn labels_filter_and_pages(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    for i in 0..5 {
        let mut r = create("busybox");
        r.labels
            .insert("team".into(), if i % 2 == 0 { "a" } else { "b" }.into());
        c.create_sandbox(r).await.unwrap();
    }
    let mut filter = ListSandboxesRequest::default();
    filter.labels.insert("team".into(), "a".into());
    let a = c.list_sandboxes(filter).await.unwrap().into_inner();
    assert_eq!(a.sandboxes.len(), 3);
    assert!(
        a.sandboxes
            .iter()
            .all(|s| s.labels.get("team").map(String::as_str) == Some("a"))
    );
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_sandboxes(ListSandboxesRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.sandboxes.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5);
    seen.dedup();
    assert_eq!(seen.len(), 5, "pages do not repeat");
    let err = c
        .list_sandboxes(ListSandboxesRequest {
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn timeouts_destroy_and_can_be_changed(db: &Db) {
    let host = FakeHost::new("h1");
    let env = Env::start(db, std::slice::from_ref(&host)).await;
    let mut c = env.client().await;
    let mut r = create("busybox");
    r.timeout_seconds = 3600;
    let sb = c.create_sandbox(r).await.unwrap().into_inner();
    assert!(sb.expires_at.is_some());
    let kept = c
        .create_sandbox(create("busybox"))
        .await
        .unwrap()
        .into_inner();
    let changed = c
        .set_sandbox_timeout(SetSandboxTimeoutRequest {
            id: sb.id.clone(),
            timeout_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(changed.expires_at.unwrap().seconds < sb.expires_at.unwrap().seconds);
    let gone = eventually(|| {
        let mut c = c.clone();
        let id = sb.id.clone();
        async move { c.get_sandbox(GetSandboxRequest { id }).await.is_err() }
    })
    .await;
    assert!(gone, "the sandbox outlived its timeout");
    assert_eq!(host.count(), 1);
    let cleared = c
        .set_sandbox_timeout(SetSandboxTimeoutRequest {
            id: kept.id.clone(),
            timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.expires_at.is_none());
}

async fn spread_places_on_the_emptier_host(db: &Db) {
    let (h1, h2) = (FakeHost::new("h1"), FakeHost::new("h2"));
    // Room for all 50 on the two 4-CPU, 8 GiB test hosts.
    let config = ControlPlaneConfig {
        overcommit: crate::scheduler::Overcommit {
            cpu: 8.0,
            memory: 2.0,
        },
        ..fast_config()
    };
    let env = Env::start_with(db, &[h1.clone(), h2.clone()], config).await;
    let mut c = env.client().await;
    for _ in 0..4 {
        c.create_sandbox(create("busybox")).await.unwrap();
    }
    assert_eq!((h1.count(), h2.count()), (2, 2));
}

async fn a_silent_host_loses_its_sandboxes_until_it_answers_again(db: &Db) {
    let host = FakeHost::new("h1");
    let env = Env::start(db, std::slice::from_ref(&host)).await;
    let mut c = env.client().await;
    let sb = c
        .create_sandbox(create("busybox"))
        .await
        .unwrap()
        .into_inner();
    host.down.store(true, Ordering::SeqCst);
    let state = |c: &Client| {
        let mut c = c.clone();
        let id = sb.id.clone();
        async move {
            c.get_sandbox(GetSandboxRequest { id })
                .await
                .map(|s| s.into_inner().state)
                .unwrap_or(-1)
        }
    };
    assert!(
        eventually(|| async { state(&c).await == SandboxState::Lost as i32 }).await,
        "not marked lost"
    );
    let exec = vec![ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            sandbox_id: sb.id.clone(),
            argv: vec!["true".into()],
            ..Default::default()
        })),
    }];
    let err = c.exec(futures::stream::iter(exec)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("lost"), "{}", err.message());
    host.down.store(false, Ordering::SeqCst);
    assert!(
        eventually(|| async { state(&c).await == SandboxState::Running as i32 }).await,
        "not recovered"
    );
}

/// What a control plane that died mid-call leaves: a row `creating` that
/// its host never got is forgotten once past the send grace (but not
/// while the host reports it under way), and a sandbox the host runs with
/// no row at all is destroyed once past the orphan grace.
async fn the_heartbeat_settles_creates_that_never_arrived_and_orphans(db: &Db) {
    let host = FakeHost::new("h1");
    let env = Env::start(db, std::slice::from_ref(&host)).await;
    let mut c = env.client().await;
    let real = c
        .create_sandbox(create("busybox"))
        .await
        .unwrap()
        .into_inner();
    let template = env.store.sandbox(None, &real.id).await.unwrap().unwrap();
    let stale = |id: &str| {
        let mut row = template.clone();
        row.id = id.into();
        row.record.id = id.into();
        row.state = "creating".into();
        row.request_id = None;
        row.created_ms = crate::store::now_ms() - 20_000;
        row
    };
    assert!(
        env.store
            .insert_sandbox(&stale("sbx-never-sent"))
            .await
            .unwrap()
    );
    assert!(
        env.store
            .insert_sandbox(&stale("sbx-slow-pull"))
            .await
            .unwrap()
    );
    host.under_way.lock().unwrap().push("sbx-slow-pull".into());
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    for (id, created) in [
        ("sbx-orphan", old),
        ("sbx-fresh", std::time::SystemTime::now()),
    ] {
        host.sandboxes.lock().unwrap().insert(
            id.into(),
            Sandbox {
                id: id.into(),
                state: SandboxState::Running as i32,
                created_at: Some(created.into()),
                ..Default::default()
            },
        );
    }
    let gone = |id: &'static str| {
        let store = env.store.clone();
        async move { store.sandbox(None, id).await.unwrap().is_none() }
    };
    assert!(
        eventually(|| gone("sbx-never-sent")).await,
        "the stale create was not forgotten"
    );
    assert!(
        eventually(|| async { !host.sandboxes.lock().unwrap().contains_key("sbx-orphan") }).await,
        "the orphan was not destroyed"
    );
    let slow = env
        .store
        .sandbox(None, "sbx-slow-pull")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slow.state, "creating", "a create under way is left alone");
    assert!(
        host.sandboxes.lock().unwrap().contains_key("sbx-fresh"),
        "a young sandbox is left alone"
    );
    assert!(host.sandboxes.lock().unwrap().contains_key(&real.id));
}

async fn a_restarted_control_plane_keeps_every_sandbox(db: &Db) {
    let host = FakeHost::new("h1");
    let env = Env::start(db, std::slice::from_ref(&host)).await;
    let mut c = env.client().await;
    let ids: Vec<String> = futures::future::join_all((0..3).map(|_| {
        let mut c = c.clone();
        async move {
            c.create_sandbox(create("busybox"))
                .await
                .unwrap()
                .into_inner()
                .id
        }
    }))
    .await;
    let slept = c
        .sleep_sandbox(SleepSandboxRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    // A new control plane on the same store, same host.
    let Env {
        _dir,
        store,
        key,
        cp,
        ..
    } = env;
    drop(cp);
    let env2 = Env::on(_dir, store, std::slice::from_ref(&host)).await;
    let mut c2 = env2.client_with(Some(&key)).await;
    let listed = c2
        .list_sandboxes(ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let mut got: Vec<String> = listed.iter().map(|s| s.id.clone()).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
    let first = listed.iter().find(|s| s.id == ids[0]).unwrap();
    assert_eq!(first.state, SandboxState::Sleeping as i32);
    c2.destroy_sandbox(DestroySandboxRequest { id: ids[1].clone() })
        .await
        .unwrap();
    assert_eq!(host.count(), 2);
    let _ = c;
}

async fn exec_relays_the_stream_and_checks_the_first_message(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    let sb = c
        .create_sandbox(create("busybox"))
        .await
        .unwrap()
        .into_inner();
    let msgs = vec![
        ExecRequest {
            msg: Some(exec_request::Msg::Start(ExecStart {
                sandbox_id: sb.id.clone(),
                argv: vec!["cat".into()],
                stdin: true,
                ..Default::default()
            })),
        },
        ExecRequest {
            msg: Some(exec_request::Msg::Stdin(b"abc".to_vec())),
        },
    ];
    let mut out = c
        .exec(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut stdout = Vec::new();
    while let Some(msg) = out.message().await.unwrap() {
        if let Some(exec_response::Event::Stdout(b)) = msg.event {
            stdout.extend(b);
        }
    }
    assert_eq!(stdout, b"catabc");
    let bad = vec![ExecRequest {
        msg: Some(exec_request::Msg::Stdin(b"x".to_vec())),
    }];
    assert_eq!(
        c.exec(futures::stream::iter(bad)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let empty = futures::stream::iter(Vec::<ExecRequest>::new());
    assert_eq!(
        c.exec(empty).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

async fn hosts_and_images_are_listed_for_callers(db: &Db) {
    let env = Env::start(db, &[FakeHost::new("h1")]).await;
    let channel = Channel::from_shared(env.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = Key(Some(format!("Bearer {}", env.key).parse().unwrap()));
    let mut hosts =
        somna_proto::v1::hosts_client::HostsClient::with_interceptor(channel.clone(), key.clone());
    let mut c = env.client().await;
    c.create_sandbox(create("busybox")).await.unwrap();
    let list = hosts
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.hosts.len(), 1);
    assert_eq!(
        (list.hosts[0].id.as_str(), list.hosts[0].state.as_str()),
        ("h1", "ready")
    );
    assert_eq!(
        (
            list.hosts[0].cpus_allocated,
            list.hosts[0].memory_allocated_mib
        ),
        (1, 512)
    );
    let mut images = somna_proto::v1::images_client::ImagesClient::with_interceptor(channel, key);
    assert_eq!(
        images
            .pull_image(PullImageRequest {
                reference: " ".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mut ev = images
        .pull_image(PullImageRequest {
            reference: "busybox".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        ev.message().await.unwrap().unwrap().event,
        Some(pull_image_event::Event::Done(_))
    ));
}

/// Each case as its own test on SQLite, and all of them in sequence on a
/// real PostgreSQL server the suite starts (a fresh database per case).
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Db::Sqlite).await
                }
            )*
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn suite_on_postgres() {
            let pg = somna_testkit::Postgres::start();
            $(
                let url = pg.database(stringify!($case));
                $case(&Db::Postgres(url)).await;
            )*
        }
    };
}

suite!(
    keys_are_required_and_checked,
    create_validates_and_maps_errors,
    tenants_only_see_their_own_and_quotas_hold,
    request_ids_make_creates_idempotent,
    labels_filter_and_pages,
    timeouts_destroy_and_can_be_changed,
    spread_places_on_the_emptier_host,
    a_silent_host_loses_its_sandboxes_until_it_answers_again,
    a_restarted_control_plane_keeps_every_sandbox,
    the_heartbeat_settles_creates_that_never_arrived_and_orphans,
    exec_relays_the_stream_and_checks_the_first_message,
    hosts_and_images_are_listed_for_callers,
    fifty_concurrent_creates_are_all_accounted_for
);

/// Two replicas on one PostgreSQL database, the same host attached to
/// both, creates racing through both: the host's capacity is never
/// handed out twice.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_never_place_the_same_capacity() {
    let pg = somna_testkit::Postgres::start();
    let db = Db::Postgres(pg.database("replicas"));
    let host = FakeHost::new("h1");
    // The fake host has 4 CPUs: with no overcommit, four 1-vCPU sandboxes.
    let config = ControlPlaneConfig {
        overcommit: crate::scheduler::Overcommit {
            cpu: 1.0,
            memory: 1.0,
        },
        ..fast_config()
    };
    let a = Env::start_with(&db, std::slice::from_ref(&host), config.clone()).await;
    let b = Env::start_with(&db, std::slice::from_ref(&host), config).await;
    let (ca, cb) = (a.client().await, b.client().await);
    let results = futures::future::join_all((0..12).map(|i| {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        async move { c.create_sandbox(create("busybox")).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("out of vCPUs"), "{}", e.message());
        }
    }
    assert_eq!(ok, 4, "exactly the host's capacity was placed");
    assert_eq!(host.count(), 4, "the host got one VM per placement");
    for mut c in [ca, cb] {
        let listed = c
            .list_sandboxes(ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sandboxes;
        assert_eq!(listed.len(), 4, "both replicas see the same sandboxes");
    }
}

/// 50 creates at once through the API: all placed, none lost or duplicated.
async fn fifty_concurrent_creates_are_all_accounted_for(db: &Db) {
    let (h1, h2) = (FakeHost::new("h1"), FakeHost::new("h2"));
    // Room for all 50 on the two 4-CPU, 8 GiB test hosts.
    let config = ControlPlaneConfig {
        overcommit: crate::scheduler::Overcommit {
            cpu: 8.0,
            memory: 2.0,
        },
        ..fast_config()
    };
    let env = Env::start_with(db, &[h1.clone(), h2.clone()], config).await;
    let c = env.client().await;
    let results = futures::future::join_all((0..50).map(|_| {
        let mut c = c.clone();
        async move {
            c.create_sandbox(create("busybox"))
                .await
                .map(|r| r.into_inner().id)
        }
    }))
    .await;
    let ids: std::collections::HashSet<String> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(ids.len(), 50, "no duplicate ids");
    assert_eq!(h1.count() + h2.count(), 50, "one VM each");
    let mut c = c;
    let listed = c
        .list_sandboxes(ListSandboxesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed.len(), 50);
}

/// A CA, a control-plane certificate for 127.0.0.1 and an agent client
/// certificate signed by it, plus a second CA's agent certificate; made
/// with the `openssl` CLI in `dir`.
fn test_certs(dir: &std::path::Path) {
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    for ca in ["ca", "rogue-ca"] {
        sh(&format!(
            "openssl req -x509 {key} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca}"
        ));
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "subjectAltName=DNS:agent\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, ca, ext) in [
        ("cp", "ca", "server"),
        ("agent", "ca", "client"),
        ("rogue", "rogue-ca", "client"),
    ] {
        sh(&format!(
            "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 -extfile {ext}.ext -out {name}.pem"
        ));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_join_over_mutual_tls_only_with_a_trusted_certificate() {
    use crate::tls::{self, TlsFiles};
    use crate::tunnel::{AgentTls, run_agent, serve_agents};
    let dir = tempfile::tempdir().unwrap();
    test_certs(dir.path());
    let p = |f: &str| dir.path().join(f);
    let env = Env::start(&Db::Sqlite, &[]).await;
    env.store
        .add_join_token(&crate::auth::hash("join-me"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tls::acceptor(&TlsFiles {
        cert: p("cp.pem"),
        key: p("cp.key"),
        ca: p("ca.pem"),
    })
    .unwrap();
    tokio::spawn(serve_agents(
        env.cp.clone(),
        listener,
        Some(acceptor),
        std::future::pending(),
    ));
    let join = |host: Arc<FakeHost>, cert: &str| {
        let connector = tls::connector(&TlsFiles {
            cert: p(&format!("{cert}.pem")),
            key: p(&format!("{cert}.key")),
            ca: p("ca.pem"),
        })
        .unwrap();
        let server_name = tls::server_name(&addr, None).unwrap();
        tokio::spawn(run_agent(
            addr.clone(),
            host.id.clone(),
            "join-me".into(),
            host as Arc<dyn Host>,
            Some(AgentTls {
                connector,
                server_name,
            }),
            std::future::pending(),
        ));
    };
    let good = FakeHost::new("trusted");
    join(good.clone(), "agent");
    let mut c = env.client().await;
    let placed = eventually(|| {
        let mut c = c.clone();
        async move { c.create_sandbox(create("busybox")).await.is_ok() }
    })
    .await;
    assert!(placed, "no sandbox could be placed on the TLS agent");
    assert_eq!(good.count(), 1);

    // What the control plane answers a greeting sent over `stream`.
    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut stream: S,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if stream
            .write_all(b"SOMNA-AGENT 1 intruder join-me\n")
            .await
            .is_err()
        {
            return "write failed".into();
        }
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => format!("error: {e}"),
        }
    }
    // Plain TCP: the TLS handshake fails, nothing is answered.
    let plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(!answer(plain).await.starts_with("OK"));
    // A client certificate from another CA: refused in the handshake.
    let rogue = tls::connector(&TlsFiles {
        cert: p("rogue.pem"),
        key: p("rogue.key"),
        ca: p("ca.pem"),
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let reply = match rogue
        .connect(tls::server_name(&addr, None).unwrap(), tcp)
        .await
    {
        Ok(stream) => answer(stream).await,
        Err(e) => format!("handshake error: {e}"),
    };
    assert!(
        !reply.starts_with("OK"),
        "a rogue agent was let in: {reply}"
    );
    // The trusted certificate gets the greeting answered.
    let trusted = tls::connector(&TlsFiles {
        cert: p("agent.pem"),
        key: p("agent.key"),
        ca: p("ca.pem"),
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let stream = trusted
        .connect(tls::server_name(&addr, None).unwrap(), tcp)
        .await
        .unwrap();
    // "OK\n", then the control plane's HTTP/2 preface may follow at once.
    let reply = answer(stream).await;
    assert!(reply.starts_with("OK\n"), "{reply:?}");
    let _ = &mut c;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ingress_serves_https_with_the_operator_certificate() {
    use crate::tls::{self, TlsFiles};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    test_certs(dir.path());
    let p = |f: &str| dir.path().join(f);
    let env = Env::start(&Db::Sqlite, &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = crate::IngressConfig {
        domain: "apps.test".into(),
        tls: Some(tls::server_config(&p("cp.pem"), &p("cp.key")).unwrap()),
    };
    tokio::spawn(crate::serve_ingress(
        env.cp.clone(),
        listener,
        config,
        std::future::pending(),
    ));
    let connector = tls::connector(&TlsFiles {
        cert: p("agent.pem"),
        key: p("agent.key"),
        ca: p("ca.pem"),
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = connector
        .connect(tls::server_name(&addr.to_string(), None).unwrap(), tcp)
        .await
        .expect("TLS handshake with the ingress certificate");
    s.write_all(b"GET / HTTP/1.1\r\nHost: nope.apps.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // A missing close_notify would only end the read early.
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let out = String::from_utf8_lossy(&raw);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("no app named nope"), "{out}");
    assert_eq!(
        env.cp.inner.apps.url("web"),
        format!("https://web.apps.test:{}/", addr.port())
    );
}
