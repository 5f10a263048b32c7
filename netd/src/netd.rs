//! [`Netd`]: the slot pool and the per-sandbox operations on it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    Counters, Egress, EgressPolicy, NetdConfig,
    bpf::{self, Applied, DROP_REASON_NAMES, Maps, Programs},
    contract::{self, GuestNetwork, TAP_NAME},
    error::{NetError, Result},
    layout::{Layout, SlotIndex},
    preflight, reconcile,
    slot::{self, BuiltSlot, lock},
    tap,
};

/// Identifies a claimed slot (its index in the host subnet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotId(pub u32);

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// A claimed slot: everything the VMM and the platform need. Not a guard:
/// give it back with [`Netd::release`] once the VMM has exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub id: SlotId,
    /// Who claimed it (the sandbox id).
    pub owner: String,
    /// The slot's network namespace (`<prefix>-sN`), and its path
    /// (`/run/netns/<prefix>-sN`), for a VMM that runs inside it.
    pub netns_name: String,
    pub netns_path: PathBuf,
    /// The TAP device inside the namespace (always [`TAP_NAME`]).
    pub tap: String,
    /// The host end of the slot's veth pair.
    pub host_veth: String,
    /// The slot's own address: the host reaches the guest's exposed ports at
    /// `sandbox_addr:port` (the slot translates to the guest address).
    pub sandbox_addr: Ipv4Addr,
    /// The host end's address (the source of host-opened connections).
    pub host_addr: Ipv4Addr,
    /// What the guest must configure (identical on every slot).
    pub guest: GuestNetwork,
}

impl Slot {
    /// Opens the slot's TAP for a VMM: the returned fd is the TAP queue
    /// (pass it to QEMU as `-netdev tap,id=net0,fd=N`, to Cloud Hypervisor
    /// as `--net fd=N,...`). With `vnet_hdr` frames carry a
    /// `virtio_net_hdr` (what virtio-net offloads need; QEMU detects it).
    /// The VMM itself can stay in the host's network namespace.
    pub fn open_tap(&self, vnet_hdr: bool) -> Result<OwnedFd> {
        tap::open_tap(&self.netns_path, &self.tap, vnet_hdr)
    }
}

/// The slot pool of a host at a glance (levels and the last refill error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotPool {
    /// Slots built and waiting for a claim.
    pub ready: usize,
    pub claimed: usize,
    /// Slots being built right now.
    pub building: usize,
    /// The configured number of ready slots.
    pub pool_size: usize,
    /// Most slots the host subnet holds.
    pub capacity: usize,
    /// The last failure of the background refill, if the last attempt failed.
    pub refill_error: Option<String>,
}

struct Lease {
    owner: String,
    policy: EgressPolicy,
    applied: Applied,
}

struct SlotState {
    built: BuiltSlot,
    lease: Option<Lease>,
    /// Programs detached (benchmarks): never reused.
    tainted: bool,
}

#[derive(Default)]
struct State {
    slots: BTreeMap<SlotIndex, SlotState>,
    ready: VecDeque<SlotIndex>,
    building: BTreeSet<SlotIndex>,
    shut_down: bool,
    torn_down: bool,
    refill_error: Option<String>,
}

struct Inner {
    config: NetdConfig,
    layout: Layout,
    programs: Mutex<Programs>,
    maps: Mutex<Maps>,
    state: Mutex<State>,
    wake: Condvar,
}

/// Sandbox networking on one host: a pool of network slots, the eBPF
/// programs enforcing each sandbox's policy, and the host's NAT. See the
/// crate documentation for the design.
///
/// All methods are blocking but [`Netd::claim`], [`Netd::update_policy`] and
/// [`Netd::counters`] only touch BPF maps (microseconds) when the pool has a
/// ready slot; [`Netd::start`], [`Netd::release`] and [`Netd::shutdown`]
/// run commands (milliseconds): call those from a blocking thread
/// (`spawn_blocking`).
pub struct Netd {
    inner: Arc<Inner>,
    refill: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Netd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netd")
            .field("prefix", &self.inner.config.name_prefix)
            .field("host_subnet", &self.inner.config.host_subnet)
            .finish_non_exhaustive()
    }
}

