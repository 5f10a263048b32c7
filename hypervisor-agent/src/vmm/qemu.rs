//! The QEMU driver: Debian's `qemu-system-x86_64` with the `microvm` machine
//! (no PCI, no firmware: the ELF kernel boots through PVH, devices are
//! virtio-mmio described by ACPI), controlled by its command line and QMP.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use std::time::Duration;

use serde_json::json;

use super::qmp::{Qmp, QmpError};
use super::{
    Accelerator, AgentEndpoint, ChannelKind, DiskIoLimit, Incoming, Vm, VmExit, VmSpec, Vmm,
    VmmError,
};
use crate::jail::Jail;
use crate::process::ForeignProcess;
use crate::rundir::VmDir;

/// Drives `qemu-system-x86_64`.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    channel: ChannelKind,
    jail: Jail,
}

impl QemuVmm {
    /// `channel`: the agent channel to give guests. Use
    /// [`QemuVmm::default_channel`] to pick by what the host supports.
    pub fn new(binary: PathBuf, channel: ChannelKind) -> Self {
        QemuVmm {
            binary,
            channel,
            jail: Jail::disabled(),
        }
    }

    /// Runs every VMM in `jail`.
    pub fn with_jail(mut self, jail: Jail) -> Self {
        self.jail = jail;
        self
    }

