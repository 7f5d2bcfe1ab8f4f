//! Vector arithmetic for the training kernels: a branch-free `exp`, reductions the compiler
//! can vectorise, and `multiversion!`, which builds a kernel a second time for AVX2.
//!
//! The crate builds for baseline x86-64, whose vectors are SSE2's four lanes; AVX2 has
//! eight, and every CPU this tool trains on has it. Floating-point addition is not
//! associative, so the compiler leaves `iter().sum()` as one scalar chain; the reductions
//! here keep `LANES` partial results instead, in a fixed order, so they stay deterministic.

/// Partial results per reduction: two AVX2 registers' worth.
const LANES: usize = 16;

/// Defines `fn $name(..)` that runs a copy of its body compiled for AVX2 where the CPU has
/// it, and the baseline copy elsewhere. Helpers marked `#[inline(always)]` (all of this
/// module's) and closures in the body are compiled into each copy.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) $(-> $ret)? $body
            fn baseline($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has the one feature `avx2` is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            baseline($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// e^x within 4 ulp (0 below e^-87, where f32 leaves normal numbers; e^88 above 88), branch-free so
/// that the loops over it vectorise, which they do not around libm's `expf`: that call was 4%
/// of a training step.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // e^r on |r| <= ln2/2 by Taylor to degree 6 (truncation below 1.3e-7 relative).
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `LANES` running results of `combine`, folded in a fixed order at the end.
#[inline(always)]
fn fold_lanes<A: Copy>(
    a: &[f32],
    b: &[f32],
    init: A,
    term: impl Fn(f32, f32) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    let n = a.len().min(b.len());
    let (a_blocks, a_tail) = a[..n].as_chunks::<LANES>();
    let (b_blocks, b_tail) = b[..n].as_chunks::<LANES>();
    let mut acc = [init; LANES];
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for l in 0..LANES {
            acc[l] = combine(acc[l], term(x[l], y[l]));
        }
    }
    for (l, (&x, &y)) in a_tail.iter().zip(b_tail).enumerate() {
        acc[l] = combine(acc[l], term(x, y));
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] = combine(acc[l], acc[l + width]);
        }
    }
    acc[0]
}

/// Σ term(a[i], b[i]) over the shorter of the two.
#[inline(always)]
pub fn sum2(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    fold_lanes(a, b, 0.0, term, |s, t| s + t)
}

/// Σ term(a[i]).
#[inline(always)]
pub fn sum(a: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    fold_lanes(a, a, 0.0, |x, _| term(x), |s, t| s + t)
}

/// The largest element (−∞ for none).
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    fold_lanes(a, a, f32::NEG_INFINITY, |x, _| x, f32::max)
}

/// Σ x² in f64, for norms over millions of elements.
#[inline(always)]
pub fn sum_squares_f64(a: &[f32]) -> f64 {
    fold_lanes(a, a, 0.0, |x, _| x as f64 * x as f64, |s, t| s + t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_four_ulp_of_libm_and_zero_far_below() {
        for i in -86_999..88_000 {
            let x = i as f32 * 1e-3;
            let (ours, libm) = (exp(x), x.exp());
            assert!((ours - libm).abs() <= 4.0 * f32::EPSILON * libm, "e^{x}: {ours} vs {libm}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::INFINITY).is_finite());
    }

    multiversion! {
        fn sum_of_products(a: &[f32], b: &[f32]) -> f32 {
            sum2(a, b, |x, y| x * y)
        }
    }

    #[test]
    fn reductions_match_plain_loops_on_every_length_around_the_lanes() {
        for n in [0, 1, 7, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
            // Quarter and half steps: every sum is exact, so any order gives the same bits.
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(sum_of_products(&a, &b), dot, "n = {n}");
            assert_eq!(sum(&a, |x| x * x), a.iter().map(|x| x * x).sum::<f32>());
            assert_eq!(max(&a), a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            assert_eq!(sum_squares_f64(&b), b.iter().map(|&x| x as f64 * x as f64).sum::<f64>());
        }
    }
}
