//! Light sleep and wake of sandboxes, automatic wake on use, the idle
//! monitor that puts idle sandboxes to sleep, and what happens when a VMM
//! dies on its own.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use somna_snapshotter::{MemoryLayout, Snapshot, SnapshotError, SnapshotParts, residency};
use tracing::{Instrument, info, info_span, warn};

use crate::agent::{Agent, VMM_STOP_GRACE};
use crate::error::AgentError;
use crate::launch;
use crate::rundir::VmDir;
use crate::sandbox::{LiveVm, MemoryMode, Sandbox, SandboxInfo, SandboxState};
use crate::vmm::{Incoming, MemoryBacking};

/// Timings of one sleep, for logs and benchmarks.
#[derive(Debug, Default)]
struct SleepTimings {
    save_ms: u64,
    stop_ms: u64,
    seal_ms: u64,
    release_ms: u64,
}

impl Agent {
    /// Puts a running sandbox to sleep: pause, save state (device state only
    /// when its RAM is its own memory file), stop the VMM, checksum the
    /// snapshot and release its pages from the host's memory.
    pub async fn sleep(&self, id: &str) -> Result<SandboxInfo, AgentError> {
        let sandbox = self.lookup(id)?;
        let span = info_span!("sleep_sandbox", %id);
        self.sleep_inner(&sandbox).instrument(span).await?;
        Ok(sandbox.info())
    }

