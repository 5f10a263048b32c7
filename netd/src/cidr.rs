//! IPv4 CIDR blocks (`10.0.0.0/8`), parsed strictly: host bits must be zero.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

/// Why a CIDR string did not parse; the message suggests the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CidrParseError(String);

impl Ipv4Cidr {
    /// A CIDR block; fails when `prefix_len` > 32 or host bits are set.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, CidrParseError> {
        if prefix_len > 32 {
            return Err(CidrParseError(format!(
                "prefix length /{prefix_len} is larger than 32"
            )));
        }
        let cidr = Self { addr, prefix_len };
        if cidr.network() != addr {
            return Err(CidrParseError(format!(
                "{addr}/{prefix_len} has host bits set; did you mean {}/{prefix_len}?",
                cidr.network()
            )));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask as a host-order integer.
    pub fn mask_bits(&self) -> u32 {
        mask(self.prefix_len)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask_bits())
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr)
    }

    /// Whether the two blocks share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Whether every address of `self` is in `other`.
    pub fn is_within(&self, other: &Ipv4Cidr) -> bool {
        self.prefix_len >= other.prefix_len && other.contains(self.addr)
    }

    /// The `n`th address of the block (`n` < size).
    pub(crate) fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrParseError;

    /// `A.B.C.D/N`; a bare address means `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            CidrParseError(format!(
                "{s:?} is not an IPv4 CIDR block (expected A.B.C.D/N, e.g. 10.0.0.0/8)"
            ))
        })?;
        let prefix_len = match len {
            None => 32,
            Some(l) => l.parse::<u8>().map_err(|_| {
                CidrParseError(format!(
                    "{s:?}: prefix length {l:?} is not a number from 0 to 32"
                ))
            })?,
        };
        Ipv4Cidr::new(addr, prefix_len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let c: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(c.size(), 1 << 24);
        assert!(c.contains(Ipv4Addr::new(10, 200, 1, 1)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        let host: Ipv4Cidr = "1.2.3.4".parse().unwrap();
        assert_eq!(host.prefix_len(), 32);
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(255, 255, 255, 255)));
        assert!(host.is_within(&all));
        assert!(!all.is_within(&host));
        assert!(all.overlaps(&host));
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        let e = "10.1.2.3/8".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Cidr>().is_err());
        assert!("banana".parse::<Ipv4Cidr>().is_err());
        assert!("::1/128".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Ipv4Cidr>().is_err());
    }
}
