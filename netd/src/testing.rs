//! Test and benchmark support, not for production: a network namespace that
//! plays the internet, and a stand-in for a VM that attaches to a slot's TAP
//! exactly like a VMM does, so test traffic really crosses the TAP and every
//! program.
//!
//! [`GuestStandIn`] gives the "guest" a kernel network stack of its own: a
//! namespace with a TAP `eth0` configured per the [guest
//! contract](crate::contract), and two relay threads copying Ethernet frames
//! between that TAP and the slot's TAP (what a VMM's virtio-net backend
//! does). Test code then uses ordinary sockets inside the guest namespace.
//! Raw frames (spoofing tests) go straight into the slot's TAP with
//! [`GuestStandIn::inject`].
//!
//! Everything created here carries the caller's `somna...` prefix and is
//! removed on drop, also when a test fails.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    Egress, Ipv4Cidr, Slot,
    contract::{GATEWAY_IP, GUEST_IP, GUEST_MAC, GUEST_MTU, GUEST_PREFIX_LEN, mac_string},
    error::{NetError, Result},
    slot::delete_link,
    sys, tap,
};

/// Polls `cond` every 2 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `f` on a thread inside the network namespace at `netns` (for
/// example [`Slot::netns_path`]): sockets it opens live there.
pub fn in_netns<T: Send>(
    netns: &std::path::Path,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    sys::in_netns(netns, f)
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn check_prefix(prefix: &str) -> Result<()> {
    if !prefix.starts_with("somna") || prefix.len() > 9 {
        return Err(NetError::invalid(
            "prefix",
            format!("{prefix:?}: test objects need a somna prefix of at most 9 characters"),
        ));
    }
    Ok(())
}

/// A namespace playing the internet, reachable from the host only through
/// a veth pair (`<prefix>-up` on the host): use
/// [`Internet::egress`] as netd's egress so that sandbox traffic leaves
/// only toward it.
#[derive(Debug)]
pub struct Internet {
    netns: String,
    uplink: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
}

impl Internet {
    /// Creates `<prefix>-inet` with address `.2` of `net` (a /30, e.g. from
    /// 203.0.113.0/24, which no real network uses), the host side `.1`.
    pub fn create(prefix: &str, net: Ipv4Cidr) -> Result<Self> {
        check_prefix(prefix)?;
        if net.prefix_len() != 30 {
            return Err(NetError::invalid("net", format!("{net} must be a /30")));
        }
        let me = Internet {
            netns: format!("{prefix}-inet"),
            uplink: format!("{prefix}-up"),
            host_addr: net.nth(1),
            addr: net.nth(2),
        };
        me.setup()?;
        Ok(me)
    }

    fn setup(&self) -> Result<()> {
        let (ns, up) = (&self.netns, &self.uplink);
        sys::run(
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "netns add {ns}\nlink add {up} type veth peer name eth0 netns {ns}\n"
            )),
        )?;
        sys::sysctl_write(&format!("net.ipv6.conf.{up}.disable_ipv6"), "1")?;
        sys::run(
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "addr add {}/30 dev {up}\nlink set {up} up\n",
                self.host_addr
            )),
        )?;
        let addr = self.addr;
        sys::in_netns(&netns_path(ns), || {
            sys::sysctl_write("net.ipv6.conf.all.disable_ipv6", "1")?;
            sys::run(
                "ip",
                &["-batch", "-"],
                Some(&format!(
                    "link set lo up\naddr add {addr}/30 dev eth0\nlink set eth0 up\n"
                )),
            )
            .map(|_| ())
        })
    }

    /// The egress setting that sends sandbox traffic here and nowhere else.
    pub fn egress(&self) -> Egress {
        Egress::Interface(self.uplink.clone())
    }

    /// The "internet" server address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's own address on the uplink (a host address sandboxes must
    /// not reach).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// Runs `f` inside the internet namespace (sockets it makes live there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        sys::in_netns(&netns_path(&self.netns), f)
    }

    /// A TCP listener on the internet address.
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        let a = SocketAddrV4::new(self.addr, port);
        self.run(|| TcpListener::bind(a).map_err(|e| NetError::io(format!("binding {a}"), e)))
    }

    /// A UDP socket on the internet address.
    pub fn udp(&self, port: u16) -> Result<UdpSocket> {
        let a = SocketAddrV4::new(self.addr, port);
        self.run(|| UdpSocket::bind(a).map_err(|e| NetError::io(format!("binding {a}"), e)))
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = delete_link(&self.uplink);
        let _ = sys::run("ip", &["netns", "del", &self.netns], None);
    }
}

/// A stand-in for a VM on a slot: see the module documentation.
pub struct GuestStandIn {
    netns: String,
    slot_tap: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for GuestStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStandIn")
            .field("netns", &self.netns)
            .finish()
    }
}

