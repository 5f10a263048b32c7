//! Sandbox networking on this host: the agent's `somna_netd::Netd` (when
//! networking is on) and the network slot each running VM holds.
//!
//! A VM holds a slot exactly while its VMM runs: one is claimed before the
//! VMM starts (create, wake, template build, warm-pool clone) and released
//! once the VMM is gone (sleep, destroy, failure, crash). Releasing means
//! dropping the [`SlotLease`]; netd's reset runs on a blocking thread. The
//! guest side of every slot is the same (`somna_netd::contract`), so a VM
//! restored from any snapshot works on whatever slot it gets.
//!
//! With networking off (the default, for hosts without eBPF) VMs get no
//! network device at all; with it on, start-up fails when netd cannot
//! enforce isolation rather than run sandboxes without it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use somna_netd::{Counters, EgressPolicy, ErrorKind, NetError, Netd, NetdConfig, Slot, SlotId};
use tracing::{info, warn};

use crate::error::AgentError;
use crate::sandbox::{SandboxState, lock};
use crate::vmm::{NetSpec, VmSpec};

/// The host's sandbox networking: off, or a running netd.
pub(crate) struct HostNetwork {
    netd: Option<Arc<Netd>>,
}

impl HostNetwork {
    /// Starts netd (preflight, crash reconcile, slot pool) when `config`
    /// is set. Run after the VMMs of a previous agent were reaped: netd's
    /// reconcile deletes the slots they were attached to.
    pub(crate) async fn start(config: Option<NetdConfig>) -> Result<HostNetwork, AgentError> {
        let Some(config) = config else {
            return Ok(HostNetwork { netd: None });
        };
        let started = Instant::now();
        let netd = tokio::task::spawn_blocking(move || Netd::start(config))
            .await
            .map_err(|e| AgentError::Config(format!("netd start-up panicked: {e}")))?
            .map_err(|e| {
                AgentError::Network(
                    net_error_message("starting sandbox networking (--network)", &e),
                    e.kind(),
                )
            })?;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            service_addr = %netd.service_addr(),
            "sandbox networking on"
        );
        Ok(HostNetwork {
            netd: Some(Arc::new(netd)),
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.netd.is_some()
    }

    /// Kernel parameters telling the guest agent how to configure eth0
    /// (the slot contract, the same on every slot and host); empty when
    /// networking is off. Part of the kernel command line, so also of the
    /// guest fingerprint: templates built without a network device are
    /// never restored with one.
    pub(crate) fn guest_kernel_args(&self) -> String {
        if !self.enabled() {
            return String::new();
        }
        let g = somna_netd::GuestNetwork::contract();
        format!(
            "somna.ip={}/{} somna.gw={} somna.mtu={}",
            g.ip, g.prefix_len, g.gateway, g.mtu
        )
    }

    /// Checks a sandbox's policy against this host (errors name the field).
    pub(crate) fn validate(&self, policy: &EgressPolicy) -> Result<(), AgentError> {
        if self.netd.is_none() && !policy.exposed_tcp_ports.is_empty() {
            return Err(AgentError::Network(
                "exposing ports needs sandbox networking, and this host runs without it; \
                 start it with --network"
                    .into(),
                ErrorKind::FailedPrecondition,
            ));
        }
        match &self.netd {
            Some(netd) => netd.validate_policy(policy).map_err(to_agent_error),
            None => policy.validate().map_err(to_agent_error),
        }
    }

    /// Claims a slot for `owner` with `policy` and points `spec` at its TAP.
    /// Without networking, `spec` is left without a network device.
    pub(crate) fn attach(
        &self,
        owner: &str,
        policy: &EgressPolicy,
        spec: &mut VmSpec,
    ) -> Result<Option<SlotLease>, AgentError> {
        let Some(netd) = &self.netd else {
            spec.net = None;
            return Ok(None);
        };
        let slot = netd.claim(owner, policy).map_err(to_agent_error)?;
        spec.net = Some(NetSpec {
            tap: slot.tap.clone(),
            netns: Some(slot.netns_path.clone()),
            mac: slot.guest.mac.clone(),
        });
        Ok(Some(SlotLease {
            netd: netd.clone(),
            id: slot.id,
            slot,
        }))
    }

    /// Removes every slot, program and rule (agent shutdown).
    pub(crate) async fn shutdown(&self) {
        if let Some(netd) = self.netd.clone() {
            let done = tokio::task::spawn_blocking(move || netd.shutdown()).await;
            if let Ok(Err(e)) = done {
                warn!(error = %e, "netd shutdown left something behind");
            }
        }
    }
}

impl crate::agent::Agent {
    /// Replaces a sandbox's egress rules (internet, allow and deny lists);
    /// live (BPF map writes, no reattach) when its VM runs, else from its
    /// next wake. The ports it exposes stay as they were.
    pub fn update_network(
        &self,
        id: &str,
        mut policy: EgressPolicy,
    ) -> Result<crate::SandboxInfo, AgentError> {
        if !self.network.enabled() {
            return Err(AgentError::Network(
                format!(
                    "host {} runs without networking, so its sandboxes have no network \
                     device to apply a policy to; start the agent with --network",
                    self.host_id()
                ),
                ErrorKind::FailedPrecondition,
            ));
        }
        self.network.validate(&policy)?;
        let sandbox = self.lookup(id)?;
        policy.exposed_tcp_ports = sandbox.net.policy().exposed_tcp_ports;
        sandbox.net.set_policy(policy)?;
        if matches!(
            sandbox.state(),
            SandboxState::Running | SandboxState::Sleeping
        ) {
            sandbox.persist();
        }
        self.get(id)
    }

