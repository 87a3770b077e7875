//! The fleet's shared store: one PostgreSQL database that several daemons use as their job queue.
//!
//! Claims are leases: a daemon takes the oldest claimable row (a job, or a work item of a running
//! job) with `SELECT … FOR NO KEY UPDATE SKIP LOCKED`, so concurrent claimers never wait on, nor
//! hand out, the same row; it stamps the row with its node name and `lease_until_ms` and renews
//! the lease while it works; a row whose lease ran out (its daemon died or lost the database) is
//! claimable again. Inserts and retries, which must not overshoot the queue bound, are serialized
//! by a transaction advisory lock. The semantics are [`super::SqliteStore`]'s, checked by the same
//! contract tests (`tests/store_contract.rs`).
//!
//! - [`conn`]: the one connection per store (behind a mutex): dropped when lost, re-opened by the
//!   next call with exponential backoff between attempts; every operation is one transaction.
//! - [`schema`]: numbered migrations, applied at connection time under an advisory lock.
//! - [`rows`]: reading jobs and items, and the queries several operations share.
//!
//! The API is blocking (the sync `postgres` client runs its own small runtime): call it from
//! blocking threads, never from async code. Messages name the store by user, host, port and
//! database: never by its password. Requests are stored as submitted, trainer tokens included
//! (a daemon resuming an audit needs them): grant access to the database accordingly.

use super::{QUARANTINE_PER_CLAIM_MAX, i, u};
use crate::daemon::job::{AuditRequest, Decided, FailReason, Inserted, Item, Job, JobState, Store, StoreError};

mod conn;
mod rows;
mod schema;

use conn::Fail;
pub use conn::PgStore;
use rows::{ITEM_COLUMNS, JOB_COLUMNS, get_job, item_row, job_state, jobs, open_count, quarantine};

/// The transaction advisory lock that serializes inserts and retries (the queue bound and
/// idempotency keys are checked under it); one more than the migration lock.
const QUEUE_LOCK: i64 = 0x7469_6562_7265_616c;

