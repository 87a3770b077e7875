//! Replay of a record segment on the auditor's profile, the three modes, the bisection
//! cross-check, and the assembly of an [`Audit`].
//!
//! A *job* replays `(start, end]` from the trainer's checkpoint at `start` (verified against
//! leaf `start`); a job starting at 0 also recomputes the initial state from the seed, so an
//! initialisation that does not follow the seed is a divergence at step 0. Within a job, step
//! `t` is checked in this order, which fixes what is reported when several things are wrong:
//! log and batch files (`commitment-invalid`), the step itself (`diverged` / `forged-log`), then
//! the checkpoint file at `t` if there is one (`commitment-invalid`). Across jobs the finding
//! with the smallest `(step, order)` wins, so full and interval-parallel replay agree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::codec::{Hash, to_hex};
use common::leaf::{BatchIndices, Leaf};
use common::merkle::{Bisection, BisectionOutcome, MerkleTree, leaf_hash, verify_inclusion};
use common::prng::Stream;
use common::rounding::RoundingError;
use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::data::Dataset;
use engine::record::{self, Manifest};
use engine::spec::RunSpec;
use engine::train::{Run, StepMode};
use kernels::{Device, Profile};
use rayon::prelude::*;

use crate::evidence::Evidence;
use crate::source::{LocalRecord, SourceError, TrainerSource, record_file};
use crate::{AuditError, Verdict};

/// How much of the segment is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every step, in one sequential pass from the checkpoint at or before the segment start.
    Full,
    /// Every checkpoint interval of the segment, each from its committed start, in parallel.
    Intervals,
    /// `count` checkpoint intervals of the segment, chosen by `pick`, in parallel.
    Spot { count: usize, pick: SpotPick },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Intervals => "intervals",
            Mode::Spot { .. } => "spot",
        }
    }
}

/// How spot mode picks its intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpotPick {
    /// A uniform draw without replacement from PRNG stream `audit/spot` keyed by `seed`.
    Random { seed: u64, chosen: SeedChoice },
    /// Proof-of-learning's rule: the intervals whose parameters changed most (L2 norm of the
    /// difference between the checkpoints at both ends). Intervals that do not end on a
    /// checkpoint cannot be ranked and come last.
    LargestUpdates,
}

/// How a spot seed was chosen (written into the report: a draw the trainer could predict is
/// worth less than one it could not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedChoice {
    /// Fresh randomness from the operating system, drawn by the auditor for this audit.
    Fresh,
    /// Passed by the user (`--spot-seed`, or `spot_seed` in a daemon request): reproducible,
    /// and predictable by whoever knew it in advance.
    Given,
}

impl SeedChoice {
    pub fn name(self) -> &'static str {
        match self {
            SeedChoice::Fresh => "fresh",
            SeedChoice::Given => "given",
        }
    }

    /// A seed from the operating system's randomness.
    pub fn fresh_seed() -> Result<u64, AuditError> {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).map_err(|e| AuditError::Internal(format!("drawing a spot seed: {e}")))?;
        Ok(u64::from_le_bytes(b))
    }
}

/// What to audit and how.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The auditor's device profile (normally not the trainer's).
    pub device: Profile,
    /// First step to check (0 = also check the initial state); default 0.
    pub from: Option<u64>,
    /// Last step to check; default the record's last step.
    pub to: Option<u64>,
    pub mode: Mode,
    /// `--data`: the dataset files, for specs that are not synthetic.
    pub data: Option<PathBuf>,
    /// Progress durable from an earlier attempt of this same audit: job start → the last step
    /// of that job already replayed and reproduced (as reported through
    /// [`Progress::verified`]). Those steps are not replayed again: the job continues from the
    /// trainer's state at that step ([`TrainerSource::state`], checked against its leaf), or
    /// from the job's start when the source cannot hand that state out.
    pub resume: BTreeMap<u64, u64>,
    /// The trainer's ed25519 public key (hex), when the auditor pins it (`--trainer-pubkey`): a
    /// record not signed by this key is `commitment-invalid`.
    pub trainer_key: Option<String>,
}

impl AuditOptions {
    pub fn new(device: Profile) -> Self {
        AuditOptions {
            device,
            from: None,
            to: None,
            mode: Mode::Full,
            data: None,
            resume: BTreeMap::new(),
            trainer_key: None,
        }
    }
}

