//! Names and addresses of a netd instance's host-side objects, derived from
//! the configuration (so start-up can find leftovers of a crashed run).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{Ipv4Cidr, NetdConfig};

/// Index of a slot: its /30 within the host subnet (1-based; 0 holds the
/// service and health-check addresses).
pub(crate) type SlotIndex = u32;

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub prefix: String,
    pub subnet: Ipv4Cidr,
    pub capacity: u32,
    pub state_dir: PathBuf,
}

impl Layout {
    pub fn new(cfg: &NetdConfig) -> Self {
        Layout {
            prefix: cfg.name_prefix.clone(),
            subnet: cfg.host_subnet,
            capacity: cfg.capacity() as u32,
            state_dir: cfg.state_dir.join(&cfg.name_prefix),
        }
    }

    /// Where host services (DNS) listen; sandboxes may reach their ports.
    pub fn service_ip(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }

    /// The source address of platform health checks.
    pub fn health_ip(&self) -> Ipv4Addr {
        self.subnet.nth(2)
    }

    pub fn host_addr(&self, idx: SlotIndex) -> Ipv4Addr {
        self.subnet.nth(4 * idx + 1)
    }

    pub fn sandbox_addr(&self, idx: SlotIndex) -> Ipv4Addr {
        self.subnet.nth(4 * idx + 2)
    }

    pub fn netns_name(&self, idx: SlotIndex) -> String {
        format!("{}-s{idx}", self.prefix)
    }

    pub fn netns_path(&self, idx: SlotIndex) -> PathBuf {
        Path::new("/run/netns").join(self.netns_name(idx))
    }

    pub fn host_veth(&self, idx: SlotIndex) -> String {
        format!("{}-h{idx}", self.prefix)
    }

    /// The link holding the service and health-check addresses (one end of
    /// a veth pair; the other is `<this>p`).
    pub fn service_link(&self) -> String {
        format!("{}-svc", self.prefix)
    }

    /// nftables table (`ip` family) on the host and in each slot.
    pub fn nft_table(&self) -> &str {
        &self.prefix
    }

    /// Wildcard matching every host veth, for nftables.
    pub fn host_veth_glob(&self) -> String {
        format!("{}-h*", self.prefix)
    }

    /// This instance's private bpffs mount.
    pub fn bpffs(&self) -> PathBuf {
        self.state_dir.join("bpf")
    }

    /// The record of sysctls changed at start-up, restored on shutdown.
    pub fn sysctl_record(&self) -> PathBuf {
        self.state_dir.join("sysctl-restore")
    }

    pub fn parse_netns(&self, name: &str) -> Option<SlotIndex> {
        parse_indexed(name, &self.prefix, "-s")
    }

    pub fn parse_host_veth(&self, name: &str) -> Option<SlotIndex> {
        parse_indexed(name, &self.prefix, "-h")
    }
}

fn parse_indexed(name: &str, prefix: &str, tag: &str) -> Option<SlotIndex> {
    let rest = name.strip_prefix(prefix)?.strip_prefix(tag)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with('0') {
        return None;
    }
    rest.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        let cfg = NetdConfig {
            name_prefix: "somna".into(),
            host_subnet: "100.96.0.0/16".parse().unwrap(),
            ..Default::default()
        };
        let l = Layout::new(&cfg);
        assert_eq!(l.service_ip(), Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(l.health_ip(), Ipv4Addr::new(100, 96, 0, 2));
        assert_eq!(l.host_addr(1), Ipv4Addr::new(100, 96, 0, 5));
        assert_eq!(l.sandbox_addr(1), Ipv4Addr::new(100, 96, 0, 6));
        assert_eq!(l.sandbox_addr(16383), Ipv4Addr::new(100, 96, 255, 254));
        assert_eq!(l.host_veth(16383), "somna-h16383");
        assert_eq!(l.parse_netns("somna-s12"), Some(12));
        assert_eq!(l.parse_netns("somnab-s12"), None);
        assert_eq!(l.parse_netns("somna-s012"), None);
        assert_eq!(l.parse_netns("somna-sx"), None);
        assert_eq!(l.parse_host_veth("somna-h7"), Some(7));
        assert_eq!(l.parse_host_veth("somna-svc"), None);
        // The longest names fit in IFNAMSIZ.
        let long = Layout::new(&NetdConfig {
            name_prefix: "somnaxyz".into(),
            ..cfg
        });
        assert!(long.host_veth(99_999).len() <= 15);
    }
}
