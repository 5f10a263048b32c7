//! The Wake RPC: what the guest does right after a restore from a snapshot
//! (the same sandbox waking from light sleep, or a clone of a template).
//!
//! In order: step the wall clock to the host's, mix the host's entropy into
//! the kernel RNG and force a reseed (so clones of one snapshot diverge),
//! take the new identity if one came, count the wake in
//! `/run/somna/wake-count`, and start the hooks in `/etc/somna/wake.d/` in
//! the background. Everything is validated before anything changes.
//!
//! In dev mode (not PID 1) the host's clock and hostname are never touched:
//! the clock step is only measured, the hostname only stored. The RNG part
//! runs when the agent may (CAP_SYS_ADMIN) and is skipped otherwise.
//!
//! The reply does not wait for the hooks: they run after it, one at a time
//! in name order, as children of the agent that its reaper collects.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use nix::time::{ClockId, clock_gettime, clock_settime};
use somna_proto::guest::v1::{WakeRequest, WakeResponse};
use tonic::Status;

use crate::exec::{DEFAULT_PATH, ExecEnv};
use crate::files::{self, Root};
use crate::identity::{self, GuestIdentity, NewIdentity};
use crate::reaper::Exit;

/// Least entropy accepted from the host, in bytes (256 bits).
pub const MIN_ENTROPY: usize = 32;
/// Most entropy used from one request (the rest is ignored).
const MAX_ENTROPY: usize = 4096;
/// The wake counter, inside the sandbox root.
pub const WAKE_COUNT_PATH: &str = "/run/somna/wake-count";
/// The wake hooks, inside the sandbox root.
pub const HOOK_DIR: &str = "/etc/somna/wake.d";
/// How long a hook may run before the next one starts anyway.
const HOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's wake state.
pub struct Waker {
    /// PID 1 in a VM: the clock, the RNG and the hostname are the guest's
    /// own, and failing to set them fails the Wake.
    vm: bool,
    count: AtomicU64,
    /// One Wake at a time (held on the blocking pool, so a cancelled RPC
    /// cannot let a second Wake overlap a first that is still applying).
    serial: Mutex<()>,
}

impl Waker {
    pub fn new(vm: bool) -> Waker {
        Waker {
            vm,
            count: AtomicU64::new(0),
            serial: Mutex::new(()),
        }
    }

    /// How many Wakes have completed since the agent started.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Runs one Wake.
    pub async fn wake(
        self: &Arc<Self>,
        env: &ExecEnv,
        req: WakeRequest,
    ) -> Result<WakeResponse, Status> {
        let plan = Plan::validate(req)?;
        let this = self.clone();
        let env = env.clone();
        tokio::task::spawn_blocking(move || this.apply(&env, plan))
            .await
            .map_err(|e| Status::internal(format!("wake task failed: {e}")))?
    }

    fn apply(&self, env: &ExecEnv, plan: Plan) -> Result<WakeResponse, Status> {
        let _one = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        let clock_step_ms = self.step_clock(plan.unix_time_ns)?;
        let rng = if self.add_entropy(&plan.entropy)? {
            "RNG reseeded"
        } else {
            "RNG untouched (dev mode)"
        };
        let identity_note = match &plan.identity {
            Some(new) => {
                self.take_identity(env, new)?;
                format!(
                    "identity sandbox {:?} hostname {:?} machine-id {}",
                    new.sandbox_id, new.hostname, new.machine_id
                )
            }
            None => "identity unchanged".to_string(),
        };
        let count = self.count.load(Ordering::SeqCst) + 1;
        files::overwrite_small(
            &env.root,
            WAKE_COUNT_PATH,
            format!("{count}\n").as_bytes(),
            0o644,
        )
        .map_err(|e| Status::internal(format!("write the wake count: {e}")))?;
        self.count.store(count, Ordering::SeqCst);
        let hooks = start_hooks(env, count);
        tracing::info!(
            "woke: count {count}, clock stepped by {clock_step_ms} ms, {rng}, {identity_note}{}",
            if hooks > 0 {
                format!(", {hooks} wake hook(s) to run")
            } else {
                String::new()
            }
        );
        Ok(WakeResponse {
            wake_count: count,
            clock_step_ms,
        })
    }

    /// Steps CLOCK_REALTIME to the host's time (only in a VM); returns the
    /// offset it had (host minus guest) in milliseconds.
    fn step_clock(&self, unix_time_ns: i64) -> Result<i64, Status> {
        let now = clock_gettime(ClockId::CLOCK_REALTIME)
            .map_err(|e| Status::internal(format!("read the clock: {e}")))?;
        let now_ns = now.tv_sec() as i128 * 1_000_000_000 + now.tv_nsec() as i128;
        let step_ms = ((unix_time_ns as i128 - now_ns) / 1_000_000) as i64;
        if self.vm {
            let ts = nix::sys::time::TimeSpec::new(
                unix_time_ns.div_euclid(1_000_000_000),
                unix_time_ns.rem_euclid(1_000_000_000),
            );
            clock_settime(ClockId::CLOCK_REALTIME, ts)
                .map_err(|e| Status::internal(format!("step the clock: {e}")))?;
        } else {
            tracing::debug!("dev mode: not stepping the host's clock (offset {step_ms} ms)");
        }
        Ok(step_ms)
    }

