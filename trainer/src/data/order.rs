//! The order training reads the data in, a pure function of (seed, sequence number): epoch `e`
//! visits every training window once in a permutation drawn from `(seed, e)`, and optimizer step
//! `s`'s sequences are split between micro-steps and ranks by their numbers alone, so a resumed
//! run, or one on another number of GPUs, reads exactly what an uninterrupted one would.

use crate::sys::rng::{Rng, STREAM_EPOCH};

/// Epoch `epoch`'s order of `windows` training windows.
pub fn permutation(seed: u64, epoch: u64, windows: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..windows as u32).collect();
    Rng::stream(seed, &[STREAM_EPOCH, epoch]).shuffle(&mut p);
    p
}

/// The sequence numbers rank `rank` of `world` reads in micro-step `micro` of optimizer step `step`:
/// step `s` owns sequences `[s·G, (s+1)·G)` (`G = per_step`) and each (micro-step, rank) takes the
/// next `batch` of them, at `(micro·world + rank)·batch`. With `G = accum·world·batch` the union
/// over ranks and micro-steps is the step's sequences whatever the world size, so a checkpoint
/// resumes on any number of GPUs.
pub fn rank_sequences(
    step: u64,
    per_step: u64,
    micro: u64,
    world: u64,
    rank: u64,
    batch: u64,
) -> Vec<u64> {
    let first = step * per_step + (micro * world + rank) * batch;
    (first..first + batch).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_global_batch_for_any_world_size() {
        let (per_step, batch) = (24u64, 2u64);
        for step in [0u64, 5] {
            for world in [1u64, 2, 3, 4, 6, 12] {
                let accum = per_step / (world * batch);
                let mut all: Vec<u64> = (0..accum)
                    .flat_map(|m| {
                        (0..world)
                            .flat_map(move |r| rank_sequences(step, per_step, m, world, r, batch))
                    })
                    .collect();
                let n = all.len();
                all.sort();
                all.dedup();
                assert_eq!(all.len(), n, "no sequence twice (world {world})");
                let want: Vec<u64> = (step * per_step..(step + 1) * per_step).collect();
                assert_eq!(all, want, "step {step} world {world}");
            }
        }
    }
}
