//! [`TrainerSource`] over a trainer's record server (`trainer-agent serve`, protocol in
//! [`engine::wire`]), with per-request timeouts, retries with exponential backoff, a deadline
//! after which the trainer counts as unresponsive, and a bound on every response body.
//!
//! The trait is synchronous (replay is CPU-bound and runs on blocking threads and the rayon
//! pool); each call drives one async request on the runtime behind the [`Handle`] it was built
//! with. Never call it from an async task: `Handle::block_on` panics there.
//!
//! What the trainer sends is classified, not trusted: a 404 or 422 about the record, or a body
//! that does not decode, is the trainer's commitment failing ([`SourceError::Invalid`]);
//! timeouts, refused connections, 5xx and 503 `busy` are retried and end as
//! [`SourceError::Unresponsive`] once the deadline passes; any other answer (a redirect, which
//! is never followed, 400, 401, 403, an unknown run) is a refusal ([`SourceError::Refused`]),
//! which the replay holds against the trainer once it has committed. The trainer's error text
//! is logged, never put in a verdict. The replay re-checks every hash anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::codec::{Hash, from_hex};
use common::leaf::{BatchIndices, LEAF_BYTES, Leaf};
use common::state::TrainingState;
use common::tielog::{TieBreakLog, decompress_bounded};
use engine::record::{self, Manifest};
use engine::wire::{self, ErrorBody, path};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use crate::source::{SourceError, TrainerSource, record_file};

mod policy;

use policy::trainer_client;
pub use policy::{AnswerClock, RetryPolicy, SLOW_ANSWER_BYTES_PER_S, SLOW_ANSWER_FREE, host_port, parse_trainer_url};

/// Called with a short kind (`timeout`, `connect`, `status-503`, ...) for every failed request,
/// retried or not (the daemon counts them in a metric).
pub type ErrorHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Asked while a request is in flight (every [`ABORT_POLL`]): `Some(why)` abandons it at once
/// with [`SourceError::Unavailable`] (the auditor stopped the audit: a shutdown, its time
/// limit), never a verdict.
pub type AbortCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// How often an in-flight request asks its [`AbortCheck`].
pub const ABORT_POLL: Duration = Duration::from_millis(25);

/// A run on a trainer's record server.
#[derive(Clone)]
pub struct HttpTrainer {
    base: String,
    run: String,
    token: Option<String>,
    client: reqwest::Client,
    runtime: Handle,
    policy: RetryPolicy,
    on_error: Option<ErrorHook>,
    abort: Option<AbortCheck>,
    /// The spec, fetched once per source (it never changes for a run; the daemon reads it to
    /// pick a dataset before the audit reads it again). An error is kept too, so an
    /// unresponsive trainer costs one deadline, not two.
    spec: Arc<std::sync::OnceLock<Result<Vec<u8>, SourceError>>>,
    /// The spec parsed once (`None`: it does not parse), for the honest sizes of answers: read
    /// on every batch, state and checkpoint request.
    parsed: Arc<std::sync::OnceLock<Option<engine::spec::RunSpec>>>,
    /// Held while a frame past [`BIG`] bytes is decompressed.
    big_frames: Arc<std::sync::Mutex<()>>,
    /// Time spent waiting for the trainer's answers (all clones).
    answering: Arc<AnswerClock>,
    /// The part of it that was slow ([`RetryPolicy::slow_answers_max`]), in microseconds.
    slow: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for HttpTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("HttpTrainer").field("base", &self.base).field("run", &self.run).finish_non_exhaustive()
    }
}

/// A failed attempt: retry it, or give up with this error.
enum Attempt {
    Retry(String),
    Fail(SourceError),
}

