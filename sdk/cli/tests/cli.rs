//! The `somna` CLI path end to end: create, exec, cp, ls, rm.

use std::io::Write;
use std::process::{Output, Stdio};

use somna_testkit::{Options, Platform};

fn run(platform: &Platform, args: &[&str]) -> Output {
    platform.cli().args(args).output().expect("run somna")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cli_create_exec_cp_ls_rm() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let tmp = tempfile::tempdir().unwrap();

    let out = run(
        &platform,
        &[
            "sandbox",
            "create",
            "--image",
            "busybox",
            "--env",
            "GREETING=hi",
            "--cpus",
            "1",
            "--memory",
            "256",
        ],
    );
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout(&out).trim().to_string();
    assert!(id.starts_with("sbx-"), "create prints the id, got {id:?}");

    // exec streams output and exits with the command's exit code.
    let out = run(
        &platform,
        &[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo oops >&2; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let out = run(&platform, &["sandbox", "exec", &id, "--", "no-such-cmd"]);
    assert_eq!(out.status.code(), Some(127));

    // -i forwards stdin.
    let mut child = platform
        .cli()
        .args(["sandbox", "exec", "-i", &id, "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"shout\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "SHOUT\n");

    // cp in both directions, files and trees.
    let local = tmp.path().join("up.txt");
    std::fs::write(&local, b"uploaded bytes\n").unwrap();
    let out = run(
        &platform,
        &[
            "sandbox",
            "cp",
            local.to_str().unwrap(),
            &format!("{id}:/tmp/up.txt"),
        ],
    );
    assert!(
        out.status.success(),
        "cp up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &platform,
        &["sandbox", "exec", &id, "--", "cat", "/tmp/up.txt"],
    );
    assert_eq!(stdout(&out), "uploaded bytes\n");
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/c.txt"), b"c").unwrap();
    let out = run(
        &platform,
        &[
            "sandbox",
            "cp",
            tree.to_str().unwrap(),
            &format!("{id}:/srv/tree"),
        ],
    );
    assert!(
        out.status.success(),
        "cp tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let down = tmp.path().join("down");
    let out = run(
        &platform,
        &[
            "sandbox",
            "cp",
            &format!("{id}:/srv/tree"),
            down.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "cp down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(down.join("a/b/c.txt")).unwrap(), b"c");
    let out = run(
        &platform,
        &["sandbox", "cp", &format!("{id}:/etc/passwd"), "-"],
    );
    assert!(stdout(&out).starts_with("root:"));
    let out = run(
        &platform,
        &["sandbox", "cp", &format!("{id}:/missing"), "-"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/missing"));

    // ls, as a table and as JSON.
    let out = run(&platform, &["sandbox", "ls"]);
    assert!(
        stdout(&out).contains(&id) && stdout(&out).contains("running"),
        "{}",
        stdout(&out)
    );
    let out = run(&platform, &["--json", "sandbox", "ls"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["memory_mib"], 256);
    assert_eq!(list[0]["env"]["GREETING"], "hi");

    // rm, then the id is unknown.
    let out = run(&platform, &["sandbox", "rm", &id]);
    assert!(out.status.success());
    let out = run(&platform, &["sandbox", "exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    assert!(platform.vm_dirs().is_empty());

    // A client with no server says how to fix it.
    let out = platform
        .cli()
        .env("SOMNA_ADDR", "http://127.0.0.1:1")
        .args(["sandbox", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("somna up"));
}
