//! Selectors: which candidate responses of a pool become the SFT data.
//!
//! Every selector implements [`Selector`] and is found by name in [`REGISTRY`]: adding one
//! is adding a file and a line there. Each is deterministic for a given seed and records
//! why it picked what it picked.

mod all;
mod grape;
mod longest;
mod random;
pub mod s2l;
mod strongest;

use crate::model::LoadOptions;
use crate::pool::Pool;
use crate::score::Score;
use crate::shard::Shard;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// What a selector sees: the pool, the scores (`scores[i][j]` for candidate `j` of
/// instruction `i`, `None` if unscored) when it needs them, the folder of the stage of its
/// own it needs ([`Needs::Stage`]), and the seed.
pub struct SelectInput<'a> {
    pub pool: &'a Pool,
    pub scores: Option<&'a [Vec<Option<Score>>]>,
    pub stage: Option<&'a Path>,
    pub seed: u64,
}

/// What a selector reads beyond the pool, so callers compute only that.
#[derive(Clone)]
pub enum Needs {
    Nothing,
    /// The target model's scores of every candidate.
    Scores,
    /// A stage of the selector's own, computed before it selects.
    Stage(Arc<dyn InputStage>),
}

/// Work a selector needs done before it selects (S2L's loss trajectories): a stage of the
/// experiment like scoring, computed once per target, pool, seed and settings into a folder
/// of its own, which the selector then reads through [`SelectInput::stage`]. A selector that
/// needs new inputs brings its own `InputStage`; the runner and the CLI run any of them.
pub trait InputStage: Send + Sync {
    /// Names the stage's folder under the experiment and its `resources:` entry.
    fn kind(&self) -> &'static str;
    /// What its output depends on beside the pool and the seed, resolved for one target.
    /// Selection keys record it too, so a change reselects.
    fn key_inputs(&self, target: &StageTarget) -> serde_json::Value;
    /// Whether it runs as `--shard i/N` parts, which a run without a shard then merges.
    fn shardable(&self) -> bool {
        false
    }
    /// Computes the stage (or its shard) into `job.dir`, resuming what is there.
    fn run(&self, job: &StageJob) -> Result<SelectionCost>;
    /// One line for a dry run, and the FLOPs of the whole stage given the FLOPs of one token
    /// forward, the pool's candidates and their mean length in tokens.
    fn plan(&self, flops_per_token: f64, candidates: usize, mean_tokens: f64) -> (String, f64);
}

/// The target an [`InputStage`] works for.
#[derive(Debug, Clone, Copy)]
pub struct StageTarget<'a> {
    /// What the loader takes: a built-in name or a path.
    pub model: &'a str,
    pub fingerprint: &'a str,
    /// The smaller model of its family the experiment names for it, if any (resolved).
    pub reference: Option<&'a str>,
}

/// One run of an [`InputStage`].
pub struct StageJob<'a> {
    pub target: StageTarget<'a>,
    pub load: &'a LoadOptions,
    pub pool: &'a Pool,
    pub seed: u64,
    /// The stage's folder: everything it writes goes here.
    pub dir: &'a Path,
    /// Only this part (merged by a later run without one).
    pub shard: Option<Shard>,
    pub progress: bool,
}

/// What computing a selection's inputs cost: GRAPE's scoring pass, S2L's trajectories.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SelectionCost {
    /// Forward-only work: scoring, and S2L's per-snapshot losses.
    pub forward_tokens: usize,
    /// Training of a reference model (forward and backward).
    pub train_tokens: usize,
    pub seconds: f64,
}

