//! Muon's orthogonalization: U·Vᵀ of a gradient `U·S·Vᵀ`, approximated by a polynomial
//! iteration in bf16 (Keller Jordan's quintic Newton–Schulz, or the 2026 recipe's Polar Express).

use tch::{Kind, Tensor};

/// Quintic Newton–Schulz coefficients tuned by Keller Jordan for Muon.
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Polar Express coefficients, one triple per iteration (Amsel et al. 2025, arXiv 2505.16932,
/// computed for 5 iterations with safety factor 2e-2), as nanochat's 2026 Muon uses them.
const POLAR_EXPRESS: [(f64, f64, f64); 5] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
];

/// The polynomial iteration Muon orthogonalizes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Orthogonalizer {
    /// Keller Jordan's quintic, the same triple every step, input scaled to unit norm.
    #[default]
    Quintic,
    /// Polar Express: a triple per step, input scaled to 1/1.01 of unit norm (its safety margin).
    PolarExpress,
}

impl Orthogonalizer {
    fn coeffs(self, step: usize) -> (f64, f64, f64) {
        match self {
            Self::Quintic => NS_COEFFS,
            Self::PolarExpress => POLAR_EXPRESS[step.min(POLAR_EXPRESS.len() - 1)],
        }
    }

    fn norm_factor(self) -> f64 {
        match self {
            Self::Quintic => 1.0,
            Self::PolarExpress => 1.01,
        }
    }
}

/// Approximate U·Vᵀ of `g = U·S·Vᵀ` for a batch `[n, rows, cols]` by 5 quintic iterations in bf16.
/// Works on the wide orientation (rows ≤ cols) so `X·Xᵀ` is the small Gram matrix.
// `x = x / …` stays out of place: for a bf16 `g`, `to_kind` returns `g` itself.
#[allow(clippy::assign_op_pattern)]
pub fn orthogonalize(g: &Tensor, steps: usize) -> Tensor {
    orthogonalize_with(g, steps, Orthogonalizer::Quintic)
}

/// [`orthogonalize`] with the iteration `method`.
#[allow(clippy::assign_op_pattern)]
pub fn orthogonalize_with(g: &Tensor, steps: usize, method: Orthogonalizer) -> Tensor {
    let size = g.size();
    let tall = size[size.len() - 2] > size[size.len() - 1];
    let mut x = g.to_kind(Kind::BFloat16);
    if tall {
        x = x.transpose(-2, -1);
    }
    let norm = x
        .to_kind(Kind::Float)
        .square()
        .sum_dim_intlist(&[-2i64, -1][..], true, Kind::Float)
        .sqrt();
    x = x / (norm * method.norm_factor() + 1e-7).to_kind(Kind::BFloat16);
    for step in 0..steps {
        let (a, b, c) = method.coeffs(step);
        let gram = x.matmul(&x.transpose(-2, -1));
        let poly = &gram * b + gram.matmul(&gram) * c;
        x = &x * a + poly.matmul(&x);
    }
    if tall {
        x = x.transpose(-2, -1);
    }
    x
}

/// [`orthogonalize`] with each polynomial step as two fused matrix products (cuBLAS's
/// `β·C + α·A·B`): the same iteration, with one bf16 rounding per product instead of one per
/// elementwise operation. A tall matrix is not transposed: its Gram matrix is `XᵀX` and the
/// update `a·X + X·P` (P is symmetric), the transpose of the wide iteration, so every operand
/// stays contiguous.
pub fn orthogonalize_fused(g: &Tensor, steps: usize) -> Tensor {
    orthogonalize_fused_with(g, steps, Orthogonalizer::Quintic)
}

