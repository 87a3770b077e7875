//! The blocked GEMMs of the two fast CPU profiles, both on the `gemm` crate.
//!
//! The crate's kernels give each output element one accumulator and add the products of a
//! K block to it in order with FMA (where the CPU has it), blocks of `kc` (≥ 512, from the
//! shape and cache sizes) one after another; small outputs take a horizontal dot-product
//! kernel instead. `cpu` calls it once. `cpu-alt` splits K at [`alt_split`], just below the
//! middle and so not at a block boundary of either call, and sums the upper part first, into
//! the bias when there is one, then adds the lower part: every output is another sum of the
//! same terms, which the matmul bound (any order, with or without FMA) already covers.
//! Threads split output blocks, never the k loop, so neither result depends on the thread
//! count. Both end by turning `−0` into `+0` ([`positive_zeros`]), as every other profile's
//! sums, which start from `+0`, give it.

use rayon::prelude::*;

use crate::MatmulSpec;

/// Strides (row stride, column stride) of `op(X)` for X stored `rows×cols` or transposed.
pub(crate) fn strides(trans: bool, rows: usize, cols: usize) -> (usize, usize) {
    if trans { (1, rows) } else { (cols, 1) }
}

/// The `gemm` crate's threading for a product of this size: both cores from 64³ multiply-adds
/// up, one below (where spawning costs more than it saves).
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 64 * 64 * 64 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None }
}

/// One `gemm::gemm` call over rows `l0..l1` of `op(B)` and columns `l0..l1` of `op(A)`:
/// `out = (read_out ? out : 0) + op(A)[:, l0..l1]·op(B)[l0..l1, :]`.
#[allow(clippy::too_many_arguments)] // reason: the operands, their range and the layout
fn gemm_part(
    a: &[f64],
    b: &[f64],
    out: &mut [f64],
    spec: MatmulSpec,
    l0: usize,
    l1: usize,
    read_out: bool,
    par: gemm::Parallelism,
) {
    let MatmulSpec { m, k, n, a_trans, b_trans, .. } = spec;
    assert!(l0 <= l1 && l1 <= k && a.len() == m * k && b.len() == k * n && out.len() == m * n, "gemm_part: bad range");
    if m == 0 || n == 0 {
        return; // nothing to write, and an operand may be empty (no offset into it is valid)
    }
    let (ars, acs) = strides(a_trans, m, k);
    let (brs, bcs) = strides(b_trans, k, n);
    // SAFETY: m, n > 0 and the lengths are asserted above. `a` holds m·k elements addressed as
    // i·ars + l·acs < m·k for i < m, l < k (both layouts), and the call reads columns
    // l0 ≤ l < l1 ≤ k of it through a pointer offset by l0·acs ≤ m·k; `b` likewise (k·n
    // elements, rows l0..l1, offset l0·brs ≤ k·n); `out` is m×n row-major
    // (row stride n, column stride 1) and does not alias the inputs. With read_dst = false,
    // dst is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            l1 - l0,
            out.as_mut_ptr(),
            1,
            n as isize,
            read_out,
            a.as_ptr().add(l0 * acs),
            acs as isize,
            ars as isize,
            b.as_ptr().add(l0 * brs),
            bcs as isize,
            brs as isize,
            // alpha (the factor of the old `out`; gemm ignores it without read_dst), beta.
            if read_out { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The `cpu` profile's GEMM, one call per batch element (`out` is `batch×m×n`).
pub(crate) fn gemm_cpu(a: &[f64], b: &[f64], out: &mut [f64], spec: MatmulSpec) {
    let MatmulSpec { batch, m, k, n, .. } = spec;
    let par = parallelism(m, n, k);
    for bi in 0..batch {
        let (ab, bb) = (&a[bi * m * k..(bi + 1) * m * k], &b[bi * k * n..(bi + 1) * k * n]);
        gemm_part(ab, bb, &mut out[bi * m * n..(bi + 1) * m * n], spec, 0, k, false, par);
    }
    positive_zeros(out);
}

/// Where `cpu-alt` splits K: `⌊k/2⌋ − 1` (1 for k < 4). Each part has fewer than `kc` terms
/// whenever `k` is below twice the crate's smallest block (so it is one chain, not the
/// `cpu` blocks), and the split is never the middle, where with two blocks of `k/2` the
/// two orders would only swap two operands of one addition.
pub(crate) fn alt_split(k: usize) -> usize {
    if k < 4 { 1.min(k) } else { k / 2 - 1 }
}

/// The `cpu-alt` profile's GEMM: per batch element, `out = (bias) + op(A)[:, s..k]·op(B)[s..k, :]`
/// then `+= op(A)[:, ..s]·op(B)[..s, :]`, `s` = [`alt_split`]`(k)`; the bias (or zero) is the
/// first term of every sum. `out` is `batch×m×n`, fully written.
pub(crate) fn gemm_alt(a: &[f64], b: &[f64], bias: Option<&[f64]>, out: &mut [f64], spec: MatmulSpec) {
    let MatmulSpec { batch, m, k, n, .. } = spec;
    let par = parallelism(m, n, k);
    let s = alt_split(k);
    for bi in 0..batch {
        let (ab, bb) = (&a[bi * m * k..(bi + 1) * m * k], &b[bi * k * n..(bi + 1) * k * n]);
        let ob = &mut out[bi * m * n..(bi + 1) * m * n];
        if let Some(bias) = bias {
            for row in ob.chunks_mut(n) {
                row.copy_from_slice(bias);
            }
        }
        // With k = 0 and no bias this writes zeros (read_dst = false, k = 0).
        gemm_part(ab, bb, ob, spec, s, k, bias.is_some(), par);
        if s > 0 {
            gemm_part(ab, bb, ob, spec, 0, s, true, par);
        }
    }
    positive_zeros(out);
}

/// Adds `+0.0` to every value: turns `−0` into `+0` and leaves every other value alone. A sum
/// whose exact value is zero must give `+0`, as a sum that starts from `+0` does (the tie-break
/// rule puts `−0` and `+0` in different cells, and such a sum's bound is 0). The `gemm` crate's
/// kernels do not start from `+0` everywhere: a sum of one product (a batch of one in a weight
/// gradient) comes out as that product, `−0` when a factor is zero and the other negative, and
/// `cpu-alt`'s two partial sums can both be `−0`. Both profiles' GEMMs end with it, so a bias
/// added afterwards (`cpu`) meets `+0`. (The compiler cannot drop `x + 0.0`: it is not `x` for
/// `x = −0`.)
fn positive_zeros(out: &mut [f64]) {
    out.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v += 0.0));
}
