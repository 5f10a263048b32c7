//! Contract tests of the Cloud Hypervisor driver against the API spec in
//! `spec/cloud-hypervisor-openapi.yaml`: an in-process server
//! implementing the subset the driver uses validates every request body
//! against the spec's schemas (read from the YAML at test time) while the
//! driver goes through create/boot/pause/snapshot/restore/shutdown, VFIO
//! hot-plug, and error answers. No KVM or real VMM is needed; root is (the
//! driver opens each VM's TAP in a network namespace the test creates, and
//! the server checks which TAP it was given).

mod fake;
mod jailed;
mod netns;
mod recovery;
mod spec;

use std::path::Path;
use std::time::Duration;

use fake::{Behaviour, FakeCh, reaped};
use netns::TestNetns;
use somna_hypervisor_agent::rundir::VmDir;
use somna_hypervisor_agent::vmm::cloud_hypervisor::{
    ChError, ChOptions, CloudHypervisorVmm, MemoryRestoreMode, probe_binary, vsock,
};
use somna_hypervisor_agent::vmm::{
    Accelerator, AgentEndpoint, ChannelKind, DiskSpec, Incoming, MemoryBacking, NetSpec,
    VfioDevice, VmSpec, Vmm, VmmError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spec(id: &str, dir: &VmDir, net: Option<&TestNetns>) -> VmSpec {
    VmSpec {
        id: id.into(),
        cpus: 2,
        memory_mib: 64,
        memory: MemoryBacking {
            path: dir.memory_file(),
            shared: true,
        },
        kernel: "/guest/vmlinux".into(),
        initramfs: "/guest/initramfs.img".into(),
        cmdline: format!("console=ttyS0 somna.id={id} somna.channel=vsock"),
        disks: vec![
            DiskSpec {
                path: "/images/root.erofs".into(),
                read_only: true,
                serial: "somna-root".into(),
            },
            DiskSpec {
                path: dir.rw_disk(),
                read_only: false,
                serial: "somna-rw".into(),
            },
        ],
        // Limited, so the rate-limit group is checked against the spec too.
        disk_io: somna_hypervisor_agent::DiskIoLimit::DEFAULT,
        net: net.map(|ns| NetSpec {
            tap: format!("tap-{id}"),
            netns: Some(ns.path()),
            mac: "02:00:00:00:00:02".into(),
        }),
        channel: ChannelKind::Vsock,
        accelerator: Accelerator::Kvm,
    }
}

fn ch_error(e: VmmError) -> ChError {
    match e {
        VmmError::CloudHypervisor(e) => e,
        other => panic!("expected a Cloud Hypervisor error, got {other}"),
    }
}

/// Echo over the hybrid vsock: the agent channel works.
async fn vsock_echo(endpoint: &AgentEndpoint) {
    let AgentEndpoint::HybridVsock { socket, port } = endpoint else {
        panic!("expected hybrid vsock, got {endpoint:?}");
    };
    let mut s = vsock::connect(socket, *port).await.unwrap();
    s.write_all(b"hello guest").await.unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello guest");
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_follows_the_spec() {
    let ns = TestNetns::new("life");
    let fake = FakeCh::start(Behaviour::default());
    let vmm = CloudHypervisorVmm::start(&fake.binary, ChOptions::default())
        .await
        .unwrap();
    assert_eq!(vmm.version().version, "52.0.0");
    assert_eq!(vmm.name(), "cloud-hypervisor");
    assert!(!vmm.ram_in_memory_file());
    let probe_pid = fake.pids()[0];
    assert!(reaped(probe_pid), "the version probe's VMM was reaped");

    let root = tempfile::tempdir().unwrap();
    let dir = VmDir::create(root.path(), "sbx-1").unwrap();
    let vm = vmm
        .launch(&spec("sbx-1", &dir, Some(&ns)), &dir, None)
        .await
        .unwrap();
    assert_eq!(vm.restore_mode(), None);
    vsock_echo(&vm.agent_endpoint()).await;

    // A running VM cannot resume: the spec's 405 is a clear error.
    let err = vm.resume().await.unwrap_err().to_string();
    assert!(err.contains("vm.resume failed with HTTP 405"), "{err}");
    assert!(err.contains(&fake.binary.display().to_string()), "{err}");

    vm.pause().await.unwrap();
    let state = root.path().join("state");
    let err = vm.save_state(&state, true).await.unwrap_err().to_string();
    assert!(err.contains("always holds it"), "{err}");
    vm.save_state(&state, false).await.unwrap();
    for f in ["config.json", "state.json", "memory-ranges"] {
        assert!(state.join(f).is_file(), "{f} in the snapshot");
    }
    let exit = vm.stop(Duration::from_secs(5)).await;
    assert_eq!(
        exit.signal,
        Some(libc::SIGTERM),
        "the VMM exited because of vmm.shutdown, not the driver's SIGKILL: {exit}"
    );
    let first = fake
        .calls()
        .into_iter()
        .filter(|c| c.pid == vm.pid())
        .map(|c| format!("{} {}", c.method, c.call))
        .collect::<Vec<_>>();
    assert_eq!(
        first,
        [
            "GET vmm.ping",
            "PUT vm.create",
            "PUT vm.add-net",
            "PUT vm.boot",
            "PUT vm.resume",
            "PUT vm.pause",
            "PUT vm.snapshot",
            "PUT vm.shutdown",
            "PUT vmm.shutdown"
        ]
    );
    let create = fake
        .calls()
        .into_iter()
        .find(|c| c.call == "vm.create")
        .and_then(|c| c.body)
        .unwrap();
    assert_eq!(create["payload"]["kernel"], "/guest/vmlinux");
    assert_eq!(create["cpus"]["boot_vcpus"], 2);
    assert_eq!(create["memory"]["size"], 64u64 << 20);
    // The network device comes after vm.create, with the slot's TAP as a
    // descriptor: the VMM never opens a TAP by name.
    assert!(create.get("net").is_none(), "{create}");
    let add_net = fake
        .calls()
        .into_iter()
        .find(|c| c.call == "vm.add-net")
        .unwrap();
    assert_eq!(add_net.status, 204);
    assert_eq!(add_net.taps, ["tap-sbx-1"]);
    assert_eq!(
        add_net.body.unwrap(),
        serde_json::json!({"mac": "02:00:00:00:00:02", "id": "net0"})
    );
    assert!(
        fake.calls()
            .iter()
            .filter(|c| c.call != "vm.add-net")
            .all(|c| c.taps.is_empty()),
        "descriptors go only where they are used"
    );
    assert_eq!(create["disks"][0]["readonly"], true);
    assert_eq!(create["serial"]["mode"], "Tty");
    assert_eq!(
        create["vsock"]["socket"],
        dir.path().join("vsock.sock").display().to_string()
    );

    // Wake in another run directory on another TAP; CopyOnWrite is not in
    // this spec (the server answers 400 like a VMM without it), OnDemand
    // fails as without userfaultfd, Copy works.
    fake.set_on_demand_fails(true);
    let dir2 = VmDir::create(root.path(), "sbx-2").unwrap();
    let incoming = Incoming {
        state: state.clone(),
        memory_in_file: false,
        resume: true,
    };
    let vm2 = vmm
        .launch(&spec("sbx-2", &dir2, Some(&ns)), &dir2, Some(&incoming))
        .await
        .unwrap();
    assert_eq!(vm2.restore_mode().as_deref(), Some("Copy"));
    let modes: Vec<_> = fake
        .calls()
        .iter()
        .filter(|c| c.call == "vm.restore")
        .map(|c| {
            (
                c.body.as_ref().unwrap()["memory_restore_mode"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                c.status,
                c.body.as_ref().unwrap()["resume"].clone(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("CopyOnWrite".to_string(), 400, serde_json::json!(true)),
            ("OnDemand".to_string(), 500, serde_json::json!(true)),
            ("Copy".to_string(), 204, serde_json::json!(true)),
        ]
    );
    // The process that failed OnDemand was killed and reaped; Copy ran on a
    // fresh one.
    let restore_pids: Vec<u32> = fake
        .calls()
        .iter()
        .filter(|c| c.call == "vm.restore")
        .map(|c| c.pid)
        .collect();
    assert_eq!(restore_pids[0], restore_pids[1], "a 400 keeps the process");
    assert_ne!(restore_pids[1], restore_pids[2]);
    assert!(reaped(restore_pids[1]));
    assert_eq!(restore_pids[2], vm2.pid());
    // The restored VM uses its own paths and TAP: every attempt passed the
    // new slot's TAP for the fd-backed device.
    let restored = std::fs::read(dir2.path().join("restore/config.json")).unwrap();
    let restored: serde_json::Value = serde_json::from_slice(&restored).unwrap();
    assert!(restored["net"][0].get("tap").is_none(), "{restored}");
    assert_eq!(restored["net"][0]["fds"], serde_json::json!([-1]));
    for c in fake.calls().iter().filter(|c| c.call == "vm.restore") {
        assert_eq!(c.taps, ["tap-sbx-2"], "{c:?}");
        assert_eq!(
            c.body.as_ref().unwrap()["net_fds"],
            serde_json::json!([{"id": "net0", "num_fds": 1}])
        );
    }
    assert_eq!(
        restored["disks"][1]["path"],
        dir2.rw_disk().display().to_string()
    );
    // The agent channel reconnects through the new VMM's socket.
    vsock_echo(&vm2.agent_endpoint()).await;
    vm2.stop(Duration::from_secs(5)).await;

    // A second wake: neither refused mode is tried again.
    let dir3 = VmDir::create(root.path(), "sbx-3").unwrap();
    let vm3 = vmm
        .launch(&spec("sbx-3", &dir3, Some(&ns)), &dir3, Some(&incoming))
        .await
        .unwrap();
    assert_eq!(vm3.restore_mode().as_deref(), Some("Copy"));
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.call == "vm.restore" && c.pid == vm3.pid())
            .count(),
        1
    );
    vm3.stop(Duration::from_secs(5)).await;

    // Where userfaultfd works, OnDemand is used.
    fake.set_on_demand_fails(false);
    let lazy = CloudHypervisorVmm::start(
        &fake.binary,
        ChOptions {
            restore_modes: vec![MemoryRestoreMode::OnDemand, MemoryRestoreMode::Copy],
            ..ChOptions::default()
        },
    )
    .await
    .unwrap();
    let dir3b = VmDir::create(root.path(), "sbx-3b").unwrap();
    let vm3b = lazy
        .launch(&spec("sbx-3b", &dir3b, Some(&ns)), &dir3b, Some(&incoming))
        .await
        .unwrap();
    assert_eq!(vm3b.restore_mode().as_deref(), Some("OnDemand"));
    vm3b.stop(Duration::from_secs(5)).await;

    // Restoring paused (warm pools) leaves it paused for Vm::resume.
    let dir4 = VmDir::create(root.path(), "sbx-4").unwrap();
    let paused = Incoming {
        resume: false,
        ..incoming.clone()
    };
    let vm4 = vmm
        .launch(&spec("sbx-4", &dir4, Some(&ns)), &dir4, Some(&paused))
        .await
        .unwrap();
    vm4.resume().await.unwrap();
    vm4.stop(Duration::from_secs(5)).await;

    // A snapshot of another shape is refused before any VMM starts.
    let dir5 = VmDir::create(root.path(), "sbx-5").unwrap();
    let mut other = spec("sbx-5", &dir5, Some(&ns));
    other.cpus = 4;
    let err = vmm
        .launch(&other, &dir5, Some(&incoming))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vCPUs"), "{err}");

    // Every body but the deliberate CopyOnWrite probe matched the spec.
    let violations = fake.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(
        violations[0].contains("memory_restore_mode"),
        "{violations:?}"
    );
    for pid in fake.pids() {
        assert!(reaped(pid), "every VMM process was reaped ({pid})");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spec_still_lacks_copy_on_write() {
    // The driver tries CopyOnWrite first and falls back; if a newer spec
    // adds it, the fallback test above must change with it.
    let spec = spec::Spec::load();
    assert_eq!(spec.enum_values("MemoryRestoreMode"), ["Copy", "OnDemand"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn vfio_devices_attach_and_detach() {
    let fake = FakeCh::start(Behaviour::default());
    let vmm = CloudHypervisorVmm::start(&fake.binary, ChOptions::default())
        .await
        .unwrap();
    assert!(vmm.capabilities().vfio);
    let root = tempfile::tempdir().unwrap();
    let dir = VmDir::create(root.path(), "gpu-1").unwrap();
    let vm = vmm
        .launch(&spec("gpu-1", &dir, None), &dir, None)
        .await
        .unwrap();
    let gpu = VfioDevice {
        path: "/sys/bus/pci/devices/0000:65:00.0".into(),
        id: Some("gpu0".into()),
    };
    let attached = vm.add_device(&gpu).await.unwrap();
    assert_eq!(attached.id, "gpu0");
    assert!(attached.bdf.is_some());
    // Same id twice: the spec's 409.
    let err = vm.add_device(&gpu).await.unwrap_err().to_string();
    assert!(err.contains("vm.add-device failed with HTTP 409"), "{err}");

    vm.pause().await.unwrap();
    let state = root.path().join("state");
    let err = vm.save_state(&state, false).await.unwrap_err().to_string();
    assert!(err.contains("VFIO devices attached (gpu0)"), "{err}");
    vm.resume().await.unwrap();
    vm.remove_device("gpu0").await.unwrap();
    // Unknown device: the spec's 404.
    let err = vm.remove_device("gpu0").await.unwrap_err().to_string();
    assert!(
        err.contains("vm.remove-device failed with HTTP 404"),
        "{err}"
    );
    assert!(err.contains("Unknown device"), "{err}");
    vm.pause().await.unwrap();
    vm.save_state(&state, false).await.unwrap();
    vm.stop(Duration::from_secs(5)).await;
    let add = fake
        .calls()
        .into_iter()
        .find(|c| c.call == "vm.add-device")
        .unwrap();
    assert_eq!(
        add.body.unwrap()["path"],
        "/sys/bus/pci/devices/0000:65:00.0"
    );
    assert!(fake.violations().is_empty(), "{:#?}", fake.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_name_the_binary_and_the_call_and_reap_the_vmm() {
    let fake = FakeCh::start(Behaviour::default());
    let vmm = CloudHypervisorVmm::start(&fake.binary, ChOptions::default())
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let binary = fake.binary.display().to_string();

    // 500 on vm.boot: launch fails, the process is gone.
    fake.inject(
        "vm.boot",
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Error loading kernel",
        ],
    );
    let dir = VmDir::create(root.path(), "e-1").unwrap();
    let err = ch_error(
        vmm.launch(&spec("e-1", &dir, None), &dir, None)
            .await
            .err()
            .unwrap(),
    );
    let text = err.to_string();
    assert_eq!(err.status(), Some(500));
    assert!(text.contains(&binary), "{text}");
    assert!(
        text.contains("vm.boot failed with HTTP 500: Error from API: The VM could not boot: Error loading kernel"),
        "{text}"
    );
    let pid = fake
        .calls()
        .iter()
        .rev()
        .find(|c| c.call == "vm.boot")
        .unwrap()
        .pid;
    assert!(reaped(pid), "the VMM of a failed launch is reaped");

    // 404 on vm.create (as a VMM that lost its VM would answer).
    fake.inject("vm.create", 404, &["Error from API", "Not Found"]);
    let dir = VmDir::create(root.path(), "e-2").unwrap();
    let err = vmm
        .launch(&spec("e-2", &dir, None), &dir, None)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vm.create failed with HTTP 404: Error from API: Not Found"),
        "{err}"
    );

    // 405 on vm.pause and 500 on vm.snapshot of a running VM.
    let dir = VmDir::create(root.path(), "e-3").unwrap();
    let vm = vmm
        .launch(&spec("e-3", &dir, None), &dir, None)
        .await
        .unwrap();
    fake.inject("vm.pause", 405, &["Error from API", "VM is not booted"]);
    let err = vm.pause().await.unwrap_err().to_string();
    assert!(
        err.contains("vm.pause failed with HTTP 405: Error from API: VM is not booted"),
        "{err}"
    );
    vm.pause().await.unwrap();
    fake.inject(
        "vm.snapshot",
        500,
        &["Error from API", "No space left on device"],
    );
    let state = root.path().join("state");
    let err = vm.save_state(&state, false).await.unwrap_err().to_string();
    assert!(err.contains("vm.snapshot failed with HTTP 500"), "{err}");
    assert!(!state.exists(), "a failed snapshot leaves nothing behind");

    // Every restore mode failing: one error listing each attempt.
    vm.save_state(&state, false).await.unwrap();
    vm.stop(Duration::from_secs(5)).await;
    fake.inject(
        "vm.restore",
        500,
        &["Error from API", "Cannot restore devices"],
    );
    fake.set_on_demand_fails(true);
    let opts = ChOptions {
        // Copy gets the injected 500, OnDemand the missing userfaultfd.
        restore_modes: vec![MemoryRestoreMode::Copy, MemoryRestoreMode::OnDemand],
        ..ChOptions::default()
    };
    let vmm2 = CloudHypervisorVmm::start(&fake.binary, opts).await.unwrap();
    let dir = VmDir::create(root.path(), "e-4").unwrap();
    let incoming = Incoming {
        state: state.clone(),
        memory_in_file: false,
        resume: true,
    };
    let err = vmm2
        .launch(&spec("e-4", &dir, None), &dir, Some(&incoming))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("failed in every memory restore mode"), "{err}");
    assert!(err.contains("OnDemand: HTTP 500"), "{err}");
    assert!(err.contains("userfaultfd"), "{err}");
    assert!(err.contains("Copy: HTTP 500"), "{err}");
    assert!(err.contains("Cannot restore devices"), "{err}");

    assert!(fake.violations().is_empty(), "{:#?}", fake.violations());
    for pid in fake.pids() {
        assert!(reaped(pid), "every VMM process was reaped ({pid})");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_version_is_refused_with_the_minimum() {
    let fake = FakeCh::start(Behaviour {
        version: "51.1.0".into(),
        ..Behaviour::default()
    });
    let err = CloudHypervisorVmm::start(&fake.binary, ChOptions::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is version 51.1.0"), "{err}");
    assert!(err.contains("needs v52.0 or newer"), "{err}");
    assert!(err.contains(&fake.binary.display().to_string()), "{err}");
    // What `somna doctor` calls: it reports the version of any binary.
    let version = probe_binary(&fake.binary).await.unwrap();
    assert_eq!(version.version, "51.1.0");
    assert!(!version.is_supported());
    for pid in fake.pids() {
        assert!(reaped(pid));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_without_an_api_socket_is_a_clear_error() {
    // Never opens its socket.
    let silent = FakeCh::with_script(Behaviour::default(), false, "");
    let opts = ChOptions {
        socket_timeout: Duration::from_millis(300),
        ..ChOptions::default()
    };
    let err = CloudHypervisorVmm::start(&silent.binary, opts.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("did not open its API socket"), "{err}");
    assert!(err.contains(&silent.binary.display().to_string()), "{err}");

    // Exits at once, saying why.
    let failing = FakeCh::with_script(
        Behaviour::default(),
        false,
        "echo 'Error: unknown hypervisor' >&2; exit 1",
    );
    let err = CloudHypervisorVmm::start(&failing.binary, opts)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("exited with status 1"), "{err}");
    assert!(err.contains("unknown hypervisor"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_non_executable_binaries_are_named() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("cloud-hypervisor");
    let err = probe_binary(&missing).await.err().unwrap().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    std::fs::write(&missing, "#!/bin/sh\n").unwrap();
    let err = CloudHypervisorVmm::start(&missing, ChOptions::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is not executable"), "{err}");
    assert!(err.contains("v52.0 or newer"), "{err}");
    assert!(!Path::new(&missing).with_file_name("api.sock").exists());
}

#[test]
fn the_validator_catches_undeclared_missing_and_mistyped_fields() {
    // The contract tests only mean something if the schemas bite.
    let spec = spec::Spec::load();
    let ok = serde_json::json!({ "source_url": "file:///s", "memory_restore_mode": "Copy", "resume": true });
    assert!(spec.check("RestoreConfig", &ok).is_empty());
    let undeclared = serde_json::json!({ "source_url": "file:///s", "resmue": true });
    assert!(!spec.check("RestoreConfig", &undeclared).is_empty());
    let missing = serde_json::json!({ "resume": true });
    assert!(!spec.check("RestoreConfig", &missing).is_empty());
    let mistyped = serde_json::json!({ "source_url": "file:///s", "resume": "yes" });
    assert!(!spec.check("RestoreConfig", &mistyped).is_empty());
    // Through $refs: a disk inside a VmConfig.
    let vm = serde_json::json!({
        "payload": { "kernel": "/k" },
        "disks": [{ "path": "/d", "readonly": "no" }],
    });
    let errors = spec.check("VmConfig", &vm);
    assert!(
        errors.iter().any(|e| e.contains("/disks/0/readonly")),
        "{errors:?}"
    );
}
