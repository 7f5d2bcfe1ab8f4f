//! Building blocks shared by every decoder family: norms, rotary embeddings, attention
//! with a padding-aware mask and KV cache, and the gated MLP.
//!
//! Each block has two paths. `Mode::Infer` uses candle's fused kernels (fast, but they
//! record no backward pass); `Mode::Train` uses the differentiable kernels of `ops.rs` so
//! that every parameter receives a gradient.

use super::config::{Activation, ModelConfig, RopeScaling};
use super::ops;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Infer,
    Train,
}

/// `x · Wᵀ + b` over the last axis, through `ops::matmul`, which threads the CPU's f32 matmul
/// better than gemm does itself; weights that autograd tracks take candle's matmul there.
pub(crate) fn linear(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    let lead = &x.dims()[..x.rank().saturating_sub(1)];
    let y = ops::matmul(&x.reshape(((), x.dim(D::Minus1)?))?, &layer.weight().t()?)?;
    let y = y.reshape([lead, &[y.dim(1)?]].concat())?;
    match layer.bias() {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// Softmaxes need f32 even when the model computes in bf16/f16; f64 stays f64.
pub(crate) fn at_least_f32(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F64 | DType::F32 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
    /// Gemma stores `w` and scales by `1 + w`.
    pub(super) unit_offset: bool,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, unit_offset: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
            unit_offset,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let alpha = if self.unit_offset {
            (&self.weight + 1.0)?
        } else {
            self.weight.clone()
        };
        match mode {
            Mode::Infer => candle_nn::ops::rms_norm(&x.contiguous()?, &alpha, self.eps as f32),
            Mode::Train => super::ops::rms_norm(x, &alpha, self.eps),
        }
    }
}

/// Precomputed cos/sin tables for rotary position embeddings (Hugging Face's
/// rotate-half convention; GGUF llama weights are un-permuted on load to match).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
                scaled_frequency(freq, scaling) as f32
            })
            .collect();
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The tables for this step's positions: `(T, D/2)` when every row starts at the same
    /// position, else `(B, T, D/2)`.
    pub fn select(&self, positions: &Positions) -> Result<RopeTables> {
        let max = self.cos.dim(0)?;
        if let Some(last) = positions.last_real {
            if last as usize >= max {
                candle_core::bail!("position {last} exceeds the model's {max} rotary positions")
            }
        }
        // Padding after a short row may run past the table (a long shared prompt in a batch of
        // long continuations): its outputs are never read, so it takes the last row's angles.
        let padding_past_end = positions.ids.iter().any(|&p| p as usize >= max);
        let (cos, sin) = match positions.shared_start {
            Some(start) if !padding_past_end => (
                self.cos.narrow(0, start, positions.len)?,
                self.sin.narrow(0, start, positions.len)?,
            ),
            _ => {
                let clamped: Vec<u32> = positions.ids.iter().map(|&p| p.min(max as u32 - 1)).collect();
                let ids = Tensor::new(clamped.as_slice(), self.cos.device())?;
                let shape = (positions.batch, positions.len, self.cos.dim(1)?);
                (
                    self.cos.index_select(&ids, 0)?.reshape(shape)?,
                    self.sin.index_select(&ids, 0)?.reshape(shape)?,
                )
            }
        };
        Ok(RopeTables { cos, sin })
    }
}

fn scaled_frequency(freq: f64, scaling: Option<&RopeScaling>) -> f64 {
    match scaling {
        None => freq,
        Some(RopeScaling::Linear { factor }) => freq / factor,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let original = *original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        }
    }
}

pub struct RopeTables {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl RopeTables {
    /// Rotates `x` of shape `(B, H, T, D)`.
    pub fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin),
            Mode::Train => super::ops::rope(x, &self.cos, &self.sin),
        }
    }
}

/// Position ids of the tokens in one forward step, row-major `(B, T)`.
#[derive(Debug, Clone)]
pub struct Positions {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Set when every row's positions are `start..start+T`, which lets rope use a slice.
    pub shared_start: Option<usize>,
    /// The largest position of a real (not padding) token.
    pub last_real: Option<u32>,
}

