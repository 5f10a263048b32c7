//! The public `somna.v1.Hosts` and `somna.v1.Images` services.

use std::collections::HashMap;
use std::sync::Arc;

use somna_proto::v1::{
    ListHostsRequest, ListHostsResponse, ListImagesRequest, ListImagesResponse, PullImageEvent,
    PullImageRequest, RemoveImageRequest, RemoveImageResponse,
};
use tonic::{Request, Response, Status};

use crate::host::{Host, StatusStream};
use crate::service::ControlPlane;

impl ControlPlane {
    pub fn hosts_service(&self) -> somna_proto::v1::hosts_server::HostsServer<ControlPlane> {
        somna_proto::v1::hosts_server::HostsServer::new(self.clone())
    }

    pub fn images_service(&self) -> somna_proto::v1::images_server::ImagesServer<ControlPlane> {
        somna_proto::v1::images_server::ImagesServer::new(self.clone())
    }

    /// The host that serves image calls: the first ready one. (Images are
    /// cached per host; creates pull on demand on the host they land on.)
    fn image_host(&self) -> Result<Arc<dyn Host>, Status> {
        let mut hosts = self.inner.hosts.all();
        hosts.sort_by(|a, b| a.host.id().cmp(b.host.id()));
        hosts
            .into_iter()
            .find(|c| c.last_ok.elapsed() < self.inner.config.lost_after)
            .map(|c| c.host)
            .ok_or_else(|| Status::unavailable("no host is connected"))
    }
}

#[tonic::async_trait]
impl somna_proto::v1::hosts_server::Hosts for ControlPlane {
    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.caller(&request).await?;
        let store = self.store();
        let rows = store
            .hosts()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut alloc: HashMap<String, (u32, u64)> = HashMap::new();
        for s in store
            .sandboxes(None)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
        {
            if s.holds_capacity() {
                let e = alloc.entry(s.host_id.clone()).or_default();
                e.0 += s.cpus as u32;
                e.1 += s.memory_mib as u64;
            }
        }
        let hosts = rows
            .into_iter()
            .map(|r| {
                let mut h = r.info;
                h.id = r.id.clone();
                h.state = r.state;
                h.last_heartbeat_at = Some(prost_types::Timestamp::from(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_millis(r.last_heartbeat_ms as u64),
                ));
                let (c, m) = alloc.get(&r.id).copied().unwrap_or_default();
                h.cpus_allocated = c;
                h.memory_allocated_mib = m;
                h
            })
            .collect();
        Ok(Response::new(ListHostsResponse { hosts }))
    }
}

#[tonic::async_trait]
impl somna_proto::v1::images_server::Images for ControlPlane {
    type PullImageStream = StatusStream<PullImageEvent>;

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        self.caller(&request).await?;
        let reference = request.into_inner().reference;
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference: is required (e.g. \"busybox\")",
            ));
        }
        Ok(Response::new(
            self.image_host()?.pull_image(reference).await?,
        ))
    }

    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.caller(&request).await?;
        Ok(Response::new(self.image_host()?.list_images().await?))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.caller(&request).await?;
        let reference = request.into_inner().reference;
        Ok(Response::new(
            self.image_host()?.remove_image(&reference).await?,
        ))
    }
}
