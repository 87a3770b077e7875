//! The trainer's record server (`trainer-agent serve`): serves every record directory under a
//! records directory over HTTP, as [`engine::wire`] specifies, so an auditor can check a run
//! without a copy of it.
//!
//! Nothing is served that has not been verified first: every piece goes through
//! [`engine::record::Record`], which checks it against its committed leaf, and a state that is
//! not stored is recomputed from the nearest checkpoint by replaying the trainer's own logs and
//! served only if it reproduces the committed leaf. A file that fails its commitment is answered
//! with 422 `corrupt`, naming the file relative to the record directory.
//!
//! Limits: request bodies ([`REQUEST_BODY_BYTES_MAX`]), response bodies
//! ([`ServeOptions::response_bytes_max`]), concurrent file reads ([`READS_MAX`], queued) and
//! concurrent state recomputations ([`ServeOptions::recompute_max`], answered 503 `busy` when
//! none is free within [`ServeOptions::recompute_wait`]). Every blocking piece of work (file
//! reads, decompression, replay) runs on tokio's blocking pool, never on the async workers.
//!
//! Start it in-process with [`serve`] on a listener you bound (port 0 in tests), or mount
//! [`router`] in your own server.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::codec::{self, Hash, to_hex};
use common::leaf::LEAF_BYTES;
use common::state::TrainingState;
use common::tielog;
use engine::EngineError;
use engine::data::{Dataset, DatasetFinder};
use engine::record::{self, Record, RecordError};
use engine::spec::DataKind;
use engine::train::{Run, StepMode};
use engine::wire::{self, ErrorBody, code};
use kernels::{Device, Profile};
use tokio::sync::Semaphore;

use crate::TrainerError;

/// Most bytes a request body may have (every route is a `GET`; a body is never needed).
pub const REQUEST_BODY_BYTES_MAX: usize = 16 << 10;
/// Time a request body (never needed) may take to arrive.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ServeOptions::response_bytes_max`]: the largest file an honest record can hold
/// (a checkpoint of a state at the record format's limit, compressed at worst), so the default
/// serves every committed file. An auditor reads a refused committed file as withheld: a lower
/// limit is the operator's choice, and only safe above the records' largest checkpoint.
pub const RESPONSE_BYTES_MAX_DEFAULT: u64 = record::STATE_FILE_BYTES_MAX;
/// Default for [`ServeOptions::recompute_max`].
pub const RECOMPUTE_MAX_DEFAULT: usize = 2;
/// Default for [`ServeOptions::recompute_wait`].
pub const RECOMPUTE_WAIT_DEFAULT: Duration = Duration::from_secs(1);
/// Most requests reading record files at once; more wait their turn. Bounds the blocking
/// threads, open files and responses being built (each up to `response_bytes_max`).
pub const READS_MAX: usize = 8;

/// What the record server serves and how.
#[derive(Clone)]
pub struct ServeOptions {
    /// The records directory: every directory directly under it is a run, named by its
    /// directory name.
    pub records: PathBuf,
    /// If set, every request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The file the token came from: SIGHUP reads it again (token rotation without a restart).
    pub token_file: Option<PathBuf>,
    /// How long a token that a reload replaces is still accepted.
    pub token_grace: Duration,
    /// A dataset for recomputing states of runs of any kind of data (a bare `--data PATH`), tried
    /// after [`Self::datasets`] of the run's kind.
    pub data: Option<PathBuf>,
    /// Datasets by the kind of data they hold, several of a kind allowed, so one server
    /// recomputes states of runs on different data: a run uses the only one of its kind, or
    /// the one whose contents are its committed dataset ([`engine::data::DatasetFinder`]).
    pub datasets: Vec<(DataKind, PathBuf)>,
    /// A response body larger than this is refused with 413 `too-large` instead of being sent.
    pub response_bytes_max: u64,
    /// Most state recomputations at once. 0 turns recomputation off: a state that is not a
    /// checkpoint is then always answered 503 `busy`.
    pub recompute_max: usize,
    /// How long a state request waits for a recomputation slot before answering 503 `busy`.
    pub recompute_wait: Duration,
    /// Connections at once, and the time a client has to send a request head (also the idle
    /// limit of a kept-alive connection).
    pub limits: service::Limits,
    /// Serve HTTPS with this certificate and key (`--tls-cert`, `--tls-key`).
    pub tls: Option<service::tls::ServerTls>,
}

impl ServeOptions {
    /// Options serving `records` with the defaults: no token, no data, responses as large as a record's files, two
    /// recomputations at once, one second's wait for a slot.
    pub fn new(records: impl Into<PathBuf>) -> Self {
        ServeOptions {
            records: records.into(),
            token: None,
            token_file: None,
            token_grace: service::TOKEN_GRACE_DEFAULT,
            data: None,
            datasets: Vec::new(),
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
            recompute_max: RECOMPUTE_MAX_DEFAULT,
            recompute_wait: RECOMPUTE_WAIT_DEFAULT,
            limits: service::Limits::default(),
            tls: None,
        }
    }
}

