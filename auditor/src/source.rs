//! What the auditor needs from the trainer side, as a trait, and its implementation over a
//! local record directory.
//!
//! The trait is the seam between the audit logic and where the record lives: the one-shot CLI
//! reads a directory ([`LocalRecord`]); the daemon will implement the same trait over HTTP.
//! Implementations should verify what they hand out, but the auditor does not rely on it: it
//! re-checks every manifest signature, root, log, batch and checkpoint against the commitments
//! itself (see `replay`), so a buggy or hostile source can only make an audit fail, never pass.

use std::path::{Path, PathBuf};

use common::codec::Hash;
use common::leaf::{BatchIndices, Leaf};
use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::record::{Manifest, Record, RecordError};

/// Why the trainer side could not hand out something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// What the trainer committed to is missing, malformed or does not match its commitment.
    /// `file` is relative to the record (or the resource path on a remote trainer).
    #[error("{file}{}: {what}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Invalid { file: String, offset: Option<u64>, what: String },
    /// The trainer side answered, but refused to hand the piece out (a redirect, 400, 401,
    /// 403, an unknown run, …). Before the trainer has committed (spec, manifest and leaves
    /// handed out) this may be the auditor's own misconfiguration, so the audit cannot decide;
    /// afterwards it is the trainer withholding what it committed to, a finding against it.
    /// `what` is the auditor's own description (status and request), never the trainer's text.
    #[error("{file}: the trainer refused: {what}")]
    Refused { file: String, what: String },
    /// The trainer did not answer (in time).
    #[error("trainer did not answer: {what}")]
    Unresponsive { what: String },
    /// The auditor's side failed (local I/O, a usage error): nothing is known about the trainer.
    #[error("{0}")]
    Unavailable(String),
}

/// The trainer side of an audit: a committed record, wherever it is.
///
/// `Sync` because interval-parallel replay asks for checkpoints, logs and batches from several
/// workers at once.
pub trait TrainerSource: Sync {
    /// Where the record is (a directory, a URL), for messages.
    fn describe(&self) -> String;
    /// The run spec's bytes (canonical JSON, hashed into the manifest).
    fn spec_bytes(&self) -> Result<Vec<u8>, SourceError>;
    /// The signed manifest; `None` for a run that has not finished.
    fn manifest(&self) -> Result<Option<Manifest>, SourceError>;
    /// Every committed leaf, leaf 0 (the initial state) first. `signed_steps` is the step count
    /// of the signed manifest, once its signature has been checked: a source that learns the
    /// count some other way (a record server's unsigned run info) must not go by a count that
    /// contradicts it.
    fn leaves(&self, signed_steps: Option<u64>) -> Result<Vec<Leaf>, SourceError>;
    /// Bisection query: the hashes of the two children of node `[lo, hi)` of the tree over the
    /// first `size` leaves.
    fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), SourceError>;
    /// The audit path of leaf `index` in the tree over the first `size` leaves.
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, SourceError>;
    /// Step `step`'s tie-break log.
    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError>;
    /// Step `step`'s batch indices.
    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError>;
    /// Steps with a checkpoint, ascending.
    fn checkpoint_steps(&self) -> Result<Vec<u64>, SourceError>;
    /// The full state after step `step` (a checkpoint step).
    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError>;
    /// The starting weights a fine-tune's spec commits to (the raw file). Only asked for when
    /// the spec names some; the default is a source that cannot hand them out.
    fn init_weights(&self) -> Result<Vec<u8>, SourceError> {
        Err(SourceError::Unavailable(format!("{}: this source cannot hand out starting weights", self.describe())))
    }
    /// The full state after any committed step, where the source can produce it (a trainer's
    /// record server recomputes it from the nearest checkpoint). Used only to resume an
    /// interrupted audit; the default hands out checkpoints only.
    fn state(&self, step: u64) -> Result<TrainingState, SourceError> {
        if self.checkpoint_steps()?.contains(&step) {
            self.checkpoint(step)
        } else {
            Err(SourceError::Unavailable(format!("{}: no stored state at step {step}", self.describe())))
        }
    }
}

