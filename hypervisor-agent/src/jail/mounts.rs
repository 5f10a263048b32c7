//! The jail's file system: a private mount namespace whose root is a fresh
//! tmpfs holding `/usr` (read-only), a few device nodes and bind mounts of
//! the VM's own files at their host paths (so the VMM's command line is the
//! same jailed or not). Planned in the parent as a list of steps over
//! prepared C strings; carried out in the child with bare system calls.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use super::{JailError, cstring};

enum Step {
    Mkdir(CString),
    /// An empty file to bind a file onto.
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
        owner: Option<(u32, u32)>,
    },
}

pub(super) struct MountPlan {
    root: CString,
    root_path: PathBuf,
    steps: Vec<Step>,
    /// Host paths already created in the jail, to skip duplicates.
    made: std::collections::HashSet<PathBuf>,
    bound: std::collections::HashSet<PathBuf>,
}

impl MountPlan {
    pub(super) fn new(root: &Path) -> Result<Self, JailError> {
        Ok(MountPlan {
            root: cstring(root)?,
            root_path: root.to_path_buf(),
            steps: Vec::new(),
            made: Default::default(),
            bound: Default::default(),
        })
    }

    fn inside(&self, p: &Path) -> PathBuf {
        self.root_path.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn mkdirs(&mut self, p: &Path) -> Result<(), JailError> {
        let mut acc = PathBuf::from("/");
        for c in p.components().skip(1) {
            acc.push(c);
            if self.made.insert(acc.clone()) {
                let inside = self.inside(&acc);
                self.steps.push(Step::Mkdir(cstring(&inside)?));
            }
        }
        Ok(())
    }

    /// Makes host path `p` visible at the same path in the jail.
    pub(super) fn bind(&mut self, p: &Path, read_only: bool) -> Result<(), JailError> {
        if !self.bound.insert(p.to_path_buf()) {
            return Ok(());
        }
        let meta = std::fs::metadata(p).map_err(JailError::io("inspect", p))?;
        if meta.is_dir() {
            self.mkdirs(p)?;
        } else {
            if let Some(parent) = p.parent() {
                self.mkdirs(parent)?;
            }
            if self.made.insert(p.to_path_buf()) {
                self.steps.push(Step::Touch(cstring(&self.inside(p))?));
            }
        }
        self.steps.push(Step::Bind {
            src: cstring(p)?,
            dst: cstring(&self.inside(p))?,
            read_only,
        });
        Ok(())
    }

    /// What any dynamically linked VMM needs: `/usr` (binaries, libraries,
    /// firmware), the merged-/usr links, the loader cache, and `binary` if
    /// it lives elsewhere.
    pub(super) fn system(&mut self, binary: &Path) -> Result<(), JailError> {
        self.bind(Path::new("/usr"), true)?;
        for top in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => {
                    self.made.insert(host.clone());
                    self.steps.push(Step::Symlink {
                        target: cstring(&target)?,
                        link: cstring(&self.inside(&host))?,
                    });
                }
                // A real directory (no merged /usr): read-only too.
                Err(_) if host.is_dir() => self.bind(&host, true)?,
                Err(_) => {}
            }
        }
        let cache = Path::new("/etc/ld.so.cache");
        if cache.exists() {
            self.bind(cache, true)?;
        }
        let resolved = if binary.is_absolute() {
            Some(binary.to_path_buf())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(binary))
                    .find(|p| p.is_file())
            })
        };
        if let Some(b) = resolved
            && !b.starts_with("/usr")
        {
            self.bind(&b, true)?;
        }
        Ok(())
    }

    /// `/dev` with null, zero, full, random, urandom, and (owned by the
    /// VMM's uid) kvm and vhost-vsock when the VM uses them.
    pub(super) fn devices(
        &mut self,
        uid: u32,
        gid: u32,
        kvm: bool,
        vsock: bool,
    ) -> Result<(), JailError> {
        self.mkdirs(Path::new("/dev"))?;
        let mut node = |name: &str, major: u32, minor: u32, owner: Option<(u32, u32)>| {
            let path = self.inside(&Path::new("/dev").join(name));
            self.steps.push(Step::Mknod {
                path: cstring(&path)?,
                dev: libc::makedev(major, minor),
                owner,
            });
            Ok::<(), JailError>(())
        };
        node("null", 1, 3, None)?;
        node("zero", 1, 5, None)?;
        node("full", 1, 7, None)?;
        node("random", 1, 8, None)?;
        node("urandom", 1, 9, None)?;
        if kvm {
            node("kvm", 10, 232, Some((uid, gid)))?;
        }
        if vsock {
            node("vhost-vsock", 10, 241, Some((uid, gid)))?;
        }
        Ok(())
    }

    /// Creates the namespaces, builds the root and pivots into it.
    ///
    /// # Safety
    /// Only between fork and exec.
    pub(super) unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY (whole function): plain system calls on C strings that
        // outlive the call; the child is single-threaded.
        unsafe {
            let flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            check(libc::unshare(flags), "unshare namespaces")?;
            // Nothing done here may reach the host's mount table.
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "make mounts private",
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID,
                    c"size=1m,mode=0755".as_ptr().cast(),
                ),
                "mount the jail's root",
            )?;
            for step in &self.steps {
                run(step)?;
            }
            check(libc::chdir(self.root.as_ptr()), "enter the jail's root")?;
            // pivot_root(".", "."): the old root ends up on top of the new
            // one and is detached at once.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32,
                "pivot_root",
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                "detach the host's root",
            )?;
            check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                ),
                "make the jail's root read-only",
            )?;
        }
        Ok(())
    }
}

