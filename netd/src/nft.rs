//! nftables rulesets: the host table (forwarding guard, host protection,
//! NAT to the outside) and the per-slot table (the slot's 1:1 NAT between
//! the fixed guest address and the slot's unique address).
//!
//! All host rules live in one table, `ip <prefix>`, created and deleted
//! whole; nothing else on the host is touched. A base chain here can drop
//! but not override a drop elsewhere: a host firewall that drops forwarded
//! traffic (e.g. an `iptables -P FORWARD DROP`) must let the slot veths
//! (`<prefix>-h*`) through.

use crate::error::{NetError, Result};
use crate::{
    Egress, NetdConfig,
    contract::{GATEWAY_IP, GUEST_IP, SLOT_VETH_NAME, TAP_NAME},
    layout::{Layout, SlotIndex},
    sys,
};

/// The host table. Besides the eBPF programs (which do the per-sandbox
/// work), it is the stateful backstop:
/// - forward: no slot-to-slot traffic; slot traffic leaves only through the
///   egress interface; nothing from outside opens a connection into a slot;
///   TCP MSS clamped to the path MTU.
/// - input: from the slots, only replies to host-opened connections and the
///   host services; the service/health addresses answer only locally.
/// - postrouting: masquerade slot traffic leaving for the outside.
pub(crate) fn host_ruleset(cfg: &NetdConfig, layout: &Layout) -> String {
    let t = layout.nft_table();
    let veths = layout.host_veth_glob();
    let svc = layout.service_ip();
    let health = layout.health_ip();
    let svc_link = layout.service_link();
    let (egress_guard, masq) = match &cfg.egress {
        Egress::Any => (
            String::new(),
            format!("iifname \"{veths}\" oifname != \"{veths}\" masquerade"),
        ),
        Egress::Interface(ifname) => (
            format!("iifname \"{veths}\" oifname != \"{ifname}\" drop"),
            format!("iifname \"{veths}\" oifname \"{ifname}\" masquerade"),
        ),
    };
    let services: String = cfg
        .host_services
        .iter()
        .map(|s| {
            format!(
                "    iifname \"{veths}\" ip daddr {svc} {} dport {} accept\n",
                s.proto.name(),
                s.port
            )
        })
        .collect();
    format!(
        "table ip {t} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{veths}\" oifname \"{veths}\" drop
    {egress_guard}
    iifname \"{veths}\" tcp flags syn tcp option maxseg size set rt mtu
    oifname \"{veths}\" tcp flags syn tcp option maxseg size set rt mtu
    oifname \"{veths}\" ct state established,related accept
    oifname \"{veths}\" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{veths}\" ct state established,related accept
{services}    iifname \"{veths}\" drop
    ip daddr {{ {svc}, {health} }} iifname != {{ \"lo\", \"{svc_link}\" }} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {masq}
  }}
}}
"
    )
}

/// The table inside slot `idx`: the guest's fixed address is translated to
/// the slot's unique address on the way out (and back), inbound connections
/// to the slot's address go to the guest, and the gateway's DNS port goes to
/// the host's service address.
pub(crate) fn slot_ruleset(cfg: &NetdConfig, layout: &Layout, idx: SlotIndex) -> String {
    let t = layout.nft_table();
    let v = layout.sandbox_addr(idx);
    let svc = layout.service_ip();
    let dns: String = cfg
        .dns_protos()
        .iter()
        .map(|p| {
            format!(
                "    iifname \"{TAP_NAME}\" ip daddr {GATEWAY_IP} {} dport 53 dnat to {svc}\n",
                p.name()
            )
        })
        .collect();
    format!(
        "table ip {t} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dns}    iifname \"{SLOT_VETH_NAME}\" ip daddr {v} dnat to {GUEST_IP}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{SLOT_VETH_NAME}\" ip saddr {GUEST_IP} snat to {v}
  }}
}}
"
    )
}

/// Loads a ruleset (atomically: all or nothing) in the calling thread's
/// network namespace.
pub(crate) fn load(ruleset: &str) -> Result<()> {
    sys::run("nft", &["-f", "-"], Some(ruleset)).map(|_| ())
}

/// Deletes the host table if it exists.
pub(crate) fn delete_table(table: &str) -> Result<bool> {
    match sys::run("nft", &["delete", "table", "ip", table], None) {
        Ok(_) => Ok(true),
        Err(NetError::Command { detail, .. })
            if detail.contains("No such file or directory")
                || detail.contains("does not exist") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_name_only_our_objects() {
        let cfg = NetdConfig {
            name_prefix: "somnaq".into(),
            host_subnet: "100.127.9.0/24".parse().unwrap(),
            egress: Egress::Interface("uplink0".into()),
            ..Default::default()
        };
        let l = Layout::new(&cfg);
        let host = host_ruleset(&cfg, &l);
        assert!(host.starts_with("table ip somnaq {"));
        assert!(host.contains("oifname != \"uplink0\" drop"));
        assert!(host.contains("oifname \"uplink0\" masquerade"));
        assert!(host.contains("ip daddr 100.127.9.1 udp dport 53 accept"));
        let slot = slot_ruleset(&cfg, &l, 3);
        assert!(slot.contains("ip daddr 100.127.9.14 dnat to 172.16.0.2"));
        assert!(slot.contains("snat to 100.127.9.14"));
        assert!(slot.contains("udp dport 53 dnat to 100.127.9.1"));
        assert!(slot.contains("tcp dport 53 dnat to 100.127.9.1"));
    }
}
