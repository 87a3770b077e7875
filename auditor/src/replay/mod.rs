//! The audit of a record segment, as a pipeline of typed phases:
//!
//! 1. **commitment** ([`commit`]): the spec (parsed, canonical, every field in range), the
//!    signed manifest (signature, and every field equal to the spec's), the leaves and their
//!    root, the pinned trainer key, and the checkpoint list the interval commits to;
//! 2. **plan** ([`plan`]): the segment and the jobs `(checkpoint c, end e]` of the mode;
//! 3. **replay** ([`job`]): every job on the auditor's profile, each ending at its first
//!    finding;
//! 4. **merge** ([`job::merge`]): every job's outcome, *before* anything propagates, keeping
//!    the earliest by `(step, order)` whether it is a finding or the auditor's own failure;
//! 5. **bisection** and 6. **evidence** ([`conclude`]).
//!
//! Each phase returns `Result<T, Stop>`: [`Stop::Verdict`] when something the trainer signed,
//! committed, served or withheld is wrong (a finding against it, naming the file or request),
//! [`Stop::Undecided`] only for the auditor's own trouble (its disk, its copy of the data, a
//! usage error, its network before the trainer answered anything).
//!
//! Within a job, step `t` is checked in a fixed order, which decides what is reported when
//! several things are wrong at one step ([`job::Order`]): the checkpoint at `t` if `t` has one
//! (its hash, step and structure), then the log and batch files of `t`, then the step itself
//! (`diverged` / `forged-log`). A job starting at checkpoint `c` checks only the first of these
//! at `c`, and a job ending at `c` checks all three, so the earliest finding is the same
//! whichever jobs cover it: the verdict does not depend on the mode, the thread count, or the
//! order in which parallel jobs finish.

mod commit;
mod conclude;
mod job;
mod open;
mod plan;
mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::codec::Hash;
use common::leaf::{BatchIndices, Leaf};
use common::merkle::ProvenLeaf;
use engine::record::Manifest;
use engine::spec::RunSpec;
use kernels::Profile;

pub use open::{Opened, RecordView, Resume};
use shared::replay_taken;
pub use shared::{ITEMS_MAX, Share, Taken, replay_interval, share_intervals, work_items};

use crate::source::{LocalRecord, SourceError, TrainerSource};
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
    /// checkpoint cannot be ranked and come last; an interval whose end checkpoint does not
    /// hold up comes first (replaying it reports the finding where it belongs).
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

/// Chooses the dataset of a verified spec: `Ok(None)` when it needs none, `Err` saying why the
/// auditor has none that is the run's (the audit then cannot decide).
#[derive(Clone)]
pub struct ChooseData(pub Arc<DataChooser>);

/// The function inside [`ChooseData`].
pub type DataChooser = dyn Fn(&RunSpec) -> Result<Option<PathBuf>, String> + Send + Sync;

impl std::fmt::Debug for ChooseData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChooseData(..)")
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
    /// Without `data`: chooses the dataset once the spec has checked out (the daemon: whichever
    /// of its datasets is the run's).
    pub choose_data: Option<ChooseData>,
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
            choose_data: None,
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
    /// A fleet to share the replay with: `None` (the default) replays every interval here.
    fn share(&self) -> Option<&dyn Share> {
        None
    }
    /// The record this attempt opened, before anything is replayed: whether the progress it
    /// resumes from ([`AuditOptions::resume`], and a fleet's durable points) was verified
    /// against this record ([`Resume::Keep`], the default) or another one ([`Resume::Discard`]:
    /// everything is replayed). `Err` stops the attempt. A wrapper must pass this on.
    fn opened(&self, _record: &RecordView<'_>) -> Result<Resume, AuditError> {
        Ok(Resume::Keep)
    }
    /// Called about every second while the attempt waits on something slow (a trainer's
    /// answer): the daemon renews its lease here, so a slow trainer does not make the audit
    /// look abandoned. A wrapper must pass this on.
    fn heartbeat(&self) {}
}

/// Ignores progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Why a phase stopped the audit before it concluded.
#[derive(Debug)]
pub enum Stop {
    /// A verdict: something the trainer signed, committed, served or withheld is wrong.
    Verdict(Verdict),
    /// The auditor could not decide, for reasons of its own.
    Undecided(AuditError),
}

