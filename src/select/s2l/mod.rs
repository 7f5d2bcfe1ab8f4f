//! `s2l` (SmallToLarge; Yang et al., 2024): candidates whose losses moved alike while a
//! reference model trained are alike as data. Cluster the loss trajectories with k-means and
//! sample the budget evenly from the clusters, so rare kinds of example are not drowned out.
//! The trajectories are a stage of their own ([`trajectories::TrajectoriesStage`]), which
//! [`Selector::needs`] hands the caller to run before selecting.

pub mod trajectories;

use super::{Needs, ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::util::Rng;
use crate::{Error, Result};
use linfa::traits::{Fit, Predict};
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;
use std::sync::Arc;
pub use trajectories::{ReferenceConfig, Trajectories, TrajectoriesStage};

/// Whether an instruction may give more than one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Any (instruction, response) pair: the paper's setting.
    Pairs,
    /// At most one response per instruction.
    PerInstruction,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pairs" => Ok(Mode::Pairs),
            "per-instruction" => Ok(Mode::PerInstruction),
            other => Err(Error::Invalid(format!("mode `{other}`: expected pairs or per-instruction"))),
        }
    }
}

pub struct S2l {
    reference: ReferenceConfig,
    clustering: Kmeans,
    standardize: bool,
    /// `None`: as many as GRAPE keeps (one per instruction).
    budget: Option<usize>,
    mode: Mode,
}

pub fn build(params: &Params) -> Result<Box<dyn Selector>> {
    let known = [
        "k",
        "iterations",
        "restarts",
        "standardize",
        "budget",
        "mode",
        "reference",
        "subset",
        "epochs",
        "checkpoints",
        "lr",
        "max_len",
        "micro_batch_tokens",
        "grad_accum",
    ];
    let p = ParamReader::new("s2l", params, &known)?;
    let defaults = ReferenceConfig::default();
    let reference = ReferenceConfig {
        model: params.get("reference").cloned(),
        subset: p.get("subset", defaults.subset, "a share in (0, 1]")?,
        epochs: p.positive("epochs", defaults.epochs)?,
        checkpoints: p.positive("checkpoints", defaults.checkpoints)?,
        lr: p.get("lr", defaults.lr, "a learning rate")?,
        max_len: p.positive("max_len", defaults.max_len)?,
        micro_batch_tokens: p.positive("micro_batch_tokens", defaults.micro_batch_tokens)?,
        grad_accum: p.positive("grad_accum", defaults.grad_accum)?,
    };
    let budget = match params.get("budget") {
        None => None,
        Some(_) => Some(p.positive("budget", 1)?),
    };
    Ok(Box::new(S2l {
        reference,
        clustering: Kmeans {
            k: p.positive("k", 100)?,
            iterations: p.positive("iterations", 20)?,
            // One k-means++ start, as scikit-learn's n_init="auto" and faiss do; linfa's
            // default of 10 costs ten times as much.
            restarts: p.positive("restarts", 1)?,
        },
        standardize: p.get("standardize", false, "true or false")?,
        budget,
        mode: p.get("mode", Mode::Pairs, "pairs or per-instruction")?,
    }))
}

impl Selector for S2l {
    fn name(&self) -> &'static str {
        "s2l"
    }

    fn needs(&self) -> Needs {
        Needs::Stage(Arc::new(TrajectoriesStage { reference: self.reference.clone() }))
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        let dir = input
            .stage
            .ok_or_else(|| Error::Invalid("selector `s2l` needs loss trajectories; compute them first".into()))?;
        let pool = input.pool;
        let t = &trajectories::read(dir, pool)?;
        let mut members = Vec::new();
        let mut features = Vec::new();
        for (i, per_candidate) in t.losses.iter().enumerate() {
            for (j, losses) in per_candidate.iter().enumerate() {
                if let Some(losses) = losses {
                    members.push((i, j));
                    features.extend_from_slice(losses);
                }
            }
        }
        let with_members = {
            let mut seen: Vec<usize> = members.iter().map(|m| m.0).collect();
            seen.dedup();
            seen.len()
        };
        let budget = self.budget.unwrap_or(pool.instructions.iter().filter(|i| !i.candidates.is_empty()).count());
        let capacity = match self.mode {
            Mode::Pairs => members.len(),
            Mode::PerInstruction => with_members,
        };
        if self.clustering.k > members.len() {
            return Err(Error::Invalid(format!(
                "selector `s2l`: k = {} clusters but only {} candidates have trajectories",
                self.clustering.k,
                members.len()
            )));
        }
        if budget > capacity {
            return Err(Error::Invalid(format!(
                "selector `s2l`: budget {budget} exceeds the {capacity} {} the pool offers",
                if self.mode == Mode::Pairs { "candidates" } else { "instructions" }
            )));
        }
        if self.standardize {
            standardize(&mut features, t.steps.len());
        }
        let labels = kmeans(&features, t.steps.len(), self.clustering, input.seed)?;
        let instruction_of: Vec<usize> = members.iter().map(|m| m.0).collect();
        let one_per = (self.mode == Mode::PerInstruction).then_some(instruction_of.as_slice());
        let drawn = balanced_sample(&labels, self.clustering.k, budget, one_per, input.seed);

        let mut sizes = vec![0usize; self.clustering.k];
        labels.iter().for_each(|&c| sizes[c] += 1);
        let mut taken = vec![0usize; self.clustering.k];
        drawn.iter().for_each(|&(_, c)| taken[c] += 1);
        let picks = drawn
            .iter()
            .map(|&(m, c)| Pick {
                instruction: members[m].0,
                candidate: members[m].1,
                score: None,
                detail: Some(serde_json::json!({"cluster": c})),
                why: format!("cluster {c} of {}: {} of its {} candidates taken", self.clustering.k, taken[c], sizes[c]),
            })
            .collect();
        let report = serde_json::json!({
            "clusters": self.clustering.k,
            "steps": t.steps,
            "cluster_sizes": sizes,
            "picks_per_cluster": taken,
            "size_histogram": histogram(&sizes),
            "cost": t.cost,
        });
        Ok(Selection { selector: "s2l".into(), picks, flagged: Vec::new(), report: Some(report) })
    }
}

