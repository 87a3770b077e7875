//! Batched matrix multiplication (optionally transposed operands, bias, scale), its backward
//! pass, and column sums (bias gradients).
//!
//! `cpu` and `cpu-alt` run the `gemm` crate's blocked FP64 GEMM, each in its own order (see
//! [`crate::gemm`]); `cpu-seq` and `cpu-splitk` run one dot product per output element in
//! their own reduction order. All of them parallelise over output rows or blocks only, so
//! results never depend on the thread count.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::bound::{ETA, ExactTerms, SLACK, U, gamma, lsb_exp};
use crate::cuda::{In, size};
use crate::gemm::{gemm_alt, gemm_cpu, strides};
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
        match self.matmul_scaled_backward_wanted(a, b, gc, scale, spec, [true, true])? {
            (Some(ga), Some(gb)) => Ok((ga, gb)),
            _ => unreachable!("both gradients were asked for"),
        }
    }

    /// [`Device::matmul_scaled_backward`] computing only the gradients `want` asks for (`[gA,
    /// gB]`): a model's first layer has no use for the gradient of its input, which costs as
    /// much as the weight gradient. Each gradient it computes is the same, bit for bit.
    pub fn matmul_scaled_backward_wanted(
        &self,
        a: &[f32],
        b: &[f32],
        gc: &[f32],
        scale: f64,
        spec: MatmulSpec,
        want: [bool; 2],
    ) -> Result<(Option<Bounded>, Option<Bounded>)> {
        const OP: &str = "matmul_backward";
        let (la, lb, lc) = spec.sizes(OP)?;
        check_len(OP, "a", a.len(), la)?;
        check_len(OP, "b", b.len(), lb)?;
        check_len(OP, "grad_out", gc.len(), lc)?;
        let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
        let ga = if !want[0] {
            None
        } else if a_trans {
            // gA_stored (k×m) = op(B) · gCᵀ
            let s = MatmulSpec { batch, m: k, k: n, n: m, a_trans: b_trans, b_trans: true };
            Some(self.matmul_impl(OP, b, gc, None, scale, s)?)
        } else {
            // gA (m×k) = gC · op(B)ᵀ
            let s = MatmulSpec { batch, m, k: n, n: k, a_trans: false, b_trans: !b_trans };
            Some(self.matmul_impl(OP, gc, b, None, scale, s)?)
        };
        let gb = if !want[1] {
            None
        } else if b_trans {
            // gB_stored (n×k) = gCᵀ · op(A)
            let s = MatmulSpec { batch, m: n, k: m, n: k, a_trans: true, b_trans: a_trans };
            Some(self.matmul_impl(OP, gc, a, None, scale, s)?)
        } else {
            // gB (k×n) = op(A)ᵀ · gC
            let s = MatmulSpec { batch, m: k, k: m, n, a_trans: !a_trans, b_trans: false };
            Some(self.matmul_impl(OP, a, gc, None, scale, s)?)
        };
        Ok((ga, gb))
    }

    /// The Cauchy–Schwarz bound of [`Device::matmul`] alone (it converts the operands too, as
    /// the op's shared pass does): equal to the bound `matmul` returns except where `matmul`
    /// replaced it by the tight bound because it made an element ambiguous.
    pub fn matmul_bound(&self, a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Result<Vec<f64>> {
        let (la, lb, _) = spec.sizes("matmul_bound")?;
        check_len("matmul_bound", "a", a.len(), la)?;
        check_len("matmul_bound", "b", b.len(), lb)?;
        if let Some(bias) = bias {
            check_len("matmul_bound", "bias", bias.len(), spec.n)?;
        }
        Ok(norm_bounds(a, b, bias, spec))
    }

    /// [`Device::matmul`]'s values without any bound work (plain conversion, the product, the
    /// bias): the baseline the benchmark measures the bound's share of the op against.
    #[doc(hidden)]
    pub fn matmul_unbounded(&self, a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Result<Vec<f64>> {
        const OP: &str = "matmul_unbounded";
        let (la, lb, lc) = spec.sizes(OP)?;
        check_len(OP, "a", a.len(), la)?;
        check_len(OP, "b", b.len(), lb)?;
        if let Some(bias) = bias {
            check_len(OP, "bias", bias.len(), spec.n)?;
        }
        let bias64: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| v as f64).collect());
        let mut values = vec![0.0f64; lc];
        with_scratch(|a64, b64| {
            a64.clear();
            b64.clear();
            a.par_iter().with_min_len(PAR_MIN_ELEMS).map(|&v| v as f64).collect_into_vec(a64);
            b.par_iter().with_min_len(PAR_MIN_ELEMS).map(|&v| v as f64).collect_into_vec(b64);
            self.matmul_f64(a64, b64, bias64.as_deref(), &mut values, spec)
        })?;
        Ok(values)
    }

    /// Column sums of a `rows×cols` row-major matrix (bias gradients): `cols` values.
    pub fn sum_rows(&self, x: &[f32], rows: usize, cols: usize) -> Result<Bounded> {
        const OP: &str = "sum_rows";
        check_len(OP, "x", x.len(), checked_prod(OP, &[rows, cols])?)?;
        // Bound: a sum of `rows` exact terms, any order: 2·γ_{rows−1}·Σ|x|, or 0 when no order
        // can round (see `ExactTerms::is_exact`). From the inputs only.
        let column_bound = |j: usize| {
            let mut terms = ExactTerms::new();
            x.iter().skip(j).step_by(cols.max(1)).for_each(|&v| terms.value(v));
            terms.bound()
        };
        if let Some(g) = self.gpu() {
            let [values] = g.run(OP, "sum_cols", cols, &[In::F32(x)], [cols], &[size(rows), size(cols)])?;
            let bounds = (0..cols).into_par_iter().map(column_bound).collect();
            return Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) });
        }
        let p = self.profile();
        let (values, bounds): (Vec<f64>, Vec<f64>) =
            (0..cols).into_par_iter().map(|j| (sum_by(p, rows, |i| x[i * cols + j] as f64), column_bound(j))).unzip();
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
        let bias64: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| v as f64).collect());
        let mut values = vec![0.0f64; lc];
        // The operand norms of the bound come out of the conversion pass (one read of A and B).
        let (na, nb) = with_scratch(|a64, b64| {
            let norms = convert_operands(a, b, spec, a64, b64);
            self.matmul_f64(a64, b64, bias64.as_deref(), &mut values, spec).map(|()| norms)
        })?;
        let bounds = finish_bounds(a, b, bias, scale, (&na, &nb), &mut values, spec);
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
            Profile::CpuAlt => {
                // The bias is the first term of each sum here, not the last.
                gemm_alt(a, b, bias, out, spec);
                return Ok(());
            }
            Profile::Cuda => self.gemm_gpu(a, b, out, spec)?,
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

