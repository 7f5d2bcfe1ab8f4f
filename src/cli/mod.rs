//! The `harness` command line: argument parsing and printing only; the work is in the library.

mod bench;
mod eval;
mod model;
mod pool;
mod run;
mod score;
mod train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "harness", version, about = "SFT data-selection experiments: GRAPE and its baselines")]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Where models run: cpu, cuda or cuda:N (CUDA needs a build from scripts/build-cuda.sh).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Inference precision: auto (f32 on the CPU, bf16 on a GPU), f32, bf16 or f16. Log-softmax
    /// runs in f32 and training keeps f32 weights and moments whatever this says.
    #[arg(long, global = true, default_value = "auto")]
    pub dtype: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an experiment file: pool -> score -> select -> train -> eval -> report, resumable.
    Run(run::RunArgs),
    /// The results table of an experiment's finished stages (computes nothing).
    Report(run::ReportArgs),
    /// One stage of an experiment's graph, by key (what a cluster job runs).
    #[command(subcommand)]
    Stage(run::StageCommand),
    /// Each stage of an experiment: done, running, pending, failed (with its log) or not
    /// submitted, from runs/ and Slurm.
    Status(run::StatusArgs),
    /// Fetch, inspect and tokenize with models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Score every candidate of a pool with a model into a score store (Parquet).
    Score(score::ScoreArgs),
    /// Join the stores of `harness score --shard i/N` (all N, once each) into one.
    MergeScores(score::MergeArgs),
    /// Select SFT data from a pool with a registered selector.
    Select(score::SelectArgs),
    /// Fine-tune a model on SFT data (response-only loss, AdamW), export it for Hugging Face.
    Train(train::TrainArgs),
    /// Evaluate a model (or given completions) on benchmarks: pass@1 and accuracy.
    Eval(eval::EvalArgs),
    /// Join the output folders of `harness eval --shard i/N` (all N, once each) into one.
    MergeEval(score::MergeArgs),
    /// Describe a pool, its scores and selections.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Measure throughput (tokens/s, GFLOP/s).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    grape_harness::model::Placement::parse(&cli.device, &cli.dtype)?.install();
    // What a cluster job must repeat to run a stage as this command would.
    let global_args = vec!["--device".to_string(), cli.device.clone(), "--dtype".to_string(), cli.dtype.clone()];
    match cli.command {
        Command::Run(args) => run::run(args, global_args),
        Command::Report(args) => run::report(args),
        Command::Stage(cmd) => run::run_stage(cmd),
        Command::Status(args) => run::status(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Score(args) => score::run_score(args),
        Command::MergeScores(args) => score::run_merge(args),
        Command::Select(args) => score::run_select(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::MergeEval(args) => eval::run_merge(args),
        Command::Pool(cmd) => pool::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
