//! Each fused kernel against its eager twin, each eager twin against the plain formula, and the
//! FP8 casts and weights of the block path.

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::models::perturbed_engine;
use super::{diff, Diff};
use crate::engine::EngineOptions;
use crate::model::block::{self, Op};
use crate::model::{apply_rotary, norm, rotary_tables, GptConfig};

fn rand(shape: &[i64], kind: Kind, device: Device) -> Tensor {
    Tensor::randn(shape, (Kind::Float, device)).to_kind(kind)
}

/// The shapes the op checks use: `b` sequences of `t` tokens, `heads` heads, width `c`.
#[derive(Clone, Copy, Debug)]
pub struct OpShape {
    pub b: i64,
    pub t: i64,
    pub heads: i64,
    pub c: i64,
}

/// Each fused kernel against its eager twin on the same random inputs (outputs and gradients).
pub fn fused_vs_eager(shape: OpShape, device: Device) -> Result<Vec<Diff>> {
    let cases = op_cases(shape, Kind::BFloat16, device);
    let mut out = Vec::new();
    for (name, op, inputs, p0, p1) in &cases {
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
        let eager = block::op(*op, &refs, false, *p0, *p1)?;
        let fast =
            block::op(*op, &refs, true, *p0, *p1).with_context(|| format!("fused {name}"))?;
        for (i, (f, e)) in fast.iter().zip(&eager).enumerate() {
            out.push(diff(format!("{name}[{i}]"), f, e));
        }
    }
    // Muon's momentum pass, on [4, C, 4C] fp32 gradients with a clipping factor.
    let g = Tensor::randn([4, shape.c, 4 * shape.c], (Kind::Float, device));
    let m0 = Tensor::randn([4, shape.c, 4 * shape.c], (Kind::Float, device));
    let coef = Tensor::from(0.7f32).to_device(device);
    let (m_eager, m_fused) = (m0.copy(), m0.copy());
    let x_eager = crate::engine::optim::ops::muon_momentum(&g, &m_eager, Some(&coef), 0.9, false)?;
    let x_fused = crate::engine::optim::ops::muon_momentum(&g, &m_fused, Some(&coef), 0.9, true)?;
    out.push(diff("muon_momentum.x", &x_fused, &x_eager));
    out.push(diff("muon_momentum.m", &m_fused, &m_eager));
    Ok(out)
}

/// Each fused kernel's FP8 copy (and its bf16 output and amax) against its eager twin's, with a
/// scale each format holds the random inputs in: e4m3 for the steps whose output a forward
/// product reads, e5m2 for the gradients; the cast alone in both formats.
pub fn fused_vs_eager_f8(shape: OpShape, device: Device) -> Result<Vec<Diff>> {
    let cases = op_cases(shape, Kind::BFloat16, device);
    let e4m3 = Tensor::from(16.0f32).to_device(device);
    let e5m2 = Tensor::from(1024.0f32).to_device(device);
    let mut out = Vec::new();
    let mut compare = |name: String, op: Op, inputs: &[Option<Tensor>], p0, p1, e5: bool| {
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
        let scale = Some((if e5 { &e5m2 } else { &e4m3 }, e5));
        let eager = block::op_f8(op, &refs, false, p0, p1, scale)?;
        let fast = block::op_f8(op, &refs, true, p0, p1, scale)
            .with_context(|| format!("fused {name}"))?;
        let n = fast.len();
        for (i, (f, e)) in fast.iter().zip(&eager).enumerate() {
            let what = match n - i {
                2 => format!("{name} fp8 copy"),
                1 => format!("{name} amax"),
                _ => format!("{name}[{i}]"),
            };
            out.push(diff(what, f, e));
        }
        anyhow::Ok(())
    };
    for (name, op, inputs, p0, p1) in &cases {
        let e5 = match op {
            Op::RmsNormFwd | Op::Relu2Fwd => false,
            Op::RmsNormBwd | Op::RopeNormBwd | Op::Relu2Bwd | Op::Relu2BwdDh => true,
            _ => continue,
        };
        compare(format!("{name} (fp8)"), *op, inputs, *p0, *p1, e5)?;
    }
    let x = vec![Some(rand(
        &[shape.b * shape.t, shape.c],
        Kind::BFloat16,
        device,
    ))];
    compare("cast e4m3".into(), Op::CastF8, &x, 0, 0, false)?;
    compare("cast e5m2".into(), Op::CastF8, &x, 0, 0, true)?;
    Ok(out)
}

