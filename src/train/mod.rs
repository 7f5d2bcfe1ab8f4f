//! Supervised fine-tuning: cross-entropy on response tokens only, AdamW with state we own,
//! learning-rate schedules, checkpoints that resume exactly, and export to the Hugging Face
//! layout.
//!
//! With gradient accumulation the loss of a step is the mean over every response token of
//! all its micro-batches (each micro-batch's sum is divided by the step's token count), not
//! a mean of per-micro-batch means, so how a step is cut into micro-batches changes nothing.

pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod export;
pub mod optim;
pub mod plan;

use crate::model::{EncodedPair, LoadedModel, TrainingBatch};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use checkpoint::TrainState;
pub use engine::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use optim::{AdamW, AdamWConfig, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Peak learning rate (the paper: 1e-5).
    pub lr: f64,
    /// Passes over the data (the paper: 1).
    pub epochs: usize,
    /// Stop after this many optimiser steps (short runs); the schedule spans them.
    pub max_steps: Option<usize>,
    /// Rows × padded length of one micro-batch.
    pub micro_batch_tokens: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub schedule: Schedule,
    /// Share of the steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// Largest global gradient norm; `None` leaves gradients as they are.
    pub clip_grad_norm: Option<f64>,
    pub max_len: usize,
    pub seed: u64,
    /// Save a checkpoint every this many steps (and always at the end).
    pub save_every: Option<usize>,
    pub keep_checkpoints: usize,
    /// Save the weights alone every this many steps and at the end, all kept.
    pub snapshot_every: Option<usize>,
    /// `native` (this crate's trainer) or `trl` (engines/sft.py through accelerate; see
    /// [`engine`]). Left out of stage keys when native, so earlier runs keep theirs.
    #[serde(skip_serializing_if = "Engine::is_native")]
    pub engine: Engine,
    /// The trl engine's accelerate config: `cpu`, `zero3`, `fsdp` (files in engines/accelerate/)
    /// or a path [default: cpu].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accelerate: Option<String>,
    /// Processes the trl engine runs: GPUs, or CPU processes [default: 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<usize>,
    /// A command line that starts the trl engine instead of a one-node `accelerate launch`,
    /// run by `sh`; `{python}`, `{accelerate}`, `{processes}`, `{port}`, `{script}` and
    /// `{engine_dir}` are filled in. engines/slurm-multinode.sh is the one for several nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch: Option<String>,
}

impl TrainConfig {
    /// How the harness loads the model it trains: as `base` says for our trainer; on the CPU
    /// for the trl engine, which trains its own copy (the harness's only encodes and checks).
    pub fn load_options(&self, base: &crate::model::LoadOptions) -> crate::model::LoadOptions {
        match self.engine {
            Engine::Native => base.clone(),
            Engine::Trl => crate::model::LoadOptions { device: Device::Cpu, ..base.clone() },
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            epochs: 1,
            max_steps: None,
            micro_batch_tokens: 4096,
            grad_accum: 1,
            // open-instruct's defaults, which the paper's training follows.
            schedule: Schedule::Linear,
            warmup_ratio: 0.03,
            adamw: AdamWConfig::default(),
            clip_grad_norm: Some(1.0),
            max_len: 2048,
            seed: 0,
            save_every: None,
            keep_checkpoints: 2,
            snapshot_every: None,
            engine: Engine::Native,
            accelerate: None,
            processes: None,
            launch: None,
        }
    }
}

/// One optimiser step, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// NaN (`null` in the log) where an engine does not report it.
    #[serde(deserialize_with = "crate::util::nan_if_null")]
    pub grad_norm: f64,
    /// Response tokens the loss averaged over.
    pub response_tokens: usize,
    /// All tokens the step ran forward and backward.
    pub tokens: usize,
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    /// ‖θ − θ₀‖₂ over every weight (the paper's Appendix A, Table 7).
    pub weight_l2_distance: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Examples cut to the maximum length, and examples left out because their prompt alone
    /// filled it.
    pub truncated_examples: usize,
    pub skipped_examples: usize,
}

/// What `train` fine-tunes: a model loaded with [`crate::model::load_trainable`].
pub struct Trainable<'a> {
    pub model: &'a LoadedModel,
    pub vars: &'a VarMap,
    /// The model's fingerprint before training; checkpoints record it.
    pub base_fingerprint: String,
}

/// Where a fine-tuning run's examples come from.
pub enum Examples<'a> {
    /// An SFT file of `messages` rows, as `harness select` writes it.
    File(&'a Path),
    /// (what to call the pair in an error, prompt, response).
    Pairs(Vec<(String, &'a str, &'a str)>),
}