impl Netd {
    /// Checks the host (eBPF, capabilities, tools: a clear
    /// `FailedPrecondition` error naming what is missing), removes leftovers
    /// of a previous run with the same prefix (namespaces, links, pinned
    /// programs, nftables table, conntrack entries, changed sysctls), loads
    /// the programs, sets up the host (NAT, forwarding, service addresses)
    /// and builds `pool_size` slots. Then a background thread keeps the
    /// pool full.
    pub fn start(config: NetdConfig) -> Result<Netd> {
        let t0 = Instant::now();
        let _span = tracing::info_span!("netd_start", prefix = %config.name_prefix).entered();
        config.validate()?;
        preflight::check(&config)?;
        let layout = Layout::new(&config);
        reconcile::teardown(&config, &layout, "leftover")?;

        let started = (|| -> Result<Netd> {
            reconcile::mount_bpffs(&layout)?;
            let egress_ifindex = match &config.egress {
                Egress::Any => 0,
                Egress::Interface(name) => crate::sys::ifindex(name)?,
            };
            let params = bpf::LoadParams {
                guest_ip: contract::GUEST_IP,
                gateway_ip: contract::GATEWAY_IP,
                guest_mac: contract::GUEST_MAC,
                gateway_dns: !config.dns_protos().is_empty(),
                subnet: config.host_subnet,
                service_ip: layout.service_ip(),
                health_ip: layout.health_ip(),
                egress_ifindex,
                slots: layout.capacity + 1,
                services: config
                    .host_services
                    .iter()
                    .map(|s| (s.proto.ip_proto(), s.port))
                    .collect(),
                blocked: crate::policy::blocked_ranges(),
            };
            let (programs, maps) = bpf::load(&params, &layout.bpffs())?;
            reconcile::host_setup(&config, &layout)?;
            let inner = Arc::new(Inner {
                config: config.clone(),
                layout: layout.clone(),
                programs: Mutex::new(programs),
                maps: Mutex::new(maps),
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            });
            let pool_t0 = Instant::now();
            for _ in 0..config.pool_size {
                inner.build_one(true)?;
            }
            info!(
                slots = config.pool_size,
                elapsed_ms = pool_t0.elapsed().as_secs_f64() * 1e3,
                "netd: slot pool built"
            );
            let refill_inner = inner.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-refill", config.name_prefix))
                .spawn(move || refill_loop(refill_inner))
                .map_err(|e| NetError::io("starting the pool refill thread", e))?;
            Ok(Netd {
                inner,
                refill: Mutex::new(Some(handle)),
            })
        })();
        match started {
            Ok(netd) => {
                info!(
                    prefix = %config.name_prefix,
                    subnet = %config.host_subnet,
                    egress = ?config.egress,
                    elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
                    "netd: started"
                );
                Ok(netd)
            }
            Err(e) => {
                if let Err(cleanup) = reconcile::teardown(&config, &layout, "partial") {
                    warn!(error = %cleanup, "netd: cleaning up after a failed start");
                }
                Err(e)
            }
        }
    }

    /// The configuration this instance runs with.
    pub fn config(&self) -> &NetdConfig {
        &self.inner.config
    }

    /// The host address where host services listen (DNS forwarder: bind
    /// `service_addr:53`). Sandboxes reach the configured service ports
    /// here, and DNS also through their gateway.
    pub fn service_addr(&self) -> Ipv4Addr {
        self.inner.layout.service_ip()
    }

    /// The source address of platform health checks. Traffic from (and
    /// answers to) this address passes normally and is counted in bytes and
    /// packets, but does not move a sandbox's last-activity time. Use
    /// [`Netd::health_check_connect`], or bind a socket to this address
    /// before connecting to [`Slot::sandbox_addr`].
    pub fn health_check_addr(&self) -> Ipv4Addr {
        self.inner.layout.health_ip()
    }

