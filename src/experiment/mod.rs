//! `harness run`: an experiment file becomes a graph of stages ([`graph`]) — pool → score →
//! select → train → eval → report — each stored under `runs/<experiment>/<kind>/<key>/` and
//! reused whenever its inputs hash the same (see [`stage`]). An executor runs the graph: in
//! this process ([`execute::run_local`]) or as Slurm jobs ([`slurm`]). A killed run resumes
//! with the next invocation: finished stages are read back, training continues from its last
//! checkpoint, score stores keep every batch.

pub mod config;
pub mod execute;
pub mod graph;
pub mod plan;
pub mod slurm;
pub mod stage;

use crate::eval::{self, sandbox, BenchmarkMetrics};
use crate::model;
use crate::pool::{self, Pool};
use crate::select::{self, Needs, StageTarget};
use crate::train;
use crate::{Error, Result};
pub use crate::select::SelectionCost;
pub use config::{Experiment, Variant};
use graph::Graph;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stage::Stage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `runs/<experiment>/` lives.
    pub runs_dir: PathBuf,
    pub progress: bool,
    /// Only gather what finished stages hold; compute nothing (`harness report`).
    pub report_only: bool,
    /// Run generated code even where the kernel cannot contain it (`--unsandboxed`).
    pub unsandboxed: bool,
}

/// A benchmark result in a table cell: percent, with its 95% interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub value: f64,
    pub ci95: (f64, f64),
    pub n: usize,
}

/// One row of the results: a target before fine-tuning, or fine-tuned on one selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// The sweep values of this run ("" without a sweep).
    pub variant: String,
    pub target: String,
    /// "Base", or the selector's label.
    pub label: String,
    pub selector: Option<String>,
    /// Benchmark name -> result; missing where the stage has not finished.
    pub metrics: BTreeMap<String, Cell>,
    /// Training examples the selection gave.
    pub examples: Option<usize>,
    pub train: Option<TrainSummary>,
    /// The training log (`train_log.jsonl`), for the loss-curve figure.
    pub train_log: Option<PathBuf>,
    /// What computing the selection's inputs cost: GRAPE's scoring pass, S2L's trajectories.
    pub selection_cost: Option<SelectionCost>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub weight_l2_distance: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub experiment: String,
    pub paper: Option<String>,
    pub benchmarks: Vec<String>,
    pub rows: Vec<ResultRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SelectSummary {
    picks: usize,
    flagged: usize,
    cost: Option<SelectionCost>,
}

/// Runs (or, with `report_only`, gathers) every stage of the experiment in `path`, in this
/// process.
pub fn run(path: &Path, options: &RunOptions) -> Result<Results> {
    let graph = checked_graph(path, &options.runs_dir)?;
    if !options.report_only {
        execute::run_local(&graph, options)?;
    }
    gather(&graph)
}

/// The graph of an experiment whose inputs must all be here (to run or to report it).
pub fn checked_graph(path: &Path, runs_dir: &Path) -> Result<Graph> {
    let experiment = Experiment::load(path)?;
    let models_dir = model::pull::local_models_dir().unwrap_or_default();
    experiment.check_inputs(path, &pool::data_dir().join("pools"), &models_dir)?;
    let graph = Graph::build(path, runs_dir)?;
    graph.require_keys()?;
    std::fs::create_dir_all(&graph.root).map_err(|e| Error::io(&graph.root, e))?;
    Ok(graph)
}

/// The results table from what the graph's finished stages hold; a row's cells stay empty
/// where its stages have not finished.
pub fn gather(graph: &Graph) -> Result<Results> {
    let done = |at: Option<usize>| at.and_then(|a| graph.nodes[a].stage(&graph.root)).filter(Stage::is_done);
    let mut rows = Vec::new();
    for spec in &graph.rows {
        let variant = &graph.variants[spec.variant];
        let mut row = ResultRow {
            variant: variant.label.clone(),
            target: variant.targets[spec.target].name.clone(),
            label: spec.label.clone(),
            selector: spec.selector.clone(),
            metrics: BTreeMap::new(),
            examples: None,
            train: None,
            train_log: None,
            selection_cost: None,
        };
        if let Some(select) = done(spec.select) {
            let summary: SelectSummary = select.summary()?;
            row.examples = Some(summary.picks);
            row.selection_cost = summary.cost;
        }
        if let Some(train) = spec.train.and_then(|a| graph.nodes[a].stage(&graph.root)) {
            row.train_log = Some(train.dir.join("train_log.jsonl"));
            if train.is_done() {
                row.train = Some(train.summary()?);
            }
        }
        if let Some(eval) = done(Some(spec.eval)) {
            row.metrics = eval.summary()?;
        }
        rows.push(row);
    }
    Ok(Results { experiment: graph.name.clone(), paper: graph.paper.clone(), benchmarks: graph.benchmarks.clone(), rows })
}

