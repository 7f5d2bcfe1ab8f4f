//! Differentiable kernels for training: attention probabilities, RMS norm, rotary
//! embedding and log-softmax-at-target. candle's fused versions record no backward pass and
//! the compositions of plain ops that do keep three or four full-size intermediates alive for
//! the backward pass; these run in one pass on the CPU, keep only what their gradient
//! formula needs, and fall back to the plain compositions on other devices and dtypes.
//!
//! Gradients that a kernel can write over a buffer nobody reads again (the softmax's, the
//! log-softmax's, the gated MLP's) are written in place: a fresh buffer costs a zero-fill
//! and, above glibc's mmap threshold, a page fault per 4 KiB.

use super::simd::{self, exp, multiversion, sigmoid};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::cell::Cell;

pub(crate) fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    Ok(&f32s_any(storage, what)?[contiguous_range(layout, what)?])
}

/// The elements of its storage that a contiguous layout covers.
fn contiguous_range(layout: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{what}: expected a contiguous tensor") };
    Ok(start..end)
}

/// Every element of an f32 storage, whatever the layout reads of it.
fn f32s_any<'a>(storage: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{what}: expected f32") };
    Ok(data)
}

/// `f` on the elements of `t`, a contiguous f32 tensor in CPU memory.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { bail!("expected a tensor in CPU memory") };
    Ok(f(f32s(cpu, layout, "kernel input")?))
}

/// `f` on the elements of `t`, a contiguous f32 tensor in CPU memory, in place: every
/// tensor that shares `t`'s storage sees what `f` writes.
pub(crate) fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    struct Apply<F, R> {
        f: Cell<Option<F>>,
        out: Cell<Option<R>>,
    }
    impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for Apply<F, R> {
        fn name(&self) -> &'static str {
            "in-place-f32"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let CpuStorage::F32(data) = storage else { bail!("{}: expected f32", self.name()) };
            let range = contiguous_range(layout, self.name())?;
            if let Some(f) = self.f.take() {
                self.out.set(Some(f(&mut data[range])));
            }
            Ok(())
        }
    }
    let apply = Apply { f: Cell::new(Some(f)), out: Cell::new(None) };
    t.inplace_op1(&apply)?;
    match apply.out.into_inner() {
        Some(out) => Ok(out),
        None => bail!("in-place-f32: the tensor is not in CPU memory"),
    }
}

/// One matmul operand: a `(rows, cols)` matrix per batch at `batch_stride`, read with
/// the given strides from `data`, whose bounds were checked against the layout.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    batch_stride: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// `data` read through `layout` as `(batch.., rows, cols)`; `None` where the batch axes
    /// do not collapse into one stride or the layout reaches outside `data`.
    fn new(data: &'a [f32], layout: &Layout) -> Option<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let rank = dims.len();
        if rank < 2 {
            return None;
        }
        for axis in 0..rank.saturating_sub(3) {
            if dims[axis] > 1 && strides[axis] != strides[axis + 1] * dims[axis + 1] {
                return None;
            }
        }
        let last = dims.iter().zip(strides).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>();
        let start = layout.start_offset();
        if dims.contains(&0) || start + last >= data.len() {
            return None;
        }
        Some(Self {
            data: &data[start..=start + last],
            batch_stride: if rank > 2 { strides[rank - 3] } else { 0 },
            row_stride: strides[rank - 2],
            col_stride: strides[rank - 1],
        })
    }
}

/// Rows or columns per task of a split product: several tasks per thread, so a thread the
/// machine slows down does not hold the other one up.
const TASKS_PER_THREAD: usize = 4;

