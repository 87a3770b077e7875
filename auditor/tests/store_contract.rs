//! The job store's contract, run against both stores: [`SqliteStore`] always, [`PgStore`] when
//! `TIEBREAK_PG_URL` names a PostgreSQL database the test may create databases through (each
//! PostgreSQL test creates `tb_contract_<pid>_<n>` and drops it at the end, so tests run in
//! parallel). With `TIEBREAK_PG_REQUIRED=1` a missing or unreachable database fails the
//! PostgreSQL tests instead of skipping them (CI sets it; `scripts/pg-throwaway.sh` starts a
//! database to point them at).
//!
//! Each contract test is one body, run as `<name>::sqlite` and `<name>::postgres`. The
//! PostgreSQL-only tests (`pg_*`) cover what a shared database adds: daemons claiming at once,
//! a connection the server closes, a database that goes away, schema versions, and a store
//! dropped in async code.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use auditor::VerdictKind;
use auditor::daemon::job::{AuditRequest, Decided, FailReason, Inserted, Item, ItemState, JobState, Store, StoreError};
use auditor::daemon::store::{DB_FILE, PgStore, SqliteStore};
use support::pg::PgDb;

const LEASE: u64 = 100;

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

fn insert(s: &dyn Store, max: u64, now: u64) -> String {
    match s.insert(&request(None), max, now).unwrap() {
        Inserted::New(id) => id,
        other => panic!("insert: {other:?}"),
    }
}

fn item(s: &dyn Store, id: &str, start: u64) -> Item {
    s.items(id).unwrap().into_iter().find(|i| i.start == start).unwrap_or_else(|| panic!("no item {id}@{start}"))
}

// ---------------------------------------------------------------------------------------------
// The two stores.

static SERIAL: AtomicU64 = AtomicU64::new(0);

/// One store under test, with a back door for corrupting its rows.
struct Fixture {
    store: Box<dyn Store>,
    back: Back,
}

enum Back {
    Sqlite(PathBuf),
    Pg(PgDb),
}

impl Fixture {
    fn sqlite(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "tiebreak-contract-{}-{name}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Fixture { store: Box::new(SqliteStore::open(&dir).unwrap()), back: Back::Sqlite(dir) }
    }

    /// `None` (after a skip line) when no database is configured and none is required.
    fn pg() -> Option<Fixture> {
        let db = PgDb::create("contract")?;
        let store = PgStore::connect(&db.url).unwrap_or_else(|e| panic!("connecting to {}: {e}", db.name));
        Some(Fixture { store: Box::new(store), back: Back::Pg(db) })
    }

    fn s(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Runs raw SQL on the store's database, behind the store's back (`$1` is `id`).
    fn raw(&self, sql: &str, id: &str) {
        match &self.back {
            Back::Sqlite(dir) => {
                let c = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
                c.execute(&sql.replace("$1", "?1"), [id]).unwrap();
            }
            Back::Pg(db) => {
                db.client().execute(sql, &[&id]).unwrap();
            }
        }
    }

    /// The request kept in table `quarantine` for job `id`.
    fn quarantined_request(&self, id: &str) -> String {
        let sql = "SELECT request FROM quarantine WHERE id = $1";
        match &self.back {
            Back::Sqlite(dir) => rusqlite::Connection::open(dir.join(DB_FILE))
                .unwrap()
                .query_row(&sql.replace("$1", "?1"), [id], |r| r.get(0))
                .unwrap(),
            Back::Pg(db) => db.client().query_one(sql, &[&id]).unwrap().get(0),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Back::Sqlite(dir) = &self.back {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One test body per contract, run against each store.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(&super::Fixture::sqlite(stringify!($name)));
            }
            #[test]
            fn postgres() {
                if let Some(f) = super::Fixture::pg() {
                    super::$name(&f);
                }
            }
        }
    )*};
}

contract!(
    states_and_transitions,
    queue_bound_counts_open_jobs,
    leases_expire_and_are_taken_over,
    items_are_leased_one_daemon_at_a_time,
    recover_releases_only_its_own_leases,
    progress_moves_forward_and_resets_attempts,
    progress_counts_only_for_the_record_it_was_verified_against,
    cancel_stops_a_job_wherever_it_is,
    a_queued_row_that_no_longer_parses_is_quarantined,
);

// ---------------------------------------------------------------------------------------------
// The contract.

