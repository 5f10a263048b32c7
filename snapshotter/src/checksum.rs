//! Content checksums of snapshot files. Memory and disk images are large
//! and sparse, so only their data extents are read (SEEK_DATA/SEEK_HOLE),
//! and the hash is xxh3-128: it guards against corruption and truncation,
//! not against an adversary who can write the host's data directory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

/// Reads per call.
const BUF: usize = 1 << 20;

/// `xxh3-128:<hex>` of the file's content. Holes hash like the zeros they
/// read as, so the digest depends only on the bytes, not on the layout.
pub fn file_digest(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; BUF];
    let zeros = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < len {
        let (data_start, data_end) = next_extent(&f, pos, len)?;
        // The hole before the extent.
        let mut gap = data_start - pos;
        while gap > 0 {
            let n = gap.min(BUF as u64) as usize;
            h.update(&zeros[..n]);
            gap -= n as u64;
        }
        f.seek(SeekFrom::Start(data_start))?;
        let mut left = data_end - data_start;
        while left > 0 {
            let want = left.min(BUF as u64) as usize;
            f.read_exact(&mut buf[..want])?;
            h.update(&buf[..want]);
            left -= want as u64;
        }
        pos = data_end;
    }
    Ok(format!("xxh3-128:{:032x}", h.digest128()))
}

/// The regular files under `dir`, recursively, as paths relative to it,
/// sorted. Anything else (symlinks, sockets, devices) is an error: a
/// snapshot directory holds only files the VMM wrote.
pub fn dir_files(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
        for entry in std::fs::read_dir(root.join(rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                out.push(path);
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is neither a regular file nor a directory",
                        root.join(&path).display()
                    ),
                ));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// `xxh3-128:<hex>` over a directory's files given as (relative path,
/// size, file digest), in order: a renamed, added, removed or changed file
/// changes it.
pub fn dir_digest<'a>(files: impl Iterator<Item = (&'a Path, u64, &'a str)>) -> String {
    let mut h = Xxh3::new();
    for (path, size, digest) in files {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        h.update(&size.to_le_bytes());
        h.update(digest.as_bytes());
        h.update(b"\n");
    }
    format!("xxh3-128:{:032x}", h.digest128())
}

/// The next data extent at or after `pos`: (start, end). A file system
/// without SEEK_DATA support reports the whole rest as data.
fn next_extent(f: &File, pos: u64, len: u64) -> io::Result<(u64, u64)> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data after pos: the rest is a hole.
            Some(libc::ENXIO) => Ok((len, len)),
            Some(libc::EINVAL) => Ok((pos, len)),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((start as u64, (end as u64).min(len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_hash_like_zeros_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        let dense = dir.path().join("dense");
        {
            let mut f = File::create(&sparse).unwrap();
            f.set_len(8 << 20).unwrap();
            f.seek(SeekFrom::Start(3 << 20)).unwrap();
            f.write_all(b"hello").unwrap();
        }
        {
            let mut data = vec![0u8; 8 << 20];
            data[3 << 20..(3 << 20) + 5].copy_from_slice(b"hello");
            std::fs::write(&dense, data).unwrap();
        }
        let a = file_digest(&sparse).unwrap();
        assert_eq!(a, file_digest(&dense).unwrap());
        assert!(a.starts_with("xxh3-128:"));

        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&sparse)
            .unwrap();
        f.seek(SeekFrom::Start(7 << 20)).unwrap();
        f.write_all(b"x").unwrap();
        assert_ne!(file_digest(&sparse).unwrap(), a);
        f.set_len(4 << 20).unwrap();
        assert_ne!(file_digest(&sparse).unwrap(), a);
    }
}
