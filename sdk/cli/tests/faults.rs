//! Crash consistency: `somna up` is SIGKILLed at named points of create,
//! exec, sleep, wake and destroy (`SOMNA_FAULT`, see
//! `somna_hypervisor_agent::fault`); the client gets a definite error, and
//! the next start-up leaves no VMM process, run directory or cgroup behind.
//! A sandbox that existed before the crash comes back asleep with its
//! files, processes and memory; one whose create or destroy was under way
//! is gone or FAILED with a reason. Real VMs, TCG, root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use somna_sdk::proto::SandboxState;
use somna_sdk::{Client, Command, CreateOptions};
use somna_testkit::{Cluster, ClusterOptions, Options, Platform, eventually};
use tonic::Code;

fn armed(p: &mut Platform, point: &str) {
    p.options_mut().env = vec![("SOMNA_FAULT".into(), point.into())];
}

/// Cgroup directories (any hierarchy) whose name starts with `id`.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(id) {
                out.push(path.clone());
            }
            if depth > 0 {
                walk(&path, id, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, 7, &mut out);
    out
}

/// The crash happened: the process died of SIGKILL.
fn crashed(p: &mut Platform, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let status = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("somna up did not crash at {point}"));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status:?}");
}

/// The run directories' names.
fn dir_names(p: &Platform) -> Vec<String> {
    let mut names: Vec<String> = p
        .vm_dirs()
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// After a restart: no VMM runs (survivors come back asleep), the only run
/// directories are the survivors', and nothing of `ids` is left on the
/// host, each gone or FAILED with a reason.
async fn assert_reconciled(
    p: &Platform,
    client: &Client,
    ids: &[String],
    survivors: &[Survivor],
    point: &str,
) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            p.vmm_pids().is_empty()
        })
        .await,
        "{point}: orphaned VMMs {:?}",
        p.vmm_pids()
    );
    let mut expected: Vec<String> = survivors.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    assert_eq!(dir_names(p), expected, "{point}: run directories");
    for id in ids {
        assert!(
            cgroups_of(id).is_empty(),
            "{point}: cgroups left {:?}",
            cgroups_of(id)
        );
        let listed = eventually(Duration::from_secs(20), || async {
            match client.sandbox(id).await {
                Err(e) => e.code() == Some(Code::NotFound),
                Ok(sb) => sb.info().state == SandboxState::Failed as i32,
            }
        })
        .await;
        assert!(listed, "{point}: sandbox {id} is not in a definite state");
    }
    for s in survivors {
        let asleep = eventually(Duration::from_secs(20), || async {
            client
                .sandbox(&s.id)
                .await
                .is_ok_and(|sb| sb.info().state == SandboxState::Sleeping as i32)
        })
        .await;
        assert!(
            asleep,
            "{point}: {} (crashed at {}) is not back asleep",
            s.id, s.point
        );
    }
}

/// A sandbox that was running when the platform crashed, with what must
/// survive the crash: a file on its disk, and a running process (its
/// memory).
struct Survivor {
    id: String,
    point: &'static str,
    pid: String,
}

/// Creates a sandbox and gives it a file and a running process to check
/// after the crash (exec must not be armed).
async fn survivor(client: &Client, point: &'static str) -> Survivor {
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    sb.write_file("/root/note", point.as_bytes().to_vec())
        .await
        .unwrap();
    let out = sb
        .exec(Command::from_argv([
            "sh",
            "-c",
            "sleep 100000 >/dev/null 2>&1 & echo $!",
        ]))
        .await
        .unwrap();
    Survivor {
        id: sb.id().to_string(),
        point,
        pid: out.stdout_text().trim().to_string(),
    }
}

