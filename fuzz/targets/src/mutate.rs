//! The seeded PRNG and the byte mutator.
//!
//! Written here rather than taken from a crate: both are a few dozen lines,
//! the runner needs them to be deterministic across versions (a seed must
//! replay the same inputs after a dependency update, which `rand` does not
//! promise for its generators), and the mutations are the classic
//! AFL/libFuzzer set that no small crate packages on its own. `arbitrary`
//! would fit structured inputs, but every target here takes raw bytes (the
//! bytes a registry, a layer or the host really sends), so there is nothing
//! for it to build.

/// SplitMix64: tiny, fast, and good enough to drive mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length biased towards small values: 1, 2, 4, ... up to `max`.
    pub fn small_len(&mut self, max: usize) -> usize {
        let max = max.max(1);
        let cap = 1usize << self.below(usize::BITS as usize - max.leading_zeros() as usize);
        1 + self.below(cap.min(max))
    }
}

/// Bytes that break parsers: boundaries of signed and unsigned integers.
const INTERESTING_8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40, 0x64];
const INTERESTING_16: &[u16] = &[0, 0x7fff, 0x8000, 0xffff, 0x0100, 0x00ff, 1000, 4096];
const INTERESTING_32: &[u32] = &[
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x0001_0000,
    0x00ff_ffff,
    0x0100_0000,
];
/// ASCII that matters to the text formats among the targets (tar's octal
/// numbers, paths, JSON).
const INTERESTING_ASCII: &[u8] = b"0178/.\\\"{}[]:,-\0 \n\x1fe";

/// Applies random mutations to inputs.
pub struct Mutator<'a> {
    /// Tokens of the target's format, inserted or written over the input.
    pub dict: &'a [&'a [u8]],
    /// Inputs never grow past this.
    pub max_len: usize,
}

impl Mutator<'_> {
    /// Mutates `data` in place with 1 to 8 stacked mutations. `other` is a
    /// second corpus entry for splicing.
    pub fn mutate(&self, rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
        let rounds = 1 << rng.below(4);
        for _ in 0..rounds {
            self.mutate_once(rng, data, other);
        }
        data.truncate(self.max_len);
    }

    fn mutate_once(&self, rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
        if data.is_empty() {
            let n = rng.small_len(16);
            data.extend((0..n).map(|_| rng.next_u64() as u8));
            return;
        }
        let len = data.len();
        match rng.below(14) {
            // Flip one bit.
            0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            // A random byte.
            1 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            // Interesting bytes and integers, both byte orders.
            2 => {
                let i = rng.below(len);
                data[i] = INTERESTING_8[rng.below(INTERESTING_8.len())];
            }
            3 if len >= 2 => {
                let v = INTERESTING_16[rng.below(INTERESTING_16.len())];
                let b = if rng.one_in(2) {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let i = rng.below(len - 1);
                data[i..i + 2].copy_from_slice(&b);
            }
            4 if len >= 4 => {
                let v = INTERESTING_32[rng.below(INTERESTING_32.len())];
                let b = if rng.one_in(2) {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let i = rng.below(len - 3);
                data[i..i + 4].copy_from_slice(&b);
            }
            5 => {
                let i = rng.below(len);
                data[i] = INTERESTING_ASCII[rng.below(INTERESTING_ASCII.len())];
            }
            // Small arithmetic on one byte.
            6 => {
                let i = rng.below(len);
                let delta = 1 + rng.below(16) as u8;
                data[i] = if rng.one_in(2) {
                    data[i].wrapping_add(delta)
                } else {
                    data[i].wrapping_sub(delta)
                };
            }
            // Insert random bytes.
            7 => {
                let n = rng.small_len(32);
                let at = rng.below(len + 1);
                let fill: Vec<u8> = if rng.one_in(2) {
                    vec![rng.next_u64() as u8; n]
                } else {
                    (0..n).map(|_| rng.next_u64() as u8).collect()
                };
                data.splice(at..at, fill);
            }
            // Delete a range.
            8 => {
                let n = rng.small_len(len.min(512));
                let at = rng.below(len - n.min(len) + 1);
                data.drain(at..(at + n).min(len));
            }
            // Copy a range of the input over another place, or insert it.
            9 => {
                let n = rng.small_len(len.min(512));
                let from = rng.below(len - n + 1);
                let chunk = data[from..from + n].to_vec();
                let to = rng.below(len + 1);
                if rng.one_in(2) {
                    data.splice(to..to, chunk);
                } else {
                    let end = (to + n).min(len);
                    data.splice(to..end, chunk);
                }
            }
            // Dictionary token, inserted or written over.
            10 | 11 if !self.dict.is_empty() => {
                let tok = self.dict[rng.below(self.dict.len())];
                let at = rng.below(len + 1);
                if rng.one_in(2) {
                    data.splice(at..at, tok.iter().copied());
                } else {
                    let end = (at + tok.len()).min(len);
                    data.splice(at..end, tok.iter().copied());
                }
            }
            // Splice: our head, the other input's tail.
            12 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            // Insert a chunk of the other input.
            13 if !other.is_empty() => {
                let n = rng.small_len(other.len().min(1024));
                let from = rng.below(other.len() - n + 1);
                let at = rng.below(len + 1);
                data.splice(at..at, other[from..from + n].iter().copied());
            }
            // A guarded arm whose guard failed: flip a bit instead.
            _ => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::new(7);
        assert!(a.iter().all(|&x| x == r.next_u64()));
        assert_ne!(a[0], Rng::new(8).next_u64());
    }

    #[test]
    fn mutations_stay_bounded_and_change_inputs() {
        let m = Mutator {
            dict: &[b"tok"],
            max_len: 64,
        };
        let mut rng = Rng::new(1);
        let mut changed = 0;
        for _ in 0..2000 {
            let mut d = b"hello world".to_vec();
            m.mutate(&mut rng, &mut d, b"other input");
            assert!(d.len() <= 64);
            changed += usize::from(d != b"hello world");
        }
        assert!(
            changed > 1800,
            "only {changed} of 2000 mutations changed the input"
        );
        for n in [1, 2, 3, 100, usize::MAX / 2] {
            for _ in 0..100 {
                let l = rng.small_len(n);
                assert!((1..=n.max(1)).contains(&l));
            }
        }
    }
}
