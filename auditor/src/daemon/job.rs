//! The audit job: what a client asks for, its states, and the worker logic that takes a job
//! from `queued` to `done` or `failed`, written against three small traits ([`Store`],
//! [`Runner`], [`Clock`]) so that a seeded simulation can drive it with injected store
//! failures, trainer timeouts and crashes (`tests/daemon_sim.rs`).
//!
//! # States
//! ```text
//!  submit ─▶ queued ──claim──▶ running ──decided──▶ done   (report stored in the same transaction)
//!              ▲                  │ ├──could not decide──▶ failed (reason undecided)
//!              │                  │ ├──audit_time_max_ms passed──▶ failed (reason time-limit)
//!              └── requeue ◀──────┘ └──attempts exhausted──▶ failed (reason gave-up)
//!                 (shutdown, crash recovery, a report that could not be stored)
//! ```
//! A failed audit is never a verdict: its [`FailReason`] says why the auditor stopped.
//! Invariants the store keeps: a job is `done` exactly when its report is stored; a report is
//! written once (a second `finish` of a done job is a no-op); progress points of a job only
//! move forward; the number of `queued` jobs never exceeds the configured bound.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Progress, VerdictKind};

/// The body of `POST /v1/audits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRequest {
    /// The trainer's record server, `http://host:port`.
    pub trainer_url: String,
    /// The run id on that server.
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_token: Option<String>,
    /// Replay profile; default the daemon's configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// `full` (default), `intervals` or `spot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Spot mode: how many intervals (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_count: Option<usize>,
    /// Spot mode: the seed of a uniform draw. Absent: a fresh seed is drawn from the
    /// daemon's randomness when the audit is submitted (and kept with it, so every attempt
    /// replays the same intervals), unless `spot_by` is `largest-update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_seed: Option<u64>,
    /// Spot mode: `random` (default) or `largest-update` (proof-of-learning's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_by: Option<String>,
    /// Set by the daemon, never by a client: `spot_seed` was drawn fresh at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_seed_fresh: Option<bool>,
    /// The trainer's ed25519 public key (hex) to pin: a record signed by another key is
    /// `commitment-invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_pubkey: Option<String>,
    /// Resubmitting with the same key returns the same audit instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The id of the job stored with sequence number `seq` (ids are stable across restarts).
pub fn job_id(seq: i64) -> String {
    format!("audit-{seq}")
}

/// Whether `s` has the shape of a [`job_id`] (checked before it reaches the store).
pub fn is_job_id(s: &str) -> bool {
    s.len() <= 32 && s.strip_prefix("audit-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Longest idempotency key, trainer URL, run id or token accepted.
pub const FIELD_BYTES_MAX: usize = 512;

impl AuditRequest {
    /// The request as its client sent it, without what the daemon filled in at submission.
    pub fn as_submitted(&self) -> AuditRequest {
        let mut r = self.clone();
        if r.spot_seed_fresh == Some(true) {
            r.spot_seed = None;
        }
        r.spot_seed_fresh = None;
        r
    }

    /// Checks everything that can be checked without contacting the trainer; the message names
    /// the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("trainer_url", Some(&self.trainer_url)),
            ("run", Some(&self.run)),
            ("trainer_token", self.trainer_token.as_ref()),
            ("idempotency_key", self.idempotency_key.as_ref()),
            ("device", self.device.as_ref()),
            ("mode", self.mode.as_ref()),
        ] {
            if let Some(v) = v
                && v.len() > FIELD_BYTES_MAX
            {
                return Err(format!("{name}: longer than {FIELD_BYTES_MAX} bytes"));
            }
        }
        crate::http::parse_trainer_url(&self.trainer_url).map_err(|e| format!("trainer_url: {e}"))?;
        if !engine::wire::is_valid_run_id(&self.run) {
            return Err(format!("run: {:?} is not a run id ([A-Za-z0-9._-], not starting with '.')", self.run));
        }
        if let Some(d) = &self.device {
            d.parse::<kernels::Profile>().map_err(|e| format!("device: {e}"))?;
        }
        match self.mode.as_deref() {
            None | Some("full" | "intervals") => {}
            Some("spot") => {
                if self.spot_count == Some(0) {
                    return Err("spot_count: must be at least 1".into());
                }
            }
            Some(m) => return Err(format!("mode: {m:?} is not one of full, intervals, spot")),
        }
        if self.mode.as_deref() != Some("spot")
            && (self.spot_count.is_some() || self.spot_seed.is_some() || self.spot_by.is_some())
        {
            return Err("spot_count/spot_seed/spot_by: only with mode \"spot\"".into());
        }
        match self.spot_by.as_deref() {
            None | Some("random") => {}
            Some("largest-update") if self.spot_seed.is_none() => {}
            Some("largest-update") => return Err("spot_seed: not with spot_by \"largest-update\"".into()),
            Some(b) => return Err(format!("spot_by: {b:?} is not one of random, largest-update")),
        }
        if self.spot_seed_fresh.is_some() {
            return Err("spot_seed_fresh: set by the daemon, not by a request".into());
        }
        if let Some(k) = &self.trainer_pubkey
            && (k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("trainer_pubkey: not 64 hex digits (an ed25519 public key)".into());
        }
        if let (Some(f), Some(t)) = (self.from, self.to)
            && f > t
        {
            return Err(format!("from: {f} is after to: {t}"));
        }
        Ok(())
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 4] = [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|j| j.name() == s)
    }
}

