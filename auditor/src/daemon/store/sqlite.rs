//! The daemon's durable state: an embedded SQLite database (`auditor.sqlite3` under the state
//! directory) holding jobs, their progress points and their reports.
//!
//! Every [`Store`] method is one transaction, and the database runs in WAL mode with
//! `synchronous = FULL`, so a kill -9 at any moment leaves each job either before or after a
//! transition, never half-way: in particular `done` and its report are written together. A
//! report's primary key is its job id, so it cannot be stored twice.
//!
//! Request JSON is stored as submitted, including a trainer token (it is needed to resume after
//! a crash): keep the state directory private (it is created `0700` when missing; an existing
//! directory keeps the mode its operator gave it). Tokens are never served.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{QUARANTINE_PER_CLAIM_MAX, QUARANTINED_REQUEST, create_private_dir, i, u};
use crate::VerdictKind;
use crate::daemon::job::{
    AuditRequest, Decided, FailReason, Inserted, Item, ItemState, Job, JobState, Store, StoreError, job_id,
};

/// The database file under the state directory.
pub const DB_FILE: &str = "auditor.sqlite3";
/// Bumped when the schema changes; a database with another version is refused, not migrated
/// silently.
pub const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    request TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    steps_replayed INTEGER NOT NULL DEFAULT 0,
    steps_resumed INTEGER NOT NULL DEFAULT 0,
    verdict TEXT,
    first_step INTEGER,
    error TEXT,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    owner TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    commitment TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS progress (
    id TEXT NOT NULL REFERENCES jobs (id),
    job_start INTEGER NOT NULL,
    through INTEGER NOT NULL,
    PRIMARY KEY (id, job_start)
);
CREATE TABLE IF NOT EXISTS items (
    id TEXT NOT NULL REFERENCES jobs (id),
    job_start INTEGER NOT NULL,
    job_end INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'claimed', 'done')),
    owner TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    claims INTEGER NOT NULL DEFAULT 0,
    takeovers INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id, job_start)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    why TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    id TEXT PRIMARY KEY REFERENCES jobs (id),
    report TEXT NOT NULL,
    evidence BLOB
);
";

/// [`Store`] on SQLite.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    /// The database file's device and inode when it was opened: a file removed or replaced
    /// at `path` since (a state directory deleted under a running daemon) is not written to.
    file_id: (u64, u64),
    conn: Mutex<Connection>,
    /// The last integrity check and when it ran ([`Store::check`] runs it at most every
    /// [`CHECK_EVERY`]: it reads the whole file).
    checked: Mutex<Option<(std::time::Instant, Result<(), StoreError>)>>,
}

/// How long an integrity check's answer is reused.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Creates the database file readable by its owner only, or makes an existing one (and its
/// `-wal` and `-shm` files) so: it holds the trainers' tokens of queued audits, whatever the
/// mode of a state directory that already existed. SQLite gives the files it adds the mode of
/// the database file.
fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(meta) = std::fs::metadata(&p)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<SqliteStore, StoreError> {
        create_private_dir(state_dir)
            .map_err(|e| StoreError(format!("creating state directory {}: {e}", state_dir.display())))?;
        let path = state_dir.join(DB_FILE);
        make_private(&path).map_err(|e| StoreError(format!("{}: making it private (0600): {e}", path.display())))?;
        let ctx = |e: rusqlite::Error| StoreError(format!("{}: {e}", path.display()));
        let conn = Connection::open(&path).map_err(ctx)?;
        let file_id = file_id(&path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(ctx)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(ctx)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!("{}: could not switch to WAL mode (got {mode})", path.display())));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(ctx)?;
        conn.execute_batch(SCHEMA).map_err(ctx)?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .optional()
            .map_err(ctx)?;
        let mut version = match version {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?1)", [SCHEMA_VERSION])
                    .map_err(ctx)?;
                SCHEMA_VERSION
            }
            Some(v) => v,
        };
        // Each step moves one version up in one transaction, losing nothing.
        while version < SCHEMA_VERSION {
            let step = match version {
                // Version 1 had no `reason` column (why a job failed).
                1 => {
                    "ALTER TABLE jobs ADD COLUMN reason TEXT;
                     UPDATE jobs SET reason = 'undecided' WHERE state = 'failed';"
                }
                // Version 2 had no leases (the `items` table is created by the schema above).
                2 => {
                    "ALTER TABLE jobs ADD COLUMN owner TEXT;
                     ALTER TABLE jobs ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;"
                }
                // Version 3 did not bind progress to the record it was verified against: its
                // progress is kept but unbound, so the next attempt replays from scratch.
                3 => "ALTER TABLE jobs ADD COLUMN commitment TEXT;",
                v => {
                    return Err(StoreError(format!(
                        "{}: schema version {v}, which no auditor ever wrote; refusing to touch it",
                        path.display()
                    )));
                }
            };
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {step} UPDATE meta SET value = {} WHERE key = 'schema_version'; COMMIT;",
                version + 1
            ))
            .map_err(ctx)?;
            version += 1;
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "{}: schema version {version}, this auditor knows {SCHEMA_VERSION}; refusing to touch it",
                path.display()
            )));
        }
        Ok(SqliteStore { path, file_id, conn: Mutex::new(conn), checked: Mutex::new(None) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        self.still_at_its_path()?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| StoreError(format!("{}: {e}", self.path.display())))
    }
}

