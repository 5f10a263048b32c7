//! PID 1: bring the VM from the initramfs to a served sandbox, and take it
//! down again.
//!
//! Any set-up failure prints `somna-guest: fatal: <what>` on the console and
//! powers off, so the host can report the console tail. PID 1 never exits:
//! the kernel would panic.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::reboot::{RebootMode, reboot};

use crate::cmdline::{ChannelKind, Cmdline};
use crate::exec::ExecEnv;
use crate::files::{self, Root};
use crate::identity::{self, SharedIdentity};
use crate::reaper::{self, Reaper};
use crate::service::{Agent, OnShutdown};
use crate::{channel, logging, modules, mounts, net, serial, wake};

/// How long to wait for the disks and the serial port to appear.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long processes get between SIGTERM and SIGKILL on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs the agent as PID 1. Never returns.
pub fn run_as_pid1() -> ! {
    // A panic anywhere on the set-up path becomes a fatal line, not a silent
    // kernel panic.
    std::panic::set_hook(Box::new(|info| {
        console_line(&format!("somna-guest: panic: {info}"));
    }));
    match std::panic::catch_unwind(boot) {
        Ok(Ok(())) => fatal("the agent stopped serving"),
        Ok(Err(e)) => fatal(&e),
        Err(_) => fatal("the agent panicked (see the line above)"),
    }
}

/// Writes one line to the console, bypassing the logger (which may not be
/// set up yet).
fn console_line(line: &str) {
    let msg = format!("{line}\n");
    if std::io::stderr().write_all(msg.as_bytes()).is_err()
        && let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console")
    {
        let _ = c.write_all(msg.as_bytes());
    }
}

/// Reports a fatal set-up error and powers off.
pub fn fatal(what: &str) -> ! {
    console_line(&format!("somna-guest: fatal: {what}"));
    power_off()
}

/// Syncs and powers the VM off. If even that fails, parks forever rather
/// than exiting (which would panic the kernel and lose the console tail).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    console_line(&format!("somna-guest: error: power off failed: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Raises the soft open-files limit to the hard one (the kernel's default
/// soft limit of 1024 is low for many concurrent execs and file streams).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn boot() -> Result<(), String> {
    mounts::mount_early()?;
    let text =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let cmdline = Cmdline::parse(&text).map_err(|e| format!("kernel command line: {e}"))?;
    if cmdline.probe {
        probe_ok();
    }
    logging::init(&cmdline.log);
    tracing::info!(
        "agent {} starting for sandbox {:?}",
        env!("CARGO_PKG_VERSION"),
        cmdline.id
    );

    modules::load_all(Path::new("/lib/modules"));
    let disks = mounts::find_disks(DEVICE_TIMEOUT)?;
    mounts::mount_sandbox_root(&disks)?;
    let machine_id_from_image = mounts::machine_id_only_in_image();
    mounts::switch_root()?;
    first_boot(machine_id_from_image);

    if !cmdline.hostname.is_empty() {
        nix::unistd::sethostname(&cmdline.hostname)
            .map_err(|e| format!("set hostname {:?}: {e}", cmdline.hostname))?;
    }
    if let Err(e) = net::loopback_up() {
        // Not fatal: processes just cannot use 127.0.0.1.
        tracing::warn!("bringing up the loopback interface failed: {e}");
    }
    if let Some(config) = &cmdline.net {
        // Not fatal: the sandbox still runs, without a network.
        match net::configure(net::GUEST_NIC, config, DEVICE_TIMEOUT) {
            Ok(()) => tracing::info!("{} is {}/{}", net::GUEST_NIC, config.ip, config.prefix_len),
            Err(e) => tracing::warn!("configuring {} failed: {e}", net::GUEST_NIC),
        }
    }
    raise_fd_limit();

    let threads = std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("start the tokio runtime: {e}"))?;
    runtime.block_on(serve(cmdline))
}

