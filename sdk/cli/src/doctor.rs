//! `somna doctor`: checks that this host can run Somna, and says how to fix
//! each problem. Exits non-zero when any check fails.
//!
//! It contacts nothing beyond this host by default: registries only when
//! named with `--registry`, and the API only at a loopback address (or with
//! `--check-api`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use somna_hypervisor_agent::accel::{self, AccelMode};
use somna_hypervisor_agent::{Accelerator, GuestArtifacts};

#[derive(Args)]
pub struct DoctorArgs {
    /// The state directory `somna up` uses (checked for free space).
    #[arg(long, env = "SOMNA_DATA_DIR", default_value = "/var/lib/somna")]
    data_dir: PathBuf,
    /// Directory with the guest kernel (vmlinux) and initramfs.img.
    #[arg(
        long,
        env = "SOMNA_GUEST_DIR",
        default_value = "/usr/local/lib/somna/guest"
    )]
    guest_dir: PathBuf,
    /// The QEMU binary.
    #[arg(long, env = "SOMNA_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// A Cloud Hypervisor binary to check (`--version`).
    #[arg(long, value_name = "PATH")]
    cloud_hypervisor: Option<PathBuf>,
    /// A registry to check for reachability (`host[:port]` for HTTPS,
    /// `http://host:port` for plain HTTP); repeatable. None by default.
    #[arg(long = "registry", value_name = "REGISTRY")]
    registries: Vec<String>,
    /// Skip booting a probe guest under KVM (only check /dev/kvm).
    #[arg(long)]
    no_kvm_probe: bool,
    /// Also check the API at --addr when it is not a loopback address.
    #[arg(long)]
    check_api: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Debug)]
struct Check {
    name: &'static str,
    status: Status,
    summary: String,
    /// How to fix it (warn and fail).
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, summary: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            summary: summary.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "status": self.status.as_str(),
            "summary": self.summary,
            "fix": self.fix,
        })
    }
}

pub async fn run(args: DoctorArgs, addr: &str, json_out: bool) -> anyhow::Result<i32> {
    let guest = GuestArtifacts::in_dir(&args.guest_dir);
    let mut checks = vec![
        check_qemu(&args.qemu).await,
        check_kvm(&args, guest.as_ref().ok()).await,
        check_guest(&args.guest_dir, &guest),
        check_vsock(),
        check_btf(),
        check_bpf(),
        check_cgroups(),
        check_disk(&args.data_dir),
    ];
    match args.cloud_hypervisor.clone().or_else(|| in_path("cloud-hypervisor")) {
        Some(ch) => checks.push(check_cloud_hypervisor(&ch).await),
        None => checks.push(Check::ok(
            "cloud-hypervisor",
            "not installed (optional: sandboxes run on QEMU; pass --cloud-hypervisor PATH to check a binary)",
        )),
    }
    for r in &args.registries {
        checks.push(check_registry(r).await);
    }
    if let Some(c) = check_api(addr, args.check_api).await {
        checks.push(c);
    }
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok);
    if json_out {
        println!(
            "{}",
            json!({
                "ok": worst != Status::Fail,
                "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
            })
        );
    } else {
        for c in &checks {
            println!("{:<5} {:<17} {}", c.status.as_str(), c.name, c.summary);
            if let Some(fix) = &c.fix {
                println!("{:<5} {:<17} fix: {fix}", "", "");
            }
        }
        let n = |s| checks.iter().filter(|c| c.status == s).count();
        println!(
            "\n{} ok, {} warnings, {} failed",
            n(Status::Ok),
            n(Status::Warn),
            n(Status::Fail)
        );
    }
    Ok(if worst == Status::Fail { 1 } else { 0 })
}

/// `name` found in `$PATH`.
fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// First line of `bin --version`, or why it did not run.
async fn version_of(bin: &Path) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(bin)
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "did not answer --version within 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "--version exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

async fn check_qemu(qemu: &Path) -> Check {
    const NAME: &str = "qemu";
    let version = match version_of(qemu).await {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{} cannot run: {e}", qemu.display()),
                "apt-get install qemu-system-x86 (or pass --qemu / set SOMNA_QEMU to the binary)",
            );
        }
    };
    // Sandboxes use the microvm machine type.
    let machines = tokio::process::Command::new(qemu)
        .args(["-machine", "help"])
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !machines.lines().any(|l| l.starts_with("microvm")) {
        return Check::fail(
            NAME,
            format!("{version}: has no `microvm` machine type"),
            "install Debian's qemu-system-x86 (QEMU 7.2 or newer, built with microvm)",
        );
    }
    Check::ok(NAME, format!("{version} (microvm machine available)"))
}