/// [`orthogonalize_fused`] with the iteration `method`.
pub fn orthogonalize_fused_with(g: &Tensor, steps: usize, method: Orthogonalizer) -> Tensor {
    let size = g.size();
    let tall = size[size.len() - 2] > size[size.len() - 1];
    let mut x = g.to_kind(Kind::BFloat16).contiguous();
    let norm = x.norm_scalaropt_dim_dtype(2.0, &[-2i64, -1][..], true, Kind::Float);
    x /= (norm * method.norm_factor() + 1e-7).to_kind(Kind::BFloat16);
    for step in 0..steps {
        let (a, b, c) = method.coeffs(step);
        if tall {
            let gram = x.transpose(-2, -1).matmul(&x);
            let poly = gram.baddbmm(&gram, &gram, b, c);
            x = x.baddbmm(&x, &poly, a, 1.0);
        } else {
            let gram = x.matmul(&x.transpose(-2, -1));
            let poly = gram.baddbmm(&gram, &gram, b, c);
            x = x.baddbmm(&poly, &x, a, 1.0);
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newton_schulz_gives_near_orthogonal_rows() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(0);
        for shape in [[2i64, 16, 48], [1, 48, 16]] {
            let g = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
            let x = orthogonalize(&g, 5).to_kind(Kind::Float);
            // Muon's quintic lands singular values in roughly [0.7, 1.2], not exactly 1.
            let (_, s, _) = x.svd(true, false);
            let (lo, hi) = (s.min().double_value(&[]), s.max().double_value(&[]));
            assert!(
                lo > 0.5 && hi < 1.3,
                "singular values in [{lo}, {hi}] for {shape:?}"
            );
        }
    }

    /// The same quintic iteration in float64: what both bf16 versions approximate.
    fn newton_schulz_f64(g: &Tensor, steps: usize) -> Tensor {
        let (a, b, c) = NS_COEFFS;
        let size = g.size();
        let tall = size[size.len() - 2] > size[size.len() - 1];
        let mut x = g.to_kind(Kind::Double);
        if tall {
            x = x.transpose(-2, -1);
        }
        let norm = x
            .square()
            .sum_dim_intlist(&[-2i64, -1][..], true, Kind::Double)
            .sqrt();
        x = &x / (norm + 1e-7);
        for _ in 0..steps {
            let gram = x.matmul(&x.transpose(-2, -1));
            let poly = &gram * b + gram.matmul(&gram) * c;
            x = &x * a + poly.matmul(&x);
        }
        if tall {
            x = x.transpose(-2, -1);
        }
        x
    }

    #[test]
    fn fused_newton_schulz_is_as_close_to_exact_as_the_first_version() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        for shape in [[3i64, 64, 192], [2, 192, 64], [4, 128, 128]] {
            let g = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
            let exact = newton_schulz_f64(&g, 5);
            let rel = |x: Tensor| {
                (x.to_kind(Kind::Double) - &exact).norm().double_value(&[])
                    / exact.norm().double_value(&[])
            };
            let (first, fused) = (rel(orthogonalize(&g, 5)), rel(orthogonalize_fused(&g, 5)));
            eprintln!("{shape:?}: first version {first:.3e}, fused {fused:.3e} from float64");
            // Both carry bf16 rounding noise; the fused one rounds less often.
            assert!(
                fused < 0.1 && fused < 1.5 * first,
                "{shape:?}: {fused} vs {first}"
            );
        }
    }

    #[test]
    fn polar_express_orthogonalizes_at_least_as_well_as_the_quintic() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(2);
        let g = Tensor::randn([2, 32, 96], (Kind::Float, tch::Device::Cpu));
        let spread = |x: Tensor| {
            let (_, s, _) = x.to_kind(Kind::Float).svd(true, false);
            (s.min().double_value(&[]), s.max().double_value(&[]))
        };
        let (lo, hi) = spread(orthogonalize_with(&g, 5, Orthogonalizer::PolarExpress));
        assert!(
            lo > 0.6 && hi < 1.25,
            "Polar Express: singular values in [{lo}, {hi}]"
        );
        let fused = orthogonalize_fused_with(&g, 5, Orthogonalizer::PolarExpress);
        let first = orthogonalize_with(&g, 5, Orthogonalizer::PolarExpress);
        let rel = (fused.to_kind(Kind::Float) - first.to_kind(Kind::Float))
            .norm()
            .double_value(&[])
            / first.to_kind(Kind::Float).norm().double_value(&[]);
        assert!(rel < 0.05, "fused vs first version: {rel}");
    }
}
