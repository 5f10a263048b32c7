//! Running processes in a sandbox: a [`Command`] builder, [`Sandbox::exec`]
//! to run to completion and collect output, [`Sandbox::spawn`] to stream.

use std::collections::BTreeMap;
use std::time::Duration;

use somna_proto::v1::{self as proto, exec_request, exec_response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Error, Result, Sandbox};

/// A process to run in a sandbox.
#[derive(Debug, Clone, Default)]
pub struct Command {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: String,
    user: String,
    timeout: Option<Duration>,
    stdin: bool,
    pty: Option<(u16, u16)>,
    detach: Option<String>,
    max_output_bytes: u64,
}

impl Command {
    /// A command running `program` (looked up in the sandbox's PATH).
    pub fn new(program: impl Into<String>) -> Self {
        Command {
            argv: vec![program.into()],
            ..Default::default()
        }
    }

    /// A command from a full argv.
    pub fn from_argv<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> Self {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// A command running `script` with `sh -c`.
    pub fn shell(script: impl Into<String>) -> Self {
        Command::from_argv(["sh".to_string(), "-c".to_string(), script.into()])
    }

    /// The same settings with another argv.
    pub fn with_argv<I: IntoIterator<Item = S>, S: Into<String>>(mut self, argv: I) -> Self {
        self.argv = argv.into_iter().map(Into::into).collect();
        self
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.argv.push(arg.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = dir.into();
        self
    }
    /// "name", "uid", "uid:gid" or "name:group".
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }
    /// Kill the process (group) when it runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Stream stdin with [`Process::write_stdin`] (otherwise it reads /dev/null).
    pub fn stdin(mut self, on: bool) -> Self {
        self.stdin = on;
        self
    }
    /// Run in the background: the call returns once the process started,
    /// and the process keeps running (also across sleep and wake) with its
    /// stdout and stderr appended to `output_file` in the sandbox ("" for
    /// /dev/null). Not with stdin, a pty or a timeout.
    pub fn detach(mut self, output_file: impl Into<String>) -> Self {
        self.detach = Some(output_file.into());
        self
    }
    /// Keep at most this many bytes of stdout and stderr together (the
    /// host's limit, 64 MiB by default, caps it); the rest is discarded
    /// after a marker and [`Output::output_truncated`] is set.
    pub fn max_output_bytes(mut self, n: u64) -> Self {
        self.max_output_bytes = n;
        self
    }
    /// Run under a pseudo-terminal of this size.
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.pty = Some((rows, cols));
        self
    }

    fn into_start(self, sandbox_id: &str) -> proto::ExecStart {
        proto::ExecStart {
            sandbox_id: sandbox_id.to_string(),
            argv: self.argv,
            env: self.env.into_iter().collect(),
            cwd: self.cwd,
            user: self.user,
            timeout_ms: self
                .timeout
                .map(|t| t.as_millis().max(1) as u64)
                .unwrap_or(0),
            stdin: self.stdin,
            max_output_bytes: self.max_output_bytes,
            detach: self.detach.is_some(),
            output_file: self.detach.unwrap_or_default(),
            pty: self.pty.map(|(rows, cols)| proto::PtySize {
                rows: rows.into(),
                cols: cols.into(),
            }),
        }
    }
}

/// How a process ended, and everything it printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Like a shell's `$?`: the exit code, 128+N for signal N, 127 for
    /// "command not found".
    pub exit_code: i32,
    /// The signal that ended the process, if any.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Why the process could not start or was killed, if it says.
    pub message: String,
    /// It wrote more than its output limit: the output ends with a
    /// `[somna: output truncated ...]` marker and the rest was discarded.
    pub output_truncated: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn record_exit(&mut self, e: proto::ExecExit) {
        self.exit_code = e.exit_code;
        self.signal = (e.signal != 0).then_some(e.signal);
        self.timed_out = e.timed_out;
        self.message = e.message;
        self.output_truncated = e.output_truncated;
    }
}

/// One event of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The process ended; no events follow.
    Exit(proto::ExecExit),
}

/// A process running in a sandbox.
pub struct Process {
    pid: u32,
    events: tonic::Streaming<proto::ExecResponse>,
    /// An event read while starting, delivered first.
    pending: Option<exec_response::Event>,
    input: mpsc::Sender<proto::ExecRequest>,
    exited: bool,
}

