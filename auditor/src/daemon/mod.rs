//! The auditor daemon: a long-running service that takes audit requests over HTTP, replays the
//! records on trainers' record servers, and publishes signed reports.
//!
//! - [`job`]: requests, job states and the worker logic, against small traits (store, runner,
//!   clock) so a seeded simulation can crash it and inject failures.
//! - [`store`]: the embedded SQLite store under `--state-dir` (jobs, progress, reports).
//! - [`runner`]: one attempt of an audit over HTTP ([`crate::http::HttpTrainer`]).
//! - [`datasets`]: the daemon's copies of datasets, and which one a run needs.
//! - [`api`]: the axum routes.
//! - [`metrics`]: Prometheus metrics, all named `tiebreak_auditor_*`.
//!
//! [`serve`] ties them together; it takes its shutdown signal as a future so tests can run a
//! daemon in-process on `127.0.0.1:0`.

pub mod api;
mod config;
pub mod datasets;
pub mod job;
pub mod live;
pub mod metrics;
pub mod runner;
pub mod store;
pub mod ui;
mod worker;

pub use config::{Config, DataSection, StoreSection, TrainerSection};

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use datasets::Datasets;
use job::{Clock, Store, SystemClock, Worked, Worker};
use metrics::Metrics;
use runner::HttpRunner;
use store::{PgStore, SqliteStore};

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
    serve_then(listener, config, shutdown, || {}).await
}

