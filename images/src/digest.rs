//! Content digests (`sha256:<hex>`) and verification of blobs against them.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, IoContext};

/// A SHA-256 content digest, written `sha256:<64 lowercase hex digits>`.
/// Other algorithms are rejected: every blob Somna reads is verified, and
/// SHA-256 is the only algorithm it verifies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(if s.contains(':') {
                format!("unsupported digest algorithm in {s:?} (only sha256 is supported)")
            } else {
                format!("{s:?} is not a digest (want sha256:<64 hex digits>)")
            });
        };
        Self::from_hex(hex).map_err(|_| {
            format!("{s:?} is not a valid sha256 digest (want 64 lowercase hex digits)")
        })
    }

    /// From the 64 lowercase hex digits alone.
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest {
                hex: hex.to_string(),
            })
        } else {
            Err(format!("{hex:?} is not 64 lowercase hex digits"))
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest {
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Digest::parse(s)
    }
}

/// A reader that hashes and counts everything read through it.
pub(crate) struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> DigestReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        DigestReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (so the digest covers all of it).
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The digest and byte count of what was read.
    pub(crate) fn finish(self) -> (Digest, u64) {
        (
            Digest {
                hex: hex::encode(self.hasher.finalize()),
            },
            self.count,
        )
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts everything written through it.
pub(crate) struct DigestWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: io::Write> DigestWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        DigestWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub(crate) fn finish(self) -> (W, Digest, u64) {
        (
            self.inner,
            Digest {
                hex: hex::encode(self.hasher.finalize()),
            },
            self.count,
        )
    }
}

impl<W: io::Write> io::Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a blob is expected to be: its digest, its size, and (for messages)
/// what it is.
#[derive(Clone, Debug)]
pub(crate) struct Expected<'a> {
    pub what: &'a str,
    pub digest: &'a Digest,
    pub size: u64,
}

impl Expected<'_> {
    /// Checks what was actually read against the expectation.
    pub(crate) fn check(
        &self,
        path: &Path,
        actual: &Digest,
        actual_size: u64,
    ) -> Result<(), ImageError> {
        if actual != self.digest || actual_size != self.size {
            return Err(ImageError::DigestMismatch {
                what: self.what.to_string(),
                digest: self.digest.to_string(),
                path: path.to_path_buf(),
                expected_size: self.size,
                actual_size,
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn missing(&self, path: &Path) -> ImageError {
        ImageError::BlobMissing {
            what: self.what.to_string(),
            digest: self.digest.to_string(),
            path: path.to_path_buf(),
        }
    }
}

/// Reads a whole (small) blob and verifies its size and digest.
pub(crate) fn read_verified(
    path: &Path,
    expected: &Expected<'_>,
    limit: u64,
) -> Result<Vec<u8>, ImageError> {
    if expected.size > limit {
        return Err(ImageError::BlobTooLarge {
            what: expected.what.to_string(),
            digest: expected.digest.to_string(),
            size: expected.size,
            limit,
        });
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(expected.missing(path)),
        Err(e) => return Err(ImageError::io("cannot open blob", path, e)),
    };
    // Read at most one byte past the expected size: enough to notice a
    // longer file without reading an arbitrarily large one.
    let mut data = Vec::with_capacity(expected.size as usize);
    file.take(expected.size + 1)
        .read_to_end(&mut data)
        .ctx("cannot read blob", path)?;
    let actual = Digest::of(&data);
    expected.check(path, &actual, data.len() as u64)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(Digest::parse(&s).unwrap(), d);
        assert!(
            Digest::parse("sha512:abc")
                .unwrap_err()
                .contains("only sha256")
        );
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse(&s.to_uppercase()).is_err());
        assert!(Digest::parse("latest").is_err());
    }

    #[test]
    fn reader_hashes_everything() {
        let mut r = DigestReader::new(&b"hello world"[..]);
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        r.drain().unwrap();
        let (d, n) = r.finish();
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
