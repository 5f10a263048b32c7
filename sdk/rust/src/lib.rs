//! The Rust client of the Somna API (`somna.v1`).
//!
//! ```no_run
//! # async fn demo() -> somna_sdk::Result<()> {
//! use somna_sdk::{Client, Command, CreateOptions};
//! let client = Client::from_env().await?;
//! let sandbox = client.create_sandbox(CreateOptions::new("busybox")).await?;
//! let out = sandbox.exec(Command::new("echo").arg("hello")).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! sandbox.write_file("/tmp/data.txt", b"some bytes".to_vec()).await?;
//! sandbox.destroy().await?;
//! # Ok(()) }
//! ```
//!
//! It owns the typed surface (clients, sandboxes, commands, files) over the
//! generated gRPC stubs, which stay available as [`proto`].

mod apps;
mod auth;
mod code;
mod error;
mod exec;
mod files;

use std::collections::BTreeMap;
use std::time::Duration;

use somna_proto::v1::sandboxes_client::SandboxesClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use apps::AppOptions;
pub use auth::ApiKey;
pub use code::Language;
pub use error::{Error, Result};
pub use exec::{Command, ExecEvent, Output, Process};
pub use files::{TransferStats, WriteOptions};
pub use somna_proto::v1 as proto;

/// Where `somna up` listens by default.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7477";

/// The environment variable holding the API key clients send.
pub const API_KEY_ENV: &str = "SOMNA_API_KEY";

/// The environment variable holding the API address.
pub const ADDR_ENV: &str = "SOMNA_ADDR";

/// The gRPC channel with the API key attached to every call.
pub type AuthChannel = InterceptedService<Channel, ApiKey>;

/// A connection to a Somna control plane. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    rpc: SandboxesClient<AuthChannel>,
    channel: AuthChannel,
    addr: String,
}

