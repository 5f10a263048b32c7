//! Crash consistency: `somna up` is SIGKILLed at named points of create,
//! exec, sleep, wake and destroy (`SOMNA_FAULT`, see
//! `somna_hypervisor_agent::fault`); the client gets a definite error, and
//! the next start-up leaves no VMM process, run directory or cgroup behind
//! and reports every sandbox in a definite state. Real VMs, TCG, root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use somna_sdk::proto::SandboxState;
use somna_sdk::{Client, Command, CreateOptions};
use somna_testkit::{Options, Platform, eventually};
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

/// After a restart: nothing of `ids` left on the host, and each is gone or
/// FAILED with a reason.
async fn assert_reconciled(p: &Platform, client: &Client, ids: &[String], point: &str) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            p.vmm_pids().is_empty()
        })
        .await,
        "{point}: orphaned VMMs {:?}",
        p.vmm_pids()
    );
    assert!(
        p.vm_dirs().is_empty(),
        "{point}: run directories left {:?}",
        p.vm_dirs()
    );
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
}

#[tokio::test]
async fn crashes_at_each_point_are_reconciled_at_start_up() {
    let mut o = Options::new(env!("CARGO_BIN_EXE_somna"));
    o.env = vec![("SOMNA_FAULT".into(), "create.booted".into())];
    let mut p = Platform::start(o);

    // create: the VMM is up when the process dies.
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
    let created: Vec<String> = p
        .vm_dirs()
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    armed(&mut p, "exec.started");
    p.restart();
    let client = p.client().await;
    assert_reconciled(&p, &client, &created, "create.booted").await;

    // exec
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let id = sb.id().to_string();
    assert!(sb.exec(Command::new("true")).await.is_err());
    crashed(&mut p, "exec.started");
    armed(&mut p, "sleep.state_saved");
    p.restart();
    let mut client = p.client().await;
    assert_reconciled(&p, &client, &[id], "exec.started").await;

    // sleep, twice: state written; snapshot sealed.
    for (point, next) in [
        ("sleep.state_saved", "sleep.sealed"),
        ("sleep.sealed", "wake.restored"),
    ] {
        let sb = client
            .create_sandbox(CreateOptions::new("busybox"))
            .await
            .unwrap();
        let id = sb.id().to_string();
        assert!(client.sleep_sandbox(&id).await.is_err());
        crashed(&mut p, point);
        armed(&mut p, next);
        p.restart();
        client = p.client().await;
        assert_reconciled(&p, &client, &[id], point).await;
    }

    // wake
    let sb = client
        .create_sandbox(CreateOptions::new("busybox"))
        .await
        .unwrap();
    let id = sb.id().to_string();
    client.sleep_sandbox(&id).await.unwrap();
    assert!(client.wake_sandbox(&id).await.is_err());
    crashed(&mut p, "wake.restored");
    armed(&mut p, "destroy.vmm_stopped");
    p.restart();
    let client = p.client().await;
    assert_reconciled(&p, &client, &[id], "wake.restored").await;

    // destroy
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
    assert_reconciled(&p, &client, &[id], "destroy.vmm_stopped").await;

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
