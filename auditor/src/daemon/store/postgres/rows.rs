//! Reading jobs and items from rows, and the small queries several operations share.

use std::collections::BTreeMap;

use ::postgres::Row;

use super::conn::{Fail, Tx};
use crate::VerdictKind;
use crate::daemon::job::{AuditRequest, FailReason, Item, ItemState, Job, JobState};
use crate::daemon::store::{QUARANTINED_REQUEST, i, u};

pub(super) const JOB_COLUMNS: &str = "id, request, state, attempts, steps_replayed, steps_resumed, verdict, \
                                      first_step, error, created_ms, updated_ms, reason, owner, commitment";

type ProgressById = BTreeMap<String, BTreeMap<u64, u64>>;

/// The jobs of rows of [`JOB_COLUMNS`], with their progress (one query for all), and why each
/// of the rows that do not parse does not.
pub(super) fn jobs(tx: Tx<'_, '_>, rows: &[Row]) -> Result<(Vec<Job>, Vec<String>), Fail> {
    let ids: Vec<String> = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
    let mut progress = ProgressById::new();
    if !ids.is_empty() {
        for p in tx.query("SELECT id, job_start, through FROM progress WHERE id = ANY($1)", &[&ids])? {
            progress.entry(p.try_get(0)?).or_default().insert(u(p.try_get(1)?), u(p.try_get(2)?));
        }
    }
    let (mut parsed, mut bad) = (Vec::new(), Vec::new());
    for r in rows {
        match job_row(r, &mut progress) {
            Ok(job) => parsed.push(job),
            Err(Fail::Bad(why)) => bad.push(why),
            Err(e) => return Err(e),
        }
    }
    Ok((parsed, bad))
}

/// One job; `Fail::Bad` when its row does not parse.
fn job_row(r: &Row, progress: &mut ProgressById) -> Result<Job, Fail> {
    let id: String = r.try_get(0)?;
    let request: String = r.try_get(1)?;
    let state: String = r.try_get(2)?;
    let verdict: Option<String> = r.try_get(6)?;
    let reason: Option<String> = r.try_get(11)?;
    let bad = |why: String| Fail::Bad(format!("job {id}: {why}"));
    let request: AuditRequest = serde_json::from_str(&request).map_err(|e| bad(format!("stored request: {e}")))?;
    let state = JobState::parse(&state).ok_or_else(|| bad(format!("state {state:?}")))?;
    let verdict = verdict.map(|v| v.parse::<VerdictKind>().map_err(|e| bad(format!("verdict: {e}")))).transpose()?;
    let reason = reason.map(|v| FailReason::parse(&v).ok_or_else(|| bad(format!("reason {v:?}")))).transpose()?;
    Ok(Job {
        progress: progress.remove(&id).unwrap_or_default(),
        id,
        request,
        state,
        attempts: u32::try_from(r.try_get::<_, i64>(3)?).unwrap_or(u32::MAX),
        steps_replayed: u(r.try_get(4)?),
        steps_resumed: u(r.try_get(5)?),
        verdict,
        first_step: r.try_get::<_, Option<i64>>(7)?.map(u),
        error: r.try_get(8)?,
        reason,
        created_ms: u(r.try_get(9)?),
        updated_ms: u(r.try_get(10)?),
        owner: r.try_get(12)?,
        commitment: r.try_get(13)?,
    })
}

/// Job `id`; `Fail::Bad` when its row does not parse.
pub(super) fn get_job(tx: Tx<'_, '_>, id: &str) -> Result<Option<Job>, Fail> {
    let rows = tx.query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"), &[&id])?;
    let (mut parsed, mut bad) = jobs(tx, &rows)?;
    match bad.pop() {
        Some(why) => Err(Fail::Bad(why)),
        None => Ok(parsed.pop()),
    }
}

/// Job `id`'s state. With `lock`, the row is locked first, which orders this transaction after
/// any other writing the job (a claim, a finish, a cancel) and before the next.
pub(super) fn job_state(tx: Tx<'_, '_>, id: &str, lock: bool) -> Result<Option<JobState>, Fail> {
    let sql = match lock {
        true => "SELECT state FROM jobs WHERE id = $1 FOR NO KEY UPDATE",
        false => "SELECT state FROM jobs WHERE id = $1",
    };
    let Some(row) = tx.query_opt(sql, &[&id])? else { return Ok(None) };
    let state: String = row.try_get(0)?;
    JobState::parse(&state).map(Some).ok_or_else(|| Fail::Bad(format!("job {id}: state {state:?}")))
}

/// Open (queued or running) jobs: what the queue bound counts.
pub(super) fn open_count(tx: Tx<'_, '_>) -> Result<u64, Fail> {
    Ok(u(tx.query_one("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')", &[])?.try_get(0)?))
}

/// Sets job `id` aside: its row as it was goes to table `quarantine`, the job becomes `failed`
/// with reason `quarantined` and a request that parses (so listing and status still work).
pub(super) fn quarantine(tx: Tx<'_, '_>, id: &str, why: &str, now_ms: u64) -> Result<(), Fail> {
    tracing::error!(
        audit = id,
        why,
        "quarantined: its stored row no longer parses; the original is kept in table quarantine"
    );
    tx.execute(
        "INSERT INTO quarantine (id, request, why, at_ms) SELECT id, request, $2, $3 FROM jobs WHERE id = $1
         ON CONFLICT (id) DO UPDATE SET request = excluded.request, why = excluded.why, at_ms = excluded.at_ms",
        &[&id, &why, &i(now_ms)],
    )?;
    let error =
        format!("quarantined: its stored row no longer parses ({why}); the original is kept in table quarantine");
    tx.execute(
        "UPDATE jobs SET state = 'failed', reason = 'quarantined', verdict = NULL, request = $2, error = $3,
         updated_ms = $4 WHERE id = $1",
        &[&id, &QUARANTINED_REQUEST, &error, &i(now_ms)],
    )?;
    Ok(())
}

pub(super) fn item_row(id: &str, r: &Row) -> Result<Item, Fail> {
    let state: String = r.try_get(2)?;
    let count = |n: usize| r.try_get::<_, i64>(n).map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    Ok(Item {
        start: u(r.try_get(0)?),
        end: u(r.try_get(1)?),
        state: ItemState::parse(&state).ok_or_else(|| Fail::Bad(format!("job {id}: item state {state:?}")))?,
        owner: r.try_get(3)?,
        lease_until_ms: u(r.try_get(4)?),
        attempts: count(5)?,
        claims: count(6)?,
        takeovers: count(7)?,
    })
}

pub(super) const ITEM_COLUMNS: &str = "job_start, job_end, state, owner, lease_until_ms, attempts, claims, takeovers";