/// # Safety
/// Only between fork and exec.
unsafe fn run(step: &Step) -> std::io::Result<()> {
    // SAFETY: system calls on prepared C strings.
    unsafe {
        match step {
            Step::Mkdir(p) => {
                if libc::mkdir(p.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(failed("create a directory", last()));
                }
            }
            Step::Touch(p) => {
                let fd = libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd, "create a bind mount point")?;
                libc::close(fd);
            }
            Step::Symlink { target, link } => {
                check(
                    libc::symlink(target.as_ptr(), link.as_ptr()),
                    "create a link",
                )?;
            }
            Step::Bind {
                src,
                dst,
                read_only,
            } => {
                check(
                    libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                    "bind a VM file",
                )?;
                let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
                if *read_only {
                    flags |= libc::MS_RDONLY;
                }
                check(
                    libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ),
                    "restrict a bind mount",
                )?;
            }
            Step::Mknod { path, dev, owner } => {
                check(
                    libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, *dev),
                    "create a device node",
                )?;
                if let Some((uid, gid)) = owner {
                    check(libc::chown(path.as_ptr(), *uid, *gid), "own a device node")?;
                    check(libc::chmod(path.as_ptr(), 0o600), "restrict a device node")?;
                }
                // mknod honours the umask; the shared nodes must be 0666.
                if owner.is_none() {
                    check(libc::chmod(path.as_ptr(), 0o666), "open a device node")?;
                }
            }
        }
    }
    Ok(())
}

/// Writes the calling process's pid into `procs` (a `cgroup.procs`).
///
/// # Safety
/// Only between fork and exec.
pub(super) unsafe fn join_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: open/write/close on a prepared path and a stack buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(last());
        }
        let mut buf = [0u8; 16];
        let n = format_u32(libc::getpid() as u32, &mut buf);
        let written = libc::write(fd, buf.as_ptr().cast(), n);
        let err = last();
        libc::close(fd);
        if written != n as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// Drops every capability (bounding set included) and the root identity,
/// and sets `no_new_privs`.
///
/// # Safety
/// Only between fork and exec.
pub(super) unsafe fn drop_privileges(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: plain system calls.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability this kernel knows.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(failed("drop a capability", last()));
            }
        }
        check(libc::setgroups(0, std::ptr::null()), "clear groups")?;
        check(libc::setresgid(gid, gid, gid), "set the VMM's gid")?;
        // From root to a uid without SECBIT_KEEP_CAPS: the permitted,
        // effective and ambient sets are cleared too.
        check(libc::setresuid(uid, uid, uid), "set the VMM's uid")?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "set no_new_privs",
        )?;
    }
    Ok(())
}

fn format_u32(mut v: u32, buf: &mut [u8; 16]) -> usize {
    let mut tmp = [0u8; 16];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = tmp[n - 1 - i];
    }
    n
}

fn last() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn check(rc: i32, what: &'static str) -> std::io::Result<()> {
    if rc < 0 {
        return Err(failed(what, last()));
    }
    Ok(())
}

/// Tells the VMM log which step failed (the spawn error carries only the
/// errno) and passes the error on.
pub(super) fn failed(what: &'static str, e: std::io::Error) -> std::io::Error {
    let prefix = b"somna jail: cannot ";
    // SAFETY: write(2) to stderr, the VMM log; async-signal-safe.
    unsafe {
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, what.as_ptr().cast(), what.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_pids() {
        let mut buf = [0u8; 16];
        for v in [0u32, 7, 10, 4_294_967_295] {
            let n = format_u32(v, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), v.to_string());
        }
    }

    #[test]
    fn plan_creates_parents_once_and_binds_at_host_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a/b/disk");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let mut plan = MountPlan::new(Path::new("/jail")).unwrap();
        plan.bind(&file, true).unwrap();
        plan.bind(&file, true).unwrap();
        let binds: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind {
                    src,
                    dst,
                    read_only,
                } => Some((src.clone(), dst.clone(), *read_only)),
                _ => None,
            })
            .collect();
        assert_eq!(binds.len(), 1, "a path is bound once");
        assert_eq!(binds[0].0.to_str().unwrap(), file.to_str().unwrap());
        assert_eq!(
            binds[0].1.to_str().unwrap(),
            format!("/jail{}", file.display())
        );
        let mkdirs = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Mkdir(_)))
            .count();
        assert_eq!(mkdirs, file.parent().unwrap().components().count() - 1);
    }
}