/// Defines `fn $name(args) -> R { body }` so that the body runs compiled with AVX-512 or AVX2
/// enabled where the CPU has it (chosen at run time), and as baseline code elsewhere. The bound
/// passes below are integer operations, conversions and single multiplications over long rows,
/// which baseline x86-64 (SSE2, no packed 64-bit integer compares) runs two lanes or one element
/// at a time, AVX2 four and AVX-512 eight. Rust never contracts (fuses into FMA) or reassociates
/// floating-point operations, whatever the enabled features, so every result is the same bits
/// in every build (`simd_builds_agree_bit_for_bit`). Helpers the body calls must be
/// `#[inline(always)]` to be compiled with it.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match simd_level() {
                    // SAFETY: `simd_level` detected these features at run time.
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

/// The widest build of the [`simd_dispatch!`] functions this CPU runs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SimdLevel {
    Baseline,
    Avx2,
    Avx512,
}

/// The CPU's [`SimdLevel`] (in tests, capped by [`SIMD_CAP`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn simd_level() -> SimdLevel {
    let level = if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        SimdLevel::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Baseline
    };
    #[cfg(test)]
    let level = level.min(match SIMD_CAP.load(std::sync::atomic::Ordering::Relaxed) {
        0 => SimdLevel::Baseline,
        1 => SimdLevel::Avx2,
        _ => SimdLevel::Avx512,
    });
    level
}

/// Tests: caps the build every [`simd_dispatch!`] function takes (0 baseline, 1 AVX2, 2 or
/// more none), to check that they all give the same bits. (Process-wide: any test running
/// meanwhile computes the same bits.)
#[cfg(all(test, target_arch = "x86_64"))]
static SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Fewest elements per rayon task in the element-wise passes below: small ops run as one task,
/// where spawning would cost more than the work. Every pass computes each output element (or
/// norm) by the same fixed sequence of operations whatever the split, so the bits never depend
/// on the thread count.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Largest conversion buffer (elements) kept per thread between calls (64 MiB).
const SCRATCH_KEEP_MAX: usize = 1 << 23;

std::thread_local! {
    /// Per-thread FP64 copies of the operands, reused across calls: converting into fresh
    /// memory every call spent more time in page faults than in the conversion itself. A
    /// nested call (rayon may run another task on this thread while gemm waits) finds the cell
    /// empty and allocates its own.
    static SCRATCH: std::cell::Cell<(Vec<f64>, Vec<f64>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two reusable FP64 buffers (see [`SCRATCH`]).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f64>, &mut Vec<f64>) -> R) -> R {
    let (mut x, mut y) = SCRATCH.with(|s| s.take());
    let r = f(&mut x, &mut y);
    for v in [&mut x, &mut y] {
        if v.capacity() > SCRATCH_KEEP_MAX {
            *v = Vec::new();
        }
    }
    SCRATCH.with(|s| s.set((x, y)));
    r
}

simd_dispatch! {
    /// `Σ x²` in FP64 over 8 interleaved lanes (so the loop vectorises), lanes added in order;
    /// writes `x` converted to FP64 into `out` on the way.
    fn convert_row(x: &[f32], out: &mut [MaybeUninit<f64>]) -> f64 {
        let mut acc = [0.0f64; 8];
        let (xc, mut oc) = (x.chunks_exact(8), out.chunks_exact_mut(8));
        let xr = xc.remainder();
        for (xs, os) in xc.zip(&mut oc) {
            for ((s, &v), o) in acc.iter_mut().zip(xs).zip(os) {
                let v = v as f64;
                o.write(v);
                *s += v * v;
            }
        }
        for ((s, &v), o) in acc.iter_mut().zip(xr).zip(oc.into_remainder()) {
            let v = v as f64;
            o.write(v);
            *s += v * v;
        }
        acc.iter().sum()
    }
}

simd_dispatch! {
    /// Converts rows of `cols` FP32 values (`x`) to FP64 into `out`, adding each column's
    /// squares to `sums` (`cols` values) in row order.
    ///
    /// Strips of [`NORM_STRIP`] columns (the columns after the last full strip one at a time),
    /// each strip's sums in registers over all the rows:
    /// summing a whole row into `sums` in memory made every row's additions wait on the stores
    /// of the row before. Each column's additions are the same in either order of the loops.
    fn convert_cols(x: &[f32], out: &mut [MaybeUninit<f64>], sums: &mut [f64], cols: usize) {
        let full = cols - cols % NORM_STRIP;
        for c0 in (0..full).step_by(NORM_STRIP) {
            convert_strip::<NORM_STRIP>(x, out, sums, cols, c0);
        }
        for c0 in full..cols {
            convert_strip::<1>(x, out, sums, cols, c0);
        }
    }
}

