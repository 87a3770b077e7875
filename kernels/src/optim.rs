//! Optimizer updates (SGD with momentum and weight decay, AdamW), returning the new parameters
//! and the new optimizer state.
//!
//! Every input is the rounded FP32 state; hyper-parameters are f64. Scalar derived constants
//! (`1−β`, `lr·wd`, `β^t`, `1−β^t`) are part of each op's definition and are computed with
//! correctly rounded operations in a fixed order, so they are identical on every machine.
//!
//! # Why these ops carry `ErrorBound::Exact`
//! An update is element-wise: no reduction, no transcendental function. Each op is *defined* as
//! the exact sequence of correctly rounded `+ − × ÷ √` written in its code, evaluated left to
//! right, **without FMA contraction** (Rust never contracts `a*b + c`; the `cuda` profile's
//! kernels use the `__dmul_rn`/`__dadd_rn`/`__dsub_rn`/`__ddiv_rn`/`__dsqrt_rn` intrinsics, which
//! are never fused, for every operation). Every IEEE-754 machine then produces the same bits, so
//! the bound is 0 and nothing is ever logged.
//!
//! An earlier version allowed contraction and bounded it (γ₂ per product-sum). That was sound
//! but costly: with decimal hyper-parameters such as β₁ = 0.9, `0.9·m + 0.1·g` lands on an FP32
//! rounding midpoint (up to the representation error of 0.9) for about 4 % of elements, and
//! contraction really could round those either way, so they had to be logged. Fixing the
//! evaluation removes that freedom instead of paying for it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cuda::{In, Param, size};
use crate::{Bounded, Device, ErrorBound, Result, arg_err, check_len};

/// SGD hyper-parameters (PyTorch semantics, no dampening, no Nesterov).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// New parameters and momentum buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct SgdOut {
    pub w: Bounded,
    pub v: Bounded,
}

/// AdamW hyper-parameters (PyTorch semantics: decoupled weight decay applied first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// New parameters and first/second moment estimates.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWOut {
    pub w: Bounded,
    pub m: Bounded,
    pub v: Bounded,
}

/// `β^t` by square-and-multiply over the bits of `t` from the most significant one: only
/// correctly rounded multiplications in a fixed order, so every machine gets the same bits.
pub fn pow_step(beta: f64, t: u64) -> f64 {
    let mut r = 1.0;
    for bit in (0..64 - t.leading_zeros()).rev() {
        r *= r;
        if t >> bit & 1 == 1 {
            r *= beta;
        }
    }
    r
}

/// Runs `f` on every index of `0..n` in parallel and returns its `N` results per index as `N`
/// exact tensors, each element written once in place (no per-element arrays to split, no
/// zeroed buffers). Elements are independent, so the result does not depend on the threads.
fn par_map<const N: usize>(n: usize, f: impl Fn(usize) -> [f64; N] + Sync) -> [Bounded; N] {
    const CHUNK: usize = 4096;
    let mut outs: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(n));
    let mut rest: [&mut [MaybeUninit<f64>]; N] = outs.each_mut().map(|v| &mut v.spare_capacity_mut()[..n]);
    let mut jobs = Vec::with_capacity(n.div_ceil(CHUNK));
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let parts = rest.each_mut().map(|s| {
            let (head, tail) = std::mem::take(s).split_at_mut(len);
            *s = tail;
            head
        });
        jobs.push((start, len, parts));
    }
    jobs.into_par_iter().for_each(|(start, len, mut parts)| {
        for k in 0..len {
            for (part, x) in parts.iter_mut().zip(f(start + k)) {
                part[k].write(x);
            }
        }
    });
    outs.map(|mut values| {
        // SAFETY: the jobs cover `0..n`, and each wrote all `len` elements of its part of every output.
        unsafe { values.set_len(n) };
        Bounded { values, bound: ErrorBound::Exact }
    })
}

fn finite(op: &'static str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() { Ok(()) } else { Err(arg_err(op, format!("{name} {v} is not finite"))) }
}