// Written by hand so that the token never reaches a log.
impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("records", &self.records)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("data", &self.data)
            .field("datasets", &self.datasets)
            .field("response_bytes_max", &self.response_bytes_max)
            .field("recompute_max", &self.recompute_max)
            .field("recompute_wait", &self.recompute_wait)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Serves `opts.records` on `listener` until `shutdown` completes, then finishes the requests in
/// flight and returns. The caller binds the listener, so it knows the address
/// (`listener.local_addr()`) before serving; bind `127.0.0.1:0` in tests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TrainerError> {
    let (limits, tls) = (opts.limits, opts.tls.clone());
    if let Ok(addr) = listener.local_addr() {
        service::tls::warn_if_plain_and_exposed(addr, tls.is_some(), "the record server");
    }
    let app = router(opts)?;
    service::serve_tls(listener, app, limits, tls, shutdown).await.map_err(TrainerError::Serve)
}

/// The record server's routes, with authentication and size limits applied. Fails if the
/// records directory cannot be resolved.
pub fn router(opts: ServeOptions) -> Result<Router, TrainerError> {
    let records = std::fs::canonicalize(&opts.records).map_err(|source| TrainerError::Io {
        op: "open records directory",
        path: opts.records.clone(),
        source,
    })?;
    if !records.is_dir() {
        return Err(TrainerError::Usage(format!("records directory {} is not a directory", records.display())));
    }
    let shared = Arc::new(Shared {
        records,
        token: {
            let token = service::Token::new(opts.token.clone());
            token.set_grace(opts.token_grace);
            if let (Some(_), Some(file)) = (&opts.token, &opts.token_file) {
                token.reload_on_hangup(file.clone());
            }
            token
        },
        data: opts.data,
        datasets: opts.datasets,
        finder: DatasetFinder::default(),
        requests: RequestCounts::default(),
        response_bytes_max: opts.response_bytes_max,
        reads: Arc::new(Semaphore::new(READS_MAX)),
        recompute: Arc::new(Semaphore::new(opts.recompute_max.min(Semaphore::MAX_PERMITS))),
        recompute_max: opts.recompute_max,
        recompute_wait: opts.recompute_wait,
        opened: Mutex::new(HashMap::new()),
        replayers: Mutex::new(HashMap::new()),
    });
    let p = wire::API_PREFIX;
    let api = Router::new()
        .route(&format!("{p}/runs"), get(runs))
        .route(&format!("{p}/runs/{{run}}"), get(run_info))
        .route(&format!("{p}/runs/{{run}}/spec"), get(spec))
        .route(&format!("{p}/runs/{{run}}/manifest"), get(manifest))
        .route(&format!("{p}/runs/{{run}}/leaves"), get(leaves))
        .route(&format!("{p}/runs/{{run}}/nodes"), get(nodes))
        .route(&format!("{p}/runs/{{run}}/proofs/{{index}}"), get(proof))
        .route(&format!("{p}/runs/{{run}}/logs/{{step}}"), get(log))
        .route(&format!("{p}/runs/{{run}}/batches/{{step}}"), get(batch))
        .route(&format!("{p}/runs/{{run}}/checkpoints"), get(checkpoints))
        .route(&format!("{p}/runs/{{run}}/checkpoints/{{step}}"), get(checkpoint))
        .route(&format!("{p}/runs/{{run}}/states/{{step}}"), get(state))
        .route(&format!("{p}/runs/{{run}}/init-weights"), get(init_weights))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard));
    // Health and metrics are open (like the daemon's): they say nothing about any record.
    let open = Router::new().route("/healthz", get(healthz)).route("/metrics", get(metrics));
    let app = open
        .merge(api)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), count_requests))
        .layer(axum::middleware::from_fn(service::security_headers))
        .layer(axum::middleware::from_fn(service::log_requests))
        .with_state(shared);
    Ok(app)
}

/// State shared by every request.
struct Shared {
    /// Canonical records directory.
    records: PathBuf,
    /// The token (SIGHUP may replace it); compared through SHA-256 digests in constant time.
    token: service::Token,
    data: Option<PathBuf>,
    datasets: Vec<(DataKind, PathBuf)>,
    finder: DatasetFinder,
    requests: RequestCounts,
    response_bytes_max: u64,
    reads: Arc<Semaphore>,
    recompute: Arc<Semaphore>,
    recompute_max: usize,
    recompute_wait: Duration,
    /// Opened (verified) records by run id, with what the files looked like when opened.
    opened: Mutex<HashMap<String, Opened>>,
    /// Runs built for recomputing states, by run id.
    replayers: Mutex<HashMap<String, Arc<Replayer>>>,
}

