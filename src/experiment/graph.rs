//! An experiment as one explicit graph of stages, built from the file without loading any
//! weights: what the dry run prints, what the local and Slurm executors run, and what
//! `harness stage run` finds a stage in. Each stage has a kind, the key of its inputs (the
//! hash that names its folder, as before the graph existed, so `runs/` folders are reused),
//! the stages it reads, and what it asks of a cluster. What a selector needs becomes a stage
//! it reads: the scores, or a stage of its own ([`InputStage`]).

use super::config::{self, Resources};
use super::stage::Stage;
use super::{Experiment, Variant};
use crate::eval::benchmark::Benchmark;
use crate::model::{self, LoadOptions, LoadedModel};
use crate::pool::{self, Pool};
use crate::select::{self, InputStage, Needs, StageTarget};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Stage kinds every experiment has; a selector's own stage adds its kind.
const KINDS: [&str; 5] = ["score", "select", "train", "eval", "report"];

pub struct Graph {
    pub name: String,
    pub paper: Option<String>,
    pub benchmarks: Vec<String>,
    /// The experiment file, as given.
    pub path: PathBuf,
    /// `runs/<experiment>/`.
    pub root: PathBuf,
    pub variants: Vec<VariantInputs>,
    /// In dependency order: a stage comes after every stage it reads.
    pub nodes: Vec<Node>,
    /// The rows of the results table and the stages that fill them.
    pub rows: Vec<RowSpec>,
}

pub struct Node {
    pub kind: &'static str,
    /// sha256 of the stage's inputs; `None` where one is not on this machine (a dry run).
    pub key: Option<String>,
    pub inputs: Option<Value>,
    /// Indices of the stages it reads.
    pub reads: Vec<usize>,
    /// `--shard i/N` parts it runs as before its merge (1: not sharded).
    pub shards: usize,
    pub resources: Resources,
    /// `[target / row] kind`, for logs and job names.
    pub label: String,
    pub variant: usize,
    pub work: Work,
}

/// What running a stage does, and for whom.
#[derive(Clone)]
pub enum Work {
    /// Every candidate's score under the target.
    Score { target: usize },
    /// A stage a selector needs for this target.
    Needed { target: usize, stage: Arc<dyn InputStage> },
    Select { target: usize, selector: usize },
    /// Fine-tuning the target on the selection the stage reads.
    Train { target: usize },
    /// The benchmarks, on the target as it is or on the model the stage reads.
    Eval { target: usize, trained: bool },
    /// The results table of every evaluation.
    Report,
}

/// One row of the results: a target before fine-tuning, or fine-tuned on one selection.
pub struct RowSpec {
    pub variant: usize,
    pub target: usize,
    pub label: String,
    pub selector: Option<String>,
    pub select: Option<usize>,
    pub train: Option<usize>,
    pub eval: usize,
}

/// What one run of the experiment reads: its settings, pool, benchmarks and targets.
pub struct VariantInputs {
    pub label: String,
    pub experiment: Experiment,
    pub pool_path: PathBuf,
    /// `None` where the pool file is not here.
    pub pool: Option<Pool>,
    pub pool_key: Option<String>,
    pub benches: std::result::Result<Vec<Benchmark>, String>,
    pub bench_key: Option<Vec<String>>,
    pub targets: Vec<TargetInputs>,
}

pub struct TargetInputs {
    pub name: String,
    /// What the loader takes: a built-in name or a path.
    pub model: String,
    /// The target's `reference`, resolved.
    pub reference: Option<String>,
    pub load: LoadOptions,
    /// Config, tokenizer and weight digest, read without the weights; why not, if not here.
    pub inspected: std::result::Result<LoadedModel, String>,
    /// What names the target's stages: its weights' digest and how it runs.
    pub fingerprint: Option<String>,
}

impl Node {
    /// The stage's folder: `runs/<experiment>/<kind>/<key>` (`report/` for the report).
    pub fn stage(&self, root: &Path) -> Option<Stage> {
        self.key.as_ref().map(|key| Stage::with_key(root, self.kind, key))
    }

