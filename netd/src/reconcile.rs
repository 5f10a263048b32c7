//! Host-wide setup and teardown of one netd instance, by name: what
//! start-up uses to remove a crashed run's leftovers, and shutdown to leave
//! the host as it found it.
//!
//! Everything is found by the instance's prefix (`<prefix>-s<N>`
//! namespaces, `<prefix>-h<N>` veths, `<prefix>-svc`, table `ip <prefix>`,
//! `<state_dir>/<prefix>/`), never by a broader pattern.

use std::{fs, io::ErrorKind};

use tracing::{info, warn};

use crate::{
    Egress, NetdConfig,
    contract::GUEST_MTU,
    error::{NetError, Result},
    layout::Layout,
    nft,
    slot::{self, conntrack_delete, log_removed},
    sys,
};

/// Removes everything of this instance that exists: pinned programs,
/// slots, links, the nftables table, conntrack entries of the host subnet;
/// restores recorded sysctls. `what` is for the log ("leftover").
pub(crate) fn teardown(cfg: &NetdConfig, layout: &Layout, what: &str) -> Result<()> {
    let mut first_err: Option<NetError> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            warn!(error = %e, "netd: teardown step failed");
            first_err.get_or_insert(e);
        }
    };

    // Pins first: unpinning detaches TCX programs from devices that may
    // outlive this step.
    note(remove_pins(layout, what));

    let mut removed = Vec::new();
    match sys::named_netns() {
        Ok(names) => {
            for name in names {
                if let Some(idx) = layout.parse_netns(&name) {
                    note(slot::remove_devices(layout, idx));
                    removed.push(name);
                }
            }
        }
        Err(e) => note(Err(e)),
    }
    log_removed(&format!("{what} slot namespaces"), &removed);

    let mut removed = Vec::new();
    match sys::host_links() {
        Ok(links) => {
            for link in links {
                let svc = layout.service_link();
                if layout.parse_host_veth(&link).is_some()
                    || link == svc
                    || link == format!("{svc}p")
                {
                    note(slot::delete_link(&link));
                    removed.push(link);
                }
            }
        }
        Err(e) => note(Err(e)),
    }
    log_removed(&format!("{what} links"), &removed);

    match nft::delete_table(layout.nft_table()) {
        Ok(true) => info!(
            table = layout.nft_table(),
            "netd: removed {what} nftables table"
        ),
        Ok(false) => {}
        Err(e) => note(Err(e)),
    }

    let net = cfg.host_subnet.addr().to_string();
    let mask = cfg.host_subnet.netmask().to_string();
    note(conntrack_delete(&["-D", "-s", &net, "--mask-src", &mask]));
    note(conntrack_delete(&["-D", "-d", &net, "--mask-dst", &mask]));

    note(restore_sysctls(layout));
    note(unmount_bpffs(layout));
    match fs::remove_dir(&layout.state_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => note(Err(NetError::io(
            format!("removing {}", layout.state_dir.display()),
            e,
        ))),
    }
    first_err.map_or(Ok(()), Err)
}

fn remove_pins(layout: &Layout, what: &str) -> Result<()> {
    let dir = layout.bpffs();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError::io(format!("listing {}", dir.display()), e)),
    };
    let mut n = 0;
    for e in entries.flatten() {
        // Only our pins (`s<N>-<which>`); bpffs has files of its own
        // (progs.debug, maps.debug).
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('s') && name.contains('-')) {
            continue;
        }
        fs::remove_file(e.path())
            .map_err(|err| NetError::io(format!("unpinning {}", e.path().display()), err))?;
        n += 1;
    }
    if n > 0 {
        info!(count = n, "netd: unpinned {what} eBPF links");
    }
    Ok(())
}

/// Mounts this instance's private bpffs (pins live there).
pub(crate) fn mount_bpffs(layout: &Layout) -> Result<()> {
    let dir = layout.bpffs();
    fs::create_dir_all(&dir).map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
    if sys::fs_type(&dir).map_err(|e| NetError::io(format!("statfs {}", dir.display()), e))?
        == sys::BPF_FS_MAGIC
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        &dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        NetError::Unsupported(format!(
            "mounting a bpf filesystem at {}: {e} (needs CONFIG_BPF_SYSCALL and CAP_SYS_ADMIN)",
            dir.display()
        ))
    })
}

fn unmount_bpffs(layout: &Layout) -> Result<()> {
    let dir = layout.bpffs();
    match sys::fs_type(&dir) {
        Ok(t) if t == sys::BPF_FS_MAGIC => {
            nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| NetError::io(format!("unmounting {}", dir.display()), e.into()))?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError::io(format!("statfs {}", dir.display()), e)),
    }
    match fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(format!("removing {}", dir.display()), e)),
    }
}

/// Host-wide pieces: forwarding (recorded first, restored at teardown), the
/// service link with the service and health-check addresses, the nftables
/// table.
pub(crate) fn host_setup(cfg: &NetdConfig, layout: &Layout) -> Result<()> {
    let forwarding = match &cfg.egress {
        Egress::Any => "net.ipv4.ip_forward".to_string(),
        Egress::Interface(name) => format!("net.ipv4.conf.{name}.forwarding"),
    };
    let before = sys::sysctl_read(&forwarding)?;
    if before != "1" {
        let record = layout.sysctl_record();
        fs::write(&record, format!("{forwarding}={before}\n"))
            .map_err(|e| NetError::io(format!("writing {}", record.display()), e))?;
        sys::sysctl_write(&forwarding, "1")?;
        info!(sysctl = %forwarding, previous = %before, "netd: enabled forwarding (restored at shutdown)");
    }

    // A veth pair rather than a dummy link: every kernel has veth (not all
    // have CONFIG_DUMMY). The peer is a dead end; deleting one end deletes
    // both.
    let svc = layout.service_link();
    let peer = format!("{svc}p");
    sys::run(
        "ip",
        &[
            "link",
            "add",
            &svc,
            "mtu",
            &GUEST_MTU.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ],
        None,
    )?;
    sys::sysctl_write(&format!("net.ipv6.conf.{svc}.disable_ipv6"), "1")?;
    sys::sysctl_write(&format!("net.ipv6.conf.{peer}.disable_ipv6"), "1")?;
    sys::run(
        "ip",
        &["-batch", "-"],
        Some(&format!(
            "addr add {}/32 dev {svc}\naddr add {}/32 dev {svc}\nlink set {peer} up\nlink set {svc} up\n",
            layout.service_ip(),
            layout.health_ip()
        )),
    )?;
    nft::load(&nft::host_ruleset(cfg, layout))
}

fn restore_sysctls(layout: &Layout) -> Result<()> {
    let record = layout.sysctl_record();
    let text = match fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError::io(format!("reading {}", record.display()), e)),
    };
    for line in text.lines() {
        if let Some((name, value)) = line.split_once('=') {
            match sys::sysctl_write(name, value) {
                Ok(()) => info!(sysctl = name, value, "netd: restored sysctl"),
                // The interface may be gone (and its setting with it).
                Err(NetError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    fs::remove_file(&record).map_err(|e| NetError::io(format!("removing {}", record.display()), e))
}
