//! Building, resetting and destroying one network slot.
//!
//! A slot `N` is:
//! - network namespace `<prefix>-sN`, holding
//!   - TAP `somna-tap`: the gateway `172.16.0.1/30`, MAC
//!     `02:73:6d:00:00:01`, a permanent neighbour entry for the guest;
//!     eBPF `guest_ingress` on its ingress;
//!   - veth end `somna-veth`: the slot's unique address `.2` of its /30,
//!     default route to the host end;
//!   - an nftables table doing the 1:1 NAT guest <-> slot address;
//! - host veth `<prefix>-hN`: `.1` of the /30, forwarding on, IPv6 off;
//!   eBPF `slot_egress` (ingress) and `slot_ingress` (egress).

use std::{net::Ipv4Addr, time::Instant};

use tracing::{debug, info};

use crate::{
    NetdConfig,
    bpf::{Maps, Programs, SlotLinks},
    contract::{
        GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC, GUEST_MTU, SLOT_VETH_NAME, TAP_NAME,
        mac_string,
    },
    error::{NetError, Result},
    layout::{Layout, SlotIndex},
    nft, sys,
};

/// A built slot's host-side handles.
#[derive(Debug)]
pub(crate) struct BuiltSlot {
    pub host_ifindex: u32,
    pub links: Option<SlotLinks>,
}

/// Builds slot `idx` from nothing. On failure, whatever was created is
/// removed again.
pub(crate) fn build(
    cfg: &NetdConfig,
    layout: &Layout,
    programs: &std::sync::Mutex<Programs>,
    maps: &std::sync::Mutex<Maps>,
    idx: SlotIndex,
) -> Result<BuiltSlot> {
    let start = Instant::now();
    let span = tracing::debug_span!("netd_build_slot", slot = idx);
    let _enter = span.enter();
    match build_inner(cfg, layout, programs, maps, idx) {
        Ok(b) => {
            debug!(
                slot = idx,
                elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
                "netd: slot built"
            );
            Ok(b)
        }
        Err(e) => {
            let _ = remove_devices(layout, idx);
            Err(e)
        }
    }
}

fn build_inner(
    cfg: &NetdConfig,
    layout: &Layout,
    programs: &std::sync::Mutex<Programs>,
    maps: &std::sync::Mutex<Maps>,
    idx: SlotIndex,
) -> Result<BuiltSlot> {
    let ns = layout.netns_name(idx);
    let ns_path = layout.netns_path(idx);
    let hv = layout.host_veth(idx);
    let h = layout.host_addr(idx);
    let v = layout.sandbox_addr(idx);

    // Host side: namespace and veth pair, then sysctls before the link is
    // up (no IPv6 link-local, no router solicitations).
    sys::run(
        "ip",
        &["-batch", "-"],
        Some(&format!(
            "netns add {ns}\n\
             link add {hv} mtu {GUEST_MTU} type veth peer name {SLOT_VETH_NAME} mtu {GUEST_MTU} netns {ns}\n"
        )),
    )?;
    sys::sysctl_write(&format!("net.ipv6.conf.{hv}.disable_ipv6"), "1")?;
    sys::sysctl_write(&format!("net.ipv4.conf.{hv}.forwarding"), "1")?;
    sys::run(
        "ip",
        &["-batch", "-"],
        Some(&format!("addr add {h}/30 dev {hv}\nlink set {hv} up\n")),
    )?;
    let host_ifindex = sys::ifindex(&hv)?;

    // Slot side, from a thread inside the namespace (children inherit it).
    let slot_rules = nft::slot_ruleset(cfg, layout, idx);
    sys::in_netns(&ns_path, || {
        sys::sysctl_write("net.ipv6.conf.all.disable_ipv6", "1")?;
        sys::sysctl_write("net.ipv6.conf.default.disable_ipv6", "1")?;
        sys::sysctl_write("net.ipv4.ip_forward", "1")?;
        sys::run(
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "link set lo up\n\
                 tuntap add dev {TAP_NAME} mode tap\n\
                 link set {TAP_NAME} address {gw_mac} mtu {GUEST_MTU}\n\
                 addr add {GATEWAY_IP}/30 dev {TAP_NAME}\n\
                 link set {TAP_NAME} up\n\
                 neigh replace {GUEST_IP} lladdr {guest_mac} dev {TAP_NAME} nud permanent\n\
                 addr add {v}/30 dev {SLOT_VETH_NAME}\n\
                 link set {SLOT_VETH_NAME} up\n\
                 route add default via {h} dev {SLOT_VETH_NAME}\n",
                gw_mac = mac_string(&GATEWAY_MAC),
                guest_mac = mac_string(&GUEST_MAC),
            )),
        )?;
        nft::load(&slot_rules)?;
        // Out of the slot: the uplink's egress; into the guest: the TAP's.
        shape(SLOT_VETH_NAME, cfg.egress_rate_mbit)?;
        shape(TAP_NAME, cfg.ingress_rate_mbit)
    })?;

    // Programs last: the maps know the slot (inactive, so everything
    // drops) before any program can see its traffic.
    lock(maps)?.register_slot(idx, host_ifindex, v, h)?;
    let links = lock(programs)?.attach_slot(idx, &ns_path, &hv);
    let links = match links {
        Ok(l) => l,
        Err(e) => {
            let _ = lock(maps)?.unregister_slot(idx, host_ifindex);
            return Err(e);
        }
    };
    Ok(BuiltSlot {
        host_ifindex,
        links: Some(links),
    })
}

