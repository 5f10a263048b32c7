//! `oci_layer`: applying an image layer (a tar stream, or gzip of one) with
//! `somna_images::Unpacker`, the code that builds every root disk's tree.
//!
//! Each input is applied twice to a fresh directory `<tmp>/root` (as the
//! lower layer, then again as the upper one, so whiteouts, opaque markers
//! and replacements meet an existing tree), then `finish` runs. Next to
//! `root` sits `outside/` with one file, the thing an escaping layer would
//! reach: a symlink `../outside` inside the layer resolves to
//! `root/outside` under the unpacker's chroot semantics, but to the real
//! `outside/` if confinement were broken. The invariants, checked after
//! every input whatever the unpacker returned:
//!
//! - `<tmp>` holds exactly `root` and `outside`, and `outside` holds exactly
//!   its file, unchanged and not hard-linked from anywhere;
//! - every hard-linked file under `root` has all its links under `root`
//!   (a link count higher than the links found means a link elsewhere);
//! - an accepted layer wrote no more file content than the limit.
//!
//! Needs root for ownership, device nodes and `trusted.*` xattrs (without,
//! such entries are rejected and the fuzzer explores less).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use somna_images::{ImageError, LayerStats, Unpacker};

use crate::runner::Outcome;

/// File content the unpacker may write per input (its `with_limit`).
const LIMIT: u64 = 8 << 20;
/// Decompressed bytes read from a gzip input at most.
const MAX_DECOMPRESSED: u64 = 16 << 20;
const SENTINEL: &[u8] = b"outside the unpack root: a layer must never touch this\n";

pub const DICT: &[&[u8]] = &[
    b".wh.",
    b".wh..wh..opq",
    b".wh..wh.",
    b"../",
    b"..",
    b"/",
    b"./",
    b"outside",
    b"esc/",
    b"/etc",
    b"ustar\0",
    b"ustar  \0",
    b"00000000000",
    b"0000644\0",
    b"0000755\0",
    b"SCHILY.xattr.user.x=",
    b"SCHILY.xattr.trusted.x=",
    b"SCHILY.xattr.security.capability=",
    b"path=",
    b"linkpath=",
    b"mtime=",
    b"GNU.sparse.",
    b"././@LongLink",
    b"\x1f\x8b",
];

pub fn execute(data: &[u8]) -> Outcome {
    let parent = tempfile::Builder::new()
        .prefix("somna-fuzz-layer.")
        .tempdir()
        .expect("cannot create a temporary directory for the layer target");
    let root = parent.path().join("root");
    let outside = parent.path().join("outside");
    fs::create_dir(&root).expect("cannot create the unpack root");
    fs::create_dir(&outside).expect("cannot create the outside directory");
    fs::write(outside.join("sentinel"), SENTINEL).expect("cannot write the sentinel");

    let result = unpack(&root, data);
    check_confined(parent.path(), &root);
    let strip = root.display().to_string();
    match result {
        Ok(stats) => {
            assert!(
                stats.iter().map(|s| s.bytes).sum::<u64>() <= LIMIT,
                "unpacker wrote more than its limit: {stats:?}"
            );
            Outcome::accepted(&format!(
                "{:?}",
                stats
                    .iter()
                    .map(|s| (s.entries > 0, s.whiteouts > 0))
                    .collect::<Vec<_>>()
            ))
        }
        Err(e) => Outcome::rejected(&format!("{:?} {e}", e.kind()), &strip),
    }
}

fn unpack(root: &Path, data: &[u8]) -> Result<Vec<LayerStats>, ImageError> {
    let mut unpacker = Unpacker::new(root)?.with_limit(LIMIT);
    let mut stats = Vec::new();
    for layer in ["lower", "upper"] {
        stats.push(if data.starts_with(&[0x1f, 0x8b]) {
            let gz = flate2::read::MultiGzDecoder::new(data).take(MAX_DECOMPRESSED);
            unpacker.apply(layer, gz)?
        } else {
            unpacker.apply(layer, data)?
        });
    }
    unpacker.finish()?;
    Ok(stats)
}