    pub fn target(&self) -> Option<usize> {
        match self.work {
            Work::Score { target }
            | Work::Needed { target, .. }
            | Work::Select { target, .. }
            | Work::Train { target }
            | Work::Eval { target, .. } => Some(target),
            Work::Report => None,
        }
    }
}

impl Graph {
    /// The graph of the experiment in `path` with stage folders under `runs_dir`. Inputs
    /// that are not here leave their stages without keys (see [`Graph::require_keys`]).
    pub fn build(path: &Path, runs_dir: &Path) -> Result<Graph> {
        let experiment = Experiment::load(path)?;
        let variants = experiment.expand().map_err(|e| Error::format(path, e))?;
        let root = runs_dir.join(&experiment.name);
        let mut graph = Graph {
            name: experiment.name.clone(),
            paper: experiment.paper.clone(),
            benchmarks: experiment.evaluation.benchmarks.clone(),
            path: path.to_path_buf(),
            root,
            variants: Vec::new(),
            nodes: Vec::new(),
            rows: Vec::new(),
        };
        let mut index = HashMap::new();
        for variant in variants {
            let inputs = VariantInputs::read(variant)?;
            graph.variants.push(inputs);
            graph.add_variant(graph.variants.len() - 1, &mut index)?;
        }
        let evals = graph.nodes.iter().enumerate().filter(|(_, n)| n.kind == "eval").map(|(i, _)| i).collect();
        let report = Node {
            kind: "report",
            key: None,
            inputs: None,
            reads: evals,
            shards: 1,
            resources: resources_of(&experiment, "report"),
            label: "report".into(),
            variant: 0,
            work: Work::Report,
        };
        graph.nodes.push(report);
        graph.check_resources(&experiment)?;
        Ok(graph)
    }

    fn add_variant(&mut self, v: usize, index: &mut HashMap<(&'static str, String), usize>) -> Result<()> {
        let inputs = &self.variants[v];
        let exp = inputs.experiment.clone();
        let pool_key = inputs.pool_key.clone();
        let bench_key = inputs.bench_key.clone();
        let targets: Vec<(String, Option<String>, Option<String>, String)> = inputs
            .targets
            .iter()
            .map(|t| (t.name.clone(), t.fingerprint.clone(), t.reference.clone(), t.model.clone()))
            .collect();
        let mut add = |nodes: &mut Vec<Node>, node: Node| -> usize {
            if let Some(key) = &node.key {
                if let Some(&at) = index.get(&(node.kind, key.clone())) {
                    return at;
                }
                index.insert((node.kind, key.clone()), nodes.len());
            }
            nodes.push(node);
            nodes.len() - 1
        };
        let node = |kind: &'static str, inputs: Option<Value>, reads: Vec<usize>, label: String, work: Work| Node {
            kind,
            key: inputs.as_ref().map(Stage::key_of),
            inputs,
            reads,
            shards: 1,
            resources: resources_of(&exp, kind),
            label,
            variant: v,
            work,
        };
        for (t, (name, fingerprint, reference, model_ref)) in targets.iter().enumerate() {
            let keys = fingerprint.as_deref().zip(pool_key.as_deref());
            if exp.evaluation.base {
                let inputs = fingerprint.as_deref().zip(bench_key.as_ref()).map(|(f, b)| super::eval_inputs(&exp, f, b));
                let mut eval = node("eval", inputs, vec![], format!("[{name} / Base] eval"), Work::Eval { target: t, trained: false });
                eval.shards = shards_of(&exp, "eval");
                let at = add(&mut self.nodes, eval);
                self.rows.push(RowSpec { variant: v, target: t, label: "Base".into(), selector: None, select: None, train: None, eval: at });
            }
            for (s, spec) in exp.selectors.iter().enumerate() {
                let row = spec.label_for(name);
                let selector = select::build(&spec.name, &spec.params_for(name))?;
                let needs = selector.needs();
                let stage_target = fingerprint.as_deref().map(|f| StageTarget { model: model_ref, fingerprint: f, reference: reference.as_deref() });
                let mut reads = Vec::new();
                match &needs {
                    Needs::Nothing => {}
                    Needs::Scores => {
                        let inputs = keys.map(|(f, p)| super::score_inputs(&exp, f, p));
                        let mut score = node("score", inputs, vec![], format!("[{name}] score"), Work::Score { target: t });
                        score.shards = shards_of(&exp, "score");
                        reads.push(add(&mut self.nodes, score));
                    }
                    Needs::Stage(stage) => {
                        let inputs = stage_target.zip(pool_key.as_deref()).map(|(target, p)| needed_inputs(stage.as_ref(), &target, p, exp.seed));
                        let label = format!("[{name} / {row}] {}", stage.kind());
                        let mut needed = node(stage.kind(), inputs, vec![], label, Work::Needed { target: t, stage: stage.clone() });
                        if stage.shardable() {
                            needed.shards = shards_of(&exp, stage.kind());
                        }
                        reads.push(add(&mut self.nodes, needed));
                    }
                }
                let inputs = stage_target
                    .zip(pool_key.as_deref())
                    .map(|(target, p)| super::select_inputs(&exp, spec, name, selector.as_ref(), &needs, &target, p));
                let select_node = node("select", inputs, reads, format!("[{name} / {row}] select"), Work::Select { target: t, selector: s });
                let select_at = add(&mut self.nodes, select_node);
                let select_key = self.nodes[select_at].key.clone();
                let inputs = fingerprint.as_deref().zip(select_key.as_deref()).map(|(f, k)| super::train_inputs(&exp, f, k)).transpose()?;
                let train = node("train", inputs, vec![select_at], format!("[{name} / {row}] train"), Work::Train { target: t });
                let train_at = add(&mut self.nodes, train);
                let train_key = self.nodes[train_at].key.clone();
                let inputs = train_key.as_deref().zip(bench_key.as_ref()).map(|(k, b)| super::eval_inputs(&exp, k, b));
                let mut eval = node("eval", inputs, vec![train_at], format!("[{name} / {row}] eval"), Work::Eval { target: t, trained: true });
                eval.shards = shards_of(&exp, "eval");
                let eval_at = add(&mut self.nodes, eval);
                self.rows.push(RowSpec {
                    variant: v,
                    target: t,
                    label: row,
                    selector: Some(spec.name.clone()),
                    select: Some(select_at),
                    train: Some(train_at),
                    eval: eval_at,
                });
            }
        }
        Ok(())
    }

