//! FP64 → FP32 rounding with tie-break logging (trainer side) and replay (auditor side).
//!
//! # The rule, as implemented
//!
//! Every real number rounds to the FP32 value whose *cell* contains it. The cell of a finite
//! FP32 value `r` is the closed interval between the midpoints to its neighbours; the cell of
//! `+0` is `[0, 2⁻¹⁵⁰]` and of `−0` is `[−2⁻¹⁵⁰, 0]` (the sign of a zero is a decision too, so `0`
//! is a cell boundary); the cell of `+∞` starts at the FP32 overflow threshold
//! `f32::MAX + 2¹⁰³`. A cell boundary that is a midpoint between two FP32 values is called a
//! *midpoint* below; `0` is the *zero boundary*.
//!
//! A kernel returns a value `v` and a bound `d` such that any honest IEEE-754 FP64 machine's
//! result lies in `[v − d, v + d]`. The trainer ([`round_commit`]):
//!
//! 1. rounds `v` to nearest-even (`r`);
//! 2. if `d = 0`, or `[v − d, v + d]` lies strictly inside the cell of `r`, logs nothing: every
//!    honest machine rounds to `r` by construction;
//! 3. otherwise, if exactly one boundary `M` is within `d` of `v`, `M` is a midpoint, and no
//!    other boundary is within `REPLAY_SLACK · d` of `v`, it logs a **direction** entry
//!    (`index`, up or down: which side of `M` the result lies on; 1 bit);
//! 4. otherwise (a bound wider than a cell, or the zero boundary) it logs an **exact** entry
//!    (`index`, the FP32 bits of `r`). These are rare: they happen at heavy cancellation.
//!
//! The replayer ([`round_replay`]) rounds its own `w` (with its own bound `d_w`) normally unless
//! the element is logged:
//! - a direction entry is followed only if the boundary nearest to `w` is a midpoint `M` with
//!   `|w − M| ≤ REPLAY_SLACK · d_w`; otherwise the entry is **forged**;
//! - an exact entry `r_t` is followed only if the cell of `r_t` meets
//!   `[w − REPLAY_SLACK · d_w, w + REPLAY_SLACK · d_w]`; otherwise it is **forged**.
//!
//! Why an honest trainer is always reproduced (with `|w − v| ≤ d_t`, and `d_t ≤ 2·d_w`, which
//! holds because both bounds are computed from the same inputs and differ by a few ulps):
//! unlogged elements have `w` inside the same cell as `v`; for a direction entry,
//! `|w − M| ≤ |w − v| + |v − M| ≤ 2·d_t ≤ 4·d_w`, and every other boundary is more than
//! `4·d_t − d_t = 3·d_t` from `w` while `M` is within `2·d_t`, so the replayer finds the same
//! `M`; for an exact entry, `v` lies in the cell of `r_t` and within `d_t ≤ 4·d_w` of `w`.
//!
//! The trainer's freedom is thereby limited to values that are genuinely ambiguous: it can
//! only pick among FP32 values whose cells come within `4·d_w` of the auditor's own value.
//!
//! The comparison with `d` is made with a relative slack of 2⁻⁴⁸ in the direction that logs
//! more, so that the rounding of `v − M` itself can never hide an ambiguous element.
//!
//! # The paper's rule, for comparison only
//!
//! [`paper`] implements the fixed-τ rule of Srivastava et al. (τ = 0.25 of the FP32 ulp at the
//! value's binary exponent, one trit per rounded value, five trits per byte). It is not sound
//! (a τ that is too small accuses honest trainers) and it is never the default; it exists so
//! that benchmarks can report both log sizes on the same run.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::tielog::{Direction, SiteLog, TieBreakLog};

mod screen;

/// How far, in multiples of its own bound, the replayer's value may be from the boundary a
/// logged entry refers to. See the module documentation for why 4 is sound.
pub const REPLAY_SLACK: f64 = 4.0;

/// Relative slack applied to comparisons against a bound, in the direction that logs more
/// (trainer) or accepts more (replayer): covers the rounding of `v − M` and of `SLACK · d`.
const COMPARE_SLACK: f64 = 1.0 + 1.0 / (1u64 << 48) as f64;

/// FP32 overflow threshold: the midpoint between `f32::MAX` and the next power of two.
/// Values at or beyond it round to infinity (IEEE 754, round to nearest).
const OVERFLOW_MIDPOINT: f64 = f32::MAX as f64 + 10141204801825835211973625643008.0; // 2^103

/// The boundary between the cells of ±0 and the smallest subnormals.
const SMALLEST_MIDPOINT: f64 = 7.006_492_321_624_085e-46; // 2^-150

/// An upper bound on how far any honest IEEE-754 FP64 implementation's result can be from the
/// value computed here, from the same inputs. Produced by every kernel next to its values.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorBound {
    /// The result is exact (or correctly rounded from exact inputs): every machine agrees.
    Exact,
    /// One bound valid for every element.
    Uniform(f64),
    /// One bound per row of `row_len` consecutive elements.
    PerRow { row_len: usize, bounds: Vec<f64> },
    /// One bound per element.
    PerElement(Vec<f64>),
}

impl ErrorBound {
    /// The bound that applies to element `i`.
    #[inline]
    pub fn at(&self, i: usize) -> f64 {
        match self {
            ErrorBound::Exact => 0.0,
            ErrorBound::Uniform(d) => *d,
            ErrorBound::PerRow { row_len, bounds } => bounds[i / row_len],
            ErrorBound::PerElement(bounds) => bounds[i],
        }
    }

    /// Checks that the bound covers exactly `len` elements and that every bound is finite and
    /// non-negative.
    pub fn validate(&self, site: &str, len: usize) -> Result<(), RoundingError> {
        self.validate_shape(site, len)?;
        if let ErrorBound::PerElement(bounds) = self {
            // A branch-free pass first (it vectorises); the element is found only on failure.
            if !bounds.iter().fold(true, |ok, &d| ok & valid(d)) {
                let (i, &bound) = bounds.iter().enumerate().find(|(_, d)| !valid(**d)).expect("an invalid bound");
                return Err(RoundingError::InvalidBound { site: site.to_string(), index: i as u64, bound });
            }
        }
        Ok(())
    }

