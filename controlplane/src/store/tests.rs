//! Store tests on SQLite (the PostgreSQL path is covered by the end-to-end
//! suite against a real server).

use super::*;
use somna_proto::v1::Sandbox;

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let s = Store::open(&url).await.unwrap();
    (dir, s)
}

fn row(id: &str, tenant: &str, request: Option<&str>) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        tenant_id: tenant.into(),
        host_id: "h1".into(),
        state: "creating".into(),
        request_id: request.map(str::to_string),
        cpus: 1,
        memory_mib: 512,
        created_ms: now_ms(),
        expires_ms: None,
        record: Sandbox {
            id: id.into(),
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn tenants_keys_and_migrations_are_idempotent() {
    let (dir, s) = store().await;
    let t = s.ensure_tenant("acme", None).await.unwrap();
    assert_eq!(t.quotas, TenantQuotas::default());
    let q = TenantQuotas {
        max_sandboxes: 2,
        max_vcpus: 4,
        max_memory_mib: 1024,
    };
    assert_eq!(s.ensure_tenant("acme", Some(q)).await.unwrap().quotas, q);
    s.add_api_key("k1", &t.id, "hash").await.unwrap();
    assert_eq!(
        s.api_key("k1").await.unwrap(),
        Some((t.id.clone(), "hash".into()))
    );
    assert!(s.revoke_api_key("k1").await.unwrap());
    assert_eq!(s.api_key("k1").await.unwrap(), None);
    drop(s);
    // Reopening migrates nothing twice and keeps the data.
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let s = Store::open(&url).await.unwrap();
    assert_eq!(s.tenant(&t.id).await.unwrap().unwrap().quotas, q);
}

#[tokio::test]
async fn sandboxes_request_ids_tenancy_and_expiry() {
    let (_dir, s) = store().await;
    let a = s.ensure_tenant("a", None).await.unwrap();
    let b = s.ensure_tenant("b", None).await.unwrap();
    assert!(
        s.insert_sandbox(&row("sbx-1", &a.id, Some("req")))
            .await
            .unwrap()
    );
    assert!(
        !s.insert_sandbox(&row("sbx-2", &a.id, Some("req")))
            .await
            .unwrap(),
        "same request id"
    );
    assert!(
        s.insert_sandbox(&row("sbx-3", &b.id, Some("req")))
            .await
            .unwrap(),
        "other tenant"
    );
    assert!(s.insert_sandbox(&row("sbx-4", &a.id, None)).await.unwrap());
    assert!(
        s.insert_sandbox(&row("sbx-5", &a.id, None)).await.unwrap(),
        "no request id never conflicts"
    );
    assert_eq!(
        s.sandbox_by_request(&a.id, "req")
            .await
            .unwrap()
            .unwrap()
            .id,
        "sbx-1"
    );
    assert!(
        s.sandbox(Some(&b.id), "sbx-1").await.unwrap().is_none(),
        "other tenant's sandbox"
    );
    assert_eq!(s.sandboxes(Some(&a.id)).await.unwrap().len(), 3);

    let mut r = s.sandbox(None, "sbx-1").await.unwrap().unwrap();
    r.state = "running".into();
    r.expires_ms = Some(5);
    r.record.image = "busybox".into();
    s.update_sandbox(&r).await.unwrap();
    assert_eq!(s.sandbox(None, "sbx-1").await.unwrap().unwrap(), r);
    assert_eq!(s.expired_sandboxes(10).await.unwrap().len(), 1);
    s.delete_sandbox("sbx-1").await.unwrap();
    assert!(s.sandbox(None, "sbx-1").await.unwrap().is_none());
}

#[tokio::test]
async fn placement_lock_serialises() {
    let (_dir, s) = store().await;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, c) = (s.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            s.with_placement_lock(async || {
                let before = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                let after = c.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!((before, after), (0, 1), "two holders at once");
                Ok::<(), StoreError>(())
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(s.try_lead().await.unwrap().is_some());
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact("postgres://somna:secret@db/somna"),
        "postgres://somna:***@db/somna"
    );
    assert_eq!(
        redact("sqlite:///var/lib/somna/state.db"),
        "sqlite:///var/lib/somna/state.db"
    );
}
