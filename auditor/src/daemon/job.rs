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
//! move forward; the number of open (queued or running) jobs never exceeds the configured bound.

use std::collections::BTreeMap;
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
    /// The daemon's dataset to replay with (a name of its `[data]`); absent: the one whose
    /// contents are the run's committed data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
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
        // It goes into an Authorization header: a control character would fail every request
        // (locally, retried until the deadline) instead of being refused here.
        if let Some(t) = &self.trainer_token
            && (t.trim().is_empty() || !t.bytes().all(|b| (0x20..0x7f).contains(&b)))
        {
            return Err("trainer_token: empty, or not printable ASCII (it is sent as a bearer token)".into());
        }
        if let Some(d) = &self.data
            && !super::datasets::is_valid_name(d)
        {
            return Err(format!(
                "data: {d:?} is not a dataset name (1 to 64 of [A-Za-z0-9._-], not starting with '.')"
            ));
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
    /// The daemon holding its lease, while `running`.
    pub owner: Option<String>,
    /// The record its durable progress was verified against
    /// ([`crate::replay::RecordView::binding`]); `None` until its first attempt opens it.
    pub commitment: Option<String>,
}

/// Where a work item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemState {
    Pending,
    Claimed,
    Done,
}

impl ItemState {
    pub const ALL: [ItemState; 3] = [ItemState::Pending, ItemState::Claimed, ItemState::Done];

    pub fn name(self) -> &'static str {
        match self {
            ItemState::Pending => "pending",
            ItemState::Claimed => "claimed",
            ItemState::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<ItemState> {
        ItemState::ALL.into_iter().find(|j| j.name() == s)
    }
}

/// One interval of a running audit's plan, replayable by any daemon on the store: steps
/// `(start, end]` from the committed checkpoint at `start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub start: u64,
    pub end: u64,
    pub state: ItemState,
    /// The daemon holding it (claimed), or that finished it (done).
    pub owner: Option<String>,
    pub lease_until_ms: u64,
    /// Claims since its durable progress last moved.
    pub attempts: u32,
    /// Claims in all.
    pub claims: u32,
    /// Claims that took it over from a daemon whose lease had expired.
    pub takeovers: u32,
}