    /// vsock where the host has vhost-vsock, virtio-serial otherwise.
    pub fn default_channel() -> ChannelKind {
        if Path::new("/dev/vhost-vsock").exists() {
            ChannelKind::Vsock
        } else {
            ChannelKind::Serial
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `qemu-system-x86_64 --version`, first line.
    pub async fn version(&self) -> Result<String, VmmError> {
        let out = tokio::process::Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    }

    /// The guest CID for a VM on vhost-vsock: derived from the id so that it
    /// is stable for the VM's life; 0-2 are reserved by vsock.
    fn vsock_cid(id: &str) -> u32 {
        // FNV-1a; collisions only matter between VMs alive at the same time.
        let mut h: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        3 + h % (i32::MAX as u32 - 3)
    }

    /// The complete QEMU command line for `spec` (without the binary).
    pub fn args(&self, spec: &VmSpec, dir: &VmDir, incoming: bool) -> Vec<OsString> {
        let (accel, cpu) = match spec.accelerator {
            Accelerator::Kvm => ("kvm", "host"),
            // tb-size: the translation cache counts against the VMM's
            // memory limit (jail::Limits::tcg_overhead_mib).
            Accelerator::Tcg => ("tcg,thread=multi,tb-size=256", "max"),
        };
        let mut a: Vec<OsString> = [
            "-name",
            &format!("somna-{}", spec.id),
            "-machine",
            "microvm,memory-backend=mem",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            &spec.cpus.to_string(),
            "-m",
            &format!("{}M", spec.memory_mib),
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            // Seccomp: QEMU may not spawn processes, raise privileges or
            // change scheduling/resource limits.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let path = |p: &Path| p.display().to_string();
        // Guest RAM is a file: light sleep then saves device state only.
        a.push("-object".into());
        a.push(
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                spec.memory_mib,
                escape_opt(&path(&spec.memory.path)),
                if spec.memory.shared { "on" } else { "off" }
            )
            .into(),
        );
        a.push("-kernel".into());
        a.push(spec.kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(spec.initramfs.clone().into_os_string());
        a.push("-append".into());
        a.push(spec.cmdline.clone().into());
        // Appending: a restored VM continues the console log of its boot.
        a.push("-chardev".into());
        a.push(
            format!(
                "file,id=console,path={},append=on",
                escape_opt(&path(&dir.console_log()))
            )
            .into(),
        );
        a.push("-serial".into());
        a.push("chardev:console".into());
        // An I/O error (the host's disk full under a sparse writable
        // layer) goes to the guest as EIO; QEMU's default would pause the
        // whole VM and leave the sandbox hanging.
        let throttle = throttle_opts(spec.disk_io);
        for (i, disk) in spec.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(
                format!(
                    "id=disk{i},file={},format=raw,if=none,readonly={},discard=unmap,werror=report,rerror=report{throttle}",
                    escape_opt(&path(&disk.path)),
                    if disk.read_only { "on" } else { "off" },
                )
                .into(),
            );
            a.push("-device".into());
            a.push(format!("virtio-blk-device,drive=disk{i},serial={}", disk.serial).into());
        }
        match spec.channel {
            ChannelKind::Serial => {
                a.push("-device".into());
                a.push("virtio-serial-device,max_ports=2".into());
                a.push("-chardev".into());
                a.push(
                    format!(
                        "socket,id=agent,path={},server=on,wait=off",
                        escape_opt(&path(&dir.agent_socket()))
                    )
                    .into(),
                );
                a.push("-device".into());
                a.push(
                    format!(
                        "virtserialport,chardev=agent,name={}",
                        somna_proto::GUEST_SERIAL_PORT_NAME
                    )
                    .into(),
                );
            }
            ChannelKind::Vsock => {
                a.push("-device".into());
                a.push(
                    format!("vhost-vsock-device,guest-cid={}", Self::vsock_cid(&spec.id)).into(),
                );
            }
        }
        if let Some(net) = &spec.net {
            // The TAP is opened by the agent (inside the slot's network
            // namespace) and inherited as TAP_FD: QEMU itself stays in the
            // host namespace and needs no privileges to reach the TAP.
            a.push("-netdev".into());
            a.push(format!("tap,id=net0,fd={TAP_FD},vhost=off").into());
            a.push("-device".into());
            a.push(format!("virtio-net-device,netdev=net0,mac={}", escape_opt(&net.mac)).into());
        }
        a.push("-device".into());
        a.push("virtio-rng-device".into());
        a.push("-qmp".into());
        a.push(
            format!(
                "unix:{},server=on,wait=off",
                escape_opt(&path(&dir.qmp_socket()))
            )
            .into(),
        );
        if incoming {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }
}

/// The fd number under which QEMU inherits the VM's TAP (see `args`).
const TAP_FD: i32 = 3;

/// QEMU option values separate with ','; a literal comma is written ",,".
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

#[async_trait]
impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn channel(&self) -> ChannelKind {
        self.channel
    }

    fn guest_kernel_args(&self) -> &'static str {
        // microvm has no PCI bus; skip probing for one.
        "pci=off"
    }

    async fn launch(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        incoming: Option<&Incoming>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| VmmError::Io { what, source }
        };
        let log = std::fs::File::create(dir.vmm_log()).map_err(io("create VMM log"))?;
        let log2 = log.try_clone().map_err(io("clone VMM log fd"))?;
        let tap = super::open_tap(spec)
            .await
            .map_err(|what| VmmError::Failed {
                id: spec.id.clone(),
                what,
            })?;
        let files = crate::jail::VmmFiles {
            memory_file: true,
            vhost_vsock: spec.channel == ChannelKind::Vsock,
            read_only: Vec::new(),
        };
        let jailed = self
            .jail
            .prepare(spec, dir, &self.binary, &files)?
            .map(Arc::new);
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.args(spec, dir, incoming.is_some()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: a Ctrl-C meant for `somna up` must not reach
            // the VMs directly; the agent decides how they end.
            .process_group(0)
            .kill_on_drop(false);
        let tap_raw = tap.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let jail_in_child = jailed.clone();
        // SAFETY: between fork and exec only system calls: dup2 and fcntl
        // on an fd that stays open in the parent until spawn returns, and
        // the jail's (see `JailedLaunch::enter`).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(raw) = tap_raw {
                    if raw != TAP_FD && libc::dup2(raw, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(TAP_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                match &jail_in_child {
                    Some(j) => j.enter(),
                    None => Ok(()),
                }
            });
        }
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        // QEMU holds its own copy now.
        drop(tap);
        let pid = child.id().unwrap_or(0);
        dir.write_pid(pid).map_err(io("write pid file"))?;
        let (tx, rx) = watch::channel(None);
        let jail_held = jailed.clone();
        tokio::spawn(async move {
            // The uid and cgroup stay taken until the process is gone.
            let _jail = jail_held;
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    VmExit {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => VmExit {
                    code: None,
                    signal: None,
                },
            };
            let _ = tx.send(Some(exit));
        });
        let endpoint = match spec.channel {
            ChannelKind::Serial => AgentEndpoint::SerialSocket(dir.agent_socket()),
            ChannelKind::Vsock => AgentEndpoint::Vsock {
                cid: Self::vsock_cid(&spec.id),
                port: somna_proto::GUEST_VSOCK_PORT,
            },
        };
        tracing::debug!(id = %spec.id, pid, accel = %spec.accelerator, uid = jailed.as_ref().map(|j| j.uid()), "qemu started");
        let vm = QemuVm {
            pid,
            endpoint,
            exit: rx,
            qmp_socket: dir.qmp_socket(),
            qmp: tokio::sync::Mutex::new(None),
            foreign: None,
        };
        if let Some(incoming) = incoming {
            let failed = |what: String| VmmError::Failed {
                id: spec.id.clone(),
                what,
            };
            if let Err(e) = vm.restore(incoming).await {
                vm.kill().await;
                let log = dir.vmm_log_tail(5);
                return Err(failed(format!(
                    "restore from {}: {e}; VMM said: {log}",
                    incoming.state.display()
                )));
            }
            if incoming.resume
                && let Err(e) = vm.resume().await
            {
                vm.kill().await;
                let log = dir.vmm_log_tail(5);
                return Err(failed(format!(
                    "resume after restoring {}: {e}; VMM said: {log}",
                    incoming.state.display()
                )));
            }
        }
        Ok(Box::new(vm))
    }
}

