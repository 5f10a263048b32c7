//! How records are printed: JSON for scripts, aligned tables for people.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use somna_sdk::proto;

pub fn state_name(state: i32) -> &'static str {
    match proto::SandboxState::try_from(state) {
        Ok(proto::SandboxState::Creating) => "creating",
        Ok(proto::SandboxState::Running) => "running",
        Ok(proto::SandboxState::Failed) => "failed",
        Ok(proto::SandboxState::Destroying) => "destroying",
        Ok(proto::SandboxState::Sleeping) => "sleeping",
        _ => "unknown",
    }
}

pub fn start_mode_name(mode: i32) -> &'static str {
    match proto::StartMode::try_from(mode) {
        Ok(proto::StartMode::ColdBoot) => "cold-boot",
        Ok(proto::StartMode::Template) => "template",
        Ok(proto::StartMode::WarmPool) => "warm-pool",
        _ => "auto",
    }
}

fn timestamp(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let ts = ts.as_ref()?;
    SystemTime::try_from(*ts).ok()
}

fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(t) => Value::String(t.to_string()),
        None => Value::Null,
    }
}

pub fn sandbox_json(s: &proto::Sandbox) -> Value {
    let mut env: Vec<_> = s.env.iter().collect();
    env.sort();
    let mut labels: Vec<_> = s.labels.iter().collect();
    labels.sort();
    json!({
        "id": s.id,
        "image": s.image,
        "image_digest": s.image_digest,
        "state": state_name(s.state),
        "cpus": s.cpus,
        "memory_mib": s.memory_mib,
        "disk_mib": s.disk_mib,
        "env": env.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "labels": labels.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "created_at": rfc3339(&s.created_at),
        "expires_at": rfc3339(&s.expires_at),
        "host": s.host,
        "request_id": if s.request_id.is_empty() { Value::Null } else { Value::String(s.request_id.clone()) },
        "accelerator": s.accelerator,
        "boot_ms": s.boot_ms,
        "start_mode": start_mode_name(s.start_mode),
        "idle_timeout_seconds": s.idle_timeout_seconds,
        "last_active_at": rfc3339(&s.last_active_at),
        "sleep_count": s.sleep_count,
        "wake_count": s.wake_count,
        "failure": if s.failure.is_empty() { Value::Null } else { Value::String(s.failure.clone()) },
        "network": s.network.as_ref().map(|n| json!({
            "rx_bytes": n.rx_bytes,
            "tx_bytes": n.tx_bytes,
            "rx_packets": n.rx_packets,
            "tx_packets": n.tx_packets,
            "last_activity_at": rfc3339(&n.last_activity_at),
        })),
        "network_policy": s.network_policy.as_ref().map(|p| json!({
            "no_internet": p.no_internet,
            "allow_out": p.allow_out,
            "deny_out": p.deny_out,
        })),
    })
}

/// "3s", "5m", "2h", "4d".
pub fn age(ts: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = timestamp(ts) else {
        return "-".into();
    };
    let d = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// Prints rows as left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_readable_state_and_nulls() {
        let s = proto::Sandbox {
            id: "sbx-1".into(),
            state: proto::SandboxState::Running as i32,
            ..Default::default()
        };
        let v = sandbox_json(&s);
        assert_eq!(v["state"], "running");
        assert_eq!(v["expires_at"], Value::Null);
        assert_eq!(v["failure"], Value::Null);
    }

    #[test]
    fn ages_are_short() {
        let now = prost_types::Timestamp::from(SystemTime::now() - Duration::from_secs(125));
        assert_eq!(age(&Some(now)), "2m");
        assert_eq!(age(&None), "-");
    }
}
