//! The Somna hypervisor agent: the per-host daemon that runs sandboxes as
//! microVMs.
//!
//! It owns, on its host: the VMM driver ([`vmm::Vmm`], with the QEMU driver
//! in [`vmm::qemu`]), the choice of accelerator ([`accel`]: KVM where a
//! probe guest really boots, TCG otherwise), every VM's run directory
//! ([`rundir`]), crash recovery at start-up ([`recovery`]), and the client of
//! each guest's agent ([`guest`]). [`Agent`] ties them together: create,
//! exec, files and destroy of [`SandboxInfo`]s.

pub mod accel;
pub mod agent;
pub mod config;
pub mod error;
pub mod guest;
pub mod process;
pub mod recovery;
pub mod rundir;
pub mod sandbox;
pub mod vmm;

pub use accel::{AccelChoice, AccelMode};
pub use agent::Agent;
pub use config::{AgentConfig, ChannelMode, GuestArtifacts, SandboxLimits};
pub use error::AgentError;
pub use sandbox::{SandboxInfo, SandboxRequest, SandboxState};
pub use vmm::{Accelerator, ChannelKind};
