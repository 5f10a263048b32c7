//! API keys and tenants. A key is `somna_<id>_<secret>`: the id finds the
//! stored record, the secret is stored only as a SHA-256 hash and compared
//! in constant time. Clients send it as gRPC metadata
//! `authorization: Bearer <key>`. Verified keys are cached briefly so an
//! exec does not pay a database round trip.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::store::{Store, StoreError, random_token};

const PREFIX: &str = "somna_";
const CACHE_TTL: Duration = Duration::from_secs(30);

/// A newly created key; `key` is shown once and never stored.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: String,
    pub key: String,
    pub tenant_id: String,
}

/// Creates an API key for `tenant_id` and stores its hash.
pub async fn create_key(store: &Store, tenant_id: &str) -> Result<NewApiKey, StoreError> {
    let id = random_token(12);
    let secret = random_token(40);
    store.add_api_key(&id, tenant_id, &hash(&secret)).await?;
    Ok(NewApiKey {
        key: format!("{PREFIX}{id}_{secret}"),
        id,
        tenant_id: tenant_id.to_string(),
    })
}

/// SHA-256 of a secret, hex.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// (id, secret) of a well-formed key.
fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: String,
    pub key_id: String,
}

pub struct Authenticator {
    store: Store,
    /// key id → (tenant, secret hash, when checked).
    cache: Mutex<HashMap<String, (String, String, Instant)>>,
}

impl Authenticator {
    pub fn new(store: Store) -> Self {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caller of `request`, or UNAUTHENTICATED saying what is wrong.
    pub async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "no API key: send `authorization: Bearer <key>` (set SOMNA_API_KEY)",
            )
        })?;
        let value = header
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        let key = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <key>`")
            })?
            .trim();
        self.verify(key).await
    }

    /// Checks a key against the store (or the recent-verification cache).
    pub async fn verify(&self, key: &str) -> Result<Caller, Status> {
        let bad = || Status::unauthenticated("invalid API key");
        let (id, secret) = parse(key).ok_or_else(bad)?;
        let hashed = hash(secret);
        let cached = self
            .lock()
            .get(id)
            .filter(|(_, _, at)| at.elapsed() < CACHE_TTL)
            .map(|(t, h, _)| (t.clone(), h.clone()));
        let (tenant, stored) = match cached {
            Some(hit) => hit,
            None => {
                let (t, h) = self
                    .store
                    .api_key(id)
                    .await
                    .map_err(|e| Status::unavailable(format!("cannot check the API key: {e}")))?
                    .ok_or_else(bad)?;
                self.lock()
                    .insert(id.to_string(), (t.clone(), h.clone(), Instant::now()));
                (t, h)
            }
        };
        if !constant_time_eq(hashed.as_bytes(), stored.as_bytes()) {
            return Err(bad());
        }
        Ok(Caller {
            tenant_id: tenant,
            key_id: id.to_string(),
        })
    }

    /// Forgets a cached key (after revocation).
    pub fn forget(&self, key_id: &str) {
        self.lock().remove(key_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_compare() {
        assert_eq!(parse("somna_abc_def"), Some(("abc", "def")));
        assert_eq!(parse("somna_abc_"), None);
        assert_eq!(parse("other_abc_def"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .unwrap();
        let t = store.ensure_tenant("t", None).await.unwrap();
        let k = create_key(&store, &t.id).await.unwrap();
        let auth = Authenticator::new(store.clone());
        assert_eq!(auth.verify(&k.key).await.unwrap().tenant_id, t.id);
        let wrong = format!("{}x", k.key);
        assert_eq!(
            auth.verify(&wrong).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut req = Request::new(());
        assert_eq!(
            auth.caller(&req).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", k.key).parse().unwrap(),
        );
        assert_eq!(auth.caller(&req).await.unwrap().key_id, k.id);
        store.revoke_api_key(&k.id).await.unwrap();
        auth.forget(&k.id);
        assert!(auth.verify(&k.key).await.is_err());
    }
}
