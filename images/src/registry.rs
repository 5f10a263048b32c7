//! Talking to OCI distribution registries, through `oci-client`: anonymous
//! or authenticated (basic, or the bearer-token flow a registry asks for
//! with `WWW-Authenticate`), HTTPS, or plain HTTP for registries marked
//! insecure. This module fetches bytes and maps failures to
//! [`ImageError`]s that name the image and the cause; choosing platforms,
//! verifying and storing blobs is [`crate::pull`]'s.

use bytes::Bytes;
use oci_client::client::{ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::credentials;
use crate::digest::Digest;
use crate::error::ImageError;
use crate::layout::{
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use crate::options::RegistryConfig;
use crate::reference::ImageReference;

/// Manifest media types asked for; anything else a registry answers with
/// is refused after the fact.
const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_LIST,
];

/// A registry client shared by every pull of a store (it caches tokens).
pub(crate) struct Registry {
    client: Result<Client, String>,
    config: RegistryConfig,
}

/// One image's repository on one registry, authenticated.
pub(crate) struct Remote<'a> {
    client: &'a Client,
    /// Tag or digest as the reference gave it.
    oci_ref: Reference,
    auth: RegistryAuth,
    /// For messages: the reference as the user wrote it (canonical form).
    pub(crate) reference: String,
    pub(crate) registry: String,
}

impl Registry {
    pub(crate) fn new(config: &RegistryConfig) -> Self {
        ensure_crypto_provider();
        let protocol = if config.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(config.insecure_registries.clone())
        };
        let client = Client::try_from(ClientConfig {
            protocol,
            connect_timeout: Some(config.connect_timeout),
            read_timeout: Some(config.read_timeout),
            // Platforms are chosen here, from the index, not by the client.
            platform_resolver: None,
            user_agent: concat!("somna-images/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
        .map_err(|e| e.to_string());
        Registry {
            client,
            config: config.clone(),
        }
    }

    /// Authenticates for pulling `reference` (a canonical named reference)
    /// and returns a handle for its manifests and blobs. Fails with
    /// [`ImageError::AuthFailed`] when a token server refuses the
    /// credentials; registries using plain basic auth only refuse them on
    /// the first request.
    pub(crate) async fn open(&self, reference: &ImageReference) -> Result<Remote<'_>, ImageError> {
        let display = reference.to_string();
        let (registry, repository) = reference
            .registry_repository(&self.config.default_registry)
            .ok_or_else(|| {
                ImageError::InvalidArgument(format!("{display} does not name a registry image"))
            })?;
        let client = self
            .client
            .as_ref()
            .map_err(|e| ImageError::RegistryFailed {
                reference: display.clone(),
                registry: registry.clone(),
                reason: format!("cannot set up the HTTP client: {e}"),
            })?;
        let oci_ref = match (reference.digest(), reference.tag()) {
            (Some(d), _) => Reference::with_digest(registry.clone(), repository, d.to_string()),
            (None, Some(t)) => Reference::with_tag(registry.clone(), repository, t.to_string()),
            (None, None) => Reference::with_tag(
                registry.clone(),
                repository,
                crate::reference::DEFAULT_TAG.to_string(),
            ),
        };
        let auth = match credentials::lookup(&self.config, &registry) {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let remote = Remote {
            client,
            oci_ref,
            auth,
            reference: display,
            registry,
        };
        // Fetches a bearer token when the registry asks for one (anonymous
        // ones too, as Docker Hub wants); basic-auth registries need no
        // round trip here.
        remote
            .client
            .auth(&remote.oci_ref, &remote.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| remote.map_err(e, "authenticating"))?;
        Ok(remote)
    }
}

impl Remote<'_> {
    /// The manifest (or index) the reference names, or the one with
    /// `digest` in the same repository. Returns its bytes and the digest
    /// of those bytes; a pinned digest is checked.
    pub(crate) async fn manifest(
        &self,
        digest: Option<&Digest>,
        limit: u64,
    ) -> Result<(Bytes, Digest), ImageError> {
        let r = match digest {
            Some(d) => self.oci_ref.clone_with_digest(d.to_string()),
            None => self.oci_ref.clone(),
        };
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&r, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.map_err(e, "fetching the manifest"))?;
        if bytes.len() as u64 > limit {
            return Err(ImageError::TooLarge {
                reference: self.reference.clone(),
                what: "the manifest".into(),
                limit,
                detail: format!("{} bytes", bytes.len()),
            });
        }
        let actual = Digest::of(&bytes);
        let wanted = digest.or(self.oci_ref_digest().as_ref()).cloned();
        if let Some(wanted) = wanted
            && wanted != actual
        {
            return Err(ImageError::BlobVerification {
                reference: self.reference.clone(),
                what: "manifest".into(),
                digest: wanted.to_string(),
                reason: format!("the registry sent a manifest with digest {actual}"),
            });
        }
        Ok((bytes, actual))
    }

