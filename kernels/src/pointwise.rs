//! Elementwise ops added for user-defined graphs: `tanh` and `sigmoid` (forward and backward),
//! and the mean-squared-error loss.
//!
//! These run on the host for every profile, the `cuda` profile included (its kernels have no
//! GPU version yet): the profile still chooses the `exp`/`tanh` formula, so the forward bounds
//! are exercised across profiles. Each backward is a fixed sequence of correctly rounded
//! operations on FP32 inputs, so it is exact (the same bits on every honest machine); the
//! operation order is part of the op's definition (see the crate docs).

use rayon::prelude::*;

use crate::bound::{ETA, TRANS_REL, U, gamma, two_sided};
use crate::reduce::{dot_by, exp, tanh};
use crate::{Bounded, Device, ErrorBound, Result, arg_err, check_len, shape_err};

/// An absolute error term far below the smallest FP32 rounding midpoint (`2⁻¹⁵⁰`): it covers
/// results that underflow, or overflow an intermediate `exp`, differently on two machines
/// (both sides then round to the same FP32 value, and the bound stays sound).
const TINY: f64 = 4.0 * f64::MIN_POSITIVE;

fn map_bounded(x: &[f32], f: impl Fn(f64) -> (f64, f64) + Sync + Send) -> Bounded {
    let (values, bounds): (Vec<f64>, Vec<f64>) = x.par_iter().with_min_len(4096).map(|&v| f(v as f64)).unzip();
    Bounded { values, bound: ErrorBound::PerElement(bounds) }
}

impl Device {
    /// `tanh x`. The argument is exact (an FP32 input), so each side is within the 4-ulp
    /// transcendental error `8u·|y|` of the exact value (plus the subnormal `ETA`).
    pub fn tanh(&self, x: &[f32]) -> Result<Bounded> {
        let p = self.profile();
        Ok(map_bounded(x, |x| {
            let y = tanh(p, x);
            (y, two_sided(TRANS_REL * y.abs() + ETA))
        }))
    }

    /// Tanh backward from the rounded output `y`: `gy · (1 − y·y)`. `y·y` is exact (a product
    /// of FP32 values), so `1 − y·y` is one correctly rounded operation with or without FMA,
    /// and the product with `gy` another. Exact.
    pub fn tanh_backward(&self, y: &[f32], gy: &[f32]) -> Result<Bounded> {
        check_len("tanh_backward", "grad_out", gy.len(), y.len())?;
        Ok(Bounded::exact(
            y.par_iter()
                .zip(gy)
                .with_min_len(4096)
                .map(|(&y, &g)| {
                    let y = y as f64;
                    g as f64 * (1.0 - y * y)
                })
                .collect(),
        ))
    }

    /// The logistic function, defined as `1/(1 + e^{−x})` for `x ≥ 0` and `e^x/(1 + e^x)` for
    /// `x < 0` (no overflow of the exponential in either branch). Per side: the exponential
    /// is within `8u` relative, the sum adds at most that error plus `u`, the division `u` and
    /// up to `8u` more from the numerator: `γ_18·|y|` covers both branches, plus [`TINY`].
    pub fn sigmoid(&self, x: &[f32]) -> Result<Bounded> {
        let p = self.profile();
        Ok(map_bounded(x, |x| {
            let y = if x >= 0.0 {
                1.0 / (1.0 + exp(p, -x))
            } else {
                let e = exp(p, x);
                e / (1.0 + e)
            };
            (y, two_sided(gamma(18) * y.abs() + ETA + TINY))
        }))
    }

    /// Sigmoid backward from the rounded output `y`: `gy · (y · (1 − y))`, three correctly
    /// rounded operations in this order (no product is followed by an addition, so FMA
    /// contraction cannot apply). Exact.
    pub fn sigmoid_backward(&self, y: &[f32], gy: &[f32]) -> Result<Bounded> {
        check_len("sigmoid_backward", "grad_out", gy.len(), y.len())?;
        Ok(Bounded::exact(
            y.par_iter()
                .zip(gy)
                .with_min_len(4096)
                .map(|(&y, &g)| {
                    let y = y as f64;
                    g as f64 * (y * (1.0 - y))
                })
                .collect(),
        ))
    }

