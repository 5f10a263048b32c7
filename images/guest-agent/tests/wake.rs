//! Wake (after a snapshot restore): identity, wake count, hooks and the
//! clock, against dev-mode agents with busybox roots. Dev mode never sets
//! the host's clock or hostname.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Agent, Client, SANDBOX_ID, busybox_root, run, start, wait_until};
use somna_proto::guest::v1::{HealthRequest, Identity, WakeRequest, WakeResponse};
use somna_proto::v1::StatFileRequest;
use tonic::Code;

const NEW_ID: &str = "sbx-clone0000001";
const NEW_HOST: &str = "clone-host";
const NEW_MACHINE_ID: &str = "0123456789abcdef0123456789abcdef";

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn wake_request(identity: Option<Identity>) -> WakeRequest {
    WakeRequest {
        unix_time_ns: now_ns(),
        entropy: (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect(),
        identity,
    }
}

fn new_identity() -> Identity {
    Identity {
        sandbox_id: NEW_ID.into(),
        hostname: NEW_HOST.into(),
        machine_id: NEW_MACHINE_ID.into(),
    }
}

async fn wake(c: &mut Client, req: WakeRequest) -> Result<WakeResponse, tonic::Status> {
    c.wake(req).await.map(|r| r.into_inner())
}

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
}