fn states_and_transitions(f: &Fixture) {
    let s = f.s();
    let id = insert(s, 10, 1);
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts, job.owner.as_deref(), job.created_ms), (JobState::Queued, 0, None, 1));
    assert_eq!(s.count(JobState::Queued).unwrap(), 1);
    assert!(s.get("audit-999").unwrap().is_none());
    assert!(s.finish(&id, &decided(), 2).is_err(), "a queued job cannot finish");

    let job = s.claim("a", 2, LEASE).unwrap().unwrap();
    assert_eq!(
        (job.id.as_str(), job.state, job.attempts, job.owner.as_deref()),
        (id.as_str(), JobState::Running, 1, Some("a"))
    );
    assert_eq!(job.updated_ms, 2);
    assert!(s.claim("b", 3, LEASE).unwrap().is_none(), "one queued job, claimed once");
    assert!(s.still_running(&id).unwrap());
    assert_eq!((s.count(JobState::Queued).unwrap(), s.count(JobState::Running).unwrap()), (0, 1));

    s.finish(&id, &decided(), 6).unwrap();
    s.finish(&id, &decided(), 7).unwrap();
    assert_eq!(s.report_count(&id).unwrap(), 1, "a second finish stores nothing");
    assert_eq!(s.report(&id).unwrap().as_deref(), Some("{}"));
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.verdict, job.first_step), (JobState::Done, Some(VerdictKind::Diverged), Some(3)));
    assert_eq!((job.steps_replayed, job.steps_resumed, job.updated_ms), (3, 1, 6));
    assert_eq!(s.evidence(&id).unwrap(), Some(vec![1, 2, 3]));
    assert!(s.has_evidence(&id).unwrap() && !s.has_evidence("audit-999").unwrap());
    assert_eq!((s.report("audit-999").unwrap(), s.evidence("audit-999").unwrap()), (None, None));
    assert_eq!(s.report_count("audit-999").unwrap(), 0);
    assert!(!s.still_running(&id).unwrap() && !s.still_running("audit-999").unwrap());

    // Nothing moves a done job.
    s.fail(&id, FailReason::Undecided, "late", 9).unwrap();
    s.requeue(&id, "a", true, 9).unwrap();
    assert_eq!(s.cancel(&id, 9).unwrap(), Some(JobState::Done));
    assert_eq!(s.retry(&id, 10, 9).unwrap(), Some((false, JobState::Done)));
    assert_eq!(s.get(&id).unwrap().unwrap().state, JobState::Done);

    // queued → failed → (retry) queued → running, with its attempts reset.
    let other = insert(s, 10, 10);
    s.fail(&other, FailReason::Undecided, "bad request", 11).unwrap();
    let job = s.get(&other).unwrap().unwrap();
    assert_eq!(
        (job.state, job.reason, job.error.as_deref()),
        (JobState::Failed, Some(FailReason::Undecided), Some("bad request"))
    );
    assert_eq!(s.retry(&other, 10, 12).unwrap(), Some((true, JobState::Queued)));
    let job = s.get(&other).unwrap().unwrap();
    assert_eq!((job.state, job.reason, job.error, job.attempts), (JobState::Queued, None, None, 0));
    assert_eq!(s.claim("b", 13, LEASE).unwrap().unwrap().attempts, 1);
    s.fail(&other, FailReason::GaveUp, "gave up", 14).unwrap();
    assert_eq!(s.get(&other).unwrap().unwrap().reason, Some(FailReason::GaveUp));
    assert!(s.finish(&other, &decided(), 15).is_err(), "a failed job cannot finish");
    assert_eq!(s.report_count(&other).unwrap(), 0);
    assert_eq!(s.retry("audit-999", 10, 15).unwrap(), None);
    assert_eq!(s.cancel("audit-999", 15).unwrap(), None);

    // Listing: newest first, by state, and paged with a cursor.
    let third = insert(s, 10, 16);
    let all: Vec<String> = s.list(None, 10, None).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(all, [third.clone(), other.clone(), id.clone()]);
    let page: Vec<String> = s.list(None, 2, Some(&third)).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(page, [other.clone(), id.clone()]);
    assert!(s.list(None, 10, Some(&id)).unwrap().is_empty());
    let done: Vec<String> = s.list(Some(JobState::Done), 10, None).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(done, [id.as_str()]);
    assert_eq!(s.list(None, 1, None).unwrap().len(), 1);
    for state in JobState::ALL {
        let n = s.list(Some(state), 10, None).unwrap().len() as u64;
        assert_eq!(n, s.count(state).unwrap(), "{state:?}");
    }
    s.check().unwrap();
}

fn queue_bound_counts_open_jobs(f: &Fixture) {
    let s = f.s();
    let a = insert(s, 2, 1);
    let b = insert(s, 2, 1);
    assert_eq!(s.insert(&request(None), 2, 1).unwrap(), Inserted::QueueFull);
    // A running job is still open: claiming frees no room.
    assert_eq!(s.claim("n", 2, LEASE).unwrap().unwrap().id, a);
    assert_eq!(s.insert(&request(None), 2, 3).unwrap(), Inserted::QueueFull);
    // Requeues and recoveries move jobs between queued and running: the bound holds.
    s.requeue(&a, "n", true, 4).unwrap();
    assert_eq!(s.insert(&request(None), 2, 4).unwrap(), Inserted::QueueFull);
    s.claim("n", 5, LEASE).unwrap().unwrap();
    s.claim("m", 5, LEASE).unwrap().unwrap();
    assert_eq!(s.recover("n", 6).unwrap(), 1);
    assert_eq!(s.insert(&request(None), 2, 6).unwrap(), Inserted::QueueFull);
    assert_eq!(s.count(JobState::Queued).unwrap() + s.count(JobState::Running).unwrap(), 2);
    // An expired lease taken over by another daemon changes nothing either.
    assert!(s.claim("o", 6 + LEASE + 1, LEASE).unwrap().is_some());
    assert_eq!(s.insert(&request(None), 2, 7).unwrap(), Inserted::QueueFull);

    // A failed job makes room; retrying it needs room.
    s.fail(&b, FailReason::Undecided, "x", 8).unwrap();
    let c = insert(s, 2, 8);
    assert_eq!(s.retry(&b, 2, 9).unwrap(), Some((false, JobState::Failed)), "no room to retry");
    assert_eq!(s.get(&b).unwrap().unwrap().state, JobState::Failed);
    assert_eq!(s.cancel(&c, 10).unwrap(), Some(JobState::Failed));
    assert_eq!(s.retry(&b, 2, 11).unwrap(), Some((true, JobState::Queued)));
    assert_eq!(s.retry(&c, 2, 11).unwrap(), Some((false, JobState::Failed)), "full again");

    // Idempotency keys are answered whatever the bound.
    s.cancel(&b, 12).unwrap();
    let Inserted::New(k) = s.insert(&request(Some("k")), 2, 12).unwrap() else { panic!() };
    assert_eq!(s.insert(&request(Some("k")), 2, 13).unwrap(), Inserted::Existing(k.clone()));
    let mut other = request(Some("k"));
    other.run = "other".into();
    assert_eq!(s.insert(&other, 2, 13).unwrap(), Inserted::Conflict(k.clone()));
    assert_eq!(s.insert(&request(Some("k")), 0, 13).unwrap(), Inserted::Existing(k));
    assert_eq!(s.insert(&request(Some("k2")), 2, 13).unwrap(), Inserted::QueueFull);
}

