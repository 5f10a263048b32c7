//! The public `somna.v1.Apps` service.

use std::collections::HashMap;
use std::time::Duration;

use somna_proto::v1::apps_server::{Apps, AppsServer};
use somna_proto::v1::{
    App, AppLogChunk, AppLogsRequest, DeleteAppRequest, DeleteAppResponse, DeployAppRequest,
    GetAppRequest, ListAppsRequest, ListAppsResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{is_live, replica_version, tail};
use crate::auth::Caller;
use crate::host::StatusStream;
use crate::service::{ControlPlane, store_err};

/// How often `AppLogs --follow` looks for new output.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

impl ControlPlane {
    pub fn apps_service(&self) -> AppsServer<ControlPlane> {
        AppsServer::new(self.clone())
    }

    /// Sends the app's output to `tx` (see `AppLogs`).
    async fn stream_logs(
        &self,
        caller: Caller,
        req: AppLogsRequest,
        tx: mpsc::Sender<Result<AppLogChunk, Status>>,
    ) {
        let mut offsets: HashMap<String, u64> = HashMap::new();
        loop {
            let rows = match self.app_row(&caller, &req.name).await {
                Ok(app) => match self.replica_rows(&app.tenant_id, &app.name).await {
                    Ok(rows) => rows
                        .into_iter()
                        .filter(|r| replica_version(r) == Some(app.version) && is_live(r))
                        .collect::<Vec<_>>(),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for r in rows {
                let first = !offsets.contains_key(&r.id);
                let offset = offsets.get(&r.id).copied().unwrap_or(0);
                let Ok(data) = self.read_log(&caller, &r.id, offset).await else {
                    continue;
                };
                offsets.insert(r.id.clone(), offset + data.len() as u64);
                let data = if first && req.tail_lines > 0 {
                    let mut t = tail(&String::from_utf8_lossy(&data), req.tail_lines as usize);
                    t.push('\n');
                    t.into_bytes()
                } else {
                    data
                };
                if data.is_empty() {
                    continue;
                }
                let chunk = AppLogChunk {
                    sandbox_id: r.id,
                    data,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
        }
    }
}

#[tonic::async_trait]
impl Apps for ControlPlane {
    async fn deploy_app(
        &self,
        request: Request<DeployAppRequest>,
    ) -> Result<Response<App>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        Ok(Response::new(
            self.deploy_app(&caller, &req.name, spec).await?,
        ))
    }

    async fn get_app(&self, request: Request<GetAppRequest>) -> Result<Response<App>, Status> {
        let caller = self.caller(&request).await?;
        let row = self.app_row(&caller, &request.into_inner().name).await?;
        Ok(Response::new(self.app_view(&row).await?))
    }

    async fn list_apps(
        &self,
        request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let rows = self
            .store()
            .apps(Some(&caller.tenant_id))
            .await
            .map_err(store_err)?;
        let mut apps = Vec::with_capacity(rows.len());
        for row in &rows {
            apps.push(self.app_view(row).await?);
        }
        Ok(Response::new(ListAppsResponse { apps }))
    }

    async fn delete_app(
        &self,
        request: Request<DeleteAppRequest>,
    ) -> Result<Response<DeleteAppResponse>, Status> {
        let caller = self.caller(&request).await?;
        ControlPlane::delete_app(self, &caller, &request.into_inner().name).await?;
        Ok(Response::new(DeleteAppResponse {}))
    }

    type AppLogsStream = StatusStream<AppLogChunk>;

    async fn app_logs(
        &self,
        request: Request<AppLogsRequest>,
    ) -> Result<Response<Self::AppLogsStream>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        self.app_row(&caller, &req.name).await?;
        let (tx, rx) = mpsc::channel(16);
        let cp = self.clone();
        tokio::spawn(async move { cp.stream_logs(caller, req, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
