//! A throwaway multi-host platform: `somna controlplane` replicas and
//! `somna agent` processes (each with its own data directory) on loopback,
//! for tests of scheduling, host loss and control-plane restarts. Dropping
//! it stops everything and kills any VMM left behind by a killed agent.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Artifacts, entries_of, processes_mentioning, wait_until};

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub somna: PathBuf,
    pub artifacts: Artifacts,
    pub agents: usize,
    /// Control-plane replicas (more than one needs a PostgreSQL `store`).
    pub replicas: usize,
    /// `--store` of the control plane (default: SQLite in its data dir).
    pub store: Option<String>,
    /// Extra `somna controlplane` arguments (e.g. `--policy pack`).
    pub controlplane_args: Vec<String>,
    /// Extra `somna agent` arguments (e.g. `--network ...`).
    pub agent_args: Vec<String>,
    /// Extra environment for the replicas (e.g. `SOMNA_FAULT`), read at
    /// each (re)start.
    pub controlplane_env: Vec<(String, String)>,
}

impl ClusterOptions {
    pub fn new(somna: impl Into<PathBuf>, agents: usize) -> ClusterOptions {
        ClusterOptions {
            somna: somna.into(),
            artifacts: Artifacts::from_env(),
            agents,
            replicas: 1,
            store: None,
            controlplane_args: Vec::new(),
            agent_args: Vec::new(),
            controlplane_env: Vec::new(),
        }
    }
}

struct Replica {
    child: Option<Child>,
    data_dir: tempfile::TempDir,
    api_listen: String,
    agent_listen: String,
}

struct AgentProc {
    child: Option<Child>,
    data_dir: tempfile::TempDir,
    host_id: String,
}

pub struct Cluster {
    options: ClusterOptions,
    replicas: Vec<Replica>,
    agents: Vec<AgentProc>,
    /// API address of each replica (`http://127.0.0.1:PORT`).
    pub addrs: Vec<String>,
    /// Apps ingress of each replica (`http://127.0.0.1:PORT`).
    pub ingress: Vec<String>,
    pub api_key: String,
    join_token: String,
}

const JOIN_TOKEN: &str = "test-join-token-0123456789";

fn log_filter() -> String {
    std::env::var("SOMNA_LOG").unwrap_or_else(|_| "warn".into())
}

/// Reads the first stdout line of `child` as JSON.
fn first_json_line(child: &mut Child, what: &str) -> serde_json::Value {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
    if n == 0 {
        let status = child.wait().ok();
        panic!("{what} exited before serving ({status:?}); see its log above");
    }
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad {what} line {line:?}: {e}"))
}

fn stop_child(child: &mut Option<Child>, signal: libc::c_int) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, signal);
        }
        if !wait_until(Duration::from_secs(30), || {
            matches!(c.try_wait(), Ok(Some(_)))
        }) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

impl Cluster {
    /// Starts the replicas and agents and waits until every agent has
    /// joined every replica.
    pub fn start(options: ClusterOptions) -> Cluster {
        assert!(
            options.replicas == 1 || options.store.is_some(),
            "several replicas need a shared (PostgreSQL) store"
        );
        let mut c = Cluster {
            options,
            replicas: Vec::new(),
            agents: Vec::new(),
            addrs: Vec::new(),
            ingress: Vec::new(),
            api_key: String::new(),
            join_token: JOIN_TOKEN.to_string(),
        };
        for _ in 0..c.options.replicas {
            let data_dir = tempfile::Builder::new()
                .prefix("somna-cp-")
                .tempdir()
                .expect("create a data directory");
            c.replicas.push(Replica {
                child: None,
                data_dir,
                api_listen: "127.0.0.1:0".into(),
                agent_listen: "127.0.0.1:0".into(),
            });
            let i = c.replicas.len() - 1;
            c.launch_replica(i);
        }
        for i in 0..c.options.agents {
            let data_dir = tempfile::Builder::new()
                .prefix("somna-agent-")
                .tempdir()
                .expect("create a data directory");
            c.agents.push(AgentProc {
                child: None,
                data_dir,
                host_id: format!("host-{i}"),
            });
            c.launch_agent(i);
        }
        c.wait_for_hosts(c.options.agents);
        c
    }

