//! Accelerator selection. `/dev/kvm` existing is not enough: under nested,
//! paravirtual KVM (as on Somna's development machines) a stock guest kernel
//! dies in instruction emulation. So `auto` boots a probe guest under KVM and
//! uses KVM only if that guest reports in; otherwise it falls back to TCG.
//! The result is cached per (host kernel, QEMU, guest artifacts).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::GuestArtifacts;
use crate::vmm::Accelerator;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// Probe KVM with a real guest boot; fall back to TCG.
    Auto,
    /// Use KVM, fail if it is not available.
    Kvm,
    /// Use TCG (software emulation).
    Tcg,
}

impl FromStr for AccelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelMode::Auto),
            "kvm" => Ok(AccelMode::Kvm),
            "tcg" => Ok(AccelMode::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator in use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accelerator: Accelerator,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("KVM was requested but is not usable: {0}")]
    KvmUnusable(String),
}

/// The marker the guest agent prints in probe mode (`somna.probe=1`).
pub const PROBE_MARKER: &str = "SOMNA-PROBE-OK";

/// Chooses the accelerator for this host.
pub async fn select(
    mode: AccelMode,
    qemu: &Path,
    guest: &GuestArtifacts,
    cache_file: &Path,
    timeout: Duration,
) -> Result<AccelChoice, AccelError> {
    match mode {
        AccelMode::Tcg => Ok(AccelChoice {
            accelerator: Accelerator::Tcg,
            reason: "forced by configuration".into(),
        }),
        AccelMode::Kvm => match kvm_device_usable() {
            Ok(()) => Ok(AccelChoice {
                accelerator: Accelerator::Kvm,
                reason: "forced by configuration".into(),
            }),
            Err(why) => Err(AccelError::KvmUnusable(why)),
        },
        AccelMode::Auto => {
            if let Err(why) = kvm_device_usable() {
                return Ok(AccelChoice {
                    accelerator: Accelerator::Tcg,
                    reason: format!("KVM unavailable: {why}"),
                });
            }
            let fingerprint = fingerprint(qemu, guest).await;
            if let Some(cached) = read_cache(cache_file, &fingerprint) {
                return Ok(cached);
            }
            let started = Instant::now();
            let choice = match probe_kvm(qemu, guest, timeout).await {
                Ok(()) => AccelChoice {
                    accelerator: Accelerator::Kvm,
                    reason: format!(
                        "probe guest booted under KVM in {} ms",
                        started.elapsed().as_millis()
                    ),
                },
                Err(why) => AccelChoice {
                    accelerator: Accelerator::Tcg,
                    reason: format!("probe guest failed under KVM ({why}); using TCG"),
                },
            };
            write_cache(cache_file, &fingerprint, &choice);
            Ok(choice)
        }
    }
}

/// Extra guest kernel parameters the accelerator needs.
///
/// Under TCG the guest reads the host's TSC, but calibrating it against the
/// emulated PIT fails now and then on a busy host, and a guest without a TSC
/// frequency hangs in early boot (microvm has no HPET or PM timer to fall
/// back on). So TCG guests are told the host's TSC frequency, and that the
/// TSC is reliable (the jiffies watchdog would otherwise demote it).
pub fn guest_kernel_args(accelerator: Accelerator) -> String {
    match (accelerator, host_tsc_khz()) {
        (Accelerator::Tcg, Some(khz)) => format!("tsc_early_khz={khz} tsc=reliable"),
        _ => String::new(),
    }
}

