//! `somna mcp` end to end: an independent MCP client (rmcp's) talks to the
//! server over stdio and over streamable HTTP, against a real `somna up`.
//! The conversation: initialize, tools/list, create_sandbox, run_code
//! (`print(6*7)` gives 42), write_file + read_file, list_files, bad
//! arguments (a readable tool error, the server keeps serving), destroy.

use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientConfig, JsonObject, ProtocolVersion,
};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use somna_testkit::{Options, Platform, wait_until};
use tokio::io::AsyncBufReadExt;

type McpClient = RunningService<RoleClient, ClientConfig>;

/// A client that speaks the newest protocol with an `initialize` handshake
/// and sessions.
fn with_sessions() -> ClientConfig {
    ClientConfig::default().with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
}

/// A client that prefers the newest protocol (2026-07-28).
fn sessionless() -> ClientConfig {
    ClientConfig::default().with_protocol_version(ProtocolVersion::LATEST)
}

fn args(v: Value) -> JsonObject {
    match v {
        Value::Object(m) => m,
        other => panic!("tool arguments must be an object, got {other}"),
    }
}

fn text_of(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn call(client: &McpClient, tool: &'static str, a: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(args(a)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
}

/// A successful call's structured result.
async fn ok(client: &McpClient, tool: &'static str, a: Value) -> Value {
    let r = call(client, tool, a.clone()).await;
    assert_ne!(r.is_error, Some(true), "{tool} {a} failed: {}", text_of(&r));
    let text = text_of(&r);
    r.structured_content
        .unwrap_or_else(|| panic!("{tool} returned no structured content: {text}"))
}

/// Adds `"sandbox_id"` to `a` when `id` is given.
fn with_id(mut a: Value, id: Option<&str>) -> Value {
    if let Some(id) = id {
        a["sandbox_id"] = json!(id);
    }
    a
}

async fn sandbox_ids(platform: &Platform) -> Vec<String> {
    let client = platform.client().await;
    let mut ids: Vec<String> = client
        .list_sandboxes()
        .await
        .expect("list sandboxes")
        .into_iter()
        .map(|s| s.id)
        .collect();
    ids.sort();
    ids
}

async fn wait_for_no_sandboxes(platform: &Platform, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ids = sandbox_ids(platform).await;
        if ids.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sandboxes left after {why}: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The conversation every transport must hold. `session_reuse`: calls
/// without a sandbox_id use the sandbox create_sandbox made (stateful
/// sessions); otherwise every call names it.
async fn conversation(client: &McpClient, platform: &Platform, session_reuse: bool) {
    let info = client.peer_info().expect("the server answered initialize");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("somna")
    );
    assert!(info.capabilities.tools.is_some(), "tools capability");
    assert!(
        info.instructions
            .as_deref()
            .is_some_and(|i| i.contains("run_code")),
        "instructions for the model"
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "create_sandbox",
            "destroy_sandbox",
            "exec_command",
            "list_files",
            "read_file",
            "run_code",
            "sleep_sandbox",
            "write_file"
        ]
    );
    for t in &tools {
        assert_eq!(
            t.input_schema.get("type"),
            Some(&json!("object")),
            "{}",
            t.name
        );
        assert!(t.description.as_ref().is_some_and(|d| !d.is_empty()));
    }

    let created = ok(
        client,
        "create_sandbox",
        json!({"image": "python", "memory_mib": 256}),
    )
    .await;
    let id = created["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    assert!(id.starts_with("sbx-"), "{created}");
    assert_eq!(sandbox_ids(platform).await, vec![id.clone()]);
    let named = (!session_reuse).then_some(id.as_str());

    let out = ok(
        client,
        "run_code",
        with_id(json!({"code": "print(6*7)"}), named),
    )
    .await;
    assert_eq!(out["stdout"], "42\n", "{out}");
    assert_eq!(out["exit_code"], 0);
    assert_eq!(
        out["sandbox_id"],
        id.as_str(),
        "the session's sandbox is reused"
    );

    let out = ok(
        client,
        "run_code",
        with_id(
            json!({"code": "echo out; echo err >&2; exit 3", "language": "shell"}),
            named,
        ),
    )
    .await;
    assert_eq!(
        (out["stdout"].as_str(), out["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
    assert_eq!(out["exit_code"], 3);

    // Long output keeps its head and tail, with a note.
    let r = call(
        client,
        "exec_command",
        with_id(json!({"command": "seq 1 100000"}), named),
    )
    .await;
    assert_ne!(r.is_error, Some(true), "{}", text_of(&r));
    let s = r.structured_content.expect("structured");
    assert_eq!(s["stdout_truncated"], true);
    let stdout = s["stdout"].as_str().unwrap_or_default();
    assert!(stdout.starts_with("1\n2\n3\n") && stdout.ends_with("99999\n100000\n"));
    assert!(stdout.contains("bytes omitted"), "a note says what was cut");
    assert!(stdout.len() < 20_000, "{} bytes", stdout.len());

    let w = ok(
        client,
        "write_file",
        with_id(
            json!({"path": "/work/notes/hello.txt", "content": "héllo from MCP\n"}),
            named,
        ),
    )
    .await;
    assert_eq!(w["size"], "héllo from MCP\n".len());
    let r = ok(
        client,
        "read_file",
        with_id(json!({"path": "/work/notes/hello.txt"}), named),
    )
    .await;
    assert_eq!(r["content"], "héllo from MCP\n");
    let out = ok(
        client,
        "exec_command",
        with_id(
            json!({"command": "cat hello.txt", "cwd": "/work/notes"}),
            named,
        ),
    )
    .await;
    assert_eq!(out["stdout"], "héllo from MCP\n");
    let l = ok(
        client,
        "list_files",
        with_id(json!({"path": "/work/notes"}), named),
    )
    .await;
    assert_eq!(l["entries"][0]["name"], "hello.txt", "{l}");

    // Bad arguments are tool errors the model can read; the server lives on.
    for (tool, a, want) in [
        ("run_code", json!({}), "missing field `code`"),
        (
            "run_code",
            json!({"code": "1", "language": "cobol"}),
            "unknown variant",
        ),
        (
            "read_file",
            with_id(json!({"path": "/nope/missing"}), Some(&id)),
            "/nope/missing",
        ),
        (
            "exec_command",
            json!({"command": "true", "sandbox_id": "sbx-doesnotexist"}),
            "create_sandbox",
        ),
    ] {
        let r = call(client, tool, a.clone()).await;
        assert_eq!(r.is_error, Some(true), "{tool} {a}: {}", text_of(&r));
        assert!(text_of(&r).contains(want), "{tool} {a}: {}", text_of(&r));
    }
    let unknown = client
        .call_tool(CallToolRequestParams::new("no_such_tool").with_arguments(JsonObject::new()))
        .await;
    assert!(unknown.is_err(), "an unknown tool is a protocol error");
    let out = ok(
        client,
        "run_code",
        with_id(json!({"code": "print('still here')"}), Some(&id)),
    )
    .await;
    assert_eq!(out["stdout"], "still here\n");

    let d = ok(client, "destroy_sandbox", with_id(json!({}), named)).await;
    assert_eq!(d["destroyed"], true);
    assert!(sandbox_ids(platform).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_over_stdio() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_somna"))
        .arg("mcp")
        .env("SOMNA_ADDR", &platform.addr)
        .env("SOMNA_API_KEY", &platform.api_key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start somna mcp");
    let stdout = child.stdout.take().expect("stdout");
    let stdin = child.stdin.take().expect("stdin");
    let client = with_sessions()
        .serve((stdout, stdin))
        .await
        .expect("initialize over stdio");
    conversation(&client, &platform, true).await;

    // run_code without create_sandbox makes a sandbox for the session; the
    // session's end (stdin closed) destroys it.
    let out = ok(&client, "run_code", json!({"code": "print(1+1)"})).await;
    assert_eq!(out["stdout"], "2\n");
    assert_eq!(sandbox_ids(&platform).await.len(), 1);
    drop(client); // closes the server's stdin
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("somna mcp exits when stdin closes")
        .expect("wait");
    assert!(status.success(), "{status}");
    wait_for_no_sandboxes(&platform, "the stdio session ended").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_over_streamable_http() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_somna"))
        .args(["--json", "mcp", "--http", "127.0.0.1:0"])
        .env("SOMNA_ADDR", &platform.addr)
        .env("SOMNA_API_KEY", &platform.api_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start somna mcp --http");
    let mut lines = tokio::io::BufReader::new(server.stdout.take().expect("stdout")).lines();
    let first = lines
        .next_line()
        .await
        .expect("read")
        .expect("somna mcp --http prints its address");
    let v: Value = serde_json::from_str(&first).expect("JSON address line");
    let url = v["addr"].as_str().expect("addr").to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"),
        "{url}"
    );

    let client = with_sessions()
        .serve(StreamableHttpClientTransport::from_uri(url.clone()))
        .await
        .expect("initialize over HTTP");
    conversation(&client, &platform, true).await;

    // A client of the newest protocol, naming the sandbox in every call.
    // (rmcp 3.11's client still takes the session the server offers, so
    // calls without sandbox_id go to its session's sandbox; the stateless
    // path is covered by somna-mcp's unit tests.)
    let other = sessionless()
        .serve(StreamableHttpClientTransport::from_uri(url))
        .await
        .expect("a sessionless HTTP client");
    conversation(&other, &platform, false).await;
    let created = ok(&other, "create_sandbox", json!({"image": "busybox"})).await;
    assert_eq!(created["image"], "busybox");
    let id = created["sandbox_id"].as_str().expect("id");
    let out = ok(
        &other,
        "exec_command",
        json!({"command": "echo $((6*7))", "sandbox_id": id}),
    )
    .await;
    assert_eq!(out["stdout"], "42\n");
    let r = call(&other, "exec_command", json!({"command": "echo $((6*7))"})).await;
    assert_ne!(r.is_error, Some(true), "{}", text_of(&r));
    assert_eq!(
        r.structured_content
            .as_ref()
            .map(|s| s["sandbox_id"].clone()),
        Some(json!(id)),
        "a call without sandbox_id uses the session's sandbox"
    );
    // Stopping the server destroys what it created.
    assert_eq!(sandbox_ids(&platform).await.len(), 1);
    drop(other);
    drop(client);
    let pid = server.id().expect("server pid");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .expect("somna mcp --http stops on SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
    wait_for_no_sandboxes(&platform, "the HTTP server stopped").await;
    assert!(wait_until(Duration::from_secs(30), || platform
        .vmm_pids()
        .is_empty()));
}