/// A verified record and what its files looked like just before it was opened; when they look
/// different (a run still training committed more steps, or finished), it is opened again.
struct Opened {
    stamp: Stamp,
    record: Arc<Record>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dir: PathBuf,
    /// Length and modification time of the spec, the leaves and the manifest.
    files: [Option<(u64, SystemTime)>; 3],
}

impl Stamp {
    fn of(dir: &Path) -> Stamp {
        let look = |name: &str| {
            std::fs::metadata(dir.join(name)).ok().map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        Stamp {
            dir: dir.to_path_buf(),
            files: [look(record::SPEC_FILE), look(record::LEAVES_FILE), look(record::MANIFEST_FILE)],
        }
    }
}

/// A run built on the trainer's profile for replaying its steps, and the last state it
/// recomputed (so walking through consecutive steps does not start from the checkpoint again).
struct Replayer {
    spec_digest: Hash,
    run: Run,
    last: Mutex<Option<TrainingState>>,
}

/// Locks a mutex, carrying on if a panicking thread poisoned it: the maps hold only caches,
/// each entry replaced whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An error answer: an [`ErrorBody`] with the status its code goes with.
#[derive(Debug)]
struct ApiError(ErrorBody);

impl ApiError {
    fn new(code: &str, error: impl Into<String>) -> Self {
        ApiError(ErrorBody::new(code, error))
    }

    fn bad_request(error: impl Into<String>) -> Self {
        ApiError::new(code::BAD_REQUEST, error)
    }

