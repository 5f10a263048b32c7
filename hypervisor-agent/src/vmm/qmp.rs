//! A minimal QMP (QEMU Machine Protocol) client.
//!
//! Written here rather than taken from the `qapi` crate: that crate generates
//! bindings for the whole QAPI schema of a recent QEMU (slow to compile and
//! ahead of Debian 12's QEMU 7.2), while Somna sends a handful of commands
//! whose replies it reads as JSON. QMP is line-delimited JSON: a greeting,
//! `qmp_capabilities`, then `{"execute": ...}` → `{"return": ...}` or
//! `{"error": ...}`, with asynchronous `{"event": ...}` lines in between.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP sent something that is not JSON: {0}")]
    BadJson(#[from] serde_json::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {0} got no answer in time")]
    Timeout(String),
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Events received while waiting for command replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command {
                command: "greeting".into(),
                class: "Protocol".into(),
                desc: format!("unexpected greeting {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.read_reply(command).await
    }

    async fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            if reply.get("event").is_some() {
                self.events.push(reply);
            }
        }
    }

    /// Hands QEMU an open file descriptor under `name` (QMP `getfd`, the fd
    /// travels as SCM_RIGHTS), for `fd:<name>` migration URIs. This works
    /// under QEMU's `-sandbox spawn=deny`, unlike `exec:` URIs.
    pub async fn send_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        use std::os::fd::AsRawFd;
        let mut line =
            serde_json::to_vec(&json!({ "execute": "getfd", "arguments": { "fdname": name } }))?;
        line.push(b'\n');
        let raw = [fd.as_raw_fd()];
        let sock = self.writer.as_ref();
        loop {
            sock.writable().await?;
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(&line)];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
                nix::sys::socket::sendmsg::<()>(
                    sock.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == line.len() => break,
                Ok(n) => {
                    // The fd went with the first bytes; send the rest plainly.
                    self.writer.write_all(&line[n..]).await?;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.read_reply("getfd").await.map(|_| ())
    }

    /// Polls `query-migrate` until the migration ends; returns its final
    /// status object, or an error if it failed.
    pub async fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: r["status"].as_str().unwrap_or("failed").to_string(),
                        desc: r["error-desc"]
                            .as_str()
                            .unwrap_or("migration failed")
                            .to_string(),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(QmpError::Timeout("migrate".into()));
            }
            // No completion event to wait on without enabling the `events`
            // capability; the state file is small, so a short poll is fine.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Like [`Qmp::execute`], bounded in time.
    pub async fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }

    /// The VM's run state as QEMU reports it ("running", "paused",
    /// "internal-error", "shutdown", ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let ret = self.execute("query-status", None).await?;
        Ok(ret["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Events seen so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                return Ok(serde_json::from_str(line.trim())?);
            }
        }
    }
}
