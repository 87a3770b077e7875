//! Phases 3 and 4: replaying jobs, and merging their outcomes.
//!
//! A job never returns early with an error: whatever stops it (a finding, or the auditor's
//! own failure) is recorded at its `(step, order)`, and [`Replayer::replay_all`] keeps the
//! earliest once every job has ended. So a failure of the auditor's past a finding does not
//! hide the finding, and a finding past a failure does not decide an audit that full replay
//! could not have decided.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::codec::{Hash, to_hex};
use common::leaf::{BatchIndices, Leaf};
use common::rounding::RoundingError;
use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::EngineError;
use engine::record;
use engine::train::{Run, StepMode};
use rayon::prelude::*;

use super::commit::Committed;
use super::plan::Job;
use super::{Phase, Progress, Stop, source_stop};
use crate::source::{TrainerSource, record_file};
use crate::{AuditError, Verdict};

/// What is checked first at one step (see the module documentation of `replay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Order {
    /// The checkpoint after the step: hash, step counter, structure.
    Checkpoint,
    /// The step's log and batch files.
    Files,
    /// The step itself.
    Step,
}

/// Something that ended a job at `(step, order)`.
#[derive(Debug)]
pub(super) struct Finding {
    pub step: u64,
    pub order: Order,
    pub found: Found,
}

#[derive(Debug)]
pub(super) enum Found {
    /// A verdict reached on a piece the trainer supplied, or the auditor's own failure there.
    Stop(Stop),
    /// The step did not reproduce, or its log did not hold up: bisection and evidence follow.
    Step(Box<StepFinding>),
}

#[derive(Debug)]
pub(super) struct StepFinding {
    /// The auditor's leaf; for a step that did not stay finite (a value overflowed), the "no
    /// state" leaf ([`crate::evidence::not_finite_leaf`]).
    pub own_leaf: Leaf,
    pub own_state: Option<TrainingState>,
    /// The state after step − 1 (agreed: its leaf matched, or it is a verified checkpoint).
    pub prev: Option<TrainingState>,
    pub log: TieBreakLog,
    pub trainer_batch: BatchIndices,
    pub own_batch: BatchIndices,
    pub forged: Vec<RoundingError>,
    pub diverged: bool,
    /// The rounding site and message of an overflow while replaying the step.
    pub overflow: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct JobOutcome {
    own: Vec<Leaf>,
    finding: Option<Finding>,
    /// Steps verified by an earlier attempt and skipped.
    resumed: u64,
    /// The job's start and the last step it checked (resumed or replayed): it checked the
    /// steps in between.
    span: (u64, u64),
}

/// Every job's outcome, merged.
#[derive(Debug)]
pub(super) struct Merged {
    /// The auditor's own leaves, where it replayed.
    pub own: BTreeMap<u64, Leaf>,
    /// The earliest finding by `(step, order)`.
    pub finding: Option<Finding>,
    pub resumed: u64,
    /// Every job's [`JobOutcome::span`].
    spans: Vec<(u64, u64)>,
}

impl Merged {
    /// Steps checked up to the earliest finding (every step without one): whatever parallel
    /// jobs, or a fleet's helpers, replayed past it before they learnt of it is not counted, so
    /// the figure does not depend on the thread count, the timing or the fleet.
    pub fn checked(&self) -> u64 {
        let limit = self.finding.as_ref().map_or(u64::MAX, |f| f.step);
        self.spans.iter().map(|&(start, last)| last.min(limit).saturating_sub(start)).sum()
    }
}

pub(super) struct Replayer<'a> {
    src: &'a dyn TrainerSource,
    run: &'a Run,
    leaves: &'a [Leaf],
    checkpoints: &'a BTreeSet<u64>,
    /// Smallest step with a finding so far (jobs past it stop early).
    earliest: AtomicU64,
    progress: &'a dyn Progress,
    resume: &'a BTreeMap<u64, u64>,
}

