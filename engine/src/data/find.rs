//! Which of several files is a run's dataset: the one whose commitment (kind, counts and
//! Merkle root) is the spec's. Both servers keep datasets for many runs: the auditor daemon its
//! copies by name, the record server the trainer's by kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::Dataset;
use crate::spec::{DataConfig, DatasetCommitment, RunSpec};

/// Most remembered (file, spec) commitments; the memo is emptied when it is full.
const MEMO_MAX: usize = 256;

/// What a file's commitment as a run's data depends on: the file (its size and modification
/// time, or a directory's entries'), and the spec's data and model sections (text windows).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct MemoKey {
    path: PathBuf,
    fingerprint: Vec<(String, u64, SystemTime)>,
    config: String,
}

/// Finds a run's dataset among candidate files, remembering each file's commitment by its size
/// and modification time, so the many requests of one audit do not load every candidate again.
#[derive(Debug, Default)]
pub struct DatasetFinder {
    memo: Mutex<BTreeMap<MemoKey, Result<DatasetCommitment, String>>>,
}

impl DatasetFinder {
    /// The run's dataset among `candidates` (a name for messages, and a path): the only one
    /// that can hold the spec's kind of data (an MNIST dataset is a directory, every other kind
    /// a file), loaded by whoever uses it, which checks it against the commitment and names it
    /// if it differs; or, among several, the one whose commitment is the spec's. `Err` says why
    /// none is, naming each candidate and what it holds.
    pub fn find(&self, spec: &RunSpec, candidates: &[(&str, &Path)]) -> Result<PathBuf, String> {
        let dir = matches!(spec.config.data, DataConfig::Mnist(_));
        let fit: Vec<&(&str, &Path)> = candidates.iter().filter(|(_, p)| p.is_dir() == dir).collect();
        let kind = spec.dataset.kind.as_str();
        let want = &spec.dataset;
        match fit.as_slice() {
            [] if candidates.is_empty() => Err(format!("no {kind} dataset")),
            [] => Err(format!(
                "none of {} holds {kind} data (an MNIST dataset is a directory, every other kind a file)",
                candidates.iter().map(|(n, p)| format!("{n} ({})", p.display())).collect::<Vec<_>>().join(", ")
            )),
            [(_, path)] => Ok(path.to_path_buf()),
            _ => {
                let mut tried = Vec::new();
                for (name, path) in fit {
                    match self.commitment(spec, path) {
                        Ok(c) if c == *want => return Ok(path.to_path_buf()),
                        Ok(c) => {
                            tried.push(format!("{name} ({}): root {}, {} examples", path.display(), c.root, c.leaves))
                        }
                        Err(e) => tried.push(format!("{name}: {e}")),
                    }
                }
                Err(format!(
                    "none of the {kind} datasets is the run's (root {}, {} examples); {}",
                    want.root,
                    want.leaves,
                    tried.join("; ")
                ))
            }
        }
    }

    fn memo(&self) -> MutexGuard<'_, BTreeMap<MemoKey, Result<DatasetCommitment, String>>> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The commitment of `path` read as `spec`'s data.
    fn commitment(&self, spec: &RunSpec, path: &Path) -> Result<DatasetCommitment, String> {
        let config = serde_json::to_string(&(&spec.config.data, &spec.config.model)).unwrap_or_default();
        let key = fingerprint(path).map(|fingerprint| MemoKey { path: path.to_path_buf(), fingerprint, config });
        if let Ok(key) = &key
            && let Some(known) = self.memo().get(key)
        {
            return known.clone();
        }
        let found = Dataset::for_config(&spec.config, Some(path)).map(|d| d.commitment()).map_err(|e| e.to_string());
        if let Ok(key) = key {
            let mut m = self.memo();
            if m.len() >= MEMO_MAX {
                m.clear();
            }
            m.insert(key, found.clone());
        }
        found
    }
}

/// Size and modification time of `path`, or of each entry of a directory (by name).
fn fingerprint(path: &Path) -> std::io::Result<Vec<(String, u64, SystemTime)>> {
    let stamp = |m: &std::fs::Metadata| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        let (len, t) = stamp(&meta);
        return Ok(vec![(String::new(), len, t)]);
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(path)? {
        let e = e?;
        let (len, t) = stamp(&e.metadata()?);
        entries.push((e.file_name().to_string_lossy().into_owned(), len, t));
    }
    entries.sort();
    Ok(entries)
}