fn leases_expire_and_are_taken_over(f: &Fixture) {
    let s = f.s();
    let id = insert(s, 10, 1);
    let job = s.claim("a", 1000, LEASE).unwrap().unwrap();
    assert_eq!((job.attempts, job.owner.as_deref()), (1, Some("a")));
    assert!(s.claim("b", 1000 + LEASE, LEASE).unwrap().is_none(), "the lease runs through its last millisecond");
    assert!(s.renew(&id, "a", 1050, LEASE).unwrap());
    assert!(s.claim("b", 1000 + LEASE + 1, LEASE).unwrap().is_none(), "renewed until 1150");
    assert!(!s.renew(&id, "b", 1060, LEASE).unwrap(), "not b's to renew");
    assert!(!s.renew("audit-999", "a", 1060, LEASE).unwrap());

    // a stops renewing (it died or lost the database): b takes the job over.
    let job = s.claim("b", 1151, LEASE).unwrap().expect("an expired lease is claimable");
    assert_eq!((job.id.as_str(), job.attempts, job.owner.as_deref()), (id.as_str(), 2, Some("b")));
    assert!(!s.renew(&id, "a", 1152, LEASE).unwrap(), "a's attempt must stop");
    s.requeue(&id, "a", true, 1152).unwrap();
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempts, job.owner.as_deref()),
        (JobState::Running, 2, Some("b")),
        "a's requeue is a no-op"
    );
    assert_eq!(s.recover("a", 1153).unwrap(), 0, "a holds nothing any more");
    assert!(s.renew(&id, "b", 1153, LEASE).unwrap());

    // b hands it back at shutdown (refunded), and a claims it again.
    s.requeue(&id, "b", true, 1154).unwrap();
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts, job.owner.as_deref()), (JobState::Queued, 1, None));
    assert!(!s.renew(&id, "b", 1155, LEASE).unwrap(), "a queued job has no lease");
    assert_eq!(s.claim("a", 1156, LEASE).unwrap().unwrap().attempts, 2);
    s.requeue(&id, "a", false, 1157).unwrap();
    assert_eq!(s.claim("a", 1158, LEASE).unwrap().unwrap().attempts, 3, "no refund: the claim counts");

    // Claims go oldest first, an expired running job before a younger queued one.
    let younger = insert(s, 10, 1159);
    assert_eq!(s.claim("c", 1159, LEASE).unwrap().unwrap().id, younger);
    assert!(s.claim("c", 1200, LEASE).unwrap().is_none());
    assert_eq!(s.claim("c", 1158 + LEASE + 1, LEASE).unwrap().unwrap().id, id);
}