/// Receives progress while replaying (the CLI draws a bar; the daemon exports metrics and
/// persists the verified points so that a restarted audit resumes from them).
///
/// Called from the replay workers, possibly several at once (interval-parallel replay).
pub trait Progress: Sync {
    /// Replay is about to run `steps_total` steps (not counting resumed ones).
    fn begin(&self, _steps_total: u64) {}
    /// Step `step` was replayed, in `seconds` of wall-clock time (whatever it found).
    fn replayed(&self, _step: u64, _seconds: f64) {}
    /// Every step of the job starting at `job_start` up to `through` is replayed and
    /// reproduced the trainer's leaf, and the checkpoint at `through` (if any) checked out: a
    /// point to resume from ([`AuditOptions::resume`]).
    fn verified(&self, _job_start: u64, _through: u64) {}
    /// Asked before every step: `true` stops the audit with [`AuditError::Cancelled`], leaving
    /// the progress reported so far valid.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Ignores progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// What the trainer committed to, as checked by the auditor.
#[derive(Debug, Clone)]
pub struct Commitment {
    pub spec_bytes: Vec<u8>,
    pub spec_hash: Hash,
    pub trainer_device: String,
    /// The root the verdict is relative to: the signed manifest's, or (unfinished run) the
    /// root over the committed leaves.
    pub root: Hash,
    pub n_leaves: u64,
    pub manifest: Option<Manifest>,
}

/// The bisection that cross-checked the step-by-step comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BisectionSummary {
    pub queries: u32,
    /// ⌈log₂ n⌉ + 1.
    pub query_limit: u32,
    pub first_differing_leaf: Option<u64>,
}

/// A leaf with its inclusion proof against the trainer's root.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvenLeaf {
    pub leaf: Leaf,
    pub proof: Vec<Hash>,
}

/// Details at the step of a `diverged` or `forged-log` verdict.
#[derive(Debug, Clone)]
pub struct StepDetail {
    pub step: u64,
    pub trainer: ProvenLeaf,
    pub auditor_leaf: Leaf,
    /// Leaf `step − 1`, agreed by both sides (absent at step 0).
    pub previous: Option<ProvenLeaf>,
    /// The batch the trainer committed for the step.
    pub trainer_batch: BatchIndices,
    /// The batch the seed dictates.
    pub auditor_batch: BatchIndices,
    /// Every log entry that did not hold up at this step.
    pub forged: Vec<String>,
}

/// Wall-clock timings in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub open_ms: u64,
    pub replay_ms: u64,
    pub bisection_ms: u64,
    pub total_ms: u64,
}

/// A finished audit: the verdict and everything a report and an evidence bundle need.
#[derive(Debug, Clone)]
pub struct Audit {
    pub verdict: Verdict,
    pub source: String,
    pub auditor_device: Profile,
    /// `None` when the record could not even be opened.
    pub commitment: Option<Commitment>,
    pub mode: Mode,
    /// The segment `[from, to]` asked for.
    pub segment: Option<(u64, u64)>,
    /// The jobs replayed, as `(start checkpoint, end)`.
    pub intervals: Vec<(u64, u64)>,
    /// Steps checked: replayed in this attempt, plus those resumed from an earlier one.
    pub steps_replayed: u64,
    /// Of `steps_replayed`, the steps verified by an earlier attempt and not replayed again.
    pub steps_resumed: u64,
    pub bisection: Option<BisectionSummary>,
    pub detail: Option<StepDetail>,
    pub evidence: Option<Evidence>,
    pub timings: Timings,
}

