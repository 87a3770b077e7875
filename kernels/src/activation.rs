//! Elementwise activations (ReLU, GELU with the tanh approximation) and dropout, forward and
//! backward.

use rayon::prelude::*;

use crate::bound::{ETA, TRANS_REL, U, gamma, two_sided};
use crate::cuda::{In, Param, size};
use crate::reduce::tanh;
use crate::{Bounded, Device, ErrorBound, Result, arg_err, check_len};

/// `√(2/π)` as the f64 constant of GPT-2's GELU (part of the op's definition).
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of GPT-2's GELU.
const GELU_A: f64 = 0.044_715;

/// The scalar arguments of the GELU kernels: the element count and the op's two constants,
/// passed as bits so the GPU uses exactly these values.
fn gelu_params(n: usize) -> [Param; 3] {
    [size(n), Param::F64(GELU_C), Param::F64(GELU_A)]
}

/// Elementwise map producing (value, bound) pairs, parallel over fixed-size chunks (the
/// result does not depend on the split: each element is computed independently).
fn map2(n: usize, f: impl Fn(usize) -> (f64, f64) + Sync + Send) -> Bounded {
    let (values, bounds): (Vec<f64>, Vec<f64>) = (0..n).into_par_iter().with_min_len(4096).map(f).unzip();
    Bounded { values, bound: ErrorBound::PerElement(bounds) }
}

/// Bound on `|tanh(z_h) − tanh(z)|` per side where the honest argument `z_h` is within `e_z`
/// of the exact `z ≈ z_o`: mean value theorem with `sech²ξ ≤ min(1, 4·e^{−2|ξ|})`,
/// `|ξ| ≥ |z_o| − 2e_z`, plus the 4-ulp tanh error `8u·|tanh z_h| ≤ 8u·min(1, |z_o|)`.
fn tanh_err(z_o: f64, e_z: f64) -> f64 {
    let lo = (z_o.abs() - 2.0 * e_z).max(0.0);
    let sech2 = (4.0 * (-2.0 * lo).exp()).min(1.0);
    sech2 * e_z + TRANS_REL * z_o.abs().min(1.0) + ETA
}

/// GELU's tanh argument `√(2/π)·(x + 0.044715·x³)`, the op's definition. Elementwise arithmetic
/// only: the GPU path's bounds recompute it on the host (any honest `z` serves as the reference
/// point of [`gelu_tanh_err`], see there).
fn gelu_z(x: f64) -> f64 {
    GELU_C * (x + GELU_A * (x * x * x))
}

/// Per-side error bound of `t = tanh(z)`.
///
/// z: x·x is exact (FP32 input), ·x, A·, +, C· are ≤ 4 roundings in any honest order (FMA only
/// removes some); x and A·x³ have the same sign, so no cancellation: relative error ≤ γ_6 (2
/// spare for reassociated constant products). `tanh_err` then takes any honest `z_o` as the
/// reference point: with `|z_h − z| ≤ e_z` for every honest `z_h` (and for `z_o` itself), the
/// mean-value point ξ satisfies `|ξ| ≥ |z_o| − 2e_z`.
fn gelu_tanh_err(z: f64) -> f64 {
    tanh_err(z, gamma(6) * z.abs())
}

/// GELU's bound from the input, the computed `t = tanh(z)` and the computed output `y`.
fn gelu_bound(x: f64, z: f64, t: f64, y: f64) -> f64 {
    // s = 1+t: one rounding → e_s = e_t + u|s|. y = 0.5·x·s: one rounding (0.5· exact unless
    // subnormal: ETA) → per side 0.5|x|·e_s + u|y| + ETA.
    let s = 1.0 + t;
    let e_s = gelu_tanh_err(z) + U * s.abs();
    two_sided(0.5 * x.abs() * e_s + U * y.abs() + ETA)
}

/// The derivative factor `g` of GELU backward and its per-side error, from the input and the
/// computed `t = tanh(z)`.
fn gelu_grad_factor(x: f64, z: f64, t: f64) -> (f64, f64) {
    let e_t = gelu_tanh_err(z);
    let s = 1.0 + t;
    let q = 1.0 - t * t;
    let f = GELU_C * (1.0 + 3.0 * GELU_A * (x * x));
    let h = 0.5 * x * q * f;
    let g = 0.5 * s + h;
    // Per side: s as in gelu. q = 1−t²: |Δ| ≤ 2|t|e_t (propagated) + u·t² + 3u|q| (covers
    // 1−t·t, (1−t)(1+t), FMA). f > 0, no cancellation, ≤ 5 roundings: γ_5·f. h: ≤ 3 more
    // roundings: γ_3|h|. g = 0.5s + h: + u|g| (+ETA).
    let e_s = e_t + U * s.abs();
    let e_q = 2.0 * t.abs() * e_t + U * t * t + 3.0 * U * q.abs();
    let e_f = gamma(5) * f;
    let e_h = 0.5 * x.abs() * (e_q * f + q.abs() * e_f) + gamma(3) * h.abs();
    (g, 0.5 * e_s + e_h + U * g.abs() + ETA)
}

