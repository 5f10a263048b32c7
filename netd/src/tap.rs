//! Opening a slot's TAP device (what a VMM does, and what the test stand-in
//! for a VM does) and checking whether something holds it.

use std::{
    fs::OpenOptions,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use crate::{
    error::{NetError, Result},
    sys,
};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

fn ifreq(name: &str, flags: i16) -> Result<IfReq> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        pad: [0; 22],
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::invalid(
            "interface",
            format!("{name:?} is not an interface name"),
        ));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(req)
}

/// Opens (attaching to, or creating) TAP `name` in the calling thread's
/// network namespace. With `vnet_hdr` every frame carries a
/// `virtio_net_hdr` (what QEMU's virtio-net wants).
pub(crate) fn open_tap_here(name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| NetError::io("opening /dev/net/tun", e))?;
    let mut flags = IFF_TAP | IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    let mut req = ifreq(name, flags)?;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(NetError::io(
            format!("attaching to TAP {name} (TUNSETIFF)"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file.into())
}

/// Opens the TAP `name` inside the namespace at `netns`.
pub(crate) fn open_tap(netns: &Path, name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    sys::in_netns(netns, || open_tap_here(name, vnet_hdr))
}

/// Opens an existing TAP for a VMM: `name` inside the network namespace at
/// `netns` (a `/run/netns/NAME` path, e.g. [`crate::Slot::netns_path`]), or
/// in the caller's own namespace when `None`. The fd is close-on-exec; with
/// `vnet_hdr` frames carry a `virtio_net_hdr` (QEMU's virtio-net wants it).
pub fn open_vmm_tap(netns: Option<&Path>, name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    match netns {
        Some(ns) => open_tap(ns, name, vnet_hdr),
        None => open_tap_here(name, vnet_hdr),
    }
}

/// Whether the TAP has carrier, i.e. a VMM (or anything) holds it open.
/// Reads the carrier itself (ethtool `GLINK`), not the operational state,
/// which the kernel updates up to a second late.
pub(crate) fn tap_attached(netns: &Path, name: &str) -> Result<bool> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        pad: [u8; 16],
    }
    const ETHTOOL_GLINK: u32 = 0x0000_000a;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    sys::in_netns(netns, || {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::io(
                "socket for SIOCETHTOOL",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh socket we own.
        let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        let mut value = EthtoolValue {
            cmd: ETHTOOL_GLINK,
            data: 0,
        };
        let named = ifreq(name, 0)?;
        let mut req = IfReqData {
            name: named.name,
            data: &mut value,
            pad: [0; 16],
        };
        // SAFETY: SIOCETHTOOL/GLINK writes one ethtool_value through
        // `req.data`, which points at `value`, alive for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
        if rc < 0 {
            return Err(NetError::io(
                format!("reading the carrier of {name}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(value.data != 0)
    })
}
