//! Applying image layers (tar streams) to a directory, in order, with OCI
//! whiteout semantics.
//!
//! Every entry is written by this module itself (not by `tar`'s unpack),
//! because layer application needs more than extraction:
//!
//! - **Whiteouts**: `.wh.<name>` removes `<name>` as lower layers left it;
//!   `.wh..wh..opq` makes its directory opaque (everything lower layers put
//!   there goes, what this layer adds stays, wherever in the layer the
//!   marker appears). Other `.wh..wh.*` names (aufs metadata) are ignored.
//! - **Confinement**: entry paths must be relative and free of `..`.
//!   Symlinks met in the *parent* part of a path are resolved the way they
//!   would be inside the guest (`chroot` semantics: an absolute target
//!   starts again at the root, `..` stops at the root), component by
//!   component with `lstat`, so a layer cannot write outside the root
//!   through a symlink a lower layer planted (`a -> /etc` then `a/passwd`
//!   writes `<root>/etc/passwd`). The last component is never followed: an
//!   entry replaces whatever is at its path (a directory stays a directory
//!   when the entry is one too). Hard link targets are confined the same
//!   way, so a link cannot reach a host file.
//! - **Metadata**: numeric uid/gid (ustar, GNU base-256 or PAX), the full
//!   mode including setuid/setgid/sticky (set after chown, which clears
//!   them), `SCHILY.xattr.*` extended attributes (after chown, which clears
//!   `security.capability`), mtimes (PAX sub-second ones too; directory
//!   mtimes are set once all layers are applied, since later writes into a
//!   directory change its mtime), hard links, symlinks, device nodes and
//!   fifos.
//!
//! The directory being written must belong to this process alone (no
//! concurrent writers), which is how the image store uses it: a fresh
//! temporary directory. Writing ownership, device nodes and `trusted.*`
//! xattrs needs root.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use crate::digest::{DigestReader, Expected};
use crate::error::{ImageError, IoContext};
use crate::layout::{LayerCompression, LayerDescriptor};

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_SYMLINK_HOPS: usize = 40;

/// Counts of what one layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries written (files, directories, links, nodes).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Whiteout entries processed (including opaque markers).
    pub whiteouts: u64,
}

/// Applies layers, in order, to a root directory.
pub struct Unpacker {
    root: PathBuf,
    /// Directory mtimes, applied by [`Unpacker::finish`].
    dir_times: HashMap<PathBuf, TimeSpec>,
    /// The most bytes the layers' tar streams may add up to once
    /// decompressed, and the most file content unpacking may write (sparse
    /// tar entries expand to more than their stream), each across all
    /// layers. `u64::MAX`: no limit.
    limit: u64,
    /// Decompressed tar bytes read so far (see [`apply_layer_blob`]).
    stream_bytes: u64,
    /// File content bytes written so far.
    written: u64,
}

