//! Apps: long-lived web servers made of replica sandboxes behind the
//! ingress ([`ingress`]), which wakes a sleeping replica on the first
//! request and holds the request meanwhile.
//!
//! - A replica is a sandbox labelled `somna.app=<name>` and
//!   `somna.app.version=<n>`, created with the app's port exposed and its
//!   idle timeout, so the host agent puts it to sleep when neither proxied
//!   requests nor other network traffic arrive (health checks come from
//!   netd's health-check address and do not count).
//! - The app's process is started detached, its output appended to
//!   [`LOG_FILE`] inside the replica (`AppLogs` reads it from there).
//! - A deploy starts the new version's replicas, waits until each listens
//!   (and answers the health path), then switches the ingress to it and
//!   drains the old replicas (destroyed once their in-flight requests are
//!   done). A version that never listens fails the deploy with its last log
//!   lines; the old version keeps serving.
//! - [`scaler`] keeps replica counts within bounds, health-checks awake
//!   replicas and replaces failed ones.

pub(crate) mod ingress;
mod probe;
mod runtime;
pub(crate) mod scaler;
mod service;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use somna_proto::v1::{
    App, AppSpec, AppState, CreateSandboxRequest, ExecStart, ReadFileRequest, StatFileRequest,
    exec_response,
};
use tonic::Status;
use tracing::{info, warn};

use crate::auth::Caller;
use crate::service::{ControlPlane, store_err};
use crate::store::{AppRow, SandboxRow};

pub(crate) use runtime::Runtime;

/// Where a replica's stdout and stderr go, inside the sandbox.
pub const LOG_FILE: &str = "/tmp/somna-app.log";
/// Labels that mark a sandbox as a replica.
pub const APP_LABEL: &str = "somna.app";
pub const VERSION_LABEL: &str = "somna.app.version";
/// Set on a replica once its app answered; only ready replicas serve.
pub const READY_LABEL: &str = "somna.app.ready";

const DEFAULT_IDLE_TIMEOUT_S: u64 = 30;
const DEFAULT_TARGET_IN_FLIGHT: u32 = 10;
const DEFAULT_READY_TIMEOUT_S: u64 = 120;
const MAX_REPLICAS: u32 = 64;
/// Log lines quoted in a failed deploy's error.
const ERROR_LOG_LINES: usize = 20;

