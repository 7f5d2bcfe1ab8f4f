//! Differentiable kernels for training: attention probabilities, RMS norm, rotary
//! embedding and log-softmax-at-target. candle's fused versions record no backward pass and
//! the compositions of plain ops that do keep three or four full-size intermediates alive for
//! the backward pass; these run in one pass on the CPU, keep only what their gradient
//! formula needs, and fall back to the plain compositions on other devices and dtypes.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// e^x within 4 ulp (0 below e^-87, where f32 leaves normal numbers; e^88 above 88), branch-free so
/// that the kernels' loops over it vectorise, which they do not around libm's `expf`: that
/// call was 4% of a training step.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // e^r on |r| <= ln2/2 by Taylor to degree 6 (truncation below 1.3e-7 relative).
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{what}: expected f32") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{what}: expected a contiguous tensor") };
    Ok(&data[start..end])
}

/// softmax(q·kᵀ + mask) over the keys, for grouped queries `(B, KV, G·T, D)` (already
/// scaled) against keys `(B, KV, S, D)` and an additive mask `(B, 1, T, S)` shared by every
/// head; returns `(B, KV, G, T, S)`. The product is taken inside the op, so neither the raw
/// nor the masked scores are kept for the backward pass, which needs only q, k and the
/// probabilities — at 4×512 on SmolLM2-135M that is 0.7 GB less resident memory.
pub fn attention_probs(q: &Tensor, k: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, kv, gt, _) = q.dims4()?;
    let (t, keys) = (mask.dim(2)?, k.dim(2)?);
    if fused(q) && k.dtype() == DType::F32 && mask.dtype() == DType::F32 {
        return q.contiguous()?.apply_op3(k, &mask.contiguous()?, AttentionProbs);
    }
    let scores = q.matmul(&k.t()?)?.reshape((b, kv, gt / t, t, keys))?;
    let masked = super::layers::at_least_f32(&scores.broadcast_add(&mask.unsqueeze(1)?)?)?;
    candle_nn::ops::softmax(&masked, D::Minus1)
}

struct AttentionProbs;

impl CustomOp3 for AttentionProbs {
    fn name(&self) -> &'static str {
        "train-attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let mask = f32s(s3, l3, self.name())?;
        let (b, kv, gt, d, keys, t) = match (l1.dims(), l2.dims(), l3.dims()) {
            (&[b, kv, gt, d], &[b2, kv2, s, d2], &[b3, 1, t, s3])
                if (b, kv, d, s) == (b2, kv2, d2, s3) && b3 == b && t > 0 && gt % t == 0 =>
            {
                (b, kv, gt, d, s, t)
            }
            (q, k, m) => bail!("{}: queries {q:?}, keys {k:?} and mask {m:?} do not fit", self.name()),
        };
        let CpuStorage::F32(mut probs) = s1.matmul(s2, (b * kv, gt, keys, d), l1, &l2.transpose(2, 3)?)? else {
            bail!("{}: expected f32", self.name())
        };
        let rows_per_batch = kv * gt;
        probs.par_chunks_mut(keys.max(1)).enumerate().for_each(|(r, row)| {
            let mask_row = (r / rows_per_batch) * t + r % t;
            let m = &mask[mask_row * keys..(mask_row + 1) * keys];
            let mut max = f32::NEG_INFINITY;
            for (o, &mv) in row.iter_mut().zip(m) {
                *o += mv;
                max = max.max(*o);
            }
            let mut sum = 0.0;
            for o in row.iter_mut() {
                *o = exp(*o - max);
                sum += *o;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(probs), Shape::from((b, kv, gt / t, t, keys))))
    }

    /// d scores = y ⊙ (g − Σ g ⊙ y), then d q = d scores · k and d k = d scoresᵀ · q;
    /// the mask is a constant.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_scores = softmax_grad(y, grad)?.reshape((q.dim(0)?, q.dim(1)?, q.dim(2)?, k.dim(2)?))?;
        let d_q = d_scores.matmul(&k.contiguous()?)?;
        let d_k = d_scores.t()?.matmul(q)?;
        Ok((Some(d_q), Some(d_k), None))
    }
}

