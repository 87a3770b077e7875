//! Batched matrix multiplication (optionally transposed operands, bias, scale), its backward
//! pass, and column sums (bias gradients).
//!
//! `cpu` runs the `gemm` crate's blocked FP64 GEMM; `cpu-seq` and `cpu-splitk` run one dot
//! product per output element in their own reduction order. All three parallelise over
//! output rows or blocks only, so results never depend on the thread count.

use rayon::prelude::*;

use crate::bound::{ETA, ExactTerms, SLACK, U, gamma};
use crate::reduce::{dot_slices, sum_by};
use crate::{Bounded, Device, ErrorBound, Profile, Result, check_len, checked_prod, shape_err};

/// Shape of a batched matmul `C[b] = op(A[b]) · op(B[b])`, `op(A)` is `m×k`, `op(B)` is `k×n`.
/// `A[b]` is stored row-major as `m×k`, or as `k×m` when `a_trans`; likewise `B[b]` as `k×n`
/// or `n×k` when `b_trans`. `C` is `batch×m×n` row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulSpec {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_trans: bool,
    pub b_trans: bool,
}

impl MatmulSpec {
    /// A single `m×k · k×n` product, no transposes.
    pub fn new(m: usize, k: usize, n: usize) -> MatmulSpec {
        MatmulSpec { batch: 1, m, k, n, a_trans: false, b_trans: false }
    }

    /// `batch` independent products.
    pub fn batched(batch: usize, m: usize, k: usize, n: usize) -> MatmulSpec {
        MatmulSpec { batch, ..MatmulSpec::new(m, k, n) }
    }

    /// With `A` stored transposed (`k×m`).
    pub fn trans_a(self) -> MatmulSpec {
        MatmulSpec { a_trans: !self.a_trans, ..self }
    }

    /// With `B` stored transposed (`n×k`).
    pub fn trans_b(self) -> MatmulSpec {
        MatmulSpec { b_trans: !self.b_trans, ..self }
    }

    fn sizes(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        Ok((
            checked_prod(op, &[self.batch, self.m, self.k])?,
            checked_prod(op, &[self.batch, self.k, self.n])?,
            checked_prod(op, &[self.batch, self.m, self.n])?,
        ))
    }
}

/// Strides (row stride, column stride) of `op(X)` for X stored `rows×cols` or transposed.
fn strides(trans: bool, rows: usize, cols: usize) -> (usize, usize) {
    if trans { (1, rows) } else { (cols, 1) }
}

