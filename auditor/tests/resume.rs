//! Interrupted audits: progress reported through `Progress::verified` resumes a cancelled
//! audit, which then reaches the same verdict as an uninterrupted one without replaying the
//! verified steps again.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use auditor::daemon::job::{
    AuditRequest, Decided, Inserted, ItemOutcome, Job, JobState, NoObserver, Outcome, Runner, Store, SystemClock,
    Worked, Worker, WorkerConfig,
};
use auditor::daemon::runner::options;
use auditor::daemon::store::SqliteStore;
use auditor::replay::{RecordView, Resume};
use auditor::source::SourceError;
use auditor::{AuditError, AuditOptions, LocalRecord, Mode, Progress, TrainerSource, audit};
use common::codec::Hash;
use common::leaf::{BatchIndices, Leaf};
use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::record::Manifest;
use engine::train::{Fault, FaultKind, Run, StepMode};
use kernels::Profile;
use support::{Drill, SGD, STEPS, config, run, scratch, write_record};

/// Records verified points and cancels once `cancel_after` steps were replayed.
struct Interrupt {
    cancel_after: u64,
    replayed: AtomicU64,
    verified: Mutex<BTreeMap<u64, u64>>,
    replayed_steps: Mutex<Vec<u64>>,
}

impl Interrupt {
    fn new(cancel_after: u64) -> Self {
        Interrupt {
            cancel_after,
            replayed: AtomicU64::new(0),
            verified: Mutex::new(BTreeMap::new()),
            replayed_steps: Mutex::new(Vec::new()),
        }
    }
}

impl Progress for Interrupt {
    fn replayed(&self, step: u64, _seconds: f64) {
        self.replayed.fetch_add(1, Ordering::SeqCst);
        self.replayed_steps.lock().unwrap().push(step);
    }
    fn verified(&self, job_start: u64, through: u64) {
        let mut v = self.verified.lock().unwrap();
        let e = v.entry(job_start).or_insert(job_start);
        assert!(through > *e, "verified points of a job only move forward");
        *e = through;
    }
    fn cancelled(&self) -> bool {
        self.replayed.load(Ordering::SeqCst) >= self.cancel_after
    }
}

/// A record that also hands out the state after any step, recomputed from the nearest
/// checkpoint like the trainer's record server does; `tamper` corrupts what it hands out.
struct WithStates {
    inner: LocalRecord,
    run: Run,
    tamper: bool,
    asked: Mutex<Vec<u64>>,
}

impl TrainerSource for WithStates {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn spec_bytes(&self) -> Result<Vec<u8>, SourceError> {
        self.inner.spec_bytes()
    }
    fn manifest(&self) -> Result<Option<Manifest>, SourceError> {
        self.inner.manifest()
    }
    fn leaves(&self, signed_steps: Option<u64>) -> Result<Vec<Leaf>, SourceError> {
        self.inner.leaves(signed_steps)
    }
    fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), SourceError> {
        self.inner.child_hashes(lo, hi, size)
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, SourceError> {
        self.inner.inclusion_proof(index, size)
    }
    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError> {
        self.inner.log(step)
    }
    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError> {
        self.inner.batch(step)
    }
    fn checkpoint_steps(&self) -> Result<Vec<u64>, SourceError> {
        self.inner.checkpoint_steps()
    }
    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError> {
        self.inner.checkpoint(step)
    }
    fn state(&self, step: u64) -> Result<TrainingState, SourceError> {
        self.asked.lock().unwrap().push(step);
        let record = self.inner.record();
        let c = record.checkpoint_at_or_before(step).unwrap();
        let mut state = self.inner.checkpoint(c)?;
        for t in c + 1..=step {
            let log = self.inner.log(t)?;
            state = self.run.step(&state, t, StepMode::Replay(&log), None).unwrap().state;
        }
        if self.tamper {
            let name = state.tensors().next().unwrap().0.to_string();
            let t = state.get_mut(&name).unwrap();
            t.data[0] = f32::from_bits(t.data[0].to_bits() ^ 1);
        }
        Ok(state)
    }
}

fn source(record: &std::path::Path, tamper: bool) -> WithStates {
    WithStates {
        inner: LocalRecord::open(record).unwrap(),
        run: run(&config(SGD), Profile::Cpu),
        tamper,
        asked: Mutex::new(Vec::new()),
    }
}

