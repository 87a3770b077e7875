//! Run configuration (TOML, what a person writes) and the run spec (JSON, what a record commits
//! to: the configuration plus the dataset commitment, device profile and versions).
//!
//! Every struct denies unknown fields, so a typo in a config is an error naming the field and
//! the line, not a silently ignored setting.

use serde::{Deserialize, Serialize};

use crate::EngineError;

mod validate;
pub use validate::{
    ACTIVATION_VALUES_MAX, BATCH_SIZE_MAX, CLASSES_MAX, LAYERS_MAX, MNIST_EXAMPLES_MAX, STEPS_MAX,
    SYNTHETIC_VALUES_MAX, Sizes, SpecInvalid, TEXT_VOCAB_MAX,
};

/// Version of the record format this build writes.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest record format this build reads: formats 3 to 5 differ only in the state hash
/// ([`RunSpec::state_hash`]) and in how batch norm and average pooling sum ([`RunSpec::sums`]),
/// so this build audits each with its own definitions.
pub const FORMAT_OLDEST_READ: u32 = 3;
/// This software's version, recorded in every spec and report.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A training configuration, as read from `configs/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule (absent: constant, and not serialised, so such specs hash as
    /// before schedules existed).
    #[serde(default, skip_serializing_if = "crate::schedule::Schedule::is_constant")]
    pub schedule: crate::schedule::Schedule,
}

/// The model architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelConfig {
    /// Fully connected layers with ReLU between them.
    Mlp(MlpConfig),
    /// Two conv + ReLU + 2×2 max-pool blocks, then a linear classifier.
    Cnn(CnnConfig),
    /// A character-level GPT (pre-norm transformer decoder).
    Gpt(GptConfig),
    /// A user-defined graph of ops from the verified catalogue (see [`crate::graph`]).
    Graph(crate::graph::GraphConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    /// Output channels of the two conv layers (3×3, padding 1).
    pub channels: [usize; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub context: usize,
    /// Dropout probability after attention and MLP blocks (masks come from the seeded PRNG).
    #[serde(default)]
    pub dropout: f64,
}

/// Where the examples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataConfig {
    /// A deterministic synthetic classification task generated from the seed (no files).
    Synthetic(SyntheticConfig),
    /// MNIST in IDX format (gzip or raw), from `--data <dir>`.
    Mnist(MnistConfig),
    /// A plain text file, from `--data <file>`, for a character-level model.
    Text(TextConfig),
    /// A safetensors file, from `--data <file>`: inputs `x` and class labels `y`.
    Tensors(TensorsConfig),
    /// A CSV file of numbers, from `--data <file>`: one example a row, one column its label.
    Csv(CsvConfig),
    /// A file of little-endian token ids, from `--data <file>`, for the GPT.
    Tokens(TokensConfig),
}

/// What kind of data a dataset commitment covers: one per [`DataConfig`] variant, spelled as
/// its `kind` (so commitments serialise as before this enum existed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    Synthetic,
    Mnist,
    Text,
    Tensors,
    Csv,
    Tokens,
}

impl DataKind {
    /// The wire and log name (the config's `data.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Synthetic => "synthetic",
            DataKind::Mnist => "mnist",
            DataKind::Text => "text",
            DataKind::Tensors => "tensors",
            DataKind::Csv => "csv",
            DataKind::Tokens => "tokens",
        }
    }
}

