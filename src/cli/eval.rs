//! `harness eval`: generate with a model (or take completions made elsewhere), grade, and
//! write `metrics.json`, `items.jsonl` and a table.

use anyhow::{bail, Context};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use grape_harness::eval::{self, benchmark, sandbox, BenchmarkMetrics, ItemRecord};
use grape_harness::generate::GenerateOptions;
use grape_harness::{model, pool};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.completions.is_some() && args.bench.len() != 1 {
        bail!("--completions grades one benchmark; got --bench {}", args.bench.join(","));
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let eval_dir = args.eval_dir.clone().unwrap_or_else(benchmark::eval_dir);
    let data_dir = args.data_dir.clone().unwrap_or_else(|| pool::data_dir().join("eval"));
    let benches = args
        .bench
        .iter()
        .map(|name| {
            let path = benchmark::spec_path(name, &eval_dir)?;
            benchmark::Benchmark::load(&path, &data_dir)
        })
        .collect::<grape_harness::Result<Vec<_>>>()
        .context("loading benchmarks")?;
    let loaded = match &args.model {
        Some(name) => {
            let options = model::LoadOptions { template: args.template.clone(), ..model::LoadOptions::default() };
            Some(model::load(name, &options).with_context(|| format!("loading `{name}`"))?)
        }
        None => None,
    };
    let needs_sandbox = benches.iter().any(|b| matches!(b.spec.grader, benchmark::Grader::Code { .. }));
    let sandbox = needs_sandbox
        .then(|| {
            let mut config = sandbox::SandboxConfig { timeout: Duration::from_secs_f64(args.timeout), ..Default::default() };
            if let Some(python) = &args.python {
                config.python = python.clone();
            }
            if let Some(workers) = args.workers {
                config.workers = workers.max(1);
            }
            sandbox::Sandbox::new(config)
        })
        .transpose()
        .context("setting up the code sandbox")?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let items_path = args.out.join("items.jsonl");
    let mut items_file = std::io::BufWriter::new(
        std::fs::File::create(&items_path).with_context(|| format!("creating {}", items_path.display()))?,
    );
    let mut all_metrics = Vec::new();
    for bench in &benches {
        let limit = args.limit.unwrap_or(usize::MAX).min(bench.items.len());
        let started = Instant::now();
        let (completions, generation_seconds) = match (&loaded, &args.completions) {
            (Some(m), _) => {
                let decoding = &bench.spec.generation;
                let options = GenerateOptions {
                    max_new_tokens: args.max_new_tokens.unwrap_or(decoding.max_new_tokens),
                    temperature: args.temperature.unwrap_or(decoding.temperature),
                    top_p: args.top_p.unwrap_or(decoding.top_p),
                    seed: args.seed,
                    stop: decoding.stop.clone(),
                    batch_size: args.batch_size,
                };
                let items: Vec<usize> = (0..limit).collect();
                let bar = bar(&format!("{} generating", bench.name()), "{human_pos} tokens  {per_sec}  {elapsed}");
                let completions = eval::generate_completions(m, bench, &items, args.samples, &options, |n| bar.inc(n as u64))?;
                bar.finish_and_clear();
                (completions, Some(started.elapsed().as_secs_f64()))
            }
            (None, Some(path)) => {
                let mut completions = eval::read_completions(path, bench)?;
                completions.retain(|c| c.item < limit);
                (completions, None)
            }
            (None, None) => unreachable!("clap requires --model or --completions"),
        };
        let graded_at = Instant::now();
        let bar = bar(&format!("{} grading", bench.name()), "{bar:30} {pos}/{len}  {per_sec}  ETA {eta}");
        bar.set_length(completions.len() as u64);
        let records = eval::grade(bench, &completions, sandbox.as_ref(), || bar.inc(1))?;
        bar.finish_and_clear();
        let metrics = eval::summarize(bench, &records, args.seed, generation_seconds, graded_at.elapsed().as_secs_f64());
        write_records(&mut items_file, &records).with_context(|| format!("writing {}", items_path.display()))?;
        tracing::info!(
            "{}: {} {:.1}% over {} items",
            bench.name(),
            metrics.metric,
            100.0 * metrics.score.value,
            metrics.score.n
        );
        all_metrics.push(metrics);
    }
    items_file.flush().with_context(|| format!("writing {}", items_path.display()))?;
    let metrics_path = args.out.join("metrics.json");
    let by_name: serde_json::Map<String, serde_json::Value> = all_metrics
        .iter()
        .map(|m| Ok((m.benchmark.clone(), serde_json::to_value(m)?)))
        .collect::<serde_json::Result<_>>()?;
    std::fs::write(&metrics_path, serde_json::to_string_pretty(&by_name)? + "\n")
        .with_context(|| format!("writing {}", metrics_path.display()))?;
    println!("{}", table(&all_metrics));
    println!("wrote {} and {}", metrics_path.display(), items_path.display());
    Ok(())
}

fn bar(prefix: &str, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(&format!("{{prefix}} {template}")).expect("static template"));
    bar.set_prefix(prefix.to_string());
    bar
}

fn write_records(out: &mut impl Write, records: &[ItemRecord]) -> anyhow::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
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