/// A piece handed out for step `step` whose hash is not the leaf's: both full digests.
fn mismatch(file: fn(&Path, u64) -> PathBuf, what: &str, step: u64, committed: &Hash, found: &Hash) -> Stop {
    Stop::Verdict(Verdict::invalid(
        record_file(file, step),
        None,
        format!(
            "{what} hash of step {step} does not match its commitment: expected {}, found {}",
            to_hex(committed),
            to_hex(found)
        ),
    ))
}

/// The trainer's checkpoint at `step`, checked against leaf `step` (hash and step counter)
/// (with the record's state hash) and against the model (tensors, shapes, slots, finiteness).
/// Repeated here so that no source implementation has to be trusted.
pub(super) fn checked_checkpoint(
    src: &dyn TrainerSource,
    leaves: &[Leaf],
    step: u64,
    run: &Run,
) -> Result<TrainingState, Stop> {
    let state = src.checkpoint(step).map_err(|e| source_stop(e, Phase::Committed))?;
    let (committed, found) = (&leaves[step as usize].state, run.state_digest(&state));
    if found != *committed {
        return Err(mismatch(record::checkpoint_path, "state", step, committed, &found));
    }
    let file = || record_file(record::checkpoint_path, step);
    if state.step != step {
        return Err(Verdict::invalid(file(), None, format!("the state claims step {}", state.step)).into());
    }
    run.check_state(&state).map_err(|p| Verdict::invalid(file(), None, format!("malformed committed state: {p}")))?;
    Ok(state)
}

impl<'a> Replayer<'a> {
    pub fn new(
        src: &'a dyn TrainerSource,
        run: &'a Run,
        committed: &'a Committed,
        progress: &'a dyn Progress,
        resume: &'a BTreeMap<u64, u64>,
    ) -> Self {
        Replayer {
            src,
            run,
            leaves: &committed.leaves,
            checkpoints: &committed.checkpoints,
            earliest: AtomicU64::new(u64::MAX),
            progress,
            resume,
        }
    }

    /// Runs every job (in parallel when there are several) and merges their outcomes.
    pub fn replay_all(&self, jobs: &[Job]) -> Result<Merged, Stop> {
        self.replay_jobs(jobs, true)
    }

    /// Tells the progress how many steps `jobs` have left to replay.
    pub fn announce(&self, jobs: &[Job]) {
        let resumed: u64 = jobs.iter().map(|j| j.resume_point(self.resume).map_or(0, |t| t - j.start)).sum();
        self.progress.begin(jobs.iter().map(|j| j.end - j.start).sum::<u64>() - resumed);
    }

    /// [`Replayer::replay_all`], announcing the steps to replay first or not (the last pass of
    /// a shared audit, which announced them before).
    pub fn replay_jobs(&self, jobs: &[Job], announce: bool) -> Result<Merged, Stop> {
        if announce {
            self.announce(jobs);
        }
        let outcomes: Vec<JobOutcome> = if jobs.len() == 1 {
            vec![self.replay(jobs[0])]
        } else {
            jobs.par_iter().map(|&j| self.replay(j)).collect()
        };
        merge(outcomes)
    }

    /// Replays one job of a shared audit (see `Share`): what it finds is left for the last
    /// pass, except a cancellation.
    pub fn replay_item(&self, job: Job) -> Result<(), AuditError> {
        match self.replay(job).finding {
            Some(Finding { found: Found::Stop(Stop::Undecided(AuditError::Cancelled)), .. }) => {
                Err(AuditError::Cancelled)
            }
            _ => Ok(()),
        }
    }

    fn note(&self, out: &mut JobOutcome, step: u64, order: Order, found: Found) {
        self.earliest.fetch_min(step, Ordering::Relaxed);
        out.finding = Some(Finding { step, order, found });
    }