impl Device {
    /// `C = op(A)·op(B) (+ bias broadcast over rows)`.
    pub fn matmul(&self, a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Result<Bounded> {
        self.matmul_impl("matmul", a, b, bias, 1.0, spec)
    }

    /// `C = scale · (op(A)·op(B))`: the scale multiplies the finished dot product (attention's
    /// `QKᵀ/√d`). Scaling an operand first is a different op.
    pub fn matmul_scaled(&self, a: &[f32], b: &[f32], scale: f64, spec: MatmulSpec) -> Result<Bounded> {
        if !scale.is_finite() {
            return Err(crate::arg_err("matmul_scaled", format!("scale {scale} is not finite")));
        }
        self.matmul_impl("matmul_scaled", a, b, None, scale, spec)
    }

    /// Gradients `(gA, gB)` of `C = op(A)·op(B)` given `gC`, each laid out like its operand.
    pub fn matmul_backward(&self, a: &[f32], b: &[f32], gc: &[f32], spec: MatmulSpec) -> Result<(Bounded, Bounded)> {
        self.matmul_scaled_backward(a, b, gc, 1.0, spec)
    }

    /// Gradients of [`Device::matmul_scaled`]: `gA = scale·(gC·op(B)ᵀ)`, `gB = scale·(op(A)ᵀ·gC)`,
    /// each a [`Device::matmul_scaled`] and bounded as such.
    pub fn matmul_scaled_backward(
        &self,
        a: &[f32],
        b: &[f32],
        gc: &[f32],
        scale: f64,
        spec: MatmulSpec,
    ) -> Result<(Bounded, Bounded)> {
        const OP: &str = "matmul_backward";
        let (la, lb, lc) = spec.sizes(OP)?;
        check_len(OP, "a", a.len(), la)?;
        check_len(OP, "b", b.len(), lb)?;
        check_len(OP, "grad_out", gc.len(), lc)?;
        let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
        let ga = if a_trans {
            // gA_stored (k×m) = op(B) · gCᵀ
            let s = MatmulSpec { batch, m: k, k: n, n: m, a_trans: b_trans, b_trans: true };
            self.matmul_impl(OP, b, gc, None, scale, s)?
        } else {
            // gA (m×k) = gC · op(B)ᵀ
            let s = MatmulSpec { batch, m, k: n, n: k, a_trans: false, b_trans: !b_trans };
            self.matmul_impl(OP, gc, b, None, scale, s)?
        };
        let gb = if b_trans {
            // gB_stored (n×k) = gCᵀ · op(A)
            let s = MatmulSpec { batch, m: n, k: m, n: k, a_trans: true, b_trans: a_trans };
            self.matmul_impl(OP, gc, a, None, scale, s)?
        } else {
            // gB (k×n) = op(A)ᵀ · gC
            let s = MatmulSpec { batch, m: k, k: m, n, a_trans: !a_trans, b_trans: false };
            self.matmul_impl(OP, a, gc, None, scale, s)?
        };
        Ok((ga, gb))
    }

    /// The bound part of [`Device::matmul`] alone, for
    /// measuring its share of the op's time; equal to the bound `matmul` returns.
    pub fn matmul_bound(&self, a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Result<Vec<f64>> {
        let (la, lb, _) = spec.sizes("matmul_bound")?;
        check_len("matmul_bound", "a", a.len(), la)?;
        check_len("matmul_bound", "b", b.len(), lb)?;
        if let Some(bias) = bias {
            check_len("matmul_bound", "bias", bias.len(), spec.n)?;
        }
        Ok(norm_bounds(a, b, bias, spec))
    }

    /// Column sums of a `rows×cols` row-major matrix (bias gradients): `cols` values.
    pub fn sum_rows(&self, x: &[f32], rows: usize, cols: usize) -> Result<Bounded> {
        const OP: &str = "sum_rows";
        check_len(OP, "x", x.len(), checked_prod(OP, &[rows, cols])?)?;
        let p = self.profile();
        let (values, bounds): (Vec<f64>, Vec<f64>) = (0..cols)
            .into_par_iter()
            .map(|j| {
                let s = sum_by(p, rows, |i| x[i * cols + j] as f64);
                let mut terms = ExactTerms::new();
                x.iter().skip(j).step_by(cols.max(1)).for_each(|&v| terms.value(v));
                // Bound: a sum of `rows` exact terms, any order: 2·γ_{rows−1}·Σ|x|, or 0 when
                // no order can round (see `ExactTerms::is_exact`).
                (s, terms.bound())
            })
            .unzip();
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    pub(crate) fn matmul_impl(
        &self,
        op: &'static str,
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        scale: f64,
        spec: MatmulSpec,
    ) -> Result<Bounded> {
        let (la, lb, lc) = spec.sizes(op)?;
        check_len(op, "a", a.len(), la)?;
        check_len(op, "b", b.len(), lb)?;
        if let Some(bias) = bias {
            check_len(op, "bias", bias.len(), spec.n)?;
        }
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let bias64: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| v as f64).collect());
        let mut values = vec![0.0f64; lc];
        self.matmul_f64(&a64, &b64, bias64.as_deref(), &mut values, spec)?;
        let mut bounds = norm_bounds(a, b, bias, spec);
        if scale != 1.0 {
            values.iter_mut().for_each(|v| *v *= scale);
        }
        let scaled = |e: f64, v: f64| {
            // Bound with scale s: each side computes fl(s·D_h) with |D_h − D| ≤ e/2 (e the
            // unscaled two-sided bound) and one rounding (≤ u|s·D_h|, plus ETA if it
            // underflows): |o − h| ≤ |s|·e + 2u·|o| + 2·ETA (second-order terms in SLACK).
            // With e = 0 both sides multiply the same exact D: one correctly rounded product.
            if scale == 1.0 || e == 0.0 { e } else { (scale.abs() * e + 2.0 * U * v.abs() + 2.0 * ETA) * SLACK }
        };
        if scale != 1.0 {
            for (d, v) in bounds.iter_mut().zip(&values) {
                *d = scaled(*d, *v);
            }
        }
        // The Cauchy–Schwarz bound is cheap but loose (it is positive even when every product
        // is zero). Where it would make an element ambiguous, recompute the tight bound
        // 2·γ·Σ|a·b| (or 0 when every order is exact): O(k) for the few elements concerned.
        let MatmulSpec { m, k, n, a_trans, b_trans, .. } = spec;
        let (ars, acs) = strides(a_trans, m, k);
        let (brs, bcs) = strides(b_trans, k, n);
        for (idx, (d, v)) in bounds.iter_mut().zip(&values).enumerate() {
            if !common::rounding::is_ambiguous(*v, *d) {
                continue;
            }
            let (bi, i, j) = (idx / (m * n), idx / n % m, idx % n);
            let (ab, bb) = (&a[bi * m * k..], &b[bi * k * n..]);
            let mut terms = ExactTerms::new();
            for l in 0..k {
                terms.product(ab[i * ars + l * acs], bb[l * brs + j * bcs]);
            }
            if let Some(bias) = bias {
                terms.value(bias[j]);
            }
            *d = d.min(scaled(terms.bound(), *v));
        }
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }

    /// The unbounded FP64 product in this profile's arithmetic, into `out` (`batch×m×n`).
    pub(crate) fn matmul_f64(
        &self,
        a: &[f64],
        b: &[f64],
        bias: Option<&[f64]>,
        out: &mut [f64],
        spec: MatmulSpec,
    ) -> Result<()> {
        let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
        if out.len() != batch * m * n || a.len() != batch * m * k || b.len() != batch * k * n {
            return Err(shape_err("matmul", "internal size mismatch"));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let p = self.profile();
        match p {
            Profile::Cpu => gemm_cpu(a, b, out, spec),
            Profile::CpuSeq | Profile::CpuSplitK => {
                if k == 0 {
                    out.fill(0.0);
                } else {
                    for bi in 0..batch {
                        let ab = &a[bi * m * k..(bi + 1) * m * k];
                        let bb = &b[bi * k * n..(bi + 1) * k * n];
                        // op(A) as m×k rows and op(B)ᵀ as n×k rows, so each dot is contiguous.
                        let ar = to_rows(ab, a_trans, m, k);
                        let bc = to_rows(bb, !b_trans, n, k);
                        out[bi * m * n..(bi + 1) * m * n].par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                            let ai = &ar[i * k..(i + 1) * k];
                            for (j, o) in row.iter_mut().enumerate() {
                                *o = dot_slices(p, ai, &bc[j * k..(j + 1) * k]);
                            }
                        });
                    }
                }
            }
        }
        if let Some(bias) = bias {
            for row in out.chunks_mut(n) {
                for (o, b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
        Ok(())
    }
}

/// `op(X)` (stored `r×c` when `!trans`, else `c×r`) as an `r×c` row-major copy.
fn to_rows(x: &[f64], trans: bool, r: usize, c: usize) -> Vec<f64> {
    if !trans {
        x.to_vec()
    } else {
        let mut out = vec![0.0; r * c];
        for (j, col) in x.chunks(r).enumerate() {
            for (i, v) in col.iter().enumerate() {
                out[i * c + j] = *v;
            }
        }
        out
    }
}

/// Bound of `C = op(A)·op(B) + bias` per element, Cauchy–Schwarz form.
///
/// Derivation: inputs are FP32, so every product `a·b` is exact in FP64 and the only error is
/// the summation of `k` products (+ the bias: `k+1` terms, γ_k; without bias γ_{k−1}):
/// each side is within `γ·Σ|a_il·b_lj|` of the exact value, and `Σ|a_il·b_lj| ≤ ‖a_i‖₂·‖b_j‖₂`
/// (Cauchy–Schwarz), so `d_ij = 2·γ·(‖a_i‖₂‖b_j‖₂ + |bias_j|)·SLACK`. The norms cost
/// O(mk + kn) and the outer product O(mn).
fn norm_bounds(a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Vec<f64> {
    let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
    let g = if bias.is_some() { gamma(k) } else { gamma(k.saturating_sub(1)) };
    let c = 2.0 * g * SLACK;
    let (ars, acs) = strides(a_trans, m, k);
    let (brs, bcs) = strides(b_trans, k, n);
    let mut out = vec![0.0f64; batch * m * n];
    let mut na = vec![0.0f64; m];
    let mut nb = vec![0.0f64; n];
    for bi in 0..batch {
        let ab = &a[bi * m * k..(bi + 1) * m * k];
        let bb = &b[bi * k * n..(bi + 1) * k * n];
        // Row norms of op(A): accumulate squares in storage order (cache friendly).
        na.fill(0.0);
        nb.fill(0.0);
        if a_trans {
            for l in 0..k {
                for (i, s) in na.iter_mut().enumerate() {
                    let v = ab[i * ars + l * acs] as f64;
                    *s += v * v;
                }
            }
        } else {
            for (i, s) in na.iter_mut().enumerate() {
                *s = ab[i * k..(i + 1) * k].iter().map(|&v| v as f64 * v as f64).sum();
            }
        }
        if b_trans {
            for (j, s) in nb.iter_mut().enumerate() {
                *s = bb[j * k..(j + 1) * k].iter().map(|&v| v as f64 * v as f64).sum();
            }
        } else {
            for l in 0..k {
                for (j, s) in nb.iter_mut().enumerate() {
                    let v = bb[l * brs + j * bcs] as f64;
                    *s += v * v;
                }
            }
        }
        for s in na.iter_mut().chain(nb.iter_mut()) {
            *s = s.sqrt();
        }
        for (i, row) in out[bi * m * n..(bi + 1) * m * n].chunks_mut(n.max(1)).enumerate() {
            let ca = c * na[i];
            match bias {
                Some(bias) => {
                    for ((d, nbj), bj) in row.iter_mut().zip(&nb).zip(bias) {
                        *d = ca * nbj + c * bj.abs() as f64;
                    }
                }
                None => {
                    for (d, nbj) in row.iter_mut().zip(&nb) {
                        *d = ca * nbj;
                    }
                }
            }
        }
    }
    out
}

/// The `cpu` profile's GEMM. Blocking depends on the shape and cache sizes only; threads split
/// output blocks, never the k loop, so the bits do not depend on the thread count.
fn gemm_cpu(a: &[f64], b: &[f64], out: &mut [f64], spec: MatmulSpec) {
    let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (ars, acs) = strides(a_trans, m, k);
    let (brs, bcs) = strides(b_trans, k, n);
    for bi in 0..batch {
        let ab = &a[bi * m * k..(bi + 1) * m * k];
        let bb = &b[bi * k * n..(bi + 1) * k * n];
        let ob = &mut out[bi * m * n..(bi + 1) * m * n];
        // SAFETY: `ab` holds m·k elements addressed as i·ars + l·acs < m·k for i < m, l < k
        // (both layouts); `bb` likewise k·n; `ob` is m×n row-major (row stride n, column
        // stride 1) and does not alias the inputs. With read_dst = false, dst is only written.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                ob.as_mut_ptr(),
                1,
                n as isize,
                false,
                ab.as_ptr(),
                acs as isize,
                ars as isize,
                bb.as_ptr(),
                bcs as isize,
                brs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
}