impl HttpTrainer {
    /// `base` is the server's URL (`http://host:port`), `run` the run id on it.
    pub fn new(
        base: &str,
        run: &str,
        token: Option<String>,
        policy: RetryPolicy,
        runtime: Handle,
    ) -> Result<HttpTrainer, SourceError> {
        // Checked before anything is formatted with it, so a password never reaches a message.
        parse_trainer_url(base).map_err(|e| SourceError::Unavailable(format!("trainer_url: {e}")))?;
        let base = base.trim_end_matches('/').to_string();
        if !wire::is_valid_run_id(run) {
            return Err(SourceError::Unavailable(format!(
                "run {run:?} is not a valid run id (1-{} bytes of [A-Za-z0-9._-], not starting with '.')",
                wire::RUN_ID_BYTES_MAX
            )));
        }
        let client = trainer_client(&policy)?;
        Ok(HttpTrainer {
            base,
            run: run.to_string(),
            token,
            client,
            runtime,
            policy,
            on_error: None,
            abort: None,
            spec: Arc::new(std::sync::OnceLock::new()),
            parsed: Arc::default(),
            big_frames: Arc::default(),
            answering: Arc::default(),
            slow: Arc::default(),
        })
    }

    /// Reports every failed request to `hook`.
    pub fn with_error_hook(mut self, hook: ErrorHook) -> Self {
        self.on_error = Some(hook);
        self
    }

