//! The auditor daemon: a long-running service that takes audit requests over HTTP, replays the
//! records on trainers' record servers, and publishes signed reports.
//!
//! - [`job`]: requests, job states and the worker logic, against small traits (store, runner,
//!   clock) so a seeded simulation can crash it and inject failures.
//! - [`store`]: the embedded SQLite store under `--state-dir` (jobs, progress, reports).
//! - [`runner`]: one attempt of an audit over HTTP ([`crate::http::HttpTrainer`]).
//! - [`api`]: the axum routes.
//! - [`metrics`]: Prometheus metrics, all named `tiebreak_auditor_*`.
//!
//! [`serve`] ties them together; it takes its shutdown signal as a future so tests can run a
//! daemon in-process on `127.0.0.1:0`.

pub mod api;
pub mod job;
pub mod live;
pub mod metrics;
pub mod runner;
pub mod store;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kernels::Profile;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::http::RetryPolicy;
use job::{Clock, Store, SystemClock, Worked, Worker, WorkerConfig};
use metrics::Metrics;
use runner::{DataPaths, HttpRunner};
use store::SqliteStore;

/// The signing key's file under the state directory.
pub const KEY_FILE: &str = "auditor.key";
/// Held (flock) by the daemon using a state directory, so two daemons never share one: the
/// second would requeue the first one's running audits at start-up.
pub const LOCK_FILE: &str = "daemon.lock";

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("config {origin}: {detail}")]
    Config { origin: String, detail: String },
    #[error(transparent)]
    Store(#[from] job::StoreError),
    #[error("signing key {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("serving HTTP: {0}")]
    Http(std::io::Error),
    #[error("state directory {path}: {detail}")]
    StateDir { path: PathBuf, detail: String },
}

/// `configs/auditor.toml`. Every field has a default; unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Where the database and the signing key live (relative to the working directory).
    pub state_dir: PathBuf,
    /// Bearer token required on `/v1/audits*`; none = open.
    pub token: Option<String>,
    /// The file the token came from (`--token-file`): SIGHUP reads it again.
    #[serde(skip)]
    pub token_file: Option<PathBuf>,
    /// Audits replayed at once.
    pub workers: usize,
    /// Most audits waiting in the queue; more are refused with 429.
    pub queue_max: u64,
    /// Largest request body accepted.
    pub body_bytes_max: usize,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub connections_max: usize,
    /// Time a client has to send a request head (also how long an idle connection is kept).
    pub header_read_timeout_ms: u64,
    /// Time a request has, its body included, before it is answered 408.
    pub request_time_max_ms: u64,
    /// Replay profile when a request names none.
    pub device: String,
    /// Claims of one audit (crashes, requeues) before it is failed.
    pub attempts_max: u32,
    /// Least time between two durable progress writes of one audit.
    pub progress_interval_ms: u64,
    /// How long a graceful shutdown waits for running audits to stop at a step boundary.
    pub shutdown_grace_ms: u64,
    /// Wall-clock limit of one audit attempt; past it the audit ends `failed` with reason
    /// `time-limit` (not a verdict), unless the trainer was silent for `trainer.deadline_ms`
    /// first (`trainer-unresponsive`).
    pub audit_time_max_ms: u64,
    /// Serve HTTPS with this certificate chain (PEM, leaf first) and `tls_key`; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub data: DataSection,
    pub trainer: TrainerSection,
}

/// Local copies of datasets, for specs that are not synthetic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub mnist: Option<PathBuf>,
    pub text: Option<PathBuf>,
}

/// Requests to trainers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSection {
    pub request_timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Ignored (accepted so that older configs still load): failed requests are retried until
    /// `deadline_ms`, the only way to `trainer-unresponsive`.
    pub attempts_max: Option<u32>,
    /// A trainer that has not answered one request for this long is unresponsive.
    pub deadline_ms: u64,
    pub response_bytes_max: u64,
    /// A private CA (PEM) that `https://` trainers' certificates may chain to, besides the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// `host:port` pairs (`*` for any port) that `trainer_url`s may name; empty allows every
    /// host and port, including the daemon's own network neighbours.
    pub allow: Vec<String>,
}

