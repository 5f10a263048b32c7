//! Apps end to end (`somna up --network`, root): busybox httpd replicas in
//! real microVMs behind the ingress; scale to zero, wake on request,
//! rolling redeploys, bad deploys, crashes and health checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use somna_netd::Egress;
use somna_netd::testing::Internet;
use somna_sdk::proto::{App, SandboxState};
use somna_sdk::{AppOptions, Client, Command};
use somna_testkit::{Cluster, ClusterOptions, Options, Platform, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A platform with networking; its egress is a namespace of its own
/// (apps need no internet). Field order: the platform goes first.
struct World {
    platform: Platform,
    _inet: Internet,
}

/// `--network` arguments for test `n`, and the namespace they use as
/// egress; None without root.
fn network_args(n: u8) -> Option<(Vec<String>, Internet)> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: apps need sandbox networking, which needs root");
        return None;
    }
    let inet = Internet::create(
        &format!("somnaf{n}"),
        format!("203.0.113.{}/30", 4 * u32::from(n))
            .parse()
            .unwrap(),
    )
    .expect("create the egress namespace");
    let Egress::Interface(uplink) = inet.egress() else {
        unreachable!("Internet::egress is an interface")
    };
    let args = [
        "--network",
        "--network-prefix",
        &format!("somnaa{n}"),
        "--network-subnet",
        &format!("100.125.{n}.0/24"),
        "--network-pool",
        "2",
        "--network-egress",
        &uplink,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Some((args, inet))
}

fn world(n: u8) -> Option<World> {
    let (args, inet) = network_args(n)?;
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.extra_args = args;
    Some(World {
        platform: Platform::start(o),
        _inet: inet,
    })
}

/// A busybox httpd serving `body` at / and /healthz, logging requests.
fn httpd(body: &str) -> AppOptions {
    let script = format!(
        "mkdir -p /www && echo {body} > /www/index.html && echo ok > /www/healthz && \
         echo starting-httpd && exec httpd -f -vv -p 8080 -h /www"
    );
    AppOptions::new("busybox", 8080).command(["sh", "-c", &script])
}