    fn corrupt(file: String, offset: Option<u64>, error: impl Into<String>) -> Self {
        ApiError(ErrorBody { error: error.into(), code: code::CORRUPT.into(), file: Some(file), offset })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(code::status(&self.0.code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// `path` relative to the record directory `dir` (never an absolute server path in an answer).
fn relative(dir: &Path, path: &Path) -> String {
    match path.strip_prefix(dir) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

/// The answer for a record error while serving a file of the record in `dir`.
fn record_error(dir: &Path, e: RecordError) -> ApiError {
    match e {
        RecordError::Io { op, path, source } => {
            let file = relative(dir, &path);
            if source.kind() == std::io::ErrorKind::NotFound {
                ApiError::new(code::NOT_FOUND, format!("{file} is not in the record"))
            } else {
                ApiError::new(code::INTERNAL, format!("{op} {file}: {source}"))
            }
        }
        RecordError::Corrupt { path, offset, what } => {
            let file = relative(dir, &path);
            let at = offset.map(|o| format!(" at byte {o}")).unwrap_or_default();
            ApiError::corrupt(file.clone(), offset, format!("corrupt record file {file}{at}: {what}"))
        }
        RecordError::Mismatch { path, what, expected, actual } => {
            let file = relative(dir, &path);
            ApiError::corrupt(
                file.clone(),
                None,
                format!(
                    "record file {file} does not match its commitment: {what}: expected {expected}, found {actual}"
                ),
            )
        }
        RecordError::Refused(what) => ApiError::new(code::NOT_FOUND, what),
        // This server cannot read the record's format: its own limit, said as such.
        RecordError::EarlierFormat { path, version } => {
            let path = relative(dir, &path).into();
            ApiError::new(code::INTERNAL, RecordError::EarlierFormat { path, version }.to_string())
        }
    }
}

impl Shared {
    /// The canonical directory of run `run`: a valid run id naming a directory whose resolved
    /// path lies directly in the records directory (so a symlink cannot lead elsewhere).
    fn resolve(&self, run: &str) -> Result<PathBuf, ApiError> {
        if !wire::is_valid_run_id(run) {
            return Err(ApiError::bad_request(format!(
                "run id {:?} is not valid (1 to {} characters of A-Z a-z 0-9 . _ -, not starting with a dot)",
                run.chars().take(wire::RUN_ID_BYTES_MAX).collect::<String>(),
                wire::RUN_ID_BYTES_MAX
            )));
        }
        let no_such_run = || ApiError::new(code::NO_SUCH_RUN, format!("no run {run:?}"));
        let dir = std::fs::canonicalize(self.records.join(run)).map_err(|_| no_such_run())?;
        if dir.parent() != Some(self.records.as_path()) || !dir.is_dir() {
            return Err(no_such_run());
        }
        Ok(dir)
    }

    /// The verified record of `run`, opened again if its files changed since it was last opened.
    fn record(&self, run: &str) -> Result<Arc<Record>, ApiError> {
        let dir = self.resolve(run)?;
        let stamp = Stamp::of(&dir);
        if let Some(o) = lock(&self.opened).get(run)
            && o.stamp == stamp
        {
            return Ok(o.record.clone());
        }
        // A run being created has a spec and an empty leaves.bin for a moment: not a record yet,
        // rather than a corrupt one.
        if matches!(stamp.files, [_, Some((0, _)), None]) {
            return Err(ApiError::new(code::NO_SUCH_RUN, format!("{run:?} has no committed leaf yet")));
        }
        // Opened outside the lock: opening verifies every leaf, and other runs need not wait.
        let record = Arc::new(Record::open(&dir).map_err(|e| match e {
            RecordError::Refused(_) => ApiError::new(code::NO_SUCH_RUN, format!("{run:?} is not a record")),
            RecordError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ApiError::new(code::NO_SUCH_RUN, format!("{run:?} is not a record (no spec or leaves)"))
            }
            e => record_error(&dir, e),
        })?);
        lock(&self.opened).insert(run.to_string(), Opened { stamp, record: record.clone() });
        Ok(record)
    }

    /// Run ids of the records directly under the records directory, sorted.
    fn run_ids(&self) -> Result<Vec<String>, ApiError> {
        let entries = std::fs::read_dir(&self.records)
            .map_err(|e| ApiError::new(code::INTERNAL, format!("list the records directory: {e}")))?;
        let mut runs = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if let Ok(dir) = self.resolve(&name)
                && dir.join(record::SPEC_FILE).is_file()
            {
                runs.push(name);
            }
        }
        runs.sort();
        Ok(runs)
    }

    /// The run for replaying `record`'s steps on the trainer's own profile (`cpu` when that is
    /// `cuda` and this server cannot run it), built once per run (loading a dataset is the
    /// expensive part) and rebuilt only if the spec changed.
    fn replayer(&self, run_id: &str, record: &Record) -> Result<Arc<Replayer>, ApiError> {
        let spec_digest = codec::sha256(record.spec_bytes());
        if let Some(r) = lock(&self.replayers).get(run_id)
            && r.spec_digest == spec_digest
        {
            return Ok(r.clone());
        }
        let spec = record.spec();
        let internal =
            |what: String| ApiError::new(code::INTERNAL, format!("cannot recompute states of {run_id:?}: {what}"));
        let profile: Profile =
            spec.device_profile.parse().map_err(|e: kernels::KernelError| internal(e.to_string()))?;
        // The dataset for this run; without one, the state cannot be recomputed here: 404, which
        // an auditor does not retry (it resumes from a checkpoint instead).
        let kind = spec.config.data.kind();
        let unavailable = |why: String| {
            ApiError::new(
                code::NOT_FOUND,
                format!("states of {run_id:?} between checkpoints cannot be recomputed here: {why}"),
            )
        };
        let path = if kind == DataKind::Synthetic {
            None
        } else {
            let names: Vec<String> =
                self.datasets.iter().map(|(k, p)| format!("{}={}", k.as_str(), p.display())).collect();
            let mut candidates: Vec<(&str, &Path)> = (self.datasets.iter().zip(&names))
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, p), n)| (n.as_str(), p.as_path()))
                .collect();
            candidates.extend(self.data.as_deref().map(|p| ("--data", p)));
            if candidates.is_empty() {
                return Err(unavailable(format!(
                    "the server has no {k} dataset (start it with --data {k}=PATH)",
                    k = kind.as_str()
                )));
            }
            Some(self.finder.find(spec, &candidates).map_err(unavailable)?)
        };
        let data = Dataset::for_config(&spec.config, path.as_deref()).map_err(|e| unavailable(e.to_string()))?;
        // A GPU-trained record on a server without that GPU (or this build's CUDA support) is
        // recomputed on the CPU: replay follows the trainer's logs, so any profile reproduces the
        // committed leaves, and `recompute` checks every one.
        let device = match Device::new(profile) {
            Err(kernels::KernelError::DeviceUnavailable { .. }) => Device::new(Profile::Cpu),
            other => other,
        }
        .map_err(|e| internal(e.to_string()))?;
        let run = Run::new(spec.clone(), data, device).map_err(|e| match e {
            e @ engine::EngineError::DatasetMismatch { .. } => {
                unavailable(format!("{}: {e}", path.as_deref().map_or_else(String::new, |p| p.display().to_string())))
            }
            e => internal(e.to_string()),
        })?;
        let r = Arc::new(Replayer { spec_digest, run, last: Mutex::new(None) });
        lock(&self.replayers).insert(run_id.to_string(), r.clone());
        Ok(r)
    }

