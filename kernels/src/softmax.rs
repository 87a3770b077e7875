//! Row-wise softmax and log-softmax (optionally causally masked), their backward passes, and
//! cross-entropy from logits.
//!
//! Definition (part of the op): `z_i = x_i − max_j x_j` (the max is exact and the subtraction
//! correctly rounded, so every machine gets the same `z`), `e_i = exp(z_i)`, `S = Σ e_i`,
//! `softmax_i = e_i / S`, `log_softmax_i = z_i − ln S`. An implementation with another shift
//! (e.g. online softmax's running max) computes a different op.

use rayon::prelude::*;

use crate::bound::{ETA, TRANS_REL, U, gamma, two_sided};
use crate::cuda::{In, Param, size};
use crate::reduce::{dot_by, exp, ln, sum_by};
use crate::{Bounded, Device, ErrorBound, Profile, Result, arg_err, check_len, checked_prod, shape_err};

/// Shape of a row-wise op on a `rows×cols` row-major matrix. With `causal`, the rows form
/// `cols×cols` blocks and row `r` sees only columns `≤ r mod cols` (attention scores);
/// masked outputs are exactly 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowSpec {
    pub rows: usize,
    pub cols: usize,
    pub causal: bool,
}

impl RowSpec {
    /// Unmasked rows.
    pub fn new(rows: usize, cols: usize) -> RowSpec {
        RowSpec { rows, cols, causal: false }
    }

    /// Causally masked `cols×cols` blocks.
    pub fn causal(rows: usize, cols: usize) -> RowSpec {
        RowSpec { rows, cols, causal: true }
    }

    fn check(&self, op: &'static str, lens: &[(&str, usize)]) -> Result<()> {
        let total = checked_prod(op, &[self.rows, self.cols])?;
        for (what, len) in lens {
            check_len(op, what, *len, total)?;
        }
        if self.causal && self.cols > 0 && !self.rows.is_multiple_of(self.cols) {
            return Err(shape_err(
                op,
                format!("causal mask needs rows ({}) to be a multiple of cols ({})", self.rows, self.cols),
            ));
        }
        Ok(())
    }

    /// Number of visible columns of row `r`.
    fn visible(&self, r: usize) -> usize {
        if self.causal { r % self.cols + 1 } else { self.cols }
    }

    /// The GPU launch of a row-wise kernel: one thread per row (none when rows are empty), and
    /// the kernels' `rows, cols, causal` arguments.
    fn gpu_launch(&self) -> (usize, [Param; 3]) {
        let threads = if self.cols == 0 { 0 } else { self.rows };
        (threads, [size(self.rows), size(self.cols), size(usize::from(self.causal))])
    }
}

/// Writes `e_i = exp(x_i − m)` into `out[..v]`, returns `(z-shift m, S)`.
fn exp_row(p: Profile, x: &[f32], out: &mut [f64]) -> f64 {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(p, v as f64 - m);
    }
    m
}

/// Softmax's bound of an output `p` in a row of `v` visible elements.
///
/// Per side: e_i has relative error ≤ 8u (+ETA); S = Σe_i summed in any order is within
/// γ_{v−1}·(1+8u)·S + 8u·S ≤ γ_{v+7}·S (S ≥ 1−8u, so v·ETA is relative ≤ 2v·ETA, far below
/// SLACK·γ); e_i/S adds one rounding. Relative error of p_i: (1+8u)(1+u)/(1±γ_{v+7}) − 1 ≤
/// γ_{v+16}; absolute: ETA from exp, ETA from a subnormal quotient, ETA for Σ: p_i·γ_{v+16} +
/// 3·ETA.
fn softmax_bound(v: usize, p: f64) -> f64 {
    two_sided(gamma(v + 16) * p + 3.0 * ETA)
}

/// Log-softmax's bound of an output `y = z − l` in a row of `v` elements with `l = ln S`.
///
/// Per side: S = S_exact·(1+β), |β| ≤ γ_{v+7} (see softmax), so |ln Ŝ − ln S| ≤ |β|/(1−|β|) ≤
/// γ_{v+8}, plus ln's 8u·|ln Ŝ|; z_i is the same on every machine; z_i − ln S adds u|y_i|.
fn log_softmax_bound(v: usize, l: f64, y: f64) -> f64 {
    two_sided(gamma(v + 8) + TRANS_REL * l.abs() + ETA + U * y.abs())
}