impl Audit {
    /// An audit of `source` before anything was checked, with `verdict`.
    fn nothing_checked(verdict: Verdict, source: String, opts: &AuditOptions) -> Audit {
        Audit {
            verdict,
            source,
            auditor_device: opts.device,
            commitment: None,
            mode: opts.mode,
            segment: None,
            intervals: Vec::new(),
            steps_replayed: 0,
            steps_resumed: 0,
            bisection: None,
            detail: None,
            evidence: None,
            timings: Timings::default(),
        }
    }
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Opens a record directory and audits it. A record that does not open because it fails its
/// commitments gives a `commitment-invalid` verdict, not an error.
pub fn audit_dir(dir: &Path, opts: &AuditOptions, progress: &dyn Progress) -> Result<Audit, AuditError> {
    let t0 = Instant::now();
    match LocalRecord::open(dir) {
        Ok(src) => {
            let opened_ms = ms(t0);
            let mut a = audit(&src, opts, progress)?;
            a.timings.open_ms += opened_ms;
            a.timings.total_ms = ms(t0);
            Ok(a)
        }
        Err(SourceError::Unavailable(e)) => Err(AuditError::Source(e)),
        Err(e) => Ok(Audit {
            timings: Timings { open_ms: ms(t0), total_ms: ms(t0), ..Timings::default() },
            ..Audit::nothing_checked(verdict_of_source(e), dir.display().to_string(), opts)
        }),
    }
}

fn verdict_of_source(e: SourceError) -> Verdict {
    match e {
        SourceError::Invalid { file, offset, what } => Verdict::CommitmentInvalid { what, file: Some(file), offset },
        SourceError::Unresponsive { what } => Verdict::TrainerUnresponsive { what },
        SourceError::Unavailable(what) => Verdict::CommitmentInvalid { what, file: None, offset: None },
    }
}

/// A verdict reached before any replay: `Ok(Err(verdict))`; could not decide: `Err`.
type Checked<T> = Result<Result<T, Verdict>, AuditError>;

fn source_step<T>(r: Result<T, SourceError>) -> Checked<T> {
    match r {
        Ok(x) => Ok(Ok(x)),
        Err(SourceError::Unavailable(e)) => Err(AuditError::Source(e)),
        Err(e) => Ok(Err(verdict_of_source(e))),
    }
}

fn invalid(file: &str, offset: Option<u64>, what: impl Into<String>) -> Verdict {
    Verdict::CommitmentInvalid { what: what.into(), file: Some(file.to_string()), offset }
}

/// Checks the spec, manifest and leaves the trainer side hands out against each other.
fn check_commitment(src: &dyn TrainerSource) -> Checked<(Commitment, RunSpec, Vec<Leaf>, MerkleTree)> {
    let spec_bytes = match source_step(src.spec_bytes())? {
        Ok(b) => b,
        Err(v) => return Ok(Err(v)),
    };
    let spec: RunSpec = match serde_json::from_slice(&spec_bytes) {
        Ok(s) => s,
        Err(e) => return Ok(Err(invalid(record::SPEC_FILE, None, format!("not a run spec: {e}")))),
    };
    if spec.canonical_json() != spec_bytes {
        return Ok(Err(invalid(record::SPEC_FILE, None, "not in canonical form")));
    }
    let spec_hash = common::codec::sha256(&spec_bytes);
    let manifest = match source_step(src.manifest())? {
        Ok(m) => m,
        Err(v) => return Ok(Err(v)),
    };
    let leaves = match source_step(src.leaves())? {
        Ok(l) => l,
        Err(v) => return Ok(Err(v)),
    };
    if leaves.is_empty() {
        return Ok(Err(invalid(record::LEAVES_FILE, Some(0), "no initial leaf")));
    }
    if let Some(i) = leaves.iter().enumerate().position(|(i, l)| l.step != i as u64) {
        return Ok(Err(invalid(
            record::LEAVES_FILE,
            Some((i * common::leaf::LEAF_BYTES) as u64 + 5),
            format!("leaf {i} claims step {}", leaves[i].step),
        )));
    }
    let tree = MerkleTree::from_leaf_hashes(leaves.iter().map(|l| leaf_hash(&l.encode())));
    let root = match &manifest {
        Some(m) => {
            if let Err(what) = m.verify_signature() {
                return Ok(Err(invalid(record::MANIFEST_FILE, None, what)));
            }
            if m.spec_hash != to_hex(&spec_hash) {
                return Ok(Err(invalid(
                    record::MANIFEST_FILE,
                    None,
                    format!("spec hash {} does not match spec.json's {}", m.spec_hash, to_hex(&spec_hash)),
                )));
            }
            if m.n_steps + 1 != tree.len() {
                return Ok(Err(invalid(
                    record::LEAVES_FILE,
                    None,
                    format!("{} leaves, the manifest commits to {}", tree.len(), m.n_steps + 1),
                )));
            }
            if m.root != to_hex(&tree.root()) {
                return Ok(Err(invalid(
                    record::LEAVES_FILE,
                    None,
                    format!("root over the leaves {} is not the manifest's {}", to_hex(&tree.root()), m.root),
                )));
            }
            tree.root()
        }
        None => tree.root(),
    };
    let commitment = Commitment {
        spec_bytes,
        spec_hash,
        trainer_device: spec.device_profile.clone(),
        root,
        n_leaves: tree.len(),
        manifest,
    };
    Ok(Ok((commitment, spec, leaves, tree)))
}

/// Loads the dataset a spec names and builds a run on `device`; the data must match the
/// spec's commitment.
pub fn build_run(spec: &RunSpec, data: Option<&Path>, device: Profile) -> Result<Run, AuditError> {
    let dataset = Dataset::for_config(&spec.config, data)?;
    let dev = Device::new(device).map_err(|e| AuditError::Usage(e.to_string()))?;
    Ok(Run::new(spec.clone(), dataset, dev)?)
}

/// One unit of replay: steps `start+1 ..= end` from the checkpoint at `start`.
#[derive(Debug, Clone, Copy)]
struct Job {
    start: u64,
    end: u64,
}

impl Job {
    /// Where an earlier attempt's verified point lets this job continue: a step in
    /// `(start, end]`, or `None` when there is none past the start.
    fn resume_point(&self, resume: &BTreeMap<u64, u64>) -> Option<u64> {
        resume.get(&self.start).filter(|&&t| t > self.start).map(|&t| t.min(self.end))
    }
}

/// Something found at a step; ordered by `(step, order)`.
#[derive(Debug)]
struct Finding {
    step: u64,
    /// 0: the step's log or batch file; 1: the step itself; 2: the checkpoint after the step.
    order: u8,
    kind: FindingKind,
}

#[derive(Debug)]
enum FindingKind {
    Source(SourceError),
    Step(Box<StepFinding>),
}

#[derive(Debug)]
struct StepFinding {
    own_leaf: Leaf,
    /// The state after step − 1 (agreed: its leaf matched, or it is a verified checkpoint).
    prev: Option<TrainingState>,
    log: TieBreakLog,
    trainer_batch: BatchIndices,
    own_batch: BatchIndices,
    forged: Vec<RoundingError>,
    diverged: bool,
}

#[derive(Debug, Default)]
struct JobOutcome {
    own: Vec<Leaf>,
    finding: Option<Finding>,
    steps: u64,
    /// Steps verified by an earlier attempt and skipped.
    resumed: u64,
}

struct Replayer<'a> {
    src: &'a dyn TrainerSource,
    run: &'a Run,
    leaves: &'a [Leaf],
    checkpoints: &'a BTreeSet<u64>,
    /// Smallest step with a finding so far (jobs past it stop early).
    earliest: &'a AtomicU64,
    progress: &'a dyn Progress,
    resume: &'a BTreeMap<u64, u64>,
}

