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
    /// Overrides the config's `token` (bearer token required on /v1/audits).
    #[arg(long)]
    token: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<Exit, Failure> {
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
    if args.token.is_some() {
        cfg.token = args.token;
    }
    cfg.validate().map_err(|e| usage(format_args!("config: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let (listener, addr) = auditor::daemon::bind(&cfg.listen).await.map_err(|e| {
            let e = anyhow::Error::new(e).context(format!("binding {}", cfg.listen));
            // An address that does not parse is the user's; one that is taken is the machine's.
            match e.downcast_ref::<DaemonError>() {
                Some(DaemonError::Http(io)) if io.kind() == std::io::ErrorKind::InvalidInput => Failure::Usage(e),
                _ => Failure::Undecided(e),
            }
        })?;
        // The address line is how supervisors and tests find the daemon. It is a courtesy: a
        // daemon that cannot print it (stdout closed or failing) keeps serving.
        let _ = emit(&format!("auditor daemon listening on http://{addr} (state in {})\n", cfg.state_dir.display()));
        auditor::daemon::serve(listener, cfg, shutdown_signal()).await.context("daemon")?;
        let _ = emit("auditor daemon stopped\n");
        Ok::<_, Failure>(())
    })?;
    Ok(Exit::Ok)
}

/// Completes on SIGTERM or Ctrl-C. (The same as `trainer-agent`'s: the two binaries share no
/// crate that knows tokio, and 15 lines do not justify one.)
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No Ctrl-C handler could be installed: rely on SIGTERM alone, rather than stop now.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
