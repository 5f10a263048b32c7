//! [`EgressPolicy`]: who a sandbox may talk to, with validation.
//!
//! How a packet leaving a sandbox is judged, in order (enforced by the
//! `slot_egress` eBPF program, see `bpf/slot.bpf.c`):
//!
//! 1. Other sandboxes (the host subnet): never. The host: only the host
//!    services (DNS) and answers to connections the host opened.
//! 2. Any other address of the host itself: never.
//! 3. The sandbox's `allow_out` / `deny_out` lists: the longest matching
//!    prefix decides (so `deny 10.0.0.0/8` + `allow 10.1.0.0/16` allows
//!    10.1.x.x only).
//! 4. [`BLOCKED_RANGES`] (private, link-local/metadata, loopback,
//!    multicast, reserved): dropped unless an allow entry matched.
//! 5. Everything else is "the internet": allowed when `internet` is on.
//!
//! Inbound, new TCP connections reach the guest only on
//! `exposed_tcp_ports`; nothing from outside the host can open one at all
//! (the host firewall admits only replies).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    Ipv4Cidr,
    error::{NetError, Result},
};

/// Most entries `allow_out` and `deny_out` may hold together.
pub const MAX_RULES: usize = 256;

/// Most exposed ports per sandbox.
pub const MAX_EXPOSED_PORTS: usize = 64;

/// Destinations blocked unless allowed explicitly: the IPv4 ranges that are
/// not the public internet (RFC 6890 and RFC 1918, 6598, 3927).
pub const BLOCKED_RANGES: &[&str] = &[
    "0.0.0.0/8",      // "this network"
    "10.0.0.0/8",     // private
    "100.64.0.0/10",  // carrier-grade NAT (shared address space)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local: cloud metadata services live here
    "172.16.0.0/12",  // private
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // private
    "198.18.0.0/15",  // benchmarking
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, limited broadcast
];

/// The network policy of one sandbox. `Default` is internet on, no lists,
/// nothing exposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressPolicy {
    /// Access to the internet (everything not in [`BLOCKED_RANGES`]).
    /// `--no-internet` turns it off.
    pub internet: bool,
    /// Destinations allowed even when internet is off or they are in a
    /// blocked range (`--allow-out CIDR`).
    pub allow_out: Vec<Ipv4Cidr>,
    /// Destinations denied (`--deny-out CIDR`).
    pub deny_out: Vec<Ipv4Cidr>,
    /// TCP ports on which the platform (ingress proxy, health checks) may
    /// open connections to the guest.
    pub exposed_tcp_ports: Vec<u16>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            exposed_tcp_ports: Vec::new(),
        }
    }
}

impl EgressPolicy {
    /// Builds a policy from the CLI/API form (`--no-internet`,
    /// `--allow-out`, `--deny-out`), validated. Errors name the field
    /// (`allow_out`, `deny_out`) and the offending value.
    pub fn from_args<A: AsRef<str>, D: AsRef<str>>(
        no_internet: bool,
        allow_out: &[A],
        deny_out: &[D],
    ) -> Result<Self> {
        let policy = EgressPolicy {
            internet: !no_internet,
            allow_out: parse_list("allow_out", allow_out)?,
            deny_out: parse_list("deny_out", deny_out)?,
            exposed_tcp_ports: Vec::new(),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the policy on its own (the host-dependent checks are in
    /// [`crate::Netd::validate_policy`]): list sizes, ports, and conflicts.
    /// A CIDR in both lists is a conflict; overlapping CIDRs of different
    /// lengths are not (the longer prefix wins).
    pub fn validate(&self) -> Result<()> {
        let n = self.allow_out.len() + self.deny_out.len();
        if n > MAX_RULES {
            let field = if self.allow_out.len() > self.deny_out.len() {
                "allow_out"
            } else {
                "deny_out"
            };
            return Err(NetError::invalid(
                field,
                format!("{n} entries in allow_out and deny_out together; at most {MAX_RULES}"),
            ));
        }
        let allow: BTreeSet<_> = self.allow_out.iter().collect();
        if let Some(c) = self.deny_out.iter().find(|c| allow.contains(c)) {
            return Err(NetError::invalid(
                "deny_out",
                format!(
                    "{c} is also in allow_out; a destination cannot be both allowed and denied"
                ),
            ));
        }
        if self.exposed_tcp_ports.contains(&0) {
            return Err(NetError::invalid(
                "exposed_tcp_ports",
                "port 0 cannot be exposed",
            ));
        }
        let ports: BTreeSet<_> = self.exposed_tcp_ports.iter().collect();
        if ports.len() > MAX_EXPOSED_PORTS {
            return Err(NetError::invalid(
                "exposed_tcp_ports",
                format!(
                    "{} ports; at most {MAX_EXPOSED_PORTS}",
                    self.exposed_tcp_ports.len()
                ),
            ));
        }
        Ok(())
    }

    /// The lists without duplicates, sorted (what is written to the maps).
    pub(crate) fn rules(&self) -> (BTreeSet<Ipv4Cidr>, BTreeSet<Ipv4Cidr>) {
        (
            self.allow_out.iter().copied().collect(),
            self.deny_out.iter().copied().collect(),
        )
    }

    pub(crate) fn ports(&self) -> BTreeSet<u16> {
        self.exposed_tcp_ports.iter().copied().collect()
    }
}

fn parse_list<S: AsRef<str>>(field: &'static str, items: &[S]) -> Result<Vec<Ipv4Cidr>> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_ref().parse::<Ipv4Cidr>().map_err(|e| {
                NetError::invalid(field, format!("entry {} ({:?}): {e}", i + 1, s.as_ref()))
            })
        })
        .collect()
}

