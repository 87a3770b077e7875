//! Optimizer updates (SGD with momentum and weight decay, AdamW), returning the new parameters
//! and the new optimizer state, each bounded.
//!
//! Every input is the rounded FP32 state; hyper-parameters are f64. Scalar derived constants
//! (`1−β`, `lr·wd`, `β^t`, `1−β^t`) are part of each op's definition and are computed with
//! correctly rounded operations in a fixed order, so they are identical on every machine.

use rayon::prelude::*;

use crate::bound::{ETA, U, gamma, two_sided};
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

fn unzip3(v: Vec<[f64; 6]>) -> [Bounded; 3] {
    let mut out: [(Vec<f64>, Vec<f64>); 3] = Default::default();
    for o in &mut out {
        o.0.reserve(v.len());
        o.1.reserve(v.len());
    }
    for e in v {
        for (k, o) in out.iter_mut().enumerate() {
            o.0.push(e[2 * k]);
            o.1.push(e[2 * k + 1]);
        }
    }
    out.map(|(values, bounds)| Bounded { values, bound: ErrorBound::PerElement(bounds) })
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
        let r: Vec<[f64; 6]> = (0..w.len())
            .into_par_iter()
            .with_min_len(4096)
            .map(|i| {
                let (wi, gi, vi) = (w[i] as f64, g[i] as f64, v[i] as f64);
                let gd = gi + wd * wi;
                let vn = mu * vi + gd;
                let wn = wn_of(wi, lr, vn);
                // Per side (each line: a product and a sum, ≤ 2 roundings, FMA removes one):
                // g': u|wd·w| + u|g'|; v': e_g' + u|μv| + u|v'|; w': lr·e_v' + u|lr·v'| + u|w'|.
                let e_g = U * (wd * wi).abs() + U * gd.abs() + ETA;
                let e_v = e_g + U * (mu * vi).abs() + U * vn.abs() + ETA;
                let e_w = lr.abs() * e_v + U * (lr * vn).abs() + U * wn.abs() + ETA;
                [wn, two_sided(e_w), vn, two_sided(e_v), 0.0, 0.0]
            })
            .collect();
        let [w, v, _] = unzip3(r);
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
        let r: Vec<[f64; 6]> = (0..w.len())
            .into_par_iter()
            .with_min_len(4096)
            .map(|i| {
                let (wi, gi, mi, vi) = (w[i] as f64, g[i] as f64, m[i] as f64, v[i] as f64);
                let mn = beta1 * mi + omb1 * gi;
                let vn = beta2 * vi + omb2 * (gi * gi);
                let mh = mn / c1;
                let vh = vn / c2;
                let s = vh.sqrt();
                let den = s + eps;
                let q = mh / den;
                let w1 = wi - lrwd * wi;
                let wn = w1 - lr * q;
                // Per side. m', v': two products (g² is exact) and a sum: γ_2·(|β1·m| +
                // |(1−β1)g|), likewise v'. m̂, v̂: ÷c (or ·(1/c)): e/c + γ_2|·|.
                let e_m = gamma(2) * ((beta1 * mi).abs() + (omb1 * gi).abs()) + ETA;
                let e_v = gamma(2) * ((beta2 * vi).abs() + omb2 * gi * gi) + ETA;
                let e_mh = e_m / c1 + gamma(2) * mh.abs() + ETA;
                let e_vh = e_v / c2 + gamma(2) * vh.abs() + ETA;
                // √: honest v̂ and exact v̂ are ≥ lo = max(0, v̂ − 2e); |√a − √b| ≤
                // min(√|a−b|, |a−b|/(2√lo)); then the sqrt's own rounding u·√v̂.
                let lo = (vh - 2.0 * e_vh).max(0.0);
                let e_prop = if lo > 0.0 { (e_vh / (2.0 * lo.sqrt())).min(e_vh.sqrt()) } else { e_vh.sqrt() };
                let e_s = e_prop + U * (s + e_prop);
                let e_den = e_s + U * den;
                // q = m̂/den, den ≥ eps > 0 on every side: |Δq| ≤ (e_mh + |q|·e_den)/den_lo + u|q|.
                let den_lo = (den - 2.0 * e_den).max(eps * (1.0 - 2.0 * U));
                let e_q = (e_mh + q.abs() * e_den) / den_lo + U * (q.abs() + e_mh / den_lo);
                // w1 = w − (lr·wd)·w or w·(1 − lr·wd): γ_3·(|w| + |lr·wd·w|).
                let e_w1 = gamma(3) * (wi.abs() + (lrwd * wi).abs()) + ETA;
                let e_w = e_w1 + lr.abs() * e_q + gamma(2) * ((lr * q).abs() + wn.abs()) + ETA;
                [wn, two_sided(e_w), mn, two_sided(e_m), vn, two_sided(e_v)]
            })
            .collect();
        let [w, m, v] = unzip3(r);
        Ok(AdamWOut { w, m, v })
    }
}

#[inline]
fn wn_of(w: f64, lr: f64, v: f64) -> f64 {
    w - lr * v
}
