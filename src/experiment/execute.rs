//! Running one stage of the graph in its folder: the work of each kind, refused until the
//! stages it reads have finished, resumed where its own code can, and marked `DONE` last.
//! A split stage runs as `--shard i/N` parts, each marked finished in `shards/`, and then
//! as its merge. The local executor, the Slurm executor's jobs and `harness stage run` all
//! come here.

use super::graph::{Graph, Node, Work};
use super::stage::Stage;
use super::{cell, training_config, Cell, RunOptions, SelectSummary, TrainSummary};
use crate::eval::{self, sandbox, Answers, EvalOptions};
use crate::model::{self, LoadOptions};
use crate::score::{self, shard::ShardRecord, Overflow, ScoreOptions, ScoreStore};
use crate::select::{self, Needs, SelectInput, SelectionCost, StageJob, StageTarget};
use crate::shard::Shard;
use crate::train::{Examples, Prepared};
use crate::{Error, Result};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Runs every stage that has not finished, in dependency order, in this process: split
/// stages part by part, then their merge.
pub fn run_local(graph: &Graph, options: &RunOptions) -> Result<()> {
    let to_run = graph.to_run();
    for (at, node) in graph.nodes.iter().enumerate() {
        let Some(stage) = node.stage(&graph.root) else { continue };
        if !stage.is_done() && !to_run[at] {
            continue;
        }
        if !stage.is_done() && node.shards > 1 {
            for index in 0..node.shards {
                run_stage(graph, at, Some(Shard { index, count: node.shards }), options)?;
            }
        }
        run_stage(graph, at, None, options)?;
    }
    Ok(())
}

/// Runs stage `at` of the graph, or its part `shard`, unless it has finished. An error is
/// also kept in the stage folder (`FAILED`) for `harness status`.
pub fn run_stage(graph: &Graph, at: usize, shard: Option<Shard>, options: &RunOptions) -> Result<()> {
    let node = &graph.nodes[at];
    if matches!(node.work, Work::Report) {
        return Err(Error::Invalid("the report has no stage folder: `harness report` writes it".into()));
    }
    let stage = node
        .stage(&graph.root)
        .ok_or_else(|| Error::Invalid(format!("{}: its inputs are not all on this machine", node.label)))?;
    if stage.is_done() {
        return stage.reused();
    }
    for &read in &node.reads {
        let input = &graph.nodes[read];
        if !input.stage(&graph.root).is_some_and(|s| s.is_done()) {
            return Err(Error::Invalid(format!(
                "{} reads {}/{}, which has not finished: run that stage first",
                node.label,
                input.kind,
                short(input)
            )));
        }
    }
    match shard {
        Some(_) if node.shards == 1 => {
            return Err(Error::Invalid(format!("{} is not split into shards (resources.{}.shards)", node.label, node.kind)))
        }
        Some(s) if s.count != node.shards => {
            return Err(Error::Invalid(format!(
                "{} is split into {} shards (resources.{}.shards), not {}",
                node.label, node.shards, node.kind, s.count
            )))
        }
        Some(s) if stage.shard_summary::<Value>(s).is_some() => return stage.reused(),
        None if node.shards > 1 => {
            let missing: Vec<String> = (0..node.shards)
                .map(|index| Shard { index, count: node.shards })
                .filter(|&s| stage.shard_summary::<Value>(s).is_none())
                .map(|s| s.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: shard(s) {} not finished; run `harness stage run {} {} --shard i/{}` for each",
                    node.label,
                    missing.join(", "),
                    graph.path.display(),
                    short(node),
                    node.shards
                )));
            }
        }
        _ => {}
    }
    let started = Instant::now();
    stage.start(node.inputs.as_ref().expect("a keyed stage has inputs"))?;
    stage.clear_failure(shard);
    match shard {
        Some(s) => tracing::info!("{} shard {s}", node.label),
        None => tracing::info!("{}", node.label),
    }
    let work = StageWork { graph, node, stage: &stage, shard, options };
    let summary = work.run().inspect_err(|e| stage.record_failure(shard, &e.to_string()))?;
    let seconds = started.elapsed().as_secs_f64();
    match shard {
        Some(s) => stage.finish_shard(s, &summary, seconds),
        None => {
            stage.finish(&summary, seconds)?;
            if matches!(node.work, Work::Train { .. }) {
                // A finished run is never resumed: its optimiser checkpoints (12 bytes a
                // parameter each; 17 GB for the quickstart) go, the exported model stays.
                for dir in [stage.dir.join("checkpoints"), stage.dir.join("engine/checkpoints")] {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Ok(())
        }
    }
}

/// The 16 hex digits that name a stage's folder.
pub fn short(node: &Node) -> &str {
    node.key.as_deref().map_or("-", |k| &k[..16])
}

/// One run of one stage (or one of its parts).
struct StageWork<'a> {
    graph: &'a Graph,
    node: &'a Node,
    stage: &'a Stage,
    shard: Option<Shard>,
    options: &'a RunOptions,
}

