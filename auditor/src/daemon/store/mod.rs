//! The daemon's durable state behind one trait ([`super::job::Store`]), in two stores:
//!
//! - [`SqliteStore`]: the embedded default, `auditor.sqlite3` under `--state-dir`, for one
//!   daemon (no server to set up);
//! - [`PgStore`]: a PostgreSQL database shared by a fleet of daemons (`--store postgres://…`),
//!   whose claims are leases taken with `FOR UPDATE SKIP LOCKED`.
//!
//! Both keep the same invariants (see `ARCHITECTURE.md`, "Store and leases"), checked by the
//! same contract tests (`tests/store_contract.rs`) and the seeded simulation
//! (`tests/daemon_sim.rs`).

use std::path::Path;

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::{CHECK_EVERY, DB_FILE, SCHEMA_VERSION, SqliteStore};

/// Creates `dir` (and its parents) if it is missing, readable by its owner only (it holds
/// trainer tokens and the signing key). An existing directory is left exactly as it is: its
/// mode is the operator's (a shared 1777 directory must stay one).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    match b.create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// A count or time as SQL's signed integer (saturating).
pub(crate) fn i(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// A stored signed integer as a count or time (negative reads as 0).
pub(crate) fn u(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

/// Queued rows set aside in one claim at most (each is logged); the claim then answers
/// "nothing to do" and the next one goes on.
pub(crate) const QUARANTINE_PER_CLAIM_MAX: usize = 64;

/// The request that replaces one that no longer parses (the original is kept in table
/// `quarantine`).
pub(crate) const QUARANTINED_REQUEST: &str = r#"{"trainer_url": "", "run": ""}"#;