/// Ownership, mode, times and xattrs of one entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Unpacker {
    /// An unpacker writing into `root`, which must be an existing directory
    /// that nothing else writes to.
    pub fn new(root: &Path) -> Result<Self, ImageError> {
        let meta = fs::symlink_metadata(root).ctx("cannot use unpack directory", root)?;
        if !meta.is_dir() {
            return Err(ImageError::InvalidArgument(format!(
                "unpack root {} is not a directory",
                root.display()
            )));
        }
        Ok(Unpacker {
            root: root.to_path_buf(),
            dir_times: HashMap::new(),
            limit: u64::MAX,
            stream_bytes: 0,
            written: 0,
        })
    }

    /// Stops unpacking with [`ImageError::UnpackedTooLarge`] once the
    /// layers' decompressed tar streams, or the file content written,
    /// exceed `max_bytes` (each counted across all layers applied). This is
    /// what stops a decompression bomb: the check runs as bytes are read
    /// and written, never after the fact.
    pub fn with_limit(mut self, max_bytes: u64) -> Self {
        self.limit = max_bytes;
        self
    }

    /// Applies one layer given as an uncompressed tar stream. `layer` names
    /// it in errors (e.g. its digest). The stream is read up to the tar
    /// end-of-archive marker.
    pub fn apply<R: Read>(&mut self, layer: &str, tar: R) -> Result<LayerStats, ImageError> {
        let mut archive = tar::Archive::new(tar);
        let mut added = HashSet::new();
        let mut stats = LayerStats::default();
        let entries = archive.entries().map_err(|e| ImageError::InvalidLayer {
            layer: layer.to_string(),
            reason: format!("cannot read tar: {e}"),
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ImageError::InvalidLayer {
                layer: layer.to_string(),
                reason: format!("cannot read tar entry: {e}"),
            })?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            self.apply_entry(&mut entry, &mut added, &mut stats)
                .map_err(|e| match e {
                    EntryError::Invalid(reason) => ImageError::InvalidLayerEntry {
                        layer: layer.to_string(),
                        entry: name.clone(),
                        reason,
                    },
                    EntryError::Stream(e) => ImageError::InvalidLayer {
                        layer: layer.to_string(),
                        reason: format!(
                            "cannot read entry {name:?} (corrupt or truncated layer): {e}"
                        ),
                    },
                    EntryError::TooLarge => ImageError::UnpackedTooLarge {
                        layer: layer.to_string(),
                        limit: self.limit,
                    },
                    EntryError::Image(e) => e,
                })?;
        }
        Ok(stats)
    }

    /// Sets the directory mtimes recorded while applying layers. Call once,
    /// after the last layer.
    pub fn finish(self) -> Result<(), ImageError> {
        for (path, mtime) in &self.dir_times {
            match fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => set_times(path, *mtime)
                    .map_err(|e| ImageError::io("cannot set mtime of", path, e.into()))?,
                _ => {} // replaced or removed by a later layer
            }
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        added: &mut HashSet<PathBuf>,
        stats: &mut LayerStats,
    ) -> Result<(), EntryError> {
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            // Global PAX headers and anything unknown carry no file.
            other => {
                tracing::debug!(?other, path = %String::from_utf8_lossy(&entry.path_bytes()), "skipping tar entry");
                return Ok(());
            }
        }
        let path_bytes = entry.path_bytes().into_owned();
        let comps = normalize(&path_bytes)?;
        let meta = read_meta(entry)?;

        // The root directory itself ("./").
        let Some((name, parent_comps)) = comps.split_last() else {
            if kind != EntryType::Directory {
                return Err(EntryError::Invalid(
                    "the root entry must be a directory".into(),
                ));
            }
            let root = self.root.clone();
            apply_meta(&root, &meta, false)?;
            self.dir_times.insert(root, meta.mtime);
            stats.entries += 1;
            return Ok(());
        };

        let name_str = name.as_bytes();
        if name_str.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            stats.whiteouts += 1;
            return self.apply_whiteout(parent_comps, name, added);
        }

        // With `Some(added)` resolve_dir creates missing parents, so None
        // would mean the tree changed under us.
        let parent = self
            .resolve_dir(parent_comps, Some(added))?
            .ok_or_else(|| {
                EntryError::Invalid("its parent directory could not be created".into())
            })?;
        let dest = parent.join(name);

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&dest)?;
                        mkdir(&dest)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => mkdir(&dest)?,
                    Err(e) => return Err(io_err("cannot inspect", &dest, e)),
                }
                apply_meta(&dest, &meta, false)?;
                self.dir_times.insert(dest.clone(), meta.mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&dest)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_o_nofollow())
                    .open(&dest)
                    .map_err(|e| io_err("cannot create", &dest, e))?;
                // One byte more than the budget allows tells "over" from
                // "exactly at".
                let budget = self.limit.saturating_sub(self.written);
                let n = copy_entry(&mut entry.take(budget.saturating_add(1)), &mut file, &dest)?;
                if n > budget {
                    return Err(EntryError::TooLarge);
                }
                self.written += n;
                stats.bytes += n;
                drop(file);
                apply_meta(&dest, &meta, false)?;
                set_times(&dest, meta.mtime)
                    .map_err(|e| io_err("cannot set mtime of", &dest, e.into()))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| EntryError::Invalid("symlink without a target".into()))?
                    .into_owned();
                if target.is_empty() {
                    return Err(EntryError::Invalid("symlink with an empty target".into()));
                }
                remove_existing(&dest)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                    .map_err(|e| io_err("cannot create symlink", &dest, e))?;
                apply_meta(&dest, &meta, true)?;
                set_times(&dest, meta.mtime)
                    .map_err(|e| io_err("cannot set mtime of", &dest, e.into()))?;
            }
            EntryType::Link => {
                let target_bytes = entry
                    .link_name_bytes()
                    .ok_or_else(|| EntryError::Invalid("hard link without a target".into()))?
                    .into_owned();
                let target_comps = normalize(&target_bytes)?;
                let Some((tname, tparent)) = target_comps.split_last() else {
                    return Err(EntryError::Invalid(
                        "hard link to the root directory".into(),
                    ));
                };
                let target = self
                    .resolve_dir(tparent, None)?
                    .map(|p| p.join(tname))
                    .filter(|p| fs::symlink_metadata(p).is_ok())
                    .ok_or_else(|| {
                        EntryError::Invalid(format!(
                            "hard link target {:?} does not exist",
                            String::from_utf8_lossy(&target_bytes)
                        ))
                    })?;
                if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    return Err(EntryError::Invalid("hard link to a directory".into()));
                }
                if target != dest {
                    remove_existing(&dest)?;
                    // std's hard_link is linkat(.., 0): a symlink target is
                    // linked itself, never followed.
                    fs::hard_link(&target, &dest)
                        .map_err(|e| io_err("cannot create hard link", &dest, e))?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                remove_existing(&dest)?;
                let perm = Mode::from_bits_truncate(0o600);
                let res = if kind == EntryType::Fifo {
                    nix::unistd::mkfifo(&dest, perm)
                } else {
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    let sflag = if kind == EntryType::Char {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    nix::sys::stat::mknod(
                        &dest,
                        sflag,
                        perm,
                        nix::sys::stat::makedev(major as u64, minor as u64),
                    )
                };
                res.map_err(|e| io_err("cannot create device node or fifo", &dest, e.into()))?;
                apply_meta(&dest, &meta, false)?;
                set_times(&dest, meta.mtime)
                    .map_err(|e| io_err("cannot set mtime of", &dest, e.into()))?;
            }
            _ => unreachable!("filtered above"),
        }
        added.insert(dest);
        stats.entries += 1;
        Ok(())
    }

    fn apply_whiteout(
        &mut self,
        parent_comps: &[OsString],
        name: &OsStr,
        added: &HashSet<PathBuf>,
    ) -> Result<(), EntryError> {
        // Nothing below a missing directory to remove.
        let Some(parent) = self.resolve_dir(parent_comps, None)? else {
            return Ok(());
        };
        let name = name.as_bytes();
        if name == WHITEOUT_OPAQUE.as_bytes() {
            return clear_lower(&parent, added);
        }
        if name.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(EntryError::Invalid("whiteout of an invalid name".into()));
        }
        let target = parent.join(OsStr::from_bytes(hidden));
        // A whiteout hides lower layers only, never this layer's own entry.
        if !added.contains(&target) {
            remove_existing(&target)?;
        }
        Ok(())
    }

    /// Resolves directory components inside the root, following symlinks
    /// with chroot semantics. With `create`, missing directories are made
    /// (0755, root-owned) and recorded in it; without, a missing one gives
    /// `None`.
    fn resolve_dir(
        &self,
        comps: &[OsString],
        mut create: Option<&mut HashSet<PathBuf>>,
    ) -> Result<Option<PathBuf>, EntryError> {
        let mut stack: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == "." {
                continue;
            }
            if c == ".." {
                stack.pop();
                continue;
            }
            let mut host = self.host_path(&stack);
            host.push(&c);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(EntryError::Invalid(
                            "too many levels of symbolic links in its path".into(),
                        ));
                    }
                    let target = fs::read_link(&host)
                        .map_err(|e| io_err("cannot read symlink", &host, e))?;
                    if target.is_absolute() {
                        stack.clear();
                    }
                    for comp in target.components().rev() {
                        match comp {
                            Component::Normal(s) => pending.push_front(s.to_os_string()),
                            Component::ParentDir => pending.push_front("..".into()),
                            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Ok(_) => {
                    return Err(EntryError::Invalid(format!(
                        "a parent in its path ({}) is not a directory",
                        display_rel(&stack, &c)
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => match create.as_deref_mut() {
                    Some(added) => {
                        mkdir(&host)?;
                        added.insert(host);
                        stack.push(c);
                    }
                    None => return Ok(None),
                },
                Err(e) => return Err(io_err("cannot inspect", &host, e)),
            }
        }
        Ok(Some(self.host_path(&stack)))
    }

    fn host_path(&self, comps: &[OsString]) -> PathBuf {
        let mut p = self.root.clone();
        for c in comps {
            p.push(c);
        }
        p
    }
}

/// Applies one layer blob from a file: decompresses it as its media type
/// says and verifies the blob's digest and size and the uncompressed
/// digest (diff_id) on the way. A corrupt blob is reported as such even
/// when it also breaks decompression or tar parsing.
pub(crate) fn apply_layer_blob(
    unpacker: &mut Unpacker,
    path: &Path,
    layer: &LayerDescriptor,
) -> Result<LayerStats, ImageError> {
    let expected = Expected {
        what: "layer",
        digest: &layer.digest,
        size: layer.size,
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(expected.missing(path)),
        Err(e) => return Err(ImageError::io("cannot open layer blob", path, e)),
    };
    let name = layer.digest.to_string();
    let mut raw = DigestReader::new(io::BufReader::with_capacity(1 << 20, file));
    let result = apply_decompressed(unpacker, &name, &mut raw, layer.compression);
    // Whatever happened, hash the rest of the blob: a corrupt blob is the
    // more useful error than the decompression failure it causes.
    let drained = raw.drain();
    let (digest, size) = raw.finish();
    if drained.is_ok() {
        expected.check(path, &digest, size)?;
    }
    let (stats, diff_id) = result?;
    drained.ctx("cannot read layer blob", path)?;
    if diff_id != layer.diff_id {
        return Err(ImageError::DiffIdMismatch {
            digest: name,
            expected: layer.diff_id.to_string(),
            actual: diff_id.to_string(),
        });
    }
    Ok(stats)
}

fn apply_decompressed<R: Read>(
    unpacker: &mut Unpacker,
    name: &str,
    raw: R,
    compression: LayerCompression,
) -> Result<(LayerStats, crate::digest::Digest), ImageError> {
    let decode_err = |e: io::Error| ImageError::InvalidLayer {
        layer: name.to_string(),
        reason: format!("cannot decompress: {e}"),
    };
    fn run<D: Read>(
        unpacker: &mut Unpacker,
        name: &str,
        decoded: D,
        decode_err: impl Fn(io::Error) -> ImageError,
    ) -> Result<(LayerStats, crate::digest::Digest), ImageError> {
        let budget = unpacker.limit.saturating_sub(unpacker.stream_bytes);
        let mut tar = DigestReader::new(LimitReader::new(decoded, budget));
        let result = unpacker.apply(name, &mut tar);
        // The diff_id covers the whole uncompressed stream, including the
        // padding after the end-of-archive marker.
        let drained = match result {
            Ok(_) => tar.drain().map_err(&decode_err),
            Err(_) => Ok(()),
        };
        let consumed = tar.get_ref().consumed;
        unpacker.stream_bytes += consumed;
        if tar.get_ref().exceeded {
            return Err(ImageError::UnpackedTooLarge {
                layer: name.to_string(),
                limit: unpacker.limit,
            });
        }
        let stats = result?;
        drained?;
        Ok((stats, tar.finish().0))
    }
    match compression {
        LayerCompression::None => run(unpacker, name, raw, decode_err),
        LayerCompression::Gzip => run(
            unpacker,
            name,
            flate2::read::MultiGzDecoder::new(raw),
            decode_err,
        ),
        #[cfg(feature = "zstd")]
        LayerCompression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(raw).map_err(decode_err)?;
            run(unpacker, name, decoder, decode_err)
        }
        #[cfg(not(feature = "zstd"))]
        LayerCompression::Zstd => Err(ImageError::UnsupportedMediaType {
            what: format!("layer {name} (built without the zstd feature)"),
            media_type: crate::layout::MEDIA_TYPE_LAYER_ZSTD.into(),
        }),
    }
}

/// Copies an entry's content into its file, telling a broken layer stream
/// (truncated or corrupt compressed data: the layer's fault) from a
/// failed write (the host's).
fn copy_entry(src: &mut impl Read, dst: &mut fs::File, dest: &Path) -> Result<u64, EntryError> {
    use std::io::Write as _;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EntryError::Stream(e)),
        };
        dst.write_all(&buf[..n])
            .map_err(|e| io_err("cannot write", dest, e))?;
        total += n as u64;
    }
}

