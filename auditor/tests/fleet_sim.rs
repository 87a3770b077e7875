//! A deterministic, seeded simulation of a fleet of auditor daemons on one store: the real
//! [`Worker`]s of several virtual daemons (nodes), one thread each, interleaved at every store
//! operation and every sleep by a seeded scheduler (only one thread runs at a time, and the
//! seed decides which), on a virtual clock. Nodes are killed between or right after store
//! operations and in the middle of replay, shut down gracefully, cut off from the store
//! (partitions) and restarted; the clock jumps past leases.
//!
//! The simulated audits are shared: the coordinator publishes checkpoint intervals as work
//! items through the real [`share_intervals`], any node replays them, and the coordinator
//! decides from the durable progress.
//!
//! Checked after every event: open audits never exceed the queue bound; a job is `done`
//! exactly when it has one report; durable progress of every interval only moves forward; a
//! replay of an interval starts right after its durable point (nothing verified is replayed
//! again). Checked at the end, once the faults stop: every audit is `done` or `failed` (with a
//! cause that is not a verdict), and every verdict is the simulated record's, as a
//! single-process audit decides it.
//!
//! Runs on SQLite always, and on PostgreSQL when `TIEBREAK_PG_URL` is set (CI sets it, with
//! `TIEBREAK_PG_REQUIRED=1`). Replay one seed with `TIEBREAK_SIM_SEED=<seed>`; run more with
//! `TIEBREAK_SIM_SEEDS=<n>`.

mod support;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use auditor::daemon::job::{
    AuditRequest, Clock, Decided, FailReason, Inserted, ItemOutcome, Job, JobState, NoObserver, Outcome, Runner, Store,
    StoreError, Worked, Worker, WorkerConfig,
};
use auditor::daemon::store::{PgStore, SqliteStore};
use auditor::replay::{RecordView, Resume, share_intervals};
use auditor::{AuditError, Progress};
use common::merkle::MerkleTree;
use common::prng::Stream;

const CRASH: &str = "simulated crash";
const NODES: usize = 3;
const QUEUE_MAX: u64 = 5;
const ATTEMPTS_MAX: u32 = 8;
const LEASE_MS: u64 = 1_000;
/// Steps per work item.
const INTERVAL: u64 = 4;
const EVENTS: u64 = 600;