impl Replayer<'_> {
    fn note(&self, out: &mut JobOutcome, f: Finding) {
        self.earliest.fetch_min(f.step, Ordering::Relaxed);
        out.finding = Some(f);
    }

    /// A source error at `(step, order)`: a finding, or (auditor-side failure) an error.
    fn source_finding(&self, out: &mut JobOutcome, step: u64, order: u8, e: SourceError) -> Result<(), AuditError> {
        if let SourceError::Unavailable(e) = e {
            return Err(AuditError::Source(e));
        }
        self.note(out, Finding { step, order, kind: FindingKind::Source(e) });
        Ok(())
    }

    // The three checks below are repeated here so that no source implementation has to be
    // trusted.
    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError> {
        let state = self.src.checkpoint(step)?;
        let (committed, found) = (&self.leaves[step as usize].state, state.digest());
        if found != *committed || state.step != step {
            return Err(mismatch(record::checkpoint_path, "state", step, committed, &found));
        }
        Ok(state)
    }

    /// The trainer's state after `step`, if the source hands it out and it matches the leaf
    /// (which the auditor reproduced in an earlier attempt). `None`: replay from the job start.
    fn resumed_state(&self, step: u64) -> Option<TrainingState> {
        let state = self.src.state(step).ok()?;
        (state.step == step && state.digest() == self.leaves[step as usize].state).then_some(state)
    }

    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError> {
        let log = self.src.log(step)?;
        let (committed, found) = (&self.leaves[step as usize].log, log.digest());
        if found != *committed {
            return Err(mismatch(record::log_path, "log", step, committed, &found));
        }
        Ok(log)
    }

    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError> {
        let batch = self.src.batch(step)?;
        let (committed, found) = (&self.leaves[step as usize].batch, batch.digest());
        if found != *committed {
            return Err(mismatch(record::batch_path, "batch", step, committed, &found));
        }
        Ok(batch)
    }

    fn replay(&self, job: Job) -> Result<JobOutcome, AuditError> {
        let mut out = JobOutcome::default();
        if self.earliest.load(Ordering::Relaxed) < job.start {
            return Ok(out);
        }
        // Resume after the last point an earlier attempt verified, when the trainer's state
        // there is available; the skipped steps count as reproduced with the trainer's leaves.
        if let Some(through) = job.resume_point(self.resume) {
            let resumed = if through == job.end { Some(None) } else { self.resumed_state(through).map(Some) };
            if let Some(state) = resumed {
                out.own.extend_from_slice(&self.leaves[job.start as usize..=through as usize]);
                out.resumed = through - job.start;
                return match state {
                    None => Ok(out),
                    Some(state) => self.replay_from(Job { start: through, end: job.end }, state, out),
                };
            }
        }
        let state = if job.start == 0 {
            // The initial state must follow the seed.
            let init = self.run.initial_state()?;
            let own = Leaf::initial(init.digest());
            out.own.push(own);
            if own != self.leaves[0] {
                self.note(
                    &mut out,
                    Finding {
                        step: 0,
                        order: 1,
                        kind: FindingKind::Step(Box::new(StepFinding {
                            own_leaf: own,
                            prev: None,
                            log: TieBreakLog::default(),
                            trainer_batch: BatchIndices::default(),
                            own_batch: BatchIndices::default(),
                            forged: Vec::new(),
                            diverged: true,
                        })),
                    },
                );
                return Ok(out);
            }
            if let Err(e) = self.checkpoint(0) {
                self.source_finding(&mut out, 0, 2, e)?;
                return Ok(out);
            }
            init
        } else {
            match self.checkpoint(job.start) {
                Ok(s) => s,
                Err(e) => {
                    self.source_finding(&mut out, job.start, 2, e)?;
                    return Ok(out);
                }
            }
        };
        self.replay_from(job, state, out)
    }

    /// Replays `(job.start, job.end]` from `state`, the agreed state after `job.start`.
    fn replay_from(&self, job: Job, mut state: TrainingState, mut out: JobOutcome) -> Result<JobOutcome, AuditError> {
        for t in job.start + 1..=job.end {
            if self.earliest.load(Ordering::Relaxed) < t {
                break;
            }
            if self.progress.cancelled() {
                return Err(AuditError::Cancelled);
            }
            let (log, trainer_batch) = match self.log(t).and_then(|l| Ok((l, self.batch(t)?))) {
                Ok(x) => x,
                Err(e) => {
                    self.source_finding(&mut out, t, 0, e)?;
                    return Ok(out);
                }
            };
            let t_step = Instant::now();
            let step = self.run.step(&state, t, StepMode::Replay(&log), None)?;
            out.steps += 1;
            self.progress.replayed(t, t_step.elapsed().as_secs_f64());
            let own = Leaf { step: t, state: step.state.digest(), log: log.digest(), batch: step.batch.digest() };
            out.own.push(own);
            let diverged = own != self.leaves[t as usize];
            if diverged || !step.forged.is_empty() {
                let finding = StepFinding {
                    own_leaf: own,
                    prev: Some(state),
                    log,
                    trainer_batch,
                    own_batch: step.batch,
                    forged: step.forged,
                    diverged,
                };
                self.note(&mut out, Finding { step: t, order: 1, kind: FindingKind::Step(Box::new(finding)) });
                return Ok(out);
            }
            if self.checkpoints.contains(&t)
                && let Err(e) = self.checkpoint(t)
            {
                self.source_finding(&mut out, t, 2, e)?;
                return Ok(out);
            }
            self.progress.verified(job.start, t);
            state = step.state;
        }
        Ok(out)
    }
}