/// [`convert_cols`] for the `W` columns from `c0`: their sums in registers over all the rows.
#[inline(always)]
fn convert_strip<const W: usize>(x: &[f32], out: &mut [MaybeUninit<f64>], sums: &mut [f64], cols: usize, c0: usize) {
    let strip: &mut [f64; W] = (&mut sums[c0..c0 + W]).try_into().expect("a strip of W columns");
    let mut acc = *strip;
    for (or, xr) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
        for ((s, &v), d) in acc.iter_mut().zip(&xr[c0..c0 + W]).zip(&mut or[c0..c0 + W]) {
            let v = v as f64;
            d.write(v);
            *s += v * v;
        }
    }
    *strip = acc;
}

/// Columns per strip of [`convert_cols`]: four AVX-512 registers of sums.
const NORM_STRIP: usize = 32;

/// Converts `batch` FP32 matrices stored `rows×cols` row-major (`x`) to FP64 into `out`, and
/// returns the Euclidean norms of each matrix's rows (`batch·rows` values) when `of_rows`, else
/// of its columns (`batch·cols` values). One parallel pass over `x`.
///
/// Column norms are summed over fixed blocks of rows (a block per task) and the block sums
/// added in block order, so like everything here the bits depend on the shape only. The
/// norms' own rounding (relative `γ_rows` or `γ_cols`, any order) is absorbed by SLACK.
fn convert_with_norms(
    x: &[f32],
    batch: usize,
    rows: usize,
    cols: usize,
    of_rows: bool,
    out: &mut Vec<f64>,
) -> Vec<f64> {
    let mut norms = vec![0.0f64; batch * if of_rows { rows } else { cols }];
    out.clear();
    out.reserve(x.len());
    if x.is_empty() {
        return norms;
    }
    let dst = &mut out.spare_capacity_mut()[..x.len()];
    if of_rows {
        let min_rows = (PAR_MIN_ELEMS / cols).max(1);
        dst.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .zip(norms.par_iter_mut())
            .with_min_len(min_rows)
            .for_each(|((o, xr), s)| *s = convert_row(xr, o).sqrt());
    } else {
        let block_rows = (PAR_MIN_ELEMS / cols).max(1);
        let blocks = rows.div_ceil(block_rows);
        let mut partial = vec![0.0f64; batch * blocks * cols];
        dst.par_chunks_mut(rows * cols)
            .zip(x.par_chunks(rows * cols))
            .zip(partial.par_chunks_mut(blocks * cols))
            .for_each(|((o, xb), pb)| {
                o.par_chunks_mut(block_rows * cols)
                    .zip(xb.par_chunks(block_rows * cols))
                    .zip(pb.par_chunks_mut(cols))
                    .for_each(|((o, xs), p)| convert_cols(xs, o, p, cols));
            });
        for (nb, pb) in norms.chunks_exact_mut(cols).zip(partial.chunks_exact(blocks * cols)) {
            for p in pb.chunks_exact(cols) {
                for (s, v) in nb.iter_mut().zip(p) {
                    *s += v;
                }
            }
            nb.iter_mut().for_each(|s| *s = s.sqrt());
        }
    }
    // SAFETY: both branches wrote every element of `dst`, the first `x.len()` elements of
    // `out`'s capacity: row chunks of `cols` cover `x` exactly (`x.len()` = batch·rows·cols
    // with cols > 0), and so do the batch chunks of `rows·cols` and their row blocks.
    unsafe { out.set_len(x.len()) };
    norms
}

/// Converts both operands of `spec` (into `a64`, `b64`) and returns `(‖row i of op(A[b])‖₂,
/// ‖column j of op(B[b])‖₂)`: `batch·m` and `batch·n` values.
fn convert_operands(
    a: &[f32],
    b: &[f32],
    spec: MatmulSpec,
    a64: &mut Vec<f64>,
    b64: &mut Vec<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
    // op(A)'s rows are the stored rows, or the stored columns (k×m) when transposed.
    let na = if a_trans {
        convert_with_norms(a, batch, k, m, false, a64)
    } else {
        convert_with_norms(a, batch, m, k, true, a64)
    };
    let nb = if b_trans {
        convert_with_norms(b, batch, n, k, true, b64)
    } else {
        convert_with_norms(b, batch, k, n, false, b64)
    };
    (na, nb)
}

/// The factor `2·γ·SLACK` of the Cauchy–Schwarz bound (see [`cs_bounds_row`]).
fn cs_factor(k: usize, with_bias: bool) -> f64 {
    let g = if with_bias { gamma(k) } else { gamma(k.saturating_sub(1)) };
    2.0 * g * SLACK
}

/// Bound of one row of `C = op(A)·op(B) + bias`, Cauchy–Schwarz form, into `out`.
///
/// Derivation: inputs are FP32, so every product `a·b` is exact in FP64 and the only error is
/// the summation of `k` products (+ the bias: `k+1` terms, γ_k; without bias γ_{k−1}):
/// each side is within `γ·Σ|a_il·b_lj|` of the exact value, and `Σ|a_il·b_lj| ≤ ‖a_i‖₂·‖b_j‖₂`
/// (Cauchy–Schwarz), so `d_ij = 2·γ·(‖a_i‖₂‖b_j‖₂ + |bias_j|)·SLACK` (`c = 2·γ·SLACK`). The
/// norms cost O(mk + kn) and the outer product O(mn); the norms' own rounding (relative
/// `γ_k`, any order) is absorbed by SLACK like the rest of the bound's arithmetic.
///
/// `out` (as long as `nb`) may be uninitialised: every element is written, and the returned
/// slice is `out` initialised.
#[inline(always)]
fn cs_bounds_row<'o>(
    c: f64,
    na_i: f64,
    nb: &[f64],
    bias: Option<&[f32]>,
    out: &'o mut [MaybeUninit<f64>],
) -> &'o mut [f64] {
    assert!(out.len() == nb.len() && bias.is_none_or(|b| b.len() == nb.len()), "one bound per column");
    let ca = c * na_i;
    match bias {
        Some(bias) => {
            for ((d, nbj), bj) in out.iter_mut().zip(nb).zip(bias) {
                d.write(ca * nbj + c * bj.abs() as f64);
            }
        }
        None => {
            for (d, nbj) in out.iter_mut().zip(nb) {
                d.write(ca * nbj);
            }
        }
    }
    // SAFETY: the loops wrote every element of `out` (as long as `nb` and `bias`, asserted
    // above), and `MaybeUninit<f64>` has the layout of `f64`.
    unsafe { &mut *(out as *mut [MaybeUninit<f64>] as *mut [f64]) }
}