    /// [`validate`](Self::validate) but for the values of per-element bounds, which the
    /// trainer's rounding pass checks as it reads them.
    fn validate_shape(&self, site: &str, len: usize) -> Result<(), RoundingError> {
        let check = |index: usize, bound: f64| {
            if valid(bound) {
                Ok(())
            } else {
                Err(RoundingError::InvalidBound { site: site.to_string(), index: index as u64, bound })
            }
        };
        match self {
            ErrorBound::Exact => Ok(()),
            ErrorBound::Uniform(d) => check(0, *d),
            ErrorBound::PerRow { row_len, bounds } => {
                if *row_len == 0 || bounds.len().checked_mul(*row_len) != Some(len) {
                    return Err(RoundingError::BoundShape {
                        site: site.to_string(),
                        values: len,
                        detail: format!("{} rows of {row_len}", bounds.len()),
                    });
                }
                bounds.iter().enumerate().try_for_each(|(r, &d)| check(r * row_len, d))
            }
            ErrorBound::PerElement(bounds) => {
                if bounds.len() != len {
                    return Err(RoundingError::BoundShape {
                        site: site.to_string(),
                        values: len,
                        detail: format!("{} per-element bounds", bounds.len()),
                    });
                }
                Ok(())
            }
        }
    }
}

/// Why a rounding or replay could not be carried out. A forged entry is an error here; the
/// auditor turns it into a `forged-log` verdict.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoundingError {
    #[error("rounding site {site}: element {index} is NaN")]
    NotANumber { site: String, index: u64 },
    #[error("rounding site {site}: element {index} is not finite in FP32 ({value:e} overflows)")]
    NonFinite { site: String, index: u64, value: f64 },
    #[error("rounding site {site}: element {index} has an invalid error bound {bound:e} (must be finite and >= 0)")]
    InvalidBound { site: String, index: u64, bound: f64 },
    #[error("rounding site {site}: bound does not match {values} values ({detail})")]
    BoundShape { site: String, values: usize, detail: String },
    #[error(
        "forged tie-break at site {site}, element {index}: value {value:e} is {distance:e} from the \
         rounding boundary {midpoint:e}, more than {REPLAY_SLACK} x its bound {bound:e}"
    )]
    ForgedEntry { site: String, index: u64, value: f64, midpoint: f64, bound: f64, distance: f64 },
    #[error("tie-break log for site {site} covers {logged} values, but the op produced {actual}")]
    LengthMismatch { site: String, logged: u64, actual: u64 },
    #[error("tie-break log has an entry for site {site}, which this step never rounds")]
    UnusedSite { site: String },
    #[error("rounding site {site} is visited twice in one step")]
    DuplicateSite { site: String },
}

impl RoundingError {
    /// Whether this error means the trainer's log claims something the replayer's own values
    /// refute (as opposed to malformed input or a programming error).
    pub fn is_forgery(&self) -> bool {
        matches!(self, RoundingError::ForgedEntry { .. } | RoundingError::UnusedSite { .. })
    }
}

/// The cell `[lo, hi]` of an FP32 value: the reals that round to it (ties aside).
#[inline]
fn cell(r: f32) -> (f64, f64) {
    if r.is_sign_negative() {
        let (lo, hi) = cell_nonnegative(-r);
        (-hi, -lo)
    } else {
        cell_nonnegative(r)
    }
}

#[inline]
fn cell_nonnegative(r: f32) -> (f64, f64) {
    debug_assert!(r.is_sign_positive());
    cell_of_bits(r.to_bits())
}

/// The cell of the non-negative, non-NaN FP32 value with bits `bits`, without branches (the
/// trainer's screened pass evaluates it for every element in vectorised loops).
#[inline(always)]
fn cell_of_bits(bits: u32) -> (f64, f64) {
    let rf = f32::from_bits(bits) as f64;
    // Neighbour differences and halves are exact in FP64: FP32 values have 24-bit significands.
    // The neighbours as `next_down`/`next_up` give them (+0 below the smallest subnormal); the
    // wrapped value below +0 and the NaN above +∞ are never selected.
    let below = f32::from_bits(bits.wrapping_sub(1)) as f64;
    let above = f32::from_bits(bits.wrapping_add(1)) as f64;
    let (max, inf) = (f32::MAX.to_bits(), f32::INFINITY.to_bits());
    let lo = if bits == 0 {
        0.0
    } else if bits == inf {
        OVERFLOW_MIDPOINT
    } else {
        rf - (rf - below) * 0.5
    };
    let hi = if bits == 0 {
        SMALLEST_MIDPOINT
    } else if bits == inf {
        f64::INFINITY
    } else if bits == max {
        OVERFLOW_MIDPOINT
    } else {
        rf + (above - rf) * 0.5
    };
    (lo, hi)
}

/// The FP32 values on either side of boundary `m`, where `m` is `lo` or `hi` of `cell(r)`.
#[inline]
fn sides_of(r: f32, m_is_hi: bool) -> (f32, f32) {
    if m_is_hi { (r, r.next_up()) } else { (r.next_down(), r) }
}

/// Whether a boundary is the zero boundary between −0 and +0 (not a midpoint).
#[inline]
fn is_zero_boundary(m: f64) -> bool {
    m == 0.0
}

/// What the trainer decides for one element.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Plain,
    Direction(Direction),
    Exact,
}