// What each stage's key hashes; `plan` computes the same keys to tell what is cached.

fn score_inputs(exp: &Experiment, fingerprint: &str, pool_key: &str) -> serde_json::Value {
    json!({"model": fingerprint, "pool": pool_key, "scoring": exp.scoring})
}

fn select_inputs(
    exp: &Experiment,
    spec: &config::SelectorSpec,
    target_name: &str,
    selector: &dyn select::Selector,
    needs: &Needs,
    target: &StageTarget,
    pool_key: &str,
) -> serde_json::Value {
    let mut inputs = json!({"selector": spec.name, "params": spec.params_for(target_name), "seed": exp.seed, "pool": pool_key});
    if let Some(defaults) = selector.defaults() {
        inputs["defaults"] = defaults;
    }
    match needs {
        Needs::Nothing => {}
        Needs::Scores => inputs["scores"] = json!(Stage::key_of(&score_inputs(exp, target.fingerprint, pool_key))),
        Needs::Stage(stage) => inputs[stage.kind()] = stage.key_inputs(target),
    }
    inputs
}

/// The training settings a run uses: the experiment's seed offset by `training.seed`.
pub(crate) fn training_config(exp: &Experiment) -> train::TrainConfig {
    let mut training = exp.training.clone();
    training.seed = exp.seed.wrapping_add(training.seed);
    training
}

fn train_inputs(exp: &Experiment, fingerprint: &str, select_key: &str) -> Result<serde_json::Value> {
    let training = training_config(exp);
    let mut inputs = json!({"model": fingerprint, "selection": select_key, "training": training});
    if !training.engine.is_native() {
        // The engine's pinned environment and script decide its numbers too.
        inputs["engine"] = json!(train::engine::fingerprint(&training)?);
    }
    Ok(inputs)
}

fn eval_inputs(exp: &Experiment, model_key: &str, bench_key: &[String]) -> serde_json::Value {
    json!({"model": model_key, "benchmarks": bench_key, "evaluation": exp.evaluation, "seed": exp.seed})
}

/// sha256 of each benchmark file: editing a prompt or grader re-evaluates.
fn bench_key(benches: &[eval::benchmark::Benchmark]) -> Result<Vec<String>> {
    benches
        .iter()
        .map(|b| {
            let spec = std::fs::read(&b.spec_path).map_err(|e| Error::io(&b.spec_path, e))?;
            let spec = crate::util::sha256_bytes(&spec);
            // Code verdicts changed meaning once: evaluations graded before are not reused.
            Ok(match b.spec.grader {
                eval::benchmark::Grader::Code { .. } => {
                    crate::util::sha256_bytes(format!("{spec}\0{}", sandbox::VERDICTS).as_bytes())
                }
                _ => spec,
            })
        })
        .collect()
}

/// The pool file an experiment names: as written, else under `HARNESS_DATA_DIR/pools`.
fn pool_path(exp: &Experiment) -> PathBuf {
    config::resolve(&exp.pool.path, &pool::data_dir().join("pools"))
}

/// The pool as the stages see it: read, then cut to `limit_instructions`.
fn read_pool(exp: &Experiment, path: &Path) -> Result<Pool> {
    let pool = pool::read(path, &exp.pool.columns, exp.pool.strict)?;
    Ok(match exp.pool.limit_instructions {
        Some(n) => pool.truncated(n),
        None => pool,
    })
}

/// A target's model as the loader takes it: a built-in name, or a path (relative ones also
/// looked up in `HARNESS_MODELS_DIR`).
fn model_ref(target: &config::Target) -> String {
    let models_dir = model::pull::local_models_dir().unwrap_or_default();
    config::resolve(&target.model, &models_dir).to_string_lossy().into_owned()
}


pub(crate) fn cell(m: &BenchmarkMetrics) -> Cell {
    Cell { value: 100.0 * m.score.value, ci95: (100.0 * m.score.ci95.0, 100.0 * m.score.ci95.1), n: m.score.n }
}