/// GELU backward's bound from the inputs, `t` and the computed gradient `gx = gy·g`: the
/// product adds u|gx| + ETA to `gy·e_g`.
fn gelu_backward_bound(gy: f64, e_g: f64, gx: f64) -> f64 {
    two_sided(gy.abs() * e_g + U * gx.abs() + ETA)
}

impl Device {
    /// `max(x, 0)`, defined as `x > 0 ? x : 0`: `−0` and NaN give `+0`. Exact. (Rust's
    /// `f64::max` may return either zero for `max(−0, 0)`, and did differ between optimisation
    /// levels here, so the op spells out the choice.)
    pub fn relu(&self, x: &[f32]) -> Result<Bounded> {
        if let Some(g) = self.gpu() {
            let [y] = g.run("relu", "relu_fwd", x.len(), &[In::F32(x)], [x.len()], &[size(x.len())])?;
            return Ok(Bounded::exact(y));
        }
        Ok(Bounded::exact(x.iter().map(|&v| if v > 0.0 { v as f64 } else { 0.0 }).collect()))
    }

    /// `gy · [x > 0]`. Exact.
    pub fn relu_backward(&self, x: &[f32], gy: &[f32]) -> Result<Bounded> {
        check_len("relu_backward", "grad_out", gy.len(), x.len())?;
        if let Some(g) = self.gpu() {
            let [gx] =
                g.run("relu_backward", "relu_bwd", x.len(), &[In::F32(x), In::F32(gy)], [x.len()], &[size(x.len())])?;
            return Ok(Bounded::exact(gx));
        }
        Ok(Bounded::exact(x.iter().zip(gy).map(|(&x, &g)| if x > 0.0 { g as f64 } else { 0.0 }).collect()))
    }

    /// GPT-2 GELU: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    pub fn gelu(&self, x: &[f32]) -> Result<Bounded> {
        let n = x.len();
        if let Some(g) = self.gpu() {
            let [y, t] = g.run("gelu", "gelu_fwd", n, &[In::F32(x)], [n, n], &gelu_params(n))?;
            return Ok(map2(n, |i| (y[i], gelu_bound(x[i] as f64, gelu_z(x[i] as f64), t[i], y[i]))));
        }
        let p = self.profile();
        Ok(map2(n, |i| {
            let x = x[i] as f64;
            let z = gelu_z(x);
            let t = tanh(p, z);
            let y = 0.5 * x * (1.0 + t);
            (y, gelu_bound(x, z, t, y))
        }))
    }

    /// GELU backward: `gy · (0.5·(1+t) + 0.5·x·(1−t²)·√(2/π)·(1 + 3·0.044715·x²))`.
    pub fn gelu_backward(&self, x: &[f32], gy: &[f32]) -> Result<Bounded> {
        check_len("gelu_backward", "grad_out", gy.len(), x.len())?;
        let n = x.len();
        if let Some(g) = self.gpu() {
            let ins = [In::F32(x), In::F32(gy)];
            let [gx, t] = g.run("gelu_backward", "gelu_bwd", n, &ins, [n, n], &gelu_params(n))?;
            return Ok(map2(n, |i| {
                let xv = x[i] as f64;
                let (_, e_g) = gelu_grad_factor(xv, gelu_z(xv), t[i]);
                (gx[i], gelu_backward_bound(gy[i] as f64, e_g, gx[i]))
            }));
        }
        let p = self.profile();
        Ok(map2(n, |i| {
            let (xv, gyv) = (x[i] as f64, gy[i] as f64);
            let z = gelu_z(xv);
            let (g, e_g) = gelu_grad_factor(xv, z, tanh(p, z));
            let gx = gyv * g;
            (gx, gelu_backward_bound(gyv, e_g, gx))
        }))
    }

    /// Inverted dropout: `x · mask · s` with `s = 1.0 / (1.0 − p)` evaluated in FP64 exactly
    /// so (both roundings are correctly rounded, so every machine gets the same `s` and the
    /// same products). Exact. `p` must lie in `[0, 1)`.
    pub fn dropout(&self, x: &[f32], mask: &[bool], p: f64) -> Result<Bounded> {
        const OP: &str = "dropout";
        check_len(OP, "mask", mask.len(), x.len())?;
        if !(0.0..1.0).contains(&p) {
            return Err(arg_err(OP, format!("drop probability {p} is not in [0, 1)")));
        }
        let s = 1.0 / (1.0 - p);
        if let Some(g) = self.gpu() {
            let n = x.len();
            let [y] = g.run(OP, "dropout_fwd", n, &[In::F32(x), In::Bool(mask)], [n], &[size(n), Param::F64(s)])?;
            return Ok(Bounded::exact(y));
        }
        Ok(Bounded::exact(x.iter().zip(mask).map(|(&v, &keep)| if keep { v as f64 * s } else { 0.0 }).collect()))
    }

    /// Dropout backward: the same map applied to the output gradient. Exact.
    pub fn dropout_backward(&self, gy: &[f32], mask: &[bool], p: f64) -> Result<Bounded> {
        self.dropout(gy, mask, p)
    }
}