/// A record directory on this machine, read through the engine's verifying reader.
#[derive(Debug)]
pub struct LocalRecord {
    record: Record,
}

impl LocalRecord {
    /// Opens and verifies a record directory (spec, manifest signature, leaves and root).
    pub fn open(dir: &Path) -> Result<LocalRecord, SourceError> {
        if !dir.is_dir() {
            return Err(SourceError::Unavailable(format!("{} is not a record directory", dir.display())));
        }
        Record::open(dir).map(|record| LocalRecord { record }).map_err(|e| map_record_error(dir, e))
    }

    /// The underlying record.
    pub fn record(&self) -> &Record {
        &self.record
    }

    fn map(&self, e: RecordError) -> SourceError {
        map_record_error(self.record.dir(), e)
    }
}

/// `path` relative to the record directory, for reports that do not depend on where the
/// auditor happened to keep the record.
fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).map(PathBuf::from).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// Name of a per-step record file relative to the record directory, for findings and reports:
/// `file(Path::new(""), step)` with one of `engine::record::{log_path, batch_path,
/// checkpoint_path}`.
pub fn record_file(file: fn(&Path, u64) -> PathBuf, step: u64) -> String {
    file(Path::new(""), step).display().to_string()
}

/// Maps the engine's record errors to what they mean for an audit: a malformed, missing or
/// mismatching file is the trainer's commitment failing; other I/O errors are the auditor's.
pub fn map_record_error(dir: &Path, e: RecordError) -> SourceError {
    match e {
        RecordError::Corrupt { path, offset, what } => {
            SourceError::Invalid { file: relative(dir, &path), offset, what }
        }
        RecordError::Mismatch { path, what, expected, actual } => SourceError::Invalid {
            file: relative(dir, &path),
            offset: None,
            what: format!("{what} does not match its commitment: expected {expected}, found {actual}"),
        },
        RecordError::Io { op, path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            SourceError::Invalid { file: relative(dir, &path), offset: None, what: format!("{op}: file is missing") }
        }
        RecordError::Io { op, path, source } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            SourceError::Invalid { file: relative(dir, &path), offset: None, what: format!("{op}: {source}") }
        }
        // An earlier format is this build's limit: the audit cannot decide (see
        // `RunSpec::earlier_format`).
        e @ (RecordError::Io { .. } | RecordError::Refused(_) | RecordError::EarlierFormat { .. }) => {
            SourceError::Unavailable(e.to_string())
        }
    }
}

fn merkle_err(e: common::merkle::MerkleError) -> SourceError {
    SourceError::Invalid { file: engine::record::LEAVES_FILE.into(), offset: None, what: e.to_string() }
}

impl TrainerSource for LocalRecord {
    fn describe(&self) -> String {
        self.record.dir().display().to_string()
    }

    fn spec_bytes(&self) -> Result<Vec<u8>, SourceError> {
        Ok(self.record.spec_bytes().to_vec())
    }

    fn manifest(&self) -> Result<Option<Manifest>, SourceError> {
        Ok(self.record.manifest().cloned())
    }

    fn leaves(&self, _signed_steps: Option<u64>) -> Result<Vec<Leaf>, SourceError> {
        Ok(self.record.leaves().to_vec())
    }

    fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), SourceError> {
        self.record.tree().child_hashes(lo, hi, size).map_err(merkle_err)
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, SourceError> {
        self.record.tree().inclusion_proof(index, size).map_err(merkle_err)
    }

    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError> {
        self.record.log(step).map_err(|e| self.map(e))
    }

    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError> {
        self.record.batch(step).map_err(|e| self.map(e))
    }

    fn checkpoint_steps(&self) -> Result<Vec<u64>, SourceError> {
        Ok(self.record.checkpoint_steps())
    }

    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError> {
        self.record.checkpoint(step).map_err(|e| self.map(e))
    }

    fn init_weights(&self) -> Result<Vec<u8>, SourceError> {
        match self.record.init_weights() {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(SourceError::Invalid {
                file: engine::init::INIT_WEIGHTS_FILE.into(),
                offset: None,
                what: "the spec commits to no starting weights".into(),
            }),
            Err(e) => Err(self.map(e)),
        }
    }
}
