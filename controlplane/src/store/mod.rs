//! The control plane's durable state: tenants, API keys, join tokens, hosts
//! and sandboxes. SQLite (embedded, `somna up`) or PostgreSQL (several
//! control-plane replicas on one database), through sqlx's `Any` driver
//! with SQL that both dialects accept. Migrations are built in.

mod apps;
mod migrations;
mod rows;

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use apps::AppRow;
pub use rows::{HostRow, SandboxRow, Tenant, TenantQuotas};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("state store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("state store: migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
    #[error("state store: a stored record is unreadable: {0}")]
    Corrupt(String),
    #[error(
        "unsupported state store URL {0:?}: use sqlite:///path/to/file.db or postgres://user:pass@host/db"
    )]
    UnsupportedUrl(String),
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Advisory lock ids (PostgreSQL): placement serialises creates across
/// replicas; leadership decides which replica runs the lifecycle loops.
const PLACEMENT_LOCK: i64 = 0x736f_6d6e_6101;
const LEADER_LOCK: i64 = 0x736f_6d6e_6102;

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Placement is serialised within this process (and, on PostgreSQL,
    /// across replicas by an advisory lock taken while holding this).
    local_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// `SELECT <sandbox columns> FROM sandboxes <rest>`, as a static string.
macro_rules! select_sandboxes {
    ($rest:literal) => {
        concat!(
            "SELECT id, tenant_id, host_id, state, request_id, cpus, memory_mib, created_ms, expires_ms, record FROM sandboxes ",
            $rest
        )
    };
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) and migrates the store at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let url_with_mode = if backend == Backend::Sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            // SQLite allows one writer; a single connection also keeps
            // transactions from tripping over "database is locked".
            .max_connections(if backend == Backend::Sqlite { 1 } else { 16 })
            .connect(&url_with_mode)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(url),
                source,
            })?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
            sqlx::query("PRAGMA foreign_keys=ON").execute(&pool).await?;
        }
        let store = Store {
            pool,
            backend,
            local_lock: Default::default(),
        };
        migrations::run(&store.pool, backend).await?;
        Ok(store)
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    // --- tenants and keys -------------------------------------------------

    /// The tenant called `name`, created with `quotas` if it does not exist;
    /// an existing tenant's quotas are updated when `quotas` is given.
    pub async fn ensure_tenant(
        &self,
        name: &str,
        quotas: Option<TenantQuotas>,
    ) -> Result<Tenant, StoreError> {
        if let Some(t) = self.tenant_by_name(name).await? {
            if let Some(q) = quotas {
                sqlx::query("UPDATE tenants SET max_sandboxes = $1, max_vcpus = $2, max_memory_mib = $3 WHERE id = $4")
                    .bind(q.max_sandboxes)
                    .bind(q.max_vcpus)
                    .bind(q.max_memory_mib)
                    .bind(&t.id)
                    .execute(&self.pool)
                    .await?;
                return Ok(Tenant { quotas: q, ..t });
            }
            return Ok(t);
        }
        let q = quotas.unwrap_or_default();
        let id = format!("tnt-{}", random_token(10));
        sqlx::query(
            "INSERT INTO tenants (id, name, created_ms, max_sandboxes, max_vcpus, max_memory_mib) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(now_ms())
        .bind(q.max_sandboxes)
        .bind(q.max_vcpus)
        .bind(q.max_memory_mib)
        .execute(&self.pool)
        .await?;
        // Another replica may have won the race: read back either way.
        self.tenant_by_name(name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("tenant {name} vanished after insert")))
    }

    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, max_sandboxes, max_vcpus, max_memory_mib FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Tenant::from_row(&r)).transpose()
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query("SELECT id, name, max_sandboxes, max_vcpus, max_memory_mib FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Tenant::from_row(&r)).transpose()
    }

    /// Stores an API key (its id and the hash of its secret).
    pub async fn add_api_key(
        &self,
        key_id: &str,
        tenant_id: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_keys (id, tenant_id, secret_hash, created_ms, revoked) VALUES ($1, $2, $3, $4, 0)")
            .bind(key_id)
            .bind(tenant_id)
            .bind(secret_hash)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// (tenant id, secret hash) of a live key.
    pub async fn api_key(&self, key_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT tenant_id, secret_hash FROM api_keys WHERE id = $1 AND revoked = 0",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get::<String, _>(0), r.get::<String, _>(1))))
    }

    pub async fn revoke_api_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE api_keys SET revoked = 1 WHERE id = $1")
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn add_join_token(&self, token_hash: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO join_tokens (hash, created_ms) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING")
            .bind(token_hash)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn has_join_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT hash FROM join_tokens WHERE hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn join_token_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM join_tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0))
    }

    // --- hosts ------------------------------------------------------------

    pub async fn upsert_host(&self, h: &HostRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosts (id, state, cpus, memory_mib, last_heartbeat_ms, info) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, cpus = excluded.cpus, memory_mib = excluded.memory_mib, \
             last_heartbeat_ms = excluded.last_heartbeat_ms, info = excluded.info",
        )
        .bind(&h.id)
        .bind(&h.state)
        .bind(h.cpus)
        .bind(h.memory_mib)
        .bind(h.last_heartbeat_ms)
        .bind(h.info.encode_to_vec())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, state, cpus, memory_mib, last_heartbeat_ms, info FROM hosts ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(HostRow::from_row).collect()
    }

    pub async fn set_host_state(&self, id: &str, state: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE hosts SET state = $1 WHERE id = $2")
            .bind(state)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- sandboxes ----------------------------------------------------------

    /// Inserts a new sandbox row; false if the tenant already has one with
    /// the same request id.
    pub async fn insert_sandbox(&self, s: &SandboxRow) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO sandboxes (id, tenant_id, host_id, state, request_id, cpus, memory_mib, created_ms, expires_ms, record, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&s.id)
        .bind(&s.tenant_id)
        .bind(&s.host_id)
        .bind(&s.state)
        .bind(s.request_id.clone())
        .bind(s.cpus)
        .bind(s.memory_mib)
        .bind(s.created_ms)
        .bind(s.expires_ms)
        .bind(s.record.encode_to_vec())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Writes a sandbox's state, record, host and expiry.
    pub async fn update_sandbox(&self, s: &SandboxRow) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET host_id = $1, state = $2, expires_ms = $3, record = $4, updated_ms = $5 WHERE id = $6",
        )
        .bind(&s.host_id)
        .bind(&s.state)
        .bind(s.expires_ms)
        .bind(s.record.encode_to_vec())
        .bind(now_ms())
        .bind(&s.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sandboxes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A sandbox by id; with `tenant`, only if it belongs to that tenant.
    pub async fn sandbox(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<SandboxRow>, StoreError> {
        let row = sqlx::query(select_sandboxes!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let row = row.map(|r| SandboxRow::from_row(&r)).transpose()?;
        Ok(row.filter(|s| tenant.is_none_or(|t| t == s.tenant_id)))
    }

    pub async fn sandbox_by_request(
        &self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<SandboxRow>, StoreError> {
        let row = sqlx::query(select_sandboxes!(
            "WHERE tenant_id = $1 AND request_id = $2"
        ))
        .bind(tenant)
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| SandboxRow::from_row(&r)).transpose()
    }

    /// All sandboxes, or a tenant's, oldest first.
    pub async fn sandboxes(&self, tenant: Option<&str>) -> Result<Vec<SandboxRow>, StoreError> {
        let rows: Vec<AnyRow> = match tenant {
            Some(t) => {
                sqlx::query(select_sandboxes!(
                    "WHERE tenant_id = $1 ORDER BY created_ms, id"
                ))
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(select_sandboxes!("ORDER BY created_ms, id"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(SandboxRow::from_row).collect()
    }

    pub async fn sandboxes_on_host(&self, host: &str) -> Result<Vec<SandboxRow>, StoreError> {
        let rows = sqlx::query(select_sandboxes!("WHERE host_id = $1"))
            .bind(host)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(SandboxRow::from_row).collect()
    }

    /// Sandboxes whose timeout has passed.
    pub async fn expired_sandboxes(&self, now_ms: i64) -> Result<Vec<SandboxRow>, StoreError> {
        let rows = sqlx::query(select_sandboxes!(
            "WHERE expires_ms IS NOT NULL AND expires_ms <= $1"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(SandboxRow::from_row).collect()
    }

    /// Runs `f` while holding the placement lock: across replicas on
    /// PostgreSQL (a transaction-scoped advisory lock), within this process
    /// on SQLite. Quota and capacity checks plus the insert of the new
    /// sandbox happen under it, so two creates never take the same
    /// capacity.
    pub async fn with_placement_lock<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: AsyncFnOnce() -> Result<T, E>,
        E: From<StoreError>,
    {
        // One waiter per process: a waiter holds a pooled connection while
        // it waits, and the holder needs the pool to do its work.
        let _local = self.local_lock.lock().await;
        match self.backend {
            Backend::Sqlite => f().await,
            Backend::Postgres => {
                // A session lock on a dedicated connection: the insert in
                // `f` uses the pool, so a transaction lock would not cover it.
                let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(PLACEMENT_LOCK)
                    .execute(&mut *conn)
                    .await
                    .map_err(StoreError::from)?;
                let result = f().await;
                let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(PLACEMENT_LOCK)
                    .execute(&mut *conn)
                    .await;
                if unlocked.is_err() {
                    // Never return a connection that may still hold the lock.
                    let _ = conn.detach();
                }
                result
            }
        }
    }

    /// Tries to become the leader (the replica that runs timeouts and host
    /// health). On PostgreSQL the lock lives as long as the returned
    /// connection; SQLite has one process, which always leads.
    pub async fn try_lead(&self) -> Result<Option<Leadership>, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(Some(Leadership { _conn: None })),
            Backend::Postgres => {
                let mut conn = self.pool.acquire().await?.detach();
                let row = sqlx::query("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut conn)
                    .await?;
                Ok(row
                    .get::<bool, _>(0)
                    .then_some(Leadership { _conn: Some(conn) }))
            }
        }
    }
}

/// Held by the leading replica; dropping it gives leadership up.
pub struct Leadership {
    _conn: Option<sqlx::AnyConnection>,
}

pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A store URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests;