#[test]
fn a_cancelled_audit_resumes_after_its_last_verified_step_and_reaches_the_same_verdict() {
    let dir = scratch("resume");
    for fault in [None, Some(Fault { kind: FaultKind::PerturbWeight, step: 11 })] {
        let d = dir.join(format!("{fault:?}").replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let record = write_record(&d, Profile::Cpu, SGD, Drill { fault, ..Drill::default() });
        let src = source(&record, false);
        let opts = AuditOptions::new(Profile::CpuSeq);
        let whole = audit(&src, &opts, &Interrupt::new(u64::MAX)).unwrap();
        assert_eq!(whole.steps_resumed, 0);

        // Stop after 6 steps (not a checkpoint step: the source recomputes the state).
        let first = Interrupt::new(6);
        assert!(matches!(audit(&src, &opts, &first), Err(AuditError::Cancelled)));
        let points = first.verified.into_inner().unwrap();
        assert_eq!(points, BTreeMap::from([(0, 6)]), "full mode is one job from 0");

        let second = Interrupt::new(u64::MAX);
        let resumed = audit(&src, &AuditOptions { resume: points, ..opts.clone() }, &second).unwrap();
        assert_eq!(resumed.verdict, whole.verdict, "{fault:?}");
        assert_eq!(resumed.steps_resumed, 6);
        assert_eq!(resumed.steps_replayed, whole.steps_replayed);
        let again = second.replayed_steps.into_inner().unwrap();
        assert_eq!(again.first(), Some(&7), "{fault:?}: replay continues after step 6: {again:?}");
        // Besides the resume point, only the diverging step's state is asked for (to compare
        // it with the auditor's, tensor by tensor).
        let asked: Vec<u64> =
            src.asked.lock().unwrap().iter().copied().filter(|&s| Some(s) != whole.verdict.step()).collect();
        assert_eq!(asked, vec![6]);
        assert_eq!(resumed.bisection.unwrap().first_differing_leaf, whole.bisection.unwrap().first_differing_leaf);
        match (&resumed.detail, &whole.detail) {
            (Some(a), Some(b)) => {
                assert_eq!((a.step, a.auditor_leaf, &a.trainer.leaf), (b.step, b.auditor_leaf, &b.trainer.leaf))
            }
            (None, None) => {}
            (a, b) => panic!("{a:?} vs {b:?}"),
        }
    }
}

#[test]
fn a_state_that_does_not_match_its_leaf_is_not_resumed_from() {
    let dir = scratch("resume-tamper");
    let record = write_record(&dir, Profile::Cpu, SGD, Drill::default());
    let src = source(&record, true);
    let opts = AuditOptions { resume: BTreeMap::from([(0, 6)]), ..AuditOptions::new(Profile::CpuSeq) };
    let progress = Interrupt::new(u64::MAX);
    let a = audit(&src, &opts, &progress).unwrap();
    assert!(a.verdict.is_consistent(), "{:?}", a.verdict);
    assert_eq!(a.steps_resumed, 0, "the tampered state was refused, so nothing was skipped");
    assert_eq!(progress.replayed_steps.into_inner().unwrap(), (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn interval_jobs_verified_to_their_end_are_skipped() {
    let dir = scratch("resume-intervals");
    let record = write_record(&dir, Profile::Cpu, SGD, Drill::default());
    let src = LocalRecord::open(&record).unwrap();
    let opts = AuditOptions { mode: Mode::Intervals, ..AuditOptions::new(Profile::CpuSplitK) };
    // Jobs (0,4] (4,8] (8,12] (12,13]: the first two done, the third half-way (step 10 is not
    // a checkpoint and a plain record has no state there, so that job starts over).
    let resume = BTreeMap::from([(0, 4), (4, 8), (8, 10)]);
    let progress = Interrupt::new(u64::MAX);
    let a = audit(&src, &AuditOptions { resume, ..opts }, &progress).unwrap();
    assert!(a.verdict.is_consistent(), "{:?}", a.verdict);
    assert_eq!(a.steps_resumed, 8);
    assert_eq!(a.steps_replayed, STEPS);
    let mut replayed = progress.replayed_steps.into_inner().unwrap();
    replayed.sort();
    assert_eq!(replayed, vec![9, 10, 11, 12, 13]);
}

/// Kills (a panic out of the worker, leaving the job `running` as a kill -9 does) after `every`
/// replayed steps, on the first `kills` attempts; lets the next attempt finish.
struct KillingRunner {
    /// The record attempt `n` is served: `sources[n]`, the last one from then on.
    sources: Vec<WithStates>,
    every: u64,
    kills: u64,
    attempts: AtomicU64,
}

struct CountThenKill<'a> {
    inner: &'a dyn Progress,
    left: AtomicU64,
}

impl Progress for CountThenKill<'_> {
    fn replayed(&self, step: u64, seconds: f64) {
        self.left.fetch_sub(1, Ordering::SeqCst);
        self.inner.replayed(step, seconds);
    }
    fn verified(&self, job_start: u64, through: u64) {
        self.inner.verified(job_start, through);
    }
    fn cancelled(&self) -> bool {
        self.left.load(Ordering::SeqCst) == 0
    }
    fn opened(&self, record: &RecordView<'_>) -> Result<Resume, AuditError> {
        self.inner.opened(record)
    }
    fn share(&self) -> Option<&dyn auditor::replay::Share> {
        self.inner.share()
    }
}

impl Runner for KillingRunner {
    fn run(&self, job: &Job, progress: &dyn Progress) -> Outcome {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
        let budget = if attempt < self.kills { self.every } else { u64::MAX };
        let opts = options(job, Profile::CpuSeq, None).unwrap();
        let p = CountThenKill { inner: progress, left: AtomicU64::new(budget) };
        let src = &self.sources[(attempt as usize).min(self.sources.len() - 1)];
        match audit(src, &opts, &p) {
            Ok(a) => Outcome::Decided(Decided {
                verdict: a.verdict.kind(),
                first_step: a.verdict.step(),
                steps_replayed: a.steps_replayed,
                steps_resumed: a.steps_resumed,
                bisection_queries: 0,
                report_json: "{}".into(),
                evidence: None,
            }),
            Err(AuditError::Cancelled) => panic!("killed"),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
    fn run_interval(&self, _job: &Job, interval: (u64, u64), _progress: &dyn Progress) -> ItemOutcome {
        // One daemon, and CountThenKill does not share: nothing publishes work items.
        panic!("no work item was published, yet {interval:?} was claimed")
    }
}

/// A store under `dir` with one audit queued, and a worker that audits it with `runner`.
fn killing_worker(dir: &std::path::Path, runner: KillingRunner) -> (Arc<SqliteStore>, Worker, String) {
    let config = WorkerConfig { attempts_max: 5, progress_interval_ms: 0, ..WorkerConfig::default() };
    worker_on(dir, runner, None, config)
}

/// [`killing_worker`] with the audit in `mode` and the worker's `config`.
fn worker_on(
    dir: &std::path::Path,
    runner: KillingRunner,
    mode: Option<&str>,
    config: WorkerConfig,
) -> (Arc<SqliteStore>, Worker, String) {
    let store = Arc::new(SqliteStore::open(&dir.join("state")).unwrap());
    let request = AuditRequest {
        trainer_url: "http://127.0.0.1:1".into(),
        run: "r".into(),
        mode: mode.map(String::from),
        ..Default::default()
    };
    let Inserted::New(id) = store.insert(&request, 10, 0).unwrap() else { panic!() };
    let worker = Worker {
        store: store.clone(),
        runner: Arc::new(runner),
        clock: Arc::new(SystemClock),
        observer: Arc::new(NoObserver),
        config,
        cancel: Arc::new(AtomicBool::new(false)),
    };
    (store, worker, id)
}

/// Issue 14: progress saved after a resume was keyed by the resume point and never found again,
/// so every kill went back to the first resume point, and six kills ended "gave up".
#[test]
fn five_kills_of_one_audit_resume_from_ever_later_points_and_it_ends_done() {
    let dir = scratch("resume-kills");
    let record = write_record(&dir, Profile::Cpu, SGD, Drill::default());
    let runner =
        KillingRunner { sources: vec![source(&record, false)], every: 2, kills: 5, attempts: AtomicU64::new(0) };
    let (store, worker, id) = killing_worker(&dir, runner);
    let mut points = Vec::new();
    for kill in 1..=5u64 {
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.work_one()));
        assert!(killed.is_err(), "attempt {kill} was killed");
        // The restart after a kill -9.
        assert_eq!(store.recover("local", 0).unwrap(), 1);
        let job = store.get(&id).unwrap().unwrap();
        assert_eq!(job.progress, BTreeMap::from([(0, 2 * kill)]), "kill {kill}: resume point");
        points.push(job.progress[&0]);
    }
    assert!(points.windows(2).all(|w| w[0] < w[1]), "monotone resume points: {points:?}");
    assert_eq!(worker.work_one(), Worked::Job { id: id.clone(), state: JobState::Done });
    let job = store.get(&id).unwrap().unwrap();
    assert_eq!(job.verdict, Some(auditor::VerdictKind::Consistent), "{job:?}");
    assert_eq!((job.steps_replayed, job.steps_resumed), (STEPS, 10));
}

/// A hostile record server serves an honest record until the audit has verified steps, then,
/// to the next attempt, another record (the same spec, its own signed manifest) that was
/// tampered with at step 3 and goes on honestly from there, with states that match its own
/// leaves. Progress verified against the first record must not count for the second: the
/// second attempt replays it all and finds step 3.
#[test]
fn progress_verified_against_one_record_does_not_count_for_another_served_later() {
    let dir = scratch("resume-swap");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 3 };
    let tampered =
        write_record(&dir.join("tampered"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() });
    let sources = vec![source(&honest, false), source(&tampered, false)];
    let runner = KillingRunner { sources, every: 10, kills: 1, attempts: AtomicU64::new(0) };
    let (store, worker, id) = killing_worker(&dir, runner);
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.work_one()));
    assert!(killed.is_err(), "the first attempt was killed");
    assert_eq!(store.recover("local", 0).unwrap(), 1);
    let job = store.get(&id).unwrap().unwrap();
    assert_eq!(job.progress, BTreeMap::from([(0, 10)]), "ten steps verified against the honest record");
    let bound = job.commitment.clone().expect("bound to the honest record");

    assert_eq!(worker.work_one(), Worked::Job { id: id.clone(), state: JobState::Done });
    let job = store.get(&id).unwrap().unwrap();
    assert_eq!((job.verdict, job.first_step), (Some(auditor::VerdictKind::Diverged), Some(3)), "{job:?}");
    assert_eq!(job.steps_resumed, 0, "nothing verified against the honest record was skipped");
    assert_ne!(job.commitment, Some(bound), "bound to the record it decided on");
}

