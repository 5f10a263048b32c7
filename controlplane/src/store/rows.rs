//! Typed rows of the store's tables.

use prost::Message;
use somna_proto::v1::{Host, Sandbox};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;

/// What a tenant may use at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantQuotas {
    pub max_sandboxes: i64,
    pub max_vcpus: i64,
    pub max_memory_mib: i64,
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas {
            max_sandboxes: 100,
            max_vcpus: 64,
            max_memory_mib: 128 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quotas: TenantQuotas,
}

impl Tenant {
    pub(super) fn from_row(r: &AnyRow) -> Result<Tenant, StoreError> {
        Ok(Tenant {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            quotas: TenantQuotas {
                max_sandboxes: r.try_get(2)?,
                max_vcpus: r.try_get(3)?,
                max_memory_mib: r.try_get(4)?,
            },
        })
    }
}

/// A host as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub id: String,
    /// "ready" or "lost".
    pub state: String,
    pub cpus: i64,
    pub memory_mib: i64,
    pub last_heartbeat_ms: i64,
    /// The host's last report (templates, pools, images, accelerator).
    pub info: Host,
}

impl HostRow {
    pub(super) fn from_row(r: &AnyRow) -> Result<HostRow, StoreError> {
        let info: Vec<u8> = r.try_get(5)?;
        Ok(HostRow {
            id: r.try_get(0)?,
            state: r.try_get(1)?,
            cpus: r.try_get(2)?,
            memory_mib: r.try_get(3)?,
            last_heartbeat_ms: r.try_get(4)?,
            info: Host::decode(info.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("host record: {e}")))?,
        })
    }
}

/// A sandbox: the control plane's columns plus the last full record.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub tenant_id: String,
    pub host_id: String,
    /// creating, running, sleeping, waking, failed, destroying, lost.
    pub state: String,
    pub request_id: Option<String>,
    pub cpus: i64,
    pub memory_mib: i64,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    /// The sandbox as the API shows it (labels, host-reported fields).
    pub record: Sandbox,
}

impl SandboxRow {
    pub(super) fn from_row(r: &AnyRow) -> Result<SandboxRow, StoreError> {
        let record: Vec<u8> = r.try_get(9)?;
        Ok(SandboxRow {
            id: r.try_get(0)?,
            tenant_id: r.try_get(1)?,
            host_id: r.try_get(2)?,
            state: r.try_get(3)?,
            request_id: r.try_get(4)?,
            cpus: r.try_get(5)?,
            memory_mib: r.try_get(6)?,
            created_ms: r.try_get(7)?,
            expires_ms: r.try_get(8)?,
            record: Sandbox::decode(record.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("sandbox record: {e}")))?,
        })
    }

    /// Whether it holds CPU and memory on its host.
    pub fn holds_capacity(&self) -> bool {
        matches!(self.state.as_str(), "creating" | "running" | "waking")
    }
}