    /// The state after `step`, recomputed from the nearest checkpoint at or before it (or the
    /// last state recomputed, if that is nearer) by replaying the trainer's logs; every state on
    /// the way must reproduce its committed leaf.
    fn recompute(&self, run_id: &str, record: &Record, step: u64) -> Result<TrainingState, ApiError> {
        let dir = record.dir();
        let replayer = self.replayer(run_id, record)?;
        let leaf_state = |t: u64| record.leaf(t).map(|l| l.state).map_err(|e| record_error(dir, e));
        let hash = record.spec().state_hash();
        let checkpoint = record.checkpoint_at_or_before(step).unwrap_or(0);
        let cached = lock(&replayer.last).take().filter(|s| {
            // Verified when it was computed; checked again in case the record was replaced.
            s.step >= checkpoint && s.step <= step && leaf_state(s.step).is_ok_and(|h| h == s.digest(hash))
        });
        let mut state = match cached {
            Some(s) => s,
            None => record.checkpoint(checkpoint).map_err(|e| record_error(dir, e))?,
        };
        let from = state.step;
        for t in from + 1..=step {
            let log = record.log(t).map_err(|e| record_error(dir, e))?;
            let out = replayer.run.step(&state, t, StepMode::Replay(&log), None).map_err(|e| match e {
                EngineError::Rounding { .. } => {
                    let file = relative(dir, &record::log_path(dir, t));
                    ApiError::corrupt(file, None, format!("replaying step {t}: {e}"))
                }
                e => ApiError::new(code::INTERNAL, format!("replaying step {t}: {e}")),
            })?;
            let expected = leaf_state(t)?;
            let actual = out.state.digest(hash);
            if actual != expected {
                return Err(ApiError::corrupt(
                    record::LEAVES_FILE.to_string(),
                    Some(t * LEAF_BYTES as u64),
                    format!(
                        "replaying steps {}..={t} from the state at step {from} on profile {} does not reproduce \
                         leaf {t}: the leaf commits to state {}, the replay gives {}",
                        from + 1,
                        record.spec().device_profile,
                        to_hex(&expected),
                        to_hex(&actual)
                    ),
                ));
            }
            state = out.state;
        }
        *lock(&replayer.last) = Some(state.clone());
        Ok(state)
    }
}

/// Runs `f` on the blocking pool, at most [`READS_MAX`] at once.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = shared.reads.clone().acquire_owned().await.expect("the reads semaphore is never closed");
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        // Held until the work is done, even if the client has gone away meanwhile.
        let _permit = permit;
        f(&shared)
    })
    .await
    .map_err(|e| ApiError::new(code::INTERNAL, format!("request worker failed: {e}")))?
}

/// The path parameters of a route: the run (validated) and the step or index, if any.
struct Params {
    run: String,
    /// `{step}` or `{index}`, by name.
    arg: Option<(&'static str, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(mut map) =
            axum::extract::Path::<HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(format!("path: {e}")))?;
        let run = map.remove("run").unwrap_or_default();
        if !wire::is_valid_run_id(&run) {
            // Checked again where the run is resolved; rejected here before any work is queued.
            return Err(ApiError::bad_request(format!("run id {:?} is not valid", truncate(&run))));
        }
        let arg = ["step", "index"].into_iter().find_map(|name| map.remove(name).map(|v| (name, v)));
        Ok(Params { run, arg })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(wire::RUN_ID_BYTES_MAX).collect()
}

impl Params {
    /// The step or index path parameter as a number.
    fn number(&self) -> Result<u64, ApiError> {
        let (name, value) = self.arg.as_ref().ok_or_else(|| ApiError::bad_request("path parameter missing"))?;
        parse_u64("path parameter", name, value)
    }
}

fn parse_u64(kind: &str, name: &str, value: &str) -> Result<u64, ApiError> {
    // Digits only: no sign, no spaces, no empty value.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "{kind} {name}: {:?} is not a non-negative integer",
            truncate(value)
        )));
    }
    value.parse().map_err(|_| ApiError::bad_request(format!("{kind} {name}: {value} is too large")))
}

/// The query parameters `names`, each required exactly once, as numbers in the same order.
/// Unknown parameters are an error (a typo should not be silently ignored).
fn query<const N: usize>(uri: &Uri, names: [&'static str; N]) -> Result<[u64; N], ApiError> {
    let mut found: BTreeMap<&str, &str> = BTreeMap::new();
    for pair in uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !names.contains(&k) {
            return Err(ApiError::bad_request(format!("unknown query parameter {:?}", truncate(k))));
        }
        if found.insert(k, v).is_some() {
            return Err(ApiError::bad_request(format!("query parameter {k} given more than once")));
        }
    }
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let v = found.get(name).ok_or_else(|| ApiError::bad_request(format!("query parameter {name} is missing")))?;
        *slot = parse_u64("query parameter", name, v)?;
    }
    Ok(out)
}

fn no_query(uri: &Uri) -> Result<(), ApiError> {
    query(uri, []).map(|_| ())
}

fn json_body<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

fn bytes_body(content_type: &'static str, bytes: Vec<u8>) -> Response {
    ([(CONTENT_TYPE, content_type)], bytes).into_response()
}