/// Cross-entropy's per-side error of one row's loss `ln S − z_t`: ln S as in log-softmax
/// (γ_{v+8} + 8u|ln S|), z_t exact-same, the subtraction + u|loss|.
fn cross_entropy_row_err(cols: usize, l: f64, loss: f64) -> f64 {
    gamma(cols + 8) + TRANS_REL * l.abs() + ETA + U * loss.abs()
}

/// Cross-entropy's bound of a gradient element `o = q / rows`, `q = p − [i = t]`, from the
/// probability `p`.
///
/// Per side: softmax (γ_{v+16}·p + 3·ETA), − 1 at the target (u|p−1|), / rows (γ_2 for
/// division or reciprocal multiplication, + ETA).
fn cross_entropy_grad_bound(cols: usize, p: f64, target: bool, rows: f64, o: f64) -> f64 {
    let q = if target { p - 1.0 } else { p };
    two_sided((gamma(cols + 16) * p + 3.0 * ETA + U * q.abs()) / rows + gamma(2) * o.abs() + ETA)
}

impl Device {
    /// Row-wise softmax.
    pub fn softmax(&self, x: &[f32], spec: RowSpec) -> Result<Bounded> {
        spec.check("softmax", &[("x", x.len())])?;
        let p = self.profile();
        let cols = spec.cols.max(1);
        let (threads, sizes) = spec.gpu_launch();
        let gpu = self.gpu().map(|g| g.run("softmax", "softmax_fwd", threads, &[In::F32(x)], [x.len()], &sizes));
        let (mut values, on_gpu) = match gpu.transpose()? {
            Some([y]) => (y, true),
            None => (vec![0.0; x.len()], false),
        };
        let mut bounds = vec![0.0; x.len()];
        values.par_chunks_mut(cols).zip(bounds.par_chunks_mut(cols)).enumerate().for_each(|(r, (out, bnd))| {
            let v = spec.visible(r);
            if !on_gpu {
                exp_row(p, &x[r * cols..r * cols + v], &mut out[..v]);
                let s = sum_by(p, v, |i| out[i]);
                out[..v].iter_mut().for_each(|o| *o /= s);
            }
            for (o, d) in out[..v].iter().zip(&mut bnd[..v]) {
                *d = softmax_bound(v, *o);
            }
        });
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Row-wise log-softmax (masked outputs are 0, not −∞).
    pub fn log_softmax(&self, x: &[f32], spec: RowSpec) -> Result<Bounded> {
        spec.check("log_softmax", &[("x", x.len())])?;
        let p = self.profile();
        let cols = spec.cols.max(1);
        let (threads, sizes) = spec.gpu_launch();
        let outs = [x.len(), spec.rows];
        let gpu = self.gpu().map(|g| g.run("log_softmax", "log_softmax_fwd", threads, &[In::F32(x)], outs, &sizes));
        let (mut values, row_l) = match gpu.transpose()? {
            Some([y, l]) => (y, Some(l)),
            None => (vec![0.0; x.len()], None),
        };
        let mut bounds = vec![0.0; x.len()];
        values.par_chunks_mut(cols).zip(bounds.par_chunks_mut(cols)).enumerate().for_each(|(r, (out, bnd))| {
            let v = spec.visible(r);
            let l = match &row_l {
                Some(l) => l[r],
                None => {
                    let xr = &x[r * cols..r * cols + v];
                    let m = exp_row(p, xr, &mut out[..v]);
                    let l = ln(p, sum_by(p, v, |i| out[i]));
                    for (o, &xv) in out[..v].iter_mut().zip(xr) {
                        *o = (xv as f64 - m) - l;
                    }
                    l
                }
            };
            for (o, d) in out[..v].iter().zip(&mut bnd[..v]) {
                *d = log_softmax_bound(v, l, *o);
            }
        });
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Softmax backward from the (rounded) output `y`: `gx_i = y_i·(gy_i − Σ_j gy_j·y_j)`.
    pub fn softmax_backward(&self, y: &[f32], gy: &[f32], spec: RowSpec) -> Result<Bounded> {
        spec.check("softmax_backward", &[("y", y.len()), ("grad_out", gy.len())])?;
        let p = self.profile();
        let cols = spec.cols.max(1);
        let (threads, sizes) = spec.gpu_launch();
        let (ins, outs) = ([In::F32(y), In::F32(gy)], [y.len(), spec.rows]);
        let gpu = self.gpu().map(|g| g.run("softmax_backward", "softmax_bwd", threads, &ins, outs, &sizes));
        let (mut values, row_dot) = match gpu.transpose()? {
            Some([gx, d]) => (gx, Some(d)),
            None => (vec![0.0; y.len()], None),
        };
        let mut bounds = vec![0.0; y.len()];
        values.par_chunks_mut(cols).zip(bounds.par_chunks_mut(cols)).enumerate().for_each(|(r, (out, bnd))| {
            let v = spec.visible(r);
            let yr = &y[r * cols..r * cols + v];
            let gr = &gy[r * cols..r * cols + v];
            let dot = match &row_dot {
                Some(d) => d[r],
                None => {
                    let dot = dot_by(p, v, |i| gr[i] as f64, |i| yr[i] as f64);
                    for i in 0..v {
                        out[i] = yr[i] as f64 * (gr[i] as f64 - dot);
                    }
                    dot
                }
            };
            // Per side: products gy·y are exact (FP32), so |D̂ − D| ≤ γ_{v−1}·Σ|gy·y|.
            // gx = y·(gy − D): + u|gy − D| per subtraction, + u|gx| per product; the
            // alternative order y·gy − y·D costs u|y·D| + u|gx|: both are covered.
            let abs: f64 = yr.iter().zip(gr).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            let e_d = gamma(v.saturating_sub(1)) * abs;
            for i in 0..v {
                let yi = yr[i] as f64;
                let t = gr[i] as f64 - dot;
                let e = yi.abs() * (e_d + U * t.abs()) + U * (yi * dot).abs() + U * out[i].abs() + ETA;
                bnd[i] = two_sided(e);
            }
        });
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Log-softmax backward from the (rounded) output `y`: `gx_i = gy_i − exp(y_i)·Σ_j gy_j`.
    pub fn log_softmax_backward(&self, y: &[f32], gy: &[f32], spec: RowSpec) -> Result<Bounded> {
        spec.check("log_softmax_backward", &[("y", y.len()), ("grad_out", gy.len())])?;
        let p = self.profile();
        let cols = spec.cols.max(1);
        let (threads, sizes) = spec.gpu_launch();
        let (ins, outs) = ([In::F32(y), In::F32(gy)], [y.len(), y.len(), spec.rows]);
        let gpu = self.gpu().map(|g| g.run("log_softmax_backward", "log_softmax_bwd", threads, &ins, outs, &sizes));
        let (mut values, from_gpu) = match gpu.transpose()? {
            Some([gx, e, g]) => (gx, Some((e, g))),
            None => (vec![0.0; y.len()], None),
        };
        let mut bounds = vec![0.0; y.len()];
        values.par_chunks_mut(cols).zip(bounds.par_chunks_mut(cols)).enumerate().for_each(|(r, (out, bnd))| {
            let v = spec.visible(r);
            let yr = &y[r * cols..r * cols + v];
            let gr = &gy[r * cols..r * cols + v];
            let abs: f64 = gr.iter().map(|a| a.abs() as f64).sum();
            // Per side: |Ĝ − G| ≤ γ_{v−1}Σ|gy|; exp(y) has relative error 8u (+ETA); the
            // product adds u, the subtraction u|gx|: e·(E_G + 9u|G|) + u|gx| + 2·ETA.
            let e_g = gamma(v.saturating_sub(1)) * abs;
            let bound = |e: f64, g: f64, gx: f64| two_sided(e * (e_g + 9.0 * U * g.abs()) + U * gx.abs() + 2.0 * ETA);
            match &from_gpu {
                Some((e, g)) => {
                    for i in 0..v {
                        bnd[i] = bound(e[r * cols + i], g[r], out[i]);
                    }
                }
                None => {
                    let g = sum_by(p, v, |i| gr[i] as f64);
                    for i in 0..v {
                        let e = exp(p, yr[i] as f64);
                        out[i] = gr[i] as f64 - e * g;
                        bnd[i] = bound(e, g, out[i]);
                    }
                }
            }
        });
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Mean cross-entropy of `rows` rows of `cols` logits against integer targets.
    /// Returns `(loss, grad_logits)`: the loss (one value) is
    /// `(1/rows)·Σ_r (ln S_r − z_{r,t_r})` and the gradient `(softmax_r − onehot(t_r))/rows`.
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        targets: &[u32],
        rows: usize,
        cols: usize,
    ) -> Result<(Bounded, Bounded)> {
        const OP: &str = "cross_entropy";
        let spec = RowSpec::new(rows, cols);
        spec.check(OP, &[("logits", logits.len())])?;
        check_len(OP, "targets", targets.len(), rows)?;
        if rows == 0 || cols == 0 {
            return Err(shape_err(OP, format!("empty batch ({rows}×{cols})")));
        }
        if let Some((r, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= cols) {
            return Err(arg_err(OP, format!("target {t} of row {r} is not below {cols} classes")));
        }
        let p = self.profile();
        let inv_b = rows as f64;
        let n = logits.len();
        let gpu = self.gpu().map(|g| {
            let ins = [In::F32(logits), In::U32(targets)];
            g.run(OP, "cross_entropy_rows", rows, &ins, [n, n, rows, rows], &[size(rows), size(cols)])
        });
        let (mut grad, from_gpu) = match gpu.transpose()? {
            Some([grad, probs, loss, l]) => (grad, Some((probs, loss, l))),
            None => (vec![0.0; n], None),
        };
        let mut gbound = vec![0.0; n];
        // (per-row loss, its per-side error bound)
        let row_losses: Vec<(f64, f64)> = grad
            .par_chunks_mut(cols)
            .zip(gbound.par_chunks_mut(cols))
            .enumerate()
            .map(|(r, (out, bnd))| {
                let t = targets[r] as usize;
                let (loss, l) = match &from_gpu {
                    Some((probs, loss, l)) => {
                        for (i, (o, d)) in out.iter().zip(bnd.iter_mut()).enumerate() {
                            *d = cross_entropy_grad_bound(cols, probs[r * cols + i], i == t, inv_b, *o);
                        }
                        (loss[r], l[r])
                    }
                    None => {
                        let xr = &logits[r * cols..(r + 1) * cols];
                        let m = exp_row(p, xr, out);
                        let s = sum_by(p, cols, |i| out[i]);
                        let l = ln(p, s);
                        for (i, (o, d)) in out.iter_mut().zip(bnd.iter_mut()).enumerate() {
                            let pi = *o / s;
                            let q = if i == t { pi - 1.0 } else { pi };
                            *o = q / inv_b;
                            *d = cross_entropy_grad_bound(cols, pi, i == t, inv_b, *o);
                        }
                        (l - (xr[t] as f64 - m), l)
                    }
                };
                (loss, cross_entropy_row_err(cols, l, loss))
            })
            .collect();
        let loss = match self.gpu() {
            Some(g) => {
                let per_row: Vec<f64> = row_losses.iter().map(|x| x.0).collect();
                let [mean] = g.run(OP, "mean_seq", 1, &[In::F64(&per_row)], [1], &[size(rows)])?;
                mean[0]
            }
            None => sum_by(p, rows, |r| row_losses[r].0) / inv_b,
        };
        // Loss: Σ of per-row errors + the sum's γ_{rows−1}·Σ|l_r| (per side), then / rows
        // with γ_2.
        let e_rows: f64 = row_losses.iter().map(|x| x.1).sum();
        let abs: f64 = row_losses.iter().map(|x| x.0.abs()).sum();
        let e = (e_rows + gamma(rows - 1) * abs) / inv_b + gamma(2) * loss.abs() + ETA;
        Ok((
            Bounded { values: vec![loss], bound: ErrorBound::Uniform(two_sided(e)) },
            Bounded { values: grad, bound: ErrorBound::PerElement(gbound) },
        ))
    }
}
