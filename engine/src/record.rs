//! The training record on disk: written crash-safely by the trainer, read and verified by the
//! auditor and by the trainer's record server.
//!
//! # Layout of a record directory
//! ```text
//! spec.json                     the run spec (canonical JSON; its SHA-256 is the spec hash)
//! leaves.bin                    109-byte leaf entries, leaf t = step t, append-only
//! steps/<t:010>.log.zst         tie-break log of step t (zstd of the canonical encoding)
//! steps/<t:010>.batch           batch indices of step t (canonical, checksummed)
//! checkpoints/<t:010>.state.zst full FP32 state after step t (every k steps, and step 0)
//! manifest.json                 signed manifest; written last, so its absence marks a run
//!                               that is incomplete (killed, or still training)
//! ```
//!
//! # Crash safety
//! Step t is *committed* when its complete leaf is in `leaves.bin`. Before appending the leaf,
//! the step's log, batch (and checkpoint) are written to a temporary name, fsynced and renamed,
//! then the leaf is appended and `leaves.bin` fsynced. A kill at any point therefore leaves a
//! valid prefix of committed steps, possibly a torn last leaf and orphan step files, both of
//! which [`RecordWriter::resume`] removes before training continues from the last checkpoint.
//! Files are never rewritten in place, so nothing already committed can be damaged.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use common::codec::{self, Hash, to_hex};
use common::leaf::{BatchIndices, LEAF_BYTES, Leaf};
use common::merkle::MerkleTree;
use common::state::TrainingState;
use common::tielog::{self, TieBreakLog};
/// The trainer's signing key type (ed25519).
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::spec::{FORMAT_VERSION, RunSpec};

pub const SPEC_FILE: &str = "spec.json";
pub const LEAVES_FILE: &str = "leaves.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const STEPS_DIR: &str = "steps";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Most bytes a decompressed tie-break log may have.
pub const LOG_RAW_BYTES_MAX: usize = 256 << 20;
/// Most bytes a decompressed state may have.
pub const STATE_RAW_BYTES_MAX: usize = 4 << 30;
/// Most bytes a spec or manifest file may have.
pub const JSON_FILE_BYTES_MAX: u64 = 1 << 20;

/// Why a record could not be written or read. `Corrupt` and `Mismatch` always name the file
/// (and the byte offset where known), so a report can say exactly what failed where.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("corrupt record file {path}{}: {what}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Corrupt { path: PathBuf, offset: Option<u64>, what: String },
    #[error("record file {path} does not match its commitment: {what}: expected {expected}, found {actual}")]
    Mismatch { path: PathBuf, what: String, expected: String, actual: String },
    #[error("{0}")]
    Refused(String),
}

impl RecordError {
    /// The file the error is about.
    pub fn path(&self) -> Option<&Path> {
        match self {
            RecordError::Io { path, .. } | RecordError::Corrupt { path, .. } | RecordError::Mismatch { path, .. } => {
                Some(path)
            }
            RecordError::Refused(_) => None,
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io { op, path: path.to_path_buf(), source }
}

fn step_name(step: u64) -> String {
    format!("{step:010}")
}

/// Path of step `t`'s log inside a record.
pub fn log_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(STEPS_DIR).join(format!("{}.log.zst", step_name(step)))
}

/// Path of step `t`'s batch indices inside a record.
pub fn batch_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(STEPS_DIR).join(format!("{}.batch", step_name(step)))
}

/// Path of the checkpoint after step `t` inside a record.
pub fn checkpoint_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(CHECKPOINTS_DIR).join(format!("{}.state.zst", step_name(step)))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RecordError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io("rename", path))?;
    if let Some(parent) = path.parent() {
        // Persist the rename itself. Directories can be opened read-only for fsync on Unix.
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, RecordError> {
    let meta = fs::metadata(path).map_err(io("stat", path))?;
    if meta.len() > max {
        return Err(RecordError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            what: format!("{} bytes, more than the {max} allowed", meta.len()),
        });
    }
    fs::read(path).map_err(io("read", path))
}

