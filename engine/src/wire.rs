//! The trainer record server's HTTP protocol: routes, query limits and JSON bodies, shared by
//! the server (`trainer-agent serve`) and its client (the auditor's HTTP trainer source), so
//! the two cannot drift apart. No HTTP code lives here, only the contract.
//!
//! # Routes (all `GET`, under [`API_PREFIX`])
//! | route | body |
//! | --- | --- |
//! | `/runs` | [`RunList`] |
//! | `/runs/{run}` | [`RunInfo`] |
//! | `/runs/{run}/spec` | `spec.json` bytes (canonical JSON) |
//! | `/runs/{run}/manifest` | `manifest.json` bytes; 404 with code [`code::UNFINISHED`] for a run without one |
//! | `/runs/{run}/leaves?start=S&count=C` | `C` × 109-byte leaves from `S`, `C ≤` [`LEAVES_PAGE_MAX`] (fewer at the end) |
//! | `/runs/{run}/nodes?lo=L&hi=H&size=N` | [`NodePair`]: the children of node `[L, H)` of the tree over `N` leaves |
//! | `/runs/{run}/proofs/{index}?size=N` | [`LeafProof`]: leaf `index` and its audit path in the tree over `N` leaves |
//! | `/runs/{run}/logs/{step}` | step `step`'s canonical tie-break log in its stored form (below) |
//! | `/runs/{run}/batches/{step}` | step `step`'s canonical batch indices |
//! | `/runs/{run}/checkpoints` | [`CheckpointList`] |
//! | `/runs/{run}/checkpoints/{step}` | zstd frame of the canonical state after `step` (a checkpoint step) |
//! | `/runs/{run}/states/{step}` | zstd frame of the canonical state after `step`, any committed step: stored, or recomputed from the nearest checkpoint |
//!
//! Compressed bodies are zstd frames of the canonical bytes; clients decompress with a bound
//! and hash the *raw* bytes (different zstd APIs produce different frames). A log is served as
//! stored: a zstd frame, or, when zstd would not have made it smaller, the canonical bytes
//! themselves ([`common::tielog::compress_canonical`]); [`common::tielog::decompress_bounded`]
//! reads both, telling them apart by zstd's magic number.
//!
//! Every error is JSON [`ErrorBody`] with a status from [`code`]'s table. A run id is a
//! directory name made of `[A-Za-z0-9._-]`, not starting with a dot ([`is_valid_run_id`]);
//! anything else is rejected before it comes near the file system.

use serde::{Deserialize, Serialize};

/// Prefix of every route; bumped when the protocol changes incompatibly.
pub const API_PREFIX: &str = "/v1";
/// Most leaves one `/leaves` request returns (7.1 MB of leaves).
pub const LEAVES_PAGE_MAX: u64 = 65_536;
/// Longest run id.
pub const RUN_ID_BYTES_MAX: usize = 128;
/// Header carrying the raw (decompressed) length of a zstd body, so a client can size its bound.
pub const RAW_BYTES_HEADER: &str = "x-tiebreak-raw-bytes";
/// Content type of zstd bodies.
pub const ZSTD_CONTENT_TYPE: &str = "application/zstd";

/// Error codes and the HTTP status each goes with.
pub mod code {
    /// 400: a malformed query or path parameter.
    pub const BAD_REQUEST: &str = "bad-request";
    /// 401: a token is required and was missing or wrong.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 404: no run with that id under the server's records directory.
    pub const NO_SUCH_RUN: &str = "no-such-run";
    /// 404: the run exists but the step, checkpoint or file does not.
    pub const NOT_FOUND: &str = "not-found";
    /// 404: the run has no manifest yet (still training, or killed).
    pub const UNFINISHED: &str = "unfinished";
    /// 405: every route is `GET`.
    pub const METHOD_NOT_ALLOWED: &str = "method-not-allowed";
    /// 413: a request or a response would exceed the server's size limit.
    pub const TOO_LARGE: &str = "too-large";
    /// 422: a record file fails its commitment (`file` and `offset` say where).
    pub const CORRUPT: &str = "corrupt";
    /// 503: the server is at its limit of concurrent state recomputations; retry later.
    pub const BUSY: &str = "busy";
    /// 500: the server failed (its own I/O); nothing is known about the record.
    pub const INTERNAL: &str = "internal";

