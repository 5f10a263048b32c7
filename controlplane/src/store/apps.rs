//! Apps: one row per app name (names are platform-wide, they are the
//! ingress host names). The row holds the serving version and its spec;
//! replicas are sandbox rows labelled with the app and version.

use prost::Message;
use somna_proto::v1::App;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, now_ms};

/// An app: the control plane's columns plus the API record.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRow {
    pub name: String,
    pub tenant_id: String,
    /// The version serving (0 while the first deploy runs).
    pub version: i64,
    /// Deploys started so far: the next deploy's version is `deploys + 1`,
    /// so a version number is never reused, not even by a failed deploy.
    pub deploys: i64,
    pub created_ms: i64,
    /// The app as the API shows it (spec of the serving version, state,
    /// last error); replicas are filled in from sandbox rows.
    pub record: App,
}

const SELECT: &str = "SELECT name, tenant_id, version, deploys, created_ms, record FROM apps";

impl AppRow {
    fn from_row(r: &AnyRow) -> Result<AppRow, StoreError> {
        let record: Vec<u8> = r.try_get(5)?;
        Ok(AppRow {
            name: r.try_get(0)?,
            tenant_id: r.try_get(1)?,
            version: r.try_get(2)?,
            deploys: r.try_get(3)?,
            created_ms: r.try_get(4)?,
            record: App::decode(record.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("app record: {e}")))?,
        })
    }
}

impl Store {
    /// Inserts a new app; false if the name is taken (by anyone).
    pub async fn insert_app(&self, a: &AppRow) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO apps (name, tenant_id, version, deploys, record, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&a.name)
        .bind(&a.tenant_id)
        .bind(a.version)
        .bind(a.deploys)
        .bind(a.record.encode_to_vec())
        .bind(a.created_ms)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn update_app(&self, a: &AppRow) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE apps SET version = $1, deploys = $2, record = $3, updated_ms = $4 WHERE name = $5",
        )
        .bind(a.version)
        .bind(a.deploys)
        .bind(a.record.encode_to_vec())
        .bind(now_ms())
        .bind(&a.name)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn delete_app(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM apps WHERE name = $1")
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// An app by name, whoever owns it.
    pub async fn app(&self, name: &str) -> Result<Option<AppRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE name = $1")))
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| AppRow::from_row(&r)).transpose()
    }

    /// All apps, or a tenant's, by name.
    pub async fn apps(&self, tenant: Option<&str>) -> Result<Vec<AppRow>, StoreError> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{SELECT} WHERE tenant_id = $1 ORDER BY name"
                )))
                .bind(t)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY name")))
                    .fetch_all(self.pool())
                    .await?
            }
        };
        rows.iter().map(AppRow::from_row).collect()
    }
}