/// Wakes a survivor (by exec) and checks its file, its process and its
/// memory, then destroys it.
async fn assert_intact(client: &Client, s: &Survivor) {
    let sb = client.sandbox(&s.id).await.unwrap();
    let out = sb
        .exec(Command::from_argv([
            "sh",
            "-c",
            &format!("cat /root/note; echo; kill -0 {} && echo alive", s.pid),
        ]))
        .await
        .unwrap_or_else(|e| panic!("{} (crashed at {}) does not wake: {e}", s.id, s.point));
    assert_eq!(
        out.stdout_text(),
        format!("{}\nalive\n", s.point),
        "{} (crashed at {})",
        s.id,
        s.point
    );
    let info = client.sandbox(&s.id).await.unwrap().info().clone();
    assert!(info.sleep_count >= 1, "{}: {info:?}", s.point);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn crashes_at_each_point_are_reconciled_at_start_up() {
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.env = vec![("SOMNA_FAULT".into(), "create.booted".into())];
    let mut p = Platform::start(o);
    let mut survivors: Vec<Survivor> = Vec::new();

    // create: the VMM is up when the process dies; the sandbox never was.
    let client = p.client().await;
    let err = client
        .create_sandbox(CreateOptions::new("busybox").request_id("fault-create"))
        .await
        .err()
        .expect("the create crashed with the platform");
    assert!(err.code().is_some(), "a definite error: {err}");
    crashed(&mut p, "create.booted");
    let orphans = p.vmm_pids();
    assert_eq!(orphans.len(), 1, "the crash leaves its VMM running");
    let created = dir_names(&p);
    armed(&mut p, "sleep.state_saved");
    p.restart();
    let mut client = p.client().await;
    assert_reconciled(&p, &client, &created, &survivors, "create.booted").await;

    // sleep, twice: state written (the VMM still runs); snapshot sealed.
    for (point, next) in [
        ("sleep.state_saved", "sleep.sealed"),
        ("sleep.sealed", "exec.started"),
    ] {
        let s = survivor(&client, point).await;
        assert!(client.sleep_sandbox(&s.id).await.is_err());
        crashed(&mut p, point);
        survivors.push(s);
        armed(&mut p, next);
        p.restart();
        client = p.client().await;
        assert_reconciled(&p, &client, &[], &survivors, point).await;
    }

    // exec: the command runs in the guest when the platform dies.
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    sb.write_file("/root/note", b"exec.started".to_vec())
        .await
        .unwrap();
    let err = sb
        .exec(Command::from_argv(["sh", "-c", "sleep 100000"]))
        .await
        .expect_err("the exec crashed with the platform");
    assert!(err.code().is_some(), "a definite error: {err}");
    crashed(&mut p, "exec.started");
    let id = sb.id().to_string();
    armed(&mut p, "wake.restored");
    p.restart();
    let mut client = p.client().await;
    survivors.push(Survivor {
        id,
        point: "exec.started",
        pid: String::new(),
    });
    assert_reconciled(&p, &client, &[], &survivors, "exec.started").await;

    // wake: the VMM restored and runs when the platform dies.
    let s = survivor(&client, "wake.restored").await;
    client.sleep_sandbox(&s.id).await.unwrap();
    assert!(client.wake_sandbox(&s.id).await.is_err());
    crashed(&mut p, "wake.restored");
    survivors.push(s);
    armed(&mut p, "destroy.vmm_stopped");
    p.restart();
    client = p.client().await;
    assert_reconciled(&p, &client, &[], &survivors, "wake.restored").await;

    // destroy: gone for good, even though its VMM had stopped only.
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let id = sb.id().to_string();
    assert!(client.destroy_sandbox(&id).await.is_err());
    crashed(&mut p, "destroy.vmm_stopped");
    p.options_mut().env.clear();
    p.restart();
    let client = p.client().await;
    assert_reconciled(&p, &client, &[id], &survivors, "destroy.vmm_stopped").await;

    // Every survivor wakes with its file, its process and its memory.
    for s in &survivors {
        if s.point == "exec.started" {
            // No process to look for: the crashed command's caller is
            // gone, so the guest may end it.
            let sb = client.sandbox(&s.id).await.unwrap();
            let out = sb
                .exec(Command::from_argv(["cat", "/root/note"]))
                .await
                .unwrap();
            assert_eq!(out.stdout_text(), "exec.started");
            sb.destroy().await.unwrap();
        } else {
            assert_intact(&client, s).await;
        }
    }
    assert!(p.vm_dirs().is_empty(), "{:?}", p.vm_dirs());
    for s in &survivors {
        assert!(cgroups_of(&s.id).is_empty(), "{:?}", cgroups_of(&s.id));
    }

    // And the restarted platform works.
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    assert_eq!(
        sb.exec(Command::from_argv(["echo", "ok"]))
            .await
            .unwrap()
            .stdout_text(),
        "ok\n"
    );
    sb.destroy().await.unwrap();
}

/// A separate `somna controlplane` SIGKILLed at each of its own points
/// (`controlplane.*`, see `somna_controlplane::ControlPlaneConfig::fault`),
/// with one `somna agent` that keeps running. The client gets an error;
/// after the restart the store and the host agree again, with no VMM the
/// store does not know: a create that never reached the host is forgotten
/// (its request id creates anew), one the host was working on or had
/// finished runs, a sleep or wake the host answered (or never got) shows
/// the host's state, and a destroy finishes.
#[tokio::test(flavor = "multi_thread")]
async fn control_plane_crashes_at_each_point_are_reconciled() {
    let c = Cluster::start(ClusterOptions::new(env!("CARGO_BIN_EXE_somna"), 1));
    crash_replica_at_each_point(c).await;
}

/// The same points with two replicas on one PostgreSQL database: replica 0
/// crashes at each, replica 1 runs on and settles every row from its own
/// heartbeats (the row, not the replica, carries the state), while replica
/// 0 is restarted beside it for the next point.
#[tokio::test(flavor = "multi_thread")]
async fn control_plane_replica_crashes_are_reconciled_by_the_other_replica() {
    let pg = somna_testkit::Postgres::start();
    let mut options = ClusterOptions::new(env!("CARGO_BIN_EXE_somna"), 1);
    options.replicas = 2;
    options.store = Some(pg.database("faults"));
    let c = Cluster::start(options);
    crash_replica_at_each_point(c).await;
}

/// Crashes replica 0 of `c` at each control-plane fault point while a
/// call goes through it, and checks the state through the last replica
/// (replica 0 itself, restarted, when it is the only one).
async fn crash_replica_at_each_point(mut c: Cluster) {
    let observer = c.addrs.len() - 1;
    // Arms `point` (None: disarms), restarts replica 0 and waits until the
    // agent has dialled it again (it serves images from the host, and the
    // store has heard from the host since). Returns a client of replica 0
    // for the calls and one of the observer for the checks.
    let restart = async |c: &mut Cluster, point: Option<&str>| -> (Client, Client) {
        c.options_mut().controlplane_env = point
            .map(|p| vec![("SOMNA_FAULT".to_string(), p.to_string())])
            .unwrap_or_default();
        let since = std::time::SystemTime::now();
        c.restart_replica(0);
        let client = c.client(0).await;
        let attached = eventually(Duration::from_secs(30), || async {
            client.list_images().await.is_ok()
                && client.list_hosts().await.is_ok_and(|hosts| {
                    hosts.iter().all(|h| {
                        h.last_heartbeat_at.as_ref().is_some_and(|t| {
                            std::time::SystemTime::try_from(*t).is_ok_and(|t| t > since)
                        })
                    })
                })
        })
        .await;
        assert!(
            attached,
            "the agent did not dial the restarted control plane"
        );
        let watcher = c.client(observer).await;
        (client, watcher)
    };
    let crashed = |c: &mut Cluster, point: &str, err: Option<somna_sdk::Error>| {
        use std::os::unix::process::ExitStatusExt;
        let err = err.unwrap_or_else(|| panic!("{point}: the call succeeded"));
        assert!(err.code().is_some(), "{point}: a definite error: {err}");
        let status = c
            .wait_replica_exit(0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the control plane did not crash at {point}"));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status:?}");
    };
    // The store's sandboxes, once the host agrees: as many VMMs as
    // sandboxes not asleep, and a run directory for each.
    let settled = async |c: &Cluster, client: &Client, point: &str, want: usize| {
        let ok = eventually(Duration::from_secs(40), || async {
            let Ok(all) = client.list_sandboxes().await else {
                return false;
            };
            let awake = all
                .iter()
                .filter(|s| s.state != SandboxState::Sleeping as i32)
                .count();
            all.len() == want
                && all.iter().all(|s| {
                    s.state == SandboxState::Running as i32
                        || s.state == SandboxState::Sleeping as i32
                })
                && c.vmm_pids(0).len() == awake
                && c.vm_dirs(0).len() == want
        })
        .await;
        let all = client.list_sandboxes().await.unwrap_or_default();
        assert!(
            ok,
            "{point}: expected {want} sandboxes running or asleep with their VMMs; store: {:?}, VMMs: {:?}, run dirs: {:?}",
            all.iter().map(|s| (&s.id, s.state)).collect::<Vec<_>>(),
            c.vmm_pids(0),
            c.vm_dirs(0)
        );
        all
    };
    let small = |rid: &str| {
        CreateOptions::new("busybox")
            .memory_mib(256)
            .request_id(rid)
    };

    // create: the row is written, the host never asked.
    let (client, _) = restart(&mut c, Some("controlplane.create.recorded")).await;
    let err = client.create_sandbox(small("cp-recorded")).await.err();
    crashed(&mut c, "create.recorded", err);
    let (client, watcher) = restart(&mut c, Some("controlplane.create.in_flight")).await;
    settled(&c, &watcher, "create.recorded", 0).await;

    // create: the host is booting the VM when the control plane dies; it
    // finishes, and the restarted control plane finds it.
    let err = client.create_sandbox(small("cp-in-flight")).await.err();
    crashed(&mut c, "create.in_flight", err);
    let (client, watcher) = restart(&mut c, Some("controlplane.create.answered")).await;
    let all = settled(&c, &watcher, "create.in_flight", 1).await;
    let first = all[0].id.clone();
    assert_eq!(all[0].request_id, "cp-in-flight");
    // The same request id answers with that sandbox.
    let again = client.create_sandbox(small("cp-in-flight")).await.unwrap();
    assert_eq!(again.id(), first);

    // create: the host answered, the row still says creating.
    let err = client.create_sandbox(small("cp-answered")).await.err();
    crashed(&mut c, "create.answered", err);
    let (client, watcher) = restart(&mut c, Some("controlplane.sleep.answered")).await;
    let all = settled(&c, &watcher, "create.answered", 2).await;
    let second = all.iter().find(|s| s.id != first).unwrap().id.clone();

    // sleep: the host slept it, the row still says running.
    let err = client.sleep_sandbox(&first).await.err();
    crashed(&mut c, "sleep.answered", err);
    let (client, watcher) = restart(&mut c, Some("controlplane.wake.recorded")).await;
    let all = settled(&c, &watcher, "sleep.answered", 2).await;
    let state_of = |all: &[somna_sdk::proto::Sandbox], id: &str| {
        all.iter().find(|s| s.id == id).map(|s| s.state)
    };
    assert_eq!(state_of(&all, &first), Some(SandboxState::Sleeping as i32));

    // wake: the row says waking, the host was never asked.
    let err = client.wake_sandbox(&first).await.err();
    crashed(&mut c, "wake.recorded", err);
    let (client, watcher) = restart(&mut c, Some("controlplane.destroy.recorded")).await;
    let all = settled(&c, &watcher, "wake.recorded", 2).await;
    assert_eq!(state_of(&all, &first), Some(SandboxState::Sleeping as i32));
    let out = client
        .attach(&first)
        .exec(Command::from_argv(["echo", "awake"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "awake\n");

    // destroy: the row says destroying, the host was never asked. The
    // restarted control plane finishes it (unarmed: that destroy passes
    // the same points).
    let err = client.destroy_sandbox(&first).await.err();
    crashed(&mut c, "destroy.recorded", err);
    let (_, watcher) = restart(&mut c, None).await;
    settled(&c, &watcher, "destroy.recorded", 1).await;

    // destroy: the host destroyed it, the row still says destroying.
    let (client, _) = restart(&mut c, Some("controlplane.destroy.answered")).await;
    let err = client.destroy_sandbox(&second).await.err();
    crashed(&mut c, "destroy.answered", err);
    let (client, watcher) = restart(&mut c, None).await;
    settled(&c, &watcher, "destroy.answered", 0).await;

    // The create that never reached the host is made by its retry.
    let retried = client.create_sandbox(small("cp-recorded")).await.unwrap();
    let out = retried
        .exec(Command::from_argv(["echo", "ok"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "ok\n");
    retried.destroy().await.unwrap();
    settled(&c, &watcher, "end", 0).await;
}