/// A running QEMU process.
pub struct QemuVm {
    pid: u32,
    endpoint: AgentEndpoint,
    exit: watch::Receiver<Option<VmExit>>,
    qmp_socket: PathBuf,
    /// One QMP connection, opened on first use (QEMU serves one client).
    qmp: tokio::sync::Mutex<Option<Qmp>>,
    /// Set when a previous agent started the process (crash recovery): it
    /// is not our child, so it is waited for and killed through a pidfd.
    foreign: Option<Arc<ForeignProcess>>,
}

/// `-drive` options that put a disk into the VM's one throttle group
/// (`io`): its disks share the budget, each direction counted apart.
/// QEMU's default burst (a tenth of a second's worth) applies.
fn throttle_opts(limit: DiskIoLimit) -> String {
    if limit.is_unlimited() {
        return String::new();
    }
    let mut o = String::new();
    if let Some(b) = limit.bytes_per_sec {
        o += &format!(",throttling.bps-read={b},throttling.bps-write={b}");
    }
    if let Some(n) = limit.ops_per_sec {
        o += &format!(",throttling.iops-read={n},throttling.iops-write={n}");
    }
    o + ",throttling.group=io"
}

/// Migration bandwidth that never throttles (bytes/s).
const UNTHROTTLED: u64 = 1 << 40;

/// Bound on a save or restore of VM state.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

impl QemuVm {
    /// Takes over a QEMU a previous agent started in `dir` (crash
    /// recovery): control through its QMP socket, exit through a pidfd.
    /// The guest agent is not reached (the endpoint is the serial socket
    /// or vsock address the VM was started with, unknown here).
    pub fn adopt(process: Arc<ForeignProcess>, dir: &VmDir) -> QemuVm {
        let (tx, rx) = watch::channel(None);
        let waiter = process.clone();
        tokio::spawn(async move {
            waiter.exited().await;
            let _ = tx.send(Some(VmExit {
                code: None,
                signal: None,
            }));
        });
        QemuVm {
            pid: process.pid(),
            endpoint: AgentEndpoint::SerialSocket(dir.agent_socket()),
            exit: rx,
            qmp_socket: dir.qmp_socket(),
            qmp: tokio::sync::Mutex::new(None),
            foreign: Some(process),
        }
    }

