//! The trainer agent: embed it in a training loop to train verifiably and write a committed
//! record an auditor can check.
//!
//! The embedding API follows the life of a run:
//! 1. [`Session::create`] makes a run from a spec (or resumes an interrupted one);
//! 2. [`Session::batch`] gives each step's batch (from the committed seed);
//! 3. [`Session::run_step`] runs the step through the verified layers;
//! 4. [`Session::commit`] commits it to the record;
//! 5. [`Session::finish`] writes the signed manifest and returns it.
//!
//! See `examples/embed.rs`. [`serve`] is the record server an auditor fetches a run from over
//! HTTP. The CLI (`trainer-agent train|inspect|export|serve`) is a thin layer over this library.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::leaf::{BatchIndices, Leaf};
use common::state::TrainingState;
use engine::data::Dataset;
use engine::record::{Manifest, RecordWriter, SigningKey, load_or_create_key};
use engine::spec::{Config, RunSpec};
use engine::train::{Evaluation, Fault, FaultKind, Run, StepMode, StepOutput};
use engine::{EngineError, record::RecordError};
use kernels::{Device, Profile};

pub mod export;

pub mod serve;

/// Why the trainer agent could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error("{0}")]
    Usage(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// The record server's listener failed.
    #[error("serve: {0}")]
    Serve(std::io::Error),
}

/// What a session is created from.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub config: Config,
    /// `--data`: a directory of MNIST IDX files or a text file, as the config needs.
    pub data: Option<PathBuf>,
    /// The record directory.
    pub out: PathBuf,
    pub device: Profile,
    /// Overrides the config's number of steps.
    pub steps: Option<u64>,
    /// Continue an interrupted record in `out` instead of starting a new one.
    pub resume: bool,
    /// Adversary drills.
    pub faults: Vec<Fault>,
    /// Signing key file; default `<out>/../trainer.key`, generated if absent.
    pub key: Option<PathBuf>,
    /// `--init-weights`: a fine-tune's starting weights (safetensors with candle-nn names, as
    /// `export` writes). The spec commits to the file's SHA-256 and size, and the record keeps
    /// a copy, so an auditor replays from the very same bytes.
    pub init_weights: Option<PathBuf>,
}

/// Default location of the trainer's signing key: beside the record directory.
pub fn default_key_path(out: &Path) -> PathBuf {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.join("trainer.key")
}

/// A training run in progress, writing its record.
#[derive(Debug)]
pub struct Session {
    run: Run,
    writer: RecordWriter,
    state: TrainingState,
    faults: BTreeMap<u64, FaultKind>,
    n_steps: u64,
    /// ed25519-dalek's `Debug` prints only the public half.
    key: SigningKey,
    last_loss: Option<f32>,
    resumed_from: Option<u64>,
    /// `<out>/losses.txt`, appended after every commit (see [`LOSSES_FILE`]).
    losses: Option<std::fs::File>,
}

/// The trainer's per-step losses, `<step> <loss>` a line, beside the record (`inspect --plot`
/// draws them). Informational and **not committed**: nothing verifies it, the auditor never
/// reads it, and a resumed run appends the steps it recomputes again (the last line of a step
/// counts).
pub const LOSSES_FILE: &str = "losses.txt";

/// The most of `losses.txt` read (about 8 million steps' lines).
const LOSSES_FILE_BYTES_MAX: u64 = 256 << 20;

/// The losses in `dir/losses.txt` by step (the last line of each step wins); empty when the
/// file is absent. Lines that do not parse are skipped: the file is not part of the record.
pub fn read_losses(dir: &Path) -> BTreeMap<u64, f64> {
    let text = common::files::read_regular_text(&dir.join(LOSSES_FILE), LOSSES_FILE_BYTES_MAX).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (step, loss) = l.split_once(' ')?;
            Some((step.parse().ok()?, loss.trim().parse::<f64>().ok().filter(|v| v.is_finite())?))
        })
        .collect()
}

