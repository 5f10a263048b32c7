//! `controlplane_validation`: the control plane's request validation on
//! requests decoded from bytes, as the public API receives them.
//!
//! The first byte picks the request, the rest is its protobuf encoding:
//!
//! - `0`: `CreateSandboxRequest` → `validate::create`;
//! - `1`: `DeployAppRequest` → `apps::validate` (which fills defaults);
//! - `2`: `ListSandboxesRequest` → `validate::labels`;
//! - `3`: `SetSandboxTimeoutRequest` → `validate::timeout`;
//! - `4`: a host id (UTF-8 text, not protobuf) → `validate::host_id`.
//!
//! Beyond never panicking, an accepted request must satisfy what the code
//! after validation relies on (expiry arithmetic in milliseconds, ports
//! that fit a `u16`, env names usable in `K=V`, bounded labels), and
//! `apps::validate` must be idempotent: its filled-in spec validates again,
//! unchanged.

use prost::Message;
use somna_controlplane::{apps, validate};
use somna_proto::v1::{
    AppSpec, CreateSandboxRequest, DeployAppRequest, ListSandboxesRequest, SetSandboxTimeoutRequest,
};

use crate::runner::Outcome;

pub const DICT: &[&[u8]] = &[
    // Field keys: 1..13 as LEN, varints for numeric fields.
    b"\x0a",
    b"\x10",
    b"\x18",
    b"\x22",
    b"\x28",
    b"\x4a",
    b"\x52",
    b"\x12",
    // Varints: 2^32, 2^64 - 1, 30 days + 1 s.
    b"\x80\x80\x80\x80\x10",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x81\x9b\x9e\x01",
    b"busybox",
    b"team/app",
    b"A=B",
    b"\x00",
    b"\xc3\xa9",
    b"\xef\xbf\xbf",
];

fn status_outcome(what: &str, r: Result<(), tonic::Status>) -> Outcome {
    match r {
        Ok(()) => Outcome::accepted(what),
        // The message names the field; the value quoted in it is cut off.
        Err(s) => Outcome::rejected(
            &format!(
                "{what} {:?} {}",
                s.code(),
                s.message().split(':').next().unwrap_or("")
            ),
            "",
        ),
    }
}

fn check_timeout_arithmetic(field: &str, secs: u64) {
    assert!(
        secs <= validate::MAX_TIMEOUT_SECONDS,
        "{field} {secs} passed validation"
    );
    // What the service computes from it.
    let ms = i64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .unwrap_or_else(|| panic!("{field} {secs} overflows in milliseconds"));
    assert!(
        ms.checked_add(i64::from(u32::MAX) * 1000).is_some(),
        "{field} {secs} leaves no room for the current time"
    );
}

fn check_labels(labels: &std::collections::HashMap<String, String>) {
    assert!(
        labels.len() <= 64,
        "{} labels passed validation",
        labels.len()
    );
    for (k, v) in labels {
        assert!(
            !k.is_empty() && k.len() <= 63,
            "label key {k:?} passed validation"
        );
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b)),
            "label key {k:?} passed validation"
        );
        assert!(
            v.len() <= 255,
            "a {}-byte label value passed validation",
            v.len()
        );
    }
}

fn check_env(env: &std::collections::HashMap<String, String>) {
    for k in env.keys() {
        assert!(
            !k.is_empty() && !k.contains('=') && !k.contains('\0'),
            "env name {k:?} passed validation"
        );
    }
}

fn check_create(r: &CreateSandboxRequest) {
    assert!(
        !r.image.trim().is_empty(),
        "an empty image passed validation"
    );
    assert!(r.cpus <= 256, "{} cpus passed validation", r.cpus);
    assert!(r.memory_mib == 0 || r.memory_mib >= 64);
    check_timeout_arithmetic("timeout_seconds", r.timeout_seconds);
    check_timeout_arithmetic("idle_timeout_seconds", r.idle_timeout_seconds);
    check_labels(&r.labels);
    check_env(&r.env);
    assert!(r.request_id.len() <= 128);
    for &p in &r.expose_ports {
        assert!(
            u16::try_from(p).is_ok_and(|p| p != 0),
            "port {p} passed validation"
        );
    }
}