async fn check_kvm(args: &DoctorArgs, guest: Option<&GuestArtifacts>) -> Check {
    const NAME: &str = "kvm";
    const TCG_FIX: &str = "sandboxes still run under TCG (software emulation, 10-50x slower). For KVM: run on bare metal or a VM with nested virtualization, enable VT-x/AMD-V in the firmware, `modprobe kvm_intel` (or kvm_amd), and make /dev/kvm read-write for the user running somna";
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Check::warn(
            NAME,
            format!("KVM unavailable (/dev/kvm: {e}): Somna falls back to TCG"),
            TCG_FIX,
        );
    }
    if args.no_kvm_probe {
        return Check::ok(
            NAME,
            "/dev/kvm opens read-write (probe boot skipped: --no-kvm-probe)",
        );
    }
    let Some(guest) = guest else {
        return Check::warn(
            NAME,
            "/dev/kvm opens, but no guest kernel to probe with (see the guest check)",
            "install the guest artifacts, then run somna doctor again",
        );
    };
    // The same probe `somna up --accel auto` runs: boot a guest under KVM.
    let cache = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("cannot create a temporary directory for the probe: {e}"),
                "check that /tmp is writable",
            );
        }
    };
    let started = Instant::now();
    let choice = accel::select(
        AccelMode::Auto,
        &args.qemu,
        guest,
        &cache.path().join("accel-probe.json"),
        Duration::from_secs(10),
    )
    .await;
    match choice {
        Ok(c) if c.accelerator == Accelerator::Kvm => Check::ok(
            NAME,
            format!(
                "KVM usable: {} ({} ms)",
                c.reason,
                started.elapsed().as_millis()
            ),
        ),
        Ok(c) => Check::warn(
            NAME,
            format!(
                "KVM present but not usable, Somna falls back to TCG: {}",
                c.reason
            ),
            TCG_FIX,
        ),
        Err(e) => Check::warn(NAME, e.to_string(), TCG_FIX),
    }
}

fn check_guest(dir: &Path, guest: &Result<GuestArtifacts, String>) -> Check {
    const NAME: &str = "guest-artifacts";
    let fix = format!(
        "run scripts/setup.sh up (installs them in /usr/local/lib/somna/guest), or pass --guest-dir (scripts/setup.sh build puts them in build/guest); now: {}",
        dir.display()
    );
    let g = match guest {
        Ok(g) => g,
        Err(e) => return Check::fail(NAME, e.clone(), fix),
    };
    let mut magic = [0u8; 4];
    let is_elf = std::fs::File::open(&g.kernel)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| magic == *b"\x7fELF")
        .unwrap_or(false);
    if !is_elf {
        return Check::fail(
            NAME,
            format!(
                "{} is not an ELF vmlinux (QEMU microvm boots the ELF image via PVH)",
                g.kernel.display()
            ),
            fix,
        );
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Check::ok(
        NAME,
        format!(
            "{} ({} MiB) and {} ({} MiB)",
            g.kernel.display(),
            size(&g.kernel) / (1 << 20),
            g.initramfs.display(),
            size(&g.initramfs) / (1 << 20)
        ),
    )
}

fn check_vsock() -> Check {
    const NAME: &str = "vhost-vsock";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
    {
        Ok(_) => Check::ok(NAME, "/dev/vhost-vsock usable: guests get a vsock channel"),
        Err(e) => Check::warn(
            NAME,
            format!("/dev/vhost-vsock: {e}; guests use a virtio-serial channel instead (works)"),
            "modprobe vhost_vsock (a kernel with CONFIG_VHOST_VSOCK) for the vsock channel",
        ),
    }
}

