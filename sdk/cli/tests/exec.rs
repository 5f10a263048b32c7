//! Exec in real microVMs (TCG on machines without usable KVM).

use std::time::Duration;

use somna_sdk::{Command, CreateOptions, ExecEvent};
use somna_testkit::{Options, Platform};

fn platform() -> Platform {
    Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_in_a_busybox_sandbox() {
    let platform = platform();
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("busybox").env("SANDBOX_VAR", "from-create"))
        .await
        .expect("create busybox sandbox");
    assert_eq!(
        sb.info().state,
        somna_sdk::proto::SandboxState::Running as i32
    );
    assert_eq!(sb.info().accelerator, platform.accelerator);

    // echo, exit codes, stdout/stderr separation.
    let out = sb.exec(Command::new("echo").arg("hello")).await.unwrap();
    assert_eq!(text(&out.stdout), "hello\n");
    assert_eq!(out.exit_code, 0);
    let out = sb
        .exec(Command::from_argv(["sh", "-c", "exit 3"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    let out = sb
        .exec(Command::from_argv([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 1",
        ]))
        .await
        .unwrap();
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.exit_code),
        ("out\n".into(), "err\n".into(), 1)
    );

    // Command not found: 127 and a message, like a shell.
    let out = sb.exec(Command::new("no-such-command")).await.unwrap();
    assert_eq!(out.exit_code, 127);
    assert!(
        text(&out.stderr).contains("no-such-command"),
        "stderr: {}",
        text(&out.stderr)
    );

    // Env: image < sandbox < request; cwd honoured.
    let out = sb
        .exec(
            Command::from_argv(["sh", "-c", "echo $SANDBOX_VAR $REQ_VAR; pwd"])
                .env("REQ_VAR", "from-exec")
                .cwd("/tmp"),
        )
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "from-create from-exec\n/tmp\n");

    // Streaming: the first line arrives while the process still runs. The
    // process blocks on stdin until we answer, so the order is proven.
    let mut p = sb
        .spawn(
            Command::from_argv(["sh", "-c", "echo first; read line; echo got-$line"]).stdin(true),
        )
        .await
        .unwrap();
    assert!(p.pid() > 0);
    match p.next_event().await.unwrap() {
        Some(ExecEvent::Stdout(b)) => assert_eq!(text(&b), "first\n"),
        other => panic!("expected the first line before exit, got {other:?}"),
    }
    p.write_stdin(b"ping\n".to_vec()).await.unwrap();
    let out = p.wait_with_output().await.unwrap();
    assert_eq!(text(&out.stdout), "got-ping\n");
    assert_eq!(out.exit_code, 0);

    // Stdin to EOF.
    let p = sb.spawn(Command::new("cat").stdin(true)).await.unwrap();
    p.write_stdin(b"abc".to_vec()).await.unwrap();
    p.write_stdin(b"def".to_vec()).await.unwrap();
    p.close_stdin().await.unwrap();
    let out = p.wait_with_output().await.unwrap();
    assert_eq!(text(&out.stdout), "abcdef");

    // Timeout kills the process.
    let started = std::time::Instant::now();
    let out = sb
        .exec(Command::from_argv(["sleep", "30"]).timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.signal, Some(9));
    assert_eq!(out.exit_code, 137);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the timeout did not end the process"
    );

    // Signals reach the process.
    let mut p = sb
        .spawn(Command::from_argv([
            "sh",
            "-c",
            "echo ready; exec sleep 30",
        ]))
        .await
        .unwrap();
    assert!(matches!(
        p.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(_))
    ));
    p.signal(15).await.unwrap();
    let out = p.wait_with_output().await.unwrap();
    assert_eq!((out.signal, out.exit_code), (Some(15), 143));

    // User switching: the image has `user` (uid 1000).
    let out = sb
        .exec(Command::from_argv(["id", "-u"]).user("user"))
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "1000\n");
    let out = sb.exec(Command::from_argv(["id", "-u"])).await.unwrap();
    assert_eq!(text(&out.stdout), "0\n");

    // PTY: the process sees a terminal of the requested size.
    let out = sb
        .exec(Command::from_argv(["sh", "-c", "[ -t 1 ] && stty size"]).pty(33, 101))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(
        text(&out.stdout).contains("33 101"),
        "stdout: {:?}",
        text(&out.stdout)
    );
    let out = sb
        .exec(Command::from_argv(["sh", "-c", "[ -t 1 ]"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 1, "without a PTY stdout is not a terminal");

    // The hostname is the sandbox id.
    let out = sb.exec(Command::new("hostname")).await.unwrap();
    assert_eq!(text(&out.stdout).trim(), sb.id());

    sb.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn python_image_runs_python() {
    let platform = platform();
    let client = platform.client().await;
    let sb = client
        .create_sandbox(CreateOptions::new("python"))
        .await
        .expect("create python sandbox");
    let out = sb
        .exec(Command::from_argv(["python3", "-c", "print(2**100)"]))
        .await
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "1267650600228229401496703205376\n",
        "stderr: {}",
        text(&out.stderr)
    );
    sb.destroy().await.unwrap();
}
