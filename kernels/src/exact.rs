//! Correctly rounded sums: the exact real sum of FP64 terms, rounded once to nearest (ties to
//! even). Every machine that computes one gets the same bits, in whatever order it adds the
//! terms, so an op that defines a reduction this way needs no error bound for it.
//!
//! The algorithm is Shewchuk's ("Adaptive precision floating-point arithmetic", 1997), as in
//! Python's `math.fsum`: a running expansion of non-overlapping partial sums, each addition
//! error-free (two-sum), and a final rounding that corrects half-way cases. It is exact as
//! long as no partial sum overflows, which the ops' terms are far from: batch norm adds FP32
//! gradients and their products with `x̂ = (x−μ)·rstd`, below 2²⁵⁷ in magnitude as `x − μ` and
//! `rstd` are FP32. Non-finite terms make the sum their own sum, in the order they were added.

/// How the ops that take statistics over many values sum them: part of those ops' definitions,
/// which a record's format fixes (the engine's `RunSpec::sums`). It governs batch norm's
/// channel sums (forward and backward) and average pooling's window sums; every other reduction
/// is summed in the profile's order, within the bound of any order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sums {
    /// In the profile's order, within the bound of any order (record formats up to 4). Batch
    /// norm's channel means `mean(g)` and `mean(g·x̂)` then carry the any-order error of
    /// thousands of terms into every input gradient, which makes the gradients where a ReLU
    /// zeroed the output gradient ambiguous far more often than any other op's outputs; and an
    /// average whose window sums exactly can still land exactly on an FP32 midpoint.
    ProfileOrder,
    /// Correctly rounded (from record format 5): the exact sum rounded once, the same bits on
    /// every machine, so these results need no bound for their sums.
    /// - Batch norm forward: `μ = (Σx)/n` and `V = (Σc²)/n` with `c = x − μ`, so `μ` and
    ///   `rstd = 1/√(V+eps)` are the same bits everywhere.
    /// - Batch norm backward: `S₁ = Σ gy` and `S₂ = Σ gy·x̂` per channel, `gβ = S₁`, `gγ = S₂`,
    ///   `mean(g) = (γ·S₁)/n`, `mean(g·x̂) = (γ·S₂)/n`, each operation rounded once.
    /// - Average pooling: each output is its window's correctly rounded sum divided by the
    ///   window's size (a division, not a multiplication by its reciprocal): exact.
    CorrectlyRounded,
}

/// A correctly rounded sum being accumulated.
#[derive(Debug, Default, Clone)]
pub(crate) struct ExactSum {
    /// Non-overlapping partial sums, in increasing magnitude; their exact sum is the sum so far.
    partials: Vec<f64>,
    /// The sum of the non-finite terms, in the order they were added (`None` if there were none).
    special: Option<f64>,
}

impl ExactSum {
    /// An empty sum.
    pub(crate) fn new() -> ExactSum {
        ExactSum::default()
    }

    /// Empties the sum, keeping its storage for the next.
    pub(crate) fn clear(&mut self) {
        self.partials.clear();
        self.special = None;
    }

