//! The guest network contract: what a guest sees on every slot of every
//! host. These values never vary, so a VM snapshotted on one slot (or host)
//! restores on any other with its network configuration, ARP cache and
//! routes intact.
//!
//! The guest must configure (all static, no DHCP):
//!
//! | what | value |
//! |---|---|
//! | NIC MAC (set by the VMM) | [`GUEST_MAC`] `02:73:6d:00:00:02` |
//! | address | [`GUEST_IP`]/[`GUEST_PREFIX_LEN`] `172.16.0.2/30` |
//! | default route | via [`GATEWAY_IP`] `172.16.0.1` |
//! | MTU | [`GUEST_MTU`] `1500` |
//! | `/etc/resolv.conf` | `nameserver 172.16.0.1` ([`DNS_IP`]) |
//!
//! For example (busybox): `ip link set eth0 address 02:73:6d:00:00:02 mtu
//! 1500 up; ip addr add 172.16.0.2/30 dev eth0; ip route add default via
//! 172.16.0.1`. The gateway answers ARP with [`GATEWAY_MAC`].
//!
//! DNS on the gateway works when netd is configured with a DNS host service
//! (see [`crate::NetdConfig::host_services`]): the slot forwards
//! `172.16.0.1:53` (UDP and TCP) to the host's service address, where the
//! platform runs a resolver.
//!
//! Established connections do not survive a restore on another slot (the
//! outside sees each slot under a different NAT address); the guest's
//! configuration does.

use std::net::Ipv4Addr;

/// The guest's address in every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The guest's default gateway (the slot side of the TAP) in every slot.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The guest's prefix length: the guest/gateway link is a /30.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest's DNS server: the gateway, which forwards to the host.
pub const DNS_IP: Ipv4Addr = GATEWAY_IP;
/// The guest NIC's MAC address (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x00, 0x00, 0x02];
/// The gateway's MAC address (the TAP device in the slot).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x00, 0x00, 0x01];
/// MTU of the guest NIC and of every slot device.
pub const GUEST_MTU: u16 = 1500;
/// Name of the TAP device inside every slot's network namespace.
pub const TAP_NAME: &str = "somna-tap";
/// Name of the slot end of the veth pair inside every slot's namespace.
pub const SLOT_VETH_NAME: &str = "somna-veth";

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The guest network contract as one value (what a guest agent needs to
/// configure eth0; serializable for passing to the guest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestNetwork {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// `02:73:6d:00:00:02` form.
    pub mac: String,
    pub gateway_mac: String,
    pub mtu: u16,
}

impl GuestNetwork {
    /// The contract (identical for every slot).
    pub fn contract() -> Self {
        GuestNetwork {
            ip: GUEST_IP,
            prefix_len: GUEST_PREFIX_LEN,
            gateway: GATEWAY_IP,
            dns: DNS_IP,
            mac: mac_string(&GUEST_MAC),
            gateway_mac: mac_string(&GATEWAY_MAC),
            mtu: GUEST_MTU,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_is_consistent() {
        let g = GuestNetwork::contract();
        assert_eq!(g.mac, "02:73:6d:00:00:02");
        assert_eq!(g.gateway_mac, "02:73:6d:00:00:01");
        // Guest and gateway share the /30 and are its two usable addresses.
        let net = crate::Ipv4Cidr::new(Ipv4Addr::new(172, 16, 0, 0), GUEST_PREFIX_LEN).unwrap();
        assert!(net.contains(GUEST_IP) && net.contains(GATEWAY_IP));
        assert_ne!(GUEST_IP, GATEWAY_IP);
        assert!(TAP_NAME.len() < 16 && SLOT_VETH_NAME.len() < 16);
    }
}
