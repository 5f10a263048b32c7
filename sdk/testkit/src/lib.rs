//! Throwaway single-node Somna platforms for end-to-end tests and
//! benchmarks: `somna up` as a child process with its own data directory,
//! real microVMs, and a cleanup that leaves no VMM process or file behind —
//! also when the test fails or the platform was killed.

mod cluster;
mod postgres;
mod registry;
mod tmpfs;

pub use cluster::{Cluster, ClusterOptions};
pub use postgres::Postgres;
pub use registry::Registry;
pub use tmpfs::Tmpfs;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guest kernel/initramfs and test images, as built by `scripts/setup.sh`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub guest_dir: PathBuf,
    pub image_dir: PathBuf,
}

impl Artifacts {
    /// `$SOMNA_TEST_GUEST_DIR` and `$SOMNA_TEST_IMAGE_DIR`, else the
    /// workspace's `build/guest` and `build/images`. Panics with what to do
    /// when they are missing: end-to-end tests must fail, not skip.
    pub fn from_env() -> Artifacts {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join(default))
        };
        let a = Artifacts {
            guest_dir: dir("SOMNA_TEST_GUEST_DIR", "build/guest"),
            image_dir: dir("SOMNA_TEST_IMAGE_DIR", "build/images"),
        };
        for needed in [
            a.guest_dir.join("vmlinux"),
            a.guest_dir.join("initramfs.img"),
            a.image_dir.join("busybox/index.json"),
            a.image_dir.join("python/index.json"),
        ] {
            assert!(
                needed.exists(),
                "{} is missing: run `scripts/setup.sh build` (as root) first",
                needed.display()
            );
        }
        a
    }
}

/// How to start a platform.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `somna` binary.
    pub somna: PathBuf,
    pub artifacts: Artifacts,
    /// `--accel`: "tcg" by default so tests do not each pay for a KVM probe.
    pub accel: String,
    /// Build template snapshots (off by default: each create then cold
    /// boots, and no background build competes with the test's VMs).
    pub templates: bool,
    /// Registries reachable over plain HTTP (loopback test registries).
    /// With none, the platform contacts no registry at all; with some,
    /// unqualified names go to a dead loopback address, never off the host.
    pub insecure_registries: Vec<String>,
    /// Extra arguments for `somna up`.
    pub extra_args: Vec<String>,
    /// Extra environment for `somna up` (e.g. `SOMNA_FAULT`).
    pub env: Vec<(String, String)>,
}