/// A zstd frame (`stored`) of `raw_bytes` raw bytes, the length in [`wire::RAW_BYTES_HEADER`].
fn zstd_body(stored: Vec<u8>, raw_bytes: usize) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(wire::ZSTD_CONTENT_TYPE));
    headers.insert(HeaderName::from_static(wire::RAW_BYTES_HEADER), HeaderValue::from(raw_bytes as u64));
    (headers, stored).into_response()
}

/// A record file checked against its leaf, served as stored: no decode, re-encode or
/// recompression (the frame's raw bytes are what the leaf commits to).
fn frame_body(frame: record::CommittedFrame) -> Response {
    zstd_body(frame.stored, frame.raw.len())
}

/// A recomputed state as a zstd body. [`Shared::recompute`] has checked its digest (the
/// SHA-256 of exactly these canonical bytes) against the leaf.
fn state_body(state: &TrainingState) -> Response {
    let raw = state.encode();
    zstd_body(tielog::compress_canonical(&raw), raw.len())
}

/// Step `step` must be a committed step with a log and batch (1 ..= n_steps).
fn check_step(record: &Record, step: u64) -> Result<(), ApiError> {
    if step == 0 || step > record.n_steps() {
        return Err(ApiError::new(
            code::NOT_FOUND,
            format!("step {step} has no log or batch (the record has steps 1..={})", record.n_steps()),
        ));
    }
    Ok(())
}

/// `size` must be a tree size of the committed leaves.
fn check_size(record: &Record, size: u64) -> Result<(), ApiError> {
    let n = record.tree().len();
    if size == 0 || size > n {
        return Err(ApiError::bad_request(format!(
            "query parameter size: {size} is not in 1..={n} (committed leaves)"
        )));
    }
    Ok(())
}

async fn runs(State(s): State<Arc<Shared>>, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let runs = blocking(&s, |s| s.run_ids()).await?;
    Ok(json_body(&wire::RunList { runs }))
}

async fn run_info(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        Ok(json_body(&wire::RunInfo {
            run: p.run,
            n_steps: r.n_steps(),
            complete: r.is_complete(),
            root: to_hex(&r.tree().root()),
            spec_hash: to_hex(&codec::sha256(r.spec_bytes())),
            device_profile: r.spec().device_profile.clone(),
        }))
    })
    .await
}

async fn spec(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    blocking(&s, move |s| match s.record(&p.run) {
        Ok(r) => Ok(bytes_body("application/json", r.spec_bytes().to_vec())),
        // A record of an earlier format, which this server cannot open: its spec as it is, so
        // the auditor reads the format from the committed bytes (and does not retry an error).
        Err(e) => match s.resolve(&p.run).ok().and_then(|dir| record::earlier_format_spec(&dir)) {
            Some(bytes) => Ok(bytes_body("application/json", bytes)),
            None => Err(e),
        },
    })
    .await
}

async fn manifest(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        let m = r.manifest().ok_or_else(|| {
            ApiError::new(
                code::UNFINISHED,
                format!("run {:?} has no manifest yet ({} steps committed)", p.run, r.n_steps()),
            )
        })?;
        // The verified manifest, serialised as the trainer writes it.
        let json = serde_json::to_vec_pretty(m).expect("a manifest serialises");
        Ok(bytes_body("application/json", json))
    })
    .await
}

async fn leaves(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    let [start, count] = query(&uri, ["start", "count"])?;
    if count == 0 || count > wire::LEAVES_PAGE_MAX {
        return Err(ApiError::bad_request(format!(
            "query parameter count: {count} is not in 1..={}",
            wire::LEAVES_PAGE_MAX
        )));
    }
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        let leaves = r.leaves();
        let n = leaves.len() as u64;
        if start >= n {
            return Err(ApiError::new(
                code::NOT_FOUND,
                format!("leaf {start} is beyond the record's {n} leaves (steps 0..={})", n - 1),
            ));
        }
        let end = start.saturating_add(count).min(n);
        let mut out = Vec::with_capacity(((end - start) as usize) * LEAF_BYTES);
        for leaf in &leaves[start as usize..end as usize] {
            out.extend_from_slice(&leaf.encode());
        }
        Ok(bytes_body("application/octet-stream", out))
    })
    .await
}

async fn nodes(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    let [lo, hi, size] = query(&uri, ["lo", "hi", "size"])?;
    if hi <= lo || hi - lo < 2 {
        return Err(ApiError::bad_request(format!(
            "query parameters lo, hi: [{lo}, {hi}) does not span the two or more leaves a node with children has"
        )));
    }
    if hi > size {
        return Err(ApiError::bad_request(format!("query parameter hi: {hi} is beyond size {size}")));
    }
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        check_size(&r, size)?;
        let (left, right) = r.tree().child_hashes(lo, hi, size).map_err(|e| {
            ApiError::bad_request(format!("query parameters lo, hi: [{lo}, {hi}) is not a node of the tree: {e}"))
        })?;
        Ok(json_body(&wire::NodePair { left: to_hex(&left), right: to_hex(&right) }))
    })
    .await
}

