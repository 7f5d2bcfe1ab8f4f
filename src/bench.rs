//! Throughput measurements shared by `harness bench` and `cargo bench`: tokens/s and
//! achieved GFLOP/s, so optimisations are judged by numbers, not impressions.

use crate::model::{Decoder, LoadedModel, ModelConfig, Mode};
use crate::score::{self, Group, ScoreOptions};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub what: String,
    pub batch: usize,
    pub seq_len: usize,
    pub iterations: usize,
    pub seconds_per_iteration: f64,
    pub tokens_per_second: f64,
    pub gflops_per_second: f64,
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<34} {:>3}x{:<5} {:>8.3} s/iter {:>9.1} tokens/s {:>7.1} GFLOP/s",
            self.what, self.batch, self.seq_len, self.seconds_per_iteration, self.tokens_per_second, self.gflops_per_second
        )
    }
}

/// Full forward passes over `batch x seq_len` tokens, with the output projection applied
/// at every position (as a plain language-model forward does). One warm-up pass first.
pub fn forward(
    decoder: &Decoder,
    config: &ModelConfig,
    batch: usize,
    seq_len: usize,
    iterations: usize,
    device: &Device,
) -> Result<Throughput> {
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|i| ((i as u64 * 2_654_435_761) % config.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    let lengths = vec![seq_len; batch];
    let run = || -> Result<()> {
        let hidden = decoder.forward(&ids, &lengths, None, Mode::Infer)?;
        let flat = hidden.reshape((batch * seq_len, config.hidden_size))?;
        decoder.project(&flat)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    run()?;
    let start = Instant::now();
    for _ in 0..iterations {
        run()?;
    }
    let seconds = start.elapsed().as_secs_f64() / iterations as f64;
    let tokens = (batch * seq_len) as f64;
    // Causal attention: position t attends to t+1 keys, (T+1)/2 on average.
    let flops = tokens * (config.body_flops_per_token(seq_len.div_ceil(2)) + config.head_flops());
    Ok(Throughput {
        what: "forward (all positions, with LM head)".into(),
        batch,
        seq_len,
        iterations,
        seconds_per_iteration: seconds,
        tokens_per_second: tokens / seconds,
        gflops_per_second: flops / seconds / 1e9,
    })
}

/// The machine's f32 matrix-multiply rate through candle: the ceiling for the forward pass.
pub fn matmul_peak(n: usize, iterations: usize, device: &Device) -> Result<Throughput> {
    let a = Tensor::ones((n, n), DType::F32, device)?;
    let b = Tensor::ones((n, n), DType::F32, device)?;
    a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    let start = Instant::now();
    for _ in 0..iterations {
        a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    }
    let seconds = start.elapsed().as_secs_f64() / iterations as f64;
    Ok(Throughput {
        what: format!("matmul {n}x{n}x{n} f32"),
        batch: 1,
        seq_len: n,
        iterations,
        seconds_per_iteration: seconds,
        tokens_per_second: 0.0,
        gflops_per_second: 2.0 * (n as f64).powi(3) / seconds / 1e9,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ScoringThroughput {
    pub share_prefix: bool,
    pub instructions: usize,
    pub candidates: usize,
    /// Prompt + response tokens of every candidate: the work a one-pass-per-candidate
    /// scorer does, and the unit the tokens/s rate is given in.
    pub candidate_tokens: usize,
    pub response_tokens: usize,
    pub seconds: f64,
    pub candidates_per_second: f64,
    pub tokens_per_second: f64,
    /// Useful FLOPs per second: every candidate token through the body, the head at
    /// response positions only. Shared prompts are counted per candidate, as a plain
    /// scorer would compute them, so sharing shows up as a higher rate.
    pub gflops_per_second: f64,
    pub peak_memory_mib: Option<f64>,
}

impl std::fmt::Display for ScoringThroughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scoring, prefix sharing {:<3} {:>4} instructions {:>5} candidates {:>8} tokens {:>7.1} s {:>6.2} cand/s {:>7.1} tokens/s {:>6.1} GFLOP/s  peak {} MiB",
            if self.share_prefix { "on" } else { "off" },
            self.instructions,
            self.candidates,
            self.candidate_tokens,
            self.seconds,
            self.candidates_per_second,
            self.tokens_per_second,
            self.gflops_per_second,
            self.peak_memory_mib.map_or("?".to_string(), |m| format!("{m:.0}")),
        )
    }
}

/// Times `score::score` over `groups`.
pub fn scoring(model: &LoadedModel, groups: &[Group], options: &ScoreOptions) -> Result<ScoringThroughput> {
    let start = Instant::now();
    let scores = score::score(model, groups, options)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut candidate_tokens = 0;
    let mut response_tokens = 0;
    let mut flops = 0.0;
    let cfg = &model.config;
    for (group, group_scores) in groups.iter().zip(&scores) {
        for (response, s) in group.responses.iter().zip(group_scores) {
            let Some(s) = s else { continue };
            let pair = model.template.render_pair(&group.prompt, response)?;
            let tokens = model.tokenizer.encode(&pair.text)?.get_ids().len().min(options.max_len);
            candidate_tokens += tokens;
            response_tokens += s.n_tokens;
            flops += tokens as f64 * cfg.body_flops_per_token(tokens.div_ceil(2)) + s.n_tokens as f64 * cfg.head_flops();
        }
    }
    let candidates: usize = scores.iter().map(|g| g.iter().flatten().count()).sum();
    Ok(ScoringThroughput {
        share_prefix: options.share_prefix,
        instructions: groups.len(),
        candidates,
        candidate_tokens,
        response_tokens,
        seconds,
        candidates_per_second: candidates as f64 / seconds,
        tokens_per_second: candidate_tokens as f64 / seconds,
        gflops_per_second: flops / seconds / 1e9,
        peak_memory_mib: peak_memory_mib(),
    })
}

/// The process's peak resident memory (Linux `VmHWM`), in MiB.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingThroughput {
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    /// "by hand" (`model/backward.rs`) or "autograd" (candle's).
    pub backward: &'static str,
    pub seconds_per_step: f64,
    /// Of `seconds_per_step`, the AdamW update (gradient norm, clipping, moments, weights).
    pub optimizer_seconds_per_step: f64,
    pub tokens_per_second: f64,
    /// Forward plus backward (counted as twice the forward), head at every trained position.
    pub gflops_per_second: f64,
    pub peak_memory_mib: Option<f64>,
}

impl std::fmt::Display for TrainingThroughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training step (AdamW, f32, backward {}) {:>3}x{:<5} {:>8.3} s/step (AdamW {:.3} s) {:>7.1} tokens/s {:>6.1} GFLOP/s  peak {} MiB",
            self.backward,
            self.batch,
            self.seq_len,
            self.seconds_per_step,
            self.optimizer_seconds_per_step,
            self.tokens_per_second,
            self.gflops_per_second,
            self.peak_memory_mib.map_or("?".to_string(), |m| format!("{m:.0}")),
        )
    }
}

