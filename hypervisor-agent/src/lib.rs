//! The Somna hypervisor agent: the per-host daemon that runs sandboxes as
//! microVMs.
//!
//! It owns, on its host: the VMM driver ([`vmm::Vmm`], with the QEMU driver
//! in [`vmm::qemu`] and the Cloud Hypervisor driver in
//! [`vmm::cloud_hypervisor`]), the choice of accelerator ([`accel`]: KVM where a
//! probe guest really boots, TCG otherwise), every VM's run directory
//! ([`rundir`]), crash recovery at start-up ([`recovery`]), and the client of
//! each guest's agent ([`guest`]), light sleep and wake, template snapshots
//! and warm pools (with the on-disk formats of `somna-snapshotter`), and
//! the jail every VMM runs in ([`jail`]: own uid, namespaces, cgroup).
//! [`Agent`] ties them together: create, exec, files, sleep, wake and
//! destroy of [`SandboxInfo`]s.

pub mod accel;
pub mod agent;
pub mod config;
pub mod driver;
pub mod error;
pub mod exec;
pub mod fault;
pub mod guest;
pub mod images;
pub mod jail;
mod launch;
mod lifecycle;
mod network;
mod pool;
pub mod process;
pub mod record;
pub mod recovery;
pub mod rundir;
pub mod sandbox;
mod templates;
pub mod transfer;
pub mod vmm;

pub use accel::{AccelChoice, AccelMode};
pub use agent::{Agent, HostInfo, PoolInfo, TemplateInfo};
pub use config::{
    AgentConfig, ChannelMode, GuestArtifacts, SandboxLimits, TemplateMemory, VmmKind, WarmPoolSpec,
};
pub use error::AgentError;
pub use images::PulledImage;
pub use jail::{CgroupLayout, JailConfig, Limits as VmmLimits, VmmFiles};
pub use network::{ActivityGuard, PortConnection};
pub use sandbox::{SandboxInfo, SandboxRequest, SandboxState, StartMode};
pub use somna_netd::{Counters as NetworkCounters, EgressPolicy, NetdConfig};
pub use transfer::TransferLimits;
pub use vmm::{Accelerator, ChannelKind, DiskIoLimit};
