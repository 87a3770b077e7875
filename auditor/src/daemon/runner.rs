//! The daemon's [`Runner`]: one attempt of an audit against a trainer's record server, signed
//! with the daemon's key.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::record::SigningKey;
use engine::spec::RunSpec;
use kernels::Profile;
use tokio::runtime::Handle;

use super::datasets::Datasets;
use super::job::{Decided, ItemOutcome, Job, Outcome, Runner};
use super::metrics::Metrics;
use crate::http::{HttpTrainer, RetryPolicy};
use crate::replay::{
    AuditOptions, ChooseData, Mode, Opened, RecordView, Resume, SeedChoice, SpotPick, Stop, audit, replay_interval,
};
use crate::report::Report;
use crate::source::{SourceError, TrainerSource};
use crate::{AuditError, Progress, Verdict};

/// Audits over HTTP.
pub struct HttpRunner {
    pub runtime: Handle,
    pub policy: RetryPolicy,
    pub key: SigningKey,
    /// The replay profile when a request names none; `None`: a fast one other than the
    /// trainer's ([`Profile::auditor_default`]).
    pub default_device: Option<Profile>,
    pub data: Arc<Datasets>,
    pub metrics: Metrics,
    /// Set when the daemon shuts down: requests in flight are abandoned at once (the audit is
    /// requeued with its progress), not left to the runtime going away under them.
    pub shutdown: Arc<AtomicBool>,
    /// Wall-clock limit of one attempt (`audit_time_max_ms`).
    pub time_max: Duration,
    /// The allow-list, checked again at every attempt (the config may have changed since the
    /// audit was submitted).
    pub trainers: super::TrainerSection,
    /// The record this daemon last opened to help with another daemon's audit.
    pub helped: HelpedCache,
}

/// The record a helper opened for one audit, reused for every interval of it it takes:
/// checking the commitments and loading the dataset again for each would cost about as much
/// as replaying a short interval. Keyed by everything the opening depends on.
#[derive(Debug, Default)]
pub struct HelpedCache(Mutex<Option<(HelpedKey, Arc<Opened>)>>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct HelpedKey {
    id: String,
    commitment: Option<String>,
    device: Profile,
}

/// One attempt's time. The daemon's own part (everything but waiting for the trainer's
/// answers) is bounded by `audit_time_max_ms`; the trainer's slow answers have a bound of their
/// own (`trainer.slow_answers_max_ms`, [`crate::http::RetryPolicy::slow_answers_max`]), past
/// which the trainer is unresponsive: a trainer answering every request just inside its
/// deadline cannot turn its audit into this daemon's time limit, and an honest one is never
/// accused because the operator's `audit_time_max_ms` is short.
#[derive(Clone)]
struct Budget {
    start: Instant,
    time_max: Duration,
    /// The trainer's answering time ([`HttpTrainer::with_answering_clock`]).
    answering: Arc<crate::http::AnswerClock>,
}

impl Budget {
    fn new(time_max: Duration) -> Budget {
        Budget { start: Instant::now(), time_max, answering: Arc::default() }
    }

    /// Whether the daemon's own part of the attempt has used up its time.
    fn spent(&self) -> bool {
        self.start.elapsed().saturating_sub(self.answering.waited()) >= self.time_max
    }
}

/// The worker's progress, also cancelled when the attempt's time is up.
struct TimeLimited<'a> {
    inner: &'a dyn Progress,
    budget: &'a Budget,
}

impl Progress for TimeLimited<'_> {
    fn begin(&self, steps_total: u64) {
        self.inner.begin(steps_total);
    }
    fn replayed(&self, step: u64, seconds: f64) {
        self.inner.replayed(step, seconds);
    }
    fn verified(&self, job_start: u64, through: u64) {
        self.inner.verified(job_start, through);
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled() || self.budget.spent()
    }
    fn share(&self) -> Option<&dyn crate::replay::Share> {
        self.inner.share()
    }
    fn opened(&self, record: &RecordView<'_>) -> Result<Resume, AuditError> {
        self.inner.opened(record)
    }
    fn heartbeat(&self) {
        self.inner.heartbeat();
    }
}

/// Runs `f` while a thread calls `progress.heartbeat()` every second (the lease of an attempt
/// waiting on a slow trainer stays renewed: without it, the daemon's own next claim took over
/// its live audit once the lease ran out, and repeated takeovers ended it `gave-up`).
fn with_heartbeat<T>(progress: &dyn Progress, f: impl FnOnce() -> T) -> T {
    let (done, beats) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = beats.recv_timeout(Duration::from_secs(1)) {
                progress.heartbeat();
            }
        });
        let out = f();
        drop(done);
        out
    })
}

