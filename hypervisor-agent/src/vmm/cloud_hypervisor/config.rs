//! Mapping a [`VmSpec`] to Cloud Hypervisor's `VmConfig`, and rewriting a
//! snapshot's `config.json` for the VM that restores it.
//!
//! Guest contract choices (see ARCHITECTURE.md, "The guest contract"):
//! - Console: the legacy 8250 serial port (`console=ttyS0`, the same as
//!   under QEMU) in `Tty` mode, i.e. written to the VMM's stdout, which the
//!   driver opens on `console.log` in append mode. The 8250 driver is built
//!   into the guest kernel, so early boot messages and panics are captured
//!   (virtio-console/`hvc0` is a module, loaded late from the initramfs).
//!   `File` mode would truncate the log on every restore and lose the boot
//!   messages the agent shows when a VM fails. virtio-console is off.
//! - Disks: virtio-blk (PCI) found by serial (`somna-root`, `somna-rw`),
//!   format forced to `Raw`.
//! - Agent channel: hybrid vsock, guest CID 3 (each VM has its own vsock
//!   device and host socket, so CIDs never clash), `somna.channel=vsock`.
//! - Devices are virtio-pci: the guest kernel must not get `pci=off`.
//! - Network: one virtio-net device `net0` whose TAP the agent opens and
//!   passes as a file descriptor (`vm.add-net` before `vm.boot`, `net_fds`
//!   on `vm.restore`): `vm.create` takes no descriptors, and the VMM, in
//!   its jail, can neither see the slot's namespace nor open a TAP.

use std::path::Path;

use serde_json::Value;

use super::types::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig,
    RateLimitGroupConfig, RateLimiterConfig, RngConfig, TokenBucket, VmConfig, VsockConfig,
};
use crate::vmm::{DiskIoLimit, VmSpec};

/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;

/// The id of the guest's one network device.
pub const NET_ID: &str = "net0";

/// The network device of `spec`, for `vm.add-net` with its TAP's fd.
pub fn net_config(spec: &VmSpec) -> Option<NetConfig> {
    spec.net.as_ref().map(|n| NetConfig {
        mac: n.mac.clone(),
        id: NET_ID.into(),
    })
}

/// The id of the rate-limit group all of a VM's disks share.
pub const IO_GROUP: &str = "io";

/// The disks' shared rate limiter: `spec`'s per-direction limit becomes a
/// budget for reads and writes together (Cloud Hypervisor does not count
/// them apart), refilled every 100 ms, so bursts stay as short as QEMU's.
fn rate_limit_groups(limit: DiskIoLimit) -> Vec<RateLimitGroupConfig> {
    if limit.is_unlimited() {
        return Vec::new();
    }
    let bucket = |per_sec: u64| TokenBucket {
        size: (per_sec / 10).max(1),
        refill_time: 100,
    };
    vec![RateLimitGroupConfig {
        id: IO_GROUP.into(),
        rate_limiter_config: RateLimiterConfig {
            bandwidth: limit.bytes_per_sec.map(bucket),
            ops: limit.ops_per_sec.map(bucket),
        },
    }]
}

/// The `VmConfig` that boots `spec`, with its agent channel on
/// `vsock_socket`.
pub fn vm_config(spec: &VmSpec, vsock_socket: &Path) -> VmConfig {
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: spec.cpus,
            max_vcpus: spec.cpus,
        },
        memory: MemoryConfig {
            size: u64::from(spec.memory_mib) << 20,
        },
        payload: PayloadConfig {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            cmdline: spec.cmdline.clone(),
        },
        rate_limit_groups: rate_limit_groups(spec.disk_io),
        disks: spec
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: d.path.clone(),
                readonly: d.read_only,
                serial: d.serial.clone(),
                id: d.serial.clone(),
                image_type: "Raw",
                rate_limit_group: (!spec.disk_io.is_unlimited()).then(|| IO_GROUP.into()),
            })
            .collect(),
        rng: RngConfig {
            src: "/dev/urandom".into(),
        },
        serial: ConsoleConfig { mode: "Tty" },
        console: ConsoleConfig { mode: "Off" },
        vsock: VsockConfig {
            cid: GUEST_CID,
            socket: vsock_socket.to_path_buf(),
            id: "vsock0".into(),
        },
    }
}