/// d x = y ⊙ (g − Σ g ⊙ y) over the last axis, for y = softmax(x): one pass per row, where
/// the composition takes four.
pub(super) fn softmax_grad(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "train-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, grad) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        if l1.shape() != l2.shape() {
            bail!("{}: probabilities {:?} against gradient {:?}", self.name(), l1.dims(), l2.dims());
        }
        let keys = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(keys).zip(y.par_chunks(keys).zip(grad.par_chunks(keys))).for_each(|(out, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x / √(mean(x²) + eps) · alpha over the last axis, computed in at least f32.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) && alpha.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&alpha.contiguous()?, RmsNorm { eps });
    }
    let dtype = x.dtype();
    let x = super::layers::at_least_f32(x)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(alpha)
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let alpha = f32s(s2, l2, self.name())?;
        let dim = alpha.len().max(1);
        if l1.dims().last() != Some(&alpha.len()) {
            bail!("{}: input {:?} against weight of {}", self.name(), l1.dims(), alpha.len());
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(out, x)| {
            let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let r = 1.0 / (mean_sq + eps).sqrt();
            for ((o, &v), &a) in out.iter_mut().zip(x).zip(alpha) {
                *o = v * r * a;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With r = (mean(x²) + eps)^-½ and gα = g ⊙ α: dx = r·gα − x·r³·mean(gα ⊙ x),
    /// dα = Σ over rows of g ⊙ x·r.
    fn bwd(&self, x: &Tensor, alpha: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, d_alpha) = rms_norm_grads(x, alpha, grad, self.eps)?;
        Ok((Some(dx), Some(d_alpha)))
    }
}

/// The gradients of `rms_norm(x, alpha, eps)` with respect to `x` and `alpha`.
pub(super) fn rms_norm_grads(x: &Tensor, alpha: &Tensor, grad: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (x, alpha, grad) = (x.contiguous()?, alpha.contiguous()?, grad.contiguous()?);
    let gradient = |wrt_input| x.apply_op3_no_bwd(&alpha, &grad, &RmsNormGrad { eps, wrt_input });
    Ok((gradient(true)?, gradient(false)?))
}

/// Rows whose weight-gradient contributions are summed together before the partial sums
/// are added in order, so the result does not depend on how rayon splits the work.
const ROWS_PER_PARTIAL_SUM: usize = 64;

struct RmsNormGrad {
    eps: f64,
    wrt_input: bool,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "train-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, alpha, grad) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let dim = alpha.len().max(1);
        if l1.shape() != l3.shape() || l1.dims().last() != Some(&alpha.len()) {
            bail!("{}: input {:?}, weight {:?}, gradient {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        let eps = self.eps as f32;
        let inv_rms = |x: &[f32]| 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
        if self.wrt_input {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(dim).zip(x.par_chunks(dim).zip(grad.par_chunks(dim))).for_each(|(dx, (x, g))| {
                let r = inv_rms(x);
                let dot = x.iter().zip(g).zip(alpha).map(|((x, g), a)| g * a * x).sum::<f32>() / dim as f32;
                let c = r * r * r * dot;
                for (((o, &x), &g), &a) in dx.iter_mut().zip(x).zip(g).zip(alpha) {
                    *o = r * g * a - x * c;
                }
            });
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let chunk = ROWS_PER_PARTIAL_SUM * dim;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(chunk)
            .zip(grad.par_chunks(chunk))
            .map(|(x, g)| {
                let mut sum = vec![0f32; dim];
                for (x, g) in x.chunks(dim).zip(g.chunks(dim)) {
                    let r = inv_rms(x);
                    sum.iter_mut().zip(x).zip(g).for_each(|((s, x), g)| *s += g * x * r);
                }
                sum
            })
            .collect();
        let mut d_alpha = vec![0f32; dim];
        for partial in &partials {
            d_alpha.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
        }
        Ok((CpuStorage::F32(d_alpha), l2.shape().clone()))
    }
}

/// Rotary embedding (rotate-half convention) of `x (B, H, T, D)` with tables `cos`, `sin`
/// of shape `(T, D/2)`, or `(B, T, D/2)` for per-row positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(x) && cos.dtype() == DType::F32 {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope);
    }
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let (cos, sin) = if cos.rank() == 2 { (cos, sin) } else { (cos.unsqueeze(1)?, sin.unsqueeze(1)?) };
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let (cos, sin) = (f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let (b, heads, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        let per_row = l2.dims().len() == 3;
        let rows = if per_row { b * t } else { t };
        if d % 2 != 0 || cos.len() != rows * half || sin.len() != cos.len() {
            bail!("{}: tables {:?} do not fit input {:?}", self.name(), l2.dims(), l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(bh, (out, x))| {
            let batch = bh / heads;
            for pos in 0..t {
                let row = if per_row { batch * t + pos } else { pos } * half;
                let (c, s) = (&cos[row..row + half], &sin[row..row + half]);
                let (x, out) = (&x[pos * d..(pos + 1) * d], &mut out[pos * d..(pos + 1) * d]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    out[i] = x1 * c[i] - x2 * s[i];
                    out[i + half] = x2 * c[i] + x1 * s[i];
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rope_grad(grad, cos, sin)?), None, None))
    }
}

/// A rotation's gradient is the opposite rotation: rope with −sin.
pub(super) fn rope_grad(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    grad.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.neg()?.contiguous()?, &Rope)
}

/// silu(gate) ⊙ up, the gated MLP's middle, keeping only `gate` and `up` for the backward.
/// Inference keeps candle's vectorised `silu`, which is faster when no gradient is needed.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.track_op() || up.track_op() {
        return silu_mul_one_pass(gate, up);
    }
    gate.silu()? * up
}

/// `silu_mul` by the one-pass kernel wherever it runs, as the hand-written backward's
/// forward wants it (its inputs record no graph), where the plain path takes two passes.
pub(super) fn silu_mul_one_pass(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(gate) && up.dtype() == DType::F32 && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul);
    }
    gate.silu()? * up
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "train-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let out: Vec<f32> = gate.par_iter().zip(up.par_iter()).map(|(&g, &u)| g * sigmoid(g) * u).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// d up = g ⊙ silu(gate); d gate = g ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ(gate))), both from
    /// one pass that returns them stacked.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = silu_mul_grads(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// The gradients of `silu_mul(gate, up)` with respect to `gate` and `up`.
