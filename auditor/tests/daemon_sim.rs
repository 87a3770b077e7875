//! A deterministic, seeded simulation of the daemon's job logic (TigerBeetle's VOPR idea): the
//! real [`Worker`] on the real SQLite store, with a virtual clock, a simulated trainer that
//! times out, store operations that fail or crash the process after committing, crashes in the
//! middle of replay, and graceful-shutdown cancellations. After every crash the store is
//! reopened from disk and recovered, as a restarted daemon does.
//!
//! Each seed prints itself first. Replay one with `TIEBREAK_SIM_SEED=<seed> cargo test -p
//! tiebreak-auditor --test daemon_sim -- --nocapture`; run more with `TIEBREAK_SIM_SEEDS=<n>`.
//!
//! Checked after every event and at the end: the queue bound; a job is `done` exactly when it
//! has one report; no report is ever written twice; durable progress only moves forward and a
//! resumed attempt replays nothing at or before it; each decided verdict is the simulated
//! record's (or `trainer-unresponsive`); idempotency keys map to one audit; every job ends
//! `done` or `failed` once the faults stop.

mod support;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditor::daemon::job::{
    AuditRequest, Clock, Decided, Inserted, ItemOutcome, Job, JobState, NoObserver, Outcome, Runner, Store, StoreError,
    Worked, Worker, WorkerConfig,
};
use auditor::daemon::store::SqliteStore;
use auditor::replay::{RecordView, Resume};
use auditor::{AuditError, Progress};
use common::merkle::MerkleTree;
use common::prng::Stream;

const CRASH: &str = "simulated crash";
const QUEUE_MAX: u64 = 6;
const ATTEMPTS_MAX: u32 = 6;
/// Simulated trainer deadline and retry backoff.
const DEADLINE_MS: u64 = 2_000;
const BACKOFF_MS: u64 = 150;

/// Fault rates, zeroed for the final drain.
#[derive(Debug, Default)]
struct Faults {
    on: AtomicBool,
}

impl Faults {
    fn on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }
}

struct World {
    rng: Mutex<Stream>,
    faults: Faults,
    now: AtomicU64,
    /// Durable progress per job as of the last check (the store's, read without faults).
    durable: Mutex<BTreeMap<String, u64>>,
    /// Invariant violations seen inside a worker step (a panic there would look like a crash).
    violations: Mutex<Vec<String>>,
}

impl World {
    fn chance(&self, p: f64) -> bool {
        self.faults.on() && self.rng.lock().unwrap().bernoulli(p)
    }
    fn below(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().below(n)
    }
}

