//! The Exec RPC: start a process in the sandbox and stream its life.
//!
//! Spawning uses `std::process::Command` with a `pre_exec` hook, not a
//! hand-written fork: std already does the delicate parts (argv/envp built
//! before fork, stdio dup2, reporting an exec failure through a CLOEXEC pipe)
//! and only the sandbox-specific steps run in the hook: `setsid` (so the
//! whole process group can be signalled), `TIOCSCTTY` under a PTY, `chroot`
//! (dev mode), the identity switch, then `chdir`. They run in that order
//! because chroot needs root privileges and chdir must happen inside the new
//! root as the target user; std's own `uid()`/`current_dir()` would run before
//! the hook, in the wrong order. The hook uses raw libc calls on data
//! prepared beforehand: after fork in a threaded program it must not
//! allocate. Spawns go through the [`Reaper`] (see there for why).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::pipe2;
use somna_proto::v1::exec_request::Msg;
use somna_proto::v1::exec_response::Event;
use somna_proto::v1::{ExecExit, ExecRequest, ExecResponse, ExecStart, ExecStarted, PtySize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::fdio::FdStream;
use crate::files::Root;
use crate::identity::SharedIdentity;
use crate::reaper::{Exit, Reaper};
use crate::user::{self, Identity};

/// PATH when the request has none (Debian's default for root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest output chunk sent in one message.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// Responses buffered per exec before the reader waits for the client:
/// keeps memory bounded and lets HTTP/2 flow control slow the process down.
const RESPONSE_QUEUE: usize = 8;
/// After the process exits, how long in total to wait for more output (a
/// background grandchild may hold the pipe open forever).
const DRAIN_WAIT: Duration = Duration::from_millis(200);
/// After the process exits, the most time spent forwarding leftover output
/// (against a grandchild that never stops writing).
const DRAIN_MAX: Duration = Duration::from_secs(10);

pub type ExecStream = ReceiverStream<Result<ExecResponse, Status>>;
type Tx = mpsc::Sender<Result<ExecResponse, Status>>;

/// What the agent needs to run processes.
#[derive(Clone)]
pub struct ExecEnv {
    pub root: Arc<Root>,
    pub reaper: Arc<Reaper>,
    /// The sandbox id (checked against `ExecStart.sandbox_id`) and the
    /// hostname (`HOSTNAME`); `Wake` may replace them.
    pub identity: SharedIdentity,
    /// chroot into the root (dev mode with a root other than "/").
    pub chroot: bool,
}

/// Runs the Exec RPC: validates `start`, then streams the process's events.
pub async fn exec(
    env: &ExecEnv,
    mut requests: Streaming<ExecRequest>,
) -> Result<ExecStream, Status> {
    let start = match requests.message().await? {
        Some(ExecRequest {
            msg: Some(Msg::Start(start)),
        }) => start,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first exec message must be `start`",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "the exec stream ended before its `start` message",
            ));
        }
    };
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(Status::invalid_argument(
            "argv is empty; give the program to run as argv[0]",
        ));
    }
    env.identity.check(&start.sandbox_id)?;
    let root = env.root.clone();
    let hostname = env.identity.get().hostname;
    let plan = tokio::task::spawn_blocking(move || plan(&root, start, &hostname))
        .await
        .map_err(|e| Status::internal(format!("exec planning task failed: {e}")))??;

    let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
    match &plan.program {
        Lookup::Found(program) => {
            let program = program.clone();
            let launched = match &plan.detached_output {
                Some(output) => {
                    launch_detached(env, &plan, &program, output).map(Launched::Detached)
                }
                None => launch(env, &plan, &program).map(Launched::Attached),
            };
            match launched {
                Ok(Launched::Detached(pid)) => {
                    tokio::spawn(detached(pid, tx));
                }
                Ok(Launched::Attached(running)) => {
                    tokio::spawn(supervise(running, requests, tx));
                }
                Err(e) => {
                    let code = if e.raw_os_error() == Some(libc::ENOENT) {
                        127
                    } else {
                        126
                    };
                    tokio::spawn(not_started(tx, code, format!("{}: {e}", plan.argv[0])));
                }
            }
        }
        Lookup::NotFound(why) => {
            tokio::spawn(not_started(tx, 127, format!("{}: {why}", plan.argv[0])));
        }
        Lookup::NotExecutable(why) => {
            tokio::spawn(not_started(tx, 126, format!("{}: {why}", plan.argv[0])));
        }
    }
    Ok(ReceiverStream::new(rx))
}

