//! AdamW with state we own (candle's keeps its moments private, so they could not be
//! checkpointed), global gradient-norm clipping, and learning-rate schedules.

use crate::{Error, Result};
use crate::model::ops::{self, with_f32, with_f32_mut};
use crate::model::simd::{self, multiversion};
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::Invalid(format!("schedule `{other}`: expected constant, linear or cosine"))),
        }
    }
}

impl Schedule {
    /// The multiplier of the base rate at optimiser step `step` (0-based) of `total`, after a
    /// linear warm-up of `warmup` steps: the formulas of transformers' `get_*_schedule_with_warmup`.
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One parameter with its f32 moments.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// One step's scalars, in the f32 the fused update computes in.
struct Coefficients {
    scale: f32,
    beta1: f32,
    beta2: f32,
    correction1: f32,
    correction2: f32,
    eps: f32,
    lr: f32,
    /// 1 − lr · weight decay.
    decay: f32,
}

multiversion! {
    fn adamw_update(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &Coefficients) {
        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * k.scale;
            *m = k.beta1 * *m + (1.0 - k.beta1) * g;
            *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
            let update = (*m / k.correction1) / ((*v / k.correction2).sqrt() + k.eps);
            *w = *w * k.decay - k.lr * update;
        }
    }
}

/// Elements per rayon task of the update and the norm.
const CHUNK: usize = 1 << 14;

impl Slot {
    /// The update in one pass over g, m, v and w, in place, for f32 weights on the CPU, where
    /// the composed tensor ops take about fourteen passes and as many fresh buffers: that made
    /// AdamW 7% of a SmolLM2 training step. `false`: not such a slot, use the composed ops.
    fn step_fused(&mut self, g: &Tensor, k: &Coefficients) -> Result<bool> {
        let w = self.var.as_tensor();
        let all = [g, &self.m, &self.v, w];
        if !all.iter().all(|t| ops::fused(t) && t.is_contiguous() && t.shape() == w.shape()) {
            return Ok(false);
        }
        // m and v are separate buffers (see `AdamW::new`), so the three write locks never meet.
        with_f32_mut(&self.m, |m| {
            with_f32_mut(&self.v, |v| {
                with_f32_mut(w, |w| {
                    with_f32(g, |g| {
                        (w.par_chunks_mut(CHUNK), m.par_chunks_mut(CHUNK), v.par_chunks_mut(CHUNK), g.par_chunks(CHUNK))
                            .into_par_iter()
                            .for_each(|(w, m, v, g)| adamw_update(w, m, v, g, k))
                    })
                })
            })
        })????;
        Ok(true)
    }
}

multiversion! {
    fn sum_squares(x: &[f32]) -> f64 {
        simd::sum_squares_f64(x)
    }
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimiser steps taken (bias correction uses it).
    pub steps: usize,
}