/// Errors inside one entry: `Invalid` gets the layer and entry names added.
enum EntryError {
    Invalid(String),
    /// Reading the layer stream failed (corrupt or truncated data).
    Stream(io::Error),
    /// The unpack limit was reached.
    TooLarge,
    Image(ImageError),
}

impl From<ImageError> for EntryError {
    fn from(e: ImageError) -> Self {
        EntryError::Image(e)
    }
}

/// Reads at most `budget` bytes of a decompressed stream; past that it
/// fails (and remembers it did), so a decompression bomb is stopped after
/// `budget` bytes rather than after it has filled the disk.
struct LimitReader<R> {
    inner: R,
    budget: u64,
    consumed: u64,
    exceeded: bool,
}

impl<R> LimitReader<R> {
    fn new(inner: R, budget: u64) -> Self {
        LimitReader {
            inner,
            budget,
            consumed: 0,
            exceeded: false,
        }
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.consumed >= self.budget {
            // Probe for one more byte: a stream that ends exactly at the
            // budget is fine.
            let mut probe = [0u8; 1];
            let n = self.inner.read(&mut probe)?;
            if n == 0 {
                return Ok(0);
            }
            self.exceeded = true;
            return Err(io::Error::other("unpacked size limit reached"));
        }
        let room = usize::try_from(self.budget - self.consumed).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.consumed += n as u64;
        Ok(n)
    }
}

