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
    down: AtomicBool,
}

impl FakeHost {
    fn new(id: &str) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            id: id.into(),
            sandboxes: Mutex::new(HashMap::new()),
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
        self.sandboxes.lock().unwrap().get(id).cloned().ok_or_else(|| Status::not_found(id.to_string()))
    }
    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, Status> {
        self.check()?;
        Ok(self.sandboxes.lock().unwrap().values().cloned().collect())
    }
    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status> {
        self.check()?;
        self.sandboxes.lock().unwrap().remove(id).map(|_| ()).ok_or_else(|| Status::not_found(id.to_string()))
    }
    async fn sleep_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        self.check()?;
        let mut m = self.sandboxes.lock().unwrap();
        let s = m.get_mut(id).ok_or_else(|| Status::not_found(id.to_string()))?;
        s.state = SandboxState::Sleeping as i32;
        Ok(s.clone())
    }
    async fn wake_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        self.check()?;
        let mut m = self.sandboxes.lock().unwrap();
        let s = m.get_mut(id).ok_or_else(|| Status::not_found(id.to_string()))?;
        s.state = SandboxState::Running as i32;
        Ok(s.clone())
    }
    async fn info(&self) -> Result<somna_proto::v1::Host, Status> {
        self.check()?;
        Ok(somna_proto::v1::Host {
            id: self.id.clone(),
            cpus: 4,
            memory_mib: 8192,
            ..Default::default()
        })
    }
    async fn pull_image(&self, reference: String) -> Result<StatusStream<PullImageEvent>, Status> {
        let done = PullImageEvent {
            event: Some(pull_image_event::Event::Done(PullDone { reference, ..Default::default() })),
        };
        Ok(futures::stream::iter(vec![Ok(done)]).boxed())
    }
    async fn list_images(&self) -> Result<ListImagesResponse, Status> {
        Ok(ListImagesResponse::default())
    }
    async fn remove_image(&self, reference: &str) -> Result<RemoveImageResponse, Status> {
        Err(Status::not_found(format!("image {reference} not found")))
    }
    async fn exec(&self, start: ExecStart, rest: BoxStream<'static, ExecRequest>) -> Result<StatusStream<ExecResponse>, Status> {
        // Echo: argv joined, then every stdin chunk, then exit 0.
        let head = ExecResponse { event: Some(exec_response::Event::Stdout(start.argv.join(" ").into_bytes())) };
        let echoed = rest.filter_map(|m| async move {
            match m.msg {
                Some(exec_request::Msg::Stdin(b)) => Some(Ok(ExecResponse { event: Some(exec_response::Event::Stdout(b)) })),
                _ => None,
            }
        });
        let exit = ExecResponse { event: Some(exec_response::Event::Exit(ExecExit::default())) };
        Ok(futures::stream::once(async { Ok(head) }).chain(echoed).chain(futures::stream::once(async { Ok(exit) })).boxed())
    }
    async fn read_file(&self, _req: ReadFileRequest) -> Result<StatusStream<FileChunk>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn write_file(&self, start: WriteFileStart, rest: BoxStream<'static, WriteFileRequest>) -> Result<WriteFileResponse, Status> {
        let size: usize = rest
            .map(|m| match m.msg {
                Some(write_file_request::Msg::Data(d)) => d.len(),
                _ => 0,
            })
            .fold(0, |a, b| async move { a + b })
            .await;
        Ok(WriteFileResponse { file: Some(FileInfo { path: start.path, size: size as u64, ..Default::default() }) })
    }
    async fn stat_file(&self, req: StatFileRequest) -> Result<FileInfo, Status> {
        Ok(FileInfo { path: req.path, ..Default::default() })
    }
    async fn list_files(&self, _req: ListFilesRequest) -> Result<ListFilesResponse, Status> {
        Ok(ListFilesResponse::default())
    }
    async fn make_dir(&self, req: MakeDirRequest) -> Result<FileInfo, Status> {
        Ok(FileInfo { path: req.path, ..Default::default() })
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

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    cp: ControlPlane,
    addr: String,
    key: String,
}

impl Env {
    async fn start(hosts: &[Arc<FakeHost>]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("state.db").display())).await.unwrap();
        Self::on(dir, store, hosts).await
    }

    async fn on(dir: tempfile::TempDir, store: Store, hosts: &[Arc<FakeHost>]) -> Env {
        let tenant = store.ensure_tenant("default", None).await.unwrap();
        let key = crate::auth::create_key(&store, &tenant.id).await.unwrap().key;
        let config = ControlPlaneConfig {
            heartbeat: Duration::from_millis(100),
            lost_after: Duration::from_millis(600),
            ..Default::default()
        };
        let cp = ControlPlane::new(store.clone(), config);
        for h in hosts {
            cp.attach_host(h.clone() as Arc<dyn Host>).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(crate::serve(cp.clone(), listener, std::future::pending()));
        Env { _dir: dir, store, cp, addr, key }
    }

    async fn client_with(&self, key: Option<&str>) -> Client {
        let channel = Channel::from_shared(self.addr.clone()).unwrap().connect().await.unwrap();
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
        let k = crate::auth::create_key(&self.store, &t.id).await.unwrap().key;
        self.client_with(Some(&k)).await
    }
}

