//! The trainer's rounding pass, screened: most elements of most sites are nowhere near a cell
//! boundary, and a branch-free test over a block of them says so without running
//! [`decide`](super::decide) on each. Only a block the test cannot clear is decided element by
//! element, so the log is the one the plain per-element loop would write, to the bit.

use super::{COMPARE_SLACK, Decision, ErrorBound, RoundedChunk, RoundingError, cell_of_bits, decide, valid};

/// Elements per screened block.
const BLOCK: usize = 64;

/// Whether [`decide`] could log element `v` (rounded to `r = v as f32`) under bound `d`: `false`
/// only where `decide(v, d)` is `Plain` and `d` is valid. It computes `decide`'s own cell
/// ([`cell_of_bits`], the same function) and comparisons on `|v|` and `|r|`, which are exact
/// negations of the negative case's, so a value it clears is one `decide` clears. The largest
/// finite value, infinities and NaN (whose "cell" is meaningless) are always left to `decide`.
#[inline(always)]
fn may_log(v: f64, r: f32, d: f64) -> bool {
    let bits = r.to_bits() & 0x7fff_ffff;
    let (lo, hi) = cell_of_bits(bits);
    let va = v.abs();
    let d_slack = d * COMPARE_SLACK;
    let near = (va - lo <= d_slack) | (hi - va <= d_slack);
    let special = bits >= f32::MAX.to_bits(); // f32::MAX, ±∞, NaN
    special | !valid(d) | ((d != 0.0) & near)
}

/// Whether any element of a block may be logged (or is NaN).
#[inline(always)]
fn any_may_log(vs: &[f64], rs: &[f32], ds: &[f64]) -> bool {
    vs.iter().zip(rs).zip(ds).fold(false, |any, ((&v, &r), &d)| any | may_log(v, r, d))
}

/// The bounds of elements `start..start + len` of a site (`len ≤ BLOCK`), borrowed where the
/// bound stores them one per element and written to `scratch` otherwise.
fn block_bounds<'a>(bound: &'a ErrorBound, start: usize, len: usize, scratch: &'a mut [f64; BLOCK]) -> &'a [f64] {
    let scratch = &mut scratch[..len];
    match bound {
        ErrorBound::PerElement(bounds) => return &bounds[start..start + len],
        ErrorBound::Exact => scratch.fill(0.0),
        ErrorBound::Uniform(d) => scratch.fill(*d),
        ErrorBound::PerRow { row_len, bounds } => {
            let (mut row, mut col) = (start / row_len, start % row_len);
            for s in scratch.iter_mut() {
                *s = bounds[row];
                col += 1;
                if col == *row_len {
                    (row, col) = (row + 1, 0);
                }
            }
        }
    }
    scratch
}

/// Rounds one chunk of a site (its first element is the site's element `base`): the FP32 values
/// and the chunk's logged `(index, decision, FP32 bits)` entries in index order, or the chunk's
/// first NaN or invalid bound. The bound's shape has been validated for the whole site; its
/// per-element values are checked here, in the same pass.
pub(super) fn commit_chunk(
    site: &str,
    base: usize,
    chunk: &[f64],
    bound: &ErrorBound,
) -> Result<RoundedChunk, RoundingError> {
    let mut out: Vec<f32> = Vec::with_capacity(chunk.len());
    let mut entries = Vec::new();
    let mut scratch = [0.0; BLOCK];
    for (b, block) in chunk.chunks(BLOCK).enumerate() {
        let start = base + b * BLOCK;
        let ds = block_bounds(bound, start, block.len(), &mut scratch);
        let first = out.len();
        out.extend(block.iter().map(|&v| v as f32));
        if !any_may_log(block, &out[first..], ds) {
            continue;
        }
        for (k, (&v, &d)) in block.iter().zip(ds).enumerate() {
            let i = start + k;
            if !valid(d) {
                return Err(RoundingError::InvalidBound { site: site.to_string(), index: i as u64, bound: d });
            }
            if v.is_nan() {
                return Err(RoundingError::NotANumber { site: site.to_string(), index: i as u64 });
            }
            let (r, decision) = decide(v, d);
            if decision != Decision::Plain {
                entries.push((i as u64, decision, r.to_bits()));
            }
        }
    }
    Ok((out, entries))
}

#[cfg(test)]
mod tests {
    use super::super::round_commit;
    use super::*;
    use crate::tielog::SiteLog;
    use proptest::prelude::*;