    fn stop(&self, out: &mut JobOutcome, step: u64, order: Order, stop: impl Into<Stop>) {
        self.note(out, step, order, Found::Stop(stop.into()));
    }

    fn checkpoint(&self, step: u64) -> Result<TrainingState, Stop> {
        checked_checkpoint(self.src, self.leaves, step, self.run)
    }

    /// The trainer's state after `step`, if the source hands it out and it matches the leaf
    /// (which the auditor reproduced in an earlier attempt). `None`: replay from the job start.
    fn resumed_state(&self, step: u64) -> Option<TrainingState> {
        let state = self.src.state(step).ok()?;
        (state.step == step
            && self.run.state_digest(&state) == self.leaves[step as usize].state
            && self.run.check_state(&state).is_ok())
        .then_some(state)
    }

    fn log(&self, step: u64) -> Result<TieBreakLog, Stop> {
        let log = self.src.log(step).map_err(|e| source_stop(e, Phase::Committed))?;
        let (committed, found) = (&self.leaves[step as usize].log, log.digest());
        if found != *committed {
            return Err(mismatch(record::log_path, "log", step, committed, &found));
        }
        Ok(log)
    }

    fn batch(&self, step: u64) -> Result<BatchIndices, Stop> {
        let batch = self.src.batch(step).map_err(|e| source_stop(e, Phase::Committed))?;
        let (committed, found) = (&self.leaves[step as usize].batch, batch.digest());
        if found != *committed {
            return Err(mismatch(record::batch_path, "batch", step, committed, &found));
        }
        Ok(batch)
    }

    fn replay(&self, job: Job) -> JobOutcome {
        let mut out = JobOutcome { span: (job.start, job.start), ..JobOutcome::default() };
        if self.earliest.load(Ordering::Relaxed) < job.start {
            return out;
        }
        // Resume after the last point an earlier attempt verified, when the trainer's state
        // there is available; the skipped steps count as reproduced with the trainer's leaves.
        if let Some(through) = job.resume_point(self.resume) {
            let resumed = if through == job.end { Some(None) } else { self.resumed_state(through).map(Some) };
            if let Some(state) = resumed {
                out.own.extend_from_slice(&self.leaves[job.start as usize..=through as usize]);
                out.resumed = through - job.start;
                out.span.1 = through;
                return match state {
                    None => out,
                    // Progress stays keyed by the job's own start: that is where the next attempt
                    // looks it up (`Job::resume_point`), however often the audit is interrupted.
                    Some(state) => self.replay_from(Job { start: through, end: job.end }, job.start, state, out),
                };
            }
        }
        let start = match self.checkpoint(job.start) {
            Ok(s) => s,
            Err(stop) => {
                self.stop(&mut out, job.start, Order::Checkpoint, stop);
                return out;
            }
        };
        let state = if job.start == 0 {
            // The initial state must follow the seed.
            let init = match self.run.initial_state() {
                Ok(s) => s,
                Err(e) => {
                    self.stop(&mut out, 0, Order::Step, AuditError::from(e));
                    return out;
                }
            };
            let own = Leaf::initial(self.run.state_digest(&init));
            out.own.push(own);
            if own != self.leaves[0] {
                let finding = StepFinding {
                    own_leaf: own,
                    own_state: Some(init),
                    prev: None,
                    log: TieBreakLog::default(),
                    trainer_batch: BatchIndices::default(),
                    own_batch: BatchIndices::default(),
                    forged: Vec::new(),
                    diverged: true,
                    overflow: None,
                };
                self.note(&mut out, 0, Order::Step, Found::Step(Box::new(finding)));
                return out;
            }
            init
        } else {
            start
        };
        self.replay_from(job, job.start, state, out)
    }