impl DataConfig {
    /// The kind of data this config names.
    pub fn kind(&self) -> DataKind {
        match self {
            DataConfig::Synthetic(_) => DataKind::Synthetic,
            DataConfig::Mnist(_) => DataKind::Mnist,
            DataConfig::Text(_) => DataKind::Text,
            DataConfig::Tensors(_) => DataKind::Tensors,
            DataConfig::Csv(_) => DataKind::Csv,
            DataConfig::Tokens(_) => DataKind::Tokens,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    pub examples: usize,
    pub holdout: usize,
    pub features: usize,
    pub classes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistConfig {
    /// Examples used for training (taken first from the file).
    pub train: usize,
    /// Examples held out for evaluation (the ones after the training examples).
    pub holdout: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// Fraction of the text (at the end) held out for evaluation, in 0..1.
    #[serde(default)]
    pub holdout_fraction: f64,
}

/// A user's safetensors dataset. The config states the shape of one example so that the spec
/// alone sizes the model (an auditor validates a spec before it reads any file); the loader
/// checks the file against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorsConfig {
    /// Shape of one example's input (`x` is `[N, ..input_shape]`).
    pub input_shape: Vec<usize>,
    /// Number of classes; every label must be below it. 0 (the default) with `target_shape`.
    #[serde(default)]
    pub classes: usize,
    /// Examples held out for evaluation (the last ones of the file).
    pub holdout: usize,
    /// Regression: `y` holds F32 targets `[N, ..target_shape]` instead of class labels (a
    /// graph with an `mse` loss against `labels` trains on them). Absent for labels, and then not
    /// serialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_shape: Option<Vec<usize>>,
}

/// Which CSV column holds the label: a 0-based index, or a header name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LabelColumn {
    Index(usize),
    Name(String),
}

impl<'de> Deserialize<'de> for LabelColumn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LabelColumn, D::Error> {
        number_or_word(d, "a column: its 0-based index, or its header name", LabelColumn::Index, |w| {
            Some(LabelColumn::Name(w.to_string()))
        })
    }
}

/// Reads a value that is a whole number or a word, the way a derived untagged enum reads it,
/// but with an error in the user's words (`expecting`) instead of "data did not match any
/// variant of untagged enum". `word` returns `None` for a word that is not accepted.
pub(crate) fn number_or_word<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    number: fn(usize) -> T,
    word: fn(&str) -> Option<T>,
) -> Result<T, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};
    struct NumberOrWord<T> {
        expecting: &'static str,
        number: fn(usize) -> T,
        word: fn(&str) -> Option<T>,
    }
    impl<T> Visitor<'_> for NumberOrWord<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_u64<E: Error>(self, n: u64) -> Result<T, E> {
            usize::try_from(n).map(self.number).map_err(|_| E::invalid_value(Unexpected::Unsigned(n), &self))
        }
        fn visit_i64<E: Error>(self, n: i64) -> Result<T, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
            }
        }
        fn visit_str<E: Error>(self, s: &str) -> Result<T, E> {
            (self.word)(s).ok_or_else(|| E::invalid_value(Unexpected::Str(s), &self))
        }
    }
    d.deserialize_any(NumberOrWord { expecting, number, word })
}

/// A user's CSV dataset: every row one example, every column a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The label column (index or header name).
    pub label_column: LabelColumn,
    /// Whether the first line names the columns.
    #[serde(default)]
    pub header: bool,
    /// Number of feature columns (all columns but the label), stated so the spec sizes the model.
    pub features: usize,
    /// Number of classes; every label must be an integer below it.
    pub classes: usize,
    /// Examples held out for evaluation (the last rows).
    pub holdout: usize,
}

/// Width of one token id in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// Bytes per token id.
    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// A user's token file (e.g. the output of a BPE tokenizer) for the GPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// Little-endian width of each id.
    pub dtype: TokenDtype,
    /// Vocabulary size; every id must be below it.
    pub vocab: usize,
    /// Fraction of the tokens (at the end) held out for evaluation, in 0..0.5.
    #[serde(default)]
    pub holdout_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    /// Number of steps; if absent, `epochs` over the training split.
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default)]
    pub epochs: Option<u64>,
    pub seed: u64,
    /// A full-state checkpoint every this many steps (and at step 0).
    pub checkpoint_interval: u64,
    /// Global gradient-norm clipping: gradients are scaled by `min(1, clip_norm / ‖g‖)` before
    /// the optimizer. Absent: off (and not serialised, so such specs hash as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Gradient accumulation: each step's batch is split into this many equal micro-batches
    /// whose gradients are averaged. Default 1 (not serialised, so such specs hash as before).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub accumulate: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The optimizer and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    Adamw(AdamwConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamwConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

