//! 2-D convolution (NCHW, stride, zero padding) and max/average pooling, forward and backward.
//!
//! Convolution is lowered to im2col + the profile's matmul, so the `cpu` profile runs it on
//! the blocked GEMM and the others in their own dot-product orders.

use rayon::prelude::*;

use crate::bound::{ETA, ExactTerms, SLACK, gamma, two_sided};
use crate::cuda::{In, Param, size};
use crate::exact::{ExactSum, Sums};
use crate::reduce::sum_by;
use crate::scatter::{Groups, group_bound};
use crate::{Bounded, Device, ErrorBound, MatmulSpec, Result, arg_err, check_len, checked_prod, shape_err};

/// Shape of a convolution: input `n×c_in×h×w`, weight `c_out×c_in×kh×kw`, bias `c_out`,
/// output `n×c_out×oh×ow` with `oh = (h + 2·pad − kh)/stride + 1` (likewise `ow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dSpec {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

/// Shape of a pooling op: input `n×c×h×w`, window `kh×kw`, output `n×c×oh×ow` as for conv.
/// Average pooling divides by `kh·kw` (padding counts as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dSpec {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

/// Gradients from [`Device::conv2d_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2dGrads {
    pub gx: Bounded,
    pub gw: Bounded,
    pub gb: Bounded,
}

/// Output size along one axis, or a shape error.
fn out_dim(op: &'static str, size: usize, k: usize, stride: usize, pad: usize) -> Result<usize> {
    if stride == 0 || k == 0 {
        return Err(shape_err(op, "kernel size and stride must be positive"));
    }
    let padded = size + 2 * pad;
    if padded < k {
        return Err(shape_err(op, format!("kernel {k} larger than padded input {padded}")));
    }
    Ok((padded - k) / stride + 1)
}

impl Conv2dSpec {
    fn dims(&self, op: &'static str) -> Result<(usize, usize)> {
        Ok((out_dim(op, self.h, self.kh, self.stride, self.pad)?, out_dim(op, self.w, self.kw, self.stride, self.pad)?))
    }
}

impl Pool2dSpec {
    fn dims(&self, op: &'static str) -> Result<(usize, usize)> {
        if self.pad >= self.kh || self.pad >= self.kw {
            return Err(shape_err(
                op,
                format!("padding {} must be below the window {}×{}", self.pad, self.kh, self.kw),
            ));
        }
        Ok((out_dim(op, self.h, self.kh, self.stride, self.pad)?, out_dim(op, self.w, self.kw, self.stride, self.pad)?))
    }

    /// The pooling kernels' shape arguments: planes, h, w, oh, ow, kh, kw, stride, pad.
    fn gpu_sizes(&self, oh: usize, ow: usize) -> [Param; 9] {
        [self.n * self.c, self.h, self.w, oh, ow, self.kh, self.kw, self.stride, self.pad].map(size)
    }

    /// Input offsets (within one plane) of window (oy, ox), skipping padding.
    fn window(&self, oy: usize, ox: usize) -> impl Iterator<Item = usize> + '_ {
        let (s, pad) = (self.stride, self.pad);
        (0..self.kh).flat_map(move |dy| {
            (0..self.kw).filter_map(move |dx| {
                let iy = (oy * s + dy).checked_sub(pad)?;
                let ix = (ox * s + dx).checked_sub(pad)?;
                (iy < self.h && ix < self.w).then_some(iy * self.w + ix)
            })
        })
    }
}

/// im2col of all images: `K×(n·P)` with `K = c_in·kh·kw`, `P = oh·ow`.
fn im2col(x: &[f32], s: &Conv2dSpec, oh: usize, ow: usize) -> Vec<f64> {
    let p = oh * ow;
    let np = s.n * p;
    let kk = s.c_in * s.kh * s.kw;
    let mut cols = vec![0.0f64; kk * np];
    cols.par_chunks_mut(np.max(1)).enumerate().for_each(|(k, row)| {
        let ci = k / (s.kh * s.kw);
        let dy = k / s.kw % s.kh;
        let dx = k % s.kw;
        for img in 0..s.n {
            let plane = &x[(img * s.c_in + ci) * s.h * s.w..][..s.h * s.w];
            for oy in 0..oh {
                let Some(iy) = (oy * s.stride + dy).checked_sub(s.pad).filter(|&iy| iy < s.h) else {
                    continue;
                };
                for ox in 0..ow {
                    if let Some(ix) = (ox * s.stride + dx).checked_sub(s.pad).filter(|&ix| ix < s.w) {
                        row[img * p + oy * ow + ox] = plane[iy * s.w + ix] as f64;
                    }
                }
            }
        }
    });
    cols
}

