//! The training record on disk: written crash-safely by the trainer, read and verified by the
//! auditor and by the trainer's record server.
//!
//! # Layout of a record directory
//! ```text
//! spec.json                     the run spec (canonical JSON; its SHA-256 is the spec hash)
//! leaves.bin                    109-byte leaf entries, leaf t = step t, append-only
//! steps/<t:010>.log.zst         tie-break log of step t (stored form: zstd of the canonical
//!                                encoding, or the encoding itself when zstd does not shrink it)
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
use ed25519_dalek::Signer as _;
/// The trainer's signing key type (ed25519).
pub use ed25519_dalek::SigningKey;

use crate::spec::{FORMAT_OLDEST_READ, FORMAT_VERSION, RunSpec};

mod files;
mod guard;
mod manifest;
mod read;

use files::read_regular;
pub use manifest::{Manifest, load_or_create_key};
pub use read::{
    CommittedFrame, Record, earlier_format_spec, read_checkpoint, read_checkpoint_frame, read_leaves, read_leaves_max,
};

pub const SPEC_FILE: &str = "spec.json";
pub const LEAVES_FILE: &str = "leaves.bin";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const STEPS_DIR: &str = "steps";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Most bytes a decompressed tie-break log may have.
pub const LOG_RAW_BYTES_MAX: usize = 256 << 20;
/// Most bytes a decompressed state may have.
pub const STATE_RAW_BYTES_MAX: usize = 4 << 30;
/// Most bytes a stored (compressed) checkpoint or state may have: zstd's worst case for
/// [`STATE_RAW_BYTES_MAX`] (`ZSTD_COMPRESSBOUND`: the input, 1/256 of it, and a small margin).
pub const STATE_FILE_BYTES_MAX: u64 = STATE_RAW_BYTES_MAX as u64 + (STATE_RAW_BYTES_MAX as u64 >> 8) + (128 << 10);
/// Most bytes a spec or manifest file may have.
pub const JSON_FILE_BYTES_MAX: u64 = 1 << 20;
/// Most bytes a batch file may have.
pub const BATCH_FILE_BYTES_MAX: u64 = 64 << 20;

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
    /// `spec.json` says the record was made by an earlier format ([`RunSpec::earlier_format`]).
    #[error(
        "{}: the record was made by format {version} (an earlier build); this build reads formats \
         {FORMAT_OLDEST_READ} to {FORMAT_VERSION}: audit it with a build that reads format {version}",
        path.display()
    )]
    EarlierFormat { path: PathBuf, version: u32 },
}

impl RecordError {
    /// The file the error is about.
    pub fn path(&self) -> Option<&Path> {
        match self {
            RecordError::Io { path, .. }
            | RecordError::Corrupt { path, .. }
            | RecordError::Mismatch { path, .. }
            | RecordError::EarlierFormat { path, .. } => Some(path),
            RecordError::Refused(_) => None,
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io { op, path: path.to_path_buf(), source }
}

/// Where a record's spec and `spec` differ, as `; they differ in a.b, c`: the paths of the
/// first few fields whose values differ (so a resume with another flag names the flag's field).
fn spec_differences(existing: &[u8], spec: &RunSpec) -> String {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, at: String, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            _ if a == b => {}
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                    walk(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), path, out);
                }
            }
            _ => out.push(at),
        }
    }
    let (Ok(a), Ok(b)) = (serde_json::from_slice(existing), serde_json::to_value(spec)) else { return String::new() };
    let mut paths = Vec::new();
    walk(&a, &b, String::new(), &mut paths);
    match paths.len() {
        0 => String::new(),
        n if n > 5 => format!("; they differ in {} and {} more", paths[..5].join(", "), n - 5),
        _ => format!("; they differ in {}", paths.join(", ")),
    }
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

/// Writes a record, one committed step at a time.
#[derive(Debug)]
pub struct RecordWriter {
    dir: PathBuf,
    spec: RunSpec,
    tree: MerkleTree,
    leaves: File,
    /// The record directory's lock, held while this writer lives ([`guard::lock_dir`]).
    _lock: File,
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
    /// Whether `dir` holds nothing of a run: a start killed before it wrote its spec leaves
    /// only the empty `steps/` and `checkpoints/` and perhaps a partial `spec.tmp`, which a new
    /// start (or a `--resume`, which then starts afresh) may take over.
    pub fn unstarted(dir: &Path) -> bool {
        Self::unstarted_files(dir)
    }

    /// Whether `dir` holds a start killed after writing its spec but before committing its
    /// first leaf: a resume has nothing to continue, and [`RecordWriter::create`] starts such a
    /// run again when its spec is the same.
    pub fn no_leaf_committed(dir: &Path) -> bool {
        dir.join(SPEC_FILE).exists() && guard::no_leaf_committed(dir)
    }