/// A started process: streamed, or detached (its pid).
enum Launched {
    Attached(Running),
    Detached(i32),
}

/// Reports a program that could not be started, the way a shell would.
async fn not_started(tx: Tx, code: i32, message: String) {
    let events = [
        Event::Started(ExecStarted { pid: 0 }),
        Event::Stderr(format!("somna: {message}\n").into_bytes()),
        Event::Exit(ExecExit {
            output_truncated: false,
            exit_code: code,
            signal: 0,
            timed_out: false,
            message,
        }),
    ];
    for event in events {
        if tx
            .send(Ok(ExecResponse { event: Some(event) }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Result of looking argv[0] up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    /// The path to exec (as seen inside the root).
    Found(String),
    NotFound(String),
    NotExecutable(String),
}

/// Everything about the process, decided before anything is spawned.
struct Plan {
    argv: Vec<String>,
    program: Lookup,
    env: BTreeMap<String, String>,
    cwd: String,
    identity: Option<Identity>,
    pty: Option<PtySize>,
    stdin: bool,
    timeout_ms: u64,
    max_output_bytes: u64,
    /// Detached: where stdout and stderr go (appended); None when attached.
    detached_output: Option<String>,
}

fn plan(root: &Root, start: ExecStart, hostname: &str) -> Result<Plan, Status> {
    for arg in &start.argv {
        if arg.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "argument {arg:?} contains a NUL byte"
            )));
        }
    }
    for (k, v) in &start.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "invalid environment variable {k:?}"
            )));
        }
    }
    let passwd = root
        .read_small("/etc/passwd")?
        .map(|t| user::parse_passwd(&t))
        .unwrap_or_default();
    let groups = root
        .read_small("/etc/group")?
        .map(|t| user::parse_group(&t))
        .unwrap_or_default();
    let identity = user::resolve(&start.user, &passwd, &groups)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;

    let cwd = match start.cwd.as_str() {
        "" => "/".to_string(),
        c if c.starts_with('/') => c.to_string(),
        c => format!("/{c}"),
    };
    match root.stat_follow(&cwd) {
        Ok(st) if is_type(&st, SFlag::S_IFDIR) => {}
        Ok(_) => {
            return Err(Status::invalid_argument(format!(
                "working directory {cwd} is not a directory"
            )));
        }
        Err(Errno::ENOENT | Errno::ENOTDIR) => {
            return Err(Status::invalid_argument(format!(
                "working directory {cwd} does not exist in the sandbox"
            )));
        }
        Err(e) => {
            return Err(Status::invalid_argument(format!(
                "working directory {cwd}: {}",
                e.desc()
            )));
        }
    }

    let mut env: BTreeMap<String, String> = start.env.into_iter().collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.entry("HOME".into())
        .or_insert_with(|| identity.home.clone());
    env.entry("HOSTNAME".into())
        .or_insert_with(|| hostname.into());
    if start.pty.is_some() {
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
    }

    let detached_output = if start.detach {
        if start.stdin || start.pty.is_some() || start.timeout_ms > 0 {
            return Err(Status::invalid_argument(
                "a detached process cannot have stdin, a pty or a timeout",
            ));
        }
        Some(match start.output_file.as_str() {
            "" => "/dev/null".to_string(),
            f if f.starts_with('/') => f.to_string(),
            f => format!("{cwd}/{f}"),
        })
    } else {
        if !start.output_file.is_empty() {
            return Err(Status::invalid_argument(
                "output_file is only for detached processes (set detach)",
            ));
        }
        None
    };

    let path_var = env.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH);
    let program = lookup(root, &start.argv[0], path_var, &cwd, &identity);
    // Without privileges (dev mode as a user) the default user means "as
    // the agent"; switching would only fail.
    let identity = if nix::unistd::geteuid().is_root() || !start.user.is_empty() {
        Some(identity)
    } else {
        None
    };
    Ok(Plan {
        argv: start.argv,
        program,
        env,
        cwd,
        identity,
        pty: start.pty,
        stdin: start.stdin,
        timeout_ms: start.timeout_ms,
        max_output_bytes: start.max_output_bytes,
        detached_output,
    })
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == t
}