/// Per-feature z-scores, so no snapshot dominates the distance by its scale.
fn standardize(features: &mut [f64], dims: usize) {
    let n = features.len() / dims.max(1);
    for d in 0..dims {
        let column = || (0..n).map(|r| features[r * dims + d]);
        let mean = column().sum::<f64>() / n as f64;
        let sd = (column().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        for r in 0..n {
            let x = &mut features[r * dims + d];
            *x = if sd > 0.0 { (*x - mean) / sd } else { 0.0 };
        }
    }
}

/// k-means settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kmeans {
    pub k: usize,
    /// Lloyd iterations at most, per start.
    pub iterations: usize,
    /// Starts from fresh k-means++ seeds; the one of least inertia is kept.
    pub restarts: usize,
}

/// Seeded k-means (k-means++ initialisation, Euclidean); one cluster label per row of
/// `features` (row-major, `dims` columns).
pub fn kmeans(features: &[f64], dims: usize, settings: Kmeans, seed: u64) -> Result<Vec<usize>> {
    let Kmeans { k, iterations, restarts } = settings;
    let rows = features.len() / dims.max(1);
    let records = Array2::from_shape_vec((rows, dims), features.to_vec())
        .map_err(|e| Error::Invalid(format!("s2l: trajectories are not a table: {e}")))?;
    let dataset = DatasetBase::from(records.clone());
    let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(seed))
        .max_n_iterations(iterations as u64)
        .n_runs(restarts)
        .tolerance(1e-6)
        .fit(&dataset)
        .map_err(|e| Error::Invalid(format!("s2l: k-means failed: {e}")))?;
    let labels: ndarray::Array1<usize> = model.predict(&records);
    Ok(labels.to_vec())
}

/// Draws `budget` members, an equal share from each cluster: clusters are visited smallest
/// first, each gives up to ⌈remaining budget / remaining clusters⌉ of its members in a seeded
/// order, so a small cluster's shortfall passes to the larger ones and shares differ by at
/// most one where clusters are large enough. With `one_per` (each member's instruction),
/// no instruction is taken twice; what that leaves short is drawn from the leftovers.
/// Returns (member, cluster) pairs.
pub fn balanced_sample(
    labels: &[usize],
    clusters: usize,
    budget: usize,
    one_per: Option<&[usize]>,
    seed: u64,
) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut by_cluster: Vec<Vec<usize>> = vec![Vec::new(); clusters];
    for (m, &c) in labels.iter().enumerate() {
        by_cluster[c].push(m);
    }
    for members in &mut by_cluster {
        rng.shuffle(members);
    }
    let mut order: Vec<usize> = (0..clusters).filter(|&c| !by_cluster[c].is_empty()).collect();
    order.sort_by_key(|&c| (by_cluster[c].len(), c));

    let mut picked = vec![false; labels.len()];
    let mut used_instruction = std::collections::HashSet::new();
    let mut take = |m: usize, picked: &mut Vec<bool>| {
        let free = one_per.is_none_or(|of| used_instruction.insert(of[m]));
        if free {
            picked[m] = true;
        }
        free
    };
    let mut drawn = Vec::with_capacity(budget);
    let mut remaining = budget;
    for (visited, &c) in order.iter().enumerate() {
        let share = remaining.div_ceil(order.len() - visited);
        let mut got = 0;
        for &m in &by_cluster[c] {
            if got == share {
                break;
            }
            if take(m, &mut picked) {
                drawn.push((m, c));
                got += 1;
            }
        }
        remaining -= got;
    }
    if remaining > 0 {
        let mut leftovers: Vec<usize> = (0..labels.len()).filter(|&m| !picked[m]).collect();
        rng.shuffle(&mut leftovers);
        for m in leftovers {
            if remaining == 0 {
                break;
            }
            if take(m, &mut picked) {
                drawn.push((m, labels[m]));
                remaining -= 1;
            }
        }
    }
    drawn
}