/// Rounds one element on the trainer side and classifies it. `v` is not NaN; `d` is valid.
#[inline]
fn decide(v: f64, d: f64) -> (f32, Decision) {
    let r = v as f32; // IEEE round to nearest, ties to even; overflow to ±∞.
    if d == 0.0 {
        return (r, Decision::Plain);
    }
    let (lo, hi) = cell(r);
    let d_slack = d * COMPARE_SLACK;
    let near_lo = v - lo <= d_slack;
    let near_hi = hi - v <= d_slack;
    if !near_lo && !near_hi {
        return (r, Decision::Plain);
    }
    if near_lo && near_hi {
        return (r, Decision::Exact);
    }
    let m = if near_hi { hi } else { lo };
    if is_zero_boundary(m) || m.is_infinite() {
        return (r, Decision::Exact);
    }
    // The window the replayer may see: no other boundary may come within REPLAY_SLACK · d.
    let (a, b) = sides_of(r, near_hi);
    let outer_lo = cell(a).0;
    let outer_hi = cell(b).1;
    let reach = REPLAY_SLACK * d_slack;
    if v - reach > outer_lo && v + reach < outer_hi {
        let dir = if near_hi { Direction::Down } else { Direction::Up };
        (r, Decision::Direction(dir))
    } else {
        (r, Decision::Exact)
    }
}

/// Whether an element with value `v` and bound `d` would be logged: some honest machine's
/// value within `d` of `v` could round differently. Kernels use it to refine a cheap bound only
/// where the refinement can matter.
#[inline]
pub fn is_ambiguous(v: f64, d: f64) -> bool {
    !matches!(decide(v, d).1, Decision::Plain)
}

/// Trainer side: rounds `values` to FP32 (nearest-even) and returns the tie-breaks for every
/// element whose value lies within its bound of a cell boundary.
///
/// IEEE rules apply throughout: values beyond the FP32 range round to ±∞ (callers that must
/// not produce non-finite states use [`Rounder`], which rejects them).
pub fn round_commit(site: &str, values: &[f64], bound: &ErrorBound) -> Result<(Vec<f32>, SiteLog), RoundingError> {
    bound.validate_shape(site, values.len())?;
    if *bound == ErrorBound::Exact {
        // Every machine computes these very values: nothing can be logged.
        return Ok((round_plain(site, values, bound)?, SiteLog::new(values.len() as u64)));
    }
    // Elements are independent: chunks are decided in parallel and their entries merged in
    // index order, so the log does not depend on the chunking or the thread count.
    let parts: Vec<Result<RoundedChunk, RoundingError>> = values
        .par_chunks(ROUND_CHUNK)
        .enumerate()
        .map(|(c, chunk)| screen::commit_chunk(site, c * ROUND_CHUNK, chunk, bound))
        .collect();
    let single = parts.len() == 1;
    let mut out = Vec::with_capacity(if single { 0 } else { values.len() });
    let mut log = SiteLog::new(values.len() as u64);
    if let Some(Err(e)) = parts.iter().find(|p| p.is_err()) {
        // An invalid bound anywhere is reported first (as `validate` finds it), then the first NaN.
        bound.validate(site, values.len())?;
        return Err(e.clone());
    }
    for part in parts {
        let (chunk, entries) = part?;
        if single {
            out = chunk; // no copy
        } else {
            out.extend_from_slice(&chunk);
        }
        for (i, decision, bits) in entries {
            match decision {
                Decision::Plain => {}
                Decision::Direction(dir) => log.push_direction(i, dir),
                Decision::Exact => log.push_exact(i, bits),
            }
        }
    }
    Ok((out, log))
}

/// One chunk's FP32 values and its logged `(index, decision, FP32 bits)` entries.
type RoundedChunk = (Vec<f32>, Vec<(u64, Decision, u32)>);

/// Elements per parallel rounding task.
const ROUND_CHUNK: usize = 1 << 15;

/// Plain round-to-nearest of every element, refusing NaN (the first one, by index). The
/// values of per-element bounds are checked in the same pass (the shape of `bound` has been
/// checked): an invalid one is reported as [`ErrorBound::validate`] reports it, before any NaN.
/// One pass in chunks of [`ROUND_CHUNK`] like [`round_commit`]'s, so a small site is one task:
/// splitting it across threads cost more in wake-ups than the rounding itself, most of all on
/// a loaded machine, and made replay slower than commit.
fn round_plain(site: &str, values: &[f64], bound: &ErrorBound) -> Result<Vec<f32>, RoundingError> {
    let per_element = match bound {
        ErrorBound::PerElement(bounds) => Some(bounds.as_slice()),
        _ => None,
    };
    let parts: Vec<Option<Vec<f32>>> = values
        .par_chunks(ROUND_CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            // Branch-free passes (they vectorise); what is wrong is looked for only when
            // something is.
            let bad = match per_element {
                Some(bounds) => chunk
                    .iter()
                    .zip(&bounds[c * ROUND_CHUNK..])
                    .fold(false, |bad, (v, &d)| bad | v.is_nan() | !valid(d)),
                None => chunk.iter().fold(false, |bad, v| bad | v.is_nan()),
            };
            (!bad).then(|| chunk.iter().map(|&v| v as f32).collect())
        })
        .collect();
    if parts.iter().any(Option::is_none) {
        bound.validate(site, values.len())?;
        let i = values.iter().position(|v| v.is_nan()).expect("a NaN");
        return Err(RoundingError::NotANumber { site: site.to_string(), index: i as u64 });
    }
    let mut parts = parts.into_iter().flatten();
    if values.len() <= ROUND_CHUNK {
        return Ok(parts.next().unwrap_or_default());
    }
    let mut out = Vec::with_capacity(values.len());
    parts.for_each(|chunk| out.extend_from_slice(&chunk));
    Ok(out)
}

/// Whether `d` is a valid bound: finite and non-negative ([`ErrorBound::validate`]'s rule).
#[inline(always)]
fn valid(d: f64) -> bool {
    (0.0..f64::INFINITY).contains(&d)
}