/// Checks a deploy request and fills the defaults in.
pub fn validate(name: &str, spec: &mut AppSpec) -> Result<(), Status> {
    let bad = |field: &str, why: String| Status::invalid_argument(format!("{field}: {why}"));
    if !valid_name(name) {
        return Err(bad(
            "name",
            format!(
                "{name:?} is not a DNS label: use 1-63 of [a-z0-9-], not starting or ending with '-'"
            ),
        ));
    }
    if spec.image.trim().is_empty() {
        return Err(bad("image", "is required (e.g. \"python\")".into()));
    }
    crate::validate::port("port", spec.port)?;
    crate::validate::env(&spec.env)?;
    crate::validate::timeout("idle_timeout_seconds", spec.idle_timeout_seconds)?;
    crate::validate::timeout("ready_timeout_seconds", spec.ready_timeout_seconds)?;
    if !spec.health_path.is_empty()
        && (!spec.health_path.starts_with('/')
            || spec
                .health_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(bad(
            "health_path",
            format!("{:?} must be a path starting with '/'", spec.health_path),
        ));
    }
    if spec.max_replicas == 0 {
        spec.max_replicas = spec.min_replicas.max(1);
    }
    if spec.min_replicas > spec.max_replicas {
        return Err(bad(
            "min_replicas",
            format!(
                "{} is more than max_replicas ({})",
                spec.min_replicas, spec.max_replicas
            ),
        ));
    }
    if spec.max_replicas > MAX_REPLICAS {
        return Err(bad(
            "max_replicas",
            format!("{} is more than {MAX_REPLICAS}", spec.max_replicas),
        ));
    }
    if spec.idle_timeout_seconds == 0 {
        spec.idle_timeout_seconds = DEFAULT_IDLE_TIMEOUT_S;
    }
    if spec.target_in_flight == 0 {
        spec.target_in_flight = DEFAULT_TARGET_IN_FLIGHT;
    }
    if spec.ready_timeout_seconds == 0 {
        spec.ready_timeout_seconds = DEFAULT_READY_TIMEOUT_S;
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Replicas an app keeps at least (a scaled-to-zero app keeps one asleep).
pub(crate) fn floor(spec: &AppSpec) -> u32 {
    spec.min_replicas.max(1)
}

/// A replica's version, from its labels.
pub(crate) fn replica_version(row: &SandboxRow) -> Option<i64> {
    row.record.labels.get(VERSION_LABEL)?.parse().ok()
}

/// Whether a replica row can serve (or be woken to serve).
pub(crate) fn is_live(row: &SandboxRow) -> bool {
    matches!(
        row.state.as_str(),
        "creating" | "running" | "sleeping" | "waking"
    )
}

/// The owner of an app's background work (scaler, drains).
fn owner(app: &AppRow) -> Caller {
    Caller {
        tenant_id: app.tenant_id.clone(),
        key_id: format!("app:{}", app.name),
    }
}

impl ControlPlane {
    /// Every replica row of app `name` (all versions), oldest first.
    pub(crate) async fn replica_rows(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<SandboxRow>, Status> {
        Ok(self
            .store()
            .sandboxes(Some(tenant))
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|r| r.record.labels.get(APP_LABEL).map(String::as_str) == Some(name))
            .collect())
    }

    /// Deploys version `deploys + 1` of an app: see the module docs.
    pub(crate) async fn deploy_app(
        &self,
        caller: &Caller,
        name: &str,
        mut spec: AppSpec,
    ) -> Result<App, Status> {
        validate(name, &mut spec)?;
        let lock = self.inner.apps.deploy_lock(name);
        let _held = lock.lock().await;
        let store = self.store();
        let now = crate::store::now_ms();
        let mut row = match store.app(name).await.map_err(store_err)? {
            Some(r) if r.tenant_id != caller.tenant_id => {
                return Err(Status::already_exists(format!(
                    "the app name {name:?} is taken; choose another"
                )));
            }
            Some(r) => r,
            None => {
                let row = AppRow {
                    name: name.to_string(),
                    tenant_id: caller.tenant_id.clone(),
                    version: 0,
                    deploys: 0,
                    created_ms: now,
                    record: App {
                        name: name.to_string(),
                        spec: Some(spec.clone()),
                        state: AppState::Deploying as i32,
                        created_at: Some(timestamp(now)),
                        ..Default::default()
                    },
                };
                if !store.insert_app(&row).await.map_err(store_err)? {
                    return Err(Status::already_exists(format!(
                        "the app name {name:?} is taken; choose another"
                    )));
                }
                row
            }
        };
        row.deploys += 1;
        let version = row.deploys;
        store.update_app(&row).await.map_err(store_err)?;

        let serving = self
            .replica_rows(&caller.tenant_id, name)
            .await?
            .into_iter()
            .filter(|r| replica_version(r) == Some(row.version) && is_live(r))
            .count() as u32;
        let count = serving.max(floor(&spec)).min(spec.max_replicas);
        let started = Instant::now();
        info!(app = name, version, replicas = count, image = %spec.image, "deploying");
        let results = futures::future::join_all(
            (0..count).map(|_| self.start_replica(caller, name, version, &spec)),
        )
        .await;
        let failure = results.iter().find_map(|r| r.as_ref().err()).cloned();
        if let Some(err) = failure {
            for id in results.into_iter().filter_map(Result::ok) {
                self.destroy_replica(caller, &id).await;
            }
            warn!(app = name, version, error = %err.message(), "deploy failed");
            if row.version == 0 {
                // Nothing ever served: forget the app.
                store.delete_app(name).await.map_err(store_err)?;
            } else {
                row.record.last_error = err.message().to_string();
                store.update_app(&row).await.map_err(store_err)?;
            }
            return Err(err);
        }

        let old_version = row.version;
        row.version = version;
        row.record.spec = Some(spec);
        row.record.state = AppState::Ready as i32;
        row.record.last_error.clear();
        row.record.updated_at = Some(timestamp(crate::store::now_ms()));
        store.update_app(&row).await.map_err(store_err)?;
        self.inner.apps.forget_route(name);
        info!(
            app = name,
            version,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "deployed; draining version {old_version}"
        );
        let cp = self.clone();
        let owner = owner(&row);
        let app = name.to_string();
        tokio::spawn(async move { cp.drain_old(&owner, &app, version).await });
        self.app_view(&row).await
    }

    /// Creates one replica of `version`, starts the app in it and waits
    /// until it is ready; on failure the replica is destroyed and the error
    /// quotes the app's last log lines. Returns the sandbox id.
    pub(crate) async fn start_replica(
        &self,
        caller: &Caller,
        name: &str,
        version: i64,
        spec: &AppSpec,
    ) -> Result<String, Status> {
        let req = CreateSandboxRequest {
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            env: spec.env.clone(),
            idle_timeout_seconds: spec.idle_timeout_seconds,
            labels: HashMap::from([
                (APP_LABEL.to_string(), name.to_string()),
                (VERSION_LABEL.to_string(), version.to_string()),
            ]),
            expose_ports: vec![spec.port],
            ..Default::default()
        };
        let sandbox = self.create_for(caller, req).await.map_err(|e| {
            Status::new(
                e.code(),
                format!("app {name}: creating a replica failed: {}", e.message()),
            )
        })?;
        let id = sandbox.id;
        let launched = match self.launch(caller, &id, spec).await {
            Ok(()) => self
                .mark_ready(caller, &id)
                .await
                .map_err(|e| e.message().to_string()),
            Err(why) => Err(why),
        };
        match launched {
            Ok(()) => Ok(id),
            Err(why) => {
                let logs = self.log_tail(caller, &id, ERROR_LOG_LINES).await;
                self.destroy_replica(caller, &id).await;
                Err(Status::failed_precondition(format!(
                    "app {name} version {version} did not become ready: {why}\n--- last lines of its output ---\n{logs}"
                )))
            }
        }
    }

    /// Whether the app answered in this replica.
    pub(crate) fn is_ready(&self, row: &SandboxRow) -> bool {
        row.record.labels.contains_key(READY_LABEL) || self.inner.apps.is_ready(&row.id)
    }

    /// Labels replica `id` ready: from now on the ingress may route to it.
    pub(crate) async fn mark_ready(&self, caller: &Caller, id: &str) -> Result<(), Status> {
        self.inner.apps.set_ready(id);
        let mut row = self.row(caller, id).await?;
        row.record
            .labels
            .insert(READY_LABEL.to_string(), "true".to_string());
        self.save(&row).await
    }

    /// Starts the app's process in replica `id` and waits for its port.
    async fn launch(&self, caller: &Caller, id: &str, spec: &AppSpec) -> Result<(), String> {
        let (_, host) = self
            .route(caller, id)
            .await
            .map_err(|e| e.message().to_string())?;
        let start = ExecStart {
            sandbox_id: id.to_string(),
            argv: spec.command.clone(),
            detach: true,
            output_file: LOG_FILE.into(),
            ..Default::default()
        };
        let mut events = host
            .exec(start, futures::stream::empty().boxed())
            .await
            .map_err(|e| format!("starting the app: {}", e.message()))?;
        let mut pid = 0;
        while let Some(event) = events.next().await {
            match event
                .map_err(|e| format!("starting the app: {}", e.message()))?
                .event
            {
                Some(exec_response::Event::Started(s)) => pid = s.pid,
                Some(exec_response::Event::Exit(e)) if e.exit_code != 0 => {
                    return Err(format!("the app could not start: {}", e.message));
                }
                _ => {}
            }
        }
        let port = spec.port as u16;
        let deadline = Instant::now() + Duration::from_secs(spec.ready_timeout_seconds);
        loop {
            let probed = match host.health_connect(id, port).await {
                Ok(Some(conn)) => probe::check(conn, &spec.health_path).await,
                Ok(None) => Err("the replica is not running".to_string()),
                Err(e) => Err(e.message().to_string()),
            };
            let why = match probed {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            let exited = host
                .stat_file(StatFileRequest {
                    sandbox_id: id.to_string(),
                    path: format!("/proc/{pid}"),
                })
                .await
                .is_err_and(|e| e.code() == tonic::Code::NotFound);
            if exited {
                return Err(format!(
                    "the app's process (pid {pid}) exited before it listened on port {port}"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nothing answered on port {port} within {} s (last check: {why})",
                    spec.ready_timeout_seconds
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `lines` lines of a replica's output ("" if unreadable).
    pub(crate) async fn log_tail(&self, caller: &Caller, id: &str, lines: usize) -> String {
        let Ok(text) = self.read_log(caller, id, 0).await else {
            return "(no output)".into();
        };
        tail(&String::from_utf8_lossy(&text), lines)
    }

    /// A replica's output from byte `offset` on.
    pub(crate) async fn read_log(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
    ) -> Result<Vec<u8>, Status> {
        let (_, host) = self.route(caller, id).await?;
        let mut chunks = host
            .read_file(ReadFileRequest {
                sandbox_id: id.to_string(),
                path: LOG_FILE.into(),
                offset,
                length: 0,
            })
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok(out)
    }

    /// Destroys a replica, logging (not returning) failures: the row stays
    /// `destroying` and the lifecycle loops finish the job.
    pub(crate) async fn destroy_replica(&self, caller: &Caller, id: &str) {
        self.inner.apps.forget_replica(id);
        match self.row(caller, id).await {
            Ok(row) => {
                if let Err(e) = self.destroy_row(row).await {
                    warn!(%id, error = %e.message(), "destroying an app replica failed");
                }
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => warn!(%id, error = %e.message(), "destroying an app replica failed"),
        }
    }

    /// Waits for the in-flight requests of versions older than `serving`
    /// to finish (at most [`DRAIN_LIMIT`]), then destroys those replicas.
    async fn drain_old(&self, owner: &Caller, name: &str, serving: i64) {
        const DRAIN_LIMIT: Duration = Duration::from_secs(60);
        let Ok(rows) = self.replica_rows(&owner.tenant_id, name).await else {
            return;
        };
        let old: Vec<String> = rows
            .into_iter()
            .filter(|r| replica_version(r).is_some_and(|v| v < serving))
            .map(|r| r.id)
            .collect();
        let deadline = Instant::now() + DRAIN_LIMIT;
        for id in old {
            while self.inner.apps.in_flight(&id) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.destroy_replica(owner, &id).await;
        }
    }

    /// Deletes an app: every replica, then the row.
    pub(crate) async fn delete_app(&self, caller: &Caller, name: &str) -> Result<(), Status> {
        let row = self.app_row(caller, name).await?;
        let lock = self.inner.apps.deploy_lock(name);
        let _held = lock.lock().await;
        for r in self.replica_rows(&row.tenant_id, name).await? {
            self.destroy_replica(caller, &r.id).await;
        }
        self.store().delete_app(name).await.map_err(store_err)?;
        self.inner.apps.forget_route(name);
        info!(app = name, "deleted");
        Ok(())
    }

    /// The caller's app `name`, or NOT_FOUND (also for other tenants').
    pub(crate) async fn app_row(&self, caller: &Caller, name: &str) -> Result<AppRow, Status> {
        self.store()
            .app(name)
            .await
            .map_err(store_err)?
            .filter(|r| r.tenant_id == caller.tenant_id)
            .ok_or_else(|| Status::not_found(format!("app {name} not found")))
    }

    /// The app as the API shows it: the row plus its serving replicas.
    pub(crate) async fn app_view(&self, row: &AppRow) -> Result<App, Status> {
        let mut app = row.record.clone();
        app.name = row.name.clone();
        app.version = row.version as u64;
        app.url = self.inner.apps.url(&row.name);
        let mut replicas = Vec::new();
        for r in self.replica_rows(&row.tenant_id, &row.name).await? {
            let state = crate::service::state_from_name(&r.state);
            match r.state.as_str() {
                "running" => app.replicas_awake += 1,
                "sleeping" => app.replicas_asleep += 1,
                _ => {}
            }
            replicas.push(somna_proto::v1::AppReplica {
                version: replica_version(&r).unwrap_or(0) as u64,
                state: state as i32,
                host: r.host_id.clone(),
                in_flight: self.inner.apps.in_flight(&r.id),
                ready: self.is_ready(&r),
                sandbox_id: r.id,
            });
        }
        app.replicas = replicas;
        Ok(app)
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let out = lines[start..].join("\n");
    if out.is_empty() {
        "(no output)".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "blog", "my-app-2", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "My", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn defaults_and_bounds() {
        let mut spec = AppSpec {
            image: "python".into(),
            port: 8080,
            ..Default::default()
        };
        validate("web", &mut spec).unwrap();
        assert_eq!(spec.max_replicas, 1);
        assert_eq!(spec.idle_timeout_seconds, DEFAULT_IDLE_TIMEOUT_S);
        assert_eq!(floor(&spec), 1);

        let mut spec = AppSpec {
            image: "python".into(),
            port: 8080,
            min_replicas: 3,
            max_replicas: 2,
            ..Default::default()
        };
        let e = validate("web", &mut spec).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("min_replicas"), "{}", e.message());

        for (port, path) in [(0, ""), (70000, ""), (80, "healthz"), (80, "/a b")] {
            let mut spec = AppSpec {
                image: "python".into(),
                port,
                health_path: path.into(),
                ..Default::default()
            };
            assert_eq!(
                validate("web", &mut spec).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "port {port} path {path:?}"
            );
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 5), "(no output)");
    }
}
