//! Hardening, with real microVMs under TCG, run as root: every VMM runs
//! jailed (own uid, no capabilities, no_new_privs, seccomp, own mount and
//! network namespaces holding only its files) inside a cgroup with the
//! sandbox's limits; exec output, file transfers and disk I/O are capped
//! with clear outcomes; and a guest that forks, eats its RAM, fills or
//! floods its disk or floods stdout gets a definite outcome while its
//! neighbour keeps answering.

use std::path::{Path, PathBuf};
use std::time::Duration;

use somna_sdk::{Command, CreateOptions, Sandbox};
use somna_testkit::{Options, Platform, assert_neighbour_fine, exec_latency};
use tonic::Code;

fn platform(extra: &[&str]) -> Platform {
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.extra_args = extra.iter().map(|s| s.to_string()).collect();
    Platform::start(o)
}

fn vmm_pid(p: &Platform, id: &str) -> u32 {
    let f = p.data_dir().join("vms").join(id).join("vmm.pid");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .parse()
        .unwrap()
}

fn status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The directory of `pid`'s cgroup for `controller` (v1) or its v2 group.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.trim_start_matches('/');
        if v2 && ctrls.is_empty() {
            return Path::new("/sys/fs/cgroup").join(path);
        }
        if !v2 && ctrls.split(',').any(|c| c == controller) {
            return Path::new("/sys/fs/cgroup").join(controller).join(path);
        }
    }
    panic!("no {controller} cgroup for {pid} in {text}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

async fn sh(sb: &Sandbox, script: &str) -> somna_sdk::Output {
    sb.exec(Command::from_argv(["sh", "-c", script]))
        .await
        .unwrap()
}

#[tokio::test]
async fn vmm_runs_jailed_in_its_own_cgroup() {
    let _shared = somna_testkit::not_while_measuring().await;
    let p = platform(&[]);
    let client = p.client().await;
    let a = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let b = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let (pa, pb) = (vmm_pid(&p, a.id()), vmm_pid(&p, b.id()));

    // Credentials: an unprivileged uid per VMM, nothing to regain.
    let (sa, sb_) = (status(pa), status(pb));
    let uid = |s: &std::collections::HashMap<String, String>| {
        s["Uid"]
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let ua = uid(&sa);
    assert!(ua.iter().all(|u| u == &ua[0] && u != "0"), "uids {ua:?}");
    assert_ne!(ua[0], uid(&sb_)[0], "two VMMs share a uid");
    assert!(sa["Gid"].split_whitespace().all(|g| g != "0"));
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(sa[cap], "0000000000000000", "{cap}");
    }
    assert_eq!(sa["NoNewPrivs"], "1");
    assert_eq!(sa["Seccomp"], "2", "QEMU's -sandbox filter is on");

    // Namespaces: none shared with the host.
    for kind in ["mnt", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pa.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    // Its file system: its own run directory, /usr, no host secrets, no
    // neighbour.
    let root = PathBuf::from(format!("/proc/{pa}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let run_a = p.data_dir().join("vms").join(a.id());
    let run_b = p.data_dir().join("vms").join(b.id());
    assert!(inside(&run_a).join("vmm.pid").exists());
    assert!(inside(Path::new("/usr/bin")).is_dir());
    assert!(
        !inside(&run_b).exists(),
        "a neighbour's run directory is visible"
    );
    for hidden in [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/home",
        "/proc/1",
        "/sys/fs",
        "/var",
    ] {
        assert!(
            !inside(Path::new(hidden)).exists(),
            "{hidden} is visible in the jail"
        );
    }
    assert!(inside(Path::new("/dev/null")).exists());
    assert!(!inside(Path::new("/dev/sda")).exists() && !inside(Path::new("/dev/mem")).exists());
    // The run directory belongs to the VMM's uid, not to root.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&run_a).unwrap().uid().to_string(), ua[0]);

    // cgroup limits: guest RAM 512 MiB + 256 VMM + 256 TCG cache, one core
    // per vCPU (VMM threads included), 512 pids.
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mem = cgroup_dir(pa, "memory");
    let pids = cgroup_dir(pa, "pids");
    let cpu = cgroup_dir(pa, "cpu");
    assert!(mem.to_string_lossy().contains(a.id()), "{}", mem.display());
    let limit = (512u64 + 512) << 20;
    if v2 {
        assert_eq!(read(&mem.join("memory.max")), limit.to_string());
        assert_eq!(read(&cpu.join("cpu.max")), "100000 100000");
    } else {
        assert_eq!(read(&mem.join("memory.limit_in_bytes")), limit.to_string());
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "100000");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    }
    assert_eq!(read(&pids.join("pids.max")), "512");
    assert!(
        read(&mem.join(if v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        }))
        .parse::<u64>()
        .unwrap()
            > 0,
        "the VMM's memory is charged to its cgroup"
    );

    // The jailed VM works, sleeps and wakes (the restored VMM is jailed
    // again, in a new cgroup).
    let out = sh(&a, "echo hi > /root/f && cat /root/f").await;
    assert_eq!(out.stdout_text().trim(), "hi");
    client.sleep_sandbox(a.id()).await.unwrap();
    assert!(!mem.exists(), "the sleeping VMM's cgroup is removed");
    let out = sh(&a, "cat /root/f").await;
    assert_eq!(out.stdout_text().trim(), "hi");
    let woken = vmm_pid(&p, a.id());
    assert_ne!(status(woken)["Uid"].split_whitespace().next(), Some("0"));
    let mem2 = cgroup_dir(woken, "memory");
    assert!(mem2.exists());

    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
    assert!(!mem2.exists(), "destroy removes the VMM's cgroup");
    assert!(!pids.exists());
}

#[tokio::test]
async fn exec_output_file_transfers_and_disk_io_are_capped() {
    let _shared = somna_testkit::not_while_measuring().await;
    let p = platform(&["--max-file-mib", "1", "--disk-mib-per-sec", "2"]);
    let client = p.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();

    // A bounded writer past the request's limit: cut, marked, exit kept.
    let out = sb
        .exec(
            Command::from_argv([
                "sh",
                "-c",
                "head -c 300000 /dev/zero | tr '\\0' a; echo done >&2",
            ])
            .max_output_bytes(65_536),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert!(out.output_truncated);
    let total = out.stdout.len() + out.stderr.len();
    let marker = "[somna: output truncated";
    let text = format!("{}{}", out.stdout_text(), out.stderr_text());
    assert!(
        text.contains(marker),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(total < 65_536 + 400, "{total} bytes came through");
    assert_eq!(
        out.stdout.iter().take_while(|b| **b == b'a').count(),
        65_536
    );
    assert!(!text.contains("done"), "output after the cut is discarded");

    // An endless writer: cut, then ended by its own timeout.
    let out = sb
        .exec(
            Command::from_argv(["yes"])
                .max_output_bytes(10_000)
                .timeout(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    assert!(out.timed_out && out.output_truncated, "{out:?}");
    assert!(out.stdout.len() + out.stderr.len() < 10_400);

    // Under the limit nothing changes.
    let out = sh(&sb, "echo small").await;
    assert!(!out.output_truncated);
    assert_eq!(out.stdout_text(), "small\n");

    // Files over --max-file-mib 1: refused both ways, clearly.
    let err = sb
        .write_file("/root/big", vec![7u8; 2 << 20])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("/root/big"), "{err}");
    assert_eq!(
        sh(&sb, "head -c 2097152 /dev/zero > /root/big2")
            .await
            .exit_code,
        0
    );
    let err = sb.read_file("/root/big2").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    sb.write_file("/root/ok", vec![7u8; 512 << 10])
        .await
        .unwrap();
    assert_eq!(sb.read_file("/root/ok").await.unwrap().len(), 512 << 10);

    // Disk I/O is throttled by the VMM (so also on cgroup v1 hosts, where
    // the cgroup sees only direct I/O): at 2 MiB/s, 8 MiB written with
    // fsync, or read back past the guest's cache, take at least three
    // seconds (one of them may come from the burst allowance).
    // Unthrottled, each takes well under one second here.
    let timed = |script: &'static str| {
        let sb = &sb;
        async move {
            let t = std::time::Instant::now();
            let out = sh(sb, script).await;
            assert_eq!(out.exit_code, 0, "{script}: {out:?}");
            t.elapsed()
        }
    };
    let write = timed("dd if=/dev/zero of=/root/f bs=1M count=8 conv=fsync 2>&1").await;
    let read =
        timed("echo 3 > /proc/sys/vm/drop_caches && dd if=/root/f of=/dev/null bs=1M 2>&1").await;
    eprintln!("8 MiB at 2 MiB/s: write {write:?}, read {read:?}");
    assert!(write >= Duration::from_secs(3), "write took {write:?}");
    assert!(read >= Duration::from_secs(3), "read took {read:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn abusive_guests_get_definite_outcomes_and_neighbours_keep_working() {
    let _alone = somna_testkit::measuring_alone().await;
    let p = platform(&[]);
    let client = p.client().await;
    let neighbour = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let idle = exec_latency(&neighbour).await;

    // RAM: four hogs that together want three times the guest's RAM; the
    // guest's own OOM killer ends some of them, the VMM (same process) and
    // the sandbox live on.
    let o = client
        .create_sandbox(CreateOptions::new("busybox").memory_mib(256).disk_mib(64))
        .await
        .unwrap();
    let vmm = vmm_pid(&p, o.id());
    let out = sh(
        &o,
        "for i in 1 2 3 4; do (head -c 250000000 /dev/zero | tail -c 200000000 >/dev/null) & done; wait; dmesg | grep -c 'Killed process'",
    )
    .await;
    let kills: u32 = out.stdout_text().trim().parse().unwrap_or(0);
    assert!(kills >= 1, "no OOM kill in the guest: {out:?}");
    assert_eq!(sh(&o, "echo alive").await.stdout_text(), "alive\n");
    assert_eq!(vmm_pid(&p, o.id()), vmm);
    assert!(status(vmm)["State"].starts_with('S') || status(vmm)["State"].starts_with('R'));

    // Disk: ENOSPC inside the guest, the host's disk untouched beyond the
    // sandbox's writable layer.
    let out = sh(
        &o,
        "dd if=/dev/zero of=/root/fill bs=1M 2>&1; df -k /root | tail -1",
    )
    .await;
    assert!(
        out.stdout_text().contains("No space left on device"),
        "{out:?}"
    );
    let rw = p.data_dir().join("vms").join(o.id()).join("rw.ext4");
    assert!(std::fs::metadata(&rw).unwrap().len() <= 64 << 20);
    assert_eq!(
        sh(&o, "rm /root/fill && echo freed").await.stdout_text(),
        "freed\n"
    );

    // Disk flood: rewriting its disk with synchronous writes for 10 s, in
    // the background; its VMM's throttle holds it, the host's page cache
    // and disk stay usable for the neighbour.
    let disk_flood = {
        let o2 = client.attach(o.id());
        tokio::spawn(async move {
            o2.exec(
                Command::from_argv([
                    "sh",
                    "-c",
                    "while :; do dd if=/dev/zero of=/root/f bs=1M count=32 conv=fsync 2>/dev/null; done",
                ])
                .timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap()
        })
    };
    assert_neighbour_fine(&neighbour, idle, "a disk flood").await;
    let out = disk_flood.await.unwrap();
    assert!(out.timed_out, "{out:?}");

    // stdout flood, in the background while the neighbour works.
    let flood = {
        let o2 = client.attach(o.id());
        tokio::spawn(async move {
            o2.exec(
                Command::from_argv(["yes", "flood"])
                    .max_output_bytes(1 << 20)
                    .timeout(Duration::from_secs(20)),
            )
            .await
            .unwrap()
        })
    };
    assert_neighbour_fine(&neighbour, idle, "a stdout flood").await;
    let out = flood.await.unwrap();
    assert!(out.output_truncated && out.timed_out, "{out:?}");

    // Fork bomb (detached, so the exec channel is not what it hits): the
    // guest's pids run out, its VMM stays inside its cgroup's quota.
    let bomb = o
        .exec(Command::from_argv(["sh", "-c", "f() { f | f & }; f"]).detach(""))
        .await
        .unwrap();
    assert_eq!(bomb.exit_code, 0);
    assert_neighbour_fine(&neighbour, idle, "a fork bomb").await;
    let pid = vmm_pid(&p, o.id());
    let cpu = cgroup_dir(pid, "cpu");
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // Throttled: the bomb wanted more than its one core.
        let stat = read(&cpu.join("cpu.stat"));
        assert!(stat.contains("nr_periods"), "{stat}");
    }
    o.destroy().await.unwrap();
    assert_eq!(sh(&neighbour, "echo ok").await.stdout_text(), "ok\n");
    neighbour.destroy().await.unwrap();
}

/// A full host disk: a create fails with RESOURCE_EXHAUSTED and leaves
/// nothing behind; a running sandbox keeps running (its RAM was allocated
/// when it started) and its writes fail with EIO inside the guest; a sleep
/// fails the same way, removes its partial snapshot and leaves the sandbox
/// running; with room again the same sandbox sleeps and wakes.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_cleanly() {
    let _shared = somna_testkit::not_while_measuring().await;
    let p = platform(&[]);
    let vms = p.data_dir().join("vms");
    // The sandbox's RAM, which the agent allocates in full, a sparse
    // writable disk, and some room to spare.
    let mount = somna_testkit::Tmpfs::mount(&vms, "200m");
    let client = p.client().await;
    let shape = || CreateOptions::new("busybox").memory_mib(128).disk_mib(64);
    let sb = client.create_sandbox(shape()).await.unwrap();
    let dir = vms.join(sb.id());
    let mem = std::fs::metadata(dir.join("mem")).unwrap();
    assert_eq!(mem.len(), 128 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&mem) * 512 >= 128 << 20,
        "the memory file was not allocated in full"
    );
    let filler = mount.fill("filler");

    let Err(err) = client.create_sandbox(shape()).await else {
        panic!("a create on a full disk succeeded");
    };
    let status = match &err {
        somna_sdk::Error::ResourceExhausted(m) => m.clone(),
        other => panic!("a create on a full disk: {other:?}"),
    };
    assert!(
        status.contains("memory file") && status.contains("disk is full"),
        "{status}"
    );
    let mut expected = vec![dir.clone(), filler.clone()];
    expected.sort();
    assert_eq!(
        somna_testkit::entries_of(&vms),
        expected,
        "a failed create left files behind"
    );

    let out = sh(
        &sb,
        "dd if=/dev/urandom of=/root/big bs=1M count=32 conv=fsync 2>&1",
    )
    .await;
    assert_ne!(
        out.exit_code, 0,
        "a write past the host's full disk: {out:?}"
    );

    let err = client.sleep_sandbox(sb.id()).await.unwrap_err();
    let status = match &err {
        somna_sdk::Error::ResourceExhausted(m) => m.clone(),
        other => panic!("a sleep on a full disk: {other:?}"),
    };
    assert!(status.contains("disk is full"), "{status}");
    assert!(!dir.join("state").exists(), "the partial snapshot was left");
    let out = sb
        .exec(Command::from_argv(["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "still here\n");

    std::fs::remove_file(filler).unwrap();
    client.sleep_sandbox(sb.id()).await.unwrap();
    let out = sb
        .exec(Command::from_argv(["echo", "awake"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "awake\n");
    sb.destroy().await.unwrap();
}
