//! The Rust SDK's surface for programs (the one the CLI and the MCP server
//! use) against a real `somna up`: run_code, labels, timeouts, and a
//! specific error for each kind of bad call.

use std::collections::BTreeMap;
use std::time::Duration;

use somna_sdk::{Client, CreateOptions, Error, Language};
use somna_testkit::{Options, Platform};

#[tokio::test(flavor = "multi_thread")]
async fn sdk_run_code_labels_timeouts_and_errors() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let client = platform.client().await;

    let sb = client
        .create_sandbox(
            CreateOptions::new("python")
                .memory_mib(256)
                .label("team", "blue"),
        )
        .await
        .expect("create");
    assert_eq!(
        sb.info().labels.get("team").map(String::as_str),
        Some("blue")
    );

    let out = sb
        .run_code("print(6*7)", Language::Python)
        .await
        .expect("run_code");
    assert_eq!((out.stdout_text().as_str(), out.exit_code), ("42\n", 0));
    let out = sb
        .run_code(
            "import sys; print('e', file=sys.stderr); sys.exit(3)",
            Language::Python,
        )
        .await
        .expect("run_code");
    assert_eq!((out.stderr_text().as_str(), out.exit_code), ("e\n", 3));
    let out = sb
        .run_code("echo $((6*7))", Language::Shell)
        .await
        .expect("shell");
    assert_eq!(out.stdout_text(), "42\n");
    assert!(matches!(
        "ruby".parse::<Language>(),
        Err(Error::InvalidArgument(_))
    ));

    let blue: BTreeMap<String, String> = [("team".into(), "blue".into())].into();
    let red: BTreeMap<String, String> = [("team".into(), "red".into())].into();
    let ids = |v: Vec<somna_sdk::proto::Sandbox>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(client.list_sandboxes_with_labels(&blue).await.expect("ls")),
        [sb.id()]
    );
    assert!(
        client
            .list_sandboxes_with_labels(&red)
            .await
            .expect("ls")
            .is_empty()
    );

    let timed = client
        .set_sandbox_timeout(sb.id(), Some(Duration::from_secs(600)))
        .await
        .expect("set timeout");
    assert!(timed.expires_at.is_some());
    let untimed = client
        .set_sandbox_timeout(sb.id(), None)
        .await
        .expect("clear timeout");
    assert!(untimed.expires_at.is_none());

    // A wrong key, and none at all: Unauthenticated with the server's words.
    let bad = Client::connect_with_key(&platform.addr, Some("sk-wrong"))
        .await
        .expect("connect");
    match bad.list_sandboxes().await {
        Err(Error::Unauthenticated(m)) => assert!(!m.is_empty()),
        other => panic!("wrong key: {other:?}"),
    }
    let none = Client::connect_with_key(&platform.addr, None)
        .await
        .expect("connect");
    assert!(matches!(
        none.list_sandboxes().await,
        Err(Error::Unauthenticated(_))
    ));
    // Nor may it destroy a sandbox.
    assert!(matches!(
        bad.destroy_sandbox(sb.id()).await,
        Err(Error::Unauthenticated(_))
    ));

    // Nothing listening: Connect, saying what to do.
    match Client::connect_with_key("http://127.0.0.1:1", Some("k")).await {
        Err(e @ Error::Connect { .. }) => assert!(e.to_string().contains("somna up"), "{e}"),
        Err(e) => panic!("unreachable server: {e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }

    // A destroyed sandbox: NotFound naming it, for every kind of call.
    let id = sb.id().to_string();
    let handle = client.attach(&id);
    sb.destroy().await.expect("destroy");
    let not_found = |r: Result<(), Error>, what: &str| match r {
        Err(Error::NotFound(m)) => assert!(m.contains(&id), "{what}: {m}"),
        other => panic!("{what} on a destroyed sandbox: {other:?}"),
    };
    not_found(
        handle
            .exec(somna_sdk::Command::shell("true"))
            .await
            .map(|_| ()),
        "exec",
    );
    not_found(
        handle.read_file("/etc/hostname").await.map(|_| ()),
        "read_file",
    );
    not_found(
        handle.write_file("/tmp/x", b"y".to_vec()).await.map(|_| ()),
        "write_file",
    );
    not_found(client.sleep_sandbox(&id).await.map(|_| ()), "sleep");
    not_found(client.wake_sandbox(&id).await.map(|_| ()), "wake");
    not_found(client.destroy_sandbox(&id).await, "destroy");
    not_found(client.sandbox(&id).await.map(|_| ()), "get");
}