/// A token bucket on the egress of `dev` in the slot namespace: the
/// uplink (what the guest sends) or the TAP (what reaches the guest)
/// passes at no more than `rate_mbit`. Bursts of 10 ms at that rate (at
/// least 64 KiB) pass unqueued; up to 50 ms more is queued; the rest is
/// dropped (`tc -s qdisc` in the slot namespace counts it).
fn shape(dev: &str, rate_mbit: u32) -> Result<()> {
    if rate_mbit == 0 {
        return Ok(());
    }
    let burst_bytes = (u64::from(rate_mbit) * 1_000_000 / 8 / 100).max(64 * 1024);
    sys::run(
        "tc",
        &[
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            &burst_bytes.to_string(),
            "latency",
            "50ms",
        ],
        None,
    )
    .map(|_| ())
}

/// Removes slot `idx` for good: programs, maps, devices, namespace,
/// conntrack entries.
pub(crate) fn destroy(
    layout: &Layout,
    maps: &std::sync::Mutex<Maps>,
    idx: SlotIndex,
    built: BuiltSlot,
) -> Result<()> {
    let start = Instant::now();
    let mut first_err: Option<NetError> = None;
    if let Some(links) = built.links
        && let Err(e) = links.detach()
    {
        first_err.get_or_insert(e);
    }
    if let Err(e) = lock(maps).and_then(|mut m| m.unregister_slot(idx, built.host_ifindex)) {
        first_err.get_or_insert(e);
    }
    if let Err(e) = remove_devices(layout, idx) {
        first_err.get_or_insert(e);
    }
    if let Err(e) = flush_host_conntrack(layout.sandbox_addr(idx)) {
        first_err.get_or_insert(e);
    }
    debug!(
        slot = idx,
        elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
        "netd: slot destroyed"
    );
    first_err.map_or(Ok(()), Err)
}

/// Deletes the host veth (both ends go at once, synchronously) and the
/// namespace (its TAP goes with it). Missing pieces are fine.
pub(crate) fn remove_devices(layout: &Layout, idx: SlotIndex) -> Result<()> {
    let hv = layout.host_veth(idx);
    if sys::host_links()?.contains(&hv) {
        delete_link(&hv)?;
    }
    let ns = layout.netns_name(idx);
    if sys::named_netns()?.contains(&ns) {
        sys::run("ip", &["netns", "del", &ns], None)?;
    }
    Ok(())
}

pub(crate) fn delete_link(name: &str) -> Result<()> {
    match sys::run("ip", &["link", "del", name], None) {
        Ok(_) => Ok(()),
        Err(NetError::Command { detail, .. }) if detail.contains("Cannot find device") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Forgets every connection of the slot: in its namespace (the guest's
/// NAT) and on the host (masquerade and host-opened connections).
pub(crate) fn flush_conntrack(layout: &Layout, idx: SlotIndex) -> Result<()> {
    sys::in_netns(&layout.netns_path(idx), || {
        sys::run("conntrack", &["-F"], None).map(|_| ())
    })?;
    flush_host_conntrack(layout.sandbox_addr(idx))
}

fn flush_host_conntrack(addr: Ipv4Addr) -> Result<()> {
    let a = addr.to_string();
    conntrack_delete(&["-D", "-s", &a])?;
    conntrack_delete(&["-D", "-d", &a])
}

/// `conntrack -D ...`; "0 flow entries" (exit 1) is success.
pub(crate) fn conntrack_delete(args: &[&str]) -> Result<()> {
    match sys::run("conntrack", args, None) {
        Ok(_) => Ok(()),
        Err(NetError::Command { detail, .. }) if detail.contains("0 flow entries") => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    // A panic while holding a netd lock leaves plain data behind (maps are
    // kernel objects); carry on with it.
    Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Logs how a reconcile went.
pub(crate) fn log_removed(what: &str, names: &[String]) {
    if !names.is_empty() {
        info!(count = names.len(), names = ?names, "netd: removed leftover {what}");
    }
}