/// What `insert` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(String),
    /// The idempotency key was seen before, with the same request.
    Existing(String),
    /// The idempotency key was seen before with a different request.
    Conflict(String),
    /// Open (queued or running) audits are at the bound.
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
    /// Adds a queued job unless the idempotency key is known or `queued_max` audits are open
    /// (queued or running: requeues and recoveries move audits between the two, so the bound
    /// holds whatever they do).
    fn insert(&self, request: &AuditRequest, queued_max: u64, now_ms: u64) -> Result<Inserted, StoreError>;
    /// The oldest queued job, or a running one whose lease has expired (its daemon died or lost
    /// the store), now `running` with `attempts + 1`, leased to `node` until `now + lease_ms`.
    fn claim(&self, node: &str, now_ms: u64, lease_ms: u64) -> Result<Option<Job>, StoreError>;
    /// Extends `node`'s lease on running job `id`; `false` when it is no longer `node`'s (taken
    /// over after expiry, finished, failed or cancelled): its attempt must stop.
    fn renew(&self, id: &str, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError>;
    /// Publishes the intervals of running job `id`'s plan as work items any daemon on this store
    /// may claim; items already there are kept as they are (a re-planned audit plans the same).
    fn publish(&self, id: &str, intervals: &[(u64, u64)], now_ms: u64) -> Result<(), StoreError>;
    /// A pending item (of job `only`, or of any running job oldest first), or a claimed one whose
    /// lease has expired, now claimed by `node` until `now + lease_ms`.
    fn claim_item(
        &self,
        node: &str,
        only: Option<&str>,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<(Job, Item)>, StoreError>;
    /// Extends `node`'s lease on an item; `false` when it is no longer `node`'s or its job no
    /// longer runs.
    fn renew_item(&self, id: &str, start: u64, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError>;
    /// `node` replayed the item as far as it goes (its durable progress says how far): `done`.
    /// A no-op unless `node` holds it.
    fn item_done(&self, id: &str, start: u64, node: &str, now_ms: u64) -> Result<(), StoreError>;
    /// `node` hands the item back unfinished (shutdown: `refund` gives the claim back).
    fn release_item(&self, id: &str, start: u64, node: &str, refund: bool, now_ms: u64) -> Result<(), StoreError>;
    /// Job `id`'s items, by start.
    fn items(&self, id: &str) -> Result<Vec<Item>, StoreError>;
    /// Binds running job `id`'s durable progress to `commitment`, the record its coordinator
    /// `node` opened ([`crate::replay::RecordView::binding`]), while `node` holds the job. A
    /// commitment other than the bound one drops the job's work items (its plan may differ) and,
    /// unless `keep` (the record extends the bound one: a run that went on), its progress.
    /// `false`, changing nothing, when `node` does not hold the job.
    fn bind(&self, id: &str, node: &str, commitment: &str, keep: bool, now_ms: u64) -> Result<bool, StoreError>;
    /// Records a verified point of a running job bound to `commitment` (ignored unless it moves
    /// forward, or when the job is bound to another record).
    fn save_progress(
        &self,
        id: &str,
        job_start: u64,
        through: u64,
        steps_replayed: u64,
        commitment: &str,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// `running` → `done` with its report, atomically; a no-op for a job already done.
    fn finish(&self, id: &str, decided: &Decided, now_ms: u64) -> Result<(), StoreError>;
    /// `running` or `queued` → `failed`.
    fn fail(&self, id: &str, reason: FailReason, error: &str, now_ms: u64) -> Result<(), StoreError>;
    /// `running` → `queued`, keeping its progress, if `node` holds it. `refund` gives the claim
    /// back (a graceful shutdown is not the job's fault and must not use up its attempts).
    fn requeue(&self, id: &str, node: &str, refund: bool, now_ms: u64) -> Result<(), StoreError>;
    /// At start-up: every lease `node` holds (its workers died with the last process) is
    /// released: its jobs → `queued`, its items → pending. The number of jobs.
    fn recover(&self, node: &str, now_ms: u64) -> Result<u64, StoreError>;
    /// The latest lease that `node` holds past `now_ms` (a job or an item), if any: at start-up,
    /// a lease that is still being renewed means another live daemon uses the same node name.
    /// A store one daemon owns alone (its directory is locked) has none to find.
    fn live_lease(&self, _node: &str, _now_ms: u64) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Records `public_key` as the key every daemon on this store signs with, if none is yet;
    /// the key recorded (this one, or an earlier daemon's). A store one daemon owns alone keeps
    /// its key beside it and records none.
    fn pin_signing_key(&self, public_key: &str) -> Result<String, StoreError> {
        Ok(public_key.to_string())
    }
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Jobs newest first, at most `limit`, optionally only in one state, and only those
    /// submitted before job `before` (the cursor of the previous page).
    fn list(&self, state: Option<JobState>, limit: u64, before: Option<&str>) -> Result<Vec<Job>, StoreError>;
    /// `queued` or `running` → `failed` with reason `cancelled` (a running audit's worker stops
    /// at its next progress write and stores nothing). The state the job is in afterwards;
    /// `None` for an unknown job.
    fn cancel(&self, id: &str, now_ms: u64) -> Result<Option<JobState>, StoreError>;
    /// `failed` → `queued` with its attempts reset and its progress kept, unless `queued_max`
    /// audits are open or it was quarantined. Whether it was requeued, and the state it is in
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

/// How the replay of one interval for another daemon's audit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Replayed as far as it goes (to its end, or to where it stopped reproducing, which the
    /// audit's coordinator finds again); its verified points went to the progress.
    Ended,
    /// Stopped by [`Progress::cancelled`] (shutdown, lease lost): to be taken again.
    Cancelled,
}

/// Runs one attempt of an audit (the trainer client and the replay behind it).
pub trait Runner: Send + Sync {
    /// Runs `job`, resuming from `job.progress`, reporting to `progress`.
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome;
    /// Replays interval `(start, end]` of `job` for the daemon coordinating it, resuming from
    /// `job.progress`, reporting verified points to `progress`.
    fn run_interval(&self, job: &Job, interval: (u64, u64), progress: &dyn Progress) -> ItemOutcome;
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

pub use super::worker::{Worked, Worker, WorkerConfig};
