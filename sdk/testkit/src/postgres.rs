//! A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries,
//! a fresh cluster in a temporary directory, listening on a free loopback
//! port only, owned by the `postgres` system user (PostgreSQL refuses to
//! run as root). Dropping it stops the server and removes the cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Postgres {
    _dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
}

/// `/usr/lib/postgresql/<newest>/bin`, or a panic saying how to get it.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let v = versions.last().unwrap_or_else(|| {
        panic!("PostgreSQL is not installed: run `scripts/setup.sh build` (installs Debian's postgresql)")
    });
    root.join(v.to_string()).join("bin")
}

/// `program` to run as the `postgres` user (directly, not through
/// runuser, so the child's pid is the server's and signals reach it).
fn as_postgres(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = postgres_user();
    let mut c = Command::new(program);
    c.uid(uid).gid(gid).current_dir("/");
    c
}

/// uid and gid of the `postgres` system user (made by Debian's package).
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == "postgres" {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            panic!("no postgres user: run `scripts/setup.sh build` (installs Debian's postgresql)")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("pick a free loopback port")
}

impl Postgres {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("somna-pg-")
            .tempdir()
            .expect("create a temporary directory");
        let data = dir.path().join("data");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("run chown");
        assert!(
            chown.success(),
            "cannot hand {} to the postgres user",
            dir.path().display()
        );
        let init = as_postgres(&bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "somna",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let child = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .arg("-k")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let mut pg = Postgres {
            _dir: dir,
            child: Some(child),
            port,
        };
        let ready = crate::wait_until(Duration::from_secs(30), || {
            Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "somna",
                    "-q",
                ])
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ready {
            let out = pg.child.take().and_then(|mut c| {
                let _ = c.kill();
                c.wait_with_output().ok()
            });
            panic!(
                "postgres did not become ready: {}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            );
        }
        pg
    }

    /// A new, empty database; returns its sqlx URL.
    pub fn database(&self, name: &str) -> String {
        let bin = bin_dir();
        let out = Command::new(bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "somna",
                name,
            ])
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://somna@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's "fast" shutdown (disconnects clients).
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let stopped = crate::wait_until(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
