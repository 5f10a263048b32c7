//! Somna's MCP server: sandboxes as tools for models, over stdio or
//! streamable HTTP, built on [`somna_sdk`] and `rmcp`.
//!
//! Tools: `create_sandbox`, `run_code`, `exec_command`, `write_file`,
//! `read_file`, `list_files`, `sleep_sandbox`, `destroy_sandbox`. Each MCP
//! session remembers the sandbox it created (or that `run_code` created for
//! it when it had none) and uses it for later calls that name no
//! `sandbox_id`. A session's sandboxes are destroyed when the session ends
//! (stdio closed, HTTP session deleted or expired) or after
//! [`McpConfig::idle_timeout`] without a tool call that uses them.
//!
//! Bad tool arguments and failed calls come back as tool errors
//! (`isError: true`) with a message written for the model; nothing a client
//! sends can crash the server.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = somna_mcp::McpServer::new(somna_mcp::McpConfig::default());
//! server.serve_stdio().await
//! # }
//! ```

mod server;
mod tools;
mod truncate;

use std::time::Duration;

pub use server::{McpServer, SomnaMcp};
pub use truncate::head_tail;

/// How the MCP server behaves.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The Somna API (`http://host:port`).
    pub addr: String,
    /// API key for the Somna API; `None` uses `$SOMNA_API_KEY`.
    pub api_key: Option<String>,
    /// Image for sandboxes created without one (and by `run_code`).
    pub default_image: String,
    /// A sandbox this server created is destroyed after this long without
    /// a tool call that uses it; HTTP sessions expire after it too.
    pub idle_timeout: Duration,
    /// Server-side lifetime of the sandboxes this server creates (a safety
    /// net should this process die without cleaning up).
    pub sandbox_timeout: Duration,
    /// Time limit of `run_code` and `exec_command` when the call gives none.
    pub exec_timeout: Duration,
    /// The most bytes of stdout (and of stderr) a tool result carries.
    pub max_output_bytes: usize,
    /// The most bytes one `read_file` call returns.
    pub max_read_bytes: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            addr: std::env::var(somna_sdk::ADDR_ENV)
                .unwrap_or_else(|_| somna_sdk::DEFAULT_ADDR.to_string()),
            api_key: None,
            default_image: "python".into(),
            idle_timeout: Duration::from_secs(15 * 60),
            sandbox_timeout: Duration::from_secs(60 * 60),
            exec_timeout: Duration::from_secs(120),
            max_output_bytes: 16 * 1024,
            max_read_bytes: 64 * 1024,
        }
    }
}
