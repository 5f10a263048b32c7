//! `guest_request`: what the guest agent does with the bytes the host sends
//! it, up to decoded `somna.guest.v1` requests.
//!
//! The agent is a binary crate, so its pure modules are compiled in here
//! from their source files: `h2sync.rs` (finding HTTP/2 sessions in the
//! serial port's byte stream: the preface scanner, host sync markers and the
//! client frame tracker) and `user.rs` (resolving `ExecStart.user`). The
//! rest of the path is the agent's libraries with the agent's settings:
//! hyper's HTTP/2 server tuned as `channel::serve_connection` tunes it, and
//! the tonic-generated `GuestAgentServer` (gRPC framing, the 16 MiB message
//! limit, prost decoding of every request type) around a stub service that
//! reads every request message and resolves exec users, but touches no file
//! and runs nothing.
//!
//! The first byte picks the mode:
//!
//! - even: the rest is the serial byte stream. It goes through the same
//!   loop as `serial::serve` (scanner until a preface, echo sync markers,
//!   serve one HTTP/2 session while the tracker follows the client's frames,
//!   start over where a new preface begins), each session served in memory.
//!   The tracker must agree with itself fed whole or byte by byte.
//! - odd: the second byte picks an RPC and the rest is its gRPC request body
//!   (length-prefixed messages), decoded by tonic's `Streaming` with the
//!   service's decoder and limit: the decoding path without HTTP/2 around it.

#[allow(dead_code)]
#[path = "../../../../images/guest-agent/src/h2server.rs"]
mod h2server;
#[allow(dead_code)]
#[path = "../../../../images/guest-agent/src/h2sync.rs"]
mod h2sync;
#[allow(dead_code)]
#[path = "../../../../images/guest-agent/src/user.rs"]
mod user;

use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use prost::Message;
use somna_proto::guest::v1::guest_agent_server::{GuestAgent, GuestAgentServer};
use somna_proto::guest::v1::{
    HealthRequest, HealthResponse, Identity, ShutdownRequest, ShutdownResponse, WakeRequest,
    WakeResponse,
};
use somna_proto::serial_sync;
use somna_proto::v1::exec_request::Msg as ExecMsg;
use somna_proto::v1::write_file_request::Msg as WriteMsg;
use somna_proto::v1::{
    CloseStdin, ExecRequest, ExecResponse, ExecStart, FileChunk, FileInfo, ListFilesRequest,
    ListFilesResponse, MakeDirRequest, PtySize, ReadFileRequest, RemoveFileRequest,
    RemoveFileResponse, RenameFileRequest, RenameFileResponse, SendSignal, StatFileRequest,
    WriteFileRequest, WriteFileResponse, WriteFileStart,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codec::{Codec, Streaming};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use self::h2sync::{Found, FrameTracker, PREFACE, PrefaceScanner};
use crate::runner::Outcome;

use self::h2server::H2_MAX_FRAME_SIZE;
/// `service::MAX_MESSAGE` in the agent.
const MAX_MESSAGE: usize = 16 << 20;
/// A session gets this many reads that find no new bytes (letting the
/// service's tasks run) before it sees end of file.
const IDLE_READS: u32 = 64;
/// An in-memory session that takes this long hangs.
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);
/// Sessions served per input at most.
const MAX_SESSIONS: usize = 16;

const SERVICE: &str = "/somna.guest.v1.GuestAgent/";
/// The RPCs, in the order the message mode's selector picks them.
const METHODS: &[&str] = &[
    "Health",
    "Exec",
    "ReadFile",
    "WriteFile",
    "StatFile",
    "ListFiles",
    "MakeDir",
    "RemoveFile",
    "RenameFile",
    "Shutdown",
    "Wake",
];