/// The signed manifest, written when a run finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub software_version: String,
    /// Hex SHA-256 of `spec.json`.
    pub spec_hash: String,
    pub device_profile: String,
    pub checkpoint_interval: u64,
    /// Steps committed (leaves = n_steps + 1, the initial state first).
    pub n_steps: u64,
    /// Hex RFC 6962 root over the leaves.
    pub root: String,
    /// Hex ed25519 public key of the trainer.
    pub public_key: String,
    /// Hex ed25519 signature over [`Manifest::signing_payload`].
    pub signature: String,
}

impl Manifest {
    /// The bytes the trainer signs: a fixed binary encoding of every field but the signature.
    pub fn signing_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"TBMF");
        out.extend_from_slice(&self.format_version.to_le_bytes());
        for s in [&self.software_version, &self.spec_hash, &self.device_profile, &self.root, &self.public_key] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.checkpoint_interval.to_le_bytes());
        out.extend_from_slice(&self.n_steps.to_le_bytes());
        out
    }

    /// Checks the signature against the embedded public key.
    pub fn verify_signature(&self) -> Result<(), String> {
        let pk: [u8; 32] = codec::from_hex::<32>(&self.public_key).ok_or("public_key is not 32 hex bytes")?;
        let sig: [u8; 64] = codec::from_hex::<64>(&self.signature).ok_or("signature is not 64 hex bytes")?;
        let key = VerifyingKey::from_bytes(&pk).map_err(|e| format!("public key invalid: {e}"))?;
        key.verify(&self.signing_payload(), &Signature::from_bytes(&sig))
            .map_err(|_| "signature does not verify against the manifest's public key".to_string())
    }
}