    /// The HTTP status for a code.
    pub fn status(code: &str) -> u16 {
        match code {
            BAD_REQUEST => 400,
            UNAUTHORIZED => 401,
            NO_SUCH_RUN | NOT_FOUND | UNFINISHED => 404,
            METHOD_NOT_ALLOWED => 405,
            TOO_LARGE => 413,
            CORRUPT => 422,
            BUSY => 503,
            _ => 500,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What failed, in words (names the step, file or parameter).
    pub error: String,
    /// One of [`code`]'s constants.
    pub code: String,
    /// For [`code::CORRUPT`]: the file, relative to the record directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// For [`code::CORRUPT`]: the byte offset in `file`, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: &str, error: impl Into<String>) -> Self {
        ErrorBody { error: error.into(), code: code.to_string(), file: None, offset: None }
    }
}

/// `GET /runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunList {
    /// Run ids, sorted.
    pub runs: Vec<String>,
}

/// `GET /runs/{run}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run: String,
    /// Committed steps (leaves − 1).
    pub n_steps: u64,
    /// Whether the run finished (has a verified manifest).
    pub complete: bool,
    /// Hex root over the committed leaves.
    pub root: String,
    /// Hex SHA-256 of the spec.
    pub spec_hash: String,
    pub device_profile: String,
}

/// `GET /runs/{run}/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePair {
    /// Hex hash of the left child.
    pub left: String,
    /// Hex hash of the right child.
    pub right: String,
}

/// `GET /runs/{run}/proofs/{index}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafProof {
    pub index: u64,
    pub size: u64,
    /// Hex of the leaf's 109-byte encoding.
    pub leaf: String,
    /// Hex hashes of the audit path, bottom up.
    pub proof: Vec<String>,
}

/// `GET /runs/{run}/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointList {
    /// Steps with a checkpoint, ascending.
    pub steps: Vec<u64>,
}

/// Whether `s` may name a run: 1–[`RUN_ID_BYTES_MAX`] bytes of `[A-Za-z0-9._-]`, not starting
/// with a dot (so never `.` or `..`, and never a hidden directory).
pub fn is_valid_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= RUN_ID_BYTES_MAX
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Route paths, for the client; the server registers the same shapes.
pub mod path {
    use super::API_PREFIX;

    pub fn runs() -> String {
        format!("{API_PREFIX}/runs")
    }
    pub fn run(run: &str) -> String {
        format!("{API_PREFIX}/runs/{run}")
    }
    pub fn spec(run: &str) -> String {
        format!("{API_PREFIX}/runs/{run}/spec")
    }
    pub fn manifest(run: &str) -> String {
        format!("{API_PREFIX}/runs/{run}/manifest")
    }
    pub fn leaves(run: &str, start: u64, count: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/leaves?start={start}&count={count}")
    }
    pub fn nodes(run: &str, lo: u64, hi: u64, size: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/nodes?lo={lo}&hi={hi}&size={size}")
    }
    pub fn proof(run: &str, index: u64, size: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/proofs/{index}?size={size}")
    }
    pub fn log(run: &str, step: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/logs/{step}")
    }
    pub fn batch(run: &str, step: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/batches/{step}")
    }
    pub fn checkpoints(run: &str) -> String {
        format!("{API_PREFIX}/runs/{run}/checkpoints")
    }
    pub fn checkpoint(run: &str, step: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/checkpoints/{step}")
    }
    pub fn state(run: &str, step: u64) -> String {
        format!("{API_PREFIX}/runs/{run}/states/{step}")
    }
    /// The starting weights a fine-tune's spec commits to (the raw safetensors file).
    pub fn init_weights(run: &str) -> String {
        format!("{API_PREFIX}/runs/{run}/init-weights")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_cannot_escape_the_records_directory() {
        for ok in ["run1", "faulty-37", "a.b_c", "X"] {
            assert!(is_valid_run_id(ok), "{ok}");
        }
        let long = "a".repeat(RUN_ID_BYTES_MAX + 1);
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "a b", "é", "%2e%2e", long.as_str()] {
            assert!(!is_valid_run_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_code_has_a_client_or_server_error_status() {
        use code::*;
        for (c, s) in [
            (BAD_REQUEST, 400),
            (UNAUTHORIZED, 401),
            (NO_SUCH_RUN, 404),
            (NOT_FOUND, 404),
            (UNFINISHED, 404),
            (METHOD_NOT_ALLOWED, 405),
            (TOO_LARGE, 413),
            (CORRUPT, 422),
            (BUSY, 503),
            (INTERNAL, 500),
        ] {
            assert_eq!(status(c), s, "{c}");
        }
    }
}
