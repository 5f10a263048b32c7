//! Keeps apps healthy and sized (run by the leading replica): replicas of
//! stale versions go once idle, failed ones are replaced, awake ones are
//! health-checked (from netd's health-check address, so a check neither
//! keeps a replica awake nor wakes a sleeping one), the count stays within
//! [min, max], and load above the target adds a replica.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tracing::{info, warn};

use super::runtime::{Route, RouteReplica};
use super::{READY_LABEL, floor, is_live, owner, probe, replica_version};
use crate::service::{ControlPlane, store_err};
use crate::store::AppRow;

/// Failed health checks in a row after which a replica is replaced.
const HEALTH_FAILURES: u32 = 3;

impl ControlPlane {
    /// App `name` as the ingress routes it (cached for a moment).
    pub(crate) async fn app_route(&self, name: &str) -> Result<Option<Arc<Route>>, Status> {
        if let Some(route) = self.inner.apps.cached_route(name) {
            return Ok(Some(route));
        }
        let Some(app) = self.store().app(name).await.map_err(store_err)? else {
            return Ok(None);
        };
        let spec = app.record.spec.clone().unwrap_or_default();
        let replicas = self
            .replica_rows(&app.tenant_id, name)
            .await?
            .into_iter()
            .filter(|r| replica_version(r) == Some(app.version) && is_live(r) && self.is_ready(r))
            .map(|r| RouteReplica {
                awake: r.state == "running",
                id: r.id,
                host: r.host_id,
            })
            .collect();
        Ok(Some(self.inner.apps.put_route(Route {
            name: name.to_string(),
            port: spec.port as u16,
            target_in_flight: spec.target_in_flight,
            max_replicas: spec.max_replicas,
            replicas,
        })))
    }

    /// Adds one replica to the route's app in the background (at most one
    /// scale-up per app at a time).
    pub(crate) fn scale_up(&self, route: &Route) {
        let cp = self.clone();
        let name = route.name.clone();
        tokio::spawn(async move {
            let Some(_scaling) = cp.inner.apps.begin_scaling(&name) else {
                return;
            };
            if cp.inner.apps.stopping() {
                return;
            }
            if let Err(e) = cp.add_replica(&name, None).await {
                warn!(app = %name, error = %e.message(), "adding a replica failed");
            }
        });
    }

    /// Starts a replica of the serving version; with `replacing`, destroys
    /// that replica once the new one is ready.
    async fn add_replica(&self, name: &str, replacing: Option<&str>) -> Result<(), Status> {
        let Some(app) = self.store().app(name).await.map_err(store_err)? else {
            return Ok(());
        };
        let spec = app.record.spec.clone().unwrap_or_default();
        let owner = owner(&app);
        let live = self
            .replica_rows(&app.tenant_id, name)
            .await?
            .iter()
            .filter(|r| replica_version(r) == Some(app.version) && is_live(r))
            .count() as u32;
        if replacing.is_none() && live >= spec.max_replicas {
            return Ok(());
        }
        let id = self.start_replica(&owner, name, app.version, &spec).await?;
        info!(app = name, %id, replacing = replacing.unwrap_or("-"), "replica added");
        self.inner.apps.forget_route(name);
        if let Some(old) = replacing {
            self.destroy_replica(&owner, old).await;
        }
        Ok(())
    }

    /// Replaces a replica in the background (one change per app at a time).
    fn replace(&self, app: &AppRow, id: String) {
        let cp = self.clone();
        let name = app.name.clone();
        tokio::spawn(async move {
            let Some(_scaling) = cp.inner.apps.begin_scaling(&name) else {
                return;
            };
            if let Err(e) = cp.add_replica(&name, Some(&id)).await {
                warn!(app = %name, %id, error = %e.message(), "replacing a replica failed");
                if let Ok(Some(mut row)) = cp.store().app(&name).await {
                    row.record.last_error = e.message().to_string();
                    let _ = cp.store().update_app(&row).await;
                }
            }
        });
    }