fn io_err(what: &str, path: &Path, e: io::Error) -> EntryError {
    let hint = if e.kind() == io::ErrorKind::PermissionDenied && !nix::unistd::geteuid().is_root() {
        " (applying image layers needs root)"
    } else {
        ""
    };
    EntryError::Image(ImageError::io(format!("{what}{hint}"), path, e))
}

/// Splits an entry path into its components: relative, no `..`.
fn normalize(path: &[u8]) -> Result<Vec<OsString>, EntryError> {
    let mut out = Vec::new();
    for comp in Path::new(OsStr::from_bytes(path)).components() {
        match comp {
            Component::Normal(c) => out.push(c.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(EntryError::Invalid(
                    "absolute paths are not allowed in layers".into(),
                ));
            }
            Component::ParentDir => {
                return Err(EntryError::Invalid(
                    "'..' is not allowed in layer paths".into(),
                ));
            }
        }
    }
    Ok(out)
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryError> {
    let h = entry.header();
    let bad = |what: &str, e: io::Error| EntryError::Invalid(format!("bad {what} in header: {e}"));
    // The tar crate applies PAX uid/gid to the header it returns.
    let uid = h.uid().map_err(|e| bad("uid", e))?;
    let gid = h.gid().map_err(|e| bad("gid", e))?;
    let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let mut mtime = TimeSpec::new(h.mtime().map_err(|e| bad("mtime", e))? as i64, 0);
    let uid = u32::try_from(uid)
        .map_err(|_| EntryError::Invalid(format!("uid {uid} is out of range")))?;
    let gid = u32::try_from(gid)
        .map_err(|_| EntryError::Invalid(format!("gid {gid} is out of range")))?;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX header", e))? {
        for ext in pax {
            let ext = ext.map_err(|e| bad("PAX record", e))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((OsString::from(name), ext.value_bytes().to_vec()));
            } else if key == "mtime"
                && let Some(t) = ext.value().ok().and_then(parse_pax_time)
            {
                mtime = t;
            }
        }
    }
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime,
        xattrs,
    })
}