    /// A `resources:` entry must name a kind of stage this experiment has (or `default`),
    /// and only stages that can be split take `shards`.
    fn check_resources(&self, exp: &Experiment) -> Result<()> {
        let mut kinds: Vec<&str> = KINDS.to_vec();
        kinds.extend(self.nodes.iter().map(|n| n.kind).filter(|k| !KINDS.contains(k)));
        kinds.dedup();
        let splittable = |kind: &str| match kind {
            "score" | "eval" => true,
            other => self.nodes.iter().any(|n| n.kind == other && matches!(&n.work, Work::Needed { stage, .. } if stage.shardable())),
        };
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        for (kind, r) in &exp.resources {
            let at = |what: String| Error::format(&self.path, format!("{}{what}", config::line_of(&text, &format!("{kind}:"))));
            if kind != "default" && !kinds.contains(&kind.as_str()) {
                return Err(at(format!("resources.{kind}: no stage of this kind here (expected default or one of: {})", kinds.join(", "))));
            }
            if r.shards.is_some_and(|n| n > 1) && !splittable(kind) {
                return Err(at(format!("resources.{kind}.shards: {kind} stages cannot be split into shards")));
            }
        }
        Ok(())
    }

    /// Every stage's key, or an error naming the input that is not on this machine.
    pub fn require_keys(&self) -> Result<()> {
        for variant in &self.variants {
            if variant.pool.is_none() {
                return Err(Error::Invalid(format!("the pool {} is not here", variant.pool_path.display())));
            }
            if let Err(e) = &variant.benches {
                return Err(Error::Invalid(format!("benchmarks: {e}")));
            }
            for t in &variant.targets {
                if let Err(e) = &t.inspected {
                    return Err(Error::Invalid(format!("target `{}`: {e}", t.name)));
                }
            }
        }
        Ok(())
    }