impl SelectInput<'_> {
    fn scores(&self, selector: &str) -> Result<&[Vec<Option<Score>>]> {
        let scores = self
            .scores
            .ok_or_else(|| Error::Invalid(format!("selector `{selector}` needs scores; score the pool first")))?;
        if scores.len() != self.pool.instructions.len() {
            return Err(Error::Invalid(format!(
                "scores cover {} instructions but the pool has {}",
                scores.len(),
                self.pool.instructions.len()
            )));
        }
        Ok(scores)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pick {
    pub instruction: usize,
    pub candidate: usize,
    /// The score the choice was made on, when there was one.
    pub score: Option<f64>,
    /// Anything else about the choice, kept in the manifest (s2l: its cluster).
    pub detail: Option<serde_json::Value>,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub selector: String,
    pub picks: Vec<Pick>,
    /// Instructions worth a look: a single candidate, none scored, too few to sample from.
    pub flagged: Vec<String>,
    /// Anything else worth keeping, written as `report.json` (s2l: cluster sizes, cost).
    pub report: Option<serde_json::Value>,
}

pub trait Selector {
    fn name(&self) -> &'static str;
    fn needs(&self) -> Needs {
        Needs::Nothing
    }
    /// Defaults that changed since selections were first cached, resolved: part of an
    /// experiment's select key, so a selection made under the old default is not reused.
    fn defaults(&self) -> Option<serde_json::Value> {
        None
    }
    fn select(&self, input: &SelectInput) -> Result<Selection>;
}

impl Selection {
    /// The picked (instruction id, candidate index) pairs, for comparing selections.
    pub fn pairs(&self, pool: &Pool) -> HashSet<(String, usize)> {
        self.picks.iter().map(|p| (pool.instructions[p.instruction].id.clone(), p.candidate)).collect()
    }
}

/// How many responses an instruction gives: `k`, or with `like=SOURCE`, `k` times as many as
/// that source wrote for it (at least one). The paper's GRAPE keeps, per instruction, as many
/// responses as the original UltraInteract-SFT has.
#[derive(Debug, Clone)]
struct Count {
    k: usize,
    like: Option<String>,
}

impl Count {
    fn read(p: &ParamReader, key: &str, default: usize) -> Result<Self> {
        Ok(Count { k: p.positive(key, default)?, like: p.params.get("like").cloned() })
    }

    fn of(&self, instruction: &crate::pool::Instruction) -> usize {
        match &self.like {
            None => self.k,
            Some(source) => self.k * instruction.candidates.iter().filter(|c| &c.source == source).count().max(1),
        }
    }

    /// `like` must name a source of the pool.
    fn check(&self, selector: &str, pool: &Pool) -> Result<()> {
        check_sources(selector, "like", self.like.iter(), pool)
    }
}

/// Each of `named` (a selector's `key=` parameter) must be a source of the pool.
fn check_sources<'a>(selector: &str, key: &str, mut named: impl Iterator<Item = &'a String>, pool: &Pool) -> Result<()> {
    let sources = pool.sources();
    match named.find(|s| !sources.contains(s)) {
        Some(source) => Err(Error::Invalid(format!(
            "selector `{selector}`: {key}={source}: no such source in the pool (sources: {})",
            sources.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Which candidates a selector may pick: with `only=A,B`, those of sources A and B (Table 8's
/// Closest-1 ranks only UltraInteract's own responses; Table 4's GRAPE only the ten samples).
#[derive(Debug, Clone)]
struct Among {
    only: Option<Vec<String>>,
}

impl Among {
    fn read(p: &ParamReader) -> Self {
        Among { only: p.params.get("only").map(|v| v.split(',').map(|s| s.trim().to_string()).collect()) }
    }

    fn allows(&self, candidate: &crate::pool::Candidate) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&candidate.source))
    }

    /// Every source named must be one of the pool's.
    fn check(&self, selector: &str, pool: &Pool) -> Result<()> {
        check_sources(selector, "only", self.only.iter().flatten(), pool)
    }
}

/// `key=value` parameters from the command line or an experiment file.
pub type Params = BTreeMap<String, String>;

pub type Build = fn(&Params) -> Result<Box<dyn Selector>>;

/// Every built-in selector, by name, with a one-line description.
pub const REGISTRY: &[(&str, &str, Build)] = &[
    ("grape", "the highest-scoring k responses per instruction (normalize: mean | sum | bytes; only: sources)", grape::build_highest),
    ("lowest", "the lowest-scoring k responses per instruction (the paper's \"Worst\")", grape::build_lowest),
    ("random", "k uniformly random responses per instruction", random::build_random),
    ("strongest", "only the responses of one named source model", strongest::build),
    ("upscale", "`factor` (default 3) times as many random responses per instruction", random::build_upscale),
    ("s2l", "k-means over a reference model's loss trajectories, sampled evenly from the clusters", s2l::build),
    ("longest", "the longest k responses per instruction (Zhao et al., 2024)", longest::build),
    ("all", "every response of every instruction (the paper's \"All Responses\")", all::build),
];

/// Selectors a program built on this library added with [`register`].
static ADDED: RwLock<Vec<(&'static str, &'static str, Build)>> = RwLock::new(Vec::new());

/// Adds a selector under `name` for this process: experiments and [`build`] find it like the
/// built-in ones (a research fork's selector, or a test's).
pub fn register(name: &'static str, description: &'static str, build: Build) {
    ADDED.write().unwrap_or_else(|e| e.into_inner()).push((name, description, build));
}

/// Every selector this process knows: the built-in ones, then the registered ones.
pub fn registered() -> Vec<(&'static str, &'static str, Build)> {
    let added = ADDED.read().unwrap_or_else(|e| e.into_inner());
    REGISTRY.iter().copied().chain(added.iter().copied()).collect()
}

pub fn build(name: &str, params: &Params) -> Result<Box<dyn Selector>> {
    let all = registered();
    let (_, _, build) = all.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = all.iter().map(|(n, _, _)| *n).collect();
        Error::Invalid(format!("unknown selector `{name}` (registered: {})", known.join(", ")))
    })?;
    build(params)
}

/// Typed access to a selector's parameters; unknown keys and bad values are errors that
/// name the selector, the key and what was expected.
struct ParamReader<'a> {
    selector: &'static str,
    params: &'a Params,
}