/// A model loaded for training with its examples encoded as the scorer encodes them: the one
/// load → encode → train path that the train stage, `harness train` and S2L's reference share.
pub struct Prepared {
    pub model: LoadedModel,
    pub vars: VarMap,
    pub data: data::SftData,
}

impl Prepared {
    pub fn load(model: &str, options: &crate::model::LoadOptions, examples: Examples, max_len: usize) -> Result<Self> {
        let (model, vars) = crate::model::load_trainable(model, options)?;
        let data = match examples {
            Examples::File(path) => data::read(path, &model, max_len)?,
            Examples::Pairs(pairs) => {
                let mut data = data::SftData::default();
                for (name, prompt, response) in pairs {
                    data.push(&model, prompt, response, max_len).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
                }
                data
            }
        };
        Ok(Prepared { model, vars, data })
    }

    /// Fine-tunes into `out` with the engine `config` names (see [`train`], [`engine::train`]).
    pub fn train(&self, config: &TrainConfig, out: &Path, resume: bool, progress: bool) -> Result<TrainReport> {
        let tokens = self.data.examples.iter().map(|e| e.ids.len()).sum::<usize>() as f64;
        let memory = plan::plan(&self.model.config, config, tokens, self.model.device.is_cuda());
        if !memory.fits() {
            return Err(Error::Invalid(format!(
                "training into {} refused: {memory} (training.engine: trl with accelerate zero3 or fsdp splits the state over GPUs)",
                out.display()
            )));
        }
        match config.engine {
            Engine::Native => {
                let target = Trainable { model: &self.model, vars: &self.vars, base_fingerprint: self.model.fingerprint()? };
                train(&target, &self.data, config, out, resume, progress)
            }
            Engine::Trl => engine::train(self, config, out, progress),
        }
    }
}

/// Fine-tunes on `data`, writing logs, checkpoints, the loss curve and the exported model
/// under `out`. With `resume`, continues from the newest checkpoint there.
pub fn train(
    target: &Trainable,
    data: &data::SftData,
    config: &TrainConfig,
    out: &Path,
    resume: bool,
    progress: bool,
) -> Result<TrainReport> {
    validate(config)?;
    let model = target.model;
    let device = model.device.clone();
    let vars: Vec<(String, Var)> = sorted_vars(target.vars);
    let base: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    let mut optimizer = AdamW::new(vars.iter().cloned().collect(), config.adamw)?;

    let order = batch_order(&data.examples, config);
    let total_steps = order.steps.len();
    let warmup = order.warmup;

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut start_step = 0;
    let mut history: Vec<StepLog> = Vec::new();
    if resume {
        if let Some(ck) = checkpoint::latest(out, &target.base_fingerprint, &device)? {
            for (name, var) in &vars {
                let saved = checkpoint::saved_like(&ck.weights, name, var.as_tensor(), "weights")?;
                var.set(&saved.to_dtype(var.dtype())?)?;
            }
            optimizer.restore(&ck.optimizer, ck.state.step)?;
            start_step = ck.state.step;
            history = read_log(out)?.into_iter().filter(|l| l.step <= start_step).collect();
            tracing::info!("resuming at step {start_step} of {total_steps}");
        }
    }
    let resumed_from = (start_step > 0).then_some(start_step);
    write_log(out, &history)?;

    let bar = progress_bar(progress, total_steps as u64);
    bar.set_position(start_step as u64);
    let started = Instant::now();
    let mut tokens_done = 0usize;
    for step in start_step..total_steps {
        let (epoch, step_batches) = &order.steps[step];
        let epoch = *epoch;
        let step_start = Instant::now();
        let examples: Vec<Vec<&EncodedPair>> =
            step_batches.iter().map(|b| b.iter().map(|&i| &data.examples[i]).collect()).collect();
        let (loss, grads, response_tokens, tokens) = loss_and_grads(model, &vars, &examples)?;
        let lr = config.lr * config.schedule.factor(step, total_steps, warmup);
        let grad_norm = optimizer.step(&grads, lr, config.clip_grad_norm)?;
        let log = StepLog {
            step: step + 1,
            epoch,
            loss,
            lr,
            grad_norm,
            response_tokens,
            tokens,
            tokens_per_second: tokens as f64 / step_start.elapsed().as_secs_f64(),
        };
        tokens_done += tokens;
        append_log(out, &log)?;
        bar.set_message(format!("loss {loss:.4}  {:.0} tok/s", log.tokens_per_second));
        bar.inc(1);
        history.push(log);
        let done = step + 1;
        let weights = || -> Vec<(String, Tensor)> { vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect() };
        // Before the checkpoint: a run killed between the two redoes this step and saves both.
        if config.snapshot_every.is_some_and(|k| done % k == 0 || done == total_steps) {
            checkpoint::save_snapshot(out, done, &weights())?;
        }
        if done == total_steps || config.save_every.is_some_and(|k| done % k == 0) {
            let state = TrainState {
                step: done,
                total_steps,
                seed: config.seed,
                base_fingerprint: target.base_fingerprint.clone(),
            };
            checkpoint::save(out, &state, &weights(), &optimizer.state(), config.keep_checkpoints)?;
        }
    }
    bar.finish_and_clear();

    let weights: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    export::hugging_face(model, &weights, &out.join("model"))?;
    let end = Finished { history: &history, steps: total_steps, resumed_from, weight_l2_distance: l2_distance(&vars, &base)?, tokens: tokens_done, started };
    end.report(out, data)
}

