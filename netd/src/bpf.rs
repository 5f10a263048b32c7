//! The eBPF side: loading `bpf/slot.bpf.c` (compiled by build.rs) once per
//! netd instance, attaching it to each slot's devices, and the maps through
//! which policy changes live and counters are read.
//!
//! The `#[repr(C)]` structs here mirror the C structs in `slot.bpf.c`.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
    },
    util::KernelVersion,
};
use tracing::{debug, info};

use crate::{
    EgressPolicy, Ipv4Cidr,
    contract::TAP_NAME,
    error::{NetError, Result},
    sys,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/slot.bpf.o"));

const CFG_ACTIVE: u32 = 1;
const CFG_INTERNET: u32 = 2;
const CFG_GEN: u32 = 4;
const POLICY_ALLOW: u8 = 1;
const POLICY_DENY: u8 = 2;
const IPPROTO_TCP: u8 = 6;

/// Number of drop reasons (`enum drop_reason`).
pub(crate) const DROP_REASONS: usize = 16;

/// Names of the drop reasons, indexed like `enum drop_reason`.
pub const DROP_REASON_NAMES: [&str; DROP_REASONS] = [
    "malformed",
    "spoofed_mac",
    "spoofed_ip",
    "spoofed_arp",
    "protocol",
    "gateway",
    "unknown_slot",
    "inactive_slot",
    "other_sandbox",
    "host",
    "no_route",
    "not_egress_interface",
    "deny_list",
    "private_range",
    "no_internet",
    "not_exposed",
];

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SlotCfg {
    flags: u32,
    sandbox_addr: u32,
    host_addr: u32,
    pad: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl Pod for SlotCfg {}

/// Per-slot counters as the programs keep them (one copy per CPU).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlotStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_dropped: u64,
    pub last_activity_ns: u64,
    pub pad: u64,
}
// SAFETY: plain integers, no padding.
unsafe impl Pod for SlotStats {}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PortKey {
    slot: u32,
    port: u16,
    proto: u8,
    pad: u8,
}
// SAFETY: integers, explicitly padded.
unsafe impl Pod for PortKey {}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ServiceKey {
    port: u16,
    proto: u8,
    pad: u8,
}
// SAFETY: integers, explicitly padded.
unsafe impl Pod for ServiceKey {}

/// An address as the programs see it: network byte order in memory.
fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// What the loader bakes into the programs.
pub(crate) struct LoadParams {
    pub guest_ip: Ipv4Addr,
    pub gateway_ip: Ipv4Addr,
    pub guest_mac: [u8; 6],
    pub gateway_dns: bool,
    pub subnet: Ipv4Cidr,
    pub service_ip: Ipv4Addr,
    pub health_ip: Ipv4Addr,
    pub egress_ifindex: u32,
    /// Highest slot index + 1.
    pub slots: u32,
    pub services: Vec<(u8, u16)>,
    pub blocked: Vec<Ipv4Cidr>,
}

/// The loaded programs (attach them to slots).
pub(crate) struct Programs {
    ebpf: Ebpf,
    tcx: bool,
    pin_dir: PathBuf,
}

/// The maps the agent reads and writes.
pub(crate) struct Maps {
    slot_by_ifindex: BpfHashMap<MapData, u32, u32>,
    cfg: Array<MapData, SlotCfg>,
    stats: PerCpuArray<MapData, SlotStats>,
    policy: LpmTrie<MapData, [u8; 8], u8>,
    exposed: BpfHashMap<MapData, PortKey, u8>,
    drops: PerCpuArray<MapData, u64>,
    ncpus: usize,
}

const PROGRAMS: [&str; 3] = ["guest_ingress", "slot_egress", "slot_ingress"];

fn map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or_else(|| NetError::Bpf {
        context: format!("map {name}"),
        detail: "missing from the object (netd/bpf/slot.bpf.c)".into(),
    })?;
    T::try_from(m).map_err(|e| NetError::bpf(format!("map {name}"), &e))
}