thread_local! {
    /// The scheduler's number for this thread; none for the driver.
    static ME: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Who runs next: one thread at a time, at the driver's (seeded) choice.
#[derive(Default)]
struct Turn {
    /// The thread running now; none while the driver decides.
    holder: Option<usize>,
    /// Threads waiting for their turn.
    parked: BTreeSet<usize>,
    live: BTreeSet<usize>,
    /// Threads that die (a kill -9 of their node) when they get their next turn.
    doomed: BTreeSet<usize>,
}

#[derive(Default)]
struct Sched {
    turn: Mutex<Turn>,
    cv: Condvar,
}

impl Sched {
    fn lock(&self) -> MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A yield point: waits for this thread's next turn (the driver never waits here).
    fn park(&self) {
        let Some(me) = ME.with(Cell::get) else { return };
        let mut t = self.lock();
        t.holder = None;
        t.parked.insert(me);
        self.cv.notify_all();
        while t.holder != Some(me) {
            t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        if t.doomed.remove(&me) {
            drop(t);
            panic!("{CRASH}: its node was killed");
        }
    }

    fn exit(&self, me: usize) {
        let mut t = self.lock();
        t.live.remove(&me);
        t.parked.remove(&me);
        if t.holder == Some(me) {
            t.holder = None;
        }
        self.cv.notify_all();
    }

    /// Waits until every live thread is parked, then hands the turn to `pick` of them (if any).
    fn step(&self, pick: impl FnOnce(&[usize]) -> Option<usize>, doom: bool) {
        let mut t = self.lock();
        while t.holder.is_some() || t.parked != t.live {
            t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        let parked: Vec<usize> = t.parked.iter().copied().collect();
        if let Some(i) = pick(&parked) {
            t.parked.remove(&i);
            if doom {
                t.doomed.insert(i);
            }
            t.holder = Some(i);
            self.cv.notify_all();
        }
    }

    /// Waits until every live thread is parked.
    fn quiet(&self) {
        self.step(|_| None, false);
    }
}

struct World {
    rng: Mutex<Stream>,
    faults: AtomicBool,
    now: AtomicU64,
    sched: Sched,
    /// Nodes cut off from the store.
    partitioned: Mutex<BTreeSet<usize>>,
    /// The store as the driver sees it (no faults).
    truth: Arc<dyn Store>,
    violations: Mutex<Vec<String>>,
}

impl World {
    fn chance(&self, p: f64) -> bool {
        self.faults.load(Ordering::SeqCst) && self.rng.lock().unwrap().bernoulli(p)
    }
    fn below(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().below(n)
    }
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

struct VirtualClock(Arc<World>);

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.0.now.load(Ordering::SeqCst)
    }
    fn sleep(&self, d: Duration) {
        self.0.now.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        self.0.sched.park();
    }
}

/// One node's view of the store: every operation is a yield point, fails while the node is
/// partitioned (or by injection), and may kill the node right after it committed.
struct NodeStore {
    node: usize,
    world: Arc<World>,
    inner: Arc<dyn Store>,
}

impl NodeStore {
    fn op<T>(&self, write: bool, f: impl FnOnce(&dyn Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.world.sched.park();
        if self.world.partitioned.lock().unwrap().contains(&self.node) {
            return Err(StoreError("partitioned from the database".into()));
        }
        if self.world.chance(0.03) {
            return Err(StoreError("injected failure".into()));
        }
        let r = f(&*self.inner);
        if write && r.is_ok() && self.world.chance(0.01) {
            panic!("{CRASH}: after a committed store write");
        }
        r
    }
}

support::delegate_store!(NodeStore);

/// A simulated record, named by its run id: `s<steps>-d<first diverging step, 0 = none>`, or
/// `missing` (the auditor lacks its dataset: the audit cannot decide).
fn record_of(run: &str) -> Option<(u64, Option<u64>)> {
    let (s, d) = run.strip_prefix('s')?.split_once("-d")?;
    let d: u64 = d.parse().ok()?;
    Some((s.parse().ok()?, (d > 0).then_some(d)))
}

fn intervals(steps: u64) -> Vec<(u64, u64)> {
    (0..steps).step_by(INTERVAL as usize).map(|s| (s, (s + INTERVAL).min(steps))).collect()
}

fn report_json(job: &Job, verdict: &str, step: Option<u64>) -> String {
    format!("{{\"audit\":\"{}\",\"run\":\"{}\",\"verdict\":\"{verdict}\",\"step\":{step:?}}}", job.id, job.request.run)
}

/// The simulated replay: one virtual step at a time (each a yield point), reporting verified
/// points, stopping at the record's first diverging step.
struct SimRunner {
    world: Arc<World>,
    clock: Arc<VirtualClock>,
}

impl SimRunner {
    /// Replays `(start, end]` from `from` (its durable point); the diverging step if it is in it.
    fn replay(
        &self,
        job: &Job,
        (start, end): (u64, u64),
        from: u64,
        progress: &dyn Progress,
    ) -> Result<Option<u64>, AuditError> {
        let (_, diverge) = record_of(&job.request.run).expect("only records are replayed");
        // Nothing verified durably is replayed again (the store read here is the truth, read
        // without faults and without yielding: no other node ran since this attempt began).
        let durable = self.world.truth.get(&job.id).ok().flatten().and_then(|j| j.progress.get(&start).copied());
        if from != durable.unwrap_or(start) {
            self.world.violation(format!(
                "{} interval {start}: replay starts after {from}, but {durable:?} is durably verified",
                job.id
            ));
        }
        for t in from + 1..=end {
            if progress.cancelled() {
                return Err(AuditError::Cancelled);
            }
            if self.world.chance(0.004) {
                panic!("{CRASH}: in the middle of replay");
            }
            self.clock.sleep(Duration::from_millis(40));
            progress.replayed(t, 0.04);
            if diverge == Some(t) {
                return Ok(Some(t));
            }
            progress.verified(start, t);
        }
        Ok(None)
    }

    fn decide(&self, job: &Job, resume: &BTreeMap<u64, u64>, steps: u64, progress: &dyn Progress) -> Outcome {
        for (start, end) in intervals(steps) {
            let from = resume.get(&start).copied().unwrap_or(start);
            match self.replay(job, (start, end), from, progress) {
                Ok(None) => {}
                Ok(Some(step)) => return decided(job, "diverged", Some(step), steps),
                Err(AuditError::Cancelled) => return Outcome::Cancelled,
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        }
        decided(job, "consistent", None, steps)
    }
}

fn decided(job: &Job, verdict: &str, step: Option<u64>, steps: u64) -> Outcome {
    Outcome::Decided(Decided {
        verdict: verdict.parse().unwrap(),
        first_step: step,
        steps_replayed: steps,
        steps_resumed: 0,
        bisection_queries: 0,
        report_json: report_json(job, verdict, step),
        evidence: step.map(|s| s.to_le_bytes().to_vec()),
    })
}

/// The simulated record's leaves (one per step and the initial one).
fn leaves(steps: u64) -> MerkleTree {
    MerkleTree::from_leaf_hashes((0..=steps).map(|t| [t as u8; 32]))
}

impl Runner for SimRunner {
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome {
        let Some((steps, _)) = record_of(&job.request.run) else {
            return Outcome::Failed(format!("no dataset for run {}", job.request.run));
        };
        let resume = match progress.opened(&RecordView::new([1; 32], &leaves(steps), kernels::Profile::CpuAlt)) {
            Ok(Resume::Keep) => job.progress.clone(),
            Ok(Resume::Discard) => BTreeMap::new(),
            Err(AuditError::Cancelled) => return Outcome::Cancelled,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let plan = intervals(steps);
        let Some(share) = progress.share().filter(|_| plan.len() > 1) else {
            return self.decide(job, &resume, steps, progress);
        };
        // Fewer intervals than `ITEMS_MAX`: one work item each.
        let shared = share_intervals(share, &plan, progress, |(start, end), durable| {
            self.replay(job, (start, end), durable.get(&start).copied().unwrap_or(start), progress).map(|_| ())
        });
        let durable = match shared.and_then(|()| share.progress()) {
            Ok(d) => d,
            Err(AuditError::Cancelled) => return Outcome::Cancelled,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        self.decide(job, &durable, steps, progress)
    }

    fn run_interval(&self, job: &Job, (start, end): (u64, u64), progress: &dyn Progress) -> ItemOutcome {
        let steps = record_of(&job.request.run).map_or(0, |(steps, _)| steps);
        match progress.opened(&RecordView::new([1; 32], &leaves(steps), kernels::Profile::CpuAlt)) {
            Ok(_) => {}
            Err(AuditError::Cancelled) => return ItemOutcome::Cancelled,
            Err(_) => {
                self.world.violation(format!("{} interval {start}: a helper saw another record", job.id));
                return ItemOutcome::Ended;
            }
        }
        let from = job.progress.get(&start).copied().unwrap_or(start);
        match self.replay(job, (start, end), from, progress) {
            Err(AuditError::Cancelled) => ItemOutcome::Cancelled,
            _ => ItemOutcome::Ended,
        }
    }
}

/// A virtual daemon: its node name, the thread running its worker, and its shutdown flag.
struct Node {
    name: String,
    thread: Option<usize>,
    cancel: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

struct Fleet {
    world: Arc<World>,
    clock: Arc<VirtualClock>,
    runner: Arc<SimRunner>,
    /// Each node's own store connection.
    stores: Vec<Arc<dyn Store>>,
    nodes: Vec<Node>,
    next_thread: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Fleet {
    /// Starts node `n`'s worker thread (after its start-up recovery, as a daemon does).
    fn start(&mut self, n: usize) {
        let name = self.nodes[n].name.clone();
        if self.world.truth.recover(&name, self.clock.now_ms()).is_err() {
            return; // a daemon that cannot reach its store does not start; tried again later
        }
        let (cancel, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let worker = Worker {
            store: Arc::new(NodeStore { node: n, world: self.world.clone(), inner: self.stores[n].clone() }),
            runner: self.runner.clone(),
            clock: self.clock.clone(),
            observer: Arc::new(NoObserver),
            config: WorkerConfig {
                attempts_max: ATTEMPTS_MAX,
                progress_interval_ms: 100,
                store_tries: 3,
                store_backoff_ms: 10,
                node: name.clone(),
                lease_ms: LEASE_MS,
                poll_ms: 50,
                share: true,
                ..WorkerConfig::default()
            },
            cancel: cancel.clone(),
        };
        let me = self.next_thread;
        self.next_thread += 1;
        self.world.sched.lock().live.insert(me);
        let (world, clock, thread_stop) = (self.world.clone(), self.clock.clone(), stop.clone());
        self.handles.push(std::thread::spawn(move || {
            ME.with(|c| c.set(Some(me)));
            let _ = catch_unwind(AssertUnwindSafe(|| {
                world.sched.park();
                while !thread_stop.load(Ordering::SeqCst) {
                    if matches!(worker.work_one(), Worked::Idle | Worked::StoreUnavailable) {
                        clock.sleep(Duration::from_millis(100));
                    }
                }
            }));
            world.sched.exit(me);
        }));
        self.nodes[n] = Node { name, thread: Some(me), cancel, stop };
        self.world.sched.quiet();
    }

    fn alive(&self, n: usize) -> bool {
        self.nodes[n].thread.is_some_and(|t| self.world.sched.lock().live.contains(&t))
    }

    /// Stops node `n`: gracefully (its audits go back with their claims refunded) or not.
    fn stop(&mut self, n: usize, graceful: bool) {
        let Some(t) = self.nodes[n].thread.take() else { return };
        self.nodes[n].stop.store(true, Ordering::SeqCst);
        if graceful {
            self.nodes[n].cancel.store(true, Ordering::SeqCst);
        }
        let sched = &self.world.sched;
        sched.step(|p| p.contains(&t).then_some(t), !graceful);
        // A graceful stop runs to the end of its attempt, interleaved with the others. (The
        // running thread draws from the seeded stream too: wait for it before drawing.)
        loop {
            sched.quiet();
            if !sched.lock().live.contains(&t) {
                break;
            }
            let pick = self.world.below(3);
            sched.step(|p| if p.contains(&t) && pick > 0 { Some(t) } else { p.first().copied() }, false);
        }
    }
}

/// One seed on `truth` (the driver's store) and `stores` (one per node); panics (with the seed
/// printed) when an invariant breaks. What happened, in a line (the same seed on either store
/// must give the same line: the interleaving is the seed's, and the stores keep one contract).
fn simulate(seed: u64, truth: Arc<dyn Store>, stores: Vec<Arc<dyn Store>>) -> String {
    let world = Arc::new(World {
        rng: Mutex::new(Stream::new(seed, "fleet-sim", 0, 0)),
        faults: AtomicBool::new(true),
        now: AtomicU64::new(1_000),
        sched: Sched::default(),
        partitioned: Mutex::new(BTreeSet::new()),
        truth,
        violations: Mutex::new(Vec::new()),
    });
    let clock = Arc::new(VirtualClock(world.clone()));
    let runner = Arc::new(SimRunner { world: world.clone(), clock: clock.clone() });
    let nodes = (0..NODES)
        .map(|n| Node { name: format!("node-{n}"), thread: None, cancel: Arc::default(), stop: Arc::default() })
        .collect();
    let mut fleet = Fleet { world: world.clone(), clock, runner, stores, nodes, next_thread: 0, handles: Vec::new() };
    for n in 0..NODES {
        fleet.start(n);
    }
    let runs = ["s12-d0", "s9-d5", "s20-d17", "s3-d1", "missing", "s15-d0", "s16-d9"];
    let mut accepted: BTreeMap<String, String> = BTreeMap::new();
    let mut cancelled: BTreeSet<String> = BTreeSet::new();
    let mut durable: BTreeMap<(String, u64), u64> = BTreeMap::new();
    let mut kills = 0;
    let truth = world.truth.clone();
    let now = || world.now.load(Ordering::SeqCst);

    for event in 0..EVENTS {
        let ctx = format!("seed {seed}, event {event}");
        match world.below(20) {
            0..=2 => {
                let run = runs[world.below(runs.len() as u64) as usize].to_string();
                let request = AuditRequest {
                    trainer_url: "http://trainer.sim".into(),
                    run: run.clone(),
                    ..AuditRequest::default()
                };
                if let Ok(Inserted::New(id)) = truth.insert(&request, QUEUE_MAX, now()) {
                    assert!(accepted.insert(id, run).is_none(), "{ctx}: an id handed out twice");
                }
            }
            3..=13 => {
                let pick = world.below(1 << 20) as usize;
                world.sched.step(|p| (!p.is_empty()).then(|| p[pick % p.len()]), false);
            }
            14 => {
                let n = world.below(NODES as u64) as usize;
                if fleet.alive(n) {
                    kills += 1;
                    fleet.stop(n, world.below(4) == 0);
                } else {
                    fleet.start(n);
                }
            }
            15 => {
                let n = world.below(NODES as u64) as usize;
                let mut p = world.partitioned.lock().unwrap();
                if !p.remove(&n) {
                    p.insert(n);
                }
            }
            16 if world.below(20) == 0 && !accepted.is_empty() => {
                let id = accepted.keys().nth(world.below(accepted.len() as u64) as usize).unwrap().clone();
                if truth.cancel(&id, now()) == Ok(Some(JobState::Failed)) {
                    cancelled.insert(id);
                }
            }
            _ => {
                world.now.fetch_add(world.below(3 * LEASE_MS / 2), Ordering::SeqCst);
            }
        }
        world.sched.quiet();
        check(&world, &accepted, &mut durable, &ctx);
    }

    // The faults stop, every node is back: everything left must finish.
    world.faults.store(false, Ordering::SeqCst);
    world.partitioned.lock().unwrap().clear();
    for n in 0..NODES {
        if !fleet.alive(n) {
            fleet.start(n);
        }
    }
    let mut turns = 0;
    let settled = |accepted: &BTreeMap<String, String>| {
        world.sched.quiet();
        accepted
            .keys()
            .all(|id| truth.get(id).unwrap().is_some_and(|j| matches!(j.state, JobState::Done | JobState::Failed)))
    };
    while !settled(&accepted) {
        turns += 1;
        assert!(turns < 200_000, "seed {seed}: the audits do not settle");
        let pick = world.below(1 << 20) as usize;
        world.sched.step(|p| (!p.is_empty()).then(|| p[pick % p.len()]), false);
        if turns % 64 == 0 {
            world.sched.quiet();
            check(&world, &accepted, &mut durable, &format!("seed {seed}, drain turn {turns}"));
        }
    }
    for n in 0..NODES {
        fleet.stop(n, true);
    }
    for h in fleet.handles.drain(..) {
        h.join().unwrap();
    }
    check(&world, &accepted, &mut durable, &format!("seed {seed}, end"));

    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut takeovers, mut helped) = (0, 0);
    for (id, run) in &accepted {
        let job = truth.get(id).unwrap().unwrap();
        *by_state.entry(job.reason.map_or(job.state.name(), FailReason::as_str)).or_default() += 1;
        let items = truth.items(id).unwrap();
        takeovers += items.iter().map(|i| u64::from(i.takeovers)).sum::<u64>();
        helped += items.iter().filter(|i| i.owner.is_some() && i.owner != job.owner).count();
        let ctx = format!("seed {seed}: {id} ({run})");
        match job.state {
            JobState::Done => {
                assert!(!cancelled.contains(id), "{ctx}: cancelled, yet decided");
                let report = truth.report(id).unwrap().expect("done has a report");
                let verdict = job.verdict.unwrap().as_str();
                assert_eq!(report, report_json(&job, verdict, job.first_step), "{ctx}");
                let (_, diverge) = record_of(run).expect("a decided run is a record");
                // A single-process audit's verdict: the first diverging step, or consistent.
                let expected = if diverge.is_some() { "diverged" } else { "consistent" };
                assert_eq!((verdict, job.first_step), (expected, diverge), "{ctx}");
            }
            JobState::Failed => {
                let e = job.error.as_deref().unwrap_or("");
                let cause = match job.reason {
                    Some(FailReason::Cancelled) => cancelled.contains(id),
                    Some(FailReason::GaveUp) => e.starts_with("gave up after"),
                    Some(FailReason::Undecided) => run == "missing" && e.contains("no dataset"),
                    _ => false,
                };
                assert!(cause, "{ctx}: failed ({:?}) without its cause: {e}", job.reason);
            }
            s => panic!("{ctx}: still {}", s.name()),
        }
    }
    let summary = format!(
        "seed {seed}: {} audits {by_state:?}, {kills} nodes stopped, {helped} intervals replayed by a node other \
         than the coordinator, {takeovers} takeovers",
        accepted.len()
    );
    println!("{summary}");
    summary
}

fn on_sqlite(seed: u64, dir: &std::path::Path) -> String {
    let _ = std::fs::remove_dir_all(dir);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir).unwrap());
    let summary = simulate(seed, store.clone(), vec![store; NODES]);
    let _ = std::fs::remove_dir_all(dir);
    summary
}

/// Invariants that hold between any two events (the store read directly, without faults).
fn check(world: &World, accepted: &BTreeMap<String, String>, durable: &mut BTreeMap<(String, u64), u64>, ctx: &str) {
    let violations = std::mem::take(&mut *world.violations.lock().unwrap());
    assert!(violations.is_empty(), "{ctx}: {violations:?}");
    let store = &world.truth;
    let open = store.count(JobState::Queued).unwrap() + store.count(JobState::Running).unwrap();
    assert!(open <= QUEUE_MAX, "{ctx}: {open} open audits, over the bound {QUEUE_MAX}");
    for id in accepted.keys() {
        let job = store.get(id).unwrap().unwrap_or_else(|| panic!("{ctx}: accepted {id} is gone"));
        let reports = store.report_count(id).unwrap();
        assert_eq!(
            reports,
            u64::from(job.state == JobState::Done),
            "{ctx}: {id} {:?} with {reports} reports",
            job.state
        );
        for (&start, &through) in &job.progress {
            let seen = durable.entry((id.clone(), start)).or_insert(start);
            assert!(through >= *seen, "{ctx}: {id} interval {start}: progress went back from {seen} to {through}");
            *seen = through;
        }
    }
}

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("TIEBREAK_SIM_SEED") {
        return vec![s.trim().parse().expect("TIEBREAK_SIM_SEED is a u64")];
    }
    let n: u64 = std::env::var("TIEBREAK_SIM_SEEDS").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default);
    (1..=n).collect()
}

/// Simulated crashes are panics caught by the driver; keep their messages out of the output.
fn quiet_crashes() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or("");
        if !msg.starts_with(CRASH) {
            default_hook(info);
        }
    }));
}