async fn proof(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    let index = p.number()?;
    let [size] = query(&uri, ["size"])?;
    if index >= size {
        return Err(ApiError::bad_request(format!("path parameter index: {index} is not below size {size}")));
    }
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        check_size(&r, size)?;
        let path = r
            .tree()
            .inclusion_proof(index, size)
            .map_err(|e| ApiError::bad_request(format!("path parameter index: {e}")))?;
        let leaf = r.leaf(index).map_err(|e| record_error(r.dir(), e))?;
        Ok(json_body(&wire::LeafProof {
            index,
            size,
            leaf: to_hex(&leaf.encode()),
            proof: path.iter().map(|h| to_hex(h)).collect(),
        }))
    })
    .await
}

async fn log(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let step = p.number()?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        check_step(&r, step)?;
        r.log_frame(step).map(frame_body).map_err(|e| record_error(r.dir(), e))
    })
    .await
}

async fn batch(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let step = p.number()?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        check_step(&r, step)?;
        let bytes = r.batch_bytes(step).map_err(|e| record_error(r.dir(), e))?;
        Ok(bytes_body("application/octet-stream", bytes))
    })
    .await
}

async fn checkpoints(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    blocking(&s, move |s| Ok(json_body(&wire::CheckpointList { steps: s.record(&p.run)?.checkpoint_steps() }))).await
}

async fn checkpoint(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let step = p.number()?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        if !r.checkpoint_steps().contains(&step) {
            return Err(ApiError::new(code::NOT_FOUND, format!("step {step} has no checkpoint")));
        }
        r.checkpoint_frame(step).map(frame_body).map_err(|e| record_error(r.dir(), e))
    })
    .await
}

/// The starting weights the run's spec commits to, as stored (checked against the commitment).
async fn init_weights(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    blocking(&s, move |s| {
        let r = s.record(&p.run)?;
        match r.init_weights().map_err(|e| record_error(r.dir(), e))? {
            Some(bytes) => Ok(bytes_body("application/octet-stream", bytes)),
            None => Err(ApiError::new(code::NOT_FOUND, "this run starts from the seed: it has no starting weights")),
        }
    })
    .await
}

async fn state(State(s): State<Arc<Shared>>, p: Params, uri: Uri) -> Result<Response, ApiError> {
    no_query(&uri)?;
    let step = p.number()?;
    let run = p.run;
    /// What the first, quick look at the record decided.
    enum Found {
        Stored(Response),
        Replay(Arc<Record>),
    }
    let found = {
        let run = run.clone();
        blocking(&s, move |s| {
            let r = s.record(&run)?;
            if step > r.n_steps() {
                return Err(ApiError::new(
                    code::NOT_FOUND,
                    format!("step {step} is beyond the record's {} committed steps", r.n_steps()),
                ));
            }
            if r.checkpoint_steps().contains(&step) {
                let frame = r.checkpoint_frame(step).map_err(|e| record_error(r.dir(), e))?;
                return Ok(Found::Stored(frame_body(frame)));
            }
            Ok(Found::Replay(r))
        })
        .await?
    };
    let record = match found {
        Found::Stored(response) => return Ok(response),
        Found::Replay(record) => record,
    };
    let busy = || {
        ApiError::new(code::BUSY, format!("all {} state recomputation slots are taken; retry later", s.recompute_max))
    };
    let permit = match tokio::time::timeout(s.recompute_wait, s.recompute.clone().acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) | Err(_) => return Err(busy()),
    };
    let shared = s.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        shared.recompute(&run, &record, step).map(|state| state_body(&state))
    })
    .await
    .map_err(|e| ApiError::new(code::INTERNAL, format!("recompute worker failed: {e}")))?
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(code::NOT_FOUND, format!("no route {}", uri.path()))
}

/// 405 with the JSON error body and an `Allow` header.
async fn wrong_method(method: Method) -> Response {
    let mut r = ApiError::new(code::METHOD_NOT_ALLOWED, format!("{method} is not allowed here; every route is GET"))
        .into_response();
    r.headers_mut().insert(axum::http::header::ALLOW, HeaderValue::from_static("GET"));
    r
}

