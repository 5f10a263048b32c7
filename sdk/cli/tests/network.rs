//! Sandbox networking end to end (`somna up --network`, root): real
//! microVMs on netd slots, talking only to an "internet" namespace this
//! test creates (the platform's egress is that namespace's uplink).

use std::time::Duration;

use somna_netd::Egress;
use somna_netd::testing::{Internet, TcpServer};
use somna_sdk::proto::{NetworkPolicy, SandboxState};
use somna_sdk::{Client, Command, CreateOptions, Sandbox};
use somna_testkit::{Options, Platform, eventually};

/// The internet namespace (with an echo server) and a platform whose
/// sandbox traffic leaves only towards it. Field order: the platform (and
/// its netd) goes before the namespace it uses as egress.
struct World {
    platform: Platform,
    server: TcpServer,
    _inet: Internet,
}

fn world(n: u8) -> Option<World> {
    world_with(n, &[])
}

/// [`world`] with extra `somna up` arguments.
fn world_with(n: u8, extra: &[&str]) -> Option<World> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: sandbox networking needs root");
        return None;
    }
    let inet = Internet::create(
        &format!("somnae{n}"),
        format!("203.0.113.{}/30", 64 + 4 * u32::from(n))
            .parse()
            .unwrap(),
    )
    .expect("create the internet namespace");
    let server = TcpServer::spawn(inet.listen(8080).unwrap(), true).unwrap();
    let Egress::Interface(uplink) = inet.egress() else {
        unreachable!("Internet::egress is an interface")
    };
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.extra_args = [
        "--network",
        "--network-prefix",
        &format!("somnaq{n}"),
        "--network-subnet",
        &format!("100.126.{n}.0/24"),
        "--network-pool",
        "2",
        "--network-egress",
        &uplink,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Some(World {
        platform: Platform::start(o),
        server,
        _inet: inet,
    })
}

/// Sends a line to the internet's echo server from inside the sandbox;
/// true when it came back.
async fn reaches(sb: &Sandbox, server: &TcpServer) -> bool {
    let a = server.addr();
    let script = format!(
        "echo somna-ping | nc -w 5 {} {} 2>/dev/null",
        a.ip(),
        a.port()
    );
    let out = sb
        .exec(Command::from_argv(["sh", "-c", &script]))
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("somna-ping")
}