/// Replay side: rounds the replayer's own `values` (with its own bounds), following the
/// trainer's tie-breaks in `log` for the elements it names, after checking that each one is
/// genuinely ambiguous from the replayer's side.
pub fn round_replay(site: &str, values: &[f64], bound: &ErrorBound, log: &SiteLog) -> Result<Vec<f32>, RoundingError> {
    bound.validate_shape(site, values.len())?;
    if log.len() != values.len() as u64 {
        bound.validate(site, values.len())?; // the replayer's own bound is checked first
        return Err(RoundingError::LengthMismatch {
            site: site.to_string(),
            logged: log.len(),
            actual: values.len() as u64,
        });
    }
    let mut out = round_plain(site, values, bound)?;
    for (index, dir) in log.directions() {
        let i = index as usize; // < len, checked by SiteLog's invariants
        out[i] = follow_direction(site, index, values[i], bound.at(i), dir)?;
    }
    for (index, bits) in log.exacts() {
        let i = index as usize;
        out[i] = follow_exact(site, index, values[i], bound.at(i), bits)?;
    }
    Ok(out)
}

/// Like [`round_replay`], but a forged entry does not stop the replay: the element is rounded
/// as the replayer's own value says, and the forgery is returned as a finding. The auditor uses
/// this so that it can tell a forged log (its own state still matches the trainer's) from a
/// divergence (the trainer computed something else, so its log fits nothing here).
pub fn round_replay_lenient(
    site: &str,
    values: &[f64],
    bound: &ErrorBound,
    log: &SiteLog,
) -> Result<(Vec<f32>, Vec<RoundingError>), RoundingError> {
    bound.validate_shape(site, values.len())?;
    let mut out = round_plain(site, values, bound)?;
    let mut forged = Vec::new();
    if log.len() != values.len() as u64 {
        forged.push(RoundingError::LengthMismatch {
            site: site.to_string(),
            logged: log.len(),
            actual: values.len() as u64,
        });
        return Ok((out, forged));
    }
    for (index, dir) in log.directions() {
        let i = index as usize;
        match follow_direction(site, index, values[i], bound.at(i), dir) {
            Ok(r) => out[i] = r,
            Err(e) => forged.push(e),
        }
    }
    for (index, bits) in log.exacts() {
        let i = index as usize;
        match follow_exact(site, index, values[i], bound.at(i), bits) {
            Ok(r) => out[i] = r,
            Err(e) => forged.push(e),
        }
    }
    Ok((out, forged))
}

fn follow_direction(site: &str, index: u64, w: f64, d: f64, dir: Direction) -> Result<f32, RoundingError> {
    let r = w as f32;
    let (lo, hi) = cell(r);
    let m_is_hi = hi - w <= w - lo;
    let m = if m_is_hi { hi } else { lo };
    let distance = (w - m).abs();
    let forged =
        || RoundingError::ForgedEntry { site: site.to_string(), index, value: w, midpoint: m, bound: d, distance };
    // A bound of 0 means every honest machine computes this very value: nothing to break.
    if d == 0.0 || is_zero_boundary(m) || m.is_infinite() || distance > REPLAY_SLACK * d * COMPARE_SLACK {
        return Err(forged());
    }
    let (below, above) = sides_of(r, m_is_hi);
    Ok(match dir {
        Direction::Down => below,
        Direction::Up => above,
    })
}

fn follow_exact(site: &str, index: u64, w: f64, d: f64, bits: u32) -> Result<f32, RoundingError> {
    let r = f32::from_bits(bits);
    let reach = REPLAY_SLACK * d * COMPARE_SLACK;
    // The entry is forged, reported against boundary `m` (NaN: no boundary makes sense).
    let forged = |m: f64| RoundingError::ForgedEntry {
        site: site.to_string(),
        index,
        value: w,
        midpoint: m,
        bound: d,
        distance: (w - m).abs(),
    };
    // An entry is only allowed where an honest trainer could have logged one: some rounding
    // boundary within reach of the replayer's value. Elsewhere (in particular where the bound
    // is 0) the entry is forged, even when it carries the value every machine computes.
    if decide(w, REPLAY_SLACK * d).1 == Decision::Plain {
        let (lo, hi) = cell(w as f32);
        return Err(forged(if hi - w <= w - lo { hi } else { lo }));
    }
    if r.is_nan() {
        return Err(forged(f64::NAN));
    }
    let (lo, hi) = cell(r);
    if lo <= w + reach && hi >= w - reach {
        return Ok(r);
    }
    Err(forged(if w < lo { lo } else { hi }))
}

/// Rounds every site of one training step, either recording tie-breaks (trainer) or following
/// them (replayer). The engine calls [`Rounder::round`] at each named site in its fixed order,
/// so the trainer and the auditor run the same code path, and the `k`-th call on either side is
/// the site the log calls `k` (see [`crate::tielog`]).
#[derive(Debug)]
pub enum Rounder<'a> {
    /// Trainer side: builds the step's log (and, optionally, the paper's dense log). Sites
    /// without entries are not stored: the replayer treats an absent site as empty, and most
    /// sites of most steps are empty.
    Commit { log: TieBreakLog, paper: Option<paper::DenseLog>, visits: Visits },
    /// Replay side: follows `log`, and checks at the end that every logged site was visited.
    /// Entries that do not hold up are collected in `forged` (see [`round_replay_lenient`]).
    Replay { log: &'a TieBreakLog, visits: Visits, forged: Vec<RoundingError> },
}

/// The sites a step has rounded so far: in order (a site's ordinal is its position) and by name.
#[derive(Debug, Default)]
pub struct Visits {
    order: Vec<String>,
    by_name: BTreeMap<String, u64>,
}

impl Visits {
    /// Records a visit of `site` (`len` values) and returns its ordinal. A site visited twice,
    /// an invalid name, or more sites than an ordinal can count, is a programming error of the
    /// step, reported as [`RoundingError::DuplicateSite`].
    fn visit(&mut self, site: &str, len: usize) -> Result<u32, RoundingError> {
        let ordinal = u32::try_from(self.order.len()).ok();
        match ordinal {
            Some(ordinal)
                if crate::tielog::is_valid_site_name(site)
                    && self.by_name.insert(site.to_string(), len as u64).is_none() =>
            {
                self.order.push(site.to_string());
                Ok(ordinal)
            }
            _ => Err(RoundingError::DuplicateSite { site: site.to_string() }),
        }
    }
}

