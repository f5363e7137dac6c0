//! How ranks agree. The rule: **every decision that guards a collective is rank 0's, broadcast.**
//! A rank that enters a collective the others skip waits for them until the collective timeout,
//! and after the gang restarts from the same checkpoint it does so again at the same step, for
//! ever (issue 28). So no rank decides such a branch (stop? evaluate? save? save `best/`?) from its
//! own values: rank 0 decides and [`decide`] hands every rank its answer; and the run state those
//! decisions read is rank 0's too, sent whole ([`from_rank0`]) at start and after each evaluation.
//!
//! The guard: [`decide`] also compares a digest of each rank's run state. If they differ (a value
//! that drifted apart, a field updated on one rank only) every rank fails at once with an error
//! that names the decision, the step and each rank's values, instead of one of them waiting in a
//! collective alone.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};

/// Rank 0's values, seen by every rank.
pub fn agree(pg: &ProcessGroup, device: Device, values: &[f64]) -> Result<Vec<f64>> {
    if pg.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::from_slice(values).to_device(device);
    pg.broadcast(std::slice::from_ref(&t), 0)?;
    Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu))?)
}

/// Rank 0's yes or no.
pub fn agree_flag(pg: &ProcessGroup, device: Device, flag: bool) -> Result<bool> {
    Ok(agree(pg, device, &[f64::from(u8::from(flag))])?[0] > 0.0)
}

/// Rank 0's `value` on every rank, whole: its JSON (floats come back bit for bit) broadcast. A
/// world of one takes the same round trip, so a value that cannot make it fails in any world.
pub fn from_rank0<T: Serialize + DeserializeOwned>(
    pg: &ProcessGroup,
    device: Device,
    value: &T,
) -> Result<T> {
    let mut bytes = serde_json::to_vec(value).context("serialize rank 0's state")?;
    if pg.world_size() > 1 {
        let len = agree(pg, device, &[bytes.len() as f64])?[0] as usize;
        bytes.resize(len, 0);
        let t = Tensor::from_slice(&bytes).to_device(device);
        pg.broadcast(std::slice::from_ref(&t), 0)?;
        bytes = Vec::<u8>::try_from(&t.to_device(Device::Cpu))?;
    }
    serde_json::from_slice(&bytes).context("read rank 0's state")
}

/// A decision that guards a collective, at `step`: every rank brings its own `values` (named for
/// the error) and its run state (`RunState::shared_json`); every rank gets rank 0's values back.
/// One all-reduce of a `[ranks, values + 2]` table, where the per-step broadcast it replaces was
/// one broadcast. Ranks whose states differ all fail here, at once.
pub fn decide(
    pg: &ProcessGroup,
    device: Device,
    decision: &str,
    step: i64,
    state: &str,
    values: &[(&str, f64)],
) -> Result<Vec<f64>> {
    let digest = digest(state.as_bytes());
    let mut row: Vec<f64> = values.iter().map(|(_, v)| *v).collect();
    row.extend(halves(digest));
    let rows = gather_rows(pg, device, &row)?;
    let digests: Vec<u64> = rows.iter().map(|r| whole(&r[values.len()..])).collect();
    if digests.iter().any(|&d| d != digests[0]) {
        let each: Vec<String> = rows
            .iter()
            .zip(&digests)
            .enumerate()
            .map(|(rank, (r, d))| {
                let shown: Vec<String> = values
                    .iter()
                    .zip(r)
                    .map(|((name, _), v)| format!("{name} {v}"))
                    .collect();
                format!("rank {rank}: {}, run state {d:016x}", shown.join(", "))
            })
            .collect();
        bail!(
            "rank {} of {}: the ranks' run states differ at step {step}, where they decide whether \
             to {decision} ({}): a rank would enter a collective the others skip and wait there \
             until the collective timeout. Every decision that guards a collective must be rank \
             0's (docs/distributed.md); this is a bug in charlm-trainer: please report it with \
             each rank's message. This rank's run state: {state}",
            pg.rank(),
            pg.world_size(),
            each.join("; ")
        );
    }
    Ok(rows[0][..values.len()].to_vec())
}

