//! A replay shared by a fleet of daemons on one store: the coordinator's side
//! ([`share_intervals`]) and a helper's ([`replay_interval`]).

use std::collections::BTreeMap;

use super::open::{Opened, Resume};
use super::{Progress, job};
use crate::AuditError;
use crate::source::TrainerSource;

/// A work item `(start, end)` taken from a shared audit, and the audit's durable progress
/// (job start → last step verified) when it was taken.
pub type Taken = ((u64, u64), BTreeMap<u64, u64>);

/// Work items a shared audit is split into at most: a record with a checkpoint at every step
/// would otherwise put a row per step in the store, and every waiting coordinator reads them all
/// at each poll.
pub const ITEMS_MAX: usize = 256;

/// The work items of a plan's `jobs` (sorted, disjoint): runs of consecutive jobs, at most
/// `items_max` of them, each `(first start, last end)`; a job belongs to the item that covers it.
pub fn work_items(jobs: &[(u64, u64)], items_max: usize) -> Vec<(u64, u64)> {
    let per_item = jobs.len().div_ceil(items_max.max(1)).max(1);
    jobs.chunks(per_item).map(|c| (c[0].0, c[c.len() - 1].1)).collect()
}

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
    /// Publishes the work items `(start, end)` (idempotent).
    fn publish(&self, intervals: &[(u64, u64)]) -> Result<(), AuditError>;
    /// A work item of this audit that nobody is replaying (or whose replayer's lease expired),
    /// now this replayer's, with the audit's durable progress; `None` when none is left to take.
    fn take(&self) -> Result<Option<Taken>, AuditError>;
    /// The interval taken was replayed as far as it goes.
    fn done(&self, start: u64) -> Result<(), AuditError>;
    /// Whether every interval is done; when not, waits a moment first (others are replaying).
    fn all_done(&self) -> Result<bool, AuditError>;
    /// Every job's durable progress: start → last verified step.
    fn progress(&self) -> Result<BTreeMap<u64, u64>, AuditError>;
    /// Work items the audit is split into at most ([`work_items`]).
    fn items_max(&self) -> usize {
        ITEMS_MAX
    }
}

/// The coordinator's part of a shared replay ([`Share`]): publishes the work items of the
/// plan's `jobs` ([`work_items`]), replays with `replay` each one it can take, from the durable
/// progress (others are taken by other daemons), then waits until every item is done. The
/// caller then replays the plan once more from `share.progress()`.
pub fn share_intervals(
    share: &dyn Share,
    jobs: &[(u64, u64)],
    progress: &dyn Progress,
    replay: impl Fn((u64, u64), &BTreeMap<u64, u64>) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    let items = work_items(jobs, share.items_max());
    share.publish(&items)?;
    loop {
        if progress.cancelled() {
            return Err(AuditError::Cancelled);
        }
        match share.take()? {
            Some((item, durable)) => {
                if items.contains(&item) {
                    replay(item, &durable)?;
                } else {
                    // Published by an earlier coordinator whose plan was split differently (an
                    // older daemon, a spot seed drawn again): nothing to replay for this plan,
                    // whose last pass replays every job anyway.
                    tracing::warn!(?item, "work item of another plan of this audit: set aside");
                }
                share.done(item.0)?;
            }
            None if share.all_done()? => return Ok(()),
            None => {}
        }
    }
}

/// Replays one work item `(start, end]` of a shared audit as far as it goes, for the daemon that
/// coordinates it ([`Share`]), from the record `opened` (see [`Opened::open`]; a helper keeps
/// one per audit) and the audit's durable progress `resume`: only the points reported through
/// [`Progress::verified`] count. A finding, a failure of this replayer's own, or a record that is
/// not the one the coordinator opened ([`Progress::opened`]) ends the item early, left for the
/// coordinator to replay again; `Err` only for [`AuditError::Cancelled`] and for an item that
/// is not in the plan.
pub fn replay_interval(
    src: &dyn TrainerSource,
    opened: &Opened,
    (start, end): (u64, u64),
    resume: &BTreeMap<u64, u64>,
    progress: &dyn Progress,
) -> Result<(), AuditError> {
    let empty = BTreeMap::new();
    let resume = match progress.opened(&opened.view()) {
        Ok(Resume::Keep) => resume,
        Ok(Resume::Discard) => &empty,
        Err(AuditError::Cancelled) => return Err(AuditError::Cancelled),
        Err(e) => {
            tracing::info!(start, end, error = %e, "work item not replayed; the audit's coordinator replays it");
            return Ok(());
        }
    };
    replay_taken(src, opened, (start, end), resume, progress)
}