impl Default for TrainerSection {
    fn default() -> Self {
        let p = RetryPolicy::default();
        TrainerSection {
            request_timeout_ms: p.request_timeout.as_millis() as u64,
            backoff_initial_ms: p.backoff_initial.as_millis() as u64,
            backoff_max_ms: p.backoff_max.as_millis() as u64,
            attempts_max: None,
            deadline_ms: p.deadline.as_millis() as u64,
            response_bytes_max: p.response_bytes_max,
            ca_file: None,
            allow: Vec::new(),
        }
    }
}

impl TrainerSection {
    /// Whether `trainer_url` names a host and port the allow-list lets the daemon contact
    /// (`Err` says why not, naming the host and port but nothing else of the URL).
    pub fn check_allowed(&self, trainer_url: &str) -> Result<(), String> {
        if self.allow.is_empty() {
            return Ok(());
        }
        let url = crate::http::parse_trainer_url(trainer_url).map_err(|e| format!("trainer_url: {e}"))?;
        let hp = crate::http::host_port(&url);
        let host = hp.rsplit_once(':').map_or("", |(h, _)| h);
        let allowed = self.allow.iter().any(|a| {
            let a = a.to_ascii_lowercase();
            a == hp || a.strip_suffix(":*").is_some_and(|h| h == host)
        });
        if allowed { Ok(()) } else { Err(format!("trainer_url: {hp} is not in this daemon's trainer.allow list")) }
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            deadline: Duration::from_millis(self.deadline_ms),
            response_bytes_max: self.response_bytes_max,
            // Read (and checked) by `Config::validate` at start.
            ca_certs: self.ca_file.as_deref().map(service::tls::read_ca_file).and_then(Result::ok).unwrap_or_default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let w = WorkerConfig::default();
        Config {
            listen: "127.0.0.1:8420".into(),
            state_dir: PathBuf::from("auditor-state"),
            token: None,
            token_file: None,
            workers: 2,
            queue_max: 256,
            body_bytes_max: 64 << 10,
            connections_max: service::CONNECTIONS_MAX_DEFAULT,
            header_read_timeout_ms: service::HEADER_READ_TIMEOUT_DEFAULT.as_millis() as u64,
            request_time_max_ms: 30_000,
            device: Profile::CpuSeq.name().into(),
            attempts_max: w.attempts_max,
            progress_interval_ms: w.progress_interval_ms,
            shutdown_grace_ms: 10_000,
            audit_time_max_ms: 6 * 3600 * 1000,
            tls_cert: None,
            tls_key: None,
            data: DataSection::default(),
            trainer: TrainerSection::default(),
        }
    }
}

impl Config {
    /// Parses and checks a config; errors name the file and the field.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, DaemonError> {
        let err = |detail: String| DaemonError::Config { origin: origin.to_string(), detail };
        let cfg: Config = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::Config { origin: path.display().to_string(), detail: format!("reading: {e}") })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Range checks, each naming its field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.workers) {
            return Err(format!("workers = {}: must be 1..=64", self.workers));
        }
        if !(1..=1_000_000).contains(&self.queue_max) {
            return Err(format!("queue_max = {}: must be 1..=1000000", self.queue_max));
        }
        if !(256..=(16 << 20)).contains(&self.body_bytes_max) {
            return Err(format!("body_bytes_max = {}: must be 256..=16777216", self.body_bytes_max));
        }
        self.device.parse::<Profile>().map_err(|e| format!("device = {:?}: {e}", self.device))?;
        if !(1..=100_000).contains(&self.connections_max) {
            return Err(format!("connections_max = {}: must be 1..=100000", self.connections_max));
        }
        if self.header_read_timeout_ms == 0 || self.request_time_max_ms == 0 {
            return Err("header_read_timeout_ms and request_time_max_ms must be positive".into());
        }
        if self.audit_time_max_ms < 1000 {
            return Err(format!("audit_time_max_ms = {}: must be at least 1000", self.audit_time_max_ms));
        }
        if self.attempts_max == 0 {
            return Err("attempts_max = 0: must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key: give both (HTTPS) or neither (plain HTTP)".into());
        }
        if let Some(ca) = &self.trainer.ca_file {
            service::tls::read_ca_file(ca).map_err(|e| format!("trainer.ca_file = {e}"))?;
        }
        if let Some(t) = &self.token
            && t.trim().is_empty()
        {
            return Err("token: empty; leave it out for an open daemon".into());
        }
        let t = &self.trainer;
        if t.request_timeout_ms == 0 || t.deadline_ms == 0 {
            return Err("trainer.request_timeout_ms and trainer.deadline_ms must be positive".into());
        }
        if t.backoff_initial_ms > t.backoff_max_ms {
            return Err(format!(
                "trainer.backoff_initial_ms = {} is more than trainer.backoff_max_ms = {}",
                t.backoff_initial_ms, t.backoff_max_ms
            ));
        }
        for a in &t.allow {
            let ok = a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && (p == "*" || p.parse::<u16>().is_ok()));
            if !ok {
                return Err(format!("trainer.allow: {a:?} is not host:port or host:*"));
            }
        }
        if t.response_bytes_max < 1 << 16 {
            return Err(format!("trainer.response_bytes_max = {}: must be at least 65536", t.response_bytes_max));
        }
        Ok(())
    }

    fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            attempts_max: self.attempts_max,
            progress_interval_ms: self.progress_interval_ms,
            ..WorkerConfig::default()
        }
    }
}

