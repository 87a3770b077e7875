//! Layer normalisation over the last dimension, forward and backward.
//!
//! Definition (part of the op): two-pass statistics, `μ = Σx/n`, `V = Σ(x−μ)²/n`,
//! `rstd = 1/√(V+eps)`, `y = (x−μ)·rstd·γ + β`. The backward pass takes the rounded FP32
//! `μ` and `rstd` saved by the caller and defines `x̂ = (x−μ)·rstd` with those two correctly
//! rounded operations, so `x̂` is identical on every machine.

use rayon::prelude::*;

use crate::bound::{ETA, ExactTerms, U, gamma, two_sided};
use crate::cuda::{In, Param, size};
use crate::exact::{ExactSum, Sums};
use crate::reduce::{dot_by, sum_by};
use crate::{Bounded, Device, ErrorBound, Result, arg_err, check_len, checked_prod};

/// Outputs of [`Device::layer_norm`]: `y` (`rows×cols`), per-row `mean` and `rstd`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormOut {
    pub y: Bounded,
    pub mean: Bounded,
    pub rstd: Bounded,
}

/// Gradients from [`Device::layer_norm_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormGrads {
    pub gx: Bounded,
    pub ggamma: Bounded,
    pub gbeta: Bounded,
}

/// Per-side error of a row's mean `μ = Σx/n`, from the row and the computed `μ`.
///
/// μ per side: sum of n exact terms γ_{n−1}Σ|x|, then /n (or ·(1/n)): γ_2|μ|. When no summation
/// order can round (`ExactTerms::is_exact`), every side holds the same exact sum and the op
/// divides it by n (a division, by definition: not a multiplication by 1/n), so μ has the same
/// bits everywhere.
fn mean_err(xr: &[f32], mu: f64) -> f64 {
    let mut terms = ExactTerms::new();
    xr.iter().for_each(|&v| terms.value(v));
    if terms.is_exact() {
        0.0
    } else {
        let abs: f64 = xr.iter().map(|v| v.abs() as f64).sum();
        gamma(xr.len() - 1) * abs / xr.len() as f64 + gamma(2) * mu.abs() + ETA
    }
}

/// Per-side error of a row's `rstd = 1/√(SS/n + eps)` from the mean's error `e_mu`, the computed
/// `SS = Σĉ²` and `rstd`.
fn rstd_err(n: usize, e_mu: f64, ss: f64, rstd: f64, eps: f64) -> f64 {
    let nf = n as f64;
    let var = ss / nf;
    let ve = var + eps;
    // Σĉ² per side: ĉ_i = (c_i − Δ)(1+δ_i), |Δ| ≤ e_mu, and Σc_i = 0 exactly, so
    // Σ(c_i − Δ)² = Σc² + nΔ²: the mean's error enters only squared. Rounding of
    // ĉ (2u on its square), of each square (u, or none with FMA) and the sum
    // (γ_{n−1}): |Σĉ² − Σc²| ≤ n·e_mu² + γ_{n+2}·Σĉ². Then /n: γ_2·V.
    let e_var = e_mu * e_mu + gamma(n + 2) * ss / nf + gamma(2) * var + ETA;
    // V+eps: + u(V+eps). Every honest V ≥ 0, so V+eps ≥ eps(1−u): with
    // lo = max(ve − 2e_ve, eps(1−2u)), |1/√a − 1/√b| ≤ |a−b| / (2·lo^{3/2});
    // sqrt and ÷ add γ_2 relative to the honest rstd ≤ rstd + 2e.
    let e_ve = e_var + U * ve;
    let lo = (ve - 2.0 * e_ve).max(eps * (1.0 - 2.0 * U));
    let e_prop = e_ve / (2.0 * lo * lo.sqrt());
    e_prop + gamma(2) * (rstd + 2.0 * e_prop)
}

/// Bound of one output `y = c·rstd·γ + β` from `c = x − μ`, the row's errors and the computed `y`.
///
/// y per side: ĉ within e_mu + u|ĉ| of c; c·rstd·γ: |γ|(e_c·rstd + |c|·e_r) + γ_2|c·rstd·γ| for
/// the two products (any order), + β: u|y| (+ETA).
///
/// A tiny `eps` over a constant row makes `e_r` infinite (`lo^{3/2}` underflows); where `c` and
/// its error are 0 the product term is 0, not `0·∞ = NaN`, and the too-large `rstd` is then
/// refused as the FP32 overflow it is.
fn y_bound(g: f64, c: f64, rstd: f64, (e_mu, e_r): (f64, f64), y: f64) -> f64 {
    let e_c = e_mu + U * c.abs();
    let prod = c * rstd * g;
    let c_er = if c == 0.0 { 0.0 } else { c.abs() * e_r };
    two_sided(g.abs() * (e_c * rstd + c_er) + gamma(2) * prod.abs() + U * y.abs() + ETA)
}

