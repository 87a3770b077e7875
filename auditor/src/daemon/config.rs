//! The daemon's config (`configs/auditor.toml`): every field has a default, unknown fields are
//! errors, and every range is checked at start, the message naming the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kernels::Profile;
use serde::Deserialize;

use super::DaemonError;
use super::job::WorkerConfig;
use crate::http::RetryPolicy;

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
    /// Seconds the token a SIGHUP reload replaces is still accepted (0: revoked at once).
    pub token_grace_s: u64,
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
    /// The signing key (default `auditor.key` under `state_dir`, made on first start). A
    /// fleet names the firm's one key here: it must exist (it is never made).
    pub key_file: Option<PathBuf>,
    pub store: StoreSection,
    pub data: DataSection,
    pub trainer: TrainerSection,
}

/// Where jobs are kept, and this daemon's name in the leases.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `postgres://user@host:port/db`: a database shared by a fleet of daemons. None: the
    /// embedded SQLite database under `state_dir`, for this daemon alone.
    pub url: Option<String>,
    /// This daemon's name in leases, unique within a fleet (default: `local` on SQLite,
    /// `<hostname>-<pid>` on PostgreSQL). A daemon restarted under the same name takes its
    /// own leases back at once instead of waiting for them to expire.
    pub node: Option<String>,
    /// How long a claim lasts without renewal: how soon a dead daemon's audit or interval is
    /// taken over by another.
    pub lease_ms: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { url: None, node: None, lease_ms: WorkerConfig::default().lease_ms }
    }
}

impl StoreSection {
    /// Whether the store is a shared PostgreSQL database.
    pub fn is_shared(&self) -> bool {
        self.url.is_some()
    }

    /// The node name leases are taken under.
    pub fn node(&self) -> String {
        match (&self.node, self.is_shared()) {
            (Some(n), _) => n.clone(),
            (None, false) => "local".into(),
            (None, true) => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect())
                    .filter(|h: &String| !h.is_empty())
                    .unwrap_or_else(|| "auditor".into());
                format!("{host}-{}", std::process::id())
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err("store.url: not a postgres:// or postgresql:// URL".into());
        }
        if let Some(n) = &self.node
            && (n.is_empty() || n.len() > 64 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(format!("store.node = {n:?}: 1 to 64 of [A-Za-z0-9._-]"));
        }
        if !(100..=3_600_000).contains(&self.lease_ms) {
            return Err(format!("store.lease_ms = {}: must be 100..=3600000", self.lease_ms));
        }
        Ok(())
    }
}

/// Local copies of datasets, for specs that are not synthetic ([`super::datasets`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// The MNIST IDX directory for every `mnist` spec.
    pub mnist: Option<PathBuf>,
    /// The text file for every `text` spec.
    pub text: Option<PathBuf>,
    /// The users' own datasets (CSV, safetensors, token files; more MNIST directories or texts)
    /// by name: a request may name one, and otherwise gets the one that is its run's.
    pub files: std::collections::BTreeMap<String, PathBuf>,
}

impl DataSection {
    /// Names and paths, each naming the entry: every path must be there at start (an audit
    /// that needs a missing one would only fail later, `undecided`).
    pub fn validate(&self) -> Result<(), String> {
        let there = |key: String, path: &std::path::Path, dir: Option<bool>| match std::fs::metadata(path) {
            Err(e) => Err(format!("{key} = {}: {e}", path.display())),
            Ok(m) if dir.is_some_and(|d| d != m.is_dir()) => Err(format!(
                "{key} = {}: {}",
                path.display(),
                if m.is_dir() { "a directory, not a text file" } else { "not a directory of MNIST IDX files" }
            )),
            Ok(_) => Ok(()),
        };
        if let Some(p) = &self.mnist {
            there("data.mnist".into(), p, Some(true))?;
        }
        if let Some(p) = &self.text {
            there("data.text".into(), p, Some(false))?;
        }
        for (name, path) in &self.files {
            if !super::datasets::is_valid_name(name) || super::datasets::KIND_NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "data.files.{name:?}: a name is 1 to 64 of [A-Za-z0-9._-], not starting with '.', and not mnist or \
                     text (those are data.mnist and data.text)"
                ));
            }
            if path.as_os_str().is_empty() {
                return Err(format!("data.files.{name}: empty path"));
            }
            there(format!("data.files.{name}"), path, None)?;
        }
        Ok(())
    }
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
    /// A trainer whose answers have been slow (beyond 1 s each plus 1 s per MiB) for this long
    /// in all, over one audit attempt, is unresponsive (`RetryPolicy::slow_answers_max`).
    pub slow_answers_max_ms: u64,
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
            slow_answers_max_ms: p.slow_answers_max.map_or(u64::MAX, |d| d.as_millis() as u64),
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
            slow_answers_max: Some(Duration::from_millis(self.slow_answers_max_ms)),
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
            token_grace_s: service::TOKEN_GRACE_DEFAULT.as_secs(),
            workers: 2,
            queue_max: 256,
            body_bytes_max: 64 << 10,
            connections_max: service::CONNECTIONS_MAX_DEFAULT,
            header_read_timeout_ms: service::HEADER_READ_TIMEOUT_DEFAULT.as_millis() as u64,
            request_time_max_ms: 30_000,
            device: "auto".into(),
            attempts_max: w.attempts_max,
            progress_interval_ms: w.progress_interval_ms,
            shutdown_grace_ms: 10_000,
            audit_time_max_ms: 6 * 3600 * 1000,
            tls_cert: None,
            tls_key: None,
            key_file: None,
            store: StoreSection::default(),
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
        let text = common::files::read_regular_text(path, engine::spec::CONFIG_FILE_BYTES_MAX)
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
        self.default_device().map_err(|e| format!("device = {:?}: {e} (or \"auto\")", self.device))?;
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
        self.store.validate()?;
        self.data.validate()?;
        if self.store.is_shared() && self.key_file.is_none() {
            return Err("key_file: a fleet on a shared store signs with the firm's one key; name its file".into());
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
        if t.request_timeout_ms == 0 || t.deadline_ms == 0 || t.slow_answers_max_ms == 0 {
            return Err(
                "trainer.request_timeout_ms, trainer.deadline_ms and trainer.slow_answers_max_ms must be positive"
                    .into(),
            );
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

    pub(super) fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            attempts_max: self.attempts_max,
            progress_interval_ms: self.progress_interval_ms,
            node: self.store.node(),
            lease_ms: self.store.lease_ms,
            poll_ms: (self.store.lease_ms / 10).clamp(20, 250),
            share: self.store.is_shared(),
            ..WorkerConfig::default()
        }
    }

    /// The replay profile when a request names none; `None` for `auto` (a fast profile other
    /// than the trainer's, [`Profile::auditor_default`]).
    pub fn default_device(&self) -> Result<Option<Profile>, String> {
        if self.device == "auto" {
            Ok(None)
        } else {
            self.device.parse::<Profile>().map(Some).map_err(|e| e.to_string())
        }
    }

    /// The signing key's file.
    pub fn key_path(&self) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| self.state_dir.join(super::KEY_FILE))
    }
}
