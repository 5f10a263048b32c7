//! Fault injection for crash-consistency tests: with `SOMNA_FAULT=<point>`
//! in its environment the process SIGKILLs itself when it reaches that
//! named point, exactly like a crash there. Unset (always, outside tests),
//! a point costs one comparison.
//!
//! Points: `create.booted` (VMM up, sandbox not yet running),
//! `exec.started` (guest process started, output not yet relayed),
//! `sleep.state_saved` (VM state written, VMM still alive),
//! `sleep.sealed` (snapshot sealed, state not yet `sleeping`),
//! `wake.restored` (VMM restored, guest not yet woken),
//! `destroy.vmm_stopped` (VMM gone, run directory still there).
//!
//! The control plane's own points (`controlplane.create.recorded`, ...,
//! see `somna_controlplane::ControlPlaneConfig::fault`) go through here too.

use std::sync::OnceLock;

static FAULT: OnceLock<Option<String>> = OnceLock::new();

/// Crashes the process here if `SOMNA_FAULT` names `point`.
pub fn point(point: &str) {
    let armed = FAULT.get_or_init(|| std::env::var("SOMNA_FAULT").ok().filter(|s| !s.is_empty()));
    if armed.as_deref() == Some(point) {
        tracing::error!(point, "SOMNA_FAULT: crashing here (SIGKILL)");
        // SAFETY: kill(2) on ourselves.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