    /// Opens a TCP connection to an exposed `port` of the sandbox, waking
    /// it first if it sleeps (concurrent callers share one wake). The
    /// connection counts as activity while it is open, so the sandbox does
    /// not go to sleep under a long request (a stream, a WebSocket).
    pub async fn connect_port(
        self: &Arc<Self>,
        id: &str,
        port: u16,
    ) -> Result<PortConnection, AgentError> {
        let sandbox = self.lookup(id)?;
        Self::check_exposed(id, &sandbox, port)?;
        let (sandbox, _live) = self.awake(id).await?;
        let activity = sandbox.activity.begin();
        let (_, slot) = sandbox.net.slot().ok_or_else(|| no_slot(id))?;
        let addr = std::net::SocketAddr::from((slot.sandbox_addr, port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| AgentError::Io {
                what: format!("connecting to port {port} of sandbox {id}"),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| AgentError::Io {
                what: format!("connecting to port {port} of sandbox {id} (is the app listening?)"),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        sandbox.activity.touch();
        Ok(PortConnection {
            stream,
            _activity: ActivityGuard(activity),
        })
    }

    /// A health-check connection to an exposed `port`: from netd's
    /// health-check address, so it is not activity, and only if the VM
    /// runs (None while it sleeps; a health check never wakes it).
    pub async fn health_check_connect(
        &self,
        id: &str,
        port: u16,
    ) -> Result<Option<tokio::net::TcpStream>, AgentError> {
        let sandbox = self.lookup(id)?;
        Self::check_exposed(id, &sandbox, port)?;
        if sandbox.info().state != crate::SandboxState::Running || sandbox.live().is_none() {
            return Ok(None);
        }
        let Some((netd, slot)) = sandbox.net.slot() else {
            return Ok(None);
        };
        let stream = tokio::task::spawn_blocking(move || {
            netd.health_check_connect(&slot, port, CONNECT_TIMEOUT)
        })
        .await
        .map_err(|e| AgentError::Config(format!("health-check task panicked: {e}")))?
        .map_err(to_agent_error)?;
        stream
            .set_nonblocking(true)
            .map_err(|source| AgentError::Io {
                what: "health-check socket".into(),
                source,
            })?;
        let stream = tokio::net::TcpStream::from_std(stream).map_err(|source| AgentError::Io {
            what: "health-check socket".into(),
            source,
        })?;
        Ok(Some(stream))
    }

    fn check_exposed(
        id: &str,
        sandbox: &crate::sandbox::Sandbox,
        port: u16,
    ) -> Result<(), AgentError> {
        if !sandbox.net.policy().exposed_tcp_ports.contains(&port) {
            return Err(AgentError::InvalidArgument(format!(
                "port {port} of sandbox {id} is not exposed (create it with expose_ports)"
            )));
        }
        Ok(())
    }

    /// How long since the sandbox's last network traffic that counts as
    /// activity (health checks do not); None without networking or
    /// before its first packet.
    pub(crate) fn network_idle_for(
        &self,
        sandbox: &crate::sandbox::Sandbox,
    ) -> Option<std::time::Duration> {
        sandbox.net.counters(&self.network)?.idle_for()
    }
}

/// How long connecting to a guest port may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn no_slot(id: &str) -> AgentError {
    AgentError::Network(
        format!("sandbox {id} has no network slot (is the host running with --network?)"),
        ErrorKind::FailedPrecondition,
    )
}

/// An open connection to a sandbox port; the sandbox counts as active
/// until it is dropped.
pub struct PortConnection {
    pub stream: tokio::net::TcpStream,
    _activity: ActivityGuard,
}

impl tokio::io::AsyncRead for PortConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PortConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Keeps a sandbox from idling out while held.
pub struct ActivityGuard(#[allow(dead_code)] crate::sandbox::InflightGuard);

/// A claimed slot; dropping it releases the slot (on a blocking thread,
/// since the reset runs commands). Drop it only once the VMM has exited:
/// netd destroys, rather than reuses, a slot whose TAP is still open.
pub(crate) struct SlotLease {
    netd: Arc<Netd>,
    id: SlotId,
    slot: Slot,
}

impl SlotLease {
    pub(crate) fn update_policy(&self, policy: &EgressPolicy) -> Result<(), AgentError> {
        self.netd
            .update_policy(self.id, policy)
            .map_err(to_agent_error)
    }

    fn counters(&self) -> Option<Counters> {
        self.netd.counters(self.id).ok()
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let netd = self.netd.clone();
        let id = self.id;
        let release = move || {
            if let Err(e) = netd.release(id) {
                warn!(slot = id.0, error = %e, "releasing a network slot failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(release);
            }
            Err(_) => release(),
        }
    }
}

/// A sandbox's network: its policy, the slot its VM holds while it runs,
/// and the traffic counted on earlier slots (before sleeps).
#[derive(Default)]
pub(crate) struct SandboxNet {
    policy: Mutex<EgressPolicy>,
    slot: Mutex<Option<SlotLease>>,
    earlier: Mutex<Counters>,
}

impl SandboxNet {
    pub(crate) fn new(policy: EgressPolicy) -> SandboxNet {
        SandboxNet {
            policy: Mutex::new(policy),
            ..Default::default()
        }
    }

    pub(crate) fn policy(&self) -> EgressPolicy {
        lock(&self.policy).clone()
    }

    /// Claims a slot for the sandbox's VM (about to start) and points
    /// `spec` at it.
    pub(crate) fn attach(
        &self,
        network: &HostNetwork,
        owner: &str,
        spec: &mut VmSpec,
    ) -> Result<(), AgentError> {
        let lease = network.attach(owner, &self.policy(), spec)?;
        self.hold(lease);
        Ok(())
    }

    /// Takes over a slot claimed for the VM before the sandbox existed
    /// (template clone, warm pool) and applies the sandbox's policy to it.
    pub(crate) fn adopt(&self, lease: Option<SlotLease>) -> Result<(), AgentError> {
        if let Some(l) = &lease {
            l.update_policy(&self.policy())?;
        }
        self.hold(lease);
        Ok(())
    }

    fn hold(&self, lease: Option<SlotLease>) {
        let old = std::mem::replace(&mut *lock(&self.slot), lease);
        self.retire(old);
    }

    /// Releases the slot: call once the VMM is gone.
    pub(crate) fn release(&self) {
        let old = lock(&self.slot).take();
        self.retire(old);
    }

    /// Changes the policy, live on the slot if the VM runs.
    pub(crate) fn set_policy(&self, policy: EgressPolicy) -> Result<(), AgentError> {
        if let Some(l) = lock(&self.slot).as_ref() {
            l.update_policy(&policy)?;
        }
        *lock(&self.policy) = policy;
        Ok(())
    }

    /// Where the host reaches the running VM's guest (None when no slot).
    fn slot(&self) -> Option<(Arc<Netd>, Slot)> {
        lock(&self.slot)
            .as_ref()
            .map(|l| (l.netd.clone(), l.slot.clone()))
    }

    /// Traffic over the sandbox's life (None without networking).
    pub(crate) fn counters(&self, network: &HostNetwork) -> Option<Counters> {
        if !network.enabled() {
            return None;
        }
        let mut total = *lock(&self.earlier);
        if let Some(now) = lock(&self.slot).as_ref().and_then(SlotLease::counters) {
            add(&mut total, &now);
        }
        Some(total)
    }

    fn retire(&self, lease: Option<SlotLease>) {
        if let Some(l) = lease {
            if let Some(c) = l.counters() {
                add(&mut lock(&self.earlier), &c);
            }
            drop(l);
        }
    }
}

fn add(total: &mut Counters, c: &Counters) {
    total.rx_bytes += c.rx_bytes;
    total.rx_packets += c.rx_packets;
    total.tx_bytes += c.tx_bytes;
    total.tx_packets += c.tx_packets;
    total.rx_dropped += c.rx_dropped;
    total.tx_dropped += c.tx_dropped;
    if c.last_activity_mono_ns.is_some() {
        total.last_activity_mono_ns = c.last_activity_mono_ns;
        total.last_activity_unix_ms = c.last_activity_unix_ms;
    }
}

fn net_error_message(what: &str, e: &NetError) -> String {
    format!("{what}: {e}")
}

/// netd's errors as agent errors with the matching status.
pub(crate) fn to_agent_error(e: NetError) -> AgentError {
    let kind = e.kind();
    AgentError::Network(e.to_string(), kind)
}

/// The gRPC code for a netd error kind.
pub(crate) fn code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Internal => tonic::Code::Internal,
    }
}

/// The policy of VMs that are no sandbox yet (template builds, paused
/// warm-pool clones): no internet.
pub(crate) fn template_policy() -> EgressPolicy {
    EgressPolicy {
        internet: false,
        ..EgressPolicy::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use somna_netd::testing::{Internet, wait_until};

    use super::*;
    use crate::vmm::{Accelerator, ChannelKind, MemoryBacking};

    fn spec() -> VmSpec {
        VmSpec {
            id: "sbx-net".into(),
            cpus: 1,
            memory_mib: 128,
            memory: MemoryBacking {
                path: "/r/mem".into(),
                shared: true,
            },
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.img".into(),
            cmdline: String::new(),
            disks: Vec::new(),
            disk_io: Default::default(),
            net: None,
            channel: ChannelKind::Serial,
            accelerator: Accelerator::Tcg,
        }
    }

    #[tokio::test]
    async fn off_gives_no_network_device() {
        let network = HostNetwork::start(None).await.unwrap();
        let sandbox = SandboxNet::new(EgressPolicy::default());
        let mut s = spec();
        sandbox.attach(&network, "sbx-a", &mut s).unwrap();
        assert!(s.net.is_none());
        assert!(sandbox.counters(&network).is_none());
        // Bad CIDR rules are still refused (named field), network or not.
        let bad = EgressPolicy {
            allow_out: vec!["10.0.0.0/8".parse().unwrap()],
            deny_out: vec!["10.0.0.0/8".parse().unwrap()],
            ..EgressPolicy::default()
        };
        let e = network.validate(&bad).unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::InvalidArgument);
    }

    /// The hooks' contract with netd, on real namespaces (root): a slot is
    /// held from attach to release, the VMM spec points at its TAP, policy
    /// changes reach the slot live, a release returns it to the pool.
    #[tokio::test(flavor = "multi_thread")]
    async fn slot_is_held_from_attach_to_release() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root (network namespaces, eBPF)");
            return;
        }
        let inet = Internet::create("somnaia", "203.0.113.40/30".parse().unwrap()).unwrap();
        let config = NetdConfig {
            name_prefix: "somnaha".into(),
            pool_size: 2,
            host_subnet: "100.127.40.0/26".parse().unwrap(),
            egress: inet.egress(),
            ..NetdConfig::default()
        };
        let network = HostNetwork::start(Some(config)).await.unwrap();
        let netd = network.netd.clone().unwrap();

        let sandbox = SandboxNet::new(template_policy());
        let mut s = spec();
        sandbox.attach(&network, "sbx-a", &mut s).unwrap();
        let net = s.net.clone().unwrap();
        assert_eq!(net.mac, somna_netd::GuestNetwork::contract().mac);
        assert!(net.netns.as_ref().unwrap().exists());
        let claimed = netd.claimed();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].owner, "sbx-a");
        assert_eq!(Some(&claimed[0].netns_path), net.netns.as_ref());
        assert!(!netd.policy(claimed[0].id).unwrap().internet);

        sandbox.set_policy(EgressPolicy::default()).unwrap();
        assert!(netd.policy(claimed[0].id).unwrap().internet);
        assert!(sandbox.policy().internet);
        assert!(sandbox.counters(&network).is_some());

        sandbox.release();
        assert!(wait_until(Duration::from_secs(10), || netd
            .claimed()
            .is_empty()));

        // Wake: a new claim with the policy the sandbox has now.
        let mut s = spec();
        sandbox.attach(&network, "sbx-a", &mut s).unwrap();
        let claimed = netd.claimed();
        assert_eq!(claimed.len(), 1);
        assert!(netd.policy(claimed[0].id).unwrap().internet);
        drop(sandbox);
        assert!(wait_until(Duration::from_secs(10), || netd
            .claimed()
            .is_empty()));
        network.shutdown().await;
        drop(inet);
    }
}