/// A piece handed out for step `step` whose hash is not the leaf's: both full digests.
fn mismatch(file: fn(&Path, u64) -> PathBuf, what: &str, step: u64, committed: &Hash, found: &Hash) -> SourceError {
    SourceError::Invalid {
        file: record_file(file, step),
        offset: None,
        what: format!(
            "{what} hash of step {step} does not match its commitment: expected {}, found {}",
            to_hex(committed),
            to_hex(found)
        ),
    }
}

/// The jobs of a segment: `(c_i, min(c_{i+1}, to)]` for the checkpoints `c_i` from the one at
/// or before `from − 1` up to `to`.
fn intervals(checkpoints: &BTreeSet<u64>, from: u64, to: u64) -> Vec<Job> {
    let first = from.saturating_sub(1);
    let c0 = checkpoints.range(..=first).next_back().copied().unwrap_or(0);
    let mut jobs = Vec::new();
    let mut start = c0;
    loop {
        let end = checkpoints.range(start + 1..).next().copied().unwrap_or(to).min(to);
        jobs.push(Job { start, end });
        if end >= to {
            break;
        }
        start = end;
    }
    jobs
}

/// L2 norm of the parameter change between two states (parameters only, as proof-of-learning).
fn update_norm(a: &TrainingState, b: &TrainingState) -> f64 {
    let mut sum = 0.0f64;
    for (name, ta) in a.tensors().filter(|(n, _)| n.starts_with("param/")) {
        if let Some(tb) = b.get(name) {
            for (x, y) in ta.data.iter().zip(&tb.data) {
                let d = f64::from(*y) - f64::from(*x);
                sum += d * d;
            }
        }
    }
    sum.sqrt()
}

