//! A client of Cloud Hypervisor's REST API on its Unix socket
//! (`--api-socket`): HTTP/1.1, one connection per call, JSON bodies, paths
//! under `/api/v1/`. Error answers carry a JSON array of messages (the
//! error chain), which the error joins into one line.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ChError;
use super::fds::FdPassingStream;
use super::types::{
    NetConfig, PciDeviceInfo, RestoreConfig, VmInfo, VmRemoveDevice, VmSnapshotConfig,
    VmmPingResponse,
};

/// An answer: the status and the body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Bytes,
}

/// Talks to one Cloud Hypervisor process.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    binary: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// `timeout` bounds each call (connect to answer); see
    /// [`ApiClient::with_timeout`] for the slow calls.
    pub fn new(socket: PathBuf, binary: PathBuf, timeout: Duration) -> Self {
        ApiClient {
            socket,
            binary,
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The same client with another per-call bound.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        ApiClient {
            timeout,
            ..self.clone()
        }
    }

    /// `GET /vmm.ping`.
    pub async fn ping(&self) -> Result<VmmPingResponse, ChError> {
        self.get_json("vmm.ping").await
    }

    /// `GET /vm.info`.
    pub async fn info(&self) -> Result<VmInfo, ChError> {
        self.get_json("vm.info").await
    }

    /// `PUT /vm.create` with a `VmConfig`.
    pub async fn create(&self, config: &impl Serialize) -> Result<(), ChError> {
        self.put("vm.create", Some(config)).await.map(drop)
    }

    /// `PUT` of one of the body-less actions: `vm.boot`, `vm.pause`,
    /// `vm.resume`, `vm.shutdown`, `vmm.shutdown`.
    pub async fn action(&self, call: &'static str) -> Result<(), ChError> {
        self.put(call, None::<&()>).await.map(drop)
    }

    /// `PUT /vm.snapshot`.
    pub async fn snapshot(&self, config: &VmSnapshotConfig) -> Result<(), ChError> {
        self.put("vm.snapshot", Some(config)).await.map(drop)
    }

    /// `PUT /vm.restore`, passing `taps` for the devices its `net_fds`
    /// names, in that order.
    pub async fn restore(
        &self,
        config: &RestoreConfig,
        taps: &[BorrowedFd<'_>],
    ) -> Result<(), ChError> {
        self.put_with_fds("vm.restore", Some(config), taps)
            .await
            .map(drop)
    }

    /// `PUT /vm.add-net` with the TAP passed as a file descriptor (before
    /// `vm.boot` this is a cold add, answered 204).
    pub async fn add_net(&self, config: &NetConfig, tap: BorrowedFd<'_>) -> Result<(), ChError> {
        self.put_with_fds("vm.add-net", Some(config), &[tap])
            .await
            .map(drop)
    }

    /// `PUT /vm.add-device`: the device's id and guest address (a cold
    /// add answers 204 without them: then the id is the one asked for).
    pub async fn add_device(
        &self,
        config: &super::types::DeviceConfig,
    ) -> Result<Option<PciDeviceInfo>, ChError> {
        let body = self.put("vm.add-device", Some(config)).await?;
        if body.is_empty() {
            return Ok(None);
        }
        self.decode("vm.add-device", &body).map(Some)
    }

    /// `PUT /vm.remove-device`.
    pub async fn remove_device(&self, id: &str) -> Result<(), ChError> {
        let body = VmRemoveDevice { id: id.to_string() };
        self.put("vm.remove-device", Some(&body)).await.map(drop)
    }

    async fn get_json<T: DeserializeOwned>(&self, call: &'static str) -> Result<T, ChError> {
        let answer = self.call(Method::GET, call, None, Vec::new()).await?;
        let body = self.check(call, answer)?;
        self.decode(call, &body)
    }

    /// A `PUT`; returns the body of a 2xx answer (empty for 204).
    async fn put(
        &self,
        call: &'static str,
        body: Option<&impl Serialize>,
    ) -> Result<Bytes, ChError> {
        self.put_with_fds(call, body, &[]).await
    }

    /// A `PUT` whose request carries `fds` (`SCM_RIGHTS`).
    async fn put_with_fds(
        &self,
        call: &'static str,
        body: Option<&impl Serialize>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Bytes, ChError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ChError::Transport {
                binary: self.binary.clone(),
                call: call.to_string(),
                reason: format!("cannot encode the request body: {e}"),
            })?;
        let fds: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let answer = self.call(Method::PUT, call, body, fds).await?;
        self.check(call, answer)
    }

    fn decode<T: DeserializeOwned>(&self, call: &str, body: &[u8]) -> Result<T, ChError> {
        serde_json::from_slice(body).map_err(|e| ChError::BadResponse {
            binary: self.binary.clone(),
            call: call.to_string(),
            reason: format!(
                "{e}; body: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            ),
        })
    }

    /// Turns a non-2xx answer into [`ChError::Api`].
    fn check(&self, call: &str, answer: Answer) -> Result<Bytes, ChError> {
        if answer.status.is_success() {
            return Ok(answer.body);
        }
        Err(ChError::Api {
            binary: self.binary.clone(),
            call: call.to_string(),
            status: answer.status.as_u16(),
            message: error_message(answer.status, &answer.body),
        })
    }

    /// One request on a fresh connection, bounded by the timeout. `fds`
    /// stay open with the caller until this returns.
    async fn call(
        &self,
        method: Method,
        call: &'static str,
        body: Option<Vec<u8>>,
        fds: Vec<RawFd>,
    ) -> Result<Answer, ChError> {
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.timeout, self.exchange(method.clone(), call, body, fds))
                .await
                .unwrap_or_else(|_| {
                    Err(ChError::Timeout {
                        binary: self.binary.clone(),
                        call: call.to_string(),
                        after: self.timeout,
                    })
                });
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(a) => {
                tracing::debug!(%method, call, status = a.status.as_u16(), elapsed_ms, "cloud-hypervisor API")
            }
            Err(e) => {
                tracing::debug!(%method, call, error = %e, elapsed_ms, "cloud-hypervisor API failed")
            }
        }
        result
    }

    async fn exchange(
        &self,
        method: Method,
        call: &'static str,
        body: Option<Vec<u8>>,
        fds: Vec<RawFd>,
    ) -> Result<Answer, ChError> {
        let transport = |what: &str, e: &dyn std::fmt::Display| ChError::Transport {
            binary: self.binary.clone(),
            call: call.to_string(),
            reason: format!("{what}: {e}"),
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                transport(
                    &format!("cannot connect to the API socket {}", self.socket.display()),
                    &e,
                )
            })?;
        let stream = FdPassingStream::new(stream, fds);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport("HTTP handshake", &e))?;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/api/v1/{call}"))
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport("cannot build the request", &e))?;
        let response = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport("no answer", &e))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport("reading the answer", &e))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        // The connection must be driven while the response is awaited; it
        // may finish first (the server closes after answering), and then
        // the response is already buffered.
        tokio::pin!(conn);
        tokio::pin!(response);
        let mut conn_done = false;
        loop {
            tokio::select! {
                answer = &mut response => return answer,
                _ = &mut conn, if !conn_done => conn_done = true,
            }
        }
    }
}

/// One line from an error answer: Cloud Hypervisor sends a JSON array of
/// messages (outermost first); anything else is shown as text.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body)
        && !chain.is_empty()
    {
        return chain.join(": ");
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no error message")
            .to_string()
    } else {
        text.chars().take(1024).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_join_the_chain() {
        assert_eq!(
            error_message(
                StatusCode::NOT_FOUND,
                br#"["Error from API","The VM could not boot","VM config is missing"]"#
            ),
            "Error from API: The VM could not boot: VM config is missing"
        );
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, b""),
            "Internal Server Error"
        );
        assert_eq!(
            error_message(StatusCode::METHOD_NOT_ALLOWED, b"not allowed\n"),
            "not allowed"
        );
    }
}