/// Where the affine weights of element `(row, col)` come from: one per column (layer norm,
/// which normalises each example's features) or one per row (batch norm, whose rows are
/// channels).
#[derive(Clone, Copy)]
enum Affine<'a> {
    PerCol(&'a [f32], &'a [f32]),
    PerRow(&'a [f32], &'a [f32]),
}

impl Affine<'_> {
    #[inline]
    fn gamma(self, r: usize, i: usize) -> f64 {
        match self {
            Affine::PerCol(g, _) => g[i] as f64,
            Affine::PerRow(g, _) => g[r] as f64,
        }
    }

    #[inline]
    fn beta(self, r: usize, i: usize) -> f64 {
        match self {
            Affine::PerCol(_, b) => b[i] as f64,
            Affine::PerRow(_, b) => b[r] as f64,
        }
    }

    fn check(self, op: &'static str, rows: usize, cols: usize) -> Result<()> {
        let (g, b, n) = match self {
            Affine::PerCol(g, b) => (g, b, cols),
            Affine::PerRow(g, b) => (g, b, rows),
        };
        check_len(op, "gamma", g.len(), n)?;
        check_len(op, "beta", b.len(), n)
    }
}

impl Device {
    /// Layer norm of each of `rows` rows of length `cols`, with affine `gamma`, `beta` (`cols`).
    /// `eps` must be positive.
    pub fn layer_norm(
        &self,
        x: &[f32],
        gamma_w: &[f32],
        beta: &[f32],
        rows: usize,
        cols: usize,
        eps: f64,
    ) -> Result<LayerNormOut> {
        self.norm("layer_norm", x, Affine::PerCol(gamma_w, beta), rows, cols, eps, Sums::ProfileOrder)
    }