/// The largest config file read. A run's config must fit its `spec.json` (1 MiB as JSON), so
/// twice that leaves room for comments; the TOML parser takes about 240 bytes of memory per
/// byte of a long array, so a larger bound would let a config take gigabytes before its
/// values are checked.
pub const CONFIG_FILE_BYTES_MAX: u64 = 2 << 20;

impl Config {
    /// Reads and parses the TOML config at `path`: a regular file of at most
    /// [`CONFIG_FILE_BYTES_MAX`] bytes (a FIFO or a device is refused, not waited on).
    pub fn load(path: &std::path::Path) -> Result<Config, EngineError> {
        let origin = path.display().to_string();
        let text = common::files::read_regular_text(path, CONFIG_FILE_BYTES_MAX)
            .map_err(|e| EngineError::Config { origin: origin.clone(), detail: format!("reading it: {e}") })?;
        Config::from_toml(&text, &origin)
    }

    /// Parses a TOML config; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, EngineError> {
        let cfg: Config = toml::from_str(text).map_err(|e| EngineError::Config {
            origin: origin.to_string(),
            detail: field_at_fault(text, &e).unwrap_or_else(|| e.to_string()),
        })?;
        cfg.validate().map_err(|e| EngineError::Config { origin: origin.to_string(), detail: e.to_string() })?;
        // A run spec may carry both (an older build wrote them so); a config asks for one.
        if cfg.train.steps.is_some() && cfg.train.epochs.is_some() {
            return Err(EngineError::Config {
                origin: origin.to_string(),
                detail: "train.epochs: set train.steps or train.epochs, not both (train.steps would win)".into(),
            });
        }
        Ok(cfg)
    }
}

/// The field a TOML error inside a `kind`-tagged table is about, and the error, as
/// `model.channels: invalid length 1, …`.
///
/// serde reads a tagged table (`[model]`, `[data]`, `[optimizer]`, `[schedule]`) whole before
/// it looks inside, so the TOML error points at the table's header, not the field. The field
/// is found by taking each of the table's keys out in turn: only taking out the one at fault
/// changes the error (fields are read in order, and a missing one is reported only after the
/// rest). `None` when the error already points at a field, or no single key changes it.
fn field_at_fault(text: &str, e: &toml::de::Error) -> Option<String> {
    // The span is the whole table; its first line is the header.
    let header = text.get(e.span()?)?.trim_start().lines().next()?.trim();
    let section = header.strip_prefix('[')?.split(']').next()?.trim();
    let doc: toml::Table = toml::from_str(text).ok()?;
    // The error of the document as this function re-writes it (its tables in another order).
    let message = |doc: &toml::Table| match toml::from_str::<Config>(&toml::to_string(doc).ok()?) {
        Ok(_) => Some(String::new()),
        Err(e) => Some(e.message().to_string()),
    };
    let before = message(&doc)?;
    // A missing field is named by the error itself (taking another key out would only move the
    // blame onto that key).
    if let Some(name) = before.trim_end().strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
        return Some(format!("{section}.{name}: missing (a required field)"));
    }
    for key in doc.get(section)?.as_table()?.keys().filter(|k| *k != "kind") {
        let mut without = doc.clone();
        without.get_mut(section)?.as_table_mut()?.remove(key);
        if message(&without)? != before {
            // A graph's nodes: name the first node that does not parse on its own.
            if let Some(nodes) = doc.get(section)?.get(key).and_then(toml::Value::as_array).filter(|_| key == "nodes") {
                for (i, node) in nodes.iter().enumerate() {
                    if let Err(e) = node.clone().try_into::<crate::graph::Node>() {
                        let name = node.get("name").and_then(toml::Value::as_str).unwrap_or("?");
                        return Some(format!("{section}.{key}[{i}] (node {name:?}): {}", e.message().trim_end()));
                    }
                }
            }
            return Some(format!("{section}.{key}: {}", before.trim_end()));
        }
    }
    None
}

/// The commitment to a dataset: a Merkle root over its examples, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetCommitment {
    /// The kind of data (serialised as the config's `data.kind`).
    pub kind: DataKind,
    /// Number of committed leaves (examples, or text chunks for `text`).
    pub leaves: u64,
    /// Examples available for training.
    pub n_train: u64,
    /// Examples held out for evaluation.
    pub n_holdout: u64,
    /// Hex Merkle root (RFC 6962) over the example encodings.
    pub root: String,
}

