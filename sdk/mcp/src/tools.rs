//! The tools: their argument types (which give the JSON schemas), and what
//! each call does. Every failure becomes a tool error whose text tells the
//! model what went wrong and what to do next.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rmcp::handler::server::common::schema_for_type;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool, ToolAnnotations};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use somna_sdk::proto::FileType;
use somna_sdk::{Command, CreateOptions, Language, Sandbox, WriteOptions};

use crate::server::SomnaMcp;
use crate::truncate::head_tail;

/// The longest a command may be given to run.
const MAX_EXEC_SECONDS: u64 = 3600;
/// The most directory entries `list_files` shows.
const MAX_LIST_ENTRIES: usize = 500;
/// Label on the sandboxes this server creates.
const CREATED_BY: (&str, &str) = ("created-by", "somna-mcp");

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSandboxArgs {
    /// Image to boot. "python" has Python 3 and a POSIX shell; "busybox" is a
    /// tiny shell-only image. Default: the server's default image (python).
    #[serde(default)]
    image: Option<String>,
    /// Virtual CPUs (default 1).
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    cpus: Option<u32>,
    /// Memory in MiB (default 512, at least 128).
    #[serde(default)]
    #[schemars(range(min = 128, max = 65536))]
    memory_mib: Option<u32>,
    /// Environment variables for every command run in the sandbox.
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    /// Destroy the sandbox this many seconds after creation (default: one
    /// hour). It is also destroyed when this session ends or sits idle.
    #[serde(default)]
    #[schemars(range(min = 1))]
    timeout_seconds: Option<u64>,
}

/// Languages `run_code` runs.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CodeLanguage {
    /// Python 3 (`python3`).
    #[default]
    Python,
    /// POSIX shell script (`sh`).
    Shell,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunCodeArgs {
    /// The code to run, e.g. "print(6*7)". Output goes to stdout/stderr;
    /// print what you want to see.
    code: String,
    /// "python" (default) or "shell".
    #[serde(default)]
    language: Option<CodeLanguage>,
    /// Sandbox to run in; default: this session's sandbox (created on
    /// first use).
    #[serde(default)]
    sandbox_id: Option<String>,
    /// Kill the code after this many seconds (default 120, at most 3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecCommandArgs {
    /// Shell command line, run with `sh -c`, e.g. "ls -la /tmp && uname -a".
    command: String,
    /// Working directory (default: the image's, usually "/").
    #[serde(default)]
    cwd: Option<String>,
    /// Extra environment variables for this command.
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    /// Sandbox to run in; default: this session's sandbox (created on
    /// first use).
    #[serde(default)]
    sandbox_id: Option<String>,
    /// Kill the command after this many seconds (default 120, at most 3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    timeout_seconds: Option<u64>,
}

