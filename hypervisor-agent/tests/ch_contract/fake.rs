//! An in-process stand-in for Cloud Hypervisor's API server.
//!
//! The driver starts "cloud-hypervisor" as a process; here that is a tiny
//! shell script that announces its PID and `--api-socket` path on a FIFO
//! and then idles. The test server reads the FIFO and serves that socket
//! (fresh VM state per process, like a real VMM), implementing the subset
//! of the OpenAPI spec the driver uses. Every request is checked against
//! the spec: unknown path → 404, method not in the spec → 405, body not
//! valid against the operation's request schema → 400 (and recorded as a
//! violation). Answers are checked against the spec's response schemas.
//!
//! File descriptors sent with a request (`SCM_RIGHTS`, as the real VMM's
//! HTTP server takes them) are received per connection; each is named by
//! the TAP it is attached to (`TUNGETIFF`), so a test sees which TAP the
//! driver passed with which call.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::spec::Spec;

/// One API call as the server saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub pid: u32,
    pub method: String,
    pub call: String,
    pub body: Option<Value>,
    pub status: u16,
    /// The TAPs whose descriptors came with the request, in order
    /// (`"not a TAP"` for any other descriptor).
    pub taps: Vec<String>,
}

/// How the fake behaves; shared by all its processes.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// `vmm.ping`'s version.
    pub version: String,
    /// `vm.restore` with `OnDemand` fails as on a host without userfaultfd.
    pub on_demand_fails: bool,
    /// Forced answers: call → (status, error chain), used once each.
    pub inject: HashMap<String, (u16, Vec<String>)>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            version: "52.0.0".into(),
            on_demand_fails: false,
            inject: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    calls: Vec<Call>,
    violations: Vec<String>,
    pids: Vec<u32>,
}

/// The fake VMM: a script to hand the driver as its binary, and the
/// server behind it.
pub struct FakeCh {
    pub binary: PathBuf,
    shared: Arc<Mutex<Shared>>,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

/// One fake VMM process's VM.
struct Vmm {
    pid: u32,
    vm: Option<(VmState, Value)>,
    devices: Vec<String>,
    vsock: Option<tokio::task::JoinHandle<()>>,
}

type Answer = (u16, Option<Value>);

fn chain(msgs: &[&str]) -> Option<Value> {
    Some(json!(msgs))
}

impl FakeCh {
    /// A fake whose processes announce themselves (`announce`) or not
    /// (a VMM whose API socket never appears), with `extra` shell lines
    /// run first (e.g. to exit early).
    pub fn start(behaviour: Behaviour) -> FakeCh {
        Self::with_script(behaviour, true, "")
    }

    pub fn with_script(behaviour: Behaviour, announce: bool, extra: &str) -> FakeCh {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("announce");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let binary = dir.path().join("cloud-hypervisor");
        let announce_line = if announce {
            format!("echo \"$$ ${{2#path=}}\" > '{}'", fifo.display())
        } else {
            String::new()
        };
        let script = format!(
            "#!/bin/bash\n\
             # Stand-in for cloud-hypervisor in the contract tests.\n\
             [ \"$1\" = --api-socket ] || {{ echo \"unexpected arguments: $*\" >&2; exit 2; }}\n\
             {extra}\n\
             {announce_line}\n\
             # Keeps its arguments in its command line, as the real VMM\n\
             # does (crash recovery recognises a VMM by its run directory).\n\
             exec -a \"$0 $*\" sleep 300\n"
        );
        std::fs::write(&binary, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();

        let shared = Arc::new(Mutex::new(Shared {
            behaviour,
            ..Default::default()
        }));
        let spec = Arc::new(Spec::load());
        // Read-write so the FIFO never reports end-of-file between writers.
        let receiver = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifo)
            .unwrap();
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(receiver).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some((pid, socket)) = line.split_once(' ') else {
                    continue;
                };
                let Ok(pid) = pid.parse::<u32>() else {
                    continue;
                };
                sh.lock().unwrap().pids.push(pid);
                let listener = match UnixListener::bind(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        sh.lock()
                            .unwrap()
                            .violations
                            .push(format!("cannot bind {socket}: {e}"));
                        continue;
                    }
                };
                tokio::spawn(serve(listener, pid, spec.clone(), sh.clone()));
            }
        });
        FakeCh {
            binary,
            shared,
            _dir: dir,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().unwrap().calls.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().unwrap().violations.clone()
    }

    /// PIDs of the processes that announced themselves.
    pub fn pids(&self) -> Vec<u32> {
        self.shared.lock().unwrap().pids.clone()
    }

    pub fn inject(&self, call: &str, status: u16, chain: &[&str]) {
        self.shared.lock().unwrap().behaviour.inject.insert(
            call.into(),
            (status, chain.iter().map(|s| s.to_string()).collect()),
        );
    }

    pub fn set_on_demand_fails(&self, fails: bool) {
        self.shared.lock().unwrap().behaviour.on_demand_fails = fails;
    }
}