impl Client {
    /// Connects to `addr` (`http://host:port`; a bare `host:port` is
    /// accepted too), authenticating with `$SOMNA_API_KEY` when it is set.
    pub async fn connect(addr: &str) -> Result<Client> {
        let key = std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty());
        Client::connect_with_key(addr, key.as_deref()).await
    }

    /// Connects to `addr` and sends `api_key` (if any) as
    /// `authorization: Bearer <key>` on every call.
    pub async fn connect_with_key(addr: &str, api_key: Option<&str>) -> Result<Client> {
        let auth = ApiKey::new(api_key)?;
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| Error::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| Error::Connect {
            addr: uri.clone(),
            reason: source_chain(&e),
        })?;
        let channel = InterceptedService::new(channel, auth);
        Ok(Client {
            channel: channel.clone(),
            rpc: SandboxesClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
            addr: uri,
        })
    }

    /// Connects to `$SOMNA_ADDR`, or the local `somna up` when unset.
    pub async fn from_env() -> Result<Client> {
        let addr = std::env::var(ADDR_ENV).unwrap_or_else(|_| DEFAULT_ADDR.to_string());
        Client::connect(&addr).await
    }

    /// The address this client talks to (`http://host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The generated gRPC client, for calls the typed API does not cover.
    pub fn rpc(&self) -> SandboxesClient<AuthChannel> {
        self.rpc.clone()
    }

    /// The authenticated channel, for the other generated clients
    /// (`proto::images_client::ImagesClient::new(client.channel())`).
    pub fn channel(&self) -> AuthChannel {
        self.channel.clone()
    }

    /// Creates a sandbox and returns once it accepts exec.
    pub async fn create_sandbox(&self, options: CreateOptions) -> Result<Sandbox> {
        let req = proto::CreateSandboxRequest {
            image: options.image,
            cpus: options.cpus,
            memory_mib: options.memory_mib,
            disk_mib: options.disk_mib,
            env: options.env.into_iter().collect(),
            timeout_seconds: options.timeout.map(|t| t.as_secs().max(1)).unwrap_or(0),
            idle_timeout_seconds: options
                .idle_timeout
                .map(|t| t.as_secs().max(1))
                .unwrap_or(0),
            start_mode: options.start_mode as i32,
            labels: options.labels.into_iter().collect(),
            request_id: options.request_id,
            no_internet: options.no_internet,
            allow_out: options.allow_out,
            deny_out: options.deny_out,
            expose_ports: options.expose_ports.iter().map(|&p| p.into()).collect(),
        };
        let info = self.rpc().create_sandbox(req).await?.into_inner();
        Ok(Sandbox {
            client: self.clone(),
            info,
        })
    }

    /// A handle to sandbox `id` without asking the server first (its
    /// [`Sandbox::info`] holds only the id until [`Sandbox::refresh`]);
    /// calls on it fail with [`Error::NotFound`] if it does not exist.
    pub fn attach(&self, id: &str) -> Sandbox {
        Sandbox {
            client: self.clone(),
            info: proto::Sandbox {
                id: id.to_string(),
                ..Default::default()
            },
        }
    }

    /// A handle to an existing sandbox.
    pub async fn sandbox(&self, id: &str) -> Result<Sandbox> {
        let info = self
            .rpc()
            .get_sandbox(proto::GetSandboxRequest { id: id.to_string() })
            .await?
            .into_inner();
        Ok(Sandbox {
            client: self.clone(),
            info,
        })
    }

    /// Every sandbox (all pages).
    pub async fn list_sandboxes(&self) -> Result<Vec<proto::Sandbox>> {
        self.list_sandboxes_with_labels(&BTreeMap::new()).await
    }

    /// The sandboxes that carry all of `labels` (all pages).
    pub async fn list_sandboxes_with_labels(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<proto::Sandbox>> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = proto::ListSandboxesRequest {
                labels: labels.clone().into_iter().collect(),
                page_size: 0,
                page_token: std::mem::take(&mut page_token),
            };
            let resp = self.rpc().list_sandboxes(req).await?.into_inner();
            out.extend(resp.sandboxes);
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = resp.next_page_token;
        }
    }

    /// Sets the sandbox's timeout to `timeout` from now (`None`: never
    /// destroy it automatically).
    pub async fn set_sandbox_timeout(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<proto::Sandbox> {
        let req = proto::SetSandboxTimeoutRequest {
            id: id.to_string(),
            timeout_seconds: timeout.map(|t| t.as_secs().max(1)).unwrap_or(0),
        };
        Ok(self.rpc().set_sandbox_timeout(req).await?.into_inner())
    }

    /// Replaces a sandbox's network policy: internet on or off and the
    /// allowed and denied IPv4 CIDRs. Takes effect at once on a running
    /// VM; bad CIDRs are `InvalidArgument` naming the field.
    pub async fn update_sandbox_network(
        &self,
        id: &str,
        policy: proto::NetworkPolicy,
    ) -> Result<proto::Sandbox> {
        let req = proto::UpdateSandboxNetworkRequest {
            id: id.to_string(),
            policy: Some(policy),
        };
        Ok(self.rpc().update_sandbox_network(req).await?.into_inner())
    }

    /// Puts a sandbox into light sleep (its RAM goes back to the host).
    pub async fn sleep_sandbox(&self, id: &str) -> Result<proto::Sandbox> {
        let req = proto::SleepSandboxRequest { id: id.to_string() };
        Ok(self.rpc().sleep_sandbox(req).await?.into_inner())
    }

    /// Wakes a sleeping sandbox (exec and file calls do this by themselves).
    pub async fn wake_sandbox(&self, id: &str) -> Result<proto::Sandbox> {
        let req = proto::WakeSandboxRequest { id: id.to_string() };
        Ok(self.rpc().wake_sandbox(req).await?.into_inner())
    }

    /// Pulls and converts an image on the host; the stream carries the
    /// progress events and ends with `done` (or an error).
    pub async fn pull_image(
        &self,
        reference: &str,
    ) -> Result<tonic::Streaming<proto::PullImageEvent>> {
        let mut images = proto::images_client::ImagesClient::new(self.channel());
        let req = proto::PullImageRequest {
            reference: reference.to_string(),
        };
        Ok(images.pull_image(req).await?.into_inner())
    }

    /// Cached images and the host's pull/conversion counters.
    pub async fn list_images(&self) -> Result<proto::ListImagesResponse> {
        let mut images = proto::images_client::ImagesClient::new(self.channel());
        Ok(images
            .list_images(proto::ListImagesRequest {})
            .await?
            .into_inner())
    }

    pub async fn remove_image(&self, reference: &str) -> Result<proto::RemoveImageResponse> {
        let mut images = proto::images_client::ImagesClient::new(self.channel());
        let req = proto::RemoveImageRequest {
            reference: reference.to_string(),
        };
        Ok(images.remove_image(req).await?.into_inner())
    }

    /// The hosts, with their templates and warm pools.
    pub async fn list_hosts(&self) -> Result<Vec<proto::Host>> {
        let mut hosts = proto::hosts_client::HostsClient::new(self.channel());
        Ok(hosts
            .list_hosts(proto::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts)
    }

    pub async fn destroy_sandbox(&self, id: &str) -> Result<()> {
        self.rpc()
            .destroy_sandbox(proto::DestroySandboxRequest { id: id.to_string() })
            .await?;
        Ok(())
    }
}

/// What to create a sandbox from. Unset sizes take the host's defaults.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub env: BTreeMap<String, String>,
    /// Destroy the sandbox this long after creation.
    pub timeout: Option<Duration>,
    /// Put the sandbox to sleep after this long without exec or file calls.
    pub idle_timeout: Option<Duration>,
    /// How to start the VM (default: the fastest available).
    pub start_mode: proto::StartMode,
    /// Free-form labels, to find the sandbox again with
    /// [`Client::list_sandboxes_with_labels`].
    pub labels: BTreeMap<String, String>,
    /// A client-chosen id that makes retries safe: a second create with the
    /// same id returns the sandbox the first one made.
    pub request_id: String,
    /// No internet access (hosts with networking).
    pub no_internet: bool,
    /// IPv4 CIDRs the sandbox may reach even without internet.
    pub allow_out: Vec<String>,
    /// IPv4 CIDRs the sandbox may not reach.
    pub deny_out: Vec<String>,
    /// TCP ports the platform may connect to (hosts with networking).
    pub expose_ports: Vec<u16>,
}