impl<'a> Rounder<'a> {
    /// A trainer-side rounder for one step.
    pub fn commit() -> Self {
        Rounder::Commit { log: TieBreakLog::default(), paper: None, visits: Visits::default() }
    }

    /// A trainer-side rounder that also accumulates the paper's dense fixed-τ log.
    pub fn commit_with_paper() -> Self {
        Rounder::Commit {
            log: TieBreakLog::default(),
            paper: Some(paper::DenseLog::default()),
            visits: Visits::default(),
        }
    }

    /// A replay-side rounder following the trainer's log for one step.
    pub fn replay(log: &'a TieBreakLog) -> Self {
        Rounder::Replay { log, visits: Visits::default(), forged: Vec::new() }
    }

    /// Rounds one named site. Non-finite FP32 results are errors naming the site and element.
    pub fn round(&mut self, site: &str, values: &[f64], bound: &ErrorBound) -> Result<Vec<f32>, RoundingError> {
        let out = match self {
            Rounder::Commit { log, paper, visits } => {
                let ordinal = visits.visit(site, values.len())?;
                let (out, site_log) = round_commit(site, values, bound)?;
                if let Some(paper) = paper {
                    paper.push(values);
                }
                if !site_log.is_empty() {
                    log.insert(ordinal, site_log)
                        .map_err(|_| RoundingError::DuplicateSite { site: site.to_string() })?;
                }
                out
            }
            Rounder::Replay { log, visits, forged } => match log.site(visits.visit(site, values.len())?) {
                Some(site_log) => {
                    let (out, found) = round_replay_lenient(site, values, bound, site_log)?;
                    forged.extend(found);
                    out
                }
                None => round_replay(site, values, bound, &SiteLog::new(values.len() as u64))?,
            },
        };
        if !out.iter().fold(true, |finite, x| finite & x.is_finite()) {
            let i = out.iter().position(|x| !x.is_finite()).expect("a non-finite value");
            return Err(RoundingError::NonFinite { site: site.to_string(), index: i as u64, value: values[i] });
        }
        Ok(out)
    }

    /// Ends the step. The trainer gets its log (and the paper's dense log, if requested); the
    /// replayer gets the log it followed and every forged entry it found, including sites the
    /// trainer logged but this step never rounded.
    pub fn finish(self) -> Finished {
        match self {
            Rounder::Commit { log, paper, visits } => {
                Finished { log, paper, forged: Vec::new(), rounded: visits.by_name, order: visits.order }
            }
            Rounder::Replay { log, visits, mut forged } => {
                let n = visits.order.len();
                for ordinal in log.ordinals().filter(|&k| k as usize >= n) {
                    forged.push(RoundingError::UnusedSite { site: format!("#{ordinal} (the step rounds {n} sites)") });
                }
                Finished { log: log.clone(), paper: None, forged, rounded: visits.by_name, order: visits.order }
            }
        }
    }
}

/// The outcome of one step's rounding.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The step's tie-break log (recorded, or the one followed).
    pub log: TieBreakLog,
    /// The paper's dense log, when requested.
    pub paper: Option<paper::DenseLog>,
    /// Replay only: log entries that did not hold up, in the order found.
    pub forged: Vec<RoundingError>,
    /// Every site the step rounded, with its number of values (the log stores only sites with
    /// entries).
    pub rounded: BTreeMap<String, u64>,
    /// Every site the step rounded, in order: the log's site `k` is `order[k]`.
    pub order: Vec<String>,
}

/// The paper's fixed-τ rule and dense 5-trits-per-byte encoding (Srivastava et al., 2024).
///
/// Every rounded value gets a trit: 0 = out of band (ignore), 1 = in band and rounded down,
/// 2 = in band and rounded up, where "in band" means `|v − round(v)| > τ · ulp`, with the FP32
/// ulp at the value's binary exponent (`2^(e−23)`, `e = ⌊log₂|v|⌋`, at least `2^−149`). Five
/// trits are packed per byte in base 3, the first trit least significant. The replayer copies the
/// trainer's direction only when both sides are in band and disagree.
pub mod paper {
    /// The paper's default threshold: a quarter of an ulp.
    pub const TAU: f64 = 0.25;