impl AdamW {
    /// `vars` by name; sorted, so the order (and a checkpoint's layout) never depends on a map.
    pub fn new(vars: HashMap<String, Var>, config: AdamWConfig) -> Result<Self> {
        let mut named: Vec<(String, Var)> = vars.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = named
            .into_iter()
            .map(|(name, var)| {
                // Two buffers, not one shared: the update writes both in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Slot { m: zeros()?, v: zeros()?, name, var })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, slots, steps: 0 })
    }

    /// √(Σ g²) over every gradient.
    pub fn grad_norm(&self, grads: &HashMap<String, Tensor>) -> Result<f64> {
        let mut total = 0.0;
        for slot in &self.slots {
            if let Some(g) = grads.get(&slot.name) {
                total += if ops::fused(g) && g.is_contiguous() {
                    // Partial sums added in order: the same norm however rayon splits the work.
                    let partials: Vec<f64> = with_f32(g, |g| g.par_chunks(CHUNK).map(sum_squares).collect())?;
                    partials.iter().sum::<f64>()
                } else {
                    g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
                };
            }
        }
        Ok(total.sqrt())
    }

    /// One AdamW update at learning rate `lr`; gradients are first scaled down so their global
    /// norm is at most `clip` (when given). Returns the norm before clipping.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64, clip: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let scale = match clip {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let correction1 = 1.0 - beta1.powi(self.steps as i32);
        let correction2 = 1.0 - beta2.powi(self.steps as i32);
        let coefficients = Coefficients {
            scale: scale as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            correction1: correction1 as f32,
            correction2: correction2 as f32,
            eps: eps as f32,
            lr: lr as f32,
            decay: (1.0 - lr * weight_decay) as f32,
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else { continue };
            if slot.step_fused(g, &coefficients)? {
                continue;
            }
            let g = (g.to_dtype(DType::F32)? * scale)?;
            slot.m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&slot.m / correction1)? / ((&slot.v / correction2)?.sqrt()? + eps)?)?;
            let param = slot.var.as_tensor().to_dtype(DType::F32)?;
            let decayed = if weight_decay > 0.0 { (param * (1.0 - lr * weight_decay))? } else { param };
            let next = (decayed - (update * lr)?)?;
            slot.var.set(&next.to_dtype(slot.var.dtype())?)?;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| [(format!("m.{}", s.name), s.m.clone()), (format!("v.{}", s.name), s.v.clone())])
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`]; every parameter's must be there, in its shape.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (prefix, moment) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{prefix}.{}", slot.name);
                let saved = super::checkpoint::saved_like(state, &key, moment, "optimiser state")?;
                *moment = saved.to_dtype(DType::F32)?.to_device(moment.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_follow_transformers() {
        // 10 steps, 2 of warm-up.
        assert_eq!(Schedule::Constant.factor(0, 10, 2), 0.0);
        assert_eq!(Schedule::Constant.factor(1, 10, 2), 0.5);
        assert_eq!(Schedule::Constant.factor(7, 10, 2), 1.0);
        assert_eq!(Schedule::Linear.factor(2, 10, 2), 1.0);
        assert_eq!(Schedule::Linear.factor(6, 10, 2), 0.5);
        assert!((Schedule::Cosine.factor(6, 10, 2) - 0.5).abs() < 1e-12);
        assert!(Schedule::Cosine.factor(9, 10, 2) < 0.05);
        assert_eq!(Schedule::Constant.factor(0, 10, 0), 1.0);
    }

    /// One step by hand: m = 0.1 g, v = 0.001 g², bias-corrected to g and g², so the update is
    /// lr · g / (|g| + eps) = lr · sign(g).
    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let mut adam = AdamW::new(HashMap::from([("w".to_string(), var.clone())]), AdamWConfig::default()).unwrap();
        let grads = HashMap::from([("w".to_string(), Tensor::new(&[0.5f32, -4.0, 0.0], &Device::Cpu).unwrap())]);
        let norm = adam.step(&grads, 0.1, None).unwrap();
        assert!((norm - (0.25f64 + 16.0).sqrt()).abs() < 1e-6);
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for (got, want) in w.iter().zip([0.9f32, -1.9, 3.0]) {
            assert!((got - want).abs() < 1e-5, "{w:?}");
        }
        // Clipping scales the gradient, not the (sign-like) first update: check the moments.
        let clipped = adam.step(&grads, 0.0, Some(1.0)).unwrap();
        assert!((clipped - norm).abs() < 1e-9, "the norm is reported before clipping");
        let state: HashMap<String, Tensor> = adam.state().into_iter().collect();
        let m: Vec<f32> = state["m.w"].to_vec1().unwrap();
        let g0 = 0.5f32;
        let want = 0.9 * 0.1 * g0 + 0.1 * g0 / norm as f32;
        assert!((m[0] - want).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let var = Var::from_tensor(&Tensor::new(&[2.0f32], &Device::Cpu).unwrap()).unwrap();
        let config = AdamWConfig { weight_decay: 0.5, ..AdamWConfig::default() };
        let mut adam = AdamW::new(HashMap::from([("w".to_string(), var.clone())]), config).unwrap();
        let grads = HashMap::from([("w".to_string(), Tensor::new(&[1.0f32], &Device::Cpu).unwrap())]);
        adam.step(&grads, 0.1, None).unwrap();
        // 2 · (1 − 0.1 · 0.5) − 0.1 · 1
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((w[0] - 1.8).abs() < 1e-5, "{w:?}");
    }
}
