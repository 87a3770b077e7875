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

use super::job::{AuditRequest, Decided, FailReason, Inserted, Job, JobState, Store, StoreError, job_id};
use crate::VerdictKind;

/// The database file under the state directory.
pub const DB_FILE: &str = "auditor.sqlite3";
/// Bumped when the schema changes; a database with another version is refused, not migrated
/// silently.
pub const SCHEMA_VERSION: i64 = 2;

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
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS progress (
    id TEXT NOT NULL REFERENCES jobs (id),
    job_start INTEGER NOT NULL,
    through INTEGER NOT NULL,
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
    conn: Mutex<Connection>,
    /// The last integrity check and when it ran ([`Store::check`] runs it at most every
    /// [`CHECK_EVERY`]: it reads the whole file).
    checked: Mutex<Option<(std::time::Instant, Result<(), StoreError>)>>,
}

/// How long an integrity check's answer is reused.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Queued rows set aside in one claim at most (each is logged); the claim then answers
/// "nothing to do" and the next one goes on.
const QUARANTINE_PER_CLAIM_MAX: usize = 64;

/// The request that replaces one that no longer parses (the original is kept in table
/// `quarantine`).
const QUARANTINED_REQUEST: &str = r#"{"trainer_url": "", "run": ""}"#;

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

fn i(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

fn u(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<SqliteStore, StoreError> {
        create_private_dir(state_dir)
            .map_err(|e| StoreError(format!("creating state directory {}: {e}", state_dir.display())))?;
        let path = state_dir.join(DB_FILE);
        let ctx = |e: rusqlite::Error| StoreError(format!("{}: {e}", path.display()));
        let conn = Connection::open(&path).map_err(ctx)?;
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
        match version {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?1)", [SCHEMA_VERSION])
                    .map_err(ctx)?;
            }
            Some(SCHEMA_VERSION) => {}
            // Version 1 had no `reason` column (why a job failed); adding it loses nothing.
            Some(1) => {
                conn.execute_batch(
                    "BEGIN IMMEDIATE; ALTER TABLE jobs ADD COLUMN reason TEXT;
                     UPDATE jobs SET reason = 'undecided' WHERE state = 'failed';
                     UPDATE meta SET value = 2 WHERE key = 'schema_version'; COMMIT;",
                )
                .map_err(ctx)?;
            }
            Some(v) => {
                return Err(StoreError(format!(
                    "{}: schema version {v}, this auditor knows {SCHEMA_VERSION}; refusing to touch it",
                    path.display()
                )));
            }
        }
        Ok(SqliteStore { path, conn: Mutex::new(conn), checked: Mutex::new(None) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| StoreError(format!("{}: {e}", self.path.display())))
    }
}