/// The host's TSC frequency, measured against CLOCK_MONOTONIC_RAW over
/// 20 ms (error well under 0.1%).
#[cfg(target_arch = "x86_64")]
pub fn host_tsc_khz() -> Option<u64> {
    use nix::time::{ClockId, clock_gettime};
    let now = || {
        clock_gettime(ClockId::CLOCK_MONOTONIC_RAW)
            .ok()
            .map(Duration::from)
    };
    let t0 = now()?;
    // SAFETY: rdtsc has no preconditions on x86_64.
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    let mut t1 = t0;
    while t1 - t0 < Duration::from_millis(20) {
        t1 = now()?;
    }
    // SAFETY: as above.
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    let ns = (t1 - t0).as_nanos() as f64;
    let khz = ((c1.wrapping_sub(c0)) as f64 / ns * 1e6).round() as u64;
    (khz > 0).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
pub fn host_tsc_khz() -> Option<u64> {
    None
}

fn kvm_device_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Boots the guest kernel + initramfs under KVM in probe mode and waits for
/// the marker on the serial console.
async fn probe_kvm(qemu: &Path, guest: &GuestArtifacts, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-machine", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 pci=off somna.probe=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.contains(PROBE_MARKER) => return Ok(()),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        let mut err = String::new();
        let mut errs = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = errs.next_line().await {
            err = l;
        }
        Err(if err.is_empty() {
            "QEMU exited before the guest reported in".to_string()
        } else {
            err
        })
    })
    .await
    .unwrap_or_else(|_| Err(format!("guest did not report in within {timeout:?}")));
    let _ = child.kill().await;
    outcome
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    fingerprint: String,
    choice: AccelChoice,
}

/// What the probe result depends on.
async fn fingerprint(qemu: &Path, guest: &GuestArtifacts) -> String {
    let host_kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let qemu_version = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let file_id = |p: &PathBuf| {
        std::fs::metadata(p)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("{}:{}:{}", p.display(), m.len(), m.mtime())
            })
            .unwrap_or_default()
    };
    format!(
        "{host_kernel}|{qemu_version}|{}|{}",
        file_id(&guest.kernel),
        file_id(&guest.initramfs)
    )
}

fn read_cache(path: &Path, fingerprint: &str) -> Option<AccelChoice> {
    let entry: CacheEntry = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (entry.fingerprint == fingerprint).then_some(entry.choice)
}

fn write_cache(path: &Path, fingerprint: &str, choice: &AccelChoice) {
    let entry = CacheEntry {
        fingerprint: fingerprint.to_string(),
        choice: choice.clone(),
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&entry) {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "cannot cache the accelerator probe result");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_guests_get_the_host_tsc_frequency() {
        let khz = host_tsc_khz().expect("x86_64 hosts have a TSC");
        assert!((100_000..20_000_000).contains(&khz), "{khz} kHz");
        let args = guest_kernel_args(Accelerator::Tcg);
        assert!(
            args.starts_with("tsc_early_khz=") && args.ends_with("tsc=reliable"),
            "{args}"
        );
        assert_eq!(guest_kernel_args(Accelerator::Kvm), "");
    }

    #[test]
    fn parses_modes() {
        assert_eq!("auto".parse::<AccelMode>().unwrap(), AccelMode::Auto);
        assert_eq!("kvm".parse::<AccelMode>().unwrap(), AccelMode::Kvm);
        assert_eq!("tcg".parse::<AccelMode>().unwrap(), AccelMode::Tcg);
        let err = "xen".parse::<AccelMode>().unwrap_err();
        assert!(
            err.contains("xen") && err.contains("auto, kvm or tcg"),
            "{err}"
        );
    }

    #[test]
    fn cache_round_trip_respects_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accel.json");
        let choice = AccelChoice {
            accelerator: Accelerator::Tcg,
            reason: "probe failed".into(),
        };
        write_cache(&file, "fp-1", &choice);
        assert_eq!(read_cache(&file, "fp-1"), Some(choice));
        assert_eq!(read_cache(&file, "fp-2"), None);
    }

    #[tokio::test]
    async fn forced_tcg_needs_no_probe() {
        let guest = GuestArtifacts {
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs.img".into(),
        };
        let choice = select(
            AccelMode::Tcg,
            Path::new("/nonexistent/qemu"),
            &guest,
            Path::new("/nonexistent/cache.json"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(choice.accelerator, Accelerator::Tcg);
    }
}
