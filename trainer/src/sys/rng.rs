//! The data's deterministic randomness: xoshiro256** (the `rand_xoshiro` crate) seeded by
//! SplitMix64's finaliser. Everything random in the data — the synthetic dataset, the validation
//! split, the epoch permutations — is a pure function of a seed and a stream id, which is what
//! makes resume exact and shards independent of rank count.
//!
//! Each user draws from its own stream (`STREAM_*` below), so the same `--seed` given to `generate`
//! and to `prepare` does not correlate the text with the split.
//!
//! What stays here by hand, and why: the seeding (`mix`, `key`: a hash of a seed and a path of ids,
//! which no RNG crate offers), `below` (Lemire's rejection), `range` and `shuffle`. `rand`'s own
//! `random_range` and `shuffle` draw differently, so using them would change every stream and with
//! it every prepared split, generated dataset and epoch order of a checkpoint written before; the
//! `golden` test pins the streams to the values of the earlier hand-written generator.

use rand_xoshiro::rand_core::{Rng as _, SeedableRng};
use rand_xoshiro::Xoshiro256StarStar;

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
pub struct Rng(Xoshiro256StarStar);

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
        // SplitMix64 outputs are never all zero together, the one state xoshiro cannot leave (and
        // the one seed `from_seed` would replace).
        Self::from_state([next(), next(), next(), next()])
    }

    /// xoshiro256** at state `s` (its words little-endian in the seed, as `rand_xoshiro` reads them).
    fn from_state(s: [u64; 4]) -> Self {
        let mut seed = [0u8; 32];
        for (chunk, word) in seed.chunks_exact_mut(8).zip(s) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Self(Xoshiro256StarStar::from_seed(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
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

    fn fold(h: u64, x: u64) -> u64 {
        (h ^ x).wrapping_mul(0x0000_0100_0000_01B3)
    }
    const FNV: u64 = 0xCBF2_9CE4_8422_2325;

    /// The streams are bit-identical to those of the hand-written xoshiro256** this module had
    /// before it used `rand_xoshiro`: the values below were printed by that implementation (its
    /// file compiled on its own, same loops), so every generated dataset, validation split and
    /// epoch order, and with them the exact resume of older checkpoints, stay as they were.
    #[test]
    fn golden_streams_of_the_earlier_implementation() {
        #[rustfmt::skip]
        let cases: &[(u64, &[u64], [u64; 4], u64)] = &[
            (0x0, &[], [0xf7590b0236bfc198, 0x6558461d859a300e, 0x5da5b60858f54ea4, 0x2eb2582d1895a59f], 0xb5444714f87c87bc),
            (0x1, &[], [0xa1427ba0f0582593, 0x648f767f85738a9, 0xc74555d6a570903d, 0xf14f66635cca674a], 0x94c7c43fd4fe244f),
            (0x1, &[STREAM_GENERATE], [0xd2debf700b6ea67f, 0xae064f3fc18733db, 0x5f8178c042dded78, 0x5fe008b474cc5a76], 0xcf7e02af4116e33d),
            (0x3, &[STREAM_GENERATE], [0x50eec0448f3732f8, 0x28a2c9a231fc5795, 0xf98d32e5d5089b53, 0x2d91ea90e67297ca], 0x621eae8649c6ce58),
            (0x0, &[STREAM_VAL_SPLIT], [0x52b742a97f5b1e41, 0xddae65aea5035a55, 0x1291eeefc503628a, 0x4e1fec1bbe713568], 0x25dbe51642ff8b3),
            (0x0, &[STREAM_EPOCH, 0], [0x4acbedcbafe0f707, 0x1a26ddcae2558d85, 0xb972fe30fed05372, 0x4c8776a3b0d8be50], 0xe1daca2f546e040),
            (0x7, &[STREAM_EPOCH, 3], [0x412f154c86a90a80, 0xff430b2571b355fe, 0x810c201e2ed93001, 0xebb73dd64aeac485], 0xb73bf74f6d7ce0f2),
            (u64::MAX, &[1, 2, 3], [0xe99e02ff68901be2, 0xc8b548f0a034c662, 0x981468559f3d8c77, 0xb2324096b5925a36], 0xa7869f5efbdd2d26),
        ];
        for &(seed, ids, first, hash) in cases {
            let mut r = Rng::stream(seed, ids);
            let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
            assert_eq!(got, first, "stream ({seed:#x}, {ids:?})");
            let h = (0..100_000).fold(FNV, |h, _| fold(h, r.next_u64()));
            assert_eq!(h, hash, "100,000 draws of ({seed:#x}, {ids:?})");
        }

        // below, range and next_f64 as `generate` uses them.
        let mut r = Rng::stream(3, &[STREAM_GENERATE]);
        let mut h = FNV;
        for i in 0..100_000u64 {
            h = fold(h, r.below(i % 1000 + 1));
            h = fold(h, r.range(-(i as i64 % 7), i as i64 % 13) as u64);
            h = fold(h, r.next_f64().to_bits());
        }
        assert_eq!(h, 0x143a24442de4dfd9, "draws");

        // Epoch orders, as `order::permutation` shuffles them.
        for (seed, epoch, n, first, hash) in [
            (
                0u64,
                0u64,
                1000u32,
                [492, 423, 353, 267, 248],
                0x6133763f97a0f0ef_u64,
            ),
            (0, 1, 1000, [343, 449, 448, 257, 58], 0x129529c4d133d),
            (
                42,
                5,
                100_000,
                [29983, 1873, 77475, 51852, 93645],
                0x77469552dd54cc13,
            ),
        ] {
            let mut p: Vec<u32> = (0..n).collect();
            Rng::stream(seed, &[STREAM_EPOCH, epoch]).shuffle(&mut p);
            assert_eq!(p[..5], first, "epoch {epoch} of seed {seed}");
            let h = p.iter().fold(FNV, |h, &x| fold(h, x as u64));
            assert_eq!(h, hash, "epoch {epoch} of seed {seed}");
        }

        // The validation split's units.
        let u = Units::new(9, &[STREAM_VAL_SPLIT]);
        let h = (0..100_000u64).fold(FNV, |h, i| {
            let h = fold(h, unit(9, &[STREAM_VAL_SPLIT, i]).to_bits());
            fold(h, u.at(i).to_bits())
        });
        assert_eq!(h, 0xb09bd7fbadb95e37, "units");
        assert_eq!(unit(0, &[STREAM_VAL_SPLIT, 0]), 0.5896394286166265);
        assert_eq!(Units::new(0, &[STREAM_VAL_SPLIT]).at(1), 0.787382455824745);
    }

    #[test]
    fn xoshiro_matches_the_reference_sequence() {
        // The reference algorithm (Blackman & Vigna) from state [1, 2, 3, 4].
        let mut rng = Rng::from_state([1, 2, 3, 4]);
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