const JOB_COLUMNS: &str = "id, request, state, attempts, steps_replayed, steps_resumed, verdict, first_step, error, \
                           created_ms, updated_ms, reason";

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
            let queued: i64 = tx.query_row("SELECT COUNT(*) FROM jobs WHERE state = 'queued'", [], |r| r.get(0))?;
            if u(queued) >= queued_max {
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

    fn claim(&self, now_ms: u64) -> Result<Option<Job>, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for _ in 0..QUARANTINE_PER_CLAIM_MAX {
                let id: Option<String> = tx
                    .query_row("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1", [], |r| r.get(0))
                    .optional()?;
                let Some(id) = id else {
                    tx.commit()?;
                    return Ok(None);
                };
                tx.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_ms = ?2 WHERE id = ?1",
                    params![id, i(now_ms)],
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

    fn save_progress(
        &self,
        id: &str,
        job_start: u64,
        through: u64,
        steps_replayed: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<String> =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            // Only a running job makes progress; a late write after a requeue or a finish is dropped.
            if state.as_deref() != Some("running") {
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

    fn requeue(&self, id: &str, refund: bool, now_ms: u64) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE jobs SET state = 'queued', updated_ms = ?2, attempts = MAX(attempts - ?3, 0)
                 WHERE id = ?1 AND state = 'running'",
                params![id, i(now_ms), i64::from(refund)],
            )
            .map(|_| ())
        })
    }

    fn recover(&self, now_ms: u64) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.execute("UPDATE jobs SET state = 'queued', updated_ms = ?1 WHERE state = 'running'", [i(now_ms)])
                .map(|n| n as u64)
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
            let queued: i64 = tx.query_row("SELECT COUNT(*) FROM jobs WHERE state = 'queued'", [], |r| r.get(0))?;
            if u(queued) >= queued_max {
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
        let job = s.claim(2).unwrap().unwrap();
        assert_eq!((job.id.as_str(), job.state, job.attempts), (id.as_str(), JobState::Running, 1));
        assert!(s.claim(2).unwrap().is_none(), "one queued job, claimed once");
        s.save_progress(&id, 0, 5, 5, 3).unwrap();
        s.save_progress(&id, 0, 4, 4, 3).unwrap();
        drop(s);
        // A restart: the running job is requeued with its progress.
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(s.recover(4).unwrap(), 1);
        let job = s.claim(5).unwrap().unwrap();
        assert_eq!(job.attempts, 2);
        // A graceful shutdown gives its claim back; a failed final write does not.
        s.requeue(&id, true, 5).unwrap();
        assert_eq!(s.claim(5).unwrap().unwrap().attempts, 2);
        s.requeue(&id, false, 5).unwrap();
        assert_eq!(s.claim(5).unwrap().unwrap().attempts, 3);
        assert_eq!(job.progress, [(0, 5)].into(), "progress only moves forward");
        assert_eq!(job.steps_replayed, 5);
        s.finish(&id, &decided(), 6).unwrap();
        s.finish(&id, &decided(), 7).unwrap();
        assert_eq!(s.report_count(&id).unwrap(), 1, "a second finish stores nothing");
        let job = s.get(&id).unwrap().unwrap();
        assert_eq!((job.state, job.verdict, job.first_step), (JobState::Done, Some(VerdictKind::Diverged), Some(3)));
        assert_eq!(s.evidence(&id).unwrap(), Some(vec![1, 2, 3]));
        assert!(s.has_evidence(&id).unwrap() && !s.has_evidence("audit-999").unwrap());
        s.save_progress(&id, 0, 9, 9, 8).unwrap();
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
        let job = s.claim(2).unwrap().expect("the good job is claimed past the bad one");
        assert_eq!(job.id, good);
        let q = s.get(&bad).unwrap().unwrap();
        assert_eq!((q.state, q.reason), (JobState::Failed, Some(FailReason::Quarantined)), "{q:?}");
        assert!(q.error.as_deref().unwrap().contains("quarantine"), "{q:?}");
        let kept: String =
            s.with(|c| c.query_row("SELECT request FROM quarantine WHERE id = ?1", [&bad], |r| r.get(0))).unwrap();
        assert_eq!(kept, "{torn", "the original row is kept");
        assert_eq!(s.list(None, 10, None).unwrap().len(), 2, "listing still works");
        assert!(s.claim(3).unwrap().is_none());
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

    #[test]
    fn a_version_1_database_gains_the_reason_column() {
        let dir = scratch("v1");
        let s = SqliteStore::open(&dir).unwrap();
        let Inserted::New(id) = s.insert(&request(None), 10, 1).unwrap() else { panic!() };
        s.fail(&id, FailReason::Undecided, "x", 2).unwrap();
        s.with(|c| {
            c.execute_batch(
                "ALTER TABLE jobs DROP COLUMN reason; UPDATE meta SET value = 1 WHERE key = 'schema_version';",
            )
        })
        .unwrap();
        drop(s);
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(s.get(&id).unwrap().unwrap().reason, Some(FailReason::Undecided));
    }
}
