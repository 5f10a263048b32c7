//! The QMP client against a real QEMU (no guest kernel needed: the machine
//! runs its firmware).

use std::process::{Command, Stdio};
use std::time::Duration;

use somna_hypervisor_agent::vmm::qmp::{Qmp, QmpError};

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn status_stop_cont_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "microvm",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64M",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 is installed (scripts/setup.sh installs it)");
    let mut child = KillOnDrop(child);
    assert!(
        somna_testkit::wait_until(Duration::from_secs(20), || sock.exists()),
        "QEMU did not create its QMP socket"
    );
    let mut qmp = Qmp::connect(&sock).await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), "running");
    qmp.execute("stop", None).await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), "paused");
    qmp.execute("cont", None).await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), "running");
    match qmp.execute("no-such-command", None).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a command error, got {other:?}"),
    }
    let _ = qmp.execute("quit", None).await;
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "QEMU exits cleanly on quit: {status:?}");
}