/// Replays the jobs of `opened`'s plan that work item `(start, end]` covers, each from its
/// durable point in `resume`.
pub(super) fn replay_taken(
    src: &dyn TrainerSource,
    opened: &Opened,
    (start, end): (u64, u64),
    resume: &BTreeMap<u64, u64>,
    progress: &dyn Progress,
) -> Result<(), AuditError> {
    let jobs: Vec<super::plan::Job> =
        opened.plan.shared.iter().copied().filter(|j| j.start >= start && j.end <= end).collect();
    if jobs.first().is_none_or(|j| j.start != start) || jobs.last().is_none_or(|j| j.end != end) {
        return Err(AuditError::Internal(format!("work item ({start}, {end}] is not in this audit's plan")));
    }
    let replayer = job::Replayer::new(src, &opened.run, &opened.committed, progress, resume);
    jobs.into_iter().try_for_each(|job| replayer.replay_item(job))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::NoProgress;

    /// A store's items as a queue: what is published, taken and done.
    #[derive(Default)]
    struct Queue {
        pending: Mutex<Vec<(u64, u64)>>,
        done: Mutex<Vec<u64>>,
    }

    impl Share for Queue {
        fn publish(&self, intervals: &[(u64, u64)]) -> Result<(), AuditError> {
            let mut pending = self.pending.lock().unwrap();
            let new: Vec<(u64, u64)> =
                intervals.iter().copied().filter(|i| !pending.iter().any(|p| p.0 == i.0)).collect();
            pending.extend(new);
            Ok(())
        }
        fn take(&self) -> Result<Option<Taken>, AuditError> {
            let mut pending = self.pending.lock().unwrap();
            Ok((!pending.is_empty()).then(|| (pending.remove(0), BTreeMap::new())))
        }
        fn done(&self, start: u64) -> Result<(), AuditError> {
            self.done.lock().unwrap().push(start);
            Ok(())
        }
        fn all_done(&self) -> Result<bool, AuditError> {
            Ok(self.pending.lock().unwrap().is_empty())
        }
        fn progress(&self) -> Result<BTreeMap<u64, u64>, AuditError> {
            Ok(BTreeMap::new())
        }
        fn items_max(&self) -> usize {
            2
        }
    }

    /// Items an earlier coordinator published for another split of the plan are set aside, not
    /// an error; this plan's items are replayed, each once.
    #[test]
    fn items_of_another_plan_are_set_aside_and_this_plans_are_replayed() {
        let queue = Queue::default();
        queue.pending.lock().unwrap().extend([(0, 4), (4, 8)]);
        let replayed = Mutex::new(Vec::new());
        let jobs = [(0, 4), (4, 8), (8, 12), (12, 13)];
        share_intervals(&queue, &jobs, &NoProgress, |item, _| {
            replayed.lock().unwrap().push(item);
            Ok(())
        })
        .unwrap();
        assert_eq!(*replayed.lock().unwrap(), [(8, 13)], "(0, 8] could not be published over the stale (0, 4]");
        assert_eq!(*queue.done.lock().unwrap(), [0, 4, 8]);
    }

    #[test]
    fn work_items_are_runs_of_consecutive_jobs_and_at_most_the_bound() {
        let jobs: Vec<(u64, u64)> = (0..1000).map(|i| (i * 2, i * 2 + 2)).collect();
        assert_eq!(work_items(&jobs[..3], 256), jobs[..3], "few jobs: one item each");
        for max in [1, 7, 256, 999, 1000, 5000] {
            let items = work_items(&jobs, max);
            assert!(items.len() <= max && !items.is_empty(), "{max}: {}", items.len());
            assert_eq!((items[0].0, items[items.len() - 1].1), (0, 2000), "{max}: they cover the plan");
            assert!(items.windows(2).all(|w| w[0].1 == w[1].0), "{max}: in order, without gaps");
            assert!(items.iter().all(|i| jobs.iter().any(|j| j.0 == i.0)), "{max}: they start at jobs");
        }
        // Spot mode's jobs need not be adjacent: an item covers whole jobs only.
        let spot = [(0, 4), (8, 12), (20, 24)];
        assert_eq!(work_items(&spot, 2), [(0, 12), (20, 24)]);
    }
}