/// Whether a `--key` value is a hex secret rather than a path (64 hex digits, nothing else).
fn looks_like_a_secret(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Reads a starting-weights file, refusing anything but a regular file of bounded size.
fn read_init_weights(path: &std::path::Path) -> Result<Vec<u8>, TrainerError> {
    common::files::read_regular(path, engine::init::INIT_WEIGHTS_BYTES_MAX)
        .map_err(|e| TrainerError::Usage(format!("--init-weights {}: {e}", path.display())))
}

/// The number of steps a config asks for, given the training split and batch size.
pub fn planned_steps(config: &Config, n_train: usize) -> u64 {
    let spe = (n_train / config.train.batch_size).max(1) as u64;
    config.train.steps.unwrap_or_else(|| config.train.epochs.unwrap_or(1) * spe)
}

impl Session {
    /// Creates a run (or resumes one) from options: loads and commits the dataset, builds the
    /// spec, opens the record and the signing key. Nothing on disk is touched until every input
    /// has been validated.
    pub fn create(opts: &SessionOptions) -> Result<Session, TrainerError> {
        // Range-check the config before its numbers size anything (the dataset first).
        let sizes = opts.config.validate().map_err(|e| EngineError::InvalidSpec(e.under("config.")))?;
        // A run this machine cannot hold is refused now, not by an abort mid-run.
        engine::memory::check(engine::memory::run_bytes(&sizes, 1), engine::memory::available())
            .map_err(TrainerError::Usage)?;
        let data = Dataset::for_config(&opts.config, opts.data.as_deref())?;
        let n_steps = opts.steps.unwrap_or_else(|| planned_steps(&opts.config, data.n_train()));
        if n_steps == 0 {
            return Err(TrainerError::Usage("--steps must be at least 1".into()));
        }
        // The spec's config plans exactly the steps run (a `--steps` override is written in).
        let config = opts.config.clone().with_planned_steps(n_steps, data.n_train() as u64);
        let mut faults = BTreeMap::new();
        for f in &opts.faults {
            if f.step > n_steps {
                return Err(TrainerError::Usage(format!(
                    "fault {}@{} is beyond the run's {n_steps} steps",
                    f.kind.name(),
                    f.step
                )));
            }
            if faults.insert(f.step, f.kind).is_some() {
                return Err(TrainerError::Usage(format!("more than one fault at step {}", f.step)));
            }
        }
        let mut spec = RunSpec::new(config, data.commitment(), opts.device.name(), n_steps);
        let init_weights = match &opts.init_weights {
            None => None,
            Some(path) => {
                let bytes = read_init_weights(path)?;
                spec.init_weights = Some(engine::init::WeightsCommitment::of(&bytes));
                Some(bytes)
            }
        };
        // Refuses a spec that fails `RunSpec::validate` before anything is written.
        let mut run = Run::new(spec.clone(), data, Device::new(opts.device)?)?;
        if let (Some(bytes), Some(path)) = (&init_weights, &opts.init_weights) {
            run.load_init_weights(bytes)
                .map_err(|p| TrainerError::Usage(format!("--init-weights {}: {p}", path.display())))?;
        }
        let key_path = opts.key.clone().unwrap_or_else(|| default_key_path(&opts.out));
        if opts.key.is_some() && !key_path.exists() && looks_like_a_secret(&key_path) {
            return Err(TrainerError::Usage(
                "--key takes the path of a key file, and no file is named like these 64 hex digits: to sign with \
                 that secret, write it to a file (e.g. trainer.key) and pass --key trainer.key; nothing was written \
                 (a key would otherwise have been generated under that name)"
                    .into(),
            ));
        }
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        if absolute(&key_path).starts_with(absolute(&opts.out)) {
            return Err(TrainerError::Usage(format!(
                "--key {}: inside the record directory {}, which holds the record alone (it is served and \
                 published); keep the signing key outside it",
                key_path.display(),
                opts.out.display()
            )));
        }
        // A start killed before it wrote its spec left nothing to resume: start afresh.
        // So did one killed before its first leaf (`create` checks that the spec is the same).
        let resume = opts.resume && !RecordWriter::unstarted(&opts.out) && !RecordWriter::no_leaf_committed(&opts.out);
        let load_key = || {
            load_or_create_key(&key_path).map_err(|e| match e {
                // The key is the trainer's own file, not a record file.
                engine::record::RecordError::Corrupt { what, .. } => {
                    TrainerError::Usage(format!("signing key {}: {what}", key_path.display()))
                }
                e => e.into(),
            })
        };
        let (writer, state, resumed_from, key) = if resume {
            // The record is checked (and a torn last step repaired) first, so that what is
            // wrong with it is said before the key. A missing key is refused, never minted: a
            // new key would sign the run as someone else's.
            let (writer, point) = RecordWriter::resume(&opts.out, &spec)?;
            if !key_path.exists() {
                return Err(TrainerError::Usage(format!(
                    "signing key {}: no such file; a run is resumed with the key it was started with (a new \
                     key would sign it as someone else's); the record is left resumable",
                    key_path.display()
                )));
            }
            let key = load_key()?;
            let from = point.state.step;
            (writer, point.state, Some(from), key)
        } else {
            // Before anything is written: a key file that does not load leaves no record behind.
            let key = load_key()?;
            let mut writer = RecordWriter::create(&opts.out, &spec)?;
            if let Some(bytes) = &init_weights {
                writer.store_init_weights(bytes)?;
            }
            let state = run.initial_state()?;
            writer.commit_initial(&state)?;
            (writer, state, None, key)
        };
        let losses_path = opts.out.join(LOSSES_FILE);
        let losses = std::fs::OpenOptions::new().create(true).append(true).open(&losses_path);
        if let Err(e) = &losses {
            tracing::warn!(path = %losses_path.display(), error = %e, "per-step losses will not be kept");
        }
        Ok(Session { run, writer, state, faults, n_steps, key, last_loss: None, resumed_from, losses: losses.ok() })
    }

    /// The run being trained.
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// Planned number of steps.
    pub fn n_steps(&self) -> u64 {
        self.n_steps
    }

    /// The step that runs next (1-based), or `None` when all planned steps are done.
    pub fn next_step(&self) -> Option<u64> {
        (self.state.step < self.n_steps).then_some(self.state.step + 1)
    }

    /// The state after the last committed step.
    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    /// If the session resumed an interrupted record: the checkpointed step it restarted from.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Loss of the last step run.
    pub fn last_loss(&self) -> Option<f32> {
        self.last_loss
    }

    /// The honest batch of `step`, as the committed seed dictates.
    pub fn batch(&self, step: u64) -> BatchIndices {
        self.run.batch_indices(step)
    }

    /// Runs the next step through the verified layers (applying a drill if one is scheduled).
    pub fn run_step(&self) -> Result<StepOutput, TrainerError> {
        let step =
            self.next_step().ok_or_else(|| TrainerError::Usage(format!("all {} steps are done", self.n_steps)))?;
        let fault = self.faults.get(&step).copied();
        Ok(self.run.step(&self.state, step, StepMode::Commit { paper: false }, fault)?)
    }

    /// Commits a step produced by [`Session::run_step`] and makes its state current.
    pub fn commit(&mut self, out: StepOutput) -> Result<Leaf, TrainerError> {
        let leaf = self.writer.commit_step(&out.state, &out.log, &out.batch)?;
        self.last_loss = Some(out.loss);
        if let Some(f) = &mut self.losses {
            use std::io::Write;
            // Informational only: a failed write loses a plot point, never the record.
            if let Err(e) = writeln!(f, "{} {:e}", out.state.step, out.loss) {
                tracing::warn!(error = %e, "per-step losses: write failed; no more will be kept");
                self.losses = None;
            }
        }
        self.state = out.state;
        Ok(leaf)
    }

    /// Runs and commits the next step.
    pub fn step(&mut self) -> Result<Leaf, TrainerError> {
        let out = self.run_step()?;
        self.commit(out)
    }

    /// Evaluates the current state on up to `max` held-out examples.
    pub fn evaluate(&self, max: usize) -> Result<Evaluation, TrainerError> {
        Ok(self.run.evaluate(&self.state, max)?)
    }

    /// Writes the final checkpoint and the signed manifest.
    pub fn finish(self) -> Result<Manifest, TrainerError> {
        if self.state.step != self.n_steps {
            return Err(TrainerError::Usage(format!("finish at step {} of {}", self.state.step, self.n_steps)));
        }
        Ok(self.writer.finish(&self.state, &self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(out: PathBuf) -> SessionOptions {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/synthetic-mlp.toml");
        let config = Config::from_toml(&std::fs::read_to_string(path).unwrap(), path).unwrap();
        SessionOptions {
            config,
            data: None,
            key: Some(out.with_extension("key")),
            out,
            device: Profile::Cpu,
            steps: Some(3),
            resume: false,
            faults: Vec::new(),
            init_weights: None,
        }
    }

    #[test]
    fn a_run_whose_spec_is_invalid_does_not_start() {
        let out = std::env::temp_dir().join(format!("tiebreak-agent-invalid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        // A config built in code bypasses the TOML checks; the session still refuses it.
        for (field, edit) in [
            ("config.train.batch_size", (|c: &mut Config| c.train.batch_size = 0) as fn(&mut Config)),
            ("config.train.checkpoint_interval", |c| c.train.checkpoint_interval = 0),
        ] {
            let mut opts = options(out.clone());
            edit(&mut opts.config);
            match Session::create(&opts) {
                Err(TrainerError::Engine(EngineError::InvalidSpec(e))) => assert_eq!(e.field, field),
                other => panic!("{field}: expected InvalidSpec, got {other:?}"),
            }
            assert!(!out.exists(), "{field}: nothing may be written");
        }
        // A --steps override is written into the spec's config, so the spec stays valid.
        let session = Session::create(&options(out.clone())).unwrap();
        assert_eq!(session.run().spec.config.train.steps, Some(3));
        session.run().spec.validate().unwrap();
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_file(out.with_extension("key"));
    }
}