impl Store for PgStore {
    fn insert(&self, request: &AuditRequest, queued_max: u64, now_ms: u64) -> Result<Inserted, StoreError> {
        let json = serde_json::to_string(request).map_err(|e| StoreError(format!("encoding the request: {e}")))?;
        self.with(|tx| {
            // Daemons inserting at once: one at a time, so that none overshoots the bound or
            // stores an idempotency key twice (the UNIQUE constraint is the backstop).
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&QUEUE_LOCK])?;
            if let Some(key) = &request.idempotency_key
                && let Some(seen) = tx.query_opt("SELECT id, request FROM jobs WHERE idempotency_key = $1", &[key])?
            {
                let (id, stored): (String, String) = (seen.try_get(0)?, seen.try_get(1)?);
                // Compared as the client sent them: the daemon fills in a fresh spot seed.
                let same = serde_json::from_str::<AuditRequest>(&stored)
                    .is_ok_and(|s| s.as_submitted() == request.as_submitted());
                return Ok(if same { Inserted::Existing(id) } else { Inserted::Conflict(id) });
            }
            if open_count(tx)? >= queued_max {
                return Ok(Inserted::QueueFull);
            }
            // The id comes from the row's sequence number: unique, and stable across restarts.
            let row = tx.query_one(
                "WITH s AS (SELECT nextval(pg_get_serial_sequence('jobs', 'seq')) AS seq)
                 INSERT INTO jobs (seq, id, idempotency_key, request, state, created_ms, updated_ms)
                 SELECT seq, 'audit-' || seq, $1, $2, 'queued', $3, $3 FROM s RETURNING id",
                &[&request.idempotency_key, &json, &i(now_ms)],
            )?;
            Ok(Inserted::New(row.try_get(0)?))
        })
    }

    fn claim(&self, node: &str, now_ms: u64, lease_ms: u64) -> Result<Option<Job>, StoreError> {
        self.with(|tx| {
            for _ in 0..QUARANTINE_PER_CLAIM_MAX {
                let Some(row) = tx.query_opt(
                    "SELECT id FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_until_ms < $1)
                     ORDER BY seq LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
                    &[&i(now_ms)],
                )?
                else {
                    return Ok(None);
                };
                let id: String = row.try_get(0)?;
                tx.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, owner = $2, lease_until_ms = $3,
                     updated_ms = $4 WHERE id = $1",
                    &[&id, &node, &i(now_ms.saturating_add(lease_ms)), &i(now_ms)],
                )?;
                match get_job(tx, &id) {
                    Ok(job) => return Ok(job),
                    // A row that no longer parses must not block every audit behind it: set it
                    // aside (failed, reason quarantined, the original kept) and take the next.
                    Err(Fail::Bad(why)) => quarantine(tx, &id, &why, now_ms)?,
                    Err(e) => return Err(e),
                }
            }
            Ok(None)
        })
    }

    fn renew(&self, id: &str, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError> {
        self.with(|tx| {
            let n = tx.execute(
                "UPDATE jobs SET lease_until_ms = $3 WHERE id = $1 AND state = 'running' AND owner = $2",
                &[&id, &node, &i(now_ms.saturating_add(lease_ms))],
            )?;
            Ok(n == 1)
        })
    }

    fn bind(&self, id: &str, node: &str, commitment: &str, keep: bool, now_ms: u64) -> Result<bool, StoreError> {
        self.with(|tx| {
            let Some(row) = tx.query_opt(
                "SELECT commitment FROM jobs WHERE id = $1 AND state = 'running' AND owner = $2 FOR NO KEY UPDATE",
                &[&id, &node],
            )?
            else {
                return Ok(false);
            };
            if row.try_get::<_, Option<String>>(0)?.as_deref() != Some(commitment) {
                tx.execute("DELETE FROM items WHERE id = $1", &[&id])?;
                if !keep {
                    tx.execute("DELETE FROM progress WHERE id = $1", &[&id])?;
                }
                tx.execute(
                    "UPDATE jobs SET commitment = $2, updated_ms = $3 WHERE id = $1",
                    &[&id, &commitment, &i(now_ms)],
                )?;
            }
            Ok(true)
        })
    }

    fn publish(&self, id: &str, intervals: &[(u64, u64)], _now_ms: u64) -> Result<(), StoreError> {
        let starts: Vec<i64> = intervals.iter().map(|&(s, _)| i(s)).collect();
        let ends: Vec<i64> = intervals.iter().map(|&(_, e)| i(e)).collect();
        self.with(|tx| {
            tx.execute(
                "INSERT INTO items (id, job_start, job_end, state)
                 SELECT $1, s, e, 'pending' FROM unnest($2::BIGINT[], $3::BIGINT[]) AS t (s, e)
                 ON CONFLICT (id, job_start) DO NOTHING",
                &[&id, &starts, &ends],
            )?;
            Ok(())
        })
    }

    fn claim_item(
        &self,
        node: &str,
        only: Option<&str>,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<(Job, Item)>, StoreError> {
        self.with(|tx| {
            // Audits whose job row no longer parses: skipped here (their coordinator holds a
            // parsed copy; a claim of the job itself quarantines the row once its lease lapses).
            let mut skip: Vec<String> = Vec::new();
            let (id, start, job) = loop {
                let Some(row) = tx.query_opt(
                    "SELECT i.id, i.job_start FROM items i JOIN jobs j ON j.id = i.id
                     WHERE j.state = 'running' AND ($1::TEXT IS NULL OR i.id = $1) AND NOT (i.id = ANY($3))
                     AND (i.state = 'pending' OR (i.state = 'claimed' AND i.lease_until_ms < $2))
                     ORDER BY j.seq, i.job_start LIMIT 1 FOR NO KEY UPDATE OF i SKIP LOCKED",
                    &[&only, &i(now_ms), &skip],
                )?
                else {
                    return Ok(None);
                };
                let (id, start): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
                match get_job(tx, &id) {
                    Ok(Some(job)) => break (id, start, job),
                    Ok(None) => return Err(Fail::Bad(format!("item of job {id}: no such job"))),
                    Err(Fail::Bad(why)) => {
                        tracing::warn!(audit = %id, why, "its items are skipped: its job row no longer parses");
                        skip.push(id);
                    }
                    Err(e) => return Err(e),
                }
            };
            let row = tx.query_one(
                &format!(
                    "UPDATE items SET takeovers = takeovers + (CASE WHEN state = 'claimed' THEN 1 ELSE 0 END),
                     state = 'claimed', owner = $3, lease_until_ms = $4, attempts = attempts + 1, claims = claims + 1
                     WHERE id = $1 AND job_start = $2 RETURNING {ITEM_COLUMNS}"
                ),
                &[&id, &start, &node, &i(now_ms.saturating_add(lease_ms))],
            )?;
            let item = item_row(&id, &row)?;
            Ok(Some((job, item)))
        })
    }

    fn renew_item(&self, id: &str, start: u64, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError> {
        self.with(|tx| {
            let n = tx.execute(
                "UPDATE items SET lease_until_ms = $4 WHERE id = $1 AND job_start = $2 AND state = 'claimed'
                 AND owner = $3 AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state = 'running')",
                &[&id, &i(start), &node, &i(now_ms.saturating_add(lease_ms))],
            )?;
            Ok(n == 1)
        })
    }

    fn item_done(&self, id: &str, start: u64, node: &str, _now_ms: u64) -> Result<(), StoreError> {
        self.with(|tx| {
            tx.execute(
                "UPDATE items SET state = 'done', lease_until_ms = 0
                 WHERE id = $1 AND job_start = $2 AND state = 'claimed' AND owner = $3",
                &[&id, &i(start), &node],
            )?;
            Ok(())
        })
    }

    fn release_item(&self, id: &str, start: u64, node: &str, refund: bool, _now_ms: u64) -> Result<(), StoreError> {
        self.with(|tx| {
            tx.execute(
                "UPDATE items SET state = 'pending', owner = NULL, lease_until_ms = 0,
                 attempts = GREATEST(attempts - $4, 0)
                 WHERE id = $1 AND job_start = $2 AND state = 'claimed' AND owner = $3",
                &[&id, &i(start), &node, &i64::from(refund)],
            )?;
            Ok(())
        })
    }

    fn items(&self, id: &str) -> Result<Vec<Item>, StoreError> {
        self.with(|tx| {
            let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = $1 ORDER BY job_start");
            tx.query(&sql, &[&id])?.iter().map(|r| item_row(id, r)).collect()
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
        self.with(|tx| {
            // Only a running job makes progress, and only against the record it is bound to; a
            // late write after a requeue, a finish or a rebinding is dropped. The row lock
            // orders this against a concurrent finish, cancel or bind.
            let Some(row) = tx.query_opt(
                "SELECT state = 'running' AND commitment IS NOT DISTINCT FROM $2 FROM jobs WHERE id = $1 FOR NO KEY UPDATE",
                &[&id, &commitment],
            )?
            else {
                return Ok(());
            };
            if !row.try_get::<_, bool>(0)? {
                return Ok(());
            }
            let before =
                tx.query_opt("SELECT through FROM progress WHERE id = $1 AND job_start = $2", &[&id, &i(job_start)])?;
            if let Some(b) = before
                && u(b.try_get(0)?) >= through
            {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO progress (id, job_start, through) VALUES ($1, $2, $3)
                 ON CONFLICT (id, job_start) DO UPDATE SET through = GREATEST(progress.through, excluded.through)",
                &[&id, &i(job_start), &i(through)],
            )?;
            // `attempts` counts claims since the audit (or the item) last moved forward: an
            // attempt that verified new steps is not a strike against it, however it ends.
            tx.execute(
                "UPDATE jobs SET steps_replayed = GREATEST(steps_replayed, $2), attempts = LEAST(attempts, 1),
                 updated_ms = $3 WHERE id = $1",
                &[&id, &i(steps_replayed), &i(now_ms)],
            )?;
            tx.execute(
                "UPDATE items SET attempts = LEAST(attempts, 1) WHERE id = $1 AND job_start = $2",
                &[&id, &i(job_start)],
            )?;
            Ok(())
        })
    }

    fn finish(&self, id: &str, d: &Decided, now_ms: u64) -> Result<(), StoreError> {
        self.with(|tx| {
            match job_state(tx, id, true)? {
                Some(JobState::Running) => {}
                // Already decided (a retried write whose first try committed): nothing to do.
                Some(JobState::Done) => return Ok(()),
                other => return Err(Fail::Bad(format!("finish of job {id} in state {other:?}"))),
            }
            tx.execute(
                "INSERT INTO reports (id, report, evidence) VALUES ($1, $2, $3)",
                &[&id, &d.report_json, &d.evidence],
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'done', verdict = $2, first_step = $3, steps_replayed = $4,
                 steps_resumed = $5, error = NULL, updated_ms = $6 WHERE id = $1",
                &[
                    &id,
                    &d.verdict.as_str(),
                    &d.first_step.map(i),
                    &i(d.steps_replayed),
                    &i(d.steps_resumed),
                    &i(now_ms),
                ],
            )?;
            Ok(())
        })
    }

    fn fail(&self, id: &str, reason: FailReason, error: &str, now_ms: u64) -> Result<(), StoreError> {
        self.with(|tx| {
            tx.execute(
                "UPDATE jobs SET state = 'failed', error = $2, reason = $4, updated_ms = $3
                 WHERE id = $1 AND state IN ('queued', 'running')",
                &[&id, &error, &i(now_ms), &reason.as_str()],
            )?;
            Ok(())
        })
    }

    fn requeue(&self, id: &str, node: &str, refund: bool, now_ms: u64) -> Result<(), StoreError> {
        self.with(|tx| {
            tx.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until_ms = 0, updated_ms = $3,
                 attempts = GREATEST(attempts - $4, 0) WHERE id = $1 AND state = 'running' AND owner = $2",
                &[&id, &node, &i(now_ms), &i64::from(refund)],
            )?;
            Ok(())
        })
    }

    fn recover(&self, node: &str, now_ms: u64) -> Result<u64, StoreError> {
        self.with(|tx| {
            let n = tx.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until_ms = 0, updated_ms = $2
                 WHERE state = 'running' AND owner = $1",
                &[&node, &i(now_ms)],
            )?;
            tx.execute(
                "UPDATE items SET state = 'pending', owner = NULL, lease_until_ms = 0
                 WHERE state = 'claimed' AND owner = $1",
                &[&node],
            )?;
            Ok(n)
        })
    }

    fn live_lease(&self, node: &str, now_ms: u64) -> Result<Option<u64>, StoreError> {
        self.with(|tx| {
            let row = tx.query_one(
                "SELECT GREATEST(
                    (SELECT MAX(lease_until_ms) FROM jobs WHERE state = 'running' AND owner = $1),
                    (SELECT MAX(lease_until_ms) FROM items WHERE state = 'claimed' AND owner = $1))",
                &[&node],
            )?;
            let latest: Option<i64> = row.try_get(0)?;
            Ok(latest.map(u).filter(|&l| l > now_ms))
        })
    }

    fn pin_signing_key(&self, public_key: &str) -> Result<String, StoreError> {
        self.with(|tx| {
            tx.execute("INSERT INTO fleet (public_key) VALUES ($1) ON CONFLICT DO NOTHING", &[&public_key])?;
            Ok(tx.query_one("SELECT public_key FROM fleet", &[])?.try_get(0)?)
        })
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.with(|tx| get_job(tx, id))
    }

    fn list(&self, state: Option<JobState>, limit: u64, before: Option<&str>) -> Result<Vec<Job>, StoreError> {
        self.with(|tx| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::TEXT IS NULL OR state = $1)
                 AND ($3::TEXT IS NULL OR seq < (SELECT seq FROM jobs WHERE id = $3)) ORDER BY seq DESC LIMIT $2"
            );
            let rows = tx.query(&sql, &[&state.map(JobState::name), &i(limit), &before])?;
            // A row that no longer parses (a damaged store) must not hide every other audit: it
            // is left out of the list, with a warning naming it; reading it alone still says
            // what is wrong with it.
            let (listed, bad) = jobs(tx, &rows)?;
            for why in bad {
                tracing::warn!(error = %why, "listing audits: a stored row no longer parses; left out");
            }
            Ok(listed)
        })
    }

    fn cancel(&self, id: &str, now_ms: u64) -> Result<Option<JobState>, StoreError> {
        self.with(|tx| {
            tx.execute(
                "UPDATE jobs SET state = 'failed', reason = 'cancelled', error = 'cancelled by a client',
                 updated_ms = $2 WHERE id = $1 AND state IN ('queued', 'running')",
                &[&id, &i(now_ms)],
            )?;
            job_state(tx, id, false)
        })
    }

    fn retry(&self, id: &str, queued_max: u64, now_ms: u64) -> Result<Option<(bool, JobState)>, StoreError> {
        self.with(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&QUEUE_LOCK])?;
            let Some(row) = tx.query_opt("SELECT state, reason FROM jobs WHERE id = $1", &[&id])? else {
                return Ok(None);
            };
            let (state, reason): (String, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
            let state = JobState::parse(&state).ok_or_else(|| Fail::Bad(format!("job {id}: state {state:?}")))?;
            // A quarantined row stays where it is: its request is a placeholder.
            if state != JobState::Failed || reason.as_deref() == Some(FailReason::Quarantined.as_str()) {
                return Ok(Some((false, state)));
            }
            if open_count(tx)? >= queued_max {
                return Ok(Some((false, JobState::Failed)));
            }
            tx.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, reason = NULL, error = NULL, updated_ms = $2
                 WHERE id = $1",
                &[&id, &i(now_ms)],
            )?;
            Ok(Some((true, JobState::Queued)))
        })
    }

    fn still_running(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|tx| Ok(job_state(tx, id, false)? == Some(JobState::Running)))
    }

    fn report(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.with(|tx| {
            Ok(tx.query_opt("SELECT report FROM reports WHERE id = $1", &[&id])?.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn evidence(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|tx| {
            let row = tx.query_opt("SELECT evidence FROM reports WHERE id = $1", &[&id])?;
            Ok(row.map(|r| r.try_get::<_, Option<Vec<u8>>>(0)).transpose()?.flatten())
        })
    }

    fn has_evidence(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|tx| {
            let row = tx.query_opt("SELECT evidence IS NOT NULL FROM reports WHERE id = $1", &[&id])?;
            Ok(row.map(|r| r.try_get::<_, bool>(0)).transpose()?.unwrap_or(false))
        })
    }

    fn report_count(&self, id: &str) -> Result<u64, StoreError> {
        self.with(|tx| Ok(u(tx.query_one("SELECT COUNT(*) FROM reports WHERE id = $1", &[&id])?.try_get(0)?)))
    }

    fn count(&self, state: JobState) -> Result<u64, StoreError> {
        self.with(|tx| {
            Ok(u(tx.query_one("SELECT COUNT(*) FROM jobs WHERE state = $1", &[&state.name()])?.try_get(0)?))
        })
    }

    /// A round trip to the database (reconnecting if needed): a daemon that lost its store
    /// reports itself unhealthy.
    fn check(&self) -> Result<(), StoreError> {
        self.with(|tx| {
            tx.execute("SELECT 1", &[])?;
            Ok(())
        })
    }
}