    /// Checks a policy against this host: [`EgressPolicy::validate`] plus
    /// allow entries that can never take effect (inside the sandbox network
    /// or loopback).
    pub fn validate_policy(&self, policy: &EgressPolicy) -> Result<()> {
        policy.validate()?;
        let subnet = self.inner.config.host_subnet;
        let loopback = crate::Ipv4Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8)
            .unwrap_or_else(|_| unreachable!("valid"));
        for c in &policy.allow_out {
            if c.is_within(&subnet) {
                return Err(NetError::invalid(
                    "allow_out",
                    format!(
                        "{c} is inside the sandbox network {subnet}, which sandboxes can never reach"
                    ),
                ));
            }
            if c.is_within(&loopback) {
                return Err(NetError::invalid(
                    "allow_out",
                    format!("{c} is loopback, which never leaves the guest"),
                ));
            }
        }
        Ok(())
    }

    /// Claims a ready slot for `owner` with `policy` in force. Only BPF map
    /// writes when the pool has a slot (the pool refills in the
    /// background); builds one on the spot (tens of ms) when it is empty.
    pub fn claim(&self, owner: &str, policy: &EgressPolicy) -> Result<Slot> {
        let t0 = Instant::now();
        self.validate_policy(policy)?;
        let inner = &self.inner;
        let popped = {
            let mut st = lock(&inner.state)?;
            if st.shut_down {
                return Err(NetError::ShutDown);
            }
            st.ready.pop_front()
        };
        inner.wake.notify_all();
        let idx = match popped {
            Some(idx) => idx,
            None => {
                warn!(
                    owner,
                    "netd: no ready slot; building one on the claim path (raise pool_size)"
                );
                inner.build_or_wait()?
            }
        };
        let applied = {
            let mut st = lock(&inner.state)?;
            let applied = lock(&inner.maps)?.apply_policy(idx, policy, &Applied::default());
            match applied {
                Ok(applied) => {
                    if let Some(s) = st.slots.get_mut(&idx) {
                        s.lease = Some(Lease {
                            owner: owner.to_string(),
                            policy: policy.clone(),
                            applied: applied.clone(),
                        });
                    }
                    Ok(applied)
                }
                Err(e) => {
                    let _ = lock(&inner.maps)?.reset_slot(idx, &Applied::default());
                    st.ready.push_back(idx);
                    Err(e)
                }
            }
        };
        applied?;
        debug!(
            owner,
            slot = idx,
            elapsed_us = t0.elapsed().as_secs_f64() * 1e6,
            "netd: slot claimed"
        );
        Ok(self.lease_of(idx, owner))
    }

    /// Replaces the policy of a claimed slot, live: the programs stay
    /// attached, the switch to the new lists is atomic.
    pub fn update_policy(&self, id: SlotId, policy: &EgressPolicy) -> Result<()> {
        self.validate_policy(policy)?;
        let mut st = lock(&self.inner.state)?;
        let lease = st
            .slots
            .get_mut(&id.0)
            .and_then(|s| s.lease.as_mut())
            .ok_or(NetError::UnknownSlot(id.0))?;
        let applied = lock(&self.inner.maps)?.apply_policy(id.0, policy, &lease.applied)?;
        lease.applied = applied;
        lease.policy = policy.clone();
        debug!(slot = id.0, ?policy, "netd: policy updated");
        Ok(())
    }

    /// The policy in force on a claimed slot.
    pub fn policy(&self, id: SlotId) -> Result<EgressPolicy> {
        let st = lock(&self.inner.state)?;
        st.slots
            .get(&id.0)
            .and_then(|s| s.lease.as_ref())
            .map(|l| l.policy.clone())
            .ok_or(NetError::UnknownSlot(id.0))
    }

    /// The traffic counters of a claimed slot (since its claim).
    pub fn counters(&self, id: SlotId) -> Result<Counters> {
        {
            let st = lock(&self.inner.state)?;
            if st.slots.get(&id.0).is_none_or(|s| s.lease.is_none()) {
                return Err(NetError::UnknownSlot(id.0));
            }
        }
        let stats = lock(&self.inner.maps)?.read_stats(id.0)?;
        Ok(Counters::from_stats(&stats))
    }

    /// Returns a slot to the pool, clean: policy and counters reset, all its
    /// connections forgotten (conntrack in the slot and on the host). Call
    /// after the VMM has exited; a slot whose TAP is still held open is
    /// destroyed instead of reused (and the pool rebuilds one).
    pub fn release(&self, id: SlotId) -> Result<()> {
        let t0 = Instant::now();
        let inner = &self.inner;
        let idx = id.0;
        let (applied, tainted) = {
            let mut st = lock(&inner.state)?;
            let s = st.slots.get_mut(&idx).ok_or(NetError::UnknownSlot(idx))?;
            let lease = s.lease.take().ok_or(NetError::UnknownSlot(idx))?;
            (lease.applied, s.tainted)
        };
        let reset = (|| -> Result<bool> {
            lock(&inner.maps)?.reset_slot(idx, &applied)?;
            if tainted {
                return Ok(false);
            }
            if tap::tap_attached(&inner.layout.netns_path(idx), TAP_NAME)? {
                warn!(
                    slot = idx,
                    "netd: TAP still attached at release (VMM running?); destroying the slot"
                );
                return Ok(false);
            }
            slot::flush_conntrack(&inner.layout, idx)?;
            Ok(true)
        })();
        let reuse = match reset {
            Ok(r) => r,
            Err(e) => {
                warn!(slot = idx, error = %e, "netd: resetting a released slot failed; destroying it");
                false
            }
        };
        let mut st = lock(&inner.state)?;
        // A clean released slot is claimed next (it is warm, and its reset
        // is what a claim relies on); a pool over its size sheds the slot at
        // the back of the queue instead.
        let surplus = if reuse && !st.shut_down {
            st.ready.push_front(idx);
            if st.ready.len() > inner.config.pool_size {
                st.ready.pop_back()
            } else {
                None
            }
        } else {
            Some(idx)
        };
        let removed = surplus.and_then(|i| st.slots.remove(&i).map(|s| (i, s)));
        drop(st);
        let result = match removed {
            Some((i, s)) => slot::destroy(&inner.layout, &inner.maps, i, s.built),
            None => Ok(()),
        };
        inner.wake.notify_all();
        debug!(
            slot = idx,
            reused = reuse,
            elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
            "netd: slot released"
        );
        result
    }

    /// Every claimed slot.
    pub fn claimed(&self) -> Vec<Slot> {
        let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.slots
            .iter()
            .filter_map(|(idx, s)| s.lease.as_ref().map(|l| self.lease_of(*idx, &l.owner)))
            .collect()
    }

    /// Pool levels.
    pub fn pool_status(&self) -> SlotPool {
        let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        SlotPool {
            ready: st.ready.len(),
            claimed: st.slots.values().filter(|s| s.lease.is_some()).count(),
            building: st.building.len(),
            pool_size: self.inner.config.pool_size,
            capacity: self.inner.layout.capacity as usize,
            refill_error: st.refill_error.clone(),
        }
    }

    /// Blocks until the pool holds `pool_size` ready slots or `timeout`
    /// passes; returns whether it is full.
    pub fn wait_pool_full(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.ready.len() >= self.inner.config.pool_size {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || st.shut_down {
                return false;
            }
            st = self
                .inner
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Packets dropped by the programs, per reason (all slots of this
    /// instance), for diagnostics: `(reason, count)`.
    pub fn drop_counts(&self) -> Result<Vec<(&'static str, u64)>> {
        let counts = lock(&self.inner.maps)?.drop_counts()?;
        Ok(DROP_REASON_NAMES.iter().copied().zip(counts).collect())
    }

    /// Connects to `port` of the sandbox in `lease` from the health-check
    /// address, so the connection does not count as activity. The port must
    /// be exposed.
    pub fn health_check_connect(
        &self,
        lease: &Slot,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream> {
        crate::sys::connect_from(
            SocketAddrV4::new(self.health_check_addr(), 0),
            SocketAddrV4::new(lease.sandbox_addr, port),
            timeout,
        )
        .map_err(|e| NetError::io(format!("health check to {}:{port}", lease.sandbox_addr), e))
    }

    /// Stops the refill thread and removes everything this instance created:
    /// slots (namespaces, devices, programs), the nftables table, the
    /// service link, its bpffs mount; puts changed sysctls back. Idempotent;
    /// also run (errors logged) when the `Netd` is dropped. A crashed
    /// instance's leftovers are removed by the next start instead.
    pub fn shutdown(&self) -> Result<()> {
        let inner = &self.inner;
        {
            let mut st = lock(&inner.state)?;
            if st.torn_down {
                return Ok(());
            }
            st.shut_down = true;
        }
        inner.wake.notify_all();
        if let Some(h) = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        let slots = {
            let mut st = lock(&inner.state)?;
            st.ready.clear();
            std::mem::take(&mut st.slots)
        };
        let t0 = Instant::now();
        let mut first_err = None;
        let n = slots.len();
        for (idx, s) in slots {
            if let Err(e) = slot::destroy(&inner.layout, &inner.maps, idx, s.built) {
                warn!(slot = idx, error = %e, "netd: destroying a slot at shutdown");
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = reconcile::teardown(&inner.config, &inner.layout, "remaining") {
            first_err.get_or_insert(e);
        }
        lock(&inner.state)?.torn_down = true;
        info!(
            slots = n,
            elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
            "netd: shut down"
        );
        first_err.map_or(Ok(()), Err)
    }

    /// Benchmarks only: detaches the eBPF programs from a claimed slot so
    /// the same path can be measured without them. The slot is destroyed on
    /// release, never reused.
    #[doc(hidden)]
    pub fn detach_programs_for_benchmark(&self, id: SlotId) -> Result<()> {
        let mut st = lock(&self.inner.state)?;
        let s = st.slots.get_mut(&id.0).ok_or(NetError::UnknownSlot(id.0))?;
        s.tainted = true;
        if let Some(links) = s.built.links.take() {
            lock(&self.inner.programs)?.detach_slot(links)?;
        }
        Ok(())
    }

    fn lease_of(&self, idx: SlotIndex, owner: &str) -> Slot {
        let l = &self.inner.layout;
        Slot {
            id: SlotId(idx),
            owner: owner.to_string(),
            netns_name: l.netns_name(idx),
            netns_path: l.netns_path(idx),
            tap: TAP_NAME.to_string(),
            host_veth: l.host_veth(idx),
            sandbox_addr: l.sandbox_addr(idx),
            host_addr: l.host_addr(idx),
            guest: GuestNetwork::contract(),
        }
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!(error = %e, "netd: shutdown on drop");
        }
    }
}

impl Inner {
    /// A slot for a claim that found the pool empty: builds one, or, when
    /// every free index is already being built (by the refill), waits for
    /// one of those instead of failing.
    fn build_or_wait(&self) -> Result<SlotIndex> {
        let n = match self.build_one(false) {
            Err(NetError::Exhausted(n)) => n,
            other => return other,
        };
        let mut st = lock(&self.state)?;
        loop {
            if st.shut_down {
                return Err(NetError::ShutDown);
            }
            if let Some(idx) = st.ready.pop_front() {
                drop(st);
                self.wake.notify_all();
                return Ok(idx);
            }
            if st.building.is_empty() {
                return Err(NetError::Exhausted(n));
            }
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Builds one slot at the lowest free index; `into_ready` queues it for
    /// claims in the same critical section that ends its build (so a claim
    /// waiting in `build_or_wait` never sees it neither building nor ready).
    fn build_one(&self, into_ready: bool) -> Result<SlotIndex> {
        let idx = {
            let mut st = lock(&self.state)?;
            if st.shut_down {
                return Err(NetError::ShutDown);
            }
            let idx = (1..=self.layout.capacity)
                .find(|i| !st.slots.contains_key(i) && !st.building.contains(i))
                .ok_or(NetError::Exhausted(self.layout.capacity as usize))?;
            st.building.insert(idx);
            idx
        };
        let built = slot::build(&self.config, &self.layout, &self.programs, &self.maps, idx);
        let mut st = lock(&self.state)?;
        st.building.remove(&idx);
        // Claims waiting in build_or_wait look again.
        self.wake.notify_all();
        let built = built?;
        st.slots.insert(
            idx,
            SlotState {
                built,
                lease: None,
                tainted: false,
            },
        );
        if into_ready {
            st.ready.push_back(idx);
        }
        Ok(idx)
    }
}

/// Keeps `pool_size` slots ready.
fn refill_loop(inner: Arc<Inner>) {
    loop {
        {
            let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if st.shut_down {
                    return;
                }
                let used = st.slots.len() + st.building.len();
                if st.ready.len() + st.building.len() < inner.config.pool_size
                    && used < inner.layout.capacity as usize
                {
                    break;
                }
                st = inner.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        match inner.build_one(true) {
            Ok(_) => {
                let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                st.refill_error = None;
                drop(st);
                inner.wake.notify_all();
            }
            Err(NetError::ShutDown) => return,
            Err(e) => {
                warn!(error = %e, "netd: building a pool slot failed; retrying in 1 s");
                let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                st.refill_error = Some(e.to_string());
                if !st.shut_down {
                    let _ = inner.wake.wait_timeout(st, Duration::from_secs(1));
                }
            }
        }
    }
}
