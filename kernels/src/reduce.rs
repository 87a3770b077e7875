//! The per-profile arithmetic: reduction orders and transcendental functions.
//!
//! Every op routes its reductions and its `exp`/`tanh`/`ln` through these functions, so
//! a profile's choice of order and formulas applies everywhere (softmax, layer norm,
//! cross-entropy, bias gradients, scatter-adds), not only in matmul. Within a profile
//! the order depends only on the reduction length, never on the thread count.
//!
//! The `cuda` profile computes on the GPU; the few reductions it leaves on the host (conv's
//! bias gradient and col2im) take `cpu-seq`'s sequential order, the order of its kernels.

use crate::Profile;

/// Block length of the split-K profile's sequential FMA runs.
const SPLIT_BLOCK: usize = 16;

/// `Σ_{i<n} f(i)` in the profile's order.
#[inline]
pub(crate) fn sum_by(p: Profile, n: usize, f: impl Fn(usize) -> f64) -> f64 {
    match p {
        Profile::CpuSeq | Profile::Cuda => {
            let mut s = 0.0;
            for i in 0..n {
                s += f(i);
            }
            s
        }
        Profile::Cpu => {
            // 4 interleaved lanes, as a SIMD loop would, combined as (l0+l1)+(l2+l3).
            let mut l = [0.0f64; 4];
            let full = n / 4 * 4;
            let mut i = 0;
            while i < full {
                l[0] += f(i);
                l[1] += f(i + 1);
                l[2] += f(i + 2);
                l[3] += f(i + 3);
                i += 4;
            }
            for (j, i) in (full..n).enumerate() {
                l[j] += f(i);
            }
            (l[0] + l[1]) + (l[2] + l[3])
        }
        Profile::CpuSplitK => pairwise(0, n, &|i| f(i)),
    }
}

fn pairwise(lo: usize, hi: usize, f: &dyn Fn(usize) -> f64) -> f64 {
    if hi - lo <= SPLIT_BLOCK {
        let mut s = 0.0;
        for i in lo..hi {
            s += f(i);
        }
        s
    } else {
        let mid = lo + (hi - lo).div_ceil(2 * SPLIT_BLOCK) * SPLIT_BLOCK;
        pairwise(lo, mid, f) + pairwise(mid, hi, f)
    }
}

/// `Σ_{i<n} a(i)·b(i)` in the profile's order (split-K contracts with FMA).
#[inline]
pub(crate) fn dot_by(p: Profile, n: usize, a: impl Fn(usize) -> f64, b: impl Fn(usize) -> f64) -> f64 {
    match p {
        Profile::CpuSplitK => pairwise_fma(0, n, &|i| (a(i), b(i))),
        _ => sum_by(p, n, |i| a(i) * b(i)),
    }
}

fn pairwise_fma(lo: usize, hi: usize, f: &dyn Fn(usize) -> (f64, f64)) -> f64 {
    if hi - lo <= SPLIT_BLOCK {
        let mut s = 0.0f64;
        for i in lo..hi {
            let (x, y) = f(i);
            s = x.mul_add(y, s);
        }
        s
    } else {
        let mid = lo + (hi - lo).div_ceil(2 * SPLIT_BLOCK) * SPLIT_BLOCK;
        pairwise_fma(lo, mid, f) + pairwise_fma(mid, hi, f)
    }
}