/// The device and inode of the file at `path`.
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
}

impl SqliteStore {
    /// `Err` once the database file at its path is not the one this store has open: SQLite would
    /// go on writing to the unlinked file, and everything since would be lost at the next start
    /// (which would also make a new signing key and number audits from 1 again).
    fn still_at_its_path(&self) -> Result<(), StoreError> {
        match file_id(&self.path) {
            Ok(id) if id == self.file_id => Ok(()),
            found => Err(StoreError(format!(
                "{}: the database file was {} while this daemon runs; it writes nothing more (what it \
                 wrote would be lost): stop it, restore the state directory, and start it again",
                self.path.display(),
                if found.is_ok() { "replaced" } else { "removed" }
            ))),
        }
    }
}

const JOB_COLUMNS: &str = "id, request, state, attempts, steps_replayed, steps_resumed, verdict, first_step, error, \
                           created_ms, updated_ms, reason, owner, commitment";

fn job_row(conn: &Connection, r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let id: String = r.get(0)?;
    let request: String = r.get(1)?;
    let state: String = r.get(2)?;
    let bad = |what: String| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into());
    let request: AuditRequest =
        serde_json::from_str(&request).map_err(|e| bad(format!("job {id}: stored request: {e}")))?;
    let state = JobState::parse(&state).ok_or_else(|| bad(format!("job {id}: state {state:?}")))?;
    let verdict = r
        .get::<_, Option<String>>(6)?
        .map(|v| v.parse::<VerdictKind>().map_err(|e| bad(format!("job {id}: verdict: {e}"))))
        .transpose()?;
    let reason = r
        .get::<_, Option<String>>(11)?
        .map(|v| FailReason::parse(&v).ok_or_else(|| bad(format!("job {id}: reason {v:?}"))))
        .transpose()?;
    let mut stmt = conn.prepare_cached("SELECT job_start, through FROM progress WHERE id = ?1 ORDER BY job_start")?;
    let progress = stmt.query_map([&id], |p| Ok((u(p.get(0)?), u(p.get(1)?))))?.collect::<rusqlite::Result<_>>()?;
    Ok(Job {
        id,
        request,
        state,
        attempts: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
        progress,
        steps_replayed: u(r.get(4)?),
        steps_resumed: u(r.get(5)?),
        verdict,
        first_step: r.get::<_, Option<i64>>(7)?.map(u),
        error: r.get(8)?,
        reason,
        created_ms: u(r.get(9)?),
        updated_ms: u(r.get(10)?),
        owner: r.get(12)?,
        commitment: r.get(13)?,
    })
}

/// Sets job `id` aside: its row as it was goes to table `quarantine`, the job becomes `failed`
/// with reason `quarantined` and a request that parses (so listing and status still work).
fn quarantine(tx: &Connection, id: &str, why: &str, now_ms: u64) -> rusqlite::Result<()> {
    tracing::error!(
        audit = id,
        why,
        "quarantined: its stored row no longer parses; the original is kept in table quarantine"
    );
    tx.execute(
        "INSERT OR REPLACE INTO quarantine (id, request, why, at_ms) SELECT id, request, ?2, ?3 FROM jobs WHERE id = ?1",
        params![id, why, i(now_ms)],
    )?;
    tx.execute(
        "UPDATE jobs SET state = 'failed', reason = 'quarantined', verdict = NULL, request = ?2, error = ?3,
         updated_ms = ?4 WHERE id = ?1",
        params![
            id,
            QUARANTINED_REQUEST,
            format!("quarantined: its stored row no longer parses ({why}); the original is kept in table quarantine"),
            i(now_ms)
        ],
    )?;
    Ok(())
}

