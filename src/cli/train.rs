//! `harness train`: fine-tune a model on an SFT file (a selection's `sft.jsonl`).

use anyhow::Context;
use clap::Args;
use grape_harness::model;
use grape_harness::train::{self, optim::Schedule, Examples, Prepared, TrainConfig};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A built-in name, a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: String,
    /// auto (the model's own, else plain), model, chatml, tulu or plain.
    #[arg(long)]
    template: Option<String>,
    /// JSON Lines of {"messages": [user..., assistant]}.
    #[arg(long)]
    data: PathBuf,
    /// Logs, checkpoints, loss curve, report and the exported model (`model/`).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().micro_batch_tokens)]
    micro_batch_tokens: usize,
    #[arg(long, default_value_t = TrainConfig::default().grad_accum)]
    grad_accum: usize,
    /// constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    schedule: Schedule,
    #[arg(long, default_value_t = TrainConfig::default().warmup_ratio)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = TrainConfig::default().adamw.weight_decay)]
    weight_decay: f64,
    /// Largest global gradient norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    clip_grad_norm: f64,
    #[arg(long, default_value_t = TrainConfig::default().max_len)]
    max_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().keep_checkpoints)]
    keep_checkpoints: usize,
    /// Also save the weights alone every N steps (and at the end), all kept, under OUT/snapshots.
    #[arg(long)]
    snapshot_every: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// native (this crate's trainer) or trl (engines/sft.py through accelerate, in a pinned
    /// Python environment created on first use).
    #[arg(long, default_value = "native")]
    engine: train::Engine,
    /// The trl engine's accelerate config: cpu, zero3, fsdp (engines/accelerate/) or a path.
    #[arg(long)]
    accelerate: Option<String>,
    /// Processes the trl engine runs (GPUs, or CPU processes).
    #[arg(long)]
    processes: Option<usize>,
    /// Start the trl engine with this command line instead (see engines/slurm-multinode.sh);
    /// {python} {accelerate} {processes} {port} {script} {engine_dir} are filled in.
    #[arg(long)]
    launch: Option<String>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let defaults = TrainConfig::default();
    let config = TrainConfig {
        lr: args.lr,
        epochs: args.epochs,
        max_steps: args.max_steps,
        micro_batch_tokens: args.micro_batch_tokens,
        grad_accum: args.grad_accum,
        schedule: args.schedule,
        warmup_ratio: args.warmup_ratio,
        adamw: train::optim::AdamWConfig { weight_decay: args.weight_decay, ..defaults.adamw },
        clip_grad_norm: (args.clip_grad_norm > 0.0).then_some(args.clip_grad_norm),
        max_len: args.max_len,
        seed: args.seed,
        save_every: args.save_every,
        keep_checkpoints: args.keep_checkpoints,
        snapshot_every: args.snapshot_every,
        engine: args.engine,
        accelerate: args.accelerate.clone(),
        processes: args.processes,
        launch: args.launch.clone(),
    };
    let options = model::LoadOptions { template: args.template.clone(), ..model::LoadOptions::default() };
    let prepared = Prepared::load(&args.model, &config.load_options(&options), Examples::File(&args.data), config.max_len)
        .with_context(|| format!("loading `{}` and its training data {}", args.model, args.data.display()))?;
    let report = prepared
        .train(&config, &args.out, args.resume, true)
        .with_context(|| format!("training into {}", args.out.display()))?;
    let data = &prepared.data;
    println!(
        "trained {} steps on {} examples ({} truncated, {} skipped){}: loss {} -> {}, {:.0} tokens/s, weight L2 drift {:.4}; \
         model in {}",
        report.steps,
        data.examples.len(),
        data.truncated,
        data.skipped,
        report.resumed_from.map_or(String::new(), |s| format!(", resumed at step {s}")),
        report.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        report.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        report.tokens_per_second,
        report.weight_l2_distance,
        args.out.join("model").display()
    );
    Ok(())
}