pub const DICT: &[&[u8]] = &[
    PREFACE,
    serial_sync::PREFIX,
    b"SOMNA-SYNC 00000000deadbeef\n",
    b"/somna.guest.v1.GuestAgent/",
    b"Exec",
    b"WriteFile",
    b"Wake",
    b"application/grpc",
    b"grpc-encoding",
    b"gzip",
    b"trailers",
    // Empty SETTINGS, SETTINGS ack, GOAWAY, RST_STREAM, WINDOW_UPDATE heads.
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00",
    b"\x00\x00\x04\x03\x00\x00\x00\x00\x01",
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x01",
    // A gRPC message header: uncompressed, then compressed.
    b"\x00\x00\x00\x00\x05",
    b"\x01\x00\x00\x00\x05",
    b"\x00\x01\x00\x00\x00",
    // Protobuf: a varint and a length-delimited field, a huge length.
    b"\x08\x96\x01",
    b"\x12\x02ab",
    b"\xff\xff\xff\xff\x0f",
];

/// The sandbox's `/etc/passwd` and `/etc/group` the stub resolves users in.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
    alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
    nohome:x:1001:1001:::/bin/sh\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:alice,bob\nalice:x:1000:\n";

static ACCOUNTS: LazyLock<(Vec<user::PasswdEntry>, Vec<user::GroupEntry>)> =
    LazyLock::new(|| (user::parse_passwd(PASSWD), user::parse_group(GROUP)));

/// What the stub saw, for the outcome signature.
type Log = Arc<Mutex<Vec<String>>>;

fn log(log: &Log, what: String) {
    log.lock().unwrap_or_else(|e| e.into_inner()).push(what);
}

/// What the agent does with an exec message before running anything that
/// the stub can do too: resolve the user of a start.
fn inspect_exec(m: &ExecRequest) -> String {
    match &m.msg {
        Some(ExecMsg::Start(s)) => {
            let (passwd, groups) = &*ACCOUNTS;
            match user::resolve(&s.user, passwd, groups) {
                Ok(id) => {
                    assert!(id.groups.contains(&id.gid), "groups must include the gid");
                    assert!(!id.home.is_empty(), "home is never empty");
                    format!("start ok argv={}", s.argv.len().min(2))
                }
                Err(e) => format!("start {e:?}").chars().take(24).collect(),
            }
        }
        Some(ExecMsg::Stdin(_)) => "stdin".into(),
        Some(ExecMsg::CloseStdin(_)) => "close".into(),
        Some(ExecMsg::Signal(_)) => "signal".into(),
        Some(ExecMsg::Resize(_)) => "resize".into(),
        None => "empty".into(),
    }
}

fn inspect_write(m: &WriteFileRequest) -> String {
    match &m.msg {
        Some(WriteMsg::Start(_)) => "start".into(),
        Some(WriteMsg::Data(_)) => "data".into(),
        None => "empty".into(),
    }
}

/// Reads a client stream to its end, logging each message.
async fn drain<T>(
    log_to: &Log,
    method: &str,
    mut s: tonic::Streaming<T>,
    inspect: fn(&T) -> String,
) {
    loop {
        match s.message().await {
            Ok(Some(m)) => log(log_to, format!("{method}: {}", inspect(&m))),
            Ok(None) => break,
            Err(status) => {
                log(log_to, format!("!{method}: {:?}", status.code()));
                break;
            }
        }
    }
}

/// The service the sessions reach: reads requests, touches nothing.
#[derive(Clone)]
struct Stub {
    log: Log,
}

