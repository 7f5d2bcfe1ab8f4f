//! `harness score` (scores into the store) and `harness select` (a selection from a pool
//! and, for the selectors that need them, the stored scores).

use crate::cli::pool::PoolArgs;
use anyhow::Context;
use clap::{Args, ValueEnum};
use grape_harness::model::{self, LoadedModel};
use grape_harness::pool::{stats, Pool};
use grape_harness::score::shard::{self, Shard, ShardRecord};
use grape_harness::score::{self, Overflow, Score, ScoreOptions, ScoreStore};
use grape_harness::select::{self, Needs, Params, SelectInput, StageJob, StageTarget};
use grape_harness::util::sha256_bytes;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A built-in name, a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: String,
    /// auto (the model's own, else plain), model, chatml, tulu or plain.
    #[arg(long)]
    template: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OverflowArg {
    Truncate,
    Skip,
}

#[derive(Debug, Args)]
pub struct ScoringArgs {
    /// Longest prompt + response in tokens; longer pairs are truncated (and flagged) or skipped.
    #[arg(long, default_value_t = ScoreOptions::default().max_len)]
    max_len: usize,
    #[arg(long, value_enum, default_value = "truncate")]
    overflow: OverflowArg,
    /// Rows x padded length of one batch.
    #[arg(long, default_value_t = ScoreOptions::default().batch_tokens)]
    batch_tokens: usize,
    /// Run every candidate's prompt again instead of sharing one prompt cache.
    #[arg(long)]
    no_share_prefix: bool,
    /// Also store each response token's log-probability.
    #[arg(long)]
    token_logprobs: bool,
    /// Score under this built-in template instead of the model's (training) one:
    /// question-answer is GRAPE's `Question: ...\nAnswer: ...`; also chatml, tulu, plain.
    #[arg(long)]
    score_template: Option<String>,
}

impl ScoringArgs {
    /// The model as it scores: under `--score-template` when given.
    fn scorer(&self, model: LoadedModel) -> anyhow::Result<LoadedModel> {
        match &self.score_template {
            Some(name) => model.with_template(name).with_context(|| format!("--score-template {name}")),
            None => Ok(model),
        }
    }