    /// The FP32 ulp at the binary exponent of `v` (finite, non-zero FP64).
    fn ulp_at_exponent(v: f64) -> f64 {
        let e = ((v.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023;
        let e = e.max(-126);
        // 2^(e-23), e in [-126, 1023]: built from bits to stay exact (no powi).
        f64::from_bits(((e - 23 + 1023).max(1) as u64) << 52)
    }

    /// The trit the paper's trainer logs for one value.
    pub fn trit(v: f64, tau: f64) -> u8 {
        let r = v as f32;
        let rf = r as f64;
        if !r.is_finite() || v == rf {
            return 0;
        }
        if (v - rf).abs() > tau * ulp_at_exponent(v) { if rf < v { 1 } else { 2 } } else { 0 }
    }

    /// Packs trits (each 0, 1 or 2) five per byte.
    pub fn pack(trits: &[u8]) -> Vec<u8> {
        trits.chunks(5).map(|c| c.iter().rev().fold(0u8, |acc, &t| acc * 3 + t)).collect()
    }

    /// Unpacks `n` trits. Returns `None` if `bytes` has the wrong length or a byte above 242.
    pub fn unpack(bytes: &[u8], n: usize) -> Option<Vec<u8>> {
        if bytes.len() != n.div_ceil(5) {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for &b in bytes {
            if b > 242 {
                return None;
            }
            let mut x = b;
            for _ in 0..5 {
                out.push(x % 3);
                x /= 3;
            }
        }
        out.truncate(n);
        Some(out)
    }

    /// The replayer's side of the paper's rule: round normally, but copy the trainer's
    /// direction where both sides are in band and disagree.
    pub fn replay(values: &[f64], trits: &[u8], tau: f64) -> Vec<f32> {
        values
            .iter()
            .zip(trits)
            .map(|(&w, &t)| {
                let mine = trit(w, tau);
                let r = w as f32;
                if t != 0 && mine != 0 && t != mine {
                    if t == 1 {
                        // Trainer rounded down: take the FP32 value just below w.
                        if (r as f64) > w { r.next_down() } else { r }
                    } else if (r as f64) < w {
                        r.next_up()
                    } else {
                        r
                    }
                } else {
                    r
                }
            })
            .collect()
    }

    /// The paper's dense log for one step: a trit for every rounded value, in site order.
    #[derive(Debug, Default, Clone)]
    pub struct DenseLog {
        pending: Vec<u8>,
        packed: Vec<u8>,
        n_values: u64,
    }

    impl DenseLog {
        /// Appends the trits of one site's values.
        pub fn push(&mut self, values: &[f64]) {
            for &v in values {
                self.pending.push(trit(v, TAU));
                if self.pending.len() == 5 {
                    self.packed.extend(pack(&self.pending));
                    self.pending.clear();
                }
            }
            self.n_values += values.len() as u64;
        }

        /// Number of rounded values covered.
        pub fn n_values(&self) -> u64 {
            self.n_values
        }

        /// The packed trits (5 per byte).
        pub fn packed(&self) -> Vec<u8> {
            let mut out = self.packed.clone();
            out.extend(pack(&self.pending));
            out
        }

        /// The stored size as the paper stores it: packed trits, then compressed.
        pub fn compressed_bytes(&self) -> usize {
            zstd::bulk::compress(&self.packed(), 3).map(|c| c.len()).unwrap_or(usize::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(values: &[f64], d: f64) -> (Vec<f32>, SiteLog) {
        round_commit("t", values, &ErrorBound::Uniform(d)).unwrap()
    }

    fn replay(values: &[f64], d: f64, log: &SiteLog) -> Result<Vec<f32>, RoundingError> {
        round_replay("t", values, &ErrorBound::Uniform(d), log)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn cells_tile_the_line() {
        for r in [1.0f32, 1.5, f32::MIN_POSITIVE, 1e-45, f32::MAX, 3.0e38, 0.0, -0.0, -1.0, -1e-45] {
            let (lo, hi) = cell(r);
            assert!(lo <= r as f64 && r as f64 <= hi, "{r}: [{lo}, {hi}]");
            if r.is_finite() && r != f32::MAX && !(r == 0.0 && r.is_sign_negative()) {
                let up = r.next_up();
                assert_eq!(hi, cell(up).0, "{r} and {up} must share a boundary");
            }
            // The boundaries round as IEEE says: hi rounds to even between r and its neighbour.
            if r.is_finite() && r > 0.0 {
                let via_cast = hi as f32;
                assert!(via_cast == r || via_cast == r.next_up());
            }
        }
        assert_eq!(OVERFLOW_MIDPOINT as f32, f32::INFINITY, "the overflow midpoint rounds to infinity (ties-to-even)");
        assert_eq!(OVERFLOW_MIDPOINT.next_down() as f32, f32::MAX);
        assert_eq!(SMALLEST_MIDPOINT as f32, 0.0, "2^-150 ties to even, i.e. to zero");
        assert_eq!(SMALLEST_MIDPOINT.next_up() as f32, f32::from_bits(1));
    }

    #[test]
    fn exact_bound_is_never_logged() {
        let mid = (1.0f64 + (1.0f32.next_up() as f64)) / 2.0;
        let (out, log) = commit(&[mid, 0.0, -0.0, 1e-300], 0.0);
        assert!(log.is_empty());
        assert_eq!(bits(&out), bits(&[1.0, 0.0, -0.0, 0.0]));
        assert!(out[2].is_sign_negative());
    }

    #[test]
    fn an_entry_where_the_bound_rules_out_ambiguity_is_forged_even_with_the_honest_value() {
        let mid = (1.0f64 + (1.0f32.next_up() as f64)) / 2.0;
        // Bound 0: every machine computes exactly these values, so no entry is ever honest.
        for (i, v) in [(0u64, 1.25f64), (1, mid), (2, 0.0)] {
            let mut exact = SiteLog::new(3);
            exact.push_exact(i, (v as f32).to_bits());
            let e = replay(&[1.25, mid, 0.0], 0.0, &exact).unwrap_err();
            assert!(matches!(e, RoundingError::ForgedEntry { index, .. } if index == i), "exact at {i}: {e:?}");
            let mut dir = SiteLog::new(3);
            dir.push_direction(i, Direction::Up);
            let e = replay(&[1.25, mid, 0.0], 0.0, &dir).unwrap_err();
            assert!(matches!(e, RoundingError::ForgedEntry { index, .. } if index == i), "direction at {i}: {e:?}");
        }
        // A positive bound far from any boundary: an exact entry with the honest value is forged.
        let mut exact = SiteLog::new(1);
        exact.push_exact(0, 1.25f32.to_bits());
        assert!(matches!(replay(&[1.25], 1e-12, &exact), Err(RoundingError::ForgedEntry { .. })));
        // What an honest trainer logs still replays, on the trainer's values and nearby ones.
        for d in [1e-9, 1e-7] {
            let values = [mid, 0.0, 1.25, -mid];
            let (out, log) = commit(&values, d);
            assert!(!log.is_empty());
            assert_eq!(bits(&replay(&values, d, &log).unwrap()), bits(&out));
            let nearby: Vec<f64> = values.iter().map(|v| v + d / 2.0).collect();
            assert_eq!(bits(&replay(&nearby, d, &log).unwrap()), bits(&out));
        }
    }

    #[test]
    fn midpoint_with_a_bound_is_logged_as_direction() {
        let one_up = 1.0f32.next_up() as f64;
        let mid = (1.0 + one_up) / 2.0;
        let d = 1e-12;
        let (out, log) = commit(&[mid], d);
        assert_eq!(out[0], 1.0, "ties to even");
        assert_eq!(log.directions().collect::<Vec<_>>(), vec![(0, Direction::Down)]);
        // A replayer slightly above the midpoint still follows the trainer down.
        let got = replay(&[mid + 0.5 * d], d, &log).unwrap();
        assert_eq!(got[0], 1.0);
        // Unlogged, it would have rounded up.
        assert_eq!((mid + 0.5 * d) as f32, 1.0f32.next_up());
    }

    #[test]
    fn forged_direction_far_from_a_midpoint_is_rejected() {
        let mut log = SiteLog::new(1);
        log.push_direction(0, Direction::Up);
        let err = replay(&[1.0 + 1e-9], 1e-15, &log).unwrap_err();
        match err {
            RoundingError::ForgedEntry { index, value, midpoint, bound, .. } => {
                assert_eq!(index, 0);
                assert_eq!(value, 1.0 + 1e-9);
                assert_eq!(bound, 1e-15);
                assert!((midpoint - 1.0).abs() < 1e-6 && midpoint != 1.0, "{midpoint}");
            }
            other => panic!("expected ForgedEntry, got {other:?}"),
        }
    }

    #[test]
    fn forged_exact_far_away_is_rejected() {
        let mut log = SiteLog::new(1);
        log.push_exact(0, 2.0f32.to_bits());
        let err = replay(&[1.0], 1e-10, &log).unwrap_err();
        assert!(err.is_forgery(), "{err}");
        assert!(err.to_string().contains("element 0"), "{err}");
    }

    #[test]
    fn signed_zero_with_a_bound_is_exact_entry() {
        let (out, log) = commit(&[0.0, -0.0], 1e-20);
        assert_eq!(bits(&out), bits(&[0.0, -0.0]));
        assert_eq!(log.exacts().count(), 2);
        // Another machine computed a tiny negative value: it still produces +0 / −0 as logged.
        let got = replay(&[-1e-21, 1e-21], 1e-20, &log).unwrap();
        assert_eq!(bits(&got), bits(&[0.0, -0.0]));
    }

    #[test]
    fn overflow_edge_follows_ieee() {
        let (out, log) = commit(&[OVERFLOW_MIDPOINT, OVERFLOW_MIDPOINT.next_down(), 1e39, -1e39], 0.0);
        assert!(log.is_empty());
        assert_eq!(out, vec![f32::INFINITY, f32::MAX, f32::INFINITY, f32::NEG_INFINITY]);
        // Near the overflow midpoint with a bound: logged, and replay follows the trainer.
        // (FP64 spacing there is 2^75, about 3.8e22.)
        let d = 1e25;
        let (out, log) = commit(&[OVERFLOW_MIDPOINT.next_down()], d);
        assert_eq!(out[0], f32::MAX);
        assert_eq!(log.directions().collect::<Vec<_>>(), vec![(0, Direction::Down)]);
        let got = replay(&[OVERFLOW_MIDPOINT.next_up()], d, &log).unwrap();
        assert_eq!(got[0], f32::MAX);
    }

    #[test]
    fn rounder_rejects_overflow_and_nan() {
        let mut r = Rounder::commit();
        let err = r.round("fwd/x/out", &[1.0, 1e39], &ErrorBound::Exact).unwrap_err();
        assert_eq!(err, RoundingError::NonFinite { site: "fwd/x/out".into(), index: 1, value: 1e39 });
        let err = r.round("fwd/y/out", &[f64::NAN], &ErrorBound::Exact).unwrap_err();
        assert_eq!(err, RoundingError::NotANumber { site: "fwd/y/out".into(), index: 0 });
    }

    /// Replay's plain rounding over several chunks: every value rounded to nearest, and of two
    /// NaNs in different chunks the first by index is the one reported.
    #[test]
    fn replay_rounds_every_chunk_and_reports_the_first_nan() {
        let n = 3 * ROUND_CHUNK + 7;
        let mut values: Vec<f64> = (0..n).map(|i| (i as f64).sqrt() * 1.000_000_1 - 3.3).collect();
        let log = SiteLog::new(n as u64);
        let out = round_replay("fwd/x/out", &values, &ErrorBound::Exact, &log).unwrap();
        assert!(out.iter().zip(&values).all(|(&o, &v)| o.to_bits() == (v as f32).to_bits()));
        values[2 * ROUND_CHUNK + 1] = f64::NAN;
        values[ROUND_CHUNK + 5] = f64::NAN;
        let err = round_replay("fwd/x/out", &values, &ErrorBound::Exact, &log).unwrap_err();
        assert_eq!(err, RoundingError::NotANumber { site: "fwd/x/out".into(), index: (ROUND_CHUNK + 5) as u64 });
        let err = round_replay("fwd/x/out", &values[..7], &ErrorBound::Exact, &SiteLog::new(7)).map(|_| ());
        assert_eq!(err, Ok(()));
    }

    #[test]
    fn subnormals_round_exactly() {
        let tiny = f32::from_bits(1) as f64; // 2^-149
        let (out, log) = commit(&[tiny * 1.5, tiny * 2.5, tiny * 0.5, -tiny * 0.5], 0.0);
        assert!(log.is_empty());
        assert_eq!(bits(&out), vec![2, 2, 0, 0x8000_0000]);
        // With a bound, the midpoint 1.5·2^-149 is logged and followed from either side.
        let d = tiny * 1e-3;
        let (out, log) = commit(&[tiny * 1.5], d);
        assert_eq!(out[0].to_bits(), 2);
        let got = replay(&[tiny * 1.5 - d], d, &log).unwrap();
        assert_eq!(got[0].to_bits(), 2);
    }

    #[test]
    fn powers_of_two_have_asymmetric_cells() {
        // Below 2.0 the spacing is half of the spacing above it.
        let below = 2.0f32.next_down() as f64;
        let mid_below = (below + 2.0) / 2.0;
        let d = 1e-12;
        let (out, log) = commit(&[mid_below + d * 0.5], d);
        assert_eq!(out[0], 2.0);
        let got = replay(&[mid_below - d * 0.5], d, &log).unwrap();
        assert_eq!(got[0], 2.0);
    }

    #[test]
    fn wide_bound_uses_exact_entry_and_limits_freedom() {
        // A bound wider than a cell: the value may round to several FP32 values elsewhere.
        let v = 1.0 + 1e-7;
        let d = 1e-6;
        let (out, log) = commit(&[v], d);
        assert_eq!(log.exacts().collect::<Vec<_>>(), vec![(0, out[0].to_bits())]);
        for w in [v - d, v, v + d] {
            assert_eq!(replay(&[w], d, &log).unwrap()[0], out[0]);
        }
    }

    #[test]
    fn unused_and_duplicate_sites_are_errors() {
        let mut c = Rounder::commit();
        c.round("a", &[1.0], &ErrorBound::Exact).unwrap();
        assert!(matches!(c.round("a", &[1.0], &ErrorBound::Exact), Err(RoundingError::DuplicateSite { .. })));
        let mut c = Rounder::commit();
        let mid = (1.0 + (1.0f32.next_up() as f64)) / 2.0;
        c.round("a", &[mid], &ErrorBound::Uniform(1e-12)).unwrap();
        c.round("b", &[1.0], &ErrorBound::Exact).unwrap();
        let done = c.finish();
        assert_eq!(done.order, ["a", "b"]);
        assert_eq!(done.log.ordinals().collect::<Vec<_>>(), [0]);
        let log = done.log;
        // A step that rounds fewer sites than the log names.
        let r = Rounder::replay(&log);
        assert_eq!(r.finish().forged, vec![RoundingError::UnusedSite { site: "#0 (the step rounds 0 sites)".into() }]);
        // A step whose first site is another one: the entry is held to that site's own bound.
        let mut r = Rounder::replay(&log);
        r.round("b", &[1.0], &ErrorBound::Exact).unwrap();
        let forged = r.finish().forged;
        assert!(
            matches!(&forged[..], [RoundingError::ForgedEntry { site, index: 0, .. }] if site == "b"),
            "{forged:?}"
        );
        // The same sites in the same order follow it.
        let mut r = Rounder::replay(&log);
        assert_eq!(r.round("a", &[mid], &ErrorBound::Uniform(1e-12)).unwrap(), [mid as f32]);
        r.round("b", &[1.0], &ErrorBound::Exact).unwrap();
        assert!(r.finish().forged.is_empty());
    }

    #[test]
    fn log_length_must_match() {
        let log = SiteLog::new(3);
        assert!(matches!(replay(&[1.0, 2.0], 0.0, &log), Err(RoundingError::LengthMismatch { .. })));
    }

    #[test]
    fn invalid_bounds_are_rejected() {
        for b in [f64::NAN, -1.0, f64::INFINITY] {
            assert!(matches!(
                round_commit("s", &[1.0], &ErrorBound::Uniform(b)),
                Err(RoundingError::InvalidBound { .. })
            ));
        }
        assert!(matches!(
            round_commit("s", &[1.0, 2.0], &ErrorBound::PerElement(vec![0.0])),
            Err(RoundingError::BoundShape { .. })
        ));
        assert!(matches!(
            round_commit("s", &[1.0, 2.0, 3.0], &ErrorBound::PerRow { row_len: 2, bounds: vec![0.0] }),
            Err(RoundingError::BoundShape { .. })
        ));
    }

    #[test]
    fn an_invalid_per_element_bound_is_found_on_every_path_before_a_nan() {
        let n = 3 * ROUND_CHUNK + 11;
        let values: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 1e-3).collect();
        let mut with_nan = values.clone();
        with_nan[7] = f64::NAN;
        for (invalid, at) in [(f64::NAN, n - 1), (-1e-300, ROUND_CHUNK + 3), (f64::INFINITY, 0)] {
            let mut bounds = vec![0.0; n];
            bounds[at] = invalid;
            let bound = ErrorBound::PerElement(bounds);
            let found = |r: Result<Vec<f32>, RoundingError>| match r {
                Err(RoundingError::InvalidBound { index, .. }) => index == at as u64,
                _ => false,
            };
            let empty = SiteLog::new(n as u64);
            let wrong_length = SiteLog::new(n as u64 + 1);
            for v in [&values, &with_nan] {
                assert!(found(round_commit("s", v, &bound).map(|r| r.0)));
                assert!(found(round_replay("s", v, &bound, &empty)));
                assert!(
                    found(round_replay("s", v, &bound, &wrong_length)),
                    "the replayer's own bound before the log's length"
                );
                assert!(found(round_replay_lenient("s", v, &bound, &empty).map(|r| r.0)));
                assert!(found(round_replay_lenient("s", v, &bound, &wrong_length).map(|r| r.0)));
            }
        }
        // With valid bounds, the NaN (first by index) and then the log's length.
        let bound = ErrorBound::PerElement(vec![0.0; n]);
        with_nan[ROUND_CHUNK * 2] = f64::NAN;
        let nan = Err(RoundingError::NotANumber { site: "s".into(), index: 7 });
        assert_eq!(round_replay("s", &with_nan, &bound, &SiteLog::new(n as u64)), nan);
        assert_eq!(round_replay_lenient("s", &with_nan, &bound, &SiteLog::new(n as u64)).map(|r| r.0), nan);
        assert!(matches!(
            round_replay("s", &values, &bound, &SiteLog::new(n as u64 - 1)),
            Err(RoundingError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn paper_trits_pack_and_replay() {
        let values: Vec<f64> = (0..1000).map(|i| 1.0 + i as f64 * 1.234567e-9).collect();
        let trits: Vec<u8> = values.iter().map(|&v| paper::trit(v, paper::TAU)).collect();
        let in_band = trits.iter().filter(|&&t| t != 0).count();
        assert!(in_band > 300 && in_band < 700, "about half are in band, got {in_band}");
        let packed = paper::pack(&trits);
        assert_eq!(packed.len(), 200);
        assert_eq!(paper::unpack(&packed, 1000).unwrap(), trits);
        assert!(paper::unpack(&packed, 999).is_some());
        assert!(paper::unpack(&packed[..199], 1000).is_none());
        assert_eq!(paper::replay(&values, &trits, paper::TAU), values.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
}
