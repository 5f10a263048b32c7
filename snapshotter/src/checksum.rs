//! Content checksums of snapshot files. Memory and disk images are large
//! and sparse, so only their data extents are read (SEEK_DATA/SEEK_HOLE),
//! and all-zero blocks are skipped: verifying a snapshot costs what the
//! guest wrote, not the size it was given. The hash is xxh3-128: it guards
//! against corruption and truncation, not against an adversary who can
//! write the host's data directory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

/// Reads per call (a multiple of [`BLOCK`]).
const BUF: usize = 1 << 20;

/// The unit of zero-skipping: a page, and the file systems' block size.
const BLOCK: usize = 4096;

/// What [`file_digest`] writes.
const BLOCKS: &str = "xxh3-128-blocks:";

/// What snapshots sealed before 2026-12-07 recorded: a hash of every byte,
/// holes hashed as zeros (a 1.5 GiB hole costs ~65 ms). Still verified, so
/// sandboxes asleep across an upgrade wake.
const STREAM: &str = "xxh3-128:";

/// `xxh3-128-blocks:<hex>`: xxh3-128 over each 4 KiB block (on the 4 KiB
/// grid) that is not all zeros, as its offset then its bytes, then the
/// file's length. Holes and written zeros are alike, so the digest depends
/// only on the bytes, not on the layout.
pub fn file_digest(path: &Path) -> io::Result<String> {
    let (mut f, len) = open_for_hashing(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; BUF];
    let zeros = [0u8; BLOCK];
    let block = BLOCK as u64;
    let mut pos = 0u64;
    while pos < len {
        let (data_start, data_end) = next_extent(&f, pos, len)?;
        // Whole blocks, so none is hashed twice or cut at an extent's edge.
        let start = data_start / block * block;
        let end = data_end.div_ceil(block).saturating_mul(block).min(len);
        if end <= pos {
            return Err(io::Error::other(format!(
                "the file system reported an empty data extent at byte {pos}"
            )));
        }
        f.seek(SeekFrom::Start(start))?;
        let mut offset = start;
        while offset < end {
            let want = (end - offset).min(BUF as u64) as usize;
            f.read_exact(&mut buf[..want])?;
            for chunk in buf[..want].chunks(BLOCK) {
                if chunk != &zeros[..chunk.len()] {
                    h.update(&offset.to_le_bytes());
                    h.update(chunk);
                }
                offset += chunk.len() as u64;
            }
        }
        pos = end;
    }
    h.update(&len.to_le_bytes());
    Ok(format!("{BLOCKS}{:032x}", h.digest128()))
}

/// The digest of the file at `path` by the method `recorded` names, to
/// compare with it: a snapshot sealed by an older agent keeps verifying.
pub fn digest_like(path: &Path, recorded: &str) -> io::Result<String> {
    if recorded.starts_with(STREAM) {
        stream_digest(path)
    } else {
        file_digest(path)
    }
}

/// `xxh3-128:<hex>` of every byte of the file, holes hashed as the zeros
/// they read as (the method before [`file_digest`]).
pub(crate) fn stream_digest(path: &Path) -> io::Result<String> {
    let (mut f, len) = open_for_hashing(path)?;
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
    Ok(format!("{STREAM}{:032x}", h.digest128()))
}

/// The file at `path` and its length, readahead off (see [`no_readahead`]).
fn open_for_hashing(path: &Path) -> io::Result<(File, u64)> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    no_readahead(&f);
    Ok((f, len))
}

/// Turns readahead off for `f`. A VM's memory file is fallocated in full:
/// readahead past the end of a data extent pulls the unwritten (all-zero)
/// blocks behind it into the page cache, and ext4 then reports cached
/// unwritten blocks as data, so one pass would read and hash all of guest
/// RAM (and leave it cached) instead of the part the guest wrote. Advice
/// only: a file system that ignores it is merely slower.
fn no_readahead(f: &File) {
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
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
        assert!(a.starts_with(BLOCKS));

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

    /// Offsets count: the same block elsewhere is another file. A length
    /// off the 4 KiB grid is covered to its last byte.
    #[test]
    fn block_offsets_and_a_partial_last_block_are_part_of_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            file_digest(&p).unwrap()
        };
        let mut here = vec![0u8; 3 * BLOCK + 10];
        here[BLOCK] = 7;
        let mut there = vec![0u8; 3 * BLOCK + 10];
        there[2 * BLOCK] = 7;
        assert_ne!(file("here", &here), file("there", &there));

        let base = file("base", &here);
        let mut tail = here.clone();
        tail[3 * BLOCK + 9] = 1;
        assert_ne!(file("tail", &tail), base);
        // Trailing zeros still change the length.
        let mut longer = here.clone();
        longer.push(0);
        assert_ne!(file("longer", &longer), base);
        assert_eq!(file("again", &here), base);
    }

    /// A digest recorded by the older whole-stream method is recomputed by
    /// that method, so it still matches (and still finds damage).
    #[test]
    fn digests_of_the_older_method_are_checked_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(b"data").unwrap();
        let old = stream_digest(&p).unwrap();
        assert!(old.starts_with(STREAM) && !old.starts_with(BLOCKS));
        assert_eq!(digest_like(&p, &old).unwrap(), old);
        let new = file_digest(&p).unwrap();
        assert_eq!(digest_like(&p, &new).unwrap(), new);
        f.write_all(b"!").unwrap();
        assert_ne!(digest_like(&p, &old).unwrap(), old);
    }

    /// A VM's memory file is fallocated in full and written in part:
    /// hashing it must read the written part only, leaving the rest
    /// unwritten and out of the page cache (else a wake reads and caches
    /// all of guest RAM).
    #[test]
    fn hashing_a_fallocated_file_reads_only_what_was_written() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        let mut f = File::create(&mem).unwrap();
        // SAFETY: fallocate on our own descriptor.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, (64 * MIB) as libc::off_t) } != 0 {
            eprintln!("skipped: {} has no fallocate", dir.path().display());
            return;
        }
        f.write_all(&vec![0xab; MIB as usize]).unwrap();
        f.sync_all().unwrap();
        // SAFETY: fadvise on our own descriptor; written back just above.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let data_after = |f: &File| next_extent(f, MIB, 64 * MIB).unwrap().0 < 64 * MIB;
        if data_after(&f) {
            eprintln!(
                "skipped: the file system under {} reports unwritten blocks as data",
                dir.path().display()
            );
            return;
        }

        let dense = dir.path().join("dense");
        let mut content = vec![0u8; (64 * MIB) as usize];
        content[..MIB as usize].fill(0xab);
        std::fs::write(&dense, content).unwrap();
        assert_eq!(file_digest(&mem).unwrap(), file_digest(&dense).unwrap());
        assert!(
            !data_after(&f),
            "hashing pulled the unwritten rest of the file into the page cache"
        );
    }
}
