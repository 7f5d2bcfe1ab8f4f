//! Experiment files: YAML naming the target models, the pool, the selectors, the training and
//! evaluation settings and the seed, with an optional sweep. Unknown keys, wrong types and
//! unknown selectors or benchmarks are errors naming the file, the line and the key.

use crate::pool::Columns;
use crate::select::Params;
use crate::train::TrainConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Names the folder under the runs directory.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The paper's table this setting reproduces (`table1`, `table2`), for `--paper`.
    #[serde(default)]
    pub paper: Option<String>,
    #[serde(default)]
    pub seed: u64,
    pub targets: Vec<Target>,
    pub pool: PoolSpec,
    #[serde(default)]
    pub scoring: ScoringSpec,
    pub selectors: Vec<SelectorSpec>,
    #[serde(default)]
    pub training: TrainConfig,
    pub evaluation: EvalSpec,
    /// Key path -> values; see [`Experiment::expand`].
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<Value>>,
    /// What each kind of stage asks of a cluster (`--executor slurm`), by kind (`score`,
    /// `trajectories`, `train`, `eval`, ...) or `default`. Never part of a stage key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, Resources>,
}

/// One kind of stage's share of a cluster: each field becomes an `sbatch` option.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub partition: Option<String>,
    /// GPUs per job (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// CPUs per job (`--cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory per job, as sbatch takes it (`64G`).
    pub mem: Option<String>,
    /// Wall-clock limit, as sbatch takes it (`4:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    /// Further `#SBATCH` options, verbatim (`--account=lab`, `--constraint=h100`).
    #[serde(default)]
    pub sbatch: Vec<String>,
    /// Split the stage into this many `--shard i/N` jobs (scoring, trajectories, evaluation).
    pub shards: Option<usize>,
}

impl Resources {
    /// These settings over `base` (the `default` entry): a field set here wins, sbatch lines
    /// add up, and shards are this kind's own.
    pub fn over(&self, base: &Resources) -> Resources {
        Resources {
            partition: self.partition.clone().or_else(|| base.partition.clone()),
            gpus: self.gpus.or(base.gpus),
            cpus: self.cpus.or(base.cpus),
            mem: self.mem.clone().or_else(|| base.mem.clone()),
            time: self.time.clone().or_else(|| base.time.clone()),
            sbatch: base.sbatch.iter().chain(&self.sbatch).cloned().collect(),
            shards: self.shards,
        }
    }

    /// The `sbatch` options these settings become.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        args.extend(self.partition.as_ref().map(|p| format!("--partition={p}")));
        args.extend(self.gpus.filter(|&g| g > 0).map(|g| format!("--gres=gpu:{g}")));
        args.extend(self.cpus.map(|c| format!("--cpus-per-task={c}")));
        args.extend(self.mem.as_ref().map(|m| format!("--mem={m}")));
        args.extend(self.time.as_ref().map(|t| format!("--time={t}")));
        args.extend(self.sbatch.iter().cloned());
        args
    }
}

