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
        Profile::CpuAlt => {
            // 8 interleaved lanes, combined as ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
            let mut l = [0.0f64; 8];
            let full = n / 8 * 8;
            let mut i = 0;
            while i < full {
                for (j, lane) in l.iter_mut().enumerate() {
                    *lane += f(i + j);
                }
                i += 8;
            }
            for (j, i) in (full..n).enumerate() {
                l[j] += f(i);
            }
            ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
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
        Profile::Cpu | Profile::CpuAlt => dot_by(p, a.len(), |i| a[i], |i| b[i]),
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

/// Largest `|x|` for which `cpu-alt` computes `eˣ` as `1/e⁻ˣ`: both `eˣ` and `e⁻ˣ` are then
/// normal (e⁷⁰⁰ < 2¹⁰¹⁰), so neither the reciprocal nor the result touches the subnormal range.
const ALT_EXP_MAX: f64 = 700.0;

/// Smallest `|x|` for which `cpu-alt` takes `tanh x = ±1` from the platform: for `|x| ≥ 20`,
/// `1 − tanh|x| < 2e⁻⁴⁰ < 2⁻⁵⁴`, so every ≤ 4-ulp implementation returns 1 or its neighbour.
const ALT_TANH_MAX: f64 = 20.0;

/// `eˣ`. Platform `exp` (glibc: < 1 ulp) on `cpu`/`cpu-seq`; `exp(x/2)²` on `cpu-splitk`:
/// `x/2` is exact, `exp(x/2)` has relative error ≤ 2u, squaring adds u, so the result is
/// within (1+2u)²(1+u)−1 ≤ 5.0001u < 8u relative (plus subnormal-range absolute error).
/// On `cpu-alt`, `1/exp(−x)` for `|x| ≤ 700` ([`ALT_EXP_MAX`]): `exp(−x)` is within 2u
/// relative and normal, the division adds u: ≤ (1+u)/(1−2u)−1 ≤ 3.0001u < 8u relative; the
/// platform `exp` beyond (where `1/exp(−x)` would meet overflow or subnormals).
#[inline]
pub(crate) fn exp(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK => {
            let h = (0.5 * x).exp();
            h * h
        }
        Profile::CpuAlt if x.abs() <= ALT_EXP_MAX => 1.0 / (-x).exp(),
        _ => x.exp(),
    }
}

/// `tanh x`. Platform `tanh` on `cpu`/`cpu-seq`; on `cpu-splitk`
/// `tanh|x| = −e/(2+e)` with `e = expm1(−2|x|) ∈ (−1, 0]`: `e` has relative error ≤ 2u
/// (glibc expm1 ≤ 1 ulp), `2+e ≥ 1` has relative error ≤ 2u·|e|/(2+e) + u ≤ 3u, and the
/// division adds u: ≤ 6.0001u < 8u relative.
/// On `cpu-alt`, `tanh|x| = e/(2+e)` with `e = expm1(2|x|) ≥ 0` for `|x| < 20`
/// ([`ALT_TANH_MAX`]; `2|x|` is exact): `e` within 2u relative, `2+e` within
/// `2u·e/(2+e) + u ≤ 3u`, the division u: ≤ 6.0001u < 8u relative. A subnormal `x` gives
/// `e = 2x` and `e/2` rounds by at most half a subnormal ulp (inside the absolute `ETA`). The
/// platform `tanh` (±1) beyond.
#[inline]
pub(crate) fn tanh(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK => {
            let e = (-2.0 * x.abs()).exp_m1();
            let t = -e / (2.0 + e);
            if x.is_sign_negative() { -t } else { t }
        }
        Profile::CpuAlt if x.abs() < ALT_TANH_MAX => {
            let e = (2.0 * x.abs()).exp_m1();
            let t = e / (2.0 + e);
            if x.is_sign_negative() { -t } else { t }
        }
        _ => x.tanh(),
    }
}