    /// Replays `(job.start, job.end]` from `state`, the agreed state after `job.start`,
    /// reporting verified points under `progress_key` (the start of the planned job).
    fn replay_from(&self, job: Job, progress_key: u64, mut state: TrainingState, mut out: JobOutcome) -> JobOutcome {
        for t in job.start + 1..=job.end {
            if self.earliest.load(Ordering::Relaxed) < t {
                break;
            }
            if self.progress.cancelled() {
                self.stop(&mut out, t, Order::Checkpoint, AuditError::Cancelled);
                return out;
            }
            if self.checkpoints.contains(&t)
                && let Err(stop) = self.checkpoint(t)
            {
                self.stop(&mut out, t, Order::Checkpoint, stop);
                return out;
            }
            let (log, trainer_batch) = match self.log(t).and_then(|l| Ok((l, self.batch(t)?))) {
                Ok(x) => x,
                Err(stop) => {
                    self.stop(&mut out, t, Order::Files, stop);
                    return out;
                }
            };
            let t_step = Instant::now();
            let step = match self.run.step(&state, t, StepMode::Replay(&log), None) {
                Ok(step) => step,
                Err(e) if e.is_overflow() => {
                    // From an agreed, well-formed state, an honest step stays finite: the
                    // trainer committed a state that the step it claims cannot lead to.
                    let site = match &e {
                        EngineError::Rounding {
                            error: RoundingError::NonFinite { site, .. } | RoundingError::NotANumber { site, .. },
                            ..
                        } => site.clone(),
                        _ => String::new(),
                    };
                    let own_batch = self.run.batch_indices(t);
                    let own = crate::evidence::not_finite_leaf(t, &log, &own_batch);
                    out.own.push(own);
                    let finding = StepFinding {
                        own_leaf: own,
                        own_state: None,
                        prev: Some(state),
                        log,
                        trainer_batch,
                        own_batch,
                        forged: Vec::new(),
                        diverged: true,
                        overflow: Some((site, e.to_string())),
                    };
                    self.note(&mut out, t, Order::Step, Found::Step(Box::new(finding)));
                    return out;
                }
                Err(e) => {
                    self.stop(&mut out, t, Order::Step, AuditError::from(e));
                    return out;
                }
            };
            out.span.1 = t;
            self.progress.replayed(t, t_step.elapsed().as_secs_f64());
            let own = Leaf {
                step: t,
                state: self.run.state_digest(&step.state),
                log: log.digest(),
                batch: step.batch.digest(),
            };
            out.own.push(own);
            let diverged = own != self.leaves[t as usize];
            if diverged || !step.forged.is_empty() {
                let finding = StepFinding {
                    own_leaf: own,
                    own_state: Some(step.state),
                    prev: Some(state),
                    log,
                    trainer_batch,
                    own_batch: step.batch,
                    forged: step.forged,
                    diverged,
                    overflow: None,
                };
                self.note(&mut out, t, Order::Step, Found::Step(Box::new(finding)));
                return out;
            }
            self.progress.verified(progress_key, t);
            state = step.state;
        }
        out
    }
}

/// Merges every job's outcome: the earliest finding by `(step, order)` wins, whether it is a
/// verdict or the auditor's own failure; a cancelled audit is cancelled whatever else was found.
fn merge(outcomes: Vec<JobOutcome>) -> Result<Merged, Stop> {
    let mut merged = Merged { own: BTreeMap::new(), finding: None, resumed: 0, spans: Vec::new() };
    let mut cancelled = false;
    for o in outcomes {
        merged.resumed += o.resumed;
        merged.spans.push(o.span);
        merged.own.extend(o.own.into_iter().map(|l| (l.step, l)));
        if let Some(f) = o.finding {
            cancelled |= matches!(f.found, Found::Stop(Stop::Undecided(AuditError::Cancelled)));
            if merged.finding.as_ref().is_none_or(|g| (f.step, f.order) < (g.step, g.order)) {
                merged.finding = Some(f);
            }
        }
    }
    if cancelled {
        return Err(Stop::Undecided(AuditError::Cancelled));
    }
    Ok(merged)
}
