//! The worker: claims an audit (or one interval of an audit another daemon runs), takes it as
//! far as it goes, and writes the outcome, holding a lease on what it claimed.
//!
//! # Leases
//! Every claim is a lease: the store records the claiming daemon (`node`) and an expiry
//! `now + lease_ms`. The worker renews it at least every `lease_ms / 3` while it works (from
//! its progress callbacks, while it waits for other daemons' intervals, and from the runner's
//! heartbeat while a request to the trainer is in flight). A daemon that is
//! killed, or cut off from the store, stops renewing; once the lease expires another daemon
//! claims the audit or the interval and resumes it from its durable progress. A worker that
//! finds its lease gone (renewal answers `false`: taken over, cancelled or finished) stops at
//! its next step without writing anything else; one that cannot reach the store stops once its
//! lease has run out, since by then another daemon may hold it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::job::{
    Clock, FailReason, ItemOutcome, ItemState, Job, JobState, Observer, Outcome, Runner, Store, StoreError,
};
use crate::replay::{RecordView, Resume, Share, Taken};
use crate::{AuditError, Progress};

/// Worker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Claims of one job before it is failed (a job that keeps killing its worker).
    pub attempts_max: u32,
    /// Least time between two durable progress writes of one job.
    pub progress_interval_ms: u64,
    /// Tries of the final `finish`/`fail`/`requeue` write before giving up on it.
    pub store_tries: u32,
    /// Wait between those tries (doubling).
    pub store_backoff_ms: u64,
    /// This daemon's name in the store's leases (unique within a fleet).
    pub node: String,
    /// How long a claim lasts without renewal.
    pub lease_ms: u64,
    /// How often a daemon waiting for other daemons' intervals looks again.
    pub poll_ms: u64,
    /// Whether audits are shared out as work items: on a store other daemons use. Alone, a
    /// daemon replays an audit's intervals in parallel itself, which is faster than handing them
    /// to its own other workers one at a time.
    pub share: bool,
    /// Work items a shared audit is split into at most ([`crate::replay::work_items`]).
    pub items_max: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            attempts_max: 5,
            progress_interval_ms: 500,
            store_tries: 5,
            store_backoff_ms: 100,
            node: "local".into(),
            lease_ms: 30_000,
            poll_ms: 200,
            share: false,
            items_max: crate::replay::ITEMS_MAX,
        }
    }
}

/// What a lease covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The audit itself (its coordinator).
    Job,
    /// One interval, starting at this step.
    Item(u64),
}

/// Persists progress (throttled), counts steps, and answers cancellation.
struct JobProgress<'a> {
    store: &'a dyn Store,
    clock: &'a dyn Clock,
    observer: &'a dyn Observer,
    id: &'a str,
    config: &'a WorkerConfig,
    cancel: &'a AtomicBool,
    held: Held,
    /// The interval a coordinator took from its own audit's items (renewed with its lease).
    taken: Mutex<Option<u64>>,
    /// When this worker last renewed its lease, and until when it holds it (as far as it knows).
    lease: Mutex<(u64, u64)>,
    /// Steps checked so far (resumed ones included).
    steps: AtomicU64,
    /// job start → (verified through, saved through, saved at ms).
    points: Mutex<BTreeMap<u64, (u64, u64, u64)>>,
    /// The job is no longer `running` in the store (cancelled by a client): stop.
    stopped: AtomicBool,
    /// The record the job's progress is bound to ([`Job::commitment`]); progress is saved only
    /// against it. A coordinator binds the record it opened ([`Progress::opened`]).
    bound: Mutex<Option<String>>,
}

