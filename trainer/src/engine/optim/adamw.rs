//! AdamW for the embedding, lm_head and per-layer scalars.

use std::collections::BTreeMap;

use tch::Tensor;

/// Adam's two moments for one parameter.
struct AdamSlot {
    name: String,
    param: Tensor,
    lr: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW (betas 0.8/0.95, eps 1e-10, no weight decay) with a learning rate per parameter.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken, for the bias corrections.
    pub step: i64,
    slots: Vec<AdamSlot>,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor, f64)>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param, lr)| AdamSlot {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
                lr,
            })
            .collect();
        Self {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            step: 0,
            slots,
        }
    }

    /// The parameters it updates.
    pub fn params(&self) -> impl Iterator<Item = Tensor> + '_ {
        self.slots.iter().map(|s| s.param.shallow_clone())
    }

    pub fn step(&mut self, lr_mult: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let g = s.param.grad();
            let _ = s.exp_avg.lerp_(&g, 1.0 - self.beta1);
            let _ = s.exp_avg_sq.g_mul_scalar_(self.beta2);
            let _ = s.exp_avg_sq.addcmul_(&g, &g.g_mul_scalar(1.0 - self.beta2));
            let denom = s.exp_avg_sq.sqrt() / bc2.sqrt() + self.eps;
            let step_size = s.lr * lr_mult / bc1;
            let _ = s
                .param
                .shallow_clone()
                .addcdiv_(&(&s.exp_avg * -step_size), &denom);
        }
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((
                format!("adamw.exp_avg.{}", s.name),
                s.exp_avg.shallow_clone(),
            ));
            out.push((
                format!("adamw.exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            for (prefix, dst) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("adamw.{prefix}.{}", s.name);
                let t = state
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("missing {key}"))?;
                dst.copy_(t);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        let _seed = crate::model::SEED_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // After one step Adam moves each weight by lr·sign(g) (up to eps).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[0.5f32, -0.25, 2.0]))
            .sum(Kind::Float)
            .backward();
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone(), 0.1)]);
        opt.step(1.0);
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        let want = [0.9f32, -1.9, 2.9];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} != {want:?}");
        }
    }
}