impl Process {
    /// The process id inside the sandbox.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next output or exit event; None after the exit event.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        if self.exited {
            return Ok(None);
        }
        loop {
            let event = match self.pending.take() {
                Some(ev) => Some(ev),
                None => match self.events.message().await? {
                    Some(msg) => msg.event,
                    None => {
                        return Err(Error::Protocol(
                            "the exec stream ended without an exit status".into(),
                        ));
                    }
                },
            };
            match event {
                Some(exec_response::Event::Stdout(b)) => return Ok(Some(ExecEvent::Stdout(b))),
                Some(exec_response::Event::Stderr(b)) => return Ok(Some(ExecEvent::Stderr(b))),
                Some(exec_response::Event::Exit(e)) => {
                    self.exited = true;
                    return Ok(Some(ExecEvent::Exit(e)));
                }
                Some(exec_response::Event::Started(_)) | None => continue,
            }
        }
    }

    async fn send(&self, msg: exec_request::Msg) -> Result<()> {
        self.input
            .send(proto::ExecRequest { msg: Some(msg) })
            .await
            .map_err(|_| Error::FailedPrecondition("the process has already exited".into()))
    }

    /// Writes to the process's stdin (the command must have `stdin(true)`).
    pub async fn write_stdin(&self, data: impl Into<Vec<u8>>) -> Result<()> {
        self.send(exec_request::Msg::Stdin(data.into())).await
    }

    pub async fn close_stdin(&self) -> Result<()> {
        self.send(exec_request::Msg::CloseStdin(proto::CloseStdin {}))
            .await
    }

    /// Sends a signal (e.g. 15 for SIGTERM) to the process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.send(exec_request::Msg::Signal(proto::SendSignal { signal }))
            .await
    }

    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.send(exec_request::Msg::Resize(proto::PtySize {
            rows: rows.into(),
            cols: cols.into(),
        }))
        .await
    }

    /// Kills the process group (SIGKILL); the exit event follows.
    pub async fn kill(&self) -> Result<()> {
        self.signal(9).await
    }

    /// Whether the exit event has been read.
    pub fn has_exited(&self) -> bool {
        self.exited
    }

    /// Collects the remaining output until the process exits.
    pub async fn wait_with_output(mut self) -> Result<Output> {
        let mut out = Output::default();
        while let Some(ev) = self.next_event().await? {
            match ev {
                ExecEvent::Stdout(b) => out.stdout.extend(b),
                ExecEvent::Stderr(b) => out.stderr.extend(b),
                ExecEvent::Exit(e) => out.record_exit(e),
            }
        }
        Ok(out)
    }

    /// Waits for the exit, handing each output chunk to `on_stdout` /
    /// `on_stderr` as it arrives (and keeping it in the returned [`Output`]
    /// too, unless `keep` is false).
    pub async fn wait_streaming(
        mut self,
        mut on_stdout: impl FnMut(&[u8]),
        mut on_stderr: impl FnMut(&[u8]),
        keep: bool,
    ) -> Result<Output> {
        let mut out = Output::default();
        while let Some(ev) = self.next_event().await? {
            match ev {
                ExecEvent::Stdout(b) => {
                    on_stdout(&b);
                    if keep {
                        out.stdout.extend(b);
                    }
                }
                ExecEvent::Stderr(b) => {
                    on_stderr(&b);
                    if keep {
                        out.stderr.extend(b);
                    }
                }
                ExecEvent::Exit(e) => out.record_exit(e),
            }
        }
        Ok(out)
    }
}

impl Sandbox {
    /// Starts a process and returns as soon as it runs.
    pub async fn spawn(&self, command: Command) -> Result<Process> {
        let (tx, rx) = mpsc::channel(64);
        let start = proto::ExecRequest {
            msg: Some(exec_request::Msg::Start(command.into_start(self.id()))),
        };
        tx.send(start)
            .await
            .map_err(|_| Error::Protocol("exec request channel closed".into()))?;
        let mut events = self.rpc().exec(ReceiverStream::new(rx)).await?.into_inner();
        // The first event is `started`, or `exit` when the program could not
        // run (e.g. not found): keep that for next_event.
        let mut pid = 0;
        let mut pending = None;
        if let Some(msg) = events.message().await? {
            match msg.event {
                Some(exec_response::Event::Started(s)) => pid = s.pid,
                other => pending = other,
            }
        }
        Ok(Process {
            pid,
            events,
            pending,
            input: tx,
            exited: false,
        })
    }

    /// Runs a process to completion and collects its output.
    pub async fn exec(&self, command: Command) -> Result<Output> {
        self.spawn(command).await?.wait_with_output().await
    }
}
