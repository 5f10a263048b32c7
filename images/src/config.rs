//! The image configuration as Somna uses it: the defaults a sandbox's
//! processes start with.

use oci_spec::image::{Arch, ImageConfiguration, Os};

/// The parts of an OCI image config that matter to a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Environment variables, in image order (`Env: ["K=V", ...]`).
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// Exposed ports as written in the image (`"8080/tcp"`), sorted.
    pub exposed_ports: Vec<String>,
}

impl ImageConfig {
    /// The command a process starts with when none is given: entrypoint
    /// followed by cmd.
    pub fn default_argv(&self) -> Vec<String> {
        self.entrypoint
            .iter()
            .chain(self.cmd.iter())
            .cloned()
            .collect()
    }

    /// The value of an environment variable, if the image sets it.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn from_oci(config: &ImageConfiguration) -> Self {
        let Some(c) = config.config() else {
            return ImageConfig::default();
        };
        let env = c
            .env()
            .iter()
            .flatten()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect();
        let mut exposed_ports: Vec<String> = c.exposed_ports().iter().flatten().cloned().collect();
        exposed_ports.sort();
        ImageConfig {
            env,
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|s| !s.is_empty()),
            user: c.user().clone().filter(|s| !s.is_empty()),
            exposed_ports,
        }
    }

    /// The OCI image config JSON for this config and these layer diff_ids,
    /// for linux/amd64. Keys are sorted, so the bytes (and the digest) are
    /// a function of the inputs alone.
    pub(crate) fn to_oci_json(&self, diff_ids: &[String]) -> Vec<u8> {
        use serde_json::{Map, Value, json};
        let mut c = Map::new();
        if let Some(u) = &self.user {
            c.insert("User".into(), json!(u));
        }
        if !self.exposed_ports.is_empty() {
            let ports: Map<String, Value> = self
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            c.insert("ExposedPorts".into(), Value::Object(ports));
        }
        if !self.env.is_empty() {
            let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            c.insert("Env".into(), json!(env));
        }
        if !self.entrypoint.is_empty() {
            c.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            c.insert("Cmd".into(), json!(self.cmd));
        }
        if let Some(w) = &self.working_dir {
            c.insert("WorkingDir".into(), json!(w));
        }
        let doc = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": Value::Object(c),
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        serde_json::to_vec(&doc).expect("serializing JSON values cannot fail")
    }
}

/// `os/arch` of a config, e.g. `linux/amd64`.
pub(crate) fn platform_of(config: &ImageConfiguration) -> String {
    format!("{}/{}", config.os(), config.architecture())
}

/// Whether a config is for a platform Somna can run.
pub(crate) fn is_linux_amd64(config: &ImageConfiguration) -> bool {
    *config.os() == Os::Linux && *config.architecture() == Arch::Amd64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_oci_json() {
        let cfg = ImageConfig {
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "x=y".into())],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            working_dir: Some("/work".into()),
            user: Some("1000:1000".into()),
            exposed_ports: vec!["443/tcp".into(), "80/tcp".into()],
        };
        let json = cfg.to_oci_json(&["sha256:00".into()]);
        let parsed = ImageConfiguration::from_reader(&json[..]).unwrap();
        assert!(is_linux_amd64(&parsed));
        assert_eq!(ImageConfig::from_oci(&parsed), cfg);
        assert_eq!(cfg.env_var("A"), Some("x=y"));
        assert_eq!(cfg.default_argv(), vec!["/bin/sh", "-c", "echo hi"]);
        // Deterministic bytes.
        assert_eq!(json, cfg.to_oci_json(&["sha256:00".into()]));
    }

    #[test]
    fn tolerates_docker_style_config() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","EMPTY"],"Cmd":["sh"],"WorkingDir":"","User":"","ExposedPorts":null,"Labels":null},"rootfs":{"type":"layers","diff_ids":[]},"container_config":{"Hostname":"x"}}"#;
        let parsed = ImageConfiguration::from_reader(&json[..]).unwrap();
        let cfg = ImageConfig::from_oci(&parsed);
        assert_eq!(
            cfg.env,
            vec![
                ("PATH".into(), "/usr/bin".into()),
                ("EMPTY".into(), "".into())
            ]
        );
        assert_eq!(cfg.cmd, vec!["sh"]);
        assert_eq!(cfg.working_dir, None);
        assert_eq!(cfg.user, None);
    }
}
