//! Crash recovery of Cloud Hypervisor VMs: a restarted agent takes over a
//! VMM that the previous agent left running (through its API socket and a
//! pidfd), puts its VM to sleep exactly as a sleep would (pause, snapshot
//! with RAM, stop, seal), and the sandbox comes back asleep. Also when the
//! agent died in the middle of a sleep, with the VM already paused and
//! saved.

use std::time::Duration;

use somna_hypervisor_agent::record::{RecordedMemory, SandboxRecord};
use somna_hypervisor_agent::recovery;
use somna_hypervisor_agent::rundir::VmDir;
use somna_hypervisor_agent::vmm::Vmm;
use somna_hypervisor_agent::vmm::cloud_hypervisor::{ChOptions, CloudHypervisorVmm};
use somna_snapshotter::{MemoryLayout, Snapshot};

use super::fake::{Behaviour, FakeCh, reaped};
use super::spec;

fn record(id: &str) -> SandboxRecord {
    SandboxRecord {
        version: 1,
        id: id.into(),
        vmm: "cloud-hypervisor".into(),
        image: "busybox".into(),
        image_digest: "sha256:00".into(),
        cpus: 2,
        memory_mib: 64,
        disk_mib: 64,
        env: Default::default(),
        created_unix_ms: 1,
        boot_ms: 1,
        start_mode: "auto".into(),
        idle_timeout_ms: None,
        sleep_count: 0,
        wake_count: 0,
        state: "running".into(),
        failure: None,
        memory: RecordedMemory::Own,
        root_disk: "root-disk-id".into(),
        network: Default::default(),
    }
}

#[tokio::test]
async fn a_running_vm_left_by_a_dead_agent_is_put_to_sleep() {
    let fake = FakeCh::start(Behaviour::default());
    let vmm = CloudHypervisorVmm::start(&fake.binary, ChOptions::default())
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut pids = Vec::new();
    for (id, saved_before_the_crash) in [("sbx-running", false), ("sbx-saving", true)] {
        let dir = VmDir::create(root.path(), id).unwrap();
        std::fs::write(dir.rw_disk(), vec![1u8; 4096]).unwrap();
        let vm = vmm.launch(&spec(id, &dir, None), &dir, None).await.unwrap();
        record(id).save(&dir).unwrap();
        if saved_before_the_crash {
            // The agent died at `sleep.state_saved`: paused, saved, not
            // stopped, not sealed.
            vm.pause().await.unwrap();
            vm.save_state(&dir.state_file(), false).await.unwrap();
        }
        pids.push((id, vm.pid(), saved_before_the_crash));
        // The agent dies: its handle goes, the VMM runs on.
        drop(vm);
    }

    let recovered = recovery::recover(root.path()).await;
    assert_eq!(recovered.report.rescued, 2, "{:?}", recovered.report);
    assert_eq!(recovered.report.killed, 0);
    assert_eq!(recovered.kept.len(), 2);
    for (id, pid, saved_before_the_crash) in pids {
        let (dir, r) = recovered
            .kept
            .iter()
            .find(|(_, r)| r.id == id)
            .unwrap_or_else(|| panic!("{id} was not taken back"));
        assert_eq!((r.state.as_str(), r.sleep_count), ("sleeping", 1), "{id}");
        assert_eq!(SandboxRecord::load(dir).unwrap().state, "sleeping");
        let snapshot = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snapshot.meta().memory, MemoryLayout::Stream, "{id}");
        for f in ["config.json", "state.json", "memory-ranges"] {
            assert!(dir.state_file().join(f).is_file(), "{id}: {f}");
        }
        assert!(
            !dir.path().join("snapshot.out").exists(),
            "{id}: the VMM's output was moved into the state"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !reaped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{id}: VMM {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls: Vec<String> = fake
            .calls()
            .into_iter()
            .filter(|c| c.pid == pid)
            .skip_while(|c| c.call != "vm.boot")
            .map(|c| format!("{} {} {}", c.method, c.call, c.status))
            .collect();
        let mut expected = vec!["PUT vm.boot 204"];
        if saved_before_the_crash {
            // Paused by the dead agent's sleep: not paused again.
            expected.extend(["PUT vm.pause 204", "PUT vm.snapshot 204"]);
        }
        expected.extend(["GET vmm.ping 200", "GET vm.info 200"]);
        if !saved_before_the_crash {
            expected.push("PUT vm.pause 204");
        }
        expected.extend([
            "PUT vm.snapshot 204",
            "PUT vm.shutdown 204",
            "PUT vmm.shutdown 204",
        ]);
        assert_eq!(calls, expected, "{id}");
    }
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}
