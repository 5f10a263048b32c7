//! `HostAgent.ConnectPort`: a TCP connection to a sandbox port carried as
//! a bidirectional gRPC stream over the agent's tunnel, so the ingress
//! reaches replicas on any host. The control plane's end is an in-memory
//! duplex pipe; the agent's end is its real connection to the slot.

use futures::StreamExt;
use somna_proto::host::v1::host_agent_client::HostAgentClient;
use somna_proto::host::v1::{PortData, PortOpen, port_data};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::host::{Host, PortStream, StatusStream};

/// Bytes per message.
const CHUNK: usize = 64 * 1024;
const NOT_RUNNING: &str = "not running";

/// Whether `e` is the agent's "asleep, not checked" answer to a health
/// check.
pub(super) fn is_not_running(e: &Status) -> bool {
    e.code() == tonic::Code::FailedPrecondition && e.message().starts_with(NOT_RUNNING)
}

fn data(bytes: Vec<u8>) -> PortData {
    PortData {
        msg: Some(port_data::Msg::Data(bytes)),
    }
}

/// The control plane's side: opens the stream and returns a pipe whose
/// other end is pumped to and from it.
pub(super) async fn dial(
    mut client: HostAgentClient<Channel>,
    id: &str,
    port: u16,
    health_check: bool,
) -> Result<PortStream, Status> {
    let (out_tx, out_rx) = mpsc::channel::<PortData>(16);
    let open = PortData {
        msg: Some(port_data::Msg::Open(PortOpen {
            sandbox_id: id.to_string(),
            port: port.into(),
            health_check,
        })),
    };
    out_tx
        .send(open)
        .await
        .map_err(|_| Status::internal("port relay closed before it opened"))?;
    let inbound = client
        .connect_port(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    let (ours, theirs) = tokio::io::duplex(CHUNK);
    let (mut read_half, write_half) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read_half.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out_tx.send(data(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(write_from(inbound, write_half));
    Ok(Box::new(ours))
}

/// Writes the stream's data to `out` until it ends, then shuts `out`'s
/// write side (the peer sees end of file).
async fn write_from(mut inbound: Streaming<PortData>, mut out: impl AsyncWrite + Unpin) {
    while let Some(Ok(PortData {
        msg: Some(port_data::Msg::Data(bytes)),
    })) = inbound.next().await
    {
        if out.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = out.shutdown().await;
}

/// The agent's side: connects (first message) and pumps both ways.
pub(super) async fn serve(
    host: &dyn Host,
    mut inbound: Streaming<PortData>,
) -> Result<StatusStream<PortData>, Status> {
    let open = match inbound.message().await? {
        Some(PortData {
            msg: Some(port_data::Msg::Open(open)),
        }) => open,
        _ => {
            return Err(Status::invalid_argument(
                "the first ConnectPort message must be `open`",
            ));
        }
    };
    let port = u16::try_from(open.port)
        .map_err(|_| Status::invalid_argument(format!("{} is not a TCP port", open.port)))?;
    let conn = if open.health_check {
        host.health_connect(&open.sandbox_id, port)
            .await?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "{NOT_RUNNING}: sandbox {} sleeps; health checks do not wake it",
                    open.sandbox_id
                ))
            })?
    } else {
        host.connect_port(&open.sandbox_id, port).await?
    };
    Ok(pump(conn, inbound))
}

fn pump<IO: AsyncRead + AsyncWrite + Send + 'static>(
    conn: IO,
    inbound: Streaming<PortData>,
) -> StatusStream<PortData> {
    let (mut read_half, write_half) = tokio::io::split(conn);
    tokio::spawn(write_from(inbound, write_half));
    let (tx, rx) = mpsc::channel::<Result<PortData, Status>>(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let read = tokio::select! {
                r = read_half.read(&mut buf) => r,
                // The control plane went away: stop holding the connection.
                () = tx.closed() => break,
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(Ok(data(buf[..n].to_vec()))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the sandbox connection failed: {e}"
                        ))))
                        .await;
                    break;
                }
            }
        }
    });
    ReceiverStream::new(rx).boxed()
}
