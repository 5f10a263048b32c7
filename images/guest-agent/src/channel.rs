//! Serving the gRPC service over a byte stream, and the vsock listener.
//!
//! Every transport (virtio-serial session, vsock connection, dev-mode Unix
//! socket) ends in [`serve_connection`], so the HTTP/2 tuning is one place.

use std::io;
use std::os::fd::AsRawFd;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest};

use crate::fdio::FdStream;
use crate::service::AgentService;

pub use crate::h2server::H2_MAX_FRAME_SIZE;

/// Serves one HTTP/2 connection until the peer goes away or errs, with
/// the settings of [`crate::h2server::builder`].
pub async fn serve_connection<IO>(io: IO, service: AgentService) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    crate::h2server::builder()
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .await
}

/// Listens on AF_VSOCK `port` (any CID) and serves each connection.
pub async fn serve_vsock(port: u32, service: AgentService) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| {
        io::Error::other(format!(
            "create a vsock socket: {e} (is the vmw_vsock_virtio_transport module loaded?)"
        ))
    })?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .map_err(|e| io::Error::other(format!("bind vsock port {port}: {e}")))?;
    listen(&fd, Backlog::new(64).map_err(io::Error::from)?)
        .map_err(|e| io::Error::other(format!("listen on vsock port {port}: {e}")))?;
    // SAFETY: the AsyncFd owns the listening socket for its whole life.
    let listener = unsafe { AsyncFd::register(fd)? };
    tracing::info!("serving on vsock port {port}");
    loop {
        let conn = listener
            .async_io(Interest::READABLE, |fd| {
                accept4(fd, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
                    .map_err(io::Error::from)
            })
            .await;
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // E.g. ECONNABORTED or EMFILE: keep listening.
                tracing::warn!("vsock accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let stream = FdStream::from_owned(conn)?;
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, service).await {
                tracing::debug!("vsock connection ended: {e}");
            }
        });
    }
}
