//! The files API, confined to the sandbox root.
//!
//! Every path is resolved by the kernel with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` relative to an `O_PATH` descriptor of the root, so
//! `..`, absolute symlinks and symlink chains resolve as if the root were `/`
//! and can never lead outside it (in dev mode the root is a host directory).
//! Operations on the last component itself (lstat, unlink, rename, mkdir,
//! readlink) open its parent that way and then use the `*at` syscall with the
//! bare name, which cannot follow anything.
//!
//! The functions here block; the service runs them on tokio's blocking pool.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
use somna_proto::v1::{FileChunk, FileInfo, FileType, WriteFileStart};
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// Size of the chunks ReadFile streams.
pub const READ_CHUNK: usize = 256 * 1024;

/// What went wrong, with the path it concerned.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {path:?}: {}", .errno.desc())]
    Os {
        op: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Cancelled(String),
}

impl FsError {
    fn os(op: &'static str, path: &str) -> impl FnOnce(Errno) -> FsError {
        let path = path.to_string();
        move |errno| FsError::Os { op, path, errno }
    }

    fn io(op: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> FsError {
        let path = path.to_string();
        move |e| FsError::Os {
            op,
            path,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// The gRPC code for an errno.
pub fn errno_code(errno: Errno) -> Code {
    match errno {
        Errno::ENOENT => Code::NotFound,
        Errno::EEXIST => Code::AlreadyExists,
        Errno::EACCES | Errno::EPERM => Code::PermissionDenied,
        Errno::EISDIR | Errno::EINVAL | Errno::ELOOP | Errno::ENAMETOOLONG => Code::InvalidArgument,
        Errno::ENOTDIR
        | Errno::ENOTEMPTY
        | Errno::EXDEV
        | Errno::EROFS
        | Errno::EBUSY
        | Errno::ETXTBSY => Code::FailedPrecondition,
        Errno::ENOSPC | Errno::EDQUOT | Errno::EMFILE | Errno::ENFILE | Errno::EFBIG => {
            Code::ResourceExhausted
        }
        _ => Code::Internal,
    }
}

impl From<FsError> for Status {
    fn from(e: FsError) -> Status {
        let code = match &e {
            FsError::Os { errno, .. } => errno_code(*errno),
            FsError::Invalid(_) => Code::InvalidArgument,
            FsError::Precondition(_) => Code::FailedPrecondition,
            FsError::Cancelled(_) => Code::Cancelled,
        };
        Status::new(code, e.to_string())
    }
}

/// The sandbox root, held open.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// A path split into its parent and last component.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    /// The path names the root itself ("/", "//").
    Root,
    Entry {
        parent: &'a str,
        name: &'a str,
    },
}

fn target(path: &str) -> Result<Target<'_>, FsError> {
    check_path(path)?;
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(Target::Root);
    }
    let (parent, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    if name == "." || name == ".." {
        return Err(FsError::Invalid(format!(
            "path {path:?} ends in {name:?}; name the file or directory itself"
        )));
    }
    Ok(Target::Entry {
        parent: if parent.is_empty() { "/" } else { parent },
        name,
    })
}

fn check_path(path: &str) -> Result<(), FsError> {
    if path.is_empty() {
        return Err(FsError::Invalid("path is empty".into()));
    }
    if path.contains('\0') {
        return Err(FsError::Invalid(format!(
            "path {path:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// The path relative to the root descriptor ("/a/b" → "a/b", "/" → ".").
fn relative(path: &str) -> &str {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() { "." } else { rel }
}

impl Root {
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("open sandbox root {}: {e}", path.display()),
            )
        })?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root as the agent's own process sees it (for chroot).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `path` inside the root. `mode` is used only with `O_CREAT`.
    pub fn open_in(&self, path: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
        let mode = if flags.contains(OFlag::O_CREAT) {
            mode
        } else {
            Mode::empty()
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let rel = relative(path);
        // RESOLVE_IN_ROOT answers EAGAIN when a concurrent rename might have
        // let ".." escape; retrying is what the man page asks for.
        let mut tries = 0;
        loop {
            match openat2(&self.fd, rel, how) {
                Err(Errno::EAGAIN) if tries < 64 => tries += 1,
                other => return other,
            }
        }
    }

    fn open_dir_path(&self, path: &str) -> Result<OwnedFd, Errno> {
        self.open_in(path, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
    }

    /// The parent directory of `name`, opened inside the root.
    fn parent(&self, parent: &str, full: &str) -> Result<OwnedFd, FsError> {
        self.open_dir_path(parent).map_err(|errno| match errno {
            Errno::ENOENT => FsError::Os {
                op: "resolve parent of",
                path: full.to_string(),
                errno,
            },
            errno => FsError::Os {
                op: "open parent directory of",
                path: full.to_string(),
                errno,
            },
        })
    }

    /// Reads a small file inside the root; `None` when it does not exist.
    pub fn read_small(&self, path: &str) -> Result<Option<String>, FsError> {
        let fd = match self.open_in(path, OFlag::O_RDONLY, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(FsError::os("open", path)(e)),
        };
        let text = std::io::read_to_string(File::from(fd)).map_err(FsError::io("read", path))?;
        Ok(Some(text))
    }

    /// Follows `path` (symlinks included) and stats the result.
    pub fn stat_follow(&self, path: &str) -> Result<FileStat, Errno> {
        let fd = self.open_in(path, OFlag::O_PATH, Mode::empty())?;
        fstat(&fd)
    }
}

fn file_type(st: &FileStat) -> FileType {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => FileType::File,
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    }
}

fn is_dir(st: &FileStat) -> bool {
    file_type(st) == FileType::Directory
}

fn info(path: String, name: String, st: &FileStat, symlink_target: String) -> FileInfo {
    FileInfo {
        path,
        name,
        r#type: file_type(st) as i32,
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        modified_unix_ms: st.st_mtime * 1000 + st.st_mtime_nsec / 1_000_000,
        symlink_target,
    }
}

fn lossy(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

/// lstat of `name` in `dir`, with the symlink target read when it is one.
fn lstat_at(dir: &impl AsFd, name: &OsStr, display: &str) -> Result<(FileStat, String), FsError> {
    let st =
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(FsError::os("stat", display))?;
    let target = if file_type(&st) == FileType::Symlink {
        lossy(&readlinkat(dir, name).map_err(FsError::os("read symlink", display))?)
    } else {
        String::new()
    };
    Ok((st, target))
}

/// StatFile: lstat semantics.
pub fn stat(root: &Root, path: &str) -> Result<FileInfo, FsError> {
    match target(path)? {
        Target::Root => {
            let st = fstat(&root.fd).map_err(FsError::os("stat", path))?;
            Ok(info(path.to_string(), "/".into(), &st, String::new()))
        }
        Target::Entry { parent, name } => {
            let dir = root.parent(parent, path)?;
            let (st, link) = lstat_at(&dir, OsStr::new(name), path)?;
            Ok(info(path.to_string(), name.to_string(), &st, link))
        }
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Names in a directory (without "." and ".."), unsorted.
fn dir_names(dir: &mut Dir) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// ListFiles: the entries of a directory, sorted by name, not following
/// symlinks (the listed directory itself may be reached through one).
pub fn list(root: &Root, path: &str) -> Result<Vec<FileInfo>, FsError> {
    check_path(path)?;
    let fd = root
        .open_in(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(FsError::os("list", path))?;
    let mut dir = Dir::from_fd(fd).map_err(FsError::os("list", path))?;
    let mut names = dir_names(&mut dir).map_err(FsError::os("list", path))?;
    names.sort();
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        let display = join(path, &lossy(&name));
        match lstat_at(&dir, &name, &display) {
            Ok((st, link)) => entries.push(info(display, lossy(&name), &st, link)),
            // Removed while listing: it is simply not there any more.
            Err(FsError::Os {
                errno: Errno::ENOENT,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(entries)
}

/// Sets the exact permission bits of the directory `name` in `parent`
/// (mkdir applies the umask).
fn chmod_dir(parent: &impl AsFd, name: &str, mode: u32, display: &str) -> Result<(), FsError> {
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(FsError::os("open", display))?;
    fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(FsError::os("chmod", display))
}

/// Creates `path` and its missing parents (parents 0o755, `path` `mode`).
pub fn mkdir_all(root: &Root, path: &str, mode: u32) -> Result<(), FsError> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    for i in 0..comps.len() {
        let prefix = comps[..=i].join("/");
        let display = format!("/{prefix}");
        match root.open_dir_path(&prefix) {
            Ok(_) => continue,
            Err(Errno::ENOENT) => {
                let parent = root
                    .open_dir_path(&comps[..i].join("/"))
                    .map_err(FsError::os("open", &display))?;
                let m = if i + 1 == comps.len() { mode } else { 0o755 };
                match mkdirat(&parent, comps[i], Mode::from_bits_truncate(m)) {
                    Ok(()) => chmod_dir(&parent, comps[i], m, &display)?,
                    // Created concurrently: fine, it is checked next round.
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(FsError::os("create directory", &display)(e)),
                }
            }
            Err(e) => return Err(FsError::os("create directory", &display)(e)),
        }
    }
    // The last component may exist as something other than a directory.
    root.open_dir_path(path)
        .map(drop)
        .map_err(FsError::os("create directory", path))
}

/// MakeDir. `parents`: like `mkdir -p`.
pub fn make_dir(root: &Root, path: &str, mode: u32, parents: bool) -> Result<FileInfo, FsError> {
    let mode = if mode == 0 { 0o755 } else { mode & 0o7777 };
    match target(path)? {
        Target::Root if parents => {}
        Target::Root => {
            return Err(FsError::Os {
                op: "create directory",
                path: path.into(),
                errno: Errno::EEXIST,
            });
        }
        Target::Entry { .. } if parents => mkdir_all(root, path, mode)?,
        Target::Entry { parent, name } => {
            let dir = root.parent(parent, path).map_err(|e| match e {
                FsError::Os {
                    errno: Errno::ENOENT,
                    ..
                } => FsError::Os {
                    op: "create directory (set parents to create missing parents)",
                    path: path.into(),
                    errno: Errno::ENOENT,
                },
                e => e,
            })?;
            mkdirat(&dir, name, Mode::from_bits_truncate(mode))
                .map_err(FsError::os("create directory", path))?;
            chmod_dir(&dir, name, mode, path)?;
        }
    }
    stat(root, path)
}

/// RemoveFile.
pub fn remove(root: &Root, path: &str, recursive: bool) -> Result<(), FsError> {
    let Target::Entry { parent, name } = target(path)? else {
        return Err(FsError::Invalid(
            "refusing to remove the sandbox root \"/\"".into(),
        ));
    };
    let dir = root.parent(parent, path)?;
    let st =
        fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(FsError::os("remove", path))?;
    if !is_dir(&st) {
        return unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
            .map_err(FsError::os("remove", path));
    }
    if recursive {
        let parent_dev = fstat(&dir)
            .map_err(FsError::os("stat parent of", path))?
            .st_dev;
        return remove_tree(&dir, OsStr::new(name), parent_dev, path);
    }
    match unlinkat(&dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(()),
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => Err(FsError::Precondition(format!(
            "remove {path:?}: directory not empty; set recursive"
        ))),
        Err(e) => Err(FsError::os("remove", path)(e)),
    }
}

/// Removes the directory `name` in `parent` and everything below it, never
/// following symlinks and never descending into another filesystem (a mount
/// point such as /proc is reported instead of emptied).
fn remove_tree(
    parent: &impl AsFd,
    name: &OsStr,
    parent_dev: u64,
    display: &str,
) -> Result<(), FsError> {
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(FsError::os("open", display))?;
    let dev = fstat(&fd).map_err(FsError::os("stat", display))?.st_dev;
    if dev != parent_dev {
        return Err(FsError::Precondition(format!(
            "remove {display:?}: it is a mount point; not removing it"
        )));
    }
    let mut dir = Dir::from_fd(fd).map_err(FsError::os("list", display))?;
    for child in dir_names(&mut dir).map_err(FsError::os("list", display))? {
        let child_display = join(display, &lossy(&child));
        let st = match fstatat(&dir, child.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(FsError::os("stat", &child_display)(e)),
        };
        if is_dir(&st) {
            remove_tree(&dir, &child, dev, &child_display)?;
        } else {
            match unlinkat(&dir, child.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(FsError::os("remove", &child_display)(e)),
            }
        }
    }
    drop(dir);
    unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(FsError::os("remove", display))
}

/// RenameFile.
pub fn rename(root: &Root, from: &str, to: &str) -> Result<(), FsError> {
    let (
        Target::Entry {
            parent: fp,
            name: fname,
        },
        Target::Entry {
            parent: tp,
            name: tname,
        },
    ) = (target(from)?, target(to)?)
    else {
        return Err(FsError::Invalid(
            "cannot rename the sandbox root \"/\" or onto it".into(),
        ));
    };
    let fdir = root.parent(fp, from)?;
    let tdir = root.parent(tp, to)?;
    renameat(&fdir, fname, &tdir, tname).map_err(|errno| FsError::Os {
        op: "rename",
        path: format!("{from} -> {to}"),
        errno,
    })
}

/// Opens a regular file for ReadFile.
pub fn open_read(root: &Root, path: &str) -> Result<File, FsError> {
    check_path(path)?;
    // O_NONBLOCK keeps open() of a FIFO from hanging; it is rejected below.
    let fd = root
        .open_in(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty())
        .map_err(FsError::os("open", path))?;
    let st = fstat(&fd).map_err(FsError::os("stat", path))?;
    match file_type(&st) {
        FileType::File => Ok(File::from(fd)),
        FileType::Directory => Err(FsError::Invalid(format!("read {path:?}: is a directory"))),
        _ => Err(FsError::Invalid(format!(
            "read {path:?}: not a regular file"
        ))),
    }
}

/// Streams `file` from `offset`, at most `length` bytes (0: to the end).
/// Stops quietly when the receiver goes away.
pub fn stream_file(
    file: File,
    path: &str,
    offset: u64,
    length: u64,
    tx: mpsc::Sender<Result<FileChunk, Status>>,
) {
    let mut pos = offset;
    let end = if length == 0 {
        u64::MAX
    } else {
        offset.saturating_add(length)
    };
    // Files in /proc report size 0 but have content, so read until EOF
    // rather than trusting the size.
    while pos < end {
        let want = (end - pos).min(READ_CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        let n = match file.read_at(&mut buf, pos) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(FsError::io("read", path)(e).into()));
                return;
            }
        };
        buf.truncate(n);
        pos += n as u64;
        if tx.blocking_send(Ok(FileChunk { data: buf })).is_err() {
            return;
        }
    }
}

/// A message from WriteFile's request stream to the writing thread.
pub enum WriteMsg {
    Data(Vec<u8>),
    /// The client's stream ended normally: make the file visible.
    Commit,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes a temp file unless disarmed (on every error path).
struct TempGuard<'a, F: AsFd> {
    dir: &'a F,
    name: Option<CString>,
}

impl<F: AsFd> Drop for TempGuard<'_, F> {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = unlinkat(self.dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// WriteFile. Replaces the target atomically (a temp file in the same
/// directory renamed over it) unless `append` is set or the target is a
/// symlink (then the link's target is written in place, within the root).
pub fn write_file(
    root: &Root,
    start: &WriteFileStart,
    rx: mpsc::Receiver<WriteMsg>,
) -> Result<FileInfo, FsError> {
    let path = start.path.as_str();
    let Target::Entry { parent, name } = target(path)? else {
        return Err(FsError::Invalid(
            "cannot write to the sandbox root \"/\": it is a directory".into(),
        ));
    };
    if start.create_parents {
        mkdir_all(root, parent, 0o755)?;
    }
    let dir = root.parent(parent, path).map_err(|e| match e {
        FsError::Os {
            errno: Errno::ENOENT,
            ..
        } => FsError::Os {
            op: "write (set create_parents to create missing parents)",
            path: path.into(),
            errno: Errno::ENOENT,
        },
        e => e,
    })?;
    let mode = if start.mode == 0 {
        0o644
    } else {
        start.mode & 0o7777
    };
    let existing = match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st),
        Err(Errno::ENOENT) => None,
        Err(e) => return Err(FsError::os("stat", path)(e)),
    };
    if existing.as_ref().is_some_and(is_dir) {
        return Err(FsError::Invalid(format!("write {path:?}: is a directory")));
    }
    let in_place = start.append
        || existing
            .as_ref()
            .is_some_and(|st| file_type(st) == FileType::Symlink);
    if in_place {
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | if start.append {
                OFlag::O_APPEND
            } else {
                OFlag::O_TRUNC
            };
        let fd = root
            .open_in(path, flags, Mode::from_bits_truncate(mode))
            .map_err(FsError::os("open", path))?;
        receive_into(File::from(fd), rx, path)?;
    } else {
        let (tmp, fd) = create_temp(&dir, mode, path)?;
        let mut guard = TempGuard {
            dir: &dir,
            name: Some(tmp),
        };
        // Keep an existing file's permissions and owner; only new files get
        // `mode` (the mode was applied at creation, modulo the umask).
        let (mode, owner) = match &existing {
            Some(st) => (st.st_mode & 0o7777, Some((st.st_uid, st.st_gid))),
            None => (mode, None),
        };
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(FsError::os("chmod", path))?;
        if let Some((uid, gid)) = owner {
            match fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))) {
                // Without CAP_CHOWN (dev mode as a user) the new owner is us.
                Ok(()) | Err(Errno::EPERM) => {}
                Err(e) => return Err(FsError::os("chown", path)(e)),
            }
        }
        receive_into(File::from(fd), rx, path)?;
        let Some(tmp) = guard.name.as_deref() else {
            return Err(FsError::Precondition(format!(
                "write {path:?}: temp file vanished"
            )));
        };
        renameat(&dir, tmp, &dir, name).map_err(FsError::os("replace", path))?;
        guard.name = None;
    }
    stat(root, path)
}

/// Replaces the small file `path` atomically (a temp file beside it, synced
/// and renamed over it) with `data` and exactly the permissions `mode`,
/// creating missing parent directories (0o755). For files the agent owns
/// (`/etc/machine-id`): readers see the old contents or the new, never a
/// partial file.
pub fn replace_small(root: &Root, path: &str, data: &[u8], mode: u32) -> Result<(), FsError> {
    let Target::Entry { parent, name } = target(path)? else {
        return Err(FsError::Invalid(format!("{path:?} is the root directory")));
    };
    mkdir_all(root, parent, 0o755)?;
    let dir = root.parent(parent, path)?;
    let (tmp, fd) = create_temp(&dir, mode, path)?;
    let mut guard = TempGuard {
        dir: &dir,
        name: Some(tmp),
    };
    // The mode given at creation was filtered by the umask.
    fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(FsError::os("chmod", path))?;
    let mut file = File::from(fd);
    file.write_all(data).map_err(FsError::io("write", path))?;
    file.sync_all().map_err(FsError::io("sync", path))?;
    drop(file);
    let Some(tmp) = guard.name.as_deref() else {
        return Err(FsError::Precondition(format!(
            "write {path:?}: temp file vanished"
        )));
    };
    renameat(&dir, tmp, &dir, name).map_err(FsError::os("replace", path))?;
    guard.name = None;
    Ok(())
}

/// Overwrites the small file `path` in place (creating it with `mode`, and
/// its parents with 0o755, when missing): one `pwrite` at offset 0, then a
/// truncate to the new length. The inode stays the same, so a process
/// watching the file itself (inotify `IN_MODIFY` / `IN_CLOSE_WRITE`) sees
/// every update.
pub fn overwrite_small(root: &Root, path: &str, data: &[u8], mode: u32) -> Result<(), FsError> {
    let Target::Entry { parent, .. } = target(path)? else {
        return Err(FsError::Invalid(format!("{path:?} is the root directory")));
    };
    mkdir_all(root, parent, 0o755)?;
    let fd = root
        .open_in(
            path,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(mode),
        )
        .map_err(FsError::os("open", path))?;
    let file = File::from(fd);
    file.write_all_at(data, 0)
        .map_err(FsError::io("write", path))?;
    file.set_len(data.len() as u64)
        .map_err(FsError::io("truncate", path))?;
    Ok(())
}

fn create_temp(dir: &impl AsFd, mode: u32, path: &str) -> Result<(CString, OwnedFd), FsError> {
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(".somna-tmp-{}-{n}", std::process::id());
        let cname = CString::new(name).map_err(|_| FsError::Invalid("temp name".into()))?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(dir, cname.as_c_str(), flags, Mode::from_bits_truncate(mode)) {
            Ok(fd) => return Ok((cname, fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(FsError::os("create a temp file beside", path)(e)),
        }
    }
}

fn receive_into(
    mut file: File,
    mut rx: mpsc::Receiver<WriteMsg>,
    path: &str,
) -> Result<(), FsError> {
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            WriteMsg::Data(data) => file.write_all(&data).map_err(FsError::io("write", path))?,
            WriteMsg::Commit => return Ok(()),
        }
    }
    Err(FsError::Cancelled(format!(
        "write {path:?}: the client stream ended with an error; nothing was replaced"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(target("/").unwrap(), Target::Root);
        assert_eq!(target("///").unwrap(), Target::Root);
        assert_eq!(
            target("/a/b").unwrap(),
            Target::Entry {
                parent: "/a",
                name: "b"
            }
        );
        assert_eq!(
            target("a/b/").unwrap(),
            Target::Entry {
                parent: "a",
                name: "b"
            }
        );
        assert_eq!(
            target("/a").unwrap(),
            Target::Entry {
                parent: "/",
                name: "a"
            }
        );
        assert_eq!(
            target("a").unwrap(),
            Target::Entry {
                parent: "/",
                name: "a"
            }
        );
        assert!(matches!(target(""), Err(FsError::Invalid(_))));
        assert!(matches!(target("/a/.."), Err(FsError::Invalid(_))));
        assert!(matches!(target("a/."), Err(FsError::Invalid(_))));
        assert!(matches!(target(".."), Err(FsError::Invalid(_))));
        assert!(matches!(target("a\0b"), Err(FsError::Invalid(_))));
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative("/"), ".");
        assert_eq!(relative(""), ".");
        assert_eq!(relative("/etc/passwd"), "etc/passwd");
        assert_eq!(relative("etc"), "etc");
    }

    /// A root with a marker file beside it (outside) and escape attempts
    /// inside it.
    fn fixture() -> (tempfile::TempDir, Root) {
        let outer = tempfile::tempdir().unwrap();
        let root_dir = outer.path().join("root");
        std::fs::create_dir_all(root_dir.join("etc")).unwrap();
        std::fs::write(root_dir.join("etc/passwd"), "inside").unwrap();
        std::fs::write(outer.path().join("marker"), "outside").unwrap();
        std::os::unix::fs::symlink("/", root_dir.join("slash")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root_dir.join("up")).unwrap();
        std::os::unix::fs::symlink("hop2", root_dir.join("hop1")).unwrap();
        std::os::unix::fs::symlink("/up/../marker", root_dir.join("hop2")).unwrap();
        let root = Root::open(&root_dir).unwrap();
        (outer, root)
    }

    #[test]
    fn resolution_stays_inside() {
        let (_outer, root) = fixture();
        assert_eq!(
            root.read_small("../../etc/passwd").unwrap().as_deref(),
            Some("inside")
        );
        assert_eq!(
            root.read_small("/slash/etc/passwd").unwrap().as_deref(),
            Some("inside")
        );
        assert_eq!(
            root.read_small("up/etc/passwd").unwrap().as_deref(),
            Some("inside")
        );
        // "../marker" would be the marker outside; inside it does not exist.
        assert_eq!(root.read_small("../marker").unwrap(), None);
        assert_eq!(root.read_small("hop1").unwrap(), None);
        assert_eq!(root.read_small("/slash/../../marker").unwrap(), None);
    }
}
