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

/// Exponent of the least significant set bit of an FP32 value (`x = m·2^e` with `m` odd), or
/// `None` for zero. Every FP32 value, and every product of two, is a multiple of `2^e`.
#[inline]
pub(crate) fn lsb_exp(x: f32) -> Option<i32> {
    let bits = x.to_bits() & 0x7fff_ffff;
    if bits == 0 {
        return None;
    }
    let e = (bits >> 23) as i32;
    let (sig, scale) = if e == 0 { (bits, -149) } else { (bits & 0x7f_ffff | 0x80_0000, e - 150) };
    Some(scale + sig.trailing_zeros() as i32)
}

/// Accumulates the exact terms of one sum (FP32 values, or products of two FP32 values, which
/// are exact in FP64) to decide how far two honest machines' sums can be apart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExactTerms {
    abs_sum: f64,
    lsb_min: i32,
    n: usize,
}

impl ExactTerms {
    pub(crate) fn new() -> Self {
        ExactTerms { abs_sum: 0.0, lsb_min: i32::MAX, n: 0 }
    }

    /// Adds the product `a·b`.
    #[inline]
    pub(crate) fn product(&mut self, a: f32, b: f32) {
        self.n += 1;
        if let (Some(ea), Some(eb)) = (lsb_exp(a), lsb_exp(b)) {
            self.abs_sum += (a as f64 * b as f64).abs();
            self.lsb_min = self.lsb_min.min(ea + eb);
        }
    }

    /// Adds the term `a`.
    #[inline]
    pub(crate) fn value(&mut self, a: f32) {
        self.n += 1;
        if let Some(e) = lsb_exp(a) {
            self.abs_sum += (a as f64).abs();
            self.lsb_min = self.lsb_min.min(e);
        }
    }

    /// Whether every summation order gives the exact sum: all terms are multiples of
    /// `2^lsb_min`, so every partial sum is too, and its magnitude is at most `Σ|t|`; if that is
    /// below `2^(lsb_min + 52)` (one bit of margin for the rounding of the computed `Σ|t|`),
    /// every partial sum fits in 53 bits and no addition rounds.
    pub(crate) fn is_exact(&self) -> bool {
        if self.abs_sum == 0.0 {
            return true;
        }
        let limit_exp = self.lsb_min.saturating_add(52);
        limit_exp >= 1023 || (limit_exp >= -1074 && self.abs_sum < pow2(limit_exp))
    }

    /// The two-sided bound for the sum: 0 when every order is exact, else `2·γ_{n−1}·Σ|t|`.
    pub(crate) fn bound(&self) -> f64 {
        if self.is_exact() { 0.0 } else { sum_bound(self.n, self.abs_sum) }
    }

    /// [`ExactTerms::bound`] of `n` terms whose absolute values sum (in term order) to
    /// `abs_sum`, given the least-significant-bit exponents of the non-zero terms (see
    /// [`lsb_exp`]) lazily: `Σ|t|` is cheap to accumulate branch-free, the exponents are not.
    /// `is_exact` only becomes harder to satisfy as `lsb_min` falls, so the first exponent that
    /// rules exactness out decides, and the rest are never computed; the result equals that of
    /// feeding every term to [`ExactTerms::product`] or [`ExactTerms::value`].
    pub(crate) fn bound_given_sum(n: usize, abs_sum: f64, lsbs: impl Iterator<Item = i32>) -> f64 {
        let mut terms = ExactTerms { abs_sum, lsb_min: i32::MAX, n };
        for e in lsbs {
            terms.lsb_min = terms.lsb_min.min(e);
            if !terms.is_exact() {
                return sum_bound(n, abs_sum);
            }
        }
        terms.bound()
    }
}

/// `2^e` for `e` in `[-1074, 1023]`, built from bits (exact, no library call).
pub(crate) fn pow2(e: i32) -> f64 {
    debug_assert!((-1074..=1023).contains(&e));
    if e >= -1022 { f64::from_bits(((e + 1023) as u64) << 52) } else { f64::from_bits(1u64 << (e + 1074)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsb_exponents() {
        assert_eq!(lsb_exp(1.0), Some(0));
        assert_eq!(lsb_exp(1.5), Some(-1));
        assert_eq!(lsb_exp(-12.0), Some(2));
        assert_eq!(lsb_exp(f32::from_bits(1)), Some(-149));
        assert_eq!(lsb_exp(0.0), None);
        assert_eq!(lsb_exp(-0.0), None);
        assert_eq!(pow2(-1074), f64::from_bits(1));
        assert_eq!(pow2(3), 8.0);
    }

    #[test]
    fn exact_sums_are_detected_and_inexact_ones_are_not() {
        let mut t = ExactTerms::new();
        for x in [1.0f32, -0.5, 3.25, 1e-3] {
            t.value(x);
        }
        assert!(t.is_exact(), "24-bit values within 2^30 of each other sum exactly");
        assert_eq!(t.bound(), 0.0);
        let mut t = ExactTerms::new();
        t.value(1e30);
        t.value(1e-30);
        assert!(!t.is_exact());
        assert!(t.bound() > 0.0);
        // Products: 2^-149 · 2^-149 is a multiple of 2^-298.
        let mut t = ExactTerms::new();
        t.product(f32::from_bits(1), f32::from_bits(1));
        t.product(1.0, 1.0);
        assert!(!t.is_exact(), "spans 298 bits");
    }

    /// The lazy form gives the same bits as feeding every term, on exact and inexact sums.
    #[test]
    fn bound_given_sum_equals_feeding_every_term() {
        let mut rng = crate::parity::SplitMix64(9);
        for case in 0..400 {
            let n = 1 + (rng.next_u64() % 40) as usize;
            // Small integers times a shared power of two sum exactly; wide exponents do not.
            let spread = [0, 3, 30, 120][case % 4];
            let term = |rng: &mut crate::parity::SplitMix64| -> f32 {
                let x = (rng.next_u64() % 2001) as f32 - 1000.0;
                x * 2f32.powi((rng.next_u64() % (spread + 1)) as i32 - (spread / 2) as i32)
            };
            let pairs: Vec<(f32, f32)> = (0..n).map(|_| (term(&mut rng), term(&mut rng))).collect();
            let mut fed = ExactTerms::new();
            let mut abs_sum = 0.0;
            for &(a, b) in &pairs {
                fed.product(a, b);
                abs_sum += if a != 0.0 && b != 0.0 { (a as f64 * b as f64).abs() } else { 0.0 };
            }
            let lsbs = pairs.iter().filter_map(|&(a, b)| Some(lsb_exp(a)? + lsb_exp(b)?));
            assert_eq!(ExactTerms::bound_given_sum(n, abs_sum, lsbs).to_bits(), fed.bound().to_bits(), "case {case}");
        }
    }
}
