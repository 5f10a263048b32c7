//! Guest networking the agent owns (there are no network tools in the
//! guest): the loopback interface, and eth0 when the VM has a network
//! device (address, MTU, default route from the kernel command line).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::cmdline::NetConfig;

/// The virtio-net device's interface.
pub const GUEST_NIC: &str = "eth0";

/// Sets `lo` up with SIOCGIFFLAGS / SIOCSIFFLAGS.
pub fn loopback_up() -> io::Result<()> {
    set_up(&inet_socket()?, "lo")
}

/// Configures `nic`: waits for it to appear, sets address, netmask and MTU,
/// brings it up and adds the default route through the gateway.
pub fn configure(nic: &str, config: &NetConfig, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let sys = Path::new("/sys/class/net").join(nic);
    while !sys.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {nic} after {timeout:?} (is virtio_net loaded?)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let sock = inet_socket()?;
    let mask = prefix_mask(config.prefix_len);
    let mut ifr = ifreq(nic);
    set_sockaddr(&mut ifr, config.ip);
    ioctl(&sock, libc::SIOCSIFADDR, &mut ifr)?;
    let mut ifr = ifreq(nic);
    set_sockaddr(&mut ifr, mask);
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut ifr)?;
    let mut ifr = ifreq(nic);
    ifr.ifr_ifru.ifru_mtu = i32::from(config.mtu);
    ioctl(&sock, libc::SIOCSIFMTU, &mut ifr)?;
    set_up(&sock, nic)?;
    add_default_route(&sock, nic, config.gateway)
}

fn inet_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the
    // kernel reads the AF_INET form back out of it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_sockaddr(ifr: &mut libc::ifreq, addr: Ipv4Addr) {
    ifr.ifr_ifru.ifru_addr = sockaddr_in(addr);
}

fn prefix_mask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0),
    )
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the SIOC[GS]IF* requests read and write an ifreq, which
    // outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, ifr as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut ifr = ifreq(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: after SIOCGIFFLAGS the flags member is the initialised one.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(sock, libc::SIOCSIFFLAGS, &mut ifr)
}

fn add_default_route(sock: &OwnedFd, nic: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev = std::ffi::CString::new(nic)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?
        .into_bytes_with_nul();
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr() as *mut libc::c_char;
    // SAFETY: SIOCADDRT reads the rtentry and the device name it points
    // to; both outlive the call.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            &rt as *const libc::rtentry,
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(prefix_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_mask(32), Ipv4Addr::BROADCAST);
    }
}