    /// Batch normalisation with batch statistics, laid out as `rows` channels of `cols` values
    /// each (every example's and position's value of that channel, in the caller's fixed
    /// order), with one affine `gamma`, `beta` per channel. The same definition as
    /// [`Device::layer_norm`] with the affine per row; computed on the host on every profile
    /// (the cuda profile in its sequential order). With [`Sums::CorrectlyRounded`] the two
    /// statistics are too: `μ = (Σx)/n` and `V = (Σc²)/n` from the exact sums of `x` and of
    /// the squares of `c = x − μ`, each rounded once, so `μ` and `rstd` are the same bits on
    /// every machine.
    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs and its definition
    pub fn batch_norm(
        &self,
        x: &[f32],
        gamma_w: &[f32],
        beta: &[f32],
        rows: usize,
        cols: usize,
        eps: f64,
        sums: Sums,
    ) -> Result<LayerNormOut> {
        self.norm("batch_norm", x, Affine::PerRow(gamma_w, beta), rows, cols, eps, sums)
    }

    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs and its definition
    fn norm(
        &self,
        op: &'static str,
        x: &[f32],
        affine: Affine<'_>,
        rows: usize,
        cols: usize,
        eps: f64,
        sums: Sums,
    ) -> Result<LayerNormOut> {
        const OP: &str = "layer_norm";
        check_len(op, "x", x.len(), checked_prod(op, &[rows, cols])?)?;
        affine.check(op, rows, cols)?;
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(arg_err(op, format!("eps {eps} must be positive and finite")));
        }
        if cols == 0 {
            return Err(arg_err(op, "rows of length 0 have no mean"));
        }
        let p = self.profile();
        let n = cols;
        let nf = n as f64;
        let gpu = match affine {
            Affine::PerCol(gamma_w, beta) => self.gpu().map(|g| {
                let ins = [In::F32(x), In::F32(gamma_w), In::F32(beta)];
                let outs = [x.len(), rows, rows, rows];
                g.run(OP, "layer_norm_fwd", rows, &ins, outs, &[size(rows), size(cols), Param::F64(eps)])
            }),
            Affine::PerRow(..) => None,
        };
        let (mut y, from_gpu) = match gpu.transpose()? {
            Some([y, mean, rstd, ss]) => (y, Some((mean, rstd, ss))),
            None => (vec![0.0; x.len()], None),
        };
        let mut yb = vec![0.0; x.len()];
        let stats: Vec<[f64; 4]> = y
            .par_chunks_mut(n)
            .zip(yb.par_chunks_mut(n))
            .enumerate()
            .map(|(r, (yr, br))| {
                let xr = &x[r * n..(r + 1) * n];
                let (mu, rstd, e_mu, e_r) = match &from_gpu {
                    Some((mean, rstd, ss)) => {
                        let (mu, rstd) = (mean[r], rstd[r]);
                        let e_mu = mean_err(xr, mu);
                        let e_r = rstd_err(n, e_mu, ss[r], rstd, eps);
                        for (i, ((d, &xv), &yv)) in br.iter_mut().zip(xr).zip(yr.iter()).enumerate() {
                            // c = x − μ is one correctly rounded subtraction: the GPU's own c.
                            *d = y_bound(affine.gamma(r, i), xv as f64 - mu, rstd, (e_mu, e_r), yv);
                        }
                        (mu, rstd, e_mu, e_r)
                    }
                    None => {
                        let exact = sums == Sums::CorrectlyRounded;
                        let mu = if exact {
                            let mut s = ExactSum::new();
                            xr.iter().for_each(|&v| s.add(v as f64));
                            s.round() / nf
                        } else {
                            sum_by(p, n, |i| xr[i] as f64) / nf
                        };
                        let e_mu = if exact { 0.0 } else { mean_err(xr, mu) };
                        for (c, &xv) in yr.iter_mut().zip(xr) {
                            *c = xv as f64 - mu;
                        }
                        let ss = if exact {
                            let mut s = ExactSum::new();
                            yr.iter().for_each(|&c| s.add_square(c));
                            s.round()
                        } else {
                            dot_by(p, n, |i| yr[i], |i| yr[i])
                        };
                        // Correctly rounded: ÷, +, √ and ÷, each rounded once (the same bits
                        // everywhere when ss is).
                        let rstd = 1.0 / (ss / nf + eps).sqrt();
                        let e_r = if exact { 0.0 } else { rstd_err(n, e_mu, ss, rstd, eps) };
                        for (i, (c, d)) in yr.iter_mut().zip(br.iter_mut()).enumerate() {
                            let g = affine.gamma(r, i);
                            let out = *c * rstd * g + affine.beta(r, i);
                            *d = y_bound(g, *c, rstd, (e_mu, e_r), out);
                            *c = out;
                        }
                        (mu, rstd, e_mu, e_r)
                    }
                };
                [mu, two_sided(e_mu), rstd, two_sided(e_r)]
            })
            .collect();
        Ok(LayerNormOut {
            y: Bounded { values: y, bound: ErrorBound::PerElement(yb) },
            mean: Bounded {
                values: stats.iter().map(|s| s[0]).collect(),
                bound: ErrorBound::PerElement(stats.iter().map(|s| s[1]).collect()),
            },
            rstd: Bounded {
                values: stats.iter().map(|s| s[2]).collect(),
                bound: ErrorBound::PerElement(stats.iter().map(|s| s[3]).collect()),
            },
        })
    }

    /// Layer norm backward from the input, `gamma`, the saved (rounded) per-row `mean` and
    /// `rstd`, and the output gradient.
    /// `gx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = gy·γ`; `gγ = Σ_rows gy·x̂`;
    /// `gβ = Σ_rows gy`.
    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs, all same-typed slices
    pub fn layer_norm_backward(
        &self,
        x: &[f32],
        gamma_w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gy: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<LayerNormGrads> {
        let (affine, sums) = (Affine::PerCol(gamma_w, &[]), Sums::ProfileOrder);
        self.norm_backward("layer_norm_backward", x, affine, mean, rstd, gy, rows, cols, sums)
    }

    /// Batch norm backward ([`Device::batch_norm`]'s layout): as
    /// [`Device::layer_norm_backward`] with `γ` per row, so `gγ` and `gβ` are sums over each
    /// row (`gγ_r = Σ gy·x̂`, `gβ_r = Σ gy`), summed as `sums` defines.
    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs, all same-typed slices
    pub fn batch_norm_backward(
        &self,
        x: &[f32],
        gamma_w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gy: &[f32],
        rows: usize,
        cols: usize,
        sums: Sums,
    ) -> Result<LayerNormGrads> {
        let affine = Affine::PerRow(gamma_w, &[]);
        self.norm_backward("batch_norm_backward", x, affine, mean, rstd, gy, rows, cols, sums)
    }

    #[allow(clippy::too_many_arguments)] // reason: the op's natural inputs, all same-typed slices
    fn norm_backward(
        &self,
        op: &'static str,
        x: &[f32],
        affine: Affine<'_>,
        mean: &[f32],
        rstd: &[f32],
        gy: &[f32],
        rows: usize,
        cols: usize,
        sums: Sums,
    ) -> Result<LayerNormGrads> {
        const OP: &str = "layer_norm_backward";
        let total = checked_prod(op, &[rows, cols])?;
        check_len(op, "x", x.len(), total)?;
        check_len(op, "grad_out", gy.len(), total)?;
        match affine {
            Affine::PerCol(g, _) => check_len(op, "gamma", g.len(), cols)?,
            Affine::PerRow(g, _) => check_len(op, "gamma", g.len(), rows)?,
        }
        check_len(op, "mean", mean.len(), rows)?;
        check_len(op, "rstd", rstd.len(), rows)?;
        if cols == 0 {
            return Err(arg_err(op, "rows of length 0 have no mean"));
        }
        let p = self.profile();
        let n = cols;
        let nf = n as f64;
        // x̂ is the same on every machine (two correctly rounded operations on the same inputs);
        // the host computes it for every profile, the GPU receives it.
        let xhat: Vec<f64> =
            x.iter().enumerate().map(|(i, &v)| (v as f64 - mean[i / n] as f64) * rstd[i / n] as f64).collect();
        if let (Affine::PerRow(gamma_w, _), Sums::CorrectlyRounded) = (affine, sums) {
            return Ok(channels_correctly_rounded(gamma_w, rstd, gy, &xhat, n));
        }
        let gpu = match affine {
            Affine::PerCol(gamma_w, _) => self.gpu().map(|g| {
                let ins = [In::F32(gy), In::F32(gamma_w), In::F64(&xhat), In::F32(rstd)];
                let [gx, a, b] =
                    g.run(OP, "layer_norm_bwd", rows, &ins, [total, rows, rows], &[size(rows), size(cols)])?;
                let sizes = [size(rows), size(cols)];
                let [ggamma] = g.run(OP, "col_dot", cols, &[In::F32(gy), In::F64(&xhat)], [cols], &sizes)?;
                Ok::<_, crate::KernelError>((gx, a, b, ggamma))
            }),
            Affine::PerRow(..) => None,
        };
        let (mut gx, from_gpu, ggamma_gpu) = match gpu.transpose()? {
            Some((gx, a, b, ggamma)) => (gx, Some((a, b)), Some(ggamma)),
            None => (vec![0.0; total], None, None),
        };
        let mut gxb = vec![0.0; total];
        gx.par_chunks_mut(n).zip(gxb.par_chunks_mut(n)).enumerate().for_each(|(r, (out, bnd))| {
            let gr = &gy[r * n..(r + 1) * n];
            let xh = &xhat[r * n..(r + 1) * n];
            let rs = rstd[r] as f64;
            let g = |i: usize| gr[i] as f64 * affine.gamma(r, i);
            let (a, b) = match &from_gpu {
                Some((a, b)) => (a[r], b[r]),
                None => (sum_by(p, n, g) / nf, dot_by(p, n, g, |i| xh[i]) / nf),
            };
            // a: n exact terms (FP32·FP32) γ_{n−1}Σ|g|, /n γ_2|a|. b: n rounded products
            // γ_nΣ|g·x̂|, /n γ_2|b|. The rest: `gx_bound`.
            let (abs_g, abs_gx) = (0..n).fold((0.0, 0.0), |(s1, s2), i| {
                let gi = g(i).abs();
                (s1 + gi, s2 + gi * xh[i].abs())
            });
            let e_a = gamma(n - 1) * abs_g / nf + gamma(2) * a.abs();
            let e_b = gamma(n) * abs_gx / nf + gamma(2) * b.abs();
            for i in 0..n {
                let gi = g(i);
                if from_gpu.is_none() {
                    out[i] = rs * (gi - a - xh[i] * b);
                }
                bnd[i] = gx_bound(rs, gi, (a, e_a), xh[i], (b, e_b), out[i]);
            }
        });
        let (ggamma, gbeta) = match affine {
            Affine::PerCol(..) => {
                // Column reductions over rows, each in the profile's order, parallel over columns.
                let (ggamma, ggb): (Vec<f64>, Vec<f64>) = (0..n)
                    .into_par_iter()
                    .map(|j| {
                        let v = match &ggamma_gpu {
                            Some(gg) => gg[j],
                            None => dot_by(p, rows, |r| gy[r * n + j] as f64, |r| xhat[r * n + j]),
                        };
                        let abs: f64 = (0..rows).map(|r| (gy[r * n + j] as f64 * xhat[r * n + j]).abs()).sum();
                        // rows rounded products, any order/FMA: per side γ_rows·Σ|gy·x̂|.
                        (v, two_sided(gamma(rows) * abs + ETA))
                    })
                    .unzip();
                let ggamma = Bounded { values: ggamma, bound: ErrorBound::PerElement(ggb) };
                (ggamma, self.sum_rows(gy, rows, cols)?)
            }
            Affine::PerRow(..) => {
                // Reductions along each row, in the profile's order, parallel over rows.
                type Sums = (Vec<(f64, f64)>, Vec<(f64, f64)>);
                let (gg, gb): Sums = (0..rows)
                    .into_par_iter()
                    .map(|r| {
                        let (gr, xh) = (&gy[r * n..(r + 1) * n], &xhat[r * n..(r + 1) * n]);
                        let dot = dot_by(p, n, |i| gr[i] as f64, |i| xh[i]);
                        let abs_dot: f64 = (0..n).map(|i| (gr[i] as f64 * xh[i]).abs()).sum();
                        let sum = sum_by(p, n, |i| gr[i] as f64);
                        let mut terms = ExactTerms::new();
                        gr.iter().for_each(|&v| terms.value(v));
                        ((dot, two_sided(gamma(n) * abs_dot + ETA)), (sum, terms.bound()))
                    })
                    .unzip();
                let split = |v: Vec<(f64, f64)>| {
                    let (values, bounds) = v.into_iter().unzip();
                    Bounded { values, bound: ErrorBound::PerElement(bounds) }
                };
                (split(gg), split(gb))
            }
        };
        Ok(LayerNormGrads { gx: Bounded { values: gx, bound: ErrorBound::PerElement(gxb) }, ggamma, gbeta })
    }
}

