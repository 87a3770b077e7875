//! Phase 2: the segment and the jobs each mode replays.

use std::collections::{BTreeMap, BTreeSet};

use common::prng::Stream;
use common::state::TrainingState;
use engine::train::Run;

use super::commit::Committed;
use super::job::checked_checkpoint;
use super::{AuditOptions, Mode, SpotPick, Stop};
use crate::AuditError;
use crate::source::TrainerSource;

/// One unit of replay: steps `start+1 ..= end` from the checkpoint at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Job {
    pub start: u64,
    pub end: u64,
}

impl Job {
    /// Where an earlier attempt's verified point lets this job continue: a step in
    /// `(start, end]`, or `None` when there is none past the start.
    pub fn resume_point(&self, resume: &BTreeMap<u64, u64>) -> Option<u64> {
        resume.get(&self.start).filter(|&&t| t > self.start).map(|&t| t.min(self.end))
    }
}

#[derive(Debug)]
pub(super) struct Plan {
    pub segment: (u64, u64),
    pub jobs: Vec<Job>,
    /// The jobs a fleet shares out as work items: the checkpoint intervals that cover `jobs`.
    /// The same as `jobs` except in full mode, whose one job they split: by the order in which
    /// a step's checks run ([`super::job::Order`]), the earliest finding, and so the verdict,
    /// is the same whichever jobs cover a step.
    pub shared: Vec<Job>,
}

pub(super) fn plan(src: &dyn TrainerSource, c: &Committed, run: &Run, opts: &AuditOptions) -> Result<Plan, Stop> {
    let n_steps = c.n_steps;
    let from = opts.from.unwrap_or(0);
    let to = opts.to.unwrap_or(n_steps);
    if from > to || to > n_steps {
        return Err(AuditError::Usage(format!(
            "segment [{from}, {to}] is not within the record's steps [0, {n_steps}]"
        ))
        .into());
    }
    let all = intervals(&c.checkpoints, from, to);
    let jobs = match opts.mode {
        Mode::Full => {
            let jobs = vec![Job { start: all[0].start, end: to }];
            return Ok(Plan { segment: (from, to), jobs, shared: all });
        }
        Mode::Intervals => all,
        Mode::Spot { count, pick } => {
            if count == 0 {
                return Err(AuditError::Usage("spot mode needs at least one interval".into()).into());
            }
            let mut order: Vec<usize> = (0..all.len()).collect();
            match pick {
                SpotPick::Random { seed, .. } => Stream::new(seed, "audit/spot", 0, 0).shuffle(&mut order),
                SpotPick::LargestUpdates => rank_by_update(src, c, run, &all, &mut order)?,
            }
            let mut picked: Vec<Job> = order.into_iter().take(count).map(|i| all[i]).collect();
            picked.sort_by_key(|j| j.start);
            picked
        }
    };
    Ok(Plan { segment: (from, to), shared: jobs.clone(), jobs })
}

/// The jobs of a segment: `(c_i, min(c_{i+1}, to)]` for the checkpoints `c_i` from the one at
/// or before `from − 1` up to `to`.
pub(super) fn intervals(checkpoints: &BTreeSet<u64>, from: u64, to: u64) -> Vec<Job> {
    let first = from.saturating_sub(1);
    let c0 = checkpoints.range(..=first).next_back().copied().unwrap_or(0);
    let mut jobs = Vec::new();
    let mut start = c0;
    loop {
        let end = checkpoints.range(start + 1..).next().copied().unwrap_or(to).min(to);
        jobs.push(Job { start, end });
        if end >= to {
            break;
        }
        start = end;
    }
    jobs
}

/// Sorts `order` by proof-of-learning's rule: largest parameter update first. An interval whose
/// checkpoints do not hold up ranks first, so that its replay reports the finding with the
/// same `(step, order)` as every other mode; unranked intervals (not ending on a checkpoint)
/// come last; ties by position, so the choice is stable.
fn rank_by_update(
    src: &dyn TrainerSource,
    c: &Committed,
    run: &Run,
    all: &[Job],
    order: &mut [usize],
) -> Result<(), Stop> {
    let mut norms: BTreeMap<usize, f64> = BTreeMap::new();
    let mut prev: Option<(u64, TrainingState)> = None;
    for (i, job) in all.iter().enumerate() {
        if !c.checkpoints.contains(&job.end) {
            continue;
        }
        let a = match prev.take() {
            Some((s, st)) if s == job.start => Some(st),
            _ => checkpoint_or_flag(src, c, run, job.start)?,
        };
        let b = checkpoint_or_flag(src, c, run, job.end)?;
        let norm = match (&a, &b) {
            (Some(a), Some(b)) => update_norm(a, b),
            _ => f64::INFINITY,
        };
        norms.insert(i, norm);
        prev = b.map(|b| (job.end, b));
    }
    order.sort_by(|&x, &y| {
        let nx = norms.get(&x).copied().unwrap_or(-1.0);
        let ny = norms.get(&y).copied().unwrap_or(-1.0);
        ny.total_cmp(&nx).then(x.cmp(&y))
    });
    Ok(())
}

/// The checkpoint at `step` if it holds up, `None` if it is a finding (left to the replay),
/// or the auditor's own failure.
fn checkpoint_or_flag(
    src: &dyn TrainerSource,
    c: &Committed,
    run: &Run,
    step: u64,
) -> Result<Option<TrainingState>, Stop> {
    match checked_checkpoint(src, &c.leaves, step, run) {
        Ok(s) => Ok(Some(s)),
        Err(Stop::Verdict(_)) => Ok(None),
        Err(e @ Stop::Undecided(_)) => Err(e),
    }
}

/// L2 norm of the parameter change between two states (parameters only, as proof-of-learning).
fn update_norm(a: &TrainingState, b: &TrainingState) -> f64 {
    let mut sum = 0.0f64;
    for (name, ta) in a.tensors().filter(|(n, _)| n.starts_with("param/")) {
        if let Some(tb) = b.get(name) {
            for (x, y) in ta.data.iter().zip(&tb.data) {
                let d = f64::from(*y) - f64::from(*x);
                sum += d * d;
            }
        }
    }
    sum.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_the_segment_from_the_checkpoint_before_it() {
        let c: BTreeSet<u64> = [0, 4, 8, 12, 13].into();
        let j = |v: Vec<Job>| v.into_iter().map(|j| (j.start, j.end)).collect::<Vec<_>>();
        assert_eq!(j(intervals(&c, 0, 13)), vec![(0, 4), (4, 8), (8, 12), (12, 13)]);
        assert_eq!(j(intervals(&c, 1, 13)), vec![(0, 4), (4, 8), (8, 12), (12, 13)]);
        assert_eq!(j(intervals(&c, 5, 6)), vec![(4, 6)]);
        assert_eq!(j(intervals(&c, 4, 4)), vec![(0, 4)]);
        assert_eq!(j(intervals(&c, 9, 12)), vec![(8, 12)]);
        assert_eq!(j(intervals(&c, 13, 13)), vec![(12, 13)]);
        assert_eq!(j(intervals(&c, 0, 0)), vec![(0, 0)]);
    }
}
