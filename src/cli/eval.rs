//! `harness eval`: generate with a model (or take completions made elsewhere), grade, and
//! write `metrics.json`, `items.jsonl` and a table.

use anyhow::Context;
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use grape_harness::eval::{self, benchmark, sandbox, Answers, BenchmarkMetrics, EvalOptions};
use super::score::MergeArgs;
use grape_harness::shard::Shard;
use grape_harness::{model, pool};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Generate with this model: a built-in name, a .gguf file or a Hugging Face folder.
    #[arg(long, required_unless_present = "completions", conflicts_with = "completions")]
    model: Option<String>,
    /// auto (the model's own, else plain), model, chatml, tulu or plain.
    #[arg(long)]
    template: Option<String>,
    /// Grade completions made elsewhere: JSON Lines of {"task_id", "completion"} (one benchmark).
    #[arg(long)]
    completions: Option<PathBuf>,
    /// Benchmarks: names of files in the eval folder, or paths to such files; comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    bench: Vec<String>,
    /// Only the first N items of each benchmark.
    #[arg(long)]
    limit: Option<usize>,
    /// Writes metrics.json and items.jsonl here.
    #[arg(long)]
    out: PathBuf,
    /// Where the benchmark data live [default: $HARNESS_DATA_DIR/eval, else ../shared/data/eval].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where benchmark files live [default: $HARNESS_EVAL_DIR, else this repository's eval/].
    #[arg(long)]
    eval_dir: Option<PathBuf>,
    /// Completions per item (pass@k for k up to this).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Overrides the benchmark's temperature (0 = greedy).
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    /// Overrides the benchmark's max_new_tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Seeds sampling and the bootstrap intervals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds each program may run in the sandbox.
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
    /// Programs run at once [default: the number of cores].
    #[arg(long)]
    workers: Option<usize>,
    /// The Python the sandbox runs [default: /usr/bin/python3 when present].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Run generated code even where this kernel cannot contain it (no Landlock, namespaces or
    /// root); recorded in metrics.json.
    #[arg(long)]
    unsandboxed: bool,
    /// Evaluate only shard i of N (items split by a hash of their id), for N machines;
    /// `harness merge-eval` joins the N output folders.
    #[arg(long, value_name = "i/N")]
    shard: Option<Shard>,
}

pub fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
    let metrics = eval::merge(&args.parts, &args.out).with_context(|| format!("merging into {}", args.out.display()))?;
    println!("{}", table(&metrics));
    println!("merged {} shards into {}", args.parts.len(), args.out.display());
    Ok(())
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let eval_dir = args.eval_dir.clone().unwrap_or_else(benchmark::eval_dir);
    let data_dir = args.data_dir.clone().unwrap_or_else(|| pool::data_dir().join("eval"));
    let benches = eval::load_benchmarks(&args.bench, &eval_dir, &data_dir).context("loading benchmarks")?;
    let loaded = match &args.model {
        Some(name) => {
            let options = model::LoadOptions { template: args.template.clone(), ..model::LoadOptions::default() };
            Some(model::load(name, &options).with_context(|| format!("loading `{name}`"))?)
        }
        None => None,
    };
    let mut config = sandbox::SandboxConfig {
        timeout: Duration::from_secs_f64(args.timeout),
        unsandboxed: args.unsandboxed,
        ..Default::default()
    };
    if let Some(python) = &args.python {
        config.python = python.clone();
    }
    if let Some(workers) = args.workers {
        config.workers = workers.max(1);
    }
    let sandbox = eval::sandbox_for(&benches, config).context("setting up the code sandbox")?;
    let answers = match (&loaded, &args.completions) {
        (Some(m), _) => Answers::Model(m),
        (None, Some(path)) => Answers::File(path),
        (None, None) => unreachable!("clap requires --model or --completions"),
    };
    let options = EvalOptions {
        limit: args.limit,
        samples: args.samples,
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size,
        seed: args.seed,
        shard: args.shard,
        progress: true,
    };
    let metrics = eval::evaluate(answers, &benches, sandbox.as_ref(), &options, &args.out)
        .with_context(|| format!("evaluating into {}", args.out.display()))?;
    println!("{}", table(&metrics));
    println!("wrote {} and {}", args.out.join("metrics.json").display(), args.out.join("items.jsonl").display());
    Ok(())
}

fn table(metrics: &[BenchmarkMetrics]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "benchmark",
        "metric",
        "score %",
        "95% CI",
        "items",
        "truncated %",
        "unparseable %",
        "seconds",
    ]);
    let pct = |x: f64| format!("{:.1}", 100.0 * x);
    for m in metrics {
        let seconds = m.generation_seconds.unwrap_or(0.0) + m.grading_seconds;
        table.add_row([
            m.benchmark.clone(),
            m.metric.clone(),
            pct(m.score.value),
            format!("{}-{}", pct(m.score.ci95.0), pct(m.score.ci95.1)),
            m.score.n.to_string(),
            m.truncated_rate.map_or("-".into(), pct),
            pct(m.unparseable_rate),
            format!("{seconds:.1}"),
        ]);
    }
    table
}
