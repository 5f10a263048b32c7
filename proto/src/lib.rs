//! Somna's wire protocols, generated from the `.proto` files beside this crate.
//!
//! - [`v1`]: the public API (`somna.v1`): sandboxes, plus the exec and file
//!   messages that the guest protocol shares, so the host agent relays them
//!   unchanged.
//! - [`host::v1`]: the control plane ↔ host agent protocol (`somna.host.v1`),
//!   served by the agent over the connection it dialled out.
//! - [`guest::v1`]: the host agent ↔ guest agent protocol (`somna.guest.v1`).

#![allow(clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("somna.v1");
}

pub mod host {
    pub mod v1 {
        tonic::include_proto!("somna.host.v1");
    }
}

pub mod guest {
    pub mod v1 {
        tonic::include_proto!("somna.guest.v1");
    }
}

/// Name of the virtio-serial port that carries the guest protocol.
pub const GUEST_SERIAL_PORT_NAME: &str = "somna.agent";

/// The vsock port the guest agent listens on where the host has vsock.
pub const GUEST_VSOCK_PORT: u32 = 1024;

/// Resynchronisation of a virtio-serial channel, whose byte stream outlives
/// host connections and snapshots: bytes of an old session (and, after a
/// restore, bytes the guest wrote before the snapshot) may still be in
/// flight. A host that connects writes `SOMNA-SYNC <16 hex digits>\n`; the
/// guest agent writes the same line back once everything of the previous
/// session is behind it, and only then starts HTTP/2. The host discards
/// what it reads before the echo.
pub mod serial_sync {
    /// The marker's prefix.
    pub const PREFIX: &[u8] = b"SOMNA-SYNC ";
    /// Length of the whole marker: prefix, 16 hex digits, newline.
    pub const LEN: usize = PREFIX.len() + 16 + 1;

    /// The marker for `nonce`.
    pub fn marker(nonce: u64) -> Vec<u8> {
        let mut m = PREFIX.to_vec();
        m.extend_from_slice(format!("{nonce:016x}\n").as_bytes());
        m
    }

    /// Whether `bytes` (exactly [`LEN`] long) is a marker.
    pub fn is_marker(bytes: &[u8]) -> bool {
        bytes.len() == LEN
            && bytes.starts_with(PREFIX)
            && bytes[PREFIX.len()..LEN - 1]
                .iter()
                .all(u8::is_ascii_hexdigit)
            && bytes[LEN - 1] == b'\n'
    }
}