fn check_btf() -> Check {
    const NAME: &str = "btf";
    match std::fs::metadata("/sys/kernel/btf/vmlinux") {
        Ok(m) => Check::ok(
            NAME,
            format!("/sys/kernel/btf/vmlinux present ({} KiB)", m.len() / 1024),
        ),
        Err(e) => Check::warn(
            NAME,
            format!("/sys/kernel/btf/vmlinux: {e}; sandbox networking (eBPF) needs kernel BTF"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels are)",
        ),
    }
}

/// Whether the bpf() syscall is permitted: creates (and closes) a one-entry
/// array map.
fn check_bpf() -> Check {
    const NAME: &str = "bpf";
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries, then fields left zero.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE = 0) reads `size` bytes of `attr`, which
    // we own; the returned fd is closed right away.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: fd is ours and open.
        unsafe { libc::close(fd as i32) };
        return Check::ok(NAME, "bpf() permitted (created a test map)");
    }
    let err = std::io::Error::last_os_error();
    Check::warn(
        NAME,
        format!("bpf() failed: {err}; sandbox networking (eBPF) cannot load its programs"),
        "run somna as root (or with CAP_BPF and CAP_NET_ADMIN); check kernel.unprivileged_bpf_disabled and that the kernel has CONFIG_BPF_SYSCALL",
    )
}

fn check_cgroups() -> Check {
    const NAME: &str = "cgroups";
    let root = Path::new("/sys/fs/cgroup");
    let controllers = |p: &Path| {
        std::fs::read_to_string(p.join("cgroup.controllers"))
            .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    };
    if let Ok(c) = controllers(root) {
        return Check::ok(
            NAME,
            format!("cgroup v2 (unified), controllers: {}", c.join(" ")),
        );
    }
    let v1: Vec<String> = [
        "cpu", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
    ]
    .iter()
    .filter(|c| root.join(c).is_dir())
    .map(|c| c.to_string())
    .collect();
    let unified = root.join("unified");
    match (v1.is_empty(), controllers(&unified)) {
        (false, Ok(c)) => Check::ok(
            NAME,
            format!(
                "hybrid: v1 controllers {} and v2 at {} (controllers: {})",
                v1.join(" "),
                unified.display(),
                if c.is_empty() {
                    "none".to_string()
                } else {
                    c.join(" ")
                }
            ),
        ),
        (false, Err(_)) => Check::ok(NAME, format!("cgroup v1, controllers: {}", v1.join(" "))),
        (true, _) => Check::fail(
            NAME,
            "no cgroup filesystem found under /sys/fs/cgroup",
            "mount cgroup2 at /sys/fs/cgroup (systemd does this at boot)",
        ),
    }
}

fn check_disk(data_dir: &Path) -> Check {
    const NAME: &str = "disk";
    // The data directory, or its closest existing ancestor.
    let mut dir = data_dir;
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
    let stat = match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot stat the filesystem of {}: {e}", data_dir.display()),
                "create the data directory or pass --data-dir",
            );
        }
    };
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let gib = free as f64 / (1u64 << 30) as f64;
    let summary = format!(
        "{:.1} GiB free for {}{}",
        gib,
        data_dir.display(),
        if dir != data_dir {
            format!(" (on {}; it does not exist yet)", dir.display())
        } else {
            String::new()
        }
    );
    let fix = "free space there, or point somna up --data-dir at a larger filesystem (images, writable disks and snapshots live there)";
    if gib < 2.0 {
        Check::fail(NAME, summary, fix)
    } else if gib < 10.0 {
        Check::warn(NAME, summary, fix)
    } else {
        Check::ok(NAME, summary)
    }
}

/// The Cloud Hypervisor binary and its version, read the way the agent's
/// driver reads it (`vmm.ping` on a scratch instance).
async fn check_cloud_hypervisor(bin: &Path) -> Check {
    use somna_hypervisor_agent::vmm::cloud_hypervisor::{MIN_VERSION, probe_binary};
    const NAME: &str = "cloud-hypervisor";
    match probe_binary(bin).await {
        Ok(v) if v.is_supported() => Check::ok(NAME, format!("{}: {v}", bin.display())),
        Ok(v) => Check::fail(
            NAME,
            format!("{}: {v} is older than v{MIN_VERSION}", bin.display()),
            format!("install Cloud Hypervisor v{MIN_VERSION} or newer"),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{} cannot run: {e}", bin.display()),
            "pass the path of a Cloud Hypervisor binary built for this host",
        ),
    }
}

