//! `harness bench forward | score | train | generate | kmeans`: throughput figures for the closing notes of each change.

use anyhow::Context;
use clap::{Args, Subcommand};
use grape_harness::score::ScoreOptions;
use grape_harness::{bench, model, pool};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Full forward passes (tokens/s, GFLOP/s) beside the machine's matmul rate.
    Forward(ForwardArgs),
    /// Scoring the first instructions of a pool, with prompt sharing on and off.
    Score(ScoreArgs),
    /// Full fine-tuning steps (forward, backward, AdamW) with peak memory.
    Train(TrainArgs),
    /// Greedy generation on a benchmark's prompts at several batch sizes.
    Generate(GenerateArgs),
    /// S2L's k-means on synthetic trajectories: wall time and peak memory.
    Kmeans(KmeansArgs),
}

#[derive(Debug, Args)]
pub struct KmeansArgs {
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Snapshots per trajectory.
    #[arg(long, default_value_t = 10)]
    dims: usize,
    #[arg(long, default_value_t = 100)]
    k: usize,
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// The benchmark whose first prompts are generated from.
    #[arg(long, default_value = "humaneval")]
    bench: String,
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Micro-batch shape, as BATCHxLEN.
    #[arg(long, default_value = "4x512")]
    shape: String,
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

#[derive(Debug, Args)]
pub struct ModelArg {
    /// A built-in name, a .gguf file or a Hugging Face folder.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Shapes to time, as BATCHxLEN.
    #[arg(long, value_delimiter = ',', default_value = "8x512,1x512")]
    shapes: Vec<String>,
    #[arg(long, default_value_t = 3)]
    iterations: usize,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A JSONL pool (gzip allowed) with instruction_id, prompt, response, source.
    #[arg(long, default_value_os_t = pool::data_dir().join("pools/alpacaeval-12models.jsonl.gz"))]
    pool: PathBuf,
    #[arg(long, default_value_t = 64)]
    instructions: usize,
    #[arg(long, default_value_t = ScoreOptions::default().batch_tokens)]
    batch_tokens: usize,
    #[arg(long, default_value_t = ScoreOptions::default().max_len)]
    max_len: usize,
    /// Prompt sharing: on, off, or both (to compare).
    #[arg(long, value_parser = ["on", "off", "both"], default_value = "both")]
    share: String,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let (json, results) = match &cmd {
        BenchCommand::Forward(args) => (args.model.json, forward(args)?),
        BenchCommand::Score(args) => (args.model.json, score(args)?),
        BenchCommand::Train(args) => (args.model.json, train(args)?),
        BenchCommand::Generate(args) => (args.model.json, generate(args)?),
        BenchCommand::Kmeans(a) => (a.json, vec![entry(bench::kmeans(a.rows, a.dims, a.k, a.iterations, a.seed)?)?]),
    };
    if json {
        let json: Vec<&serde_json::Value> = results.iter().map(|(json, _)| json).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for (_, line) in &results {
            println!("{line}");
        }
    }
    Ok(())
}

/// A measurement as JSON and as the line printed for people.
type Entry = (serde_json::Value, String);

fn load(arg: &ModelArg) -> anyhow::Result<model::LoadedModel> {
    model::load(&arg.model, &model::LoadOptions::default()).with_context(|| format!("loading `{}`", arg.model))
}

fn entry<T: serde::Serialize + std::fmt::Display>(result: T) -> anyhow::Result<Entry> {
    Ok((serde_json::to_value(&result)?, result.to_string()))
}

fn forward(args: &ForwardArgs) -> anyhow::Result<Vec<Entry>> {
    let m = load(&args.model)?;
    let decoder = m.decoder()?;
    let mut results = vec![entry(bench::matmul_peak(1024, 5, &m.device)?)?];
    for shape in &args.shapes {
        let (batch, len) = parse_shape(shape)?;
        results.push(entry(bench::forward(decoder, &m.config, batch, len, args.iterations, &m.device)?)?);
    }
    Ok(results)
}

fn parse_shape(shape: &str) -> anyhow::Result<(usize, usize)> {
    shape
        .split_once('x')
        .and_then(|(b, l)| Some((b.parse().ok()?, l.parse().ok()?)))
        .with_context(|| format!("shape `{shape}`: expected BATCHxLEN, e.g. 8x512"))
}

fn train(args: &TrainArgs) -> anyhow::Result<Vec<Entry>> {
    let (batch, len) = parse_shape(&args.shape)?;
    let (m, vars) = model::load_trainable(&args.model.model, &model::LoadOptions::default())
        .with_context(|| format!("loading `{}`", args.model.model))?;
    Ok(vec![entry(bench::training(&m, &vars, batch, len, args.steps)?)?])
}

fn generate(args: &GenerateArgs) -> anyhow::Result<Vec<Entry>> {
    use grape_harness::eval::benchmark;
    let m = load(&args.model)?;
    let spec = benchmark::spec_path(&args.bench, &benchmark::eval_dir())?;
    let bench = benchmark::Benchmark::load(&spec, &pool::data_dir().join("eval"))?;
    let prompts = bench
        .items
        .iter()
        .take(args.prompts)
        .map(|item| grape_harness::generate::prompt_ids(&m, &item.prompt, &bench.spec.response_prefix))
        .collect::<grape_harness::Result<Vec<_>>>()?;
    args.batch
        .iter()
        .map(|&batch| entry(bench::generation(&m, &prompts, batch, args.max_new_tokens)?))
        .collect()
}

fn score(args: &ScoreArgs) -> anyhow::Result<Vec<Entry>> {
    let m = load(&args.model)?;
    let pool = pool::read(&args.pool, &pool::Columns::default(), false)?.truncated(args.instructions);
    let groups = pool.groups();
    let mut results = Vec::new();
    let modes: &[bool] = match args.share.as_str() {
        "on" => &[true],
        "off" => &[false],
        _ => &[true, false],
    };
    for &share_prefix in modes {
        let options = ScoreOptions {
            share_prefix,
            batch_tokens: args.batch_tokens,
            max_len: args.max_len,
            progress: true,
            ..ScoreOptions::default()
        };
        results.push(entry(bench::scoring(&m, &groups, &options)?)?);
    }
    Ok(results)
}
