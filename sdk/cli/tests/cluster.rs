//! Many hosts behind one control plane: three `somna agent` processes
//! (separate data directories) joined to `somna controlplane`, with real
//! microVMs. Placement policies, host loss, control-plane restarts, and
//! a burst of concurrent creates.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use somna_sdk::proto::SandboxState;
use somna_sdk::{Command, CreateOptions, Error};
use somna_testkit::{Cluster, ClusterOptions, Options, Platform, eventually};

fn cluster(agents: usize, cp_args: &[&str]) -> Cluster {
    let mut o = ClusterOptions::new(env!("CARGO_BIN_EXE_somna"), agents);
    o.controlplane_args = cp_args.iter().map(|s| s.to_string()).collect();
    Cluster::start(o)
}

fn small() -> CreateOptions {
    CreateOptions::new("busybox").memory_mib(256)
}

async fn hosts_of(client: &somna_sdk::Client) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for s in client.list_sandboxes().await.unwrap() {
        *count.entry(s.host).or_insert(0) += 1;
    }
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn spread_uses_every_host_and_pack_fills_one() {
    let spread = cluster(3, &["--policy", "spread"]);
    let client = spread.client(0).await;
    for _ in 0..3 {
        client.create_sandbox(small()).await.unwrap();
    }
    let placed = hosts_of(&client).await;
    assert_eq!(
        placed.len(),
        3,
        "spread: one sandbox per host, got {placed:?}"
    );
    drop(spread);

    let pack = cluster(3, &["--policy", "pack"]);
    let client = pack.client(0).await;
    for _ in 0..3 {
        client.create_sandbox(small()).await.unwrap();
    }
    let placed = hosts_of(&client).await;
    assert_eq!(placed.len(), 1, "pack: all on one host, got {placed:?}");
    let out = pack.cli().args(["--json", "host", "ls"]).output().unwrap();
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let allocated: Vec<u64> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["cpus_allocated"].as_u64().unwrap())
        .collect();
    let mut sorted = allocated.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![0, 0, 3],
        "host ls shows the allocation: {hosts}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_loses_its_sandboxes_and_a_restarted_control_plane_keeps_all() {
    let mut c = cluster(3, &["--policy", "spread", "--lost-after", "4"]);
    let client = c.client(0).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            client
                .create_sandbox(small())
                .await
                .unwrap()
                .id()
                .to_string(),
        );
    }
    let on_host0: Vec<String> = client
        .list_sandboxes()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.host == c.host_id(0))
        .map(|s| s.id)
        .collect();
    assert_eq!(on_host0.len(), 1);

    // The control plane restarts (SIGKILL, same store): every sandbox is
    // still there and usable once the agents have redialled.
    c.restart_replica(0);
    c.wait_for_hosts(3);
    let client = c.client(0).await;
    let listed: HashSet<String> = client
        .list_sandboxes()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect::<HashSet<_>>());
    // Until an agent has redialled, calls for its sandboxes answer
    // UNAVAILABLE; then they work again.
    let all_usable = eventually(Duration::from_secs(30), || {
        let client = client.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                match client.attach(id).exec(Command::new("true")).await {
                    Ok(out) => assert!(out.success(), "exec in {id} after the restart: {out:?}"),
                    Err(Error::Unavailable(_)) => return false,
                    Err(e) => panic!("exec in {id} after the restart: {e:?}"),
                }
            }
            true
        }
    })
    .await;
    assert!(
        all_usable,
        "sandboxes not usable after the control plane restarted"
    );

    // Host 0 dies: its sandbox becomes LOST within the heartbeat window,
    // the others stay running and usable.
    c.kill_agent(0);
    let lost_id = on_host0[0].clone();
    let lost = eventually(Duration::from_secs(20), || {
        let client = client.clone();
        let id = lost_id.clone();
        async move {
            client
                .sandbox(&id)
                .await
                .is_ok_and(|s| s.info().state == SandboxState::Lost as i32)
        }
    })
    .await;
    assert!(lost, "the dead host's sandbox was not marked lost");
    match client.attach(&lost_id).exec(Command::new("true")).await {
        Err(Error::Unavailable(m)) => assert!(m.contains("lost"), "{m}"),
        other => panic!("exec on a lost sandbox: {other:?}"),
    }
    for id in ids.iter().filter(|id| **id != lost_id) {
        let s = client.sandbox(id).await.unwrap();
        assert_eq!(s.info().state, SandboxState::Running as i32);
        assert!(
            client
                .attach(id)
                .exec(Command::new("true"))
                .await
                .unwrap()
                .success()
        );
    }
    // New sandboxes avoid the lost host.
    let fresh = client.create_sandbox(small()).await.unwrap();
    assert_ne!(fresh.info().host, c.host_id(0));
}

/// 50 creates at once against one host: each either runs or fails with
/// RESOURCE_EXHAUSTED naming what ran out; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_creates_succeed_or_fail_clearly() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let client = platform.client().await;
    let results = futures::future::join_all((0..50).map(|i| {
        let client = client.clone();
        async move {
            client
                .create_sandbox(small().request_id(format!("burst-{i}")))
                .await
                .map(|s| s.id().to_string())
        }
    }))
    .await;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(id) => created.push(id),
            Err(Error::ResourceExhausted(m)) => {
                assert!(
                    m.contains("out of vCPUs") || m.contains("out of memory"),
                    "unclear error: {m}"
                )
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert!(!created.is_empty(), "no create succeeded");
    let unique: HashSet<&String> = created.iter().collect();
    assert_eq!(unique.len(), created.len(), "duplicate ids");
    let listed: HashSet<String> = client
        .list_sandboxes()
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            assert_eq!(s.state, SandboxState::Running as i32, "{}", s.id);
            s.id
        })
        .collect();
    assert_eq!(
        listed,
        created.iter().cloned().collect::<HashSet<_>>(),
        "listing = successes"
    );
    assert_eq!(
        platform.vmm_pids().len(),
        created.len(),
        "one VMM per sandbox"
    );
}