/// Euclidean norms of the rows (`by_row`) or columns of a `r×c` matrix.
fn norms(x: &[f64], r: usize, c: usize, by_row: bool) -> Vec<f64> {
    if by_row {
        x.chunks(c.max(1)).take(r).map(|row| row.iter().map(|v| v * v).sum::<f64>().sqrt()).collect()
    } else {
        let mut s = vec![0.0; c];
        for row in x.chunks(c.max(1)).take(r) {
            for (a, v) in s.iter_mut().zip(row) {
                *a += v * v;
            }
        }
        s.iter().map(|v| v.sqrt()).collect()
    }
}

impl Device {
    /// Convolution forward: `y[n,co] = Σ_{ci,dy,dx} x·w + bias[co]`.
    pub fn conv2d(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>, spec: Conv2dSpec) -> Result<Bounded> {
        const OP: &str = "conv2d";
        let (oh, ow) = spec.dims(OP)?;
        check_len(OP, "x", x.len(), checked_prod(OP, &[spec.n, spec.c_in, spec.h, spec.w])?)?;
        let kk = checked_prod(OP, &[spec.c_in, spec.kh, spec.kw])?;
        check_len(OP, "weight", w.len(), checked_prod(OP, &[spec.c_out, kk])?)?;
        if let Some(b) = bias {
            check_len(OP, "bias", b.len(), spec.c_out)?;
        }
        let p = oh * ow;
        let np = checked_prod(OP, &[spec.n, p])?;
        let cols = im2col(x, &spec, oh, ow);
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let mut mat = vec![0.0; spec.c_out * np];
        self.matmul_f64(&w64, &cols, None, &mut mat, MatmulSpec::new(spec.c_out, kk, np))?;
        // Bound: products of FP32 inputs are exact; each output sums ≤ K = c_in·kh·kw
        // products (padding adds exact zeros) + the bias: per side γ_K·(Σ|w·x| + |b|) ≤
        // γ_K·(‖w_co‖·‖patch‖ + |b|) (Cauchy–Schwarz); two-sided ×2.
        let g = if bias.is_some() { gamma(kk) } else { gamma(kk.saturating_sub(1)) };
        let nw = norms(&w64, spec.c_out, kk, true);
        let nc = norms(&cols, kk, np, false);
        let mut values = vec![0.0; mat.len()];
        let mut bounds = vec![0.0; mat.len()];
        for img in 0..spec.n {
            for co in 0..spec.c_out {
                let b = bias.map_or(0.0, |b| b[co] as f64);
                let src = &mat[co * np + img * p..][..p];
                let base = (img * spec.c_out + co) * p;
                for q in 0..p {
                    let v = src[q] + b;
                    values[base + q] = v;
                    let mut d = 2.0 * g * (nw[co] * nc[img * p + q] + b.abs()) * SLACK;
                    // Where the Cauchy–Schwarz bound would make the element ambiguous, use the
                    // tight Σ|w·x| form (0 when every summation order is exact).
                    if common::rounding::is_ambiguous(v, d) {
                        let mut terms = ExactTerms::new();
                        for r in 0..kk {
                            terms.product(w[co * kk + r], cols[r * np + img * p + q] as f32);
                        }
                        if let Some(bias) = bias {
                            terms.value(bias[co]);
                        }
                        d = d.min(terms.bound());
                    }
                    bounds[base + q] = d;
                }
            }
        }
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Convolution backward: gradients of input, weight and bias from the output gradient.
    pub fn conv2d_backward(&self, x: &[f32], w: &[f32], gy: &[f32], spec: Conv2dSpec) -> Result<Conv2dGrads> {
        let (gx, gw, gb) = self.conv2d_backward_wanted(x, w, gy, spec, true)?;
        let gx = gx.ok_or_else(|| crate::arg_err("conv2d_backward", "internal: no input gradient"))?;
        Ok(Conv2dGrads { gx, gw, gb })
    }

    /// [`Device::conv2d_backward`] computing the input gradient only when `want_gx` (a model's
    /// first convolution has no use for the gradient of its images): `(gx, gw, gb)`, each the
    /// same, bit for bit, as `conv2d_backward`'s.
    pub fn conv2d_backward_wanted(
        &self,
        x: &[f32],
        w: &[f32],
        gy: &[f32],
        spec: Conv2dSpec,
        want_gx: bool,
    ) -> Result<(Option<Bounded>, Bounded, Bounded)> {
        const OP: &str = "conv2d_backward";
        let (oh, ow) = spec.dims(OP)?;
        check_len(OP, "x", x.len(), checked_prod(OP, &[spec.n, spec.c_in, spec.h, spec.w])?)?;
        let kk = checked_prod(OP, &[spec.c_in, spec.kh, spec.kw])?;
        check_len(OP, "weight", w.len(), checked_prod(OP, &[spec.c_out, kk])?)?;
        let p = oh * ow;
        let np = checked_prod(OP, &[spec.n, p])?;
        check_len(OP, "grad_out", gy.len(), checked_prod(OP, &[spec.c_out, np])?)?;
        let pr = self.profile();
        let cols = im2col(x, &spec, oh, ow);
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        // GY as c_out × (n·P).
        let mut gym = vec![0.0f64; spec.c_out * np];
        for img in 0..spec.n {
            for co in 0..spec.c_out {
                let src = &gy[(img * spec.c_out + co) * p..][..p];
                for (d, s) in gym[co * np + img * p..][..p].iter_mut().zip(src) {
                    *d = *s as f64;
                }
            }
        }
        let n_gy_row = norms(&gym, spec.c_out, np, true);
        let n_gy_col = norms(&gym, spec.c_out, np, false);

        // gw = GY · colsᵀ: sums of n·P exact products; per side γ_{nP−1}‖GY_co‖‖cols_k‖ (C–S).
        let mut gw = vec![0.0; spec.c_out * kk];
        self.matmul_f64(&gym, &cols, None, &mut gw, MatmulSpec::new(spec.c_out, np, kk).trans_b())?;
        let n_cols_row = norms(&cols, kk, np, true);
        let cw = 2.0 * gamma(np.saturating_sub(1)) * SLACK;
        // Where the Cauchy–Schwarz bound would make an element ambiguous, use the tight
        // Σ|gy·x| form (0 when every summation order is exact).
        let gwb: Vec<f64> = (0..spec.c_out * kk)
            .map(|i| {
                let d = cw * n_gy_row[i / kk] * n_cols_row[i % kk];
                if !common::rounding::is_ambiguous(gw[i], d) {
                    return d;
                }
                let (co, r) = (i / kk, i % kk);
                let mut terms = ExactTerms::new();
                for q in 0..np {
                    terms.product(gym[co * np + q] as f32, cols[r * np + q] as f32);
                }
                d.min(terms.bound())
            })
            .collect();

        // gb = Σ over n·P of gy: exact terms, sum bound.
        let (gb, gbb): (Vec<f64>, Vec<f64>) = (0..spec.c_out)
            .map(|co| {
                let row = &gym[co * np..(co + 1) * np];
                let mut terms = ExactTerms::new();
                row.iter().for_each(|&v| terms.value(v as f32));
                (sum_by(pr, np, |i| row[i]), terms.bound())
            })
            .unzip();

        let (gw, gb) = (
            Bounded { values: gw, bound: ErrorBound::PerElement(gwb) },
            Bounded { values: gb, bound: ErrorBound::PerElement(gbb) },
        );
        if !want_gx {
            return Ok((None, gw, gb));
        }

        // gx = col2im(Wᵀ·GY): each gx element is a sum of ≤ c_out·kh·kw exact products
        // w·gy, whatever the staging; per side γ_{T−1}·Σ|w·gy| ≤ γ_{T−1}·col2im(‖W_{:,k}‖·
        // ‖GY_{:,q}‖) (Cauchy–Schwarz per (k, q) pair).
        let mut gcols = vec![0.0; kk * np];
        self.matmul_f64(&w64, &gym, None, &mut gcols, MatmulSpec::new(kk, spec.c_out, np).trans_a())?;
        let n_w_col = norms(&w64, spec.c_out, kk, false);
        let plane = spec.h * spec.w;
        let mut gx = vec![0.0; spec.n * spec.c_in * plane];
        let mut gxa = vec![0.0; gx.len()];
        gx.par_chunks_mut(plane.max(1)).zip(gxa.par_chunks_mut(plane.max(1))).enumerate().for_each(
            |(nc, (gxp, gap))| {
                let img = nc / spec.c_in;
                let ci = nc % spec.c_in;
                for dy in 0..spec.kh {
                    for dx in 0..spec.kw {
                        let k = (ci * spec.kh + dy) * spec.kw + dx;
                        let grow = &gcols[k * np + img * p..][..p];
                        for oy in 0..oh {
                            let Some(iy) = (oy * spec.stride + dy).checked_sub(spec.pad).filter(|&iy| iy < spec.h)
                            else {
                                continue;
                            };
                            for ox in 0..ow {
                                if let Some(ix) =
                                    (ox * spec.stride + dx).checked_sub(spec.pad).filter(|&ix| ix < spec.w)
                                {
                                    let q = oy * ow + ox;
                                    gxp[iy * spec.w + ix] += grow[q];
                                    gap[iy * spec.w + ix] += n_w_col[k] * n_gy_col[img * p + q];
                                }
                            }
                        }
                    }
                }
            },
        );
        let cx = 2.0 * gamma((spec.c_out * spec.kh * spec.kw).saturating_sub(1)) * SLACK;
        gxa.iter_mut().for_each(|a| *a *= cx);
        Ok((Some(Bounded { values: gx, bound: ErrorBound::PerElement(gxa) }), gw, gb))
    }

    /// Max pooling. Returns the output (exact) and, per output element, the flat index into
    /// `x` of the maximum (the first one in window order on ties).
    pub fn max_pool2d(&self, x: &[f32], spec: Pool2dSpec) -> Result<(Bounded, Vec<u32>)> {
        const OP: &str = "max_pool2d";
        let (oh, ow) = spec.dims(OP)?;
        let total = checked_prod(OP, &[spec.n, spec.c, spec.h, spec.w])?;
        check_len(OP, "x", x.len(), total)?;
        if total > u32::MAX as usize {
            return Err(shape_err(OP, "input too large for u32 indices"));
        }
        let n_out = spec.n * spec.c * oh * ow;
        if let Some(g) = self.gpu() {
            // The argmax travels as a double (exact: it is below 2³²).
            let [y, at] = g.run(OP, "max_pool_fwd", n_out, &[In::F32(x)], [n_out, n_out], &spec.gpu_sizes(oh, ow))?;
            return Ok((Bounded::exact(y), at.iter().map(|&i| i as u32).collect()));
        }
        let plane = spec.h * spec.w;
        let mut values = Vec::with_capacity(n_out);
        let mut idx = Vec::with_capacity(n_out);
        for nc in 0..spec.n * spec.c {
            let xp = &x[nc * plane..(nc + 1) * plane];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = usize::MAX;
                    for i in spec.window(oy, ox) {
                        if best == usize::MAX || xp[i] > xp[best] {
                            best = i;
                        }
                    }
                    values.push(xp[best] as f64);
                    idx.push((nc * plane + best) as u32);
                }
            }
        }
        Ok((Bounded::exact(values), idx))
    }

    /// Max pooling backward: scatter-add of `gy` to the argmax positions. Elements that
    /// receive `c` contributions (overlapping windows) are bounded by `2γ_{c−1}Σ|gy|`.
    pub fn max_pool2d_backward(&self, gy: &[f32], argmax: &[u32], spec: Pool2dSpec) -> Result<Bounded> {
        const OP: &str = "max_pool2d_backward";
        let (oh, ow) = spec.dims(OP)?;
        let total = checked_prod(OP, &[spec.n, spec.c, spec.h, spec.w])?;
        check_len(OP, "grad_out", gy.len(), checked_prod(OP, &[spec.n, spec.c, oh, ow])?)?;
        check_len(OP, "argmax", argmax.len(), gy.len())?;
        if let Some(bad) = argmax.iter().find(|&&i| i as usize >= total) {
            return Err(arg_err(OP, format!("argmax index {bad} is not below {total}")));
        }
        // Gather contributions per input element in output order, then reduce each (in the
        // profile's order on the CPU).
        let groups = Groups::new(argmax.iter().map(|&i| i as usize), total);
        let bounds: Vec<f64> =
            (0..total).into_par_iter().with_min_len(1024).map(|i| group_bound(groups.of(i), |o| gy[o])).collect();
        let values = match self.gpu() {
            Some(g) => groups.sum_gpu(g, OP, gy, 1)?,
            None => {
                let pr = self.profile();
                (0..total)
                    .into_par_iter()
                    .with_min_len(1024)
                    .map(|i| {
                        let s = groups.of(i);
                        sum_by(pr, s.len(), |j| gy[s[j]] as f64)
                    })
                    .collect()
            }
        };
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Average pooling: window sum divided by `kh·kw` (padding counts as zeros), the sum as
    /// `sums` defines ([`Sums`]).
    pub fn avg_pool2d(&self, x: &[f32], spec: Pool2dSpec, sums: Sums) -> Result<Bounded> {
        const OP: &str = "avg_pool2d";
        let (oh, ow) = spec.dims(OP)?;
        check_len(OP, "x", x.len(), checked_prod(OP, &[spec.n, spec.c, spec.h, spec.w])?)?;
        let pr = self.profile();
        let plane = spec.h * spec.w;
        let cnt = (spec.kh * spec.kw) as f64;
        let n_out = spec.n * spec.c * oh * ow;
        if sums == Sums::CorrectlyRounded {
            // On the host for every profile: each window's exact sum, rounded once, ÷ cnt.
            let mut values = vec![0.0; n_out];
            values.par_chunks_mut((oh * ow).max(1)).enumerate().for_each(|(nc, out)| {
                let xp = &x[nc * plane..(nc + 1) * plane];
                let mut s = ExactSum::new();
                for oy in 0..oh {
                    for ox in 0..ow {
                        s.clear();
                        spec.window(oy, ox).for_each(|i| s.add(xp[i] as f64));
                        out[oy * ow + ox] = s.round() / cnt;
                    }
                }
            });
            return Ok(Bounded::exact(values));
        }
        let gpu = self.gpu().map(|g| g.run(OP, "avg_pool_fwd", n_out, &[In::F32(x)], [n_out], &spec.gpu_sizes(oh, ow)));
        let (mut values, on_gpu) = match gpu.transpose()? {
            Some([y]) => (y, true),
            None => (vec![0.0; n_out], false),
        };
        let mut bounds = vec![0.0; values.len()];
        values.par_chunks_mut((oh * ow).max(1)).zip(bounds.par_chunks_mut((oh * ow).max(1))).enumerate().for_each(
            |(nc, (out, bnd))| {
                let xp = &x[nc * plane..(nc + 1) * plane];
                let mut win = Vec::with_capacity(spec.kh * spec.kw);
                for oy in 0..oh {
                    for ox in 0..ow {
                        win.clear();
                        win.extend(spec.window(oy, ox).map(|i| xp[i] as f64));
                        let v = &mut out[oy * ow + ox];
                        if !on_gpu {
                            *v = sum_by(pr, win.len(), |j| win[j]) / cnt;
                        }
                        let abs: f64 = win.iter().map(|v| v.abs()).sum();
                        // Per side: sum γ_{c−1}Σ|x|, then ÷cnt (or ·(1/cnt)): γ_2|v| (+ETA).
                        let e = gamma(win.len().saturating_sub(1)) * abs / cnt + gamma(2) * v.abs() + ETA;
                        bnd[oy * ow + ox] = two_sided(e);
                    }
                }
            },
        );
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// Average pooling backward: each input element receives `gy/(kh·kw)` from every window
    /// that contains it.
    pub fn avg_pool2d_backward(&self, gy: &[f32], spec: Pool2dSpec) -> Result<Bounded> {
        const OP: &str = "avg_pool2d_backward";
        let (oh, ow) = spec.dims(OP)?;
        check_len(OP, "grad_out", gy.len(), checked_prod(OP, &[spec.n, spec.c, oh, ow])?)?;
        let pr = self.profile();
        let plane = spec.h * spec.w;
        let cnt = (spec.kh * spec.kw) as f64;
        let n_in = spec.n * spec.c * plane;
        let gpu = self.gpu().map(|g| g.run(OP, "avg_pool_bwd", n_in, &[In::F32(gy)], [n_in], &spec.gpu_sizes(oh, ow)));
        let (mut values, on_gpu) = match gpu.transpose()? {
            Some([gx]) => (gx, true),
            None => (vec![0.0; n_in], false),
        };
        let mut bounds = vec![0.0; values.len()];
        values.par_chunks_mut(plane.max(1)).zip(bounds.par_chunks_mut(plane.max(1))).enumerate().for_each(
            |(nc, (out, bnd))| {
                let gp = &gy[nc * oh * ow..(nc + 1) * oh * ow];
                // Contributions per input element, in window order.
                let mut contrib: Vec<Vec<f64>> = vec![Vec::new(); plane];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let g = gp[oy * ow + ox] as f64 / cnt;
                        for i in spec.window(oy, ox) {
                            contrib[i].push(g);
                        }
                    }
                }
                for (i, c) in contrib.iter().enumerate() {
                    if !on_gpu {
                        out[i] = sum_by(pr, c.len(), |j| c[j]);
                    }
                    let abs: f64 = c.iter().map(|v| v.abs()).sum();
                    // Per side: each term gy/cnt has one or two roundings (γ_2), then a sum of
                    // c terms (γ_{c−1}): γ_{c+2}·Σ|gy|/cnt (+ETA per term); also covers
                    // dividing after summing. From the inputs only.
                    bnd[i] = two_sided(gamma(c.len() + 2) * abs + c.len() as f64 * ETA);
                }
            },
        );
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profile;
    use crate::parity::SplitMix64;

    /// Without the input gradient, the weight and bias gradients are those of the full backward
    /// pass, bit for bit; with it, all three are.
    #[test]
    fn a_backward_pass_computes_the_input_gradient_only_when_asked() {
        let mut rng = SplitMix64(31);
        let spec = Conv2dSpec { n: 2, c_in: 3, h: 9, w: 8, c_out: 4, kh: 3, kw: 3, stride: 2, pad: 1 };
        let (oh, ow) = spec.dims("test").unwrap();
        let x = rng.uniform(2 * 3 * 9 * 8, 1.0);
        let w = rng.uniform(4 * 3 * 3 * 3, 1.0);
        let gy = rng.uniform(2 * 4 * oh * ow, 1.0);
        for profile in Profile::CPU {
            let dev = Device::new(profile).unwrap();
            let full = dev.conv2d_backward(&x, &w, &gy, spec).unwrap();
            let bits =
                |b: &Bounded| (b.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), format!("{:?}", b.bound));
            let (none, gw, gb) = dev.conv2d_backward_wanted(&x, &w, &gy, spec, false).unwrap();
            assert!(none.is_none(), "{profile}");
            assert_eq!((bits(&gw), bits(&gb)), (bits(&full.gw), bits(&full.gb)), "{profile}");
            let (gx, _, _) = dev.conv2d_backward_wanted(&x, &w, &gy, spec, true).unwrap();
            assert_eq!(gx.as_ref().map(bits), Some(bits(&full.gx)), "{profile}");
            // Shapes are checked whatever is asked for.
            assert!(dev.conv2d_backward_wanted(&x, &w, &gy[1..], spec, false).is_err());
        }
    }

    /// An average whose window sums exactly can land exactly on an FP32 midpoint: 49 integers
    /// summing to 49·(2²⁴+1), whose mean 2²⁴+1 lies halfway between two FP32 values. Summed
    /// in the profile's order it is logged (its bound allows a reciprocal multiplication and any
    /// order); correctly rounded it is exact on every profile. On random planes the two
    /// definitions agree within the profile-order bound.
    #[test]
    fn correctly_rounded_averages_need_no_tie_breaks() {
        let mut x = vec![16_777_216.0f32; 49];
        (x[47], x[48]) = (16_777_266.0, 16_777_215.0);
        let global = Pool2dSpec { n: 1, c: 1, h: 7, w: 7, kh: 7, kw: 7, stride: 1, pad: 0 };
        let mut rng = SplitMix64(32);
        let planes = rng.uniform(3 * 4 * 9 * 9, 1.0);
        let windows = Pool2dSpec { n: 3, c: 4, h: 9, w: 9, kh: 3, kw: 3, stride: 2, pad: 1 };
        for profile in Profile::CPU {
            let dev = Device::new(profile).unwrap();
            let any = dev.avg_pool2d(&x, global, Sums::ProfileOrder).unwrap();
            let exact = dev.avg_pool2d(&x, global, Sums::CorrectlyRounded).unwrap();
            assert_eq!((exact.values[0], &exact.bound), (16_777_217.0, &ErrorBound::Exact), "{profile}");
            assert!(common::rounding::is_ambiguous(any.values[0], any.bound.at(0)), "{profile}");
            let any = dev.avg_pool2d(&planes, windows, Sums::ProfileOrder).unwrap();
            let exact = dev.avg_pool2d(&planes, windows, Sums::CorrectlyRounded).unwrap();
            for (i, (a, e)) in any.values.iter().zip(&exact.values).enumerate() {
                assert!((a - e).abs() <= any.bound.at(i), "{profile} element {i}: {a:e} vs {e:e}");
            }
        }
    }
}