fn executable_by(st: &FileStat, id: &Identity) -> bool {
    let mode = st.st_mode;
    if id.uid == 0 {
        mode & 0o111 != 0
    } else if st.st_uid == id.uid {
        mode & 0o100 != 0
    } else if id.groups.contains(&st.st_gid) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Looks argv[0] up like a shell: a name with a slash is taken as is, a bare
/// name is searched in PATH (inside the root). A match that exists but may
/// not be executed gives 126 unless a later PATH entry has a runnable one.
fn lookup(root: &Root, argv0: &str, path_var: &str, cwd: &str, id: &Identity) -> Lookup {
    if argv0.contains('/') {
        let full = if argv0.starts_with('/') {
            argv0.to_string()
        } else {
            join(cwd, argv0)
        };
        return match root.stat_follow(&full) {
            Ok(st) if is_type(&st, SFlag::S_IFDIR) => {
                Lookup::NotExecutable("Is a directory".into())
            }
            Ok(st) if executable_by(&st, id) => Lookup::Found(argv0.to_string()),
            Ok(_) => Lookup::NotExecutable("Permission denied".into()),
            Err(e) => Lookup::NotFound(e.desc().into()),
        };
    }
    let mut denied = false;
    for dir in path_var.split(':') {
        let dir = match dir {
            "" | "." => cwd.to_string(),
            d if d.starts_with('/') => d.to_string(),
            d => join(cwd, d),
        };
        let candidate = join(&dir, argv0);
        match root.stat_follow(&candidate) {
            Ok(st) if is_type(&st, SFlag::S_IFREG) && executable_by(&st, id) => {
                return Lookup::Found(candidate);
            }
            Ok(st) if is_type(&st, SFlag::S_IFREG) => denied = true,
            _ => {}
        }
    }
    if denied {
        Lookup::NotExecutable("Permission denied".into())
    } else {
        Lookup::NotFound("command not found".into())
    }
}

/// A started process and the parent's ends of its stdio.
struct Running {
    pid: i32,
    exit: oneshot::Receiver<Exit>,
    stdout: FdStream,
    stderr: Option<FdStream>,
    stdin: Option<FdStream>,
    pty_master: Option<Arc<OwnedFd>>,
    timeout_ms: u64,
    max_output_bytes: u64,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

fn launch(env: &ExecEnv, plan: &Plan, program: &str) -> io::Result<Running> {
    let mut cmd = Command::new(program);
    cmd.arg0(&plan.argv[0])
        .args(&plan.argv[1..])
        .env_clear()
        .envs(&plan.env);

    let (stdout, stderr, stdin, pty_master);
    if let Some(size) = &plan.pty {
        let (master, slave) = open_pty(size)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        stdout = FdStream::pty_master(master.try_clone()?)?;
        stdin = Some(FdStream::from_owned(master.try_clone()?)?);
        stderr = None;
        pty_master = Some(Arc::new(master));
    } else {
        let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC)?;
        cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
        stdout = FdStream::from_owned(out_r)?;
        stderr = Some(FdStream::from_owned(err_r)?);
        if plan.stdin {
            let (in_r, in_w) = pipe2(OFlag::O_CLOEXEC)?;
            cmd.stdin(Stdio::from(in_r));
            stdin = Some(FdStream::from_owned(in_w)?);
        } else {
            cmd.stdin(Stdio::null());
            stdin = None;
        }
        pty_master = None;
    }

    prepare_child(&mut cmd, env, plan, None)?;
    let spawned = env.reaper.spawn(&mut cmd);
    // The child's ends of the pipes / the PTY slave live in `cmd`: close
    // them here, or the parent would never see end of file.
    drop(cmd);
    let (child, exit) = spawned?;
    Ok(Running {
        pid: child.id() as i32,
        exit,
        stdout,
        stderr,
        stdin,
        pty_master,
        timeout_ms: plan.timeout_ms,
        max_output_bytes: plan.max_output_bytes,
    })
}

/// Starts a detached process: its own session, stdin from /dev/null,
/// stdout and stderr appended to `output` (opened inside the root as the
/// target user). Returns its pid; the reaper collects it when it exits.
fn launch_detached(env: &ExecEnv, plan: &Plan, program: &str, output: &str) -> io::Result<i32> {
    let mut cmd = Command::new(program);
    cmd.arg0(&plan.argv[0])
        .args(&plan.argv[1..])
        .env_clear()
        .envs(&plan.env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    prepare_child(&mut cmd, env, plan, Some(cstring(output)?))?;
    let (child, _exit) = env.reaper.spawn(&mut cmd)?;
    Ok(child.id() as i32)
}

/// Reports a detached process as started and done: the stream ends, the
/// process does not.
async fn detached(pid: i32, tx: Tx) {
    tracing::debug!("exec: detached pid {pid}");
    let events = [
        Event::Started(ExecStarted { pid: pid as u32 }),
        Event::Exit(ExecExit {
            output_truncated: false,
            exit_code: 0,
            signal: 0,
            timed_out: false,
            message: format!("detached (pid {pid})"),
        }),
    ];
    for event in events {
        if !send(&tx, event).await {
            return;
        }
    }
}

/// Installs the `pre_exec` hook: setsid, controlling TTY, chroot, identity,
/// chdir, then (detached) the output file on stdout and stderr.
fn prepare_child(
    cmd: &mut Command,
    env: &ExecEnv,
    plan: &Plan,
    output: Option<CString>,
) -> io::Result<()> {
    let chroot = if env.chroot {
        Some(cstring(&env.root.path().to_string_lossy())?)
    } else {
        None
    };
    let cwd = cstring(&plan.cwd)?;
    let identity = plan
        .identity
        .as_ref()
        .map(|id| (id.uid, id.gid, id.groups.clone()));
    let pty = plan.pty.is_some();
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe syscalls on data captured (allocated) beforehand.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(root) = &chroot
                && libc::chroot(root.as_ptr()) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &identity
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0)
            {
                return Err(io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(path) = &output {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                    0o644,
                );
                if fd < 0 || libc::dup2(fd, 1) < 0 || libc::dup2(fd, 2) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if fd > 2 {
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Opens a PTY pair, both ends close-on-exec from the start (no window in
/// which a concurrent spawn could inherit them).
fn open_pty(size: &PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::fcntl::open(
        "/dev/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("open /dev/ptmx: {e}")))?;
    let unlock: libc::c_int = 0;
    // SAFETY: plain ioctls on a descriptor we own; `unlock` outlives the call.
    unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // TIOCGPTPEER opens the slave through the master, so it works whatever
    // devpts instance is mounted where.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: as above; the result is a new descriptor that we then own.
    let slave = unsafe {
        let fd = libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    set_winsize(&master, size)?;
    Ok((master, slave))
}

fn set_winsize(master: &OwnedFd, size: &PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows.min(u16::MAX as u32) as u16,
        ws_col: size.cols.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals the process group led by `pgid` (the child called setsid).
fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(-pgid, signal) } < 0 {
        tracing::debug!("kill(-{pgid}, {signal}): {}", Errno::last().desc());
    }
}

async fn send(tx: &Tx, event: Event) -> bool {
    tx.send(Ok(ExecResponse { event: Some(event) }))
        .await
        .is_ok()
}

/// Drives one running process until its `exit` has been sent.
async fn supervise(run: Running, requests: Streaming<ExecRequest>, tx: Tx) {
    let pid = run.pid;
    tracing::debug!("exec: started pid {pid}");
    send(&tx, Event::Started(ExecStarted { pid: pid as u32 })).await;

    let (exited_tx, exited_rx) = watch::channel(false);
    // The host enforces the output limit (it cuts and marks); stopping here
    // one byte past it only spares the channel the bytes the host would
    // discard.
    let budget = Arc::new(AtomicU64::new(match run.max_output_bytes {
        0 => u64::MAX,
        n => n.saturating_add(1),
    }));
    let stdout = tokio::spawn(forward(
        run.stdout,
        tx.clone(),
        true,
        exited_rx.clone(),
        budget.clone(),
    ));
    let stderr = run
        .stderr
        .map(|s| tokio::spawn(forward(s, tx.clone(), false, exited_rx, budget)));
    let input = tokio::spawn(handle_input(requests, run.stdin, pid, run.pty_master));

    let timeout = async {
        match run.timeout_ms {
            0 => std::future::pending().await,
            ms => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    };
    tokio::pin!(timeout);
    let mut exit_rx = run.exit;
    let (mut timed_out, mut abandoned) = (false, false);
    let status = loop {
        tokio::select! {
            status = &mut exit_rx => break status.ok(),
            () = &mut timeout, if !timed_out => {
                timed_out = true;
                tracing::debug!("exec: pid {pid} timed out");
                kill_group(pid, libc::SIGKILL);
            }
            () = tx.closed(), if !abandoned => {
                // The client went away (cancelled or disconnected): nobody
                // can see or stop this process any more.
                abandoned = true;
                kill_group(pid, libc::SIGKILL);
            }
        }
    };
    input.abort();
    let _ = exited_tx.send(true);
    let _ = stdout.await;
    if let Some(stderr) = stderr {
        let _ = stderr.await;
    }
    let exit = exit_event(status, timed_out, run.timeout_ms);
    tracing::debug!("exec: pid {pid} exited with {}", exit.exit_code);
    send(&tx, Event::Exit(exit)).await;
}

fn exit_event(status: Option<Exit>, timed_out: bool, timeout_ms: u64) -> ExecExit {
    if timed_out {
        return ExecExit {
            output_truncated: false,
            exit_code: 128 + libc::SIGKILL,
            signal: libc::SIGKILL,
            timed_out: true,
            message: format!("timed out after {timeout_ms} ms; the process group was killed"),
        };
    }
    match status {
        Some(Exit::Code(code)) => ExecExit {
            output_truncated: false,
            exit_code: code,
            signal: 0,
            timed_out: false,
            message: String::new(),
        },
        Some(Exit::Signal(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown signal");
            ExecExit {
                output_truncated: false,
                exit_code: 128 + sig,
                signal: sig,
                timed_out: false,
                message: format!("killed by signal {sig} ({name})"),
            }
        }
        None => ExecExit {
            output_truncated: false,
            exit_code: 255,
            signal: 0,
            timed_out: false,
            message: "the agent lost track of the process".into(),
        },
    }
}

/// Forwards one output stream as `stdout`/`stderr` events, as soon as bytes
/// arrive. After the exit it stops at EOF or once it has waited
/// `DRAIN_WAIT` in total for more.
async fn forward(
    mut src: FdStream,
    tx: Tx,
    is_stdout: bool,
    mut exited: watch::Receiver<bool>,
    budget: Arc<AtomicU64>,
) {
    let mut drain: Option<(Duration, Instant)> = None; // (wait budget left, hard deadline)
    loop {
        let mut buf = Vec::with_capacity(OUTPUT_CHUNK);
        let read = match &mut drain {
            None => tokio::select! {
                biased;
                r = src.read_buf(&mut buf) => r,
                _ = exited.changed() => {
                    drain = Some((DRAIN_WAIT, Instant::now() + DRAIN_MAX));
                    continue;
                }
            },
            Some((budget, hard)) => {
                let wait = (*budget).min(hard.saturating_duration_since(Instant::now()));
                let began = Instant::now();
                let r = tokio::time::timeout(wait, src.read_buf(&mut buf)).await;
                *budget = budget.saturating_sub(began.elapsed());
                match r {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                let allowed = take_budget(&budget, n as u64);
                if allowed == 0 {
                    // Read and dropped, so the writer never blocks on us.
                    continue;
                }
                buf.truncate(allowed as usize);
                let event = if is_stdout {
                    Event::Stdout(buf)
                } else {
                    Event::Stderr(buf)
                };
                if !send(&tx, event).await {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!("exec: reading output failed: {e}");
                break;
            }
        }
    }
}

/// Takes up to `n` from `budget`; returns what was taken.
fn take_budget(budget: &AtomicU64, n: u64) -> u64 {
    let mut taken = 0;
    let _ = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
        taken = left.min(n);
        Some(left - taken)
    });
    taken
}

/// Applies the client's stdin, close, signal and resize messages.
async fn handle_input(
    mut requests: Streaming<ExecRequest>,
    mut stdin: Option<FdStream>,
    pgid: i32,
    pty: Option<Arc<OwnedFd>>,
) {
    loop {
        let msg = match requests.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("exec: request stream ended: {e}");
                return;
            }
        };
        match msg.msg {
            Some(Msg::Stdin(data)) => {
                if let Some(w) = stdin.as_mut() {
                    // EPIPE: the process closed its stdin; drop the rest.
                    if w.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            Some(Msg::CloseStdin(_)) => {
                if pty.is_some() {
                    // A terminal has no half-close: send the EOF character
                    // (VEOF, ^D), which ends input in canonical mode.
                    if let Some(w) = stdin.as_mut() {
                        let _ = w.write_all(&[0x04]).await;
                    }
                } else {
                    stdin = None;
                }
            }
            Some(Msg::Signal(s)) => kill_group(pgid, s.signal),
            Some(Msg::Resize(size)) => {
                if let Some(master) = &pty
                    && let Err(e) = set_winsize(master, &size)
                {
                    tracing::debug!("exec: resize failed: {e}");
                }
            }
            Some(Msg::Start(_)) => tracing::debug!("exec: ignoring a second `start`"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_events() {
        assert_eq!(exit_event(Some(Exit::Code(3)), false, 0).exit_code, 3);
        let e = exit_event(Some(Exit::Signal(15)), false, 0);
        assert_eq!((e.exit_code, e.signal), (143, 15));
        assert!(e.message.contains("SIGTERM"));
        let e = exit_event(Some(Exit::Signal(9)), true, 50);
        assert_eq!((e.exit_code, e.signal, e.timed_out), (137, 9, true));
    }

    #[test]
    fn lookup_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::write(bin.join("data"), "").unwrap();
        std::fs::create_dir(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("other/data"), "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(bin.join("data"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(
            dir.path().join("other/data"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let root = Root::open(dir.path()).unwrap();
        let root_id = Identity {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/".into(),
        };
        let user_id = Identity {
            uid: 4242,
            gid: 4242,
            groups: vec![4242],
            home: "/".into(),
        };
        assert_eq!(
            lookup(&root, "tool", "/nope:/bin", "/", &root_id),
            Lookup::Found("/bin/tool".into())
        );
        assert_eq!(
            lookup(&root, "missing", "/bin", "/", &root_id),
            Lookup::NotFound("command not found".into())
        );
        assert!(matches!(
            lookup(&root, "data", "/bin", "/", &root_id),
            Lookup::NotExecutable(_)
        ));
        // Root may run anything with an x bit; others need theirs.
        assert_eq!(
            lookup(&root, "data", "/bin:/other", "/", &root_id),
            Lookup::Found("/other/data".into())
        );
        assert!(matches!(
            lookup(&root, "data", "/bin:/other", "/", &user_id),
            Lookup::NotExecutable(_)
        ));
        assert_eq!(
            lookup(&root, "./tool", "", "/bin", &root_id),
            Lookup::Found("./tool".into())
        );
        assert!(matches!(
            lookup(&root, "/bin", "", "/", &root_id),
            Lookup::NotExecutable(_)
        ));
        assert!(matches!(
            lookup(&root, "/bin/nope", "", "/", &root_id),
            Lookup::NotFound(_)
        ));
    }
}