fn items_are_leased_one_daemon_at_a_time(f: &Fixture) {
    let s = f.s();
    let id = insert(s, 10, 1);
    let later = insert(s, 10, 1);
    s.claim("a", 10, LEASE).unwrap().unwrap();
    assert!(s.items(&id).unwrap().is_empty());
    s.publish(&id, &[(20, 30), (0, 10), (10, 20)], 11).unwrap();
    let starts: Vec<(u64, u64, ItemState)> = s.items(&id).unwrap().iter().map(|i| (i.start, i.end, i.state)).collect();
    assert_eq!(starts, [(0, 10, ItemState::Pending), (10, 20, ItemState::Pending), (20, 30, ItemState::Pending)]);

    let (job, it) = s.claim_item("b", None, 12, LEASE).unwrap().unwrap();
    assert_eq!((job.id.as_str(), job.state), (id.as_str(), JobState::Running));
    assert_eq!((it.start, it.end, it.state, it.owner.as_deref()), (0, 10, ItemState::Claimed, Some("b")));
    assert_eq!((it.lease_until_ms, it.attempts, it.claims, it.takeovers), (12 + LEASE, 1, 1, 0));
    // Publishing again keeps the items as they are.
    s.publish(&id, &[(0, 10), (10, 20), (20, 30)], 13).unwrap();
    assert_eq!(item(s, &id, 0).owner.as_deref(), Some("b"));
    assert_eq!(s.items(&id).unwrap().len(), 3);

    let (_, it) = s.claim_item("c", Some(&id), 14, LEASE).unwrap().unwrap();
    assert_eq!(it.start, 10, "items go in order");
    assert!(s.claim_item("c", Some(&later), 14, LEASE).unwrap().is_none(), "the other job has no items");

    // Only the holder renews, finishes or releases an item.
    assert!(!s.renew_item(&id, 0, "c", 15, LEASE).unwrap());
    assert!(s.renew_item(&id, 0, "b", 15, LEASE).unwrap());
    assert_eq!(item(s, &id, 0).lease_until_ms, 15 + LEASE);
    s.item_done(&id, 0, "c", 16).unwrap();
    s.release_item(&id, 0, "c", true, 16).unwrap();
    assert_eq!((item(s, &id, 0).state, item(s, &id, 0).owner.as_deref()), (ItemState::Claimed, Some("b")));
    s.item_done(&id, 0, "b", 16).unwrap();
    let done = item(s, &id, 0);
    assert_eq!((done.state, done.owner.as_deref()), (ItemState::Done, Some("b")), "done keeps who did it");
    assert!(!s.renew_item(&id, 0, "b", 17, LEASE).unwrap(), "a done item has no lease");
    s.release_item(&id, 0, "b", true, 17).unwrap();
    assert_eq!(item(s, &id, 0).state, ItemState::Done, "a done item is not released");

    // Released with a refund: pending again, its claim given back.
    s.release_item(&id, 10, "c", true, 18).unwrap();
    let it = item(s, &id, 10);
    assert_eq!((it.state, it.owner.as_deref(), it.attempts, it.claims), (ItemState::Pending, None, 0, 1));

    // b takes item 10; its lease runs out and d takes it over.
    assert_eq!(s.claim_item("b", None, 20, LEASE).unwrap().unwrap().1.start, 10);
    let (_, it) = s.claim_item("d", None, 21, LEASE).unwrap().unwrap();
    assert_eq!(it.start, 20, "a live lease is not taken over");
    assert!(s.claim_item("e", None, 20 + LEASE, LEASE).unwrap().is_none(), "both leases still live");
    let (_, it) = s.claim_item("d", None, 20 + LEASE + 1, LEASE).unwrap().unwrap();
    assert_eq!((it.start, it.owner.as_deref()), (10, Some("d")));
    assert_eq!((it.attempts, it.claims, it.takeovers), (2, 3, 1));
    assert!(!s.renew_item(&id, 10, "b", 122, LEASE).unwrap(), "b lost it");
    s.item_done(&id, 10, "b", 122).unwrap();
    assert_eq!(item(s, &id, 10).state, ItemState::Claimed, "b's late done is a no-op");

    // Released without a refund, the claim counts.
    s.release_item(&id, 10, "d", false, 123).unwrap();
    assert_eq!(item(s, &id, 10).attempts, 2);

    // The items of a job that no longer runs are not claimable, nor renewable.
    s.requeue(&id, "a", true, 124).unwrap();
    assert!(s.claim_item("e", None, 125, LEASE).unwrap().is_none());
    assert!(s.claim_item("e", Some(&id), 125, LEASE).unwrap().is_none());
    assert!(!s.renew_item(&id, 20, "d", 125, LEASE).unwrap(), "its job is queued");
    // Running again (claimed by a daemon): claimable again.
    assert_eq!(s.claim("a", 126, LEASE).unwrap().unwrap().id, id);
    assert_eq!(s.claim_item("e", None, 127, LEASE).unwrap().unwrap().1.start, 10);
    s.finish(&id, &decided(), 128).unwrap();
    assert!(s.claim_item("e", None, 10_000, LEASE).unwrap().is_none(), "a done job's items are not claimable");
    assert!(s.items("audit-999").unwrap().is_empty());
}

fn recover_releases_only_its_own_leases(f: &Fixture) {
    let s = f.s();
    let j1 = insert(s, 10, 1);
    let j2 = insert(s, 10, 1);
    let j3 = insert(s, 10, 1);
    assert_eq!(s.claim("a", 2, LEASE).unwrap().unwrap().id, j1);
    assert_eq!(s.claim("b", 2, LEASE).unwrap().unwrap().id, j2);
    s.publish(&j1, &[(0, 5)], 3).unwrap();
    s.publish(&j2, &[(0, 5), (5, 9)], 3).unwrap();
    assert_eq!(s.claim_item("b", Some(&j1), 4, LEASE).unwrap().unwrap().1.owner.as_deref(), Some("b"));
    assert_eq!(s.claim_item("a", Some(&j2), 4, LEASE).unwrap().unwrap().1.start, 0);
    assert_eq!(s.claim_item("b", Some(&j2), 4, LEASE).unwrap().unwrap().1.start, 5);

    // a restarts: its job and its item go back; b's stay b's.
    assert_eq!(s.recover("a", 5).unwrap(), 1);
    let job = s.get(&j1).unwrap().unwrap();
    assert_eq!((job.state, job.owner.as_deref(), job.attempts), (JobState::Queued, None, 1));
    let job = s.get(&j2).unwrap().unwrap();
    assert_eq!((job.state, job.owner.as_deref()), (JobState::Running, Some("b")));
    let it = item(s, &j2, 0);
    assert_eq!((it.state, it.owner.as_deref(), it.attempts), (ItemState::Pending, None, 1));
    assert_eq!(item(s, &j2, 5).owner.as_deref(), Some("b"));
    assert_eq!(item(s, &j1, 0).owner.as_deref(), Some("b"), "b's item of a's job is b's to hand back");
    assert_eq!(s.get(&j3).unwrap().unwrap().state, JobState::Queued);
    assert_eq!(s.recover("a", 6).unwrap(), 0);
    assert_eq!(s.recover("nobody", 6).unwrap(), 0);
    assert_eq!(s.count(JobState::Queued).unwrap() + s.count(JobState::Running).unwrap(), 3);

    assert_eq!(s.recover("b", 7).unwrap(), 1);
    assert_eq!(s.count(JobState::Running).unwrap(), 0);
    assert!(s.items(&j2).unwrap().iter().all(|i| i.state == ItemState::Pending && i.owner.is_none()));
    assert_eq!(item(s, &j1, 0).state, ItemState::Pending);
}