    /// Makes an adopted VM's state savable again: QEMU refuses a second
    /// migration out of a VM that a completed one paused ("postmigrate":
    /// the previous agent died right after saving it for sleep), so such a
    /// VM runs again for a moment first.
    pub async fn undo_finished_save(&self) -> Result<(), VmmError> {
        self.with_qmp(async |q| {
            let status = q.execute("query-status", None).await?;
            if status["status"] == "postmigrate" {
                q.execute("cont", None).await?;
            }
            Ok(())
        })
        .await
    }

    /// Runs `f` on the QMP connection, connecting first if needed (the
    /// socket appears shortly after QEMU starts) and dropping the connection
    /// after an error so the next call reconnects.
    async fn with_qmp<T>(
        &self,
        f: impl AsyncFnOnce(&mut Qmp) -> Result<T, QmpError>,
    ) -> Result<T, VmmError> {
        let mut guard = self.qmp.lock().await;
        if guard.is_none() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let qmp = loop {
                match Qmp::connect(&self.qmp_socket).await {
                    Ok(q) => break q,
                    Err(e) => {
                        if self.try_exit().is_some() || tokio::time::Instant::now() > deadline {
                            return Err(e.into());
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            };
            *guard = Some(qmp);
        }
        let Some(qmp) = guard.as_mut() else {
            return Err(VmmError::Qmp(QmpError::Closed));
        };
        let result = f(qmp).await;
        if result.is_err() {
            *guard = None;
        }
        result.map_err(VmmError::from)
    }

    async fn restore(&self, incoming: &Incoming) -> Result<(), VmmError> {
        let file = std::fs::File::open(&incoming.state).map_err(|source| VmmError::Io {
            what: format!("open state file {}", incoming.state.display()),
            source,
        })?;
        self.with_qmp(async |q| {
            set_ignore_shared(q, incoming.memory_in_file).await?;
            q.send_fd("incoming", std::os::fd::AsFd::as_fd(&file))
                .await?;
            q.execute("migrate-incoming", Some(json!({ "uri": "fd:incoming" })))
                .await?;
            q.wait_migration(MIGRATION_TIMEOUT).await?;
            Ok(())
        })
        .await
    }
}

async fn set_ignore_shared(q: &mut Qmp, on: bool) -> Result<(), QmpError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
    )
    .await
    .map(|_| ())
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn agent_endpoint(&self) -> AgentEndpoint {
        self.endpoint.clone()
    }