    fn oci_ref_digest(&self) -> Option<Digest> {
        self.oci_ref.digest().and_then(|d| Digest::parse(d).ok())
    }

    /// Starts downloading a blob.
    pub(crate) async fn blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
    ) -> Result<SizedStream, ImageError> {
        let desc = OciDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        self.client
            .pull_blob_stream(&self.oci_ref, &desc)
            .await
            .map_err(|e| self.map_err(e, &format!("fetching blob {digest}")))
    }

    /// The error for a failed request, naming the image and the cause.
    pub(crate) fn map_err(&self, e: OciDistributionError, doing: &str) -> ImageError {
        let reference = self.reference.clone();
        let registry = self.registry.clone();
        let reason = format!("{doing}: {}", error_chain(&e));
        match &e {
            OciDistributionError::RequestError(re) => {
                if re.is_connect() || re.is_timeout() || re.is_request() || re.is_body() {
                    ImageError::RegistryUnreachable {
                        reference,
                        registry,
                        reason,
                    }
                } else {
                    ImageError::RegistryFailed {
                        reference,
                        registry,
                        reason,
                    }
                }
            }
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => ImageError::AuthFailed {
                reference,
                registry,
                reason,
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let has = |c: &OciErrorCode| codes.contains(&c);
                if has(&OciErrorCode::Unauthorized) || has(&OciErrorCode::Denied) {
                    ImageError::AuthFailed {
                        reference,
                        registry,
                        reason,
                    }
                } else if has(&OciErrorCode::ManifestUnknown)
                    || has(&OciErrorCode::NameUnknown)
                    || has(&OciErrorCode::NotFound)
                {
                    ImageError::ManifestUnknown {
                        reference,
                        registry,
                        reason,
                    }
                } else {
                    ImageError::RegistryFailed {
                        reference,
                        registry,
                        reason,
                    }
                }
            }
            OciDistributionError::ServerError { code, .. } => match code {
                401 | 403 => ImageError::AuthFailed {
                    reference,
                    registry,
                    reason,
                },
                404 => ImageError::ManifestUnknown {
                    reference,
                    registry,
                    reason,
                },
                _ => ImageError::RegistryFailed {
                    reference,
                    registry,
                    reason,
                },
            },
            OciDistributionError::DigestError(_) => ImageError::BlobVerification {
                reference,
                what: "manifest".into(),
                digest: self.oci_ref.to_string(),
                reason,
            },
            _ => ImageError::RegistryFailed {
                reference,
                registry,
                reason,
            },
        }
    }
}

/// An error and its sources, joined: reqwest's own message alone ("error
/// sending request") hides the cause (connection refused, TLS, DNS).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// reqwest is built without a bundled crypto provider (no aws-lc or
/// OpenSSL to compile); rustls needs a process default, so install ring's
/// unless the program chose one.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_sources() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = OciDistributionError::IoError(inner);
        assert!(error_chain(&outer).contains("refused"));
    }
}
