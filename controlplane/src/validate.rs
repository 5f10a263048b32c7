//! Request validation: every error is INVALID_ARGUMENT naming the field.

use std::collections::HashMap;

use somna_proto::v1::CreateSandboxRequest;
use tonic::Status;

/// The longest sandbox timeout (30 days).
pub const MAX_TIMEOUT_SECONDS: u64 = 30 * 24 * 3600;
const MAX_LABELS: usize = 64;

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

pub fn create(r: &CreateSandboxRequest) -> Result<(), Status> {
    if r.image.trim().is_empty() {
        return Err(invalid("image", "is required (e.g. \"busybox\")"));
    }
    if r.cpus > 256 {
        return Err(invalid("cpus", format!("{} is more than 256", r.cpus)));
    }
    if r.memory_mib != 0 && r.memory_mib < 64 {
        return Err(invalid(
            "memory_mib",
            format!("{} is less than 64", r.memory_mib),
        ));
    }
    timeout("timeout_seconds", r.timeout_seconds)?;
    timeout("idle_timeout_seconds", r.idle_timeout_seconds)?;
    labels("labels", &r.labels)?;
    if r.request_id.len() > 128 || r.request_id.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "request_id",
            "must be at most 128 printable characters",
        ));
    }
    env(&r.env)?;
    for &p in &r.expose_ports {
        port("expose_ports", p)?;
    }
    Ok(())
}

/// Environment variable names: not empty, no '=' or NUL.
pub fn env(env: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(
                "env",
                format!("{k:?} is not a valid variable name"),
            ));
        }
    }
    Ok(())
}

/// A TCP port: 1-65535.
pub fn port(field: &str, p: u32) -> Result<(), Status> {
    if p == 0 || p > 65535 {
        return Err(invalid(field, format!("{p} is not a TCP port (1-65535)")));
    }
    Ok(())
}

pub fn timeout(field: &str, secs: u64) -> Result<(), Status> {
    if secs > MAX_TIMEOUT_SECONDS {
        return Err(invalid(
            field,
            format!("{secs} is more than the maximum {MAX_TIMEOUT_SECONDS}"),
        ));
    }
    Ok(())
}

/// Keys: 1–63 of `[a-z0-9._/-]`, starting with a letter or digit; values:
/// up to 255 bytes without control characters.
pub fn labels(field: &str, labels: &HashMap<String, String>) -> Result<(), Status> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            field,
            format!("{} labels is more than {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c));
        if !key_ok {
            return Err(invalid(
                field,
                format!("key {k:?} must be 1-63 of [a-z0-9._/-]"),
            ));
        }
        if v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err(invalid(
                field,
                format!("value of {k:?} must be at most 255 printable bytes"),
            ));
        }
    }
    Ok(())
}

pub fn host_id(id: &str) -> Result<(), Status> {
    if id.is_empty()
        || id.len() > 63
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(
            "host_id",
            format!("{id:?} must be 1-63 of [A-Za-z0-9._-]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let mut r = CreateSandboxRequest {
            image: "busybox".into(),
            ..Default::default()
        };
        assert!(create(&r).is_ok());
        r.timeout_seconds = MAX_TIMEOUT_SECONDS + 1;
        assert!(
            create(&r)
                .unwrap_err()
                .message()
                .starts_with("timeout_seconds:")
        );
        r.timeout_seconds = 0;
        r.labels.insert("Bad Key".into(), "x".into());
        assert!(create(&r).unwrap_err().message().starts_with("labels:"));
        r.labels.clear();
        r.labels.insert("team/app".into(), "web".into());
        assert!(create(&r).is_ok());
        r.memory_mib = 1;
        assert!(create(&r).unwrap_err().message().starts_with("memory_mib:"));
        r.memory_mib = 0;
        r.image = " ".into();
        assert!(create(&r).unwrap_err().message().starts_with("image:"));
        assert!(host_id("host-1").is_ok());
        assert!(host_id("bad host").is_err());
    }
}
