//! The verified training engine shared by the trainer agent and the auditor.
//!
//! The trainer and the auditor must run the *same* program, differing only in the FP64
//! arithmetic of their device profile; so the models, their fixed order of rounding sites, the
//! optimizers, the datasets, the run spec and the record format live here, and both binaries
//! depend on this crate. (The auditor never depends on the trainer agent.)
//!
//! - [`spec`]: TOML configs and the committed run spec.
//! - [`data`]: datasets and their Merkle commitment.
//! - [`memory`]: whether this machine has the memory a run needs, before anything is allocated.
//! - [`model`]: MLP, CNN and GPT built on `kernels`, with named rounding sites.
//! - [`output`]: files the tools write where the user says, checked before any work.
//! - [`graph`]: user-defined models as committed graphs, interpreted with automatic backward.
//! - [`train`]: the verified step (data order, forward/backward, optimizer) and adversary drills.
//! - [`record`]: the record on disk (crash-safe writer, verifying reader, signed manifest).
//! - [`wire`]: the trainer record server's HTTP protocol (routes, limits, JSON bodies), shared
//!   by its server and its client so they cannot drift apart.
#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod data;
pub mod graph;
pub mod init;
pub mod memory;
pub mod model;
pub mod output;
pub mod record;
pub mod schedule;
pub mod spec;
pub mod train;
pub mod wire;

/// Why the engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("config {origin}: {detail}")]
    Config { origin: String, detail: String },
    #[error("data {path}: {detail}")]
    Data { path: PathBuf, detail: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Record(#[from] record::RecordError),
    /// (Not a `source`: the message already says it, and error chains would repeat it.)
    #[error("step {step}: {error}")]
    Rounding { step: u64, error: common::rounding::RoundingError },
    #[error(transparent)]
    Kernel(kernels::KernelError),
    #[error(transparent)]
    State(common::state::StateError),
    /// The run spec is invalid in itself (a signed spec: the trainer's fault).
    #[error("invalid run spec: {0}")]
    InvalidSpec(spec::SpecInvalid),
    /// A state given to step from does not fit the model and optimizer (a committed state: the
    /// trainer's fault). Distinct from a value overflowing while stepping, which is
    /// [`EngineError::Rounding`] with a non-finite source (see [`EngineError::is_overflow`]).
    #[error("malformed state: {0}")]
    InvalidState(train::StateInvalid),
    /// The loaded dataset is not the one the spec commits to (for files: the caller's copy of
    /// the data; synthetic data cannot differ once the spec is valid).
    #[error(
        "dataset does not match the run's commitment: the spec commits to {} leaves ({} train, {} held out) with \
         root {}, the data gives {} leaves ({} train, {} held out) with root {}",
        spec.leaves, spec.n_train, spec.n_holdout, spec.root, data.leaves, data.n_train, data.n_holdout, data.root
    )]
    DatasetMismatch { spec: Box<spec::DatasetCommitment>, data: Box<spec::DatasetCommitment> },
}

impl EngineError {
    /// Whether a value overflowed FP32 (or became NaN) while stepping from a well-formed state:
    /// a divergence of the computation, never a malformed input.
    pub fn is_overflow(&self) -> bool {
        use common::rounding::RoundingError;
        matches!(
            self,
            EngineError::Rounding { error: RoundingError::NonFinite { .. } | RoundingError::NotANumber { .. }, .. }
        )
    }
}
