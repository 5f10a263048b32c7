//! Sandbox lifecycle: destroy, crash recovery, failures, timeouts and the
//! accelerator probe, against real microVMs.

use std::time::Duration;

use somna_sdk::proto::SandboxState;
use somna_sdk::{Command, CreateOptions, Error};
use somna_testkit::{Options, Platform, processes_mentioning, wait_until};

fn options() -> Options {
    Options::new(env!("CARGO_BIN_EXE_somna"))
}

/// Mount points under `dir` on the host.
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = dir.to_string_lossy().into_owned();
    mounts
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_leaves_nothing_behind() {
    let platform = Platform::start(options());
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let run_dir = platform.data_dir().join("vms").join(sb.id());
    assert!(run_dir.join("agent.sock").exists() && run_dir.join("qmp.sock").exists());
    let pids = platform.vmm_pids();
    assert_eq!(pids.len(), 1, "one VMM process: {pids:?}");

    let id = sb.id().to_string();
    sb.destroy().await.unwrap();
    assert!(
        !run_dir.exists(),
        "run directory (sockets, disks, logs) removed"
    );
    assert!(platform.vmm_pids().is_empty(), "VMM process gone");
    assert!(mounts_under(platform.data_dir()).is_empty());
    assert!(platform.vm_dirs().is_empty());
    match client.sandbox(&id).await {
        Err(Error::NotFound(m)) => assert!(m.contains(&id)),
        Err(other) => panic!("expected NotFound, got {other:?}"),
        Ok(_) => panic!("destroyed sandbox still listed"),
    }
    assert!(matches!(
        client.destroy_sandbox(&id).await,
        Err(Error::NotFound(_))
    ));
}