fn progress_moves_forward_and_resets_attempts(f: &Fixture) {
    let s = f.s();
    let id = insert(s, 10, 1);
    s.save_progress(&id, 0, 5, 5, "r", 2).unwrap();
    assert!(s.get(&id).unwrap().unwrap().progress.is_empty(), "a queued job makes no progress");
    s.claim("a", 2, LEASE).unwrap().unwrap();
    s.requeue(&id, "a", false, 3).unwrap();
    s.claim("a", 4, LEASE).unwrap().unwrap();
    s.requeue(&id, "a", false, 5).unwrap();
    assert_eq!(s.claim("a", 6, LEASE).unwrap().unwrap().attempts, 3);
    assert!(s.bind(&id, "a", "r", false, 6).unwrap());
    s.publish(&id, &[(0, 10), (10, 20)], 7).unwrap();
    for (node, t) in [("b", 8), ("c", 9)] {
        let (_, it) = s.claim_item(node, Some(&id), t, LEASE).unwrap().unwrap();
        assert_eq!(it.start, 0);
        s.release_item(&id, 0, node, false, t).unwrap();
    }
    assert_eq!(s.claim_item("d", Some(&id), 10, LEASE).unwrap().unwrap().1.attempts, 3, "item 0 again");
    assert_eq!(s.claim_item("d", Some(&id), 10, LEASE).unwrap().unwrap().1.start, 10);
    s.release_item(&id, 10, "d", false, 10).unwrap();
    s.claim_item("d", Some(&id), 10, LEASE).unwrap().unwrap();
    assert_eq!((item(s, &id, 0).attempts, item(s, &id, 10).attempts), (3, 2));

    s.save_progress(&id, 0, 5, 5, "r", 11).unwrap();
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.progress.clone(), job.steps_replayed, job.attempts, job.updated_ms), ([(0, 5)].into(), 5, 1, 11));
    assert_eq!((item(s, &id, 0).attempts, item(s, &id, 10).attempts), (1, 2), "only the item that moved");

    // Backwards or in place: nothing changes.
    s.requeue(&id, "a", false, 12).unwrap();
    assert_eq!(s.claim("a", 13, LEASE).unwrap().unwrap().attempts, 2);
    s.save_progress(&id, 0, 4, 4, "r", 14).unwrap();
    s.save_progress(&id, 0, 5, 9, "r", 14).unwrap();
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.progress.clone(), job.steps_replayed, job.attempts), ([(0, 5)].into(), 5, 2));
    s.save_progress(&id, 10, 12, 7, "r", 15).unwrap();
    s.save_progress(&id, 0, 8, 6, "r", 15).unwrap();
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.progress.clone(), job.steps_replayed, job.attempts), ([(0, 8), (10, 12)].into(), 7, 1));
    assert_eq!((item(s, &id, 0).attempts, item(s, &id, 10).attempts), (1, 1));

    // After the job ends, late writes are dropped.
    s.finish(&id, &decided(), 16).unwrap();
    s.save_progress(&id, 0, 9, 9, "r", 17).unwrap();
    assert_eq!(s.get(&id).unwrap().unwrap().progress, [(0, 8), (10, 12)].into(), "no progress after done");
}

