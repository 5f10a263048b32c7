//! A real OCI registry for end-to-end tests: Debian's `docker-registry` on a
//! free loopback port, storage in a temporary directory, stopped when the
//! handle drops (also when a test fails). Images get in with `skopeo copy`,
//! as a user would push them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts an anonymous registry and waits until it accepts connections.
    pub fn start() -> Registry {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "docker-registry is missing: run scripts/setup.sh (it installs the Debian package)"
        );
        let dir = tempfile::Builder::new()
            .prefix("somna-registry-")
            .tempdir()
            .expect("temp dir");
        for _ in 0..5 {
            // Free now; if another process takes it first, try another.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: {addr}\n",
                    dir.path().join("data").display()
                ),
            )
            .expect("write registry config");
            let mut child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start docker-registry");
            let sock: SocketAddr = addr.parse().expect("socket address");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
                    return Registry {
                        child,
                        _dir: dir,
                        addr,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT/<name_tag>`
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// Pushes an OCI layout's `tag` as `name_tag`.
    pub fn push_layout(&self, layout: &Path, tag: &str, name_tag: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--insecure-policy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(name_tag)))
            .output()
            .expect("skopeo is installed (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