#[tonic::async_trait]
impl GuestAgent for Stub {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        log(&self.log, "health".into());
        Ok(Response::new(HealthResponse::default()))
    }

    type ExecStream = BoxStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        drain(&self.log, "exec", request.into_inner(), inspect_exec).await;
        Ok(Response::new(Box::pin(
            tonic::codegen::tokio_stream::empty(),
        )))
    }

    type ReadFileStream = BoxStream<FileChunk>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = request.into_inner();
        log(&self.log, format!("read {}", r.path.is_empty()));
        Ok(Response::new(Box::pin(
            tonic::codegen::tokio_stream::empty(),
        )))
    }

    async fn write_file(
        &self,
        request: Request<tonic::Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        drain(&self.log, "write", request.into_inner(), inspect_write).await;
        Ok(Response::new(WriteFileResponse::default()))
    }

    async fn stat_file(&self, r: Request<StatFileRequest>) -> Result<Response<FileInfo>, Status> {
        log(&self.log, format!("stat {}", r.get_ref().path.is_empty()));
        Ok(Response::new(FileInfo::default()))
    }

    async fn list_files(
        &self,
        _: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        log(&self.log, "list".into());
        Ok(Response::new(ListFilesResponse::default()))
    }

    async fn make_dir(&self, _: Request<MakeDirRequest>) -> Result<Response<FileInfo>, Status> {
        log(&self.log, "mkdir".into());
        Ok(Response::new(FileInfo::default()))
    }

    async fn remove_file(
        &self,
        _: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        log(&self.log, "remove".into());
        Ok(Response::new(RemoveFileResponse::default()))
    }

    async fn rename_file(
        &self,
        _: Request<RenameFileRequest>,
    ) -> Result<Response<RenameFileResponse>, Status> {
        log(&self.log, "rename".into());
        Ok(Response::new(RenameFileResponse::default()))
    }

    async fn wake(&self, r: Request<WakeRequest>) -> Result<Response<WakeResponse>, Status> {
        log(
            &self.log,
            format!("wake {}", r.get_ref().identity.is_some()),
        );
        Ok(Response::new(WakeResponse::default()))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        log(&self.log, "shutdown".into());
        Ok(Response::new(ShutdownResponse::default()))
    }
}

/// The port as one session sees it: `serial::Session` over memory.
struct Port {
    /// Bytes not yet read from the port.
    rest: Vec<u8>,
    rest_pos: usize,
}

struct SessionIo {
    port: Arc<Mutex<Port>>,
    pending: Vec<u8>,
    pending_pos: usize,
    tracker: FrameTracker,
    superseded: bool,
    next: Arc<Mutex<Option<Vec<u8>>>>,
    /// The most bytes one read returns (the port delivers in chunks).
    chunk: usize,
    idle: u32,
}

impl SessionIo {
    /// As `serial::Session::check`.
    fn check(&mut self, data: &[u8], port_rest: &[u8]) -> usize {
        match self.tracker.feed(data) {
            None => data.len(),
            Some(at) => {
                assert!(
                    at < data.len(),
                    "boundary {at} outside a {}-byte read",
                    data.len()
                );
                let mut rest = data[at..].to_vec();
                rest.extend_from_slice(&self.pending[self.pending_pos..]);
                self.pending.clear();
                self.pending_pos = 0;
                // Unlike the real port, nothing more would arrive after this
                // session: what the port still holds follows `rest`.
                rest.extend_from_slice(port_rest);
                *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(rest);
                self.superseded = true;
                at
            }
        }
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.superseded {
            return this.idle_then_eof(cx);
        }
        let want = buf.remaining().min(this.chunk);
        if this.pending_pos < this.pending.len() {
            let n = want.min(this.pending.len() - this.pending_pos);
            let chunk = this.pending[this.pending_pos..this.pending_pos + n].to_vec();
            this.pending_pos += n;
            // The port's unread bytes stay there until a supersede takes
            // them along.
            let port = this.port.clone();
            let mut port = port.lock().unwrap_or_else(|e| e.into_inner());
            let at = port.rest_pos;
            let keep = this.check(&chunk, &port.rest[at..]);
            if this.superseded {
                port.rest_pos = port.rest.len();
            }
            buf.put_slice(&chunk[..keep]);
            return Poll::Ready(Ok(()));
        }
        let port = this.port.clone();
        let mut port = port.lock().unwrap_or_else(|e| e.into_inner());
        if port.rest_pos < port.rest.len() {
            let n = want.min(port.rest.len() - port.rest_pos);
            let chunk = port.rest[port.rest_pos..port.rest_pos + n].to_vec();
            port.rest_pos += n;
            let at = port.rest_pos;
            let keep = this.check(&chunk, &port.rest[at..]);
            if this.superseded {
                port.rest_pos = port.rest.len();
            }
            buf.put_slice(&chunk[..keep]);
            return Poll::Ready(Ok(()));
        }
        this.idle_then_eof(cx)
    }
}

