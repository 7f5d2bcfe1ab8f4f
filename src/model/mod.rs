//! The causal language model: decoder architectures, loading, tokenizers, chat templates.
//!
//! We run our own decoder rather than candle-transformers' models because scoring and
//! training need hidden states at every position, the output projection only where asked,
//! and a differentiable path (see DESIGN.md, "Why our own decoder").

pub mod backward;
pub mod chat;
pub mod config;
pub mod gemma3;
pub mod gguf;
pub mod hf;
pub mod layers;
pub mod llama;
pub(crate) mod ops;
mod loader;
pub mod pull;
pub mod random;
pub(crate) mod simd;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use layers::{KvCache, Mode};
use layers::at_least_f32;
pub use loader::{inspect, inspect_fingerprinted, load, load_trainable, EncodedPair, LoadOptions, LoadedModel, ModelFormat, Placement};

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;
use weights::TensorMap;

/// A right-padded batch of token ids (`lengths[b]` real tokens in row `b`) and what it is
/// trained on: `targets[i]` is the token that follows flat position `rows[i]` (`b·T + t`).
#[derive(Debug, Clone)]
pub struct TrainingBatch {
    pub input_ids: Tensor,
    pub lengths: Vec<usize>,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

#[derive(Debug, Clone)]
pub enum Decoder {
    Llama(llama::Model),
    Gemma3(gemma3::Model),
}

impl Decoder {
    /// Builds a decoder for inference from named tensors, after checking every tensor
    /// against the config (errors name `path`).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: TensorMap,
        dtype: DType,
        device: &Device,
        path: &Path,
    ) -> Result<Self> {
        weights::check(cfg, &tensors, path)?;
        Self::load(cfg, VarBuilder::from_tensors(tensors, dtype, device))
    }

    /// Builds a decoder whose every weight is a `Var`, for training. The returned map owns
    /// the variables (optimisers and checkpoints read it).
    pub fn trainable(
        cfg: &ModelConfig,
        tensors: TensorMap,
        dtype: DType,
        device: &Device,
        path: &Path,
    ) -> Result<(Self, VarMap)> {
        weights::check(cfg, &tensors, path)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("fresh VarMap lock");
            for (name, tensor) in tensors {
                let var = Var::from_tensor(&tensor.to_device(device)?.to_dtype(dtype)?)?;
                data.insert(name, var);
            }
        }
        let decoder = Self::load(cfg, VarBuilder::from_varmap(&varmap, dtype, device))?;
        Ok((decoder, varmap))
    }

    fn load(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                Decoder::Llama(llama::Model::load(vb, cfg)?)
            }
            Architecture::Gemma3 => Decoder::Gemma3(gemma3::Model::load(vb, cfg)?),
        })
    }

    /// Final-norm hidden states `(B, T, H)` of a right-padded batch: `lengths[b]` real
    /// tokens in row `b`. With a cache, the tokens continue what the cache holds.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        Ok(match self {
            Decoder::Llama(m) => m.forward(input_ids, lengths, cache, mode)?,
            Decoder::Gemma3(m) => m.forward(input_ids, lengths, cache, mode)?,
        })
    }

    /// Vocabulary logits for hidden rows `(N, H) -> (N, V)`.
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Decoder::Llama(m) => m.project(hidden)?,
            Decoder::Gemma3(m) => m.project(hidden)?,
        })
    }

    /// Σ weight · log p(target) over a batch's targets, and the gradient of that sum with
    /// respect to every weight. The Llama family on the CPU in f32 takes the hand-written
    /// backward pass (`backward.rs`); everything else takes candle's autograd through
    /// `Mode::Train`.
    pub fn loss_and_grads(&self, batch: &TrainingBatch, weight: f64) -> Result<(f64, backward::Gradients)> {
        match self {
            Decoder::Llama(m) if m.backward_by_hand_applies() => Ok(m.loss_and_grads_by_hand(batch, weight)?),
            _ => self.loss_and_grads_by_autograd(batch, weight),
        }
    }

    /// Whether `loss_and_grads` takes the hand-written backward pass.
    pub fn backward_by_hand(&self) -> bool {
        matches!(self, Decoder::Llama(m) if m.backward_by_hand_applies())
    }

    /// `loss_and_grads` through candle's autograd, for any model, device and dtype.
    pub fn loss_and_grads_by_autograd(&self, batch: &TrainingBatch, weight: f64) -> Result<(f64, backward::Gradients)> {
        let hidden = self.forward(&batch.input_ids, &batch.lengths, None, Mode::Train)?;
        let loss = (self.target_logprobs(&hidden, &batch.rows, &batch.targets)?.sum_all()? * weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((value, backward::Gradients::Autograd(loss.backward()?)))
    }

    /// Rows of the output projection.
    pub fn vocab_size(&self) -> Result<usize> {
        Ok(match self {
            Decoder::Llama(m) => m.vocab_size()?,
            Decoder::Gemma3(m) => m.vocab_size()?,
        })
    }

    /// Logits `(B, V)` at each row's last real token.
    pub fn last_logits(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (_, t, _) = hidden.dims3()?;
        let rows: Vec<u32> = lengths
            .iter()
            .enumerate()
            .map(|(b, &len)| (b * t + len.max(1) - 1) as u32)
            .collect();
        Ok(at_least_f32(&self.project(&gather_rows(hidden, &rows)?)?)?)
    }

    /// log p(target) at chosen positions. `rows` index the flattened `(B*T)` positions of
    /// `hidden`; the projection and log-softmax (in f32) run on those rows only, in chunks,
    /// so no `B x T x V` tensor is ever built. Differentiable in `Mode::Train` use.
    pub fn target_logprobs(&self, hidden: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Tensor> {
        if rows.len() != targets.len() {
            return Err(Error::Invalid(format!(
                "{} positions but {} targets",
                rows.len(),
                targets.len()
            )));
        }
        let device = hidden.device();
        // About 64 MiB of f32 logits per chunk.
        let chunk = (16 * 1024 * 1024 / self.vocab_size()?).max(1);
        let mut parts = Vec::new();
        for (row_chunk, target_chunk) in rows.chunks(chunk).zip(targets.chunks(chunk)) {
            let logits = at_least_f32(&self.project(&gather_rows(hidden, row_chunk)?)?)?;
            parts.push(ops::log_softmax_at(&logits, &Tensor::new(target_chunk, device)?)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Rows of `(B, T, H)` hidden states picked by flat index `b * T + t`.
pub fn gather_rows(hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let idx = Tensor::new(rows, hidden.device())?;
    Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
}