/// Cold boot in the new root: a unique `/etc/machine-id` unless the sandbox
/// already has its own (a restored clone's is replaced later by Wake), and
/// `/run/somna/wake-count` reset to 0. Failures are logged, not fatal: the
/// sandbox still works without them.
fn first_boot(machine_id_from_image: bool) {
    let root = match Root::open(Path::new("/")) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("first boot: {e}");
            return;
        }
    };
    if let Err(e) = identity::ensure_machine_id(&root, machine_id_from_image) {
        tracing::warn!("first boot: {e}");
    }
    if let Err(e) = files::overwrite_small(&root, wake::WAKE_COUNT_PATH, b"0\n", 0o644) {
        tracing::warn!("first boot: write {}: {e}", wake::WAKE_COUNT_PATH);
    }
}

/// `somna.probe=1`: say the accelerator works and power off, touching
/// nothing else.
fn probe_ok() -> ! {
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut c) => {
            let _ = c.write_all(b"SOMNA-PROBE-OK\n");
        }
        Err(_) => console_line("SOMNA-PROBE-OK"),
    }
    power_off()
}

async fn serve(cmdline: Cmdline) -> Result<(), String> {
    let reaper = Reaper::start().map_err(|e| format!("install the SIGCHLD handler: {e}"))?;
    let root = Root::open(Path::new("/")).map_err(|e| e.to_string())?;
    let exec = ExecEnv {
        root: std::sync::Arc::new(root),
        reaper,
        identity: SharedIdentity::new(cmdline.id.clone(), cmdline.hostname.clone()),
        chroot: false,
    };
    let service = Agent::new(exec, OnShutdown::PowerOff, true).into_service();
    match cmdline.channel {
        ChannelKind::Serial => {
            let name = somna_proto::GUEST_SERIAL_PORT_NAME;
            let path = tokio::task::spawn_blocking(move || serial::find_port(name, DEVICE_TIMEOUT))
                .await
                .map_err(|e| format!("port search task failed: {e}"))?
                .map_err(|e| e.to_string())?;
            let fd = serial::open_port(&path).map_err(|e| e.to_string())?;
            tracing::info!("ready; serving on {}", path.display());
            serial::serve(fd, service)
                .await
                .map_err(|e| format!("serial channel {}: {e}", path.display()))
        }
        ChannelKind::Vsock => channel::serve_vsock(somna_proto::GUEST_VSOCK_PORT, service)
            .await
            .map_err(|e| format!("vsock channel: {e}")),
    }
}

/// Shutdown RPC in a VM: SIGTERM everything, wait a little, SIGKILL what is
/// left, sync, power off.
pub async fn shutdown_vm() {
    // SAFETY: kill(2) has no memory-safety preconditions. -1 means every
    // process but PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    wait_for_no_children(SHUTDOWN_GRACE).await;
    unsafe { libc::kill(-1, libc::SIGKILL) };
    wait_for_no_children(Duration::from_secs(1)).await;
    tracing::info!("powering off");
    power_off();
}

async fn wait_for_no_children(limit: Duration) {
    let deadline = Instant::now() + limit;
    while reaper::has_children() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes sure fds 0-2 are open on the console: if the initramfs has no
/// /dev/console node, the kernel starts init without them.
pub fn ensure_console_fds() {
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let cfd = console.as_raw_fd();
    for fd in 0..=2 {
        // SAFETY: fcntl/dup2 on plain integers; no memory is involved.
        unsafe {
            if fd != cfd && libc::fcntl(fd, libc::F_GETFD) < 0 {
                libc::dup2(cfd, fd);
            }
        }
    }
    if cfd <= 2 {
        // It filled a gap itself: keep it open (and inheritable) as that fd.
        std::mem::forget(console);
        // SAFETY: clearing FD_CLOEXEC on a descriptor we just opened.
        unsafe { libc::fcntl(cfd, libc::F_SETFD, 0) };
    }
}
