//! Sessions, the sandboxes they own, and the two transports.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ErrorData, Implementation, InitializeResult,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, ServiceExt};
use somna_sdk::Client;
use tokio_util::sync::CancellationToken;

use crate::McpConfig;
use crate::tools;

/// What the server tells the model when it connects.
const INSTRUCTIONS: &str = "Somna gives you sandboxes: isolated Linux microVMs to run code and \
commands in. Call run_code to run Python or shell code (a sandbox is created on first use and \
reused by later calls), or create_sandbox first to choose the image, size or environment. \
exec_command runs a shell command; write_file, read_file and list_files move files in and out. \
The sandbox keeps its files and processes between calls. Destroy it with destroy_sandbox when \
you are done; it is also destroyed when this session ends or after a long idle period.";

/// The MCP server: one Somna client shared by all sessions, and the
/// sandboxes they created.
#[derive(Clone)]
pub struct McpServer {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: McpConfig,
    client: tokio::sync::Mutex<Option<Client>>,
    /// Sandboxes this server created, by id.
    sandboxes: Mutex<HashMap<String, Tracked>>,
    next_session: AtomicU64,
}

struct Tracked {
    /// The session that owns it; `None` for stateless HTTP requests (no
    /// session to end: only the idle timeout removes them).
    owner: Option<u64>,
    last_used: Instant,
}

impl McpServer {
    pub fn new(config: McpConfig) -> McpServer {
        McpServer {
            shared: Arc::new(Shared {
                config,
                client: tokio::sync::Mutex::new(None),
                sandboxes: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
            }),
        }
    }

    /// A handler for one new MCP session.
    pub fn session(&self) -> SomnaMcp {
        SomnaMcp::new(self.shared.clone())
    }

    /// Ids of the sandboxes this server created and has not destroyed.
    pub fn sandbox_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.shared.sandboxes).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Serves one session over this process's stdin and stdout until the
    /// client closes stdin; then destroys the session's sandboxes.
    pub async fn serve_stdio(&self) -> std::io::Result<()> {
        self.serve_io(tokio::io::stdin(), tokio::io::stdout()).await
    }

    /// Serves one session over a byte stream pair (newline-delimited
    /// JSON-RPC, as on stdio).
    pub async fn serve_io<R, W>(&self, read: R, write: W) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
        W: tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let reaper = self.spawn_reaper();
        let handler = self.session();
        let session = handler.session_id();
        let result = match handler.serve((read, write)).await {
            Ok(running) => running
                .waiting()
                .await
                .map(|_| ())
                .map_err(|e| std::io::Error::other(format!("MCP session failed: {e}"))),
            Err(e) => Err(std::io::Error::other(format!(
                "MCP session did not start: {e}"
            ))),
        };
        self.shared.end_session(session).await;
        reaper.abort();
        result
    }

    /// Serves streamable HTTP at `/mcp` on `listener` until `shutdown`
    /// resolves; then destroys every sandbox this server created.
    pub async fn serve_http(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let reaper = self.spawn_reaper();
        let cancel = CancellationToken::new();
        let mut sessions = LocalSessionManager::default();
        // An HTTP session idle this long is closed, which ends it like a
        // DELETE: its sandboxes go.
        sessions.session_config.keep_alive = Some(self.shared.config.idle_timeout);
        let config = StreamableHttpServerConfig::default()
            .with_cancellation_token(cancel.child_token())
            .with_sse_keep_alive(Some(Duration::from_secs(15)));
        let shared = self.shared.clone();
        let service = StreamableHttpService::new(
            move || Ok(SomnaMcp::new(shared.clone())),
            Arc::new(sessions),
            config,
        );
        let router = axum::Router::new().nest_service("/mcp", service);
        let stop = cancel.clone();
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                stop.cancel();
            })
            .await;
        cancel.cancel();
        reaper.abort();
        self.shared.destroy_all().await;
        result
    }

    /// Destroys sandboxes idle for longer than the idle timeout, now and
    /// then, for as long as the server exists.
    fn spawn_reaper(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let period = (self.shared.config.idle_timeout / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(shared) = weak.upgrade() else { return };
                shared.reap_idle().await;
            }
        })
    }
}