/// Full fine-tuning steps (forward, backward, AdamW) on `batch` synthetic sequences of
/// `seq_len` tokens whose first eighth is prompt (no loss), as in the transformers
/// reference `benches/reference/hf_train.py`. One warm-up step first.
pub fn training(
    model: &LoadedModel,
    vars: &candle_nn::VarMap,
    batch: usize,
    seq_len: usize,
    steps: usize,
) -> Result<TrainingThroughput> {
    use crate::train::{loss_and_grads, optim, sorted_vars};
    let vocab = model.config.vocab_size as u64;
    let prompt_len = (seq_len / 8).max(1);
    let examples: Vec<crate::model::EncodedPair> = (0..batch)
        .map(|b| crate::model::EncodedPair {
            ids: (0..seq_len).map(|i| (((b * seq_len + i) as u64 * 2_654_435_761) % vocab) as u32).collect(),
            response_mask: (0..seq_len).map(|i| i >= prompt_len).collect(),
            first_response: prompt_len,
        })
        .collect();
    let micro_batch = vec![examples.iter().collect::<Vec<_>>()];
    let named = sorted_vars(vars);
    let mut optimizer = optim::AdamW::new(named.iter().cloned().collect(), optim::AdamWConfig::default())?;
    let mut step = || -> Result<f64> {
        let (_, grads, _, _) = loss_and_grads(model, &named, &micro_batch)?;
        let update = Instant::now();
        optimizer.step(&grads, 1e-5, Some(1.0))?;
        Ok(update.elapsed().as_secs_f64())
    };
    step()?;
    let start = Instant::now();
    let mut optimizer_seconds = 0.0;
    for _ in 0..steps {
        optimizer_seconds += step()?;
    }
    let seconds = start.elapsed().as_secs_f64() / steps as f64;
    let tokens = (batch * seq_len) as f64;
    let cfg = &model.config;
    let targets = (batch * seq_len.saturating_sub(prompt_len)) as f64;
    let flops = 3.0 * (tokens * cfg.body_flops_per_token(seq_len.div_ceil(2)) + targets * cfg.head_flops());
    Ok(TrainingThroughput {
        batch,
        seq_len,
        steps,
        backward: if model.decoder()?.backward_by_hand() { "by hand" } else { "autograd" },
        seconds_per_step: seconds,
        optimizer_seconds_per_step: optimizer_seconds / steps as f64,
        tokens_per_second: tokens / seconds,
        gflops_per_second: flops / seconds / 1e9,
        peak_memory_mib: peak_memory_mib(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationThroughput {
    pub batch: usize,
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// Generated tokens per second of wall time (prefill included).
    pub tokens_per_second: f64,
    /// Prefill and every decoding step: body at the context it saw, head at one position.
    pub gflops_per_second: f64,
}

impl std::fmt::Display for GenerationThroughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation batch {:>3}: {} prompts ({} tokens) -> {} new tokens in {:.1} s  {:>7.1} tokens/s {:>6.1} GFLOP/s",
            self.batch, self.prompts, self.prompt_tokens, self.new_tokens, self.seconds, self.tokens_per_second, self.gflops_per_second
        )
    }
}

/// Greedy generation of up to `max_new_tokens` for each prompt, `batch` prompts at a time.
pub fn generation(model: &LoadedModel, prompts: &[Vec<u32>], batch: usize, max_new_tokens: usize) -> Result<GenerationThroughput> {
    let options = crate::generate::GenerateOptions { max_new_tokens, batch_size: batch, ..Default::default() };
    let start = Instant::now();
    let generations = crate::generate::generate(model, prompts, &options, |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    let cfg = &model.config;
    let mut flops = 0.0;
    for (prompt, g) in prompts.iter().zip(&generations) {
        flops += prompt.len() as f64 * cfg.body_flops_per_token(prompt.len().div_ceil(2)) + cfg.head_flops();
        flops += (0..g.new_tokens).map(|i| cfg.body_flops_per_token(prompt.len() + i) + cfg.head_flops()).sum::<f64>();
    }
    let new_tokens = generations.iter().map(|g| g.new_tokens).sum();
    Ok(GenerationThroughput {
        batch,
        prompts: prompts.len(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        new_tokens,
        seconds,
        tokens_per_second: new_tokens as f64 / seconds,
        gflops_per_second: flops / seconds / 1e9,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusteringThroughput {
    pub rows: usize,
    pub dims: usize,
    pub k: usize,
    pub iterations: usize,
    pub seconds: f64,
    pub peak_memory_mib: Option<f64>,
}

impl std::fmt::Display for ClusteringThroughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "k-means (S2L) {} x {} into {} clusters, {} iterations: {:.1} s  peak {} MiB",
            self.rows,
            self.dims,
            self.k,
            self.iterations,
            self.seconds,
            self.peak_memory_mib.map_or("?".to_string(), |m| format!("{m:.0}")),
        )
    }
}

/// S2L's clustering step alone: `rows` synthetic loss trajectories of `dims` snapshots, each
/// a falling curve of one of `k` seeded shapes plus noise, clustered as the selector does.
pub fn kmeans(rows: usize, dims: usize, k: usize, iterations: usize, seed: u64) -> Result<ClusteringThroughput> {
    let mut rng = crate::util::Rng::new(seed);
    let shapes: Vec<(f64, f64)> = (0..k).map(|_| (1.0 + 3.0 * rng.uniform(), 0.05 + 0.5 * rng.uniform())).collect();
    let mut features = Vec::with_capacity(rows * dims);
    for _ in 0..rows {
        let (start, decay) = shapes[rng.below(k)];
        features.extend((0..dims).map(|t| start * (-decay * t as f64).exp() + 0.05 * (rng.uniform() - 0.5)));
    }
    let started = Instant::now();
    let settings = crate::select::s2l::Kmeans { k, iterations, restarts: 1 };
    crate::select::s2l::kmeans(&features, dims, settings, seed)?;
    Ok(ClusteringThroughput {
        rows,
        dims,
        k,
        iterations,
        seconds: started.elapsed().as_secs_f64(),
        peak_memory_mib: peak_memory_mib(),
    })
}
