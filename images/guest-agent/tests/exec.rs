//! Exec RPC, against a dev-mode agent rooted at "/" (the host's programs).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Agent, exec, run, start};
use somna_proto::v1::exec_request::Msg;
use somna_proto::v1::exec_response::Event;
use somna_proto::v1::{CloseStdin, ExecRequest, ExecStart, PtySize, SendSignal};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn host_agent() -> Agent {
    Agent::start(std::path::Path::new("/"))
}

#[tokio::test]
async fn echo_hello() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["echo", "hello"])).await;
    assert!(
        out.pid.is_some_and(|p| p > 0),
        "started with a pid: {out:?}"
    );
    assert_eq!(out.stdout(), "hello\n");
    assert_eq!(out.exit().exit_code, 0);
    assert_eq!(out.exit().signal, 0);
}

#[tokio::test]
async fn exit_code_propagates() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["sh", "-c", "exit 3"])).await;
    assert_eq!(out.exit().exit_code, 3);
    assert!(!out.exit().timed_out);
}

#[tokio::test]
async fn stderr_is_separate() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["sh", "-c", "echo out; echo err >&2"])).await;
    assert_eq!(out.stdout(), "out\n");
    assert_eq!(out.stderr(), "err\n");
}

#[tokio::test]
async fn output_streams_before_exit() {
    let agent = host_agent();
    let mut c = agent.client().await;
    // The process prints, then blocks until the test answers: the first
    // line must arrive while it is still running.
    let mut s = start(&["sh", "-c", "echo first; read reply; echo got $reply"]);
    s.stdin = true;
    let mut e = exec(&mut c, s).await.unwrap();
    e.wait_stdout("first\n").await;
    e.send(Msg::Stdin(b"go\n".to_vec())).await;
    let out = e.finish().await;
    assert_eq!(out.stdout(), "got go\n");
    assert_eq!(out.exit().exit_code, 0);
}

#[tokio::test]
async fn stdin_round_trip() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&["cat"]);
    s.stdin = true;
    let e = exec(&mut c, s).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(32 * 1024) {
        e.send(Msg::Stdin(chunk.to_vec())).await;
    }
    e.send(Msg::CloseStdin(CloseStdin {})).await;
    let out = e.finish().await;
    assert_eq!(out.stdout.len(), payload.len());
    assert!(out.stdout == payload, "cat echoed the bytes unchanged");
    assert_eq!(out.exit().exit_code, 0);
}

#[tokio::test]
async fn stdin_defaults_to_dev_null() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["cat"])).await;
    assert_eq!(out.stdout(), "");
    assert_eq!(out.exit().exit_code, 0);
}

#[tokio::test]
async fn env_and_cwd() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&[
        "sh",
        "-c",
        "echo $FOO; pwd; echo $PATH; echo $HOME; echo $HOSTNAME; env | wc -l",
    ]);
    s.env = HashMap::from([("FOO".to_string(), "bar baz".to_string())]);
    s.cwd = "/tmp".into();
    let out = run(&mut c, s).await;
    let lines: Vec<&str> = out
        .stdout
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(lines[0], "bar baz");
    assert_eq!(lines[1], "/tmp");
    assert_eq!(
        lines[2],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(lines[3], "/root");
    assert!(!lines[4].is_empty(), "HOSTNAME set");
    // FOO, PATH, HOME, HOSTNAME, plus what sh itself adds (PWD, SHLVL, _):
    // nothing of the agent's own environment leaks in.
    let count: usize = lines[5].trim().parse().unwrap();
    assert!(
        count <= 7,
        "environment has {count} variables: {}",
        out.stdout()
    );
}