impl GuestStandIn {
    /// Attaches to the slot's TAP (its carrier comes up) and builds the
    /// guest namespace `name` (a `somna...` name).
    pub fn attach(lease: &Slot, name: &str) -> Result<Self> {
        check_prefix(name.split('-').next().unwrap_or_default())?;
        let slot_tap = Arc::new(lease.open_tap(false)?);
        sys::run("ip", &["netns", "add", name], None)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = GuestStandIn {
            netns: name.to_string(),
            slot_tap,
            stop,
            relays: Vec::new(),
        };
        let guest_tap = sys::in_netns(&netns_path(name), || {
            sys::sysctl_write("net.ipv6.conf.all.disable_ipv6", "1")?;
            sys::sysctl_write("net.ipv6.conf.default.disable_ipv6", "1")?;
            let fd = tap::open_tap_here("eth0", false)?;
            sys::run(
                "ip",
                &["-batch", "-"],
                Some(&format!(
                    "link set lo up\n\
                     link set eth0 address {mac} mtu {GUEST_MTU}\n\
                     link set eth0 up\n\
                     addr add {GUEST_IP}/{GUEST_PREFIX_LEN} dev eth0\n\
                     route add default via {GATEWAY_IP}\n",
                    mac = mac_string(&GUEST_MAC),
                )),
            )?;
            Ok(fd)
        })?;
        let guest_tap = Arc::new(guest_tap);
        for (from, to) in [
            (guest_tap.clone(), me.slot_tap.clone()),
            (me.slot_tap.clone(), guest_tap),
        ] {
            let stop = me.stop.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-relay"))
                .spawn(move || relay(&from, &to, &stop))
                .map_err(|e| NetError::io("starting a relay thread", e))?;
            me.relays.push(h);
        }
        Ok(me)
    }

    /// Runs `f` inside the guest namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        sys::in_netns(&netns_path(&self.netns), f)
    }

    /// A TCP connection from the guest, or the error (timeout when the
    /// packets are dropped).
    pub fn connect(
        &self,
        to: SocketAddrV4,
        timeout: Duration,
    ) -> Result<std::io::Result<TcpStream>> {
        self.run(|| {
            Ok(sys::connect_from(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                to,
                timeout,
            ))
        })
    }

    /// Whether a TCP connection from the guest to `to` completes and echoes
    /// one message back within `timeout`.
    pub fn can_echo(&self, to: SocketAddrV4, timeout: Duration) -> Result<bool> {
        let Ok(mut s) = self.connect(to, timeout)? else {
            return Ok(false);
        };
        Ok(echo_once(&mut s, timeout))
    }

    /// A UDP socket in the guest.
    pub fn udp(&self) -> Result<UdpSocket> {
        self.run(|| {
            UdpSocket::bind("0.0.0.0:0").map_err(|e| NetError::io("binding a guest UDP socket", e))
        })
    }

    /// A TCP listener in the guest.
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        self.run(|| {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                .map_err(|e| NetError::io(format!("binding guest port {port}"), e))
        })
    }

    /// Writes a raw Ethernet frame into the slot's TAP, as a guest would.
    pub fn inject(&self, frame: &[u8]) -> std::io::Result<()> {
        let n = nix::unistd::write(self.slot_tap.as_fd(), frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other("short write to the TAP"));
        }
        Ok(())
    }
}

impl Drop for GuestStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.relays.drain(..) {
            let _ = h.join();
        }
        let _ = sys::run("ip", &["netns", "del", &self.netns], None);
    }
}

/// Copies frames `from` -> `to` until `stop`.
fn relay(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [nix::poll::PollFd::new(
            from.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u8)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        // SAFETY: reading into our buffer from an fd we keep alive.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        // A frame the other side refuses (e.g. its device is going away)
        // is dropped, as on a wire.
        let _ = nix::unistd::write(to.as_fd(), &buf[..n as usize]);
    }
}

/// Sends one message and expects it back.
pub fn echo_once(s: &mut TcpStream, timeout: Duration) -> bool {
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let msg = b"somna-netd echo";
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut back = [0u8; 15];
    s.read_exact(&mut back).is_ok() && &back == msg
}

/// A TCP server on a thread: echoes every connection until told to stop
/// (on drop).
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddrV4,
}

impl TcpServer {
    /// Serves `listener`: every connection is echoed back (`echo`) or read
    /// and discarded (`!echo`).
    pub fn spawn(listener: TcpListener, echo: bool) -> Result<Self> {
        let addr = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            Ok(a) => return Err(NetError::invalid("listener", format!("{a} is not IPv4"))),
            Err(e) => return Err(NetError::io("listener address", e)),
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| NetError::io("listener nonblocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("somna-test-server".into())
            .spawn(move || serve(listener, echo, &stop2))
            .map_err(|e| NetError::io("starting a server thread", e))?;
        Ok(TcpServer {
            stop,
            thread: Some(thread),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, echo: bool, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if !matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u8)), Ok(n) if n > 0)
        {
            continue;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = s.set_nodelay(true);
        conns.retain(|h| !h.is_finished());
        let stop = stop.clone();
        // A connection ends with the peer, or when the server stops.
        conns.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if echo && s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    for h in conns {
        let _ = h.join();
    }
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let csum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// An ARP request (`who has target? tell sender`), broadcast.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip.octets());
    f
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_checksum_verifies() {
        let f = udp_frame(
            [2; 6],
            [4; 6],
            "172.16.0.2:1000".parse().unwrap(),
            "203.0.113.2:2000".parse().unwrap(),
            b"hi",
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 2);
        // A header with its checksum in place sums to zero.
        assert_eq!(ip_checksum(&f[14..34]), 0);
    }
}