    fn options(&self) -> ScoreOptions {
        ScoreOptions {
            max_len: self.max_len,
            batch_tokens: self.batch_tokens,
            share_prefix: !self.no_share_prefix,
            keep_token_logprobs: self.token_logprobs,
            overflow: match self.overflow {
                OverflowArg::Truncate => Overflow::Truncate,
                OverflowArg::Skip => Overflow::Skip,
            },
            progress: true,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// The score store (Parquet). Scores already there are reused, new ones added.
    #[arg(long)]
    out: PathBuf,
    /// Score only shard i of N (instructions split by a hash of their id), for N machines;
    /// `harness merge-scores` joins the N stores.
    #[arg(long, value_name = "i/N")]
    shard: Option<Shard>,
}

/// `merge-scores` and `merge-eval`: the outputs of `--shard i/N` runs, joined.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The merged result: a score store (scores already there are kept), or a folder for
    /// metrics.json and items.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// What the `--shard i/N` runs wrote (stores or output folders), one per shard.
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SelectArgs {
    /// A registered selector (grape, lowest, random, strongest, upscale, s2l, longest, all;
    /// an unknown name lists them).
    #[arg(long)]
    selector: String,
    /// Selector parameter, KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    #[command(flatten)]
    pool: PoolArgs,
    /// The target model, for selectors that rank by its scores.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    template: Option<String>,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// The score store; default: one per model fingerprint in the cache.
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Seed for every random choice of the selector.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for manifest.jsonl and sft.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Where a selector's own stage works (s2l: its reference model and loss trajectories),
    /// in a folder per settings [default: OUT/<stage kind>].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Compute only shard i of N of the selector's own stage (s2l: its loss trajectories;
    /// instructions split by a hash of their id) into the work folder and stop; a run without
    /// --shard on the same folder merges the N parts and selects. (Score-ranked selectors:
    /// `harness score --shard`.)
    #[arg(long, value_name = "i/N")]
    shard: Option<Shard>,
}

fn load(name: &str, template: Option<&str>) -> anyhow::Result<LoadedModel> {
    let options = model::LoadOptions { template: template.map(str::to_string), ..model::LoadOptions::default() };
    model::load(name, &options).with_context(|| format!("loading `{name}`"))
}

/// Scores `pool` through `store`, printing one summary line.
fn score_pool(
    model: &LoadedModel,
    pool: &Pool,
    options: &ScoreOptions,
    store: &mut ScoreStore,
) -> anyhow::Result<Vec<Vec<Option<Score>>>> {
    let start = Instant::now();
    let groups = pool.groups();
    let result = score::score_stored(model, &groups, options, store);
    // Whatever was scored before a failure is kept: fold it in before reporting the error.
    store.compact().with_context(|| format!("saving scores to {}", store.path().display()))?;
    let (scores, computed) = result?;
    let seconds = start.elapsed().as_secs_f64();
    let all: Vec<&Score> = scores.iter().flatten().flatten().collect();
    println!(
        "scored {computed} new candidates in {seconds:.1} s ({:.2} cand/s), reused {}; {} of {} candidates scored, \
         {} truncated at {} tokens; store {} ({} scores)",
        computed as f64 / seconds.max(1e-9),
        all.len() - computed,
        all.len(),
        pool.candidate_count(),
        all.iter().filter(|s| s.truncated).count(),
        options.fitted(model).max_len,
        store.path().display(),
        store.len()
    );
    Ok(scores)
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    let whole = args.pool.read()?;
    let sharded = args.shard.map(|s| s.of(&whole));
    let pool = sharded.as_ref().unwrap_or(&whole);
    let model = args.scoring.scorer(load(&args.model.model, args.model.template.as_deref())?)?;
    let fingerprint = model.fingerprint()?;
    let mut store = ScoreStore::open(&args.out, &fingerprint)
        .with_context(|| format!("opening the score store {}", args.out.display()))?;
    score_pool(&model, pool, &args.scoring.options(), &mut store)?;
    if let Some(s) = args.shard {
        let record = ShardRecord { shard: s, pool: whole.digest(), fingerprint, instructions: pool.instructions.len() };
        shard::write_record(&args.out, &record)?;
        println!("shard {s}: {} of {} instructions", pool.instructions.len(), whole.instructions.len());
    }
    Ok(())
}

pub fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
    let merged = shard::merge(&args.parts, &args.out).with_context(|| format!("merging into {}", args.out.display()))?;
    println!("merged {merged} scores from {} shards into {}", args.parts.len(), args.out.display());
    Ok(())
}

pub fn run_select(args: SelectArgs) -> anyhow::Result<()> {
    let mut params = Params::new();
    for p in &args.params {
        let (key, value) = p.split_once('=').with_context(|| format!("--param `{p}`: expected KEY=VALUE"))?;
        params.insert(key.to_string(), value.to_string());
    }
    let name = &args.selector;
    let selector = select::build(name, &params)?;
    let pool = args.pool.read()?;
    let model_for = |why: &str| args.model.as_deref().with_context(|| format!("selector `{name}` {why}: give --model"));
    let needs = selector.needs();
    if args.shard.is_some() && !matches!(&needs, Needs::Stage(stage) if stage.shardable()) {
        anyhow::bail!("--shard splits a selector's own stage (S2L's trajectories); `{name}` has none to split (shard scores with `harness score --shard`)");
    }
    let (scores, stage_dir) = match needs {
        Needs::Nothing => (None, None),
        Needs::Scores => {
            let model = args.scoring.scorer(load(model_for("ranks by scores")?, args.template.as_deref())?)?;
            let fingerprint = model.fingerprint()?;
            let path = args.scores.clone().unwrap_or_else(|| ScoreStore::default_path(&fingerprint));
            let mut store = ScoreStore::open(&path, &fingerprint)
                .with_context(|| format!("opening the score store {}", path.display()))?;
            let options = args.scoring.options();
            // A store given by name was made for this selection: never rescore it silently.
            let (asked, held) = (options.fitted(&model).max_len, store.max_lens());
            if args.scores.is_some() && !held.is_empty() && !held.contains(&asked) {
                let held: Vec<String> = held.iter().map(usize::to_string).collect();
                anyhow::bail!(
                    "{} holds scores made with --max-len {}, not {asked}: pass the same --max-len to select from \
                     them (or name another --scores file to score the pool anew)",
                    path.display(),
                    held.join(", ")
                );
            }
            (Some(score_pool(&model, &pool, &options, &mut store)?), None)
        }
        Needs::Stage(stage) => {
            let target = model_for(&format!("computes its {} with the target", stage.kind()))?;
            let fingerprint = model::inspect_fingerprinted(target, args.template.as_deref())
                .and_then(|m| m.fingerprint())
                .with_context(|| format!("reading `{target}`"))?;
            let stage_target = StageTarget { model: target, fingerprint: &fingerprint, reference: None };
            // One folder per (settings, target, pool, seed), as the experiment's stages are named.
            let key = sha256_bytes(format!("{}\0{}\0{}", stage.key_inputs(&stage_target), pool.digest(), args.seed).as_bytes());
            let dir = args.work_dir.clone().unwrap_or_else(|| args.out.join(stage.kind())).join(&key[..16]);
            let options = model::LoadOptions { template: args.template.clone(), ..model::LoadOptions::default() };
            let job = StageJob {
                target: stage_target,
                load: &options,
                pool: &pool,
                seed: args.seed,
                dir: &dir,
                shard: args.shard,
                progress: true,
            };
            let cost = stage.run(&job).with_context(|| format!("computing the {} in {}", stage.kind(), dir.display()))?;
            let work = format!(
                "{} forward tokens, {} training tokens, {:.1} s, in {}",
                cost.forward_tokens,
                cost.train_tokens,
                cost.seconds,
                dir.display()
            );
            if let Some(shard) = args.shard {
                println!("{} shard {shard}: {work}; run again without --shard on the same folder to merge and select", stage.kind());
                return Ok(());
            }
            println!("{}: {work}", stage.kind());
            (None, Some(dir))
        }
    };
    let input = SelectInput { pool: &pool, scores: scores.as_deref(), stage: stage_dir.as_deref(), seed: args.seed };
    let selection = selector.select(&input)?;
    let out = &args.out;
    select::write(&selection, &pool, out).with_context(|| format!("writing the selection to {}", out.display()))?;
    for flag in selection.flagged.iter().take(5) {
        tracing::warn!("{flag}");
    }
    let shares: Vec<String> = stats::source_shares(&pool, &selection)
        .iter()
        .take(3)
        .map(|s| format!("{} {:.0}%", s.source, 100.0 * s.share))
        .collect();
    println!(
        "{name}: {} picks from {} instructions, {} flagged; top sources {}; wrote {}",
        selection.picks.len(),
        pool.instructions.len(),
        selection.flagged.len(),
        shares.join(", "),
        out.join("manifest.jsonl").display()
    );
    Ok(())
}