/// Shared state of a running daemon.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    /// Woken when an audit is queued.
    pub queued: Arc<Notify>,
    pub auditor_public_key: String,
    /// Set when shutdown begins (`/readyz` then answers 503).
    pub stopping: Arc<AtomicBool>,
    /// The bearer token now (SIGHUP reloads it from `config.token_file`).
    pub token: service::Token,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Runs the daemon on `listener` until `shutdown` completes: then stops accepting requests,
/// asks running audits to stop at their next step (their progress is kept and they are
/// requeued), waits up to `shutdown_grace_ms` for them, and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    config.validate().map_err(|detail| DaemonError::Config { origin: "config".into(), detail })?;
    let _lock = lock_state_dir(&config.state_dir)?;
    refuse_lost_database(&config.state_dir)?;
    let state_dir = config.state_dir.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_ms();
    let store = tokio::task::spawn_blocking(move || -> Result<SqliteStore, job::StoreError> {
        let s = SqliteStore::open(&state_dir)?;
        s.recover(now)?;
        Ok(s)
    })
    .await
    .map_err(|e| job::StoreError(format!("opening the store: {e}")))??;
    let store: Arc<dyn Store> = Arc::new(store);
    let key_path = config.state_dir.join(KEY_FILE);
    let key = engine::record::load_or_create_key(&key_path)
        .map_err(|e| DaemonError::Key { path: key_path.clone(), detail: e.to_string() })?;
    let metrics = Metrics::new();
    metrics.live.keep_times_in(config.state_dir.join(live::TIMINGS_DIR));
    let cancel = Arc::new(AtomicBool::new(false));
    let runner = HttpRunner {
        runtime: tokio::runtime::Handle::current(),
        policy: config.trainer.policy(),
        key: key.clone(),
        default_device: config.device.parse().expect("validated"),
        data: DataPaths { mnist: config.data.mnist.clone(), text: config.data.text.clone() },
        metrics: metrics.clone(),
        shutdown: cancel.clone(),
        time_max: Duration::from_millis(config.audit_time_max_ms),
        trainers: config.trainer.clone(),
    };
    let worker = Worker {
        store: store.clone(),
        runner: Arc::new(CatchPanics(Arc::new(runner))),
        clock: clock.clone(),
        observer: Arc::new(metrics.clone()),
        config: config.worker_config(),
        cancel: cancel.clone(),
    };
    let shared = Shared {
        store,
        metrics,
        config: Arc::new(config.clone()),
        clock,
        queued: Arc::new(Notify::new()),
        auditor_public_key: common::codec::to_hex(key.verifying_key().as_bytes()),
        stopping: cancel.clone(),
        token: service::Token::new(config.token.clone()),
    };
    if let (Some(_), Some(file)) = (&config.token, &config.token_file) {
        shared.token.reload_on_hangup(file.clone());
    }

    let workers: Vec<_> = (0..config.workers)
        .map(|_| tokio::spawn(worker_loop(worker.clone(), shared.queued.clone(), cancel.clone())))
        .collect();
    let app = api::router(shared.clone());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let queued = shared.queued.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.store(true, Ordering::SeqCst);
        queued.notify_waiters();
        let _ = stop_tx.send(true);
    });
    let limits = service::Limits {
        connections_max: config.connections_max,
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            service::tls::ServerTls::from_pem_files(cert, key)
                .map_err(|detail| DaemonError::Config { origin: "tls".into(), detail })?,
        ),
        _ => None,
    };
    if let Ok(addr) = listener.local_addr() {
        service::tls::warn_if_plain_and_exposed(addr, tls.is_some(), "the auditor daemon");
    }
    let served = service::serve_tls(listener, app, limits, tls, async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    })
    .await;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let _ = tokio::time::timeout(grace, async {
        for w in workers {
            let _ = w.await;
        }
    })
    .await;
    served.map_err(DaemonError::Http)
}

