//! Reading a record: leaves, committed frames (logs, checkpoints) and batches, each checked
//! against its leaf, and [`Record`], the verified view of a whole record directory.

use std::path::{Path, PathBuf};

use common::codec::{self, Hash, to_hex};
use common::leaf::{BatchIndices, LEAF_BYTES, Leaf};
use common::merkle::MerkleTree;
use common::state::{StateHash, TrainingState};
use common::tielog::{self, TieBreakLog};

use super::files::{is_present, is_regular, read_regular, regular_len};
use super::{
    BATCH_FILE_BYTES_MAX, JSON_FILE_BYTES_MAX, LEAVES_FILE, LOG_RAW_BYTES_MAX, MANIFEST_FILE, Manifest, RecordError,
    SPEC_FILE, batch_path, checkpoint_path, log_path,
};
use crate::spec::{RunSpec, STEPS_MAX};

/// Reads `leaves.bin`. With `allow_torn`, a partial last leaf (a crash mid-append) is ignored;
/// otherwise it is an error. Every leaf must carry its own step number.
pub fn read_leaves(path: &Path, allow_torn: bool) -> Result<Vec<Leaf>, RecordError> {
    read_leaves_max(path, allow_torn, STEPS_MAX + 1)
}

/// [`read_leaves`] of a file that may hold at most `leaves_max` leaves (a spec's `n_steps + 1`),
/// plus a torn one if `allow_torn`: a larger file is refused before it is read.
pub fn read_leaves_max(path: &Path, allow_torn: bool, leaves_max: u64) -> Result<Vec<Leaf>, RecordError> {
    let leaf_bytes = LEAF_BYTES as u64;
    let torn = if allow_torn { leaf_bytes - 1 } else { 0 };
    let bytes = read_regular(path, leaves_max.saturating_mul(leaf_bytes).saturating_add(torn))?;
    let whole = bytes.len() / LEAF_BYTES * LEAF_BYTES;
    if whole != bytes.len() && !allow_torn {
        return Err(RecordError::Corrupt {
            path: path.to_path_buf(),
            offset: Some(whole as u64),
            what: format!("torn leaf: {} trailing bytes", bytes.len() - whole),
        });
    }
    let mut out = Vec::with_capacity(whole / LEAF_BYTES);
    for (i, chunk) in bytes[..whole].chunks_exact(LEAF_BYTES).enumerate() {
        let offset = (i * LEAF_BYTES) as u64;
        let leaf = Leaf::decode(chunk).map_err(|e| RecordError::Corrupt {
            path: path.to_path_buf(),
            offset: Some(offset + e.offset as u64),
            what: e.what,
        })?;
        if leaf.step != i as u64 {
            return Err(RecordError::Corrupt {
                path: path.to_path_buf(),
                offset: Some(offset + 5),
                what: format!("leaf {i} claims step {}", leaf.step),
            });
        }
        out.push(leaf);
    }
    Ok(out)
}

/// The `spec.json` of a record made by an earlier format ([`RunSpec::earlier_format`]), which
/// [`Record::open`] refuses: what a record server hands out for it, so that an auditor sees the
/// format in the committed bytes themselves rather than a server error.
pub fn earlier_format_spec(dir: &Path) -> Option<Vec<u8>> {
    let bytes = read_regular(&dir.join(SPEC_FILE), JSON_FILE_BYTES_MAX).ok()?;
    RunSpec::earlier_format(&bytes).map(|_| bytes)
}

/// A stored file checked against its commitment: the bytes as stored (a zstd frame, or a log's
/// canonical bytes themselves), and its canonical bytes, whose hash is the committed one (the
/// record's state hash for a checkpoint, SHA-256 for a log).
#[derive(Debug, Clone)]
pub struct CommittedFrame {
    pub stored: Vec<u8>,
    pub raw: Vec<u8>,
}

/// Reads the stored file at `path` (decompressing at most `raw_bytes_max` bytes) and checks its
/// raw bytes against `expected`; `what` names the hash in a mismatch.
fn read_committed_frame(
    path: PathBuf,
    raw_bytes_max: usize,
    (hash, expected): (impl Fn(&[u8]) -> Hash, &Hash),
    what: String,
) -> Result<CommittedFrame, RecordError> {
    // Incompressible data grows a little in zstd: allow its worst case for `raw_bytes_max`.
    let stored = read_regular(&path, zstd::zstd_safe::compress_bound(raw_bytes_max) as u64)?;
    let raw = tielog::decompress_bounded(&stored, raw_bytes_max).map_err(|e| RecordError::Corrupt {
        path: path.clone(),
        offset: None,
        what: e.to_string(),
    })?;
    let actual = hash(&raw);
    if actual != *expected {
        return Err(RecordError::Mismatch { path, what, expected: to_hex(expected), actual: to_hex(&actual) });
    }
    Ok(CommittedFrame { stored, raw })
}