pub(super) fn silu_mul_grads(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate, up, grad) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
    let both = gate.apply_op3_no_bwd(&up, &grad, &SiluMulGrad)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "train-silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up, grad) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            bail!("{}: gate {:?}, up {:?}, gradient {:?}", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        const CHUNK: usize = 4096;
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(grad.par_chunks(CHUNK)))
            .for_each(|((d_gate, d_up), ((gate, up), grad))| {
                for i in 0..gate.len() {
                    let (x, s, g) = (gate[i], sigmoid(gate[i]), grad[i]);
                    d_gate[i] = g * up[i] * s * (1.0 + x * (1.0 - s));
                    d_up[i] = g * x * s;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// log softmax(logits)[target] per row of `logits (N, V)`, in f32, with `targets (N)`.
pub fn log_softmax_at(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, LogSoftmaxAt);
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

struct LogSoftmaxAt;

fn u32s<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else { bail!("{what}: expected u32 targets") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{what}: expected contiguous targets") };
    Ok(&data[start..end])
}

/// max + ln Σ exp(x − max) of one row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|&v| exp(v - max)).sum::<f32>().ln()
}

fn check_targets(name: &str, logits: &Layout, targets: &[u32]) -> Result<(usize, usize)> {
    let (n, vocab) = logits.shape().dims2()?;
    if targets.len() != n {
        bail!("{name}: {n} rows but {} targets", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("{name}: target {t} outside a vocabulary of {vocab}");
    }
    Ok((n, vocab.max(1)))
}

impl CustomOp2 for LogSoftmaxAt {
    fn name(&self) -> &'static str {
        "log-softmax-at"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = f32s(s1, l1, self.name())?;
        let targets = u32s(s2, l2, self.name())?;
        let (n, vocab) = check_targets(self.name(), l1, targets)?;
        let out: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// d logits = g · (onehot(target) − softmax(logits)), one pass over the logits.
    fn bwd(&self, logits: &Tensor, targets: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(log_softmax_at_grad(logits, targets, y, grad)?), None))
    }
}

/// The gradient of `value = log_softmax_at(logits, targets)` for the upstream `grad`.
pub(super) fn log_softmax_at_grad(logits: &Tensor, targets: &Tensor, value: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let grad_and_value = Tensor::stack(&[grad, value], 1)?.contiguous()?;
    logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &grad_and_value, &LogSoftmaxAtGrad)
}

struct LogSoftmaxAtGrad;

