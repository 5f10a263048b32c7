//! The virtio-serial channel: one byte stream to the host, one HTTP/2 session
//! at a time.
//!
//! Semantics of a virtio-serial port in the guest (Linux
//! `drivers/char/virtio_console.c`): while no client is connected to the
//! port's host-side socket, `read()` returns 0 once buffered data is consumed,
//! `poll()` reports `POLLIN|POLLHUP` and writes would block. When a host
//! client connects, `POLLHUP` clears and its bytes arrive (the "connected"
//! news comes through a control queue that the driver processes later than
//! data, so the first bytes can precede it). The host may disconnect and
//! reconnect at any time (for instance around a VM snapshot/restore), so the
//! agent loops: wait for a host, find the client preface, serve one HTTP/2
//! connection until end of file, an error or a new client preface, repeat.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, open};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::channel::{self, H2_MAX_FRAME_SIZE};
use crate::fdio::{self, SharedFd};
use crate::h2sync::{Found, FrameTracker, PrefaceScanner};
use crate::service::AgentService;

/// How often to re-check whether a host client has connected. The driver
/// reports `POLLIN|POLLHUP` as a *level* while no host is connected, so epoll
/// readiness stays "ready" the whole time and there is no edge that says
/// "the host is here now"; re-checking is the only portable way. 2 ms keeps
/// reconnects (e.g. after a restore) fast without measurable idle cost, and
/// happens only while the host is away.
const HOST_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Finds the port named `name` in sysfs, waiting up to `timeout` for the
/// virtio_console driver to create it.
pub fn find_port(name: &str, timeout: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dev) = scan_ports(Path::new("/sys/class/virtio-ports"), name)
            && dev.exists()
        {
            return Ok(dev);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {name:?} appeared within {timeout:?}; \
                     the VMM must add a virtserialport with that name (and the virtio_console module must load)"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scan_ports(class_dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(class_dir).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if text.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens the port for the agent's lifetime.
pub fn open_port(path: &Path) -> io::Result<OwnedFd> {
    let fd = open(
        path,
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("open {}: {e}", path.display()),
        )
    })?;
    Ok(fd)
}

/// Serves the agent on the port forever.
///
/// Each session gets its own registration with the reactor (a dup of the
/// port): tokio takes a hang-up as final, so a registration that has seen
/// the host leave is useless for the next host (see `fdio::poll_read_fd`).
/// Between sessions the port is watched with plain poll(2).
pub async fn serve(port: OwnedFd, service: AgentService) -> io::Result<()> {
    fdio::set_nonblocking(&port)?;
    // Bytes that belong to the next session (found behind a superseded one).
    let mut carry: Vec<u8> = Vec::new();
    loop {
        // Also after a superseded session: the new client's bytes may have
        // overtaken the news that it connected (see `wait_for_host`), and a
        // registration made while the port reports a hang-up is useless.
        wait_for_host(&port).await;
        let session_fd = fdio::register(port.try_clone()?)?;
        let Some(start) = find_preface(&session_fd, std::mem::take(&mut carry)).await? else {
            // The host went away before it said anything. (The pause keeps
            // this loop from spinning should a device ever report EOF
            // without POLLHUP.)
            tokio::time::sleep(HOST_POLL_INTERVAL).await;
            continue;
        };
        tracing::debug!("host connected; starting an HTTP/2 session");
        let next = Arc::new(Mutex::new(None));
        let session = Session {
            port: session_fd,
            pending: start,
            pending_pos: 0,
            tracker: FrameTracker::new(H2_MAX_FRAME_SIZE),
            superseded: false,
            client_leaving: false,
            next: next.clone(),
        };
        if let Err(e) = channel::serve_connection(session, service.clone()).await {
            tracing::debug!("HTTP/2 session ended: {e}");
        }
        carry = next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        if !carry.is_empty() {
            tracing::info!("host reconnected; starting a new session");
        } else {
            tracing::debug!("host disconnected");
        }
    }
}

/// Returns the port's poll flags right now.
fn poll_now(port: &impl AsFd) -> PollFlags {
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
        Err(_) => PollFlags::empty(),
    }
}

/// Waits until a host client is connected.
///
/// Bytes waiting in the port are left alone, even while POLLHUP is set: the
/// guest learns about a new host connection through a control message that
/// the driver handles later (in a work queue) than the data that follows it,
/// so the first bytes of a *new* client can arrive while the port still
/// reports the old disconnect. Leftovers of a dead session are skipped by
/// `find_preface` instead.
async fn wait_for_host(port: &OwnedFd) {
    while poll_now(port).contains(PollFlags::POLLHUP) {
        tokio::time::sleep(HOST_POLL_INTERVAL).await;
    }
}