    /// Abandons requests in flight when `check` says so.
    pub fn with_abort(mut self, check: AbortCheck) -> Self {
        self.abort = Some(check);
        self
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    /// The slow part of the time spent waiting for the trainer's answers, summed over this
    /// source and its clones (see [`RetryPolicy::slow_answers_max`]).
    fn slow_answering(&self) -> Duration {
        Duration::from_micros(self.slow.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Keeps the time spent waiting for answers (retries and answers in flight included) on
    /// `clock`, which the caller holds too.
    pub fn with_answering_clock(mut self, clock: Arc<AnswerClock>) -> Self {
        self.answering = clock;
        self
    }

    fn failed(&self, kind: &str) {
        if let Some(h) = &self.on_error {
            h(kind);
        }
    }

    /// GET `path` with retries (the body, or `Ok(None)` for a 404 with code `unfinished`), where
    /// no honest answer is larger than `honest_max` bytes when that is known (from the record
    /// format's limits, the request or the run's spec). A larger body is the trainer's answer
    /// being wrong, and is not read further; an honest size over `response_bytes_max` is read
    /// all the same. Without a known honest size, past `response_bytes_max` the auditor cannot
    /// decide.
    fn get_bounded(&self, path: &str, honest_max: Option<u64>) -> Result<Option<Vec<u8>>, SourceError> {
        self.runtime.block_on(self.get_async(path, honest_max, self.policy.deadline))
    }

    async fn get_async(
        &self,
        path: &str,
        honest_max: Option<u64>,
        deadline: Duration,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        if let Some(max) = self.policy.slow_answers_max {
            let slow = self.slow_answering();
            if slow >= max {
                return Err(SourceError::Unresponsive {
                    what: format!(
                        "GET {path} not asked: the trainer's answers have been slow for {:.1} s in all (beyond {} s \
                         each and 1 s per MiB), past the {:.1} s this auditor allows (trainer.slow_answers_max_ms)",
                        slow.as_secs_f64(),
                        SLOW_ANSWER_FREE.as_secs(),
                        max.as_secs_f64()
                    ),
                });
            }
        }
        let started = Instant::now();
        let clocked = self.answering.started();
        let got = self.get_aborting(path, honest_max, deadline).await;
        self.answering.ended(clocked);
        let took = started.elapsed();
        let bytes = match &got {
            Ok(Some(body)) => body.len(),
            _ => 0,
        };
        let allowed = SLOW_ANSWER_FREE + Duration::from_secs_f64(bytes as f64 / SLOW_ANSWER_BYTES_PER_S);
        let slow = u64::try_from(took.saturating_sub(allowed).as_micros()).unwrap_or(u64::MAX);
        self.slow.fetch_add(slow, std::sync::atomic::Ordering::Relaxed);
        got
    }

    async fn get_aborting(
        &self,
        path: &str,
        honest_max: Option<u64>,
        deadline: Duration,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(check) = self.abort.clone() else {
            return self.get_retrying(path, honest_max, deadline).await;
        };
        let aborted = async move {
            loop {
                if let Some(why) = check() {
                    return why;
                }
                tokio::time::sleep(ABORT_POLL).await;
            }
        };
        tokio::select! {
            got = self.get_retrying(path, honest_max, deadline) => got,
            why = aborted => Err(SourceError::Unavailable(format!("GET {path}: abandoned: {why}"))),
        }
    }

    /// Retries until an answer, a final failure, or the deadline: the only way to
    /// [`SourceError::Unresponsive`], whose text says exactly how long the trainer was silent.
    async fn get_retrying(
        &self,
        path: &str,
        honest_max: Option<u64>,
        deadline: Duration,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let url = format!("{}{path}", self.base);
        let first = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let why = match self.attempt(&url, path, honest_max).await {
                Ok(body) => return Ok(body),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(why)) => why,
            };
            let elapsed = first.elapsed();
            if elapsed >= deadline {
                return Err(SourceError::Unresponsive {
                    what: format!(
                        "GET {path}: no answer for {:.1} s, past the {:.1} s deadline ({attempt} attempts; the last: {why})",
                        elapsed.as_secs_f64(),
                        deadline.as_secs_f64()
                    ),
                });
            }
            // The last wait ends at the deadline, so one more attempt is made right there.
            tokio::time::sleep(self.policy.backoff(attempt).min(deadline - elapsed)).await;
        }
    }

    async fn attempt(&self, url: &str, path: &str, honest_max: Option<u64>) -> Result<Option<Vec<u8>>, Attempt> {
        let mut req = self.client.get(url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                // A certificate this auditor does not trust will not become trusted by retrying:
                // its own configuration (the CA it was given), said at once, naming the cause.
                let chain = service::error_text(&e);
                if chain.to_ascii_lowercase().contains("certificate") {
                    self.failed("tls");
                    return Err(Attempt::Fail(SourceError::Unavailable(format!(
                        "GET {path}: the trainer's TLS certificate is not trusted here ({chain}); give its CA with \
                         --ca-file (trainer.ca_file in the daemon's config)"
                    ))));
                }
                let kind = if e.is_timeout() { "timeout" } else { "connect" };
                self.failed(kind);
                return Err(Attempt::Retry(format!("{kind}: {chain}")));
            }
        };
        let status = resp.status().as_u16();
        let body = match self.read_body(resp, path, honest_max).await {
            Ok(b) => b,
            Err(a) => {
                if let Attempt::Retry(_) = &a {
                    self.failed("body");
                }
                return Err(a);
            }
        };
        if status == 200 {
            return Ok(Some(body));
        }
        self.failed(&format!("status-{status}"));
        // Only the error code is read from the trainer's body; its words never go into a
        // verdict: a signed report carries only the auditor's description of what happened.
        let err: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let code = err.as_ref().map(|e| e.code.clone()).unwrap_or_default();
        let invalid = |what: String| Attempt::Fail(SourceError::Invalid { file: path.to_string(), offset: None, what });
        match (status, code.as_str()) {
            (404, wire::code::UNFINISHED) => Ok(None),
            (404, wire::code::NO_SUCH_RUN) => Err(Attempt::Fail(SourceError::Refused {
                file: path.to_string(),
                what: format!("HTTP 404: the trainer has no run {:?}", self.run),
            })),
            // The first request (the spec) answered 404 without the protocol's code: nothing
            // shows this is a record server at all (a typo in the address, another web
            // server), so it is not yet the trainer's answer.
            (404, _) if path == path::spec(&self.run) => Err(Attempt::Fail(SourceError::Refused {
                file: path.to_string(),
                what: format!("HTTP 404: nothing at {}{path}; is this a tiebreak record server?", self.base),
            })),
            (404, _) => Err(invalid("missing on the trainer (HTTP 404)".into())),
            (422, _) => Err(invalid("the trainer could not serve it from its record (HTTP 422)".into())),
            (429 | 500..=599, _) => Err(Attempt::Retry(format!("HTTP {status}"))),
            _ => Err(Attempt::Fail(SourceError::Refused {
                file: path.to_string(),
                what: format!("GET {path}: HTTP {status}"),
            })),
        }
    }

