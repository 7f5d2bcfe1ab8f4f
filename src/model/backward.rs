//! The training step's backward pass written out by hand, for the Llama family on the CPU in
//! f32, which is where `harness train` spends its time on this kind of machine.
//!
//! candle's autograd stays the reference and serves every other model, device and dtype, but
//! it allocates, zero-fills and adds a gradient buffer for every node of the graph, and holds
//! every forward tensor until the whole backward pass is over. Here each layer keeps only what
//! its gradient formulas read, drops it as soon as its layer is done, and every weight
//! gradient is written once. The tests hold both passes to the same gradients.

use super::layers::{self, Attention, Mlp, RmsNorm, RopeTables, QUERY_BLOCK};
use super::ops;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId};
use candle_nn::Linear;
use std::collections::HashMap;

/// The gradients of one backward pass, looked up by weight tensor.
pub enum Gradients {
    Autograd(GradStore),
    /// By weight id; a weight used twice (tied embeddings) holds the sum.
    ByHand(HashMap<TensorId, Tensor>),
}

impl Gradients {
    pub fn get(&self, weight: &Tensor) -> Option<&Tensor> {
        match self {
            Gradients::Autograd(store) => store.get(weight),
            Gradients::ByHand(map) => map.get(&weight.id()),
        }
    }
}

#[derive(Default)]
pub(super) struct GradientSums(HashMap<TensorId, Tensor>);

impl GradientSums {
    pub(super) fn add(&mut self, weight: &Tensor, grad: Tensor) -> Result<()> {
        let grad = match self.0.remove(&weight.id()) {
            Some(sum) => (sum + grad)?,
            None => grad,
        };
        self.0.insert(weight.id(), grad);
        Ok(())
    }

    pub(super) fn done(self) -> Gradients {
        Gradients::ByHand(self.0)
    }
}

/// `x · Wᵀ + b`, recording no graph.
fn linear(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    layers::linear(x, &Linear::new(layer.weight().detach(), layer.bias().map(Tensor::detach)))
}

/// Adds dW = dyᵀ·x (and db = Σ dy) for `linear(x)` and returns dx = dy·W.
fn linear_backward(x: &Tensor, dy: &Tensor, layer: &Linear, grads: &mut GradientSums) -> Result<Tensor> {
    grads.add(layer.weight(), ops::matmul(&dy.t()?, x)?)?;
    if let Some(bias) = layer.bias() {
        grads.add(bias, dy.sum(0)?)?;
    }
    ops::matmul(dy, &layer.weight().detach())
}

impl RmsNorm {
    pub(super) fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight.detach(), self.eps)
    }

    /// Adds the weight's gradient and returns the input's.
    pub(super) fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut GradientSums) -> Result<Tensor> {
        let (dx, d_weight) = ops::rms_norm_grads(x, &self.weight.detach(), dy, self.eps)?;
        grads.add(&self.weight, d_weight)?;
        Ok(dx)
    }
}

/// What attention's backward reads: rotated keys, values, each query block's rotated and
/// scaled queries (grouped by key head) with its probabilities, and the heads' output
/// before `o_proj`.
pub(super) struct AttentionSaved {
    k: Tensor,
    v: Tensor,
    blocks: Vec<(Tensor, Tensor)>,
    context: Tensor,
}

/// The causal query blocks of a sequence of `t`: `(first query, queries, keys seen)`.
fn query_blocks(t: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(QUERY_BLOCK).map(move |t0| {
        let len = QUERY_BLOCK.min(t - t0);
        (t0, len, t0 + len)
    })
}

impl Attention {
    /// Hand-written backward applies: no query/key norms and no logit soft-capping.
    pub(super) fn plain(&self) -> bool {
        self.q_norm.is_none() && self.k_norm.is_none() && self.softcap.is_none()
    }

