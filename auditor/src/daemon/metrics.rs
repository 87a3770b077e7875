//! Prometheus metrics of the daemon, every name prefixed `tiebreak_auditor_`, served at `/metrics`.
//! Labelled counters are present at 0 from the start, so rates are defined before the first event.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::job::{Decided, FailReason, JobState, Observer, Store};
use crate::VerdictKind;

/// The daemon's metrics, on a registry of their own (not the process-global one, so that
/// several daemons in one test process do not share counters).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub audits: IntGaugeVec,
    pub submitted: IntCounter,
    pub steps_replayed: IntCounter,
    pub replay_step_seconds: Histogram,
    pub bisection_queries: IntCounter,
    pub divergences: IntCounter,
    pub verdicts: IntCounterVec,
    pub failed: IntCounterVec,
    pub trainer_request_errors: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub http_requests: IntCounterVec,
    /// Live progress of the running attempts (for the status route, not exported).
    pub live: std::sync::Arc<super::live::Live>,
    /// The last store operation that failed, and when (for `/healthz`, and to log it).
    last_store_error: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let audits =
            IntGaugeVec::new(Opts::new("tiebreak_auditor_audits", "Audits in the store, by state"), &["state"])
                .expect("valid metric");
        let submitted =
            IntCounter::new("tiebreak_auditor_audits_submitted_total", "Audits accepted by POST /v1/audits")
                .expect("valid metric");
        let steps_replayed =
            IntCounter::new("tiebreak_auditor_steps_replayed_total", "Training steps replayed").expect("valid metric");
        let replay_step_seconds = Histogram::with_opts(
            HistogramOpts::new("tiebreak_auditor_replay_step_seconds", "Wall-clock seconds to replay one step")
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let bisection_queries = IntCounter::new(
            "tiebreak_auditor_bisection_queries_total",
            "Node-hash queries sent to trainers while bisecting",
        )
        .expect("valid metric");
        let divergences = IntCounter::new(
            "tiebreak_auditor_divergences_total",
            "Audits that found a first diverging step (verdict diverged or forged-log)",
        )
        .expect("valid metric");
        let verdicts = IntCounterVec::new(
            Opts::new("tiebreak_auditor_verdicts_total", "Decided audits, by verdict"),
            &["verdict"],
        )
        .expect("valid metric");
        let failed = IntCounterVec::new(
            Opts::new("tiebreak_auditor_audits_failed_total", "Audits that ended failed (never a verdict), by reason"),
            &["reason"],
        )
        .expect("valid metric");
        // Present at 0 from the start, so a rate over them is defined before the first event.
        for r in FailReason::ALL {
            failed.with_label_values(&[r.as_str()]);
        }
        for v in VerdictKind::ALL {
            verdicts.with_label_values(&[v.as_str()]);
        }
        let trainer_request_errors = IntCounterVec::new(
            Opts::new(
                "tiebreak_auditor_trainer_request_errors_total",
                "Failed requests to trainers (retried or not), by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new("tiebreak_auditor_store_errors_total", "Failed writes to the state store, by operation"),
            &["op"],
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new("tiebreak_auditor_http_requests_total", "HTTP requests answered, by method and status"),
            &["method", "status"],
        )
        .expect("valid metric");
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new("tiebreak_auditor_build_info", "Always 1; the labels say which build runs"),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[crate::AUDITOR_VERSION]).set(1);
        for s in JobState::ALL {
            audits.with_label_values(&[s.name()]);
        }
        for c in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(http_requests.clone()),
            Box::new(audits.clone()),
            Box::new(submitted.clone()),
            Box::new(steps_replayed.clone()),
            Box::new(replay_step_seconds.clone()),
            Box::new(bisection_queries.clone()),
            Box::new(divergences.clone()),
            Box::new(verdicts.clone()),
            Box::new(failed.clone()),
            Box::new(trainer_request_errors.clone()),
            Box::new(store_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            audits,
            submitted,
            steps_replayed,
            replay_step_seconds,
            bisection_queries,
            divergences,
            verdicts,
            failed,
            trainer_request_errors,
            store_errors,
            http_requests,
            live: Default::default(),
            last_store_error: Default::default(),
        }
    }

    /// The text exposition, with the per-state gauges read from the store first (so they are
    /// right across restarts).
    pub fn render(&self, store: &dyn Store) -> String {
        for s in JobState::ALL {
            match store.count(s) {
                Ok(n) => self.audits.with_label_values(&[s.name()]).set(i64::try_from(n).unwrap_or(i64::MAX)),
                Err(_) => self.store_errors.with_label_values(&["count"]).inc(),
            }
        }
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        let mut text = String::from_utf8(out).expect("prometheus text is UTF-8");
        text.push_str(&service::process_metrics("tiebreak_auditor"));
        text
    }

    /// Counts a failed trainer request.
    pub fn trainer_error(&self, kind: &str) {
        self.trainer_request_errors.with_label_values(&[kind]).inc();
    }
}

/// Least time between two log lines about failing store operations.
const STORE_ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Metrics {
    /// The store operation that failed last, and how long ago, if within `within`.
    pub fn recent_store_error(&self, within: std::time::Duration) -> Option<(String, std::time::Duration)> {
        let last = self.last_store_error.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|(at, op)| (op.clone(), at.elapsed())).filter(|(_, ago)| *ago < within)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Observer for Metrics {
    fn begun(&self, id: &str, steps_total: u64, resumed: u64) {
        self.live.begin(id, steps_total, resumed);
    }
    fn step_replayed(&self, id: &str, step: u64, seconds: f64) {
        self.steps_replayed.inc();
        self.replay_step_seconds.observe(seconds);
        self.live.step(id, step, seconds);
    }
    fn ended(&self, id: &str) {
        self.live.end(id);
    }
    fn store_error(&self, op: &str) {
        self.store_errors.with_label_values(&[op]).inc();
        let mut last = self.last_store_error.lock().unwrap_or_else(|p| p.into_inner());
        // Logged at most every 10 s: a full disk fails every poll.
        if last.as_ref().is_none_or(|(at, _)| at.elapsed() >= STORE_ERROR_LOG_EVERY) {
            tracing::error!(op, "a store operation failed (see tiebreak_auditor_store_errors_total)");
            *last = Some((std::time::Instant::now(), op.to_string()));
        }
    }
    fn failed(&self, reason: FailReason) {
        self.failed.with_label_values(&[reason.as_str()]).inc();
    }
    fn decided(&self, d: &Decided) {
        self.verdicts.with_label_values(&[d.verdict.as_str()]).inc();
        self.bisection_queries.inc_by(d.bisection_queries);
        if matches!(d.verdict, VerdictKind::Diverged | VerdictKind::ForgedLog) {
            self.divergences.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_failed_store_operation_is_recent_for_a_while_and_counted() {
        let m = Metrics::new();
        assert!(m.recent_store_error(Duration::from_secs(30)).is_none());
        m.store_error("save_progress");
        m.store_error("claim");
        let (op, ago) = m.recent_store_error(Duration::from_secs(30)).expect("recent");
        // The first of a burst is the one remembered (and logged); both are counted.
        assert_eq!(op, "save_progress");
        assert!(ago < Duration::from_secs(30));
        assert!(m.recent_store_error(Duration::ZERO).is_none(), "older than no time at all");
        assert_eq!(m.store_errors.with_label_values(&["claim"]).get(), 1);
    }
}