/// What a record commits to about its run. Its SHA-256 (of the JSON below) is in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub format_version: u32,
    pub software_version: String,
    pub config: Config,
    pub dataset: DatasetCommitment,
    /// The trainer's device profile.
    pub device_profile: String,
    /// Planned number of steps.
    pub n_steps: u64,
    /// Starting weights (a fine-tune): the committed file, stored in the record as
    /// [`crate::init::INIT_WEIGHTS_FILE`]. Absent: parameters are initialised from the seed
    /// (and the field is not serialised, so such specs hash as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<crate::init::WeightsCommitment>,
}

impl RunSpec {
    /// The spec of a run of `config` over a committed dataset, on `device_profile`, with this
    /// build's format and software versions.
    pub fn new(config: Config, dataset: DatasetCommitment, device_profile: &str, n_steps: u64) -> RunSpec {
        RunSpec {
            format_version: FORMAT_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            config,
            dataset,
            device_profile: device_profile.to_string(),
            n_steps,
            init_weights: None,
        }
    }

    /// The canonical JSON bytes (struct field order, shortest round-trip floats).
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serialising plain data structs to a Vec cannot fail.
        serde_json::to_vec(self).expect("run spec serialises")
    }

    /// SHA-256 of the canonical JSON.
    pub fn digest(&self) -> common::codec::Hash {
        common::codec::sha256(&self.canonical_json())
    }

    /// The hash its record's leaves commit states with: SHA-256 in format 3, BLAKE3 from
    /// format 4. Every comparison of a state with a leaf goes through this, so a record is
    /// read with its own format's hash.
    pub fn state_hash(&self) -> common::state::StateHash {
        state_hash_of_format(self.format_version)
    }

    /// How its steps' batch norms and average pools sum ([`sums_of_format`]). Every step,
    /// replay and adjudication runs its ops through a [`crate::model::Ctx`] made with this, so a
    /// record is re-executed with its own format's definition.
    pub fn sums(&self) -> kernels::Sums {
        sums_of_format(self.format_version)
    }
}

/// How batch norm (its channel statistics, both directions) and average pooling (its windows)
/// sum in a record format this build reads: correctly rounded from format 5, in each profile's
/// order (within the any-order bound) before ([`kernels::Sums`]).
pub fn sums_of_format(format_version: u32) -> kernels::Sums {
    if format_version <= 4 { kernels::Sums::ProfileOrder } else { kernels::Sums::CorrectlyRounded }
}