/// Whether the control plane reports sandbox `id` in `state` within
/// `secs` seconds.
async fn becomes(client: &somna_sdk::Client, id: &str, state: SandboxState, secs: u64) -> bool {
    somna_testkit::eventually(Duration::from_secs(secs), || async {
        client
            .sandbox(id)
            .await
            .is_ok_and(|s| s.info().state == state as i32)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_after_sigkill_takes_running_sandboxes_back_asleep() {
    let mut platform = Platform::start(options());
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    sb.write_file("/root/kept", b"yes".to_vec()).await.unwrap();
    let pids = platform.vmm_pids();
    assert_eq!(pids.len(), 1);

    platform.kill_hard();
    // The VM survives its agent (it is an orphan now) ...
    assert_eq!(
        platform.vmm_pids(),
        pids,
        "the VMM outlived the killed agent"
    );
    assert_eq!(platform.vm_dirs().len(), 1);

    // ... until the agent starts again, puts it to sleep and takes the
    // sandbox back.
    platform.restart();
    assert!(
        platform.vmm_pids().is_empty(),
        "orphaned VMM not stopped at start-up"
    );
    assert_eq!(platform.vm_dirs().len(), 1, "the sandbox's files are kept");
    let client = platform.client().await;
    assert!(
        becomes(&client, sb.id(), SandboxState::Sleeping, 20).await,
        "the sandbox did not come back asleep"
    );
    let out = client
        .attach(sb.id())
        .exec(Command::from_argv(["cat", "/root/kept"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "yes");
    client.destroy_sandbox(sb.id()).await.unwrap();
    assert!(platform.vm_dirs().is_empty());
    // And the restarted platform works.
    let sb2 = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let out = sb2.exec(Command::new("true")).await.unwrap();
    assert_eq!(out.exit_code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_vmm_fails_the_sandbox_keeps_its_files_and_a_wake_boots_it_again() {
    let platform = Platform::start(options());
    let client = platform.client().await;
    let mut sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    sb.write_file("/root/kept", b"yes".to_vec()).await.unwrap();
    // Written back to the disk now, not only in the guest's page cache.
    sb.exec(Command::new("sync")).await.unwrap();
    let pids = platform.vmm_pids();
    assert_eq!(pids.len(), 1);
    // SAFETY: kill(2) on the VMM this test's platform started.
    unsafe {
        libc::kill(pids[0] as libc::pid_t, libc::SIGKILL);
    }
    let run_dir = platform.data_dir().join("vms").join(sb.id());
    assert!(
        wait_until(Duration::from_secs(10), || !run_dir.join("mem").exists()),
        "the dead VM's memory file was not reclaimed"
    );
    assert!(run_dir.join("rw.ext4").exists(), "its disk was not kept");
    // The control plane learns it from the host (at the latest with the
    // next heartbeat).
    assert!(
        becomes(&client, sb.id(), SandboxState::Failed, 10).await,
        "the sandbox was not marked failed"
    );
    let info = sb.refresh().await.unwrap().clone();
    assert!(
        info.failure.contains("killed by signal 9") && info.failure.contains("files are kept"),
        "failure: {}",
        info.failure
    );
    match sb.exec(Command::new("true")).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("failed"), "{m}"),
        other => panic!("exec on a failed sandbox: {other:?}"),
    }
    // A wake boots it again on its files.
    let woke = client.wake_sandbox(sb.id()).await.unwrap();
    assert_eq!(woke.state, SandboxState::Running as i32);
    assert!(woke.failure.is_empty(), "{}", woke.failure);
    let out = sb
        .exec(Command::from_argv(["cat", "/root/kept"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "yes");
    assert_eq!(platform.vmm_pids().len(), 1);
    sb.destroy().await.unwrap();
    assert!(!run_dir.exists(), "run directory not removed on destroy");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors() {
    let platform = Platform::start(options());
    let client = platform.client().await;
    match client
        .create_sandbox(CreateOptions::new("no-such-image"))
        .await
    {
        Err(Error::NotFound(m)) => assert!(m.contains("no-such-image"), "{m}"),
        other => panic!("unknown image: {:?}", other.err()),
    }
    match client.create_sandbox(CreateOptions::new("Bad Name!")).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("Bad Name!"), "{m}"),
        other => panic!("invalid reference: {:?}", other.err()),
    }
    match client
        .create_sandbox(CreateOptions::new("busybox").memory_mib(1))
        .await
    {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("memory"), "{m}"),
        other => panic!("too little memory: {:?}", other.err()),
    }
    match client.sandbox("sbx-doesnotexist").await {
        Err(Error::NotFound(m)) => assert!(m.contains("sbx-doesnotexist"), "{m}"),
        other => panic!("unknown sandbox: {:?}", other.err()),
    }
    assert!(
        platform.vm_dirs().is_empty(),
        "failed creates leave nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_does_not_boot_reports_its_console() {
    // A guest directory with the real kernel and an initramfs whose /init
    // cannot run: the kernel panics, and create must say so.
    let artifacts = somna_testkit::Artifacts::from_env();
    let broken = tempfile::tempdir().unwrap();
    std::fs::copy(
        artifacts.guest_dir.join("vmlinux"),
        broken.path().join("vmlinux"),
    )
    .unwrap();
    let stage = tempfile::tempdir().unwrap();
    std::fs::write(stage.path().join("init"), b"not an executable").unwrap();
    let cpio = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && echo init | cpio --quiet -o -H newc > {}/initramfs.img",
            stage.path().display(),
            broken.path().display()
        ))
        .status()
        .unwrap();
    assert!(cpio.success());
    let mut opts = options();
    opts.artifacts.guest_dir = broken.path().to_path_buf();
    opts.extra_args = vec!["--boot-timeout".into(), "60".into()];
    let platform = Platform::start(opts);
    let client = platform.client().await;
    let err = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .err()
        .expect("boot must fail");
    let msg = err.to_string();
    assert!(msg.contains("did not boot"), "{msg}");
    assert!(
        msg.contains("Kernel panic"),
        "the error carries the guest console tail: {msg}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || platform.vm_dirs().is_empty()
            && platform.vmm_pids().is_empty()),
        "a failed boot leaves nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_timeout_destroys_it() {
    let platform = Platform::start(options());
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox").timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(sb.info().expires_at.is_some());
    let run_dir = platform.data_dir().join("vms").join(sb.id());
    assert!(
        wait_until(Duration::from_secs(30), || !run_dir.exists()),
        "the sandbox outlived its timeout"
    );
    assert!(matches!(
        client.sandbox(sb.id()).await,
        Err(Error::NotFound(_))
    ));
    assert!(
        wait_until(Duration::from_secs(10), || platform.vmm_pids().is_empty()),
        "a VMM outlived the timeout: {:?}",
        platform
            .vmm_pids()
            .iter()
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " "))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_accelerator_probes_and_boots() {
    let mut opts = options();
    opts.accel = "auto".into();
    let platform = Platform::start(opts);
    assert!(
        platform.accelerator == "kvm" || platform.accelerator == "tcg",
        "accelerator {:?}",
        platform.accelerator
    );
    assert!(!platform.accelerator_reason.is_empty());
    if platform.accelerator == "tcg" && std::path::Path::new("/dev/kvm").exists() {
        assert!(
            platform.accelerator_reason.contains("probe"),
            "{}",
            platform.accelerator_reason
        );
    }
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    assert_eq!(sb.info().accelerator, platform.accelerator);
    let out = sb.exec(Command::from_argv(["echo", "ok"])).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");
    sb.destroy().await.unwrap();
    assert!(processes_mentioning(&platform.data_dir().join("vms")).is_empty());
}
