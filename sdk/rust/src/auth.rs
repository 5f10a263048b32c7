//! API keys: every call carries `authorization: Bearer <key>` when the
//! client has one (`$SOMNA_API_KEY`).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{Error, Result};

/// Adds the API key to every request. Without a key it adds nothing.
#[derive(Clone, Default)]
pub struct ApiKey {
    header: Option<MetadataValue<Ascii>>,
}

impl ApiKey {
    /// `None` (or an empty key) sends no `authorization` header.
    pub fn new(key: Option<&str>) -> Result<ApiKey> {
        let header = match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => None,
            Some(k) => Some(
                format!("Bearer {k}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        Error::InvalidArgument(
                            "the API key has characters that cannot go in a header (check SOMNA_API_KEY)"
                                .into(),
                        )
                    })?,
            ),
        };
        Ok(ApiKey { header })
    }

    /// Whether a key is sent.
    pub fn is_set(&self) -> bool {
        self.header.is_some()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("ApiKey")
            .field("set", &self.is_set())
            .finish()
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_a_bearer_header_only_with_a_key() {
        let mut with = ApiKey::new(Some("sk-123")).unwrap();
        let req = with.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer sk-123"
        );
        let mut without = ApiKey::new(Some("  ")).unwrap();
        let req = without.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(ApiKey::new(Some("bad\nkey")).is_err());
        assert!(!format!("{with:?}").contains("sk-123"));
    }
}