    async fn sleep_inner(&self, sandbox: &Arc<Sandbox>) -> Result<(), AgentError> {
        let _lifecycle = sandbox.lifecycle.lock().await;
        let info = sandbox.info();
        match info.state {
            SandboxState::Running => {}
            SandboxState::Sleeping => return Ok(()),
            other => return Err(not_running(&info, other)),
        }
        let Some(live) = sandbox.live() else {
            return Err(not_running(&info, SandboxState::Failed));
        };
        let started = Instant::now();
        // Detach the VM first: its exit is now expected, not a crash, and
        // exec streams on it end with a clear message.
        sandbox.set_live(None);
        sandbox.bump_epoch();
        let layout = match sandbox.memory_mode() {
            MemoryMode::Own if self.vmm.ram_in_memory_file() => MemoryLayout::File,
            // A template clone's RAM is a private mapping, and some VMMs
            // (Cloud Hypervisor) always put RAM into the state.
            MemoryMode::Own | MemoryMode::TemplateCow => MemoryLayout::Stream,
        };
        let dir = &sandbox.dir;
        let mut t = SleepTimings::default();
        let saved = async {
            live.vm.pause().await?;
            live.vm
                .save_state(&dir.state_file(), layout == MemoryLayout::File)
                .await
        }
        .await;
        t.save_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = saved {
            let disk_full = crate::rundir::disk_full(dir.path());
            remove_state(dir);
            // The VM is still there: keep it running rather than lose it.
            if live.vm.resume().await.is_ok() {
                sandbox.set_live(Some(live.clone()));
                warn!(error = %e, disk_full, "sleep failed; the sandbox keeps running");
                return Err(AgentError::SleepFailed {
                    id: info.id.clone(),
                    reason: e.to_string(),
                    disk_full,
                });
            }
            live.vm.kill().await;
            return Err(fail_keeping_disk(
                sandbox,
                &format!("saving its state for sleep failed ({e}), and it could not run on"),
                None,
            ));
        }
        crate::fault::point("sleep.state_saved");
        let mark = Instant::now();
        live.vm.stop(VMM_STOP_GRACE).await;
        sandbox.net.release();
        t.stop_ms = mark.elapsed().as_millis() as u64;

        let mark = Instant::now();
        let (owned, root_disk) = (dir.clone(), sandbox.root_disk_id.clone());
        let (cpus, memory_mib) = (info.cpus, info.memory_mib);
        let sealed = off_workers(dir, move || {
            seal_snapshot(&owned, layout, cpus, memory_mib, root_disk)
        })
        .await;
        t.seal_ms = mark.elapsed().as_millis() as u64;
        crate::fault::point("sleep.sealed");
        if let Err(e) = sealed {
            return Err(self.fail_sandbox(sandbox, format!("sealing its snapshot failed: {e}")));
        }
        let mark = Instant::now();
        release_snapshot(dir, layout);
        t.release_ms = mark.elapsed().as_millis() as u64;
        sandbox.update(|i| {
            i.state = SandboxState::Sleeping;
            i.sleep_count += 1;
        });
        sandbox.persist();
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            save_ms = t.save_ms,
            stop_ms = t.stop_ms,
            seal_ms = t.seal_ms,
            release_ms = t.release_ms,
            memory = ?layout,
            "sandbox asleep"
        );
        Ok(())
    }

    /// Wakes a sleeping sandbox: verify the snapshot, restore it, resume,
    /// and run the guest's wake fix-ups (clock, RNG).
    pub async fn wake(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, AgentError> {
        let sandbox = self.lookup(id)?;
        let span = info_span!("wake_sandbox", %id);
        self.wake_inner(&sandbox).instrument(span).await?;
        Ok(sandbox.info())
    }

    async fn wake_inner(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Result<(), AgentError> {
        let _lifecycle = sandbox.lifecycle.lock().await;
        let info = sandbox.info();
        match info.state {
            SandboxState::Sleeping => {}
            SandboxState::Running => return Ok(()),
            SandboxState::Failed if sandbox.can_reboot() => return self.reboot(sandbox).await,
            other => return Err(not_running(&info, other)),
        }
        let started = Instant::now();
        let dir = &sandbox.dir;
        let snapshot = match Snapshot::open(dir.path()) {
            Ok(s) => s,
            Err(e) => {
                return Err(self.fail_sandbox(sandbox, format!("its snapshot cannot be used: {e}")));
            }
        };
        let snapshot = if self.config.verify_snapshots {
            match off_workers(dir, move || snapshot.verify().map(|()| snapshot)).await {
                Ok(s) => s,
                Err(e) => {
                    return Err(self
                        .fail_sandbox(sandbox, format!("its snapshot failed verification: {e}")));
                }
            }
        } else {
            snapshot
        };
        let verify_ms = started.elapsed().as_millis() as u64;
        if snapshot.meta().root_disk != sandbox.root_disk_id {
            return Err(self.fail_sandbox(
                sandbox,
                "the image's root disk changed while it slept (it was rebuilt), so its memory no longer matches the disk".into(),
            ));
        }
        let (memory, incoming) = match snapshot.meta().memory {
            MemoryLayout::File => (
                MemoryBacking {
                    path: dir.memory_file(),
                    shared: true,
                },
                Incoming {
                    state: snapshot.state_path(),
                    memory_in_file: true,
                    resume: true,
                },
            ),
            MemoryLayout::Stream => {
                // RAM comes from the stream into a new memory file of the
                // sandbox's own: from now on it sleeps the fast way.
                let _ = std::fs::remove_file(dir.memory_file());
                (
                    MemoryBacking {
                        path: dir.memory_file(),
                        shared: true,
                    },
                    Incoming {
                        state: snapshot.state_path(),
                        memory_in_file: false,
                        resume: true,
                    },
                )
            }
        };
        if let Err(e) = self.allocate_memory(dir, sandbox.spec.memory_mib) {
            // Nothing ran: the snapshot is whole and the sandbox sleeps on.
            if snapshot.meta().memory == MemoryLayout::Stream {
                let _ = std::fs::remove_file(dir.memory_file());
            }
            return Err(e);
        }
        let mut spec = sandbox.spec.clone();
        spec.memory = memory;
        // Any slot will do: the guest side of every slot is the same.
        sandbox.net.attach(&self.network, &info.id, &mut spec)?;
        let live = match launch::restore(self.vmm.as_ref(), &spec, dir, &incoming).await {
            Ok(live) => live,
            // Nothing ran: the snapshot is untouched and the sandbox still
            // sleeps; the caller may try again.
            Err(f) => {
                sandbox.net.release();
                return Err(AgentError::Vmm {
                    id: info.id.clone(),
                    source: crate::vmm::VmmError::Failed {
                        id: info.id.clone(),
                        what: f.reason,
                    },
                });
            }
        };
        crate::fault::point("wake.restored");
        let restore_ms = started.elapsed().as_millis() as u64 - verify_ms;
        let deadline = Instant::now() + self.config.boot_timeout;
        let woke = match launch::wake_restored(&live, dir, None, deadline).await {
            Ok(w) => w,
            // The VM is gone (killed) and ran on its files: they are kept.
            Err(f) => {
                return Err(fail_keeping_disk(
                    sandbox,
                    &format!("it did not come back from sleep: {}", f.reason),
                    Some(&f.console),
                ));
            }
        };
        // The snapshot is consumed: the VM runs on (and changes) its files.
        // The state is a file (QEMU) or a directory (Cloud Hypervisor; a VM
        // restored from it keeps the files it still reads open).
        let _ = snapshot.unseal();
        remove_state(dir);
        sandbox.set_memory_mode(MemoryMode::Own);
        let restore_mode = live.vm.restore_mode();
        let live = Arc::new(live);
        sandbox.set_live(Some(live.clone()));
        sandbox.update(|i| {
            i.state = SandboxState::Running;
            i.wake_count += 1;
        });
        sandbox.persist();
        sandbox.activity.touch();
        tokio::spawn(watch_vmm(sandbox.clone(), live));
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            verify_ms,
            restore_ms,
            clock_step_ms = woke.clock_step_ms,
            restore_mode = restore_mode.as_deref().unwrap_or("-"),
            "sandbox awake"
        );
        Ok(())
    }

    /// Boots a sandbox whose VMM died again on its writable disk (fresh
    /// memory; the caller holds the lifecycle lock). If the boot fails it
    /// stays failed, its disk still kept.
    async fn reboot(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Result<(), AgentError> {
        let started = Instant::now();
        let id = sandbox.info().id;
        let dir = &sandbox.dir;
        discard_memory(dir);
        self.allocate_memory(dir, sandbox.spec.memory_mib)?;
        let mut spec = sandbox.spec.clone();
        sandbox.net.attach(&self.network, &id, &mut spec)?;
        let deadline = started + self.config.boot_timeout;
        let live = match launch::boot(self.vmm.as_ref(), &spec, dir, deadline).await {
            Ok((live, _health)) => live,
            Err(f) => {
                sandbox.net.release();
                warn!(%id, reason = %f.reason, "booting a failed sandbox again on its disk failed");
                return Err(AgentError::BootFailed {
                    id,
                    reason: f.reason,
                    console: f.console,
                });
            }
        };
        sandbox.set_memory_mode(MemoryMode::Own);
        let live = Arc::new(live);
        sandbox.set_live(Some(live.clone()));
        let boot_ms = started.elapsed().as_millis() as u64;
        sandbox.update(|i| {
            i.state = SandboxState::Running;
            i.failure = None;
            i.boot_ms = boot_ms;
        });
        sandbox.persist();
        sandbox.activity.touch();
        tokio::spawn(watch_vmm(sandbox.clone(), live));
        info!(%id, boot_ms, "sandbox booted again on its disk");
        Ok(())
    }

    /// The sandbox, running: woken first if it sleeps. Counts as activity.
    pub(crate) async fn awake(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(Arc<Sandbox>, Arc<LiveVm>), AgentError> {
        let sandbox = self.lookup(id)?;
        sandbox.activity.touch();
        loop {
            let info = sandbox.info();
            match info.state {
                SandboxState::Running => {
                    if let Some(live) = sandbox.live() {
                        return Ok((sandbox, live));
                    }
                    // A sleep is in progress: wait for it, then wake.
                    drop(sandbox.lifecycle.lock().await);
                }
                SandboxState::Sleeping => {
                    self.wake_inner(&sandbox).await?;
                }
                other => return Err(not_running(&info, other)),
            }
        }
    }

    /// Marks a sandbox failed with `reason` and reclaims its host resources
    /// (the VM, if any, is already gone or detached).
    pub(crate) fn fail_sandbox(&self, sandbox: &Arc<Sandbox>, reason: String) -> AgentError {
        let id = sandbox.info().id;
        warn!(%id, %reason, "sandbox failed");
        sandbox.net.release();
        sandbox.update(|i| {
            i.state = SandboxState::Failed;
            i.failure = Some(reason.clone());
        });
        if let Err(e) = sandbox.dir.remove() {
            warn!(%id, error = %e, "cannot remove run directory of failed sandbox");
        }
        AgentError::NotRunning {
            id,
            state: "failed",
            detail: format!(": {reason}"),
        }
    }
}

/// Runs snapshot work on `dir` (hashing its files: about a second per GiB
/// the guest wrote) on tokio's blocking pool: on an async worker it would
/// hold up other sandboxes' execs and API calls as long.
async fn off_workers<T: Send + 'static>(
    dir: &VmDir,
    work: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(SnapshotError::Io {
                what: "hash",
                path: dir.path().to_path_buf(),
                source: std::io::Error::other("the agent is shutting down"),
            }),
        },
    }
}