    /// Values at, next to and between FP32 cell boundaries, zeros, subnormals and the edges of
    /// the range, with both signs.
    fn edge_values() -> Vec<f64> {
        let mut rs: Vec<f32> =
            vec![0.0, f32::from_bits(1), f32::from_bits(2), f32::MIN_POSITIVE, 1.0, 1.5, 3.0, 1e-30, 7e20];
        rs.extend([f32::MAX, f32::MAX.next_down(), f32::INFINITY, f32::MIN_POSITIVE.next_down()]);
        let mut vs = Vec::new();
        for r in rs {
            let rf = r as f64;
            let (lo, hi) = super::super::cell(r);
            for base in [rf, lo, hi, (rf + hi) / 2.0, (lo + rf) / 2.0] {
                let mut x = base;
                let mut y = base;
                for _ in 0..4 {
                    vs.extend([x, y]);
                    x = x.next_up();
                    y = y.next_down();
                }
            }
        }
        vs.extend([f64::NAN, f64::INFINITY, 1e300, 2f64.powi(-151), 2f64.powi(-149) * 1.5]);
        let negated: Vec<f64> = vs.iter().map(|v| -v).collect();
        vs.extend(negated);
        vs.retain(|v| !v.is_nan());
        vs.push(f64::NAN);
        vs
    }

    fn check(v: f64, d: f64) {
        if v.is_nan() {
            assert!(may_log(v, v as f32, d), "NaN must reach decide");
        } else if !may_log(v, v as f32, d) {
            assert_eq!(decide(v, d).1, Decision::Plain, "v = {v:e} ({:#x}), d = {d:e}", v.to_bits());
        }
    }

    #[test]
    fn the_screen_clears_only_what_decide_leaves_plain_at_the_edges() {
        let vs = edge_values();
        for &v in &vs {
            let spacing = (v as f32).abs().next_up() as f64 - (v as f32).abs() as f64;
            for d in [
                0.0,
                f64::from_bits(1),
                1e-300,
                2f64.powi(-160),
                2f64.powi(-151),
                spacing * 1e-9,
                spacing * 0.25,
                spacing,
                1e30,
            ] {
                check(v, d);
            }
            // The boundary-distance itself (the largest bound that still logs), and one ulp either side.
            let (lo, hi) = super::super::cell(v as f32);
            for dist in [(v - lo).abs(), (hi - v).abs()] {
                if dist.is_finite() {
                    for d in [dist, dist.next_up(), dist.next_down().max(0.0), dist / COMPARE_SLACK] {
                        check(v, d);
                    }
                }
            }
        }
    }

    /// The per-element loop the screen replaces.
    fn unscreened(site: &str, values: &[f64], bound: &ErrorBound) -> Result<(Vec<f32>, SiteLog), RoundingError> {
        bound.validate(site, values.len())?;
        let mut out = Vec::new();
        let mut log = SiteLog::new(values.len() as u64);
        for (i, &v) in values.iter().enumerate() {
            if v.is_nan() {
                return Err(RoundingError::NotANumber { site: site.to_string(), index: i as u64 });
            }
            let (r, decision) = decide(v, bound.at(i));
            match decision {
                Decision::Plain => {}
                Decision::Direction(dir) => log.push_direction(i as u64, dir),
                Decision::Exact => log.push_exact(i as u64, r.to_bits()),
            }
            out.push(r);
        }
        Ok((out, log))
    }