fn create(image: &str) -> CreateSandboxRequest {
    CreateSandboxRequest { image: image.into(), ..Default::default() }
}

async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn keys_are_required_and_checked() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let mut anon = env.client_with(None).await;
    let err = anon.list_sandboxes(ListSandboxesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = env.client_with(Some("somna_nope_nope")).await;
    assert_eq!(wrong.get_sandbox(GetSandboxRequest { id: "x".into() }).await.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn create_validates_and_maps_errors() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    let err = c.create_sandbox(create("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("image"), "{}", err.message());
    let mut r = create("busybox");
    r.timeout_seconds = 10 * 365 * 24 * 3600;
    let err = c.create_sandbox(r).await.unwrap_err();
    assert!(err.message().starts_with("timeout_seconds"), "{}", err.message());
    let err = c.create_sandbox(create("missing")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The failed create left no row.
    assert!(c.list_sandboxes(ListSandboxesRequest::default()).await.unwrap().into_inner().sandboxes.is_empty());
}

#[tokio::test]
async fn tenants_only_see_their_own_and_quotas_hold() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let mut a = env.client().await;
    let sb = a.create_sandbox(create("busybox")).await.unwrap().into_inner();
    let mut b = env.other_tenant(Some(TenantQuotas { max_sandboxes: 1, max_vcpus: 2, max_memory_mib: 1024 })).await;
    let err = b.get_sandbox(GetSandboxRequest { id: sb.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(b.list_sandboxes(ListSandboxesRequest::default()).await.unwrap().into_inner().sandboxes.is_empty());
    let exec = vec![ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart { sandbox_id: sb.id.clone(), argv: vec!["true".into()], ..Default::default() })),
    }];
    assert_eq!(b.exec(futures::stream::iter(exec)).await.unwrap_err().code(), Code::NotFound);

    b.create_sandbox(create("busybox")).await.unwrap();
    let err = b.create_sandbox(create("busybox")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("sandboxes"), "{}", err.message());
    let mut big = create("busybox");
    big.memory_mib = 4096;
    let mut c = env.other_tenant(Some(TenantQuotas { max_sandboxes: 10, max_vcpus: 2, max_memory_mib: 1024 })).await;
    let err = c.create_sandbox(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("memory"), "{}", err.message());
}

#[tokio::test]
async fn request_ids_make_creates_idempotent() {
    let host = FakeHost::new("h1");
    let env = Env::start(&[host.clone()]).await;
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

#[tokio::test]
async fn labels_filter_and_pages() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    for i in 0..5 {
        let mut r = create("busybox");
        r.labels.insert("team".into(), if i % 2 == 0 { "a" } else { "b" }.into());
        c.create_sandbox(r).await.unwrap();
    }
    let mut filter = ListSandboxesRequest::default();
    filter.labels.insert("team".into(), "a".into());
    let a = c.list_sandboxes(filter).await.unwrap().into_inner();
    assert_eq!(a.sandboxes.len(), 3);
    assert!(a.sandboxes.iter().all(|s| s.labels.get("team").map(String::as_str) == Some("a")));
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_sandboxes(ListSandboxesRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
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
        .list_sandboxes(ListSandboxesRequest { page_token: "bogus".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn timeouts_destroy_and_can_be_changed() {
    let host = FakeHost::new("h1");
    let env = Env::start(&[host.clone()]).await;
    let mut c = env.client().await;
    let mut r = create("busybox");
    r.timeout_seconds = 3600;
    let sb = c.create_sandbox(r).await.unwrap().into_inner();
    assert!(sb.expires_at.is_some());
    let kept = c.create_sandbox(create("busybox")).await.unwrap().into_inner();
    let changed = c
        .set_sandbox_timeout(SetSandboxTimeoutRequest { id: sb.id.clone(), timeout_seconds: 1 })
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
        .set_sandbox_timeout(SetSandboxTimeoutRequest { id: kept.id.clone(), timeout_seconds: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.expires_at.is_none());
}

#[tokio::test]
async fn spread_places_on_the_emptier_host() {
    let (h1, h2) = (FakeHost::new("h1"), FakeHost::new("h2"));
    let env = Env::start(&[h1.clone(), h2.clone()]).await;
    let mut c = env.client().await;
    for _ in 0..4 {
        c.create_sandbox(create("busybox")).await.unwrap();
    }
    assert_eq!((h1.count(), h2.count()), (2, 2));
}

#[tokio::test]
async fn a_silent_host_loses_its_sandboxes_until_it_answers_again() {
    let host = FakeHost::new("h1");
    let env = Env::start(&[host.clone()]).await;
    let mut c = env.client().await;
    let sb = c.create_sandbox(create("busybox")).await.unwrap().into_inner();
    host.down.store(true, Ordering::SeqCst);
    let state = |c: &Client| {
        let mut c = c.clone();
        let id = sb.id.clone();
        async move { c.get_sandbox(GetSandboxRequest { id }).await.map(|s| s.into_inner().state).unwrap_or(-1) }
    };
    assert!(eventually(|| async { state(&c).await == SandboxState::Lost as i32 }).await, "not marked lost");
    let exec = vec![ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart { sandbox_id: sb.id.clone(), argv: vec!["true".into()], ..Default::default() })),
    }];
    let err = c.exec(futures::stream::iter(exec)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("lost"), "{}", err.message());
    host.down.store(false, Ordering::SeqCst);
    assert!(eventually(|| async { state(&c).await == SandboxState::Running as i32 }).await, "not recovered");
}

#[tokio::test]
async fn a_restarted_control_plane_keeps_every_sandbox() {
    let host = FakeHost::new("h1");
    let env = Env::start(&[host.clone()]).await;
    let mut c = env.client().await;
    let ids: Vec<String> = futures::future::join_all((0..3).map(|_| {
        let mut c = c.clone();
        async move { c.create_sandbox(create("busybox")).await.unwrap().into_inner().id }
    }))
    .await;
    let slept = c.sleep_sandbox(SleepSandboxRequest { id: ids[0].clone() }).await.unwrap().into_inner();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    // A new control plane on the same store, same host.
    let Env { _dir, store, key, cp, .. } = env;
    drop(cp);
    let env2 = Env::on(_dir, store, &[host.clone()]).await;
    let mut c2 = env2.client_with(Some(&key)).await;
    let listed = c2.list_sandboxes(ListSandboxesRequest::default()).await.unwrap().into_inner().sandboxes;
    let mut got: Vec<String> = listed.iter().map(|s| s.id.clone()).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
    let first = listed.iter().find(|s| s.id == ids[0]).unwrap();
    assert_eq!(first.state, SandboxState::Sleeping as i32);
    c2.destroy_sandbox(DestroySandboxRequest { id: ids[1].clone() }).await.unwrap();
    assert_eq!(host.count(), 2);
    let _ = c;
}

#[tokio::test]
async fn exec_relays_the_stream_and_checks_the_first_message() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let mut c = env.client().await;
    let sb = c.create_sandbox(create("busybox")).await.unwrap().into_inner();
    let msgs = vec![
        ExecRequest {
            msg: Some(exec_request::Msg::Start(ExecStart {
                sandbox_id: sb.id.clone(),
                argv: vec!["cat".into()],
                stdin: true,
                ..Default::default()
            })),
        },
        ExecRequest { msg: Some(exec_request::Msg::Stdin(b"abc".to_vec())) },
    ];
    let mut out = c.exec(futures::stream::iter(msgs)).await.unwrap().into_inner();
    let mut stdout = Vec::new();
    while let Some(msg) = out.message().await.unwrap() {
        if let Some(exec_response::Event::Stdout(b)) = msg.event {
            stdout.extend(b);
        }
    }
    assert_eq!(stdout, b"catabc");
    let bad = vec![ExecRequest { msg: Some(exec_request::Msg::Stdin(b"x".to_vec())) }];
    assert_eq!(c.exec(futures::stream::iter(bad)).await.unwrap_err().code(), Code::InvalidArgument);
    let empty = futures::stream::iter(Vec::<ExecRequest>::new());
    assert_eq!(c.exec(empty).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn hosts_and_images_are_listed_for_callers() {
    let env = Env::start(&[FakeHost::new("h1")]).await;
    let channel = Channel::from_shared(env.addr.clone()).unwrap().connect().await.unwrap();
    let key = Key(Some(format!("Bearer {}", env.key).parse().unwrap()));
    let mut hosts = somna_proto::v1::hosts_client::HostsClient::with_interceptor(channel.clone(), key.clone());
    let mut c = env.client().await;
    c.create_sandbox(create("busybox")).await.unwrap();
    let list = hosts.list_hosts(ListHostsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.hosts.len(), 1);
    assert_eq!((list.hosts[0].id.as_str(), list.hosts[0].state.as_str()), ("h1", "ready"));
    assert_eq!((list.hosts[0].cpus_allocated, list.hosts[0].memory_allocated_mib), (1, 512));
    let mut images = somna_proto::v1::images_client::ImagesClient::with_interceptor(channel, key);
    assert_eq!(images.pull_image(PullImageRequest { reference: " ".into() }).await.unwrap_err().code(), Code::InvalidArgument);
    let mut ev = images.pull_image(PullImageRequest { reference: "busybox".into() }).await.unwrap().into_inner();
    assert!(matches!(ev.message().await.unwrap().unwrap().event, Some(pull_image_event::Event::Done(_))));
}