/// The confinement invariants (see the module docs).
fn check_confined(parent: &Path, root: &Path) {
    let mut names = list(parent);
    names.sort();
    assert_eq!(
        names,
        ["outside", "root"],
        "the layer created something next to the unpack root"
    );
    let outside = parent.join("outside");
    assert_eq!(
        list(&outside),
        ["sentinel"],
        "the layer wrote into a directory outside the unpack root"
    );
    let sentinel = outside.join("sentinel");
    let meta = fs::symlink_metadata(&sentinel).expect("the sentinel is gone");
    assert!(meta.is_file(), "the sentinel was replaced");
    assert_eq!(
        meta.nlink(),
        1,
        "the layer hard-linked a file outside the root"
    );
    assert_eq!(
        fs::read(&sentinel).expect("cannot read the sentinel"),
        SENTINEL,
        "the layer changed a file outside the root"
    );

    // Every hard link of a file under the root is under the root.
    let mut links: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => panic!("cannot list {} after unpacking: {e}", dir.display()),
        };
        for entry in entries {
            let entry = entry.expect("cannot read a directory entry");
            let path = entry.path();
            let m = fs::symlink_metadata(&path).expect("cannot inspect an unpacked entry");
            if m.is_dir() {
                stack.push(path);
            } else if m.nlink() > 1 {
                links.entry((m.dev(), m.ino())).or_insert((m.nlink(), 0)).1 += 1;
            }
        }
    }
    for (nlink, found) in links.values() {
        assert_eq!(
            nlink, found,
            "a file under the root has {nlink} links but only {found} are under the root"
        );
    }
}

