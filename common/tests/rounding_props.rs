//! Property tests for sound tie-break rounding: whatever honest perturbation within the bound
//! the replayer sees, following the trainer's log reproduces the trainer's FP32 bits exactly.

use common::rounding::{ErrorBound, round_commit, round_replay};
use proptest::prelude::*;

/// A finite FP32 value from arbitrary bits (NaN and infinities mapped to finite values).
fn finite_f32() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(|b| {
        let x = f32::from_bits(b);
        if x.is_finite() { x } else { f32::from_bits(b & 0xbf7f_ffff) }
    })
}

/// The cell boundary just above a (finite, non-negative) FP32 value, as an FP64 number.
fn boundary_above(r: f32) -> f64 {
    if r == f32::MAX {
        return f32::MAX as f64 + 2f64.powi(103);
    }
    (r as f64 + r.next_up() as f64) / 2.0
}

/// A value near a cell boundary: `offset` is in units of `d`.
fn near_boundary() -> impl Strategy<Value = (f64, f64)> {
    (finite_f32(), 0i32..70, -3.0f64..3.0).prop_map(|(r, scale_exp, offset)| {
        let r = r.abs();
        let m = boundary_above(r);
        let spacing = (r.next_up() as f64 - r as f64).max(2f64.powi(-149));
        let d = spacing * 2f64.powi(-scale_exp);
        let v = m + offset * d;
        (v, d)
    })
}

fn check(v: f64, d: f64, t: f64, factor: f64, negate: bool) -> Result<(), TestCaseError> {
    let (v, w0) = if negate { (-v, -(v + t * d)) } else { (v, v + t * d) };
    prop_assume!(v.is_finite() && w0.is_finite() && d.is_finite());
    prop_assume!((w0 - v).abs() <= d);
    let (out, log) = round_commit("s", &[v], &ErrorBound::Uniform(d)).unwrap();
    let d_w = d * factor;
    let got = round_replay("s", &[w0], &ErrorBound::Uniform(d_w), &log).unwrap();
    prop_assert_eq!(got[0].to_bits(), out[0].to_bits(), "v={:e} w={:e} d={:e} d_w={:e} log={:?}", v, w0, d, d_w, log);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn replay_within_bound_reproduces_bits_near_boundaries(
        (v, d) in near_boundary(), t in -1.0f64..=1.0, factor in 0.5f64..=2.0, negate: bool
    ) {
        check(v, d, t, factor, negate)?;
    }

    #[test]
    fn replay_within_bound_reproduces_bits_anywhere(
        v in -1e38f64..1e38, rel in 0.0f64..1e-6, t in -1.0f64..=1.0, factor in 0.5f64..=2.0
    ) {
        check(v, v.abs() * rel, t, factor, false)?;
    }

    #[test]
    fn replay_reproduces_bits_at_the_extremes(
        which in 0usize..5, offset in -3.0f64..3.0, scale_exp in 0i32..60, t in -1.0f64..=1.0, negate: bool
    ) {
        let tiny = 2f64.powi(-149);
        let (m, spacing) = match which {
            0 => (f32::MAX as f64 + 2f64.powi(103), 2f64.powi(104)), // overflow edge
            1 => (tiny / 2.0, tiny),                                  // ±0 / smallest subnormal
            2 => (0.0, tiny),                                         // the zero boundary
            3 => (1.0 - 2f64.powi(-25), 2f64.powi(-24)),              // just below a power of two
            _ => (f32::MIN_POSITIVE as f64, tiny),                    // normal/subnormal border
        };
        let d = spacing * 2f64.powi(-scale_exp);
        check(m + offset * d, d, t, 1.0, negate)?;
    }

    #[test]
    fn unlogged_elements_round_to_nearest_even(v in -1e30f64..1e30, rel in 0.0f64..1e-9) {
        let d = v.abs() * rel;
        let (out, log) = round_commit("s", &[v], &ErrorBound::Uniform(d)).unwrap();
        prop_assert_eq!(out[0].to_bits(), (v as f32).to_bits());
        if log.is_empty() {
            // Unlogged means the whole interval rounds the same way.
            prop_assert_eq!(((v - d) as f32).to_bits(), out[0].to_bits());
            prop_assert_eq!(((v + d) as f32).to_bits(), out[0].to_bits());
        }
    }
}

#[test]
fn logged_fraction_is_about_two_d_over_ulp() {
    // Values spread over [1, 2): FP32 ulp 2^-23. With d = 2^-33 the expected fraction logged is
    // 2d/ulp = 2^-9 ≈ 0.00195.
    let n = 200_000;
    let values: Vec<f64> = (0..n).map(|i| 1.0 + (i as f64 * 0.618_033_988_749_895) % 1.0).collect();
    let d = 2f64.powi(-33);
    let (_, log) = round_commit("s", &values, &ErrorBound::Uniform(d)).unwrap();
    let frac = log.n_entries() as f64 / n as f64;
    assert!((frac - 2f64.powi(-9)).abs() < 0.25 * 2f64.powi(-9), "logged fraction {frac}");
}

#[test]
fn parallel_rounding_gives_the_same_log_for_any_thread_count() {
    // Many chunks' worth of values, a good share of them near midpoints.
    let n = 300_000;
    let values: Vec<f64> = (0..n).map(|i| 1.0 + (i as f64 * 0.618_033_988_749_895) % 1.0).collect();
    let bound = ErrorBound::Uniform(2f64.powi(-30));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| round_commit("s", &values, &bound).unwrap())
    };
    let (out1, log1) = run(1);
    assert!(log1.n_entries() > 1000, "{}", log1.n_entries());
    for threads in [2, 3, 4] {
        let (out, log) = run(threads);
        assert_eq!(log, log1);
        assert_eq!(
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            out1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