/// Audits the record behind `src` on `opts.device`.
pub fn audit(src: &dyn TrainerSource, opts: &AuditOptions, progress: &dyn Progress) -> Result<Audit, AuditError> {
    let t0 = Instant::now();
    let mut audit = Audit::nothing_checked(Verdict::Consistent, src.describe(), opts);
    let finish = |mut a: Audit, verdict: Verdict| {
        a.verdict = verdict;
        a.timings.total_ms = ms(t0);
        a
    };
    let (commitment, spec, leaves, _trainer_tree) = match check_commitment(src)? {
        Ok(x) => x,
        Err(v) => return Ok(finish(audit, v)),
    };
    let n_steps = commitment.n_leaves - 1;
    audit.commitment = Some(commitment.clone());
    let from = opts.from.unwrap_or(0);
    let to = opts.to.unwrap_or(n_steps);
    if from > to || to > n_steps {
        return Err(AuditError::Usage(format!(
            "segment [{from}, {to}] is not within the record's steps [0, {n_steps}]"
        )));
    }
    audit.segment = Some((from, to));
    let checkpoints: BTreeSet<u64> = match source_step(src.checkpoint_steps())? {
        Ok(c) => c.into_iter().filter(|&c| c <= n_steps).collect(),
        Err(v) => return Ok(finish(audit, v)),
    };
    if !checkpoints.contains(&0) {
        return Ok(finish(audit, invalid("checkpoints", None, "no checkpoint of the initial state (step 0)")));
    }
    let run = build_run(&spec, opts.data.as_deref(), opts.device)?;
    audit.timings.open_ms = ms(t0);

    let t_replay = Instant::now();
    let earliest = AtomicU64::new(u64::MAX);
    let replayer = Replayer {
        src,
        run: &run,
        leaves: &leaves,
        checkpoints: &checkpoints,
        earliest: &earliest,
        progress,
        resume: &opts.resume,
    };
    let all = intervals(&checkpoints, from, to);
    let jobs: Vec<Job> = match opts.mode {
        Mode::Full => vec![Job { start: all[0].start, end: to }],
        Mode::Intervals => all,
        Mode::Spot { count, pick } => {
            let mut order: Vec<usize> = (0..all.len()).collect();
            match pick {
                SpotPick::Random { seed, .. } => Stream::new(seed, "audit/spot", 0, 0).shuffle(&mut order),
                SpotPick::LargestUpdates => {
                    let mut norms: BTreeMap<usize, f64> = BTreeMap::new();
                    let mut prev: Option<(u64, TrainingState)> = None;
                    for (i, job) in all.iter().enumerate() {
                        if !checkpoints.contains(&job.end) {
                            continue;
                        }
                        let a = match &prev {
                            Some((s, st)) if *s == job.start => st.clone(),
                            _ => match replayer.checkpoint(job.start) {
                                Ok(s) => s,
                                Err(e) => return Ok(finish(audit, verdict_of_source(e))),
                            },
                        };
                        let b = match replayer.checkpoint(job.end) {
                            Ok(s) => s,
                            Err(e) => return Ok(finish(audit, verdict_of_source(e))),
                        };
                        norms.insert(i, update_norm(&a, &b));
                        prev = Some((job.end, b));
                    }
                    // Largest first; unranked last; ties by position, so the choice is stable.
                    order.sort_by(|&x, &y| {
                        let nx = norms.get(&x).copied().unwrap_or(-1.0);
                        let ny = norms.get(&y).copied().unwrap_or(-1.0);
                        ny.total_cmp(&nx).then(x.cmp(&y))
                    });
                }
            }
            let mut picked: Vec<Job> = order.into_iter().take(count.max(1)).map(|i| all[i]).collect();
            picked.sort_by_key(|j| j.start);
            picked
        }
    };
    audit.intervals = jobs.iter().map(|j| (j.start, j.end)).collect();
    let resumed: u64 = jobs.iter().map(|j| j.resume_point(&opts.resume).map_or(0, |t| t - j.start)).sum();
    progress.begin(jobs.iter().map(|j| j.end - j.start).sum::<u64>() - resumed);
    let outcomes: Vec<Result<JobOutcome, AuditError>> = if jobs.len() == 1 {
        vec![replayer.replay(jobs[0])]
    } else {
        jobs.par_iter().map(|&j| replayer.replay(j)).collect()
    };
    let mut finding: Option<Finding> = None;
    let mut own: BTreeMap<u64, Leaf> = BTreeMap::new();
    for o in outcomes {
        let o = o?;
        audit.steps_replayed += o.steps + o.resumed;
        audit.steps_resumed += o.resumed;
        own.extend(o.own.into_iter().map(|l| (l.step, l)));
        if let Some(f) = o.finding
            && finding.as_ref().is_none_or(|g| (f.step, f.order) < (g.step, g.order))
        {
            finding = Some(f);
        }
    }
    audit.timings.replay_ms = ms(t_replay);

    // Bisection over the auditor's tree: its own leaves where it replayed (up to the first
    // finding), the trainer's elsewhere.
    let t_bisect = Instant::now();
    let last = finding.as_ref().map_or(u64::MAX, |f| f.step);
    let own_tree = MerkleTree::from_leaf_hashes(leaves.iter().map(|l| {
        let leaf = if l.step <= last { own.get(&l.step).unwrap_or(l) } else { l };
        leaf_hash(&leaf.encode())
    }));
    let size = commitment.n_leaves;
    let mut bisection = Bisection::new(&own_tree, size, commitment.root)
        .map_err(|e| AuditError::Internal(format!("bisection could not start: {e}")))?;
    while let Some((lo, hi)) = bisection.next_query() {
        let (l, r) = match source_step(src.child_hashes(lo, hi, size))? {
            Ok(x) => x,
            Err(v) => return Ok(finish(audit, v)),
        };
        if let Err(e) = bisection.answer(l, r) {
            return Ok(finish(audit, invalid(record::LEAVES_FILE, None, format!("bisection answer: {e}"))));
        }
    }
    let limit = Bisection::query_limit(size);
    if bisection.queries() > limit {
        return Err(AuditError::Internal(format!("bisection took {} queries, more than {limit}", bisection.queries())));
    }
    let located = match bisection.outcome() {
        Some(BisectionOutcome::Diverged { first_differing_leaf, .. }) => Some(first_differing_leaf),
        _ => None,
    };
    audit.bisection =
        Some(BisectionSummary { queries: bisection.queries(), query_limit: limit, first_differing_leaf: located });
    audit.timings.bisection_ms = ms(t_bisect);
    let expected = match &finding {
        Some(Finding { step, kind: FindingKind::Step(s), .. }) if s.diverged => Some(*step),
        _ => None,
    };
    if located != expected {
        return Err(AuditError::Internal(format!(
            "bisection located leaf {located:?} but the step-by-step comparison found {expected:?}"
        )));
    }

    let Some(finding) = finding else {
        return Ok(finish(audit, Verdict::Consistent));
    };
    let s = finding.step;
    let sf = match finding.kind {
        FindingKind::Source(e) => return Ok(finish(audit, verdict_of_source(e))),
        FindingKind::Step(sf) => sf,
    };
    let verdict = if sf.diverged {
        Verdict::Diverged {
            step: s,
            site: sf.forged.iter().find_map(forged_site),
            differs: [
                ("state", sf.own_leaf.state != leaves[s as usize].state),
                ("batch", sf.own_leaf.batch != leaves[s as usize].batch),
            ]
            .into_iter()
            .filter_map(|(n, d)| d.then_some(n))
            .collect(),
        }
    } else {
        forged_verdict(s, &sf.forged)
    };
    // Proofs for leaves s−1 and s, from the trainer side and checked against its root.
    let proven = |i: u64| -> Checked<ProvenLeaf> {
        let proof = match source_step(src.inclusion_proof(i, size))? {
            Ok(p) => p,
            Err(v) => return Ok(Err(v)),
        };
        let leaf = leaves[i as usize];
        if let Err(e) = verify_inclusion(&leaf_hash(&leaf.encode()), i, size, &proof, &commitment.root) {
            return Ok(Err(invalid(record::LEAVES_FILE, None, format!("inclusion proof of leaf {i}: {e}"))));
        }
        Ok(Ok(ProvenLeaf { leaf, proof }))
    };
    let trainer = match proven(s)? {
        Ok(p) => p,
        Err(v) => return Ok(finish(audit, v)),
    };
    let previous = if s == 0 {
        None
    } else {
        match proven(s - 1)? {
            Ok(p) => Some(p),
            Err(v) => return Ok(finish(audit, v)),
        }
    };
    audit.detail = Some(StepDetail {
        step: s,
        trainer: trainer.clone(),
        auditor_leaf: sf.own_leaf,
        previous: previous.clone(),
        trainer_batch: sf.trainer_batch.clone(),
        auditor_batch: sf.own_batch.clone(),
        forged: sf.forged.iter().map(|e| e.to_string()).collect(),
    });
    audit.evidence = Some(Evidence {
        verdict_kind: verdict.kind().to_string(),
        step: s,
        spec_json: commitment.spec_bytes.clone(),
        manifest_json: commitment
            .manifest
            .as_ref()
            .map(|m| serde_json::to_vec(m).expect("manifest serialises"))
            .unwrap_or_default(),
        root: commitment.root,
        n_leaves: size,
        trainer: trainer.clone(),
        auditor_leaf: sf.own_leaf,
        auditor_device: opts.device.name().to_string(),
        previous,
        prev_state: sf.prev.as_ref().map(|s| s.encode()).unwrap_or_default(),
        trainer_batch: sf.trainer_batch,
        trainer_log: sf.log,
    });
    Ok(finish(audit, verdict))
}

