//! The ingress: an HTTP/1.1 reverse proxy (hyper) that routes by Host
//! header (`NAME.<domain>`) to a replica of app NAME, through the
//! replica's exposed port. Connecting to a sleeping replica wakes it
//! (one wake, shared by every request that arrives meanwhile), so the
//! request is held, never dropped. Bodies stream in both directions
//! (Server-Sent Events included) and `Upgrade` requests (WebSockets) are
//! spliced once the app answers 101. Optional TLS with the operator's
//! certificate (rustls).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::runtime::{InFlight, IngressAddr, Route, RouteReplica};
use crate::service::ControlPlane;

type Body = BoxBody<Bytes, hyper::Error>;

/// How the ingress answers.
#[derive(Clone)]
pub struct IngressConfig {
    /// Apps are served at `NAME.<domain>`.
    pub domain: String,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            domain: "localhost".into(),
            tls: None,
        }
    }
}

/// Serves the ingress on `listener` until `shutdown` resolves.
pub async fn serve_ingress(
    cp: ControlPlane,
    listener: tokio::net::TcpListener,
    config: IngressConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    cp.inner.apps.set_ingress(IngressAddr {
        scheme,
        domain: config.domain.clone(),
        port,
    });
    info!(port, domain = %config.domain, scheme, "ingress listening");
    let acceptor = config.tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "ingress accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let cp = cp.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(a) => match a.accept(stream).await {
                    Ok(tls) => serve_connection(cp, tls, peer, scheme).await,
                    Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                },
                None => serve_connection(cp, stream, peer, scheme).await,
            }
        });
    }
}

async fn serve_connection<IO>(cp: ControlPlane, io: IO, peer: SocketAddr, scheme: &'static str)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let cp = cp.clone();
        async move { Ok::<_, Infallible>(handle(cp, req, peer, scheme).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        debug!(%peer, error = %e, "ingress connection ended with an error");
    }
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut body = message.into();
    body.push('\n');
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The Host header (or the URI's authority) without its port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw.as_str(),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// `NAME` of `NAME.<domain>`.
pub(crate) fn app_name<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let name = host.strip_suffix(domain)?.strip_suffix('.')?;
    (!name.is_empty() && !name.contains('.')).then_some(name)
}

async fn handle(
    cp: ControlPlane,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    scheme: &'static str,
) -> Response<Body> {
    let domain = cp.inner.apps.domain().unwrap_or_else(|| "localhost".into());
    let Some(host) = request_host(&req) else {
        return text(StatusCode::BAD_REQUEST, "the request has no Host header");
    };
    let Some(name) = app_name(&host, &domain) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no app at {host}: apps are served at NAME.{domain}"),
        );
    };
    let route = match cp.app_route(name).await {
        Ok(Some(route)) => route,
        Ok(None) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no app named {name} (deploy one with `somna app deploy {name} ...`)"),
            );
        }
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot look app {name} up: {}", e.message()),
            );
        }
    };
    let Some((replica, in_flight)) = cp.inner.apps.pick(&route) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "app {name} has no replica right now (being deployed or replaced); retry shortly"
            ),
        );
    };
    if cp.inner.apps.overloaded(&route) {
        cp.scale_up(&route);
    }
    // Taken before the request moves upstream; resolves only if the app
    // switches protocols.
    let client_upgrade = req
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    match proxy(&cp, &route, &replica, req, peer, scheme).await {
        Ok(resp) => finish(resp, client_upgrade, in_flight),
        Err(resp) => resp,
    }
}

/// Forwards `req` to `replica`; an error is the response to give instead.
async fn proxy(
    cp: &ControlPlane,
    route: &Route,
    replica: &RouteReplica,
    req: Request<Incoming>,
    peer: SocketAddr,
    scheme: &'static str,
) -> Result<Response<Incoming>, Response<Body>> {
    let name = &route.name;
    let id = &replica.id;
    let Some(host) = cp.inner.hosts.get(&replica.host) else {
        return Err(text(
            StatusCode::BAD_GATEWAY,
            format!(
                "app {name}: replica {id}'s host {} is not connected",
                replica.host
            ),
        ));
    };
    let conn = host.connect_port(id, route.port).await.map_err(|e| {
        cp.inner.apps.health_failed(id);
        let status = if e.code() == tonic::Code::Unavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        text(
            status,
            format!(
                "app {name}: replica {id} is not reachable on port {}: {}",
                route.port,
                e.message()
            ),
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| {
            text(
                StatusCode::BAD_GATEWAY,
                format!("app {name}: replica {id}: {e}"),
            )
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });
    let upstream = forwarded(req, peer, scheme);
    sender.send_request(upstream).await.map_err(|e| {
        cp.inner.apps.health_failed(id);
        text(
            StatusCode::BAD_GATEWAY,
            format!(
                "app {name}: replica {id} closed the connection without an answer (did the app crash?): {e}"
            ),
        )
    })
}

/// The request to send upstream: the client's, plus `x-forwarded-*`.
fn forwarded(req: Request<Incoming>, peer: SocketAddr, scheme: &'static str) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    parts.version = hyper::Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.append("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    if let Some(h) = parts.headers.get(HOST).cloned() {
        parts.headers.insert("x-forwarded-host", h);
    }
    Request::from_parts(parts, body)
}

/// The ingress response: the app's, with the body streamed and the
/// in-flight count held until it ends; a 101 splices both upgraded
/// connections together.
fn finish(
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    in_flight: InFlight,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let app = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            match (client.await, app.await) {
                (Ok(c), Ok(a)) => {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(a))
                            .await;
                }
                (Err(e), _) | (_, Err(e)) => debug!(error = %e, "upgrade failed"),
            }
        });
        return resp.map(|_| {
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed()
        });
    }
    resp.map(|body| {
        Guarded {
            inner: body,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

/// A response body that keeps its request counted until it is done.
struct Guarded {
    inner: Incoming,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::app_name;

    #[test]
    fn app_names_from_hosts() {
        assert_eq!(app_name("web.localhost", "localhost"), Some("web"));
        assert_eq!(
            app_name("web.apps.example.com", "apps.example.com"),
            Some("web")
        );
        assert_eq!(app_name("localhost", "localhost"), None);
        assert_eq!(app_name("a.b.localhost", "localhost"), None);
        assert_eq!(app_name("webxlocalhost", "localhost"), None);
        assert_eq!(app_name("web.other", "localhost"), None);
    }
}
