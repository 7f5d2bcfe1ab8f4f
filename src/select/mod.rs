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

use crate::pool::Pool;
use crate::score::Score;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

/// What a selector sees: the pool, the scores (`scores[i][j]` for candidate `j` of
/// instruction `i`, `None` if unscored) or the loss trajectories when it needs them, and
/// the seed.
pub struct SelectInput<'a> {
    pub pool: &'a Pool,
    pub scores: Option<&'a [Vec<Option<Score>>]>,
    pub trajectories: Option<&'a s2l::Trajectories>,
    pub seed: u64,
}

/// What a selector reads beyond the pool, so callers compute only that.
#[derive(Debug, Clone, PartialEq)]
pub enum Needs {
    Nothing,
    /// The target model's scores of every candidate.
    Scores,
    /// Loss trajectories of a reference model trained as configured.
    Trajectories(s2l::ReferenceConfig),
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
    /// The cluster it was drawn from (s2l).
    pub cluster: Option<usize>,
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

type Build = fn(&Params) -> Result<Box<dyn Selector>>;

/// Every selector, by name, with a one-line description.
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

pub fn build(name: &str, params: &Params) -> Result<Box<dyn Selector>> {
    let (_, _, build) = REGISTRY.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|(n, _, _)| *n).collect();
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
    cluster: Option<usize>,
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
            cluster: pick.cluster,
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
