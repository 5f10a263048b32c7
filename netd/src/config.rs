//! [`NetdConfig`]: the host side of networking (names, addresses, egress).

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    Ipv4Cidr,
    error::{NetError, Result},
};

/// Where forwarded sandbox traffic may leave the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Egress {
    /// Through whichever interface the host's routes choose (the usual
    /// single-uplink host). netd turns on `net.ipv4.ip_forward` (and puts
    /// the previous value back on shutdown).
    Any,
    /// Only through this interface: traffic routed anywhere else is dropped,
    /// and forwarding is enabled on this interface and the slot veths only
    /// (`net.ipv4.conf.<if>.forwarding`), not host-wide.
    Interface(String),
}

/// Transport protocol of a host service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A service on the host's service address (see
/// [`crate::Netd::service_addr`]) that every sandbox may use. Port 53 is
/// also offered on the guest's gateway ([`crate::contract::DNS_IP`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostService {
    pub proto: Proto,
    pub port: u16,
}

impl HostService {
    /// DNS over UDP and TCP, port 53.
    pub fn dns() -> Vec<HostService> {
        vec![
            HostService {
                proto: Proto::Udp,
                port: 53,
            },
            HostService {
                proto: Proto::Tcp,
                port: 53,
            },
        ]
    }
}

/// Configuration of a [`crate::Netd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetdConfig {
    /// Prefix of every name netd creates: network namespaces
    /// `<prefix>-s<N>`, host veths `<prefix>-h<N>`, the service link
    /// `<prefix>-svc`, the nftables table `ip <prefix>`, the state directory
    /// `<state_dir>/<prefix>`. Start-up removes leftovers with exactly this
    /// prefix, so two netd instances on one host need different prefixes
    /// (and host subnets). Must start with `somna`, at most 8 characters of
    /// `[a-z0-9]`.
    pub name_prefix: String,
    /// Slots kept ready (built, programs attached) for instant claims.
    pub pool_size: usize,
    /// The host side of every slot: one /30 per slot (host veth `.1`,
    /// sandbox address `.2`); the first /30 holds the service address
    /// (`.1`) and the health-check source address (`.2`). Must not overlap
    /// any network the host uses. /16 gives 16383 slots.
    pub host_subnet: Ipv4Cidr,
    /// Where sandbox traffic leaves the host (NAT: masquerade).
    pub egress: Egress,
    /// Services on the host that sandboxes may use, on the service address.
    pub host_services: Vec<HostService>,
    /// Runtime state: the bpffs mount with pinned programs and the record of
    /// the sysctls netd changed. Under `/run` so a reboot clears it.
    pub state_dir: PathBuf,
    /// Each sandbox's outbound traffic is shaped to this rate (a token
    /// bucket on its slot's uplink: excess is queued, then dropped), so a
    /// guest flooding the network cannot take the host's bandwidth from
    /// its neighbours. 0: unlimited.
    pub egress_rate_mbit: u32,
    /// Each sandbox's inbound traffic is shaped to this rate (a token
    /// bucket on its TAP, towards the guest), so a flood aimed at one
    /// sandbox (or a download it asked for) cannot take the host's
    /// bandwidth from its neighbours. 0: unlimited.
    pub ingress_rate_mbit: u32,
}

impl Default for NetdConfig {
    fn default() -> Self {
        NetdConfig {
            name_prefix: "somna".into(),
            pool_size: 8,
            host_subnet: Ipv4Cidr::new(Ipv4Addr::new(100, 96, 0, 0), 16)
                .unwrap_or_else(|_| unreachable!("100.96.0.0/16 is a valid CIDR")),
            egress: Egress::Any,
            host_services: HostService::dns(),
            state_dir: PathBuf::from("/run/somna-netd"),
            egress_rate_mbit: DEFAULT_EGRESS_RATE_MBIT,
            ingress_rate_mbit: DEFAULT_INGRESS_RATE_MBIT,
        }
    }
}

/// The default per-sandbox egress rate (Mbit/s).
pub const DEFAULT_EGRESS_RATE_MBIT: u32 = 1000;

/// The default per-sandbox ingress rate (Mbit/s).
pub const DEFAULT_INGRESS_RATE_MBIT: u32 = 1000;

/// Longest index whose names still fit in IFNAMSIZ with an 8-char prefix.
const MAX_SLOT_INDEX: u32 = 99_999;

impl NetdConfig {
    /// Checks the configuration; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let p = &self.name_prefix;
        if !p.starts_with("somna")
            || p.len() > 8
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(NetError::invalid(
                "name_prefix",
                format!(
                    "{p:?} must start with \"somna\" and be at most 8 characters of [a-z0-9] \
                     (names such as <prefix>-h12345 must fit in 15 characters)"
                ),
            ));
        }
        let len = self.host_subnet.prefix_len();
        if !(8..=29).contains(&len) {
            return Err(NetError::invalid(
                "host_subnet",
                format!(
                    "{} must be between a /8 and a /29 (one /30 per slot plus one reserved)",
                    self.host_subnet
                ),
            ));
        }
        let capacity = self.capacity();
        if self.pool_size > capacity {
            return Err(NetError::invalid(
                "pool_size",
                format!(
                    "{} exceeds the {capacity} slots that {} holds",
                    self.pool_size, self.host_subnet
                ),
            ));
        }
        if let Egress::Interface(name) = &self.egress
            && (name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(' '))
        {
            return Err(NetError::invalid(
                "egress",
                format!("{name:?} is not an interface name"),
            ));
        }
        for s in &self.host_services {
            if s.port == 0 {
                return Err(NetError::invalid("host_services", "port 0 is not a port"));
            }
        }
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            return Err(NetError::invalid(
                "state_dir",
                format!("{} must be an absolute path", self.state_dir.display()),
            ));
        }
        Ok(())
    }

    /// How many slots the host subnet holds.
    pub fn capacity(&self) -> usize {
        let per_subnet = (self.host_subnet.size() / 4).saturating_sub(1);
        per_subnet.min(u64::from(MAX_SLOT_INDEX)) as usize
    }

    /// Whether the gateway forwards DNS (port 53) to the host.
    pub(crate) fn dns_protos(&self) -> Vec<Proto> {
        let mut v: Vec<Proto> = self
            .host_services
            .iter()
            .filter(|s| s.port == 53)
            .map(|s| s.proto)
            .collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        let c = NetdConfig::default();
        c.validate().unwrap();
        assert_eq!(c.capacity(), 16383);
    }

    #[test]
    fn bad_config_names_the_field() {
        let mut c = NetdConfig {
            name_prefix: "netd".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), Some("name_prefix"));
        c.name_prefix = "somnatoolong".into();
        assert_eq!(c.validate().unwrap_err().field(), Some("name_prefix"));
        c.name_prefix = "somnaa".into();
        c.host_subnet = "10.0.0.0/30".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().field(), Some("host_subnet"));
        c.host_subnet = "10.0.0.0/28".parse().unwrap();
        c.pool_size = 4;
        assert_eq!(c.validate().unwrap_err().field(), Some("pool_size"));
        c.pool_size = 3;
        c.validate().unwrap();
        c.egress = Egress::Interface("a very long interface name".into());
        assert_eq!(c.validate().unwrap_err().field(), Some("egress"));
    }
}