/// Loads and verifies the programs and fills the static maps.
pub(crate) fn load(p: &LoadParams, pin_dir: &Path) -> Result<(Programs, Maps)> {
    let start = Instant::now();
    let _span = tracing::info_span!("netd_load_programs").entered();
    let subnet_addr = be(p.subnet.addr());
    let subnet_mask = be(p.subnet.netmask());
    let guest_ip = be(p.guest_ip);
    let gateway_ip = be(p.gateway_ip);
    let service_ip = be(p.service_ip);
    let health_ip = be(p.health_ip);
    let dns_port: u16 = if p.gateway_dns { 53 } else { 0 };
    let slots = p.slots.max(1);
    let policy_entries = slots
        .saturating_mul(2 * crate::policy::MAX_RULES as u32)
        .min(1 << 20);
    let exposed_entries = slots
        .saturating_mul(crate::policy::MAX_EXPOSED_PORTS as u32)
        .min(1 << 20);

    let mut ebpf = EbpfLoader::new()
        .override_global("GUEST_IP", &guest_ip, true)
        .override_global("GATEWAY_IP", &gateway_ip, true)
        .override_global("GUEST_MAC", &p.guest_mac, true)
        .override_global("GATEWAY_DNS_PORT", &dns_port, true)
        .override_global("SUBNET_ADDR", &subnet_addr, true)
        .override_global("SUBNET_MASK", &subnet_mask, true)
        .override_global("SERVICE_IP", &service_ip, true)
        .override_global("HEALTH_IP", &health_ip, true)
        .override_global("EGRESS_IFINDEX", &p.egress_ifindex, true)
        .map_max_entries("slot_by_ifindex", slots)
        .map_max_entries("slot_cfg", slots)
        .map_max_entries("slot_stats", slots)
        .map_max_entries("policy", policy_entries)
        .map_max_entries("exposed", exposed_entries)
        .load(OBJECT)
        .map_err(|e| unsupported_or_bpf("loading netd/bpf/slot.bpf.c", &e))?;
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| NetError::Bpf {
                context: format!("program {name}"),
                detail: "missing from the object".into(),
            })?
            .try_into()
            .map_err(|e| NetError::bpf(format!("program {name}"), &e))?;
        prog.load()
            .map_err(|e| unsupported_or_bpf(&format!("verifying program {name}"), &e))?;
    }

    let mut services: BpfHashMap<MapData, ServiceKey, u8> = map(&mut ebpf, "services")?;
    for &(proto, port) in &p.services {
        services
            .insert(
                ServiceKey {
                    port,
                    proto,
                    pad: 0,
                },
                1,
                0,
            )
            .map_err(|e| NetError::bpf("filling the services map", &e))?;
    }
    let mut blocked: LpmTrie<MapData, [u8; 4], u8> = map(&mut ebpf, "blocked")?;
    for c in &p.blocked {
        blocked
            .insert(
                &Key::new(u32::from(c.prefix_len()), c.addr().octets()),
                1,
                0,
            )
            .map_err(|e| NetError::bpf("filling the blocked-ranges map", &e))?;
    }
    let ncpus = aya::util::nr_cpus()
        .map_err(|(what, e)| NetError::io(format!("counting CPUs ({what})"), e))?;
    let maps = Maps {
        slot_by_ifindex: map(&mut ebpf, "slot_by_ifindex")?,
        cfg: map(&mut ebpf, "slot_cfg")?,
        stats: map(&mut ebpf, "slot_stats")?,
        policy: map(&mut ebpf, "policy")?,
        exposed: map(&mut ebpf, "exposed")?,
        drops: map(&mut ebpf, "drops")?,
        ncpus,
    };
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    info!(
        elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
        tcx, "netd: eBPF programs loaded and verified"
    );
    Ok((
        Programs {
            ebpf,
            tcx,
            pin_dir: pin_dir.to_path_buf(),
        },
        maps,
    ))
}

