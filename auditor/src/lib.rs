//! The auditor: replays a training record on its own device profile, finds the first step
//! where the trainer's commitments and its own computation part ways, and says so in a signed
//! report that a third party can check by re-executing that one step.
//!
//! # Design
//!
//! - **The trainer side is a trait** ([`source::TrainerSource`]): spec, signed manifest,
//!   leaves, bisection node hashes, inclusion proofs, logs, batches and checkpoints. The
//!   one-shot CLI reads a record directory ([`source::LocalRecord`]); the daemon implements the
//!   same trait over HTTP. The auditor trusts no implementation: it re-checks the manifest
//!   signature, the root over the leaves, and every log, batch and checkpoint against its leaf
//!   before using it.
//! - **Replay** ([`replay`]) runs jobs `(checkpoint c, end e]`: load checkpoint `c` (verified),
//!   then for each step verify its log and batch, run the engine's step on the auditor's
//!   profile following the trainer's log, and compare the auditor's leaf with the trainer's.
//!   The modes differ only in the jobs: *full* is one job, *intervals* is one job per
//!   checkpoint interval run on a rayon pool (all cores), *spot* is Q of those intervals, drawn
//!   with a seeded PRNG stream or by proof-of-learning's "largest update" rule. Each job stops
//!   at its first finding; the earliest finding (by step) wins, so every mode gives the same
//!   verdict for the steps it covers.
//! - **Verdicts are data**: [`Verdict`] for everything the record can be accused of,
//!   `Err(AuditError)` only when the audit could not decide (bad usage, the auditor's own I/O, a
//!   dataset that does not match the spec). At a step: own leaf ≠ trainer leaf → `diverged`;
//!   equal leaves but log entries that do not hold up → `forged-log`; any file that fails its
//!   commitment → `commitment-invalid` naming file and offset.
//! - **Bisection** ([`common::merkle::Bisection`], sans-IO) runs after replay over the auditor's
//!   own tree (its own leaves where it replayed, the trainer's elsewhere, nothing past the first
//!   finding) against the trainer's signed root, asking the trainer side only for the child
//!   hashes it needs. It must land on the same step as the step-by-step comparison (a
//!   cross-check; a disagreement is an internal error), and it must take at most
//!   ⌈log₂ n⌉ + 1 queries. Over HTTP the same code drives the descent.
//! - **Reports** ([`report`]) are serde wire types built from the domain types, signed with the
//!   auditor's ed25519 key over the canonical JSON (fixed field order, `signature` empty).
//!   `verify-report` re-serialises, checks the signature and every inclusion proof.
//! - **Evidence** ([`evidence`]) is a versioned, canonical, size-checked binary container with
//!   the agreed state at s−1, the trainer's log and batch of step s, the spec and the signed
//!   manifest, and the leaves at s−1 and s with inclusion proofs. [`evidence::adjudicate`]
//!   re-executes step s on any profile and says whose leaf it reproduces.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod evidence;
pub mod http;
pub mod replay;
pub mod report;
pub mod setup;
pub mod source;

pub use replay::{Audit, AuditOptions, ChooseData, Mode, NoProgress, Progress, SpotPick, audit, audit_dir};
pub use source::{LocalRecord, SourceError, TrainerSource};

/// This auditor's version, written into every report.
pub const AUDITOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The kind of a verdict: what reports, evidence bundles, the daemon's store and its metrics
/// carry. `as_str` gives the kebab-case name written in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerdictKind {
    Consistent,
    Diverged,
    ForgedLog,
    CommitmentInvalid,
    TrainerUnresponsive,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 5] = [
        VerdictKind::Consistent,
        VerdictKind::Diverged,
        VerdictKind::ForgedLog,
        VerdictKind::CommitmentInvalid,
        VerdictKind::TrainerUnresponsive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Consistent => "consistent",
            VerdictKind::Diverged => "diverged",
            VerdictKind::ForgedLog => "forged-log",
            VerdictKind::CommitmentInvalid => "commitment-invalid",
            VerdictKind::TrainerUnresponsive => "trainer-unresponsive",
        }
    }

    /// Whether the verdict goes against the trainer.
    pub fn is_adverse(self) -> bool {
        self != VerdictKind::Consistent
    }
}