/// `ln x`. Platform `ln` on `cpu`/`cpu-seq`; on `cpu-splitk` `ln_1p(x−1)` for x in [0.5, 2]
/// (`x−1` exact by Sterbenz, `ln_1p` ≤ 1 ulp: ≤ 2u relative) and the platform `ln` elsewhere.
/// On `cpu-alt`, `log₂(x)·ln 2`: `log₂` ≤ 1 ulp (2u relative, also near 1, where glibc's
/// `log2` is computed without cancellation), `ln 2` rounded (u), the product (u): ≤ 4.0001u
/// < 8u relative; `ln 1 = 0` exactly, and ±∞, NaN pass through.
#[inline]
pub(crate) fn ln(p: Profile, x: f64) -> f64 {
    match p {
        Profile::CpuSplitK if (0.5..=2.0).contains(&x) => (x - 1.0).ln_1p(),
        Profile::CpuAlt => x.log2() * std::f64::consts::LN_2,
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

    /// `cpu-alt`'s own formulas at and around the points where they hand over to the platform
    /// (`|x| = 700` for exp, 20 for tanh), near 0 (tiny, subnormal and signed-zero arguments),
    /// near `ln 1 = 0` and across the exponent range; and they really are other formulas:
    /// they give other bits than the platform's on a good share of arguments.
    #[test]
    fn cpu_alt_transcendentals_within_8u_at_their_edges() {
        let p = Profile::CpuAlt;
        let close = |got: f64, want: f64| got == want || (got - want).abs() <= 9.0 * U * want.abs() + f64::from_bits(4);
        let mut xs = vec![0.0, -0.0, 1e-300, -1e-300, f64::from_bits(1), -f64::from_bits(3), 1e-10, -3e-5];
        for c in [ALT_EXP_MAX, ALT_TANH_MAX, 709.7, 745.0, 1.0, 0.5] {
            for s in [-1.0, 1.0] {
                let c = s * c;
                xs.extend([c, c.next_up(), c.next_down(), c * (1.0 + 1e-9), c * (1.0 - 1e-9)]);
            }
        }
        let (mut differ, mut total) = (0, 0);
        for i in 0..20_000 {
            xs.push((i as f64 - 10_000.0) * 0.0713);
        }
        for &x in &xs {
            let e = exp(p, x);
            assert!(close(e, x.exp()), "exp {x:e}: {e:e} vs {:e}", x.exp());
            let t = tanh(p, x);
            assert!(close(t, x.tanh()), "tanh {x:e}: {t:e} vs {:e}", x.tanh());
            assert_eq!(t.is_sign_negative(), x.tanh().is_sign_negative(), "tanh {x:e} sign");
            let y = x.abs();
            assert!(close(ln(p, y), y.ln()) || y == 0.0, "ln {y:e}: {:e} vs {:e}", ln(p, y), y.ln());
            total += 3;
            differ += (e.to_bits() != x.exp().to_bits()) as usize
                + (t.to_bits() != x.tanh().to_bits()) as usize
                + (ln(p, y).to_bits() != y.ln().to_bits()) as usize;
        }
        assert_eq!(ln(p, 0.0), f64::NEG_INFINITY);
        assert_eq!(ln(p, 1.0).to_bits(), 0.0f64.to_bits());
        assert!(ln(p, -1.0).is_nan() && exp(p, f64::NAN).is_nan() && tanh(p, f64::NAN).is_nan());
        assert_eq!((exp(p, f64::NEG_INFINITY), exp(p, f64::INFINITY)), (0.0, f64::INFINITY));
        // Near ln 1 = 0 the relative error is what matters.
        for k in 1..=60 {
            for y in [1.0 + 2f64.powi(-k), 1.0 - 2f64.powi(-k - 1), 1.0 + 3.0 * 2f64.powi(-k)] {
                assert!(close(ln(p, y), y.ln()), "ln {y:e}: {:e} vs {:e}", ln(p, y), y.ln());
            }
        }
        println!("cpu-alt: {differ} of {total} transcendental results differ from the platform's in bits");
        assert!(differ * 10 > total, "cpu-alt's formulas agree with the platform too often ({differ} of {total})");
    }
}