/// Progress is bound to the record the coordinator opened: a write against another record is
/// dropped, and a coordinator that opens another record drops the job's items and, unless the
/// record extends the bound one, its progress. Only the lease's holder binds.
fn progress_counts_only_for_the_record_it_was_verified_against(f: &Fixture) {
    let s = f.s();
    let id = insert(s, 10, 1);
    assert_eq!(s.get(&id).unwrap().unwrap().commitment, None, "unbound until opened");
    assert!(!s.bind(&id, "a", "r1", false, 1).unwrap(), "a queued job is nobody's to bind");
    s.claim("a", 2, LEASE).unwrap().unwrap();
    assert!(!s.bind(&id, "b", "r1", false, 2).unwrap(), "only the lease's holder binds");
    assert!(s.bind(&id, "a", "r1", false, 2).unwrap());
    assert_eq!(s.get(&id).unwrap().unwrap().commitment.as_deref(), Some("r1"));
    s.save_progress(&id, 0, 5, 5, "r1", 3).unwrap();
    s.save_progress(&id, 10, 15, 10, "other", 3).unwrap();
    assert_eq!(s.get(&id).unwrap().unwrap().progress, [(0, 5)].into(), "a write against another record is dropped");

    s.publish(&id, &[(0, 10), (10, 20)], 4).unwrap();
    s.claim_item("b", Some(&id), 4, LEASE).unwrap().unwrap();
    assert!(s.bind(&id, "a", "r1", false, 5).unwrap());
    assert_eq!(s.items(&id).unwrap().len(), 2, "the same record again changes nothing");
    assert_eq!(s.get(&id).unwrap().unwrap().progress, [(0, 5)].into());

    // The run went on: the progress holds, the plan may not.
    assert!(s.bind(&id, "a", "r2", true, 6).unwrap());
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.commitment.as_deref(), job.progress.clone()), (Some("r2"), [(0, 5)].into()));
    assert!(s.items(&id).unwrap().is_empty(), "items of the old plan are dropped");
    assert!(!s.renew_item(&id, 0, "b", 7, LEASE).unwrap(), "their holders learn it");
    s.save_progress(&id, 0, 8, 8, "r1", 7).unwrap();
    assert_eq!(s.get(&id).unwrap().unwrap().progress, [(0, 5)].into(), "a helper of the old binding is ignored");

    // Another record: everything goes.
    assert!(s.bind(&id, "a", "r3", false, 8).unwrap());
    let job = s.get(&id).unwrap().unwrap();
    assert_eq!((job.commitment.as_deref(), job.progress.is_empty()), (Some("r3"), true));
    s.save_progress(&id, 0, 2, 2, "r3", 9).unwrap();
    s.requeue(&id, "a", true, 10).unwrap();
    let job = s.claim("c", 11, LEASE).unwrap().unwrap();
    assert_eq!((job.commitment.as_deref(), job.progress), (Some("r3"), [(0, 2)].into()), "kept across attempts");
}

fn cancel_stops_a_job_wherever_it_is(f: &Fixture) {
    let s = f.s();
    let running = insert(s, 10, 1);
    let queued = insert(s, 10, 1);
    assert_eq!(s.claim("a", 3, LEASE).unwrap().unwrap().id, running);
    assert!(s.bind(&running, "a", "r", false, 3).unwrap());
    s.publish(&running, &[(0, 4)], 3).unwrap();
    s.claim_item("b", None, 4, LEASE).unwrap().unwrap();

    assert_eq!(s.cancel(&queued, 5).unwrap(), Some(JobState::Failed));
    assert_eq!(s.cancel(&running, 5).unwrap(), Some(JobState::Failed));
    for id in [&queued, &running] {
        let job = s.get(id).unwrap().unwrap();
        assert_eq!((job.state, job.reason), (JobState::Failed, Some(FailReason::Cancelled)), "{id}");
        assert!(!s.still_running(id).unwrap());
    }
    assert!(!s.renew(&running, "a", 6, LEASE).unwrap(), "the worker learns it must stop");
    assert!(!s.renew_item(&running, 0, "b", 6, LEASE).unwrap());
    assert!(s.claim_item("c", None, 10_000, LEASE).unwrap().is_none());
    s.save_progress(&running, 0, 3, 3, "r", 6).unwrap();
    assert!(s.get(&running).unwrap().unwrap().progress.is_empty(), "a cancelled audit stores nothing");
    assert!(s.finish(&running, &decided(), 7).is_err());
    assert_eq!(s.report_count(&running).unwrap(), 0);
    s.requeue(&running, "a", true, 7).unwrap();
    assert_eq!(s.get(&running).unwrap().unwrap().state, JobState::Failed, "a late requeue does not revive it");
    assert_eq!(s.recover("a", 8).unwrap(), 0);
    assert!(s.claim("z", 10_000, LEASE).unwrap().is_none());
    assert_eq!(s.cancel(&running, 9).unwrap(), Some(JobState::Failed));
    // A client may retry a cancelled audit.
    assert_eq!(s.retry(&running, 10, 10).unwrap(), Some((true, JobState::Queued)));
}

fn a_queued_row_that_no_longer_parses_is_quarantined(f: &Fixture) {
    let s = f.s();
    let bad = insert(s, 10, 1);
    let good = insert(s, 10, 1);
    f.raw("UPDATE jobs SET request = '{torn' WHERE id = $1", &bad);
    assert!(s.get(&bad).is_err(), "reading the damaged row alone says it is damaged");
    let listed: Vec<String> = s.list(None, 10, None).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, [good.as_str()], "a damaged row is left out of listings");

    let job = s.claim("a", 2, LEASE).unwrap().expect("the good job is claimed past the bad one");
    assert_eq!(job.id, good);
    let q = s.get(&bad).unwrap().unwrap();
    assert_eq!((q.state, q.reason), (JobState::Failed, Some(FailReason::Quarantined)), "{q:?}");
    assert!(q.error.as_deref().unwrap().contains("quarantine"), "{q:?}");
    assert_eq!(f.quarantined_request(&bad), "{torn", "the original row is kept");
    assert_eq!(s.list(None, 10, None).unwrap().len(), 2, "listing works again");
    assert_eq!(s.retry(&bad, 10, 3).unwrap(), Some((false, JobState::Failed)), "a quarantined row stays put");
    assert!(s.claim("a", 3, LEASE).unwrap().is_none());

    // A running row that no longer parses: other daemons skip its items and help other audits.
    let other = insert(s, 10, 2);
    assert_eq!(s.claim("c", 2, LEASE).unwrap().unwrap().id, other);
    s.publish(&good, &[(0, 4)], 2).unwrap();
    s.publish(&other, &[(0, 4)], 2).unwrap();
    f.raw("UPDATE jobs SET request = 'null' WHERE id = $1", &good);
    let (job, it) = s.claim_item("d", None, 3, LEASE).unwrap().expect("the other audit's item");
    assert_eq!((job.id.as_str(), it.start), (other.as_str(), 0));
    assert!(s.claim_item("d", None, 3, LEASE).unwrap().is_none());
    s.cancel(&other, 3).unwrap();

    // A running row whose lease expired is quarantined when it is taken over.
    assert!(s.claim("b", 2 + LEASE + 1, LEASE).unwrap().is_none());
    assert_eq!(s.get(&good).unwrap().unwrap().reason, Some(FailReason::Quarantined));
    assert_eq!(f.quarantined_request(&good), "null");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: what a shared database adds.