/// Every rank's digest of `text`, in rank order (to tell whether the ranks were started alike).
pub fn digests(pg: &ProcessGroup, device: Device, text: &str) -> Result<Vec<u64>> {
    let rows = gather_rows(pg, device, &halves(digest(text.as_bytes())))?;
    Ok(rows.iter().map(|r| whole(r)).collect())
}

/// Every rank's `row`, in rank order: each rank fills its own row of a zero table and one
/// all-reduce sums them. Adding zeros is exact, so every value arrives bit for bit.
fn gather_rows(pg: &ProcessGroup, device: Device, row: &[f64]) -> Result<Vec<Vec<f64>>> {
    let (world, n) = (pg.world_size(), row.len());
    if world == 1 {
        return Ok(vec![row.to_vec()]);
    }
    let mut table = vec![0.0; world * n];
    table[pg.rank() * n..][..n].copy_from_slice(row);
    let t = Tensor::from_slice(&table)
        .to_kind(Kind::Double)
        .to_device(device);
    pg.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)?;
    let table = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
    Ok(table.chunks(n).map(<[f64]>::to_vec).collect())
}

/// FNV-1a, 64 bits: the same bytes give the same digest in every build.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A digest as two exact f64s (32 bits each).
fn halves(d: u64) -> [f64; 2] {
    [(d >> 32) as f64, (d & 0xffff_ffff) as f64]
}

fn whole(h: &[f64]) -> u64 {
    ((h[0] as u64) << 32) | h[1] as u64
}

/// The smallest of every rank's `value` (one tiny broadcast per rank).
pub fn min_over_ranks(pg: &ProcessGroup, device: Device, value: f64) -> Result<f64> {
    let mut least = value;
    for root in (0..pg.world_size()).filter(|_| pg.world_size() > 1) {
        let t = Tensor::from_slice(&[value]).to_device(device);
        pg.broadcast(std::slice::from_ref(&t), root)?;
        least = least.min(t.double_value(&[0]));
    }
    Ok(least)
}

/// The outcome of a step rank 0 alone takes (the others pass their `Ok`), seen by every rank: when
/// it failed, the others fail too, with its exit code, instead of waiting in the next collective
/// for a rank that left.
pub fn rank0_outcome<T>(pg: &ProcessGroup, device: Device, outcome: Result<T>) -> Result<T> {
    use crate::sys::error::{exit_code, StorageFull, UserError};
    let code = outcome.as_ref().map_or_else(exit_code, |_| 0);
    let agreed = agree(pg, device, &[f64::from(code)])?[0] as i32;
    if agreed == 0 || pg.rank() == 0 {
        return outcome;
    }
    let message = format!(
        "rank 0 stopped this training at its start (exit code {agreed}): its error says why"
    );
    Err(match agreed {
        charlm_contract::exit::BAD_INPUT => UserError(message).into(),
        charlm_contract::exit::STORAGE_FULL => StorageFull(message).into(),
        _ => anyhow::anyhow!(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_split_into_exact_halves() {
        for d in [0, 1, u64::MAX, digest(b"charlm"), digest(b"")] {
            assert_eq!(whole(&halves(d)), d);
        }
        assert_ne!(digest(b"{\"step\":1}"), digest(b"{\"step\":2}"));
    }

    #[test]
    fn a_world_of_one_decides_alone_and_round_trips_its_state() {
        let pg = ProcessGroup::init(
            &crate::dist::DistEnv::single(),
            Device::Cpu,
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let got = decide(&pg, Device::Cpu, "save", 3, "{}", &[("save", 1.0)]).unwrap();
        assert_eq!(got, vec![1.0]);
        // Floats that the default JSON parser may return 1 ulp off come back exact.
        let mut x = 0.1f64;
        for _ in 0..2000 {
            x = x * 1.000_000_7 + 1e-9;
            let back: (f64, Option<(f64, i64)>) =
                from_rank0(&pg, Device::Cpu, &(x, Some((x / 3.0, 7)))).unwrap();
            assert_eq!(back.0.to_bits(), x.to_bits());
            assert_eq!(back.1.unwrap().0.to_bits(), (x / 3.0).to_bits());
        }
    }
}