    /// Reads a body of at most `max(honest_max, response_bytes_max)` bytes (see
    /// [`Self::get_bounded`] for whose fault a larger one is).
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        path: &str,
        honest_max: Option<u64>,
    ) -> Result<Vec<u8>, Attempt> {
        let ours = self.policy.response_bytes_max;
        let max = honest_max.unwrap_or(ours);
        let too_large = |n: u64| {
            Attempt::Fail(match honest_max {
                Some(h) => SourceError::Invalid {
                    file: path.to_string(),
                    offset: None,
                    what: format!("response of {n} bytes, more than the {h} any honest answer to it can have"),
                },
                None => SourceError::Unavailable(format!(
                    "GET {path}: the response is over this auditor's limit of {ours} bytes \
                     (trainer.response_bytes_max; raise it to audit this run)"
                )),
            })
        };
        if let Some(n) = resp.content_length()
            && n > max
        {
            return Err(too_large(n));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if body.len() as u64 + c.len() as u64 > max {
                        return Err(too_large(body.len() as u64 + c.len() as u64));
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => return Ok(body),
                Err(e) => return Err(Attempt::Retry(format!("reading the body: {e}"))),
            }
        }
    }

    fn get_required_bounded(&self, path: &str, honest_max: Option<u64>) -> Result<Vec<u8>, SourceError> {
        self.get_bounded(path, honest_max)?.ok_or_else(|| SourceError::Invalid {
            file: path.to_string(),
            offset: None,
            what: "missing on the trainer (run unfinished)".into(),
        })
    }

    /// A JSON answer; none is honestly larger than [`record::JSON_FILE_BYTES_MAX`] unless
    /// `honest_max` says more.
    fn get_json<T: DeserializeOwned>(&self, path: &str, honest_max: Option<u64>) -> Result<T, SourceError> {
        let body = self.get_required_bounded(path, Some(honest_max.unwrap_or(record::JSON_FILE_BYTES_MAX)))?;
        serde_json::from_slice(&body).map_err(|e| SourceError::Invalid {
            file: path.to_string(),
            offset: Some(e.column() as u64),
            what: format!("malformed response: {e}"),
        })
    }

    /// A zstd body, decompressed with a bound.
    fn get_zstd(
        &self,
        path: &str,
        file: &str,
        raw_bytes_max: usize,
        honest_max: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        let body = self.get_required_bounded(path, honest_max).map_err(|e| named(e, file, path))?;
        self.decompress(&body, raw_bytes_max).map_err(|e| SourceError::Invalid {
            file: file.to_string(),
            offset: None,
            what: format!("served by {path}: {e}"),
        })
    }

    /// Information about the run.
    pub fn info(&self) -> Result<wire::RunInfo, SourceError> {
        self.get_json(&path::run(&self.run), None)
    }

    /// [`decompress_bounded`]; past [`BIG`] bytes only under `big_frames`.
    fn decompress(&self, body: &[u8], raw_max: usize) -> Result<Vec<u8>, common::tielog::TieLogError> {
        match decompress_bounded(body, raw_max.min(BIG)) {
            Err(common::tielog::TieLogError::TooLarge { .. }) if raw_max > BIG => {
                let _one = self.big_frames.lock().unwrap_or_else(|p| p.into_inner());
                decompress_bounded(body, raw_max)
            }
            done => done,
        }
    }

    /// The run's spec, when it is one (the audit checks it before anything that depends on it).
    fn parsed_spec(&self) -> Option<&engine::spec::RunSpec> {
        self.parsed.get_or_init(|| self.spec_bytes().ok().and_then(|b| serde_json::from_slice(&b).ok())).as_ref()
    }
}