/// A base model to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The row label in tables, as the paper writes it (`Llama3.1-8B`).
    pub name: String,
    /// A built-in name, a `.gguf` file or a Hugging Face folder; a relative path not found
    /// from the working directory is looked up in `HARNESS_MODELS_DIR`.
    pub model: String,
    /// Where the weights come from, for machines that can download them (informational).
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    /// The smaller model of this target's family that S2L trains as its reference, unless
    /// the selector names one (the paper: Llama-3.2-1B for Llama-3.1-8B); default the target.
    #[serde(default)]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// JSON Lines (gzip allowed) or Parquet; relative paths are looked up from the
    /// working directory, then in `HARNESS_DATA_DIR/pools`.
    pub path: String,
    /// How the pool is built or fetched, for machines that can (informational).
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub columns: Columns,
    /// The first N instructions only.
    #[serde(default)]
    pub limit_instructions: Option<usize>,
    /// A malformed row is an error rather than skipped.
    #[serde(default)]
    pub strict: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringSpec {
    pub max_len: usize,
    pub batch_tokens: usize,
    pub share_prefix: bool,
    /// `truncate` or `skip` pairs longer than `max_len`.
    pub overflow: String,
    /// A built-in template to score under instead of the target's own (`question-answer`:
    /// the paper's). Left out of the stage key when unset, so older runs keep theirs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl Default for ScoringSpec {
    fn default() -> Self {
        let d = crate::score::ScoreOptions::default();
        Self {
            max_len: d.max_len,
            batch_tokens: d.batch_tokens,
            share_prefix: d.share_prefix,
            overflow: "truncate".into(),
            template: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorSpec {
    /// A registered selector.
    pub name: String,
    /// The row label in tables (`GRAPE`, `3x Data`); default: the name.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
}

impl SelectorSpec {
    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }

    /// Parameters as the selector registry takes them (`key=value` strings).
    pub fn params(&self) -> Params {
        self.params.iter().map(|(k, v)| (k.clone(), scalar_text(v))).collect()
    }

    /// The parameters for one target: `{target}` in a value becomes its name, so a pool that
    /// holds each target's own generations (Tables 6 and 9) names them per target.
    pub fn params_for(&self, target: &str) -> Params {
        self.params().into_iter().map(|(k, v)| (k, v.replace("{target}", target))).collect()
    }

    /// The row label for one target, `{target}` replaced as in [`Self::params_for`].
    pub fn label_for(&self, target: &str) -> String {
        self.label().replace("{target}", target)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Registered benchmark names (files in `eval/`).
    pub benchmarks: Vec<String>,
    /// The first N items of each benchmark.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Overrides each benchmark's own budget.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    #[serde(default = "sixteen")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub samples: usize,
    /// Seconds each generated program may run.
    #[serde(default = "three")]
    pub timeout: f64,
    /// Also evaluate each target before fine-tuning (the table's first row).
    #[serde(default = "yes")]
    pub base: bool,
}

fn sixteen() -> usize {
    16
}
fn one() -> usize {
    1
}
fn three() -> f64 {
    3.0
}
fn yes() -> bool {
    true
}

/// One run of an expanded experiment: the settings, and how it differs from the file.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Empty for the experiment as written; else `key=value` per swept key.
    pub label: String,
    pub experiment: Experiment,
}

impl Experiment {
    /// Reads and checks an experiment file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let experiment: Experiment =
            serde_yaml::from_str(&text).map_err(|e| Error::format(path, yaml_error(&e)))?;
        experiment.check(path, &text)?;
        for variant in experiment.expand().map_err(|e| Error::format(path, e))? {
            variant.experiment.check(path, &text)?;
        }
        Ok(experiment)
    }

    /// What a run reads from disk must be there: each run's pool file, and target models given
    /// as paths. (A dry run only reports them missing.) Errors name the file, line and key.
    pub fn check_inputs(&self, path: &Path, data_dir: &Path, models_dir: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let variants = self.expand().map_err(|e| Error::format(path, e))?;
        for exp in variants.iter().map(|v| &v.experiment) {
            if !resolve(&exp.pool.path, data_dir).exists() {
                let how = exp.pool.upstream.as_deref().map_or_else(
                    || "; set HARNESS_DATA_DIR to the folder holding pools/ and eval/".to_string(),
                    |u| format!("; build or fetch it: {u}"),
                );
                return Err(Error::format(
                    path,
                    format!(
                        "{}pool.path: `{}` is neither a file nor in {}{how}",
                        line_of(&text, &exp.pool.path),
                        exp.pool.path,
                        data_dir.display()
                    ),
                ));
            }
            for t in &exp.targets {
                let builtin = crate::model::pull::find_builtin(&t.model).is_some();
                if !builtin && !resolve(&t.model, models_dir).exists() {
                    let from = t.upstream.as_deref().map_or(String::new(), |u| format!("; download it from {u}"));
                    return Err(Error::format(
                        path,
                        format!(
                            "{}targets.model: `{}` is not a built-in model, a file or a folder here or in {}{from}",
                            line_of(&text, &format!("model: {}", t.model)),
                            t.model,
                            models_dir.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Names that must resolve: selectors and their parameters, benchmarks, sources.
    fn check(&self, path: &Path, text: &str) -> Result<()> {
        let at = |needle: &str, what: String| Error::format(path, format!("{}{what}", line_of(text, needle)));
        if self.targets.is_empty() {
            return Err(at("targets:", "`targets`: expected at least one model".into()));
        }
        if self.selectors.is_empty() {
            return Err(at("selectors:", "`selectors`: expected at least one selector".into()));
        }
        let mut labels = std::collections::HashSet::new();
        for s in &self.selectors {
            crate::select::build(&s.name, &s.params()).map_err(|e| at(&format!("name: {}", s.name), e.to_string()))?;
            if !labels.insert(s.label()) {
                return Err(at(s.label(), format!("two selectors are labelled `{}`; give each a `label`", s.label())));
            }
        }
        let eval_dir = crate::eval::benchmark::eval_dir();
        for b in &self.evaluation.benchmarks {
            crate::eval::benchmark::spec_path(b, &eval_dir).map_err(|e| at(b, format!("evaluation.benchmarks: {e}")))?;
        }
        if let Some(name) = &self.scoring.template {
            name.parse::<crate::model::chat::BuiltinTemplate>().map_err(|e| at("template", format!("scoring.template: {e}")))?;
        }
        for (kind, r) in &self.resources {
            if r.shards == Some(0) {
                return Err(at(&format!("{kind}:"), format!("resources.{kind}.shards: expected at least 1")));
            }
            if let Some(line) = r.sbatch.iter().find(|l| !l.starts_with('-') || l.contains('\n')) {
                return Err(at(line, format!("resources.{kind}.sbatch: `{line}`: expected one sbatch option such as --account=lab")));
            }
            // What the executor itself sets for each job cannot be overridden.
            const OWN: [&str; 15] = [
                "--wrap", "--array", "--dependency", "--output", "--error", "--job-name", "--chdir", "--parsable",
                "--kill-on-invalid-dep", "-a", "-d", "-o", "-e", "-J", "-D",
            ];
            let name = |l: &str| match l.strip_prefix("--") {
                Some(_) => l.split(['=', ' ']).next().unwrap_or_default().to_string(),
                None => l.chars().take(2).collect(),
            };
            if let Some(line) = r.sbatch.iter().find(|l| OWN.contains(&name(l).as_str())) {
                return Err(at(line, format!("resources.{kind}.sbatch: `{line}`: the Slurm executor sets this option itself")));
            }
        }
        if !self.training.engine.is_native() {
            crate::train::engine::accelerate_config(&self.training).map_err(|e| at("accelerate", e.to_string()))?;
        }
        if !["truncate", "skip"].contains(&self.scoring.overflow.as_str()) {
            return Err(at("overflow", format!("scoring.overflow `{}`: expected truncate or skip", self.scoring.overflow)));
        }
        Ok(())
    }

    /// The runs a sweep asks for. Keys are dotted paths into the file (`seed`,
    /// `training.lr`, `scoring.max_len`); `selectors.NAME.PARAM` (NAME a selector's label or
    /// name) instead turns that selector into one selector per value, labelled
    /// `NAME PARAM=value`, inside every run. Other keys multiply runs: every combination.
    pub fn expand(&self) -> std::result::Result<Vec<Variant>, String> {
        let mut base = self.clone();
        base.sweep.clear();
        let mut run_axes: Vec<(&String, &Vec<Value>)> = Vec::new();
        for (key, values) in &self.sweep {
            if values.is_empty() {
                return Err(format!("sweep `{key}`: expected at least one value"));
            }
            match key.strip_prefix("selectors.") {
                Some(rest) => {
                    let (name, param) = rest
                        .split_once('.')
                        .ok_or_else(|| format!("sweep `{key}`: expected selectors.NAME.PARAM"))?;
                    let at = base
                        .selectors
                        .iter()
                        .position(|s| s.label() == name || s.name == name)
                        .ok_or_else(|| format!("sweep `{key}`: no selector `{name}`"))?;
                    let original = base.selectors.remove(at);
                    for (i, value) in values.iter().enumerate() {
                        let mut s = original.clone();
                        s.params.insert(param.to_string(), value.clone());
                        s.label = Some(format!("{} {param}={}", original.label(), scalar_text(value)));
                        base.selectors.insert(at + i, s);
                    }
                }
                None => run_axes.push((key, values)),
            }
        }
        let mut variants = vec![Variant { label: String::new(), experiment: base }];
        for (key, values) in run_axes {
            let mut next = Vec::new();
            for variant in &variants {
                for value in values {
                    let mut tree = serde_yaml::to_value(&variant.experiment).map_err(|e| e.to_string())?;
                    set_path(&mut tree, key, value.clone())?;
                    let experiment: Experiment =
                        serde_yaml::from_value(tree).map_err(|e| format!("sweep `{key}`: {}", yaml_error(&e)))?;
                    let part = format!("{key}={}", scalar_text(value));
                    let label = if variant.label.is_empty() { part } else { format!("{} {part}", variant.label) };
                    next.push(Variant { label, experiment });
                }
            }
            variants = next;
        }
        Ok(variants)
    }
}

/// Sets `path` (dotted) inside a YAML mapping; every key on the way must exist.
fn set_path(tree: &mut Value, path: &str, value: Value) -> std::result::Result<(), String> {
    let mut node = tree;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, key) in keys.iter().enumerate() {
        let map = node.as_mapping_mut().ok_or_else(|| format!("sweep `{path}`: `{}` is not a section", keys[..i].join(".")))?;
        let k = Value::String(key.to_string());
        if i + 1 == keys.len() {
            if !map.contains_key(&k) {
                return Err(format!("sweep `{path}`: unknown key `{key}`"));
            }
            map.insert(k, value);
            return Ok(());
        }
        node = map.get_mut(&k).ok_or_else(|| format!("sweep `{path}`: unknown key `{key}`"))?;
    }
    Ok(())
}

/// A YAML scalar as a selector parameter: `3`, `0.05`, `true`, `sum`.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

/// serde_yaml's message with its position first, as the rest of the harness writes it.
fn yaml_error(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    match e.location() {
        Some(at) => {
            let bare = message.split(" at line ").next().unwrap_or(&message);
            format!("line {} column {}: {bare}", at.line(), at.column())
        }
        None => message,
    }
}

/// "line N: " for the first line containing `needle`, else nothing.
pub(crate) fn line_of(text: &str, needle: &str) -> String {
    text.lines().position(|l| l.contains(needle)).map_or(String::new(), |n| format!("line {}: ", n + 1))
}

/// A path from an experiment file: as given when it exists, else under `fallback_dir`.
pub fn resolve(path: &str, fallback_dir: &Path) -> PathBuf {
    let given = PathBuf::from(path);
    if given.exists() || given.is_absolute() {
        return given;
    }
    let fallback = fallback_dir.join(path);
    if fallback.exists() {
        fallback
    } else {
        given
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
name: sweep
targets: [{name: T, model: stories260k}]
pool: {path: pool.jsonl}
selectors:
  - {name: grape, label: GRAPE}
  - {name: random}
evaluation: {benchmarks: [math500]}
sweep:
  selectors.GRAPE.normalize: [sum, mean, bytes]
  seed: [0, 1]
  training.lr: [1.0e-5, 2.0e-5]
"#;

    #[test]
    fn sweeps_expand_selectors_in_place_and_runs_as_a_product() {
        let experiment: Experiment = serde_yaml::from_str(FILE).unwrap();
        let variants = experiment.expand().unwrap();
        assert_eq!(variants.len(), 4, "2 seeds x 2 learning rates");
        let labels: Vec<&str> = variants.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels, ["seed=0 training.lr=0.00001", "seed=0 training.lr=0.00002", "seed=1 training.lr=0.00001", "seed=1 training.lr=0.00002"]);
        let last = &variants[3].experiment;
        assert_eq!((last.seed, last.training.lr), (1, 2e-5));
        let selectors: Vec<&str> = last.selectors.iter().map(SelectorSpec::label).collect();
        assert_eq!(selectors, ["GRAPE normalize=sum", "GRAPE normalize=mean", "GRAPE normalize=bytes", "random"]);
        assert_eq!(last.selectors[1].params()["normalize"], "mean");
        assert!(last.sweep.is_empty());

        for (key, needle) in [
            ("selectors.BEST.k", "no selector `BEST`"),
            ("training.nope", "unknown key `nope`"),
            ("selectors.GRAPE", "expected selectors.NAME.PARAM"),
        ] {
            let mut bad = experiment.clone();
            bad.sweep = [(key.to_string(), vec![Value::from(1)])].into();
            let err = bad.expand().unwrap_err();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }
}
