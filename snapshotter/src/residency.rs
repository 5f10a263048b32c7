//! Host memory of snapshot files: how much of a file is resident in the
//! page cache, and giving it back. A sleeping sandbox must hold no host RAM:
//! its VMM is gone, and its memory and disk files are written back and
//! dropped from the page cache.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Bytes of `path` resident in the page cache (mmap + mincore); for a
/// directory, the total of its files.
pub fn resident_bytes(path: &Path) -> io::Result<u64> {
    if path.is_dir() {
        let mut total = 0;
        for f in crate::checksum::dir_files(path)? {
            total += resident_bytes(&path.join(f))?;
        }
        return Ok(total);
    }
    let f = File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a read-only shared mapping of a file we opened, unmapped below;
    // nothing reads through it (mincore only inspects the page tables of
    // the page cache).
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmapping exactly what we mapped.
    unsafe { libc::munmap(addr, len) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64)
}

/// Writes `path`'s dirty pages to disk and drops it from the page cache;
/// for a directory, every file in it (and the directory itself is synced).
pub fn release(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        for f in crate::checksum::dir_files(path)? {
            release(&path.join(f))?;
        }
        return File::open(path)?.sync_all();
    }
    let f = File::open(path)?;
    f.sync_data()?;
    // SAFETY: fadvise on a descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_empties_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4 << 20]).unwrap();
        assert!(resident_bytes(&p).unwrap() > 0);
        release(&p).unwrap();
        assert_eq!(resident_bytes(&p).unwrap(), 0);
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        assert_eq!(resident_bytes(&dir.path().join("empty")).unwrap(), 0);
    }

    #[test]
    fn release_covers_every_file_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("state");
        std::fs::create_dir_all(snap.join("sub")).unwrap();
        std::fs::write(snap.join("memory-ranges"), vec![7u8; 4 << 20]).unwrap();
        std::fs::write(snap.join("sub/state.json"), vec![1u8; 1 << 20]).unwrap();
        assert!(resident_bytes(&snap).unwrap() > 4 << 20);
        release(&snap).unwrap();
        assert_eq!(resident_bytes(&snap).unwrap(), 0);
    }
}