/// A failure to fetch a record file, named by the file (relative to the record) and the request.
fn named(e: SourceError, file: &str, path: &str) -> SourceError {
    match e {
        SourceError::Invalid { offset, what, .. } => {
            SourceError::Invalid { file: file.to_string(), offset, what: format!("{what} (GET {path})") }
        }
        SourceError::Refused { what, .. } => SourceError::Refused { file: file.to_string(), what },
        e => e,
    }
}

fn hash(hex: &str, what: &str, file: &str) -> Result<Hash, SourceError> {
    from_hex::<32>(hex).ok_or_else(|| SourceError::Invalid {
        file: file.to_string(),
        offset: None,
        what: format!("{what}: {hex:?} is not 64 lowercase hex digits"),
    })
}

impl TrainerSource for HttpTrainer {
    fn describe(&self) -> String {
        format!("{}{}", self.base, path::run(&self.run))
    }

    fn spec_bytes(&self) -> Result<Vec<u8>, SourceError> {
        let p = path::spec(&self.run);
        self.spec
            .get_or_init(|| {
                let body = self.get_required_bounded(&p, Some(record::JSON_FILE_BYTES_MAX))?;
                // A record server answers its spec with JSON; anything else (a web page) says
                // this address is not one, which, as no answer at all, is not yet a verdict.
                if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                    return Err(SourceError::Refused {
                        file: p.clone(),
                        what: format!("the answer to GET {p} is not JSON; is {} a tiebreak record server?", self.base),
                    });
                }
                Ok(body)
            })
            .clone()
    }

    fn manifest(&self) -> Result<Option<Manifest>, SourceError> {
        let p = path::manifest(&self.run);
        match self.get_bounded(&p, Some(record::JSON_FILE_BYTES_MAX))? {
            None => Ok(None),
            Some(body) => serde_json::from_slice(&body).map(Some).map_err(|e| SourceError::Invalid {
                file: record::MANIFEST_FILE.into(),
                offset: Some(e.column() as u64),
                what: format!("not a manifest: {e}"),
            }),
        }
    }

    fn leaves(&self, signed_steps: Option<u64>) -> Result<Vec<Leaf>, SourceError> {
        let claimed = self.info()?.n_steps;
        // Checked before anything is fetched or kept for them: the spec (checked before the
        // leaves are asked for) bounds the steps, and so does the signed manifest (the run info
        // is not signed: a count it contradicts would make this auditor size, and refuse as its
        // own limit, leaves that were never committed).
        let planned = self.parsed_spec().map_or(engine::spec::STEPS_MAX, |s| s.n_steps);
        let contradicts = if claimed > planned {
            Some(format!("more than the {planned} its spec plans"))
        } else {
            signed_steps.filter(|&n| n != claimed).map(|n| format!("its signed manifest {n}"))
        };
        if let Some(what) = contradicts {
            return Err(SourceError::Invalid {
                file: record::LEAVES_FILE.into(),
                offset: None,
                what: format!("the run's info claims {claimed} committed steps, {what} (GET {})", path::run(&self.run)),
            });
        }
        let n = claimed + 1;
        // Every leaf is kept until the root is checked: past this auditor's response limit in
        // all, the auditor cannot decide (its own limit, whoever signed the step count).
        let total = n.saturating_mul(LEAF_BYTES as u64);
        if total > self.policy.response_bytes_max {
            return Err(SourceError::Unavailable(format!(
                "the run's {n} leaves ({total} bytes) are over this auditor's limit of {} bytes \
                 (trainer.response_bytes_max; raise it to audit this run)",
                self.policy.response_bytes_max
            )));
        }
        let mut leaves = Vec::with_capacity(n.min(wire::LEAVES_PAGE_MAX) as usize);
        while (leaves.len() as u64) < n {
            let start = leaves.len() as u64;
            let count = (n - start).min(wire::LEAVES_PAGE_MAX);
            let body =
                self.get_required_bounded(&path::leaves(&self.run, start, count), Some(count * LEAF_BYTES as u64))?;
            if body.len() as u64 != count * LEAF_BYTES as u64 {
                return Err(SourceError::Invalid {
                    file: record::LEAVES_FILE.into(),
                    offset: Some(start * LEAF_BYTES as u64),
                    what: format!("asked for {count} leaves from {start}, got {} bytes", body.len()),
                });
            }
            for (i, chunk) in body.chunks_exact(LEAF_BYTES).enumerate() {
                let at = (start + i as u64) * LEAF_BYTES as u64;
                leaves.push(Leaf::decode(chunk).map_err(|e| SourceError::Invalid {
                    file: record::LEAVES_FILE.into(),
                    offset: Some(at + e.offset as u64),
                    what: e.what,
                })?);
            }
        }
        Ok(leaves)
    }

    fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), SourceError> {
        let p = path::nodes(&self.run, lo, hi, size);
        let pair: wire::NodePair = self.get_json(&p, None)?;
        Ok((hash(&pair.left, "left child", &p)?, hash(&pair.right, "right child", &p)?))
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, SourceError> {
        let p = path::proof(&self.run, index, size);
        let proof: wire::LeafProof = self.get_json(&p, None)?;
        proof.proof.iter().map(|h| hash(h, "proof hash", &p)).collect()
    }

    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError> {
        let file = record_file(record::log_path, step);
        let honest = Some(zstd_bound(record::LOG_RAW_BYTES_MAX as u64));
        let raw = self.get_zstd(&path::log(&self.run, step), &file, record::LOG_RAW_BYTES_MAX, honest)?;
        TieBreakLog::decode(&raw).map_err(|e| SourceError::Invalid { file, offset: None, what: e.to_string() })
    }

    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError> {
        let file = record_file(record::batch_path, step);
        let p = path::batch(&self.run, step);
        // A batch is its count and one varint (at most 10 bytes) per example, in a small frame.
        let honest = self.parsed_spec().map_or(record::BATCH_FILE_BYTES_MAX, |s| {
            (s.config.train.batch_size as u64).saturating_mul(10).saturating_add(64).min(record::BATCH_FILE_BYTES_MAX)
        });
        let bytes = self.get_required_bounded(&p, Some(honest)).map_err(|e| named(e, &file, &p))?;
        BatchIndices::decode(&bytes).map_err(|e| SourceError::Invalid {
            file,
            offset: Some(e.offset as u64),
            what: e.what,
        })
    }

    fn checkpoint_steps(&self) -> Result<Vec<u64>, SourceError> {
        // At most one checkpoint per interval, the initial and the last state: up to 21 bytes
        // each (20 digits and a comma).
        let honest = self.parsed_spec().map(|s| {
            let n = s.n_steps / s.config.train.checkpoint_interval.max(1) + 2;
            n.saturating_mul(21).saturating_add(64).max(record::JSON_FILE_BYTES_MAX)
        });
        Ok(self.get_json::<wire::CheckpointList>(&path::checkpoints(&self.run), honest)?.steps)
    }

    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError> {
        let file = record_file(record::checkpoint_path, step);
        let (raw_max, honest_max) = self.state_bounds();
        let raw = self.get_zstd(&path::checkpoint(&self.run, step), &file, raw_max, honest_max)?;
        TrainingState::decode(&raw).map_err(|e| SourceError::Invalid { file, offset: None, what: e.to_string() })
    }

    fn init_weights(&self) -> Result<Vec<u8>, SourceError> {
        let p = path::init_weights(&self.run);
        // The spec commits to the file's size: an honest file always fits, whatever
        // response_bytes_max says.
        let honest = self.parsed_spec().and_then(|s| s.init_weights.as_ref()).map(|w| w.bytes);
        self.get_required_bounded(&p, honest).map_err(|e| named(e, engine::init::INIT_WEIGHTS_FILE, &p))
    }

    fn state(&self, step: u64) -> Result<TrainingState, SourceError> {
        let p = path::state(&self.run, step);
        let (raw_max, honest_max) = self.state_bounds();
        // No verdict needs a state (it names the differing tensors, or saves replaying from a
        // checkpoint), so a trainer busy recomputing one gets STATE_PATIENCE, not the deadline.
        let patience = self.policy.deadline.min(STATE_PATIENCE);
        let body =
            self.runtime.block_on(self.get_async(&p, honest_max, patience))?.ok_or_else(|| SourceError::Invalid {
                file: p.clone(),
                offset: None,
                what: "missing on the trainer (run unfinished)".into(),
            })?;
        let raw = self.decompress(&body, raw_max).map_err(|e| SourceError::Invalid {
            file: p.clone(),
            offset: None,
            what: format!("served by {p}: {e}"),
        })?;
        TrainingState::decode(&raw).map_err(|e| SourceError::Invalid { file: p, offset: None, what: e.to_string() })
    }
}

