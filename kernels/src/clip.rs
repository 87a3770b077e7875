//! The global gradient norm `‖g‖ = √(Σ_p Σ_i g_{p,i}²)` over every parameter's gradient, for
//! gradient clipping.
//!
//! # Bound
//! The terms `g²` of FP32 values are exact in FP64 (48 significant bits, no overflow or
//! underflow for any FP32 input), so the sum of squares `s` is a plain sum of exact terms
//! reduced in the profile's order: two honest machines' sums differ by at most
//! `δ = 2·γ_{n−1}·Σg²` (0 when every order is exact, see [`ExactTerms`]). Then
//! `|√s − √s'| = |s − s'|/(√s + √s') ≤ min(δ/√s, √δ) =: D`, and each side's `√` is correctly
//! rounded (relative error `u`), so the two norms differ by at most `D + u·(√s + √s + D)`. The
//! returned bound is twice that (margin for evaluating the bound itself in FP64), times
//! `SLACK`; when every order gives the exact sum (`δ = 0`) the norm is the same everywhere
//! and the bound is `Exact`. The sum runs on the host on every profile (one value per step; the `cuda` profile
//! takes `cpu-seq`'s sequential order, as for its other host reductions).

use crate::bound::{ExactTerms, SLACK, U};
use crate::reduce::sum_by;
use crate::{Bounded, Device, ErrorBound, Result};

impl Device {
    /// `‖g‖₂` over the concatenation of `grads` (in the given order), as one bounded value.
    pub fn global_norm(&self, grads: &[&[f32]]) -> Result<Bounded> {
        let flat: Vec<f32> = grads.iter().flat_map(|g| g.iter().copied()).collect();
        let mut terms = ExactTerms::new();
        flat.iter().for_each(|&x| terms.product(x, x));
        let s = sum_by(self.profile(), flat.len(), |i| {
            let x = flat[i] as f64;
            x * x
        });
        let delta = terms.bound();
        let norm = s.sqrt();
        if delta == 0.0 {
            // Every order gives the same sum, and √ is correctly rounded: the same norm everywhere.
            return Ok(Bounded { values: vec![norm], bound: ErrorBound::Exact });
        }
        let d_sqrt = if s > 0.0 { (delta / norm).min(delta.sqrt()) } else { delta.sqrt() };
        let bound = 2.0 * (d_sqrt + U * (2.0 * norm + d_sqrt)) * SLACK;
        Ok(Bounded { values: vec![norm], bound: ErrorBound::Uniform(bound) })
    }
}

#[cfg(test)]
mod tests {
    use crate::{Device, ErrorBound, Profile};

    #[test]
    fn norms_agree_within_the_bound_on_every_profile() {
        // Values of many magnitudes, so the sum of squares rounds in every order.
        let a: Vec<f32> = (0..5000).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3 + 1e-7 * i as f32).collect();
        let b: Vec<f32> = (0..333).map(|i| (i as f32).sqrt() * 3.1e2).collect();
        let grads: [&[f32]; 2] = [&a, &b];
        let exact: f64 = {
            // Reference: squares summed in a fixed order in FP64, then √.
            let s: f64 = a.iter().chain(&b).map(|&x| (x as f64) * (x as f64)).sum();
            s.sqrt()
        };
        let profiles = Profile::CPU;
        let out: Vec<_> = profiles.iter().map(|&p| Device::new(p).unwrap().global_norm(&grads).unwrap()).collect();
        for o in &out {
            let ErrorBound::Uniform(d) = o.bound else { panic!("a rounding sum must have a bound: {:?}", o.bound) };
            assert!((o.values[0] - exact).abs() <= d, "{} vs {exact} (bound {d})", o.values[0]);
            for other in &out {
                assert!((o.values[0] - other.values[0]).abs() <= d);
            }
        }
    }

    #[test]
    fn an_exact_sum_is_exact() {
        let g = [3.0f32, 4.0];
        let n = Device::new(Profile::Cpu).unwrap().global_norm(&[&g]).unwrap();
        assert_eq!(n.values, vec![5.0]);
        assert_eq!(n.bound, ErrorBound::Exact);
        let z = Device::new(Profile::Cpu).unwrap().global_norm(&[&[0.0f32; 4][..]]).unwrap();
        assert_eq!((z.values[0], z.bound), (0.0, ErrorBound::Exact));
    }
}
