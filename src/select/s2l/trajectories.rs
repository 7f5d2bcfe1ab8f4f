//! S2L's loss trajectories: a reference model fine-tuned on a random share of the pool, its
//! weights snapshotted along the way, and every candidate's mean response-token loss at each
//! snapshot, computed by the scorer (one code path for per-example loss).
//!
//! Everything lands in a folder named by the hash of all it depends on (reference weights,
//! settings, seed, pool) and is reused: the reference run resumes from its last checkpoint,
//! each snapshot's losses live in their own score store, and a finished
//! `trajectories.parquet` is read back instead of recomputed.

use crate::model::{self, LoadedModel};
use crate::pool::Pool;
use crate::score::shard::{Shard, ShardRecord};
use crate::score::{self, Group, Score, ScoreOptions, ScoreStore};
use crate::select::{InputStage, SelectionCost, StageJob, StageTarget};
use crate::train::{self, checkpoint, Examples, Prepared, TrainConfig};
use crate::util::Rng;
use crate::{Error, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How the reference model is trained and when its losses are taken.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceConfig {
    /// A smaller model of the target's family; `None`: the target itself.
    pub model: Option<String>,
    /// Share of the pool's candidate pairs the reference is trained on.
    pub subset: f64,
    pub epochs: usize,
    /// About this many snapshots, evenly spaced over the reference run (the last at its end).
    pub checkpoints: usize,
    pub lr: f64,
    pub max_len: usize,
    pub micro_batch_tokens: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
}

/// The paper's S2L settings: 5% of the data, 4 epochs, peak learning rate 2e-5.
impl Default for ReferenceConfig {
    fn default() -> Self {
        Self {
            model: None,
            subset: 0.05,
            epochs: 4,
            checkpoints: 10,
            lr: 2e-5,
            max_len: TrainConfig::default().max_len,
            micro_batch_tokens: TrainConfig::default().micro_batch_tokens,
            grad_accum: 1,
        }
    }
}

/// What the trajectories cost, beside GRAPE's single scoring pass (N·F) in a report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub train_seconds: f64,
    /// Tokens run forward and backward by the reference run (all epochs).
    pub train_tokens: usize,
    pub score_seconds: f64,
    /// Prompt + response tokens scored, summed over snapshots.
    pub score_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trajectories {
    /// Training steps of the snapshots, ascending.
    pub steps: Vec<usize>,
    /// `losses[i][j]`: candidate j of instruction i, one mean loss per snapshot; `None` when
    /// the pair could not be scored (its prompt alone exceeds the maximum length).
    pub losses: Vec<Vec<Option<Vec<f64>>>>,
    pub cost: Cost,
}

const TABLE: &str = "trajectories.parquet";
const COST: &str = "cost.json";

/// The trajectories as a stage of the experiment, sharded like scoring: each shard trains
/// (or waits for) the one reference run and scores its instructions at every snapshot; the
/// run without a shard merges the parts and writes `trajectories.parquet`.
pub struct TrajectoriesStage {
    pub reference: ReferenceConfig,
}

impl TrajectoriesStage {
    /// The reference as it runs for `target`: the selector's own model, else the target's
    /// `reference`, else the target itself.
    fn resolved(&self, target: &StageTarget) -> ReferenceConfig {
        let mut reference = self.reference.clone();
        if reference.model.is_none() {
            reference.model = target.reference.map(str::to_string);
        }
        reference
    }
}

impl InputStage for TrajectoriesStage {
    fn kind(&self) -> &'static str {
        "trajectories"
    }

    fn key_inputs(&self, target: &StageTarget) -> serde_json::Value {
        // As selection keys first recorded it, so those selections are still found.
        serde_json::json!({"target": target.fingerprint, "reference": format!("{:?}", self.resolved(target))})
    }

    fn shardable(&self) -> bool {
        true
    }

    fn run(&self, job: &StageJob) -> Result<SelectionCost> {
        let config = self.resolved(&job.target);
        let cost = match job.shard {
            Some(shard) => compute_shard(job, &config, shard)?.1,
            None => compute(job, &config)?.cost,
        };
        Ok(SelectionCost {
            forward_tokens: cost.score_tokens,
            train_tokens: cost.train_tokens,
            seconds: cost.train_seconds + cost.score_seconds,
        })
    }

    fn plan(&self, flops_per_token: f64, candidates: usize, mean_tokens: f64) -> (String, f64) {
        let r = &self.reference;
        let line = format!("{:.0}% of pairs x {} epochs, {} snapshots", 100.0 * r.subset, r.epochs, r.checkpoints);
        let pair_tokens = candidates as f64 * mean_tokens;
        let train = r.subset * pair_tokens * r.epochs as f64 * 3.0;
        (line, (train + r.checkpoints as f64 * pair_tokens) * flops_per_token)
    }
}