impl Shared {
    /// The Somna client, connected on first use (so the MCP server starts,
    /// and says what is wrong, even while the API is down).
    pub(crate) async fn client(&self) -> Result<Client, somna_sdk::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let client = match &self.config.api_key {
            Some(key) => Client::connect_with_key(&self.config.addr, Some(key)).await?,
            None => Client::connect(&self.config.addr).await?,
        };
        *slot = Some(client.clone());
        Ok(client)
    }

    pub(crate) fn track(&self, id: &str, owner: Option<u64>) {
        lock(&self.sandboxes).insert(
            id.to_string(),
            Tracked {
                owner,
                last_used: Instant::now(),
            },
        );
    }

    pub(crate) fn touch(&self, id: &str) {
        if let Some(t) = lock(&self.sandboxes).get_mut(id) {
            t.last_used = Instant::now();
        }
    }

    pub(crate) fn forget(&self, id: &str) {
        lock(&self.sandboxes).remove(id);
    }

    /// Destroys the picked sandboxes and forgets them once destroyed. They
    /// stay in the map meanwhile: a concurrent caller (e.g. the session's
    /// Drop and the stdio loop both ending the session) destroys them too
    /// (NotFound counts as done), so whoever awaits this knows they are gone
    /// when it returns, even if the process exits right after.
    async fn destroy_where(&self, pick: impl Fn(&Tracked) -> bool) {
        let ids: Vec<String> = lock(&self.sandboxes)
            .iter()
            .filter(|(_, t)| pick(t))
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let Ok(client) = self.client().await else {
            tracing::warn!(?ids, "cannot reach Somna to destroy MCP sandboxes");
            return;
        };
        for id in ids {
            match client.destroy_sandbox(&id).await {
                Ok(()) | Err(somna_sdk::Error::NotFound(_)) => {
                    tracing::info!(sandbox = %id, "destroyed MCP sandbox");
                    self.forget(&id);
                }
                Err(e) => tracing::warn!(sandbox = %id, "cannot destroy MCP sandbox: {e}"),
            }
        }
    }

    pub(crate) async fn end_session(&self, session: u64) {
        self.destroy_where(|t| t.owner == Some(session)).await
    }

    async fn reap_idle(&self) {
        let idle = self.config.idle_timeout;
        self.destroy_where(|t| t.last_used.elapsed() > idle).await
    }

    async fn destroy_all(&self) {
        self.destroy_where(|_| true).await
    }
}

/// One MCP session's handler: the session's current sandbox. Clones share
/// the session; when the last one is dropped (the session ended), the
/// session's sandboxes are destroyed.
#[derive(Clone)]
pub struct SomnaMcp {
    pub(crate) session: Arc<Session>,
}

pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
    /// The sandbox calls without a `sandbox_id` use.
    current: Mutex<Option<String>>,
}

impl Session {
    pub(crate) fn current(&self) -> Option<String> {
        lock(&self.current).clone()
    }

    pub(crate) fn set_current(&self, id: Option<String>) {
        *lock(&self.current) = id;
    }

    /// Forgets `id` as the current sandbox (it is gone).
    pub(crate) fn drop_current_if(&self, id: &str) {
        let mut cur = lock(&self.current);
        if cur.as_deref() == Some(id) {
            *cur = None;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { shared.end_session(id).await });
        }
    }
}

impl SomnaMcp {
    fn new(shared: Arc<Shared>) -> SomnaMcp {
        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        SomnaMcp {
            session: Arc::new(Session {
                id,
                shared,
                current: Mutex::new(None),
            }),
        }
    }

    fn session_id(&self) -> u64 {
        self.session.id
    }
}

impl ServerHandler for SomnaMcp {
    fn get_info(&self) -> InitializeResult {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("somna", env!("CARGO_PKG_VERSION"))
                    .with_title("Somna sandboxes"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::definitions()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // A streamable HTTP request without a session id is stateless (the
        // 2026-07-28 protocol): the sandboxes it creates belong to no
        // session and only the idle timeout removes them.
        let stateless = context
            .extensions
            .get::<http::request::Parts>()
            .is_some_and(|parts| !parts.headers.contains_key("mcp-session-id"));
        let args = request.arguments.unwrap_or_default();
        match tools::call(self, &request.name, args, stateless).await {
            Some(result) => Ok(result.into()),
            None => Err(ErrorData::invalid_params(
                format!(
                    "unknown tool {:?}; the tools are: {}",
                    request.name,
                    tools::names().join(", ")
                ),
                None,
            )),
        }
    }
}

/// Locks a mutex, also after a panic elsewhere poisoned it (the data is
/// plain bookkeeping that stays consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