    fn unstarted_files(dir: &Path) -> bool {
        let Ok(entries) = fs::read_dir(dir) else { return false };
        entries.into_iter().all(|e| {
            let Ok(e) = e else { return false };
            let name = e.file_name();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            let empty_dir = || fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none());
            match name.to_str() {
                Some(STEPS_DIR | CHECKPOINTS_DIR) => is_dir && empty_dir(),
                Some("spec.tmp") => !is_dir,
                _ => false,
            }
        })
    }

    /// Starts a new record in `dir`, which must not exist, be empty, or be
    /// [`unstarted`](Self::unstarted).
    pub fn create(dir: &Path, spec: &RunSpec) -> Result<Self, RecordError> {
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let lock = guard::lock_dir(dir)?;
        if !Self::unstarted(dir) {
            let mut entries = fs::read_dir(dir).map_err(io("list", dir))?;
            if entries.next().is_some() {
                let existing = dir.join(SPEC_FILE);
                let same =
                    read_regular(&existing, JSON_FILE_BYTES_MAX).ok().is_some_and(|b| b == spec.canonical_json());
                if same && guard::no_leaf_committed(dir) {
                    // Killed before its first leaf: nothing was committed, so start again.
                    guard::clear_no_leaf(dir)?;
                } else {
                    return Err(RecordError::Refused(if same {
                        format!("{} already holds this run; pass --resume to continue it", dir.display())
                    } else {
                        format!("{} is not empty and does not hold this run; refusing to touch it", dir.display())
                    }));
                }
            }
        }
        for sub in [STEPS_DIR, CHECKPOINTS_DIR] {
            fs::create_dir_all(dir.join(sub)).map_err(io("create directory", dir))?;
        }
        write_atomic(&dir.join(SPEC_FILE), &spec.canonical_json())?;
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves =
            OpenOptions::new().create_new(true).append(true).open(&leaves_path).map_err(io("create", &leaves_path))?;
        Ok(RecordWriter { dir: dir.to_path_buf(), spec: spec.clone(), tree: MerkleTree::new(), leaves, _lock: lock })
    }

    /// Stores the starting weights the spec commits to, as [`crate::init::INIT_WEIGHTS_FILE`]
    /// (before the initial state is committed), so that an auditor reads the very bytes the
    /// spec's hash names. Bytes that are not the committed file are refused.
    pub fn store_init_weights(&self, bytes: &[u8]) -> Result<(), RecordError> {
        let Some(c) = &self.spec.init_weights else {
            return Err(RecordError::Refused("this run's spec commits to no starting weights".into()));
        };
        c.check(bytes).map_err(|p| RecordError::Refused(p.to_string()))?;
        write_atomic(&self.dir.join(crate::init::INIT_WEIGHTS_FILE), bytes)
    }

    /// Re-opens an interrupted record for the same spec: drops a torn last leaf and every step
    /// after the last checkpoint that verifies, and returns that checkpoint's state.
    pub fn resume(dir: &Path, spec: &RunSpec) -> Result<(Self, ResumePoint), RecordError> {
        let lock = match guard::lock_dir(dir) {
            Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordError::Refused(format!(
                    "{} holds no record to resume (it does not exist); train without --resume to start the run",
                    dir.display()
                )));
            }
            other => other?,
        };
        let spec_path = dir.join(SPEC_FILE);
        let existing = match read_regular(&spec_path, JSON_FILE_BYTES_MAX) {
            Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordError::Refused(format!(
                    "{} holds no record to resume (it has no {SPEC_FILE}); train without --resume to start the run",
                    dir.display()
                )));
            }
            other => other?,
        };
        if existing != spec.canonical_json() {
            // A spec.json that is no spec is damaged, not another run's.
            if let Err(e) = serde_json::from_slice::<RunSpec>(&existing) {
                return Err(RecordError::Corrupt {
                    path: spec_path.clone(),
                    offset: None,
                    what: format!(
                        "not a run spec ({e}); this record cannot be resumed: train again into a new directory"
                    ),
                });
            }
            // The same run started by another build: say so, not "a different run".
            if let Ok(mut other) = serde_json::from_slice::<RunSpec>(&existing)
                && (other.format_version, &other.software_version) != (spec.format_version, &spec.software_version)
            {
                let (format, software) = (other.format_version, other.software_version.clone());
                (other.format_version, other.software_version) = (spec.format_version, spec.software_version.clone());
                if other == *spec {
                    return Err(RecordError::Refused(format!(
                        "{} was started by tiebreak {software} (record format {format}); this build is {} and \
                         writes format {}: finish the run with the build that started it, or train it again \
                         into a new directory",
                        dir.display(),
                        spec.software_version,
                        spec.format_version
                    )));
                }
            }
            return Err(RecordError::Refused(format!(
                "{} holds a different run (spec hash {}, this run's is {}{}); refusing to resume",
                dir.display(),
                to_hex(&codec::sha256(&existing)),
                to_hex(&spec.digest()),
                spec_differences(&existing, spec)
            )));
        }
        if fs::symlink_metadata(dir.join(MANIFEST_FILE)).is_ok() {
            return Err(RecordError::Refused(format!("{} is a finished run (it has a manifest)", dir.display())));
        }
        let leaves_path = dir.join(LEAVES_FILE);
        let leaves = read_leaves_max(&leaves_path, true, spec.n_steps + 1)?;
        let state_bytes_max = read::state_bytes_max(spec, &spec_path)?;
        let committed = leaves.len() as u64;
        // The newest checkpoint whose state matches its committed leaf.
        let k = spec.config.train.checkpoint_interval;
        let mut start = None;
        let mut c = committed.saturating_sub(1) / k * k;
        loop {
            if c < committed
                && let Ok(state) = read_checkpoint(dir, c, (spec.state_hash(), &leaves[c as usize]), state_bytes_max)
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
        guard::check_kept_prefix(dir, spec, &leaves, keep)?;
        // Truncate to the checkpoint and remove files of later steps (they will be rewritten
        // with identical content).
        let f = OpenOptions::new().write(true).open(&leaves_path).map_err(io("open", &leaves_path))?;
        f.set_len(keep * LEAF_BYTES as u64).map_err(io("truncate", &leaves_path))?;
        f.sync_all().map_err(io("fsync", &leaves_path))?;
        for sub in [STEPS_DIR, CHECKPOINTS_DIR] {
            let d = dir.join(sub);
            for entry in fs::read_dir(&d).map_err(io("list", &d))? {
                let entry = entry.map_err(io("list", &d))?;
                // Only files (or links) belong here; a directory or other special entry is not
                // something this writer made, and is not removed blindly.
                let kind = entry.file_type().map_err(io("stat", &entry.path()))?;
                if !(kind.is_file() || kind.is_symlink()) {
                    return Err(RecordError::Corrupt {
                        path: entry.path(),
                        offset: None,
                        what: "not a regular file (a record writes only files here)".into(),
                    });
                }
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
            RecordWriter { dir: dir.to_path_buf(), spec: spec.clone(), tree, leaves: leaves_file, _lock: lock },
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

    /// Writes the checkpoint of `state` and returns its canonical bytes (which a leaf hashes).
    fn write_checkpoint(&self, state: &TrainingState) -> Result<Vec<u8>, RecordError> {
        let raw = state.encode();
        let stored = tielog::compress_canonical(&raw);
        write_atomic(&checkpoint_path(&self.dir, state.step), &stored)?;
        Ok(raw)
    }

    /// Commits the initial state as leaf 0 (with a checkpoint).
    pub fn commit_initial(&mut self, state: &TrainingState) -> Result<Leaf, RecordError> {
        if !self.tree.is_empty() || state.step != 0 {
            return Err(RecordError::Refused("the initial state must be the first leaf, at step 0".into()));
        }
        let leaf = Leaf::initial(self.spec.state_hash().of(&self.write_checkpoint(state)?));
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
        // Encode once: the stored form holds the canonical bytes the leaf hashes. Nothing is
        // written that the reader would refuse (a record no one could audit).
        let log_raw = log.encode();
        let batch_raw = batch.encode();
        if log_raw.len() > LOG_RAW_BYTES_MAX || batch_raw.len() as u64 > BATCH_FILE_BYTES_MAX {
            return Err(RecordError::Refused(format!(
                "step {step}: its tie-break log ({} bytes) or batch ({} bytes) is over what a record may hold \
                 ({LOG_RAW_BYTES_MAX} and {BATCH_FILE_BYTES_MAX} bytes)",
                log_raw.len(),
                batch_raw.len()
            )));
        }
        write_atomic(&log_path(&self.dir, step), &tielog::compress_canonical(&log_raw))?;
        write_atomic(&batch_path(&self.dir, step), &batch_raw)?;
        // A checkpoint's state is hashed from the bytes it writes; any other state in a
        // streaming pass.
        let state_hash = if step.is_multiple_of(self.spec.config.train.checkpoint_interval) {
            self.spec.state_hash().of(&self.write_checkpoint(state)?)
        } else {
            state.digest(self.spec.state_hash())
        };
        let leaf = Leaf { step, state: state_hash, log: codec::sha256(&log_raw), batch: codec::sha256(&batch_raw) };
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
        // Always (re)written unless it is a checkpoint already on an interval: a finished
        // record must checkpoint its final state (Record::open checks).
        if !(n_steps.is_multiple_of(self.spec.config.train.checkpoint_interval)
            && files::is_regular(&checkpoint_path(&self.dir, n_steps)))
        {
            self.write_checkpoint(final_state)?;
        }
        let mut m = Manifest {
            format_version: self.spec.format_version,
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_stored_state_fits_its_bound_however_it_compresses() {
        let bound = zstd::zstd_safe::compress_bound(super::STATE_RAW_BYTES_MAX) as u64;
        assert!(super::STATE_FILE_BYTES_MAX >= bound, "{} < {bound}", super::STATE_FILE_BYTES_MAX);
    }
}