    /// Credits `entropy` to the kernel RNG and forces a reseed of its CRNG.
    /// `Ok(false)`: skipped (dev mode without the privilege).
    fn add_entropy(&self, entropy: &[u8]) -> Result<bool, Status> {
        match add_entropy(entropy) {
            Ok(()) => {
                tracing::debug!(
                    "mixed {} bytes of entropy into the kernel RNG and reseeded it",
                    entropy.len()
                );
                Ok(true)
            }
            Err(e) if self.vm => Err(Status::internal(format!("reseed the kernel RNG: {e}"))),
            Err(e) => {
                tracing::debug!("dev mode: not reseeding the host's RNG ({e})");
                Ok(false)
            }
        }
    }

    fn take_identity(&self, env: &ExecEnv, new: &NewIdentity) -> Result<(), Status> {
        identity::write_machine_id(&env.root, &new.machine_id)
            .map_err(|e| Status::internal(format!("write the machine id: {e}")))?;
        if self.vm {
            nix::unistd::sethostname(&new.hostname).map_err(|e| {
                Status::internal(format!("set the hostname {:?}: {e}", new.hostname))
            })?;
        }
        env.identity.set(GuestIdentity {
            sandbox_id: new.sandbox_id.clone(),
            hostname: new.hostname.clone(),
        });
        Ok(())
    }
}

/// A checked WakeRequest.
struct Plan {
    unix_time_ns: i64,
    entropy: Vec<u8>,
    identity: Option<NewIdentity>,
}

impl Plan {
    fn validate(req: WakeRequest) -> Result<Plan, Status> {
        if req.unix_time_ns <= 0 {
            return Err(Status::invalid_argument(format!(
                "unix_time_ns must be the host's wall-clock time in nanoseconds since the epoch, \
                 not {}",
                req.unix_time_ns
            )));
        }
        if req.entropy.len() < MIN_ENTROPY {
            return Err(Status::invalid_argument(format!(
                "entropy has {} bytes; at least {MIN_ENTROPY} (64 recommended) fresh random \
                 bytes are required",
                req.entropy.len()
            )));
        }
        let identity = req
            .identity
            .as_ref()
            .map(NewIdentity::validate)
            .transpose()?;
        let mut entropy = req.entropy;
        entropy.truncate(MAX_ENTROPY);
        Ok(Plan {
            unix_time_ns: req.unix_time_ns,
            entropy,
            identity,
        })
    }
}

/// RNDADDENTROPY (`_IOW('R', 0x03, int[2])`): add bytes to the input pool,
/// crediting the given number of bits.
const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()) as libc::Ioctl;
/// RNDRESEEDCRNG (`_IO('R', 0x07)`): reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::Ioctl = nix::request_code_none!(b'R', 0x07) as libc::Ioctl;

/// Mixes `entropy` into the kernel RNG (crediting all of its bits) and
/// forces the CRNG to reseed, so every later read of /dev/urandom or
/// getrandom(2) depends on it. Needs CAP_SYS_ADMIN.
fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/urandom: {e}")))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    // SAFETY: `info` has room for the header and `entropy.len()` bytes
    // after it; u8 has no alignment requirement.
    unsafe {
        std::ptr::copy_nonoverlapping(
            entropy.as_ptr(),
            info[2..].as_mut_ptr().cast::<u8>(),
            entropy.len(),
        );
    }
    // SAFETY: the kernel reads a rand_pool_info of the size its header
    // gives, which `info` holds.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("RNDADDENTROPY: {e}")));
    }
    // SAFETY: an ioctl without an argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("RNDRESEEDCRNG: {e}")));
    }
    Ok(())
}

/// The executable regular files in the hook directory (symlinks followed,
/// inside the root), sorted by name; names starting with '.' are skipped.
fn hooks(root: &Root) -> Vec<String> {
    let fd = match root.open_in(
        HOOK_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Vec::new(),
        Err(e) => {
            tracing::warn!("wake hooks: open {HOOK_DIR}: {}", e.desc());
            return Vec::new();
        }
    };
    let dir = match Dir::from_fd(fd) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("wake hooks: read {HOOK_DIR}: {}", e.desc());
            return Vec::new();
        }
    };
    let mut names: Vec<Vec<u8>> = dir
        .into_iter()
        .flatten()
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| !n.starts_with(b"."))
        .collect();
    names.sort();
    let mut found = Vec::new();
    for name in names {
        let Ok(name) = String::from_utf8(name) else {
            continue;
        };
        let path = format!("{HOOK_DIR}/{name}");
        match root.stat_follow(&path) {
            Ok(st)
                if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
                    == SFlag::S_IFREG
                    && st.st_mode & 0o111 != 0 =>
            {
                found.push(path)
            }
            Ok(_) => tracing::debug!("wake hooks: skipping {path} (not an executable file)"),
            Err(e) => tracing::debug!("wake hooks: skipping {path}: {}", e.desc()),
        }
    }
    found
}

