//! Image references: `name`, `name:tag`, `name@sha256:<hex>`.
//!
//! The grammar is Docker's, restricted to lowercase: a name is one or more
//! `/`-separated components of `[a-z0-9]` runs joined by `.`, `_`, `__` or
//! dashes; the first of several components may be a registry host
//! (`registry.example.com`, `localhost:5000`). A tag is
//! `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`. Because a name is a relative path
//! of safe components, it can name a directory under a local image
//! directory without escaping it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::ImageError;

/// The tag used when a reference names none.
pub const DEFAULT_TAG: &str = "latest";

const MAX_REFERENCE_LEN: usize = 255;
/// Longest host path accepted in an `oci:`/`docker-archive:` reference.
const MAX_PATH_LEN: usize = 4096;
const OCI_PREFIX: &str = "oci:";
const DOCKER_ARCHIVE_PREFIX: &str = "docker-archive:";
const MAX_TAG_LEN: usize = 128;

/// The registry a name without a registry host refers to (Docker's rule).
pub const DOCKER_HUB: &str = "docker.io";

/// Where a reference points.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `name[:tag][@digest]`: a local OCI layout `<local_dir>/<name>/`, else
    /// a registry (Docker's rules: `busybox` is
    /// `docker.io/library/busybox:latest`).
    Named,
    /// `oci:/path/to/layout[:tag][@digest]`: an OCI image layout directory
    /// anywhere on the host. Without a tag, the layout's only manifest (or
    /// the one tagged `latest`).
    OciLayout(PathBuf),
    /// `docker-archive:/path/to/file.tar`: a `docker save` tarball (classic
    /// `manifest.json` + layer tars, or the OCI-layout flavour of newer
    /// Docker), optionally gzip-compressed. It must hold exactly one image.
    DockerArchive(PathBuf),
}