#[tokio::test]
async fn request_path_is_used_for_lookup() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&["ls", "/"]);
    s.env = HashMap::from([("PATH".to_string(), "/nonexistent".to_string())]);
    let out = run(&mut c, s).await;
    assert_eq!(out.exit().exit_code, 127);
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&["sh", "-c", "sleep 30 & sleep 30"]);
    s.timeout_ms = 300;
    let began = Instant::now();
    let out = run(&mut c, s).await;
    let exit = out.exit();
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!((exit.exit_code, exit.signal), (137, 9));
    assert!(!exit.message.is_empty());
    assert!(began.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn command_not_found() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["definitely-not-a-command-xyz", "arg"])).await;
    assert_eq!(out.exit().exit_code, 127);
    assert_eq!(
        out.stderr(),
        "somna: definitely-not-a-command-xyz: command not found\n"
    );
    assert!(out.exit().message.contains("command not found"));
    assert_eq!(out.pid, Some(0));
}

#[tokio::test]
async fn not_executable_is_126() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("script");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let out = run(&mut c, start(&[f.to_str().unwrap()])).await;
    assert_eq!(out.exit().exit_code, 126);
    assert!(
        out.stderr().contains("Permission denied"),
        "{}",
        out.stderr()
    );
}

#[tokio::test]
async fn signal_is_delivered() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut e = exec(&mut c, start(&["sh", "-c", "echo ready; exec sleep 30"]))
        .await
        .unwrap();
    e.wait_stdout("ready").await;
    e.send(Msg::Signal(SendSignal { signal: 15 })).await;
    let out = e.finish().await;
    let exit = out.exit();
    assert_eq!(
        (exit.exit_code, exit.signal, exit.timed_out),
        (143, 15, false),
        "{exit:?}"
    );
}

#[tokio::test]
async fn pty() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; stty size; echo $TERM",
    ]);
    s.pty = Some(PtySize {
        rows: 33,
        cols: 101,
    });
    let out = run(&mut c, s).await;
    let text = out.stdout();
    assert!(text.contains("is-a-tty"), "{text:?}");
    assert!(text.contains("33 101"), "{text:?}");
    assert!(text.contains("xterm-256color"), "{text:?}");
    assert_eq!(out.exit().exit_code, 0);
}

#[tokio::test]
async fn pty_input_and_resize() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&[
        "sh",
        "-c",
        "echo ready; read line; stty size; echo line=$line",
    ]);
    s.pty = Some(PtySize { rows: 24, cols: 80 });
    let mut e = exec(&mut c, s).await.unwrap();
    e.wait_stdout("ready").await;
    e.send(Msg::Resize(PtySize {
        rows: 50,
        cols: 120,
    }))
    .await;
    e.send(Msg::Stdin(b"hello\n".to_vec())).await;
    let out = e.finish().await;
    let text = out.stdout();
    assert!(text.contains("50 120"), "{text:?}");
    assert!(text.contains("line=hello"), "{text:?}");
}

#[tokio::test]
async fn user_switching() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&["sh", "-c", "id -u; id -g; echo $HOME"]);
    s.user = "nobody".into();
    let out = run(&mut c, s).await;
    let lines: Vec<String> = out.stdout().lines().map(str::to_string).collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65534");
    assert_eq!(lines[2], "/nonexistent");

    let mut s = start(&["sh", "-c", "id -u; id -g; id -G"]);
    s.user = "1234:4321".into();
    let out = run(&mut c, s).await;
    assert_eq!(out.stdout(), "1234\n4321\n4321\n");

    let mut s = start(&["id"]);
    s.user = "no-such-user-xyz".into();
    let err = exec(&mut c, s).await.err().expect("rejected");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no-such-user-xyz"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn invalid_requests() {
    let agent = host_agent();
    let mut c = agent.client().await;

    let err = exec(&mut c, ExecStart::default())
        .await
        .err()
        .expect("empty argv rejected");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut s = start(&["true"]);
    s.sandbox_id = "someone-else".into();
    let err = exec(&mut c, s).await.err().expect("wrong sandbox rejected");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let mut s = start(&["true"]);
    s.cwd = "/no/such/dir".into();
    let err = exec(&mut c, s).await.err().expect("bad cwd rejected");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "working directory /no/such/dir does not exist in the sandbox"
    );

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ExecRequest {
        msg: Some(Msg::Stdin(b"x".to_vec())),
    })
    .await
    .unwrap();
    let err = c
        .exec(ReceiverStream::new(rx))
        .await
        .expect_err("non-start first message rejected");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut s = start(&["true"]);
    s.sandbox_id = common::SANDBOX_ID.into();
    assert_eq!(run(&mut c, s).await.exit().exit_code, 0);
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone: the agent reaps them.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_going_away_kills_the_process() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut e = exec(&mut c, start(&["sh", "-c", "echo $$; exec sleep 60"]))
        .await
        .unwrap();
    let out = e.wait_stdout("\n").await;
    let pid: i32 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    assert!(alive(pid));
    drop(e);
    wait_gone(pid).await;
}

