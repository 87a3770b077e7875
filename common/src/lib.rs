//! The shared core of tiebreak: everything the trainer agent and the auditor must agree on
//! bit for bit, and nothing else.
//!
//! - [`rounding`]: FP64 → FP32 rounding with sound tie-break logging and replay.
//! - [`tielog`]: the canonical, checksummed tie-break log format (one log per step).
//! - [`state`]: canonical FP32 training states, their hashes and their byte encoding.
//! - [`leaf`]: the per-step leaf (state, log and batch hashes) and batch-index lists.
//! - [`merkle`]: Certificate-Transparency style (RFC 6962 / 9162) commitments, proofs, bisection.
//! - [`prng`]: the counter-based Philox PRNG keyed by (seed, purpose, step, layer).
//! - [`codec`]: varints, a never-panicking reader, SHA-256 and hex helpers.
//!
//! `common` knows nothing about tokio, HTTP, files or CUDA: it is pure computation over bytes
//! and numbers, so that both sides of an audit run exactly the same code.
#![forbid(unsafe_code)]

pub mod codec;
pub mod files;
pub mod leaf;
pub mod merkle;
pub mod prng;
pub mod rounding;
pub mod state;
pub mod tielog;