/// Authentication and size limits around every route (the fallbacks included).
async fn guard(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    {
        if !s.token.accepts(service::bearer(req.headers())) {
            let mut r = ApiError::new(code::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer <token>)")
                .into_response();
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let too_large_request =
        || ApiError::new(code::TOO_LARGE, format!("request body over {REQUEST_BODY_BYTES_MAX} bytes")).into_response();
    // Refuse a declared large body before reading any of it; a body without a length is read
    // up to the limit.
    if service::announced_body_len(req.headers()).is_some_and(|n| n > REQUEST_BODY_BYTES_MAX as u64) {
        return too_large_request();
    }
    let (parts, body) = req.into_parts();
    // Bounded in time too: a body sent a byte at a time must not hold a connection forever.
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, REQUEST_BODY_BYTES_MAX)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return too_large_request(),
        Err(_) => {
            let mut r = ApiError::new(code::BAD_REQUEST, "the request body was not sent in time").into_response();
            *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
            return r;
        }
    };
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let size = response.body().size_hint();
    let bytes = size.exact().unwrap_or(size.lower());
    if bytes > s.response_bytes_max {
        return ApiError::new(
            code::TOO_LARGE,
            format!("the response would be {bytes} bytes, more than this server's limit of {}", s.response_bytes_max),
        )
        .into_response();
    }
    response
}

/// Requests answered, by status class (a fixed set: the metric's labels stay bounded).
#[derive(Debug, Default)]
struct RequestCounts([std::sync::atomic::AtomicU64; 4]);

impl RequestCounts {
    const CLASSES: [&'static str; 4] = ["2xx", "3xx", "4xx", "5xx"];
    fn count(&self, status: StatusCode) {
        let i = (status.as_u16() / 100).saturating_sub(2).min(3) as usize;
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn count_requests(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    s.requests.count(response.status());
    response
}

/// `{"status": "ok", "runs"}`, or 503 when the records directory cannot be listed.
async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    match blocking(&s, |s| s.run_ids()).await {
        Ok(runs) => {
            axum::Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "runs": runs.len()}))
                .into_response()
        }
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"status": "unhealthy", "why": e.0.error})))
                .into_response()
        }
    }
}

/// Prometheus text: build info, requests by status class, state recomputations in use.
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP tiebreak_record_server_build_info Always 1; the labels say which build runs");
    let _ = writeln!(out, "# TYPE tiebreak_record_server_build_info gauge");
    let _ = writeln!(out, "tiebreak_record_server_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "# HELP tiebreak_record_server_http_requests_total HTTP requests answered, by status class");
    let _ = writeln!(out, "# TYPE tiebreak_record_server_http_requests_total counter");
    for (class, n) in RequestCounts::CLASSES.iter().zip(&s.requests.0) {
        let n = n.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(out, "tiebreak_record_server_http_requests_total{{class=\"{class}\"}} {n}");
    }
    let busy = s.recompute_max.saturating_sub(s.recompute.available_permits());
    let _ = writeln!(out, "# HELP tiebreak_record_server_recomputations State recomputations running now");
    let _ = writeln!(out, "# TYPE tiebreak_record_server_recomputations gauge");
    let _ = writeln!(out, "tiebreak_record_server_recomputations {busy}");
    out.push_str(&service::process_metrics("tiebreak_record_server"));
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn query_parameters_are_strict_decimal_and_each_given_once() {
        assert_eq!(query(&uri("/x?start=3&count=10"), ["start", "count"]).unwrap(), [3, 10]);
        assert_eq!(query(&uri("/x?count=10&start=0"), ["start", "count"]).unwrap(), [0, 10]);
        assert_eq!(query(&uri("/x"), []).unwrap(), [0u64; 0]);
        for (q, named) in [
            ("/x?start=3", "count"),
            ("/x?start=&count=1", "start"),
            ("/x?start=+3&count=1", "start"),
            ("/x?start=3&count=1&start=3", "start"),
            ("/x?start=3&count=1&extra", "extra"),
            ("/x?start=18446744073709551616&count=1", "start"),
        ] {
            let e = query(&uri(q), ["start", "count"]).unwrap_err().0;
            assert_eq!(e.code, code::BAD_REQUEST);
            assert!(e.error.contains(named), "{q}: {}", e.error);
        }
        assert!(no_query(&uri("/x?")).is_ok());
        assert!(no_query(&uri("/x?a=1")).is_err());
    }

    #[test]
    fn answers_name_files_relative_to_the_record() {
        let dir = Path::new("/srv/records/run1");
        let e = record_error(
            dir,
            RecordError::Corrupt { path: dir.join("steps/0000000003.log.zst"), offset: Some(7), what: "bad".into() },
        )
        .0;
        assert_eq!(
            (e.code.as_str(), e.file.as_deref(), e.offset),
            (code::CORRUPT, Some("steps/0000000003.log.zst"), Some(7))
        );
        assert!(!e.error.contains("/srv"), "{}", e.error);
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = record_error(dir, RecordError::Io { op: "read", path: dir.join("x"), source: missing }).0;
        assert_eq!(e.code, code::NOT_FOUND);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = record_error(dir, RecordError::Io { op: "read", path: dir.join("x"), source: denied }).0;
        assert_eq!(e.code, code::INTERNAL);
        assert!(!e.error.contains("/srv"), "{}", e.error);
    }
}