    async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(VmExit {
                code: None,
                signal: None,
            }),
            // The waiter task is gone only if the runtime is shutting down.
            Err(_) => VmExit {
                code: None,
                signal: None,
            },
        }
    }

    fn try_exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    async fn kill(&self) -> VmExit {
        if let Some(process) = &self.foreign {
            if let Err(e) = process.kill() {
                tracing::warn!(pid = self.pid, error = %e, "cannot kill an adopted VMM");
            }
        } else if self.try_exit().is_none() {
            // SAFETY: kill(2) on the pid of our own child, which is not yet
            // reaped (the waiter has not reported an exit), so it cannot have
            // been recycled.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
        self.wait_exit().await
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.with_qmp(async |q| q.execute("stop", None).await.map(|_| ()))
            .await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.with_qmp(async |q| q.execute("cont", None).await.map(|_| ()))
            .await
    }

    async fn save_state(&self, path: &Path, memory_in_file: bool) -> Result<(), VmmError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| VmmError::Io {
                what: format!("create state file {}", path.display()),
                source,
            })?;
        self.with_qmp(async |q| {
            set_ignore_shared(q, memory_in_file).await?;
            // QEMU throttles migration for live moves between hosts; a
            // paused VM going to a local file should go as fast as it can.
            q.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": UNTHROTTLED, "downtime-limit": 60_000 })),
            )
            .await?;
            q.send_fd("state", std::os::fd::AsFd::as_fd(&file)).await?;
            q.execute("migrate", Some(json!({ "uri": "fd:state" })))
                .await?;
            q.wait_migration(MIGRATION_TIMEOUT).await?;
            Ok(())
        })
        .await?;
        file.sync_all().map_err(|source| VmmError::Io {
            what: format!("sync state file {}", path.display()),
            source,
        })
    }

    async fn stop(&self, grace: std::time::Duration) -> VmExit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        let quit = self.with_qmp(async |q| q.execute("quit", None).await.map(|_| ()));
        // QEMU may close the socket before answering `quit`: what counts is
        // that the process ends.
        let asked = tokio::time::timeout(grace, quit).await;
        if let Ok(Err(e)) = &asked {
            tracing::debug!(pid = self.pid, error = %e, "QMP quit failed; killing");
        }
        match tokio::time::timeout(grace, self.wait_exit()).await {
            Ok(exit) => exit,
            Err(_) => self.kill().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::DiskSpec;

    fn spec(channel: ChannelKind, accel: Accelerator) -> VmSpec {
        VmSpec {
            id: "sbx-test".into(),
            cpus: 2,
            memory_mib: 256,
            memory: crate::vmm::MemoryBacking {
                path: "/r/mem".into(),
                shared: channel == ChannelKind::Serial,
            },
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.img".into(),
            cmdline: "console=ttyS0 somna.id=sbx-test".into(),
            disks: vec![
                DiskSpec {
                    path: "/c/root,1.ext4".into(),
                    read_only: true,
                    serial: "somna-root".into(),
                },
                DiskSpec {
                    path: "/r/rw.ext4".into(),
                    read_only: false,
                    serial: "somna-rw".into(),
                },
            ],
            disk_io: Default::default(),
            net: None,
            channel,
            accelerator: accel,
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn network_device_uses_the_inherited_tap() {
        let dir = VmDir::open("/run/somna/vms/sbx-test".into());
        let vmm = QemuVmm::new("qemu-system-x86_64".into(), ChannelKind::Serial);
        let mut s = spec(ChannelKind::Serial, Accelerator::Tcg);
        assert!(!joined(&vmm.args(&s, &dir, false)).contains("-netdev"));
        s.net = Some(crate::vmm::NetSpec {
            tap: "somna-tap".into(),
            netns: Some("/run/netns/somna-s1".into()),
            mac: "02:73:6d:00:00:02".into(),
        });
        let args = joined(&vmm.args(&s, &dir, true));
        assert!(
            args.contains("-netdev tap,id=net0,fd=3,vhost=off"),
            "{args}"
        );
        assert!(
            args.contains("-device virtio-net-device,netdev=net0,mac=02:73:6d:00:00:02"),
            "{args}"
        );
    }

    #[test]
    fn every_disk_joins_the_vms_throttle_group() {
        let dir = VmDir::open("/run/somna/vms/sbx-test".into());
        let vmm = QemuVmm::new("qemu-system-x86_64".into(), ChannelKind::Serial);
        let mut s = spec(ChannelKind::Serial, Accelerator::Tcg);
        assert!(!joined(&vmm.args(&s, &dir, false)).contains("throttling"));
        s.disk_io = DiskIoLimit {
            bytes_per_sec: Some(1 << 20),
            ops_per_sec: Some(100),
        };
        let args = joined(&vmm.args(&s, &dir, false));
        let throttle = ",throttling.bps-read=1048576,throttling.bps-write=1048576,throttling.iops-read=100,throttling.iops-write=100,throttling.group=io";
        assert_eq!(args.matches(throttle).count(), s.disks.len(), "{args}");
        s.disk_io.ops_per_sec = None;
        let args = joined(&vmm.args(&s, &dir, false));
        assert!(!args.contains("iops"), "{args}");
        assert!(
            args.contains("bps-write=1048576,throttling.group=io"),
            "{args}"
        );
    }

    /// The driver hands the TAP, opened inside its network namespace, to
    /// the VMM as fd 3. A stand-in VMM (a shell script) reports what its fd
    /// 3 is; the TAP has carrier exactly while the VMM holds it.
    #[tokio::test]
    async fn the_vmm_inherits_the_tap_from_its_namespace() {
        use std::process::Command;
        use std::time::Instant;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates a network namespace: run it as root"
        );
        struct Netns(&'static str);
        impl Drop for Netns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", self.0]).status();
            }
        }
        let ns = "somnaqtap";
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().unwrap().success();
            assert!(ok, "ip {args:?}");
        };
        drop(Netns(ns)); // a leftover of an earlier, killed run
        ip(&["netns", "add", ns]);
        let _netns = Netns(ns);
        ip(&["-n", ns, "tuntap", "add", "dev", "somna-tap", "mode", "tap"]);
        ip(&["-n", ns, "link", "set", "somna-tap", "up"]);
        let carrier = || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "cat",
                    "/sys/class/net/somna-tap/carrier",
                ])
                .output()
                .unwrap()
                .stdout
                == b"1\n"
        };
        async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert!(!carrier(), "nothing holds the TAP yet");

        let tmp = tempfile::tempdir().unwrap();
        let report = tmp.path().join("fd3");
        let fake = tmp.path().join("fake-qemu");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nreadlink /proc/self/fd/3 > {0}.tmp && mv {0}.tmp {0}\nexec sleep 60\n",
                report.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = VmDir::create(tmp.path(), "sbx-tap").unwrap();
        let vmm = QemuVmm::new(fake, ChannelKind::Serial);
        let mut s = spec(ChannelKind::Serial, Accelerator::Tcg);
        s.net = Some(crate::vmm::NetSpec {
            tap: "somna-tap".into(),
            netns: Some(format!("/run/netns/{ns}").into()),
            mac: "02:73:6d:00:00:02".into(),
        });
        let vm = vmm.launch(&s, &dir, None).await.unwrap();
        wait_for("the stand-in VMM's report", || report.exists()).await;
        assert_eq!(
            std::fs::read_to_string(&report).unwrap().trim(),
            "/dev/net/tun"
        );
        assert!(carrier(), "the VMM holds the TAP");
        vm.kill().await;
        wait_for("the TAP to lose carrier", || !carrier()).await;
    }

    #[test]
    fn serial_channel_command_line() {
        let dir = VmDir::open("/run/somna/vms/sbx-test".into());
        let vmm = QemuVmm::new("qemu-system-x86_64".into(), ChannelKind::Serial);
        let args = joined(&vmm.args(&spec(ChannelKind::Serial, Accelerator::Tcg), &dir, false));
        assert!(
            args.contains("-machine microvm,memory-backend=mem"),
            "{args}"
        );
        assert!(
            args.contains("memory-backend-file,id=mem,size=256M,mem-path=/r/mem,share=on"),
            "{args}"
        );
        assert!(!args.contains("-incoming"), "{args}");
        assert!(
            args.contains("-accel tcg,thread=multi,tb-size=256 -cpu max"),
            "{args}"
        );
        assert!(
            args.contains("file=/c/root,,1.ext4,format=raw,if=none,readonly=on"),
            "{args}"
        );
        assert!(
            args.contains("virtio-blk-device,drive=disk0,serial=somna-root"),
            "{args}"
        );
        assert!(args.contains("readonly=off"), "{args}");
        assert!(
            args.contains("path=/run/somna/vms/sbx-test/agent.sock,server=on,wait=off"),
            "{args}"
        );
        assert!(
            args.contains("virtserialport,chardev=agent,name=somna.agent"),
            "{args}"
        );
        assert!(!args.contains("vsock"), "{args}");
        assert!(
            args.contains("file,id=console,path=/run/somna/vms/sbx-test/console.log,append=on"),
            "{args}"
        );
    }

    #[test]
    fn vsock_channel_and_kvm_command_line() {
        let dir = VmDir::open("/run/somna/vms/sbx-test".into());
        let vmm = QemuVmm::new("qemu-system-x86_64".into(), ChannelKind::Vsock);
        let args = joined(&vmm.args(&spec(ChannelKind::Vsock, Accelerator::Kvm), &dir, true));
        assert!(args.contains("share=off"), "{args}");
        assert!(args.ends_with("-incoming defer"), "{args}");
        assert!(args.contains("-accel kvm -cpu host"), "{args}");
        let cid = QemuVmm::vsock_cid("sbx-test");
        assert!(cid >= 3);
        assert!(
            args.contains(&format!("vhost-vsock-device,guest-cid={cid}")),
            "{args}"
        );
        assert!(!args.contains("virtserialport"), "{args}");
    }
}