/// How file content is written in arguments and results.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    /// Plain UTF-8 text.
    #[default]
    Utf8,
    /// Base64 (for binary files).
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteFileArgs {
    /// Absolute path in the sandbox, e.g. "/work/main.py". Missing parent
    /// directories are created.
    path: String,
    /// The file's content.
    content: String,
    /// "utf8" (default) or "base64" (content is base64-encoded bytes).
    #[serde(default)]
    encoding: Option<Encoding>,
    /// Append instead of replacing the file.
    #[serde(default)]
    append: Option<bool>,
    /// Sandbox to write to; default: this session's sandbox.
    #[serde(default)]
    sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadFileArgs {
    /// Absolute path in the sandbox.
    path: String,
    /// Start at this byte (default 0), to page through large files.
    #[serde(default)]
    offset: Option<u64>,
    /// "utf8" (default) or "base64" (for binary files).
    #[serde(default)]
    encoding: Option<Encoding>,
    /// Sandbox to read from; default: this session's sandbox.
    #[serde(default)]
    sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListFilesArgs {
    /// Directory to list (default "/").
    #[serde(default)]
    path: Option<String>,
    /// Sandbox to look in; default: this session's sandbox.
    #[serde(default)]
    sandbox_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SandboxArgs {
    /// The sandbox; default: this session's sandbox.
    #[serde(default)]
    sandbox_id: Option<String>,
}

struct ToolDef {
    name: &'static str,
    description: &'static str,
    schema: fn() -> Arc<JsonObject>,
    read_only: bool,
    destructive: bool,
}

fn tool_defs() -> [ToolDef; 8] {
    [
        ToolDef {
            name: "create_sandbox",
            description: "Create a new sandbox (an isolated Linux microVM) and make it this \
                session's sandbox: later calls without sandbox_id use it. Optional: you do not \
                need it before run_code or exec_command, which create a default sandbox (image \
                python) when the session has none (clients without an MCP session must call \
                it and pass its sandbox_id to every call). Use it to pick the image, CPUs, \
                memory or environment variables. Returns the sandbox_id.",
            schema: schema_for_type::<CreateSandboxArgs>,
            read_only: false,
            destructive: false,
        },
        ToolDef {
            name: "run_code",
            description: "Run a snippet of Python (default) or shell code in the sandbox and \
                return its stdout, stderr and exit code. Files and installed state persist \
                between calls, but each call is a new process (variables do not carry over: \
                write files to keep data). Long output is truncated to its beginning and end, \
                with a note. Example: {\"code\": \"print(6*7)\"}.",
            schema: schema_for_type::<RunCodeArgs>,
            read_only: false,
            destructive: false,
        },
        ToolDef {
            name: "exec_command",
            description: "Run a shell command line in the sandbox (`sh -c COMMAND`) and return \
                its stdout, stderr and exit code. Use it for ls, cat, pip, git, compilers and \
                the like. Long output is truncated to its beginning and end, with a note.",
            schema: schema_for_type::<ExecCommandArgs>,
            read_only: false,
            destructive: false,
        },
        ToolDef {
            name: "write_file",
            description: "Write a file in the sandbox (replacing it, or appending), creating \
                missing parent directories. Text by default; base64 for binary content.",
            schema: schema_for_type::<WriteFileArgs>,
            read_only: false,
            destructive: false,
        },
        ToolDef {
            name: "read_file",
            description: "Read a file from the sandbox. Large files come back in pieces: the \
                result says where to continue (pass that offset). Binary files: use \
                encoding base64.",
            schema: schema_for_type::<ReadFileArgs>,
            read_only: true,
            destructive: false,
        },
        ToolDef {
            name: "list_files",
            description: "List a directory in the sandbox: type, size, permissions and name of \
                each entry.",
            schema: schema_for_type::<ListFilesArgs>,
            read_only: true,
            destructive: false,
        },
        ToolDef {
            name: "sleep_sandbox",
            description: "Put the sandbox into light sleep: its memory, processes and files are \
                saved to disk and it uses no CPU or RAM. Any later call wakes it automatically \
                in well under a second. Use it when pausing work for a while.",
            schema: schema_for_type::<SandboxArgs>,
            read_only: false,
            destructive: false,
        },
        ToolDef {
            name: "destroy_sandbox",
            description: "Destroy the sandbox and everything in it (files, processes). Call it \
                when you are done. The next run_code or exec_command creates a fresh one.",
            schema: schema_for_type::<SandboxArgs>,
            read_only: false,
            destructive: true,
        },
    ]
}

/// The tools, for `tools/list`.
pub(crate) fn definitions() -> Vec<Tool> {
    tool_defs()
        .into_iter()
        .map(|d| {
            let mut annotations = ToolAnnotations::default();
            annotations.read_only_hint = Some(d.read_only);
            annotations.destructive_hint = Some(d.destructive);
            annotations.open_world_hint = Some(false);
            let mut tool = Tool::new(d.name, d.description, (d.schema)());
            tool.annotations = Some(annotations);
            tool
        })
        .collect()
}

pub(crate) fn names() -> Vec<&'static str> {
    tool_defs().iter().map(|d| d.name).collect()
}

/// A failed call: the text the model sees.
struct Failure(String);

impl From<somna_sdk::Error> for Failure {
    fn from(e: somna_sdk::Error) -> Failure {
        Failure(e.to_string())
    }
}

type Outcome = Result<CallToolResult, Failure>;

/// Runs tool `name`; `None` if there is no such tool.
pub(crate) async fn call(
    mcp: &SomnaMcp,
    name: &str,
    args: JsonObject,
    stateless: bool,
) -> Option<CallToolResult> {
    let ctx = Ctx { mcp, stateless };
    let outcome = match name {
        "create_sandbox" => match parse::<CreateSandboxArgs>(name, args) {
            Ok(a) => ctx.create_sandbox(a).await,
            Err(f) => Err(f),
        },
        "run_code" => match parse::<RunCodeArgs>(name, args) {
            Ok(a) => ctx.run_code(a).await,
            Err(f) => Err(f),
        },
        "exec_command" => match parse::<ExecCommandArgs>(name, args) {
            Ok(a) => ctx.exec_command(a).await,
            Err(f) => Err(f),
        },
        "write_file" => match parse::<WriteFileArgs>(name, args) {
            Ok(a) => ctx.write_file(a).await,
            Err(f) => Err(f),
        },
        "read_file" => match parse::<ReadFileArgs>(name, args) {
            Ok(a) => ctx.read_file(a).await,
            Err(f) => Err(f),
        },
        "list_files" => match parse::<ListFilesArgs>(name, args) {
            Ok(a) => ctx.list_files(a).await,
            Err(f) => Err(f),
        },
        "sleep_sandbox" => match parse::<SandboxArgs>(name, args) {
            Ok(a) => ctx.sleep_sandbox(a).await,
            Err(f) => Err(f),
        },
        "destroy_sandbox" => match parse::<SandboxArgs>(name, args) {
            Ok(a) => ctx.destroy_sandbox(a).await,
            Err(f) => Err(f),
        },
        _ => return None,
    };
    Some(outcome.unwrap_or_else(|Failure(msg)| {
        CallToolResult::error(vec![ContentBlock::text(format!("Error: {msg}"))])
    }))
}

/// Arguments as `T`, or a message that says what is wrong with them and
/// what the schema wants.
fn parse<T: DeserializeOwned + JsonSchema + 'static>(
    tool: &str,
    args: JsonObject,
) -> Result<T, Failure> {
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        let schema = schema_for_type::<T>();
        let props: Vec<String> = schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let required: Vec<String> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Failure(format!(
            "invalid arguments for {tool}: {e}. It takes {} (required: {}).",
            props.join(", "),
            if required.is_empty() {
                "none".to_string()
            } else {
                required.join(", ")
            }
        ))
    })
}

