//! How ranks agree: rank 0 decides (to stop, evaluate, save) and the others follow, so every
//! rank always takes the same branch and no collective is left waiting.

use anyhow::Result;
use tch::{Device, Tensor};

use crate::dist::ProcessGroup;

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