/// Reads until an HTTP/2 client preface arrives; returns the bytes from it on,
/// or `None` if the host disconnected first. A host's sync marker on the way
/// is echoed back: the host discards everything it reads before the echo
/// (bytes of an old session, or written before a snapshot), so this is where
/// the two directions of the stream line up again.
async fn find_preface(port: &SharedFd, carry: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    tracing::trace!(
        "looking for an HTTP/2 preface ({} bytes carried over)",
        carry.len()
    );
    let mut scanner = PrefaceScanner::default();
    let mut input = carry;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match scanner.push(&input) {
            Some(Found::Preface(start)) => {
                log_discarded(&scanner);
                return Ok(Some(start));
            }
            Some(Found::Sync { marker, rest }) => {
                log_discarded(&scanner);
                tracing::debug!("host sync marker; echoing it");
                write_all(port, &marker).await?;
                input = rest;
                continue;
            }
            None => {}
        }
        let mut rb = ReadBuf::new(&mut buf);
        std::future::poll_fn(|cx| fdio::poll_read_fd(port, cx, &mut rb, false)).await?;
        let n = rb.filled().len();
        tracing::trace!("preface search: read {n} bytes");
        if n == 0 {
            return Ok(None);
        }
        input = buf[..n].to_vec();
    }
}

async fn write_all(port: &SharedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| fdio::poll_write_fd(port, cx, data)).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the host went away",
            ));
        }
        data = &data[n..];
    }
    Ok(())
}

fn log_discarded(scanner: &PrefaceScanner) {
    if scanner.discarded > 0 {
        tracing::debug!(
            "skipped {} bytes before the HTTP/2 preface",
            scanner.discarded
        );
    }
}

/// One HTTP/2 session's view of the port.
struct Session {
    port: SharedFd,
    /// Bytes already read from the port that belong to this session.
    pending: Vec<u8>,
    pending_pos: usize,
    tracker: FrameTracker,
    /// A new session began at a frame boundary: report end of file and drop
    /// writes (they would reach the new client before its own session).
    superseded: bool,
    /// The client sent GOAWAY: it is leaving, so writes are dropped too (see
    /// `h2sync` for why writing to a departed host is harmful).
    client_leaving: bool,
    /// Where a superseded session leaves the new session's first bytes.
    next: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Session {
    /// Runs the tracker over `data`; on a new session, keeps the bytes from
    /// there (plus unread pending bytes) for the next session and returns how
    /// many bytes still belong to this one.
    fn check(&mut self, data: &[u8]) -> usize {
        let found = self.tracker.feed(data);
        if self.tracker.goaway && !self.client_leaving {
            tracing::debug!("the host sent GOAWAY; no more writes on this session");
            self.client_leaving = true;
        }
        match found {
            None => data.len(),
            Some(at) => {
                let mut rest = data[at..].to_vec();
                rest.extend_from_slice(&self.pending[self.pending_pos..]);
                self.pending.clear();
                self.pending_pos = 0;
                *self.next.lock().unwrap_or_else(PoisonError::into_inner) = Some(rest);
                self.superseded = true;
                at
            }
        }
    }
}

impl AsyncRead for Session {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.superseded || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.pending_pos < this.pending.len() {
            let n = buf.remaining().min(this.pending.len() - this.pending_pos);
            let chunk = this.pending[this.pending_pos..this.pending_pos + n].to_vec();
            this.pending_pos += n;
            let keep = this.check(&chunk);
            buf.put_slice(&chunk[..keep]);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match fdio::poll_read_fd(&this.port, cx, buf, false) {
            Poll::Ready(Ok(())) => {
                let keep = this.check(&buf.filled()[before..]);
                tracing::trace!(
                    "port: read {} bytes, {keep} for this session",
                    buf.filled().len() - before
                );
                buf.set_filled(before + keep);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.superseded || self.client_leaving {
            tracing::trace!("port: dropped a write of {} bytes", data.len());
            return Poll::Ready(Ok(data.len()));
        }
        fdio::poll_write_fd(&self.port, cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The port stays open for the next session.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use hyper_util::rt::TokioIo;
    use somna_proto::guest::v1::guest_agent_client::GuestAgentClient;
    use somna_proto::guest::v1::{HealthRequest, Identity, WakeRequest};
    use somna_proto::v1::write_file_request::Msg as WriteMsg;
    use somna_proto::v1::{ReadFileRequest, WriteFileRequest, WriteFileStart};
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::*;
    use crate::exec::ExecEnv;
    use crate::files::Root;
    use crate::reaper::Reaper;
    use crate::service::{Agent, OnShutdown};

    /// The host side of one client: a stream over the shared socket that can
    /// be "cut" (it then neither reads nor writes), like a host that vanished
    /// without closing anything (VM snapshot/restore).
    struct HostIo {
        inner: tokio::net::UnixStream,
        cut: Arc<AtomicBool>,
    }

    impl AsyncRead for HostIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.cut.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for HostIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.cut.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(data.len()));
            }
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn client(io: HostIo) -> GuestAgentClient<Channel> {
        let slot = Arc::new(Mutex::new(Some(io)));
        let channel = Endpoint::try_from("http://port.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let io = slot.lock().unwrap().take();
                async move {
                    io.map(TokioIo::new)
                        .ok_or_else(|| io::Error::other("one connection per client"))
                }
            }))
            .await
            .unwrap();
        GuestAgentClient::new(channel)
    }