/// The trajectories a finished stage left in `dir`, for this same pool.
pub fn read(dir: &Path, pool: &Pool) -> Result<Trajectories> {
    let cost = read_cost(&dir.join(COST))?;
    read_table(&dir.join(TABLE), pool, cost)
}

/// The trajectories of every candidate of the pool, computed in `job.dir` or read from it.
/// Losses that shards ([`compute_shard`]) left in the same folder are merged and reused.
pub fn compute(job: &StageJob, config: &ReferenceConfig) -> Result<Trajectories> {
    let (pool, progress) = (job.pool, job.progress);
    if job.dir.join(TABLE).exists() {
        return read(job.dir, pool);
    }
    let reference = Reference::prepare(job, config)?;
    let dir = &reference.dir;
    let table = dir.join(TABLE);
    let mut cost = reference.cost.clone();
    let mut merged_shards = false;
    for (step, _) in &reference.snapshots {
        let store = losses_path(dir, *step, None);
        let parts = shard_parts(dir, *step)?;
        if !parts.is_empty() && !store.exists() {
            score::shard::merge(&parts, &store)?;
            merged_shards = true;
        }
    }
    if merged_shards {
        // Each shard's scoring time, once (it covers all of its snapshots).
        for path in shard_costs(dir)? {
            cost.score_seconds += read_cost(&path)?.score_seconds;
        }
    }
    let started = Instant::now();
    let columns = reference.score_snapshots(&pool.groups(), progress, |step| losses_path(dir, step, None))?;
    cost.score_tokens += columns.iter().flatten().flatten().flatten().map(|s| s.n_tokens).sum::<usize>();
    cost.score_tokens += score::prompt_tokens(&reference.model, pool)? * columns.len();
    cost.score_seconds += started.elapsed().as_secs_f64();

    let steps: Vec<usize> = reference.snapshots.iter().map(|(s, _)| *s).collect();
    let losses = pool
        .instructions
        .iter()
        .enumerate()
        .map(|(i, ins)| {
            (0..ins.candidates.len())
                .map(|j| {
                    columns
                        .iter()
                        .map(|scores| scores[i][j].as_ref().map(|s| -s.sum_logprob / s.n_tokens.max(1) as f64))
                        .collect::<Option<Vec<f64>>>()
                })
                .collect()
        })
        .collect();
    let trajectories = Trajectories { steps, losses, cost };
    write_table(&table, pool, &trajectories)?;
    write_cost(&dir.join(COST), &trajectories.cost)?;
    Ok(trajectories)
}

/// One machine's part of the trajectories: the reference run (trained once per folder; on a
/// shared folder the first shard trains it and the others wait for it), then the losses of
/// this shard's instructions at every snapshot, each snapshot's into a shard store. A later
/// [`compute`] on the same folder merges the parts (refusing a missing or doubled shard)
/// and scores nothing again. Returns the snapshot steps and this shard's cost.
pub fn compute_shard(job: &StageJob, config: &ReferenceConfig, shard: Shard) -> Result<(Vec<usize>, Cost)> {
    let (pool, progress) = (job.pool, job.progress);
    let reference = Reference::prepare(job, config)?;
    let dir = &reference.dir;
    let part = shard.of(pool);
    let started = Instant::now();
    let columns = reference.score_snapshots(&part.groups(), progress, |step| losses_path(dir, step, Some(shard)))?;
    let mut cost = Cost {
        score_tokens: columns.iter().flatten().flatten().flatten().map(|s| s.n_tokens).sum::<usize>()
            + score::prompt_tokens(&reference.model, &part)? * columns.len(),
        ..reference.cost.clone()
    };
    cost.score_seconds = started.elapsed().as_secs_f64();
    let digest = pool.digest();
    write_cost(&dir.join("losses").join(format!("shard-{}-of-{}.cost.json", shard.index, shard.count)), &cost)?;
    for (step, _) in &reference.snapshots {
        let record = ShardRecord {
            shard,
            pool: digest.clone(),
            fingerprint: reference.snapshot_fingerprint(*step),
            instructions: part.instructions.len(),
        };
        score::shard::write_record(&losses_path(dir, *step, Some(shard)), &record)?;
    }
    Ok((reference.snapshots.iter().map(|(s, _)| *s).collect(), cost))
}