/// The Cauchy–Schwarz bound of every element (`batch×m×n`), without the tight refinement.
fn norm_bounds(a: &[f32], b: &[f32], bias: Option<&[f32]>, spec: MatmulSpec) -> Vec<f64> {
    let MatmulSpec { batch, m, k, n, .. } = spec;
    if batch * m * n == 0 {
        return Vec::new();
    }
    let (na, nb) = with_scratch(|a64, b64| convert_operands(a, b, spec, a64, b64));
    let c = cs_factor(k, bias.is_some());
    let len = batch * m * n;
    let mut out: Vec<f64> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(n).with_min_len((PAR_MIN_ELEMS / n).max(1)).enumerate().for_each(
        |(row, dr)| {
            let bi = row / m;
            cs_bounds_row(c, na[row], &nb[bi * n..(bi + 1) * n], bias, dr);
        },
    );
    // SAFETY: the rows of `n` cover the first `len` slots, and `cs_bounds_row` wrote each row.
    unsafe { out.set_len(len) };
    out
}

/// Bound after multiplying by `scale`, from the unscaled two-sided bound `e` and the scaled
/// value `v`.
///
/// Derivation: each side computes fl(s·D_h) with |D_h − D| ≤ e/2 and one rounding (≤ u|s·D_h|,
/// plus ETA if it underflows): |o − h| ≤ |s|·e + 2u·|o| + 2·ETA (second-order terms in SLACK).
/// With e = 0 both sides multiply the same exact D: one correctly rounded product.
#[inline(always)]
fn scaled_bound(scale: f64, e: f64, v: f64) -> f64 {
    if scale == 1.0 || e == 0.0 { e } else { (scale.abs() * e + 2.0 * U * v.abs() + 2.0 * ETA) * SLACK }
}

/// A cheap sufficient condition for `!common::rounding::is_ambiguous(v, d)`, integer and
/// FP64 operations only, so a row of checks vectorises.
///
/// `is_ambiguous` is true only when one of its computed distances `fl(v − lo)`, `fl(hi − v)`
/// to the boundaries of the FP32 cell of `r = fl32(v)` is at most `d_s = fl(d·COMPARE_SLACK)`
/// (`COMPARE_SLACK = 1 + 2⁻⁴⁸`, so `d_s ≤ d·(1 + 2⁻⁴⁷)`, or a subnormal absolute error more,
/// which the `dist ≥ 1` case below dwarfs). Let `2^e ≤ |v| < 2^(e+1)` with `−126 ≤ e ≤ 127`,
/// `q = 2^(e−52)` the FP64 spacing there, and `t` the low 29 bits of `v`'s significand (`v`'s
/// offset from the FP32 value below it, in units of `q`). Within the binade the FP32 spacing
/// is `2^29·q`, so the cell boundaries (midpoints, exact in FP64) sit at `t = 2^28`; the
/// nearest one outside the binade is the midpoint just below `2^e`, at least `2^27·q` below it
/// (the spacing at most halves), i.e. `t + 2^27` units away; the overflow boundary
/// `f32::MAX + 2^103` is the `t = 2^28` point of binade 127. So the true distance to every
/// boundary is at least `dist·q`, `dist = min(|t − 2^28|, t + 2^27)`; `dist·q` is an FP64
/// number, so by monotone rounding both computed distances are too. The test is
/// `dist > fl(fl(d·2^(52−e))·(1 + 2⁻⁴⁰))`: the power-of-two scaling is exact, the second
/// product is at least `(d/q)·(1 + 2⁻⁴¹)`, so it implies `dist·q > d·(1 + 2⁻⁴¹) ≥ d_s`. If
/// `d·2^(52−e)` underflows, `d` is far below `q` and the test is decided by `dist ≥ 1` either
/// way; if it overflows, the test fails (safe). Values outside the FP32 normal binades (zero,
/// subnormal, ≥ 2^128, NaN) fail it and are left to `is_ambiguous`.
#[inline(always)]
fn surely_plain(v: f64, d: f64) -> bool {
    /// `1 + 2⁻⁴⁰`.
    const MARGIN: f64 = 1.0 + 1.0 / (1u64 << 40) as f64;
    let bits = v.to_bits();
    let ex = ((bits >> 52) & 0x7ff) as i32; // biased: e + 1023
    // 29 bits: every step below fits in i32 and converts to FP64 exactly.
    let t = (bits & ((1 << 29) - 1)) as i32;
    let dist = (t - (1 << 28)).abs().min(t + (1 << 27));
    // 2^(52−e) has the biased exponent 52 − e + 1023 = 2098 − ex (masked: only used in range).
    let scale = f64::from_bits((((2098 - ex) & 0x7ff) as u64) << 52);
    (1023 - 126..=1023 + 127).contains(&ex) & (dist as f64 > d * scale * MARGIN)
}

