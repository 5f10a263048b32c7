//! Sandbox networking for Somna: pre-built network slots (netns + TAP + veth)
//! and the eBPF programs that enforce each sandbox's network policy.
//!
//! This crate is intentionally empty until the netd issue lands: sandboxes
//! have no network device today (loopback only), and nothing here claims
//! otherwise.