/// The reference model after its run: what every snapshot's losses are computed with.
struct Reference {
    model: LoadedModel,
    vars: VarMap,
    base_fingerprint: String,
    dir: PathBuf,
    /// (step, weights file), ascending.
    snapshots: Vec<(usize, PathBuf)>,
    /// The training part; scoring is added by the caller.
    cost: Cost,
    max_len: usize,
}

impl Reference {
    /// Loads the reference with its training pairs (a seeded share of all the pool's pairs)
    /// and trains it, unless its run in `job.dir` is already finished.
    fn prepare(job: &StageJob, config: &ReferenceConfig) -> Result<Self> {
        validate(config)?;
        let (pool, seed, target) = (job.pool, job.seed, job.target.model);
        let reference_name = config.model.as_deref().unwrap_or(target);
        let mut pairs: Vec<(usize, usize)> = pool
            .instructions
            .iter()
            .enumerate()
            .flat_map(|(i, ins)| (0..ins.candidates.len()).map(move |j| (i, j)))
            .collect();
        Rng::new(seed).shuffle(&mut pairs);
        let take = ((config.subset * pairs.len() as f64).ceil() as usize).clamp(1, pairs.len().max(1)).min(pairs.len());
        let examples = pairs[..take]
            .iter()
            .map(|&(i, j)| {
                let ins = &pool.instructions[i];
                let name = format!("S2L reference data, instruction `{}` candidate {j}", ins.id);
                (name, ins.prompt.as_str(), ins.candidates[j].response.as_str())
            })
            .collect();
        let prepared = Prepared::load(reference_name, job.load, Examples::Pairs(examples), config.max_len)?;
        if config.model.is_some() {
            let target_model = model::inspect(target, job.load.template.as_deref())?;
            same_tokenizer_family(&target_model, &prepared.model, target, reference_name)?;
        }
        let dir = job.dir.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut cost = Cost::default();
        let mut snapshots = Vec::new();
        if !dir.join(TABLE).exists() {
            let lock_path = dir.join("reference.lock");
            let _lock = crate::util::lock_file(&lock_path, true).map_err(|e| Error::io(&lock_path, e))?;
            cost = train_reference(&prepared, reference_name, config, seed, &dir, job.progress)?;
            snapshots = checkpoint::snapshots(&dir.join("reference"))?;
            if snapshots.is_empty() {
                return Err(Error::Invalid(format!("S2L: the reference run in {} left no snapshots", dir.display())));
            }
        }
        let base_fingerprint = prepared.model.fingerprint()?;
        Ok(Self {
            model: prepared.model,
            vars: prepared.vars,
            base_fingerprint,
            dir,
            snapshots,
            cost,
            max_len: config.max_len,
        })
    }

    /// Each snapshot is its own model: its scores get their own fingerprint and store.
    fn snapshot_fingerprint(&self, step: usize) -> String {
        crate::util::sha256_bytes(format!("{}\0s2l-snapshot\0{step}", self.base_fingerprint).as_bytes())
    }