simd_dispatch! {
    /// One output row's part of [`finish_bounds`]: writes the row's Cauchy–Schwarz bounds into
    /// `dr` (scaling `vr` and the bounds by `scale`) and pushes the flat indices (`base + j`) of
    /// the elements the bound makes ambiguous onto `amb`.
    fn finish_row(
        c: f64,
        na_i: f64,
        nb: &[f64],
        bias: Option<&[f32]>,
        scale: f64,
        vr: &mut [f64],
        dr: &mut [MaybeUninit<f64>],
        base: usize,
        amb: &mut Vec<usize>,
    ) {
        let dr = cs_bounds_row(c, na_i, nb, bias, dr);
        if scale != 1.0 {
            for (v, d) in vr.iter_mut().zip(dr.iter_mut()) {
                *v *= scale;
                *d = scaled_bound(scale, *d, *v);
            }
        }
        // One pass: a mask of the elements `surely_plain` cannot clear (branch-free, so it
        // vectorises), then `is_ambiguous` on those alone.
        let blocks = vr.chunks(CHECK_BLOCK).zip(dr.chunks(CHECK_BLOCK));
        for (b0, (vb, db)) in (base..).step_by(CHECK_BLOCK).zip(blocks) {
            let mut unclear = vb.iter().zip(db).enumerate().fold(0u64, |mask, (j, (&v, &d))| {
                mask | (u64::from(!surely_plain(v, d)) << j)
            });
            while unclear != 0 {
                let j = unclear.trailing_zeros() as usize;
                unclear &= unclear - 1;
                if common::rounding::is_ambiguous(vb[j], db[j]) {
                    amb.push(b0 + j);
                }
            }
        }
    }
}

/// Elements per mask of [`finish_row`]'s ambiguity check (the bits of a `u64`).
const CHECK_BLOCK: usize = 64;

/// Ambiguous elements per rayon task of the tight refinement.
const REFINE_CHUNK: usize = 64;

/// Ambiguous elements one sweep of [`abs_dot_sums`] refines together.
const REFINE_GROUP: usize = 8;

/// `Σ_l |a[ao + l·acs] · b[bo + l·brs]|` for each of `G` elements (`offsets` = `(ao, bo)`),
/// terms in the order `l = 0..k`, a product with a zero factor adding +0.
///
/// One sweep over `l` for the `G` elements: `G` independent sums, kept in registers, hide the
/// additions' latency (one sweep over a whole chunk kept its sums in memory). Each sum's
/// operations are those of one element alone, so the grouping never changes a bit.
#[inline(always)]
fn abs_dot_sums<const G: usize>(
    a: &[f32],
    b: &[f32],
    offsets: [(usize, usize); G],
    k: usize,
    (acs, brs): (usize, usize),
) -> [f64; G] {
    let mut sums = [0.0f64; G];
    if k == 0 {
        return sums;
    }
    // Each element's lines, cut to the `k` terms the sweep reads (one bounds check here).
    let lines = offsets.map(|(ao, bo)| (&a[ao..=ao + (k - 1) * acs], &b[bo..=bo + (k - 1) * brs]));
    for l in 0..k {
        for g in 0..G {
            let (x, y) = (lines[g].0[l * acs], lines[g].1[l * brs]);
            let p = (x as f64 * y as f64).abs();
            sums[g] += if x != 0.0 && y != 0.0 { p } else { 0.0 };
        }
    }
    sums
}

/// Which products of each output element can be non-zero: bit `l` of op(A) row `i`'s mask is
/// set when `op(A)[i][l] ≠ 0`, and likewise for op(B) column `j`, per batch entry. An element
/// whose two masks share no bit is a sum of products that all have a zero factor.
struct Support {
    spec: MatmulSpec,
    words: usize,
    rows: Vec<u64>,
    cols: Vec<u64>,
}

impl Support {
    fn new(a: &[f32], b: &[f32], spec: MatmulSpec) -> Support {
        let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
        let words = k.div_ceil(64).max(1);
        let (ars, acs) = strides(a_trans, m, k);
        let (brs, bcs) = strides(b_trans, k, n);
        let rows = line_masks(a, batch, m, k, (ars, acs), words);
        let cols = line_masks(b, batch, n, k, (bcs, brs), words);
        Support { spec, words, rows, cols }
    }

    /// Whether every product of output element `idx` (flat, `batch×m×n`) has a zero factor.
    fn disjoint(&self, idx: usize) -> bool {
        let MatmulSpec { m, n, .. } = self.spec;
        let (bi, i, j) = (idx / (m * n), idx / n % m, idx % n);
        let row = &self.rows[(bi * m + i) * self.words..][..self.words];
        let col = &self.cols[(bi * n + j) * self.words..][..self.words];
        row.iter().zip(col).all(|(r, c)| r & c == 0)
    }
}

/// Lines per task of [`line_masks`].
const MASK_LINES: usize = 64;

/// The non-zero bitmasks (`words` words each) of the `lines` lines of each of `batch` matrices
/// of `k` elements per line: element `l` of line `r` of matrix `bi` is
/// `x[bi·lines·k + r·line_stride + l·elem_stride]`. Memory is read in storage order whichever
/// way the operand is transposed, and each bit is set without a branch.
fn line_masks(
    x: &[f32],
    batch: usize,
    lines: usize,
    k: usize,
    (line_stride, elem_stride): (usize, usize),
    words: usize,
) -> Vec<u64> {
    let mut out = vec![0u64; batch * lines * words];
    if out.is_empty() {
        return out;
    }
    // Tasks: one block of MASK_LINES lines of one matrix (the last block of a matrix may be short).
    let blocks = out.par_chunks_mut(lines * words).enumerate().flat_map(|(bi, matrix)| {
        matrix.par_chunks_mut(MASK_LINES * words).enumerate().map(move |(blk, masks)| (bi, blk * MASK_LINES, masks))
    });
    blocks.for_each(|(bi, r0, masks)| {
        let base = bi * lines * k;
        let count = masks.len() / words;
        if elem_stride == 1 {
            for (r, w) in masks.chunks_mut(words).enumerate() {
                let line = &x[base + (r0 + r) * line_stride..][..k];
                for (word, part) in w.iter_mut().zip(line.chunks(64)) {
                    *word = part.iter().enumerate().fold(0, |acc, (l, &v)| acc | ((v != 0.0) as u64) << l);
                }
            }
        } else {
            // Lines are contiguous across each element index: read x one element index at a time.
            for l in 0..k {
                let across = &x[base + l * elem_stride + r0 * line_stride..];
                let (word, bit) = (l / 64, l % 64);
                for r in 0..count {
                    masks[r * words + word] |= ((across[r * line_stride] != 0.0) as u64) << bit;
                }
            }
        }
    });
    out
}