/// Contiguous dot product of two f64 slices in the profile's order (used by the non-GEMM
/// matmul paths, where speed matters).
#[inline]
pub(crate) fn dot_slices(p: Profile, a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    match p {
        Profile::CpuSeq | Profile::Cuda => {
            let mut s = 0.0;
            for (x, y) in a.iter().zip(b) {
                s += x * y;
            }
            s
        }
        Profile::Cpu => dot_by(p, a.len(), |i| a[i], |i| b[i]),
        Profile::CpuSplitK => {
            // Same tree as `pairwise_fma`, written over slices so it vectorises.
            fn rec(a: &[f64], b: &[f64]) -> f64 {
                if a.len() <= SPLIT_BLOCK {
                    let mut s = 0.0f64;
                    for (x, y) in a.iter().zip(b) {
                        s = x.mul_add(*y, s);
                    }
                    s
                } else {
                    let mid = a.len().div_ceil(2 * SPLIT_BLOCK) * SPLIT_BLOCK;
                    rec(&a[..mid], &b[..mid]) + rec(&a[mid..], &b[mid..])
                }
            }
            rec(a, b)
        }
    }
}

/// `eˣ`. Platform `exp` (glibc: < 1 ulp) on `cpu`/`cpu-seq`; `exp(x/2)²` on `cpu-splitk`:
/// `x/2` is exact, `exp(x/2)` has relative error ≤ 2u, squaring adds u, so the result is
/// within (1+2u)²(1+u)−1 ≤ 5.0001u < 8u relative (plus subnormal-range absolute error).
#[inline]
pub(crate) fn exp(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK => {
            let h = (0.5 * x).exp();
            h * h
        }
        _ => x.exp(),
    }
}

/// `tanh x`. Platform `tanh` on `cpu`/`cpu-seq`; on `cpu-splitk`
/// `tanh|x| = −e/(2+e)` with `e = expm1(−2|x|) ∈ (−1, 0]`: `e` has relative error ≤ 2u
/// (glibc expm1 ≤ 1 ulp), `2+e ≥ 1` has relative error ≤ 2u·|e|/(2+e) + u ≤ 3u, and the
/// division adds u: ≤ 6.0001u < 8u relative.
#[inline]
pub(crate) fn tanh(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK => {
            let e = (-2.0 * x.abs()).exp_m1();
            let t = -e / (2.0 + e);
            if x.is_sign_negative() { -t } else { t }
        }
        _ => x.tanh(),
    }
}

/// `ln x`. Platform `ln` on `cpu`/`cpu-seq`; on `cpu-splitk` `ln_1p(x−1)` for x in [0.5, 2]
/// (`x−1` exact by Sterbenz, `ln_1p` ≤ 1 ulp: ≤ 2u relative) and the platform `ln` elsewhere.
#[inline]
pub(crate) fn ln(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK if (0.5..=2.0).contains(&x) => (x - 1.0).ln_1p(),
        _ => x.ln(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bound::U;

    #[test]
    fn reductions_agree_on_exact_sums() {
        // Small integers sum exactly in any order: every profile must give the same value.
        for n in [0, 1, 3, 4, 5, 16, 17, 33, 100] {
            let want = (0..n).map(|i| i as f64).sum::<f64>();
            for p in Profile::CPU {
                assert_eq!(sum_by(p, n, |i| i as f64), want, "{p} n={n}");
                let a: Vec<f64> = (0..n).map(|i| i as f64).collect();
                let b = vec![2.0; n];
                assert_eq!(dot_slices(p, &a, &b), 2.0 * want, "{p} n={n}");
                assert_eq!(dot_by(p, n, |i| a[i], |i| b[i]), 2.0 * want, "{p} n={n}");
            }
        }
    }

    #[test]
    fn transcendentals_within_8u() {
        let mut x = -700.0;
        while x < 700.0 {
            for p in Profile::CPU {
                let e = exp(p, x);
                assert!((e - x.exp()).abs() <= 9.0 * U * x.exp(), "exp {p} {x}");
                let t = tanh(p, x / 100.0);
                let tr = (x / 100.0).tanh();
                assert!((t - tr).abs() <= 9.0 * U * tr.abs(), "tanh {p} {x}");
                let y = (x + 700.5) / 300.0;
                assert!((ln(p, y) - y.ln()).abs() <= 9.0 * U * y.ln().abs(), "ln {p} {y}");
            }
            x += 0.37;
        }
    }
}
