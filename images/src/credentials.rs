//! Which credentials a registry gets: the store's own configuration first,
//! then the `auths` of a docker `config.json` (`docker login` writes it).

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::options::{RegistryConfig, RegistryCredentials};
use crate::reference::DOCKER_HUB;

/// The credentials for `registry` (as in references: `host[:port]`,
/// `docker.io`), if any are configured.
pub(crate) fn lookup(config: &RegistryConfig, registry: &str) -> Option<RegistryCredentials> {
    let wanted = normalize_key(registry);
    if let Some(c) = config
        .credentials
        .iter()
        .find(|(k, _)| normalize_key(k) == wanted)
        .map(|(_, c)| c.clone())
    {
        return Some(c);
    }
    let path = match &config.docker_config {
        Some(p) => p.clone(),
        None => default_docker_config()?,
    };
    from_docker_config(&path, &wanted)
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

fn from_docker_config(path: &Path, wanted: &str) -> Option<RegistryCredentials> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read docker config; using no credentials from it");
            return None;
        }
    };
    let doc: serde_json::Value = match serde_json::from_slice(&data) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "docker config is not JSON; using no credentials from it");
            return None;
        }
    };
    let auths = doc.get("auths")?.as_object()?;
    let (_, entry) = auths.iter().find(|(k, _)| normalize_key(k) == wanted)?;
    parse_entry(entry).or_else(|| {
        tracing::warn!(path = %path.display(), registry = wanted, "docker config entry has no usable auth (credential helpers and identity tokens are not supported)");
        None
    })
}

/// `{"auth": base64("user:password")}` or `{"username":…, "password":…}`.
fn parse_entry(entry: &serde_json::Value) -> Option<RegistryCredentials> {
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str())
        && !auth.is_empty()
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some(RegistryCredentials {
            username: user.to_string(),
            password: pass.to_string(),
        });
    }
    let user = entry.get("username")?.as_str()?;
    let pass = entry.get("password")?.as_str()?;
    Some(RegistryCredentials {
        username: user.to_string(),
        password: pass.to_string(),
    })
}

/// Reduces a registry key (`https://index.docker.io/v1/`, `docker.io`,
/// `localhost:5000`) to its host[:port], with Docker Hub's aliases made one.
fn normalize_key(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "127.0.0.1:5000": {"username": "bob", "password": "pw"},
                    "helper.example.com": {"identitytoken": "x"}
                },
                "credsStore": "desktop"
            })
            .to_string(),
        )
        .unwrap();
        let mut cfg = RegistryConfig {
            docker_config: Some(path),
            ..RegistryConfig::default()
        };
        let hub = lookup(&cfg, "docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("alice", "s3cr:et")
        );
        assert_eq!(lookup(&cfg, "127.0.0.1:5000").unwrap().username, "bob");
        assert!(lookup(&cfg, "helper.example.com").is_none());
        assert!(lookup(&cfg, "other:5000").is_none());
        // Configured credentials win.
        cfg.credentials.insert(
            "127.0.0.1:5000".into(),
            RegistryCredentials {
                username: "carol".into(),
                password: "x".into(),
            },
        );
        assert_eq!(lookup(&cfg, "127.0.0.1:5000").unwrap().username, "carol");
        // A missing file is no credentials.
        cfg.docker_config = Some(dir.path().join("absent.json"));
        assert!(lookup(&cfg, "docker.io").is_none());
    }
}