impl Drop for FakeCh {
    /// On a failed test, end whatever fake processes are left (by PID).
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `pid` is gone (not even a zombie: it was reaped).
pub fn reaped(pid: u32) -> bool {
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

async fn serve(listener: UnixListener, pid: u32, spec: Arc<Spec>, shared: Arc<Mutex<Shared>>) {
    let vmm = Arc::new(tokio::sync::Mutex::new(Vmm {
        pid,
        vm: None,
        devices: Vec::new(),
        vsock: None,
    }));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (spec, shared, vmm) = (spec.clone(), shared.clone(), vmm.clone());
        tokio::spawn(async move {
            let exit_after = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = exit_after.clone();
            let received = Arc::new(Mutex::new(Vec::new()));
            let stream = FdReceivingStream {
                inner: stream,
                fds: received.clone(),
            };
            let service = hyper::service::service_fn(move |req| {
                let (spec, shared, vmm, flag, received) = (
                    spec.clone(),
                    shared.clone(),
                    vmm.clone(),
                    flag.clone(),
                    received.clone(),
                );
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(req, &spec, &shared, &vmm, &flag, &received).await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            // vmm.shutdown: the answer is out; now the process ends.
            if exit_after.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    spec: &Spec,
    shared: &Mutex<Shared>,
    vmm: &tokio::sync::Mutex<Vmm>,
    exit_after: &std::sync::atomic::AtomicBool,
    received: &Mutex<Vec<OwnedFd>>,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // Whatever came with this request's bytes (the VMM closes them after
    // use; here they close at the end of the call).
    let fds: Vec<OwnedFd> = std::mem::take(&mut *received.lock().unwrap());
    let taps: Vec<String> = fds.iter().map(tap_name).collect();
    let mut vmm = vmm.lock().await;
    let pid = vmm.pid;
    let call = path.strip_prefix("/api/v1/").unwrap_or(&path).to_string();
    let violation = |v: String| shared.lock().unwrap().violations.push(v);

    let (status, answer, parsed) = 'answer: {
        let Some(op_path) = path.strip_prefix("/api/v1") else {
            break 'answer (404, chain(&["Not Found"]), None);
        };
        let op = match spec.operation(op_path, &method) {
            Ok(op) => op,
            Err(status) => {
                violation(format!("{method} {path}: not in the spec (HTTP {status})"));
                break 'answer (status, None, None);
            }
        };
        let parsed = match Spec::request_schema(op) {
            None if body.is_empty() => None,
            None => {
                violation(format!("{method} {call}: a body where the spec has none"));
                break 'answer (400, chain(&["Error from API", "unexpected body"]), None);
            }
            Some(schema) => {
                let Ok(value) = serde_json::from_slice::<Value>(&body) else {
                    violation(format!("{method} {call}: body is not JSON"));
                    break 'answer (400, chain(&["Error from API", "body is not JSON"]), None);
                };
                let errors = spec.check(&schema, &value);
                if !errors.is_empty() {
                    violation(format!("{method} {call}: {}", errors.join("; ")));
                    let mut msgs = vec!["Error from API".to_string()];
                    msgs.push(format!(
                        "Failed to deserialize {schema}: {}",
                        errors.join("; ")
                    ));
                    break 'answer (400, Some(json!(msgs)), Some(value));
                }
                Some(value)
            }
        };
        let injected = shared.lock().unwrap().behaviour.inject.remove(&call);
        if let Some((status, msgs)) = injected {
            break 'answer (status, Some(json!(msgs)), parsed);
        }
        let behaviour = shared.lock().unwrap().behaviour.clone();
        let (status, answer) = act(
            &mut vmm,
            &call,
            parsed.as_ref(),
            &taps,
            &behaviour,
            spec,
            shared,
        );
        if status < 300
            && let Some(schema) = Spec::response_schema(op, status)
        {
            let errors = spec.check(&schema, answer.as_ref().unwrap_or(&Value::Null));
            if !errors.is_empty() {
                violation(format!(
                    "answer to {call} breaks the spec: {}",
                    errors.join("; ")
                ));
            }
        }
        if !(Spec::declares(op, status) || status == 500 || status == 400) {
            violation(format!(
                "answer {status} to {call} is not declared in the spec"
            ));
        }
        if call == "vmm.shutdown" {
            exit_after.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        (status, answer, parsed)
    };
    shared.lock().unwrap().calls.push(Call {
        pid,
        method: method.clone(),
        call,
        body: parsed,
        status,
        taps,
    });
    let mut resp = Response::builder().status(StatusCode::from_u16(status).unwrap());
    let bytes = match answer {
        Some(v) => {
            resp = resp.header("content-type", "application/json");
            serde_json::to_vec(&v).unwrap()
        }
        None => Vec::new(),
    };
    resp.body(Full::new(Bytes::from(bytes))).unwrap()
}

/// The VM model: what a Cloud Hypervisor process does with each call.
fn act(
    vmm: &mut Vmm,
    call: &str,
    body: Option<&Value>,
    taps: &[String],
    behaviour: &Behaviour,
    spec: &Spec,
    shared: &Mutex<Shared>,
) -> Answer {
    let state = vmm.vm.as_ref().map(|(s, _)| *s);
    let set = |vmm: &mut Vmm, s: VmState| {
        if let Some(vm) = vmm.vm.as_mut() {
            vm.0 = s;
        }
    };
    match call {
        "vmm.ping" => (
            200,
            Some(json!({
                "build_version": format!("v{}", behaviour.version),
                "version": behaviour.version,
                "pid": vmm.pid,
                "features": ["kvm"],
            })),
        ),
        "vmm.shutdown" => {
            if let Some(t) = vmm.vsock.take() {
                t.abort();
            }
            (204, None)
        }
        "vm.create" => match state {
            Some(_) => (
                500,
                chain(&[
                    "Error from API",
                    "The VM could not be created",
                    "VM is already created",
                ]),
            ),
            None => {
                vmm.vm = Some((VmState::Created, body.cloned().unwrap_or_default()));
                (204, None)
            }
        },
        "vm.boot" => match state {
            None => (
                404,
                chain(&[
                    "Error from API",
                    "The VM could not boot",
                    "VM is not created",
                ]),
            ),
            Some(VmState::Created | VmState::Shutdown) => {
                set(vmm, VmState::Running);
                start_vsock(vmm);
                (204, None)
            }
            Some(_) => (
                500,
                chain(&[
                    "Error from API",
                    "The VM could not boot",
                    "VM is already booted",
                ]),
            ),
        },
        "vm.pause" => match state {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some(VmState::Running) => {
                set(vmm, VmState::Paused);
                (204, None)
            }
            Some(s) => (
                405,
                chain(&[
                    "Error from API",
                    &format!("Invalid transition from {} to Paused", s.name()),
                ]),
            ),
        },
        "vm.resume" => match state {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some(VmState::Paused) => {
                set(vmm, VmState::Running);
                (204, None)
            }
            Some(s) => (
                405,
                chain(&[
                    "Error from API",
                    &format!("Invalid transition from {} to Running", s.name()),
                ]),
            ),
        },
        "vm.shutdown" => match state {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some(VmState::Created) => (405, chain(&["Error from API", "VM is not booted"])),
            Some(_) => {
                set(vmm, VmState::Shutdown);
                (204, None)
            }
        },
        "vm.info" => match &vmm.vm {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some((s, config)) => (200, Some(json!({ "config": config, "state": s.name() }))),
        },
        "vm.snapshot" => match &vmm.vm {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some((VmState::Paused, config)) => {
                let body = body.cloned().unwrap_or_default();
                match write_snapshot(&body, config) {
                    Ok(()) => (204, None),
                    Err(e) => (
                        500,
                        chain(&["Error from API", "The VM could not be snapshotted", &e]),
                    ),
                }
            }
            Some(_) => (405, chain(&["Error from API", "VM is not paused"])),
        },
        "vm.restore" => {
            if state.is_some() {
                return (404, chain(&["Error from API", "VM is already created"]));
            }
            let body = body.cloned().unwrap_or_default();
            let mode = body["memory_restore_mode"].as_str().unwrap_or("Copy");
            if mode == "OnDemand" && behaviour.on_demand_fails {
                return (
                    500,
                    chain(&[
                        "Error from API",
                        "The VM could not be restored",
                        "On-demand restore failed",
                        "Failed to create userfaultfd",
                        "Operation not permitted (os error 1)",
                    ]),
                );
            }
            let dir = match body["source_url"]
                .as_str()
                .and_then(|u| u.strip_prefix("file://"))
            {
                Some(d) => PathBuf::from(d),
                None => {
                    return (
                        400,
                        chain(&["Error from API", "source_url is not a file:// URL"]),
                    );
                }
            };
            let config: Value = match std::fs::read(dir.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(c) => c,
                None => return (500, chain(&["Error from API", "Cannot read config.json"])),
            };
            // The rewritten config.json must still be a valid VmConfig.
            let errors = spec.check("VmConfig", &config);
            if !errors.is_empty() {
                shared
                    .lock()
                    .unwrap()
                    .violations
                    .push(format!("restore config.json: {}", errors.join("; ")));
                return (400, chain(&["Error from API", "invalid config.json"]));
            }
            // Every fd-backed network device needs its new descriptors, and
            // the request must carry exactly those.
            let wanted: Vec<(String, usize)> = config["net"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| {
                    let fds = n["fds"].as_array()?;
                    Some((n["id"].as_str()?.to_string(), fds.len()))
                })
                .collect();
            let given: Vec<(String, usize)> = body["net_fds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    (
                        n["id"].as_str().unwrap_or_default().to_string(),
                        n["num_fds"].as_u64().unwrap_or(0) as usize,
                    )
                })
                .collect();
            if wanted != given || given.iter().map(|(_, n)| n).sum::<usize>() != taps.len() {
                return (
                    400,
                    chain(&[
                        "Error from API",
                        &format!(
                            "net_fds {given:?} with {} fds does not give the devices {wanted:?}",
                            taps.len()
                        ),
                    ]),
                );
            }
            for needed in ["state.json", "memory-ranges"] {
                if !dir.join(needed).is_file() {
                    return (
                        500,
                        chain(&["Error from API", &format!("{needed} is missing")]),
                    );
                }
            }
            let running = body["resume"].as_bool().unwrap_or(false);
            vmm.vm = Some((
                if running {
                    VmState::Running
                } else {
                    VmState::Paused
                },
                config,
            ));
            start_vsock(vmm);
            (204, None)
        }
        // Cold add before vm.boot (only the config changes), as the VMM
        // does; the descriptors become the device's queues, numbered as
        // the VMM's own fds would be in its config.json.
        "vm.add-net" => match state {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some(VmState::Created) => {
                let mut net = body.cloned().unwrap_or_default();
                if net.get("tap").is_none() && taps.is_empty() {
                    return (
                        400,
                        chain(&["Error from API", "a network device needs a TAP or its fds"]),
                    );
                }
                if !taps.is_empty() {
                    net["fds"] = json!((0..taps.len()).map(|i| 40 + i).collect::<Vec<_>>());
                }
                let config = &mut vmm.vm.as_mut().unwrap().1;
                match config["net"].as_array_mut() {
                    Some(nets) => nets.push(net),
                    None => config["net"] = json!([net]),
                }
                (204, None)
            }
            Some(_) => (
                500,
                chain(&["fake cloud-hypervisor does not hot-plug network devices"]),
            ),
        },
        "vm.add-device" => match state {
            None => (404, chain(&["Error from API", "VM is not created"])),
            Some(_) => {
                let body = body.cloned().unwrap_or_default();
                let id = body["id"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| format!("_vfio{}", vmm.devices.len()));
                if vmm.devices.contains(&id) {
                    return (409, chain(&["Error from API", "Identifier is not unique"]));
                }
                vmm.devices.push(id.clone());
                (
                    200,
                    Some(
                        json!({ "id": id, "bdf": format!("0000:00:{:02x}.0", 5 + vmm.devices.len()) }),
                    ),
                )
            }
        },
        "vm.remove-device" => {
            let id = body
                .and_then(|b| b["id"].as_str())
                .unwrap_or_default()
                .to_string();
            if state.is_none() || !vmm.devices.contains(&id) {
                return (
                    404,
                    chain(&[
                        "Error from API",
                        "The device could not be removed",
                        "Unknown device",
                    ]),
                );
            }
            vmm.devices.retain(|d| d != &id);
            (204, None)
        }
        other => (
            500,
            chain(&["fake cloud-hypervisor does not implement", other]),
        ),
    }
}

/// The name of the TAP `fd` is attached to.
fn tap_name(fd: &OwnedFd) -> String {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    let mut req = [0u8; 40];
    // SAFETY: TUNGETIFF writes an ifreq (40 bytes) into `req`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, req.as_mut_ptr()) };
    if rc != 0 {
        return "not a TAP".into();
    }
    let name = &req[..libc::IFNAMSIZ];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// A server-side Unix stream that keeps the descriptors arriving with
/// its bytes (what the VMM's HTTP server does).
struct FdReceivingStream {
    inner: tokio::net::UnixStream,
    fds: Arc<Mutex<Vec<OwnedFd>>>,
}

impl tokio::io::AsyncRead for FdReceivingStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let this = self.get_mut();
        loop {
            std::task::ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            let got = this.inner.try_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(unfilled)];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, fds))
            });
            match got {
                Ok((n, fds)) => {
                    let mut kept = this.fds.lock().unwrap();
                    // SAFETY: each descriptor was just received and is ours.
                    kept.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for FdReceivingStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What `vm.snapshot` writes: the VM's config, device state and RAM.
fn write_snapshot(body: &Value, config: &Value) -> Result<(), String> {
    let dir = body["destination_url"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .ok_or("destination_url is not a file:// URL")?;
    let dir = Path::new(dir);
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let create = |name: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .map_err(|e| format!("{name}: {e}"))
    };
    use std::io::Write;
    create("config.json")?
        .write_all(&serde_json::to_vec(config).unwrap())
        .map_err(|e| e.to_string())?;
    create("state.json")?
        .write_all(br#"{"snapshots":{}}"#)
        .map_err(|e| e.to_string())?;
    let size = config["memory"]["size"].as_u64().unwrap_or(0);
    create("memory-ranges")?
        .set_len(size)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The host side of hybrid vsock on the VM's `vsock.socket`: `CONNECT
/// <port>` → `OK <n>`, then the "guest" echoes.
fn start_vsock(vmm: &mut Vmm) {
    let Some(socket) = vmm
        .vm
        .as_ref()
        .and_then(|(_, c)| c["vsock"]["socket"].as_str().map(PathBuf::from))
    else {
        return;
    };
    let _ = std::fs::remove_file(&socket);
    let Ok(listener) = UnixListener::bind(&socket) else {
        return;
    };
    if let Some(t) = vmm.vsock.take() {
        t.abort();
    }
    vmm.vsock = Some(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                if stream.read_line(&mut line).await.is_err() || !line.starts_with("CONNECT ") {
                    return;
                }
                let mut stream = stream.into_inner();
                if stream.write_all(b"OK 1073741824\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 256];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    }));
}