/// The bound of every element of `values` (`batch×m×n`, the unscaled product), scaling
/// `values` by `scale` on the way; `na`, `nb` are the operand norms from [`convert_operands`].
///
/// One pass over the output, rows in parallel: the Cauchy–Schwarz bound ([`cs_bounds_row`]),
/// the scale ([`scaled_bound`]), and the ambiguity check ([`surely_plain`] first, then
/// `is_ambiguous`). Where that cheap but loose bound (positive even when every product is
/// zero) makes an element ambiguous, the tight bound `2·γ·Σ|a·b|` (or 0 when every order is
/// exact) replaces it if smaller: O(k) for each of the few elements concerned, computed in
/// chunks of [`REFINE_CHUNK`] elements, each element's terms in the order `l = 0..k`, bias last.
#[allow(clippy::too_many_arguments)]
fn finish_bounds(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    scale: f64,
    (na, nb): (&[f64], &[f64]),
    values: &mut [f64],
    spec: MatmulSpec,
) -> Vec<f64> {
    let MatmulSpec { m, k, n, a_trans, b_trans, .. } = spec;
    if values.is_empty() {
        return Vec::new();
    }
    let c = cs_factor(k, bias.is_some());
    // The bounds are written once, by `finish_row`: not zeroed first (2 MB at 512×512).
    let len = values.len();
    let mut bounds: Vec<f64> = Vec::with_capacity(len);
    let ambiguous: Vec<usize> = values
        .par_chunks_mut(n)
        .zip(bounds.spare_capacity_mut()[..len].par_chunks_mut(n))
        .with_min_len((PAR_MIN_ELEMS / n).max(1))
        .enumerate()
        .flat_map_iter(|(row, (vr, dr))| {
            let bi = row / m;
            let mut amb = Vec::new();
            finish_row(c, na[row], &nb[bi * n..(bi + 1) * n], bias, scale, vr, dr, row * n, &mut amb);
            amb
        })
        .collect();
    // SAFETY: the rows of `n` cover the first `len` slots, and `finish_row` wrote each row
    // (through `cs_bounds_row`).
    unsafe { bounds.set_len(len) };
    if ambiguous.is_empty() {
        return bounds;
    }
    let (ars, acs) = strides(a_trans, m, k);
    let (brs, bcs) = strides(b_trans, k, n);
    let values = &*values;
    let terms = k + bias.is_some() as usize;
    // Elements all of whose products have a zero factor (a zero value the loose bound cannot
    // tell from cancellation: many in the first layer's weight gradient, as the input's pixels
    // and the ReLU's gradient are both sparse) are found from the operands' non-zero patterns
    // when there are more of them than the patterns cost to build. Their tight bound is that of
    // the bias alone: what the sweep below computes, with every product adding +0.
    let zeros = ambiguous.iter().filter(|&&idx| values[idx] == 0.0).count();
    let (ambiguous, sparse): (Vec<usize>, Vec<usize>) = if zeros > spec.batch * (m + n) {
        let support = Support::new(a, b, spec);
        ambiguous.into_iter().partition(|&idx| !support.disjoint(idx))
    } else {
        (ambiguous, Vec::new())
    };
    for idx in sparse {
        let j = idx % n;
        let (sum, lsb) = bias.map_or((0.0, None), |bias| ((bias[j] as f64).abs(), lsb_exp(bias[j])));
        let t = ExactTerms::bound_given_sum(terms, sum, lsb.into_iter());
        bounds[idx] = bounds[idx].min(scaled_bound(scale, t, values[idx]));
    }
    let tight: Vec<f64> = ambiguous
        .par_chunks(REFINE_CHUNK)
        .flat_map_iter(|chunk| {
            // (offset of op(A) row i in `a`, offset of op(B) column j in `b`, j)
            let at: Vec<(usize, usize, usize)> = chunk
                .iter()
                .map(|&idx| {
                    let (bi, i, j) = (idx / (m * n), idx / n % m, idx % n);
                    (bi * m * k + i * ars, bi * k * n + j * bcs, j)
                })
                .collect();
            // Σ|a·b| of each element, products with a zero factor adding +0 (what
            // `ExactTerms::product` skips), so the sums equal `ExactTerms`' bit for bit.
            let mut groups = at.chunks_exact(REFINE_GROUP);
            let mut sums: Vec<f64> = Vec::with_capacity(at.len());
            for g in &mut groups {
                let offsets = std::array::from_fn(|e| (g[e].0, g[e].1));
                sums.extend(abs_dot_sums::<REFINE_GROUP>(a, b, offsets, k, (acs, brs)));
            }
            for &(ao, bo, _) in groups.remainder() {
                sums.extend(abs_dot_sums::<1>(a, b, [(ao, bo)], k, (acs, brs)));
            }
            let bounds: Vec<f64> = sums
                .into_iter()
                .zip(&at)
                .map(|(mut sum, &(ao, bo, j))| {
                    let lsbs = (0..k).filter_map(move |l| Some(lsb_exp(a[ao + l * acs])? + lsb_exp(b[bo + l * brs])?));
                    let bias_lsb = bias.and_then(|bias| {
                        sum += (bias[j] as f64).abs();
                        lsb_exp(bias[j])
                    });
                    ExactTerms::bound_given_sum(terms, sum, lsbs.chain(bias_lsb))
                })
                .collect();
            bounds.into_iter().zip(chunk).map(|(t, &idx)| scaled_bound(scale, t, values[idx]))
        })
        .collect();
    for (&idx, t) in ambiguous.iter().zip(tight) {
        bounds[idx] = bounds[idx].min(t);
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::SplitMix64;
    use common::rounding::is_ambiguous;

    /// Values at, next to and between FP32 cell boundaries, powers of two, the normal/subnormal
    /// edge and the overflow boundary, with bounds from far below to far above their distance.
    #[test]
    fn surely_plain_implies_not_ambiguous() {
        let mut rng = SplitMix64(11);
        let mut centres: Vec<f64> = vec![0.0, f64::MIN_POSITIVE, 1.0, f32::MAX as f64, f32::MIN_POSITIVE as f64];
        centres.push(f32::MAX as f64 + 2f64.powi(103)); // overflow boundary
        centres.push(f32::MIN_POSITIVE as f64 - 2f64.powi(-150));
        for e in (-150..=128).step_by(7) {
            let p = 2f64.powi(e);
            let r = p as f32;
            centres.extend([p, p - 2f64.powi(e - 26), p + 2f64.powi(e - 25), p - 2f64.powi(e - 25)]);
            if r.is_finite() && r != 0.0 {
                let (up, down) = (r.next_up() as f64, r.next_down() as f64);
                centres.extend([(r as f64 + up) / 2.0, (r as f64 + down) / 2.0]);
            }
        }
        for x in rng.uniform(2000, 1.0) {
            let e = (rng.next_u64() % 260) as i32 - 130;
            let r = x * 2f32.powi(e.clamp(-126, 100));
            if r.is_finite() {
                let up = r.next_up() as f64;
                centres.extend([r as f64, (r as f64 + up) / 2.0, r as f64 * 1.000_000_1]);
            }
        }
        let mut checked = 0;
        let mut plain = 0;
        for &c in &centres {
            for sign in [1.0, -1.0] {
                for step in [-3i64, -1, 0, 1, 2, 1 << 10, -(1 << 20), 1 << 27] {
                    let v = sign * f64::from_bits(c.to_bits().wrapping_add_signed(step));
                    if !v.is_finite() {
                        continue;
                    }
                    let c = sign * c;
                    let dist = (v - c).abs().max(f64::from_bits(1));
                    for f in [0.0, 1e-300, 0.24, 0.49, 0.5, 0.51, 0.9, 0.999_999, 1.0 - 1e-12, 1.0, 2.0, 1e3] {
                        let d = dist * f;
                        checked += 1;
                        if surely_plain(v, d) {
                            plain += 1;
                            assert!(!is_ambiguous(v, d), "surely_plain({v:e}, {d:e}) but it is ambiguous");
                        }
                    }
                }
            }
        }
        assert!(plain > checked / 10, "the pre-filter passes too little ({plain} of {checked})");
        // Tightness: a value `s` FP64 spacings below a rounding boundary (inside the binade,
        // nearer to it than to any other) is decided for any bound below `0.999 ·` that distance.
        for x in rng.uniform(2000, 1.0) {
            let e = (rng.next_u64() % 250) as i32 - 125;
            let r = (x * 2f32.powi(e)).abs();
            if !r.is_normal() || !r.next_up().is_normal() || r.to_bits() & 0x7f_ffff == 0x7f_ffff {
                continue;
            }
            let boundary = (r as f64 + r.next_up() as f64) / 2.0;
            for s in [1u64, 2, 3, 1 << 10, 1 << 20, (1 << 27) - 1] {
                let v = f64::from_bits(boundary.to_bits() - s);
                let delta = boundary - v;
                assert!(!is_ambiguous(v, 0.999 * delta));
                assert!(surely_plain(v, 0.999 * delta), "{v:e} is {delta:e} from {boundary:e}");
            }
        }
        // Typical products: bounds far below the FP32 spacing are decided by the pre-filter.
        let typical = rng.uniform(10_000, 100.0);
        let decided = typical.iter().filter(|&&x| surely_plain(x as f64 * 1.000_01, x.abs() as f64 * 1e-12)).count();
        assert!(decided > 9_900, "{decided}");
    }

    /// `matmul`'s bound is the Cauchy–Schwarz bound except where that makes an element
    /// ambiguous, and there the smaller of it and the tight bound from `ExactTerms` fed every
    /// term in order: checked element by element against a direct computation, on shapes where
    /// both kinds of element occur, with transposes, bias and scale, and with an element whose
    /// sum is exact (tight bound 0) sitting on a rounding boundary. The sparse cases (most
    /// operand entries zero, like a ReLU's gradient times an image's pixels) have many more
    /// zero sums of zero products than rows and columns, so they take `Support`'s path.
    #[test]
    fn refined_bounds_equal_a_direct_computation() {
        let mut rng = SplitMix64(5);
        let dev = Device::new(Profile::Cpu).unwrap();
        let (mut refined, mut by_support) = (0, 0);
        for (spec, with_bias, scale, sparse) in [
            (MatmulSpec::new(96, 300, 80), false, 1.0, false),
            (MatmulSpec::batched(2, 40, 257, 33).trans_a(), true, 1.0, false),
            (MatmulSpec::new(50, 129, 70).trans_b(), true, 0.125, false),
            (MatmulSpec::batched(3, 17, 64, 45).trans_a().trans_b(), false, -0.3, false),
            (MatmulSpec::new(128, 64, 200).trans_a(), false, 1.0, true),
            (MatmulSpec::batched(2, 30, 130, 90).trans_b(), true, 1.0, true),
            (MatmulSpec::new(60, 70, 50).trans_a().trans_b(), true, -0.5, true),
        ] {
            let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
            let mut a = rng.uniform(batch * m * k, 1.0);
            let mut b = rng.uniform(batch * k * n, 1.0);
            if sparse {
                // Exponents spread wide, so that sums of the few non-zero products are not exact.
                for x in a.iter_mut().chain(b.iter_mut()) {
                    *x = if rng.next_u64() % 10 < 9 { 0.0 } else { *x * 2f32.powi((rng.next_u64() % 41) as i32 - 20) };
                }
            }
            let mut bias = with_bias.then(|| rng.uniform(n, 1.0));
            if sparse && let Some(bias) = &mut bias {
                // Zero where the products are: a bias of 0 leaves the sum at 0.
                bias.iter_mut().step_by(3).for_each(|x| *x = 0.5);
                bias.iter_mut().filter(|x| **x != 0.5).for_each(|x| *x = 0.0);
            }
            // Element (0, 0, 0) is 2^24 + 1 exactly (a rounding boundary) when there is no bias.
            let (ars, acs) = strides(a_trans, m, k);
            let (brs, bcs) = strides(b_trans, k, n);
            for l in 0..k {
                a[l * acs] = if l < 2 { [4096.0, 1.0][l] } else { 0.0 };
                b[l * brs] = if l < 2 { [4096.0, 1.0][l] } else { 0.0 };
            }
            let out = dev.matmul_impl("test", &a, &b, bias.as_deref(), scale, spec).unwrap();
            if bias.is_none() && scale == 1.0 {
                assert_eq!(out.values[0], 16_777_217.0);
                assert_eq!(out.bound.at(0), 0.0, "an exact sum on a boundary keeps the tight bound 0");
            }
            let cs = norm_bounds(&a, &b, bias.as_deref(), spec);
            for (idx, (&v, &cs)) in out.values.iter().zip(&cs).enumerate() {
                let cs = scaled_bound(scale, cs, v);
                let (bi, i, j) = (idx / (m * n), idx / n % m, idx % n);
                let expected = if is_ambiguous(v, cs) {
                    let mut t = ExactTerms::new();
                    for l in 0..k {
                        t.product(a[bi * m * k + i * ars + l * acs], b[bi * k * n + l * brs + j * bcs]);
                    }
                    if let Some(bias) = &bias {
                        t.value(bias[j]);
                    }
                    refined += 1;
                    by_support += usize::from(sparse && v == 0.0);
                    cs.min(scaled_bound(scale, t.bound(), v))
                } else {
                    cs
                };
                assert_eq!(out.bound.at(idx).to_bits(), expected.to_bits(), "{spec:?} element {idx}");
            }
            if sparse {
                let zeros = out.values.iter().zip(&cs).filter(|&(&v, &d)| v == 0.0 && d > 0.0).count();
                assert!(zeros > batch * (m + n), "{spec:?}: {zeros} zero sums do not take the support path");
            }
        }
        assert!(refined >= 4, "only {refined} elements were refined");
        assert!(by_support > 1000, "only {by_support} zero sums were refined in the sparse cases");
    }

    /// Asking for one gradient gives it bit for bit as asking for both does, and nothing else.
    #[test]
    fn a_backward_pass_computes_only_the_gradients_asked_for() {
        let mut rng = SplitMix64(23);
        let dev = Device::new(Profile::Cpu).unwrap();
        let spec = MatmulSpec::batched(2, 12, 40, 9).trans_b();
        let a = rng.uniform(2 * 12 * 40, 1.0);
        let b = rng.uniform(2 * 40 * 9, 1.0);
        let gc = rng.uniform(2 * 12 * 9, 1.0);
        let (ga, gb) = dev.matmul_scaled_backward(&a, &b, &gc, 0.5, spec).unwrap();
        let bits = |x: &Bounded| (x.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), format!("{:?}", x.bound));
        for want in [[true, false], [false, true], [false, false]] {
            let (a_only, b_only) = dev.matmul_scaled_backward_wanted(&a, &b, &gc, 0.5, spec, want).unwrap();
            assert_eq!(a_only.as_ref().map(bits), want[0].then(|| bits(&ga)), "{want:?}");
            assert_eq!(b_only.as_ref().map(bits), want[1].then(|| bits(&gb)), "{want:?}");
        }
        // Shapes are checked whatever is asked for.
        assert!(dev.matmul_scaled_backward_wanted(&a, &b, &gc[1..], 0.5, spec, [false, false]).is_err());
    }

    /// The AVX2 and baseline builds of the bound passes and the operand conversion give the
    /// same bits: values and bounds of products with transposes, bias, scale and ambiguous
    /// elements (`matmul` and `matmul_bound`, which converts with norms).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_builds_agree_bit_for_bit() {
        use std::sync::atomic::Ordering;
        let widest = simd_level();
        if widest == SimdLevel::Baseline {
            eprintln!("skipped: this CPU has no AVX2, so only the baseline build runs");
            return;
        }
        let dev = Device::new(Profile::Cpu).unwrap();
        let mut rng = SplitMix64(17);
        for (spec, with_bias, scale) in [
            (MatmulSpec::new(96, 300, 80), true, 1.0),
            (MatmulSpec::batched(2, 40, 257, 33).trans_a(), false, 0.125),
            (MatmulSpec::new(50, 129, 70).trans_b(), true, -0.3),
        ] {
            let MatmulSpec { batch, m, k, n, .. } = spec;
            let a = rng.uniform(batch * m * k, 1.0);
            let b = rng.uniform(batch * k * n, 1.0);
            let bias = with_bias.then(|| rng.uniform(n, 1.0));
            let run = || {
                let out = dev.matmul_impl("test", &a, &b, bias.as_deref(), scale, spec).unwrap();
                let cs = dev.matmul_bound(&a, &b, bias.as_deref(), spec).unwrap();
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let ErrorBound::PerElement(d) = &out.bound else { panic!("{:?}", out.bound) };
                (bits(&out.values), bits(d), bits(&cs))
            };
            let wide = run();
            // Every narrower build this CPU can run, down to the baseline.
            for (cap, level) in [(1, SimdLevel::Avx2), (0, SimdLevel::Baseline)] {
                if level >= widest {
                    continue;
                }
                SIMD_CAP.store(cap, Ordering::Relaxed);
                let narrow = run();
                SIMD_CAP.store(2, Ordering::Relaxed);
                assert!(wide == narrow, "{spec:?}: the {widest:?} and {level:?} builds differ");
            }
        }
    }
}