/// A shared audit (as on a fleet's store) whose plan has more intervals than the work-item bound:
/// items are runs of consecutive intervals, each replayed job by job, and the verdict, the first
/// step and the steps checked are those of one process.
#[test]
fn a_shared_audit_with_more_intervals_than_items_is_decided_like_one_process() {
    for (name, fault) in [("honest", None), ("faulty", Some(Fault { kind: FaultKind::PerturbWeight, step: 7 }))] {
        let dir = scratch(&format!("shared-items-{name}"));
        let record = write_record(&dir, Profile::Cpu, SGD, Drill { fault, ..Drill::default() });
        let runner =
            KillingRunner { sources: vec![source(&record, false)], every: 0, kills: 0, attempts: AtomicU64::new(0) };
        let config = WorkerConfig { progress_interval_ms: 0, share: true, items_max: 2, ..WorkerConfig::default() };
        let (store, worker, id) = worker_on(&dir, runner, Some("intervals"), config);
        assert_eq!(worker.work_one(), Worked::Job { id: id.clone(), state: JobState::Done });
        let items: Vec<(u64, u64)> = store.items(&id).unwrap().iter().map(|i| (i.start, i.end)).collect();
        assert_eq!(items, [(0, 8), (8, STEPS)], "{name}: four intervals in two items");

        let mut opts = options(&store.get(&id).unwrap().unwrap(), Profile::CpuSeq, None).unwrap();
        opts.resume.clear();
        let local = audit(&LocalRecord::open(&record).unwrap(), &opts, &auditor::NoProgress).unwrap();
        let job = store.get(&id).unwrap().unwrap();
        assert_eq!((job.verdict, job.first_step), (Some(local.verdict.kind()), local.verdict.step()), "{name}");
        assert_eq!(job.steps_replayed, local.steps_replayed, "{name}");
        assert_eq!(local.steps_replayed, if fault.is_some() { 7 } else { STEPS }, "{name}");
    }
}