struct VirtualClock(Arc<World>);

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.0.now.load(Ordering::SeqCst)
    }
    fn sleep(&self, d: Duration) {
        self.0.now.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

/// The real store, reopened from disk after each crash, with injected failures (the operation
/// does not happen) and crashes right after an operation committed.
struct FlakyStore {
    world: Arc<World>,
    dir: PathBuf,
    inner: Mutex<Option<SqliteStore>>,
}

impl FlakyStore {
    fn reopen(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner = None;
        *inner = Some(SqliteStore::open(&self.dir).expect("reopen the store"));
    }

    fn op<T>(&self, write: bool, f: impl FnOnce(&SqliteStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.world.chance(0.04) {
            return Err(StoreError("injected failure".into()));
        }
        let r = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            f(inner.as_ref().expect("store open"))
        };
        if write && r.is_ok() && self.world.chance(0.02) {
            panic!("{CRASH}: after a committed store write");
        }
        r
    }
}

support::delegate_store!(FlakyStore);

/// A simulated record, named by its run id: `s<steps>-d<first diverging step, 0 = none>`, or
/// `missing` (the auditor lacks its dataset: the audit cannot decide).
fn record_of(run: &str) -> Option<(u64, Option<u64>)> {
    let (s, d) = run.strip_prefix('s')?.split_once("-d")?;
    let d: u64 = d.parse().ok()?;
    Some((s.parse().ok()?, (d > 0).then_some(d)))
}

fn report_json(job: &Job, verdict: &str, step: Option<u64>) -> String {
    format!("{{\"audit\":\"{}\",\"run\":\"{}\",\"verdict\":\"{verdict}\",\"step\":{step:?}}}", job.id, job.request.run)
}

/// One attempt of a job: (progress when claimed, first step replayed).
type Attempt = (u64, Option<u64>);

/// The simulated trainer and replay: one request per step that may time out (retried with
/// backoff on the virtual clock until the deadline), crashes mid-replay, and cancellation.
struct SimRunner {
    world: Arc<World>,
    clock: Arc<VirtualClock>,
    /// Job id → its attempts.
    attempts: Mutex<BTreeMap<String, Vec<Attempt>>>,
}

impl Runner for SimRunner {
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome {
        let Some((steps, diverge)) = record_of(&job.request.run) else {
            return Outcome::Failed(format!("no dataset for run {}", job.request.run));
        };
        let leaves = MerkleTree::from_leaf_hashes((0..=steps).map(|t| [t as u8; 32]));
        let resume = match progress.opened(&RecordView::new([1; 32], &leaves, kernels::Profile::CpuAlt)) {
            Ok(Resume::Keep) => job.progress.get(&0).copied().unwrap_or(0),
            Ok(Resume::Discard) => 0,
            Err(AuditError::Cancelled) => return Outcome::Cancelled,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let durable = self.world.durable.lock().unwrap().get(&job.id).copied().unwrap_or(0);
        if resume != durable {
            self.world
                .violations
                .lock()
                .unwrap()
                .push(format!("{} claimed with progress {resume}, but {durable} steps are durably verified", job.id));
        }
        let mut log = (resume, None);
        let decided = |verdict: &str, step: Option<u64>, replayed: u64| {
            Outcome::Decided(Decided {
                verdict: verdict.parse().unwrap(),
                first_step: step,
                steps_replayed: replayed,
                steps_resumed: resume,
                bisection_queries: 0,
                report_json: report_json(job, verdict, step),
                evidence: step.map(|s| s.to_le_bytes().to_vec()),
            })
        };
        let outcome = 'replay: {
            for t in resume + 1..=steps {
                if progress.cancelled() {
                    break 'replay Outcome::Cancelled;
                }
                // The trainer's answer for step t, retried until the deadline.
                let mut waited = 0;
                while self.world.chance(0.05) {
                    if waited + BACKOFF_MS > DEADLINE_MS {
                        break 'replay decided("trainer-unresponsive", None, t - 1);
                    }
                    self.clock.sleep(Duration::from_millis(BACKOFF_MS));
                    waited += BACKOFF_MS;
                }
                if self.world.chance(0.01) {
                    self.record(job, log);
                    panic!("{CRASH}: in the middle of replay");
                }
                log.1.get_or_insert(t);
                self.clock.sleep(Duration::from_millis(40));
                progress.replayed(t, 0.04);
                if diverge == Some(t) {
                    break 'replay decided("diverged", Some(t), t);
                }
                progress.verified(0, t);
            }
            decided("consistent", None, steps)
        };
        self.record(job, log);
        outcome
    }

    fn run_interval(&self, _job: &Job, interval: (u64, u64), _progress: &dyn Progress) -> ItemOutcome {
        // This runner's audits share nothing (its progress has no `share`), so there are no
        // work items; `tests/fleet_sim.rs` simulates a fleet.
        panic!("the single-daemon simulation published no work item, yet {interval:?} was claimed")
    }
}

impl SimRunner {
    fn record(&self, job: &Job, attempt: Attempt) {
        self.attempts.lock().unwrap().entry(job.id.clone()).or_default().push(attempt);
    }
}

/// One seed's simulation; panics (with the seed printed) when an invariant breaks.
fn simulate(seed: u64, dir: &Path) {
    let world = Arc::new(World {
        rng: Mutex::new(Stream::new(seed, "daemon-sim", 0, 0)),
        faults: Faults { on: AtomicBool::new(true) },
        now: AtomicU64::new(1_000),
        durable: Mutex::new(BTreeMap::new()),
        violations: Mutex::new(Vec::new()),
    });
    let _ = std::fs::remove_dir_all(dir);
    let store = Arc::new(FlakyStore { world: world.clone(), dir: dir.to_path_buf(), inner: Mutex::new(None) });
    store.reopen();
    let clock = Arc::new(VirtualClock(world.clone()));
    let runner =
        Arc::new(SimRunner { world: world.clone(), clock: clock.clone(), attempts: Mutex::new(BTreeMap::new()) });
    let cancel = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        store: store.clone(),
        runner: runner.clone(),
        clock: clock.clone(),
        observer: Arc::new(NoObserver),
        config: WorkerConfig {
            attempts_max: ATTEMPTS_MAX,
            progress_interval_ms: 100,
            store_tries: 3,
            store_backoff_ms: 10,
            ..WorkerConfig::default()
        },
        cancel: cancel.clone(),
    };
    let runs = ["s12-d0", "s9-d5", "s20-d17", "s3-d1", "missing", "s15-d0"];
    // Accepted audits: id → run; idempotency key → id.
    let mut accepted: BTreeMap<String, String> = BTreeMap::new();
    let mut keys: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut crashes = 0;

    let restart = |store: &FlakyStore| {
        store.reopen();
        // Recovery may itself fail (injected); a real daemon retries start-up.
        while store.recover("local", clock.now_ms()).is_err() {}
    };
    for event in 0..400 {
        let ctx = format!("seed {seed}, event {event}");
        match world.below(10) {
            0..=2 => {
                let run = runs[world.below(runs.len() as u64) as usize].to_string();
                let key = (world.below(3) == 0).then(|| format!("k{}", world.below(4)));
                let request = AuditRequest {
                    trainer_url: "http://trainer.sim".into(),
                    run: run.clone(),
                    idempotency_key: key.clone(),
                    ..AuditRequest::default()
                };
                match store.insert(&request, QUEUE_MAX, clock.now_ms()) {
                    Ok(Inserted::New(id)) => {
                        assert!(!accepted.contains_key(&id), "{ctx}: id {id} handed out twice");
                        if let Some(k) = &key {
                            assert!(!keys.contains_key(k), "{ctx}: key {k} got a second audit {id}");
                            keys.insert(k.clone(), (id.clone(), run.clone()));
                        }
                        accepted.insert(id, run);
                    }
                    Ok(Inserted::Existing(id)) => {
                        let k = key.expect("existing only with a key");
                        assert_eq!(keys.get(&k), Some(&(id, run)), "{ctx}: key {k}");
                    }
                    Ok(Inserted::Conflict(id)) => {
                        let k = key.expect("conflict only with a key");
                        let (kid, krun) = keys.get(&k).expect("known key");
                        assert_eq!((kid, krun == &run), (&id, false), "{ctx}: conflict on key {k}");
                    }
                    Ok(Inserted::QueueFull) => {}
                    Err(_) => {}
                }
            }
            3..=7 => {
                // A worker step; sometimes a shutdown arrives while it runs.
                cancel.store(world.chance(0.1), Ordering::SeqCst);
                let w = worker.clone();
                let r = catch_unwind(AssertUnwindSafe(|| w.work_one()));
                cancel.store(false, Ordering::SeqCst);
                if r.is_err() {
                    crashes += 1;
                    restart(&store);
                }
            }
            8 => {
                // kill -9 between operations, then a restart.
                crashes += 1;
                restart(&store);
            }
            _ => clock.sleep(Duration::from_millis(world.below(500))),
        }
        check(&store, &accepted, &world, &runner, &ctx);
    }

    // The faults stop; everything left must finish.
    world.faults.on.store(false, Ordering::SeqCst);
    restart(&store);
    let mut rounds = 0;
    while worker.work_one() != Worked::Idle {
        rounds += 1;
        assert!(rounds < 1000, "seed {seed}: the queue does not drain");
    }
    check(&store, &accepted, &world, &runner, &format!("seed {seed}, end"));
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, run) in &accepted {
        let job = store.get(id).unwrap().unwrap();
        *by_state.entry(job.state.name()).or_default() += 1;
        let ctx = format!("seed {seed}: {id} ({run})");
        match job.state {
            JobState::Done => {
                let report = store.report(id).unwrap().expect("done has a report");
                let verdict = job.verdict.unwrap().as_str();
                assert_eq!(report, report_json(&job, verdict, job.first_step), "{ctx}");
                let (_, diverge) = record_of(run).expect("a decided run is a record");
                match verdict {
                    "trainer-unresponsive" => assert_eq!(job.first_step, None, "{ctx}"),
                    "diverged" => assert_eq!(job.first_step, diverge, "{ctx}"),
                    "consistent" => assert_eq!(diverge, None, "{ctx}"),
                    v => panic!("{ctx}: verdict {v}"),
                }
                assert_eq!(store.evidence(id).unwrap(), job.first_step.map(|s| s.to_le_bytes().to_vec()), "{ctx}");
                assert_eq!(store.has_evidence(id).unwrap(), job.first_step.is_some(), "{ctx}");
            }
            JobState::Failed => {
                let e = job.error.as_deref().unwrap_or("");
                assert!(run == "missing" || e.starts_with("gave up after"), "{ctx}: failed without cause: {e}");
                assert!(run != "missing" || e.contains("no dataset"), "{ctx}: {e}");
            }
            s => panic!("{ctx}: still {}", s.name()),
        }
    }
    println!("seed {seed}: {} audits {by_state:?}, {crashes} crashes", accepted.len());
}

