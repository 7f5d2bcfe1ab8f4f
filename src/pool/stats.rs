//! What a pool looks like before and after scoring: candidates per instruction, whose
//! responses GRAPE prefers, whether the score merely tracks length, and how much two
//! selections overlap.

use super::Pool;
use crate::score::Score;
use crate::select::Selection;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    pub min: usize,
    pub median: f64,
    pub mean: f64,
    pub max: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolShape {
    pub instructions: usize,
    pub candidates: usize,
    pub candidates_per_instruction: Spread,
    pub single_candidate_instructions: usize,
    /// Candidates written by each source model, by name.
    pub sources: BTreeMap<String, usize>,
}

pub fn shape(pool: &Pool) -> PoolShape {
    let counts: Vec<usize> = pool.instructions.iter().map(|i| i.candidates.len()).collect();
    let mut sources = BTreeMap::new();
    for c in pool.instructions.iter().flat_map(|i| &i.candidates) {
        *sources.entry(c.source.clone()).or_insert(0) += 1;
    }
    PoolShape {
        instructions: counts.len(),
        candidates: counts.iter().sum(),
        candidates_per_instruction: spread(&counts),
        single_candidate_instructions: counts.iter().filter(|&&n| n == 1).count(),
        sources,
    }
}

fn spread(values: &[usize]) -> Spread {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2] as f64,
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0,
    };
    Spread {
        min: sorted.first().copied().unwrap_or(0),
        median,
        mean: sorted.iter().sum::<usize>() as f64 / n.max(1) as f64,
        max: sorted.last().copied().unwrap_or(0),
    }
}

/// How strongly a score follows response length, over all scored candidates: GRAPE's sum
/// of log-probabilities favours short responses unless normalised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthCorrelation {
    pub scored: usize,
    /// Pearson and Spearman correlation of the summed log-prob with the token count.
    pub sum_pearson: f64,
    pub sum_spearman: f64,
    /// The same for the per-token mean.
    pub mean_pearson: f64,
    pub mean_spearman: f64,
}

pub fn length_correlation(scores: &[Vec<Option<Score>>]) -> LengthCorrelation {
    let scored: Vec<&Score> = scores.iter().flatten().flatten().collect();
    let lengths: Vec<f64> = scored.iter().map(|s| s.n_tokens as f64).collect();
    let sums: Vec<f64> = scored.iter().map(|s| s.sum_logprob).collect();
    let means: Vec<f64> = scored.iter().map(|s| s.sum_logprob / s.n_tokens.max(1) as f64).collect();
    LengthCorrelation {
        scored: scored.len(),
        sum_pearson: pearson(&sums, &lengths),
        sum_spearman: spearman(&sums, &lengths),
        mean_pearson: pearson(&means, &lengths),
        mean_spearman: spearman(&means, &lengths),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceShare {
    pub source: String,
    pub picks: usize,
    pub share: f64,
}

/// Each source's share of a selection's picks, largest first.
pub fn source_shares(pool: &Pool, selection: &Selection) -> Vec<SourceShare> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for pick in &selection.picks {
        let source = &pool.instructions[pick.instruction].candidates[pick.candidate].source;
        *counts.entry(source).or_insert(0) += 1;
    }
    let total = selection.picks.len().max(1) as f64;
    let mut shares: Vec<SourceShare> = counts
        .into_iter()
        .map(|(source, picks)| SourceShare { source: source.to_string(), picks, share: picks as f64 / total })
        .collect();
    shares.sort_by(|a, b| b.picks.cmp(&a.picks).then_with(|| a.source.cmp(&b.source)));
    shares
}

/// |A ∩ B| / |A ∪ B| over picked (instruction id, candidate) pairs; 1 for two empty sets.
pub fn jaccard(a: &HashSet<(String, usize)>, b: &HashSet<(String, usize)>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(b).count() as f64 / union as f64
}

/// NaN when either side is constant (or fewer than two points): no correlation is defined.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n as f64, y.iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Pearson on ranks, ties given their average rank.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let average = (start + end - 1) as f64 / 2.0 + 1.0;
        for &i in &order[start..end] {
            ranks[i] = average;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_and_overlap() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &[8.0, 6.0, 4.0, 2.0]) + 1.0).abs() < 1e-12);
        // Monotone but not linear: Spearman sees a perfect order, Pearson does not.
        let cubes = [1.0, 8.0, 27.0, 64.0];
        assert!((spearman(&x, &cubes) - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &cubes) < 0.99);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        assert!(pearson(&x, &[1.0; 4]).is_nan());

        let set = |pairs: &[(&str, usize)]| pairs.iter().map(|(i, c)| (i.to_string(), *c)).collect();
        let a: HashSet<_> = set(&[("1", 0), ("2", 1), ("3", 0)]);
        let b: HashSet<_> = set(&[("1", 0), ("2", 0), ("3", 0), ("4", 2)]);
        assert!((jaccard(&a, &b) - 2.0 / 5.0).abs() < 1e-12);
        assert_eq!(jaccard(&a, &a), 1.0);
    }

    #[test]
    fn spread_of_counts() {
        let s = spread(&[12, 3, 12, 1]);
        assert_eq!((s.min, s.max), (1, 12));
        assert_eq!(s.median, 7.5);
        assert_eq!(s.mean, 7.0);
    }
}