/// GET `path` of app `app` through the ingress: (status, body).
async fn get(ingress: &str, app: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = ingress.trim_start_matches("http://");
    let port = addr.rsplit(':').next().unwrap_or("80");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {app}.localhost:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn replica_states(app: &App) -> Vec<SandboxState> {
    app.replicas
        .iter()
        .map(|r| SandboxState::try_from(r.state).unwrap_or(SandboxState::Unspecified))
        .collect()
}

async fn all_asleep(client: &Client, name: &str) -> bool {
    let app = client.app(name).await.unwrap();
    !app.replicas.is_empty()
        && replica_states(&app)
            .iter()
            .all(|s| *s == SandboxState::Sleeping)
}

async fn logs(client: &Client, name: &str) -> String {
    use futures::StreamExt;
    let mut s = client.app_logs(name, false, 0).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend(c.unwrap().data);
    }
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_app_sleeps_and_the_next_requests_wake_it() {
    let Some(w) = world(40) else { return };
    let client = w.platform.client().await;
    let ingress = &w.platform.ingress;
    let app = client
        .deploy_app(
            "web",
            httpd("hello-somna")
                .idle_timeout(Duration::from_secs(3))
                .health_path("/healthz"),
        )
        .await
        .unwrap();
    assert_eq!(app.version, 1);
    assert!(app.url.starts_with("http://web.localhost:"), "{}", app.url);
    let (status, body) = get(ingress, "web", "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "hello-somna"));

    // Health checks run while it is awake, and it still goes to sleep.
    assert!(
        eventually(Duration::from_secs(60), || async {
            all_asleep(&client, "web").await
        })
        .await,
        "the app sleeps after its idle timeout"
    );
    let health_checks = logs(&client, "web").await.matches("url:/healthz").count();
    assert!(
        health_checks >= 2,
        "the platform health-checked the awake replica ({health_checks} checks)"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            w.platform.vmm_pids().is_empty()
        })
        .await,
        "a sleeping app has no VMM process"
    );

    let (status, body) = get(ingress, "web", "/").await.unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, "hello-somna"),
        "woken by a request"
    );

    assert!(
        eventually(Duration::from_secs(60), || async {
            all_asleep(&client, "web").await
        })
        .await,
        "asleep again"
    );
    let gets = (0..20).map(|_| get(ingress, "web", "/"));
    let results = futures::future::join_all(gets).await;
    for r in &results {
        let (status, body) = r.as_ref().unwrap();
        assert_eq!((*status, body.trim()), (200, "hello-somna"), "{results:?}");
    }
    let app = client.app("web").await.unwrap();
    assert_eq!(
        app.replicas.len(),
        1,
        "20 requests shared one wake: {app:?}"
    );

    client.delete_app("web").await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            w.platform.vm_dirs().is_empty()
        })
        .await,
        "deleting the app destroys its replicas"
    );
    let (status, _) = get(ingress, "web", "/").await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redeploy_under_continuous_requests_fails_none() {
    let Some(w) = world(41) else { return };
    let client = w.platform.client().await;
    let ingress = w.platform.ingress.clone();
    client
        .deploy_app("roll", httpd("version-one"))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (v1, v2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loops = Vec::new();
    for _ in 0..3 {
        let (stop, failures, v1, v2, ingress) = (
            stop.clone(),
            failures.clone(),
            v1.clone(),
            v2.clone(),
            ingress.clone(),
        );
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match get(&ingress, "roll", "/").await {
                    Ok((200, b)) if b.trim() == "version-one" => {
                        v1.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((200, b)) if b.trim() == "version-two" => {
                        v2.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            v1.load(Ordering::SeqCst) > 5
        })
        .await
    );
    let app = client
        .deploy_app("roll", httpd("version-two"))
        .await
        .unwrap();
    assert_eq!(app.version, 2);
    assert!(
        eventually(Duration::from_secs(30), || async {
            v2.load(Ordering::SeqCst) > 5
        })
        .await,
        "the new version serves"
    );
    // The old replica is drained and destroyed.
    assert!(
        eventually(Duration::from_secs(60), || async {
            let app = client.app("roll").await.unwrap();
            app.replicas.iter().all(|r| r.version == 2)
        })
        .await,
        "only version 2 replicas remain"
    );
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests during the redeploy (v1 {}, v2 {}): {:?}",
        failures.len(),
        v1.load(Ordering::SeqCst),
        v2.load(Ordering::SeqCst),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_deploys_fail_with_logs_and_crashes_get_502_then_a_new_replica() {
    let Some(w) = world(42) else { return };
    let client = w.platform.client().await;
    let ingress = &w.platform.ingress;

    // An app that exits: the deploy fails with its output, nothing remains.
    let exits = AppOptions::new("busybox", 8080).command(["sh", "-c", "echo boom-marker; exit 3"]);
    let err = client.deploy_app("bad", exits).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("boom-marker"), "{text}");
    assert!(text.contains("exited"), "{text}");
    assert!(client.list_apps().await.unwrap().is_empty());
    assert!(
        w.platform.vm_dirs().is_empty(),
        "the failed replica is gone"
    );

    // Unknown app and unknown domain: 404 with a reason.
    let (status, body) = get(ingress, "nope", "/").await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("no app named nope"), "{body}");

    // A version that never listens: the old one keeps serving.
    client.deploy_app("keep", httpd("still-v1")).await.unwrap();
    let quiet = AppOptions::new("busybox", 8080)
        .command(["sh", "-c", "echo quiet-marker; exec sleep 1000"])
        .ready_timeout(Duration::from_secs(5));
    let err = client.deploy_app("keep", quiet).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("quiet-marker") && text.contains("8080"),
        "{text}"
    );
    let (status, body) = get(ingress, "keep", "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "still-v1"));
    let app = client.app("keep").await.unwrap();
    assert_eq!(app.version, 1);
    assert!(
        app.last_error.contains("quiet-marker"),
        "{}",
        app.last_error
    );

    // The app crashes: 502 with a reason, then a new replica serves.
    let crashed = app.replicas[0].sandbox_id.clone();
    let out = client
        .sandbox(&crashed)
        .await
        .unwrap()
        .exec(Command::from_argv(["killall", "httpd"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let (status, body) = get(ingress, "keep", "/").await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("port 8080"), "{body}");
    assert!(
        eventually(Duration::from_secs(120), || async {
            matches!(get(ingress, "keep", "/").await, Ok((200, ref b)) if b.trim() == "still-v1")
        })
        .await,
        "a replacement replica serves"
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            let app = client.app("keep").await.unwrap();
            app.replicas.iter().all(|r| r.sandbox_id != crashed)
        })
        .await,
        "the crashed replica is destroyed once its replacement serves"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_on_a_joined_host_are_served_through_its_tunnel() {
    let Some((args, _inet)) = network_args(43) else {
        return;
    };
    let mut o = ClusterOptions::new(env!("CARGO_BIN_EXE_somna"), 1);
    o.agent_args = args;
    let cluster = Cluster::start(o);
    cluster.wait_for_hosts(1);
    let client = cluster.client(0).await;
    let ingress = &cluster.ingress[0];
    let app = client
        .deploy_app("far", httpd("from-afar").health_path("/healthz"))
        .await
        .unwrap();
    let (status, body) = get(ingress, "far", "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "from-afar"));
    // A sleeping replica on the remote host is woken by the request.
    let id = &app.replicas[0].sandbox_id;
    client.sleep_sandbox(id).await.unwrap();
    let (status, body) = get(ingress, "far", "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "from-afar"));
    // Health checks reach it through the tunnel too.
    assert!(
        eventually(Duration::from_secs(30), || async {
            logs(&client, "far").await.matches("url:/healthz").count() >= 2
        })
        .await,
        "health checks over the tunnel"
    );
    client.delete_app("far").await.unwrap();
}

/// Serves `handle(conn)` (python, defined in `handler`) on port 8080, one
/// thread per connection.
fn python_server(handler: &str) -> String {
    format!(
        "{handler}\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind((\"0.0.0.0\", 8080))\ns.listen(64)\nwhile True:\n    c, _ = s.accept()\n    \
         threading.Thread(target=handle, args=(c,), daemon=True).start()\n"
    )
}

/// A python server for streaming: /events sends one Server-Sent Event,
/// then a second once /tmp/go exists; `Upgrade` requests get a 101 and
/// then an upper-casing echo.
const STREAMER: &str = r#"
import os, socket, threading, time
def handle(c):
    f = c.makefile("rb")
    request = f.readline().decode()
    headers = {}
    while True:
        h = f.readline().decode().strip()
        if not h:
            break
        k, v = h.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    if headers.get("upgrade"):
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: somna-echo\r\nConnection: Upgrade\r\n\r\n")
        while True:
            b = c.recv(4096)
            if not b:
                break
            c.sendall(b.upper())
    elif request.split()[1] == "/events":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: first\n\n")
        while not os.path.exists("/tmp/go"):
            time.sleep(0.05)
        c.sendall(b"data: second\n\n")
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
    c.close()
"#;

/// Reads from `s` into `buf` until `needle` appears (30 s at most).
async fn read_until(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &str) -> bool {
    let found = |b: &[u8]| String::from_utf8_lossy(b).contains(needle);
    let read = async {
        let mut chunk = [0u8; 4096];
        while !found(buf) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), read).await;
    found(buf)
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_stream_and_upgrades_are_spliced() {
    let Some(w) = world(44) else { return };
    let client = w.platform.client().await;
    let ingress = w.platform.ingress.trim_start_matches("http://").to_string();
    let port = ingress.rsplit(':').next().unwrap().to_string();
    let app = client
        .deploy_app(
            "stream",
            AppOptions::new("python", 8080).command(["python3", "-c", &python_server(STREAMER)]),
        )
        .await
        .unwrap();
    let replica = client.sandbox(&app.replicas[0].sandbox_id).await.unwrap();

    // SSE: the first event arrives while the app still holds the second.
    let mut s = tokio::net::TcpStream::connect(&ingress).await.unwrap();
    let req = format!(
        "GET /events HTTP/1.1\r\nHost: stream.localhost:{port}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    assert!(
        read_until(&mut s, &mut buf, "data: first").await,
        "the first event streams through before the response ends: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(!String::from_utf8_lossy(&buf).contains("second"));
    replica.write_file("/tmp/go", b"go".to_vec()).await.unwrap();
    assert!(
        read_until(&mut s, &mut buf, "data: second").await,
        "{:?}",
        String::from_utf8_lossy(&buf)
    );

    // Upgrade: 101, then bytes both ways on the same connection.
    let mut s = tokio::net::TcpStream::connect(&ingress).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: stream.localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: somna-echo\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    assert!(
        read_until(&mut s, &mut buf, "\r\n\r\n").await,
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    s.write_all(b"hello through the ingress").await.unwrap();
    let mut echoed = Vec::new();
    assert!(
        read_until(&mut s, &mut echoed, "HELLO THROUGH THE INGRESS").await,
        "{:?}",
        String::from_utf8_lossy(&echoed)
    );
    client.delete_app("stream").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn load_above_the_target_adds_a_replica_and_quiet_removes_it() {
    let Some(w) = world(45) else { return };
    let client = w.platform.client().await;
    let ingress = w.platform.ingress.clone();
    // /slow answers after /tmp/release exists in the replica that got it,
    // so requests stay in flight as long as the test wants.
    let slow = r#"
import os, socket, threading, time
def handle(c):
    f = c.makefile("rb")
    path = f.readline().decode().split()[1]
    while f.readline().strip():
        pass
    if path == "/slow":
        while not os.path.exists("/tmp/release"):
            time.sleep(0.05)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
    c.close()
"#;
    let mut opts = AppOptions::new("python", 8080)
        .command(["python3", "-c", &python_server(slow)])
        .replicas(0, 2)
        .idle_timeout(Duration::from_secs(3));
    opts.target_in_flight = 1;
    let app = client.deploy_app("scale", opts).await.unwrap();
    assert_eq!(app.replicas.len(), 1);
    let first = client.sandbox(&app.replicas[0].sandbox_id).await.unwrap();

    // Three requests held in flight on one replica: above the target of 1.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let ingress = ingress.clone();
            tokio::spawn(async move { get(&ingress, "scale", "/slow").await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(120), || async {
            let app = client.app("scale").await.unwrap();
            app.replicas.len() == 2 && app.replicas.iter().all(|r| r.ready)
        })
        .await,
        "a second replica is added under load"
    );
    first
        .write_file("/tmp/release", b"go".to_vec())
        .await
        .unwrap();
    for h in held {
        let (status, _) = h.await.unwrap().unwrap();
        assert_eq!(status, 200);
    }
    // No requests for the idle timeout: back to one replica.
    assert!(
        eventually(Duration::from_secs(120), || async {
            client.app("scale").await.unwrap().replicas.len() == 1
        })
        .await,
        "the extra replica is removed when load falls"
    );
    let (status, body) = get(&ingress, "scale", "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
}