impl From<AuditError> for Stop {
    fn from(e: AuditError) -> Stop {
        Stop::Undecided(e)
    }
}

impl From<Verdict> for Stop {
    fn from(v: Verdict) -> Stop {
        Stop::Verdict(v)
    }
}

/// Whether the trainer has committed (spec, manifest and leaves handed out) when a source
/// error happens: afterwards, a refusal is the trainer withholding what it committed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing answered yet: a trainer that does not answer may be the auditor's network.
    FirstContact,
    /// The trainer answered (its spec), but has not committed everything yet.
    Committing,
    Committed,
}

/// What a source error means for the audit at `phase`.
pub(crate) fn source_stop(e: SourceError, phase: Phase) -> Stop {
    match (e, phase) {
        (SourceError::Invalid { file, offset, what }, _) => {
            Stop::Verdict(Verdict::CommitmentInvalid { what, file: Some(file), offset })
        }
        (SourceError::Refused { file, what }, Phase::Committed) => Stop::Verdict(Verdict::CommitmentInvalid {
            what: format!("withheld after the run was committed: {what}"),
            file: Some(file),
            offset: None,
        }),
        // The server answered the spec, so the auditor's address and token work: refusing the
        // manifest or the leaves next is the trainer withholding them, not the auditor's trouble
        // (and not a way out of a verdict).
        (SourceError::Refused { file, what }, Phase::Committing) => Stop::Verdict(Verdict::CommitmentInvalid {
            what: format!("withheld after the trainer's server served its spec: {what}"),
            file: Some(file),
            offset: None,
        }),
        (e @ SourceError::Refused { .. }, _) => Stop::Undecided(AuditError::Source(e.to_string())),
        (e @ SourceError::Unresponsive { .. }, Phase::FirstContact) => {
            Stop::Undecided(AuditError::Source(e.to_string()))
        }
        (SourceError::Unresponsive { what }, _) => Stop::Verdict(Verdict::TrainerUnresponsive { what }),
        (SourceError::Unavailable(e), _) => Stop::Undecided(AuditError::Source(e)),
    }
}

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

/// One tensor of the state after the diverging step that differs between the trainer's
/// committed state and the auditor's.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDiff {
    pub tensor: String,
    /// Elements whose FP32 bits differ (or, for a tensor only one side has, its length).
    pub elements: u64,
    /// The first differing element, with both values (absent where one side lacks it).
    pub first_index: Option<u64>,
    pub trainer: Option<f32>,
    pub auditor: Option<f32>,
    /// Largest absolute difference over the differing elements.
    pub max_abs_diff: Option<f64>,
    /// The shapes, where they differ.
    pub trainer_shape: Option<Vec<usize>>,
    pub auditor_shape: Option<Vec<usize>>,
}

/// The trainer's state at the diverging step, compared with the auditor's.
#[derive(Debug, Clone, PartialEq)]
pub enum StateComparison {
    /// The trainer handed out its state at the step, checked against its committed leaf: the
    /// tensors that differ (empty when only the batch differs).
    Compared(Vec<TensorDiff>),
    /// The trainer side could not hand it out (the auditor's description of why).
    Unavailable(String),
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
    /// `diverged` only: what differs in the state.
    pub state: Option<StateComparison>,
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
    /// Steps checked up to the first finding (all of them without one): replayed in this
    /// attempt, plus those resumed from an earlier one. The same whatever the thread count, the
    /// timing, or the fleet that replayed them.
    pub steps_replayed: u64,
    /// Of `steps_replayed`, the steps verified by an earlier attempt and not replayed again.
    pub steps_resumed: u64,
    pub bisection: Option<BisectionSummary>,
    pub detail: Option<StepDetail>,
    pub evidence: Option<crate::evidence::Evidence>,
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