impl StageWork<'_> {
    fn run(&self) -> Result<Value> {
        let summary = match &self.node.work {
            Work::Score { target } => to_value(self.score(*target)?),
            Work::Needed { target, stage } => {
                let (variant, t) = self.target(*target);
                let job = StageJob {
                    target: StageTarget {
                        model: &t.model,
                        fingerprint: t.fingerprint.as_deref().expect("keyed"),
                        reference: t.reference.as_deref(),
                    },
                    load: &t.load,
                    pool: self.pool(),
                    seed: variant.experiment.seed,
                    dir: &self.stage.dir,
                    shard: self.shard,
                    progress: self.options.progress,
                };
                to_value(stage.run(&job)?)
            }
            Work::Select { target, selector } => to_value(self.select(*target, *selector)?),
            Work::Train { target } => to_value(self.train(*target)?),
            Work::Eval { target, trained } => to_value(self.eval(*target, *trained)?),
            Work::Report => unreachable!("refused by run_stage"),
        };
        Ok(summary)
    }

    fn target(&self, t: usize) -> (&super::graph::VariantInputs, &super::graph::TargetInputs) {
        let variant = self.graph.variant_of(self.node);
        (variant, &variant.targets[t])
    }

    fn pool(&self) -> &crate::pool::Pool {
        self.graph.variant_of(self.node).pool.as_ref().expect("a keyed stage has its pool")
    }

    /// The stage that the node reads first (its only input, for select, train and eval).
    fn input(&self) -> Stage {
        self.graph.nodes[self.node.reads[0]].stage(&self.graph.root).expect("checked finished")
    }

    fn score_options(&self) -> ScoreOptions {
        let spec = &self.graph.variant_of(self.node).experiment.scoring;
        ScoreOptions {
            max_len: spec.max_len,
            batch_tokens: spec.batch_tokens,
            share_prefix: spec.share_prefix,
            keep_token_logprobs: false,
            overflow: if spec.overflow == "skip" { Overflow::Skip } else { Overflow::Truncate },
            progress: self.options.progress,
        }
    }

    /// Every candidate's score into `scores.parquet`; a part's into `shards/`, which the
    /// merge joins (scores already stored are served, so a cut-off run resumes).
    fn score(&self, t: usize) -> Result<SelectionCost> {
        let (variant, target) = self.target(t);
        let pool = self.pool();
        let loaded = model::load(&target.model, &target.load)?;
        let scorer = match &variant.experiment.scoring.template {
            Some(name) => loaded.with_template(name)?,
            None => loaded,
        };
        let fingerprint = scorer.fingerprint()?;
        let options = self.score_options();
        let part_path = |s: Shard| self.stage.shards_dir().join(format!("scores.shard-{}-of-{}.parquet", s.index, s.count));
        let started = Instant::now();
        let (path, part) = match self.shard {
            Some(s) => (part_path(s), Cow::Owned(s.of(pool))),
            None => (self.stage.dir.join("scores.parquet"), Cow::Borrowed(pool)),
        };
        let shards: Vec<Shard> = (0..self.node.shards).map(|index| Shard { index, count: self.node.shards }).collect();
        if self.shard.is_none() && shards.len() > 1 {
            score::shard::merge(&shards.iter().map(|&s| part_path(s)).collect::<Vec<_>>(), &path)?;
        } else if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut store = ScoreStore::open(&path, &fingerprint)?;
        let scored = score::score_stored(&scorer, &part.groups(), &options, &mut store);
        store.compact()?;
        let (scores, _) = scored?;
        if let Some(s) = self.shard {
            let record = ShardRecord { shard: s, pool: pool.digest(), fingerprint, instructions: part.instructions.len() };
            score::shard::write_record(&path, &record)?;
        }
        let seconds = if self.shard.is_none() && shards.len() > 1 {
            shards.iter().filter_map(|&s| self.stage.shard_summary::<SelectionCost>(s)).map(|c| c.seconds).sum()
        } else {
            started.elapsed().as_secs_f64()
        };
        Ok(SelectionCost {
            forward_tokens: scores.iter().flatten().flatten().map(|s| s.n_tokens).sum::<usize>()
                + score::prompt_tokens(&scorer, &part)?,
            train_tokens: 0,
            seconds,
        })
    }

    fn select(&self, t: usize, s: usize) -> Result<SelectSummary> {
        let (variant, target) = self.target(t);
        let exp = &variant.experiment;
        let pool = self.pool();
        let spec = &exp.selectors[s];
        let selector = select::build(&spec.name, &spec.params_for(&target.name))?;
        let needs = selector.needs();
        let scores = match &needs {
            Needs::Scores => {
                // The stored scores, read without loading the weights.
                let inspected = target.inspected.as_ref().map_err(|e| Error::Invalid(e.clone()))?;
                let scorer = match &exp.scoring.template {
                    Some(name) => inspected.with_template(name)?,
                    None => inspected.clone(),
                };
                let store = ScoreStore::open(&self.input().dir.join("scores.parquet"), &scorer.fingerprint()?)?;
                Some(score::lookup(&store, &pool.groups(), &self.score_options().fitted(&scorer)).0)
            }
            _ => None,
        };
        let needed_dir: Option<PathBuf> = matches!(needs, Needs::Stage(_)).then(|| self.input().dir);
        let input = SelectInput { pool, scores: scores.as_deref(), stage: needed_dir.as_deref(), seed: exp.seed };
        let selection = selector.select(&input)?;
        select::write(&selection, pool, &self.stage.dir)?;
        let cost = match needs {
            Needs::Nothing => None,
            _ => Some(self.input().summary::<SelectionCost>()?),
        };
        Ok(SelectSummary { picks: selection.picks.len(), flagged: selection.flagged.len(), cost })
    }

    /// Fine-tunes the target on the selection it reads, resuming from the last checkpoint.
    fn train(&self, t: usize) -> Result<TrainSummary> {
        let (variant, target) = self.target(t);
        let training = training_config(&variant.experiment);
        let data = self.input().dir.join("sft.jsonl");
        let load = training.load_options(&target.load);
        let prepared = Prepared::load(&target.model, &load, Examples::File(&data), training.max_len)?;
        let report = prepared.train(&training, &self.stage.dir, true, self.options.progress)?;
        Ok(TrainSummary {
            steps: report.steps,
            first_loss: report.first_loss,
            final_loss: report.final_loss,
            weight_l2_distance: report.weight_l2_distance,
            seconds: report.seconds,
            tokens_per_second: report.tokens_per_second,
        })
    }

    /// The benchmarks on the target as it is, or on the model the training stage exported;
    /// a part's items into `shards/`, which the merge joins and grades as one.
    fn eval(&self, t: usize, trained: bool) -> Result<BTreeMap<String, Cell>> {
        let (variant, target) = self.target(t);
        let exp = &variant.experiment;
        let benches = variant.benches.as_ref().map_err(|e| Error::Invalid(e.clone()))?;
        let part_dir = |s: Shard| self.stage.shards_dir().join(format!("shard-{}-of-{}", s.index, s.count));
        let metrics = if self.shard.is_none() && self.node.shards > 1 {
            let parts: Vec<PathBuf> = (0..self.node.shards).map(|index| part_dir(Shard { index, count: self.node.shards })).collect();
            eval::merge(&parts, &self.stage.dir)?
        } else {
            let loaded = if trained {
                model::load(&self.input().dir.join("model").to_string_lossy(), &LoadOptions::default())?
            } else {
                model::load(&target.model, &target.load)?
            };
            let config = sandbox::SandboxConfig {
                timeout: std::time::Duration::from_secs_f64(exp.evaluation.timeout),
                unsandboxed: self.options.unsandboxed,
                ..Default::default()
            };
            let sandbox = eval::sandbox_for(benches, config)?;
            let options = EvalOptions {
                limit: exp.evaluation.limit,
                samples: exp.evaluation.samples,
                max_new_tokens: exp.evaluation.max_new_tokens,
                batch_size: exp.evaluation.batch_size,
                seed: exp.seed,
                shard: self.shard,
                progress: self.options.progress,
                ..EvalOptions::default()
            };
            let out = self.shard.map_or_else(|| self.stage.dir.clone(), part_dir);
            eval::evaluate(Answers::Model(&loaded), benches, sandbox.as_ref(), &options, &out)?
        };
        Ok(metrics.iter().map(|m| (m.benchmark.clone(), cell(m))).collect())
    }
}

fn to_value(summary: impl serde::Serialize) -> Value {
    serde_json::to_value(summary).expect("plain data serialises")
}
