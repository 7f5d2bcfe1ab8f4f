//! pass@k, accuracy and their 95% bootstrap intervals over items.

use crate::util::Rng;
use serde::{Deserialize, Serialize};

/// Unbiased pass@k of one item from `n` samples of which `correct` passed (Chen et al.,
/// 2021): 1 − C(n−c, k) / C(n, k), computed as a product so it never overflows.
pub fn pass_at_k(n: usize, correct: usize, k: usize) -> f64 {
    if n < k || k == 0 {
        return f64::NAN;
    }
    if n - correct < k {
        return 1.0;
    }
    1.0 - ((n - correct + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// In [0, 1]; NaN over no items (a shard that drew none of a benchmark's).
    #[serde(deserialize_with = "crate::util::nan_if_null")]
    pub value: f64,
    pub n: usize,
    /// 95% percentile-bootstrap interval over items.
    #[serde(deserialize_with = "nan_pair_if_null")]
    pub ci95: (f64, f64),
}

fn nan_pair_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(f64, f64), D::Error> {
    let (low, high) = <(Option<f64>, Option<f64>)>::deserialize(d)?;
    Ok((low.unwrap_or(f64::NAN), high.unwrap_or(f64::NAN)))
}

/// Mean of per-item scores with a seeded percentile bootstrap (1000 resamples).
pub fn estimate(scores: &[f64], seed: u64) -> Estimate {
    let n = scores.len();
    let mean = |xs: &mut dyn Iterator<Item = f64>| xs.sum::<f64>() / n.max(1) as f64;
    let value = mean(&mut scores.iter().copied());
    if n == 0 {
        return Estimate { value: f64::NAN, n, ci95: (f64::NAN, f64::NAN) };
    }
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..1000).map(|_| mean(&mut (0..n).map(|_| scores[rng.below(n)]))).collect();
    means.sort_by(f64::total_cmp);
    Estimate { value, n, ci95: (means[24], means[974]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        assert_eq!(pass_at_k(1, 1, 1), 1.0);
        assert_eq!(pass_at_k(1, 0, 1), 0.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        // 1 - C(7,5)/C(10,5) = 1 - 21/252
        assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 6, 5), 1.0);
        assert!(pass_at_k(3, 1, 5).is_nan());
    }

    #[test]
    fn an_estimate_over_no_items_survives_json() {
        let none = estimate(&[], 0);
        let back: Estimate = serde_json::from_str(&serde_json::to_string(&none).unwrap()).unwrap();
        assert!(back.value.is_nan() && back.ci95.0.is_nan() && back.n == 0);
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_is_seeded() {
        let scores: Vec<f64> = (0..200).map(|i| (i % 4 == 0) as u8 as f64).collect();
        let e = estimate(&scores, 1);
        assert_eq!(e.value, 0.25);
        assert!(e.ci95.0 < 0.25 && e.ci95.1 > 0.25 && e.ci95.1 - e.ci95.0 < 0.15, "{e:?}");
        assert_eq!(e, estimate(&scores, 1));
        assert_eq!(estimate(&[1.0; 5], 3).ci95, (1.0, 1.0));
    }
}