/// Invariants that hold between any two events.
fn check(store: &FlakyStore, accepted: &BTreeMap<String, String>, world: &World, runner: &SimRunner, ctx: &str) {
    let Some(inner) = store.inner.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let violations = std::mem::take(&mut *world.violations.lock().unwrap());
    assert!(violations.is_empty(), "{ctx}: {violations:?}");
    let mut durable = world.durable.lock().unwrap();
    // Read the real store directly (no injected faults while checking).
    let open = inner.count(JobState::Queued).unwrap() + inner.count(JobState::Running).unwrap();
    assert!(open <= QUEUE_MAX, "{ctx}: {open} open audits, over the bound {QUEUE_MAX}");
    for id in accepted.keys() {
        let job = inner.get(id).unwrap().unwrap_or_else(|| panic!("{ctx}: accepted {id} is gone"));
        let reports = inner.report_count(id).unwrap();
        assert_eq!(
            reports,
            u64::from(job.state == JobState::Done),
            "{ctx}: {id} {:?} with {reports} reports",
            job.state
        );
        let p = job.progress.get(&0).copied().unwrap_or(0);
        let seen = durable.entry(id.clone()).or_insert(0);
        assert!(p >= *seen, "{ctx}: {id} progress went back from {seen} to {p}");
        *seen = p;
    }
    for (id, attempts) in runner.attempts.lock().unwrap().iter() {
        for &(resume, first) in attempts {
            if let Some(f) = first {
                assert_eq!(f, resume + 1, "{ctx}: {id} resumed at {resume} but replayed {f} first");
            }
        }
    }
    *store.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("TIEBREAK_SIM_SEED") {
        return vec![s.trim().parse().expect("TIEBREAK_SIM_SEED is a u64")];
    }
    let n: u64 = std::env::var("TIEBREAK_SIM_SEEDS").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(12);
    (1..=n).collect()
}

#[test]
fn the_job_state_machine_survives_crashes_store_failures_and_trainer_timeouts() {
    // Simulated crashes are panics caught by the driver; keep their messages out of the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or("");
        if !msg.starts_with(CRASH) {
            default_hook(info);
        }
    }));
    let base = std::env::temp_dir().join(format!("tiebreak-daemon-sim-{}", std::process::id()));
    for seed in seeds() {
        println!("daemon simulation seed {seed} (replay: TIEBREAK_SIM_SEED={seed})");
        simulate(seed, &base.join(seed.to_string()));
    }
    let _ = std::fs::remove_dir_all(&base);
}
