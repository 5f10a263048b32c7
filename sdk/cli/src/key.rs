//! `somna key create|revoke`: API keys, managed on the control plane's
//! store (run it where the store is reachable).

use anyhow::Context;
use clap::Subcommand;
use somna_controlplane::store::{Store, TenantQuotas};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a tenant (created if new), optionally setting
    /// the tenant's quotas. The key is printed once.
    Create {
        /// The control plane's store (as given to `somna controlplane --store`).
        #[arg(
            long,
            env = "SOMNA_STORE",
            default_value = "sqlite:///var/lib/somna/state.db"
        )]
        store: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long)]
        max_sandboxes: Option<i64>,
        #[arg(long)]
        max_vcpus: Option<i64>,
        #[arg(long)]
        max_memory_mib: Option<i64>,
    },
    /// Revoke a key by its id (the part after `somna_`, before the next `_`).
    Revoke {
        #[arg(
            long,
            env = "SOMNA_STORE",
            default_value = "sqlite:///var/lib/somna/state.db"
        )]
        store: String,
        id: String,
    },
}

pub async fn run(cmd: KeyCommand, json: bool) -> anyhow::Result<i32> {
    match cmd {
        KeyCommand::Create {
            store,
            tenant,
            max_sandboxes,
            max_vcpus,
            max_memory_mib,
        } => {
            let store = Store::open(&store)
                .await
                .context("opening the state store")?;
            let quotas =
                if max_sandboxes.is_some() || max_vcpus.is_some() || max_memory_mib.is_some() {
                    let d = TenantQuotas::default();
                    Some(TenantQuotas {
                        max_sandboxes: max_sandboxes.unwrap_or(d.max_sandboxes),
                        max_vcpus: max_vcpus.unwrap_or(d.max_vcpus),
                        max_memory_mib: max_memory_mib.unwrap_or(d.max_memory_mib),
                    })
                } else {
                    None
                };
            let t = store.ensure_tenant(&tenant, quotas).await?;
            let key = somna_controlplane::auth::create_key(&store, &t.id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": key.id, "key": key.key, "tenant": t.name, "tenant_id": t.id,
                        "quotas": { "max_sandboxes": t.quotas.max_sandboxes, "max_vcpus": t.quotas.max_vcpus, "max_memory_mib": t.quotas.max_memory_mib },
                    })
                );
            } else {
                println!("{}", key.key);
                eprintln!(
                    "(tenant {}; key id {}; it is not shown again)",
                    t.name, key.id
                );
            }
            Ok(0)
        }
        KeyCommand::Revoke { store, id } => {
            let store = Store::open(&store)
                .await
                .context("opening the state store")?;
            if store.revoke_api_key(&id).await? {
                println!("revoked {id}");
                Ok(0)
            } else {
                eprintln!("somna: no key {id}");
                Ok(1)
            }
        }
    }
}