/// Why a job ended `failed` (none of them is a verdict against the trainer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The audit could not decide: a bad request, the auditor's own data, I/O or limits, a
    /// trainer that never answered the first request.
    Undecided,
    /// It ran past the daemon's `audit_time_max_ms` (the trainer was slow, but never silent for
    /// `trainer.deadline_ms`).
    TimeLimit,
    /// `attempts_max` claims in a row ended without verifying a new step.
    GaveUp,
    /// Its stored row no longer parses; it was set aside so that other audits can run.
    Quarantined,
    /// A client cancelled it (`DELETE /v1/audits/{id}`).
    Cancelled,
}

impl FailReason {
    pub const ALL: [FailReason; 5] = [
        FailReason::Undecided,
        FailReason::TimeLimit,
        FailReason::GaveUp,
        FailReason::Quarantined,
        FailReason::Cancelled,
    ];

    /// The wire name (status JSON, the store, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Undecided => "undecided",
            FailReason::TimeLimit => "time-limit",
            FailReason::GaveUp => "gave-up",
            FailReason::Quarantined => "quarantined",
            FailReason::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<FailReason> {
        FailReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub request: AuditRequest,
    pub state: JobState,
    /// Claims since the audit last made durable progress (1 on the first run; more after
    /// crashes or failed final writes that did not move it forward).
    pub attempts: u32,
    /// Durable progress: replay job start → last verified step.
    pub progress: BTreeMap<u64, u64>,
    /// Steps checked, as of the last durable progress point or the finished audit.
    pub steps_replayed: u64,
    /// Steps the latest attempt did not replay because an earlier one had verified them.
    pub steps_resumed: u64,
    pub verdict: Option<VerdictKind>,
    pub first_step: Option<u64>,
    pub error: Option<String>,
    /// Set when `failed`.
    pub reason: Option<FailReason>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What `insert` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(String),
    /// The idempotency key was seen before, with the same request.
    Existing(String),
    /// The idempotency key was seen before with a different request.
    Conflict(String),
    /// `queued` jobs are at the bound.
    QueueFull,
}

/// A decided audit, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub verdict: VerdictKind,
    pub first_step: Option<u64>,
    pub steps_replayed: u64,
    pub steps_resumed: u64,
    /// Node-hash queries the bisection sent (a metric; not stored).
    pub bisection_queries: u64,
    /// The signed report, exactly as served.
    pub report_json: String,
    /// The evidence bundle, for a verdict at a step.
    pub evidence: Option<Vec<u8>>,
}