/// Step `step`'s log file in `dir`, checked against its committed `leaf` (not decoded).
pub(super) fn read_log_frame(dir: &Path, step: u64, leaf: &Leaf) -> Result<CommittedFrame, RecordError> {
    read_committed_frame(
        log_path(dir, step),
        LOG_RAW_BYTES_MAX,
        (codec::sha256, &leaf.log),
        format!("log hash of step {step}"),
    )
}

/// Step `step`'s batch file in `dir`, checked against its committed `leaf` (not decoded).
pub(super) fn read_batch_bytes(dir: &Path, step: u64, leaf: &Leaf) -> Result<Vec<u8>, RecordError> {
    let path = batch_path(dir, step);
    let bytes = read_regular(&path, BATCH_FILE_BYTES_MAX)?;
    let actual = codec::sha256(&bytes);
    if actual != leaf.batch {
        return Err(RecordError::Mismatch {
            path,
            what: format!("batch hash of step {step}"),
            expected: to_hex(&leaf.batch),
            actual: to_hex(&actual),
        });
    }
    Ok(bytes)
}

/// A fine-tune's starting weights in `dir`, checked against the spec's commitment `c`.
pub(super) fn read_init_weights(dir: &Path, c: &crate::init::WeightsCommitment) -> Result<Vec<u8>, RecordError> {
    let path = dir.join(crate::init::INIT_WEIGHTS_FILE);
    let bytes = read_regular(&path, c.bytes)?;
    let found = crate::init::WeightsCommitment::of(&bytes);
    if found != *c {
        return Err(RecordError::Mismatch {
            path,
            what: "starting weights".into(),
            expected: format!("{} ({} bytes)", c.sha256, c.bytes),
            actual: format!("{} ({} bytes)", found.sha256, found.bytes),
        });
    }
    Ok(bytes)
}

/// The checkpoint file after step `step`, checked against its committed leaf with the record's
/// state hash (not decoded); it may decompress to at most `raw_bytes_max` bytes (a spec's
/// [`RunSpec::state_bytes_max`]).
pub fn read_checkpoint_frame(
    dir: &Path,
    step: u64,
    (hash, leaf): (StateHash, &Leaf),
    raw_bytes_max: usize,
) -> Result<CommittedFrame, RecordError> {
    read_committed_frame(
        checkpoint_path(dir, step),
        raw_bytes_max,
        (|raw: &[u8]| hash.of(raw), &leaf.state),
        format!("state hash ({}) of step {step}", hash.name()),
    )
}

/// Reads a checkpoint (of at most `raw_bytes_max` bytes decompressed) and checks it against its
/// committed leaf with the record's state hash.
pub fn read_checkpoint(
    dir: &Path,
    step: u64,
    leaf: (StateHash, &Leaf),
    raw_bytes_max: usize,
) -> Result<TrainingState, RecordError> {
    let path = checkpoint_path(dir, step);
    let raw = read_checkpoint_frame(dir, step, leaf, raw_bytes_max)?.raw;
    let state = TrainingState::decode(&raw).map_err(|e| RecordError::Corrupt {
        path: path.clone(),
        offset: None,
        what: e.to_string(),
    })?;
    if state.step != step {
        return Err(RecordError::Corrupt { path, offset: None, what: format!("checkpoint holds step {}", state.step) });
    }
    Ok(state)
}

/// The bound on a decompressed state of `spec`'s run.
pub(super) fn state_bytes_max(spec: &RunSpec, spec_path: &Path) -> Result<usize, RecordError> {
    spec.state_bytes_max().map_err(|e| RecordError::Corrupt {
        path: spec_path.to_path_buf(),
        offset: None,
        what: format!("invalid run spec: {e}"),
    })
}

/// A record opened for reading. Every piece handed out is verified against its leaf first.
#[derive(Debug)]
pub struct Record {
    dir: PathBuf,
    spec: RunSpec,
    spec_bytes: Vec<u8>,
    leaves: Vec<Leaf>,
    tree: MerkleTree,
    manifest: Option<Manifest>,
    /// The bound on a decompressed checkpoint, from the spec.
    state_bytes_max: usize,
    /// The tensors every checkpoint must hold, from the spec (`None` for text: the vocabulary
    /// is the file's, and a run built with the data checks the state).
    layout: Option<crate::train::StateLayout>,
}