    /// `Attention::forward` in `Mode::Train` without a cache, on rows `(B·T, H)`.
    pub(super) fn forward_saving(
        &self,
        h: &Tensor,
        (b, t): (usize, usize),
        rope: &RopeTables,
        mask: &Tensor,
    ) -> Result<(Tensor, AttentionSaved)> {
        let (heads, kv_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = heads / kv_heads;
        let split = |proj: &Linear, n: usize| linear(h, proj)?.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let q = (ops::rope(&split(&self.q_proj, heads)?, &rope.cos, &rope.sin)? * self.scale)?;
        let k = ops::rope(&split(&self.k_proj, kv_heads)?, &rope.cos, &rope.sin)?;
        let v = split(&self.v_proj, kv_heads)?;
        let (mut blocks, mut outputs) = (Vec::new(), Vec::new());
        for (t0, len, keys) in query_blocks(t) {
            let q_block = q.narrow(2, t0, len)?.contiguous()?.reshape((b, kv_heads, groups * len, d))?;
            let mask_block = mask.narrow(2, t0, len)?.narrow(3, 0, keys)?;
            let p = ops::attention_probs(&q_block, &k.narrow(2, 0, keys)?, &mask_block)?
                .reshape((b, kv_heads, groups * len, keys))?;
            outputs.push(ops::matmul(&p, &v.narrow(2, 0, keys)?)?.reshape((b, heads, len, d))?);
            blocks.push((q_block, p));
        }
        let context = Tensor::cat(&outputs, 2)?.transpose(1, 2)?.contiguous()?.reshape((b * t, heads * d))?;
        let out = linear(&context, &self.o_proj)?;
        Ok((out, AttentionSaved { k, v, blocks, context }))
    }

    /// Adds every projection's gradient and returns the gradient of the input rows `h`.
    pub(super) fn backward(
        &self,
        h: &Tensor,
        saved: AttentionSaved,
        dy: &Tensor,
        (b, t): (usize, usize),
        rope: &RopeTables,
        grads: &mut GradientSums,
    ) -> Result<Tensor> {
        let (heads, kv_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = heads / kv_heads;
        let AttentionSaved { k, v, blocks, context } = saved;
        let d_context = linear_backward(&context, dy, &self.o_proj, grads)?;
        drop(context);
        let d_context = d_context.reshape((b, t, heads, d))?.transpose(1, 2)?;
        let (mut dq_blocks, mut dk, mut dv) = (Vec::new(), None, None);
        for ((t0, len, keys), (q_block, p)) in query_blocks(t).zip(blocks) {
            let d_out = d_context.narrow(2, t0, len)?.contiguous()?.reshape((b, kv_heads, groups * len, d))?;
            let dv_part = ops::matmul(&p.t()?, &d_out)?;
            let d_probs = ops::matmul(&d_out, &v.narrow(2, 0, keys)?.t()?)?;
            let d_scores = ops::softmax_grad(&p, d_probs)?;
            drop(p);
            dq_blocks.push(ops::matmul(&d_scores, &k.narrow(2, 0, keys)?)?.reshape((b, heads, len, d))?);
            let dk_part = ops::matmul(&d_scores.t()?, &q_block)?;
            dk = Some(add_prefix(dk, dk_part, t)?);
            dv = Some(add_prefix(dv, dv_part, t)?);
        }
        let (Some(dk), Some(dv)) = (dk, dv) else { candle_core::bail!("attention over an empty sequence") };
        let dq = ops::rope_grad(&(Tensor::cat(&dq_blocks, 2)? * self.scale)?, &rope.cos, &rope.sin)?;
        let dk = ops::rope_grad(&dk, &rope.cos, &rope.sin)?;
        let rows = |x: Tensor, n: usize| x.transpose(1, 2)?.contiguous()?.reshape((b * t, n * d));
        let dh = linear_backward(h, &rows(dq, heads)?, &self.q_proj, grads)?;
        let dh = (dh + linear_backward(h, &rows(dk, kv_heads)?, &self.k_proj, grads)?)?;
        dh + linear_backward(h, &rows(dv, kv_heads)?, &self.v_proj, grads)?
    }
}

/// `sum + part`, where `part (B, KV, keys, D)` covers the first `keys` of `t` positions.
fn add_prefix(sum: Option<Tensor>, part: Tensor, t: usize) -> Result<Tensor> {
    let keys = part.dim(2)?;
    let part = if keys < t { part.pad_with_zeros(2, 0, t - keys)? } else { part };
    match sum {
        Some(sum) => sum + part,
        None => Ok(part),
    }
}

/// The gate and up projections side by side, `[gate | up]` per row, and their gated
/// product, which `down_proj`'s gradient reads.
pub(super) struct MlpSaved {
    gate_up: Tensor,
    product: Tensor,
}

impl Mlp {
    pub(super) fn plain(&self) -> bool {
        self.activation == super::config::Activation::Silu
    }

    /// `[W_gate; W_up]`: one matmul for both projections forward, and one for their input's
    /// gradient backward where two would need a sum.
    fn gate_up_weight(&self) -> Result<Tensor> {
        Tensor::cat(&[self.gate_proj.weight().detach(), self.up_proj.weight().detach()], 0)
    }

    pub(super) fn forward_saving(&self, h: &Tensor) -> Result<(Tensor, MlpSaved)> {
        let gate_up = ops::matmul(h, &self.gate_up_weight()?.t()?)?;
        let product = ops::silu_mul_halves(&gate_up)?;
        let out = linear(&product, &self.down_proj)?;
        Ok((out, MlpSaved { gate_up, product }))
    }

    pub(super) fn backward(&self, h: &Tensor, saved: MlpSaved, dy: &Tensor, grads: &mut GradientSums) -> Result<Tensor> {
        let MlpSaved { gate_up, product } = saved;
        let d_product = linear_backward(&product, dy, &self.down_proj, grads)?;
        drop(product);
        let d_gate_up = ops::silu_mul_grads(gate_up, &d_product)?;
        drop(d_product);
        let d_weight = ops::matmul(&d_gate_up.t()?, h)?;
        let width = d_weight.dim(0)? / 2;
        grads.add(self.gate_proj.weight(), d_weight.narrow(0, 0, width)?)?;
        grads.add(self.up_proj.weight(), d_weight.narrow(0, width, width)?)?;
        ops::matmul(&d_gate_up, &self.gate_up_weight()?)
    }
}

/// Logits per chunk of rows in the head's pass: 128 MiB of f32.
const HEAD_CHUNK_FLOATS: usize = 32 * 1024 * 1024;

/// Σ weight · log softmax(hidden[row] · Wᵀ)[target] over `rows` of `hidden (N, H)`, with the
/// head's weight gradient added and the gradient of `hidden` returned; the logits are built a
/// chunk of rows at a time.
pub(super) fn head_loss_and_grad(
    hidden: &Tensor,
    head: &Linear,
    rows: &[u32],
    targets: &[u32],
    weight: f64,
    grads: &mut GradientSums,
) -> Result<(f64, Tensor)> {
    let device = hidden.device();
    let chunk = (HEAD_CHUNK_FLOATS / head.weight().dim(0)?.max(1)).max(1);
    let mut loss = 0.0;
    let mut d_rows = Vec::new();
    for (rows, targets) in rows.chunks(chunk).zip(targets.chunks(chunk)) {
        let targets = Tensor::new(targets, device)?;
        let h = hidden.index_select(&Tensor::new(rows, device)?, 0)?;
        let logits = linear(&h, head)?;
        let logp = ops::log_softmax_at(&logits, &targets)?;
        loss += logp.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? * weight;
        let upstream = Tensor::full(weight as f32, rows.len(), device)?;
        let d_logits = ops::log_softmax_at_grad(logits, &targets, &logp, &upstream)?;
        d_rows.push(linear_backward(&h, &d_logits, head, grads)?);
    }
    let d_hidden = hidden.zeros_like()?;
    if d_rows.is_empty() {
        return Ok((loss, d_hidden));
    }
    let d_hidden = d_hidden.index_add(&Tensor::new(rows, device)?, &Tensor::cat(&d_rows, 0)?, 0)?;
    Ok((loss, d_hidden))
}
