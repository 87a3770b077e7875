//! The datasets a daemon keeps, and which one a run's spec needs.
//!
//! A daemon has at most one MNIST directory and one text file (`[data] mnist`, `text`), used for
//! every spec of that kind, and any number of the users' own files by name (`[data.files]`):
//! CSV tables, safetensors tensors, token files, or more MNIST-style directories and texts. An
//! audit request may name the dataset (`"data": "NAME"`); otherwise the daemon uses the one
//! whose contents match the run's committed dataset (its kind, counts and Merkle root), trying
//! the kind's own path first and then the named files in name order. Which files match is
//! cached by each file's size and modification time, so the intervals of one audit (and a
//! fleet's helpers) do not load every candidate again.
//!
//! Every failure here is the daemon's own (its copies of the data), never the trainer's: the
//! audit fails `undecided` with a message naming each candidate and why it is not the run's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use engine::data::Dataset;
use engine::spec::{DataConfig, DatasetCommitment, RunSpec};

use super::DataSection;

/// Most remembered (file, spec) commitments; the memo is emptied when it is full.
const MEMO_MAX: usize = 256;

/// A name of `[data.files]` (and of a request's `data`): 1 to 64 of `[A-Za-z0-9._-]`, not
/// starting with `.`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The names the kinds' own paths go by.
pub const KIND_NAMES: [&str; 2] = ["mnist", "text"];

/// What a dataset's commitment depends on besides its file: the spec's data section and the
/// model's context (text windows).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct MemoKey {
    path: PathBuf,
    fingerprint: Vec<(String, u64, SystemTime)>,
    config: String,
}

/// The daemon's datasets.
#[derive(Debug, Default)]
pub struct Datasets {
    section: DataSection,
    memo: Mutex<BTreeMap<MemoKey, Result<DatasetCommitment, String>>>,
}

impl DataSection {
    /// Every name a request may give, in order: `mnist` and `text` when configured, then the
    /// files' names.
    pub fn names(&self) -> Vec<String> {
        let kinds = [("mnist", &self.mnist), ("text", &self.text)];
        let kinds = kinds.into_iter().filter(|(_, p)| p.is_some()).map(|(n, _)| n.to_string());
        kinds.chain(self.files.keys().cloned()).collect()
    }

    /// The path of the dataset called `name`.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        match name {
            "mnist" => self.mnist.as_deref(),
            "text" => self.text.as_deref(),
            _ => self.files.get(name).map(PathBuf::as_path),
        }
    }

    /// Why a request's `data` names nothing here, listing what is.
    pub fn unknown(&self, name: &str) -> String {
        let names = self.names();
        let has = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        format!("data: this daemon has no dataset named {name:?} (it has: {has})")
    }
}

impl Datasets {
    pub fn new(section: DataSection) -> Datasets {
        Datasets { section, memo: Mutex::default() }
    }

    /// The dataset `spec` needs: `None` for synthetic data; the one `named`, when the request
    /// names one (the replay then checks it against the commitment and names it if it differs);
    /// otherwise the only candidate, or the one whose contents match the spec's commitment.
    /// `Err` says why none can be used, naming each candidate.
    pub fn for_spec(&self, spec: &RunSpec, named: Option<&str>) -> Result<Option<PathBuf>, String> {
        let d = &self.section;
        if let Some(name) = named {
            return d.path_of(name).map(|p| Some(p.to_path_buf())).ok_or_else(|| d.unknown(name));
        }
        let own = match &spec.config.data {
            DataConfig::Synthetic(_) => return Ok(None),
            DataConfig::Mnist(_) => d.mnist.as_ref().map(|p| ("mnist", p)),
            DataConfig::Text(_) => d.text.as_ref().map(|p| ("text", p)),
            DataConfig::Tensors(_) | DataConfig::Csv(_) | DataConfig::Tokens(_) => None,
        };
        // An MNIST dataset is a directory, every other kind a file: the rest cannot be the run's.
        let dir = matches!(spec.config.data, DataConfig::Mnist(_));
        let files = d.files.iter().filter(|(_, p)| p.is_dir() == dir).map(|(n, p)| (n.as_str(), p));
        let candidates: Vec<(&str, &PathBuf)> = own.into_iter().chain(files).collect();
        let kind = spec.dataset.kind.as_str();
        match candidates.as_slice() {
            [] => Err(format!(
                "this daemon has no {kind} dataset for this run (give it one with --data NAME=PATH or [data.files] \
                 in its config)"
            )),
            // One candidate: the replay checks it, and names it if it is not the run's.
            [(_, path)] => Ok(Some(path.to_path_buf())),
            _ => {
                let mut tried = Vec::new();
                for (name, path) in candidates {
                    match self.commitment(spec, path) {
                        Ok(c) if c == spec.dataset => return Ok(Some(path.clone())),
                        Ok(c) => {
                            tried.push(format!("{name} ({}): root {}, {} examples", path.display(), c.root, c.leaves))
                        }
                        Err(e) => tried.push(format!("{name}: {e}")),
                    }
                }
                let want = &spec.dataset;
                Err(format!(
                    "none of this daemon's datasets is the run's committed {kind} data (root {}, {} examples); {}",
                    want.root,
                    want.leaves,
                    tried.join("; ")
                ))
            }
        }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, BTreeMap<MemoKey, Result<DatasetCommitment, String>>> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The commitment of `path` read as `spec`'s data, remembered by the file's size and
    /// modification time (a directory's: those of its entries).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "clinic-a", "v1.2_x", &"x".repeat(64)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_config_names_its_files_and_a_bad_name_is_refused_naming_it() {
        let toml = "[data]\nmnist = \"m\"\n[data.files]\nclinic-a = \"a.csv\"\nb = \"b.safetensors\"\n";
        let cfg = super::super::Config::from_toml(toml, "t.toml").unwrap();
        assert_eq!(cfg.data.names(), ["mnist", "b", "clinic-a"]);
        assert_eq!(cfg.data.path_of("clinic-a"), Some(Path::new("a.csv")));
        assert_eq!(cfg.data.path_of("text"), None);
        assert!(cfg.data.unknown("zz").contains("(it has: mnist, b, clinic-a)"));
        for bad in ["mnist", "text", "\".x\"", "\"a b\""] {
            let toml = format!("[data.files]\n{bad} = \"a.csv\"\n");
            let e = super::super::Config::from_toml(&toml, "t.toml").unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains("data.files") && e.contains(bad.trim_matches('"')), "{e}");
        }
    }
}