/// A load failure for lack of permission or kernel support is the host's
/// problem (FailedPrecondition), anything else a bug.
fn unsupported_or_bpf(context: &str, err: &dyn std::error::Error) -> NetError {
    let detail = crate::error::chain(err);
    let lower = detail.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        NetError::Unsupported(format!(
            "{context}: {detail}; loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN \
             (or CAP_SYS_ADMIN): run the agent as root"
        ))
    } else if lower.contains("invalid argument")
        || lower.contains("not supported")
        || lower.contains("function not implemented")
        || lower.contains("unknown func")
    {
        NetError::Unsupported(format!(
            "{context}: {detail}; the kernel lacks an eBPF feature netd needs \
             (Linux 5.10 or newer with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, CONFIG_NET_SCH_INGRESS)"
        ))
    } else {
        NetError::bpf(context, err)
    }
}

/// One attachment: pinned (TCX, survives the agent) or a netlink tc filter
/// (older kernels; survives the agent by itself).
#[derive(Debug)]
enum Attached {
    Pinned(PinnedLink),
    Netlink(SchedClassifierLink),
}

/// The three attachments of a slot.
#[derive(Debug, Default)]
pub(crate) struct SlotLinks(Vec<Attached>);

impl SlotLinks {
    /// Detaches: removes the pins (the kernel drops a TCX link when its last
    /// reference goes) or the tc filters.
    pub fn detach(self) -> Result<()> {
        let mut first_err = None;
        for a in self.0 {
            match a {
                Attached::Pinned(p) => {
                    if let Err(e) = p.unpin()
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        first_err.get_or_insert(NetError::io("unpinning a slot's eBPF link", e));
                    }
                }
                Attached::Netlink(l) => drop(l),
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Programs {
    /// Attaches the programs to slot `idx`: `guest_ingress` on the TAP inside
    /// `netns`, `slot_egress`/`slot_ingress` on `host_veth`. TCX links are
    /// pinned so that the policy stays enforced if the agent dies.
    pub fn attach_slot(&mut self, idx: u32, netns: &Path, host_veth: &str) -> Result<SlotLinks> {
        let mut links = SlotLinks::default();
        let tcx = self.tcx;
        let result = (|| {
            let tap = {
                let prog = program(&mut self.ebpf, "guest_ingress")?;
                sys::in_netns(netns, || {
                    attach_one(prog, TAP_NAME, TcAttachType::Ingress, tcx)
                })?
            };
            links.0.push(self.keep(tap, idx, "tap")?);
            let out = attach_one(
                program(&mut self.ebpf, "slot_egress")?,
                host_veth,
                TcAttachType::Ingress,
                tcx,
            )?;
            links.0.push(self.keep(out, idx, "out")?);
            let inn = attach_one(
                program(&mut self.ebpf, "slot_ingress")?,
                host_veth,
                TcAttachType::Egress,
                tcx,
            )?;
            links.0.push(self.keep(inn, idx, "in")?);
            Ok(())
        })();
        match result {
            Ok(()) => Ok(links),
            Err(e) => {
                let _ = links.detach();
                Err(e)
            }
        }
    }

    fn keep(&self, link: SchedClassifierLink, idx: u32, which: &str) -> Result<Attached> {
        if !self.tcx {
            return Ok(Attached::Netlink(link));
        }
        let path = self.pin_dir.join(format!("s{idx}-{which}"));
        match std::fs::remove_file(&path) {
            Ok(()) => debug!(path = %path.display(), "removed a stale pin"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NetError::io(format!("removing {}", path.display()), e)),
        }
        let fd: FdLink = link
            .try_into()
            .map_err(|e| NetError::bpf("converting a TCX link", &e))?;
        let pinned = fd
            .pin(&path)
            .map_err(|e| NetError::bpf(format!("pinning {}", path.display()), &e))?;
        Ok(Attached::Pinned(pinned))
    }

    /// Detaches the programs from one slot without destroying it (used by
    /// benchmarks to measure the path without them).
    pub fn detach_slot(&mut self, links: SlotLinks) -> Result<()> {
        links.detach()
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| NetError::Bpf {
            context: format!("program {name}"),
            detail: "missing".into(),
        })?
        .try_into()
        .map_err(|e| NetError::bpf(format!("program {name}"), &e))
}

/// Attaches in the calling thread's network namespace.
fn attach_one(
    prog: &mut SchedClassifier,
    ifname: &str,
    kind: TcAttachType,
    tcx: bool,
) -> Result<SchedClassifierLink> {
    if !tcx {
        // Legacy tc needs the clsact qdisc; it may exist already.
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            let msg = crate::error::chain(&e);
            if !msg.contains("exists") {
                return Err(NetError::bpf(format!("adding clsact to {ifname}"), &e));
            }
        }
    }
    let id = prog
        .attach(ifname, kind)
        .map_err(|e| unsupported_or_bpf(&format!("attaching to {ifname} ({kind:?})"), &e))?;
    prog.take_link(id)
        .map_err(|e| NetError::bpf(format!("taking the link on {ifname}"), &e))
}

/// The policy as written to the maps, so the next update can remove it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Applied {
    gen_bit: bool,
    rules: Vec<Ipv4Cidr>,
    ports: BTreeSet<u16>,
}

fn policy_key(idx: u32, gen_bit: bool, cidr: &Ipv4Cidr) -> Key<[u8; 8]> {
    let sg = (idx << 1) | u32::from(gen_bit);
    let mut data = [0u8; 8];
    data[..4].copy_from_slice(&sg.to_be_bytes());
    data[4..].copy_from_slice(&cidr.addr().octets());
    Key::new(32 + u32::from(cidr.prefix_len()), data)
}

impl Maps {
    /// A new slot: known by its host veth, inactive (everything drops).
    pub fn register_slot(
        &mut self,
        idx: u32,
        ifindex: u32,
        sandbox_addr: Ipv4Addr,
        host_addr: Ipv4Addr,
    ) -> Result<()> {
        self.cfg
            .set(
                idx,
                SlotCfg {
                    flags: 0,
                    sandbox_addr: be(sandbox_addr),
                    host_addr: be(host_addr),
                    pad: 0,
                },
                0,
            )
            .map_err(|e| NetError::bpf(format!("slot {idx}: writing slot_cfg"), &e))?;
        self.zero_stats(idx)?;
        self.slot_by_ifindex
            .insert(ifindex, idx, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: writing slot_by_ifindex"), &e))
    }

    /// Forgets a slot (its devices are gone or going).
    pub fn unregister_slot(&mut self, idx: u32, ifindex: u32) -> Result<()> {
        match self.slot_by_ifindex.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(NetError::bpf(
                    format!("slot {idx}: removing slot_by_ifindex"),
                    &e,
                ));
            }
        }
        self.cfg
            .set(idx, SlotCfg::default(), 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: clearing slot_cfg"), &e))
    }