fn forged_site(e: &RoundingError) -> Option<String> {
    match e {
        RoundingError::ForgedEntry { site, .. }
        | RoundingError::UnusedSite { site }
        | RoundingError::LengthMismatch { site, .. } => Some(site.clone()),
        _ => None,
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The `forged-log` verdict from the forged entries at a step: the first `ForgedEntry` if there
/// is one, else the first other finding (a site never rounded, or a log of the wrong length).
fn forged_verdict(step: u64, forged: &[RoundingError]) -> Verdict {
    let first = forged.iter().find(|e| matches!(e, RoundingError::ForgedEntry { .. })).or(forged.first());
    match first {
        Some(RoundingError::ForgedEntry { site, index, value, midpoint, bound, .. }) => Verdict::ForgedLog {
            step,
            site: site.clone(),
            index: Some(*index),
            value: finite(*value),
            midpoint: finite(*midpoint),
            bound: finite(*bound),
            detail: first.map(|e| e.to_string()).unwrap_or_default(),
        },
        Some(other) => Verdict::ForgedLog {
            step,
            site: forged_site(other).unwrap_or_default(),
            index: None,
            value: None,
            midpoint: None,
            bound: None,
            detail: other.to_string(),
        },
        None => unreachable_forged(step),
    }
}

fn unreachable_forged(step: u64) -> Verdict {
    // Only called with a non-empty list; keep a total function rather than panic.
    Verdict::ForgedLog {
        step,
        site: String::new(),
        index: None,
        value: None,
        midpoint: None,
        bound: None,
        detail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_the_segment_from_the_checkpoint_before_it() {
        let c: BTreeSet<u64> = [0, 4, 8, 12, 13].into();
        let j = |v: Vec<Job>| v.into_iter().map(|j| (j.start, j.end)).collect::<Vec<_>>();
        assert_eq!(j(intervals(&c, 0, 13)), vec![(0, 4), (4, 8), (8, 12), (12, 13)]);
        assert_eq!(j(intervals(&c, 1, 13)), vec![(0, 4), (4, 8), (8, 12), (12, 13)]);
        assert_eq!(j(intervals(&c, 5, 6)), vec![(4, 6)]);
        assert_eq!(j(intervals(&c, 4, 4)), vec![(0, 4)]);
        assert_eq!(j(intervals(&c, 9, 12)), vec![(8, 12)]);
        assert_eq!(j(intervals(&c, 13, 13)), vec![(12, 13)]);
        assert_eq!(j(intervals(&c, 0, 0)), vec![(0, 0)]);
    }
}