fn timeout_arg(given: Option<u64>, default: Duration) -> Result<Duration, Failure> {
    match given {
        None => Ok(default),
        Some(0) => Err(Failure("timeout_seconds must be at least 1".to_string())),
        Some(s) if s > MAX_EXEC_SECONDS => Err(Failure(format!(
            "timeout_seconds must be at most {MAX_EXEC_SECONDS}"
        ))),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn non_empty<'a>(what: &str, s: &'a str) -> Result<&'a str, Failure> {
    if s.trim().is_empty() {
        Err(Failure(format!("{what} must not be empty")))
    } else {
        Ok(s)
    }
}

struct Ctx<'a> {
    mcp: &'a SomnaMcp,
    stateless: bool,
}

/// The sandbox a call works on.
struct Target {
    sandbox: Sandbox,
    /// Created by this call (no sandbox yet in the session).
    created: bool,
}

impl Ctx<'_> {
    fn owner(&self) -> Option<u64> {
        (!self.stateless).then_some(self.mcp.session.id)
    }

    async fn client(&self) -> Result<somna_sdk::Client, Failure> {
        Ok(self.mcp.session.shared.client().await?)
    }

    async fn create(&self, opts: CreateOptions) -> Result<Sandbox, Failure> {
        let client = self.client().await?;
        let image = opts.image.clone();
        let sandbox = client
            .create_sandbox(opts)
            .await
            .map_err(|e| Failure(format!("cannot create a sandbox from image {image:?}: {e}")))?;
        self.mcp.session.shared.track(sandbox.id(), self.owner());
        if !self.stateless {
            self.mcp.session.set_current(Some(sandbox.id().to_string()));
        }
        Ok(sandbox)
    }

    fn default_options(&self, image: Option<String>) -> CreateOptions {
        let config = &self.mcp.session.shared.config;
        CreateOptions::new(image.unwrap_or_else(|| config.default_image.clone()))
            .timeout(config.sandbox_timeout)
            .label(CREATED_BY.0, CREATED_BY.1)
    }

    /// The named sandbox, else the session's, else (with `create`, in a
    /// session) a new one. A client without a session must name it: a
    /// sandbox made for one call could never be found again.
    async fn target(&self, given: Option<String>, create: bool) -> Result<Target, Failure> {
        let id = match given {
            Some(id) => Some(non_empty("sandbox_id", &id)?.trim().to_string()),
            None => self.mcp.session.current(),
        };
        if let Some(id) = id {
            self.mcp.session.shared.touch(&id);
            let client = self.client().await?;
            return Ok(Target {
                sandbox: client.attach(&id),
                created: false,
            });
        }
        if !create || self.stateless {
            return Err(Failure(if self.stateless {
                "no sandbox_id given: this client has no MCP session, so pass the sandbox_id \
                 that create_sandbox returned"
                    .to_string()
            } else {
                "this session has no sandbox yet: call create_sandbox (or run_code, which \
                 creates one), or pass sandbox_id"
                    .to_string()
            }));
        }
        let sandbox = self.create(self.default_options(None)).await?;
        Ok(Target {
            sandbox,
            created: true,
        })
    }

    /// A sandbox call's error, with what to do when the sandbox is gone.
    fn sandbox_error(&self, id: &str, e: somna_sdk::Error) -> Failure {
        match e {
            somna_sdk::Error::NotFound(m) if m.starts_with("sandbox ") => {
                self.mcp.session.drop_current_if(id);
                self.mcp.session.shared.forget(id);
                Failure(format!(
                    "{m}: it was destroyed or timed out. Call create_sandbox (or run_code \
                     without sandbox_id) for a new one."
                ))
            }
            e => Failure(e.to_string()),
        }
    }

    async fn create_sandbox(&self, a: CreateSandboxArgs) -> Outcome {
        let mut opts = self.default_options(a.image.map(|i| i.trim().to_string()));
        non_empty("image", &opts.image)?;
        if let Some(c) = a.cpus {
            opts = opts.cpus(c);
        }
        if let Some(m) = a.memory_mib {
            opts = opts.memory_mib(m);
        }
        for (k, v) in a.env.unwrap_or_default() {
            opts = opts.env(k, v);
        }
        match a.timeout_seconds {
            Some(0) => return Err(Failure("timeout_seconds must be at least 1".into())),
            Some(t) => opts = opts.timeout(Duration::from_secs(t)),
            None => {}
        }
        let sandbox = self.create(opts).await?;
        let info = sandbox.info();
        let idle = self.mcp.session.shared.config.idle_timeout.as_secs();
        let text = format!(
            "Created sandbox {} (image {}, {} vCPU, {} MiB memory).{} It is destroyed when \
             this session ends, after {idle} s without use, or by destroy_sandbox.",
            info.id,
            info.image,
            info.cpus,
            info.memory_mib,
            if self.stateless {
                " Pass this sandbox_id to every later call (this client has no MCP session)."
            } else {
                " Later calls in this session use it when they give no sandbox_id."
            },
        );
        Ok(with_structured(
            text,
            json!({
                "sandbox_id": info.id,
                "image": info.image,
                "cpus": info.cpus,
                "memory_mib": info.memory_mib,
            }),
        ))
    }

    async fn run(
        &self,
        given: Option<String>,
        command: Command,
        code: Option<(&str, Language)>,
    ) -> Outcome {
        let target = self.target(given, true).await?;
        let id = target.sandbox.id().to_string();
        let spawned = match code {
            Some((code, lang)) => target.sandbox.spawn_code(code, lang, command).await,
            None => target.sandbox.spawn(command).await,
        };
        let output = match spawned {
            Ok(p) => p.wait_with_output().await,
            Err(e) => Err(e),
        }
        .map_err(|e| self.sandbox_error(&id, e))?;
        self.mcp.session.shared.touch(&id);
        Ok(self.format_output(&id, target.created, &output))
    }

    fn format_output(&self, id: &str, created: bool, out: &somna_sdk::Output) -> CallToolResult {
        let limit = self.mcp.session.shared.config.max_output_bytes;
        let (stdout, so_cut) = head_tail(&out.stdout, limit);
        let (stderr, se_cut) = head_tail(&out.stderr, limit);
        let mut text = String::new();
        if created {
            text.push_str(&format!(
                "(created sandbox {id} for this session; later calls reuse it)\n"
            ));
        }
        text.push_str(&format!("exit_code: {}", out.exit_code));
        if out.timed_out {
            text.push_str(" (killed: the time limit passed)");
        } else if let Some(sig) = out.signal {
            text.push_str(&format!(" (killed by signal {sig})"));
        }
        if !out.message.is_empty() {
            text.push_str(&format!("\nmessage: {}", out.message));
        }
        text.push_str("\n--- stdout ---\n");
        text.push_str(if stdout.is_empty() {
            "(empty)"
        } else {
            &stdout
        });
        if !stdout.is_empty() && !stdout.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("--- stderr ---\n");
        text.push_str(if stderr.is_empty() {
            "(empty)"
        } else {
            &stderr
        });
        let structured = json!({
            "sandbox_id": id,
            "exit_code": out.exit_code,
            "timed_out": out.timed_out,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": so_cut,
            "stderr_truncated": se_cut,
        });
        with_structured(text, structured)
    }

    async fn run_code(&self, a: RunCodeArgs) -> Outcome {
        non_empty("code", &a.code)?;
        let timeout = timeout_arg(a.timeout_seconds, self.exec_timeout())?;
        let lang = match a.language.unwrap_or_default() {
            CodeLanguage::Python => Language::Python,
            CodeLanguage::Shell => Language::Shell,
        };
        let command = Command::default().timeout(timeout);
        self.run(a.sandbox_id, command, Some((&a.code, lang))).await
    }

    async fn exec_command(&self, a: ExecCommandArgs) -> Outcome {
        non_empty("command", &a.command)?;
        let timeout = timeout_arg(a.timeout_seconds, self.exec_timeout())?;
        let mut command = Command::shell(a.command).timeout(timeout);
        if let Some(cwd) = a.cwd.filter(|c| !c.is_empty()) {
            command = command.cwd(cwd);
        }
        for (k, v) in a.env.unwrap_or_default() {
            command = command.env(k, v);
        }
        self.run(a.sandbox_id, command, None).await
    }

    fn exec_timeout(&self) -> Duration {
        self.mcp.session.shared.config.exec_timeout
    }

    async fn write_file(&self, a: WriteFileArgs) -> Outcome {
        non_empty("path", &a.path)?;
        let data = match a.encoding.unwrap_or_default() {
            Encoding::Utf8 => a.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(a.content.trim())
                .map_err(|e| Failure(format!("content is not valid base64: {e}")))?,
        };
        let target = self.target(a.sandbox_id, true).await?;
        let id = target.sandbox.id().to_string();
        let opts = WriteOptions {
            mode: 0,
            create_parents: true,
            append: a.append.unwrap_or(false),
        };
        let n = data.len();
        let info = target
            .sandbox
            .write_file_from(&a.path, std::io::Cursor::new(data), opts)
            .await
            .map_err(|e| self.sandbox_error(&id, e))?;
        self.mcp.session.shared.touch(&id);
        let text = format!(
            "{}{} {n} bytes to {} (the file now has {} bytes)",
            created_note(&id, target.created),
            if opts.append { "Appended" } else { "Wrote" },
            a.path,
            info.size
        );
        Ok(with_structured(
            text,
            json!({ "sandbox_id": id, "path": a.path, "bytes_written": n, "size": info.size }),
        ))
    }

    async fn read_file(&self, a: ReadFileArgs) -> Outcome {
        non_empty("path", &a.path)?;
        let target = self.target(a.sandbox_id, false).await?;
        let sb = &target.sandbox;
        let id = sb.id().to_string();
        let info = sb
            .stat(&a.path)
            .await
            .map_err(|e| self.sandbox_error(&id, e))?;
        if info.r#type() == FileType::Directory {
            return Err(Failure(format!(
                "{} is a directory: use list_files to see what is in it",
                a.path
            )));
        }
        let offset = a.offset.unwrap_or(0);
        let limit = self.mcp.session.shared.config.max_read_bytes as u64;
        let data = sb
            .read_file_range(&a.path, offset, limit)
            .await
            .map_err(|e| self.sandbox_error(&id, e))?;
        self.mcp.session.shared.touch(&id);
        let end = offset + data.len() as u64;
        let more = end < info.size;
        let encoding = a.encoding.unwrap_or_default();
        let (content, note) = match encoding {
            Encoding::Base64 => (
                base64::engine::general_purpose::STANDARD.encode(&data),
                None,
            ),
            Encoding::Utf8 => match String::from_utf8(data) {
                Ok(s) => (s, None),
                Err(e) => (
                    String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    Some(
                        "the file is not valid UTF-8 (bad bytes are shown as \u{fffd}); read it with encoding base64 for the exact bytes",
                    ),
                ),
            },
        };
        let mut text = content.clone();
        if more || offset > 0 || note.is_some() {
            text.push_str(&format!(
                "\n[{}: bytes {offset}..{end} of {}{}{}]",
                a.path,
                info.size,
                if more {
                    format!("; more follows: call read_file with offset {end}")
                } else {
                    String::new()
                },
                note.map(|n| format!("; {n}")).unwrap_or_default(),
            ));
        }
        Ok(with_structured(
            text,
            json!({
                "sandbox_id": id,
                "path": a.path,
                "size": info.size,
                "offset": offset,
                "next_offset": if more { Some(end) } else { None },
                "encoding": match encoding { Encoding::Utf8 => "utf8", Encoding::Base64 => "base64" },
                "content": content,
            }),
        ))
    }

    async fn list_files(&self, a: ListFilesArgs) -> Outcome {
        let path = a
            .path
            .filter(|p| !p.trim().is_empty())
            .unwrap_or_else(|| "/".into());
        let target = self.target(a.sandbox_id, false).await?;
        let id = target.sandbox.id().to_string();
        let mut entries = target
            .sandbox
            .list_files(&path)
            .await
            .map_err(|e| self.sandbox_error(&id, e))?;
        self.mcp.session.shared.touch(&id);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let total = entries.len();
        let mut text = format!("{path}: {total} entries\n");
        for e in entries.iter().take(MAX_LIST_ENTRIES) {
            let kind = match e.r#type() {
                FileType::Directory => "dir ",
                FileType::File => "file",
                FileType::Symlink => "link",
                _ => "other",
            };
            text.push_str(&format!(
                "{kind} {:>10} {:04o} {}{}{}\n",
                e.size,
                e.mode,
                e.name,
                if e.r#type() == FileType::Directory {
                    "/"
                } else {
                    ""
                },
                if e.symlink_target.is_empty() {
                    String::new()
                } else {
                    format!(" -> {}", e.symlink_target)
                }
            ));
        }
        if total > MAX_LIST_ENTRIES {
            text.push_str(&format!(
                "[... {} more entries not shown; list a subdirectory or use exec_command with ls/find]\n",
                total - MAX_LIST_ENTRIES
            ));
        }
        let list: Vec<Value> = entries
            .iter()
            .take(MAX_LIST_ENTRIES)
            .map(|e| {
                json!({
                    "name": e.name,
                    "path": e.path,
                    "type": match e.r#type() {
                        FileType::Directory => "directory",
                        FileType::File => "file",
                        FileType::Symlink => "symlink",
                        _ => "other",
                    },
                    "size": e.size,
                    "mode": format!("{:04o}", e.mode),
                })
            })
            .collect();
        Ok(with_structured(
            text,
            json!({ "sandbox_id": id, "path": path, "total": total, "entries": list }),
        ))
    }

    async fn sleep_sandbox(&self, a: SandboxArgs) -> Outcome {
        let target = self.target(a.sandbox_id, false).await?;
        let id = target.sandbox.id().to_string();
        let client = self.client().await?;
        client
            .sleep_sandbox(&id)
            .await
            .map_err(|e| self.sandbox_error(&id, e))?;
        self.mcp.session.shared.touch(&id);
        Ok(with_structured(
            format!(
                "Sandbox {id} is asleep: its memory, processes and files are on disk. The next \
                 call that uses it wakes it automatically."
            ),
            json!({ "sandbox_id": id, "state": "sleeping" }),
        ))
    }

    async fn destroy_sandbox(&self, a: SandboxArgs) -> Outcome {
        let target = self.target(a.sandbox_id, false).await?;
        let id = target.sandbox.id().to_string();
        let result = target.sandbox.destroy().await;
        self.mcp.session.drop_current_if(&id);
        self.mcp.session.shared.forget(&id);
        match result {
            Ok(()) => Ok(with_structured(
                format!(
                    "Destroyed sandbox {id}. The next run_code or exec_command creates a new one."
                ),
                json!({ "sandbox_id": id, "destroyed": true }),
            )),
            Err(e) => Err(self.sandbox_error(&id, e)),
        }
    }
}