impl SessionIo {
    /// Nothing more for this session: let the service's tasks catch up
    /// with what it got (in the agent they run on other threads meanwhile),
    /// then end of file.
    fn idle_then_eof(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.idle < IDLE_READS {
            self.idle += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The tracker's answer must not depend on how the bytes were split.
fn check_tracker_consistency(session: &[u8]) {
    let whole = FrameTracker::new(H2_MAX_FRAME_SIZE).feed(session);
    let mut t = FrameTracker::new(H2_MAX_FRAME_SIZE);
    let mut bytewise = None;
    for (i, b) in session.iter().enumerate() {
        if let Some(0) = t.feed(std::slice::from_ref(b)) {
            bytewise = Some(i);
            break;
        }
    }
    assert_eq!(
        whole, bytewise,
        "the frame tracker finds a different boundary fed whole and byte by byte"
    );
}

/// Serves one in-memory session; returns what its supersede left for the
/// next one.
fn serve_session(
    rt: &tokio::runtime::Runtime,
    start: Vec<u8>,
    port: &Arc<Mutex<Port>>,
    chunk: usize,
    log_to: &Log,
) -> Option<Vec<u8>> {
    let next = Arc::new(Mutex::new(None));
    let io = SessionIo {
        port: port.clone(),
        pending: start,
        pending_pos: 0,
        tracker: FrameTracker::new(H2_MAX_FRAME_SIZE),
        superseded: false,
        next: next.clone(),
        chunk,
        idle: 0,
    };
    let service = GuestAgentServer::new(Stub {
        log: log_to.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    // The agent's own settings (`channel::serve_connection`).
    let conn =
        h2server::builder().serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    let result = rt.block_on(async { tokio::time::timeout(SESSION_TIMEOUT, conn).await });
    match result {
        Ok(Ok(())) => log(log_to, "!session ok".into()),
        Ok(Err(e)) => log(log_to, format!("!session error: {e}")),
        Err(_) => panic!("an in-memory HTTP/2 session did not end within {SESSION_TIMEOUT:?}"),
    }
    next.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The serial byte stream through the loop of `serial::serve`.
fn serial_stream(data: &[u8], chunk: usize, log_to: &Log) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("cannot build a tokio runtime");
    let port = Arc::new(Mutex::new(Port {
        rest: data.to_vec(),
        rest_pos: 0,
    }));
    let mut carry = Vec::new();
    for _ in 0..MAX_SESSIONS {
        // `serial::find_preface`.
        let mut scanner = PrefaceScanner::default();
        let mut input = std::mem::take(&mut carry);
        // Bytes pushed into the scanner (the rest after a marker twice): a
        // bound for what it may have discarded.
        let mut consumed = 0usize;
        let start = loop {
            consumed += input.len();
            match scanner.push(&input) {
                Some(Found::Preface(start)) => {
                    assert!(start.starts_with(PREFACE), "a preface that is not one");
                    assert!(scanner.discarded <= consumed);
                    break Some(start);
                }
                Some(Found::Sync { marker, rest }) => {
                    assert!(serial_sync::is_marker(&marker), "echoing a non-marker");
                    log(log_to, "!sync".into());
                    input = rest;
                    continue;
                }
                None => {}
            }
            let mut p = port.lock().unwrap_or_else(|e| e.into_inner());
            if p.rest_pos >= p.rest.len() {
                break None;
            }
            let n = chunk.min(p.rest.len() - p.rest_pos);
            input = p.rest[p.rest_pos..p.rest_pos + n].to_vec();
            p.rest_pos += n;
        };
        let Some(start) = start else {
            log(
                log_to,
                format!("!no preface, discarded {}", scanner.discarded > 0),
            );
            break;
        };
        {
            let p = port.lock().unwrap_or_else(|e| e.into_inner());
            let mut whole = start.clone();
            whole.extend_from_slice(&p.rest[p.rest_pos..]);
            check_tracker_consistency(&whole);
        }
        match serve_session(&rt, start, &port, chunk, log_to) {
            Some(next) => carry = next,
            None => break,
        }
    }
    // Tasks a session left behind are dropped here, not run by the next
    // input.
    drop(rt);
}

/// One gRPC request body through tonic's decoder for `T`.
fn decode_body<T>(body: &[u8], inspect: fn(&T) -> String, log_to: &Log)
where
    T: Message + Default + Send + 'static,
{
    let mut codec = tonic_prost::ProstCodec::<T, T>::default();
    let decoder = codec.decoder();
    let body = http_body_util::Full::new(Bytes::copy_from_slice(body));
    let mut stream: Streaming<T> = Streaming::new_request(decoder, body, None, Some(MAX_MESSAGE));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..10_000 {
        let next = {
            let fut = std::pin::pin!(stream.message());
            match fut.poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending => panic!("decoding an in-memory body is not ready"),
            }
        };
        match next {
            Ok(Some(m)) => log(log_to, inspect(&m)),
            Ok(None) => return,
            Err(status) => {
                log(log_to, format!("!status {:?}", status.code()));
                return;
            }
        }
    }
}

use std::future::Future as _;

fn message_mode(selector: u8, body: &[u8], log_to: &Log) {
    fn name<T>(_: &T) -> String {
        std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("")
            .to_string()
    }
    match selector as usize % METHODS.len() {
        0 => decode_body::<HealthRequest>(body, name, log_to),
        1 => decode_body::<ExecRequest>(body, inspect_exec, log_to),
        2 => decode_body::<ReadFileRequest>(body, name, log_to),
        3 => decode_body::<WriteFileRequest>(body, inspect_write, log_to),
        4 => decode_body::<StatFileRequest>(body, name, log_to),
        5 => decode_body::<ListFilesRequest>(body, name, log_to),
        6 => decode_body::<MakeDirRequest>(body, name, log_to),
        7 => decode_body::<RemoveFileRequest>(body, name, log_to),
        8 => decode_body::<RenameFileRequest>(body, name, log_to),
        9 => decode_body::<ShutdownRequest>(body, name, log_to),
        _ => decode_body::<WakeRequest>(body, |w| format!("wake {}", w.identity.is_some()), log_to),
    }
}

pub fn execute(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::rejected("empty", "");
    };
    let log_to: Log = Arc::default();
    if mode & 1 == 0 {
        // Reads of 16 KiB as `find_preface` does, or smaller ones.
        let chunk = [16 << 10, 1, 7, 100, 4096, 9, 24, 1 << 20][(mode >> 1) as usize & 7];
        serial_stream(rest, chunk, &log_to);
    } else {
        let Some((&selector, body)) = rest.split_first() else {
            return Outcome::rejected("no selector", "");
        };
        message_mode(selector, body, &log_to);
    }
    let mut events = std::mem::take(&mut *log_to.lock().unwrap_or_else(|e| e.into_inner()));
    // What happened, not how often or in which order.
    events.sort();
    events.dedup();
    let text = events.join(";");
    // Events of the transport start with '!'; the others are requests the
    // service received.
    let accepted = events.iter().any(|e| !e.starts_with('!'));
    if accepted {
        Outcome::accepted(&text)
    } else {
        Outcome::rejected(&text, "")
    }
}

// --- seeds -----------------------------------------------------------------

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal (no Huffman coding).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

/// The HEADERS payload of a gRPC call: literal fields without indexing.
fn grpc_headers(method: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", &format!("{SERVICE}{method}")),
        (":authority", "agent"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        out.push(0);
        hpack_str(&mut out, k);
        hpack_str(&mut out, v);
    }
    out
}

/// A length-prefixed gRPC message.
fn grpc_message(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// One call on stream `id`: HEADERS, one DATA frame per message, the last
/// one ending the stream (or not, when `end` is false).
fn call(id: u32, method: &str, messages: &[Vec<u8>], end: bool) -> Vec<u8> {
    let mut out = frame(1, END_HEADERS, id, &grpc_headers(method));
    for (i, m) in messages.iter().enumerate() {
        let last = i + 1 == messages.len();
        out.extend(frame(0, if last && end { END_STREAM } else { 0 }, id, m));
    }
    out
}

fn session_start() -> Vec<u8> {
    let mut s = PREFACE.to_vec();
    s.extend(frame(4, 0, 0, b""));
    s
}

fn exec_messages() -> Vec<Vec<u8>> {
    vec![
        grpc_message(&ExecRequest {
            msg: Some(ExecMsg::Start(ExecStart {
                sandbox_id: "sb".into(),
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: [("K".to_string(), "v".to_string())].into(),
                cwd: "/tmp".into(),
                user: "alice:wheel".into(),
                timeout_ms: 1000,
                stdin: true,
                pty: Some(PtySize { rows: 24, cols: 80 }),
                ..Default::default()
            })),
        }),
        grpc_message(&ExecRequest {
            msg: Some(ExecMsg::Stdin(b"input\n".to_vec())),
        }),
        grpc_message(&ExecRequest {
            msg: Some(ExecMsg::Signal(SendSignal { signal: 15 })),
        }),
        grpc_message(&ExecRequest {
            msg: Some(ExecMsg::CloseStdin(CloseStdin {})),
        }),
    ]
}

fn write_messages() -> Vec<Vec<u8>> {
    vec![
        grpc_message(&WriteFileRequest {
            msg: Some(WriteMsg::Start(WriteFileStart {
                sandbox_id: "sb".into(),
                path: "/tmp/f".into(),
                mode: 0o600,
                create_parents: true,
                append: false,
            })),
        }),
        grpc_message(&WriteFileRequest {
            msg: Some(WriteMsg::Data(vec![0x50; 64])),
        }),
    ]
}

fn wake_message() -> Vec<u8> {
    grpc_message(&WakeRequest {
        unix_time_ns: 1_700_000_000_000_000_000,
        entropy: vec![0x5a; 32],
        identity: Some(Identity {
            sandbox_id: "sb2".into(),
            hostname: "h2".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        }),
    })
}

/// Valid host streams (mode 0) and request bodies (mode 1).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();

    // A session with a unary call and a client-streaming call.
    let mut s = vec![0u8];
    s.extend(session_start());
    s.extend(call(
        1,
        "StatFile",
        &[grpc_message(&StatFileRequest {
            sandbox_id: "sb".into(),
            path: "/etc/passwd".into(),
        })],
        true,
    ));
    s.extend(call(3, "Exec", &exec_messages(), true));
    seeds.push(s);

    // Stale bytes, a sync marker, then a session that ends with GOAWAY.
    let mut s = vec![2u8];
    s.extend_from_slice(b"\x00\x00\x10stale bytes of a dead session");
    s.extend(serial_sync::marker(0xfeed));
    s.extend(session_start());
    s.extend(call(1, "Health", &[grpc_message(&HealthRequest {})], true));
    s.extend(frame(7, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
    seeds.push(s);

    // A session cut short mid-write, superseded by a new preface at a frame
    // boundary: the next session wakes the guest.
    let mut s = vec![4u8];
    s.extend(session_start());
    s.extend(call(1, "WriteFile", &write_messages(), false));
    s.extend(session_start());
    s.extend(call(1, "Wake", &[wake_message()], true));
    s.extend(call(
        3,
        "RenameFile",
        &[grpc_message(&RenameFileRequest {
            sandbox_id: "sb".into(),
            from: "/a".into(),
            to: "/b".into(),
        })],
        true,
    ));
    seeds.push(s);

    // Request bodies alone.
    let body = |selector: usize, messages: Vec<Vec<u8>>| {
        let mut v = vec![1u8, selector as u8];
        for m in messages {
            v.extend(m);
        }
        v
    };
    seeds.push(body(1, exec_messages()));
    seeds.push(body(3, write_messages()));
    seeds.push(body(10, vec![wake_message()]));
    seeds.push(body(
        2,
        vec![grpc_message(&ReadFileRequest {
            sandbox_id: "sb".into(),
            path: "/etc/hostname".into(),
            offset: 3,
            length: 10,
        })],
    ));
    seeds.push(body(
        6,
        vec![grpc_message(&MakeDirRequest {
            sandbox_id: "sb".into(),
            path: "/a/b".into(),
            mode: 0o755,
            parents: true,
        })],
    ));
    seeds
}
