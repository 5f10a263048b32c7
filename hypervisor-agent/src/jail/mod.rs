//! The VMM jail. A guest that escapes its VMM (QEMU or Cloud Hypervisor)
//! lands in a process that runs as its own unprivileged uid, with no
//! capabilities and `no_new_privs`, in its own mount, network, IPC and UTS namespaces where the file system holds
//! only `/usr` (read-only), a minimal `/dev` and the VM's own files, inside
//! a cgroup that caps its CPU, memory, pids and disk I/O; the VMM's own
//! seccomp filter (QEMU's `-sandbox on`, Cloud Hypervisor's default
//! `--seccomp true`) sits on top. The agent opens what needs privilege (the
//! TAP, QEMU's snapshot files) and passes file descriptors.
//!
//! [`Jail`] is per agent: it owns the uid pool, this agent's cgroup subtree
//! and the jail root mount point. [`Jail::prepare`] does the work that
//! needs the parent (allocations, chown, cgroup creation) and returns a
//! [`JailedLaunch`] whose [`JailedLaunch::enter`] runs in the forked child
//! before exec and makes only system calls. [`JailedLaunch`] owns the uid
//! and the cgroup until dropped (after the VMM has exited).

mod cgroup;
mod mounts;
mod uids;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cgroup::{Cgroup, CgroupRoot};
pub use cgroup::{CgroupLayout, Limits};
use mounts::MountPlan;
use uids::{UidLease, UidPool};

use crate::rundir::VmDir;
use crate::vmm::{Accelerator, VmSpec};

/// Errors preparing a jail (in the agent, before the VMM starts).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jail: all {0} VMM uids are in use; raise the pool size or run fewer VMs on this host")]
    UidsExhausted(u32),
    #[error("jail: path {0} contains a NUL byte")]
    BadPath(PathBuf),
}

impl JailError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
        move |source| JailError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a VMM opens by path besides its run directory, disks, kernel and
/// initramfs: each is made visible in its jail.
#[derive(Debug, Clone, Default)]
pub struct VmmFiles<'a> {
    /// The guest RAM file (`spec.memory`; QEMU's `memory-backend-file`).
    pub memory_file: bool,
    /// `/dev/vhost-vsock` (QEMU's vhost-vsock device).
    pub vhost_vsock: bool,
    /// Files or directories it reads (a snapshot to restore from).
    pub read_only: Vec<&'a Path>,
}

/// How VMMs are jailed on this host.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Off: VMMs run as the agent's user in its namespaces (development
    /// only; also off automatically when the agent is not root).
    pub enabled: bool,
    /// First uid of the VMM uid pool (each live VMM gets its own uid; the
    /// pool's gid `uid_base - 1` is shared, for read access to templates).
    pub uid_base: u32,
    pub uid_count: u32,
    /// Per-sandbox cgroup limits; None: no cgroups.
    pub limits: Option<Limits>,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            uid_base: 1_000_000_000,
            uid_count: 65_536,
            limits: Some(Limits::default()),
        }
    }
}

struct Inner {
    uids: UidPool,
    gid: u32,
    cgroups: Option<CgroupRoot>,
    limits: Limits,
    /// An empty directory on the host: each jail mounts its own tmpfs root
    /// here, inside its own mount namespace.
    root: PathBuf,
}

/// This agent's VMM jail. Cheap to clone.
#[derive(Clone)]
pub struct Jail {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jail")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Jail {
    /// No jail: VMMs run as the agent does.
    pub fn disabled() -> Self {
        Jail { inner: None }
    }