    fn launch_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let mut cmd = Command::new(&self.options.somna);
        cmd.arg("--json")
            .arg("controlplane")
            .args(["--listen", &r.api_listen, "--agent-listen", &r.agent_listen])
            .args(["--ingress-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(r.data_dir.path())
            .args(["--join-token", &self.join_token])
            .args(&self.options.controlplane_args)
            .env("SOMNA_LOG", log_filter())
            .envs(self.options.controlplane_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(store) = &self.options.store {
            cmd.args(["--store", store]);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.options.somna.display()));
        let v = first_json_line(&mut child, "somna controlplane");
        let addr = v["addr"].as_str().unwrap_or_default().to_string();
        // A restart must come back on the same ports (agents redial them).
        r.api_listen = addr.trim_start_matches("http://").to_string();
        r.agent_listen = v["agent_addr"].as_str().unwrap_or_default().to_string();
        if let Some(key) = v["api_key"].as_str()
            && self.api_key.is_empty()
        {
            self.api_key = key.to_string();
        }
        let ingress = v["ingress"].as_str().unwrap_or_default().to_string();
        if self.addrs.len() <= i {
            self.addrs.push(addr);
            self.ingress.push(ingress);
        } else {
            self.ingress[i] = ingress;
        }
        r.child = Some(child);
    }

    fn launch_agent(&mut self, i: usize) {
        let o = &self.options;
        let a = &mut self.agents[i];
        let mut cmd = Command::new(&o.somna);
        cmd.arg("--json").arg("agent");
        for r in &self.replicas {
            cmd.args(["--join", &r.agent_listen]);
        }
        let mut child = cmd
            .args(["--token", &self.join_token, "--host-id", &a.host_id])
            .arg("--data-dir")
            .arg(a.data_dir.path())
            .arg("--guest-dir")
            .arg(&o.artifacts.guest_dir)
            .arg("--image-dir")
            .arg(&o.artifacts.image_dir)
            .args(["--accel", "tcg", "--no-templates", "--no-registries"])
            .args(&o.agent_args)
            .env("SOMNA_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", o.somna.display()));
        first_json_line(&mut child, "somna agent");
        a.child = Some(child);
    }

    /// Waits until every replica lists `n` ready hosts.
    pub fn wait_for_hosts(&self, n: usize) {
        for addr in &self.addrs {
            let ok = wait_until(Duration::from_secs(60), || {
                let out = self.cli_on(addr).args(["--json", "host", "ls"]).output();
                let Ok(out) = out else { return false };
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                v.as_array()
                    .map(|hosts| hosts.iter().filter(|h| h["state"] == "ready").count() == n)
                    .unwrap_or(false)
            });
            assert!(ok, "{n} hosts did not become ready on {addr}");
        }
    }

    /// A client of replica `i`.
    pub async fn client(&self, i: usize) -> somna_sdk::Client {
        somna_sdk::Client::connect_with_key(&self.addrs[i], Some(&self.api_key))
            .await
            .expect("connect to the control plane")
    }

    /// `somna` pointed at replica `addr`.
    fn cli_on(&self, addr: &str) -> Command {
        let mut c = Command::new(&self.options.somna);
        c.env("SOMNA_ADDR", addr)
            .env("SOMNA_API_KEY", &self.api_key);
        c
    }

    /// `somna` pointed at the first replica.
    pub fn cli(&self) -> Command {
        self.cli_on(&self.addrs[0])
    }

    pub fn host_id(&self, agent: usize) -> &str {
        &self.agents[agent].host_id
    }

    /// SIGKILLs agent `i`, as a host that drops off the network would
    /// (its VMs keep running until the cluster is dropped).
    pub fn kill_agent(&mut self, i: usize) {
        stop_child(&mut self.agents[i].child, libc::SIGKILL);
    }

    /// SIGKILLs replica `i` (if it still runs) and starts it again on the
    /// same ports and store.
    pub fn restart_replica(&mut self, i: usize) {
        stop_child(&mut self.replicas[i].child, libc::SIGKILL);
        self.launch_replica(i);
    }

    /// Options that later (re)starts use (e.g. `controlplane_env`).
    pub fn options_mut(&mut self) -> &mut ClusterOptions {
        &mut self.options
    }

    /// Waits up to `timeout` for replica `i` to exit on its own and reaps it.
    pub fn wait_replica_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.replicas[i].child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.replicas[i].child = None;
        }
        status
    }

    /// VMM processes of agent `i` (anything naming its run directories).
    pub fn vmm_pids(&self, agent: usize) -> Vec<u32> {
        processes_mentioning(&self.agents[agent].data_dir.path().join("vms"))
    }

    /// Run directories of agent `i`'s sandboxes.
    pub fn vm_dirs(&self, agent: usize) -> Vec<PathBuf> {
        entries_of(&self.agents[agent].data_dir.path().join("vms"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first: a graceful agent destroys its own sandboxes.
        for a in &mut self.agents {
            stop_child(&mut a.child, libc::SIGTERM);
        }
        for r in &mut self.replicas {
            stop_child(&mut r.child, libc::SIGTERM);
        }
        // Safety net for killed agents and failed tests.
        for a in &self.agents {
            for pid in processes_mentioning(&a.data_dir.path().join("vms")) {
                // SAFETY: kill(2); the pid's command line names our data dir.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}