/// Starts the wake hooks in the background, one after the other in name
/// order (like run-parts); returns how many there are. Each is the agent's
/// child, reaped by the reaper. A hook still running after [`HOOK_WAIT`]
/// does not hold up the next one (it keeps running; its end is still
/// logged).
fn start_hooks(env: &ExecEnv, count: u64) -> usize {
    let hooks = hooks(&env.root);
    if hooks.is_empty() {
        return 0;
    }
    let chroot = if env.chroot {
        match CString::new(env.root.path().as_os_str().as_bytes()) {
            Ok(c) => Some(c),
            Err(_) => {
                tracing::warn!("wake hooks: the root path contains a NUL byte");
                return 0;
            }
        }
    } else {
        None
    };
    let n = hooks.len();
    let hostname = env.identity.get().hostname;
    let reaper = env.reaper.clone();
    // Called from the blocking pool, which runs in the runtime's context.
    tokio::spawn(async move {
        for hook in hooks {
            let mut cmd = hook_command(&hook, chroot.clone(), &hostname, count);
            let mut exit = match reaper.spawn(&mut cmd) {
                Ok((child, exit)) => {
                    // Dropping the Child neither kills nor waits; the reaper
                    // collects the status and sends it to `exit`.
                    tracing::debug!("wake hook {hook} started (pid {})", child.id());
                    exit
                }
                Err(e) => {
                    tracing::warn!("wake hook {hook} could not start: {e}");
                    continue;
                }
            };
            drop(cmd);
            match tokio::time::timeout(HOOK_WAIT, &mut exit).await {
                Ok(status) => log_hook_exit(&hook, status.ok()),
                Err(_) => {
                    tracing::warn!(
                        "wake hook {hook} still runs after {HOOK_WAIT:?}; starting the next one"
                    );
                    tokio::spawn(async move { log_hook_exit(&hook, exit.await.ok()) });
                }
            }
        }
    });
    n
}

fn hook_command(hook: &str, chroot: Option<CString>, hostname: &str, count: u64) -> Command {
    let mut cmd = Command::new(OsStr::new(hook));
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("HOSTNAME", hostname)
        .env("SOMNA_WAKE_COUNT", count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The console in a VM (the agent's log in dev mode).
        .stderr(Stdio::inherit());
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe syscalls on data allocated beforehand.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: not in the agent's process group.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(root) = &chroot
                && libc::chroot(root.as_ptr()) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::chdir(c"/".as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn log_hook_exit(hook: &str, status: Option<Exit>) {
    match status {
        Some(Exit::Code(0)) => tracing::debug!("wake hook {hook} finished"),
        Some(Exit::Code(code)) => tracing::warn!("wake hook {hook} exited with status {code}"),
        Some(Exit::Signal(sig)) => tracing::warn!("wake hook {hook} was killed by signal {sig}"),
        None => tracing::debug!("wake hook {hook}: exit status lost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        // From <linux/random.h> on x86_64 / arm64.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn validation() {
        let ok = WakeRequest {
            unix_time_ns: 1_700_000_000_000_000_000,
            entropy: vec![7; 64],
            identity: None,
        };
        assert!(Plan::validate(ok.clone()).is_ok());
        let e = Plan::validate(WakeRequest {
            entropy: vec![7; 31],
            ..ok.clone()
        })
        .err()
        .unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("entropy"), "{}", e.message());
        assert!(
            Plan::validate(WakeRequest {
                entropy: vec![7; 32],
                ..ok.clone()
            })
            .is_ok()
        );
        let e = Plan::validate(WakeRequest {
            unix_time_ns: 0,
            ..ok.clone()
        })
        .err()
        .unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let p = Plan::validate(WakeRequest {
            entropy: vec![1; 10_000],
            ..ok
        })
        .ok()
        .unwrap();
        assert_eq!(p.entropy.len(), MAX_ENTROPY);
    }

    #[test]
    fn hook_listing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("etc/somna/wake.d");
        std::fs::create_dir_all(&d).unwrap();
        let exe = |name: &str, mode: u32| {
            std::fs::write(d.join(name), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("20-b", 0o755);
        exe("10-a", 0o700);
        exe("15-data", 0o644);
        exe(".hidden", 0o755);
        std::fs::create_dir(d.join("30-dir")).unwrap();
        std::os::unix::fs::symlink("10-a", d.join("40-link")).unwrap();
        std::os::unix::fs::symlink("missing", d.join("50-dangling")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert_eq!(
            hooks(&root),
            vec![
                "/etc/somna/wake.d/10-a",
                "/etc/somna/wake.d/20-b",
                "/etc/somna/wake.d/40-link"
            ]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(hooks(&Root::open(empty.path()).unwrap()).is_empty());
    }
}