/// Four daemons, each with its own connection, claiming at once: no job and no item is handed to
/// two of them; inserts at once never overshoot the bound nor store a key twice.
#[test]
fn pg_concurrent_daemons_never_share_a_claim() {
    let Some(f) = Fixture::pg() else { return };
    let Back::Pg(db) = &f.back else { unreachable!() };
    const NODES: usize = 4;
    const JOBS: u64 = 40;
    let stores: Vec<PgStore> = (0..NODES).map(|_| PgStore::connect(&db.url).unwrap()).collect();

    // Inserts: 4 × 20 against a bound of 30, and 4 × the same key.
    let inserted = race(&stores, |s, _| {
        let mut new = Vec::new();
        for _ in 0..20 {
            if let Inserted::New(id) = s.insert(&request(None), JOBS - 10, 1).unwrap() {
                new.push(id);
            }
        }
        new
    });
    let new: BTreeSet<String> = inserted.into_iter().flatten().collect();
    assert_eq!(new.len() as u64, JOBS - 10, "exactly the bound");
    let keyed = race(&stores, |s, _| s.insert(&request(Some("same")), JOBS, 1).unwrap());
    let Some(Inserted::New(k)) = keyed.iter().find(|k| matches!(k, Inserted::New(_))) else { panic!("{keyed:?}") };
    assert!(keyed.iter().all(|x| matches!(x, Inserted::New(_)) || *x == Inserted::Existing(k.clone())), "{keyed:?}");
    assert_eq!(keyed.iter().filter(|k| matches!(k, Inserted::New(_))).count(), 1);
    for _ in 0..9 {
        insert(f.s(), JOBS, 2);
    }
    assert_eq!(f.s().count(JobState::Queued).unwrap(), JOBS);

    // Claims: every job exactly once.
    let claimed = race(&stores, |s, node| {
        let mut got = Vec::new();
        while let Some(job) = s.claim(&node, 10, 1_000_000).unwrap() {
            assert_eq!(job.owner.as_deref(), Some(node.as_str()));
            got.push(job.id);
        }
        got
    });
    let all: Vec<&String> = claimed.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!((all.len() as u64, distinct.len() as u64), (JOBS, JOBS), "{claimed:?}");

    // Items: one job's 60 items, every one exactly once; then all taken over after expiry.
    let id = all[0].clone();
    let intervals: Vec<(u64, u64)> = (0..60).map(|k| (k * 10, k * 10 + 10)).collect();
    f.s().publish(&id, &intervals, 11).unwrap();
    for now in [12, 12 + LEASE + 1] {
        let got = race(&stores, |s, node| {
            let mut got = Vec::new();
            while let Some((job, it)) = s.claim_item(&node, None, now, LEASE).unwrap() {
                assert_eq!((job.id.as_str(), it.owner.as_deref()), (id.as_str(), Some(node.as_str())));
                got.push(it.start);
            }
            got
        });
        let all: Vec<u64> = got.iter().flatten().copied().collect();
        let distinct: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!((all.len(), distinct.len()), (60, 60), "at {now}: {got:?}");
    }
    let items = f.s().items(&id).unwrap();
    assert!(items.iter().all(|i| (i.claims, i.takeovers, i.attempts) == (2, 1, 2)), "{items:?}");

    // Concurrent finishes of one job (a retried write, a takeover): one report.
    let finished = race(&stores, |s, _| s.finish(&id, &decided(), 20).is_ok());
    assert!(finished.iter().all(|ok| *ok));
    assert_eq!(f.s().report_count(&id).unwrap(), 1);
}

