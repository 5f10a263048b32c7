//! A real registry for tests: Debian's `docker-registry` (distribution 2.8)
//! on a free loopback port, its storage in a temporary directory, killed
//! when the handle drops (also when a test panics). Images get in with
//! `skopeo copy` (as a user would push them) or with raw pushes through
//! oci-client (for manifests no tool would write).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use somna_images::{Digest, ImageStoreOptions, RegistryConfig, RegistryCredentials};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse";

pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// Whether pushes need USER/PASSWORD.
    pub auth: bool,
    /// For bearer-token auth; dropped (stopped) after the registry.
    pub token: Option<super::token::TokenServer>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: apt-get install {package} (scripts/setup.sh installs it)"
    );
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> Registry {
        Self::start_inner(Auth::None)
    }

    /// A registry with htpasswd (bcrypt) basic auth for USER / PASSWORD.
    pub fn start_with_auth() -> Registry {
        Self::start_inner(Auth::Htpasswd)
    }

    /// A registry with bearer-token auth: a token server (see
    /// [`super::token`]) grants tokens to USER / PASSWORD.
    pub fn start_with_token() -> Registry {
        Self::start_inner(Auth::Token)
    }

    fn start_inner(mode: Auth) -> Registry {
        let auth = mode != Auth::None;
        require_tool("/usr/bin/docker-registry", "docker-registry");
        let mut dir = tempfile::Builder::new()
            .prefix("somna-registry")
            .tempdir()
            .unwrap();
        let mut auth_yaml = String::new();
        let mut token = None;
        if mode == Auth::Token {
            let server = super::token::TokenServer::start(dir.path(), USER, PASSWORD);
            auth_yaml = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                server.realm(),
                super::token::SERVICE,
                super::token::ISSUER,
                server.cert.display()
            );
            token = Some(server);
        }
        if mode == Auth::Htpasswd {
            require_tool("/usr/bin/htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .unwrap();
            assert!(out.status.success());
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).unwrap();
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: somna-test\n    path: {}\n",
                path.display()
            );
        }
        // The port is free when asked; another process could take it before
        // the registry binds, so a failed start is retried on a new port.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr = format!("127.0.0.1:{port}");
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{auth_yaml}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut reg = Registry {
                child,
                dir,
                addr,
                auth,
                token: token.take(),
            };
            if reg.wait_ready() {
                return reg;
            }
            let log =
                std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default();
            eprintln!("registry did not start on {}: {log}", reg.addr);
            let _ = reg.child.kill();
            let _ = reg.child.wait();
            // Take the directory and token server back for the next try.
            dir = std::mem::replace(&mut reg.dir, tempfile::tempdir().unwrap());
            token = reg.token.take();
        }
        panic!("docker-registry did not start");
    }

    /// Polls the port (bounded); false if the process died or never
    /// listened.
    fn wait_ready(&mut self) -> bool {
        let addr: SocketAddr = self.addr.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Store options that reach this registry over plain HTTP, with no
    /// credentials (and none from the host's docker config).
    pub fn options(&self) -> ImageStoreOptions {
        ImageStoreOptions {
            registry: RegistryConfig {
                insecure_registries: vec![self.addr.clone()],
                docker_config: Some(self.dir.path().join("no-docker-config.json")),
                ..RegistryConfig::default()
            },
            ..ImageStoreOptions::default()
        }
    }

    /// [`Registry::options`] with credentials for it.
    pub fn options_with_credentials(&self, user: &str, password: &str) -> ImageStoreOptions {
        let mut o = self.options();
        o.registry.credentials.insert(
            self.addr.clone(),
            RegistryCredentials {
                username: user.into(),
                password: password.into(),
            },
        );
        o
    }

    /// `addr/name:tag`
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// Pushes `layout`'s `tag` as `name_tag` with skopeo (`--all`: an index
    /// is pushed with every manifest it lists).
    pub fn push_layout(&self, layout: &Path, tag: &str, name_tag: &str) {
        require_tool("/usr/bin/skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--all",
            "--insecure-policy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if self.auth {
            cmd.arg("--dest-creds").arg(format!("{USER}:{PASSWORD}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(name_tag)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Pushes blobs and a manifest as they are, with oci-client.
    pub async fn push_raw(
        &self,
        name_tag: &str,
        blobs: &[Vec<u8>],
        manifest: &[u8],
        media_type: &str,
    ) {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let reference: Reference = self.reference(name_tag).parse().unwrap();
        let auth = if self.auth {
            RegistryAuth::Basic(USER.into(), PASSWORD.into())
        } else {
            RegistryAuth::Anonymous
        };
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .unwrap();
        for b in blobs {
            client
                .push_blob(&reference, b.clone(), &Digest::of(b).to_string())
                .await
                .unwrap();
        }
        client
            .push_manifest_raw(&reference, manifest.to_vec(), media_type.parse().unwrap())
            .await
            .unwrap();
    }

    /// Where the registry keeps a blob's bytes (to corrupt it).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Kills the registry now (to show that cached images need no network).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    Htpasswd,
    Token,
}

/// A loopback address with nothing listening.
pub fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}