/// Open (queued or running) jobs: what the queue bound counts.
fn open_jobs(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')", [], |r| r.get(0)).map(u)
}

const ITEM_COLUMNS: &str = "job_start, job_end, state, owner, lease_until_ms, attempts, claims, takeovers";

fn item_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    let state: String = r.get(2)?;
    let state = ItemState::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Text,
            format!("item state {state:?}").into(),
        )
    })?;
    let count = |k: usize| r.get::<_, i64>(k).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    Ok(Item {
        start: u(r.get(0)?),
        end: u(r.get(1)?),
        state,
        owner: r.get(3)?,
        lease_until_ms: u(r.get(4)?),
        attempts: count(5)?,
        claims: count(6)?,
        takeovers: count(7)?,
    })
}

fn get_job(conn: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    conn.query_row(&sql, [id], |r| job_row(conn, r)).optional()
}

impl Store for SqliteStore {
    fn insert(&self, request: &AuditRequest, queued_max: u64, now_ms: u64) -> Result<Inserted, StoreError> {
        let json = serde_json::to_string(request).map_err(|e| StoreError(format!("encoding the request: {e}")))?;
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(key) = &request.idempotency_key {
                let seen: Option<(String, String)> = tx
                    .query_row("SELECT id, request FROM jobs WHERE idempotency_key = ?1", [key], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((id, stored)) = seen {
                    // Compared as the client sent them: the daemon fills in a fresh spot seed.
                    let same = serde_json::from_str::<AuditRequest>(&stored)
                        .is_ok_and(|s| s.as_submitted() == request.as_submitted());
                    return Ok(if same { Inserted::Existing(id) } else { Inserted::Conflict(id) });
                }
            }
            if open_jobs(&tx)? >= queued_max {
                return Ok(Inserted::QueueFull);
            }
            // The id comes from the row's sequence number: unique, and stable across restarts.
            tx.execute(
                "INSERT INTO jobs (id, idempotency_key, request, state, created_ms, updated_ms)
                 VALUES ('', ?1, ?2, 'queued', ?3, ?3)",
                params![request.idempotency_key, json, i(now_ms)],
            )?;
            let seq = tx.last_insert_rowid();
            let id = job_id(seq);
            tx.execute("UPDATE jobs SET id = ?1 WHERE seq = ?2", params![id, seq])?;
            tx.commit()?;
            Ok(Inserted::New(id))
        })
    }

    fn claim(&self, node: &str, now_ms: u64, lease_ms: u64) -> Result<Option<Job>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for _ in 0..QUARANTINE_PER_CLAIM_MAX {
                let id: Option<String> = tx
                    .query_row(
                        "SELECT id FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_until_ms < ?1)
                         ORDER BY seq LIMIT 1",
                        [i(now_ms)],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(id) = id else {
                    tx.commit()?;
                    return Ok(None);
                };
                tx.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, owner = ?2, lease_until_ms = ?3,
                     updated_ms = ?4 WHERE id = ?1",
                    params![id, node, i(now_ms.saturating_add(lease_ms)), i(now_ms)],
                )?;
                match get_job(&tx, &id) {
                    Ok(job) => {
                        tx.commit()?;
                        return Ok(job);
                    }
                    // A row that no longer parses must not block every audit behind it: set it
                    // aside (failed, reason quarantined, the original kept) and take the next.
                    Err(
                        e @ (rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..)),
                    ) => quarantine(&tx, &id, &e.to_string(), now_ms)?,
                    Err(e) => return Err(e),
                }
            }
            tx.commit()?;
            Ok(None)
        })
    }

    fn renew(&self, id: &str, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE jobs SET lease_until_ms = ?3 WHERE id = ?1 AND state = 'running' AND owner = ?2",
                params![id, node, i(now_ms.saturating_add(lease_ms))],
            )
            .map(|n| n == 1)
        })
    }

    fn bind(&self, id: &str, node: &str, commitment: &str, keep: bool, now_ms: u64) -> Result<bool, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let bound: Option<Option<String>> = tx
                .query_row(
                    "SELECT commitment FROM jobs WHERE id = ?1 AND state = 'running' AND owner = ?2",
                    [id, node],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(bound) = bound else { return Ok(false) };
            if bound.as_deref() != Some(commitment) {
                tx.execute("DELETE FROM items WHERE id = ?1", [id])?;
                if !keep {
                    tx.execute("DELETE FROM progress WHERE id = ?1", [id])?;
                }
                tx.execute(
                    "UPDATE jobs SET commitment = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![id, commitment, i(now_ms)],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn publish(&self, id: &str, intervals: &[(u64, u64)], _now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for &(start, end) in intervals {
                tx.execute(
                    "INSERT INTO items (id, job_start, job_end, state) VALUES (?1, ?2, ?3, 'pending')
                     ON CONFLICT (id, job_start) DO NOTHING",
                    params![id, i(start), i(end)],
                )?;
            }
            tx.commit()
        })
    }

    fn claim_item(
        &self,
        node: &str,
        only: Option<&str>,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<(Job, Item)>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Audits whose job row no longer parses: skipped here (their coordinator holds a
            // parsed copy; a claim of the job itself quarantines the row once its lease lapses).
            let mut skip: Vec<String> = Vec::new();
            let (id, start, takeover, job) = loop {
                let found: Option<(String, i64, bool)> = tx
                    .query_row(
                        "SELECT items.id, items.job_start, items.state = 'claimed' FROM items JOIN jobs ON jobs.id = items.id
                         WHERE jobs.state = 'running' AND (?1 IS NULL OR items.id = ?1)
                         AND items.id NOT IN (SELECT value FROM json_each(?3))
                         AND (items.state = 'pending' OR (items.state = 'claimed' AND items.lease_until_ms < ?2))
                         ORDER BY jobs.seq, items.job_start LIMIT 1",
                        params![only, i(now_ms), serde_json::Value::from(skip.clone()).to_string()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let Some((id, start, takeover)) = found else { return Ok(None) };
                match get_job(&tx, &id) {
                    Ok(Some(job)) => break (id, start, takeover, job),
                    Ok(None) => return Ok(None),
                    Err(e @ (rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..))) => {
                        tracing::warn!(audit = %id, why = %e, "its items are skipped: its job row no longer parses");
                        skip.push(id);
                    }
                    Err(e) => return Err(e),
                }
            };
            tx.execute(
                "UPDATE items SET state = 'claimed', owner = ?3, lease_until_ms = ?4, attempts = attempts + 1,
                 claims = claims + 1, takeovers = takeovers + ?5 WHERE id = ?1 AND job_start = ?2",
                params![id, start, node, i(now_ms.saturating_add(lease_ms)), i64::from(takeover)],
            )?;
            let item = tx.query_row(
                &format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1 AND job_start = ?2"),
                params![id, start],
                item_row,
            )?;
            tx.commit()?;
            Ok(Some((job, item)))
        })
    }

    fn renew_item(&self, id: &str, start: u64, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE items SET lease_until_ms = ?4 WHERE id = ?1 AND job_start = ?2 AND owner = ?3
                 AND state = 'claimed' AND (SELECT state FROM jobs WHERE jobs.id = ?1) = 'running'",
                params![id, i(start), node, i(now_ms.saturating_add(lease_ms))],
            )
            .map(|n| n == 1)
        })
    }

    fn item_done(&self, id: &str, start: u64, node: &str, _now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE items SET state = 'done', lease_until_ms = 0
                 WHERE id = ?1 AND job_start = ?2 AND owner = ?3 AND state = 'claimed'",
                params![id, i(start), node],
            )
            .map(|_| ())
        })
    }

    fn release_item(&self, id: &str, start: u64, node: &str, refund: bool, _now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE items SET state = 'pending', owner = NULL, lease_until_ms = 0, attempts = MAX(attempts - ?4, 0)
                 WHERE id = ?1 AND job_start = ?2 AND owner = ?3 AND state = 'claimed'",
                params![id, i(start), node, i64::from(refund)],
            )
            .map(|_| ())
        })
    }

    fn items(&self, id: &str) -> Result<Vec<Item>, StoreError> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = ?1 ORDER BY job_start"))?;
            stmt.query_map([id], item_row)?.collect()
        })
    }

    fn save_progress(
        &self,
        id: &str,
        job_start: u64,
        through: u64,
        steps_replayed: u64,
        commitment: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(String, Option<String>)> = tx
                .query_row("SELECT state, commitment FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            // Only a running job makes progress, and only against the record it is bound to; a
            // late write after a requeue, a finish or a rebinding is dropped.
            if found.as_ref().is_none_or(|(state, bound)| state != "running" || bound.as_deref() != Some(commitment)) {
                return Ok(());
            }
            let before: Option<i64> = tx
                .query_row(
                    "SELECT through FROM progress WHERE id = ?1 AND job_start = ?2",
                    params![id, i(job_start)],
                    |r| r.get(0),
                )
                .optional()?;
            if before.is_some_and(|b| u(b) >= through) {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO progress (id, job_start, through) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id, job_start) DO UPDATE SET through = MAX(through, excluded.through)",
                params![id, i(job_start), i(through)],
            )?;
            // `attempts` counts claims since the audit last moved forward: an attempt that
            // verified new steps is not a strike against it, however it ends (a kill -9 included),
            // so only an audit that keeps dying at the same point is given up.
            tx.execute(
                "UPDATE jobs SET steps_replayed = MAX(steps_replayed, ?2), attempts = MIN(attempts, 1), updated_ms = ?3
                 WHERE id = ?1",
                params![id, i(steps_replayed), i(now_ms)],
            )?;
            tx.execute(
                "UPDATE items SET attempts = MIN(attempts, 1) WHERE id = ?1 AND job_start = ?2",
                params![id, i(job_start)],
            )?;
            tx.commit()
        })
    }

    fn finish(&self, id: &str, d: &Decided, now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<String> =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            match state.as_deref() {
                Some("running") => {}
                // Already decided (a retried write whose first try committed): nothing to do.
                Some("done") => return Ok(()),
                other => {
                    return Err(rusqlite::Error::ToSqlConversionFailure(
                        format!("finish of job {id} in state {other:?}").into(),
                    ));
                }
            }
            tx.execute(
                "INSERT INTO reports (id, report, evidence) VALUES (?1, ?2, ?3)",
                params![id, d.report_json, d.evidence],
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'done', verdict = ?2, first_step = ?3, steps_replayed = ?4,
                 steps_resumed = ?5, error = NULL, updated_ms = ?6 WHERE id = ?1",
                params![
                    id,
                    d.verdict.as_str(),
                    d.first_step.map(i),
                    i(d.steps_replayed),
                    i(d.steps_resumed),
                    i(now_ms)
                ],
            )?;
            tx.commit()
        })
    }

    fn fail(&self, id: &str, reason: FailReason, error: &str, now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?2, reason = ?4, updated_ms = ?3
                 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![id, error, i(now_ms), reason.as_str()],
            )
            .map(|_| ())
        })
    }

    fn requeue(&self, id: &str, node: &str, refund: bool, now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until_ms = 0, updated_ms = ?3,
                 attempts = MAX(attempts - ?4, 0) WHERE id = ?1 AND state = 'running' AND owner = ?2",
                params![id, node, i(now_ms), i64::from(refund)],
            )
            .map(|_| ())
        })
    }

    fn recover(&self, node: &str, now_ms: u64) -> Result<u64, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until_ms = 0, updated_ms = ?2
                 WHERE state = 'running' AND owner IS ?1",
                params![node, i(now_ms)],
            )?;
            tx.execute(
                "UPDATE items SET state = 'pending', owner = NULL, lease_until_ms = 0 WHERE state = 'claimed' AND owner = ?1",
                [node],
            )?;
            tx.commit()?;
            Ok(n as u64)
        })
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.with(|conn| get_job(conn, id))
    }

    fn list(&self, state: Option<JobState>, limit: u64, before: Option<&str>) -> Result<Vec<Job>, StoreError> {
        self.with(|conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1)
                 AND (?3 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?3)) ORDER BY seq DESC LIMIT ?2"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params![state.map(JobState::name), i(limit), before], |r| job_row(conn, r))?;
            // A row that no longer parses (a damaged store) must not hide every other audit:
            // it is left out of the list, with a warning naming it; reading it alone still
            // says what is wrong with it.
            let mut jobs = Vec::new();
            for row in rows {
                match row {
                    Ok(job) => jobs.push(job),
                    Err(rusqlite::Error::FromSqlConversionFailure(_, _, why)) => {
                        tracing::warn!(error = %why, "listing audits: a stored row no longer parses; left out");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(jobs)
        })
    }

    fn cancel(&self, id: &str, now_ms: u64) -> Result<Option<JobState>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE jobs SET state = 'failed', reason = 'cancelled', error = 'cancelled by a client', updated_ms = ?2
                 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![id, i(now_ms)],
            )?;
            let state: Option<String> =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            tx.commit()?;
            Ok(state.as_deref().and_then(JobState::parse))
        })
    }

    fn retry(&self, id: &str, queued_max: u64, now_ms: u64) -> Result<Option<(bool, JobState)>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<String> =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            let Some(state) = state.as_deref().and_then(JobState::parse) else {
                return Ok(None);
            };
            // A quarantined row stays where it is: its request is a placeholder.
            let quarantined: bool =
                tx.query_row("SELECT reason = 'quarantined' FROM jobs WHERE id = ?1", [id], |r| r.get::<_, Option<bool>>(0))?
                    .unwrap_or(false);
            if state != JobState::Failed || quarantined {
                return Ok(Some((false, state)));
            }
            if open_jobs(&tx)? >= queued_max {
                return Ok(Some((false, JobState::Failed)));
            }
            tx.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, reason = NULL, error = NULL, updated_ms = ?2 WHERE id = ?1",
                params![id, i(now_ms)],
            )?;
            tx.commit()?;
            Ok(Some((true, JobState::Queued)))
        })
    }

    fn still_running(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT state = 'running' FROM jobs WHERE id = ?1", [id], |r| r.get::<_, bool>(0))
                .optional()
                .map(|r| r.unwrap_or(false))
        })
    }

    fn report(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.with(|conn| conn.query_row("SELECT report FROM reports WHERE id = ?1", [id], |r| r.get(0)).optional())
    }

    fn evidence(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT evidence FROM reports WHERE id = ?1", [id], |r| r.get::<_, Option<Vec<u8>>>(0))
                .optional()
                .map(Option::flatten)
        })
    }

    fn has_evidence(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT evidence IS NOT NULL FROM reports WHERE id = ?1", [id], |r| r.get::<_, bool>(0))
                .optional()
                .map(|e| e.unwrap_or(false))
        })
    }

    fn report_count(&self, id: &str) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT COUNT(*) FROM reports WHERE id = ?1", [id], |r| r.get::<_, i64>(0)).map(u)
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        self.still_at_its_path()?;
        let mut last = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, r)) = last.as_ref()
            && at.elapsed() < CHECK_EVERY
        {
            return r.clone();
        }
        let r = self
            .with(|conn| {
                let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
                let rows: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                Ok(rows)
            })
            .and_then(|rows| {
                if rows == ["ok"] {
                    Ok(())
                } else {
                    Err(StoreError(format!("{}: integrity check failed: {}", self.path.display(), rows.join("; "))))
                }
            });
        *last = Some((std::time::Instant::now(), r.clone()));
        r
    }

    fn count(&self, state: JobState) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT COUNT(*) FROM jobs WHERE state = ?1", [state.name()], |r| r.get::<_, i64>(0)).map(u)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database holds trainers' tokens: owner-only, even in a state directory that
    /// already existed world-readable, and an existing loose file is tightened.
    #[cfg(unix)]
    #[test]
    fn the_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tiebreak-sqlite-perms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mode = |name: &str| std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        let store = SqliteStore::open(&dir).unwrap();
        store.insert(&request(None), 10, 1).unwrap();
        assert_eq!((mode(DB_FILE), mode(&format!("{DB_FILE}-wal"))), (0o600, 0o600));
        drop(store);
        std::fs::set_permissions(dir.join(DB_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(SqliteStore::open(&dir).unwrap());
        assert_eq!(mode(DB_FILE), 0o600, "an existing loose file is tightened");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A state directory deleted (or its database replaced) under a running daemon: SQLite
    /// would write on to the unlinked file and lose it all at the next start; every operation
    /// and the health check say so instead.
    #[test]
    fn a_database_removed_or_replaced_under_the_store_is_not_written_to() {
        for replace in [false, true] {
            let dir = scratch(&format!("removed-{replace}"));
            let s = SqliteStore::open(&dir).unwrap();
            s.insert(&request(None), 10, 1).unwrap();
            s.check().unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            if replace {
                drop(SqliteStore::open(&dir).unwrap());
            }
            let says = if replace { "was replaced" } else { "was removed" };
            let e = s.insert(&request(None), 10, 2).unwrap_err();
            assert!(e.0.contains(says), "{e}");
            assert!(s.check().unwrap_err().0.contains(says));
            assert!(s.get("audit-1").is_err());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    fn request(key: Option<&str>) -> AuditRequest {
        AuditRequest {
            trainer_url: "http://127.0.0.1:1".into(),
            run: "r".into(),
            idempotency_key: key.map(String::from),
            ..AuditRequest::default()
        }
    }

    fn decided() -> Decided {
        Decided {
            verdict: VerdictKind::Diverged,
            first_step: Some(3),
            steps_replayed: 3,
            steps_resumed: 1,
            bisection_queries: 2,
            report_json: "{}".into(),
            evidence: Some(vec![1, 2, 3]),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tiebreak-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_job_goes_through_its_states_and_survives_reopening() {
        let dir = scratch("states");
        let s = SqliteStore::open(&dir).unwrap();
        let Inserted::New(id) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        assert_eq!(s.get(&id).unwrap().unwrap().state, JobState::Queued);
        let job = s.claim("n", 2, 1000).unwrap().unwrap();
        assert_eq!((job.id.as_str(), job.state, job.attempts), (id.as_str(), JobState::Running, 1));
        assert!(s.claim("n", 2, 1000).unwrap().is_none(), "one queued job, claimed once");
        assert!(s.bind(&id, "n", "r", false, 3).unwrap());
        s.save_progress(&id, 0, 5, 5, "r", 3).unwrap();
        s.save_progress(&id, 0, 4, 4, "r", 3).unwrap();
        drop(s);
        // A restart: the running job is requeued with its progress.
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(s.recover("n", 4).unwrap(), 1);
        let job = s.claim("n", 5, 1000).unwrap().unwrap();
        assert_eq!(job.attempts, 2);
        // A graceful shutdown gives its claim back; a failed final write does not.
        s.requeue(&id, "n", true, 5).unwrap();
        assert_eq!(s.claim("n", 5, 1000).unwrap().unwrap().attempts, 2);
        s.requeue(&id, "n", false, 5).unwrap();
        assert_eq!(s.claim("n", 5, 1000).unwrap().unwrap().attempts, 3);
        assert_eq!(job.progress, [(0, 5)].into(), "progress only moves forward");
        assert_eq!(job.steps_replayed, 5);
        s.finish(&id, &decided(), 6).unwrap();
        s.finish(&id, &decided(), 7).unwrap();
        assert_eq!(s.report_count(&id).unwrap(), 1, "a second finish stores nothing");
        let job = s.get(&id).unwrap().unwrap();
        assert_eq!((job.state, job.verdict, job.first_step), (JobState::Done, Some(VerdictKind::Diverged), Some(3)));
        assert_eq!(s.evidence(&id).unwrap(), Some(vec![1, 2, 3]));
        assert!(s.has_evidence(&id).unwrap() && !s.has_evidence("audit-999").unwrap());
        s.save_progress(&id, 0, 9, 9, "r", 8).unwrap();
        assert_eq!(s.get(&id).unwrap().unwrap().progress, [(0, 5)].into(), "no progress after done");
        assert!(s.fail(&id, FailReason::Undecided, "late", 9).is_ok());
        assert_eq!(s.get(&id).unwrap().unwrap().state, JobState::Done, "a done job cannot fail");
    }

    #[test]
    fn idempotency_keys_and_the_queue_bound() {
        let s = SqliteStore::open(&scratch("keys")).unwrap();
        let Inserted::New(a) = s.insert(&request(Some("k")), 2, 1).unwrap() else { panic!() };
        assert_eq!(s.insert(&request(Some("k")), 2, 1).unwrap(), Inserted::Existing(a.clone()));
        let mut other = request(Some("k"));
        other.run = "other".into();
        assert_eq!(s.insert(&other, 2, 1).unwrap(), Inserted::Conflict(a));
        assert!(matches!(s.insert(&request(None), 2, 1).unwrap(), Inserted::New(_)));
        assert_eq!(s.insert(&request(None), 2, 1).unwrap(), Inserted::QueueFull);
        assert_eq!(s.count(JobState::Queued).unwrap(), 2);
        let all = s.list(None, 10, None).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].created_ms >= all[1].created_ms && all[0].id > all[1].id, "newest first");
        assert_eq!(s.list(None, 10, Some(&all[0].id)).unwrap()[0].id, all[1].id, "the cursor pages on");
        assert_eq!(s.list(Some(JobState::Done), 10, None).unwrap().len(), 0);
    }

    #[test]
    fn a_database_that_is_not_one_is_refused_and_left_alone() {
        let dir = scratch("garbage");
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = b"this is not a database, but somebody's file".repeat(200);
        std::fs::write(dir.join(DB_FILE), &bytes).unwrap();
        let e = SqliteStore::open(&dir).unwrap_err();
        assert!(e.0.contains(DB_FILE), "{e}");
        assert_eq!(std::fs::read(dir.join(DB_FILE)).unwrap(), bytes);
    }

    /// Issue 14: a finished row that no longer parses must not break the listing of the
    /// others.
    #[test]
    fn a_finished_row_that_no_longer_parses_is_left_out_of_listings() {
        let s = SqliteStore::open(&scratch("damaged-list")).unwrap();
        let Inserted::New(a) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        let Inserted::New(b) = s.insert(&request(None), 10, 2).unwrap() else { panic!() };
        s.with(|c| c.execute("UPDATE jobs SET state = 'done', request = '{not json' WHERE id = ?1", [&a])).unwrap();
        let listed: Vec<String> = s.list(None, 10, None).unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(listed, vec![b.clone()]);
        assert!(s.get(&a).is_err(), "reading the damaged row alone says it is damaged");
        assert_eq!(s.get(&b).unwrap().unwrap().id, b);
    }

    /// Issue 14: one queued row that no longer parsed blocked every claim, and later audits
    /// stayed queued forever.
    #[test]
    fn a_queued_row_that_no_longer_parses_is_quarantined_and_the_next_one_runs() {
        let s = SqliteStore::open(&scratch("quarantine")).unwrap();
        let Inserted::New(bad) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        let Inserted::New(good) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        s.with(|c| c.execute("UPDATE jobs SET request = '{torn' WHERE id = ?1", [&bad])).unwrap();
        let job = s.claim("n", 2, 1000).unwrap().expect("the good job is claimed past the bad one");
        assert_eq!(job.id, good);
        let q = s.get(&bad).unwrap().unwrap();
        assert_eq!((q.state, q.reason), (JobState::Failed, Some(FailReason::Quarantined)), "{q:?}");
        assert!(q.error.as_deref().unwrap().contains("quarantine"), "{q:?}");
        let kept: String =
            s.with(|c| c.query_row("SELECT request FROM quarantine WHERE id = ?1", [&bad], |r| r.get(0))).unwrap();
        assert_eq!(kept, "{torn", "the original row is kept");
        assert_eq!(s.list(None, 10, None).unwrap().len(), 2, "listing still works");
        assert!(s.claim("n", 3, 1000).unwrap().is_none());
    }

    /// Issue 14: `--state-dir` made a shared 1777 directory 0700.
    #[cfg(unix)]
    #[test]
    fn an_existing_state_directory_keeps_its_mode_and_a_new_one_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(SqliteStore::open(&dir).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o1777);
        let fresh = dir.join("a/b");
        drop(SqliteStore::open(&fresh).unwrap());
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn garbage_pages_fail_the_integrity_check() {
        let dir = scratch("pages");
        let s = SqliteStore::open(&dir).unwrap();
        for _ in 0..200 {
            s.insert(&request(None), 1000, 1).unwrap();
        }
        assert_eq!(s.check(), Ok(()));
        s.with(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")).unwrap();
        drop(s);
        let path = dir.join(DB_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4 * 4096, "several pages");
        for b in &mut bytes[2 * 4096..4 * 4096] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = SqliteStore::open(&dir).and_then(|s| s.check()).unwrap_err();
        assert!(e.0.contains(DB_FILE), "{e}");
    }

    /// A version 1 database (no failure reasons, no leases) is migrated step by step to the
    /// current version, losing nothing; a running job of the old daemon (no lease) is claimable.
    #[test]
    fn a_version_1_database_is_migrated_to_the_current_version() {
        let dir = scratch("v1");
        let s = SqliteStore::open(&dir).unwrap();
        let Inserted::New(id) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        let Inserted::New(running) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        s.fail(&id, FailReason::Undecided, "x", 2).unwrap();
        s.with(|c| {
            c.execute("UPDATE jobs SET state = 'running' WHERE id = ?1", [&running])?;
            c.execute_batch(
                "DROP TABLE items; ALTER TABLE jobs DROP COLUMN reason; ALTER TABLE jobs DROP COLUMN owner;
                 ALTER TABLE jobs DROP COLUMN lease_until_ms; ALTER TABLE jobs DROP COLUMN commitment; UPDATE meta SET value = 1 WHERE key = 'schema_version';",
            )
        })
        .unwrap();
        drop(s);
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(s.get(&id).unwrap().unwrap().reason, Some(FailReason::Undecided));
        let version: i64 =
            s.with(|c| c.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let job = s.claim("n", 3, 1000).unwrap().expect("the old daemon's running job has no lease: claimable");
        assert_eq!((job.id, job.owner.as_deref()), (running, Some("n")));
        s.publish(&job_id(2), &[(0, 4)], 3).unwrap();
        assert_eq!(s.items(&job_id(2)).unwrap().len(), 1, "the items table exists");
        drop(s);
        // A newer version than this auditor knows is refused, not touched.
        let s = SqliteStore::open(&dir).unwrap();
        s.with(|c| c.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'", [])).unwrap();
        drop(s);
        let e = SqliteStore::open(&dir).unwrap_err();
        assert!(e.0.contains("schema version 99"), "{e}");
    }
}