    /// Makes `policy` the live policy of slot `idx`, atomically: the new
    /// lists go in under the other generation, one write to `slot_cfg`
    /// switches to them, then the old ones are removed. Programs stay
    /// attached throughout.
    pub fn apply_policy(
        &mut self,
        idx: u32,
        policy: &EgressPolicy,
        prev: &Applied,
    ) -> Result<Applied> {
        let gen_bit = !prev.gen_bit;
        let (allow, deny) = policy.rules();
        let mut rules = Vec::with_capacity(allow.len() + deny.len());
        let mut write = |maps: &mut Maps, cidr: &Ipv4Cidr, action: u8| -> Result<()> {
            maps.policy
                .insert(&policy_key(idx, gen_bit, cidr), action, 0)
                .map_err(|e| NetError::bpf(format!("slot {idx}: writing policy {cidr}"), &e))?;
            rules.push(*cidr);
            Ok(())
        };
        let written: Result<()> = (|| {
            for c in &allow {
                write(self, c, POLICY_ALLOW)?;
            }
            for c in &deny {
                write(self, c, POLICY_DENY)?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            for c in &rules {
                let _ = self.policy.remove(&policy_key(idx, gen_bit, c));
            }
            return Err(e);
        }

        // Exposed ports: add the new ones before removing the old ones.
        let ports = policy.ports();
        for &port in ports.difference(&prev.ports) {
            self.exposed
                .insert(port_key(idx, port), 1, 0)
                .map_err(|e| NetError::bpf(format!("slot {idx}: exposing port {port}"), &e))?;
        }

        let mut cfg = self
            .cfg
            .get(&idx, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: reading slot_cfg"), &e))?;
        cfg.flags = CFG_ACTIVE
            | if policy.internet { CFG_INTERNET } else { 0 }
            | if gen_bit { CFG_GEN } else { 0 };
        self.cfg
            .set(idx, cfg, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: writing slot_cfg"), &e))?;

        for &port in prev.ports.difference(&ports) {
            self.remove_port(idx, port)?;
        }
        for c in &prev.rules {
            self.remove_rule(idx, prev.gen_bit, c)?;
        }
        Ok(Applied {
            gen_bit,
            rules,
            ports,
        })
    }

    /// Back to the unclaimed state: inactive, no lists, no ports, zero
    /// counters.
    pub fn reset_slot(&mut self, idx: u32, prev: &Applied) -> Result<()> {
        let mut cfg = self
            .cfg
            .get(&idx, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: reading slot_cfg"), &e))?;
        cfg.flags = 0;
        self.cfg
            .set(idx, cfg, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: writing slot_cfg"), &e))?;
        for c in &prev.rules {
            self.remove_rule(idx, prev.gen_bit, c)?;
        }
        for &port in &prev.ports {
            self.remove_port(idx, port)?;
        }
        self.zero_stats(idx)
    }

    fn remove_rule(&mut self, idx: u32, gen_bit: bool, c: &Ipv4Cidr) -> Result<()> {
        match self.policy.remove(&policy_key(idx, gen_bit, c)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(NetError::bpf(
                format!("slot {idx}: removing policy {c}"),
                &e,
            )),
        }
    }

    fn remove_port(&mut self, idx: u32, port: u16) -> Result<()> {
        match self.exposed.remove(&port_key(idx, port)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(NetError::bpf(
                format!("slot {idx}: unexposing port {port}"),
                &e,
            )),
        }
    }

    fn zero_stats(&mut self, idx: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![SlotStats::default(); self.ncpus])
            .map_err(|e| NetError::io("building per-CPU values", e))?;
        self.stats
            .set(idx, zeros, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: zeroing counters"), &e))
    }

    /// The slot's counters, summed over CPUs (latest activity: the max).
    pub fn read_stats(&self, idx: u32) -> Result<SlotStats> {
        let per_cpu = self
            .stats
            .get(&idx, 0)
            .map_err(|e| NetError::bpf(format!("slot {idx}: reading counters"), &e))?;
        let mut s = SlotStats::default();
        for c in per_cpu.iter() {
            s.tx_packets += c.tx_packets;
            s.tx_bytes += c.tx_bytes;
            s.rx_packets += c.rx_packets;
            s.rx_bytes += c.rx_bytes;
            s.tx_dropped += c.tx_dropped;
            s.rx_dropped += c.rx_dropped;
            s.last_activity_ns = s.last_activity_ns.max(c.last_activity_ns);
        }
        Ok(s)
    }

    /// Packets dropped per reason (all slots of this instance).
    pub fn drop_counts(&self) -> Result<[u64; DROP_REASONS]> {
        let mut out = [0u64; DROP_REASONS];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .drops
                .get(&(i as u32), 0)
                .map_err(|e| NetError::bpf("reading drop counters", &e))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }
}

fn port_key(idx: u32, port: u16) -> PortKey {
    PortKey {
        slot: idx,
        port,
        proto: IPPROTO_TCP,
        pad: 0,
    }
}
