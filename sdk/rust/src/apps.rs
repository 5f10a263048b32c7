//! Apps: long-lived web servers behind the platform's ingress that sleep
//! when idle and wake on the first request (`somna.v1.Apps`).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::Stream;
use somna_proto::v1::{self as proto, apps_client::AppsClient};

use crate::{AuthChannel, Client, Result};

/// What to deploy: the image, the port it listens on, and how to scale.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    pub image: String,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    /// Program and arguments; empty runs the image's Entrypoint + Cmd.
    pub command: Vec<String>,
    pub min_replicas: u32,
    /// 0 means the platform default (1).
    pub max_replicas: u32,
    /// None means the platform default (30 s).
    pub idle_timeout: Option<Duration>,
    /// HTTP path for health checks; empty checks that the port accepts.
    pub health_path: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// In-flight requests per replica that trigger a scale-up (0: 10).
    pub target_in_flight: u32,
    /// How long a new replica may take to listen (None: 120 s).
    pub ready_timeout: Option<Duration>,
}

impl AppOptions {
    pub fn new(image: impl Into<String>, port: u16) -> Self {
        AppOptions {
            image: image.into(),
            port,
            ..Default::default()
        }
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    pub fn command<I: IntoIterator<Item = S>, S: Into<String>>(mut self, argv: I) -> Self {
        self.command = argv.into_iter().map(Into::into).collect();
        self
    }
    pub fn replicas(mut self, min: u32, max: u32) -> Self {
        self.min_replicas = min;
        self.max_replicas = max;
        self
    }
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.health_path = path.into();
        self
    }
    pub fn ready_timeout(mut self, limit: Duration) -> Self {
        self.ready_timeout = Some(limit);
        self
    }

    fn into_spec(self) -> proto::AppSpec {
        proto::AppSpec {
            image: self.image,
            port: self.port.into(),
            env: self.env.into_iter().collect(),
            command: self.command,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            idle_timeout_seconds: self.idle_timeout.map(|d| d.as_secs().max(1)).unwrap_or(0),
            health_path: self.health_path,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            target_in_flight: self.target_in_flight,
            ready_timeout_seconds: self.ready_timeout.map(|d| d.as_secs().max(1)).unwrap_or(0),
        }
    }
}

impl Client {
    fn apps(&self) -> AppsClient<AuthChannel> {
        AppsClient::new(self.channel())
    }

    /// Deploys app `name` (or rolls it over to these options); returns once
    /// the new version serves. A version that never listens fails with
    /// its last log lines, and the previous one keeps serving.
    pub async fn deploy_app(&self, name: &str, options: AppOptions) -> Result<proto::App> {
        Ok(self
            .apps()
            .deploy_app(proto::DeployAppRequest {
                name: name.to_string(),
                spec: Some(options.into_spec()),
            })
            .await?
            .into_inner())
    }

    pub async fn app(&self, name: &str) -> Result<proto::App> {
        Ok(self
            .apps()
            .get_app(proto::GetAppRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner())
    }

    pub async fn list_apps(&self) -> Result<Vec<proto::App>> {
        Ok(self
            .apps()
            .list_apps(proto::ListAppsRequest {})
            .await?
            .into_inner()
            .apps)
    }

    /// Destroys the app's replicas and forgets it.
    pub async fn delete_app(&self, name: &str) -> Result<()> {
        self.apps()
            .delete_app(proto::DeleteAppRequest {
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// The app's output (stdout and stderr of each replica); with `follow`
    /// the stream stays open for new output.
    pub async fn app_logs(
        &self,
        name: &str,
        follow: bool,
        tail_lines: u32,
    ) -> Result<impl Stream<Item = Result<proto::AppLogChunk>> + use<>> {
        use futures::StreamExt;
        let stream = self
            .apps()
            .app_logs(proto::AppLogsRequest {
                name: name.to_string(),
                follow,
                tail_lines,
            })
            .await?
            .into_inner();
        Ok(stream.map(|r| r.map_err(crate::Error::from)))
    }
}