    /// Sets up the jail for the agent with data directory `data_dir`:
    /// the jail root mount point and this agent's cgroup subtree (named
    /// after `data_dir`, so several agents on one host keep apart). Removes
    /// whatever a previous agent process with the same data directory left
    /// there (processes killed, cgroups removed).
    pub async fn start(config: &JailConfig, data_dir: &Path) -> Result<Self, JailError> {
        // SAFETY: geteuid has no preconditions.
        if !config.enabled || unsafe { libc::geteuid() } != 0 {
            if config.enabled {
                tracing::warn!("not running as root: VMMs run unjailed");
            }
            return Ok(Jail::disabled());
        }
        let root = data_dir.join("jail-root");
        std::fs::create_dir_all(&root).map_err(JailError::io("create", &root))?;
        let tag = agent_tag(data_dir);
        // Agents sharing a host draw from different parts of the uid range.
        let share = config.uid_count / 16;
        let base = config.uid_base + (tag % 16) * share;
        let cgroups = match &config.limits {
            Some(_) => match CgroupRoot::open(&format!("somna/{tag:08x}")) {
                Ok(c) => {
                    c.remove_leftovers().await;
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no cgroups: VMMs run without CPU/memory/pids/IO limits");
                    None
                }
            },
            None => None,
        };
        if let Some(c) = &cgroups {
            tracing::info!(layout = ?c.layout(), "VMM jail: cgroup limits on");
        }
        Ok(Jail {
            inner: Some(Arc::new(Inner {
                uids: UidPool::new(base, share),
                gid: config.uid_base - 1,
                cgroups,
                limits: config.limits.clone().unwrap_or_default(),
                root,
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Takes a tree a jailed VMM wrote (a Cloud Hypervisor snapshot) back
    /// from it: owned by the agent, readable by the pool's group only, so
    /// that the uid which wrote it can be handed to another VMM without
    /// that VMM owning these files. A no-op when the jail is off.
    pub fn reclaim(&self, path: &Path) -> Result<(), JailError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        reclaim_for_group(path, inner.gid)
    }

    /// Agent shutdown, after every VMM has exited: removes this agent's
    /// cgroup subtree (it is also removed when the last clone of the jail
    /// is dropped).
    pub fn release(&self) {
        if let Some(c) = self.inner.as_ref().and_then(|i| i.cgroups.as_ref()) {
            c.remove_if_empty();
        }
    }

    /// The cgroup layout in use, if any.
    pub fn cgroup_layout(&self) -> Option<CgroupLayout> {
        self.inner
            .as_ref()?
            .cgroups
            .as_ref()
            .map(CgroupRoot::layout)
    }

    /// Prepares the jail for one VMM process running `binary` for `spec`
    /// in `dir`, opening `files` beyond the VM's own: takes a uid, hands
    /// the VM's writable files to it, creates the cgroup with the
    /// sandbox's limits and plans the mounts. None when the jail is
    /// disabled.
    pub fn prepare(
        &self,
        spec: &VmSpec,
        dir: &VmDir,
        binary: &Path,
        files: &VmmFiles<'_>,
    ) -> Result<Option<JailedLaunch>, JailError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let uid = inner
            .uids
            .take()
            .ok_or(JailError::UidsExhausted(inner.uids.size()))?;
        let gid = inner.gid;
        let (u, g) = (uid.uid(), gid);
        let chown = |p: &Path| -> Result<(), JailError> {
            std::os::unix::fs::chown(p, Some(u), Some(g)).map_err(JailError::io("chown", p))
        };
        // The run directory (sockets, logs, the writable disk, RAM) is
        // the VMM's; nothing else there is shared.
        chown_tree(dir.path(), u, g)?;
        let mut plan = MountPlan::new(&inner.root)?;
        plan.system(binary)?;
        plan.devices(
            u,
            g,
            spec.accelerator == Accelerator::Kvm,
            files.vhost_vsock,
        )?;
        plan.bind(&spec.kernel, true)?;
        plan.bind(&spec.initramfs, true)?;
        for disk in &spec.disks {
            if !disk.read_only && !disk.path.starts_with(dir.path()) {
                chown(&disk.path)?;
            }
            plan.bind(&disk.path, disk.read_only)?;
        }
        if files.memory_file {
            let mem = &spec.memory.path;
            if !mem.exists() {
                std::fs::File::create(mem).map_err(JailError::io("create", mem))?;
            }
            if spec.memory.shared {
                chown(mem)?;
            } else {
                // A template's RAM, mapped privately by every clone
                // (`--template-memory shared`; the default gives each clone
                // a copy). QEMU 7.2 opens it read-write even so (8.2 falls
                // back to read-only), so the pool's group may write it: see
                // README "What a guest escape reaches".
                use std::os::unix::fs::PermissionsExt;
                std::os::unix::fs::chown(mem, None, Some(g))
                    .map_err(JailError::io("chown", mem))?;
                std::fs::set_permissions(mem, std::fs::Permissions::from_mode(0o660))
                    .map_err(JailError::io("chmod", mem))?;
            }
            plan.bind(mem, false)?;
        }
        for p in &files.read_only {
            if !p.starts_with(dir.path()) {
                plan.bind(p, true)?;
            }
        }
        plan.bind(dir.path(), false)?;
        let cgroup = match &inner.cgroups {
            Some(root) => {
                let limits = inner.limits.for_vm(spec);
                Some(root.create(&spec.id, &limits)?)
            }
            None => None,
        };
        let procs = cgroup
            .as_ref()
            .map(|c| c.procs_files())
            .transpose()?
            .unwrap_or_default();
        Ok(Some(JailedLaunch {
            uid,
            gid,
            plan,
            procs,
            cgroup,
        }))
    }
}

/// A prepared jail for one VMM process. Dropping it (after the process
/// has exited) removes the cgroup and returns the uid to the pool.
pub struct JailedLaunch {
    uid: UidLease,
    gid: u32,
    plan: MountPlan,
    /// `cgroup.procs` of each hierarchy the VMM joins.
    procs: Vec<CString>,
    cgroup: Option<Cgroup>,
}

impl std::fmt::Debug for JailedLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailedLaunch")
            .field("uid", &self.uid.uid())
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl JailedLaunch {
    pub fn uid(&self) -> u32 {
        self.uid.uid()
    }

    /// The cgroup's directories (one per v1 hierarchy, one on v2).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup.as_ref().map(Cgroup::dirs).unwrap_or_default()
    }

    /// Enters the jail. Runs in the forked child before exec: only system
    /// calls on data prepared by [`Jail::prepare`], no allocation.
    ///
    /// # Safety
    /// Call only between fork and exec (it changes the calling process's
    /// namespaces, root and credentials).
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        for f in &self.procs {
            // SAFETY: a forked child; the function writes its own pid.
            unsafe { mounts::join_cgroup(f) }
                .map_err(|e| mounts::failed("join the VMM's cgroup", e))?;
        }
        // SAFETY: as above.
        unsafe { self.plan.enter() }?;
        // SAFETY: as above.
        unsafe { mounts::drop_privileges(self.uid.uid(), self.gid) }
    }
}

/// Stable per data directory: names this agent's cgroup subtree and picks
/// its share of the uid range.
fn agent_tag(data_dir: &Path) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data_dir.as_os_str().as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// [`Jail::reclaim`] without a jail: the tree becomes the agent's, readable
/// by group `gid` only (crash recovery, before the jail is up, takes back
/// the snapshot of a VMM whose gid it reads from the process).
pub fn reclaim_for_group(path: &Path, gid: u32) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    let agent = unsafe { libc::geteuid() };
    chown_tree(path, agent, gid)?;
    restrict_tree(path)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(JailError::io("chown", path))?;
    let meta = std::fs::symlink_metadata(path).map_err(JailError::io("inspect", path))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(JailError::io("list", path))? {
            let entry = entry.map_err(JailError::io("list", path))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Directories 0750, files 0640 (symlinks untouched).
fn restrict_tree(path: &Path) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).map_err(JailError::io("inspect", path))?;
    let mode = if meta.is_dir() {
        0o750
    } else if meta.is_file() {
        0o640
    } else {
        return Ok(());
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(JailError::io("chmod", path))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(JailError::io("list", path))? {
            let entry = entry.map_err(JailError::io("list", path))?;
            restrict_tree(&entry.path())?;
        }
    }
    Ok(())
}

fn cstring(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[tokio::test]
    async fn reclaim_takes_a_vmm_written_tree_back_from_its_uid() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED reclaim_takes_a_vmm_written_tree_back_from_its_uid: not root");
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let config = JailConfig {
            limits: None,
            ..JailConfig::default()
        };
        let jail = Jail::start(&config, data.path()).await.unwrap();
        // What a jailed VMM leaves: its uid's files, world-readable.
        let out = data.path().join("snapshot.out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("memory-ranges"), b"ram").unwrap();
        std::os::unix::fs::symlink("memory-ranges", out.join("link")).unwrap();
        let vmm_uid = config.uid_base + 7;
        chown_tree(&out, vmm_uid, vmm_uid).unwrap();
        std::fs::set_permissions(
            out.join("memory-ranges"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();

        jail.reclaim(&out).unwrap();
        let gid = config.uid_base - 1;
        for (path, mode) in [(out.clone(), 0o750), (out.join("memory-ranges"), 0o640)] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, gid), "{}", path.display());
            assert_eq!(
                meta.permissions().mode() & 0o777,
                mode,
                "{}",
                path.display()
            );
        }
        let link = std::fs::symlink_metadata(out.join("link")).unwrap();
        assert_eq!(
            link.uid(),
            0,
            "the link changes owner, not its target's mode"
        );
        // Off: nothing to take back.
        Jail::disabled().reclaim(&out).unwrap();
    }
}