/// Runs `body` on every store at once (one thread each, started together).
fn race<T: Send>(stores: &[PgStore], body: impl Fn(&PgStore, String) -> T + Sync) -> Vec<T> {
    let start = Barrier::new(stores.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let (body, start) = (&body, &start);
                scope.spawn(move || {
                    start.wait();
                    body(s, format!("node-{k}"))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Waits until no connection but the caller's is open on `db`.
fn wait_for_no_other_backends(db: &PgDb) {
    let mut admin = db.admin();
    for _ in 0..200 {
        let n: i64 =
            admin.query_one("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1", &[&db.name]).unwrap().get(0);
        if n == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("connections to {} did not close", db.name);
}

#[test]
fn pg_a_store_survives_the_server_closing_its_connection() {
    let Some(f) = Fixture::pg() else { return };
    let Back::Pg(db) = &f.back else { unreachable!() };
    let s = f.s();
    let id = insert(s, 10, 1);
    for round in 0..3 {
        let killed: i64 = db
            .client()
            .query_one(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(killed, 1, "round {round}: the store's connection");
        wait_for_no_other_backends(db);
        // The connection is found dead when the transaction begins: nothing ran, so the store
        // reconnects at once.
        assert_eq!(s.get(&id).unwrap().unwrap().id, id, "round {round}");
        s.check().unwrap();
    }
    // Killed in the middle of a claim's transaction (a lock wait the kill interrupts): the
    // operation fails, the next one reconnects, and nothing was half done.
    let mut blocker = db.client();
    let mut tx = blocker.transaction().unwrap();
    tx.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE", &[]).unwrap();
    let handle = std::thread::scope(|scope| {
        let claiming = scope.spawn(|| s.claim("a", 2, LEASE));
        let mut admin = db.admin();
        // The store's backend is the one waiting for the lock.
        let mut killed = 0;
        for _ in 0..200 {
            killed = admin
                .query_one(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[&db.name],
                )
                .unwrap()
                .get::<_, i64>(0);
            if killed > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(killed, 1);
        claiming.join().unwrap()
    });
    tx.rollback().unwrap();
    let e = handle.unwrap_err();
    assert!(e.0.contains("postgres store"), "{e}");
    let job = s.claim("a", 3, LEASE).unwrap().expect("works again after reconnecting");
    assert_eq!((job.id, job.attempts), (id, 1), "the interrupted claim left nothing behind");
}

#[test]
fn pg_check_errs_while_the_database_is_unreachable() {
    // A closed port: connecting fails, and says so without the password.
    let e = PgStore::connect("postgres://someone:hunter2-secret@127.0.0.1:1/db?connect_timeout=2").unwrap_err();
    assert!(!e.0.contains("hunter2-secret"), "{e}");
    assert!(e.0.contains("postgres store") && e.0.contains("127.0.0.1:1"), "{e}");
    let e =
        PgStore::connect("host=127.0.0.1 port=1 user=someone password=hunter2-secret connect_timeout=2").unwrap_err();
    assert!(!e.0.contains("hunter2-secret"), "{e}");
    let e = PgStore::connect("postgres://someone:hunter2-secret@127.0.0.1:notaport/db").unwrap_err();
    assert!(!e.0.contains("hunter2-secret") && e.0.contains("postgres store"), "{e}");

    let Some(f) = Fixture::pg() else { return };
    let Back::Pg(db) = &f.back else { unreachable!() };
    let s = f.s();
    s.check().unwrap();
    // The database refuses connections and drops the store's: health checks fail, fast.
    let mut admin = db.admin();
    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name)).unwrap();
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&db.name]).unwrap();
    wait_for_no_other_backends(db);
    let e: StoreError = s.check().unwrap_err();
    assert!(e.0.contains("database unreachable") && e.0.contains(&db.name), "{e}");
    let e = s.check().unwrap_err();
    assert!(e.0.contains("retrying in"), "backing off: {e}");
    assert!(s.get("audit-1").is_err() && s.insert(&request(None), 10, 1).is_err());
    // Back: the store reconnects once its backoff has passed.
    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name)).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if s.check().is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "the store reconnected");
    insert(s, 10, 2);
}

#[test]
fn pg_schema_migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(f) = Fixture::pg() else { return };
    let Back::Pg(db) = &f.back else { unreachable!() };
    // Daemons starting together on a migrated database, and one more on a fresh one.
    let fresh = PgDb::create("contract").unwrap();
    let urls = [db.url.clone(), db.url.clone(), fresh.url.clone(), fresh.url.clone()];
    let threads: Vec<_> =
        urls.into_iter().map(|u| std::thread::spawn(move || PgStore::connect(&u).map(drop))).collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    for d in [db, &fresh] {
        let versions: Vec<i32> = d
            .client()
            .query("SELECT version FROM schema_migrations ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, [1, 2, 3], "{}", d.name);
    }
    db.client().execute("INSERT INTO schema_migrations (version, applied_ms) VALUES (99, 0)", &[]).unwrap();
    let e = PgStore::connect(&db.url).unwrap_err();
    assert!(e.0.contains("schema version 99") && e.0.contains("refusing"), "{e}");
}

/// The sync client owns a small runtime, which tokio forbids dropping in async code: the daemon's
/// last handle on its store may well go away there.
#[test]
fn pg_a_store_dropped_in_async_code_does_not_panic() {
    let Some(f) = Fixture::pg() else { return };
    let Back::Pg(db) = &f.back else { unreachable!() };
    let store = PgStore::connect(&db.url).unwrap();
    store.check().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
    rt.block_on(async move { drop(store) });
    // And used from a blocking thread of a runtime, as the daemon does.
    let store = PgStore::connect(&db.url).unwrap();
    let id = rt.block_on(async move { tokio::task::spawn_blocking(move || insert(&store, 10, 1)).await.unwrap() });
    assert_eq!(f.s().get(&id).unwrap().unwrap().state, JobState::Queued);
}
