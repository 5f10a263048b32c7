//! Helpers shared by the integration tests: hand-written tar layers,
//! stores in temporary directories, and reading ext4 images with debugfs.

#![allow(dead_code)]

pub mod registry;
pub mod token;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use somna_images::mkimage::{LayerInput, NewImage, WrittenImage, write_image};
use somna_images::{ImageConfig, ImageStore, ImageStoreConfig, ImageStoreOptions};

/// Layer, unpack and disk tests write ownership and device nodes.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (they write ownership and device nodes): run cargo test as root"
    );
}

/// A hand-written uncompressed tar layer.
pub struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Tar {
    fn default() -> Self {
        Self::new()
    }
}

impl Tar {
    pub fn new() -> Self {
        Tar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h
    }

    pub fn dir(self, path: &str) -> Self {
        self.dir_owned(path, 0o755, 0, 0)
    }

    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_owned(path, data, 0o644, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn file_with_xattrs(mut self, path: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, data)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o600, 0, 0, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// `.wh.<name>` next to `path`.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), b"")
    }

    /// `<dir>/.wh..wh..opq`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    /// A regular file entry whose name bytes are written as given, with no
    /// checks (the tar crate refuses to write `..` or absolute paths).
    pub fn raw_file(mut self, name: &[u8], data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0, 0, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// A hard link entry with raw link name bytes.
    pub fn raw_hardlink(mut self, name: &str, target: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        h.set_path(name).unwrap();
        let old = h.as_old_mut();
        old.linkname = [0; 100];
        old.linkname[..target.len()].copy_from_slice(target);
        h.set_cksum();
        self.b.append(&h, std::io::empty()).unwrap();
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// A temporary world: local image dir, cache dir.
pub struct World {
    pub tmp: tempfile::TempDir,
}

impl World {
    pub fn new() -> Self {
        World {
            tmp: tempfile::Builder::new()
                .prefix("somna-images-test")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn images(&self) -> PathBuf {
        self.tmp.path().join("images")
    }

    pub fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    pub fn layout(&self, name: &str) -> PathBuf {
        self.images().join(name)
    }

    pub fn store(&self) -> ImageStore {
        ImageStore::new(ImageStoreConfig {
            local_dirs: vec![self.images()],
            cache_dir: self.cache(),
        })
        .unwrap()
    }

    pub fn store_with(&self, options: ImageStoreOptions) -> ImageStore {
        ImageStore::with_options(
            ImageStoreConfig {
                local_dirs: vec![self.images()],
                cache_dir: self.cache(),
            },
            options,
        )
        .unwrap()
    }

    /// A layout outside the store's local directories (a source to push
    /// to a registry or import), `<tmp>/src/<name>`.
    pub fn src(&self, name: &str) -> PathBuf {
        self.tmp.path().join("src").join(name)
    }

    /// Writes `name:tag` into [`World::src`]`(name)`.
    pub fn src_image(
        &self,
        reference: &str,
        layers: Vec<LayerInput>,
        config: ImageConfig,
    ) -> WrittenImage {
        let name = reference.split(':').next().unwrap();
        write_image(
            &self.src(name),
            &NewImage {
                reference: reference.to_string(),
                config,
                layers,
            },
        )
        .unwrap()
    }

    /// What the cache holds: (image records, blobs, root disks, tmp
    /// entries).
    pub fn cache_counts(&self) -> (usize, usize, usize, usize) {
        let count = |p: PathBuf| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
        (
            count(self.cache().join("images")),
            count(self.cache().join("blobs/sha256")),
            count(self.cache().join("disks")),
            count(self.cache().join("tmp")),
        )
    }

    /// Writes `name:tag` made of these tar layers.
    pub fn image(&self, reference: &str, layers: Vec<Vec<u8>>) -> WrittenImage {
        self.image_with(
            reference,
            layers.into_iter().map(LayerInput::tar).collect(),
            ImageConfig::default(),
        )
    }

    pub fn image_with(
        &self,
        reference: &str,
        layers: Vec<LayerInput>,
        config: ImageConfig,
    ) -> WrittenImage {
        let name = reference.split(':').next().unwrap();
        write_image(
            &self.layout(name),
            &NewImage {
                reference: reference.to_string(),
                config,
                layers,
            },
        )
        .unwrap()
    }
}

/// Runs one debugfs request against an ext4 image.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs (install e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `debugfs -R 'stat PATH'` says about an inode.
#[derive(Debug, Default)]
pub struct Stat {
    pub inode: u64,
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
    pub size: u64,
    pub mtime: i64,
    pub device: Option<(u32, u32)>,
    pub symlink_target: Option<String>,
    pub xattrs: BTreeMap<String, String>,
}

pub fn stat(image: &Path, path: &str) -> Option<Stat> {
    let text = debugfs(image, &format!("stat \"{path}\""));
    if !text.contains("Inode:") {
        return None;
    }
    let mut s = Stat::default();
    let field = |line: &str, key: &str| -> Option<String> {
        let i = line.find(key)? + key.len();
        line[i..].split_whitespace().next().map(str::to_string)
    };
    let mut in_xattrs = false;
    for line in text.lines() {
        if line.starts_with("Inode:") {
            s.inode = field(line, "Inode:").unwrap().parse().unwrap();
            let t = line.find("Type:").unwrap() + 5;
            let m = line.find("Mode:").unwrap();
            s.kind = line[t..m].trim().to_string();
            s.mode = u32::from_str_radix(&field(line, "Mode:").unwrap(), 8).unwrap();
        } else if line.starts_with("User:") {
            s.uid = field(line, "User:").unwrap().parse().unwrap();
            s.gid = field(line, "Group:").unwrap().parse().unwrap();
            s.size = field(line, "Size:").unwrap().parse().unwrap();
        } else if line.starts_with("Links:") {
            s.links = field(line, "Links:").unwrap().parse().unwrap();
        } else if line.trim_start().starts_with("mtime:") {
            let v = field(line, "mtime:").unwrap();
            let secs = v.split(':').next().unwrap().trim_start_matches("0x");
            s.mtime = i64::from_str_radix(secs, 16).unwrap();
        } else if line.starts_with("Device major/minor number:") {
            let v = field(line, "number:").unwrap();
            let (a, b) = v.split_once(':').unwrap();
            s.device = Some((a.parse().unwrap(), b.parse().unwrap()));
        } else if let Some(v) = line.strip_prefix("Fast link dest:") {
            s.symlink_target = Some(v.trim().trim_matches('"').to_string());
        } else if line.starts_with("Extended attributes:") {
            in_xattrs = true;
            continue;
        } else if in_xattrs && line.starts_with("  ") {
            let l = line.trim();
            if let Some((k, v)) = l.split_once(" = ") {
                let name = k.split(" (").next().unwrap().to_string();
                s.xattrs.insert(name, v.trim_matches('"').to_string());
            }
            continue;
        }
        if in_xattrs && !line.starts_with("  ") {
            in_xattrs = false;
        }
    }
    Some(s)
}

/// Names in a directory of an ext4 image (without . and ..).
pub fn ls(image: &Path, dir: &str) -> Vec<String> {
    let text = debugfs(image, &format!("ls -p \"{dir}\""));
    // -p: /inode/mode/uid/gid/name/size/
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// Reads a file out of an ext4 image.
pub fn cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .unwrap();
    out.stdout
}