    /// Scores `groups` with the weights of every snapshot in turn, into the store
    /// `store_at(step)` names (serving what it already holds); one column per snapshot.
    fn score_snapshots(
        &self,
        groups: &[Group],
        progress: bool,
        store_at: impl Fn(usize) -> PathBuf,
    ) -> Result<Vec<Vec<Vec<Option<Score>>>>> {
        let options = ScoreOptions { max_len: self.max_len, progress, ..ScoreOptions::default() };
        let named = train::sorted_vars(&self.vars);
        let mut columns = Vec::with_capacity(self.snapshots.len());
        for (step, path) in &self.snapshots {
            let weights = checkpoint::load_weights(path, &self.model.device)?;
            for (name, var) in &named {
                let saved = checkpoint::saved_like(&weights, name, var.as_tensor(), "snapshot")?;
                var.set(&saved.to_dtype(var.dtype())?)?;
            }
            let store_path = store_at(*step);
            if let Some(parent) = store_path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let mut store = ScoreStore::open(&store_path, &self.snapshot_fingerprint(*step))?;
            let scored = score::score_stored(&self.model, groups, &options, &mut store);
            store.compact()?;
            columns.push(scored?.0);
        }
        Ok(columns)
    }
}

/// Trains the reference as the paper's S2L runs do (cosine decay after a 3% warm-up), with
/// about `checkpoints` snapshots along the way, unless its run is already finished; returns
/// the training part of the cost.
fn train_reference(prepared: &Prepared, name: &str, config: &ReferenceConfig, seed: u64, dir: &Path, progress: bool) -> Result<Cost> {
    let data = &prepared.data;
    let per_epoch = train::data::micro_batches(&data.examples, config.micro_batch_tokens, seed).len();
    let total_steps = per_epoch.div_ceil(config.grad_accum) * config.epochs;
    let every = total_steps.div_ceil(config.checkpoints).max(1);
    let train_config = TrainConfig {
        lr: config.lr,
        epochs: config.epochs,
        micro_batch_tokens: config.micro_batch_tokens,
        grad_accum: config.grad_accum,
        max_len: config.max_len,
        seed,
        save_every: Some(every),
        keep_checkpoints: 1,
        snapshot_every: Some(every),
        schedule: train::optim::Schedule::Cosine,
        warmup_ratio: 0.03,
        ..TrainConfig::default()
    };
    let run_dir = dir.join("reference");
    let report_path = run_dir.join("report.json");
    let train_seconds = if report_path.exists() {
        read_train_seconds(&report_path)?
    } else {
        tracing::info!("S2L: training the reference `{name}` on {} pairs, {total_steps} steps", data.examples.len());
        prepared.train(&train_config, &run_dir, true, progress)?.seconds
    };
    Ok(Cost {
        train_seconds,
        train_tokens: data.examples.iter().map(|e| e.ids.len()).sum::<usize>() * config.epochs,
        ..Cost::default()
    })
}

/// The losses of snapshot `step`: the whole pool's, or one shard's part.
fn losses_path(dir: &Path, step: usize, shard: Option<Shard>) -> PathBuf {
    let name = match shard {
        None => format!("step-{step:08}.parquet"),
        Some(s) => format!("step-{step:08}.shard-{}-of-{}.parquet", s.index, s.count),
    };
    dir.join("losses").join(name)
}

/// The shard stores of snapshot `step` (merging refuses those whose shard record is missing).
fn shard_parts(dir: &Path, step: usize) -> Result<Vec<PathBuf>> {
    losses_named(dir, &format!("step-{step:08}.shard-"), ".parquet")
}

/// The cost records the shards wrote, one per shard.
fn shard_costs(dir: &Path) -> Result<Vec<PathBuf>> {
    losses_named(dir, "shard-", ".cost.json")
}

/// Files of the `losses` folder whose names start and end as given, sorted.
fn losses_named(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir.join("losses")) else { return Ok(Vec::new()) };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    found.sort();
    Ok(found)
}

fn write_cost(path: &Path, cost: &Cost) -> Result<()> {
    let json = serde_json::to_string_pretty(cost).expect("plain data serialises");
    std::fs::write(path, json).map_err(|e| Error::io(path, e))
}

fn validate(config: &ReferenceConfig) -> Result<()> {
    let problem = if !(config.subset > 0.0 && config.subset <= 1.0) {
        Some(format!("subset {} must be in (0, 1]", config.subset))
    } else if config.epochs == 0 || config.checkpoints == 0 {
        Some("epochs and checkpoints must be at least 1".to_string())
    } else {
        None
    };
    problem.map_or(Ok(()), |p| Err(Error::Invalid(format!("selector `s2l`: {p}"))))
}