impl HttpTrainer {
    /// Bounds on a state: decompressed, the most a state of the run's model encodes to
    /// (`RunSpec::state_bytes_max`, from the spec this source already holds; the record
    /// format's limit when its config is out of range); served, zstd's worst case for that
    /// size. An honest state always fits both, whatever `response_bytes_max` says.
    fn state_bounds(&self) -> (usize, Option<u64>) {
        let from_spec = self.parsed_spec().and_then(|s| s.state_bytes_max().ok());
        match from_spec {
            None => (record::STATE_RAW_BYTES_MAX, None),
            Some(n) => (n.min(record::STATE_RAW_BYTES_MAX), Some(zstd_bound(n as u64))),
        }
    }
}

/// Frames that decompress to more than this are decompressed one at a time per source
/// (`HttpTrainer::big_frames`): honest logs are far smaller, so only a model-sized checkpoint
/// or state waits (on the CPU, after its body is read), and a few KB of zstd that decompress to
/// the format's limit cost that limit once per audit, not once per replay thread.
const BIG: usize = 16 << 20;

/// How long a state request is retried ([`TrainerSource::state`] on a record server).
const STATE_PATIENCE: Duration = Duration::from_secs(10);

/// The most zstd makes of `n` bytes (`ZSTD_COMPRESSBOUND`, with room for the frame header).
fn zstd_bound(n: u64) -> u64 {
    n + (n >> 8) + (128 << 10) + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_and_run_ids_are_refused_before_any_request() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let h = rt.handle().clone();
        let mk = |base: &str, run: &str| HttpTrainer::new(base, run, None, RetryPolicy::default(), h.clone());
        assert!(mk("http://127.0.0.1:1", "run-1").is_ok());
        assert!(mk("https://records.example.org:8421", "run-1").is_ok());
        for (base, run) in [
            ("ftp://x", "r"),
            ("127.0.0.1:80", "r"),
            ("http://x", "../etc"),
            ("http://user:hunter2@x", "r"),
            ("http://user@x", "r"),
            ("http://x/?a=b", "r"),
        ] {
            let e = mk(base, run).unwrap_err();
            assert!(matches!(e, SourceError::Unavailable(_)), "{base} {run}: {e:?}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn an_unreachable_trainer_is_unresponsive_after_the_deadline() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let policy = RetryPolicy {
            request_timeout: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            deadline: Duration::from_millis(1000),
            response_bytes_max: 1 << 20,
            slow_answers_max: None,
            ca_certs: Vec::new(),
        };
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = errors.clone();
        let src = HttpTrainer::new(&format!("http://127.0.0.1:{port}"), "r", None, policy, rt.handle().clone())
            .unwrap()
            .with_error_hook(Arc::new(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }));
        let t0 = Instant::now();
        let e = src.child_hashes(0, 2, 2).unwrap_err();
        // Many fast failures before the deadline (the retries alone never give up: issue 14).
        let SourceError::Unresponsive { what } = &e else { panic!("{e:?}") };
        assert!(t0.elapsed() >= Duration::from_millis(1000), "gave up before the deadline: {what}");
        assert!(t0.elapsed() < Duration::from_secs(5), "gave up after the deadline, not much later");
        assert!(what.starts_with("GET /v1/runs/r/nodes") && what.contains("past the 1.0 s deadline"), "{what}");
        assert!(errors.load(std::sync::atomic::Ordering::Relaxed) >= 2, "retried");
    }
}