    /// The stage whose key starts with `key` (16 hex digits, as its folder is named, or more).
    pub fn find(&self, key: &str) -> Result<usize> {
        let found: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.key.as_deref().is_some_and(|k| key.len() >= 8 && k.starts_with(key)))
            .map(|(i, _)| i)
            .collect();
        match (found.as_slice(), key) {
            ([one], _) => Ok(*one),
            (_, "report") => Ok(self.nodes.len() - 1),
            ([], _) => Err(Error::Invalid(format!(
                "no stage of {} has the key `{key}` (`harness run {} --dry-run` lists them)",
                self.path.display(),
                self.path.display()
            ))),
            (_, _) => Err(Error::Invalid(format!("the key `{key}` names {} stages; give more of it", found.len()))),
        }
    }

    /// Which stages are still to run: unfinished ones that the report needs, directly or
    /// through an unfinished stage reading them. (A stage whose readers all finished is left
    /// alone, like trajectories cached under an older key beneath a finished selection.)
    pub fn to_run(&self) -> Vec<bool> {
        // Readers come after what they read, so one pass backwards settles every stage.
        let mut wanted: Vec<bool> = self.nodes.iter().map(|n| matches!(n.work, Work::Report)).collect();
        let mut needed = vec![false; self.nodes.len()];
        for (at, node) in self.nodes.iter().enumerate().rev() {
            needed[at] = wanted[at] && !node.stage(&self.root).is_some_and(|s| s.is_done());
            if needed[at] {
                node.reads.iter().for_each(|&r| wanted[r] = true);
            }
        }
        needed
    }

    pub fn variant_of(&self, node: &Node) -> &VariantInputs {
        &self.variants[node.variant]
    }
}

/// The inputs of a selector's own stage: its settings for the target, the pool, the seed.
fn needed_inputs(stage: &dyn InputStage, target: &StageTarget, pool_key: &str, seed: u64) -> Value {
    serde_json::json!({"stage": stage.kind(), "inputs": stage.key_inputs(target), "pool": pool_key, "seed": seed})
}

fn resources_of(exp: &Experiment, kind: &str) -> Resources {
    let base = exp.resources.get("default").cloned().unwrap_or_default();
    exp.resources.get(kind).cloned().unwrap_or_default().over(&base)
}

fn shards_of(exp: &Experiment, kind: &str) -> usize {
    exp.resources.get(kind).and_then(|r| r.shards).unwrap_or(1).max(1)
}

impl VariantInputs {
    /// Reads what one run needs from disk; what is missing is recorded, not fatal.
    fn read(variant: Variant) -> Result<Self> {
        let exp = variant.experiment;
        let pool_path = super::pool_path(&exp);
        let pool = if pool_path.exists() { Some(super::read_pool(&exp, &pool_path)?) } else { None };
        let pool_key = pool.as_ref().map(Pool::digest);
        let benches = crate::eval::load_benchmarks(
            &exp.evaluation.benchmarks,
            &crate::eval::benchmark::eval_dir(),
            &pool::data_dir().join("eval"),
        )
        .map_err(|e| e.to_string());
        let bench_key = benches.as_ref().ok().map(|b| super::bench_key(b)).transpose()?;
        let models_dir = model::pull::local_models_dir().unwrap_or_default();
        let targets = exp
            .targets
            .iter()
            .map(|t| {
                let model = super::model_ref(t);
                let inspected = model::inspect_fingerprinted(&model, t.template.as_deref()).map_err(|e| e.to_string());
                TargetInputs {
                    fingerprint: inspected.as_ref().ok().and_then(|m| m.fingerprint().ok()),
                    name: t.name.clone(),
                    reference: t.reference.as_ref().map(|r| config::resolve(r, &models_dir).to_string_lossy().into_owned()),
                    load: LoadOptions { template: t.template.clone(), ..LoadOptions::default() },
                    model,
                    inspected,
                }
            })
            .collect();
        Ok(VariantInputs { label: variant.label, experiment: exp, pool_path, pool, pool_key, benches, bench_key, targets })
    }
}
