//! The Cloud Hypervisor driver end to end with a real `cloud-hypervisor`
//! binary and KVM: boot, exec, sleep, wake, destroy. It runs only where
//! both are there (`SOMNA_CLOUD_HYPERVISOR` or `cloud-hypervisor` on PATH,
//! v52.0 or newer, and a /dev/kvm this process can open); otherwise it
//! says exactly why it is skipped. The driver's API use is covered
//! everywhere by the contract tests (hypervisor-agent/tests/ch_contract).

use std::path::PathBuf;

use somna_hypervisor_agent::vmm::cloud_hypervisor::{MIN_VERSION, probe_binary};
use somna_sdk::proto::{SandboxState, StartMode};
use somna_sdk::{Command, CreateOptions, Sandbox};
use somna_testkit::{Options, Platform, processes_mentioning};

/// The binary and KVM, or why the test cannot run here.
async fn cloud_hypervisor_and_kvm() -> Result<PathBuf, String> {
    let binary = match std::env::var_os("SOMNA_CLOUD_HYPERVISOR") {
        Some(p) => PathBuf::from(p),
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| d.join("cloud-hypervisor"))
                .find(|p| p.is_file())
                .ok_or(
                    "no cloud-hypervisor binary: SOMNA_CLOUD_HYPERVISOR is not set and there is no cloud-hypervisor on PATH",
                )?
        }
    };
    let version = probe_binary(&binary)
        .await
        .map_err(|e| format!("the cloud-hypervisor binary cannot be used: {e}"))?;
    if !version.is_supported() {
        return Err(format!(
            "{} is version {version}, the driver needs v{MIN_VERSION} or newer",
            binary.display()
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("KVM is not usable: cannot open /dev/kvm read-write: {e}"))?;
    Ok(binary)
}

async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .exec(Command::from_argv(["sh", "-c", script]))
        .await
        .unwrap();
    assert_eq!(
        out.exit_code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn boot_exec_sleep_wake_destroy_on_cloud_hypervisor() {
    let binary = match cloud_hypervisor_and_kvm().await {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED boot_exec_sleep_wake_destroy_on_cloud_hypervisor: {why}");
            return;
        }
    };
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    // Cloud Hypervisor has no TCG: auto boots a probe guest under KVM.
    o.accel = "auto".into();
    o.extra_args = vec!["--cloud-hypervisor".into(), binary.display().to_string()];
    let p = Platform::start(o);
    assert_eq!(p.accelerator, "kvm", "{}", p.accelerator_reason);
    let client = p.client().await;

    let sb = client
        .create_sandbox(CreateOptions::new("busybox").start_mode(StartMode::ColdBoot))
        .await
        .unwrap();
    let run_dir = p.data_dir().join("vms").join(sb.id());
    assert!(
        run_dir.join("api.sock").exists(),
        "the run directory is Cloud Hypervisor's"
    );
    assert_eq!(
        sh(&sb, "echo hello from $(uname -s)").await,
        "hello from Linux"
    );
    sh(&sb, "echo kept > /root/kept.txt").await;
    // A shell variable lives only in guest RAM: the process that holds it
    // must come back from the snapshot.
    let pid = sh(&sb, "(v=$(head -c 16 /dev/urandom | md5sum); while true; do echo $v > /tmp/v; sleep 0.2; done) >/dev/null 2>&1 & echo $!").await;

    let slept = client.sleep_sandbox(sb.id()).await.unwrap();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    assert!(
        processes_mentioning(&run_dir).is_empty(),
        "no VMM while asleep"
    );
    assert!(
        run_dir.join("state/memory-ranges").exists(),
        "RAM is in the snapshot directory"
    );

    let woke = client.wake_sandbox(sb.id()).await.unwrap();
    assert_eq!(woke.state, SandboxState::Running as i32);
    // The process from before sleep still runs, and files survived.
    assert_eq!(
        sh(&sb, &format!("kill -0 {pid} && echo alive")).await,
        "alive"
    );
    assert_eq!(sh(&sb, "cat /root/kept.txt").await, "kept");

    client.destroy_sandbox(sb.id()).await.unwrap();
    assert!(!run_dir.exists(), "destroy removes the run directory");
}
