//! The guest agent's clean shutdown as PID 1 in a real microVM: it ends the
//! guest's processes, syncs and powers the VM off, so the VMM exits by
//! itself (status 0) and the agent reclaims what the VM held, keeping the
//! sandbox's disk for a wake to boot again.

use std::time::Duration;

use somna_hypervisor_agent::{AccelMode, Agent, AgentConfig, SandboxRequest, SandboxState};
use somna_proto::guest::v1::ShutdownRequest;
use somna_testkit::{Artifacts, wait_until};

#[tokio::test(flavor = "multi_thread")]
async fn guest_shutdown_powers_the_vm_off() {
    let artifacts = Artifacts::from_env();
    let data = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::with_defaults();
    config.data_dir = data.path().to_path_buf();
    config.guest_dir = artifacts.guest_dir.clone();
    config.image_dirs = vec![artifacts.image_dir.clone()];
    config.accel = AccelMode::Tcg;
    // No background template build: it would outlive the test's agent.
    config.templates = false;
    let agent = Agent::start(config).await.unwrap();

    let info = agent
        .create_sandbox(SandboxRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut guest = agent.files(&info.id).await.unwrap();
    guest.shutdown(ShutdownRequest {}).await.unwrap();

    let run_dir = info.run_dir.clone();
    let mem = run_dir.join("mem");
    let agent2 = agent.clone();
    let id = info.id.clone();
    let failed = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), || {
            agent2
                .get(&id)
                .is_ok_and(|i| i.state == SandboxState::Failed)
                && !mem.exists()
        })
    })
    .await
    .unwrap();
    assert!(failed, "the VM did not power off after Shutdown");
    let failure = agent.get(&info.id).unwrap().failure.unwrap_or_default();
    assert!(
        failure.contains("exited with status 0"),
        "the VMM exits by itself: {failure}"
    );
    assert!(
        failure.contains("Power down"),
        "the guest powered off cleanly: {failure}"
    );
    assert!(run_dir.join("rw.ext4").exists(), "its disk is kept");
    agent.destroy(&info.id).await.unwrap();
    assert!(agent.list().is_empty());
    assert!(!run_dir.exists());
}
