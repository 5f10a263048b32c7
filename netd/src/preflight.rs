//! Start-up checks: can this host enforce sandbox network isolation? Every
//! missing piece is named in one error; netd never runs without isolation.

use std::path::Path;

use aya::util::KernelVersion;

use crate::{
    Egress, NetdConfig,
    error::{NetError, Result},
    sys,
};

/// Oldest kernel netd supports (LPM tries, bpf_fib_lookup, tc BPF with
/// direct action, per-CPU arrays: all older; 5.10 is the oldest tested
/// LTS line). TCX attachment is used from 6.6 on, tc clsact before.
const MIN_KERNEL: (u8, u8) = (5, 10);

const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
];

pub(crate) fn check(cfg: &NetdConfig) -> Result<()> {
    let mut missing: Vec<String> = Vec::new();

    match sys::effective_caps() {
        Ok(caps) => {
            let has = |c: u32| caps & (1u64 << c) != 0;
            let mut lacking = Vec::new();
            if !has(sys::CAP_NET_ADMIN) {
                lacking.push("CAP_NET_ADMIN");
            }
            if !has(sys::CAP_SYS_ADMIN) {
                lacking.push("CAP_SYS_ADMIN");
            }
            if !has(sys::CAP_BPF) && !has(sys::CAP_SYS_ADMIN) {
                lacking.push("CAP_BPF");
            }
            if !lacking.is_empty() {
                missing.push(format!(
                    "capabilities {} (needed to load eBPF programs and create network \
                     namespaces; run the agent as root)",
                    lacking.join(", ")
                ));
            }
        }
        Err(e) => missing.push(format!("cannot read capabilities: {e}")),
    }

    match KernelVersion::current() {
        Ok(v) if v < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) => missing.push(format!(
            "Linux {}.{} or newer (eBPF tc programs, LPM tries, bpf_fib_lookup); this kernel is older",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        Ok(_) => {}
        Err(e) => missing.push(format!("cannot determine the kernel version: {e}")),
    }

    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        missing.push("eBPF support in the kernel (CONFIG_BPF_SYSCALL)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (CONFIG_TUN; `modprobe tun`)".into());
    }
    for (tool, package) in TOOLS {
        if sys::find_tool(tool).is_none() {
            missing.push(format!("the `{tool}` command (Debian package {package})"));
        }
    }
    if let Egress::Interface(name) = &cfg.egress
        && !sys::host_links()?.contains(name)
    {
        // Bad configuration rather than a host limitation.
        return Err(NetError::invalid(
            "egress",
            format!("interface {name:?} does not exist on this host"),
        ));
    }

    if missing.is_empty() {
        Ok(())
    } else {
        Err(NetError::Unsupported(format!(
            "missing {}",
            missing.join("; ")
        )))
    }
}
