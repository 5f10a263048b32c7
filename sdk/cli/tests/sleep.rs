//! Light sleep, wake, template clones and warm pools, with real microVMs.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use somna_sdk::proto::{SandboxState, StartMode};
use somna_sdk::{Client, Command, CreateOptions, Error, ExecEvent, Sandbox};
use somna_testkit::{Options, Platform, eventually, processes_mentioning};

fn platform(templates: bool) -> Platform {
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.templates = templates;
    Platform::start(o)
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

/// Starts a process that counts in a shell variable (memory) and writes the
/// count to /tmp/counter every 50 ms; returns its pid. The count goes in by
/// rename so a reader never sees the file truncated but not yet written.
async fn start_counter(sb: &Sandbox) -> String {
    sh(sb, "i=0; (while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 & echo $!").await
}

async fn counter(sb: &Sandbox) -> u64 {
    sh(sb, "cat /tmp/counter").await.parse().unwrap()
}

async fn state(client: &Client, id: &str) -> i32 {
    client.sandbox(id).await.unwrap().info().state
}

fn run_dir(p: &Platform, id: &str) -> std::path::PathBuf {
    p.data_dir().join("vms").join(id)
}

/// Everything a sleeping sandbox keeps on the host: files on disk, none of
/// them in the page cache, and no VMM process.
fn assert_asleep_without_ram(p: &Platform, id: &str) {
    let dir = run_dir(p, id);
    assert!(
        processes_mentioning(&dir).is_empty(),
        "the VMM process is gone"
    );
    for f in ["state", "rw.ext4", "mem"] {
        let path = dir.join(f);
        if path.exists() {
            assert_eq!(
                Platform::resident_bytes(&path),
                0,
                "{} still holds host RAM",
                path.display()
            );
        }
    }
    assert!(dir.join("snapshot.json").exists());
}

async fn sleep_and_wake_round(client: &Client, p: &Platform, sb: &Sandbox, pid: &str) {
    let before = counter(sb).await;
    let data = sh(
        sb,
        "head -c 4096 /dev/urandom | md5sum | cut -d' ' -f1 | tee /root/before.txt",
    )
    .await;

    let slept = client.sleep_sandbox(sb.id()).await.unwrap();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    assert_asleep_without_ram(p, sb.id());

    let woke = client.wake_sandbox(sb.id()).await.unwrap();
    assert_eq!(woke.state, SandboxState::Running as i32);
    // The process kept its in-memory count: it goes on from where it was.
    let after = counter(sb).await;
    assert!(
        after >= before,
        "counter went back from {before} to {after}"
    );
    assert!(
        after < before + 1000,
        "counter restarted or jumped: {before} -> {after}"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            counter(sb).await > after
        })
        .await,
        "the counting process does not run after wake"
    );
    assert_eq!(
        sh(sb, "cat /root/before.txt").await,
        data,
        "a file written before sleep changed"
    );
    // The process from before sleep is still there to be signalled.
    assert_eq!(
        sh(sb, &format!("kill -0 {pid} && echo alive")).await,
        "alive"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sleep_and_wake_keep_processes_memory_and_files() {
    let p = platform(false);
    let client = p.client().await;
    let mut sb = client
        .create_sandbox(CreateOptions::new("busybox").start_mode(StartMode::ColdBoot))
        .await
        .unwrap();
    let pid = start_counter(&sb).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            sh(&sb, "cat /tmp/counter 2>/dev/null || echo 0").await != "0"
        })
        .await
    );
    // Twice: the second sleep of a sandbox runs on the memory file the first
    // wake left it with.
    sleep_and_wake_round(&client, &p, &sb, &pid).await;
    sleep_and_wake_round(&client, &p, &sb, &pid).await;

    // The signal reaches the old process; it ends.
    sh(&sb, &format!("kill {pid}")).await;
    let gone = sh(
        &sb,
        &format!("sleep 0.3; kill -0 {pid} 2>/dev/null && echo alive || echo gone"),
    )
    .await;
    assert_eq!(gone, "gone");
    let info = sb.refresh().await.unwrap();
    assert_eq!((info.sleep_count, info.wake_count), (2, 2));
    sb.destroy().await.unwrap();
    assert!(p.vm_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_and_files_wake_a_sleeping_sandbox() {
    let p = platform(false);
    let client = p.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    sb.write_file("/root/note.txt", b"kept".to_vec())
        .await
        .unwrap();
    client.sleep_sandbox(sb.id()).await.unwrap();
    assert_eq!(state(&client, sb.id()).await, SandboxState::Sleeping as i32);
    // A file call wakes it.
    assert_eq!(sb.read_file("/root/note.txt").await.unwrap(), b"kept");
    assert_eq!(state(&client, sb.id()).await, SandboxState::Running as i32);
    client.sleep_sandbox(sb.id()).await.unwrap();
    // So does an exec.
    let out = sb
        .exec(Command::from_argv(["echo", "awake"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"awake\n");
    let info = client.sandbox(sb.id()).await.unwrap();
    assert_eq!(info.info().wake_count, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sandboxes_go_to_sleep_by_themselves() {
    let p = platform(false);
    let client = p.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox").idle_timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(sb.info().idle_timeout_seconds, 2);
    let id = sb.id().to_string();
    let slept = eventually(Duration::from_secs(60), || async {
        state(&client, &id).await == SandboxState::Sleeping as i32
    })
    .await;
    assert!(slept, "an idle sandbox did not go to sleep");
    assert_asleep_without_ram(&p, &id);
    let out = sb.exec(Command::new("true")).await.unwrap();
    assert_eq!(out.exit_code, 0);
}

/// `--template-memory copy` (the default): a clone's RAM is a file in its
/// own run directory, and its jailed VMM cannot see the template's.
fn assert_ram_is_its_own(p: &Platform, id: &str, memory_mib: u64) {
    let dir = run_dir(p, id);
    let mem = std::fs::metadata(dir.join("mem")).unwrap();
    assert_eq!(mem.len(), memory_mib << 20, "{id}'s memory file");
    let pid = std::fs::read_to_string(dir.join("vmm.pid")).unwrap();
    let jail_root = std::path::PathBuf::from(format!("/proc/{}/root", pid.trim()));
    let templates = p.data_dir().join("templates");
    assert!(templates.is_dir());
    let inside = jail_root.join(templates.strip_prefix("/").unwrap());
    assert!(
        !inside.exists(),
        "{id}'s VMM sees the templates ({})",
        inside.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn template_clones_have_their_own_identity() {
    // Ten 1-vCPU clones at once: allow them on a small CI host.
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.templates = true;
    o.extra_args = vec!["--cpu-overcommit".into(), "16".into()];
    let p = Platform::start(o);
    let client = p.client().await;
    let mut seen = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut sandboxes = Vec::new();
    for _ in 0..10 {
        let sb = client
            .create_sandbox(
                CreateOptions::new("busybox")
                    .memory_mib(256)
                    .start_mode(StartMode::Template),
            )
            .await
            .unwrap();
        assert_eq!(sb.info().start_mode, StartMode::Template as i32);
        assert_ram_is_its_own(&p, sb.id(), 256);
        let line = sh(&sb, "echo $(hostname) $(cat /etc/machine-id) $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')").await;
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "{line}");
        assert_eq!(parts[0], sb.id(), "hostname is the sandbox id");
        assert_eq!(parts[1].len(), 32, "machine-id {}", parts[1]);
        seen.0.insert(parts[0].to_string());
        seen.1.insert(parts[1].to_string());
        seen.2.insert(parts[2].to_string());
        sandboxes.push(sb);
    }
    assert_eq!(
        (seen.0.len(), seen.1.len(), seen.2.len()),
        (10, 10, 10),
        "clones share an identity or RNG output"
    );
    // Host reports reach the control plane with its heartbeat (2 s).
    let reported = somna_testkit::eventually(Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            let hosts = client.list_hosts().await.unwrap();
            let t = &hosts[0].templates;
            t.len() == 1 && t[0].clones == 10
        }
    })
    .await;
    assert!(
        reported,
        "the host did not report one template with 10 clones"
    );

    // A clone sleeps (light: its RAM is already a file of its own) and
    // wakes, twice.
    let sb = &sandboxes[0];
    sh(sb, "echo clone-data > /root/f").await;
    for _ in 0..2 {
        client.sleep_sandbox(sb.id()).await.unwrap();
        assert_asleep_without_ram(&p, sb.id());
        client.wake_sandbox(sb.id()).await.unwrap();
        assert_eq!(
            sh(sb, "cat /root/f; hostname").await,
            format!("clone-data\n{}", sb.id())
        );
    }
    for sb in sandboxes {
        sb.destroy().await.unwrap();
    }
}

fn corrupt(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(b"corruption").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_snapshot_fails_the_wake_instead_of_booting_afresh() {
    let p = platform(false);
    let client = p.client().await;
    for damage in ["corrupt memory", "missing state"] {
        let sb = client
            .create_sandbox(CreateOptions::new("busybox"))
            .await
            .unwrap();
        client.sleep_sandbox(sb.id()).await.unwrap();
        let dir = run_dir(&p, sb.id());
        match damage {
            "corrupt memory" => corrupt(&dir.join("mem")),
            _ => std::fs::remove_file(dir.join("state")).unwrap(),
        }
        match client.wake_sandbox(sb.id()).await {
            Err(Error::FailedPrecondition(m)) => {
                assert!(m.contains("snapshot"), "{damage}: {m}");
                assert!(
                    m.contains(if damage == "corrupt memory" {
                        "mem"
                    } else {
                        "state"
                    }),
                    "{damage}: {m}"
                );
            }
            other => panic!(
                "{damage}: expected a failed wake, got {:?}",
                other.map(|s| s.state)
            ),
        }
        let info = client.sandbox(sb.id()).await.unwrap();
        assert_eq!(info.info().state, SandboxState::Failed as i32, "{damage}");
        assert!(
            info.info().failure.contains("snapshot"),
            "{damage}: {}",
            info.info().failure
        );
        // Exec does not boot a fresh VM behind the user's back either.
        assert!(matches!(
            sb.exec(Command::new("true")).await,
            Err(Error::FailedPrecondition(_))
        ));
        assert!(p.vmm_pids().is_empty());
        client.destroy_sandbox(sb.id()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sleep_during_a_streaming_exec_ends_it_with_a_clear_error() {
    let p = platform(false);
    let client = p.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let mut proc_ = sb
        .spawn(Command::from_argv([
            "sh",
            "-c",
            "while true; do echo tick; sleep 0.1; done",
        ]))
        .await
        .unwrap();
    assert!(matches!(
        proc_.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(_))
    ));
    client.sleep_sandbox(sb.id()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match proc_.next_event().await {
                Ok(Some(ExecEvent::Stdout(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the exec stream hung after sleep");
    match ended {
        Err(Error::Api { message, .. }) => assert!(message.contains("sleep"), "{message}"),
        other => panic!("expected an error naming the sleep, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_creates_claim_a_ready_vm() {
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.templates = true;
    // The other way to give clones RAM: the template's file, mapped
    // privately (the template test covers the default, copies).
    o.extra_args = vec![
        "--warm-pool".into(),
        "busybox=1".into(),
        "--template-memory".into(),
        "shared".into(),
    ];
    let p = Platform::start(o);
    let client = p.client().await;
    let pool_ready = || async {
        eventually(Duration::from_secs(120), || async {
            client
                .list_hosts()
                .await
                .map(|h| {
                    h[0].warm_pools
                        .first()
                        .is_some_and(|w| w.ready == 1 && w.target == 1)
                })
                .unwrap_or(false)
        })
        .await
    };
    assert!(pool_ready().await, "the warm pool did not fill");
    let sb = client
        .create_sandbox(CreateOptions::new("busybox").start_mode(StartMode::WarmPool))
        .await
        .unwrap();
    assert_eq!(sb.info().start_mode, StartMode::WarmPool as i32);
    assert_eq!(sh(&sb, "hostname").await, sb.id());
    // A pooled VM keeps the run directory it was pooled in.
    let dir = std::fs::read_dir(p.data_dir().join("vms"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            std::fs::read(d.join("sandbox.json"))
                .ok()
                .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r).ok())
                .is_some_and(|r| r["id"] == sb.id())
        })
        .expect("the claimed VM's run directory");
    assert!(
        !dir.join("mem").exists(),
        "a shared-memory clone has no memory file of its own"
    );
    // The pool refills in the background.
    assert!(pool_ready().await, "the warm pool did not refill");
    // Its first sleep puts its RAM into the snapshot stream; it wakes into
    // a memory file of its own.
    sh(&sb, "echo pooled > /root/f").await;
    client.sleep_sandbox(sb.id()).await.unwrap();
    assert!(dir.join("snapshot.json").exists());
    client.wake_sandbox(sb.id()).await.unwrap();
    assert_eq!(sh(&sb, "cat /root/f").await, "pooled");
    assert!(dir.join("mem").exists());
    sb.destroy().await.unwrap();
}