/// The bound of one input gradient `gx = rstd·t`, `t = g − a − x̂b` (`g = gy·γ`, exact), from
/// the per-side errors `e_a`, `e_b` of the row's `a = mean(g)` and `b = mean(g·x̂)` and the
/// computed `gx`: `t` in any association or FMA is within `e_a + |x̂|·e_b + γ_5(|g|+|a|+|x̂b|)`
/// (which also covers the `(rstd/n)(n·g − Σg − x̂Σgx̂)` form), and `rstd·t` adds γ_2|gx| + ETA.
#[inline]
fn gx_bound(rs: f64, g: f64, (a, e_a): (f64, f64), xh: f64, (b, e_b): (f64, f64), gx: f64) -> f64 {
    let e_t = e_a + xh.abs() * e_b + gamma(5) * (g.abs() + a.abs() + (xh * b).abs());
    two_sided(rs * e_t + gamma(2) * gx.abs() + ETA)
}

/// Batch norm backward with [`Sums::CorrectlyRounded`] channel sums, from `x̂` (rows of
/// `n`), on the host for every profile.
///
/// `a = (γ·S₁)/n` and `b = (γ·S₂)/n` are the same bits on every machine, so the input
/// gradient's bound ([`gx_bound`]) has no error terms for them.
fn channels_correctly_rounded(gamma_w: &[f32], rstd: &[f32], gy: &[f32], xhat: &[f64], n: usize) -> LayerNormGrads {
    let nf = n as f64;
    let mut gx = vec![0.0; gy.len()];
    let mut gxb = vec![0.0; gy.len()];
    let sums: Vec<(f64, f64)> = gx
        .par_chunks_mut(n)
        .zip(gxb.par_chunks_mut(n))
        .enumerate()
        .map(|(r, (out, bnd))| {
            let (gr, xh) = (&gy[r * n..(r + 1) * n], &xhat[r * n..(r + 1) * n]);
            let (mut s1, mut s2) = (ExactSum::new(), ExactSum::new());
            for (&g, &xv) in gr.iter().zip(xh) {
                s1.add(g as f64);
                s2.add_product(g, xv);
            }
            let (s1, s2) = (s1.round(), s2.round());
            let (gw, rs) = (gamma_w[r] as f64, rstd[r] as f64);
            let (a, b) = (gw * s1 / nf, gw * s2 / nf);
            for ((o, d), (&g, &xv)) in out.iter_mut().zip(bnd.iter_mut()).zip(gr.iter().zip(xh)) {
                let g = g as f64 * gw;
                *o = rs * (g - a - xv * b);
                *d = gx_bound(rs, g, (a, 0.0), xv, (b, 0.0), *o);
            }
            (s2, s1)
        })
        .collect();
    let (ggamma, gbeta) = sums.into_iter().unzip();
    LayerNormGrads {
        gx: Bounded { values: gx, bound: ErrorBound::PerElement(gxb) },
        ggamma: Bounded::exact(ggamma),
        gbeta: Bounded::exact(gbeta),
    }
}