/// [`serve`], calling `ready` once the state directory, the store and the signing key are open
/// and just before requests are answered: a daemon that refuses its state has announced nothing.
pub async fn serve_then(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    config.validate().map_err(|detail| DaemonError::Config { origin: "config".into(), detail })?;
    let _lock = lock_state_dir(&config.state_dir)?;
    if !config.store.is_shared() {
        refuse_lost_database(&config.state_dir)?;
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (now, node) = (clock.now_ms(), config.store.node());
    let (state_dir, url) = (config.state_dir.clone(), config.store.url.clone());
    let lease_ms = config.store.lease_ms;
    let store = tokio::task::spawn_blocking(move || -> Result<Arc<dyn Store>, job::StoreError> {
        let s: Arc<dyn Store> = match url {
            Some(url) => Arc::new(PgStore::connect(&url)?),
            None => Arc::new(SqliteStore::open(&state_dir)?),
        };
        // Leases of this node name that have not run out: its last process died moments ago,
        // or another daemon runs under the same name. A live one renews within lease_ms / 3.
        if let Some(until) = s.live_lease(&node, now)? {
            tracing::info!(node, "this node name holds live leases: checking that no other daemon renews them");
            std::thread::sleep(Duration::from_millis(lease_ms / 3 + 1000));
            let later = SystemClock.now_ms();
            if s.live_lease(&node, later)?.is_some_and(|l| l > until) {
                return Err(job::StoreError(format!(
                    "another live daemon is working as node {node:?} (it renewed its leases while this one waited); \
                     give each daemon of a fleet its own --node"
                )));
            }
        }
        // Leases this node held when it last stopped: its workers are gone.
        let released = s.recover(&node, now)?;
        tracing::info!(node, released, "store open");
        Ok(s)
    })
    .await
    .map_err(|e| job::StoreError(format!("opening the store: {e}")))??;
    let key_path = config.key_path();
    // A named key is the firm's: used as it is, never made here (each daemon of a fleet would
    // otherwise make its own, and their reports would verify under different keys).
    if config.key_file.is_some() && std::fs::symlink_metadata(&key_path).is_err() {
        return Err(DaemonError::Key {
            path: key_path,
            detail: "missing: a named key_file is never created; copy the firm's key there (64 hex characters \
                     of an ed25519 secret key, e.g. the auditor.key a daemon made in its state directory)"
                .into(),
        });
    }
    let key = engine::record::load_or_create_key(&key_path)
        .map_err(|e| DaemonError::Key { path: key_path.clone(), detail: e.to_string() })?;
    let public_key = common::codec::to_hex(key.verifying_key().as_bytes());
    let pin = (store.clone(), public_key.clone());
    let fleet_key = tokio::task::spawn_blocking(move || pin.0.pin_signing_key(&pin.1))
        .await
        .map_err(|e| job::StoreError(format!("recording the signing key: {e}")))??;
    if fleet_key != public_key {
        return Err(DaemonError::Key {
            path: key_path,
            detail: format!(
                "this daemon's key (public {public_key}) is not the fleet's: its database records that its daemons \
                 sign with {fleet_key}; copy the fleet's key_file here, so every report verifies under one key"
            ),
        });
    }
    let metrics = Metrics::new();
    metrics.live.keep_times_in(config.state_dir.join(live::TIMINGS_DIR));
    let cancel = Arc::new(AtomicBool::new(false));
    let runner = HttpRunner {
        runtime: tokio::runtime::Handle::current(),
        policy: config.trainer.policy(),
        key: key.clone(),
        default_device: config.default_device().expect("validated"),
        data: Arc::new(Datasets::new(config.data.clone())),
        metrics: metrics.clone(),
        shutdown: cancel.clone(),
        time_max: Duration::from_millis(config.audit_time_max_ms),
        trainers: config.trainer.clone(),
        helped: Default::default(),
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
        auditor_public_key: public_key,
        stopping: cancel.clone(),
        token: service::Token::new(config.token.clone()),
    };
    shared.token.set_grace(Duration::from_secs(config.token_grace_s));
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
    ready();
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
///
/// An empty database file (truncated) counts as lost too, unless its write-ahead log holds what
/// has not been checkpointed into it yet.
fn refuse_lost_database(dir: &Path) -> Result<(), DaemonError> {
    let len = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
    let wal = format!("{}-wal", store::DB_FILE);
    let lost = match len(store::DB_FILE) {
        None => true,
        Some(0) => len(&wal).unwrap_or(0) == 0,
        Some(_) => false,
    };
    if dir.join(KEY_FILE).exists() && lost {
        return Err(DaemonError::StateDir {
            path: dir.to_path_buf(),
            detail: format!(
                "{KEY_FILE} is there but {db} is missing or empty: the database was lost or moved. Restore {db} (with its -wal \
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

    fn run_interval(&self, job: &job::Job, interval: (u64, u64), progress: &dyn crate::Progress) -> job::ItemOutcome {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.run_interval(job, interval, progress))) {
            Ok(outcome) => outcome,
            // Left to the coordinator, whose own replay of it reports the panic.
            Err(_) => job::ItemOutcome::Ended,
        }
    }
}

/// One worker: claim, run, repeat; wait for a submission (or poll) when idle.
async fn worker_loop(worker: Worker, queued: Arc<Notify>, cancel: Arc<AtomicBool>) {
    while !cancel.load(Ordering::SeqCst) {
        let w = worker.clone();
        let worked = tokio::task::spawn_blocking(move || w.work_one()).await.unwrap_or(Worked::StoreUnavailable);
        if matches!(worked, Worked::Idle | Worked::StoreUnavailable) {
            // Poll as well as wait: a notification sent before we started waiting is not kept.
            // On a shared store, other daemons publish work nobody here is told about: look
            // again every `poll_ms`.
            let idle = if worker.config.share { worker.config.poll_ms } else { 1000 };
            let _ = tokio::time::timeout(Duration::from_millis(idle), queued.notified()).await;
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
            ("[store]\nurl = \"mysql://db/x\"", "store.url"),
            ("[store]\nurl = \"postgres://db/x\"", "key_file"),
            ("key_file = \"k\"\n[store]\nnode = \"a b\"", "store.node"),
            ("[store]\nlease_ms = 5", "store.lease_ms"),
            ("[store]\nleas_ms = 5", "leas_ms"),
        ] {
            let e = Config::from_toml(text, "t.toml").unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains(needle), "{text:?}: {e}");
        }
    }
}
