//! Light sleep for Somna sandboxes, VMM-independent parts: the on-disk
//! format of a VM snapshot (device state, guest memory, writable disk) with
//! checksums verified before any restore ([`Snapshot`]), template snapshots
//! keyed by everything they depend on ([`TemplateStore`]), and giving a
//! sleeping VM's memory back to the host ([`residency`]).
//!
//! Taking and restoring snapshots is the VMM driver's job (QEMU migration
//! with `x-ignore-shared`, Cloud Hypervisor `vm.snapshot`/`vm.restore`);
//! the hypervisor agent drives both.

pub mod checksum;
pub mod copy;
mod error;
pub mod residency;
mod snapshot;
mod template;

pub use error::SnapshotError;
pub use snapshot::{FORMAT_VERSION, MemoryLayout, Part, Snapshot, SnapshotMeta, SnapshotParts};
pub use template::{Template, TemplateInputs, TemplateMeta, TemplateStore};
