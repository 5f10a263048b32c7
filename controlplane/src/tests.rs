//! Control-plane tests against a recording test double of a host, through
//! the real gRPC server on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use somna_proto::v1::sandboxes_client::SandboxesClient;
use somna_proto::v1::*;
use tonic::{Code, Status};

use crate::{ControlPlane, Host, StatusStream};

#[derive(Default)]
struct FakeHost {
    created: Mutex<Vec<String>>,
    destroyed: Mutex<Vec<String>>,
    notify: tokio::sync::Notify,
}

impl FakeHost {
    fn destroyed(&self) -> Vec<String> {
        self.destroyed.lock().unwrap().clone()
    }
    fn live(&self) -> Vec<String> {
        let destroyed = self.destroyed();
        self.created
            .lock()
            .unwrap()
            .iter()
            .filter(|id| !destroyed.contains(id))
            .cloned()
            .collect()
    }
}

fn sandbox(id: &str) -> Sandbox {
    Sandbox {
        id: id.into(),
        image: "busybox".into(),
        state: SandboxState::Running as i32,
        ..Default::default()
    }
}

#[async_trait]
impl Host for FakeHost {
    fn id(&self) -> &str {
        "fake"
    }
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<Sandbox, Status> {
        if req.image == "missing" {
            return Err(Status::not_found("image missing not found"));
        }
        let mut created = self.created.lock().unwrap();
        let id = format!("sbx-{}", created.len());
        created.push(id.clone());
        Ok(sandbox(&id))
    }
    async fn get_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        Ok(sandbox(id))
    }
    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, Status> {
        Ok(self.live().iter().map(|id| sandbox(id)).collect())
    }
    async fn destroy_sandbox(&self, id: &str) -> Result<(), Status> {
        self.destroyed.lock().unwrap().push(id.to_string());
        self.notify.notify_waiters();
        Ok(())
    }
    async fn sleep_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        let mut s = sandbox(id);
        s.state = SandboxState::Sleeping as i32;
        Ok(s)
    }
    async fn wake_sandbox(&self, id: &str) -> Result<Sandbox, Status> {
        Ok(sandbox(id))
    }
    async fn info(&self) -> Result<somna_proto::v1::Host, Status> {
        Ok(somna_proto::v1::Host {
            id: "fake".into(),
            sandboxes_running: self.live().len() as u32,
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

async fn start() -> (Arc<FakeHost>, SandboxesClient<tonic::transport::Channel>) {
    let (host, client, _) = start_with_addr().await;
    (host, client)
}

async fn start_with_addr() -> (
    Arc<FakeHost>,
    SandboxesClient<tonic::transport::Channel>,
    String,
) {
    let host = Arc::new(FakeHost::default());
    let cp = ControlPlane::new(vec![host.clone() as Arc<dyn Host>]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::serve(cp, listener, std::future::pending()));
    let client = SandboxesClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (host, client, format!("http://{addr}"))
}

fn create(image: &str, timeout_seconds: u64) -> CreateSandboxRequest {
    CreateSandboxRequest {
        image: image.into(),
        timeout_seconds,
        ..Default::default()
    }
}

#[tokio::test]
async fn create_validates_and_maps_errors() {
    let (_host, mut client) = start().await;
    let err = client.create_sandbox(create("", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("image"), "{}", err.message());

    let err = client
        .create_sandbox(create("busybox", 10 * 365 * 24 * 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("timeout_seconds"),
        "{}",
        err.message()
    );

    let err = client
        .create_sandbox(create("missing", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn unknown_sandbox_is_not_found_and_empty_id_is_invalid() {
    let (_host, mut client) = start().await;
    let err = client
        .get_sandbox(GetSandboxRequest {
            id: "sbx-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("sbx-nope"));
    let err = client
        .stat_file(StatFileRequest {
            sandbox_id: String::new(),
            path: "/".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .destroy_sandbox(DestroySandboxRequest {
            id: "sbx-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn timeout_destroys_the_sandbox() {
    let (host, mut client) = start().await;
    let sb = client
        .create_sandbox(create("busybox", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(sb.expires_at.is_some());
    let kept = client
        .create_sandbox(create("busybox", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(kept.expires_at.is_none());

    // Wait for the destroy notification (bounded), not a fixed sleep.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !host.destroyed().contains(&sb.id) {
            let notified = host.notify.notified();
            if host.destroyed().contains(&sb.id) {
                break;
            }
            notified.await;
        }
    })
    .await
    .expect("the sandbox was not destroyed after its timeout");
    let err = client
        .get_sandbox(GetSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let list = client
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.sandboxes
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>(),
        vec![kept.id]
    );
}

#[tokio::test]
async fn destroy_cancels_the_timeout() {
    let (host, mut client) = start().await;
    let sb = client
        .create_sandbox(create("busybox", 1))
        .await
        .unwrap()
        .into_inner();
    client
        .destroy_sandbox(DestroySandboxRequest { id: sb.id.clone() })
        .await
        .unwrap();
    // Give the (cancelled) timer more than its time; it must not destroy again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(host.destroyed(), vec![sb.id]);
}

#[tokio::test]
async fn exec_relays_the_stream_and_checks_the_first_message() {
    let (_host, mut client) = start().await;
    let sb = client
        .create_sandbox(create("busybox", 0))
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
    let mut out = client
        .exec(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut stdout = Vec::new();
    let mut exited = false;
    while let Some(msg) = out.message().await.unwrap() {
        match msg.event {
            Some(exec_response::Event::Stdout(b)) => stdout.extend(b),
            Some(exec_response::Event::Exit(_)) => exited = true,
            _ => {}
        }
    }
    assert_eq!(stdout, b"catabc");
    assert!(exited);

    // A stream that does not start with `start` is rejected.
    let bad = vec![ExecRequest {
        msg: Some(exec_request::Msg::Stdin(b"x".to_vec())),
    }];
    let err = client.exec(futures::stream::iter(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // An empty stream too.
    let err = client
        .exec(futures::stream::iter(Vec::<ExecRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn write_file_relays_chunks() {
    let (_host, mut client) = start().await;
    let sb = client
        .create_sandbox(create("busybox", 0))
        .await
        .unwrap()
        .into_inner();
    let mut msgs = vec![WriteFileRequest {
        msg: Some(write_file_request::Msg::Start(WriteFileStart {
            sandbox_id: sb.id.clone(),
            path: "/tmp/x".into(),
            ..Default::default()
        })),
    }];
    for _ in 0..4 {
        msgs.push(WriteFileRequest {
            msg: Some(write_file_request::Msg::Data(vec![7u8; 1000])),
        });
    }
    let info = client
        .write_file(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.file.unwrap().size, 4000);
}

#[tokio::test]
async fn sleep_wake_and_hosts_are_relayed() {
    let (_host, mut client, addr) = start_with_addr().await;
    let sb = client
        .create_sandbox(create("busybox", 0))
        .await
        .unwrap()
        .into_inner();
    let slept = client
        .sleep_sandbox(SleepSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    let err = client
        .wake_sandbox(WakeSandboxRequest {
            id: "sbx-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut hosts = somna_proto::v1::hosts_client::HostsClient::connect(addr)
        .await
        .unwrap();
    let list = hosts
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.hosts.len(), 1);
    assert_eq!(list.hosts[0].id, "fake");
    assert_eq!(list.hosts[0].sandboxes_running, 1);
}

#[tokio::test]
async fn image_calls_are_relayed_to_the_host() {
    let (_host, _client, addr) = start_with_addr().await;
    let mut images = somna_proto::v1::images_client::ImagesClient::connect(addr)
        .await
        .unwrap();
    let err = images
        .pull_image(PullImageRequest {
            reference: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut events = images
        .pull_image(PullImageRequest {
            reference: "busybox".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert!(
        matches!(first.event, Some(pull_image_event::Event::Done(d)) if d.reference == "busybox")
    );
    let err = images
        .remove_image(RemoveImageRequest {
            reference: "gone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