impl CustomOp3 for LogSoftmaxAtGrad {
    fn name(&self) -> &'static str {
        "log-softmax-at-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = f32s(s1, l1, self.name())?;
        let targets = u32s(s2, l2, self.name())?;
        let grad_and_value = f32s(s3, l3, self.name())?;
        let (_, vocab) = check_targets(self.name(), l1, targets)?;
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).enumerate().for_each(|(i, (out, row))| {
            let (g, value) = (grad_and_value[2 * i], grad_and_value[2 * i + 1]);
            let t = targets[i] as usize;
            // value = row[t] − lse, so the normaliser comes back without another pass.
            let lse = row[t] - value;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = -g * exp(v - lse);
            }
            out[t] += g;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Each fused op against the plain composition, in value and in gradient.
    fn agree(fused: impl Fn(&Tensor) -> Result<Tensor>, plain: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, fused(x.as_tensor()).unwrap().shape(), &Device::Cpu).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let loss = (&y * &weights).unwrap().sum_all().unwrap();
            let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            (y, grad)
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&plain);
        let gap = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap(&y1, &y2) < 1e-5, "values differ by {}", gap(&y1, &y2));
        assert!(gap(&g1, &g2) < 1e-4, "gradients differ by {}", gap(&g1, &g2));
    }

    #[test]
    fn exp_is_within_four_ulp_of_libm_and_zero_far_below() {
        for i in -86_999..88_000 {
            let x = i as f32 * 1e-3;
            let (ours, libm) = (exp(x), x.exp());
            assert!((ours - libm).abs() <= 4.0 * f32::EPSILON * libm, "e^{x}: {ours} vs {libm}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::INFINITY).is_finite());
    }

    #[test]
    fn attention_probs_match_the_composition_for_queries_and_keys() {
        // Grouped queries (B=2, KV=3, G·T=2·5, D=4) against 7 keys under a causal-style mask.
        let mut mask = vec![0f32; 2 * 5 * 7];
        for (i, m) in mask.iter_mut().enumerate() {
            if (i % 7) > (i / 7) % 5 + 2 {
                *m = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (2, 1, 5, 7), &Device::Cpu).unwrap();
        let plain = |q: &Tensor, k: &Tensor| {
            let scores = q.matmul(&k.t()?)?.reshape((2, 3, 2, 5, 7))?;
            candle_nn::ops::softmax(&scores.broadcast_add(&mask.unsqueeze(1)?)?, D::Minus1)
        };
        // Keys narrowed from a longer cache, as the query blocks of `Attention` pass them.
        let cache = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 9, 4), &Device::Cpu).unwrap()).unwrap();
        let k = cache.narrow(2, 0, 7).unwrap();
        agree(|q| attention_probs(q, &k, &mask), |q| plain(q, &k), &[2, 3, 10, 4]);
        let q = Tensor::randn(0f32, 1.0, (2, 3, 10, 4), &Device::Cpu).unwrap();
        let agree_k = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let grads = f(&cache.narrow(2, 0, 7).unwrap()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(cache.as_tensor()).unwrap().clone()
        };
        let (a, b) = (agree_k(&|k| attention_probs(&q, k, &mask)), agree_k(&|k| plain(&q, k)));
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn rms_norm_matches_the_composition_for_input_and_weight() {
        let alpha = Var::from_tensor(&Tensor::randn(0f32, 1.0, 6, &Device::Cpu).unwrap()).unwrap();
        let plain = |x: &Tensor, a: &Tensor| {
            let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(mean_sq + 1e-5)?.sqrt()?)?.broadcast_mul(a)
        };
        agree(|x| rms_norm(x, alpha.as_tensor(), 1e-5), |x| plain(x, alpha.as_tensor()), &[3, 4, 6]);
        let x = Tensor::randn(0f32, 1.0, (3, 4, 6), &Device::Cpu).unwrap();
        let g_fused = rms_norm(&x, alpha.as_tensor(), 1e-5).unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = plain(&x, alpha.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g_fused.get(alpha.as_tensor()).unwrap(), g_plain.get(alpha.as_tensor()).unwrap());
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn rope_matches_the_composition_with_shared_and_per_row_tables() {
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap();
        let plain = |x: &Tensor, c: &Tensor, s: &Tensor| {
            let x = x.to_dtype(DType::F64)?;
            rope(&x, &c.to_dtype(DType::F64)?, &s.to_dtype(DType::F64)?)?.to_dtype(DType::F32)
        };
        agree(|x| rope(x, &cos, &sin), |x| plain(x, &cos, &sin), &[2, 3, 5, 8]);
        let cos_rows = Tensor::randn(0f32, 1.0, (2, 5, 4), &Device::Cpu).unwrap();
        let sin_rows = Tensor::randn(0f32, 1.0, (2, 5, 4), &Device::Cpu).unwrap();
        agree(|x| rope(x, &cos_rows, &sin_rows), |x| plain(x, &cos_rows, &sin_rows), &[2, 3, 5, 8]);
    }

    #[test]
    fn silu_mul_matches_the_composition_for_both_inputs() {
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap()).unwrap();
        agree(|g| silu_mul(g, up.as_tensor()), |g| g.silu()? * up.as_tensor(), &[3, 8]);
        let gate = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        agree(|u| silu_mul(&gate, u), |u| gate.silu()? * u, &[3, 8]);
    }

    #[test]
    fn log_softmax_at_matches_the_composition() {
        let targets = Tensor::new(&[3u32, 0, 6, 6], &Device::Cpu).unwrap();
        let plain = |x: &Tensor| {
            let logp = candle_nn::ops::log_softmax(&x.to_dtype(DType::F64)?, D::Minus1)?;
            logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.to_dtype(DType::F32)
        };
        agree(|x| log_softmax_at(x, &targets), plain, &[4, 7]);
        let bad = Tensor::new(&[9u32, 0, 0, 0], &Device::Cpu).unwrap();
        let x = Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(log_softmax_at(&x, &bad).unwrap_err().to_string().contains("outside a vocabulary of 7"));
    }
}
