//! The control plane's background work. Every replica polls the hosts it
//! can reach (heartbeat: their report and their sandboxes, reconciled into
//! the store). The leading replica also destroys expired sandboxes and
//! marks hosts lost when nobody has heard from them in time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::host::Host;
use crate::service::{ControlPlane, state_name};
use crate::store::{HostRow, Leadership, now_ms};

pub(crate) fn spawn(cp: &ControlPlane) {
    let weak = Arc::downgrade(&cp.inner);
    tokio::spawn(async move {
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let cp = ControlPlane { inner };
            let interval = cp.inner.config.heartbeat;
            let hosts: Vec<Arc<dyn Host>> =
                cp.inner.hosts.all().into_iter().map(|c| c.host).collect();
            let beats = hosts.iter().map(|h| heartbeat(&cp, h));
            futures::future::join_all(beats).await;
            drop(cp);
            tokio::time::sleep(interval).await;
        }
    });
    let weak = Arc::downgrade(&cp.inner);
    tokio::spawn(async move {
        let mut leadership: Option<Leadership> = None;
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let cp = ControlPlane { inner };
            if leadership.is_none() {
                match cp.inner.store.try_lead().await {
                    Ok(Some(l)) => {
                        info!("this replica leads (timeouts, host health)");
                        leadership = Some(l);
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "cannot take part in leader election"),
                }
            }
            if leadership.is_some() {
                expire(&cp).await;
                detect_lost_hosts(&cp).await;
                cp.tend_apps().await;
            }
            drop(cp);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// How long a create's host call may take to reach its host: a row still
/// `creating` after this, which the host neither lists nor has under way,
/// was never asked for there (its control plane died first, or the call
/// was lost).
const SEND_GRACE_MS: i64 = 10_000;

/// How old a sandbox a host lists without any row in the store must be
/// before it is destroyed as an orphan (a create racing its row's removal).
const ORPHAN_GRACE_MS: i64 = 30_000;

/// Asks `host` for its report and its sandboxes and brings the store in
/// line with them.
pub(crate) async fn heartbeat(cp: &ControlPlane, host: &Arc<dyn Host>) {
    let limit = cp.inner.config.heartbeat.max(Duration::from_secs(2));
    // Rows settled (past creating) before the host is asked: only these may
    // be missing from its list because the host lost them. A create that
    // finishes while the report is on its way is settled in the store but
    // absent from the (older) list.
    let Ok(before) = cp.inner.store.sandboxes_on_host(host.id()).await else {
        return;
    };
    let report = tokio::time::timeout(limit, async {
        Ok::<_, tonic::Status>((host.info().await?, host.list_sandboxes().await?))
    })
    .await;
    let (info, sandboxes) = match report {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(host = host.id(), error = %e.message(), "heartbeat failed");
            return;
        }
        Err(_) => {
            tracing::debug!(host = host.id(), "heartbeat timed out");
            return;
        }
    };
    // A create begun before the host's agent started died with the
    // previous agent; one the host has not got (listed or under way) after
    // the send grace never reached it. Both are settled at once. The host
    // moves an id from under way to listed, never out of both, and its
    // report was taken before its list.
    let agent_started_ms = millis(info.agent_started_at.as_ref());
    let under_way: HashSet<&str> = info.creates_under_way.iter().map(|s| s.as_str()).collect();
    let settled: HashSet<String> = before
        .iter()
        .filter(|r| {
            r.state != "creating"
                || r.created_ms < agent_started_ms
                || (now_ms() - r.created_ms >= SEND_GRACE_MS && !under_way.contains(r.id.as_str()))
        })
        .map(|r| r.id.clone())
        .collect();
    drop(under_way);
    cp.inner.hosts.reported(host, info.clone());
    let store = &cp.inner.store;
    let row = HostRow {
        id: host.id().to_string(),
        state: "ready".into(),
        cpus: info.cpus as i64,
        memory_mib: info.memory_mib as i64,
        last_heartbeat_ms: now_ms(),
        info,
    };
    if let Err(e) = store.upsert_host(&row).await {
        warn!(host = host.id(), error = %e, "cannot record the host's heartbeat");
        return;
    }
    reconcile(cp, host, &settled, agent_started_ms, sandboxes).await;
}

fn millis(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or(0)
}

/// Sandboxes the store places on `host`, against what `host` reports.
async fn reconcile(
    cp: &ControlPlane,
    host: &Arc<dyn Host>,
    settled: &HashSet<String>,
    agent_started_ms: i64,
    reported: Vec<somna_proto::v1::Sandbox>,
) {
    let store = &cp.inner.store;
    let Ok(rows) = store.sandboxes_on_host(host.id()).await else {
        return;
    };
    let by_id: HashMap<String, somna_proto::v1::Sandbox> =
        reported.into_iter().map(|s| (s.id.clone(), s)).collect();
    let known: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let orphans: Vec<&somna_proto::v1::Sandbox> = by_id
        .values()
        .filter(|s| !known.contains(s.id.as_str()))
        .collect();
    for orphan in orphans {
        destroy_orphan(cp, host, orphan).await;
    }
    drop(known);
    for mut row in rows {
        match by_id.get(&row.id) {
            Some(_) if row.state == "destroying" => {
                let id = row.id.clone();
                if let Err(e) = cp.destroy_row(row).await {
                    warn!(%id, error = %e.message(), "finishing a destroy failed");
                }
            }
            Some(rec) => {
                let state = state_name(
                    somna_proto::v1::SandboxState::try_from(rec.state).unwrap_or_default(),
                );
                let mut fresh = rec.clone();
                fresh.labels = row.record.labels.clone();
                if row.state != state || row.record != fresh {
                    ControlPlane::absorb(&mut row, rec.clone());
                    if let Err(e) = store.update_sandbox(&row).await {
                        warn!(id = %row.id, error = %e, "cannot update a sandbox from its host's report");
                    }
                }
            }
            None if row.state == "destroying" => {
                let _ = store.delete_sandbox(&row.id).await;
            }
            // Still being created: the host lists it once it is under way.
            None if row.state == "creating" && !settled.contains(&row.id) => {}
            None if row.state == "failed" => {}
            // Settled after the host made its list: the next report has it.
            None if !settled.contains(&row.id) => {}
            // The host never got it: the client had an error (its control
            // plane died, or the call failed), so the create did not
            // happen; the same request id may create it again.
            None if row.state == "creating" && row.created_ms >= agent_started_ms => {
                warn!(id = %row.id, host = host.id(), "a create never reached its host; forgetting it");
                let _ = store.delete_sandbox(&row.id).await;
            }
            None => {
                warn!(id = %row.id, host = host.id(), "the host no longer has this sandbox");
                row.state = "failed".into();
                row.record.failure =
                    "its host no longer has it (the host agent restarted, or it was removed there)"
                        .into();
                let _ = store.update_sandbox(&row).await;
            }
        }
    }
}

/// Destroys a sandbox `host` runs that the store has no row for (so no
/// client can reach it), once it is old enough not to be a create whose
/// row is being written.
async fn destroy_orphan(cp: &ControlPlane, host: &Arc<dyn Host>, s: &somna_proto::v1::Sandbox) {
    if now_ms() - millis(s.created_at.as_ref()) < ORPHAN_GRACE_MS {
        return;
    }
    // A fresh read: the row may belong to another host's list, or have
    // been written since.
    if !matches!(cp.inner.store.sandbox(None, &s.id).await, Ok(None)) {
        return;
    }
    warn!(id = %s.id, host = host.id(), "the host runs a sandbox the store does not know; destroying it");
    if let Err(e) = host.destroy_sandbox(&s.id).await {
        warn!(id = %s.id, error = %e.message(), "destroying an orphaned sandbox failed");
    }
}

/// Destroys sandboxes past their timeout.
async fn expire(cp: &ControlPlane) {
    let Ok(expired) = cp.inner.store.expired_sandboxes(now_ms()).await else {
        return;
    };
    for row in expired {
        // A create still under way is destroyed once its host has it (a
        // destroy racing the boot would leave the VMM behind).
        if row.state == "destroying" || row.state == "creating" {
            continue;
        }
        let id = row.id.clone();
        match cp.destroy_row(row).await {
            Ok(()) => info!(%id, "sandbox timed out and was destroyed"),
            Err(e) => warn!(%id, error = %e.message(), "destroying a timed-out sandbox failed"),
        }
    }
}

/// Hosts nobody has heard from within `lost_after` are lost, and so are
/// their sandboxes (until the host reports again).
async fn detect_lost_hosts(cp: &ControlPlane) {
    let store = &cp.inner.store;
    let Ok(hosts) = store.hosts().await else {
        return;
    };
    let limit = cp.inner.config.lost_after.as_millis() as i64;
    for h in hosts {
        if h.state != "ready" || now_ms() - h.last_heartbeat_ms <= limit {
            continue;
        }
        warn!(host = %h.id, silent_ms = now_ms() - h.last_heartbeat_ms, "host lost: no heartbeat");
        if store.set_host_state(&h.id, "lost").await.is_err() {
            continue;
        }
        let Ok(rows) = store.sandboxes_on_host(&h.id).await else {
            continue;
        };
        for mut row in rows {
            if matches!(
                row.state.as_str(),
                "running" | "sleeping" | "creating" | "waking"
            ) {
                row.state = "lost".into();
                let _ = store.update_sandbox(&row).await;
            }
        }
    }
}
