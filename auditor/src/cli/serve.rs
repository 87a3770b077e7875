//! `auditor serve`: load and check the daemon's configuration (any problem is a usage error),
//! bind, and hand over to the library's `serve` with a shutdown signal.

use std::path::PathBuf;

use anyhow::Context;
use auditor::daemon::{Config, DaemonError};

use super::exit::{Exit, Failure, usage};
use super::output::{emit, require_exists};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The daemon's config (TOML); without it, the built-in defaults (those of
    /// configs/auditor.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides the config's `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides the config's `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides the config's `token` (bearer token required on /v1/audits). Shows in process
    /// lists: prefer --token-file or the AUDITOR_TOKEN environment variable.
    #[arg(long)]
    token: Option<String>,
    /// Reads the token from this file (a trailing newline is dropped).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A local dataset for specs that need one, as NAME=PATH: `mnist` (IDX directory) and `text`
    /// (text file) serve every spec of their kind; any other name is a user's dataset (CSV,
    /// safetensors, token file, ...), used for the runs whose committed data it is or whose
    /// audit request names it. Overrides the config's `[data]`. Repeatable.
    #[arg(long, value_name = "NAME=PATH")]
    data: Vec<String>,
    /// The job store shared by a fleet of daemons, `postgres://user@host:port/db` (overrides
    /// the config's `[store] url`; also read from `AUDITOR_STORE`, which keeps a password out of
    /// process lists). Without it: the embedded SQLite database under the state directory.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// This daemon's name in the store's leases (overrides `[store] node`).
    #[arg(long)]
    node: Option<String>,
    /// The signing key file, the firm's one key in a fleet (overrides `key_file`).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Log lines on stderr as `text` or `json` (`RUST_LOG` sets the level).
    #[arg(long, default_value = "text")]
    log_format: service::LogFormat,
    /// Serve HTTPS with this certificate chain (PEM; overrides the config's `tls_cert`).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; overrides the config's `tls_key`).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<Exit, Failure> {
    service::init_logs(args.log_format);
    let mut cfg = match &args.config {
        Some(path) => {
            require_exists("--config", path)?;
            Config::load(path).map_err(|e| usage(format_args!("--config {}: {e}", path.display())))?
        }
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(d) = args.state_dir {
        cfg.state_dir = d;
    }
    let from_file = args.token.is_none() && args.token_file.is_some();
    if let Some(t) = service::secret(args.token, args.token_file.as_deref(), "AUDITOR_TOKEN").map_err(usage)? {
        cfg.token = Some(t);
        if from_file {
            cfg.token_file = args.token_file.clone();
        }
    }
    if let Some(url) = args.store.or_else(|| std::env::var("AUDITOR_STORE").ok().filter(|u| !u.is_empty())) {
        cfg.store.url = Some(url);
    }
    if let Some(n) = args.node {
        cfg.store.node = Some(n);
    }
    if let Some(k) = args.key_file {
        cfg.key_file = Some(k);
    }
    let mut named = std::collections::BTreeSet::new();
    for d in &args.data {
        let (name, path) = d.split_once('=').ok_or_else(|| usage(format_args!("--data {d:?}: not NAME=PATH")))?;
        // A flag overrides the config file's entry; two flags for one name are a mistake.
        if !named.insert(name) {
            return Err(usage(format_args!("--data {name}=…: given twice (one path per name)")));
        }
        let path = PathBuf::from(path);
        require_exists("--data", &path)?;
        match name {
            "mnist" => cfg.data.mnist = Some(path),
            "text" => cfg.data.text = Some(path),
            _ if auditor::daemon::datasets::is_valid_name(name) => {
                cfg.data.files.insert(name.to_string(), path);
            }
            _ => {
                return Err(usage(format_args!(
                    "--data {name}=…: NAME is mnist, text, or a name of the user's dataset (1 to 64 of [A-Za-z0-9._-], \
                     not starting with '.')"
                )));
            }
        }
    }
    if let (Some(c), Some(k)) = (args.tls_cert, args.tls_key) {
        (cfg.tls_cert, cfg.tls_key) = (Some(c), Some(k));
    }
    cfg.validate().map_err(|e| usage(format_args!("config: {e}")))?;
    // A profile this machine cannot run would fail every audit that does not name another.
    if let Ok(Some(device)) = cfg.default_device() {
        kernels::Device::new(device).map_err(|e| usage(format_args!("config: device = {:?}: {e}", cfg.device)))?;
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert, &cfg.tls_key) {
        service::tls::ServerTls::from_pem_files(c, k).map_err(usage)?;
    }
    // Each worker holds a blocking thread for its whole audit; the handlers share the rest.
    let rt = service::runtime(cfg.workers + service::HANDLER_BLOCKING_THREADS).context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = service::shutdown_signal();
        let (listener, addr) = auditor::daemon::bind(&cfg.listen).await.map_err(|e| {
            let e = anyhow::Error::new(e).context(format!("binding {}", cfg.listen));
            // An address that does not parse is the user's; one that is taken is the machine's.
            match e.downcast_ref::<DaemonError>() {
                Some(DaemonError::Http(io)) if io.kind() == std::io::ErrorKind::InvalidInput => Failure::Usage(e),
                _ => Failure::Undecided(e),
            }
        })?;
        if cfg.token.is_none() {
            tracing::warn!(
                listen = %addr,
                "no token (--token, --token-file, AUDITOR_TOKEN): anyone who reaches this address may submit, list \
                 and cancel audits and see the private pages"
            );
        }
        if cfg.trainer.allow.is_empty() {
            tracing::info!("trainer.allow is empty: audits may name any host and port");
        }
        // The address line is how supervisors and tests find the daemon. It is a courtesy: a
        // daemon that cannot print it (stdout closed or failing) keeps serving. It is printed once
        // the state is open, so a daemon that refuses its state directory never announces itself.
        let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
        let jobs =
            if cfg.store.is_shared() { format!(", jobs in PostgreSQL as {}", cfg.store.node()) } else { String::new() };
        let line =
            format!("auditor daemon listening on {scheme}://{addr} (state in {}{jobs})\n", cfg.state_dir.display());
        auditor::daemon::serve_then(listener, cfg, shutdown, || {
            let _ = emit(&line);
        })
        .await
        .context("daemon")?;
        let _ = emit("auditor daemon stopped\n");
        Ok::<_, Failure>(())
    })?;
    Ok(Exit::Ok)
}