impl CreateOptions {
    pub fn new(image: impl Into<String>) -> Self {
        CreateOptions {
            image: image.into(),
            ..Default::default()
        }
    }
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn disk_mib(mut self, mib: u32) -> Self {
        self.disk_mib = mib;
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }
    pub fn start_mode(mut self, mode: proto::StartMode) -> Self {
        self.start_mode = mode;
        self
    }
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }
    pub fn no_internet(mut self, no_internet: bool) -> Self {
        self.no_internet = no_internet;
        self
    }
    pub fn allow_out(mut self, cidr: impl Into<String>) -> Self {
        self.allow_out.push(cidr.into());
        self
    }
    pub fn deny_out(mut self, cidr: impl Into<String>) -> Self {
        self.deny_out.push(cidr.into());
        self
    }
    pub fn expose_port(mut self, port: u16) -> Self {
        self.expose_ports.push(port);
        self
    }
}

/// A sandbox: a microVM running an image.
#[derive(Clone)]
pub struct Sandbox {
    client: Client,
    info: proto::Sandbox,
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The sandbox's record as of creation or the last [`Sandbox::refresh`].
    pub fn info(&self) -> &proto::Sandbox {
        &self.info
    }

    pub async fn refresh(&mut self) -> Result<&proto::Sandbox> {
        self.info = self.client.sandbox(&self.info.id).await?.info;
        Ok(&self.info)
    }

    /// Light sleep: processes and memory are kept on disk, the host's RAM
    /// is released. Exec and file calls wake it again.
    pub async fn sleep(&mut self) -> Result<&proto::Sandbox> {
        self.info = self.client.sleep_sandbox(&self.info.id).await?;
        Ok(&self.info)
    }

    pub async fn wake(&mut self) -> Result<&proto::Sandbox> {
        self.info = self.client.wake_sandbox(&self.info.id).await?;
        Ok(&self.info)
    }

    /// Destroys the sandbox `timeout` from now (`None`: never automatically).
    pub async fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<&proto::Sandbox> {
        self.info = self
            .client
            .set_sandbox_timeout(&self.info.id, timeout)
            .await?;
        Ok(&self.info)
    }

    /// The client this sandbox was reached through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Stops the VM and removes the sandbox and its data.
    pub async fn destroy(self) -> Result<()> {
        self.client.destroy_sandbox(&self.info.id).await
    }

    fn rpc(&self) -> SandboxesClient<AuthChannel> {
        self.client.rpc()
    }
}

/// `e` and its sources, for errors whose top-level message is vague
/// ("transport error").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
