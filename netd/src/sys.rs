//! Host plumbing: running `ip`/`nft`/`conntrack`, entering network
//! namespaces, sysctls, capabilities.

use std::{
    fs::File,
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use nix::sched::{CloneFlags, setns};

use crate::error::{NetError, Result};

/// Runs `program args...`, feeding `stdin` when given; fails with the
/// command line and its stderr.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let line = || format!("{program} {}", args.join(" "));
    let exe = find_tool(program).unwrap_or_else(|| program.into());
    let mut child = Command::new(exe)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::io(format!("cannot run `{}`", line()), e))?;
    if let Some(input) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(input.as_bytes())
            .map_err(|e| NetError::io(format!("writing to `{}`", line()), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::io(format!("waiting for `{}`", line()), e))?;
    if !out.status.success() {
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(input) = stdin {
            detail.push_str(&format!("\ninput was:\n{input}"));
        }
        if detail.is_empty() {
            detail = out.status.to_string();
        }
        return Err(NetError::Command {
            command: line(),
            detail,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered the network namespace at
/// `netns` (a `/run/netns/NAME` path). Sockets and devices `f` opens belong
/// to that namespace; children it spawns start in it. The caller's thread
/// never changes namespace.
pub(crate) fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = File::open(netns)
        .map_err(|e| NetError::io(format!("opening network namespace {}", netns.display()), e))?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::io(
                    format!("entering network namespace {}", netns.display()),
                    e.into(),
                )
            })?;
            f()
        });
        handle.join().unwrap_or_else(|_| {
            Err(NetError::io(
                format!("a thread working in {} panicked", netns.display()),
                std::io::Error::other("panic"),
            ))
        })
    })
}

/// Writes a sysctl (`net.ipv4.ip_forward` form) in the calling thread's
/// network namespace.
pub(crate) fn sysctl_write(name: &str, value: &str) -> Result<()> {
    let path = sysctl_path(name);
    std::fs::write(&path, value)
        .map_err(|e| NetError::io(format!("setting {name}={value} ({})", path.display()), e))
}

pub(crate) fn sysctl_read(name: &str) -> Result<String> {
    let path = sysctl_path(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| NetError::io(format!("reading {name} ({})", path.display()), e))
}

fn sysctl_path(name: &str) -> std::path::PathBuf {
    // Interface names may contain dots only in theory; ours never do.
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

/// The index of interface `name` in the calling thread's namespace.
pub(crate) fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| NetError::invalid("interface", format!("{name:?} contains a NUL byte")))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(NetError::io(
            format!("looking up interface {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(idx)
}

/// Interfaces of the host namespace (from sysfs).
pub(crate) fn host_links() -> Result<Vec<String>> {
    let dir = std::fs::read_dir("/sys/class/net")
        .map_err(|e| NetError::io("listing /sys/class/net", e))?;
    Ok(dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// Network namespaces named in /run/netns.
pub(crate) fn named_netns() -> Result<Vec<String>> {
    match std::fs::read_dir("/run/netns") {
        Ok(dir) => Ok(dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(NetError::io("listing /run/netns", e)),
    }
}

/// Capabilities of the calling thread (effective set, bits by number).
pub(crate) fn effective_caps() -> std::io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header reads two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_BPF: u32 = 39;

/// `statfs(path).f_type`.
pub(crate) fn fs_type(path: &Path) -> std::io::Result<i64> {
    let st = nix::sys::statfs::statfs(path)?;
    Ok(st.filesystem_type().0 as i64)
}

pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where `tool` is: `$PATH`, then the sbin directories (root's tools may be
/// missing from a non-login `$PATH`).
pub(crate) fn find_tool(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(std::path::PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn sockaddr(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from `local` (port 0: any) to `remote`, failing after
/// `timeout` (the connect honours `SO_SNDTIMEO`).
pub(crate) fn connect_from(
    local: std::net::SocketAddrV4,
    remote: std::net::SocketAddrV4,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sa = sockaddr(local);
    // SAFETY: `sa` is a valid sockaddr_in of length `len`.
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const sa).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_SNDTIMEO takes a timeval.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ra = sockaddr(remote);
    // SAFETY: `ra` is a valid sockaddr_in of length `len`.
    if unsafe { libc::connect(sock.as_raw_fd(), (&raw const ra).cast(), len) } < 0 {
        let e = std::io::Error::last_os_error();
        // A connect that times out reports EINPROGRESS.
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ));
        }
        return Err(e);
    }
    Ok(std::net::TcpStream::from(sock))
}
