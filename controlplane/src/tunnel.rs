//! Host agents dial out to the control plane, so they work behind NAT. On
//! the dialled connection the agent first authenticates with a line
//! `SOMNA-AGENT 1 <host-id> <join-token>\n`; the control plane answers
//! `OK\n` (or `ERR <why>\n` and closes). Then the roles flip: the agent
//! serves `somna.host.v1.HostAgent` over HTTP/2 on that connection and the
//! control plane is its client, with full gRPC streaming in both directions.
//! With TLS configured ([`crate::tls`]) all of it runs inside mutual TLS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Endpoint, Uri};
use tracing::{info, warn};

use crate::host::Host;
use crate::remote::{RemoteHost, host_agent_service};
use crate::service::ControlPlane;

const GREETING: &str = "SOMNA-AGENT 1";
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 settings for the tunnel: large windows for file transfers.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// The agent's TLS: how to verify the control plane, and who it is.
#[derive(Clone)]
pub struct AgentTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Accepts agent connections on `listener` until `shutdown` resolves;
/// with `tls`, only over mutual TLS.
pub async fn serve_agents(
    cp: ControlPlane,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let cp = cp.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let result = match tls {
                        Some(acceptor) => {
                            match tokio::time::timeout(GREETING_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(tls_stream)) => accept_agent(cp, tls_stream).await,
                                Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                                Err(_) => Err("TLS handshake timed out".into()),
                            }
                        }
                        None => accept_agent(cp, stream).await,
                    };
                    if let Err(e) = result {
                        warn!(%peer, error = %e, "agent connection refused");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an agent connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_agent<S>(cp: ControlPlane, stream: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(GREETING_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| "no greeting in time".to_string())?
        .map_err(|e| e.to_string())?;
    let mut stream = reader.into_inner();
    let fields: Vec<&str> = line.trim_end().splitn(4, ' ').collect();
    let (host_id, token) = match fields.as_slice() {
        [a, b, host, token] if format!("{a} {b}") == GREETING => {
            (host.to_string(), token.to_string())
        }
        _ => {
            let _ = stream
                .write_all(b"ERR expected SOMNA-AGENT 1 <host-id> <token>\n")
                .await;
            return Err(format!("bad greeting {:?}", line.trim_end()));
        }
    };
    if let Err(why) = cp.check_join(&host_id, &token).await {
        let _ = stream.write_all(format!("ERR {why}\n").as_bytes()).await;
        return Err(format!("host {host_id}: {why}"));
    }
    stream.write_all(b"OK\n").await.map_err(|e| e.to_string())?;
    let channel = over_stream(stream)
        .await
        .map_err(|e| format!("HTTP/2 over the tunnel: {e}"))?;
    info!(host = %host_id, "host agent connected");
    cp.attach_host(Arc::new(RemoteHost::new(host_id, channel)))
        .await;
    Ok(())
}

/// A tonic channel whose one connection is `stream`. When it breaks the
/// channel fails until the agent dials in again (and is attached anew).
async fn over_stream<S>(stream: S) -> Result<tonic::transport::Channel, tonic::transport::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://somna-agent")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_adaptive_window(false)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            async move {
                taken.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the agent's tunnel is closed",
                    )
                })
            }
        }))
        .await
}

/// The agent side: dial `addr`, authenticate as `host_id` with `token`, and
/// serve `host` on the connection; redial (with backoff) whenever it ends,
/// until `shutdown` resolves.
pub async fn run_agent(
    addr: String,
    host_id: String,
    token: String,
    host: Arc<dyn Host>,
    tls: Option<AgentTls>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = dial(&addr, &host_id, &token, host.clone(), tls.clone());
        let result = tokio::select! {
            r = attempt => r,
            () = &mut shutdown => return,
        };
        match result {
            Ok(()) => {
                info!(%addr, "tunnel to the control plane closed; redialling");
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                warn!(%addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach the control plane");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut shutdown => return,
        }
    }
}

async fn dial(
    addr: &str,
    host_id: &str,
    token: &str,
    host: Arc<dyn Host>,
    tls: Option<AgentTls>,
) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) => {
            let stream = tokio::time::timeout(
                GREETING_TIMEOUT,
                tls.connector.connect(tls.server_name, stream),
            )
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
            serve_tunnel(stream, addr, host_id, token, host).await
        }
        None => serve_tunnel(stream, addr, host_id, token, host).await,
    }
}

async fn serve_tunnel<S>(
    mut stream: S,
    addr: &str,
    host_id: &str,
    token: &str,
    host: Arc<dyn Host>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    stream
        .write_all(format!("{GREETING} {host_id} {token}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Read the answer byte by byte: HTTP/2 from the control plane follows.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\n") {
        let n = tokio::time::timeout(
            GREETING_TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
        )
        .await
        .map_err(|_| "no answer to the greeting".to_string())?
        .map_err(|e| e.to_string())?;
        if n == 0 || answer.len() > 512 {
            return Err("the control plane closed the connection".into());
        }
        answer.push(byte[0]);
    }
    let answer = String::from_utf8_lossy(&answer).trim_end().to_string();
    if answer != "OK" {
        return Err(format!("refused: {answer}"));
    }
    info!(%addr, host = %host_id, "connected to the control plane");
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .adaptive_window(false)
        // The control plane polls every host; a dead tunnel shows there.
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
        .serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(host_agent_service(host)),
        )
        .await
        .map_err(|e| e.to_string())
}