/// Parses a PAX time (`1700000000.5`, `-1.25`).
fn parse_pax_time(s: &str) -> Option<TimeSpec> {
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let mut secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        nanos = format!("{digits:0<9}").parse().ok()?;
        if s.starts_with('-') && nanos > 0 {
            secs -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(TimeSpec::new(secs, nanos))
}

/// Sets owner, mode and xattrs, in that order: chown clears setuid/setgid
/// bits and file capabilities.
fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> Result<(), EntryError> {
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io_err("cannot set owner of", path, e.into()))?;
    if !is_symlink {
        // The path is not a symlink (this module just made it, or checked
        // it is a directory), so following is harmless.
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .map_err(|e| io_err("cannot set mode of", path, e))?;
    }
    for (name, value) in &meta.xattrs {
        // lsetxattr: never follows a symlink.
        if let Err(e) = xattr::set(path, name, value) {
            if e.raw_os_error() == Some(Errno::EOPNOTSUPP as i32) {
                tracing::warn!(path = %path.display(), xattr = ?name, "extended attribute not supported here; dropped");
            } else {
                return Err(io_err(
                    &format!("cannot set extended attribute {name:?} on"),
                    path,
                    e,
                ));
            }
        }
    }
    Ok(())
}

fn set_times(path: &Path, mtime: TimeSpec) -> nix::Result<()> {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
}