/// A signing key without its database means the database was lost or moved: a fresh one would
/// number audits from `audit-1` again, and a published report URL would then serve a different
/// report signed by the same key. Refused, saying how to go on.
fn refuse_lost_database(dir: &Path) -> Result<(), DaemonError> {
    if dir.join(KEY_FILE).exists() && !dir.join(store::DB_FILE).exists() {
        return Err(DaemonError::StateDir {
            path: dir.to_path_buf(),
            detail: format!(
                "{KEY_FILE} is there but {db} is not: the database was lost or moved. Restore {db} (with its -wal \
                 file, if any) from a backup; or, to start afresh, move {KEY_FILE} away too: the new daemon makes \
                 a new key, so its reports can never be mistaken for the old ones (keep the old public key to \
                 verify those)",
                db = store::DB_FILE
            ),
        });
    }
    Ok(())
}

/// Takes the state directory's lock for as long as the returned file lives (the OS drops it if
/// the process dies, so a kill -9 leaves nothing to clean up).
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, DaemonError> {
    let err = |detail: String| DaemonError::StateDir { path: dir.to_path_buf(), detail };
    store::create_private_dir(dir).map_err(|e| err(format!("creating it: {e}")))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("opening {LOCK_FILE}: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(err("another auditor daemon is using it (its lock file is held); give each daemon its own --state-dir"
                .into()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(err(format!("locking {LOCK_FILE}: {e}"))),
    }
}

/// Turns a panic in an audit (a bug in the auditor) into a failed audit that says so, instead
/// of a job left `running` with nobody on it until the next restart.
struct CatchPanics(Arc<dyn job::Runner>);

impl job::Runner for CatchPanics {
    fn run(&self, job: &job::Job, progress: &dyn crate::Progress) -> job::Outcome {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.run(job, progress))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                job::Outcome::Failed(format!("the auditor panicked (a bug; please report it): {msg}"))
            }
        }
    }
}

/// One worker: claim, run, repeat; wait for a submission (or poll) when idle.
async fn worker_loop(worker: Worker, queued: Arc<Notify>, cancel: Arc<AtomicBool>) {
    while !cancel.load(Ordering::SeqCst) {
        let w = worker.clone();
        let worked = tokio::task::spawn_blocking(move || w.work_one()).await.unwrap_or(Worked::StoreUnavailable);
        if !matches!(worked, Worked::Job { .. }) {
            // Poll as well as wait: a notification sent before we started waiting is not kept.
            let _ = tokio::time::timeout(Duration::from_secs(1), queued.notified()).await;
        }
    }
}

/// Binds `config.listen` (or the given override) and reports the bound address.
pub async fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), DaemonError> {
    let listener = TcpListener::bind(listen).await.map_err(DaemonError::Http)?;
    let addr = listener.local_addr().map_err(DaemonError::Http)?;
    Ok((listener, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_the_built_in_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/auditor.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
    }

    #[test]
    fn config_typos_and_bad_values_name_the_field() {
        for (text, needle) in [
            ("workerz = 2", "workerz"),
            ("workers = 0", "workers"),
            ("device = \"gpu9\"", "device"),
            ("[trainer]\ndeadline_ms = 0", "deadline_ms"),
            ("[trainer]\nbackoff_initial_ms = 5\nbackoff_max_ms = 1", "backoff_initial_ms"),
            ("[data]\nmnst = \"x\"", "mnst"),
            ("token = \"  \"", "token"),
            ("queue_max = \"many\"", "queue_max"),
        ] {
            let e = Config::from_toml(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains(needle), "{text:?}: {e}");
        }
    }
}