/// A store failure; the operation did not happen (stores are transactional).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Durable job storage. Every method is one transaction.
pub trait Store: Send + Sync {
    /// Adds a queued job unless the idempotency key is known or the queue is full.
    fn insert(&self, request: &AuditRequest, queued_max: u64, now_ms: u64) -> Result<Inserted, StoreError>;
    /// The oldest queued job, now `running` with `attempts + 1`.
    fn claim(&self, now_ms: u64) -> Result<Option<Job>, StoreError>;
    /// Records a verified point of a running job (ignored unless it moves forward).
    fn save_progress(
        &self,
        id: &str,
        job_start: u64,
        through: u64,
        steps_replayed: u64,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// `running` → `done` with its report, atomically; a no-op for a job already done.
    fn finish(&self, id: &str, decided: &Decided, now_ms: u64) -> Result<(), StoreError>;
    /// `running` or `queued` → `failed`.
    fn fail(&self, id: &str, reason: FailReason, error: &str, now_ms: u64) -> Result<(), StoreError>;
    /// `running` → `queued`, keeping its progress. `refund` gives the claim back (a graceful
    /// shutdown is not the job's fault and must not use up its attempts).
    fn requeue(&self, id: &str, refund: bool, now_ms: u64) -> Result<(), StoreError>;
    /// At start-up: every `running` job (its worker died with the last process) → `queued`.
    fn recover(&self, now_ms: u64) -> Result<u64, StoreError>;
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Jobs newest first, at most `limit`, optionally only in one state, and only those
    /// submitted before job `before` (the cursor of the previous page).
    fn list(&self, state: Option<JobState>, limit: u64, before: Option<&str>) -> Result<Vec<Job>, StoreError>;
    /// `queued` or `running` → `failed` with reason `cancelled` (a running audit's worker stops
    /// at its next progress write and stores nothing). The state the job is in afterwards;
    /// `None` for an unknown job.
    fn cancel(&self, id: &str, now_ms: u64) -> Result<Option<JobState>, StoreError>;
    /// `failed` → `queued` with its attempts reset and its progress kept, unless `queued_max`
    /// jobs are queued or it was quarantined. Whether it was requeued, and the state it is in
    /// afterwards; `None` for an unknown job.
    fn retry(&self, id: &str, queued_max: u64, now_ms: u64) -> Result<Option<(bool, JobState)>, StoreError>;
    /// Whether job `id` is still `running` (a worker asks after each progress write).
    fn still_running(&self, id: &str) -> Result<bool, StoreError>;
    fn report(&self, id: &str) -> Result<Option<String>, StoreError>;
    fn evidence(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Reports stored for a job (0 or 1; more would be a bug the simulation looks for).
    fn report_count(&self, id: &str) -> Result<u64, StoreError>;
    /// Whether audit `id` has an evidence bundle (without reading it).
    fn has_evidence(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.evidence(id)?.is_some())
    }
    fn count(&self, state: JobState) -> Result<u64, StoreError>;
    /// Whether the store is sound (an integrity check; `/healthz` says why not).
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Time, injectable: the simulation runs on a virtual clock.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
    /// Blocks the calling (worker) thread.
    fn sleep(&self, d: Duration);
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// How one attempt of an audit ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Decided(Decided),
    /// The audit could not decide (bad request, the auditor's own data or I/O): final.
    Failed(String),
    /// Stopped at the daemon's per-audit time limit: final, and not a verdict.
    TimeLimit(String),
    /// Stopped by [`Progress::cancelled`] (shutdown): to be resumed.
    Cancelled,
}

/// Runs one attempt of an audit (the trainer client and the replay behind it).
pub trait Runner: Send + Sync {
    /// Runs `job`, resuming from `job.progress`, reporting to `progress`.
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome;
}

/// Counters the worker reports to (the daemon's metrics; nothing in tests).
pub trait Observer: Send + Sync {
    /// An attempt of audit `id` is about to replay `steps_total` steps; `resumed` were checked
    /// by earlier attempts.
    fn begun(&self, _id: &str, _steps_total: u64, _resumed: u64) {}
    fn step_replayed(&self, _id: &str, _step: u64, _seconds: f64) {}
    /// The attempt of audit `id` ended, whatever its outcome.
    fn ended(&self, _id: &str) {}
    fn store_error(&self, _op: &str) {}
    fn decided(&self, _decided: &Decided) {}
    fn failed(&self, _reason: FailReason) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;
impl Observer for NoObserver {}

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
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { attempts_max: 5, progress_interval_ms: 500, store_tries: 5, store_backoff_ms: 100 }
    }
}