/// Seals the snapshot of a VM that saved its state into `dir` and stopped.
pub(crate) fn seal_snapshot(
    dir: &VmDir,
    layout: MemoryLayout,
    cpus: u32,
    memory_mib: u32,
    root_disk: String,
) -> Result<Snapshot, somna_snapshotter::SnapshotError> {
    let memory_file = dir.memory_file();
    Snapshot::seal(
        dir.path(),
        SnapshotParts {
            memory: layout,
            state: &dir.state_file(),
            memory_file: (layout == MemoryLayout::File).then_some(memory_file.as_path()),
            disk: &dir.rw_disk(),
            cpus,
            memory_mib,
            root_disk,
        },
    )
}

/// Drops a sealed snapshot's files from the host's page cache: a sleeping
/// sandbox holds no host RAM.
pub(crate) fn release_snapshot(dir: &VmDir, layout: MemoryLayout) {
    let mut files = vec![dir.state_file(), dir.rw_disk()];
    if layout == MemoryLayout::File {
        files.push(dir.memory_file());
    }
    for f in &files {
        if let Err(e) = residency::release(f) {
            warn!(file = %f.display(), error = %e, "cannot release a snapshot file from the page cache");
        }
    }
}

fn not_running(info: &SandboxInfo, state: SandboxState) -> AgentError {
    AgentError::NotRunning {
        id: info.id.clone(),
        state: state.as_str(),
        detail: info
            .failure
            .clone()
            .map(|f| format!(": {f}"))
            .unwrap_or_default(),
    }
}

