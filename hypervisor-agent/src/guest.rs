//! The host side of the guest-agent channel: a tonic client whose HTTP/2
//! connection runs over the VM's agent endpoint (a virtio-serial Unix socket,
//! kernel vsock, or Cloud Hypervisor's hybrid vsock) instead of TCP.

use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use somna_proto::guest::v1::guest_agent_client::GuestAgentClient;
use somna_proto::guest::v1::{HealthRequest, HealthResponse};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::vmm::AgentEndpoint;

/// Larger HTTP/2 windows than the defaults: one file transfer should be able
/// to fill the channel without waiting for window updates.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// A client of one VM's guest agent. Cheap to clone; requests are
/// multiplexed over a single HTTP/2 connection.
#[derive(Clone)]
pub struct GuestClient {
    client: GuestAgentClient<Channel>,
}

impl GuestClient {
    /// Creates the client; connects lazily on the first request (and again
    /// after the connection breaks).
    pub fn new(endpoint: AgentEndpoint) -> Self {
        // The URI is required by tonic but unused: the connector decides
        // where bytes go.
        let channel = Endpoint::from_static("http://somna-guest")
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_adaptive_window(false)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let endpoint = endpoint.clone();
                async move { connect(&endpoint).await.map(TokioIo::new) }
            }));
        let client = GuestAgentClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        GuestClient { client }
    }

    /// The generated client, for RPCs.
    pub fn rpc(&self) -> GuestAgentClient<Channel> {
        self.client.clone()
    }

    /// Waits until the guest agent answers Health, or `deadline` passes.
    /// Returns the last error on timeout.
    pub async fn wait_ready(&self, deadline: Instant) -> Result<HealthResponse, tonic::Status> {
        let mut last = tonic::Status::deadline_exceeded("guest agent did not answer");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            let mut rpc = self.rpc();
            match tokio::time::timeout(left, rpc.health(HealthRequest {})).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => {
                    last = status;
                    // The socket may not exist for the first instants after
                    // the VMM starts; retry soon but do not spin.
                    tokio::time::sleep(Duration::from_millis(5).min(left)).await;
                }
                Err(_) => return Err(last),
            }
        }
    }
}

/// The byte stream to the guest agent.
pub enum GuestStream {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

async fn connect(endpoint: &AgentEndpoint) -> std::io::Result<GuestStream> {
    match endpoint {
        AgentEndpoint::SerialSocket(path) => {
            let mut stream = tokio::net::UnixStream::connect(path).await?;
            sync_serial(&mut stream).await?;
            Ok(GuestStream::Unix(stream))
        }
        AgentEndpoint::Vsock { cid, port } => Ok(GuestStream::Vsock(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
        )),
        // A fresh stream per connection (no sync marker); after a restore
        // the old connections are gone and the client simply reconnects.
        AgentEndpoint::HybridVsock { socket, port } => Ok(GuestStream::Unix(
            crate::vmm::cloud_hypervisor::vsock::connect(socket, *port).await?,
        )),
    }
}

/// Lines the serial byte stream up before HTTP/2 starts (see
/// `somna_proto::serial_sync`): write a fresh marker, then read and discard
/// until the guest echoes it. Reads one byte at a time so that nothing after
/// the echo is consumed here (the guest sends nothing more until the HTTP/2
/// preface arrives, but exactness costs little: only stale bytes precede).
async fn sync_serial(stream: &mut tokio::net::UnixStream) -> std::io::Result<()> {
    use somna_proto::serial_sync;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let marker = serial_sync::marker(rand::random());
    stream.write_all(&marker).await?;
    let mut window: std::collections::VecDeque<u8> =
        std::collections::VecDeque::with_capacity(marker.len());
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the guest channel closed before the guest agent answered the sync marker",
            ));
        }
        if window.len() == marker.len() {
            window.pop_front();
        }
        window.push_back(byte[0]);
        if window.len() == marker.len() && window.iter().eq(marker.iter()) {
            return Ok(());
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            GuestStream::Unix($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            GuestStream::Vsock($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for GuestStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_shutdown(cx))
    }
}