fn check_app(name: &str, spec: &AppSpec) {
    assert!(
        (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "app name {name:?} passed validation"
    );
    assert!(!spec.image.trim().is_empty());
    assert!(u16::try_from(spec.port).is_ok_and(|p| p != 0));
    assert!(
        (1..=64).contains(&spec.max_replicas) && spec.min_replicas <= spec.max_replicas,
        "replicas {}..{} passed validation",
        spec.min_replicas,
        spec.max_replicas
    );
    assert!(spec.idle_timeout_seconds > 0 && spec.ready_timeout_seconds > 0);
    assert!(spec.target_in_flight > 0);
    check_timeout_arithmetic("idle_timeout_seconds", spec.idle_timeout_seconds);
    check_timeout_arithmetic("ready_timeout_seconds", spec.ready_timeout_seconds);
    check_env(&spec.env);
    assert!(spec.health_path.is_empty() || spec.health_path.starts_with('/'));
}

pub fn execute(data: &[u8]) -> Outcome {
    let Some((&mode, body)) = data.split_first() else {
        return Outcome::rejected("empty", "");
    };
    let bad_proto =
        |what: &str, e: prost::DecodeError| Outcome::rejected(&format!("{what} decode {e}"), "");
    match mode % 5 {
        0 => match CreateSandboxRequest::decode(body) {
            Ok(r) => {
                let res = validate::create(&r);
                if res.is_ok() {
                    check_create(&r);
                }
                status_outcome("create", res)
            }
            Err(e) => bad_proto("create", e),
        },
        1 => match DeployAppRequest::decode(body) {
            Ok(r) => {
                let Some(mut spec) = r.spec else {
                    return Outcome::rejected("deploy without spec", "");
                };
                let res = apps::validate(&r.name, &mut spec);
                if res.is_ok() {
                    check_app(&r.name, &spec);
                    let mut again = spec.clone();
                    assert!(
                        apps::validate(&r.name, &mut again).is_ok(),
                        "a validated app spec fails validation"
                    );
                    assert_eq!(again, spec, "validating a filled-in spec changed it");
                }
                status_outcome("deploy", res)
            }
            Err(e) => bad_proto("deploy", e),
        },
        2 => match ListSandboxesRequest::decode(body) {
            Ok(r) => {
                let res = validate::labels("labels", &r.labels);
                if res.is_ok() {
                    check_labels(&r.labels);
                }
                status_outcome("list", res)
            }
            Err(e) => bad_proto("list", e),
        },
        3 => match SetSandboxTimeoutRequest::decode(body) {
            Ok(r) => {
                let res = validate::timeout("timeout_seconds", r.timeout_seconds);
                if res.is_ok() {
                    check_timeout_arithmetic("timeout_seconds", r.timeout_seconds);
                }
                status_outcome("timeout", res)
            }
            Err(e) => bad_proto("timeout", e),
        },
        _ => match std::str::from_utf8(body) {
            Ok(id) => {
                let res = validate::host_id(id);
                if res.is_ok() {
                    assert!(
                        (1..=63).contains(&id.len())
                            && id
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                        "host id {id:?} passed validation"
                    );
                }
                status_outcome("host", res)
            }
            Err(_) => Outcome::rejected("host id not UTF-8", ""),
        },
    }
}

/// Valid requests of every kind.
pub fn seeds() -> Vec<Vec<u8>> {
    let with_mode = |mode: u8, body: Vec<u8>| {
        let mut v = vec![mode];
        v.extend(body);
        v
    };
    let create = CreateSandboxRequest {
        image: "busybox".into(),
        cpus: 2,
        memory_mib: 512,
        env: [("PATH".to_string(), "/bin".to_string())].into(),
        timeout_seconds: 3600,
        disk_mib: 1024,
        idle_timeout_seconds: 60,
        labels: [("team/app".to_string(), "web".to_string())].into(),
        request_id: "req-1".into(),
        allow_out: vec!["10.1.0.0/16".into()],
        deny_out: vec!["10.1.2.0/24".into()],
        expose_ports: vec![8080],
        ..Default::default()
    };
    let deploy = DeployAppRequest {
        name: "web-1".into(),
        spec: Some(AppSpec {
            image: "python".into(),
            port: 8000,
            env: [("MODE".to_string(), "prod".to_string())].into(),
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            min_replicas: 1,
            max_replicas: 3,
            idle_timeout_seconds: 30,
            health_path: "/healthz".into(),
            ..Default::default()
        }),
    };
    let list = ListSandboxesRequest {
        labels: [("somna.app".to_string(), "web-1".to_string())].into(),
        page_size: 10,
        page_token: "sbx-1".into(),
    };
    let timeout = SetSandboxTimeoutRequest {
        id: "sbx-1".into(),
        timeout_seconds: 30 * 24 * 3600,
    };
    vec![
        with_mode(0, create.encode_to_vec()),
        with_mode(1, deploy.encode_to_vec()),
        with_mode(2, list.encode_to_vec()),
        with_mode(3, timeout.encode_to_vec()),
        with_mode(4, b"host-1.example_a".to_vec()),
    ]
}