impl JobProgress<'_> {
    fn save(&self, job_start: u64, through: u64, force: bool) {
        let now = self.clock.now_ms();
        // Decide under the lock, write without it: interval-parallel replay calls this from
        // every worker after every step, and none should wait for another job's fsync.
        let verified = {
            let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
            let e = points.entry(job_start).or_insert((job_start, job_start, 0));
            e.0 = e.0.max(through);
            if e.0 <= e.1 || !(force || now.saturating_sub(e.2) >= self.config.progress_interval_ms) {
                return;
            }
            e.0
        };
        let Some(bound) = self.bound.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            // Nothing opened yet, so nothing verified against a record this job is bound to.
            return;
        };
        let steps = self.steps.load(Ordering::SeqCst);
        match self.store.save_progress(self.id, job_start, verified, steps, &bound, now) {
            Ok(()) => {
                // Only this job's worker reports points for `job_start`, so nothing moved it
                // meanwhile except forward.
                {
                    let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(e) = points.get_mut(&job_start) {
                        e.1 = e.1.max(verified);
                        e.2 = now;
                    }
                }
                if self.store.still_running(self.id) == Ok(false) {
                    self.stopped.store(true, Ordering::SeqCst);
                }
            }
            // Progress is an optimisation: a failed write only means more replay after a crash.
            Err(_) => self.observer.store_error("save_progress"),
        }
    }

    /// Writes every point not yet durable (before a requeue, or an item's end); only the point
    /// of job `only` when given. Whether they all are durable now.
    fn flush(&self, only: Option<u64>) -> bool {
        let pending: Vec<(u64, u64)> = {
            let points = self.points.lock().unwrap_or_else(|p| p.into_inner());
            points.iter().filter(|(s, p)| p.0 > p.1 && only.is_none_or(|o| o == **s)).map(|(&s, p)| (s, p.0)).collect()
        };
        for (start, through) in pending {
            self.save(start, through, true);
        }
        let points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        points.iter().all(|(s, p)| p.0 <= p.1 || only.is_some_and(|o| o != *s))
    }

    /// Renews the lease when a third of it has passed; stops the attempt when it is lost, or
    /// when the store has been unreachable until it ran out.
    fn renew(&self) {
        let now = self.clock.now_ms();
        let until = {
            let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_sub(lease.0) < self.config.lease_ms / 3 {
                return;
            }
            lease.1
        };
        let c = self.config;
        let renewed = match self.held {
            Held::Job => {
                let taken = *self.taken.lock().unwrap_or_else(|p| p.into_inner());
                // The interval it replays is leased too; losing it only means another daemon
                // replays it as well (the audit is still this one's).
                if let Some(start) = taken
                    && self.store.renew_item(self.id, start, &c.node, now, c.lease_ms).is_err()
                {
                    self.observer.store_error("renew_item");
                }
                self.store.renew(self.id, &c.node, now, c.lease_ms)
            }
            Held::Item(start) => self.store.renew_item(self.id, start, &c.node, now, c.lease_ms),
        };
        match renewed {
            Ok(true) => *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = (now, now + c.lease_ms),
            Ok(false) => {
                tracing::warn!(node = %c.node, "lease lost (taken over after expiry, or the audit ended): stopping");
                self.stopped.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                self.observer.store_error("renew");
                if now >= until {
                    tracing::warn!(error = %e, "lease ran out while the store was unreachable: stopping");
                    self.stopped.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    fn store_err(&self, op: &str, e: StoreError) -> AuditError {
        self.observer.store_error(op);
        tracing::warn!(op, error = %e, "store unavailable during a shared replay: the audit is handed back");
        AuditError::Cancelled
    }
}

impl Share for JobProgress<'_> {
    fn publish(&self, intervals: &[(u64, u64)]) -> Result<(), AuditError> {
        self.store.publish(self.id, intervals, self.clock.now_ms()).map_err(|e| self.store_err("publish", e))
    }

    fn take(&self) -> Result<Option<Taken>, AuditError> {
        self.renew();
        let c = self.config;
        let claimed = self
            .store
            .claim_item(&c.node, Some(self.id), self.clock.now_ms(), c.lease_ms)
            .map_err(|e| self.store_err("claim_item", e))?;
        *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = claimed.as_ref().map(|(_, item)| item.start);
        Ok(claimed.map(|(job, item)| ((item.start, item.end), job.progress)))
    }

    fn done(&self, start: u64) -> Result<(), AuditError> {
        self.flush(Some(start));
        *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.store
            .item_done(self.id, start, &self.config.node, self.clock.now_ms())
            .map_err(|e| self.store_err("item_done", e))
    }

    fn all_done(&self) -> Result<bool, AuditError> {
        let items = self.store.items(self.id).map_err(|e| self.store_err("items", e))?;
        if items.iter().all(|i| i.state == ItemState::Done) {
            return Ok(true);
        }
        self.clock.sleep(Duration::from_millis(self.config.poll_ms));
        self.renew();
        Ok(false)
    }

    fn items_max(&self) -> usize {
        self.config.items_max
    }

    fn progress(&self) -> Result<BTreeMap<u64, u64>, AuditError> {
        self.flush(None);
        match self.store.get(self.id) {
            Ok(Some(job)) => Ok(job.progress),
            Ok(None) => Err(AuditError::Internal(format!("audit {} is no longer in the store", self.id))),
            Err(e) => Err(self.store_err("get", e)),
        }
    }
}

impl Progress for JobProgress<'_> {
    fn heartbeat(&self) {
        self.renew();
    }
    fn begin(&self, steps_total: u64) {
        self.observer.begun(self.id, steps_total, self.steps.load(Ordering::SeqCst));
    }
    fn replayed(&self, step: u64, seconds: f64) {
        self.steps.fetch_add(1, Ordering::SeqCst);
        self.observer.step_replayed(self.id, step, seconds);
        self.renew();
    }
    fn verified(&self, job_start: u64, through: u64) {
        self.save(job_start, through, false);
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.stopped.load(Ordering::SeqCst)
    }
    fn share(&self) -> Option<&dyn Share> {
        (self.config.share && self.held == Held::Job).then_some(self as &dyn Share)
    }
    fn opened(&self, record: &RecordView<'_>) -> Result<Resume, AuditError> {
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let keep = bound.as_deref().is_some_and(|b| record.extends(b));
        let binding = record.binding();
        if self.held != Held::Job {
            // A helper replays only the record its coordinator bound, and saves against it.
            return match keep {
                true => Ok(Resume::Keep),
                false => Err(AuditError::Source(format!(
                    "the trainer served this daemon record {binding}, not the one the audit's coordinator opened ({})",
                    bound.as_deref().unwrap_or("none yet")
                ))),
            };
        }
        let c = self.config;
        match self.store.bind(self.id, &c.node, &binding, keep, self.clock.now_ms()) {
            Ok(true) => {}
            Ok(false) => {
                self.stopped.store(true, Ordering::SeqCst);
                return Err(AuditError::Cancelled);
            }
            Err(e) => return Err(self.store_err("bind", e)),
        }
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = Some(binding.clone());
        if keep {
            return Ok(Resume::Keep);
        }
        let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        if !points.is_empty() {
            tracing::warn!(
                was = bound.as_deref().unwrap_or("unbound"),
                now = %binding,
                "the trainer's record is not the one this audit's progress was verified against: replaying it all"
            );
        }
        points.clear();
        self.steps.store(0, Ordering::SeqCst);
        Ok(Resume::Discard)
    }
}

/// Everything a worker needs; shared by all workers of a daemon.
#[derive(Clone)]
pub struct Worker {
    pub store: Arc<dyn Store>,
    pub runner: Arc<dyn Runner>,
    pub clock: Arc<dyn Clock>,
    pub observer: Arc<dyn Observer>,
    pub config: WorkerConfig,
    /// Set on shutdown: running audits stop at their next step and go back to the queue.
    pub cancel: Arc<AtomicBool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What [`Worker::work_one`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Worked {
    /// Nothing was queued, and no interval of another daemon's audit was left to take.
    Idle,
    /// The claim itself failed; try again later.
    StoreUnavailable,
    /// The job reached this state (or stayed `running` when its final write kept failing; once
    /// its lease runs out another daemon, or this one after a restart, takes it over).
    Job { id: String, state: JobState },
    /// The attempt stopped because its lease was gone: the audit was cancelled by a client, or
    /// its lease ran out and another daemon took it over. Nothing was written.
    Lost { id: String },
    /// One interval of an audit (from step `start`) was replayed as far as it goes, for the
    /// daemon coordinating that audit, or handed back (shutdown, lease lost).
    Item { id: String, start: u64 },
}

impl Worker {
    /// A store write that must happen, retried with backoff; `false` if it never succeeded.
    fn must(&self, op: &str, f: impl Fn() -> Result<(), StoreError>) -> bool {
        let mut wait = self.config.store_backoff_ms;
        for attempt in 1..=self.config.store_tries.max(1) {
            match f() {
                Ok(()) => return true,
                Err(_) => {
                    self.observer.store_error(op);
                    if attempt < self.config.store_tries {
                        self.clock.sleep(Duration::from_millis(wait));
                        wait = wait.saturating_mul(2);
                    }
                }
            }
        }
        false
    }

    /// The progress of an attempt on `job` holding `held`, its lease fresh from the claim.
    fn progress<'a>(&'a self, job: &'a Job, held: Held) -> JobProgress<'a> {
        let now = self.clock.now_ms();
        JobProgress {
            store: &*self.store,
            clock: &*self.clock,
            observer: &*self.observer,
            id: &job.id,
            config: &self.config,
            cancel: &self.cancel,
            held,
            taken: Mutex::new(None),
            lease: Mutex::new((now, now.saturating_add(self.config.lease_ms))),
            // Verified steps that are durable count as checked already.
            steps: AtomicU64::new(job.progress.iter().map(|(&s, &t)| t.saturating_sub(s)).sum()),
            points: Mutex::new(job.progress.iter().map(|(&s, &t)| (s, (t, t, 0))).collect()),
            stopped: AtomicBool::new(false),
            bound: Mutex::new(job.commitment.clone()),
        }
    }

    /// Claims the oldest queued job (or one whose daemon's lease expired) and takes it as far as
    /// it goes; with none, one interval of an audit another daemon coordinates. Blocking: call
    /// it from a blocking thread.
    pub fn work_one(&self) -> Worked {
        let c = &self.config;
        let job = match self.store.claim(&c.node, self.clock.now_ms(), c.lease_ms) {
            Ok(Some(job)) => job,
            Ok(None) => return self.help(),
            Err(_) => {
                self.observer.store_error("claim");
                return Worked::StoreUnavailable;
            }
        };
        let id = job.id.clone();
        // Every line logged while this audit runs carries its id.
        let span = tracing::info_span!("audit", id = %id);
        let _entered = span.enter();
        let worked = self.work_on(job);
        match &worked {
            Worked::Job { state: JobState::Running, .. } => {
                tracing::error!("its final store write kept failing; it runs again once its lease expires")
            }
            Worked::Job { state, .. } => tracing::info!(state = state.name(), "attempt ended"),
            Worked::Lost { .. } => {
                tracing::warn!("attempt stopped: the audit was cancelled, or its lease was lost to another daemon")
            }
            _ => {}
        }
        worked
    }

    /// One interval of an audit another daemon coordinates (or of one whose replayer died).
    fn help(&self) -> Worked {
        let c = &self.config;
        let (job, item) = match self.store.claim_item(&c.node, None, self.clock.now_ms(), c.lease_ms) {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return Worked::Idle,
            Err(_) => {
                self.observer.store_error("claim_item");
                return Worked::StoreUnavailable;
            }
        };
        let (id, start) = (job.id.clone(), item.start);
        let span = tracing::info_span!("audit", id = %id, interval = start);
        let _entered = span.enter();
        let now = || self.clock.now_ms();
        if item.attempts > c.attempts_max {
            // An interval that keeps killing its replayers is left to the coordinator, whose
            // last pass replays it (and whose own attempts are bounded the same way).
            tracing::warn!(attempts = item.attempts, "interval left to the audit's coordinator");
            self.must("item_done", || self.store.item_done(&id, start, &c.node, now()));
            return Worked::Item { id, start };
        }
        tracing::info!(end = item.end, takeover = item.takeovers > 0, "interval claimed");
        let progress = self.progress(&job, Held::Item(start));
        let outcome = self.runner.run_interval(&job, (item.start, item.end), &progress);
        progress.flush(Some(start));
        if progress.stopped.load(Ordering::SeqCst) {
            return Worked::Lost { id };
        }
        match outcome {
            ItemOutcome::Ended => self.must("item_done", || self.store.item_done(&id, start, &c.node, now())),
            ItemOutcome::Cancelled => {
                self.must("release_item", || self.store.release_item(&id, start, &c.node, true, now()))
            }
        };
        Worked::Item { id, start }
    }

    fn work_on(&self, job: Job) -> Worked {
        let id = job.id.clone();
        let node = &self.config.node;
        tracing::info!(attempt = job.attempts, trainer = %job.request.trainer_url, run = %job.request.run, "audit claimed");
        if job.attempts > self.config.attempts_max {
            let why = format!(
                "gave up after {} attempts in a row that verified no new step (crashes or store failures)",
                self.config.attempts_max
            );
            let state = if self.must("fail", || self.store.fail(&id, FailReason::GaveUp, &why, self.clock.now_ms())) {
                self.observer.failed(FailReason::GaveUp);
                JobState::Failed
            } else {
                JobState::Running
            };
            return Worked::Job { id, state };
        }
        let progress = self.progress(&job, Held::Job);
        let outcome = self.runner.run(&job, &progress);
        self.observer.ended(&id);
        let now = || self.clock.now_ms();
        // The final write only by the lease's holder: one last renewal says whether it still is.
        let still_held = || match self.store.renew(&id, node, now(), self.config.lease_ms) {
            Ok(held) => held,
            Err(_) => progress.lease.lock().unwrap_or_else(|p| p.into_inner()).1 > now(),
        };
        if progress.stopped.load(Ordering::SeqCst) || !still_held() {
            return Worked::Lost { id };
        }
        let outcome = match outcome {
            // A failure while the daemon shuts down may be the shutdown itself (a request
            // abandoned, the runtime going away): never final, the audit runs again.
            Outcome::Failed(_) | Outcome::TimeLimit(_) if self.cancel.load(Ordering::SeqCst) => Outcome::Cancelled,
            o => o,
        };
        let fail = |reason: FailReason, why: &str| {
            tracing::warn!(reason = reason.as_str(), error = why, "could not decide");
            let ok = self.must("fail", || self.store.fail(&id, reason, why, now()));
            if ok {
                self.observer.failed(reason);
            }
            (ok, JobState::Failed)
        };
        let (ok, target) = match &outcome {
            Outcome::Decided(d) => {
                tracing::info!(verdict = d.verdict.as_str(), steps = d.steps_replayed, "decided");
                self.observer.decided(d);
                (self.must("finish", || self.store.finish(&id, d, now())), JobState::Done)
            }
            Outcome::Failed(why) => fail(FailReason::Undecided, why),
            Outcome::TimeLimit(why) => fail(FailReason::TimeLimit, why),
            Outcome::Cancelled => {
                progress.flush(None);
                (self.must("requeue", || self.store.requeue(&id, node, true, now())), JobState::Queued)
            }
        };
        if ok {
            return Worked::Job { id, state: target };
        }
        // The final write kept failing: hand the job back so it runs again (resuming), rather
        // than leave it running with nobody on it. If even that fails, its lease runs out.
        if target != JobState::Queued && self.must("requeue", || self.store.requeue(&id, node, false, now())) {
            return Worked::Job { id, state: JobState::Queued };
        }
        Worked::Job { id, state: JobState::Running }
    }
}