/// A parsed, validated image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageReference {
    transport: Transport,
    name: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageReference {
    /// Parses and validates a reference. A reference with neither a tag nor
    /// a digest gets the tag `latest`.
    pub fn parse(reference: &str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        // A transport prefix counts only before an absolute path, so
        // `oci:latest` stays the image `oci` with the tag `latest`.
        if let Some(rest) = reference.strip_prefix(OCI_PREFIX)
            && rest.starts_with('/')
        {
            return Self::parse_oci(reference, rest);
        }
        if let Some(rest) = reference.strip_prefix(DOCKER_ARCHIVE_PREFIX)
            && rest.starts_with('/')
        {
            let path = validate_path(rest).map_err(invalid)?;
            return Ok(ImageReference {
                transport: Transport::DockerArchive(path),
                name: rest.to_string(),
                tag: None,
                digest: None,
            });
        }
        if reference.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if reference.len() > MAX_REFERENCE_LEN {
            return Err(invalid(format!(
                "it is longer than {MAX_REFERENCE_LEN} characters"
            )));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d).map_err(invalid)?)),
            None => (reference, None),
        };
        // A tag is what follows the last ':' when no '/' follows it (a ':'
        // before a '/' is a registry port).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        validate_name(name).map_err(invalid)?;
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(ImageReference {
            transport: Transport::Named,
            name: name.to_string(),
            tag,
            digest,
        })
    }

    /// `oci:PATH[:TAG][@DIGEST]`; `rest` is what follows `oci:`.
    fn parse_oci(reference: &str, rest: &str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        let (rest, digest) = match rest.rsplit_once('@') {
            Some((r, d)) if d.starts_with("sha256:") => {
                (r, Some(Digest::parse(d).map_err(invalid)?))
            }
            _ => (rest, None),
        };
        // A tag is what follows the last ':' when no '/' follows it, so
        // directories with ':' in their names still work.
        let (path, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        let dir = validate_path(path).map_err(invalid)?;
        Ok(ImageReference {
            transport: Transport::OciLayout(dir),
            name: path.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// Where the reference points: a name (local layout or registry), or
    /// an explicit layout directory or archive.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The repository name, e.g. `busybox` or `library/python`; for
    /// `oci:` and `docker-archive:` references, the host path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry and repository this named reference pulls from, by
    /// Docker's rules: the first path component is a registry host when it
    /// has a `.` or a `:` or is `localhost` (and more components follow);
    /// otherwise the registry is `default_registry`, and on Docker Hub a
    /// one-component name is an official image under `library/`.
    /// `index.docker.io` is spelled `docker.io`. `None` for `oci:` and
    /// `docker-archive:` references.
    pub fn registry_repository(&self, default_registry: &str) -> Option<(String, String)> {
        if self.transport != Transport::Named {
            return None;
        }
        let (registry, repo) = match self.name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (default_registry.to_string(), self.name.clone()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repo = if registry == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        Some((registry, repo))
    }

    /// The fully qualified form of a named reference
    /// (`docker.io/library/busybox:latest`); other references unchanged.
    pub fn canonical(&self, default_registry: &str) -> ImageReference {
        match self.registry_repository(default_registry) {
            Some((registry, repo)) => ImageReference {
                transport: Transport::Named,
                name: format!("{registry}/{repo}"),
                tag: self.tag.clone(),
                digest: self.digest.clone(),
            },
            None => self.clone(),
        }
    }

    /// A copy pinned to `digest` (tag kept, for display).
    pub fn with_digest(&self, digest: Digest) -> ImageReference {
        ImageReference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The host path of an `oci:` or `docker-archive:` reference.
    pub fn path(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Named => None,
            Transport::OciLayout(p) | Transport::DockerArchive(p) => Some(p),
        }
    }

    /// The tag; `latest` when the reference named neither tag nor digest,
    /// `None` when it named only a digest.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest, when the reference pins one. It takes
    /// precedence over the tag.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Named => {}
            Transport::OciLayout(_) => f.write_str(OCI_PREFIX)?,
            Transport::DockerArchive(_) => f.write_str(DOCKER_ARCHIVE_PREFIX)?,
        }
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageReference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        ImageReference::parse(s)
    }
}

/// An absolute host path without control characters.
fn validate_path(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err("the path must be absolute".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("the path is longer than {MAX_PATH_LEN} bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err("the path contains control characters".into());
    }
    Ok(PathBuf::from(path))
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    let components: Vec<&str> = name.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        if c.is_empty() {
            return Err(if i == 0 {
                "the name must not start with '/' (it is not a path)".into()
            } else {
                "the name has an empty path component ('//' or a trailing '/')".into()
            });
        }
        let is_host = i == 0
            && components.len() > 1
            && (c.contains('.') || c.contains(':') || *c == "localhost");
        if is_host {
            validate_host(c)?;
        } else {
            validate_component(c)?;
        }
    }
    Ok(())
}

fn validate_component(c: &str) -> Result<(), String> {
    if c == "." || c == ".." {
        return Err(format!("the name component {c:?} is not allowed"));
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("the name component {c:?} must be lowercase"));
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "the name component {c:?} must start and end with a lowercase letter or digit"
        ));
    }
    // Separators between alphanumeric runs: '.', '_', '__', or one or more '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(format!(
                "the name component {c:?} contains {sep:?} (allowed: lowercase letters, digits, and single '.', '_', '__' or dashes between them)"
            ));
        }
    }
    Ok(())
}

fn validate_host(h: &str) -> Result<(), String> {
    let (host, port) = match h.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("the registry host {h:?} has an invalid port"));
    }
    for label in host.split('.') {
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err(format!(
                "the registry host {h:?} is invalid (lowercase letters, digits and '-' in dot-separated labels)"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag after ':' is empty".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("the tag is longer than {MAX_TAG_LEN} characters"));
    }
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if !word(b[0]) || !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "the tag {tag:?} is invalid (letters, digits, '_', '.', '-'; not starting with '.' or '-')"
        ));
    }
    Ok(())
}