impl std::fmt::Debug for HttpRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRunner").field("policy", &self.policy).field("data", &self.data).finish_non_exhaustive()
    }
}

/// The audit options a request asks for, resuming from `job.progress`.
pub fn options(job: &Job, default_device: Profile, data: Option<PathBuf>) -> Result<AuditOptions, String> {
    let r = &job.request;
    let device = match &r.device {
        Some(d) => d.parse::<Profile>().map_err(|e| format!("device: {e}"))?,
        None => default_device,
    };
    let mode = match r.mode.as_deref() {
        None | Some("full") => Mode::Full,
        Some("intervals") => Mode::Intervals,
        Some("spot") => {
            let pick = match (r.spot_by.as_deref(), r.spot_seed) {
                (Some("largest-update"), _) => SpotPick::LargestUpdates,
                (_, Some(seed)) => {
                    let chosen = if r.spot_seed_fresh == Some(true) { SeedChoice::Fresh } else { SeedChoice::Given };
                    SpotPick::Random { seed, chosen }
                }
                // Submitted before seeds were drawn at submission: draw one now.
                (_, None) => SpotPick::Random {
                    seed: SeedChoice::fresh_seed().map_err(|e| e.to_string())?,
                    chosen: SeedChoice::Fresh,
                },
            };
            Mode::Spot { count: r.spot_count.unwrap_or(4), pick }
        }
        Some(m) => return Err(format!("mode: {m:?} is not one of full, intervals, spot")),
    };
    Ok(AuditOptions {
        device,
        from: r.from,
        to: r.to,
        mode,
        data,
        choose_data: None,
        resume: job.progress.clone(),
        trainer_key: r.trainer_pubkey.as_ref().map(|k| k.to_ascii_lowercase()),
    })
}

impl HttpRunner {
    /// The replay profile when the request names none: a fast one other than the trainer's.
    fn device_for(&self, src: &HttpTrainer) -> Result<Profile, SourceError> {
        let bytes = src.spec_bytes()?;
        // A spec that does not parse is the trainer's problem; the audit itself says so.
        let trainer = serde_json::from_slice::<RunSpec>(&bytes).ok().and_then(|s| s.device_profile.parse().ok());
        Ok(self.default_device.unwrap_or(Profile::auditor_default(trainer)))
    }

    /// Chooses the dataset from the spec once it has checked out (so a record that does not is
    /// a verdict, whatever its spec says of its data), by the request's name or by contents.
    fn choose_data(&self, job: &Job) -> ChooseData {
        let (datasets, named) = (self.data.clone(), job.request.data.clone());
        ChooseData(Arc::new(move |spec: &RunSpec| datasets.for_spec(spec, named.as_deref())))
    }
}

/// Why an attempt past its time stopped, if it is past it.
fn timed_out(budget: &Budget) -> Option<String> {
    budget.spent().then(|| {
        format!(
            "time-limit: this daemon's own work on the audit (its replay; the trainer's answering time is not \
             counted) ran past its audit_time_max_ms = {}; not a verdict",
            budget.time_max.as_millis()
        )
    })
}

impl HttpRunner {
    /// The trainer client and the audit options of one attempt at `job` that must end by
    /// `budget`; `Err` with the outcome when it cannot start.
    fn prepare(&self, job: &Job, budget: &Budget) -> Result<(HttpTrainer, AuditOptions), Outcome> {
        let r = &job.request;
        self.trainers.check_allowed(&r.trainer_url).map_err(Outcome::Failed)?;
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        let limit = budget.clone();
        let abort = Arc::new(move || {
            if shutdown.load(Ordering::SeqCst) {
                Some("the auditor daemon is shutting down".to_string())
            } else if limit.spent() {
                Some(format!("the audit ran past audit_time_max_ms = {}", limit.time_max.as_millis()))
            } else {
                None
            }
        });
        let src = HttpTrainer::new(
            &r.trainer_url,
            &r.run,
            r.trainer_token.clone(),
            self.policy.clone(),
            self.runtime.clone(),
        )
        .map_err(|e| Outcome::Failed(e.to_string()))?
        .with_error_hook(Arc::new(move |kind| metrics.trainer_error(kind)))
        .with_answering_clock(budget.answering.clone())
        .with_abort(abort);
        let device = match self.device_for(&src) {
            Ok(device) => device,
            Err(SourceError::Unavailable(e)) => {
                return Err(timed_out(budget).map_or(Outcome::Failed(e), Outcome::TimeLimit));
            }
            // Unresponsive or invalid: the audit below reaches the same error as a verdict.
            Err(_) => self.default_device.unwrap_or_default(),
        };
        let mut opts = options(job, device, None).map_err(Outcome::Failed)?;
        opts.choose_data = Some(self.choose_data(job));
        Ok((src, opts))
    }
}