    /// Adds one term, exactly.
    #[inline]
    pub(crate) fn add(&mut self, term: f64) {
        if !term.is_finite() {
            self.special = Some(self.special.map_or(term, |s| s + term));
            return;
        }
        let mut x = term;
        let mut kept = 0;
        for j in 0..self.partials.len() {
            let mut y = self.partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            // Two-sum with |x| ≥ |y|: hi + lo = x + y exactly.
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.partials.truncate(kept);
        self.partials.push(x);
    }

    /// Adds `a·b` exactly, for an FP32 `a` (exact in FP64) and a finite FP64 `b`: `b` is split
    /// into its high 26 and low 27 significand bits, and each half's product with `a`'s 24 bits
    /// fits FP64's 53, so both products are exact unless one underflows (below 2⁻¹⁰²²: for
    /// batch norm's `x̂`, whose nonzero values exceed 2⁻³⁰⁰, it cannot).
    #[inline]
    pub(crate) fn add_product(&mut self, a: f32, b: f64) {
        let hi = f64::from_bits(b.to_bits() & !((1u64 << 27) - 1));
        let lo = b - hi;
        let a = a as f64;
        self.add(a * hi);
        self.add(a * lo);
    }

    /// Adds `c²` exactly, for any finite `c` whose square neither overflows nor underflows
    /// (below 2⁵¹¹ and above 2⁻⁴⁴⁰ in magnitude, or zero): Veltkamp's split makes `c = hi + lo`
    /// with 26 significand bits in each, so `hi²`, `2·hi·lo` and `lo²` are exact.
    #[inline]
    pub(crate) fn add_square(&mut self, c: f64) {
        let t = c * 134_217_729.0; // 2²⁷ + 1
        let hi = t - (t - c);
        let lo = c - hi;
        self.add(hi * hi);
        self.add(2.0 * hi * lo);
        self.add(lo * lo);
    }

    /// The sum of the terms added, rounded once to nearest, ties to even. Like every sum in
    /// this crate it starts from `+0`: an exact zero is `+0`, even when every term was `−0`.
    pub(crate) fn round(&self) -> f64 {
        if let Some(s) = self.special {
            return s;
        }
        let p = &self.partials;
        let Some(&top) = p.last() else { return 0.0 };
        // Add the partials from the top down until one addition is inexact: the ones below
        // it can then only decide a tie.
        let mut n = p.len() - 1;
        let (mut hi, mut lo) = (top, 0.0);
        while n > 0 {
            n -= 1;
            let (x, y) = (hi, p[n]);
            hi = x + y;
            lo = y - (hi - x);
            if lo != 0.0 {
                break;
            }
        }
        // hi + lo is exact, and lo is half an ulp of hi or less. If it is exactly half and the
        // partials below push the same way, the tie is not a tie: round away from hi.
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        // The start from +0: changes only a −0.
        hi + 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::SplitMix64;

    fn sum(terms: &[f64]) -> f64 {
        let mut s = ExactSum::new();
        terms.iter().for_each(|&t| s.add(t));
        s.round()
    }

    /// The exact sum of FP32 values of magnitude in [2⁻²¹, 2²⁰), as a multiple of 2⁻⁴⁵ in an
    /// i128, rounded once to FP64 (`as` rounds to nearest, ties to even; the scaling by a power
    /// of two is exact).
    fn reference(terms: &[f32]) -> f64 {
        let scale = 2f64.powi(45);
        let total: i128 = terms
            .iter()
            .map(|&t| {
                let scaled = t as f64 * scale;
                assert_eq!(scaled.fract(), 0.0, "{t} is not a multiple of 2⁻⁴⁵");
                scaled as i128
            })
            .sum();
        total as f64 / scale
    }

    #[test]
    fn cancellation_and_ties_round_as_the_exact_sum() {
        let e = |k: i32| 2f64.powi(k);
        assert_eq!(sum(&[]).to_bits(), 0f64.to_bits());
        assert_eq!(sum(&[-0.0, -0.0]).to_bits(), 0f64.to_bits());
        assert_eq!(sum(&[-1.0, 1.0]).to_bits(), 0f64.to_bits());
        assert_eq!(sum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(sum(&[1e16, 1.0, -1e16]), 1.0);
        // 1 + 2⁻⁵³ is a tie, rounded to even (1); anything above it rounds up.
        assert_eq!(sum(&[1.0, e(-53)]), 1.0);
        assert_eq!(sum(&[1.0, e(-53), e(-80)]), 1.0 + e(-52));
        assert_eq!(sum(&[1.0, e(-53), -e(-80)]), 1.0);
        assert_eq!(sum(&[1.0 + e(-52), e(-53)]), 1.0 + e(-51));
        assert_eq!(sum(&[1.0 + e(-52), e(-53), -e(-100)]), 1.0 + e(-52));
        assert_eq!(sum(&[-1.0, -e(-53), -e(-80)]), -(1.0 + e(-52)));
        // A plain left-to-right sum gets these wrong.
        assert_eq!(sum(&[e(-60), 1.0, e(-60), -1.0]), e(-59));
        let mut s = ExactSum::new();
        s.add(1.0);
        s.add(f64::INFINITY);
        s.add(2.0);
        assert_eq!(s.round(), f64::INFINITY);
        s.add(f64::NEG_INFINITY);
        assert!(s.round().is_nan());
        // Cleared, it forgets the special terms and the partials alike.
        s.clear();
        [1e16, 1.0].iter().for_each(|&t| s.add(t));
        s.add(-1e16);
        assert_eq!(s.round(), 1.0);
    }

    #[test]
    fn sums_equal_the_exact_sum_in_any_order() {
        let mut rng = SplitMix64(11);
        for case in 0..200 {
            let n = 1 + (rng.next_u64() % 3000) as usize;
            // Values over 40 binades, half of them cancelling something.
            let mut terms: Vec<f32> = (0..n)
                .map(|_| {
                    let m = (rng.next_u64() % (1 << 24)) as f32 / (1u32 << 24) as f32 + 0.5;
                    let k = (rng.next_u64() % 40) as i32 - 20;
                    let sign = if rng.next_u64().is_multiple_of(2) { 1.0 } else { -1.0 };
                    sign * m * 2f32.powi(k)
                })
                .collect();
            if case % 2 == 0 {
                let negated: Vec<f32> = terms.iter().take(n / 2).map(|t| -t).collect();
                terms.extend(negated);
            }
            let want = reference(&terms);
            let as_f64: Vec<f64> = terms.iter().map(|&t| t as f64).collect();
            assert_eq!(sum(&as_f64).to_bits(), want.to_bits(), "case {case}");
            // Reversed and rotated: the same bits.
            let mut other = as_f64.clone();
            other.reverse();
            other.rotate_left(n / 3);
            assert_eq!(sum(&other).to_bits(), want.to_bits(), "case {case}, reordered");
        }
    }

    #[test]
    fn products_are_added_exactly() {
        let mut rng = SplitMix64(12);
        for _ in 0..2000 {
            let a = (rng.unit() - 0.5) as f32 * 3.0;
            let b = (rng.unit() - 0.5) * 1e3;
            let hi = f64::from_bits(b.to_bits() & !((1u64 << 27) - 1));
            let lo = b - hi;
            assert_eq!(hi + lo, b);
            for half in [hi, lo] {
                let p = a as f64 * half;
                assert_eq!((a as f64).mul_add(half, -p), 0.0, "{a} · {half} is not exact");
            }
            // The sum of the two halves' products is the product correctly rounded.
            let mut s = ExactSum::new();
            s.add_product(a, b);
            assert_eq!(s.round(), a as f64 * b);
            // And a square's three pieces are exact: their sum is the square correctly rounded.
            let t = b * 134_217_729.0;
            let (hi, lo) = (t - (t - b), b - (t - (t - b)));
            for (x, y) in [(hi, hi), (2.0 * hi, lo), (lo, lo)] {
                assert_eq!(x.mul_add(y, -(x * y)), 0.0, "{x} · {y} is not exact");
            }
            let mut s = ExactSum::new();
            s.add_square(b);
            assert_eq!(s.round(), b * b);
        }
    }
}