#[tokio::test]
async fn background_grandchild_does_not_hang_the_stream() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let began = Instant::now();
    let out = run(
        &mut c,
        start(&["sh", "-c", "sleep 30 & echo $!; echo done"]),
    )
    .await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "stream ended promptly"
    );
    assert_eq!(out.exit().exit_code, 0);
    let grandchild: i32 = out.stdout().lines().next().unwrap().parse().unwrap();
    // Not our business to kill it, but clean up after the test.
    unsafe { libc::kill(grandchild, libc::SIGKILL) };
}

#[tokio::test]
async fn orphans_are_reaped() {
    let agent = host_agent();
    let mut c = agent.client().await;
    // The grandchild is orphaned when sh exits and reparented to the agent
    // (a child subreaper), which must reap it.
    let mut s = start(&["sh", "-c", "(sleep 0.2; exit 7) >/dev/null 2>&1 & echo $!"]);
    s.stdin = false;
    let out = run(&mut c, s).await;
    let orphan: i32 = out.stdout().trim().parse().unwrap();
    wait_gone(orphan).await;
}

#[tokio::test]
async fn many_concurrent_execs() {
    let agent = host_agent();
    let c = agent.client().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let out = run(
                &mut c,
                start(&["sh", "-c", &format!("echo {i}; exit {}", i % 5)]),
            )
            .await;
            assert_eq!(out.stdout(), format!("{i}\n"));
            assert_eq!(out.exit().exit_code, i % 5);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn large_output() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let out = run(&mut c, start(&["head", "-c", "5000000", "/dev/zero"])).await;
    assert_eq!(out.stdout.len(), 5_000_000);
    assert_eq!(out.exit().exit_code, 0);
}

#[tokio::test]
async fn events_are_ordered() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut e = exec(&mut c, start(&["echo", "x"])).await.unwrap();
    assert!(matches!(e.next().await, Some(Event::Started(_))));
    assert!(matches!(e.next().await, Some(Event::Stdout(_))));
    assert!(matches!(e.next().await, Some(Event::Exit(_))));
    assert!(e.next().await.is_none());
}

#[tokio::test]
async fn detached_process_outlives_its_stream_and_writes_its_output_file() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut s = start(&["sh", "-c", "echo up; echo oops >&2"]);
    s.detach = true;
    s.output_file = log.display().to_string();
    let out = run(&mut c, s).await;
    assert_eq!(out.exit().exit_code, 0, "{out:?}");
    let pid = out.pid.expect("a detached process reports its pid");
    assert!(pid > 0);
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("up\n") && t.contains("oops\n"))
        })
        .await,
        "stdout and stderr land in the output file"
    );
    // A long-running one is still alive once its stream has ended.
    let mut s = start(&["sleep", "30"]);
    s.detach = true;
    let out = run(&mut c, s).await;
    let pid = out.pid.unwrap() as i32;
    assert!(out.exit.is_some(), "the stream ended with an exit");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the detached process still runs after its stream ended"
    );
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[tokio::test]
async fn detach_rejects_stdin_and_output_file_needs_detach() {
    let agent = host_agent();
    let mut c = agent.client().await;
    let mut s = start(&["true"]);
    s.detach = true;
    s.stdin = true;
    let err = exec(&mut c, s).await.err().expect("rejected");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut s = start(&["true"]);
    s.output_file = "/tmp/x".into();
    let err = exec(&mut c, s).await.err().expect("rejected");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("detach"), "{}", err.message());
}