fn created_note(id: &str, created: bool) -> String {
    if created {
        format!("(created sandbox {id} for this session; later calls reuse it) ")
    } else {
        String::new()
    }
}

/// A successful result: readable text for the model plus the same facts
/// as structured content for programs.
fn with_structured(text: String, structured: Value) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(structured);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{McpConfig, McpServer};

    fn args(v: Value) -> JsonObject {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn text_of(r: &CallToolResult) -> String {
        r.content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn every_tool_has_an_object_schema_and_a_description() {
        let tools = definitions();
        assert_eq!(tools.len(), 8);
        for t in &tools {
            assert_eq!(
                t.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                t.name
            );
            assert!(t.description.as_ref().is_some_and(|d| d.len() > 40));
        }
        let run = tools.iter().find(|t| t.name == "run_code").unwrap();
        assert_eq!(run.input_schema["required"], json!(["code"]));
        let props = run.input_schema["properties"].as_object().unwrap();
        assert!(props.contains_key("language") && props.contains_key("sandbox_id"));
    }

    #[tokio::test]
    async fn invalid_arguments_are_tool_errors_that_say_what_is_wrong() {
        // Nothing listens on port 1: no call here may reach the API.
        let config = McpConfig {
            addr: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let server = McpServer::new(config);
        let mcp = server.session();
        let cases = [
            ("run_code", json!({}), "missing field `code`"),
            ("run_code", json!({"code": 42}), "invalid type"),
            (
                "run_code",
                json!({"code": "1", "language": "ruby"}),
                "unknown variant `ruby`",
            ),
            (
                "run_code",
                json!({"code": "1", "bogus": true}),
                "unknown field `bogus`",
            ),
            ("run_code", json!({"code": "  "}), "code must not be empty"),
            (
                "run_code",
                json!({"code": "1", "timeout_seconds": 0}),
                "at least 1",
            ),
            (
                "run_code",
                json!({"code": "1", "timeout_seconds": -5}),
                "invalid value",
            ),
            (
                "write_file",
                json!({"path": "/a"}),
                "missing field `content`",
            ),
            (
                "write_file",
                json!({"path": "/a", "content": "%%", "encoding": "base64"}),
                "not valid base64",
            ),
            ("read_file", json!({"path": "/etc/hosts"}), "no sandbox yet"),
            ("create_sandbox", json!({"cpus": "many"}), "invalid type"),
            (
                "destroy_sandbox",
                json!({"sandbox_id": ""}),
                "sandbox_id must not be empty",
            ),
        ];
        for (tool, a, want) in cases {
            let r = call(&mcp, tool, args(a.clone()), false).await.unwrap();
            assert_eq!(r.is_error, Some(true), "{tool} {a}");
            let text = text_of(&r);
            assert!(text.contains(want), "{tool} {a}: {text}");
            if want.contains("field") || want.contains("type") || want.contains("variant") {
                assert!(text.contains("It takes"), "{text}");
            }
        }
        assert!(
            call(&mcp, "no_such_tool", JsonObject::new(), false)
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_client_without_a_session_must_name_its_sandbox() {
        // Nothing listens on port 1: a sandbox made for a call of a client
        // without a session could never be found again, so none is made.
        let config = McpConfig {
            addr: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let mcp = McpServer::new(config).session();
        for (tool, a) in [
            ("run_code", json!({"code": "print(1)"})),
            ("exec_command", json!({"command": "true"})),
            ("read_file", json!({"path": "/etc/hosts"})),
        ] {
            let r = call(&mcp, tool, args(a), true).await.unwrap();
            assert_eq!(r.is_error, Some(true), "{tool}");
            assert!(
                text_of(&r).contains("pass the sandbox_id"),
                "{tool}: {}",
                text_of(&r)
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_api_is_a_tool_error_too() {
        let config = McpConfig {
            addr: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let mcp = McpServer::new(config).session();
        let r = call(&mcp, "run_code", args(json!({"code": "print(1)"})), false)
            .await
            .unwrap();
        assert_eq!(r.is_error, Some(true));
        assert!(
            text_of(&r).contains("cannot connect to Somna"),
            "{}",
            text_of(&r)
        );
    }
}