fn mkdir(path: &Path) -> Result<(), EntryError> {
    fs::create_dir(path).map_err(|e| io_err("cannot create directory", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err("cannot set mode of", path, e))
}

/// Removes whatever is at `path` without following symlinks; absent is fine.
fn remove_existing(path: &Path) -> Result<(), EntryError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).map_err(|e| io_err("cannot remove", path, e))
        }
        Ok(_) => fs::remove_file(path).map_err(|e| io_err("cannot remove", path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot inspect", path, e)),
    }
}

/// Opaque directory: removes everything under `dir` that this layer did
/// not add (descending into directories this layer added or re-declared).
fn clear_lower(dir: &Path, added: &HashSet<PathBuf>) -> Result<(), EntryError> {
    let entries = fs::read_dir(dir).map_err(|e| io_err("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot list", dir, e))?;
        let path = entry.path();
        if added.contains(&path) {
            if entry
                .file_type()
                .map_err(|e| io_err("cannot inspect", &path, e))?
                .is_dir()
            {
                clear_lower(&path, added)?;
            }
        } else {
            remove_existing(&path)?;
        }
    }
    Ok(())
}

fn display_rel(stack: &[OsString], last: &OsStr) -> String {
    let mut p = PathBuf::new();
    for c in stack {
        p.push(c);
    }
    p.push(last);
    p.display().to_string()
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some(TimeSpec::new(12, 500_000_000)));
        assert_eq!(
            parse_pax_time("-1.25"),
            Some(TimeSpec::new(-2, 750_000_000))
        );
        assert_eq!(parse_pax_time("x"), None);
    }

    #[test]
    fn normalize_paths() {
        let ok = |p: &str| normalize(p.as_bytes()).ok().unwrap();
        assert_eq!(ok("./a/b/"), vec![OsString::from("a"), OsString::from("b")]);
        assert_eq!(ok("a//./b"), vec![OsString::from("a"), OsString::from("b")]);
        assert!(ok("./").is_empty());
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a/../../b").is_err());
        assert!(normalize(b"..").is_err());
    }
}