impl Record {
    /// Opens a record. The spec must be valid ([`RunSpec::validate`]; else `Corrupt` naming
    /// `spec.json` and the field). A finished record's manifest must verify (signature, spec
    /// hash, root and step count), agree with the spec ([`Manifest::check_against`]) and have a
    /// checkpoint at its final step; an unfinished one (no manifest) opens with its committed
    /// prefix. Leaves beyond the spec's `n_steps` are refused before reading.
    pub fn open(dir: &Path) -> Result<Record, RecordError> {
        if !dir.is_dir() {
            return Err(RecordError::Refused(format!("{} is not a record directory", dir.display())));
        }
        let spec_path = dir.join(SPEC_FILE);
        let spec_bytes = read_regular(&spec_path, JSON_FILE_BYTES_MAX)?;
        let spec_corrupt = |what: String| RecordError::Corrupt { path: spec_path.clone(), offset: None, what };
        if let Some(version) = RunSpec::earlier_format(&spec_bytes) {
            return Err(RecordError::EarlierFormat { path: spec_path, version });
        }
        let spec =
            RunSpec::from_committed_json(&spec_bytes).map_err(|e| spec_corrupt(format!("invalid run spec: {e}")))?;
        if spec.canonical_json() != spec_bytes {
            return Err(spec_corrupt("not in canonical form".into()));
        }
        let state_bytes_max = state_bytes_max(&spec, &spec_path)?;
        let layout = spec.config.state_layout().map_err(|e| RecordError::Corrupt {
            path: spec_path.clone(),
            offset: None,
            what: format!("invalid run spec: {e}"),
        })?;
        let manifest_path = dir.join(MANIFEST_FILE);
        // Anything at the manifest's path (even a link that cannot be followed) must be a
        // readable manifest: an unreadable one does not make the record look unfinished.
        let manifest = if is_present(&manifest_path) {
            let bytes = read_regular(&manifest_path, JSON_FILE_BYTES_MAX)?;
            let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| RecordError::Corrupt {
                path: manifest_path.clone(),
                offset: Some(e.column() as u64),
                what: format!("not a manifest: {e}"),
            })?;
            m.verify_signature().map_err(|what| RecordError::Corrupt {
                path: manifest_path.clone(),
                offset: None,
                what,
            })?;
            let spec_hash = to_hex(&codec::sha256(&spec_bytes));
            if m.spec_hash != spec_hash {
                return Err(RecordError::Mismatch {
                    path: manifest_path,
                    what: "spec hash".into(),
                    expected: m.spec_hash,
                    actual: spec_hash,
                });
            }
            m.check_against(&spec).map_err(|what| RecordError::Corrupt {
                path: manifest_path.clone(),
                offset: None,
                what,
            })?;
            Some(m)
        } else {
            None
        };
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves = read_leaves_max(&leaves_path, manifest.is_none(), spec.n_steps + 1)?;
        if leaves.is_empty() {
            return Err(RecordError::Corrupt { path: leaves_path, offset: Some(0), what: "no initial leaf".into() });
        }
        let tree = MerkleTree::from_leaf_hashes(leaves.iter().map(|l| common::merkle::leaf_hash(&l.encode())));
        if let Some(m) = &manifest {
            if m.n_steps + 1 != tree.len() {
                return Err(RecordError::Mismatch {
                    path: leaves_path,
                    what: "number of leaves".into(),
                    expected: (m.n_steps + 1).to_string(),
                    actual: tree.len().to_string(),
                });
            }
            let root = to_hex(&tree.root());
            if m.root != root {
                return Err(RecordError::Mismatch {
                    path: leaves_path,
                    what: "Merkle root over leaves.bin vs manifest".into(),
                    expected: m.root.clone(),
                    actual: root,
                });
            }
            // A finished run always checkpoints its final state (RecordWriter::finish writes it);
            // without it the final state could not be checked. Its content is checked when read.
            let last = checkpoint_path(dir, m.n_steps);
            if !is_regular(&last) {
                return Err(RecordError::Corrupt {
                    path: last,
                    offset: None,
                    what: format!("the final state (step {}) has no checkpoint file", m.n_steps),
                });
            }
        }
        Ok(Record { dir: dir.to_path_buf(), spec, spec_bytes, leaves, tree, manifest, state_bytes_max, layout })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The bound on a decompressed checkpoint of this run ([`RunSpec::state_bytes_max`]).
    pub fn state_bytes_max(&self) -> usize {
        self.state_bytes_max
    }