    #[tokio::test]
    async fn resyncs_on_stale_bytes_and_a_new_preface() {
        let (agent_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let root = tempfile::tempdir().unwrap();
        let exec = ExecEnv {
            root: Arc::new(Root::open(root.path()).unwrap()),
            reaper: Reaper::start().unwrap(),
            identity: crate::identity::SharedIdentity::new("sb".into(), "h".into()),
            chroot: false,
        };
        let service = Agent::new(
            exec,
            OnShutdown::Stop(Arc::new(tokio::sync::Notify::new())),
            false,
        )
        .into_service();
        let server = tokio::spawn(serve(OwnedFd::from(agent_end), service));

        // Leftovers of an earlier session precede the first client.
        use std::io::Write;
        (&host_end)
            .write_all(b"\x00\x00\x10stale bytes of a dead session")
            .unwrap();
        host_end.set_nonblocking(true).unwrap();
        let second = host_end.try_clone().unwrap();

        let cut = Arc::new(AtomicBool::new(false));
        let inner = tokio::net::UnixStream::from_std(host_end).unwrap();
        let mut c1 = client(HostIo {
            inner,
            cut: cut.clone(),
        })
        .await;
        assert_eq!(
            c1.health(HealthRequest {})
                .await
                .unwrap()
                .into_inner()
                .sandbox_id,
            "sb"
        );
        // Bulk data both ways, with bytes that would look like frame
        // headers (and prefaces) if the tracker lost its place.
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        let msgs = vec![
            WriteFileRequest {
                msg: Some(WriteMsg::Start(WriteFileStart {
                    path: "/blob".into(),
                    ..Default::default()
                })),
            },
            WriteFileRequest {
                msg: Some(WriteMsg::Data(data.clone())),
            },
        ];
        c1.write_file(tokio_stream::iter(msgs)).await.unwrap();
        let mut s = c1
            .read_file(ReadFileRequest {
                path: "/blob".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut back = Vec::new();
        while let Some(chunk) = s.message().await.unwrap() {
            back.extend_from_slice(&chunk.data);
        }
        assert!(back == data);

        // The first client vanishes mid-connection; a new one starts over
        // on the same byte stream with a fresh preface.
        cut.store(true, Ordering::SeqCst);
        let inner = tokio::net::UnixStream::from_std(second).unwrap();
        let mut c2 = client(HostIo {
            inner,
            cut: Arc::new(AtomicBool::new(false)),
        })
        .await;
        // As after a restore: Wake is the new client's first RPC, and it
        // takes a new identity that the next requests see.
        let woke = c2
            .wake(WakeRequest {
                unix_time_ns: 1_700_000_000_000_000_000,
                entropy: vec![0x5a; 64],
                identity: Some(Identity {
                    sandbox_id: "sb2".into(),
                    hostname: "h2".into(),
                    machine_id: "0123456789abcdef0123456789abcdef".into(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(woke.wake_count, 1);
        let h = c2.health(HealthRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (h.sandbox_id.as_str(), h.hostname.as_str(), h.wake_count),
            ("sb2", "h2", 1)
        );
        assert_eq!(h.machine_id, "0123456789abcdef0123456789abcdef");
        server.abort();
    }
}
