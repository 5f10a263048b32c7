//! Sandbox networking for Somna: pre-built **network slots** and the **eBPF
//! programs** that enforce who each sandbox may talk to.
//!
//! # Slots
//!
//! A slot is a network namespace holding the VM's TAP device, joined to the
//! host by a veth pair (see `slot.rs` for the exact plumbing). The guest side
//! is identical in every slot and on every host ([`contract`]: guest
//! `172.16.0.2/30`, gateway and DNS `172.16.0.1`, MACs `02:73:6d:00:00:02` /
//! `:01`), so a VM snapshotted on one slot restores on any other. Each slot
//! translates the guest address 1:1 to its own unique address (`.2` of its
//! /30 in [`NetdConfig::host_subnet`]); the host masquerades those to the
//! outside through the egress interface.
//!
//! [`Netd::start`] builds a pool of ready slots (programs attached, maps
//! registered). [`Netd::claim`] takes one and writes the sandbox's policy
//! into BPF maps: no process, no netlink, no program load on the claim path.
//! [`Netd::release`] resets it (maps, conntrack) and returns it to the pool.
//!
//! # Enforcement (eBPF, `bpf/slot.bpf.c`, loaded with aya)
//!
//! - **Anti-spoofing** (`guest_ingress`, TAP ingress): frames from the guest
//!   must carry the guest MAC and, for IPv4 and ARP, the guest IP; no other
//!   ethertype passes (no IPv6). The gateway answers only DNS.
//! - **Isolation and egress policy** (`slot_egress`, host veth ingress):
//!   nothing to other sandboxes; nothing to the host except the host
//!   services on [`Netd::service_addr`] and answers to host-opened
//!   connections (any other host address is recognised with
//!   `bpf_fib_lookup`); forwarded traffic only through the egress
//!   interface; then the sandbox's allow/deny lists (longest prefix wins),
//!   the blocked ranges (private, link-local/metadata, ...) and the internet
//!   switch. See [`policy`](EgressPolicy) for the order. Policy changes are map
//!   writes with an atomic generation switch ([`Netd::update_policy`]).
//! - **Ingress** (`slot_ingress`, host veth egress): new TCP connections
//!   into the guest only on [`EgressPolicy::exposed_tcp_ports`]. The host's
//!   nftables table admits nothing from outside but replies.
//! - **Accounting**: bytes/packets in and out, drops, and the last-activity
//!   time per slot in a per-CPU map ([`Netd::counters`]).
//!
//! The nftables table `ip <prefix>` (NAT, forwarding guard, host input
//! guard) is the stateful backstop behind the programs, not a replacement.
//!
//! # Health checks
//!
//! The platform's health checks come from a dedicated host address,
//! [`Netd::health_check_addr`] (the second address of the host subnet, on
//! the `<prefix>-svc` dummy link). Packets from it, and the guest's answers
//! to it, are counted in bytes and packets but never move
//! `last_activity`, so the idle detector sees through them.
//! [`Netd::health_check_connect`] opens such a connection.
//!
//! # Lifecycle and host safety
//!
//! TCX links are pinned in a private bpffs under
//! `<state_dir>/<prefix>/bpf`, so if the agent dies the programs stay
//! attached and every slot stays isolated. The next [`Netd::start`] with the
//! same prefix removes everything a previous run left (namespaces, links,
//! pins, the nftables table, conntrack entries, changed sysctls) before it
//! builds anew; [`Netd::shutdown`] (also on drop) removes it all. netd only
//! ever creates and deletes objects carrying its prefix; the only host-wide
//! setting it changes is IPv4 forwarding: on the egress interface
//! ([`Egress::Interface`]) or globally ([`Egress::Any`]), recorded and put
//! back at shutdown.
//!
//! Start-up fails with [`ErrorKind::FailedPrecondition`] naming what is
//! missing (capability, kernel feature, tool) rather than run without
//! isolation.

mod bpf;
mod cidr;
mod config;
pub mod contract;
mod counters;
mod error;
mod layout;
mod netd;
mod nft;
mod policy;
mod preflight;
mod reconcile;
mod slot;
mod sys;
mod tap;
pub mod testing;

pub use bpf::DROP_REASON_NAMES;
pub use cidr::{CidrParseError, Ipv4Cidr};
pub use config::{
    DEFAULT_EGRESS_RATE_MBIT, DEFAULT_INGRESS_RATE_MBIT, Egress, HostService, NetdConfig, Proto,
};
pub use contract::GuestNetwork;
pub use counters::{Counters, monotonic_now_ns};
pub use error::{ErrorKind, NetError, Result};
pub use netd::{Netd, Slot, SlotId, SlotPool};
pub use policy::{BLOCKED_RANGES, EgressPolicy, MAX_EXPOSED_PORTS, MAX_RULES};
pub use tap::open_vmm_tap;