/// Rewrites a snapshot's `config.json` (parsed) for the VM that restores
/// it: `vm.restore` takes the whole VM configuration from that file, and
/// `RestoreConfig` has no way to change paths. A template clone or a woken
/// sandbox has its own writable disk, vsock socket and network slot, so
/// the paths are replaced here; everything else (device ids, PCI layout,
/// MAC) must stay as it was, because the saved device state refers to it.
/// The network device is marked as backed by one descriptor (`fds: [-1]`,
/// no TAP name), which `vm.restore`'s `net_fds` then supplies; a snapshot
/// of an older VM whose TAP was opened by name is converted the same way.
/// The shape (vCPUs, memory) must match the spec.
pub fn rewrite_for_restore(
    config: &mut Value,
    spec: &VmSpec,
    vsock_socket: &Path,
) -> Result<(), String> {
    let obj = config
        .as_object_mut()
        .ok_or("config.json is not a JSON object")?;

    let vcpus = obj
        .get("cpus")
        .and_then(|c| c.get("boot_vcpus"))
        .and_then(Value::as_u64);
    if vcpus != Some(u64::from(spec.cpus)) {
        return Err(format!(
            "it is of a VM with {} vCPUs, the VM to restore has {}",
            vcpus.map_or("an unknown number of".into(), |v| v.to_string()),
            spec.cpus
        ));
    }
    let size = obj
        .get("memory")
        .and_then(|m| m.get("size"))
        .and_then(Value::as_u64);
    if size != Some(u64::from(spec.memory_mib) << 20) {
        return Err(format!(
            "it is of a VM with {} bytes of memory, the VM to restore has {} MiB",
            size.map_or("an unknown number of".into(), |v| v.to_string()),
            spec.memory_mib
        ));
    }

    let payload = obj
        .entry("payload")
        .or_insert_with(|| Value::Object(Default::default()));
    let payload = payload
        .as_object_mut()
        .ok_or("config.json: payload is not an object")?;
    payload.insert("kernel".into(), path_value(&spec.kernel));
    payload.insert("initramfs".into(), path_value(&spec.initramfs));
    // Used only if the guest reboots: then it boots as this VM.
    payload.insert("cmdline".into(), Value::String(spec.cmdline.clone()));

    let disks = obj
        .get_mut("disks")
        .and_then(Value::as_array_mut)
        .ok_or("config.json has no disks")?;
    if disks.len() != spec.disks.len() {
        return Err(format!(
            "it has {} disks, the VM to restore has {}",
            disks.len(),
            spec.disks.len()
        ));
    }
    for disk in disks.iter_mut() {
        let serial = disk
            .get("serial")
            .or_else(|| disk.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let wanted = spec
            .disks
            .iter()
            .find(|d| d.serial == serial)
            .ok_or_else(|| format!("its disk {serial:?} is not one of the VM's disks"))?;
        let disk = disk
            .as_object_mut()
            .ok_or("config.json: a disk is not an object")?;
        disk.insert("path".into(), path_value(&wanted.path));
        disk.insert("readonly".into(), Value::Bool(wanted.read_only));
        // The limit is this agent's, not the one the snapshot was taken
        // under (it is configuration, not device state).
        match spec.disk_io.is_unlimited() {
            true => disk.remove("rate_limit_group"),
            false => disk.insert("rate_limit_group".into(), IO_GROUP.into()),
        };
    }
    let groups = rate_limit_groups(spec.disk_io);
    match groups.is_empty() {
        true => obj.remove("rate_limit_groups"),
        false => obj.insert(
            "rate_limit_groups".into(),
            serde_json::to_value(groups).map_err(|e| e.to_string())?,
        ),
    };

    let nets = obj
        .get_mut("net")
        .and_then(Value::as_array_mut)
        .filter(|n| !n.is_empty());
    match (nets, &spec.net) {
        (None, None) => {}
        (Some(nets), Some(net)) if nets.len() == 1 => {
            let n = nets[0]
                .as_object_mut()
                .ok_or("config.json: the network device is not an object")?;
            // The guest side (MAC, IP) is the same on every slot; only the
            // host's TAP differs, and it comes as a descriptor.
            if n.get("id").and_then(Value::as_str) != Some(NET_ID) {
                return Err(format!(
                    "its network device is not {NET_ID:?}, the one Somna gives every VM"
                ));
            }
            n.remove("tap");
            n.insert("fds".into(), serde_json::json!([-1]));
            n.insert("mac".into(), Value::String(net.mac.clone()));
        }
        (Some(nets), None) => {
            return Err(format!(
                "it has {} network device(s), the VM to restore has none",
                nets.len()
            ));
        }
        (nets, Some(_)) => {
            return Err(format!(
                "it has {} network devices, the VM to restore has one",
                nets.map_or(0, |n| n.len())
            ));
        }
    }

    let vsock = obj
        .get_mut("vsock")
        .and_then(Value::as_object_mut)
        .ok_or("config.json has no vsock device (the agent channel)")?;
    vsock.insert("socket".into(), path_value(vsock_socket));

    if obj
        .get("devices")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty())
    {
        return Err("it has VFIO devices attached, which a snapshot cannot carry".into());
    }
    Ok(())
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{Accelerator, ChannelKind, DiskSpec, MemoryBacking, NetSpec};

    fn spec(rw: &str, net: Option<&str>) -> VmSpec {
        VmSpec {
            id: "sbx-1".into(),
            cpus: 2,
            memory_mib: 256,
            memory: MemoryBacking {
                path: "/r/mem".into(),
                shared: true,
            },
            kernel: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.img".into(),
            cmdline: "console=ttyS0 somna.id=sbx-1 somna.channel=vsock".into(),
            disks: vec![
                DiskSpec {
                    path: "/c/root.ext4".into(),
                    read_only: true,
                    serial: "somna-root".into(),
                },
                DiskSpec {
                    path: rw.into(),
                    read_only: false,
                    serial: "somna-rw".into(),
                },
            ],
            disk_io: Default::default(),
            net: net.map(|tap| NetSpec {
                tap: tap.into(),
                netns: None,
                mac: "02:00:00:00:00:01".into(),
            }),
            channel: ChannelKind::Vsock,
            accelerator: Accelerator::Kvm,
        }
    }

    #[test]
    fn boots_with_the_guest_contract() {
        let c = serde_json::to_value(vm_config(
            &spec("/r/rw.ext4", Some("tap0")),
            Path::new("/r/vsock.sock"),
        ))
        .unwrap();
        assert_eq!(c["cpus"]["boot_vcpus"], 2);
        assert_eq!(c["memory"]["size"], 256u64 << 20);
        assert_eq!(c["disks"][0]["serial"], "somna-root");
        assert_eq!(c["disks"][0]["readonly"], true);
        assert_eq!(c["disks"][1]["path"], "/r/rw.ext4");
        assert_eq!(c["disks"][1]["image_type"], "Raw");
        assert!(c.get("rate_limit_groups").is_none());
        assert!(c["disks"][1].get("rate_limit_group").is_none());
        // The network device comes with its TAP's fd, through vm.add-net.
        assert!(c.get("net").is_none());
        let net = serde_json::to_value(net_config(&spec("/r/rw.ext4", Some("tap0")))).unwrap();
        assert_eq!(
            net,
            serde_json::json!({"mac": "02:00:00:00:00:01", "id": "net0"})
        );
        assert!(net_config(&spec("/r/rw.ext4", None)).is_none());
        assert_eq!(c["vsock"]["socket"], "/r/vsock.sock");
        assert_eq!(c["vsock"]["cid"], 3);
        assert_eq!(c["serial"]["mode"], "Tty");
        assert_eq!(c["console"]["mode"], "Off");
        assert!(
            !c["payload"]["cmdline"]
                .as_str()
                .unwrap()
                .contains("pci=off")
        );
    }

    #[test]
    fn all_disks_share_one_rate_limiter() {
        let mut s = spec("/r/rw.ext4", None);
        s.disk_io = DiskIoLimit {
            bytes_per_sec: Some(10 << 20),
            ops_per_sec: Some(1000),
        };
        let c = serde_json::to_value(vm_config(&s, Path::new("/r/vsock.sock"))).unwrap();
        assert_eq!(
            c["rate_limit_groups"],
            serde_json::json!([{"id": "io", "rate_limiter_config": {
                "bandwidth": {"size": 1048576, "refill_time": 100},
                "ops": {"size": 100, "refill_time": 100},
            }}])
        );
        for d in c["disks"].as_array().unwrap() {
            assert_eq!(d["rate_limit_group"], "io");
        }
        // A restore gets this agent's limit, not the snapshot's: none...
        let mut restored = c.clone();
        let unlimited = spec("/r/rw2.ext4", None);
        rewrite_for_restore(&mut restored, &unlimited, Path::new("/r/v2.sock")).unwrap();
        assert!(restored.get("rate_limit_groups").is_none());
        assert!(restored["disks"][1].get("rate_limit_group").is_none());
        // ...or a new one.
        s.disk_io.bytes_per_sec = Some(20 << 20);
        rewrite_for_restore(&mut restored, &s, Path::new("/r/v2.sock")).unwrap();
        let group = &restored["rate_limit_groups"][0];
        assert_eq!(group["rate_limiter_config"]["bandwidth"]["size"], 2 << 20);
        assert_eq!(restored["disks"][0]["rate_limit_group"], "io");
    }

    #[test]
    fn restore_config_gets_the_new_vms_paths() {
        let template = spec("/templates/k/rw.ext4", Some("tap-old"));
        let mut config =
            serde_json::to_value(vm_config(&template, Path::new("/vms/tpl/vsock.sock"))).unwrap();
        // What the VMM adds when it writes config.json is kept. An older
        // snapshot's TAP was opened by name; it becomes fd-backed.
        config["disks"][1]["num_queues"] = 1.into();
        config["net"] = serde_json::json!([
            {"tap": "tap-old", "mac": "02:00:00:00:00:09", "id": "net0", "num_queues": 2}
        ]);
        rewrite_for_restore(
            &mut config,
            &spec("/vms/sbx-2/rw.ext4", Some("tap-new")),
            Path::new("/vms/sbx-2/vsock.sock"),
        )
        .unwrap();
        assert_eq!(config["disks"][1]["path"], "/vms/sbx-2/rw.ext4");
        assert_eq!(config["disks"][1]["num_queues"], 1);
        assert_eq!(config["disks"][0]["path"], "/c/root.ext4");
        assert!(config["net"][0].get("tap").is_none());
        assert_eq!(config["net"][0]["fds"], serde_json::json!([-1]));
        assert_eq!(config["net"][0]["num_queues"], 2);
        assert_eq!(config["net"][0]["mac"], "02:00:00:00:00:01");
        assert_eq!(config["vsock"]["socket"], "/vms/sbx-2/vsock.sock");
        assert_eq!(config["vsock"]["cid"], 3);
    }

    #[test]
    fn restore_config_must_match_the_vm() {
        let base = || serde_json::to_value(vm_config(&spec("/a", None), Path::new("/v"))).unwrap();
        let mut c = base();
        let mut s = spec("/b", None);
        s.cpus = 4;
        assert!(
            rewrite_for_restore(&mut c, &s, Path::new("/v"))
                .unwrap_err()
                .contains("vCPUs")
        );
        let mut s = spec("/b", None);
        s.memory_mib = 512;
        assert!(
            rewrite_for_restore(&mut c, &s, Path::new("/v"))
                .unwrap_err()
                .contains("memory")
        );
        let err = rewrite_for_restore(&mut base(), &spec("/b", Some("tap")), Path::new("/v"))
            .unwrap_err();
        assert!(err.contains("network"), "{err}");
        let mut s = spec("/b", None);
        s.disks[1].serial = "other".into();
        let err = rewrite_for_restore(&mut base(), &s, Path::new("/v")).unwrap_err();
        assert!(err.contains("somna-rw"), "{err}");
        let mut c = base();
        c["devices"] = serde_json::json!([{"path": "/sys/bus/pci/devices/0000:01:00.0"}]);
        assert!(
            rewrite_for_restore(&mut c, &spec("/b", None), Path::new("/v"))
                .unwrap_err()
                .contains("VFIO")
        );
    }
}