impl std::fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VerdictKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        VerdictKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| format!("unknown verdict kind {s:?}"))
    }
}

impl PartialEq<&str> for VerdictKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A part of a leaf that can differ between the trainer and the auditor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafPart {
    /// The FP32 state after the step.
    State,
    /// The batch indices the step used.
    Batch,
}

impl LeafPart {
    pub fn as_str(self) -> &'static str {
        match self {
            LeafPart::State => "state",
            LeafPart::Batch => "batch",
        }
    }
}

/// The outcome of an audit. Every variant is an answer; "could not decide" is an
/// `Err(AuditError)` instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every replayed step reproduced the trainer's leaf, following a log that holds up.
    Consistent,
    /// Step `step` is the first whose leaf the auditor does not reproduce. `site` is the first
    /// rounding site where the trainer's log did not fit the auditor's values, when there is one.
    /// `detail` says more when the auditor could not even finish the step (a value overflowed
    /// while replaying it from the agreed state).
    Diverged { step: u64, site: Option<String>, differs: Vec<LeafPart>, detail: Option<String> },
    /// Step `step` reproduces, but the trainer's log claims a tie-break for an element that is
    /// not near a rounding midpoint on the auditor's side.
    ForgedLog {
        step: u64,
        site: String,
        index: Option<u64>,
        value: Option<f64>,
        midpoint: Option<f64>,
        bound: Option<f64>,
        detail: String,
    },
    /// Something the trainer committed to is missing, malformed, withheld or does not match.
    CommitmentInvalid { what: String, file: Option<String>, offset: Option<u64> },
    /// The trainer side did not answer.
    TrainerUnresponsive { what: String },
}

impl Verdict {
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Consistent => VerdictKind::Consistent,
            Verdict::Diverged { .. } => VerdictKind::Diverged,
            Verdict::ForgedLog { .. } => VerdictKind::ForgedLog,
            Verdict::CommitmentInvalid { .. } => VerdictKind::CommitmentInvalid,
            Verdict::TrainerUnresponsive { .. } => VerdictKind::TrainerUnresponsive,
        }
    }

    /// The step the verdict is about, where it has one.
    pub fn step(&self) -> Option<u64> {
        match self {
            Verdict::Diverged { step, .. } | Verdict::ForgedLog { step, .. } => Some(*step),
            _ => None,
        }
    }

    pub fn is_consistent(&self) -> bool {
        matches!(self, Verdict::Consistent)
    }

    /// A `commitment-invalid` verdict about `file`.
    pub fn invalid(file: impl Into<String>, offset: Option<u64>, what: impl Into<String>) -> Verdict {
        Verdict::CommitmentInvalid { what: what.into(), file: Some(file.into()), offset }
    }
}

/// Why an audit (or adjudication, or report check) could not decide.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("reading the trainer's record: {0}")]
    Source(String),
    /// The auditor's copy of the dataset does not match the spec's commitment.
    #[error("the auditor's data: {0}")]
    Data(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("report {0}")]
    Report(String),
    #[error("evidence: {what}{}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Evidence { what: String, offset: Option<u64> },
    /// The audit was stopped ([`Progress::cancelled`]) before it decided; the progress it
    /// reported stays valid for a later attempt.
    #[error("audit cancelled before it decided")]
    Cancelled,
    /// This machine has not the memory the run needs ([`engine::memory`]): the auditor's own
    /// limit, found before anything is allocated.
    #[error("this auditor's memory: {0}")]
    Memory(String),
    #[error("internal error (a bug in the auditor): {0}")]
    Internal(String),
}
