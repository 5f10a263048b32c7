//! Test harness: starts the agent in dev mode and connects a tonic client to
//! its Unix socket. The agent process is killed when the harness is dropped,
//! also when a test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use somna_proto::guest::v1::guest_agent_client::GuestAgentClient;
use somna_proto::v1::exec_request::Msg;
use somna_proto::v1::exec_response::Event;
use somna_proto::v1::{ExecExit, ExecRequest, ExecResponse, ExecStart};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint, Uri};

pub const SANDBOX_ID: &str = "test-sandbox";

pub type Client = GuestAgentClient<Channel>;

/// A running dev-mode agent.
pub struct Agent {
    child: Option<Child>,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `somna-guest-agent serve --root ROOT` and waits until it says
    /// it is serving.
    pub fn start(root: &Path) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir for the socket");
        let socket = dir.path().join("agent.sock");
        // SOMNA_GUEST_AGENT_BIN runs the suite against another build (e.g.
        // the static release binary).
        let bin = std::env::var_os("SOMNA_GUEST_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_somna-guest-agent")));
        let mut child = Command::new(bin)
            .args(["serve", "--root"])
            .arg(root)
            .arg("--listen")
            .arg(&socket)
            .args(["--sandbox-id", SANDBOX_ID, "--log", "debug"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let mut agent = Agent {
            child: Some(child),
            socket,
            _dir: dir,
        };
        // Forward the agent's log to the test output, and report when it is
        // listening.
        let (ready_tx, ready_rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[agent] {line}");
                if line.contains("serving sandbox")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let status = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            panic!("the agent did not start serving (exit status: {status:?})");
        }
        agent
    }

    /// The agent's pid (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn client(&self) -> Client {
        connect(&self.socket).await
    }

    /// Waits (bounded) for the agent process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client over the Unix socket at `socket` (a dev-mode agent, or the
/// host side of a VM's virtio-serial port).
pub async fn connect(socket: &Path) -> Client {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://agent.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to the agent");
    GuestAgentClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Makes `root` a minimal sandbox root: /bin/busybox (static, from the host)
/// with `applets` linked to it, and an empty /etc.
pub fn busybox_root(root: &Path, applets: &[&str]) {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        panic!("this test needs /bin/busybox (apt-get install -y busybox-static)");
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` has passed.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn start(argv: &[&str]) -> ExecStart {
    ExecStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An exec in progress: a sender for client messages and the event stream.
pub struct Exec {
    pub tx: mpsc::Sender<ExecRequest>,
    pub events: Streaming<ExecResponse>,
}

impl Exec {
    pub async fn send(&self, msg: Msg) {
        self.tx
            .send(ExecRequest { msg: Some(msg) })
            .await
            .expect("exec request stream open");
    }

    pub async fn next(&mut self) -> Option<Event> {
        self.events
            .message()
            .await
            .expect("exec stream error")
            .and_then(|r| r.event)
    }

    /// Reads events until stdout contains `needle` (before any exit).
    pub async fn wait_stdout(&mut self, needle: &str) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            match self.next().await {
                Some(Event::Stdout(d)) => {
                    out.extend_from_slice(&d);
                    if String::from_utf8_lossy(&out).contains(needle) {
                        return out;
                    }
                }
                Some(Event::Started(_)) | Some(Event::Stderr(_)) => {}
                Some(Event::Exit(e)) => panic!(
                    "process exited ({e:?}) before printing {needle:?}; stdout so far {:?}",
                    String::from_utf8_lossy(&out)
                ),
                None => panic!("stream ended before {needle:?}"),
            }
        }
    }

    /// Collects everything until the stream ends.
    pub async fn finish(mut self) -> Output {
        let mut o = Output::default();
        while let Some(event) = self.next().await {
            match event {
                Event::Started(s) => o.pid = Some(s.pid),
                Event::Stdout(d) => o.stdout.extend_from_slice(&d),
                Event::Stderr(d) => o.stderr.extend_from_slice(&d),
                Event::Exit(e) => {
                    assert!(o.exit.is_none(), "two exit events");
                    o.exit = Some(e);
                }
            }
        }
        o
    }
}

#[derive(Debug, Default)]
pub struct Output {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExecExit>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn exit(&self) -> &ExecExit {
        self.exit.as_ref().expect("an exit event")
    }
}

/// Starts an exec and keeps the request stream open for more messages.
pub async fn exec(client: &mut Client, start: ExecStart) -> Result<Exec, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(ExecRequest {
        msg: Some(Msg::Start(start)),
    })
    .await
    .expect("queue start");
    let events = client.exec(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Exec { tx, events })
}

/// Runs to completion with no further input.
pub async fn run(client: &mut Client, start: ExecStart) -> Output {
    let exec = exec(client, start).await.expect("exec accepted");
    let Exec { tx, events } = exec;
    drop(tx);
    Exec {
        tx: mpsc::channel(1).0,
        events,
    }
    .finish()
    .await
}
