//! The Somna control plane: the public `somna.v1` gRPC API that clients,
//! SDKs and the CLI talk to.
//!
//! It owns API keys and tenants ([`auth`]), the durable state of sandboxes
//! and hosts ([`store`]: SQLite or PostgreSQL), placement ([`scheduler`]),
//! sandbox lifecycles (timeouts, host loss), and the connections to host
//! agents: in-process for `somna up`, or agents that dial in and serve the
//! host protocol over their connection ([`tunnel`], [`remote`]), optionally
//! inside mutual TLS ([`tls`]). Hosts are
//! reached through the [`Host`] trait. Apps (replica sandboxes behind the
//! HTTP ingress, scaled to zero and woken on request) live in [`apps`].

mod api;
pub mod apps;
pub mod auth;
mod host;
mod hosts;
mod lifecycle;
pub mod remote;
pub mod scheduler;
mod service;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod validate;

use std::future::Future;

pub use apps::ingress::{IngressConfig, serve_ingress};
pub use host::{Host, PortIo, PortStream, StatusStream};
pub use remote::{RemoteHost, host_agent_service};
pub use service::{ControlPlane, ControlPlaneConfig};

/// HTTP/2 windows sized so one file transfer is not throttled by window
/// updates.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Serves the public API on `listener` until `shutdown` resolves.
pub async fn serve(
    control_plane: ControlPlane,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(control_plane.service())
        .add_service(control_plane.hosts_service())
        .add_service(control_plane.images_service())
        .add_service(control_plane.apps_service())
        .serve_with_incoming_shutdown(
            // Nagle's algorithm would hold small exec frames for up to 40 ms.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

#[cfg(test)]
mod tests;