/// The state hash of a record format this build reads ([`FORMAT_OLDEST_READ`] to
/// [`FORMAT_VERSION`]; a validated spec has one of these).
pub fn state_hash_of_format(format_version: u32) -> common::state::StateHash {
    if format_version <= 3 { common::state::StateHash::Sha256 } else { common::state::StateHash::Blake3 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
kind = "mlp"
hidden = [32]
[data]
kind = "synthetic"
examples = 512
holdout = 64
features = 16
classes = 4
[train]
batch_size = 16
steps = 20
seed = 7
checkpoint_interval = 5
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
"#;

    #[test]
    fn parses_a_good_config() {
        let c = Config::from_toml(GOOD, "good.toml").unwrap();
        assert_eq!(c.model, ModelConfig::Mlp(MlpConfig { hidden: vec![32] }));
    }

    #[test]
    fn a_typo_names_the_field_and_file() {
        let bad = GOOD.replace("momentum", "momentun");
        let err = Config::from_toml(&bad, "cfg.toml").unwrap_err().to_string();
        assert!(err.contains("cfg.toml") && err.contains("momentun"), "{err}");
        let bad = GOOD.replace("kind = \"mlp\"", "kind = \"mpl\"");
        let err = Config::from_toml(&bad, "cfg.toml").unwrap_err().to_string();
        assert!(err.contains("mpl"), "{err}");
        let bad = GOOD.replace("hidden = [32]", "hidden = [32]\nhiden = 3");
        let err = Config::from_toml(&bad, "cfg.toml").unwrap_err().to_string();
        assert!(err.contains("hiden"), "{err}");
    }

    /// serde reads a `kind`-tagged table whole, so TOML's own error points at its header; the
    /// message names the field instead (`field_at_fault`), in every tagged table.
    #[test]
    fn a_wrong_type_in_a_tagged_table_names_the_field() {
        for (from, to, names) in [
            ("hidden = [32]", "hidden = [0.5]", "model.hidden: invalid type: floating point `0.5`, expected usize"),
            ("features = 16", "features = \"x\"", "data.features: invalid type: string \"x\""),
            ("lr = 0.1", "lr = \"fast\"", "optimizer.lr: invalid type: string \"fast\""),
            ("momentum = 0.9", "momentum = [1]", "optimizer.momentum: invalid type: sequence"),
            (
                "kind = \"mlp\"\nhidden = [32]",
                "kind = \"cnn\"\nchannels = [1]",
                "model.channels: invalid length 1, expected an array of length 2",
            ),
        ] {
            let bad = GOOD.replace(from, to);
            assert_ne!(bad, GOOD);
            let err = Config::from_toml(&bad, "cfg.toml").unwrap_err().to_string();
            assert!(err.contains("cfg.toml") && err.contains(names), "{to}: {err}");
        }
        // A graph's node that does not parse is named by its place and name.
        let graph = "[model]\nkind = \"graph\"\n[[model.nodes]]\nname = \"fc1\"\nop = \"linear\"\ninputs = [\"input\"]\n\
                     out = 16\n[[model.nodes]]\nname = \"fc2\"\nop = \"linear\"\ninputs = [\"fc1\"]\nBAD\n\
                     [[model.nodes]]\nname = \"loss\"\nop = \"cross_entropy\"\ninputs = [\"fc2\", \"labels\"]\n";
        let rest = &GOOD[GOOD.find("[data]").unwrap()..];
        for (bad, says) in [
            ("outs = 4", "unknown field `outs`"),
            ("out = -4", "invalid value: integer `-4`, expected a width: a whole number, or \"classes\""),
            ("out = \"class\"", "invalid value: string \"class\", expected a width"),
            ("out = 2.5", "invalid type: floating point `2.5`, expected a width"),
            ("out = 4\nbias = \"yes\"", ""),
        ] {
            let text = format!("{}{rest}", graph.replace("BAD", bad));
            let err = Config::from_toml(&text, "cfg.toml").unwrap_err().to_string();
            assert!(err.contains("model.nodes[1] (node \"fc2\")") && err.contains(says), "{bad}: {err}");
        }
        // An error TOML already places keeps its own message (line, snippet).
        let err = Config::from_toml(&GOOD.replace("seed = 7", "seed = \"x\""), "cfg.toml").unwrap_err().to_string();
        assert!(err.contains("seed = \"x\"") && err.contains("line"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (from, to) in [("lr = 0.1", "lr = -1.0"), ("batch_size = 16", "batch_size = 0"), ("steps = 20", "")] {
            let bad = GOOD.replace(from, to);
            assert!(Config::from_toml(&bad, "c").is_err(), "{from} -> {to}");
        }
    }

    #[test]
    fn spec_digest_is_stable() {
        let c = Config::from_toml(GOOD, "good.toml").unwrap();
        let spec = RunSpec {
            format_version: FORMAT_VERSION,
            software_version: "x".into(),
            config: c,
            dataset: DatasetCommitment {
                kind: DataKind::Synthetic,
                leaves: 1,
                n_train: 1,
                n_holdout: 0,
                root: "00".into(),
            },
            device_profile: "cpu".into(),
            n_steps: 20,
            init_weights: None,
        };
        // No starting weights: the field is absent, so specs made before it existed hash as then.
        assert!(!String::from_utf8(spec.canonical_json()).unwrap().contains("init_weights"));
        let back: RunSpec = serde_json::from_slice(&spec.canonical_json()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.digest(), spec.digest());
    }
}