fn list(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("cannot read a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Builds a tar archive entry by entry, writing names into the header
/// verbatim (the `tar` builder refuses `..` and absolute paths, which the
/// seeds need).
pub struct TarBuilder {
    out: Vec<u8>,
    /// Owner of every entry.
    owner: (u64, u64),
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder {
            out: Vec::new(),
            owner: process_owner(),
        }
    }

    fn header(
        &self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        mode: u32,
        size: u64,
    ) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(self.owner.0);
        h.set_gid(self.owner.1);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        let old = h.as_old_mut();
        assert!(name.len() <= old.name.len() && link.len() <= old.linkname.len());
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        h
    }

    fn push(&mut self, h: &tar::Header, data: &[u8]) -> &mut Self {
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        let h = self.header(tar::EntryType::Directory, name.as_bytes(), b"", 0o755, 0);
        self.push(&h, b"")
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let h = self.header(
            tar::EntryType::Regular,
            name.as_bytes(),
            b"",
            0o644,
            data.len() as u64,
        );
        self.push(&h, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let h = self.header(
            tar::EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            0o777,
            0,
        );
        self.push(&h, b"")
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let h = self.header(
            tar::EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            0o644,
            0,
        );
        self.push(&h, b"")
    }

    pub fn node(&mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = self.header(kind, name.as_bytes(), b"", 0o600, 0);
        h.set_device_major(major)
            .expect("ustar headers have device fields");
        h.set_device_minor(minor)
            .expect("ustar headers have device fields");
        h.set_cksum();
        self.push(&h, b"")
    }

    /// A PAX extended header for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where len counts itself.
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        let h = self.header(
            tar::EntryType::XHeader,
            b"PaxHeaders/x",
            b"",
            0o644,
            body.len() as u64,
        );
        self.push(&h, &body)
    }

    /// A GNU long name (`././@LongLink`) for the next entry.
    pub fn gnu_long_name(&mut self, name: &str) -> &mut Self {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        self.push(&h, &data)
    }

    /// Ends the archive (two zero blocks).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// The uid and gid this process creates files with: the seeds' entries
/// belong to them, so that they unpack without root too.
fn process_owner() -> (u64, u64) {
    tempfile::tempfile()
        .and_then(|f| f.metadata())
        .map(|m| (u64::from(m.uid()), u64::from(m.gid())))
        .unwrap_or((0, 0))
}

/// Valid layers that use every feature the unpacker handles (device nodes
/// only as root, who alone may make them).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut basic = TarBuilder::new();
    basic
        .dir("./")
        .dir("etc/")
        .file("etc/hello", b"hello from a layer\n")
        .symlink("etc/link", "hello")
        .hardlink("etc/hard", "etc/hello")
        .file("etc/.wh.gone", b"")
        .dir("var/")
        .file("var/.wh..wh..opq", b"")
        .file("var/keep", b"kept")
        .pax(&[
            ("SCHILY.xattr.user.somna", b"fuzz"),
            ("mtime", b"1700000000.25"),
        ])
        .file("etc/xattr", b"x")
        .gnu_long_name(&format!("usr/{}/long-name", "d".repeat(120)))
        .file("placeholder", b"long")
        .node("fifo", tar::EntryType::Fifo, 0, 0);
    if process_owner().0 == 0 {
        basic.node("dev-null", tar::EntryType::Char, 1, 3);
    }
    let basic = basic.finish();
    // Symlinks that point out of the root: under chroot semantics they
    // resolve inside it, so these writes land in root/outside and root/etc.
    let escapes = TarBuilder::new()
        .symlink("esc", "../outside")
        .file("esc/planted", b"must stay inside the root")
        .symlink("abs", "/etc")
        .file("abs/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .symlink("deep", "../../../../../../../../tmp")
        .file("deep/planted", b"x")
        .hardlink("esc/planted-link", "esc/planted")
        .finish();
    // A later layer replacing a directory with a file and back.
    let replace = TarBuilder::new()
        .dir("a/")
        .file("a/b", b"b")
        .file(".wh.a", b"")
        .file("a", b"now a file")
        .dir("c/")
        .symlink("c/self", ".")
        .file("c/self/self/f", b"through a loop")
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut gz, &basic).expect("gzip into memory");
    let gz = gz.finish().expect("gzip into memory");
    vec![basic, escapes, replace, gz]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::create_dir(parent.path().join("outside")).unwrap();
        fs::write(parent.path().join("outside/sentinel"), SENTINEL).unwrap();
        (parent, root)
    }

    #[test]
    fn escaping_seed_lands_inside_the_root() {
        let (parent, root) = setup();
        let seeds = seeds();
        unpack(&root, &seeds[1]).unwrap();
        check_confined(parent.path(), &root);
        assert_eq!(
            fs::read(root.join("outside/planted")).unwrap(),
            b"must stay inside the root"
        );
        assert!(root.join("etc/passwd").is_file());
        assert!(root.join("tmp/planted").is_file());
        let m = fs::metadata(root.join("outside/planted")).unwrap();
        assert_eq!(m.nlink(), 2, "planted and its hard link");
    }

    #[test]
    fn basic_seed_unpacks_every_kind() {
        let (parent, root) = setup();
        let stats = unpack(&root, &seeds()[0]).unwrap();
        check_confined(parent.path(), &root);
        assert!(
            stats[0].entries >= 10 && stats[0].whiteouts == 2,
            "{stats:?}"
        );
        assert_eq!(
            fs::read_link(root.join("etc/link")).unwrap(),
            Path::new("hello")
        );
        assert_eq!(fs::metadata(root.join("etc/hard")).unwrap().nlink(), 2);
        assert!(
            root.join(format!("usr/{}/long-name", "d".repeat(120)))
                .is_file()
        );
        // The gzip seed is the same layer.
        let (parent2, root2) = setup();
        assert_eq!(unpack(&root2, &seeds()[3]).unwrap(), stats);
        check_confined(parent2.path(), &root2);
    }

    #[test]
    fn confinement_check_catches_escapes() {
        let caught = |f: &dyn Fn(&Path, &Path)| {
            let (parent, root) = setup();
            f(parent.path(), &root);
            std::panic::catch_unwind(|| check_confined(parent.path(), &root)).is_err()
        };
        assert!(!caught(
            &|_, root| fs::write(root.join("inside"), b"ok").unwrap()
        ));
        assert!(caught(
            &|p, _| fs::write(p.join("outside/new"), b"x").unwrap()
        ));
        assert!(caught(
            &|p, _| fs::write(p.join("next-to-root"), b"x").unwrap()
        ));
        assert!(caught(
            &|p, _| fs::write(p.join("outside/sentinel"), b"x").unwrap()
        ));
        assert!(caught(&|p, root| {
            fs::hard_link(p.join("outside/sentinel"), root.join("link")).unwrap()
        }));
    }
}
