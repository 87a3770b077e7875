//! The datasets a daemon keeps, and which one a run's spec needs.
//!
//! A daemon has at most one MNIST directory and one text file (`[data] mnist`, `text`), used for
//! every spec of that kind, and any number of the users' own files by name (`[data.files]`):
//! CSV tables, safetensors tensors, token files, or more MNIST-style directories and texts. An
//! audit request may name the dataset (`"data": "NAME"`); otherwise the daemon uses the one
//! whose contents match the run's committed dataset (its kind, counts and Merkle root), trying
//! the kind's own path first and then the named files in name order
//! ([`engine::data::DatasetFinder`], which remembers each file's commitment by its size and
//! modification time, so the intervals of one audit and a fleet's helpers do not load every
//! candidate again).
//!
//! Every failure here is the daemon's own (its copies of the data), never the trainer's: the
//! audit fails `undecided` with a message naming each candidate and why it is not the run's.

use std::path::{Path, PathBuf};

use engine::data::DatasetFinder;
use engine::spec::{DataConfig, RunSpec};

use super::DataSection;

/// A name of `[data.files]` (and of a request's `data`): 1 to 64 of `[A-Za-z0-9._-]`, not
/// starting with `.`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The names the kinds' own paths go by.
pub const KIND_NAMES: [&str; 2] = ["mnist", "text"];

/// The daemon's datasets.
#[derive(Debug, Default)]
pub struct Datasets {
    section: DataSection,
    finder: DatasetFinder,
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
        Datasets { section, finder: DatasetFinder::default() }
    }

    /// The dataset `spec` needs: `None` for synthetic data; the one `named`, when the request
    /// names one (the replay then checks it against the commitment and names it if it differs);
    /// otherwise the kind's own path first, then the files in name order, as
    /// [`DatasetFinder::find`] picks among them. `Err` says why none can be used.
    pub fn for_spec(&self, spec: &RunSpec, named: Option<&str>) -> Result<Option<PathBuf>, String> {
        let d = &self.section;
        if let Some(name) = named {
            return d.path_of(name).map(|p| Some(p.to_path_buf())).ok_or_else(|| d.unknown(name));
        }
        let own = match &spec.config.data {
            DataConfig::Synthetic(_) => return Ok(None),
            DataConfig::Mnist(_) => d.mnist.as_deref().map(|p| ("mnist", p)),
            DataConfig::Text(_) => d.text.as_deref().map(|p| ("text", p)),
            DataConfig::Tensors(_) | DataConfig::Csv(_) | DataConfig::Tokens(_) => None,
        };
        let files = d.files.iter().map(|(n, p)| (n.as_str(), p.as_path()));
        let candidates: Vec<(&str, &Path)> = own.into_iter().chain(files).collect();
        self.finder
            .find(spec, &candidates)
            .map(Some)
            .map_err(|e| format!("{e} (this daemon's datasets come from --data NAME=PATH or [data] in its config)"))
    }
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
        // The paths must be there (checked at start).
        let dir = std::env::temp_dir().join(format!("tiebreak-datasets-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        for f in ["a.csv", "b.safetensors"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let at = |f: &str| dir.join(f).display().to_string();
        let toml = format!(
            "[data]\nmnist = {:?}\n[data.files]\nclinic-a = {:?}\nb = {:?}\n",
            at("m"),
            at("a.csv"),
            at("b.safetensors")
        );
        let cfg = super::super::Config::from_toml(&toml, "t.toml").unwrap();
        assert_eq!(cfg.data.names(), ["mnist", "b", "clinic-a"]);
        assert_eq!(cfg.data.path_of("clinic-a"), Some(dir.join("a.csv").as_path()));
        assert_eq!(cfg.data.path_of("text"), None);
        assert!(cfg.data.unknown("zz").contains("(it has: mnist, b, clinic-a)"));
        for bad in ["mnist", "text", "\".x\"", "\"a b\""] {
            let toml = format!("[data.files]\n{bad} = \"a.csv\"\n");
            let e = super::super::Config::from_toml(&toml, "t.toml").unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains("data.files") && e.contains(bad.trim_matches('"')), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
