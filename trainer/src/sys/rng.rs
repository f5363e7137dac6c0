//! A small deterministic RNG (xoshiro256** seeded by SplitMix64). Everything random in the data —
//! the synthetic dataset, the validation split, the epoch permutations — is a pure function of a
//! seed and a stream id, which is what makes resume exact and shards independent of rank count.
//!
//! Each user draws from its own stream (`STREAM_*` below), so the same `--seed` given to `generate`
//! and to `prepare` does not correlate the text with the split.

/// Stream ids of [`Rng::stream`] and [`unit`]; one per use, never reused.
pub const STREAM_GENERATE: u64 = 0x6E4E;
pub const STREAM_VAL_SPLIT: u64 = 0x5A11;
pub const STREAM_EPOCH: u64 = 0xE90C;

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Hash of a seed and a path of ids; order matters (`[1, 2]` ≠ `[2, 1]`).
fn key(seed: u64, ids: &[u64]) -> u64 {
    ids.iter().fold(mix(seed), |h, &id| mix(h ^ id))
}

/// A uniform number in [0, 1) determined by a seed and a list of ids, with no state to carry:
/// `prepare` decides each document's split with `unit(seed, &[STREAM_VAL_SPLIT, index])`, so the
/// decision streams and does not depend on the documents before it.
pub fn unit(seed: u64, ids: &[u64]) -> f64 {
    to_unit(mix(key(seed, ids)))
}

/// [`unit`] for many ids after a common prefix, hashing the prefix once:
/// `Units::new(seed, &[a]).at(i) == unit(seed, &[a, i])`.
#[derive(Clone, Copy, Debug)]
pub struct Units(u64);

impl Units {
    pub fn new(seed: u64, prefix: &[u64]) -> Self {
        Self(key(seed, prefix))
    }

    #[inline]
    pub fn at(&self, id: u64) -> f64 {
        to_unit(mix(mix(self.0 ^ id)))
    }
}

fn to_unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// The stream of `seed` with no ids; prefer [`Rng::stream`] with a `STREAM_*` id.
    pub fn new(seed: u64) -> Self {
        Self::stream(seed, &[])
    }

    /// An independent stream for `(seed, ids…)`, e.g. `(seed, [STREAM_EPOCH, epoch])`.
    pub fn stream(seed: u64, ids: &[u64]) -> Self {
        let mut x = key(seed, ids);
        let mut next = || {
            x = mix(x);
            x
        };
        // SplitMix64 outputs are never all zero together, the one state xoshiro cannot leave.
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        to_unit(self.next_u64())
    }

    /// Uniform in `0..n` (Lemire's multiply-and-reject, no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "range({lo}, {hi})");
        let span = hi.wrapping_sub(lo) as u64;
        if span == u64::MAX {
            return self.next_u64() as i64;
        }
        lo.wrapping_add(self.below(span + 1) as i64)
    }

    /// Fisher–Yates: every permutation equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_matches_the_reference_sequence() {
        // The reference algorithm (Blackman & Vigna) from state [1, 2, 3, 4].
        let mut rng = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn splitmix_matches_the_reference() {
        // SplitMix64 from state 0: its first output is mix(0).
        assert_eq!(mix(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::stream(1, &[2]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let first = |seed, ids: &[u64]| Rng::stream(seed, ids).next_u64();
        assert_ne!(first(1, &[2]), first(1, &[3]));
        assert_ne!(first(1, &[2]), first(2, &[2]));
        assert_ne!(first(1, &[2, 3]), first(1, &[3, 2]));
        assert_ne!(first(1, &[]), first(1, &[0]));
        assert_eq!(
            unit(4, &[STREAM_VAL_SPLIT, 9]),
            unit(4, &[STREAM_VAL_SPLIT, 9])
        );
        assert_ne!(
            unit(4, &[STREAM_VAL_SPLIT, 9]),
            unit(4, &[STREAM_VAL_SPLIT, 10])
        );
    }

    #[test]
    fn unit_is_roughly_uniform() {
        let n = 100_000;
        let below_tenth = (0..n)
            .filter(|&i| unit(3, &[STREAM_VAL_SPLIT, i]) < 0.1)
            .count();
        assert!((9_500..10_500).contains(&below_tenth), "{below_tenth}");
        let mut rng = Rng::new(1);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            counts[rng.below(5) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(rng.below(1), 0);
        for _ in 0..1000 {
            assert!((-3..=3).contains(&rng.range(-3, 3)));
        }
        assert_eq!(rng.range(5, 5), 5);
        rng.range(i64::MIN, i64::MAX);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::new(3).shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        let mut w: Vec<u32> = (0..1000).collect();
        Rng::new(3).shuffle(&mut w);
        assert_eq!(v, w, "same seed, same order");
        v.sort();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
        Rng::new(3).shuffle::<u8>(&mut []);
    }
}
