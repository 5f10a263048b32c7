//! Somna's wire protocols, generated from the `.proto` files beside this crate.
//!
//! - [`v1`]: the public API (`somna.v1`): sandboxes, plus the exec and file
//!   messages that the guest protocol shares, so the host agent relays them
//!   unchanged.
//! - [`guest::v1`]: the host agent ↔ guest agent protocol (`somna.guest.v1`).

#![allow(clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("somna.v1");
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