/// Marks a sandbox failed when its VMM dies without being asked to, and
/// reclaims what the VMM held (network slot, memory file) but keeps its
/// writable disk: a wake boots it again on its files.
pub(crate) async fn watch_vmm(sandbox: Arc<Sandbox>, live: Arc<LiveVm>) {
    let exit = live.vm.wait_exit().await;
    // After any sleep, wake or destroy under way: those stop the VMM on
    // purpose (and a destroy must not race the record written below).
    let _lifecycle = sandbox.lifecycle.lock().await;
    let still_current = sandbox.live().is_some_and(|l| Arc::ptr_eq(&l, &live));
    if !still_current || sandbox.state() != SandboxState::Running {
        return;
    }
    sandbox.set_live(None);
    sandbox.bump_epoch();
    let console = sandbox.dir.console_tail(30);
    fail_keeping_disk(
        &sandbox,
        &format!("the VMM {exit} unexpectedly"),
        Some(&console),
    );
}

/// Marks a sandbox whose VM is gone failed, frees its network slot,
/// memory and state files and keeps its writable disk, which a wake boots
/// again. The failure ends with the last lines of the guest `console`.
fn fail_keeping_disk(sandbox: &Sandbox, reason: &str, console: Option<&str>) -> AgentError {
    let id = sandbox.info().id;
    warn!(%id, %reason, "sandbox failed; its disk is kept");
    sandbox.net.release();
    let failure = match console {
        Some(c) => format!("{reason}{REBOOT_HINT}; last lines of the guest console:\n{c}"),
        None => format!("{reason}{REBOOT_HINT}"),
    };
    sandbox.update(|i| {
        i.state = SandboxState::Failed;
        i.failure = Some(failure.clone());
    });
    discard_memory(&sandbox.dir);
    sandbox.persist();
    AgentError::NotRunning {
        id,
        state: "failed",
        detail: format!(": {failure}"),
    }
}

/// How a failure that kept the sandbox's disk ends.
pub(crate) const REBOOT_HINT: &str =
    ": its processes and memory are lost, its files are kept (wake it to boot it again on them)";

/// Removes a run directory's memory and state files (and any seal over
/// them), keeping the writable disk.
pub(crate) fn discard_memory(dir: &VmDir) {
    if let Ok(s) = Snapshot::open(dir.path()) {
        let _ = s.unseal();
    }
    remove_state(dir);
    let _ = std::fs::remove_file(dir.memory_file());
}

/// Removes the saved VMM state: a file (QEMU) or a directory (Cloud
/// Hypervisor).
fn remove_state(dir: &VmDir) {
    let state = dir.state_file();
    let _ = if state.is_dir() {
        std::fs::remove_dir_all(&state)
    } else {
        std::fs::remove_file(&state)
    };
}

/// Puts sandboxes to sleep after their idle timeout: no exec in flight and
/// no exec or file activity and no network traffic (other than platform
/// health checks, which netd does not count) for that long.
pub(crate) fn spawn_idle_monitor(agent: &Arc<Agent>) {
    let weak: Weak<Agent> = Arc::downgrade(agent);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let Some(agent) = weak.upgrade() else { return };
            for sandbox in agent.sandboxes() {
                let info = sandbox.info();
                let Some(timeout) = info.idle_timeout else {
                    continue;
                };
                if info.state == SandboxState::Running
                    && sandbox.activity.inflight() == 0
                    && sandbox.activity.idle_for() >= timeout
                    && agent
                        .network_idle_for(&sandbox)
                        .is_none_or(|idle| idle >= timeout)
                {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        info!(id = %info.id, idle_s = timeout.as_secs(), "idle timeout: putting the sandbox to sleep");
                        if let Err(e) = agent.sleep(&info.id).await {
                            warn!(id = %info.id, error = %e, "idle sleep failed");
                        }
                    });
                }
            }
        }
    });
}
