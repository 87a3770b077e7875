//! A replay shared by a fleet of daemons on one store: the coordinator's side
//! ([`share_intervals`]) and a helper's ([`replay_interval`]).

use std::collections::BTreeMap;

use super::open::{Opened, Resume};
use super::{Progress, job};
use crate::AuditError;
use crate::source::TrainerSource;

/// An interval `(start, end)` taken from a shared audit, and its durable point (the last step
/// verified, if any).
pub type Taken = ((u64, u64), Option<u64>);

/// The replay of one audit shared by a fleet of daemons on one store ([`Progress::share`]).
///
/// The daemon running the audit publishes its plan's intervals as work items, replays those it
/// can take, and waits for those other daemons took; every replayer reports verified points
/// through [`Progress::verified`], which the store keeps. It then replays the plan once more
/// with every durable point as [`AuditOptions::resume`]: an interval reproduced to its end is
/// skipped, and one that stopped at a finding (or at another replayer's own failure) is
/// replayed from its last verified point, so the verdict, bisection, evidence and report come
/// from this one daemon as a single-process audit's would (`steps_replayed` too: it counts the
/// steps checked up to the first finding, not what helpers replayed past it before they learnt
/// of it).
///
/// A store failure here is reported as [`AuditError::Cancelled`]: the audit is handed back and
/// resumed, never decided without what the store holds.
pub trait Share: Sync {
    /// Publishes the plan's intervals `(start, end)` (idempotent).
    fn publish(&self, intervals: &[(u64, u64)]) -> Result<(), AuditError>;
    /// An interval of this audit that nobody is replaying (or whose replayer's lease expired),
    /// now this replayer's, with its durable progress (the last step verified, if any); `None`
    /// when none is left to take.
    fn take(&self) -> Result<Option<Taken>, AuditError>;
    /// The interval taken was replayed as far as it goes.
    fn done(&self, start: u64) -> Result<(), AuditError>;
    /// Whether every interval is done; when not, waits a moment first (others are replaying).
    fn all_done(&self) -> Result<bool, AuditError>;
    /// Every interval's durable progress: start → last verified step.
    fn progress(&self) -> Result<BTreeMap<u64, u64>, AuditError>;
}

/// The coordinator's part of a shared replay ([`Share`]): publishes `intervals`, replays with
/// `replay` each one it can take, from its durable point (others are taken by other daemons),
/// then waits until every
/// interval is done. The caller then replays the plan once more from `share.progress()`.
pub fn share_intervals(
    share: &dyn Share,
    intervals: &[(u64, u64)],
    progress: &dyn Progress,
    replay: impl Fn((u64, u64), Option<u64>) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    share.publish(intervals)?;
    loop {
        if progress.cancelled() {
            return Err(AuditError::Cancelled);
        }
        match share.take()? {
            Some((interval, through)) => {
                if !intervals.contains(&interval) {
                    return Err(AuditError::Internal(format!("work item {interval:?} is not in this plan")));
                }
                replay(interval, through)?;
                share.done(interval.0)?;
            }
            None if share.all_done()? => return Ok(()),
            None => {}
        }
    }
}

/// Replays one interval `(start, end]` of a shared audit as far as it goes, for the daemon that
/// coordinates it ([`Share`]), from the record `opened` (see [`Opened::open`]; a helper keeps
/// one per audit) and the interval's durable point in `resume`: only the points reported through
/// [`Progress::verified`] count. A finding, a failure of this replayer's own, or a record that is
/// not the one the coordinator opened ([`Progress::opened`]) ends the interval early, left for
/// the coordinator to replay again; `Err` only for [`AuditError::Cancelled`] and for an interval
/// that is not in the plan.
pub fn replay_interval(
    src: &dyn TrainerSource,
    opened: &Opened,
    (start, end): (u64, u64),
    resume: &BTreeMap<u64, u64>,
    progress: &dyn Progress,
) -> Result<(), AuditError> {
    let through = match progress.opened(&opened.view()) {
        Ok(Resume::Keep) => resume.get(&start).copied(),
        Ok(Resume::Discard) => None,
        Err(AuditError::Cancelled) => return Err(AuditError::Cancelled),
        Err(e) => {
            tracing::info!(start, end, error = %e, "work item not replayed; the audit's coordinator replays it");
            return Ok(());
        }
    };
    replay_taken(src, opened, (start, end), through, progress)
}

/// Replays interval `(start, end]` of `opened`'s plan from its durable point `through`.
pub(super) fn replay_taken(
    src: &dyn TrainerSource,
    opened: &Opened,
    (start, end): (u64, u64),
    through: Option<u64>,
    progress: &dyn Progress,
) -> Result<(), AuditError> {
    let Some(job) = opened.plan.shared.iter().copied().find(|j| (j.start, j.end) == (start, end)) else {
        return Err(AuditError::Internal(format!("work item ({start}, {end}] is not in this audit's plan")));
    };
    // From the interval's own durable point: other replayers may have moved it on since this
    // audit was claimed.
    let resume: BTreeMap<u64, u64> = through.map(|t| (start, t)).into_iter().collect();
    job::Replayer::new(src, &opened.run, &opened.committed, progress, &resume).replay_item(job)
}