/// What a finished run reports, however it trained.
pub(crate) struct Finished<'a> {
    pub history: &'a [StepLog],
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub weight_l2_distance: f64,
    /// Tokens this invocation trained on (a resumed run: since it resumed).
    pub tokens: usize,
    pub started: Instant,
}

impl Finished<'_> {
    /// Writes the loss curve and `report.json` under `out`.
    pub fn report(&self, out: &Path, data: &data::SftData) -> Result<TrainReport> {
        let points: Vec<(f64, f64)> = self.history.iter().map(|l| (l.step as f64, l.loss)).collect();
        let svg = crate::report::plot::line_chart(
            "training loss",
            "step",
            "loss (mean over response tokens)",
            &[crate::report::plot::Series { name: "train", points: &points }],
        );
        let curve = out.join("loss.svg");
        std::fs::write(&curve, svg).map_err(|e| Error::io(&curve, e))?;
        let seconds = self.started.elapsed().as_secs_f64();
        let report = TrainReport {
            steps: self.steps,
            resumed_from: self.resumed_from,
            first_loss: self.history.first().map(|l| l.loss),
            final_loss: self.history.last().map(|l| l.loss),
            weight_l2_distance: self.weight_l2_distance,
            seconds,
            tokens_per_second: self.tokens as f64 / seconds.max(1e-9),
            truncated_examples: data.truncated,
            skipped_examples: data.skipped,
        };
        let report_path = out.join("report.json");
        let json = serde_json::to_string_pretty(&report).expect("plain data serialises");
        std::fs::write(&report_path, json).map_err(|e| Error::io(&report_path, e))?;
        Ok(report)
    }
}

/// Every optimiser step's micro-batches (indices into the examples), in the order training
/// takes them, and the warm-up: epoch e's batches are cut with seed + e.
pub struct BatchOrder {
    /// (epoch, micro-batches) per step.
    pub steps: Vec<(usize, Vec<Vec<usize>>)>,
    pub warmup: usize,
}

pub fn batch_order(examples: &[EncodedPair], config: &TrainConfig) -> BatchOrder {
    // Every epoch has as many batches (the cut depends on lengths only): epoch 0's give the count.
    let mut epoch_batches = (0, data::micro_batches(examples, config.micro_batch_tokens, config.seed));
    let per_epoch = epoch_batches.1.len();
    let steps_per_epoch = per_epoch.div_ceil(config.grad_accum).max(1);
    let total_steps = config.max_steps.unwrap_or(steps_per_epoch * config.epochs);
    let mut steps = Vec::with_capacity(total_steps);
    for step in 0..total_steps {
        let epoch = step / steps_per_epoch;
        if epoch_batches.0 != epoch {
            let seed = config.seed.wrapping_add(epoch as u64);
            epoch_batches = (epoch, data::micro_batches(examples, config.micro_batch_tokens, seed));
        }
        let batches = &epoch_batches.1;
        let first = ((step % steps_per_epoch) * config.grad_accum).min(batches.len());
        steps.push((epoch, batches[first..(first + config.grad_accum).min(batches.len())].to_vec()));
    }
    BatchOrder { steps, warmup: (config.warmup_ratio * total_steps as f64).ceil() as usize }
}