/// `host[:port]` (HTTPS) or `http://host:port`: connects, and over plain
/// HTTP asks `/v2/` (200 or 401 means a registry answers).
async fn check_registry(spec: &str) -> Check {
    const NAME: &str = "registry";
    let spec = spec.to_string();
    tokio::task::spawn_blocking(move || registry_blocking(&spec))
        .await
        .unwrap_or_else(|e| Check::fail(NAME, format!("registry check crashed: {e}"), ""))
}

fn registry_blocking(spec: &str) -> Check {
    const NAME: &str = "registry";
    let (plain, hostport) = match spec.strip_prefix("http://") {
        Some(rest) => (true, rest),
        None => (false, spec.strip_prefix("https://").unwrap_or(spec)),
    };
    let hostport = hostport.trim_end_matches('/');
    let with_port = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if plain { 80 } else { 443 })
    };
    let fix = format!(
        "check the address, that the registry runs, and firewalls/proxies between here and {hostport}"
    );
    let addrs: Vec<_> = match with_port.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Check::fail(NAME, format!("{spec}: cannot resolve: {e}"), fix),
    };
    let Some(sock) = addrs.first() else {
        return Check::fail(NAME, format!("{spec}: no address"), fix);
    };
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(sock, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return Check::fail(NAME, format!("{spec}: cannot connect to {sock}: {e}"), fix),
    };
    if !plain {
        return Check::ok(
            NAME,
            format!(
                "{spec}: TCP connect to {sock} in {} ms (TLS not checked)",
                started.elapsed().as_millis()
            ),
        );
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET /v2/ HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()) {
        return Check::fail(NAME, format!("{spec}: {e}"), fix);
    }
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).unwrap_or(0);
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    match status {
        "200" | "401" => Check::ok(
            NAME,
            format!(
                "{spec}: registry API answers (HTTP {status}) in {} ms",
                started.elapsed().as_millis()
            ),
        ),
        "" => Check::fail(NAME, format!("{spec}: no HTTP answer"), fix),
        s => Check::fail(
            NAME,
            format!("{spec}: GET /v2/ answered HTTP {s}: not a registry API"),
            fix,
        ),
    }
}

/// The API at `addr`, when it is on loopback (or `force`).
async fn check_api(addr: &str, force: bool) -> Option<Check> {
    const NAME: &str = "api";
    let host = addr
        .split("://")
        .last()
        .unwrap_or(addr)
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !force {
        return None;
    }
    let client = match tokio::time::timeout(
        Duration::from_secs(5),
        somna_sdk::Client::connect(addr),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Some(Check::warn(
                NAME,
                format!("no Somna API at {addr}: {e}"),
                "start it with `somna up` (or set SOMNA_ADDR to where it runs)",
            ));
        }
        Err(_) => {
            return Some(Check::warn(
                NAME,
                format!("no answer from {addr} within 5 s"),
                "start it with `somna up` (or set SOMNA_ADDR to where it runs)",
            ));
        }
    };
    Some(match client.list_hosts().await {
        Ok(hosts) => Check::ok(
            NAME,
            format!(
                "Somna API at {addr}: {} host(s){}",
                hosts.len(),
                hosts
                    .first()
                    .map(|h| format!(", accelerator {} ({})", h.accelerator, h.vmm))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => Check::warn(
            NAME,
            format!("the API at {addr} answered with an error: {e}"),
            "check SOMNA_API_KEY and the server's log",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_guest_dir_fails_with_a_fix() {
        let dir = Path::new("/nonexistent/somna-guest");
        let c = check_guest(dir, &GuestArtifacts::in_dir(dir));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("setup.sh"));
    }

    #[test]
    fn disk_check_walks_up_to_an_existing_directory() {
        let c = check_disk(Path::new("/tmp/somna-doctor-does-not-exist/data"));
        assert_ne!(c.status, Status::Fail, "{c:?}");
        assert!(c.summary.contains("does not exist yet"), "{c:?}");
    }

    #[test]
    fn registry_check_reports_a_dead_port() {
        // Port 9 (discard) on loopback: nothing listens.
        let c = registry_blocking("http://127.0.0.1:9");
        assert_eq!(c.status, Status::Fail);
        assert!(c.summary.contains("cannot connect"), "{c:?}");
    }
}
