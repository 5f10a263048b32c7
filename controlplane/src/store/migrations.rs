//! Schema migrations, applied in order at start-up inside a transaction
//! each; `schema_migrations` records what has run. DDL is written once for
//! both dialects, with the binary type substituted.

use sqlx::{AnyPool, Row};

use super::{Backend, StoreError, now_ms};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_ms BIGINT NOT NULL,
        max_sandboxes BIGINT NOT NULL,
        max_vcpus BIGINT NOT NULL,
        max_memory_mib BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        secret_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE join_tokens (
        hash TEXT PRIMARY KEY,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        cpus BIGINT NOT NULL,
        memory_mib BIGINT NOT NULL,
        last_heartbeat_ms BIGINT NOT NULL,
        info {BLOB} NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        host_id TEXT NOT NULL,
        state TEXT NOT NULL,
        request_id TEXT,
        cpus BIGINT NOT NULL,
        memory_mib BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT,
        record {BLOB} NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX sandboxes_by_request ON sandboxes (tenant_id, request_id);
    CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant_id, created_ms, id);
    CREATE INDEX sandboxes_by_host ON sandboxes (host_id);
    CREATE INDEX sandboxes_by_expiry ON sandboxes (expires_ms)",
    ),
    (
        2,
        "CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        version BIGINT NOT NULL,
        deploys BIGINT NOT NULL,
        record {BLOB} NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
    ),
];

pub(super) async fn run(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let blob = match backend {
        Backend::Sqlite => "BLOB",
        Backend::Postgres => "BYTEA",
    };
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    for (version, ddl) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        if backend == Backend::Postgres {
            // Replicas starting together: one migrates, the others wait.
            sqlx::query("SELECT pg_advisory_xact_lock(7366210)")
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.get::<i64, _>(0))
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        let ddl = ddl.replace("{BLOB}", blob);
        for statement in ddl.split(';').filter(|s| !s.trim().is_empty()) {
            // Built from the constants above, never from input.
            sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
                .execute(&mut *tx)
                .await
                .map_err(|source| StoreError::Migration {
                    version: *version,
                    source,
                })?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied state store migration");
    }
    Ok(())
}