    pub fn spec_bytes(&self) -> &[u8] {
        &self.spec_bytes
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Whether the run finished (a verified manifest is present).
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some()
    }

    /// Committed steps (leaves − 1).
    pub fn n_steps(&self) -> u64 {
        self.tree.len() - 1
    }

    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    pub fn leaf(&self, step: u64) -> Result<&Leaf, RecordError> {
        self.leaves
            .get(step as usize)
            .ok_or_else(|| RecordError::Refused(format!("step {step} is beyond the record's {} steps", self.n_steps())))
    }

    pub fn tree(&self) -> &MerkleTree {
        &self.tree
    }

    /// Step `step`'s tie-break log file, checked against its leaf (not decoded): what the
    /// record server hands out as is.
    pub fn log_frame(&self, step: u64) -> Result<CommittedFrame, RecordError> {
        read_log_frame(&self.dir, step, self.leaf(step)?)
    }

    /// Step `step`'s tie-break log, verified against its leaf.
    pub fn log(&self, step: u64) -> Result<TieBreakLog, RecordError> {
        let raw = self.log_frame(step)?.raw;
        TieBreakLog::decode(&raw).map_err(|e| RecordError::Corrupt {
            path: log_path(&self.dir, step),
            offset: None,
            what: e.to_string(),
        })
    }

    /// Compressed size of step `step`'s log file.
    pub fn log_bytes(&self, step: u64) -> Result<u64, RecordError> {
        regular_len(&log_path(&self.dir, step), zstd::zstd_safe::compress_bound(LOG_RAW_BYTES_MAX) as u64)
    }

    /// The starting weights the spec commits to (a fine-tune), checked against the commitment.
    /// `None` when the spec starts from the seed.
    pub fn init_weights(&self) -> Result<Option<Vec<u8>>, RecordError> {
        self.spec.init_weights.as_ref().map(|c| read_init_weights(&self.dir, c)).transpose()
    }

    /// Step `step`'s batch file, checked against its leaf (not decoded).
    pub fn batch_bytes(&self, step: u64) -> Result<Vec<u8>, RecordError> {
        read_batch_bytes(&self.dir, step, self.leaf(step)?)
    }

    /// Step `step`'s batch indices, verified against its leaf.
    pub fn batch(&self, step: u64) -> Result<BatchIndices, RecordError> {
        let bytes = self.batch_bytes(step)?;
        BatchIndices::decode(&bytes).map_err(|e| RecordError::Corrupt {
            path: batch_path(&self.dir, step),
            offset: Some(e.offset as u64),
            what: e.what,
        })
    }

    /// Steps that have a checkpoint file, ascending.
    pub fn checkpoint_steps(&self) -> Vec<u64> {
        let k = self.spec.config.train.checkpoint_interval;
        let n = self.n_steps();
        let mut out: Vec<u64> = (0..=n).step_by(k as usize).collect();
        // A finished record's final checkpoint was checked at open; an unfinished one may
        // have it if the trainer was killed while finishing.
        if out.last() != Some(&n) && (self.is_complete() || is_regular(&checkpoint_path(&self.dir, n))) {
            out.push(n);
        }
        out
    }

    /// The checkpoint file after step `step`, checked against its leaf (not decoded).
    pub fn checkpoint_frame(&self, step: u64) -> Result<CommittedFrame, RecordError> {
        read_checkpoint_frame(&self.dir, step, (self.spec.state_hash(), self.leaf(step)?), self.state_bytes_max)
    }

    /// The checkpoint after step `step`, verified against its leaf, and holding exactly the
    /// tensors the spec's model and optimizer define, each of its shape and finite (for every
    /// data kind but text, whose shapes come from the file)
    /// ([`crate::train::StateLayout::check`]): a signed state of another model is no state
    /// of this run, whatever reads it (an export, a resume, the record server, the auditor).
    pub fn checkpoint(&self, step: u64) -> Result<TrainingState, RecordError> {
        let state = read_checkpoint(&self.dir, step, (self.spec.state_hash(), self.leaf(step)?), self.state_bytes_max)?;
        let Some(layout) = &self.layout else { return Ok(state) };
        layout.check(&state).map_err(|p| RecordError::Corrupt {
            path: checkpoint_path(&self.dir, step),
            offset: None,
            what: format!("malformed committed state: {p}"),
        })?;
        Ok(state)
    }

    /// The newest checkpoint at or before `step`.
    pub fn checkpoint_at_or_before(&self, step: u64) -> Option<u64> {
        self.checkpoint_steps().into_iter().rev().find(|&c| c <= step)
    }
}