/// Validates a tag on its own (as written into an image layout).
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
    validate_tag(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn ok(s: &str) -> ImageReference {
        ImageReference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn bad(s: &str) -> String {
        let e = ImageReference::parse(s).expect_err(s);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{s}");
        e.to_string()
    }

    #[test]
    fn parses_names_tags_digests() {
        let r = ok("busybox");
        assert_eq!(
            (r.name(), r.tag(), r.digest()),
            ("busybox", Some("latest"), None)
        );
        assert_eq!(r.to_string(), "busybox:latest");

        let r = ok("python:3.11-slim");
        assert_eq!((r.name(), r.tag()), ("python", Some("3.11-slim")));

        let r = ok("library/my_app__x.y--z");
        assert_eq!(r.name(), "library/my_app__x.y--z");

        let r = ok("localhost:5000/team/app:v1");
        assert_eq!((r.name(), r.tag()), ("localhost:5000/team/app", Some("v1")));

        let r = ok("registry.example.com/app");
        assert_eq!(
            (r.name(), r.tag()),
            ("registry.example.com/app", Some("latest"))
        );

        let hex = "a".repeat(64);
        let r = ok(&format!("app@sha256:{hex}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().hex(), hex);
        assert_eq!(r.to_string(), format!("app@sha256:{hex}"));

        let r = ok(&format!("app:v2@sha256:{hex}"));
        assert_eq!(r.tag(), Some("v2"));
        assert!(r.digest().is_some());
    }

    #[test]
    fn registry_rules() {
        let rr = |s: &str| ok(s).registry_repository(DOCKER_HUB).unwrap();
        assert_eq!(
            rr("busybox"),
            ("docker.io".into(), "library/busybox".into())
        );
        assert_eq!(rr("team/app"), ("docker.io".into(), "team/app".into()));
        assert_eq!(
            rr("index.docker.io/busybox"),
            ("docker.io".into(), "library/busybox".into())
        );
        assert_eq!(rr("localhost/app"), ("localhost".into(), "app".into()));
        assert_eq!(
            rr("127.0.0.1:5000/ns/app:v1"),
            ("127.0.0.1:5000".into(), "ns/app".into())
        );
        assert_eq!(rr("ghcr.io/o/app"), ("ghcr.io".into(), "o/app".into()));
        assert_eq!(
            ok("busybox").canonical(DOCKER_HUB).to_string(),
            "docker.io/library/busybox:latest"
        );
        let hex = "b".repeat(64);
        assert_eq!(
            ok(&format!("registry:5000/ns/name@sha256:{hex}"))
                .canonical(DOCKER_HUB)
                .to_string(),
            format!("registry:5000/ns/name@sha256:{hex}")
        );
        // A mirror as the default registry gets no library/ prefix.
        assert_eq!(
            ok("busybox").registry_repository("mirror:5000").unwrap(),
            ("mirror:5000".into(), "busybox".into())
        );
    }

    #[test]
    fn transports() {
        let r = ok("oci:/srv/images/app:v1");
        assert_eq!(
            r.transport(),
            &Transport::OciLayout("/srv/images/app".into())
        );
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.to_string(), "oci:/srv/images/app:v1");
        let r = ok("oci:/srv/a:b/layout");
        assert_eq!(
            r.transport(),
            &Transport::OciLayout("/srv/a:b/layout".into())
        );
        assert_eq!(r.tag(), None);
        let r = ok("docker-archive:/tmp/x.tar");
        assert_eq!(
            r.transport(),
            &Transport::DockerArchive("/tmp/x.tar".into())
        );
        assert_eq!(r.to_string(), "docker-archive:/tmp/x.tar");
        assert!(r.registry_repository(DOCKER_HUB).is_none());
        // Without an absolute path these are ordinary names.
        assert_eq!(ok("oci:latest").transport(), &Transport::Named);
        // (so `docker-archive:x.tar` is the image docker-archive, tag x.tar).
        assert_eq!(ok("docker-archive:x.tar").transport(), &Transport::Named);
        bad("docker-archive:/a\nb");
        bad("oci:/x:.bad");
    }

    #[test]
    fn rejects_bad_references() {
        assert!(bad("").contains("empty"));
        assert!(bad("Busybox").contains("lowercase"));
        assert!(bad("busybox:").contains("tag"));
        assert!(bad("../etc").contains(".."));
        assert!(bad("a/../b").contains(".."));
        assert!(bad("/etc/passwd").contains("must not start with '/'"));
        assert!(bad("a//b").contains("empty path component"));
        assert!(bad("a/").contains("empty path component"));
        bad(".hidden");
        bad("-dash");
        bad("a..b");
        bad("a b");
        bad("a:b:c");
        bad("app:.tag");
        bad("app:-tag");
        bad(&format!("app:{}", "t".repeat(129)));
        bad(&"a".repeat(256).to_string());
        assert!(bad("app@sha256:xyz").contains("sha256"));
        assert!(bad("app@md5:abc").contains("only sha256"));
        bad("UPPER.example.com/app");
        bad("localhost:port/app");
        bad("a\0b");
        bad("a\nb");
    }
}