/// [`BLOCKED_RANGES`], parsed.
pub(crate) fn blocked_ranges() -> Vec<Ipv4Cidr> {
    BLOCKED_RANGES
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::ErrorKind;

    use super::*;

    #[test]
    fn from_args_parses_and_validates() {
        let p =
            EgressPolicy::from_args(true, &["10.0.0.0/8", "1.2.3.4"], &["10.1.0.0/16"]).unwrap();
        assert!(!p.internet);
        assert_eq!(p.allow_out.len(), 2);
        assert_eq!(p.allow_out[1].to_string(), "1.2.3.4/32");
        assert_eq!(p.deny_out[0].to_string(), "10.1.0.0/16");
        assert!(
            EgressPolicy::from_args::<&str, &str>(false, &[], &[])
                .unwrap()
                .internet
        );
    }

    #[test]
    fn invalid_cidr_names_field_and_entry() {
        let e = EgressPolicy::from_args(false, &["10.0.0.0/8"], &["300.1.1.1/32"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.field(), Some("deny_out"));
        assert!(e.to_string().contains("entry 1"), "{e}");
        assert!(e.to_string().contains("300.1.1.1"), "{e}");
        let e = EgressPolicy::from_args::<_, &str>(false, &["ok", "10.1.2.3/8"], &[]).unwrap_err();
        assert_eq!(e.field(), Some("allow_out"));
    }

    #[test]
    fn conflicting_rules_are_rejected() {
        let e = EgressPolicy::from_args(false, &["1.2.3.0/24"], &["1.2.3.0/24"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.field(), Some("deny_out"));
        assert!(e.to_string().contains("both allowed and denied"), "{e}");
        // Nested prefixes are fine: the longer one wins.
        EgressPolicy::from_args(false, &["1.2.3.0/24"], &["1.2.0.0/16"]).unwrap();
    }

    #[test]
    fn limits() {
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("1.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let e = EgressPolicy::from_args::<_, &str>(false, &many, &[]).unwrap_err();
        assert_eq!(e.field(), Some("allow_out"));
        let p = EgressPolicy {
            exposed_tcp_ports: vec![0],
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().field(), Some("exposed_tcp_ports"));
    }

    #[test]
    fn blocked_ranges_parse() {
        assert_eq!(blocked_ranges().len(), BLOCKED_RANGES.len());
    }

    #[test]
    fn serde_round_trip() {
        let p = EgressPolicy::from_args(true, &["10.0.0.0/8"], &["10.1.0.0/16"]).unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert!(j.contains("\"10.0.0.0/8\""), "{j}");
        let back: EgressPolicy = serde_json::from_str(&j).unwrap();
        assert_eq!(back, p);
    }
}