impl Options {
    pub fn new(somna: impl Into<PathBuf>) -> Options {
        Options {
            somna: somna.into(),
            artifacts: Artifacts::from_env(),
            accel: "tcg".into(),
            templates: false,
            insecure_registries: Vec::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `somna up`.
pub struct Platform {
    options: Options,
    data_dir: tempfile::TempDir,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub accelerator: String,
    pub accelerator_reason: String,
    /// The key `somna up` made for the default tenant.
    pub api_key: String,
    /// The apps ingress, `http://127.0.0.1:PORT` (apps at NAME.localhost).
    pub ingress: String,
}

impl Platform {
    /// Starts `somna up` on a free loopback port and waits until it serves.
    pub fn start(options: Options) -> Platform {
        let data_dir = tempfile::Builder::new()
            .prefix("somna-test-")
            .tempdir()
            .expect("create a temporary data directory");
        let mut p = Platform {
            options,
            data_dir,
            child: None,
            addr: String::new(),
            accelerator: String::new(),
            accelerator_reason: String::new(),
            api_key: String::new(),
            ingress: String::new(),
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let o = &self.options;
        let mut child = Command::new(&o.somna)
            .arg("--json")
            .arg("up")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--ingress-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--guest-dir")
            .arg(&o.artifacts.guest_dir)
            .arg("--image-dir")
            .arg(&o.artifacts.image_dir)
            .args(["--accel", &o.accel])
            .args(if o.templates {
                &[][..]
            } else {
                &["--no-templates"][..]
            })
            .args(registry_args(&o.insecure_registries))
            .args(&o.extra_args)
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .env(
                "SOMNA_LOG",
                std::env::var("SOMNA_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", o.somna.display()));
        let stdout = child.stdout.take().expect("somna up stdout");
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let status = child.wait().ok();
            panic!("somna up exited before serving ({status:?}); see its log above");
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad `somna up` line {line:?}: {e}"));
        self.addr = v["addr"].as_str().unwrap_or_default().to_string();
        self.accelerator = v["accelerator"].as_str().unwrap_or_default().to_string();
        self.api_key = v["api_key"].as_str().unwrap_or_default().to_string();
        self.ingress = v["ingress"].as_str().unwrap_or_default().to_string();
        self.accelerator_reason = v["accelerator_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.child = Some(child);
    }

    /// A client of this platform.
    pub async fn client(&self) -> somna_sdk::Client {
        somna_sdk::Client::connect_with_key(&self.addr, Some(&self.api_key))
            .await
            .expect("connect to somna up")
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Run directories of VMs that exist on the host.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        entries_of(&self.data_dir().join("vms"))
    }

    /// PIDs of live processes (VMMs) whose command line mentions this
    /// platform's run directories, excluding `somna up` itself.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let vms = self.data_dir().join("vms");
        let own = self.child.as_ref().map(|c| c.id());
        processes_mentioning(&vms)
            .into_iter()
            .filter(|p| Some(*p) != own)
            .collect()
    }

    /// Bytes of `path` resident in the host's page cache.
    pub fn resident_bytes(path: &Path) -> u64 {
        somna_snapshotter::residency::resident_bytes(path).unwrap_or(0)
    }

    /// `somna` CLI command pointed at this platform.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.options.somna);
        c.env("SOMNA_ADDR", &self.addr)
            .env("SOMNA_API_KEY", &self.api_key);
        c
    }

    /// The options the next [`Platform::restart`] uses.
    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.options
    }

    /// Waits up to `timeout` for `somna up` to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL `somna up` (VMs it started keep running, as after a crash).
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `somna up` again on the same data directory.
    pub fn restart(&mut self) {
        self.kill_hard();
        self.launch();
    }

    /// Stops `somna up` gracefully (SIGTERM: it destroys its sandboxes).
    /// Returns true if it exited in time.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop();
        // Safety net for failed tests and hard kills: no VMM may outlive
        // the platform.
        for pid in processes_mentioning(&self.data_dir().join("vms")) {
            // SAFETY: kill(2); the pid's command line names our data dir.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

fn registry_args(insecure: &[String]) -> Vec<String> {
    if insecure.is_empty() {
        return vec!["--no-registries".into()];
    }
    // Port 9 (discard) on loopback: nothing listens, nothing leaves the host.
    let mut args = vec!["--default-registry".to_string(), "127.0.0.1:9".to_string()];
    for r in insecure {
        args.push("--insecure-registry".into());
        args.push(r.clone());
    }
    args
}

/// The entries of directory `dir`, sorted (none if it does not exist).
pub fn entries_of(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

/// Live processes with an argument containing `path`.
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if raw
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
/// For conditions that have no notification to wait on (process exit seen
/// from outside, files appearing).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`] for async conditions.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

static MEASURING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Taken first by a test that measures a neighbour's latency against its
/// idle baseline: no other test of its binary runs VMs meanwhile (they
/// would share the machine's 2 cores in CI). Waits for those running.
pub async fn measuring_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    MEASURING.write().await
}

/// Taken first by every other VM test of a binary that has tests taking
/// [`measuring_alone`]: such tests run beside each other, never beside one
/// that measures.
pub async fn not_while_measuring() -> tokio::sync::RwLockReadGuard<'static, ()> {
    MEASURING.read().await
}

/// Median latency of a trivial exec (`true`) in `sb`, over 9 runs.
pub async fn exec_latency(sb: &somna_sdk::Sandbox) -> Duration {
    let mut v = Vec::new();
    for _ in 0..9 {
        let t = std::time::Instant::now();
        let out = sb
            .exec(somna_sdk::Command::new("true"))
            .await
            .expect("exec in the neighbour");
        assert_eq!(out.exit_code, 0);
        v.push(t.elapsed());
    }
    v.sort();
    v[v.len() / 2]
}

/// The abuse tests' bar for a neighbour: its exec latency during `what`
/// stays within 2x of `idle` (a floor of 20 ms absorbs scheduler noise on
/// an idle exec of a few milliseconds).
pub async fn assert_neighbour_fine(n: &somna_sdk::Sandbox, idle: Duration, what: &str) {
    let busy = exec_latency(n).await;
    eprintln!("neighbour exec p50: idle {idle:?}, during {what} {busy:?}");
    assert!(
        busy <= 2 * idle.max(Duration::from_millis(20)),
        "during {what} the neighbour's exec took {busy:?} (idle {idle:?})"
    );
}