async fn guest_has_address(sb: &Sandbox) {
    // /proc/net/fib_trie lists the local addresses (no `ip` needed).
    let out = sb
        .exec(Command::from_argv(["cat", "/proc/net/fib_trie"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("172.16.0.2"),
        "eth0 has the slot contract's address:\n{text}"
    );
}

async fn tx_bytes(client: &Client, id: &str) -> u64 {
    let sb = client.sandbox(id).await.unwrap();
    sb.info().network.as_ref().map(|n| n.tx_bytes).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn internet_on_reaches_outside_and_internet_off_does_not() {
    let _shared = somna_testkit::not_while_measuring().await;
    let Some(w) = world(1) else { return };
    let client = w.platform.client().await;
    let on = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let off = client
        .create_sandbox(CreateOptions::new("busybox").no_internet(true))
        .await
        .unwrap();
    guest_has_address(&on).await;
    guest_has_address(&off).await;
    assert!(reaches(&on, &w.server).await, "internet on: reaches it");
    assert!(
        !reaches(&off, &w.server).await,
        "internet off: blocked by the slot's eBPF policy"
    );
    // Counters come to the control plane with the host's heartbeat.
    assert!(
        eventually(Duration::from_secs(20), || async {
            tx_bytes(&client, on.id()).await > 0
        })
        .await,
        "network counters of the sandbox that sent traffic"
    );

    // Policies change live, without restarting anything: `off` gets the
    // internet, `on` loses the server's address through its deny list.
    let server_net = format!("{}/32", w.server.addr().ip());
    let opened = client
        .update_sandbox_network(off.id(), NetworkPolicy::default())
        .await
        .unwrap();
    assert_eq!(opened.network_policy, Some(NetworkPolicy::default()));
    assert!(reaches(&off, &w.server).await, "internet turned on live");
    let denied = client
        .update_sandbox_network(
            on.id(),
            NetworkPolicy {
                deny_out: vec![server_net.clone()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        denied.network_policy.map(|p| p.deny_out),
        Some(vec![server_net])
    );
    assert!(!reaches(&on, &w.server).await, "deny list applied live");
    match client
        .update_sandbox_network(
            on.id(),
            NetworkPolicy {
                allow_out: vec!["10.0.0.0/33".into()],
                ..Default::default()
            },
        )
        .await
    {
        Err(somna_sdk::Error::InvalidArgument(m)) => assert!(m.contains("allow_out"), "{m}"),
        other => panic!("a bad CIDR in an update: {other:?}"),
    }

    // Bad rules are INVALID_ARGUMENT naming the field.
    let err = match client
        .create_sandbox(
            CreateOptions::new("busybox")
                .allow_out("10.0.0.0/8")
                .deny_out("10.0.0.0/8"),
        )
        .await
    {
        Ok(_) => panic!("a CIDR in both lists was accepted"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("deny_out") || err.to_string().contains("allow_out"),
        "{err}"
    );
    on.destroy().await.unwrap();
    off.destroy().await.unwrap();
}

/// A VM restored from its snapshot on another slot keeps working
/// networking: the guest side is the same on every slot.
#[tokio::test(flavor = "multi_thread")]
async fn woken_sandbox_on_another_slot_has_network() {
    let _shared = somna_testkit::not_while_measuring().await;
    let Some(w) = world(2) else { return };
    let client = w.platform.client().await;
    let a = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    assert!(reaches(&a, &w.server).await);
    let slept = client.sleep_sandbox(a.id()).await.unwrap();
    assert_eq!(slept.state, SandboxState::Sleeping as i32);
    // The slot `a` gave back is the next one claimed: `b` takes it, so `a`
    // wakes on a different one.
    let b = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let woke = client.wake_sandbox(a.id()).await.unwrap();
    assert_eq!(woke.state, SandboxState::Running as i32);
    guest_has_address(&a).await;
    assert!(reaches(&a, &w.server).await, "woken sandbox reaches out");
    assert!(reaches(&b, &w.server).await, "the other sandbox too");
    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
}

/// Network traffic counts as activity for the idle timeout: a sandbox
/// whose only activity is a background process talking to the outside
/// stays awake, and sleeps once that process stops.
#[tokio::test(flavor = "multi_thread")]
async fn network_traffic_keeps_a_sandbox_awake() {
    let _shared = somna_testkit::not_while_measuring().await;
    let Some(w) = world(3) else { return };
    let client = w.platform.client().await;
    let idle = Duration::from_secs(2);
    let sb = client
        .create_sandbox(CreateOptions::new("busybox").idle_timeout(idle))
        .await
        .unwrap();
    let a = w.server.addr();
    let script = format!(
        "(while :; do echo x | nc -w 1 {} {}; sleep 0.2; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/talker.pid",
        a.ip(),
        a.port()
    );
    let out = sb
        .exec(Command::from_argv(["sh", "-c", &script]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    let started = std::time::Instant::now();

    // Three idle timeouts without exec or file activity: it must stay
    // awake, and keep sending, all along.
    let mut last_tx = 0;
    while started.elapsed() < idle * 3 {
        let info = client.sandbox(sb.id()).await.unwrap().info().clone();
        assert_eq!(
            info.state,
            SandboxState::Running as i32,
            "slept after {:?} while its network was busy",
            started.elapsed()
        );
        last_tx = info.network.map(|n| n.tx_bytes).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(last_tx > 0, "the background process sent traffic");

    let out = sb
        .exec(Command::from_argv([
            "sh",
            "-c",
            "kill $(cat /tmp/talker.pid)",
        ]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.sandbox(sb.id()).await.unwrap().info().state == SandboxState::Sleeping as i32
        })
        .await,
        "a quiet sandbox sleeps after its idle timeout"
    );
    sb.destroy().await.unwrap();
}

const UPLINK: &str = somna_netd::contract::SLOT_VETH_NAME;
const TAP: &str = somna_netd::contract::TAP_NAME;

/// Packets the token buckets on `dev` of this world's slots delayed or
/// dropped (`tc -s qdisc` in each slot namespace `<prefix>-s*`).
fn shaped_packets(prefix: &str, dev: &str) -> u64 {
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let mut total = 0;
    for ns in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-s")))
    {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev",
            ])
            .arg(dev)
            .output()
            .unwrap();
        let qdiscs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for q in qdiscs.as_array().into_iter().flatten() {
            if q["kind"] == "tbf" {
                total += q["overlimits"].as_u64().unwrap_or(0) + q["drops"].as_u64().unwrap_or(0);
            }
        }
    }
    total
}

/// A guest flooding the network is held to its egress rate (its slot's
/// token bucket delays and drops the excess) while its neighbour keeps
/// answering within 2x of its idle exec latency.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_flooding_the_network_is_rate_limited() {
    let _alone = somna_testkit::measuring_alone().await;
    flood_meets_its_shaper(4, &["--network-egress-mbit", "8"], UPLINK).await;
}

/// Traffic towards a guest is held to its ingress rate: the guest sends
/// unshaped, the echo of its flood meets the token bucket on its TAP, and
/// its neighbour keeps answering within 2x of its idle exec latency.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_towards_a_guest_is_rate_limited() {
    let _alone = somna_testkit::measuring_alone().await;
    let limits = ["--network-egress-mbit", "0", "--network-ingress-mbit", "8"];
    flood_meets_its_shaper(5, &limits, TAP).await;
}

/// In world `n` started with `limits`, a guest sends 64 MiB to the echo
/// server: the shaper on `dev` of its slot must delay or drop packets,
/// and a neighbour must stay responsive and online.
async fn flood_meets_its_shaper(n: u8, limits: &[&str], dev: &str) {
    let Some(w) = world_with(n, limits) else {
        return;
    };
    let prefix = format!("somnaq{n}");
    let client = w.platform.client().await;
    let neighbour = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let idle = somna_testkit::exec_latency(&neighbour).await;
    assert_eq!(
        shaped_packets(&prefix, dev),
        0,
        "nothing shaped before the flood"
    );

    let flood = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let a = w.server.addr();
    // 64 MiB (and its echo) at 8 Mbit/s would take over a minute: it runs
    // throughout.
    flood
        .exec(Command::from_argv([
            "sh",
            "-c",
            &format!(
                "(dd if=/dev/zero bs=64k count=1024 2>/dev/null | nc {} {} >/dev/null) >/dev/null 2>&1 &",
                a.ip(),
                a.port()
            ),
        ]))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            shaped_packets(&prefix, dev) > 0
        })
        .await,
        "the flood never met the shaper on {dev} of its slot"
    );
    somna_testkit::assert_neighbour_fine(&neighbour, idle, "a network flood").await;
    assert!(
        reaches(&neighbour, &w.server).await,
        "the neighbour still reaches the internet"
    );
    flood.destroy().await.unwrap();
    neighbour.destroy().await.unwrap();
}