pub(crate) fn validate(config: &TrainConfig) -> Result<()> {
    let problem = if !(config.lr > 0.0) {
        Some("lr must be positive")
    } else if config.epochs == 0 && config.max_steps.is_none() {
        Some("epochs must be at least 1")
    } else if config.grad_accum == 0 {
        Some("grad_accum must be at least 1")
    } else if config.max_steps == Some(0) {
        Some("max_steps must be at least 1")
    } else if !(0.0..1.0).contains(&config.warmup_ratio) {
        Some("warmup_ratio must be in [0, 1)")
    } else if config.max_len < 2 {
        Some("max_len must be at least 2")
    } else {
        None
    };
    problem.map_or(Ok(()), |p| Err(Error::Invalid(format!("training settings: {p}"))))
}

/// The loss of one step and the gradient of every variable: each micro-batch's summed
/// response-token log-loss divided by the whole step's response-token count. Returns (loss,
/// gradients by name, response tokens, all tokens).
pub fn loss_and_grads(
    model: &LoadedModel,
    vars: &[(String, Var)],
    micro_batches: &[Vec<&EncodedPair>],
) -> Result<(f64, HashMap<String, Tensor>, usize, usize)> {
    let decoder = model.decoder()?;
    let response_tokens: usize = micro_batches.iter().flatten().map(|e| e.targets().count()).sum();
    let tokens: usize = micro_batches.iter().flatten().map(|e| e.ids.len()).sum();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss = 0.0;
    for batch in micro_batches {
        let weight = -1.0 / response_tokens.max(1) as f64;
        let (batch_loss, store) = decoder.loss_and_grads(&training_batch(batch, &model.device)?, weight)?;
        loss += batch_loss;
        for (name, var) in vars {
            if let Some(g) = store.get(var.as_tensor()) {
                // Detached: a gradient that still referenced the forward graph would keep
                // every activation of the step alive inside the optimiser's moments.
                let g = g.detach();
                let summed = match grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                grads.insert(name.clone(), summed);
            }
        }
    }
    Ok((loss, grads, response_tokens, tokens))
}

/// Right-padded token ids and the flat positions that predict response tokens.
fn training_batch(batch: &[&EncodedPair], device: &Device) -> Result<TrainingBatch> {
    let width = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(batch.len() * width);
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, e) in batch.iter().enumerate() {
        flat.extend_from_slice(&e.ids);
        flat.resize((b + 1) * width, 0);
        for (position, target) in e.targets() {
            rows.push((b * width + position) as u32);
            targets.push(target);
        }
    }
    Ok(TrainingBatch {
        input_ids: Tensor::from_vec(flat, (batch.len(), width), device)?,
        lengths: batch.iter().map(|e| e.ids.len()).collect(),
        rows,
        targets,
    })
}

pub fn sorted_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("VarMap lock");
    let mut named: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn l2_distance(vars: &[(String, Var)], base: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for ((_, var), start) in vars.iter().zip(base) {
        let diff = (var.as_tensor().to_dtype(DType::F32)? - start.to_dtype(DType::F32)?)?;
        total += diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

const LOG_JSONL: &str = "train_log.jsonl";
const LOG_CSV: &str = "train_log.csv";
const CSV_HEADER: &str = "step,epoch,loss,lr,grad_norm,response_tokens,tokens,tokens_per_second\n";

fn csv_row(l: &StepLog) -> String {
    format!(
        "{},{},{},{},{},{},{},{:.1}\n",
        l.step, l.epoch, l.loss, l.lr, l.grad_norm, l.response_tokens, l.tokens, l.tokens_per_second
    )
}

pub(crate) fn read_log(out: &Path) -> Result<Vec<StepLog>> {
    let path = out.join(LOG_JSONL);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Vec::new()) };
    // A run killed mid-line leaves a partial last line: everything before it counts.
    Ok(text.lines().map_while(|l| serde_json::from_str(l).ok()).collect())
}

/// Rewrites both logs with `history` (after a resume: only the steps the checkpoint holds).
pub(crate) fn write_log(out: &Path, history: &[StepLog]) -> Result<()> {
    let mut jsonl = String::new();
    let mut csv = String::from(CSV_HEADER);
    for l in history {
        jsonl.push_str(&serde_json::to_string(l).expect("plain data serialises"));
        jsonl.push('\n');
        csv.push_str(&csv_row(l));
    }
    for (name, text) in [(LOG_JSONL, jsonl), (LOG_CSV, csv)] {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn append_log(out: &Path, log: &StepLog) -> Result<()> {
    let json = serde_json::to_string(log).expect("plain data serialises") + "\n";
    for (name, text) in [(LOG_JSONL, json), (LOG_CSV, csv_row(log))] {
        let path = out.join(name);
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        file.write_all(text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

pub(crate) fn progress_bar(visible: bool, steps: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("training {bar:40} step {pos}/{len}  {msg}  ETA {eta}").expect("static template"),
    );
    bar
}