/// The e4m3 weights of one perturbed block made by the CUDA kernel against ATen's (the same
/// arithmetic: they must agree exactly), the transposes and the inverse scales.
pub fn fp8_weights_fused_vs_eager(config: GptConfig, device: Device) -> Result<Vec<Diff>> {
    let engine = perturbed_engine(config, device, EngineOptions::default());
    let blk = &engine.model.blocks[0];
    let make = |fused: bool| -> Result<block::Fp8Views> {
        let st = crate::engine::fp8::Fp8State::new(&config, device);
        let v = st.views[0].shallow_clone();
        tch::no_grad(|| block::fp8_weights(blk, &v, fused))?;
        Ok(v)
    };
    let (f, e) = (make(true)?, make(false)?);
    let names = ["qkv", "attn out", "mlp up", "mlp down"];
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let f32 = |t: &Tensor| t.to_kind(Kind::Float);
        out.push(diff(
            format!("fp8 weight {name}"),
            &f32(&f.w8[i]),
            &f32(&e.w8[i]),
        ));
        out.push(diff(
            format!("fp8 weight {name} transposed"),
            &f32(&f.w8t[i]),
            &f32(&e.w8t[i]),
        ));
    }
    out.push(diff("fp8 weight inverse scales", &f.winv, &e.winv));
    Ok(out)
}

