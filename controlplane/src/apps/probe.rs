//! Health probes over a connection to a replica's port: with a path, an
//! HTTP GET that must answer 2xx or 3xx; without one, the connection
//! itself is the proof.

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::host::PortStream;

/// How long a health check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes `path` over `conn`; the error says what was wrong.
pub(crate) async fn check(conn: PortStream, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(PROBE_TIMEOUT, get(conn, path))
        .await
        .map_err(|_| format!("GET {path} took more than {} s", PROBE_TIMEOUT.as_secs()))?
}

async fn get(conn: PortStream, path: &str) -> Result<(), String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let driver = tokio::spawn(connection);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "somna-health-check")
        .header(hyper::header::USER_AGENT, "somna-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let result = sender.send_request(req).await;
    driver.abort();
    let status = result.map_err(|e| format!("GET {path}: {e}"))?.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}
