//! The Cloud Hypervisor version (`vmm.ping`) and the minimum Somna needs.

use std::fmt;

/// A release number, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.patch != 0 {
            write!(f, ".{}", self.patch)?;
        }
        Ok(())
    }
}

impl Release {
    /// Reads `53.0.0`, `v53.0`, `v53.0-12-gabcdef` or `v53.0-dirty`: an
    /// optional `v`, then up to three dot-separated numbers; anything after
    /// the numbers is ignored.
    pub fn parse(s: &str) -> Option<Release> {
        let s = s.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let mut parts = s[..end].split('.').filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
        let patch = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
        Some(Release {
            major,
            minor,
            patch,
        })
    }
}

/// The oldest Cloud Hypervisor release the driver accepts.
///
/// `vm.restore`'s `memory_restore_mode` (lazy `OnDemand` restore through
/// userfaultfd) and `resume` were merged upstream in March 2026 and are in
/// v52.0 (May 2026), the release line of the spec the driver follows; the
/// minimum is that release rather than a guess at an earlier one. Builds
/// without them silently ignore unknown fields in that body, so a restore
/// would copy all guest memory eagerly and leave the VM paused while the
/// driver reported a lazy restore of a running VM. Everything else the
/// driver uses is much older (`payload` in `vm.create`, disk `serial`,
/// hybrid vsock, `vm.add-device`/`vm.remove-device`).
pub const MIN_VERSION: Release = Release {
    major: 52,
    minor: 0,
    patch: 0,
};

/// Why [`MIN_VERSION`] is the minimum, for error messages.
pub const MIN_VERSION_WHY: &str = "the driver relies on vm.restore's memory_restore_mode and resume (in v52.0), which older builds silently ignore (a restore would copy all guest memory and stay paused)";

/// What `vmm.ping` reported about a Cloud Hypervisor binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChVersion {
    /// The parsed `version`.
    pub release: Release,
    /// `version` as reported (`54.0.0`).
    pub version: String,
    /// `build_version` (`v54.0.0`, `v53.0-12-gabcdef`), when reported.
    pub build_version: Option<String>,
    /// Compiled-in features (`kvm`, `io_uring`, ...).
    pub features: Vec<String>,
}

impl ChVersion {
    /// Whether this release is at least [`MIN_VERSION`].
    pub fn is_supported(&self) -> bool {
        self.release >= MIN_VERSION
    }
}

impl fmt::Display for ChVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.version)?;
        match &self.build_version {
            Some(b) if b.trim_start_matches('v') != self.version => write!(f, " (build {b})"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_cloud_hypervisor_reports() {
        let r = |s| Release::parse(s).unwrap();
        assert_eq!(
            r("54.0.0"),
            Release {
                major: 54,
                minor: 0,
                patch: 0
            }
        );
        assert_eq!(r("v53.0").major, 53);
        assert_eq!(r("v52.1-12-gae44c29").minor, 1);
        assert_eq!(r("v51.0-dirty").major, 51);
        assert_eq!(r("52").minor, 0);
        assert!(Release::parse("").is_none());
        assert!(Release::parse("unknown").is_none());
        assert!(r("51.2.0") < MIN_VERSION);
        assert!(r("52.0.0") >= MIN_VERSION);
        assert_eq!(MIN_VERSION.to_string(), "52.0");
        assert_eq!(r("51.1.3").to_string(), "51.1.3");
    }
}