type OpCase = (&'static str, Op, Vec<Option<Tensor>>, i64, i64);

fn op_cases(s: OpShape, kind: Kind, device: Device) -> Vec<OpCase> {
    let (n, a) = (s.b * s.t, s.heads * 128);
    let (cos, sin) = rotary_tables(0, s.t, crate::model::ROPE_BASE, device, kind);
    let (cos, sin) = (cos.view([s.t, 64]), sin.view([s.t, 64]));
    let x = rand(&[n, s.c], kind, device);
    let (y, rstd) = {
        let r = block::op(Op::RmsNormFwd, &[Some(&x)], false, 0, 0).expect("eager rmsnorm");
        (r[0].shallow_clone(), r[1].shallow_clone())
    };
    let qkv = rand(&[n, 3 * a], kind, device);
    let (qkv_n, rstd_qk) = {
        let r = block::op(
            Op::RopeNormFwd,
            &[Some(&qkv), Some(&cos), Some(&sin)],
            false,
            s.t,
            s.heads,
        )
        .expect("eager rope_norm");
        (r[0].shallow_clone(), r[1].shallow_clone())
    };
    // Attention gradients arrive as [B, H, T, D] views of [B, T, H, D] storage.
    let g4 = || rand(&[s.b, s.t, s.heads, 128], kind, device).transpose(1, 2);
    let h = rand(&[n, 4 * s.c], kind, device);
    vec![
        ("rmsnorm_fwd", Op::RmsNormFwd, vec![Some(x)], 0, 0),
        (
            "rmsnorm_bwd",
            Op::RmsNormBwd,
            vec![
                Some(rand(&[n, s.c], kind, device)),
                Some(y.shallow_clone()),
                Some(rstd.shallow_clone()),
                Some(rand(&[n, s.c], kind, device)),
            ],
            0,
            0,
        ),
        (
            "rmsnorm_bwd_nores",
            Op::RmsNormBwd,
            vec![
                Some(rand(&[n, s.c], kind, device)),
                Some(y),
                Some(rstd),
                None,
            ],
            0,
            0,
        ),
        (
            "rope_norm_fwd",
            Op::RopeNormFwd,
            vec![
                Some(qkv),
                Some(cos.shallow_clone()),
                Some(sin.shallow_clone()),
            ],
            s.t,
            s.heads,
        ),
        (
            "rope_norm_bwd",
            Op::RopeNormBwd,
            vec![
                Some(g4()),
                Some(g4()),
                Some(g4()),
                Some(qkv_n),
                Some(rstd_qk),
                Some(cos),
                Some(sin),
            ],
            s.t,
            s.heads,
        ),
        (
            "relu2_fwd",
            Op::Relu2Fwd,
            vec![Some(h.shallow_clone())],
            0,
            0,
        ),
        (
            "relu2_bwd",
            Op::Relu2Bwd,
            vec![
                Some(h.shallow_clone()),
                Some(rand(&[n, 4 * s.c], kind, device)),
            ],
            0,
            0,
        ),
        (
            "relu2_bwd_dh",
            Op::Relu2BwdDh,
            vec![Some(h), Some(rand(&[n, 4 * s.c], kind, device))],
            0,
            0,
        ),
    ]
}

/// Each eager twin against the plain formula: the forward as the reference model writes it
/// (`rms_norm`, `apply_rotary`, `relu().square()`), the backward by autograd through it.
pub fn eager_vs_formula(s: OpShape, kind: Kind, device: Device) -> Result<Vec<Diff>> {
    let (n, a, t, h) = (s.b * s.t, s.heads * 128, s.t, s.heads);
    let mut out = Vec::new();
    let leaf = |shape: &[i64]| rand(shape, kind, device).set_requires_grad(true);

    // rmsnorm forward and backward (with a residual gradient added).
    let x = leaf(&[n, s.c]);
    let y = norm(&x);
    let dy = rand(&[n, s.c], kind, device);
    let dres = rand(&[n, s.c], kind, device);
    (&y * &dy).sum(Kind::Float).backward();
    let r = block::op(Op::RmsNormFwd, &[Some(&x.detach())], false, 0, 0)?;
    out.push(diff("rmsnorm_fwd", &r[0], &y.detach()));
    let dx = block::op(
        Op::RmsNormBwd,
        &[Some(&dy), Some(&r[0]), Some(&r[1]), Some(&dres)],
        false,
        0,
        0,
    )?;
    out.push(diff("rmsnorm_bwd", &dx[0], &(x.grad() + &dres)));

    // rotary + per-head norm of q and k.
    let (cos4, sin4) = rotary_tables(0, t, crate::model::ROPE_BASE, device, kind);
    let (cos, sin) = (cos4.view([t, 64]), sin4.view([t, 64]));
    let qkv = leaf(&[n, 3 * a]);
    let heads = |part: i64| qkv.narrow(1, part * a, a).view([s.b, t, h, 128]);
    let zq = norm(&apply_rotary(&heads(0), &cos4, &sin4));
    let zk = norm(&apply_rotary(&heads(1), &cos4, &sin4));
    let (gq, gk, gv) = (
        rand(&[s.b, t, h, 128], kind, device),
        rand(&[s.b, t, h, 128], kind, device),
        rand(&[s.b, t, h, 128], kind, device),
    );
    ((&zq * &gq).sum(Kind::Float)
        + (&zk * &gk).sum(Kind::Float)
        + (heads(2) * &gv).sum(Kind::Float))
    .backward();
    let r = block::op(
        Op::RopeNormFwd,
        &[Some(&qkv.detach()), Some(&cos), Some(&sin)],
        false,
        t,
        h,
    )?;
    let want = Tensor::cat(
        &[
            zq.detach().reshape([n, a]),
            zk.detach().reshape([n, a]),
            qkv.detach().narrow(1, 2 * a, a),
        ],
        1,
    );
    out.push(diff("rope_norm_fwd", &r[0], &want));
    let g = block::op(
        Op::RopeNormBwd,
        &[
            Some(&gq.transpose(1, 2)),
            Some(&gk.transpose(1, 2)),
            Some(&gv.transpose(1, 2)),
            Some(&r[0]),
            Some(&r[1]),
            Some(&cos),
            Some(&sin),
        ],
        false,
        t,
        h,
    )?;
    out.push(diff("rope_norm_bwd", &g[0], &qkv.grad()));

    // relu².
    let hid = leaf(&[n, 4 * s.c]);
    let act = hid.relu().square();
    let da = rand(&[n, 4 * s.c], kind, device);
    (&act * &da).sum(Kind::Float).backward();
    let r = block::op(Op::Relu2Fwd, &[Some(&hid.detach())], false, 0, 0)?;
    out.push(diff("relu2_fwd", &r[0], &act.detach()));
    let r = block::op(Op::Relu2Bwd, &[Some(&hid.detach()), Some(&da)], false, 0, 0)?;
    out.push(diff("relu2_bwd.a", &r[0], &act.detach()));
    out.push(diff("relu2_bwd.dh", &r[1], &hid.grad()));
    let r = block::op(
        Op::Relu2BwdDh,
        &[Some(&hid.detach()), Some(&da)],
        false,
        0,
        0,
    )?;
    out.push(diff("relu2_bwd_dh", &r[0], &hid.grad()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::lock;
    use super::*;

    const SHAPE: OpShape = OpShape {
        b: 2,
        t: 16,
        heads: 2,
        c: 64,
    };

    #[test]
    fn eager_twins_match_the_formulas_in_fp32() {
        let _seed = lock();
        tch::manual_seed(0);
        for d in eager_vs_formula(SHAPE, Kind::Float, Device::Cpu).unwrap() {
            assert!(d.rel < 1e-5, "{d:?}");
        }
    }

    #[test]
    fn fused_kernels_are_refused_on_the_cpu() {
        let x = Tensor::randn([4, 64], (Kind::Float, Device::Cpu));
        let err = block::op(Op::RmsNormFwd, &[Some(&x)], true, 0, 0).unwrap_err();
        assert!(err.to_string().contains("bf16 CUDA"), "{err}");
    }

    #[test]
    fn fp8_casts_scale_saturate_and_record_the_amax() {
        let x = Tensor::from_slice(&[0.5f32, -1.0, 3.0, 0.001, -1000.0, 2.0, 0.0, 7.0]);
        let scale = Tensor::from(100.0f32);
        for (e5m2, max) in [(false, 448.0f32), (true, 57344.0)] {
            let r =
                block::op_f8(Op::CastF8, &[Some(&x)], false, 0, 0, Some((&scale, e5m2))).unwrap();
            let got: Vec<f32> = Vec::try_from(&r[0]).unwrap();
            // Scaled, rounded to the format (3 or 2 mantissa bits), and saturated at its max.
            let want = [50.0, -100.0, 300.0, 0.1, -max, 200.0, 0.0, 700.0];
            for (g, w) in got.iter().zip(want) {
                let w = w.clamp(-max, max);
                let tol = if e5m2 { 0.125 } else { 0.0625 };
                assert!(
                    (g - w).abs() <= tol * w.abs() + 1e-3,
                    "{got:?} (e5m2 {e5m2})"
                );
            }
            assert_eq!(r[1].double_value(&[]), 1000.0, "amax of |x|");
        }
        // A fused cast is refused on the CPU.
        let err = block::op_f8(Op::CastF8, &[Some(&x)], true, 0, 0, Some((&scale, false)));
        assert!(err.is_err());
    }

    #[test]
    fn fp8_weights_share_one_scale_for_q_k_v_and_keep_a_transposed_copy() {
        let _seed = lock();
        let config = GptConfig::new(2, 16);
        let engine = perturbed_engine(config, Device::Cpu, EngineOptions::default());
        let blk = &engine.model.blocks[0];
        let st = crate::engine::fp8::Fp8State::new(&config, Device::Cpu);
        let v = &st.views[0];
        tch::no_grad(|| block::fp8_weights(blk, v, false)).unwrap();
        let amax = |t: &Tensor| t.abs().max().double_value(&[]);
        let qkv_amax = amax(&blk.c_q).max(amax(&blk.c_k)).max(amax(&blk.c_v));
        let inv: Vec<f32> = Vec::try_from(&v.winv).unwrap();
        assert!(
            (f64::from(inv[0]) - qkv_amax / 448.0).abs() < 1e-9,
            "{inv:?}"
        );
        assert!((f64::from(inv[3]) - amax(&blk.mlp_proj) / 448.0).abs() < 1e-9);
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        // Dequantized, each weight is itself within e4m3's rounding (2⁻⁴ relative).
        let (a, c) = (config.heads() * 128, config.width());
        let k = f(&v.w8[0].narrow(0, a, a)) * f64::from(inv[0]);
        let d = diff("k", &k, &blk.c_k.detach());
        assert!(d.rel < 0.05 && d.rel > 0.0, "{d:?}");
        for i in 0..4 {
            assert!(
                v.w8t[i].tr().to_kind(Kind::Float).equal(&f(&v.w8[i])),
                "{i}"
            );
        }
        assert_eq!(v.w8[1].size(), [c, a]);
        // The largest weight lands on the format's largest value.
        assert_eq!(f(&v.w8[3]).abs().max().double_value(&[]), 448.0);
    }
}