/// `batch` products `(m, k) · (k, n)` into a fresh row-major buffer. gemm's own threading
/// reaches 70-80 GFLOP/s on two cores for these shapes; a single-threaded gemm per task of
/// rows (or columns, or batches) reaches 90-110, about what MKL reaches.
fn gemm_batched(batch: usize, (m, n, k): (usize, usize, usize), a: Operand, b: Operand) -> Vec<f32> {
    let total = batch * m * n;
    if k == 0 {
        return vec![0.0; total];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(total);
    let threads = rayon::current_num_threads().max(1);
    // (batch, first row, rows, first column, columns) per task.
    let tasks: Vec<(usize, usize, usize, usize, usize)> = if batch >= threads {
        (0..batch).map(|i| (i, 0, m, 0, n)).collect()
    } else {
        let (along, by_rows) = if m >= n { (m, true) } else { (n, false) };
        let step = along.div_ceil(threads * TASKS_PER_THREAD).next_multiple_of(16).max(64);
        (0..batch)
            .flat_map(|i| {
                (0..along).step_by(step).map(move |s| {
                    let len = step.min(along - s);
                    if by_rows { (i, s, len, 0, n) } else { (i, 0, m, s, len) }
                })
            })
            .collect()
    };
    let dst_ptr = dst.as_mut_ptr() as usize;
    tasks.par_iter().for_each(|&(i, row, rows, col, cols)| {
        // SAFETY: `Operand::new` checked that every (batch, row, column) a layout of these
        // dims addresses lies inside its slice; the tasks write disjoint blocks of `dst`,
        // whose capacity is batch·m·n.
        unsafe {
            let dst = (dst_ptr as *mut f32).add(i * m * n + row * n + col);
            let lhs = a.data.as_ptr().add(i * a.batch_stride + row * a.row_stride);
            let rhs = b.data.as_ptr().add(i * b.batch_stride + col * b.col_stride);
            gemm::gemm(
                rows,
                cols,
                k,
                dst,
                1,
                n as isize,
                false,
                lhs,
                a.col_stride as isize,
                a.row_stride as isize,
                rhs,
                b.col_stride as isize,
                b.row_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    // SAFETY: with read_dst off and k > 0, gemm wrote every element of every task's block,
    // and the blocks tile the whole buffer.
    unsafe { dst.set_len(total) };
    dst
}

/// `a · b` as candle's `matmul` computes it (batch axes equal on both sides), by
/// `gemm_batched` for f32 tensors in CPU memory outside any autograd graph, and by candle
/// (recording the graph) elsewhere.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a_dims, b_dims) = (a.dims(), b.dims());
    let rank = a_dims.len();
    let fits = fused(a)
        && fused(b)
        && !a.track_op()
        && !b.track_op()
        && rank >= 2
        && b_dims.len() == rank
        && a_dims[..rank - 2] == b_dims[..rank - 2]
        && a_dims[rank - 1] == b_dims[rank - 2];
    if !fits {
        return candle_matmul(a, b);
    }
    let (m, k, n) = (a_dims[rank - 2], a_dims[rank - 1], b_dims[rank - 1]);
    let batch: usize = a_dims[..rank - 2].iter().product();
    let mut dims = a_dims[..rank - 2].to_vec();
    dims.extend([m, n]);
    let product = |a: &Tensor, b: &Tensor| -> Option<Vec<f32>> {
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(a_data)), candle_core::Storage::Cpu(CpuStorage::F32(b_data))) =
            (&*a_storage, &*b_storage)
        else {
            return None;
        };
        Some(gemm_batched(batch, (m, n, k), Operand::new(a_data, a_layout)?, Operand::new(b_data, b_layout)?))
    };
    // Layouts whose batch axes do not collapse are copied first; empty ones go to candle.
    let result = match product(a, b) {
        Some(result) => result,
        None => match product(&a.contiguous()?, &b.contiguous()?) {
            Some(result) => result,
            None => return candle_matmul(a, b),
        },
    };
    Tensor::from_vec(result, dims, a.device())
}

/// candle's matmul, on contiguous copies where it refuses the views (batch axes that do not
/// collapse into one stride).
fn candle_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(b).or_else(|_| a.contiguous()?.matmul(&b.contiguous()?))
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

multiversion! {
    /// softmax(row + mask), in place.
    fn masked_softmax(row: &mut [f32], mask: &[f32]) {
        row.iter_mut().zip(mask).for_each(|(o, &m)| *o += m);
        let max = simd::max(row);
        row.iter_mut().for_each(|o| *o = exp(*o - max));
        let inv = 1.0 / simd::sum(row, |p| p);
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

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
        let mask = f32s(s3, l3, self.name())?;
        let (b, kv, gt, d, keys, t) = match (l1.dims(), l2.dims(), l3.dims()) {
            (&[b, kv, gt, d], &[b2, kv2, s, d2], &[b3, 1, t, s3])
                if (b, kv, d, s) == (b2, kv2, d2, s3) && b3 == b && t > 0 && gt % t == 0 =>
            {
                (b, kv, gt, d, s, t)
            }
            (q, k, m) => bail!("{}: queries {q:?}, keys {k:?} and mask {m:?} do not fit", self.name()),
        };
        let (Some(q), Some(k)) = (Operand::new(f32s_any(s1, self.name())?, l1), Operand::new(f32s_any(s2, self.name())?, &l2.transpose(2, 3)?))
        else {
            bail!("{}: queries {:?} or keys {:?} laid out out of reach", self.name(), l1.stride(), l2.stride())
        };
        let mut probs = gemm_batched(b * kv, (gt, keys, d), q, k);
        let rows_per_batch = kv * gt;
        probs.par_chunks_mut(keys.max(1)).enumerate().for_each(|(r, row)| {
            let mask_row = (r / rows_per_batch) * t + r % t;
            masked_softmax(row, &mask[mask_row * keys..(mask_row + 1) * keys]);
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
        // Autograd may still hold `grad`, so the in-place kernel gets a copy.
        let d_scores = softmax_grad(y, grad.copy()?)?.reshape((q.dim(0)?, q.dim(1)?, q.dim(2)?, k.dim(2)?))?;
        let d_q = d_scores.matmul(&k.contiguous()?)?;
        let d_k = d_scores.t()?.matmul(q)?;
        Ok((Some(d_q), Some(d_k), None))
    }
}

multiversion! {
    /// g ← y ⊙ (g − Σ g ⊙ y).
    fn softmax_grad_row(g: &mut [f32], y: &[f32]) {
        let dot = simd::sum2(y, g, |y, g| y * g);
        g.iter_mut().zip(y).for_each(|(g, &y)| *g = y * (*g - dot));
    }
}

/// d x = y ⊙ (g − Σ g ⊙ y) over the last axis, for y = softmax(x), in one pass per row
/// where the composition takes four. Written over `grad`, which nothing may read afterwards.
pub(super) fn softmax_grad(y: &Tensor, grad: Tensor) -> Result<Tensor> {
    let (y, grad) = (y.contiguous()?, grad.contiguous()?);
    if y.shape() != grad.shape() {
        bail!("softmax gradient: probabilities {:?} against gradient {:?}", y.dims(), grad.dims());
    }
    let keys = y.dim(D::Minus1)?.max(1);
    with_f32(&y, |y| {
        with_f32_mut(&grad, |g| {
            g.par_chunks_mut(keys).zip(y.par_chunks(keys)).for_each(|(g, y)| softmax_grad_row(g, y))
        })
    })??;
    Ok(grad)
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

/// (mean(x²) + eps)^-½ of one row.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (simd::sum(x, |v| v * v) / x.len().max(1) as f32 + eps).sqrt()
}

multiversion! {
    fn rms_norm_row(out: &mut [f32], x: &[f32], alpha: &[f32], eps: f32) {
        let r = inv_rms(x, eps);
        out.iter_mut().zip(x).zip(alpha).for_each(|((o, &v), &a)| *o = v * r * a);
    }
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
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(out, x)| rms_norm_row(out, x, alpha, eps));
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

multiversion! {
    fn rms_norm_input_grad_row(dx: &mut [f32], x: &[f32], g: &[f32], alpha: &[f32], eps: f32) {
        let r = inv_rms(x, eps);
        // dx holds g ⊙ α until the last line.
        dx.iter_mut().zip(g).zip(alpha).for_each(|((o, &g), &a)| *o = g * a);
        let c = r * r * r * simd::sum2(x, dx, |x, ga| x * ga) / x.len().max(1) as f32;
        dx.iter_mut().zip(x).for_each(|(o, &x)| *o = r * *o - x * c);
    }
}

multiversion! {
    /// sum += g ⊙ x·r over the rows of one partial sum.
    fn rms_norm_weight_grad_rows(sum: &mut [f32], x: &[f32], g: &[f32], eps: f32) {
        let dim = sum.len().max(1);
        for (x, g) in x.chunks(dim).zip(g.chunks(dim)) {
            let r = inv_rms(x, eps);
            sum.iter_mut().zip(x).zip(g).for_each(|((s, x), g)| *s += g * x * r);
        }
    }
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
        if self.wrt_input {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(dim)
                .zip(x.par_chunks(dim).zip(grad.par_chunks(dim)))
                .for_each(|(dx, (x, g))| rms_norm_input_grad_row(dx, x, g, alpha, eps));
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let chunk = ROWS_PER_PARTIAL_SUM * dim;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(chunk)
            .zip(grad.par_chunks(chunk))
            .map(|(x, g)| {
                let mut sum = vec![0f32; dim];
                rms_norm_weight_grad_rows(&mut sum, x, g, eps);
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

multiversion! {
    /// One head's positions (`d` values each), position i against row i of the tables.
    fn rope_head(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], d: usize) {
        let half = d / 2;
        for ((out, x), (c, s)) in out.chunks_mut(d).zip(x.chunks(d)).zip(cos.chunks(half).zip(sin.chunks(half))) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half.min(c.len()).min(s.len()) {
                o1[i] = x1[i] * c[i] - x2[i] * s[i];
                o2[i] = x2[i] * c[i] + x1[i] * s[i];
            }
        }
    }
}

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
            let first_row = if per_row { (bh / heads) * t } else { 0 };
            rope_head(out, x, &cos[first_row * half..], &sin[first_row * half..], d);
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
    if (gate.track_op() || up.track_op()) && fused(gate) && up.dtype() == DType::F32 && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul);
    }
    gate.silu()? * up
}

multiversion! {
    fn silu_mul_slice(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// gate ← d gate = g ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ(gate))) and up ← d up = g ⊙ silu(gate).
    fn silu_mul_grad_slice(gate: &mut [f32], up: &mut [f32], g: &[f32]) {
        for ((x, u), &g) in gate.iter_mut().zip(up.iter_mut()).zip(g) {
            let (xv, uv, s) = (*x, *u, sigmoid(*x));
            *x = g * uv * s * (1.0 + xv * (1.0 - s));
            *u = g * xv * s;
        }
    }
}

/// Elements per rayon task in the element-wise kernels.
const ELEMENTS_PER_TASK: usize = 1 << 14;

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "train-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(gate.par_chunks(ELEMENTS_PER_TASK).zip(up.par_chunks(ELEMENTS_PER_TASK)))
            .for_each(|(out, (gate, up))| silu_mul_slice(out, gate, up));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// Both gradients from one pass over gate and up laid side by side, as the hand-written
    /// backward keeps them.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = gate.dim(D::Minus1)?;
        let both = silu_mul_grads(Tensor::cat(&[gate, up], D::Minus1)?, grad)?;
        Ok((Some(both.narrow(D::Minus1, 0, width)?), Some(both.narrow(D::Minus1, width, width)?)))
    }
}

/// silu(gate) ⊙ up for rows `[gate | up]` of `(.., 2·I)`, as one projection gives them;
/// records no graph.
pub(super) fn silu_mul_halves(gate_up: &Tensor) -> Result<Tensor> {
    let gate_up = gate_up.contiguous()?;
    let width = gate_up.dim(D::Minus1)? / 2;
    let mut dims = gate_up.dims().to_vec();
    dims.pop();
    dims.push(width);
    let product = with_f32(&gate_up, |gu| {
        let mut out = vec![0f32; gu.len() / 2];
        out.par_chunks_mut(width.max(1)).zip(gu.par_chunks(2 * width.max(1))).for_each(|(out, row)| {
            let (gate, up) = row.split_at(width);
            silu_mul_slice(out, gate, up)
        });
        out
    })?;
    Tensor::from_vec(product, dims, gate_up.device())
}

/// The gradient of `silu_mul_halves(gate_up)` for upstream `grad`, written over `gate_up`
/// (which nothing may read afterwards): rows `[d gate | d up]`.
pub(super) fn silu_mul_grads(gate_up: Tensor, grad: &Tensor) -> Result<Tensor> {
    let (gate_up, grad) = (gate_up.contiguous()?, grad.contiguous()?);
    let width = grad.dim(D::Minus1)?.max(1);
    if gate_up.elem_count() != 2 * grad.elem_count() || gate_up.dim(D::Minus1)? != 2 * width {
        bail!("silu-mul gradient: gate and up {:?} against gradient {:?}", gate_up.dims(), grad.dims());
    }
    with_f32(&grad, |grad| {
        with_f32_mut(&gate_up, |gu| {
            gu.par_chunks_mut(2 * width).zip(grad.par_chunks(width)).for_each(|(row, g)| {
                let (gate, up) = row.split_at_mut(width);
                silu_mul_grad_slice(gate, up, g)
            })
        })
    })??;
    Ok(gate_up)
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

multiversion! {
    /// max + ln Σ exp(x − max) of one row.
    fn log_sum_exp(row: &[f32]) -> f32 {
        let max = simd::max(row);
        max + simd::sum(row, |v| exp(v - max)).ln()
    }
}

fn check_targets(name: &str, dims: &[usize], targets: &[u32]) -> Result<(usize, usize)> {
    let &[n, vocab] = dims else { bail!("{name}: expected logits (N, V), got {dims:?}") };
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
        let (n, vocab) = check_targets(self.name(), l1.dims(), targets)?;
        let out: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// d logits = g · (onehot(target) − softmax(logits)), one pass over the logits.
    fn bwd(&self, logits: &Tensor, targets: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(log_softmax_at_grad(logits.copy()?, targets, y, grad)?), None))
    }
}

multiversion! {
    /// row ← g · (onehot(t) − softmax(row)), where value = log softmax(row)[t].
    fn log_softmax_at_grad_row(row: &mut [f32], t: usize, g: f32, value: f32) {
        // value = row[t] − lse, so the normaliser comes back without another pass.
        let lse = row[t] - value;
        row.iter_mut().for_each(|o| *o = -g * exp(*o - lse));
        row[t] += g;
    }
}

/// The gradient of `value = log_softmax_at(logits, targets)` for the upstream `grad`,
/// written over `logits`, which nothing may read afterwards.
pub(super) fn log_softmax_at_grad(logits: Tensor, targets: &Tensor, value: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.to_vec1::<u32>()?;
    let (n, vocab) = check_targets("log-softmax-at-grad", logits.dims(), &targets)?;
    let (grad, value) = (grad.to_vec1::<f32>()?, value.to_vec1::<f32>()?);
    if grad.len() != n || value.len() != n {
        bail!("log-softmax-at-grad: {n} rows against {} gradients and {} values", grad.len(), value.len());
    }
    with_f32_mut(&logits, |logits| {
        logits.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
            log_softmax_at_grad_row(row, targets[i] as usize, grad[i], value[i])
        })
    })?;
    Ok(logits)
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
    fn matmul_matches_candle_for_views_batches_and_splits() {
        let d = Device::Cpu;
        let check = |a: &Tensor, b: &Tensor| {
            // candle itself refuses some of these views; its answer on copies is the reference.
            let theirs = a.contiguous().unwrap().matmul(&b.contiguous().unwrap()).unwrap();
            let ours = matmul(a, b).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let gap = (ours - theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(gap.to_scalar::<f32>().unwrap() < 1e-3, "{gap}");
        };
        // Tall enough for tasks of rows, and transposed into one wide enough for columns.
        let a = Tensor::randn(0f32, 1.0, (300, 40), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (40, 70), &d).unwrap();
        check(&a, &b);
        check(&b.t().unwrap(), &a.t().unwrap());
        // Batched, against keys narrowed from a longer cache.
        let q = Tensor::randn(0f32, 1.0, (2, 3, 10, 8), &d).unwrap();
        let cache = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &d).unwrap();
        check(&q, &cache.narrow(2, 0, 7).unwrap().t().unwrap());
        // Batch axes that do not collapse into one stride (which candle rejects) are copied first.
        let x = Tensor::randn(0f32, 1.0, (3, 2, 5, 4), &d).unwrap().transpose(0, 1).unwrap();
        check(&x, &Tensor::randn(0f32, 1.0, (2, 3, 4, 6), &d).unwrap());
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