/// Keys and values of the tokens already processed, per layer, with the position of
/// every slot (or `None` for a padding slot that no query may see).
///
/// Rows may hold different numbers of real tokens, so the cache serves right-padded
/// batches, batched decoding, and one prompt prefix shared by many continuations.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    slots: Vec<Vec<Option<u32>>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            slots: Vec::new(),
        }
    }

    /// Number of cached slots (padding included).
    pub fn len(&self) -> usize {
        self.slots.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> Option<usize> {
        (!self.slots.is_empty()).then_some(self.slots.len())
    }

    /// Real tokens held for each row: the position the row's next token takes.
    pub fn next_positions(&self) -> Vec<usize> {
        self.slots
            .iter()
            .map(|row| row.iter().filter(|s| s.is_some()).count())
            .collect()
    }

    /// Keeps only the given rows (in that order): generation drops finished rows so they
    /// stop costing compute.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.slots.len()) {
            candle_core::bail!("row {bad} of a cache with {} rows", self.slots.len())
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), k.device())?;
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.slots = rows.iter().map(|&r| self.slots[r].clone()).collect();
        Ok(())
    }

    /// Repeats a one-row cache `n` times, so a shared prompt is computed once and then
    /// continued by `n` different responses.
    pub fn expand(&self, n: usize) -> Result<Self> {
        Self::stack(&[(self, n)])
    }

    /// One batch from several one-row caches, each repeated: `(prompt cache, number of
    /// continuations)`. Shorter prompts are padded on the right with slots no query sees,
    /// so prompts of different lengths share one forward pass.
    pub fn stack(parts: &[(&KvCache, usize)]) -> Result<Self> {
        let Some((first, _)) = parts.first() else {
            candle_core::bail!("stacking needs at least one cache")
        };
        // A fresh cache (no rows yet) stacks as one empty row.
        if let Some((bad, _)) = parts.iter().find(|(c, _)| c.slots.len() > 1 || c.layers.len() != first.layers.len()) {
            candle_core::bail!(
                "stack needs one-row caches of {} layers, got {} rows of {} layers",
                first.layers.len(),
                bad.slots.len(),
                bad.layers.len()
            )
        }
        let width = parts.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(first.layers.len());
        for layer in 0..first.layers.len() {
            // (1, KV, S, D) of any non-empty part tells the shape of the padding.
            let Some((like, _)) = parts.iter().find_map(|(c, _)| c.layers[layer].as_ref()) else {
                layers.push(None);
                continue;
            };
            let (_, kv_heads, _, head_dim) = like.dims4()?;
            let widen = |t: Option<&Tensor>, n: usize| -> Result<Tensor> {
                let have = t.map_or(Ok(0), |t| t.dim(2))?;
                let pad = Tensor::zeros((1, kv_heads, width - have, head_dim), like.dtype(), like.device())?;
                let row = match t {
                    Some(t) if have < width => Tensor::cat(&[t, &pad], 2)?,
                    Some(t) => t.clone(),
                    None => pad,
                };
                row.broadcast_as((n, kv_heads, width, head_dim))?.contiguous()
            };
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for (cache, n) in parts {
                let kv = cache.layers[layer].as_ref();
                ks.push(widen(kv.map(|(k, _)| k), *n)?);
                vs.push(widen(kv.map(|(_, v)| v), *n)?);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let slots = parts
            .iter()
            .flat_map(|(cache, n)| {
                let mut row = cache.slots.first().cloned().unwrap_or_default();
                row.resize(width, None);
                std::iter::repeat_n(row, *n)
            })
            .collect();
        Ok(Self { layers, slots })
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            Some((ck, cv)) => (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Everything a layer needs about the current step: positions and attention masks.
pub struct Step {
    pub positions: Positions,
    pub mask: Tensor,
    pub sliding_mask: Option<Tensor>,
    new_slots: Vec<Vec<Option<u32>>>,
}

impl Step {
    /// `lengths[b]` is the number of real tokens of row `b` in this step (right padding
    /// after them). A padding query sees only real keys and itself, so its softmax never
    /// sees an empty row; its output is garbage that callers never read.
    pub fn new(
        batch: usize,
        len: usize,
        lengths: &[usize],
        cache: Option<&KvCache>,
        sliding_window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if lengths.len() != batch || lengths.iter().any(|&l| l > len) {
            candle_core::bail!("lengths {lengths:?} do not fit a batch of {batch} rows of {len}")
        }
        let empty = Vec::new();
        let past_slots = cache.map_or(&empty, |c| &c.slots);
        if !past_slots.is_empty() && past_slots.len() != batch {
            candle_core::bail!("cache holds {} rows but the batch has {batch}", past_slots.len())
        }
        let past = past_slots.first().map_or(0, Vec::len);
        // A fresh cache (no rows yet) starts every row at position 0.
        let starts = match cache {
            Some(c) if !c.slots.is_empty() => c.next_positions(),
            _ => vec![0; batch],
        };

        let mut ids = Vec::with_capacity(batch * len);
        let mut new_slots = Vec::with_capacity(batch);
        for (b, &start) in starts.iter().enumerate() {
            ids.extend((0..len).map(|t| (start + t) as u32));
            new_slots.push((0..len).map(|t| (t < lengths[b]).then_some((start + t) as u32)).collect());
        }
        let shared_start = starts.iter().all(|&s| s == starts[0]).then_some(starts[0]);
        let last_real = starts.iter().zip(lengths).filter(|(_, &l)| l > 0).map(|(&s, &l)| (s + l - 1) as u32).max();
        let positions = Positions {
            ids,
            batch,
            len,
            shared_start,
            last_real,
        };

        let build = |window: Option<usize>| -> Result<Tensor> {
            let keys = past + len;
            let mut mask = vec![f32::NEG_INFINITY; batch * len * keys];
            for b in 0..batch {
                for t in 0..len {
                    let q_pos = positions.ids[b * len + t];
                    let row = &mut mask[(b * len + t) * keys..(b * len + t + 1) * keys];
                    let in_window = |k_pos: u32| window.is_none_or(|w| ((q_pos - k_pos) as usize) < w);
                    for (s, slot) in past_slots.get(b).into_iter().flatten().enumerate() {
                        if let Some(k_pos) = *slot {
                            if k_pos <= q_pos && in_window(k_pos) {
                                row[s] = 0.0;
                            }
                        }
                    }
                    for u in 0..=t {
                        let k_pos = positions.ids[b * len + u];
                        if (u < lengths[b] || u == t) && in_window(k_pos) {
                            row[past + u] = 0.0;
                        }
                    }
                }
            }
            Tensor::from_vec(mask, (batch, 1, len, keys), device)?.to_dtype(dtype)
        };
        Ok(Self {
            mask: build(None)?,
            sliding_mask: sliding_window.map(|w| build(Some(w))).transpose()?,
            positions,
            new_slots,
        })
    }

    pub fn mask_for(&self, sliding: bool) -> &Tensor {
        match (sliding, &self.sliding_mask) {
            (true, Some(mask)) => mask,
            _ => &self.mask,
        }
    }

    /// Records this step's tokens in the cache once every layer has appended its keys.
    pub fn commit(self, cache: &mut KvCache) {
        if cache.slots.is_empty() {
            cache.slots = self.new_slots;
        } else {
            for (row, new) in cache.slots.iter_mut().zip(self.new_slots) {
                row.extend(new);
            }
        }
    }
}

/// Query rows attended together; see `Attention::forward`.
pub(super) const QUERY_BLOCK: usize = 128;

#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    /// Gemma 3 normalises each query and key head.
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) scale: f64,
    pub(super) softcap: Option<f64>,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, qk_norm: bool) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        let norm = |name: &str| RmsNorm::load(vb.pp(name), cfg.head_dim, cfg.rms_norm_eps, true);
        Ok(Self {
            q_proj: candle_nn::linear_b(h, q, bias, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_b(h, kv, bias, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_b(h, kv, bias, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_b(q, h, false, vb.pp("o_proj"))?,
            q_norm: qk_norm.then(|| norm("q_norm")).transpose()?,
            k_norm: qk_norm.then(|| norm("k_norm")).transpose()?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            scale: 1.0 / cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64).sqrt(),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Linear, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = linear(x, proj)?.reshape((b, t, n, self.head_dim))?;
            let y = match norm {
                Some(norm) => norm.forward(&y, mode)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let q = rope.apply(&heads(&self.q_proj, self.num_heads, &self.q_norm)?, mode)?;
        let k = rope.apply(&heads(&self.k_proj, self.num_kv_heads, &self.k_norm)?, mode)?;
        let v = heads(&self.v_proj, self.num_kv_heads, &None)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let past = k.dim(2)? - t;

        // Causal attention in query blocks: block [t0, t1) needs keys up to past + t1 only,
        // which skips most of the masked upper triangle (62% of the work at T = 512).
        let q = (q * self.scale)?;
        let out = if t <= QUERY_BLOCK {
            self.attend(&q, &k, &v, mask, mode)?
        } else {
            let blocks = (0..t)
                .step_by(QUERY_BLOCK)
                .map(|t0| {
                    let len = QUERY_BLOCK.min(t - t0);
                    let keys = past + t0 + len;
                    self.attend(
                        &q.narrow(2, t0, len)?,
                        &k.narrow(2, 0, keys)?,
                        &v.narrow(2, 0, keys)?,
                        &mask.narrow(2, t0, len)?.narrow(3, 0, keys)?,
                        mode,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&blocks, 2)?
        };
        linear(&out.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?, &self.o_proj)
    }

    /// Softmax attention of scaled queries `(B, H, Tq, D)` over keys and values
    /// `(B, KV, S, D)` with an additive mask `(B, 1, Tq, S)`; returns `(B, H, Tq, D)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let keys = k.dim(2)?;
        // Grouped-query attention without copying K/V: the query heads that share a
        // key/value head are stacked along the sequence axis of one matmul.
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.contiguous()?.reshape((b, self.num_kv_heads, groups * t, self.head_dim))?;
        let probs = match (mode, self.softcap) {
            (Mode::Train, None) => ops::attention_probs(&q, k, mask)?,
            _ => {
                let scores = ops::matmul(&q, &k.t()?)?;
                let scores = match self.softcap {
                    Some(cap) => ((scores / cap)?.tanh()? * cap)?,
                    None => scores,
                };
                let scores = scores.reshape((b, self.num_kv_heads, groups, t, keys))?;
                let masked = at_least_f32(&scores.broadcast_add(&mask.unsqueeze(1)?)?)?;
                match mode {
                    // candle's fused softmax records no backward pass.
                    Mode::Infer => candle_nn::ops::softmax_last_dim(&masked)?,
                    Mode::Train => candle_nn::ops::softmax(&masked, candle_core::D::Minus1)?,
                }
            }
        }
        .to_dtype(v.dtype())?
        .reshape((b, self.num_kv_heads, groups * t, keys))?;
        ops::matmul(&probs, v)?.reshape((b, self.num_heads, t, self.head_dim))
    }
}

/// The token embedding and the output projection, which tied models share.
pub fn embedding_and_head(vb: &VarBuilder, cfg: &ModelConfig) -> Result<(Embedding, Linear)> {
    let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("model.embed_tokens"))?;
    let head = if cfg.tie_word_embeddings {
        Linear::new(embed.embeddings().clone(), None)
    } else {
        candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
    };
    Ok((embed, head))
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
    pub(super) activation: Activation,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: candle_nn::linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?,
            activation: cfg.activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = linear(x, &self.gate_proj)?;
        let up = linear(x, &self.up_proj)?;
        let hidden = match self.activation {
            Activation::Silu => super::ops::silu_mul(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        linear(&hidden, &self.down_proj)
    }
}
