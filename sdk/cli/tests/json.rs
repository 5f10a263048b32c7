//! Golden shapes of `somna --json ...`: the keys (and their JSON types)
//! scripts rely on, for every command that has JSON output. A change here
//! breaks users' scripts: update the README with it.

use std::process::Output;

use serde_json::Value;
use somna_testkit::{Options, Platform};

fn run(platform: &Platform, args: &[&str]) -> Output {
    platform.cli().args(args).output().expect("run somna")
}

/// The one JSON document a successful `--json` command prints.
fn json(platform: &Platform, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run(platform, &full);
    assert!(
        out.status.success(),
        "somna {}: {}",
        full.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "somna {}: stdout is not one JSON document ({e}): {}",
            full.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `key:type` for every key of an object, sorted; type is one of
/// null/bool/number/string/array/object.
fn shape(v: &Value) -> Vec<String> {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let mut keys: Vec<String> = obj
        .iter()
        .map(|(k, v)| {
            let t = match v {
                Value::Null => "null",
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            format!("{k}:{t}")
        })
        .collect();
    keys.sort();
    keys
}

fn golden(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// A running sandbox without a timeout.
const SANDBOX: &[&str] = &[
    "accelerator:string",
    "boot_ms:number",
    "cpus:number",
    "created_at:string",
    "disk_mib:number",
    "env:object",
    "expires_at:null",
    "failure:null",
    "host:string",
    "id:string",
    "idle_timeout_seconds:number",
    "image:string",
    "image_digest:string",
    "labels:object",
    "last_active_at:string",
    "memory_mib:number",
    "network:null",
    "network_policy:null",
    "request_id:null",
    "sleep_count:number",
    "start_mode:string",
    "state:string",
    "wake_count:number",
];

fn sandbox_shape_with(changes: &[(&str, &str)]) -> Vec<String> {
    let mut v: Vec<String> = SANDBOX.iter().map(|s| s.to_string()).collect();
    for (key, ty) in changes {
        v.retain(|k| !k.starts_with(&format!("{key}:")));
        v.push(format!("{key}:{ty}"));
    }
    v.sort();
    v
}

#[test]
fn json_output_shapes() {
    let platform = Platform::start(Options::new(env!("CARGO_BIN_EXE_somna")));
    let tmp = tempfile::tempdir().expect("tempdir");

    let created = json(
        &platform,
        &[
            "sandbox",
            "create",
            "--image",
            "busybox",
            "--env",
            "A=1",
            "--label",
            "team=blue",
            "--memory",
            "256",
        ],
    );
    assert_eq!(shape(&created), golden(SANDBOX), "{created}");
    assert_eq!(created["state"], "running");
    assert_eq!(created["labels"]["team"], "blue");
    assert_eq!(created["env"]["A"], "1");
    let id = created["id"].as_str().expect("id").to_string();

    let got = json(&platform, &["sandbox", "get", &id]);
    assert_eq!(shape(&got), golden(SANDBOX), "{got}");

    let list = json(&platform, &["sandbox", "ls"]);
    let list = list.as_array().expect("ls prints an array");
    assert_eq!(list.len(), 1);
    assert_eq!(shape(&list[0]), golden(SANDBOX));
    let blue = json(&platform, &["sandbox", "ls", "--label", "team=blue"]);
    assert_eq!(blue.as_array().map(Vec::len), Some(1), "{blue}");
    let red = json(&platform, &["sandbox", "ls", "--label", "team=red"]);
    assert_eq!(red, Value::Array(vec![]));

    // exec --json: the whole result in one object, exit code passed on.
    let out = run(
        &platform,
        &[
            "--json",
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo hi; echo err >&2; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4));
    let exec: Value = serde_json::from_slice(&out.stdout).expect("exec --json");
    assert_eq!(
        shape(&exec),
        golden(&[
            "exit_code:number",
            "message:string",
            "sandbox_id:string",
            "signal:null",
            "stderr:string",
            "stdout:string",
            "timed_out:bool",
        ])
    );
    assert_eq!(
        (exec["stdout"].as_str(), exec["stderr"].as_str()),
        (Some("hi\n"), Some("err\n"))
    );

    let timed = json(&platform, &["sandbox", "set-timeout", &id, "600"]);
    assert_eq!(
        shape(&timed),
        sandbox_shape_with(&[("expires_at", "string")])
    );
    let untimed = json(&platform, &["sandbox", "set-timeout", &id, "0"]);
    assert_eq!(shape(&untimed), golden(SANDBOX));

    let local = tmp.path().join("f.txt");
    std::fs::write(&local, b"12345").expect("write");
    let cp = json(
        &platform,
        &[
            "sandbox",
            "cp",
            local.to_str().expect("utf8"),
            &format!("{id}:/tmp/f.txt"),
        ],
    );
    assert_eq!(shape(&cp), golden(&["bytes:number", "files:number"]));
    assert_eq!(
        (cp["bytes"].as_u64(), cp["files"].as_u64()),
        (Some(5), Some(1))
    );

    let slept = json(&platform, &["sandbox", "sleep", &id]);
    assert_eq!(slept["state"], "sleeping");
    assert_eq!(
        shape(&slept),
        sandbox_shape_with(&[("elapsed_ms", "number")])
    );
    let woke = json(&platform, &["sandbox", "wake", &id]);
    assert_eq!(woke["state"], "running");
    assert_eq!(shape(&woke), shape(&slept));

    let hosts = json(&platform, &["host", "ls"]);
    let hosts = hosts.as_array().expect("host ls prints an array");
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        shape(&hosts[0]),
        golden(&[
            "accelerator:string",
            "accelerator_reason:string",
            "cached_images:array",
            "capabilities:array",
            "cpus:number",
            "cpus_allocated:number",
            "id:string",
            "memory_allocated_mib:number",
            "memory_mib:number",
            "sandboxes_running:number",
            "sandboxes_sleeping:number",
            "state:string",
            "templates:array",
            "vmm:string",
            "warm_pools:array",
        ])
    );

    let images = json(&platform, &["image", "ls"]);
    assert_eq!(shape(&images), golden(&["images:array", "stats:object"]));
    let first = &images["images"][0];
    assert_eq!(
        shape(first),
        golden(&[
            "digest:string",
            "disk_bytes:number",
            "in_use:number",
            "last_used_at:string",
            "reference:string",
            "size_bytes:number",
            "source:string",
        ]),
        "{first}"
    );

    let rm = json(&platform, &["sandbox", "rm", &id]);
    assert_eq!(shape(&rm), golden(&["destroyed:bool", "id:string"]));
    assert_eq!(json(&platform, &["sandbox", "ls"]), Value::Array(vec![]));

    // doctor --json: one object; each check says how to fix what fails.
    let guest = platform_guest_dir();
    let out = run(
        &platform,
        &[
            "--json",
            "doctor",
            "--no-kvm-probe",
            "--guest-dir",
            &guest,
            "--data-dir",
            tmp.path().to_str().expect("utf8"),
        ],
    );
    let doctor: Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    assert_eq!(shape(&doctor), golden(&["checks:array", "ok:bool"]));
    assert_eq!(out.status.success(), doctor["ok"] == true);
    let checks = doctor["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for want in [
        "qemu",
        "cloud-hypervisor",
        "kvm",
        "guest-artifacts",
        "vhost-vsock",
        "btf",
        "bpf",
        "cgroups",
        "disk",
        "api",
    ] {
        assert!(
            names.contains(&want),
            "doctor has no {want} check: {names:?}"
        );
    }
    for c in checks {
        let keys: Vec<&str> = c
            .as_object()
            .expect("check")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{c}");
        assert!(
            ["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap_or("")),
            "{c}"
        );
        if c["status"] != "ok" {
            assert!(
                c["fix"].as_str().is_some_and(|f| !f.is_empty()),
                "no fix: {c}"
            );
        }
    }
    let by_name = |n: &str| checks.iter().find(|c| c["name"] == n).expect("check");
    assert_eq!(by_name("guest-artifacts")["status"], "ok");
    assert_eq!(by_name("api")["status"], "ok", "the platform answers");
}

fn platform_guest_dir() -> String {
    somna_testkit::Artifacts::from_env()
        .guest_dir
        .to_string_lossy()
        .into_owned()
}

#[test]
fn completions_for_every_shell() {
    let somna = env!("CARGO_BIN_EXE_somna");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = std::process::Command::new(somna)
            .args(["completions", shell])
            .output()
            .expect("run somna completions");
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["sandbox", "doctor", "mcp", "json"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = std::process::Command::new(somna)
        .args(["completions", "tcsh"])
        .output()
        .expect("run somna completions");
    assert!(!out.status.success());
}