#[test]
fn a_fleet_on_sqlite_decides_every_audit_once_through_kills_partitions_and_lease_expiry() {
    quiet_crashes();
    let base = std::env::temp_dir().join(format!("tiebreak-fleet-sim-{}", std::process::id()));
    for seed in seeds(16) {
        println!("fleet simulation (SQLite) seed {seed} (replay: TIEBREAK_SIM_SEED={seed})");
        on_sqlite(seed, &base.join(seed.to_string()));
    }
}

/// The same seeds on PostgreSQL, one connection per node; each must also end exactly as it does
/// on SQLite.
#[test]
fn a_fleet_on_postgresql_decides_every_audit_once_through_kills_partitions_and_lease_expiry() {
    quiet_crashes();
    let base = std::env::temp_dir().join(format!("tiebreak-fleet-sim-pg-{}", std::process::id()));
    for seed in seeds(3) {
        let Some(db) = support::pg::PgDb::create("fleet_sim") else { return };
        println!("fleet simulation (PostgreSQL) seed {seed} (replay: TIEBREAK_SIM_SEED={seed})");
        let truth: Arc<dyn Store> = Arc::new(PgStore::connect(&db.url).unwrap());
        let stores = (0..NODES).map(|_| Arc::new(PgStore::connect(&db.url).unwrap()) as Arc<dyn Store>).collect();
        let on_pg = simulate(seed, truth, stores);
        assert_eq!(on_pg, on_sqlite(seed, &base.join(seed.to_string())), "seed {seed}: the stores differ");
    }
}