    /// The spot seed and how it was chosen, for spot audits drawn at random.
    pub fn spot_seed(&self) -> Option<(u64, SeedChoice)> {
        match self.mode {
            Mode::Spot { pick: SpotPick::Random { seed, chosen }, .. } => Some((seed, chosen)),
            _ => None,
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
        Err(e) => match source_stop(e, Phase::Committing) {
            Stop::Undecided(e) => Err(e),
            Stop::Verdict(v) => Ok(Audit {
                timings: Timings { open_ms: ms(t0), total_ms: ms(t0), ..Timings::default() },
                ..Audit::nothing_checked(v, dir.display().to_string(), opts)
            }),
        },
    }
}

/// Audits the record behind `src` on `opts.device`.
pub fn audit(src: &dyn TrainerSource, opts: &AuditOptions, progress: &dyn Progress) -> Result<Audit, AuditError> {
    let t0 = Instant::now();
    let mut audit = Audit::nothing_checked(Verdict::Consistent, src.describe(), opts);
    let outcome = phases(src, opts, progress, &mut audit, t0);
    audit.timings.total_ms = ms(t0);
    match outcome {
        Ok(verdict) | Err(Stop::Verdict(verdict)) => {
            audit.verdict = verdict;
            Ok(audit)
        }
        Err(Stop::Undecided(e)) => Err(e),
    }
}

/// The phases in order; each fills in its part of `audit`.
fn phases(
    src: &dyn TrainerSource,
    opts: &AuditOptions,
    progress: &dyn Progress,
    audit: &mut Audit,
    t0: Instant,
) -> Result<Verdict, Stop> {
    let committed = commit::check(src, opts)?;
    audit.commitment = Some(committed.commitment.clone());
    let opened = Opened::from_committed(src, opts, committed)?;
    let resume = match progress.opened(&opened.view())? {
        Resume::Keep => opts.resume.clone(),
        Resume::Discard => BTreeMap::new(),
    };
    let Opened { committed, run, plan, init_weights, .. } = &opened;
    audit.segment = Some(plan.segment);
    audit.intervals = opened.intervals();
    audit.timings.open_ms = ms(t0);

    let t_replay = Instant::now();
    let replayer = job::Replayer::new(src, run, committed, progress, &resume);
    let (merged, resumed) = match progress.share() {
        Some(share) if plan.shared.len() > 1 => {
            let jobs = &plan.shared;
            let before: u64 = jobs.iter().map(|j| j.resume_point(&resume).map_or(0, |t| t - j.start)).sum();
            replayer.announce(jobs);
            share_intervals(share, &opened.shared_intervals(), progress, |item, durable| {
                replay_taken(src, &opened, item, durable, progress)
            })?;
            let durable = share.progress()?;
            let merged = job::Replayer::new(src, run, committed, progress, &durable).replay_jobs(jobs, false)?;
            (merged, before)
        }
        _ => {
            let merged = replayer.replay_all(&plan.jobs)?;
            let resumed = merged.resumed;
            (merged, resumed)
        }
    };
    audit.steps_replayed = merged.checked();
    audit.steps_resumed = resumed.min(audit.steps_replayed);
    audit.timings.replay_ms = ms(t_replay);
    let merged = conclude::stop_early(merged)?;

    let t_bisect = Instant::now();
    let bisection = conclude::bisect(src, committed, &merged)?;
    audit.bisection = Some(bisection);
    audit.timings.bisection_ms = ms(t_bisect);
    conclude::conclude(src, committed, merged, opts, init_weights.clone(), audit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_a_finding_once_the_trainer_has_served_its_spec() {
        let refused = || SourceError::Refused { file: "/v1/runs/r/logs/3".into(), what: "HTTP 403".into() };
        // The first request refused: a wrong token or run id may be the auditor's own.
        assert!(matches!(source_stop(refused(), Phase::FirstContact), Stop::Undecided(_)));
        for phase in [Phase::Committing, Phase::Committed] {
            match source_stop(refused(), phase) {
                Stop::Verdict(Verdict::CommitmentInvalid { file: Some(f), what, .. }) => {
                    assert_eq!(f, "/v1/runs/r/logs/3");
                    assert!(what.contains("withheld") && what.contains("403"), "{what}");
                }
                other => panic!("{other:?}"),
            }
        }
        let silent = || SourceError::Unresponsive { what: "GET /spec: timeout".into() };
        assert!(matches!(source_stop(silent(), Phase::FirstContact), Stop::Undecided(_)));
        assert!(matches!(source_stop(silent(), Phase::Committing), Stop::Verdict(Verdict::TrainerUnresponsive { .. })));
        let local = SourceError::Unavailable("disk".into());
        assert!(matches!(source_stop(local, Phase::Committed), Stop::Undecided(AuditError::Source(_))));
    }
}