    /// Mean squared error `(1/N)·Σ (p_i − t_i)²` over all `N` elements, and its gradient with
    /// respect to `p`, `(2·(p_i − t_i))/N` (the gradient with respect to `t` is its negation).
    ///
    /// Bounds: each difference `d_i = p_i − t_i` is one correctly rounded operation on FP32
    /// values, so every machine has the same `d`. The sum of squares is a dot product of `d`
    /// with itself, in any order with or without FMA: per side within `γ_N·Σ d_i²`
    /// (Higham 3.5); the division by `N` adds `u·|loss|`. Each gradient element is a doubling
    /// (exact) and one correctly rounded division: exact.
    pub fn mse(&self, pred: &[f32], target: &[f32]) -> Result<(Bounded, Bounded)> {
        const OP: &str = "mse";
        check_len(OP, "target", target.len(), pred.len())?;
        if pred.is_empty() {
            return Err(shape_err(OP, "no elements"));
        }
        let n = pred.len();
        let nf = n as f64;
        if nf >= 1.0 / (2.0 * U) / 4.0 {
            return Err(arg_err(OP, format!("{n} elements are too many for the bound")));
        }
        let d: Vec<f64> = pred.iter().zip(target).map(|(&a, &b)| a as f64 - b as f64).collect();
        let p = self.profile();
        let sum = dot_by(p, n, |i| d[i], |i| d[i]);
        let abs: f64 = d.iter().map(|v| v * v).sum();
        let loss = sum / nf;
        let e = gamma(n) * abs / nf + U * loss.abs() + ETA;
        let grad = d.iter().map(|&v| (2.0 * v) / nf).collect();
        Ok((Bounded { values: vec![loss], bound: ErrorBound::Uniform(two_sided(e)) }, Bounded::exact(grad)))
    }
}

#[cfg(test)]
mod tests {
    use crate::{Device, Profile};

    /// Every CPU profile lands within the bound of every other, on inputs that span the
    /// exponent range (where the formulas differ most).
    #[test]
    fn tanh_sigmoid_and_mse_agree_across_profiles_within_their_bounds() {
        let mut rng = crate::parity::SplitMix64(5);
        let mut x = rng.wide(2000);
        x.extend(rng.uniform(2000, 30.0));
        x.extend([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 700.0, -700.0, f32::MAX, f32::MIN]);
        let t = rng.uniform(x.len(), 1.0);
        let devs: Vec<Device> = Profile::CPU.iter().map(|&p| Device::new(p).unwrap()).collect();
        let outs: Vec<_> = devs
            .iter()
            .map(|d| {
                let t_ = d.tanh(&x).unwrap();
                let s = d.sigmoid(&x).unwrap();
                let (l, _) = d.mse(&x[..2000], &t[..2000]).unwrap();
                vec![t_, s, l]
            })
            .collect();
        for a in 0..outs.len() {
            for b in 0..outs.len() {
                for (ra, rb) in outs[a].iter().zip(&outs[b]) {
                    for i in 0..ra.values.len() {
                        let d = (ra.values[i] - rb.values[i]).abs();
                        assert!(d <= ra.bound.at(i), "profiles {a},{b} element {i}: {d} > {}", ra.bound.at(i));
                    }
                }
            }
        }
        // The sigmoid is in [0, 1] and symmetric: σ(−x) = 1 − σ(x) (to rounding).
        let s = devs[0].sigmoid(&[-3.0, 3.0]).unwrap().values;
        assert!((s[0] + s[1] - 1.0).abs() < 1e-15 && s[0] > 0.0 && s[1] < 1.0);
        let (l, g) = devs[0].mse(&[1.0, 3.0], &[0.0, 1.0]).unwrap();
        assert_eq!(l.values, vec![2.5]);
        assert_eq!(g.values, vec![1.0, 2.0]);
    }
}