/// Cluster sizes in power-of-two buckets: how lopsided the clustering is at a glance.
fn histogram(sizes: &[usize]) -> Vec<serde_json::Value> {
    let mut buckets: std::collections::BTreeMap<usize, usize> = std::collections::BTreeMap::new();
    for &s in sizes {
        let from = if s == 0 { 0 } else { 1 << s.ilog2() };
        *buckets.entry(from).or_default() += 1;
    }
    buckets
        .into_iter()
        .map(|(from, n)| serde_json::json!({"sizes": format!("{from}-{}", (2 * from).max(1) - 1), "clusters": n}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adjusted Rand index of two labellings (Hubert & Arabie, 1985).
    fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
        let choose2 = |n: usize| (n * n.saturating_sub(1)) as f64 / 2.0;
        let mut table = std::collections::HashMap::new();
        let (mut rows, mut cols) = (std::collections::HashMap::new(), std::collections::HashMap::new());
        for (&x, &y) in a.iter().zip(b) {
            *table.entry((x, y)).or_insert(0usize) += 1;
            *rows.entry(x).or_insert(0usize) += 1;
            *cols.entry(y).or_insert(0usize) += 1;
        }
        let index: f64 = table.values().map(|&n| choose2(n)).sum();
        let (sum_a, sum_b): (f64, f64) =
            (rows.values().map(|&n| choose2(n)).sum(), cols.values().map(|&n| choose2(n)).sum());
        let expected = sum_a * sum_b / choose2(a.len());
        (index - expected) / (0.5 * (sum_a + sum_b) - expected)
    }

    /// Trajectories of `groups` kinds: each kind's losses fall along its own curve, plus noise.
    fn synthetic(groups: usize, per_group: usize, dims: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let mut features = Vec::new();
        let mut truth = Vec::new();
        for g in 0..groups {
            for _ in 0..per_group {
                for d in 0..dims {
                    let curve = (3.0 + g as f64) * (-(d as f64) * (0.1 + 0.15 * g as f64)).exp();
                    features.push(curve + 0.05 * (rng.uniform() - 0.5));
                }
                truth.push(g);
            }
        }
        (features, truth)
    }

    #[test]
    fn kmeans_recovers_well_separated_groups() {
        let (features, truth) = synthetic(5, 40, 8, 3);
        let labels = kmeans(&features, 8, Kmeans { k: 5, iterations: 20, restarts: 1 }, 7).unwrap();
        let ari = adjusted_rand_index(&labels, &truth);
        assert!(ari > 0.9, "adjusted Rand index {ari}");
        assert_eq!(labels, kmeans(&features, 8, Kmeans { k: 5, iterations: 20, restarts: 1 }, 7).unwrap(), "seeded");
    }

    #[test]
    fn balanced_shares_differ_by_at_most_one_and_meet_the_budget() {
        // Clusters of sizes 3, 40, 50, 60, 70: the small one gives all it has.
        let sizes = [3usize, 40, 50, 60, 70];
        let labels: Vec<usize> = sizes.iter().enumerate().flat_map(|(c, &n)| std::iter::repeat_n(c, n)).collect();
        for budget in [5, 17, 103, 150] {
            let drawn = balanced_sample(&labels, sizes.len(), budget, None, 11);
            assert_eq!(drawn.len(), budget);
            let mut per = vec![0usize; sizes.len()];
            drawn.iter().for_each(|&(m, c)| {
                assert_eq!(labels[m], c);
                per[c] += 1;
            });
            let large: Vec<usize> = (0..sizes.len()).filter(|&c| per[c] < sizes[c]).map(|c| per[c]).collect();
            let (lo, hi) = (large.iter().min().unwrap(), large.iter().max().unwrap());
            assert!(hi - lo <= 1, "budget {budget}: {per:?}");
            let mut unique: Vec<usize> = drawn.iter().map(|d| d.0).collect();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), budget, "no member twice");
            assert_eq!(drawn, balanced_sample(&labels, sizes.len(), budget, None, 11), "seeded");
        }
        assert_ne!(balanced_sample(&labels, 5, 20, None, 1), balanced_sample(&labels, 5, 20, None, 2));
    }

    #[test]
    fn one_per_instruction_never_repeats_an_instruction() {
        // 30 instructions with 4 candidates each, clustered by candidate index.
        let labels: Vec<usize> = (0..120).map(|m| m % 4).collect();
        let instruction: Vec<usize> = (0..120).map(|m| m / 4).collect();
        let drawn = balanced_sample(&labels, 4, 30, Some(&instruction), 5);
        assert_eq!(drawn.len(), 30);
        let mut seen: Vec<usize> = drawn.iter().map(|&(m, _)| instruction[m]).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 30);
    }

    #[test]
    fn bad_parameters_are_named() {
        let params = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Params>();
        for (kv, needle) in [
            (vec![("mode", "all")], "pairs or per-instruction"),
            (vec![("k", "0")], "`k` must be at least 1"),
            (vec![("clusters", "3")], "unknown parameter `clusters`"),
        ] {
            let err = build(&params(&kv)).err().expect("refused").to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