    fn same(values: &[f64], bound: &ErrorBound) {
        let screened = round_commit("s", values, bound);
        let plain = unscreened("s", values, bound);
        // The whole site as one chunk.
        if let (Ok((values_b, entries)), Ok((out, log))) = (commit_chunk("s", 0, values, bound), &plain) {
            assert_eq!(
                values_b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let mut baseline_log = SiteLog::new(values.len() as u64);
            for (i, decision, bits) in entries {
                match decision {
                    Decision::Plain => {}
                    Decision::Direction(dir) => baseline_log.push_direction(i, dir),
                    Decision::Exact => baseline_log.push_exact(i, bits),
                }
            }
            assert_eq!(&baseline_log, log);
        }
        match (screened, plain) {
            (Ok((a, la)), Ok((b, lb))) => {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b));
                assert_eq!(la, lb);
            }
            // Compared as text: an invalid bound may be NaN, which no error equals.
            (a, b) => assert_eq!(format!("{:?}", a.map(|_| ())), format!("{:?}", b.map(|_| ()))),
        }
    }

    #[test]
    fn a_screened_site_rounds_and_logs_as_the_per_element_loop_does() {
        // Edge values spread over several blocks and parallel chunks, under every kind of bound.
        let edges = edge_values();
        let n = 3 * (1 << 15) + 77;
        let mut values: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin() * 3.0).collect();
        for (k, &v) in edges.iter().filter(|v| !v.is_nan()).enumerate() {
            values[(k * 997) % n] = v;
        }
        let spacing = |v: f64| (v as f32).abs().next_up() as f64 - (v as f32).abs() as f64;
        let per_element: Vec<f64> =
            values.iter().map(|&v| if spacing(v).is_finite() { spacing(v) * 0.3 } else { 1.0 }).collect();
        let row_len = 97;
        let rows = n.div_ceil(row_len);
        let mut padded = values.clone();
        padded.resize(rows * row_len, 0.5);
        let per_row: Vec<f64> = (0..rows).map(|r| 2f64.powi(-(r as i32 % 40) - 10)).collect();
        same(&values, &ErrorBound::PerElement(per_element.clone()));
        same(&values, &ErrorBound::Uniform(1e-7));
        same(&values, &ErrorBound::Uniform(0.0));
        same(&values, &ErrorBound::Exact);
        same(&padded, &ErrorBound::PerRow { row_len, bounds: per_row });
        // The first NaN, by index, whichever chunk it falls in.
        let mut with_nan = values.clone();
        with_nan[2 * (1 << 15) + 5] = f64::NAN;
        with_nan[(1 << 15) + 3] = f64::NAN;
        same(&with_nan, &ErrorBound::Uniform(1e-7));
        // An invalid per-element bound (checked in the rounding pass) is reported before any NaN,
        // wherever it is, as `validate` reports it.
        for (invalid, at) in [(-1.0, n - 3), (f64::NAN, 40_001), (f64::INFINITY, 5), (-f64::MIN_POSITIVE, 70_000)] {
            // Bounds too small to flag the blocks around the invalid one for any other reason.
            let mut bounds: Vec<f64> = values.iter().map(|&v| (v.abs() * 1e-15).min(1.0)).collect();
            bounds[at] = invalid;
            same(&values, &ErrorBound::PerElement(bounds.clone()));
            same(&with_nan, &ErrorBound::PerElement(bounds.clone()));
            assert!(matches!(
                round_commit("s", &values, &ErrorBound::PerElement(bounds)),
                Err(RoundingError::InvalidBound { index, .. }) if index == at as u64
            ));
        }
        assert_eq!(
            round_commit("s", &with_nan, &ErrorBound::Exact).unwrap_err(),
            RoundingError::NotANumber { site: "s".into(), index: (1 << 15) + 3 }
        );
    }

    proptest! {
        #[test]
        fn random_sites_round_and_log_as_the_per_element_loop_does(
            values in proptest::collection::vec(-4.0f64..4.0, 0..300),
            rel in -40i32..-20,
            row_len in 1usize..20,
        ) {
            // Values on a coarse grid sit on or next to FP32 boundaries often enough to log.
            let values: Vec<f64> = values.iter().map(|v| (v * 2f64.powi(30)).round() / 2f64.powi(30)).collect();
            let d = 2f64.powi(rel);
            same(&values, &ErrorBound::Uniform(d));
            same(&values, &ErrorBound::PerElement(values.iter().map(|v| v.abs() * d).collect()));
            let mut padded = values.clone();
            padded.resize(values.len().div_ceil(row_len) * row_len, 1.0);
            let rows = padded.len() / row_len;
            same(&padded, &ErrorBound::PerRow { row_len, bounds: (0..rows).map(|r| d * r as f64).collect() });
        }

        #[test]
        fn the_screen_clears_only_what_decide_leaves_plain(
            bits in any::<u32>(),
            offset in -(1i64 << 32)..(1i64 << 32),
            rel in -60i32..0,
            d_bits in any::<u64>(),
        ) {
            // A value near an FP32 value (an arbitrary f32 bit pattern, offset by f64 ulps), with
            // a bound relative to it or an arbitrary non-negative finite one.
            let r = f32::from_bits(bits);
            prop_assume!(!r.is_nan());
            let v = f64::from_bits(((r as f64).to_bits() as i64).wrapping_add(offset) as u64);
            prop_assume!(!v.is_nan());
            let d = v.abs() * 2f64.powi(rel);
            if d.is_finite() {
                check(v, d);
            }
            let d = f64::from_bits(d_bits >> 1);
            if d.is_finite() {
                check(v, d);
            }
        }
    }
}