impl Runner for HttpRunner {
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome {
        with_heartbeat(progress, || self.attempt(job, progress))
    }

    fn run_interval(&self, job: &Job, interval: (u64, u64), progress: &dyn Progress) -> ItemOutcome {
        with_heartbeat(progress, || self.attempt_interval(job, interval, progress))
    }
}

impl HttpRunner {
    /// One attempt at `job` ([`Runner::run`]).
    fn attempt(&self, job: &Job, progress: &dyn Progress) -> Outcome {
        let budget = &Budget::new(self.time_max);
        let progress = &TimeLimited { inner: progress, budget };
        let (src, opts) = match self.prepare(job, budget) {
            Ok(prepared) => prepared,
            Err(outcome) => return outcome,
        };
        match audit(&src, &opts, progress) {
            Ok(a) => {
                let report = Report::build(&a, &self.key);
                let first_step = match &a.verdict {
                    Verdict::Diverged { step, .. } | Verdict::ForgedLog { step, .. } => Some(*step),
                    _ => None,
                };
                Outcome::Decided(Decided {
                    verdict: a.verdict.kind(),
                    first_step,
                    steps_replayed: a.steps_replayed,
                    steps_resumed: a.steps_resumed,
                    bisection_queries: a.bisection.map_or(0, |b| u64::from(b.queries)),
                    report_json: report.to_json(),
                    evidence: a.evidence.as_ref().map(|e| e.encode()),
                })
            }
            // Whatever ended it, an attempt past its time is a time limit, not a failure of its own.
            Err(e) => match timed_out(budget) {
                Some(why) => Outcome::TimeLimit(why),
                None if matches!(e, AuditError::Cancelled) => Outcome::Cancelled,
                None => Outcome::Failed(e.to_string()),
            },
        }
    }

    /// One interval of `job` ([`Runner::run_interval`]).
    fn attempt_interval(&self, job: &Job, interval: (u64, u64), progress: &dyn Progress) -> ItemOutcome {
        let budget = &Budget::new(self.time_max);
        let progress = &TimeLimited { inner: progress, budget };
        // Whatever stops a helper early (an unreachable trainer, a record that does not check
        // out) is the coordinator's to find again and decide: the interval ends here.
        let (src, mut opts) = match self.prepare(job, budget) {
            Ok(prepared) => prepared,
            Err(outcome) => {
                tracing::info!(?outcome, "interval not replayed here; the audit's coordinator replays it");
                return ItemOutcome::Ended;
            }
        };
        // A helper replays on the coordinator's profile (which its binding names), not on its
        // own default: the report names one profile for every step.
        if job.request.device.is_none()
            && let Some(device) = job.commitment.as_deref().and_then(crate::replay::RecordView::device_of)
        {
            opts.device = device;
        }
        let key = HelpedKey { id: job.id.clone(), commitment: job.commitment.clone(), device: opts.device };
        let cached = {
            let helped = self.helped.0.lock().unwrap_or_else(|p| p.into_inner());
            helped.as_ref().filter(|(k, _)| *k == key).map(|(_, o)| o.clone())
        };
        let opened = match cached {
            Some(opened) => opened,
            None => match Opened::open(&src, &opts) {
                Ok(opened) => {
                    let opened = Arc::new(opened);
                    *self.helped.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, opened.clone()));
                    opened
                }
                Err(Stop::Undecided(AuditError::Cancelled)) if !budget.spent() => return ItemOutcome::Cancelled,
                Err(e) => {
                    tracing::info!(error = ?e, "interval not replayed here; the audit's coordinator replays it");
                    return ItemOutcome::Ended;
                }
            },
        };
        match replay_interval(&src, &opened, interval, &opts.resume, progress) {
            Err(AuditError::Cancelled) if !budget.spent() => ItemOutcome::Cancelled,
            Ok(()) | Err(_) => ItemOutcome::Ended,
        }
    }
}