impl Device {
    /// `g' = g + wd·w; v' = μ·v + g'; w' = w − lr·v'`.
    pub fn sgd(&self, w: &[f32], g: &[f32], v: &[f32], cfg: SgdConfig) -> Result<SgdOut> {
        const OP: &str = "sgd";
        check_len(OP, "grad", g.len(), w.len())?;
        check_len(OP, "momentum buffer", v.len(), w.len())?;
        for (name, x) in [("lr", cfg.lr), ("momentum", cfg.momentum), ("weight_decay", cfg.weight_decay)] {
            finite(OP, name, x)?;
        }
        let SgdConfig { lr, momentum: mu, weight_decay: wd } = cfg;
        if let Some(gpu) = self.gpu() {
            let n = w.len();
            let scalars = [size(n), Param::F64(lr), Param::F64(mu), Param::F64(wd)];
            let [w, v] = gpu.run(OP, "sgd", n, &[In::F32(w), In::F32(g), In::F32(v)], [n, n], &scalars)?;
            return Ok(SgdOut { w: Bounded::exact(w), v: Bounded::exact(v) });
        }
        let [w, v] = par_map(w.len(), |i| {
            let (wi, gi, vi) = (w[i] as f64, g[i] as f64, v[i] as f64);
            // The op, exactly: each operation correctly rounded, in this order, unfused.
            let gd = gi + wd * wi;
            let vn = mu * vi + gd;
            let wn = wi - lr * vn;
            [wn, vn]
        });
        Ok(SgdOut { w, v })
    }

    /// AdamW step `t ≥ 1`:
    /// `m' = β1·m + (1−β1)·g; v' = β2·v + (1−β2)·g²; m̂ = m'/(1−β1^t); v̂ = v'/(1−β2^t);
    /// w' = (w − (lr·wd)·w) − lr·m̂/(√v̂ + eps)`, with `β^t` from [`pow_step`].
    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs
    pub fn adamw(&self, w: &[f32], g: &[f32], m: &[f32], v: &[f32], step: u64, cfg: AdamWConfig) -> Result<AdamWOut> {
        const OP: &str = "adamw";
        check_len(OP, "grad", g.len(), w.len())?;
        check_len(OP, "m", m.len(), w.len())?;
        check_len(OP, "v", v.len(), w.len())?;
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay: wd } = cfg;
        for (name, x) in [("lr", lr), ("weight_decay", wd)] {
            finite(OP, name, x)?;
        }
        if step == 0 {
            return Err(arg_err(OP, "step must be at least 1"));
        }
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(arg_err(OP, format!("betas ({beta1}, {beta2}) must lie in [0, 1)")));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(arg_err(OP, format!("eps {eps} must be positive and finite")));
        }
        // Same bits on every machine (fixed correctly rounded operations).
        let (omb1, omb2) = (1.0 - beta1, 1.0 - beta2);
        let c1 = 1.0 - pow_step(beta1, step);
        let c2 = 1.0 - pow_step(beta2, step);
        let lrwd = lr * wd;
        if let Some(gpu) = self.gpu() {
            let n = w.len();
            let scalars = [lr, beta1, beta2, omb1, omb2, c1, c2, lrwd, eps].map(Param::F64);
            let scalars: Vec<Param> = std::iter::once(size(n)).chain(scalars).collect();
            let ins = [In::F32(w), In::F32(g), In::F32(m), In::F32(v)];
            let [w, m, v] = gpu.run(OP, "adamw", n, &ins, [n, n, n], &scalars)?;
            return Ok(AdamWOut { w: Bounded::exact(w), m: Bounded::exact(m), v: Bounded::exact(v) });
        }
        let [w, m, v] = par_map(w.len(), |i| {
            let (wi, gi, mi, vi) = (w[i] as f64, g[i] as f64, m[i] as f64, v[i] as f64);
            // The op, exactly: each operation correctly rounded, in this order, unfused.
            let mn = beta1 * mi + omb1 * gi;
            let vn = beta2 * vi + omb2 * (gi * gi);
            let mh = mn / c1;
            let vh = vn / c2;
            let den = vh.sqrt() + eps;
            let q = mh / den;
            let w1 = wi - lrwd * wi;
            let wn = w1 - lr * q;
            [wn, mn, vn]
        });
        Ok(AdamWOut { w, m, v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_writes_every_output_of_every_index_in_place() {
        for n in [0, 1, 4095, 4096, 4097, 3 * 4096 + 5] {
            let [a, b, c] = par_map(n, |i| [i as f64, -(i as f64), (i * i) as f64]);
            for (t, f) in [(a, 1.0), (b, -1.0)] {
                assert_eq!(t.bound, ErrorBound::Exact);
                assert_eq!(t.values, (0..n).map(|i| f * i as f64).collect::<Vec<_>>(), "n = {n}");
            }
            assert_eq!(c.values, (0..n).map(|i| (i * i) as f64).collect::<Vec<_>>(), "n = {n}");
        }
    }
}
