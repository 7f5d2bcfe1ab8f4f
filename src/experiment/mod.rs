//! `harness run`: an experiment file becomes stages — pool → score → select → train → eval →
//! report — each stored under `runs/<experiment>/<stage>/<key>/` and reused whenever its inputs
//! hash the same (see [`stage`]). A killed run resumes with the next invocation: finished stages
//! are read back, training continues from its last checkpoint, score stores keep every batch.

pub mod config;
pub mod plan;
pub mod stage;

use crate::eval::{self, sandbox, Answers, BenchmarkMetrics, EvalOptions};
use crate::model::{self, LoadOptions, LoadedModel};
use crate::pool::{self, Pool};
use crate::score::{self, Overflow, Score, ScoreOptions, ScoreStore};
use crate::select::{self, s2l, Needs, SelectInput};
use crate::train::{self, Trainable};
use crate::{Error, Result};
pub use config::{Experiment, Variant};
use serde::{Deserialize, Serialize};
use serde_json::json;
use stage::Stage;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SelectionCost {
    /// Forward-only work: scoring, and S2L's per-snapshot losses.
    pub forward_tokens: usize,
    /// S2L's reference training (forward and backward).
    pub train_tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub experiment: String,
    pub paper: Option<String>,
    pub benchmarks: Vec<String>,
    pub rows: Vec<ResultRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SelectSummary {
    picks: usize,
    flagged: usize,
    cost: Option<SelectionCost>,
}

/// Runs (or, with `report_only`, gathers) every stage of the experiment in `path`.
pub fn run(path: &Path, options: &RunOptions) -> Result<Results> {
    let experiment = Experiment::load(path)?;
    let models_dir = model::pull::local_models_dir().unwrap_or_default();
    experiment.check_inputs(path, &pool::data_dir().join("pools"), &models_dir)?;
    let variants = experiment.expand().map_err(|e| Error::format(path, e))?;
    let root = options.runs_dir.join(&experiment.name);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let mut rows = Vec::new();
    for variant in &variants {
        if !variant.label.is_empty() {
            tracing::info!("run {}", variant.label);
        }
        rows.extend(Runner::new(variant, &root, options)?.run()?);
    }
    Ok(Results {
        experiment: experiment.name.clone(),
        paper: experiment.paper.clone(),
        benchmarks: experiment.evaluation.benchmarks.clone(),
        rows,
    })
}

// What each stage's key hashes; `plan` computes the same keys to tell what is cached.

fn score_inputs(exp: &Experiment, fingerprint: &str, pool_key: &str) -> serde_json::Value {
    json!({"model": fingerprint, "pool": pool_key, "scoring": exp.scoring})
}

fn select_inputs(
    exp: &Experiment,
    spec: &config::SelectorSpec,
    target: &str,
    selector: &dyn select::Selector,
    needs: &Needs,
    fingerprint: &str,
    pool_key: &str,
) -> serde_json::Value {
    let mut inputs = json!({"selector": spec.name, "params": spec.params_for(target), "seed": exp.seed, "pool": pool_key});
    if let Some(defaults) = selector.defaults() {
        inputs["defaults"] = defaults;
    }
    match needs {
        Needs::Nothing => {}
        Needs::Scores => inputs["scores"] = json!(Stage::key_of(&score_inputs(exp, fingerprint, pool_key))),
        Needs::Trajectories(reference) => {
            inputs["trajectories"] = json!({"target": fingerprint, "reference": format!("{reference:?}")})
        }
    }
    inputs
}

/// What a selector needs for this target: S2L's reference is the target's `reference`
/// unless the selector's parameters name one.
fn needs_for(selector: &dyn select::Selector, target: &config::Target) -> Needs {
    match selector.needs() {
        Needs::Trajectories(mut reference) => {
            if reference.model.is_none() {
                reference.model = target.reference.as_ref().map(|r| {
                    let models_dir = model::pull::local_models_dir().unwrap_or_default();
                    config::resolve(r, &models_dir).to_string_lossy().into_owned()
                });
            }
            Needs::Trajectories(reference)
        }
        other => other,
    }
}

/// The training settings a run uses: the experiment's seed offset by `training.seed`.
fn training_config(exp: &Experiment) -> train::TrainConfig {
    let mut training = exp.training.clone();
    training.seed = exp.seed.wrapping_add(training.seed);
    training
}

fn train_inputs(exp: &Experiment, fingerprint: &str, select_key: &str) -> serde_json::Value {
    json!({"model": fingerprint, "selection": select_key, "training": training_config(exp)})
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


/// One variant of an experiment.
struct Runner<'a> {
    variant: &'a Variant,
    root: &'a Path,
    options: &'a RunOptions,
    pool: Pool,
    pool_key: String,
    benches: Vec<eval::benchmark::Benchmark>,
    bench_key: Vec<String>,
    sandbox: Option<sandbox::Sandbox>,
}

impl<'a> Runner<'a> {
    fn new(variant: &'a Variant, root: &'a Path, options: &'a RunOptions) -> Result<Self> {
        let exp = &variant.experiment;
        let pool = read_pool(exp, &pool_path(exp))?;
        let pool_key = pool.digest();
        let benches = eval::load_benchmarks(
            &exp.evaluation.benchmarks,
            &eval::benchmark::eval_dir(),
            &pool::data_dir().join("eval"),
        )?;
        let bench_key = bench_key(&benches)?;
        let sandbox = if options.report_only {
            None
        } else {
            let config = sandbox::SandboxConfig {
                timeout: std::time::Duration::from_secs_f64(exp.evaluation.timeout),
                unsandboxed: options.unsandboxed,
                ..Default::default()
            };
            eval::sandbox_for(&benches, config)?
        };
        Ok(Runner { variant, root, options, pool, pool_key, benches, bench_key, sandbox })
    }

    fn exp(&self) -> &Experiment {
        &self.variant.experiment
    }

    fn run(&self) -> Result<Vec<ResultRow>> {
        let mut rows = Vec::new();
        for target in &self.exp().targets {
            rows.extend(self.run_target(target)?);
        }
        Ok(rows)
    }

    fn row(&self, target: &config::Target, label: &str, selector: Option<&str>) -> ResultRow {
        ResultRow {
            variant: self.variant.label.clone(),
            target: target.name.clone(),
            label: label.to_string(),
            selector: selector.map(str::to_string),
            metrics: BTreeMap::new(),
            examples: None,
            train: None,
            train_log: None,
            selection_cost: None,
        }
    }

    fn run_target(&self, target: &config::Target) -> Result<Vec<ResultRow>> {
        let exp = self.exp();
        let model_ref = model_ref(target);
        let load_options = LoadOptions { template: target.template.clone(), ..LoadOptions::default() };
        let base = model::load(&model_ref, &load_options).map_err(|e| Error::Invalid(format!("target `{}`: {e}", target.name)))?;
        let fingerprint = base.fingerprint()?;
        let mut rows = Vec::new();
        if exp.evaluation.base {
            let mut row = self.row(target, "Base", None);
            row.metrics = self.eval_stage(&fingerprint, Evaluated::Loaded(&base))?;
            rows.push(row);
        }
        let mut scores: Option<(Stage, Vec<Vec<Option<Score>>>)> = None;
        for spec in &exp.selectors {
            let label = &spec.label_for(&target.name);
            let selector = select::build(&spec.name, &spec.params_for(&target.name))?;
            let mut row = self.row(target, label, Some(&spec.name));
            let needs = needs_for(selector.as_ref(), target);
            let inputs = select_inputs(exp, spec, &target.name, selector.as_ref(), &needs, &fingerprint, &self.pool_key);
            let select_stage = Stage::new(self.root, "select", &inputs);
            let summary = select_stage.ensure(&inputs, self.options.report_only, || {
                tracing::info!("[{} / {label}] selecting", target.name);
                if needs == Needs::Scores && scores.is_none() {
                    scores = Some(self.score_stage(&base, &fingerprint)?);
                }
                let trajectories = match &needs {
                    Needs::Trajectories(reference) => Some(s2l::trajectories::compute(&s2l::trajectories::Job {
                        target: &model_ref,
                        load: &load_options,
                        pool: &self.pool,
                        config: reference,
                        seed: exp.seed,
                        work_dir: &self.root.join("trajectories"),
                        progress: self.options.progress,
                    })?),
                    _ => None,
                };
                let input = SelectInput {
                    pool: &self.pool,
                    scores: scores.as_ref().map(|(_, s)| s.as_slice()),
                    trajectories: trajectories.as_ref(),
                    seed: exp.seed,
                };
                let selection = selector.select(&input)?;
                select::write(&selection, &self.pool, &select_stage.dir)?;
                let cost = match (&needs, &scores, &trajectories) {
                    (Needs::Scores, Some((stage, _)), _) => Some(stage.summary::<SelectionCost>()?),
                    (Needs::Trajectories(_), _, Some(t)) => Some(SelectionCost {
                        forward_tokens: t.cost.score_tokens,
                        train_tokens: t.cost.train_tokens,
                        seconds: t.cost.train_seconds + t.cost.score_seconds,
                    }),
                    _ => None,
                };
                Ok(SelectSummary { picks: selection.picks.len(), flagged: selection.flagged.len(), cost })
            })?;
            let Some(summary) = summary else {
                rows.push(row);
                continue;
            };
            row.examples = Some(summary.picks);
            row.selection_cost = summary.cost;

            let training = training_config(exp);
            let train_inputs = train_inputs(exp, &fingerprint, &select_stage.key);
            let train_stage = Stage::new(self.root, "train", &train_inputs);
            row.train_log = Some(train_stage.dir.join("train_log.jsonl"));
            row.train = train_stage.ensure(&train_inputs, self.options.report_only, || {
                tracing::info!("[{} / {label}] training on {} examples", target.name, summary.picks);
                let (loaded, vars) = model::load_trainable(&model_ref, &load_options)?;
                let data = train::data::read(&select_stage.dir.join("sft.jsonl"), &loaded, training.max_len)?;
                let trainable = Trainable { model: &loaded, vars: &vars, base_fingerprint: fingerprint.clone() };
                let report = train::train(&trainable, &data, &training, &train_stage.dir, true, self.options.progress)?;
                Ok(TrainSummary {
                    steps: report.steps,
                    first_loss: report.first_loss,
                    final_loss: report.final_loss,
                    weight_l2_distance: report.weight_l2_distance,
                    seconds: report.seconds,
                    tokens_per_second: report.tokens_per_second,
                })
            })?;
            if row.train.is_some() {
                row.metrics = self.eval_stage(&train_stage.key, Evaluated::Folder(&train_stage.dir.join("model")))?;
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// The target's scores of every candidate, through a store kept in the stage folder.
    fn score_stage(&self, model: &LoadedModel, fingerprint: &str) -> Result<(Stage, Vec<Vec<Option<Score>>>)> {
        let inputs = score_inputs(self.exp(), fingerprint, &self.pool_key);
        let stage = Stage::new(self.root, "score", &inputs);
        let spec = &self.exp().scoring;
        let options = ScoreOptions {
            max_len: spec.max_len,
            batch_tokens: spec.batch_tokens,
            share_prefix: spec.share_prefix,
            keep_token_logprobs: false,
            overflow: if spec.overflow == "skip" { Overflow::Skip } else { Overflow::Truncate },
            progress: self.options.progress,
        };
        let done = stage.is_done();
        if !done {
            stage.start(&inputs)?;
            tracing::info!("scoring {} candidates", self.pool.candidate_count());
        }
        let started = Instant::now();
        let scorer = match &spec.template {
            Some(name) => Cow::Owned(model.with_template(name)?),
            None => Cow::Borrowed(model),
        };
        let mut store = ScoreStore::open(&stage.dir.join("scores.parquet"), &scorer.fingerprint()?)?;
        let scored = score::score_stored(&scorer, &self.pool.groups(), &options, &mut store);
        store.compact()?;
        let (scores, _) = scored?;
        if done {
            stage.reused()?;
        } else {
            let cost = SelectionCost {
                forward_tokens: scores.iter().flatten().flatten().map(|s| s.n_tokens).sum::<usize>()
                    + s2l::trajectories::prompt_tokens(model, &self.pool)?,
                train_tokens: 0,
                seconds: started.elapsed().as_secs_f64(),
            };
            stage.finish(&cost, cost.seconds)?;
        }
        Ok((stage, scores))
    }

    /// Benchmark results of one model, named by `model_key` (a fingerprint or a training
    /// stage's key). Empty when the stage has not finished and `report_only` is set.
    fn eval_stage(&self, model_key: &str, model: Evaluated) -> Result<BTreeMap<String, Cell>> {
        let exp = self.exp();
        let inputs = eval_inputs(exp, model_key, &self.bench_key);
        let stage = Stage::new(self.root, "eval", &inputs);
        let cells = stage.ensure(&inputs, self.options.report_only, || {
            let loaded;
            let model = match model {
                Evaluated::Loaded(m) => m,
                Evaluated::Folder(path) => {
                    loaded = model::load(&path.to_string_lossy(), &LoadOptions::default())?;
                    &loaded
                }
            };
            let options = EvalOptions {
                limit: exp.evaluation.limit,
                samples: exp.evaluation.samples,
                max_new_tokens: exp.evaluation.max_new_tokens,
                batch_size: exp.evaluation.batch_size,
                seed: exp.seed,
                progress: self.options.progress,
                ..EvalOptions::default()
            };
            let metrics = eval::evaluate(Answers::Model(model), &self.benches, self.sandbox.as_ref(), &options, &stage.dir)?;
            Ok(metrics.iter().map(|m| (m.benchmark.clone(), cell(m))).collect())
        })?;
        Ok(cells.unwrap_or_default())
    }
}

/// The model an eval stage grades: in memory already, or an exported folder loaded only when
/// the stage has to run.
enum Evaluated<'a> {
    Loaded(&'a LoadedModel),
    Folder(&'a Path),
}

fn cell(m: &BenchmarkMetrics) -> Cell {
    Cell { value: 100.0 * m.score.value, ci95: (100.0 * m.score.ci95.0, 100.0 * m.score.ci95.1), n: m.score.n }
}