#[cfg(test)]
mod tests {
    use common::rounding::is_ambiguous;

    use super::*;
    use crate::parity::SplitMix64;
    use crate::{Device, Profile};

    /// A stage-0 batch norm of the residual CNN preset (16 channels of 32 examples × 14 × 14)
    /// where a ReLU zeroed half the output gradients: correctly rounded channel sums leave
    /// almost no input gradient ambiguous, where the profile's order leaves hundreds; both
    /// definitions compute the same outputs and gradients within the profile-order bound; and
    /// the correctly rounded statistics are the same bits on every profile.
    #[test]
    fn correctly_rounded_channel_sums_make_few_gradients_ambiguous() {
        let (rows, cols) = (16, 6272);
        let mut rng = SplitMix64(21);
        let x = rng.uniform(rows * cols, 2.0);
        let gw: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 16.0).collect();
        let mut gy = rng.uniform(rows * cols, 1e-4);
        gy.iter_mut().for_each(|g| *g = if rng.next_u64().is_multiple_of(2) { 0.0 } else { *g });
        let mut stats = Vec::new();
        for p in [Profile::Cpu, Profile::CpuAlt] {
            let d = Device::new(p).unwrap();
            let forward = |sums| d.batch_norm(&x, &gw, &vec![0.0; rows], rows, cols, 1e-5, sums).unwrap();
            let (out, exact) = (forward(Sums::ProfileOrder), forward(Sums::CorrectlyRounded));
            for (a, e) in [(&out.y, &exact.y), (&out.mean, &exact.mean), (&out.rstd, &exact.rstd)] {
                for i in 0..a.len() {
                    let diff = (a.values[i] - e.values[i]).abs();
                    assert!(diff <= a.bound.at(i), "{p} forward element {i}: {diff:e} > {:e}", a.bound.at(i));
                }
            }
            assert!((0..rows).all(|r| exact.mean.bound.at(r) == 0.0 && exact.rstd.bound.at(r) == 0.0));
            let bits = |b: &Bounded| b.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            stats.push((bits(&exact.mean), bits(&exact.rstd)));
            let round = |b: &Bounded| b.values.iter().map(|&v| v as f32).collect::<Vec<_>>();
            let (mean, rstd) = (round(&out.mean), round(&out.rstd));
            let grads = |sums| d.batch_norm_backward(&x, &gw, &mean, &rstd, &gy, rows, cols, sums).unwrap();
            let (any, exact) = (grads(Sums::ProfileOrder), grads(Sums::CorrectlyRounded));
            let ambiguous = |b: &Bounded| (0..b.len()).filter(|&i| is_ambiguous(b.values[i], b.bound.at(i))).count();
            let (n_any, n_exact) = (ambiguous(&any.gx), ambiguous(&exact.gx));
            assert!(n_any > 100 && n_exact * 20 < n_any, "{p}: {n_any} ambiguous in profile order, {n_exact} exact");
            assert!(matches!((&exact.ggamma.bound, &exact.gbeta.bound), (ErrorBound::Exact, ErrorBound::Exact)));
            for (a, e) in [(&any.gx, &exact.gx), (&any.ggamma, &exact.ggamma), (&any.gbeta, &exact.gbeta)] {
                for i in 0..a.len() {
                    let diff = (a.values[i] - e.values[i]).abs();
                    assert!(diff <= a.bound.at(i), "{p} element {i}: {diff:e} > {:e}", a.bound.at(i));
                }
            }
        }
        assert_eq!(stats[0], stats[1], "correctly rounded statistics differ between profiles");
    }
}