/// Losses of one tokenizer's tokens say nothing about another's: the reference must share
/// the target's vocabulary.
fn same_tokenizer_family(target: &LoadedModel, reference: &LoadedModel, target_name: &str, reference_name: &str) -> Result<()> {
    if target.tokenizer.vocabulary() != reference.tokenizer.vocabulary() {
        return Err(Error::Invalid(format!(
            "selector `s2l`: the reference model `{reference_name}` ({} tokens) has another tokenizer than the target \
             `{target_name}` ({} tokens); use a smaller model of the target's family",
            reference.tokenizer.vocab_size(),
            target.tokenizer.vocab_size()
        )));
    }
    Ok(())
}

fn read_train_seconds(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a training report: {e}")))?;
    Ok(report["seconds"].as_f64().unwrap_or(0.0))
}

fn read_cost(path: &Path) -> Result<Cost> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not an S2L cost record: {e}")))
}

fn step_column(step: usize) -> String {
    format!("step_{step:08}")
}

/// One row per candidate (`instruction_id`, `candidate`, `source`), one `step_NNNNNNNN`
/// column of mean losses per snapshot in step order; null where the pair was not scored.
fn write_table(path: &Path, pool: &Pool, t: &Trajectories) -> Result<()> {
    let rows: Vec<(usize, usize)> = pool
        .instructions
        .iter()
        .enumerate()
        .flat_map(|(i, ins)| (0..ins.candidates.len()).map(move |j| (i, j)))
        .collect();
    let mut columns = vec![
        Column::new("instruction_id".into(), rows.iter().map(|&(i, _)| pool.instructions[i].id.as_str()).collect::<Vec<_>>()),
        Column::new("candidate".into(), rows.iter().map(|&(_, j)| j as u32).collect::<Vec<u32>>()),
        Column::new(
            "source".into(),
            rows.iter().map(|&(i, j)| pool.instructions[i].candidates[j].source.as_str()).collect::<Vec<_>>(),
        ),
    ];
    for (c, &step) in t.steps.iter().enumerate() {
        let values: Vec<Option<f64>> = rows.iter().map(|&(i, j)| t.losses[i][j].as_ref().map(|l| l[c])).collect();
        columns.push(Column::new(step_column(step).into(), values));
    }
    let failed = |e: PolarsError| Error::format(path, format!("cannot write trajectories: {e}"));
    let mut df = DataFrame::new(rows.len(), columns).map_err(failed)?;
    let aside = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&aside).map_err(|e| Error::io(&aside, e))?;
    ParquetWriter::new(file).finish(&mut df).map_err(failed)?;
    std::fs::rename(&aside, path).map_err(|e| Error::io(path, e))
}

/// Reads a table `write_table` wrote for this same pool.
pub fn read_table(path: &Path, pool: &Pool, cost: Cost) -> Result<Trajectories> {
    let bad = |what: String| Error::format(path, format!("not a trajectories table for this pool: {what}"));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let df = ParquetReader::new(file).finish().map_err(|e| bad(e.to_string()))?;
    let mut steps: Vec<usize> = df
        .get_column_names()
        .iter()
        .filter_map(|n| n.strip_prefix("step_")?.parse().ok())
        .collect();
    steps.sort_unstable();
    if df.height() != pool.candidate_count() || steps.is_empty() {
        return Err(bad(format!("{} rows and {} step columns for {} candidates", df.height(), steps.len(), pool.candidate_count())));
    }
    let ids = df.column("instruction_id").and_then(|c| c.str().cloned()).map_err(|e| bad(e.to_string()))?;
    let values = steps
        .iter()
        .map(|&s| df.column(&step_column(s)).and_then(|c| c.f64().cloned()).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let mut row = 0;
    let mut losses = Vec::with_capacity(pool.instructions.len());
    for ins in &pool.instructions {
        let mut per_candidate = Vec::with_capacity(ins.candidates.len());
        for _ in &ins.candidates {
            if ids.get(row) != Some(ins.id.as_str()) {
                return Err(bad(format!("row {} is instruction {:?}, expected `{}`", row + 1, ids.get(row), ins.id)));
            }
            per_candidate.push(values.iter().map(|v| v.get(row)).collect::<Option<Vec<f64>>>());
            row += 1;
        }
        losses.push(per_candidate);
    }
    Ok(Trajectories { steps, losses, cost })
}