#[tokio::test]
async fn wake_takes_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    busybox_root(&root, &["sh", "cat"]);
    let host_name_before = host_hostname();
    let agent = Agent::start(&root);

    // An earlier connection asks for Health and goes away (the old host
    // process, before the snapshot).
    let mut old = agent.client().await;
    let h = old.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.sandbox_id, SANDBOX_ID);
    assert_eq!(h.wake_count, 0);
    assert_eq!(h.machine_id, "", "dev mode writes no machine id by itself");
    drop(old);

    // Wake is the first RPC on the new connection.
    let mut c = agent.client().await;
    let r = wake(&mut c, wake_request(Some(new_identity())))
        .await
        .unwrap();
    assert_eq!(r.wake_count, 1);

    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.sandbox_id, NEW_ID);
    assert_eq!(h.hostname, NEW_HOST);
    assert_eq!(h.machine_id, NEW_MACHINE_ID);
    assert_eq!(h.wake_count, 1);

    let id_file = root.join("etc/machine-id");
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap(),
        format!("{NEW_MACHINE_ID}\n")
    );
    let mode = std::fs::metadata(&id_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o444);
    let etc: Vec<_> = std::fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(etc, vec!["machine-id"], "no temp files left behind");

    // The old sandbox id is now refused, by exec and the files API alike.
    let mut s = start(&["true"]);
    s.sandbox_id = SANDBOX_ID.into();
    let err = common::exec(&mut c, s).await.err().expect("old id refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c
        .stat_file(StatFileRequest {
            sandbox_id: SANDBOX_ID.into(),
            path: "/etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The new one works; new processes get the new hostname.
    let mut s = start(&["sh", "-c", "echo $HOSTNAME; cat /etc/machine-id"]);
    s.sandbox_id = NEW_ID.into();
    let out = run(&mut c, s).await;
    assert_eq!(
        out.stdout(),
        format!("{NEW_HOST}\n{NEW_MACHINE_ID}\n"),
        "stderr {:?}",
        out.stderr()
    );
    assert_eq!(out.exit().exit_code, 0);
    c.stat_file(StatFileRequest {
        sandbox_id: NEW_ID.into(),
        path: "/etc/machine-id".into(),
    })
    .await
    .unwrap();

    // An empty hostname means the sandbox id.
    let r = wake(
        &mut c,
        wake_request(Some(Identity {
            sandbox_id: "sbx-second".into(),
            hostname: String::new(),
            machine_id: "fedcba9876543210fedcba9876543210".into(),
        })),
    )
    .await
    .unwrap();
    assert_eq!(r.wake_count, 2);
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (h.sandbox_id.as_str(), h.hostname.as_str()),
        ("sbx-second", "sbx-second")
    );
    assert_eq!(h.machine_id, "fedcba9876543210fedcba9876543210");

    // Dev mode leaves the host's hostname alone.
    assert_eq!(host_hostname(), host_name_before);
}

#[tokio::test]
async fn invalid_wakes_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path());
    let mut c = agent.client().await;

    for bad in ["", "0123456789ABCDEF0123456789ABCDEF", "0123", "not-hex"] {
        let err = wake(
            &mut c,
            wake_request(Some(Identity {
                machine_id: bad.into(),
                ..new_identity()
            })),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("identity.machine_id"),
            "{}",
            err.message()
        );
    }
    let err = wake(
        &mut c,
        wake_request(Some(Identity {
            hostname: "no spaces".into(),
            ..new_identity()
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("identity.hostname"), "{err:?}");
    let err = wake(
        &mut c,
        wake_request(Some(Identity {
            sandbox_id: String::new(),
            ..new_identity()
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("identity.sandbox_id"), "{err:?}");

    let mut short = wake_request(Some(new_identity()));
    short.entropy.truncate(31);
    let err = wake(&mut c, short).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("entropy"), "{}", err.message());

    let mut no_time = wake_request(None);
    no_time.unix_time_ns = 0;
    let err = wake(&mut c, no_time).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Nothing was applied.
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.sandbox_id, SANDBOX_ID);
    assert_eq!(h.wake_count, 0);
    assert_eq!(h.machine_id, "");
    assert!(!root.path().join("etc").exists());
    assert!(!root.path().join("run").exists());
}

/// The agent's children (zombies included: they stay listed until reaped).
fn children(pid: u32) -> Vec<String> {
    let mut all = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return all;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            all.extend(text.split_whitespace().map(str::to_string));
        }
    }
    all
}

fn hook(root: &Path, name: &str, body: &str, mode: u32) {
    let dir = root.join("etc/somna/wake.d");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/busybox sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn wake_count_and_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    busybox_root(&root, &["sh", "mv", "sleep", "cat"]);
    // Writes a marker per wake (atomically: the test polls for it).
    hook(
        &root,
        "10-marker",
        "echo \"$SOMNA_WAKE_COUNT $HOSTNAME $(pwd)\" > /.m$$ && mv /.m$$ /marker-$SOMNA_WAKE_COUNT\n",
        0o755,
    );
    // Blocks until the test says go (bounded): Wake must not wait for it.
    hook(
        &root,
        "20-slow",
        "i=0\nwhile [ ! -e /go ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done\n\
         echo $SOMNA_WAKE_COUNT > /.s$$ && mv /.s$$ /slow-$SOMNA_WAKE_COUNT\n",
        0o755,
    );
    // Not executable, or hidden: never run.
    hook(&root, "15-data", "echo ran > /data-ran\n", 0o644);
    hook(&root, ".hidden", "echo ran > /hidden-ran\n", 0o755);

    let agent = Agent::start(&root);
    let pid = agent.pid().unwrap();
    let mut c = agent.client().await;

    let r = wake(&mut c, wake_request(None)).await.unwrap();
    assert_eq!(r.wake_count, 1);
    assert_eq!(
        std::fs::read_to_string(root.join("run/somna/wake-count")).unwrap(),
        "1\n"
    );
    // The slow hook is still waiting: Wake answered without it.
    assert!(!root.join("slow-1").exists());
    assert!(
        wait_until(Duration::from_secs(10), || root.join("marker-1").exists()).await,
        "the wake hook did not run"
    );
    let hostname = host_hostname();
    assert_eq!(
        std::fs::read_to_string(root.join("marker-1")).unwrap(),
        format!("1 {} /\n", hostname.trim())
    );

    // The count file is rewritten in place (same inode), for watchers.
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(root.join("run/somna/wake-count")).unwrap(),
    );
    let r = wake(&mut c, wake_request(Some(new_identity())))
        .await
        .unwrap();
    assert_eq!(r.wake_count, 2);
    let count_file = root.join("run/somna/wake-count");
    assert_eq!(std::fs::read_to_string(&count_file).unwrap(), "2\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&count_file).unwrap()),
        ino
    );
    assert!(
        wait_until(Duration::from_secs(10), || root.join("marker-2").exists()).await,
        "the wake hook did not run the second time"
    );
    // Hooks see the identity the Wake brought.
    assert_eq!(
        std::fs::read_to_string(root.join("marker-2")).unwrap(),
        format!("2 {NEW_HOST} /\n")
    );
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.wake_count, 2);

    std::fs::write(root.join("go"), "").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || root.join("slow-1").exists()
            && root.join("slow-2").exists())
        .await,
        "the slow hooks did not finish"
    );
    // Every hook was reaped: no children (zombies included) are left.
    assert!(
        wait_until(Duration::from_secs(10), || children(pid).is_empty()).await,
        "the agent still has children: {:?}",
        children(pid)
    );
    assert!(!root.join("data-ran").exists());
    assert!(!root.join("hidden-ran").exists());
}

#[tokio::test]
async fn clock_step_is_measured_not_applied_in_dev_mode() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path());
    let mut c = agent.client().await;

    let before = SystemTime::now();
    let mut req = wake_request(None);
    req.unix_time_ns = now_ns() + 10_000_000_000;
    let r = wake(&mut c, req).await.unwrap();
    assert!(
        (9_000..=10_000).contains(&r.clock_step_ms),
        "clock_step_ms {}",
        r.clock_step_ms
    );
    let mut req = wake_request(None);
    req.unix_time_ns = now_ns() - 10_000_000_000;
    let r = wake(&mut c, req).await.unwrap();
    assert!(
        (-11_000..=-10_000).contains(&r.clock_step_ms),
        "clock_step_ms {}",
        r.clock_step_ms
    );
    assert_eq!(r.wake_count, 2);
    // The host's clock moved on normally: not +10 s, not -10 s.
    let elapsed = SystemTime::now()
        .duration_since(before)
        .expect("the host clock went backwards");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}