/// Loads the ed25519 key at `path`, or generates and stores one (mode 0600) if it is absent.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, RecordError> {
    if path.exists() {
        let bytes = read_limited(path, 1024)?;
        let text = String::from_utf8_lossy(&bytes);
        let seed = codec::from_hex::<32>(text.trim()).ok_or_else(|| RecordError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            what: "expected 64 hex characters (an ed25519 secret key)".into(),
        })?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| RecordError::Refused(format!("no OS randomness to generate a signing key: {e}")))?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    write_atomic(path, format!("{}\n", to_hex(&seed)).as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a record, one committed step at a time.
#[derive(Debug)]
pub struct RecordWriter {
    dir: PathBuf,
    spec: RunSpec,
    tree: MerkleTree,
    leaves: File,
}

/// Where a resumed run continues from.
#[derive(Debug)]
pub struct ResumePoint {
    /// The state after the last checkpointed step (training continues with step `state.step + 1`).
    pub state: TrainingState,
    /// Steps that had been committed before the crash (they will be recomputed identically).
    pub committed_before: u64,
}

impl RecordWriter {
    /// Starts a new record in `dir`, which must not exist or be empty.
    pub fn create(dir: &Path, spec: &RunSpec) -> Result<Self, RecordError> {
        if dir.exists() {
            let mut entries = fs::read_dir(dir).map_err(io("list", dir))?;
            if entries.next().is_some() {
                let existing = dir.join(SPEC_FILE);
                let same = fs::read(&existing).ok().is_some_and(|b| b == spec.canonical_json());
                return Err(RecordError::Refused(if same {
                    format!("{} already holds this run; pass --resume to continue it", dir.display())
                } else {
                    format!("{} is not empty and does not hold this run; refusing to touch it", dir.display())
                }));
            }
        }
        for sub in [STEPS_DIR, CHECKPOINTS_DIR] {
            fs::create_dir_all(dir.join(sub)).map_err(io("create directory", dir))?;
        }
        write_atomic(&dir.join(SPEC_FILE), &spec.canonical_json())?;
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves =
            OpenOptions::new().create_new(true).append(true).open(&leaves_path).map_err(io("create", &leaves_path))?;
        Ok(RecordWriter { dir: dir.to_path_buf(), spec: spec.clone(), tree: MerkleTree::new(), leaves })
    }

    /// Re-opens an interrupted record for the same spec: drops a torn last leaf and every step
    /// after the last checkpoint that verifies, and returns that checkpoint's state.
    pub fn resume(dir: &Path, spec: &RunSpec) -> Result<(Self, ResumePoint), RecordError> {
        let spec_path = dir.join(SPEC_FILE);
        let existing = read_limited(&spec_path, JSON_FILE_BYTES_MAX)?;
        if existing != spec.canonical_json() {
            return Err(RecordError::Refused(format!(
                "{} holds a different run (spec hash {}, this run's is {}); refusing to resume",
                dir.display(),
                to_hex(&codec::sha256(&existing)),
                to_hex(&spec.digest())
            )));
        }
        if dir.join(MANIFEST_FILE).exists() {
            return Err(RecordError::Refused(format!("{} is a finished run (it has a manifest)", dir.display())));
        }
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves = read_leaves(&leaves_path, true)?;
        let committed = leaves.len() as u64;
        // The newest checkpoint whose state matches its committed leaf.
        let k = spec.config.train.checkpoint_interval;
        let mut start = None;
        let mut c = committed.saturating_sub(1) / k * k;
        loop {
            if c < committed
                && let Ok(state) = read_checkpoint(dir, c, &leaves[c as usize])
            {
                start = Some(state);
                break;
            }
            if c == 0 {
                break;
            }
            c -= k;
        }
        let Some(state) = start else {
            return Err(RecordError::Refused(format!(
                "{} has no checkpoint that verifies against its leaves; cannot resume",
                dir.display()
            )));
        };
        let keep = state.step + 1;
        // Truncate to the checkpoint and remove files of later steps (they will be rewritten
        // with identical content).
        let f = OpenOptions::new().write(true).open(&leaves_path).map_err(io("open", &leaves_path))?;
        f.set_len(keep * LEAF_BYTES as u64).map_err(io("truncate", &leaves_path))?;
        f.sync_all().map_err(io("fsync", &leaves_path))?;
        for sub in [STEPS_DIR, CHECKPOINTS_DIR] {
            let d = dir.join(sub);
            for entry in fs::read_dir(&d).map_err(io("list", &d))? {
                let entry = entry.map_err(io("list", &d))?;
                let name = entry.file_name().to_string_lossy().to_string();
                let step: Option<u64> = name.get(..10).and_then(|s| s.parse().ok());
                if name.ends_with(".tmp") || step.is_none_or(|s| s >= keep) {
                    fs::remove_file(entry.path()).map_err(io("remove", &entry.path()))?;
                }
            }
        }
        let tree = MerkleTree::from_leaf_hashes(
            leaves[..keep as usize].iter().map(|l| common::merkle::leaf_hash(&l.encode())),
        );
        let leaves_file = OpenOptions::new().append(true).open(&leaves_path).map_err(io("open", &leaves_path))?;
        Ok((
            RecordWriter { dir: dir.to_path_buf(), spec: spec.clone(), tree, leaves: leaves_file },
            ResumePoint { state, committed_before: committed.saturating_sub(1) },
        ))
    }

    /// The record directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of leaves committed (initial state included).
    pub fn n_leaves(&self) -> u64 {
        self.tree.len()
    }

    fn append_leaf(&mut self, leaf: &Leaf) -> Result<(), RecordError> {
        let path = self.dir.join(LEAVES_FILE);
        self.leaves.write_all(&leaf.encode()).map_err(io("append", &path))?;
        self.leaves.sync_data().map_err(io("fsync", &path))?;
        self.tree.push_entry(&leaf.encode());
        Ok(())
    }

    fn write_checkpoint(&self, state: &TrainingState) -> Result<(), RecordError> {
        let raw = state.encode();
        let stored = tielog::compress_canonical(&raw);
        write_atomic(&checkpoint_path(&self.dir, state.step), &stored)
    }

    /// Commits the initial state as leaf 0 (with a checkpoint).
    pub fn commit_initial(&mut self, state: &TrainingState) -> Result<Leaf, RecordError> {
        if !self.tree.is_empty() || state.step != 0 {
            return Err(RecordError::Refused("the initial state must be the first leaf, at step 0".into()));
        }
        self.write_checkpoint(state)?;
        let leaf = Leaf::initial(state.digest());
        self.append_leaf(&leaf)?;
        Ok(leaf)
    }

    /// Commits step `state.step`: log, batch, checkpoint if due, then the leaf.
    pub fn commit_step(
        &mut self,
        state: &TrainingState,
        log: &TieBreakLog,
        batch: &BatchIndices,
    ) -> Result<Leaf, RecordError> {
        let step = state.step;
        if step != self.tree.len() {
            return Err(RecordError::Refused(format!(
                "step {step} committed out of order (next is {})",
                self.tree.len()
            )));
        }
        // Encode once: the stored form is zstd of the canonical bytes the leaf hashes.
        let log_raw = log.encode();
        write_atomic(&log_path(&self.dir, step), &tielog::compress_canonical(&log_raw))?;
        let batch_raw = batch.encode();
        write_atomic(&batch_path(&self.dir, step), &batch_raw)?;
        if step.is_multiple_of(self.spec.config.train.checkpoint_interval) {
            self.write_checkpoint(state)?;
        }
        let leaf = Leaf { step, state: state.digest(), log: codec::sha256(&log_raw), batch: codec::sha256(&batch_raw) };
        self.append_leaf(&leaf)?;
        Ok(leaf)
    }

    /// The current root.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    /// Writes the final checkpoint (if not already on an interval) and the signed manifest.
    pub fn finish(self, final_state: &TrainingState, key: &SigningKey) -> Result<Manifest, RecordError> {
        let n_steps = self.tree.len().saturating_sub(1);
        if final_state.step != n_steps {
            return Err(RecordError::Refused(format!(
                "final state is at step {}, record at {n_steps}",
                final_state.step
            )));
        }
        if !checkpoint_path(&self.dir, n_steps).exists() {
            self.write_checkpoint(final_state)?;
        }
        let mut m = Manifest {
            format_version: FORMAT_VERSION,
            software_version: self.spec.software_version.clone(),
            spec_hash: to_hex(&self.spec.digest()),
            device_profile: self.spec.device_profile.clone(),
            checkpoint_interval: self.spec.config.train.checkpoint_interval,
            n_steps,
            root: to_hex(&self.tree.root()),
            public_key: to_hex(key.verifying_key().as_bytes()),
            signature: String::new(),
        };
        m.signature = to_hex(&key.sign(&m.signing_payload()).to_bytes());
        let json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
        write_atomic(&self.dir.join(MANIFEST_FILE), &json)?;
        Ok(m)
    }
}

/// Reads `leaves.bin`. With `allow_torn`, a partial last leaf (a crash mid-append) is ignored;
/// otherwise it is an error. Every leaf must carry its own step number.
pub fn read_leaves(path: &Path, allow_torn: bool) -> Result<Vec<Leaf>, RecordError> {
    let bytes = fs::read(path).map_err(io("read", path))?;
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

/// A stored zstd file checked against its commitment: the frame as stored, and its
/// decompressed (canonical) bytes, whose SHA-256 is the committed hash.
#[derive(Debug, Clone)]
pub struct CommittedFrame {
    pub stored: Vec<u8>,
    pub raw: Vec<u8>,
}

/// Reads the zstd file at `path` (decompressing at most `raw_bytes_max` bytes) and checks its
/// raw bytes against `expected`; `what` names the hash in a mismatch.
fn read_committed_frame(
    path: PathBuf,
    raw_bytes_max: usize,
    expected: &Hash,
    what: String,
) -> Result<CommittedFrame, RecordError> {
    let stored = read_limited(&path, raw_bytes_max as u64)?;
    let raw = tielog::decompress_bounded(&stored, raw_bytes_max).map_err(|e| RecordError::Corrupt {
        path: path.clone(),
        offset: None,
        what: e.to_string(),
    })?;
    let actual = codec::sha256(&raw);
    if actual != *expected {
        return Err(RecordError::Mismatch { path, what, expected: to_hex(expected), actual: to_hex(&actual) });
    }
    Ok(CommittedFrame { stored, raw })
}

/// The checkpoint file after step `step`, checked against its committed leaf (not decoded).
pub fn read_checkpoint_frame(dir: &Path, step: u64, leaf: &Leaf) -> Result<CommittedFrame, RecordError> {
    read_committed_frame(
        checkpoint_path(dir, step),
        STATE_RAW_BYTES_MAX,
        &leaf.state,
        format!("state hash of step {step}"),
    )
}

/// Reads a checkpoint and checks it against its committed leaf.
pub fn read_checkpoint(dir: &Path, step: u64, leaf: &Leaf) -> Result<TrainingState, RecordError> {
    let path = checkpoint_path(dir, step);
    let raw = read_checkpoint_frame(dir, step, leaf)?.raw;
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

/// A record opened for reading. Every piece handed out is verified against its leaf first.
#[derive(Debug)]
pub struct Record {
    dir: PathBuf,
    spec: RunSpec,
    spec_bytes: Vec<u8>,
    leaves: Vec<Leaf>,
    tree: MerkleTree,
    manifest: Option<Manifest>,
}

impl Record {
    /// Opens a record. A finished record's manifest must verify (signature, spec hash, root and
    /// step count); an unfinished one (no manifest) opens with its committed prefix.
    pub fn open(dir: &Path) -> Result<Record, RecordError> {
        if !dir.is_dir() {
            return Err(RecordError::Refused(format!("{} is not a record directory", dir.display())));
        }
        let spec_path = dir.join(SPEC_FILE);
        let spec_bytes = read_limited(&spec_path, JSON_FILE_BYTES_MAX)?;
        let spec: RunSpec = serde_json::from_slice(&spec_bytes).map_err(|e| RecordError::Corrupt {
            path: spec_path.clone(),
            offset: None,
            what: format!("not a run spec: {e}"),
        })?;
        if spec.canonical_json() != spec_bytes {
            return Err(RecordError::Corrupt { path: spec_path, offset: None, what: "not in canonical form".into() });
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = if manifest_path.exists() {
            let bytes = read_limited(&manifest_path, JSON_FILE_BYTES_MAX)?;
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
            Some(m)
        } else {
            None
        };
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves = read_leaves(&leaves_path, manifest.is_none())?;
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
        }
        Ok(Record { dir: dir.to_path_buf(), spec, spec_bytes, leaves, tree, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
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
        let leaf = self.leaf(step)?;
        read_committed_frame(
            log_path(&self.dir, step),
            LOG_RAW_BYTES_MAX,
            &leaf.log,
            format!("log hash of step {step}"),
        )
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
        let path = log_path(&self.dir, step);
        Ok(fs::metadata(&path).map_err(io("stat", &path))?.len())
    }

    /// Step `step`'s batch file, checked against its leaf (not decoded).
    pub fn batch_bytes(&self, step: u64) -> Result<Vec<u8>, RecordError> {
        let leaf = self.leaf(step)?;
        let path = batch_path(&self.dir, step);
        let bytes = read_limited(&path, 64 << 20)?;
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
        if out.last() != Some(&n) && checkpoint_path(&self.dir, n).exists() {
            out.push(n);
        }
        out
    }

    /// The checkpoint file after step `step`, checked against its leaf (not decoded).
    pub fn checkpoint_frame(&self, step: u64) -> Result<CommittedFrame, RecordError> {
        read_checkpoint_frame(&self.dir, step, self.leaf(step)?)
    }

    /// The checkpoint after step `step`, verified against its leaf.
    pub fn checkpoint(&self, step: u64) -> Result<TrainingState, RecordError> {
        read_checkpoint(&self.dir, step, self.leaf(step)?)
    }

    /// The newest checkpoint at or before `step`.
    pub fn checkpoint_at_or_before(&self, step: u64) -> Option<u64> {
        self.checkpoint_steps().into_iter().rev().find(|&c| c <= step)
    }
}