impl<'a> ParamReader<'a> {
    fn new(selector: &'static str, params: &'a Params, known: &[&str]) -> Result<Self> {
        if let Some(key) = params.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::Invalid(format!(
                "selector `{selector}`: unknown parameter `{key}` (expected one of: {})",
                known.join(", ")
            )));
        }
        Ok(Self { selector, params })
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T, expected: &str) -> Result<T> {
        match self.params.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                Error::Invalid(format!("selector `{}`: parameter `{key}={v}`: expected {expected}", self.selector))
            }),
        }
    }

    fn positive(&self, key: &str, default: usize) -> Result<usize> {
        let value = self.get(key, default, "a positive integer")?;
        if value == 0 {
            return Err(Error::Invalid(format!("selector `{}`: `{key}` must be at least 1", self.selector)));
        }
        Ok(value)
    }
}

/// One row of the manifest: what was picked, from whom, on what score, and why.
#[derive(Serialize, Deserialize)]
struct ManifestRow<'a> {
    #[serde(borrow)]
    instruction_id: Cow<'a, str>,
    candidate: usize,
    #[serde(borrow)]
    source: Cow<'a, str>,
    score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
    #[serde(borrow)]
    selector: Cow<'a, str>,
    #[serde(borrow)]
    why: Cow<'a, str>,
}

/// The (instruction id, candidate index) pairs of a selection's `manifest.jsonl`.
pub fn read_manifest(path: &Path) -> Result<HashSet<(String, usize)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut pairs = HashSet::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: ManifestRow = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: not a manifest row: {e}", n + 1)))?;
        pairs.insert((row.instruction_id.into_owned(), row.candidate));
    }
    Ok(pairs)
}

/// Writes `manifest.jsonl` and `sft.jsonl` (the `messages` format TRL, open-instruct and
/// axolotl read) into `dir`.
pub fn write(selection: &Selection, pool: &Pool, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let manifest_path = dir.join("manifest.jsonl");
    let sft_path = dir.join("sft.jsonl");
    let mut manifest = Vec::new();
    let mut sft = Vec::new();
    for pick in &selection.picks {
        let instruction = &pool.instructions[pick.instruction];
        let candidate = &instruction.candidates[pick.candidate];
        let row = ManifestRow {
            instruction_id: Cow::Borrowed(&instruction.id),
            candidate: pick.candidate,
            source: Cow::Borrowed(&candidate.source),
            score: pick.score,
            detail: pick.detail.clone(),
            selector: Cow::Borrowed(&selection.selector),
            why: Cow::Borrowed(&pick.why),
        };
        serde_json::to_writer(&mut manifest, &row).expect("plain data serialises");
        manifest.push(b'\n');
        let messages = serde_json::json!({"messages": [
            {"role": "user", "content": instruction.prompt},
            {"role": "assistant", "content": candidate.response},
        ]});
        serde_json::to_writer(&mut sft, &messages).expect("plain data serialises");
        sft.push(b'\n');
    }
    let mut files = vec![(manifest_path, manifest), (sft_path, sft)];
    if let Some(report) = &selection.report {
        let json = serde_json::to_vec_pretty(report).expect("plain data serialises");
        files.push((dir.join("report.json"), json));
    }
    for (path, bytes) in &files {
        let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
