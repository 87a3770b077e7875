//! Floating-point error constants and helpers shared by every op's bound derivation.
//!
//! Conventions used in the derivations: `u = 2⁻⁵³`; `γ_n = n·u/(1−n·u)`; "per side" means the
//! distance of one honest result from the exact real value; the returned bound is twice the
//! per-side bound (our result and the other honest result are both within it of the exact
//! value), evaluated at our computed values, times [`SLACK`].

/// Unit roundoff of binary64.
pub(crate) const U: f64 = 1.0 / 9_007_199_254_740_992.0;

/// Relative error allowed for an honest `exp`, `ln`, `tanh`: 4 ulp ≤ 4·2u·|y| = 8u·|y|.
pub(crate) const TRANS_REL: f64 = 8.0 * U;

/// Absolute error of one subnormal-range operation: 4 ulps of the smallest subnormal (covers a
/// 4-ulp transcendental and the absolute, not relative, rounding of an underflowing product).
pub(crate) const ETA: f64 = 4.0 * f64::from_bits(1);

/// Factor applied to every final bound (see the crate docs).
pub(crate) const SLACK: f64 = 1.0 + 1.0 / 65_536.0;

/// `γ_n = n·u / (1 − n·u)`.
#[inline]
pub(crate) fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

/// The final bound from a per-side error `e`: `2·e·SLACK`.
#[inline]
pub(crate) fn two_sided(e: f64) -> f64 {
    2.0 * e * SLACK
}

/// Bound for a plain sum of `n` terms whose absolute values sum to `abs_sum`, computed in any
/// order with or without FMA: each side is within `γ_{n−1}·Σ|t|` of the exact sum
/// (Higham, Thm 4.4), so two sides differ by `2·γ_{n−1}·Σ|t|`. Terms must be exact (FP32
/// products, inputs): error in the terms themselves must be added by the caller.
#[inline]
pub(crate) fn sum_bound(n: usize, abs_sum: f64) -> f64 {
    two_sided(gamma(n.saturating_sub(1)) * abs_sum)
}
