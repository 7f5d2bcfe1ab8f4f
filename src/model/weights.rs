//! The tensors a configuration needs, under Hugging Face names: used to check loaded
//! files, to build trainable variables, and to generate seeded random models for tests
//! and benchmarks in any real shape.

use super::config::{Architecture, ModelConfig};
use crate::util::Rng;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub type TensorMap = HashMap<String, Tensor>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Matrix,
    Bias,
    /// RMS norm scale stored as `w` (multiplied directly).
    Norm,
    /// RMS norm scale stored as `w` and applied as `1 + w` (Gemma).
    OffsetNorm,
}

/// Every weight tensor of `cfg`, in a stable order, with its shape and kind.
pub fn expected(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let gemma = cfg.architecture == Architecture::Gemma3;
    let norm = if gemma { Kind::OffsetNorm } else { Kind::Norm };
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h], Kind::Matrix)];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>, kind: Kind| out.push((format!("{p}.{name}"), shape, kind));
        add("input_layernorm.weight", vec![h], norm);
        add("self_attn.q_proj.weight", vec![q, h], Kind::Matrix);
        add("self_attn.k_proj.weight", vec![kv, h], Kind::Matrix);
        add("self_attn.v_proj.weight", vec![kv, h], Kind::Matrix);
        add("self_attn.o_proj.weight", vec![h, q], Kind::Matrix);
        if cfg.attention_bias {
            add("self_attn.q_proj.bias", vec![q], Kind::Bias);
            add("self_attn.k_proj.bias", vec![kv], Kind::Bias);
            add("self_attn.v_proj.bias", vec![kv], Kind::Bias);
        }
        add("post_attention_layernorm.weight", vec![h], norm);
        if gemma {
            add("self_attn.q_norm.weight", vec![cfg.head_dim], norm);
            add("self_attn.k_norm.weight", vec![cfg.head_dim], norm);
            add("pre_feedforward_layernorm.weight", vec![h], norm);
            add("post_feedforward_layernorm.weight", vec![h], norm);
        }
        add("mlp.gate_proj.weight", vec![i, h], Kind::Matrix);
        add("mlp.up_proj.weight", vec![i, h], Kind::Matrix);
        add("mlp.down_proj.weight", vec![h, i], Kind::Matrix);
    }
    out.push(("model.norm.weight".to_string(), vec![h], norm));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Kind::Matrix));
    }
    out
}

/// Fails, naming the file and the tensor, when a tensor is missing or has the wrong shape.
pub fn check(cfg: &ModelConfig, tensors: &TensorMap, path: &Path) -> Result<()> {
    for (name, shape, _) in expected(cfg) {
        match tensors.get(&name) {
            None => return Err(Error::mismatch(path, format!("missing tensor `{name}`"))),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::mismatch(
                    path,
                    format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A seeded random model: N(0, 0.02) matrices, norms near their identity value.
/// The same seed and config give bit-identical weights on every machine.
pub fn random(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<TensorMap> {
    random_as(cfg, seed, DType::F32, device)
}

/// [`random`] with each tensor cast to `dtype` as soon as it is drawn, so an 8B-shaped
/// model in bf16 never holds its f32 copy whole.
pub fn random_as(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<TensorMap> {
    let mut rng = Normal::new(seed);
    expected(cfg)
        .into_iter()
        .map(|(name, shape, kind)| {
            let n: usize = shape.iter().product();
            let (mean, std) = match kind {
                Kind::Matrix | Kind::Bias => (0.0, 0.02),
                Kind::Norm => (1.0, 0.1),
                Kind::OffsetNorm => (0.0, 0.1),
            };
            let data: Vec<f32> = (0..n).map(|_| mean + std * rng.sample()).collect();
            Ok((name, Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?))
        })
        .collect()
}

/// Box-Muller over the harness's seeded RNG.
struct Normal {
    rng: Rng,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            spare: None,
        }
    }

    fn sample(&mut self) -> f32 {
        if let Some(x) = self.spare.take() {
            return x;
        }
        let (u1, u2) = (self.rng.uniform(), self.rng.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }
}