/// Persists progress (throttled), counts steps, and answers cancellation.
struct JobProgress<'a> {
    store: &'a dyn Store,
    clock: &'a dyn Clock,
    observer: &'a dyn Observer,
    id: &'a str,
    interval_ms: u64,
    cancel: &'a AtomicBool,
    /// Steps checked so far (resumed ones included).
    steps: AtomicU64,
    /// job start → (verified through, saved through, saved at ms).
    points: Mutex<BTreeMap<u64, (u64, u64, u64)>>,
    /// The job is no longer `running` in the store (cancelled by a client): stop.
    stopped: AtomicBool,
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
            if e.0 <= e.1 || !(force || now.saturating_sub(e.2) >= self.interval_ms) {
                return;
            }
            e.0
        };
        let steps = self.steps.load(Ordering::SeqCst);
        match self.store.save_progress(self.id, job_start, verified, steps, now) {
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

    /// Writes every point not yet durable (before a requeue).
    fn flush(&self) {
        let pending: Vec<(u64, u64)> = {
            let points = self.points.lock().unwrap_or_else(|p| p.into_inner());
            points.iter().filter(|(_, p)| p.0 > p.1).map(|(&s, p)| (s, p.0)).collect()
        };
        for (start, through) in pending {
            self.save(start, through, true);
        }
    }
}

impl Progress for JobProgress<'_> {
    fn begin(&self, steps_total: u64) {
        self.observer.begun(self.id, steps_total, self.steps.load(Ordering::SeqCst));
    }
    fn replayed(&self, step: u64, seconds: f64) {
        self.steps.fetch_add(1, Ordering::SeqCst);
        self.observer.step_replayed(self.id, step, seconds);
    }
    fn verified(&self, job_start: u64, through: u64) {
        self.save(job_start, through, false);
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.stopped.load(Ordering::SeqCst)
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
    /// Nothing was queued.
    Idle,
    /// The claim itself failed; try again later.
    StoreUnavailable,
    /// The job reached this state (or stayed `running` when its final write kept failing; crash
    /// recovery requeues it at the next start).
    Job { id: String, state: JobState },
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

    /// Claims the oldest queued job and takes it as far as it goes. Blocking: call it from a
    /// blocking thread.
    pub fn work_one(&self) -> Worked {
        let job = match self.store.claim(self.clock.now_ms()) {
            Ok(Some(job)) => job,
            Ok(None) => return Worked::Idle,
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
                tracing::error!("its final store write kept failing; start-up recovery will requeue it")
            }
            Worked::Job { state, .. } => tracing::info!(state = state.name(), "attempt ended"),
            _ => {}
        }
        worked
    }

    fn work_on(&self, job: Job) -> Worked {
        let id = job.id.clone();
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
        let progress = JobProgress {
            store: &*self.store,
            clock: &*self.clock,
            observer: &*self.observer,
            id: &id,
            interval_ms: self.config.progress_interval_ms,
            cancel: &self.cancel,
            // Verified steps that are durable count as checked already.
            steps: AtomicU64::new(job.progress.iter().map(|(&s, &t)| t.saturating_sub(s)).sum()),
            points: Mutex::new(job.progress.iter().map(|(&s, &t)| (s, (t, t, 0))).collect()),
            stopped: AtomicBool::new(false),
        };
        let outcome = self.runner.run(&job, &progress);
        self.observer.ended(&id);
        if progress.stopped.load(Ordering::SeqCst) {
            // Cancelled by a client while it ran: the store already says failed; nothing to write.
            return Worked::Job { id, state: JobState::Failed };
        }
        let outcome = match outcome {
            // A failure while the daemon shuts down may be the shutdown itself (a request
            // abandoned, the runtime going away): never final, the audit runs again.
            Outcome::Failed(_) | Outcome::TimeLimit(_) if self.cancel.load(Ordering::SeqCst) => Outcome::Cancelled,
            o => o,
        };
        let now = || self.clock.now_ms();
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
                progress.flush();
                (self.must("requeue", || self.store.requeue(&id, true, now())), JobState::Queued)
            }
        };
        if ok {
            return Worked::Job { id, state: target };
        }
        // The final write kept failing: hand the job back so it runs again (resuming), rather
        // than leave it running with nobody on it. If even that fails, start-up recovery will.
        if target != JobState::Queued && self.must("requeue", || self.store.requeue(&id, false, now())) {
            return Worked::Job { id, state: JobState::Queued };
        }
        Worked::Job { id, state: JobState::Running }
    }
}
