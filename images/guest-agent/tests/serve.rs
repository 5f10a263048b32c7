//! Health, shutdown and the chroot path of dev mode.

mod common;

use std::os::unix::fs::symlink;
use std::time::Duration;

use common::{Agent, SANDBOX_ID, run, start};
use somna_proto::guest::v1::{HealthRequest, ShutdownRequest};

#[tokio::test]
async fn health() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path());
    let mut c = agent.client().await;
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.sandbox_id, SANDBOX_ID);
    assert!(!h.kernel.is_empty());
    assert!(h.uptime_ms > 0);
}

#[tokio::test]
async fn shutdown_stops_dev_mode() {
    let root = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(root.path());
    let mut c = agent.client().await;
    c.shutdown(ShutdownRequest {}).await.unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exited after Shutdown");
    assert!(status.success(), "{status:?}");
    assert!(!agent.socket.exists());
}

/// A root with only busybox in it: exec'd processes must see that root.
#[tokio::test]
async fn exec_is_chrooted_into_the_root() {
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() {
        panic!("this test needs /bin/busybox (apt-get install -y busybox-static)");
    }
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("home/alice")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "cat", "id", "pwd"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1500:1600::/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nalice:x:1600:\nstaff:x:50:alice\n",
    )
    .unwrap();
    std::fs::write(outer.path().join("marker"), "outside").unwrap();

    let agent = Agent::start(&root);
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["sh", "-c", "ls /; cat /../marker; pwd"])).await;
    let stdout = out.stdout();
    let listing: Vec<&str> = stdout.lines().take(3).collect();
    assert_eq!(
        listing,
        vec!["bin", "etc", "home"],
        "stdout {stdout:?} stderr {:?}",
        out.stderr()
    );
    assert!(!stdout.contains("outside"));
    assert!(stdout.ends_with("/\n"));

    let mut s = start(&["sh", "-c", "id -u; id -g; id -G; echo $HOME; pwd"]);
    s.user = "alice".into();
    s.cwd = "/home/alice".into();
    let out = run(&mut c, s).await;
    assert_eq!(
        out.stdout(),
        "1500\n1600\n1600 50\n/home/alice\n/home/alice\n",
        "stderr {:?}",
        out.stderr()
    );

    // Users are looked up in the root's passwd, not the host's.
    let mut s = start(&["id"]);
    s.user = "nobody".into();
    let err = common::exec(&mut c, s)
        .await
        .err()
        .expect("nobody is unknown in this root");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Programs are looked up inside the root too.
    let out = run(&mut c, start(&["stty"])).await;
    assert_eq!(out.exit().exit_code, 127);
}
