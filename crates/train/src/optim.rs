//! AdamW with a cosine learning-rate schedule after a linear warm-up, global-norm gradient
//! clipping, and LSQ steps kept positive.

use crate::model::{Param, ParamKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub total: usize,
    pub clip: f64,
    /// The learning rate of LSQ step sizes relative to `lr` (weights and biases get `lr`):
    /// Adam moves every parameter by about the learning rate per update whatever its size, and
    /// step sizes are 10-100x smaller than the weights they scale.
    #[serde(default = "one")]
    pub step_lr_scale: f64,
    pub step: usize,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

fn one() -> f64 {
    1.0
}

impl AdamW {
    pub fn new(params: &[Param], lr: f64, weight_decay: f64, warmup: usize, total: usize, clip: f64) -> AdamW {
        let z = || params.iter().map(|p| vec![0f32; p.value.len()]).collect();
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            warmup,
            total,
            clip,
            step_lr_scale: 1.0,
            step: 0,
            m: z(),
            v: z(),
        }
    }

    /// Learning rate at step `t` (0-based): linear warm-up, then cosine decay to 0.
    pub fn lr_at(&self, t: usize) -> f64 {
        if t < self.warmup {
            return self.lr * (t + 1) as f64 / self.warmup as f64;
        }
        let p = (t - self.warmup) as f64 / (self.total.saturating_sub(self.warmup)).max(1) as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
    }

    /// One update; returns the gradient norm before clipping.
    pub fn update(&mut self, params: &mut [Param], grads: &[Vec<f32>]) -> f64 {
        let norm = grads.iter().flatten().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        let scale = if self.clip > 0.0 && norm > self.clip { self.clip / norm } else { 1.0 };
        let lr = self.lr_at(self.step);
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for (k, p) in params.iter_mut().enumerate() {
            let lr = if p.kind == ParamKind::Step { lr * self.step_lr_scale } else { lr };
            let mut v = p.value.data.to_f32_vec();
            for (i, x) in v.iter_mut().enumerate() {
                let g = grads[k][i] as f64 * scale;
                let m = b1 * self.m[k][i] as f64 + (1.0 - b1) * g;
                let s = b2 * self.v[k][i] as f64 + (1.0 - b2) * g * g;
                self.m[k][i] = m as f32;
                self.v[k][i] = s as f32;
                let mut nx = *x as f64;
                if p.kind == ParamKind::Weight {
                    nx -= lr * self.weight_decay * nx;
                }
                nx -= lr * (m / c1) / ((s / c2).sqrt() + self.eps);
                if p.kind == ParamKind::Step {
                    nx = nx.max(1e-8);
                }
                *x = nx as f32;
            }
            p.value = sqil_ir::Tensor::from_f32(p.value.shape.clone(), v).expect("same shape");
        }
        norm
    }
}
