//! The blocked GEMMs of the two fast CPU profiles, both on the `gemm` crate.
//!
//! The crate's kernels give each output element one accumulator and add the products of a
//! K block to it in order with FMA (where the CPU has it), balanced blocks (`⌈k/kc⌉` of them,
//! `kc` ≥ 512 before balancing, from the shape, the kernel and the cache sizes) one after
//! another; small outputs take a horizontal dot-product kernel instead. This crate's default
//! `fp64-avx512` feature turns on the crate's AVX-512 FP64 kernels (`gemm-f64/x86-v4`), which
//! it picks at run time where the CPU has AVX-512F, and AVX2+FMA ones elsewhere (everywhere
//! without the feature): the FP32 kernels candle uses keep the crate's default build
//! (AVX2+FMA). `cpu` calls it once. `cpu-alt` splits K at [`alt_split`], a third of the
//! way in and so not at a block boundary of either call, and sums the upper part first, into
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

/// Where `cpu-alt` splits K: `⌊k/3⌋ − 1`, at least 1 (and at most `k`). The crate cuts K into
/// `⌈k/kc⌉` balanced blocks (`kc` at least 512 before balancing, from the shape, the kernel and
/// the cache sizes; its AVX2 kernels take all of K ≤ 784 at once, its AVX-512 ones cut 784
/// into two blocks of 392) and adds each block's chain to the output in order. A split at
/// the middle would give `cpu-alt` the same two chains as `cpu`, summed the other way round
/// (the same value: 51 % of the MNIST layer's outputs agreed with a split one term off the
/// middle); a third of the way in, no chain of either call starts where a chain of `cpu`'s
/// does, and with several blocks the block sums are associated differently.
pub(crate) fn alt_split(k: usize) -> usize {
    (k / 3).saturating_sub(1).max(1).min(k)
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