    /// One pass over every app.
    pub(crate) async fn tend_apps(&self) {
        if self.inner.apps.stopping() {
            return;
        }
        let apps = match self.store().apps(None).await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot list apps");
                return;
            }
        };
        for app in apps {
            if app.version == 0 {
                continue;
            }
            let lock = self.inner.apps.deploy_lock(&app.name);
            let Ok(_deploy) = lock.try_lock() else {
                continue; // a deploy or delete is under way
            };
            if let Err(e) = self.tend(&app).await {
                warn!(app = %app.name, error = %e.message(), "tending the app failed");
            }
        }
    }

    async fn tend(&self, app: &AppRow) -> Result<(), Status> {
        let spec = app.record.spec.clone().unwrap_or_default();
        let owner = owner(app);
        let rows = self.replica_rows(&app.tenant_id, &app.name).await?;
        let mut live = Vec::new();
        for r in rows {
            let current = replica_version(&r) == Some(app.version);
            if !current {
                // A stale version (an interrupted deploy or drain).
                if self.inner.apps.in_flight(&r.id) == 0 {
                    self.destroy_replica(&owner, &r.id).await;
                }
            } else if r.state == "failed" {
                warn!(app = %app.name, id = %r.id, failure = %r.record.failure, "replica failed; replacing it");
                self.destroy_replica(&owner, &r.id).await;
                self.inner.apps.forget_route(&app.name);
            } else if is_live(&r) {
                live.push(r);
            }
        }
        // Starting replicas are probed by their own launch.
        for r in &live {
            // A heartbeat may have written the row back without the label.
            if self.inner.apps.is_ready(&r.id) && !r.record.labels.contains_key(READY_LABEL) {
                self.mark_ready(&owner, &r.id).await?;
            }
        }
        for r in live
            .iter()
            .filter(|r| r.state == "running" && self.is_ready(r))
        {
            let Some(host) = self.inner.hosts.get(&r.host_id) else {
                continue;
            };
            let checked = match host.health_connect(&r.id, spec.port as u16).await {
                Ok(None) => continue, // asleep: never woken for a check
                Ok(Some(conn)) => probe::check(conn, &spec.health_path).await,
                Err(e) => Err(e.message().to_string()),
            };
            match checked {
                Ok(()) => self.inner.apps.health_ok(&r.id),
                Err(why) => {
                    let n = self.inner.apps.health_failed(&r.id);
                    warn!(app = %app.name, id = %r.id, failures = n, %why, "health check failed");
                    if n >= HEALTH_FAILURES {
                        self.replace(app, r.id.clone());
                    }
                }
            }
        }
        let want = floor(&spec);
        if (live.len() as u32) < want {
            let route = self.app_route(&app.name).await?;
            if let Some(route) = route {
                self.scale_up(&route);
            }
        } else if live.len() as u32 > want
            && live.iter().all(|r| self.is_ready(r))
            && live
                .iter()
                .map(|r| self.inner.apps.in_flight(&r.id))
                .sum::<u32>()
                <= spec.target_in_flight * (live.len() as u32 - 1)
        {
            // Load fell: the others can carry it. One idle replica per pass.
            let idle = Duration::from_secs(spec.idle_timeout_seconds);
            let quiet = live.iter().find(|r| {
                self.inner.apps.in_flight(&r.id) == 0
                    && self
                        .inner
                        .apps
                        .last_request(&r.id)
                        .is_none_or(|t| t.elapsed() >= idle)
                    && crate::store::now_ms() - r.created_ms >= idle.as_millis() as i64
            });
            if let Some(r) = quiet {
                info!(app = %app.name, id = %r.id, "scaling down");
                self.destroy_replica(&owner, &r.id).await;
                self.inner.apps.forget_route(&app.name);
            }
        }
        Ok(())
    }
}
