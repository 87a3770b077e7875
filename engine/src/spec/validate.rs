//! What makes a config and a run spec valid: every number a step sizes, indexes or divides by is
//! range-checked here, and a spec's own fields must agree with each other.
//!
//! A signed spec comes from a possibly hostile trainer, so this is the line between "the
//! trainer committed to nonsense" (a [`SpecInvalid`] naming the field) and everything later: a
//! spec that passes cannot make the engine panic, overflow, hang or allocate absurdly when it
//! builds the dataset, the model or a step. Both sides run these checks (`Run::new` calls
//! [`RunSpec::validate`]), and the TOML path runs the config part ([`Config::validate`]).
//!
//! Sizes are computed arithmetically with checked operations from the config alone (the model
//! is never built to find out how big it would be).

use std::str::FromStr;

use super::{
    Config, DataConfig, DatasetCommitment, FORMAT_OLDEST_READ, FORMAT_VERSION, GptConfig, LabelColumn, ModelConfig,
    OptimizerConfig, RunSpec, TensorsConfig,
};
use crate::data::{
    DATA_FILE_BYTES_MAX, Dataset, MNIST_SIDE, TEXT_CHUNK_BYTES, USER_EXAMPLES_MAX, square_side, text_split,
};
use crate::graph::{Graph, GraphConfig};
use crate::model::{param_key, slot_key};
use crate::record::{BATCH_FILE_BYTES_MAX, JSON_FILE_BYTES_MAX, STATE_RAW_BYTES_MAX};

/// The largest batch: a step's batch file (magic, version, count, then each index as a varint
/// of up to 10 bytes, and a CRC) must fit in [`BATCH_FILE_BYTES_MAX`], or the record could not
/// be read back.
pub const BATCH_SIZE_MAX: usize = ((BATCH_FILE_BYTES_MAX - 64) / 10) as usize;

/// Room in `spec.json` for what the spec adds to its config (the dataset commitment, versions,
/// the starting weights' commitment).
const SPEC_BYTES_BESIDE_CONFIG: usize = 16 << 10;

/// Most steps a run may plan.
pub const STEPS_MAX: u64 = 1_000_000_000;
/// Most values one intermediate tensor of a step may have (FP64 values: 8 GiB).
pub const ACTIVATION_VALUES_MAX: u64 = 1 << 30;
/// Most input values (examples × features) a synthetic task may have.
pub const SYNTHETIC_VALUES_MAX: u64 = 1 << 28;
/// Most examples an MNIST config may ask for (the full dataset has 70,000).
pub const MNIST_EXAMPLES_MAX: usize = 1 << 20;
/// Most classes of a synthetic task.
pub const CLASSES_MAX: usize = 1 << 16;
/// Most layers (MLP hidden layers, GPT blocks).
pub const LAYERS_MAX: usize = 256;
/// Most symbols of a character-level vocabulary (bytes).
pub const TEXT_VOCAB_MAX: usize = 256;
/// Most token ids of a token file's vocabulary.
pub const TOKEN_VOCAB_MAX: usize = 1 << 24;
/// Most dimensions of one example of a safetensors dataset.
pub const INPUT_RANK_MAX: usize = 8;
/// Most micro-batches a step may accumulate.
pub const ACCUMULATE_MAX: usize = 1 << 16;

/// A config or spec field that is out of range or inconsistent with another: the trainer's
/// fault when it is in a signed spec (`commitment-invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {what}")]
pub struct SpecInvalid {
    /// The field's path, e.g. `config.train.batch_size` (without `config.` for a TOML config).
    pub field: String,
    pub what: String,
}

fn invalid(field: impl Into<String>, what: impl Into<String>) -> SpecInvalid {
    SpecInvalid { field: field.into(), what: what.into() }
}

impl SpecInvalid {
    /// The same error with `prefix` before the field (`config.` for a config inside a spec).
    pub fn under(mut self, prefix: &str) -> SpecInvalid {
        self.field = format!("{prefix}{}", self.field);
        self
    }
}

/// How big a model and its steps are, derived from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// FP32 values of the parameters.
    pub param_values: u64,
    /// FP32 values of a whole state (parameters and optimizer slots).
    pub state_values: u64,
    /// Bytes of the canonical state encoding (exact; an upper bound for text, whose vocabulary
    /// comes from the file).
    pub state_bytes: u64,
    /// Values of every node's output for one example (what a step keeps per example).
    pub activation_values: u64,
    /// Memory a step of this run takes at the least, in bytes ([`crate::memory`]): each replay
    /// thread holds one.
    pub step_memory_bytes: u64,
    /// Memory the dataset takes when the spec makes it (synthetic data: its inputs, class
    /// centres and commitment), in bytes; 0 for data read from the user's or auditor's files,
    /// whose size is the file's.
    pub data_memory_bytes: u64,
}

/// The input shape and class count a data config gives a model, before any file is read.
fn data_shape(config: &Config) -> Result<(Vec<usize>, usize), SpecInvalid> {
    Ok(match (&config.data, &config.model) {
        (DataConfig::Synthetic(s), ModelConfig::Cnn(_)) => {
            let side = square_side(s.features).ok_or_else(|| {
                invalid("data.features", format!("a CNN needs square images; {} is not s²", s.features))
            })?;
            (vec![1, side, side], s.classes)
        }
        (DataConfig::Synthetic(s), _) => (vec![s.features], s.classes),
        (DataConfig::Mnist(_), _) => (vec![1, MNIST_SIDE, MNIST_SIDE], 10),
        (DataConfig::Text(_), ModelConfig::Graph(g)) => (vec![g.context.unwrap_or(0)], TEXT_VOCAB_MAX),
        (DataConfig::Tokens(t), ModelConfig::Graph(g)) => (vec![g.context.unwrap_or(0)], t.vocab),
        (DataConfig::Text(_), _) => (vec![], TEXT_VOCAB_MAX),
        (DataConfig::Tensors(t), _) => (t.input_shape.clone(), t.classes),
        (DataConfig::Csv(c), _) => (vec![c.features], c.classes),
        (DataConfig::Tokens(t), _) => (vec![], t.vocab),
    })
}

/// A graph checked against the config's data (on text, `classes` bounds the vocabulary).
fn resolve_graph(config: &Config, g: &GraphConfig, input: &[usize], classes: usize) -> Result<Graph, SpecInvalid> {
    match &config.data {
        DataConfig::Text(_) | DataConfig::Tokens(_) => Graph::resolve_text(g, classes),
        DataConfig::Tensors(TensorsConfig { target_shape: Some(targets), .. }) => {
            Graph::resolve_regression(g, input, targets)
        }
        _ => Graph::resolve(g, input, classes),
    }
}

/// Checked product, naming `field` on overflow or above `max`.
fn product(field: &str, factors: &[u64], max: u64, what: &str) -> Result<u64, SpecInvalid> {
    let n = factors
        .iter()
        .try_fold(1u64, |a, &f| a.checked_mul(f))
        .filter(|&n| n <= max)
        .ok_or_else(|| invalid(field, format!("{what} ({}) exceeds {max}", display_product(factors))))?;
    Ok(n)
}

fn display_product(factors: &[u64]) -> String {
    factors.iter().map(u64::to_string).collect::<Vec<_>>().join(" × ")
}

fn u(x: usize) -> u64 {
    x as u64
}

/// Parameter count of the model, and the values per example its graph keeps, with checked
/// arithmetic (so the parameters and the step's buffers cannot overflow afterwards). A preset's
/// own fields are checked first, so that its mistakes name them (`model.hidden`); then its graph
/// is resolved like any other.
fn model_sizes(config: &Config, input: &[usize], classes: usize) -> Result<(u64, u64), SpecInvalid> {
    preset_sizes(config, input, classes)?;
    let graph = resolve_graph(config, &config.model.graph(), input, classes)?;
    Ok((graph.param_values(), graph.activation_values()))
}

/// A preset's sizes from its own fields.
fn preset_sizes(config: &Config, input: &[usize], classes: usize) -> Result<(u64, u64), SpecInvalid> {
    let cap = ACTIVATION_VALUES_MAX;
    let sum = |field: &str, terms: &[u64]| -> Result<u64, SpecInvalid> {
        terms
            .iter()
            .try_fold(0u64, |a, &t| a.checked_add(t))
            .filter(|&n| n <= cap)
            .ok_or_else(|| invalid(field, format!("the model's size overflows (more than {cap} values)")))
    };
    match &config.model {
        ModelConfig::Mlp(m) => {
            let mut dims = vec![product("data", &input.iter().map(|&d| u(d)).collect::<Vec<_>>(), cap, "input")?];
            dims.extend(m.hidden.iter().map(|&h| u(h)));
            dims.push(u(classes));
            let mut params = 0u64;
            for w in dims.windows(2) {
                let layer = product("model.hidden", &[w[0], w[1]], cap, "a layer's weights")?;
                params = sum("model.hidden", &[params, layer, w[1]])?;
            }
            Ok((params, dims.iter().copied().max().unwrap_or(0)))
        }
        ModelConfig::Cnn(c) => {
            let (c0, c1) = (u(c.channels[0]), u(c.channels[1]));
            let (h, w) = (u(input[1]), u(input[2]));
            if h % 4 != 0 || w % 4 != 0 {
                return Err(invalid("data.features", format!("the CNN needs image sides divisible by 4, not {h}×{w}")));
            }
            let flat = product("model.channels", &[c1, h / 4, w / 4], cap, "the flattened features")?;
            let terms = [
                product("model.channels", &[c0, 9], cap, "conv1's weights")?,
                c0,
                product("model.channels", &[c1, c0, 9], cap, "conv2's weights")?,
                c1,
                product("model.channels", &[u(classes), flat], cap, "the classifier's weights")?,
                u(classes),
            ];
            let params = sum("model.channels", &terms)?;
            // The widest activation: a conv's unfolded input (channels × 9 × pixels).
            let act = product("model.channels", &[c0.max(c1), 9, h, w], cap, "a conv layer's activations")?;
            Ok((params, act))
        }
        ModelConfig::Gpt(g) => gpt_sizes(g, u(classes)),
        // Resolving checks the whole graph (names, inputs, shapes, sizes) against the data.
        ModelConfig::Graph(_) => Ok((0, 0)),
    }
}

fn gpt_sizes(g: &GptConfig, vocab: u64) -> Result<(u64, u64), SpecInvalid> {
    let cap = ACTIVATION_VALUES_MAX;
    let (d, t) = (u(g.d_model), u(g.context));
    let dd = product("model.d_model", &[d, d], cap, "a d_model × d_model matrix")?;
    // Per block: two layer norms (4d), qkv (3d² + 3d), proj (d² + d), mlp (8d² + 5d).
    let block = product("model.d_model", &[dd, 12], cap, "a block's weights")?
        .checked_add(product("model.d_model", &[d, 13], cap, "a block's vectors")?)
        .ok_or_else(|| invalid("model.d_model", "a block's size overflows"))?;
    let blocks = product("model.layers", &[block, u(g.layers)], cap, "the blocks' weights")?;
    let tok = product("model.d_model", &[vocab, d], cap, "the token embedding")?;
    let pos = product("model.context", &[t, d], cap, "the position embedding")?;
    let params = [blocks, tok, pos, tok, 2 * d, vocab]
        .iter()
        .try_fold(0u64, |a, &x| a.checked_add(x))
        .filter(|&n| n <= cap)
        .ok_or_else(|| invalid("model", format!("the model has more than {cap} parameters")))?;
    // Per example: the attention scores (heads × t × t) and the MLP's hidden (t × 4d).
    let scores = product("model.context", &[u(g.heads), t, t], cap, "the attention scores")?;
    let hidden = product("model.context", &[t, d, 4], cap, "the MLP activations")?;
    let logits = product("model.context", &[t, vocab], cap, "the logits")?;
    Ok((params, scores.max(hidden).max(logits)))
}

impl Config {
    /// Range checks of every field (without looking at any file), and the sizes they give.
    /// Field names are relative to the config (`train.batch_size`).
    pub fn validate(&self) -> Result<Sizes, SpecInvalid> {
        let sizes = self.sizes()?;
        self.schedule.validate(self.train.steps).map_err(|(field, what)| invalid(field, what))?;
        // The run's spec.json holds this config: past its limit the record could not be read.
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if bytes > JSON_FILE_BYTES_MAX as usize - SPEC_BYTES_BESIDE_CONFIG {
            return Err(invalid(
                "model",
                format!(
                    "the config takes {bytes} bytes as JSON; a run's spec.json holds it and must fit in \
                     {JSON_FILE_BYTES_MAX} bytes (a smaller graph: fewer or shorter-named nodes)"
                ),
            ));
        }
        Ok(sizes)
    }

    /// Range-checks every field and derives the model's sizes (see [`Sizes`]).
    pub fn sizes(&self) -> Result<Sizes, SpecInvalid> {
        let t = &self.train;
        if t.batch_size == 0 || t.batch_size > BATCH_SIZE_MAX {
            return Err(invalid(
                "train.batch_size",
                format!(
                    "must be in 1..={BATCH_SIZE_MAX} (a step's batch file must fit in {BATCH_FILE_BYTES_MAX} bytes), got {}",
                    t.batch_size
                ),
            ));
        }
        if t.checkpoint_interval == 0 {
            return Err(invalid("train.checkpoint_interval", "must be at least 1"));
        }
        if t.steps.is_none() && t.epochs.is_none() {
            return Err(invalid("train.steps", "set train.steps or train.epochs"));
        }
        for (field, n) in [("train.steps", t.steps), ("train.epochs", t.epochs)] {
            match n {
                Some(0) => return Err(invalid(field, "must be at least 1")),
                Some(n) if n > STEPS_MAX => return Err(invalid(field, format!("{n} is more than {STEPS_MAX}"))),
                _ => {}
            }
        }
        if let Some(c) = t.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("train.clip_norm", format!("must be finite and > 0, got {c}")));
        }
        if t.accumulate == 0 || t.accumulate > ACCUMULATE_MAX {
            return Err(invalid("train.accumulate", format!("must be in 1..={ACCUMULATE_MAX}, got {}", t.accumulate)));
        }
        if !t.batch_size.is_multiple_of(t.accumulate) {
            return Err(invalid(
                "train.accumulate",
                format!(
                    "{} does not divide train.batch_size = {} into equal micro-batches",
                    t.accumulate, t.batch_size
                ),
            ));
        }
        self.check_optimizer()?;
        self.check_data()?;
        self.check_model()?;
        let (input, classes) = data_shape(self)?;
        let (param_values, act) = model_sizes(self, &input, classes)?;
        product(
            "train.batch_size",
            &[u(t.batch_size), act],
            ACTIVATION_VALUES_MAX,
            "a batch's activations (batch size × the values of every node's output for one example)",
        )?;
        let slots = match self.optimizer {
            OptimizerConfig::Sgd(_) => 1,
            OptimizerConfig::Adamw(_) => 2,
        };
        let state_values = product("model", &[param_values, 1 + slots], u64::MAX / 8, "the state's values")?;
        let state_bytes = self.state_encoding_bytes(&input, classes)?;
        let step_memory_bytes = crate::memory::step_bytes(state_values, u(t.batch_size).saturating_mul(act));
        let data_memory_bytes = match &self.data {
            DataConfig::Synthetic(s) => crate::memory::synthetic_bytes(u(s.examples), u(s.features), u(s.classes)),
            _ => 0,
        };
        Ok(Sizes {
            param_values,
            state_values,
            state_bytes,
            activation_values: act,
            step_memory_bytes,
            data_memory_bytes,
        })
    }

    /// Every tensor a state of this run holds, from the config alone (no data file is read):
    /// what a committed state is checked against where no [`crate::train::Run`] is built
    /// (`trainer-agent export` and `inspect`). `None` for text, whose vocabulary (and so the
    /// shapes of the embedding and the head) comes from the file.
    pub fn state_layout(&self) -> Result<Option<crate::train::StateLayout>, SpecInvalid> {
        if matches!(self.data, DataConfig::Text(_)) {
            return Ok(None);
        }
        let (input, classes) = data_shape(self)?;
        let model = resolve_graph(self, &self.model.graph(), &input, classes)?;
        Ok(Some(crate::train::StateLayout::of(model.params(), &self.optimizer)))
    }

    /// Exact size of the canonical state encoding, from the model's parameter list (its size is
    /// already bounded, so building the list is cheap).
    fn state_encoding_bytes(&self, input: &[usize], classes: usize) -> Result<u64, SpecInvalid> {
        let model = resolve_graph(self, &self.model.graph(), input, classes)?;
        let slots: &[&str] = match self.optimizer {
            OptimizerConfig::Sgd(_) => &["momentum"],
            OptimizerConfig::Adamw(_) => &["m", "v"],
        };
        // "TBST", version, step, tensor count; then per tensor its name, rank, dims and data.
        let mut bytes: u64 = 4 + 1 + 8 + 4;
        for p in model.params() {
            let values: u64 = p.shape.iter().map(|&d| u(d)).product();
            let names = std::iter::once(param_key(&p.name)).chain(slots.iter().map(|s| slot_key(&p.name, s)));
            for name in names {
                bytes += 2 + u(name.len()) + 1 + 8 * u(p.shape.len()) + 4 * values;
            }
        }
        if bytes > STATE_RAW_BYTES_MAX as u64 {
            return Err(invalid(
                "model",
                format!(
                    "a state of this model takes {bytes} bytes, more than the {STATE_RAW_BYTES_MAX} a state may have"
                ),
            ));
        }
        Ok(bytes)
    }

    fn check_optimizer(&self) -> Result<(), SpecInvalid> {
        let finite_pos = |name: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(invalid(name, format!("must be finite and > 0, got {x}")))
            }
        };
        let unit = |name: &str, x: f64| {
            if (0.0..1.0).contains(&x) { Ok(()) } else { Err(invalid(name, format!("must be in [0, 1), got {x}"))) }
        };
        match &self.optimizer {
            OptimizerConfig::Sgd(s) => {
                finite_pos("optimizer.lr", s.lr)?;
                unit("optimizer.momentum", s.momentum)?;
                unit("optimizer.weight_decay", s.weight_decay)
            }
            OptimizerConfig::Adamw(a) => {
                finite_pos("optimizer.lr", a.lr)?;
                finite_pos("optimizer.eps", a.eps)?;
                unit("optimizer.beta1", a.beta1)?;
                unit("optimizer.beta2", a.beta2)?;
                unit("optimizer.weight_decay", a.weight_decay)
            }
        }
    }

    fn check_model(&self) -> Result<(), SpecInvalid> {
        let at_least_1 =
            |field: &str, n: usize| if n == 0 { Err(invalid(field, "must be at least 1")) } else { Ok(()) };
        match &self.model {
            ModelConfig::Mlp(m) => {
                if m.hidden.len() > LAYERS_MAX {
                    return Err(invalid("model.hidden", format!("{} layers, more than {LAYERS_MAX}", m.hidden.len())));
                }
                for (i, &h) in m.hidden.iter().enumerate() {
                    at_least_1(&format!("model.hidden[{i}]"), h)?;
                }
            }
            ModelConfig::Cnn(c) => {
                for (i, &ch) in c.channels.iter().enumerate() {
                    at_least_1(&format!("model.channels[{i}]"), ch)?;
                }
            }
            ModelConfig::Gpt(g) => {
                at_least_1("model.layers", g.layers)?;
                if g.layers > LAYERS_MAX {
                    return Err(invalid("model.layers", format!("{} is more than {LAYERS_MAX}", g.layers)));
                }
                at_least_1("model.d_model", g.d_model)?;
                at_least_1("model.heads", g.heads)?;
                at_least_1("model.context", g.context)?;
                if g.d_model % g.heads != 0 {
                    return Err(invalid(
                        "model.heads",
                        format!("{} does not divide model.d_model = {}", g.heads, g.d_model),
                    ));
                }
                if !(0.0..1.0).contains(&g.dropout) {
                    return Err(invalid("model.dropout", format!("must be in [0, 1), got {}", g.dropout)));
                }
            }
            // Checked against the data's shape in `model_sizes`.
            ModelConfig::Graph(_) => {}
        }
        let tokens = matches!(self.data, DataConfig::Text(_) | DataConfig::Tokens(_));
        match (&self.model, &self.data) {
            (ModelConfig::Gpt(_) | ModelConfig::Graph(_), _) if tokens => Ok(()),
            (ModelConfig::Gpt(_), _) => Err(invalid("data.kind", "the GPT trains on text or token data")),
            (
                ModelConfig::Mlp(_) | ModelConfig::Cnn(_),
                DataConfig::Tensors(TensorsConfig { target_shape: Some(_), .. }),
            ) => Err(invalid(
                "data.target_shape",
                "the MLP and CNN presets classify; F32 targets need a graph with an mse loss against labels",
            )),
            _ if tokens => Err(invalid("data.kind", "MLP and CNN models train on classification data")),
            (ModelConfig::Cnn(_), DataConfig::Tensors(t)) if t.input_shape.len() != 3 || t.input_shape[0] != 1 => {
                Err(invalid(
                    "data.input_shape",
                    format!("the CNN needs 1×H×W images, not examples of shape {:?}", t.input_shape),
                ))
            }
            (ModelConfig::Cnn(_), DataConfig::Csv(_)) => {
                Err(invalid("data.kind", "the CNN needs images; a CSV row is a vector (use the MLP or a graph)"))
            }
            _ => Ok(()),
        }
    }

    fn check_data(&self) -> Result<(), SpecInvalid> {
        match &self.data {
            DataConfig::Synthetic(s) => {
                if s.holdout >= s.examples {
                    return Err(invalid(
                        "data.holdout",
                        format!("{} leaves no training examples of {}", s.holdout, s.examples),
                    ));
                }
                if s.features == 0 {
                    return Err(invalid("data.features", "must be at least 1"));
                }
                if !(2..=CLASSES_MAX).contains(&s.classes) {
                    return Err(invalid("data.classes", format!("must be in 2..={CLASSES_MAX}, got {}", s.classes)));
                }
                product("data.examples", &[u(s.examples), u(s.features)], SYNTHETIC_VALUES_MAX, "input values")?;
                product("data.classes", &[u(s.classes), u(s.features)], SYNTHETIC_VALUES_MAX, "class centre values")?;
                Ok(())
            }
            DataConfig::Mnist(m) => {
                if m.train == 0 {
                    return Err(invalid("data.train", "must be at least 1"));
                }
                if m.train.saturating_add(m.holdout) > MNIST_EXAMPLES_MAX {
                    return Err(invalid("data.holdout", format!("train + holdout is more than {MNIST_EXAMPLES_MAX}")));
                }
                Ok(())
            }
            DataConfig::Text(t) if !(0.0..0.5).contains(&t.holdout_fraction) => {
                Err(invalid("data.holdout_fraction", format!("must be in [0, 0.5), got {}", t.holdout_fraction)))
            }
            DataConfig::Text(_) => Ok(()),
            DataConfig::Tensors(t) => {
                if t.input_shape.len() > INPUT_RANK_MAX {
                    return Err(invalid(
                        "data.input_shape",
                        format!("{} dimensions, more than {INPUT_RANK_MAX}", t.input_shape.len()),
                    ));
                }
                if let Some(i) = t.input_shape.iter().position(|&d| d == 0) {
                    return Err(invalid(format!("data.input_shape[{i}]"), "must be at least 1"));
                }
                let dims: Vec<u64> = t.input_shape.iter().map(|&d| u(d)).collect();
                product("data.input_shape", &dims, ACTIVATION_VALUES_MAX, "values per example")?;
                match &t.target_shape {
                    None => check_classes(t.classes)?,
                    Some(shape) => {
                        if t.classes != 0 {
                            return Err(invalid(
                                "data.classes",
                                "F32 targets (data.target_shape) have no classes; leave data.classes out",
                            ));
                        }
                        if shape.len() > INPUT_RANK_MAX {
                            return Err(invalid(
                                "data.target_shape",
                                format!("{} dimensions, more than {INPUT_RANK_MAX}", shape.len()),
                            ));
                        }
                        if let Some(i) = shape.iter().position(|&d| d == 0) {
                            return Err(invalid(format!("data.target_shape[{i}]"), "must be at least 1"));
                        }
                        let dims: Vec<u64> = shape.iter().map(|&d| u(d)).collect();
                        product("data.target_shape", &dims, ACTIVATION_VALUES_MAX, "target values per example")?;
                    }
                }
                check_holdout(t.holdout)
            }
            DataConfig::Csv(c) => {
                if c.features == 0 || u(c.features) > ACTIVATION_VALUES_MAX {
                    return Err(invalid("data.features", format!("must be in 1..={ACTIVATION_VALUES_MAX}")));
                }
                match &c.label_column {
                    LabelColumn::Index(i) if *i > c.features => {
                        return Err(invalid(
                            "data.label_column",
                            format!(
                                "column {i} is not one of the {} columns (features plus the label)",
                                c.features + 1
                            ),
                        ));
                    }
                    LabelColumn::Name(_) if !c.header => {
                        return Err(invalid("data.label_column", "names a column, so data.header must be true"));
                    }
                    LabelColumn::Name(n) if n.is_empty() => {
                        return Err(invalid("data.label_column", "an empty column name"));
                    }
                    _ => {}
                }
                check_classes(c.classes)?;
                check_holdout(c.holdout)
            }
            DataConfig::Tokens(t) => {
                if !(2..=TOKEN_VOCAB_MAX).contains(&t.vocab) {
                    return Err(invalid("data.vocab", format!("must be in 2..={TOKEN_VOCAB_MAX}, got {}", t.vocab)));
                }
                if !(0.0..0.5).contains(&t.holdout_fraction) {
                    return Err(invalid(
                        "data.holdout_fraction",
                        format!("must be in [0, 0.5), got {}", t.holdout_fraction),
                    ));
                }
                Ok(())
            }
        }
    }

    /// This config, planning `n_steps` over a training split of `n_train` examples: unchanged
    /// if it already does, else with `train.steps = n_steps` (and no `train.epochs`). What a
    /// trainer's `--steps` override writes into its spec.
    pub fn with_planned_steps(mut self, n_steps: u64, n_train: u64) -> Config {
        if self.planned_steps(n_train) != Ok(n_steps) {
            self.train.steps = Some(n_steps);
            self.train.epochs = None;
        }
        self
    }

    /// The steps this config plans over a training split of `n_train` examples (`train.steps`,
    /// else `train.epochs` passes), checked against [`STEPS_MAX`].
    pub fn planned_steps(&self, n_train: u64) -> Result<u64, SpecInvalid> {
        let batch = u(self.train.batch_size.max(1));
        match (self.train.steps, self.train.epochs) {
            (Some(s), _) => Ok(s),
            (None, Some(e)) => e.checked_mul((n_train / batch).max(1)).filter(|&n| n <= STEPS_MAX).ok_or_else(|| {
                invalid("train.epochs", format!("{e} epochs of this split are more than {STEPS_MAX} steps"))
            }),
            (None, None) => Err(invalid("train.steps", "set train.steps or train.epochs")),
        }
    }
}

impl RunSpec {
    /// The format of a `spec.json` made by an earlier build (formats 1 to [`FORMAT_OLDEST_READ`] − 1),
    /// which this build no longer reads: such a record is not wrong, and an auditor must not
    /// judge it, only say which build can. `None` for the formats this build reads and for any version no
    /// build has written (0, or one from the future: judged like any other invalid field, so a
    /// trainer cannot make an auditor undecided by naming one), or a spec that does not parse.
    pub fn earlier_format(bytes: &[u8]) -> Option<u32> {
        let v = serde_json::from_slice::<serde_json::Value>(bytes).ok()?.get("format_version")?.as_u64()?;
        (1..u64::from(FORMAT_OLDEST_READ)).contains(&v).then_some(v as u32)
    }

    /// Parses a committed `spec.json` and validates it: what an auditor does with a trainer's
    /// spec before anything else. A parse error names the line, column and (from serde) field.
    pub fn from_committed_json(bytes: &[u8]) -> Result<RunSpec, SpecInvalid> {
        let spec: RunSpec = serde_json::from_slice(bytes).map_err(|e| {
            invalid("spec.json", format!("not a run spec (line {}, column {}): {e}", e.line(), e.column()))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks everything the spec says on its own: the format version, the device profile,
    /// every config range ([`Config::sizes`]), the dataset commitment against the config
    /// (recomputed for synthetic data, counts for files), and the planned steps. Fields are
    /// named from the spec's root (`config.train.batch_size`, `dataset.root`).
    pub fn validate(&self) -> Result<(), SpecInvalid> {
        if !(FORMAT_OLDEST_READ..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(invalid(
                "format_version",
                format!(
                    "made by format {}; this build reads formats {FORMAT_OLDEST_READ} to {FORMAT_VERSION}",
                    self.format_version
                ),
            ));
        }
        kernels::Profile::from_str(&self.device_profile).map_err(|e| invalid("device_profile", e.to_string()))?;
        self.config.validate().map_err(|e| e.under("config."))?;
        let bytes = self.canonical_json().len();
        if bytes > JSON_FILE_BYTES_MAX as usize {
            return Err(invalid(
                "spec.json",
                format!("{bytes} bytes, more than the {JSON_FILE_BYTES_MAX} a spec may have"),
            ));
        }
        self.config.schedule.validate(Some(self.n_steps)).map_err(|(f, w)| invalid(f, w).under("config."))?;
        self.check_dataset()?;
        if self.n_steps == 0 {
            return Err(invalid("n_steps", "must be at least 1"));
        }
        let planned = self.config.planned_steps(self.dataset.n_train).map_err(|e| e.under("config."))?;
        if self.n_steps != planned {
            return Err(invalid("n_steps", format!("{} but the config plans {planned} steps", self.n_steps)));
        }
        if let Some(w) = &self.init_weights {
            if w.sha256.len() != 64 || !w.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(invalid("init_weights.sha256", "must be 64 lowercase hex digits"));
            }
            if w.bytes == 0 || w.bytes > crate::init::INIT_WEIGHTS_BYTES_MAX {
                return Err(invalid(
                    "init_weights.bytes",
                    format!("{} is not in 1..={}", w.bytes, crate::init::INIT_WEIGHTS_BYTES_MAX),
                ));
            }
        }
        Ok(())
    }

    /// Bytes of the canonical encoding of a state of this run: the bound for decompressing a
    /// checkpoint (exact for synthetic and MNIST data, the 256-symbol maximum for text).
    pub fn state_bytes_max(&self) -> Result<usize, SpecInvalid> {
        let sizes = self.config.sizes().map_err(|e| e.under("config."))?;
        Ok(sizes.state_bytes as usize)
    }

    fn check_dataset(&self) -> Result<(), SpecInvalid> {
        let d = &self.dataset;
        let kind = self.config.data.kind();
        if d.kind != kind {
            return Err(invalid(
                "dataset.kind",
                format!("{:?} but config.data is {:?}", d.kind.as_str(), kind.as_str()),
            ));
        }
        match &self.config.data {
            DataConfig::Synthetic(_) => {
                // Fully determined by the config: regenerate and compare.
                let data =
                    Dataset::for_config(&self.config, None).map_err(|e| invalid("config.data", e.to_string()))?;
                first_difference(d, &data.commitment())
            }
            DataConfig::Mnist(m) => {
                let expect = |field: &str, have: u64, want: usize| {
                    if have == u(want) {
                        Ok(())
                    } else {
                        Err(invalid(field, format!("{have} but the config's MNIST split gives {want}")))
                    }
                };
                expect("dataset.n_train", d.n_train, m.train)?;
                expect("dataset.n_holdout", d.n_holdout, m.holdout)?;
                expect("dataset.leaves", d.leaves, m.train + m.holdout)
            }
            DataConfig::Text(t) => {
                let context = match &self.config.model {
                    ModelConfig::Gpt(g) => g.context,
                    ModelConfig::Graph(g) => g.context.unwrap_or(0),
                    _ => return Err(invalid("config.model.kind", "text data needs the GPT or a graph")),
                };
                check_text_counts(d, context, t.holdout_fraction, 1)
            }
            DataConfig::Tokens(t) => {
                let context = match &self.config.model {
                    ModelConfig::Gpt(g) => g.context,
                    ModelConfig::Graph(g) => g.context.unwrap_or(0),
                    _ => return Err(invalid("config.model.kind", "token data needs the GPT or a graph")),
                };
                check_text_counts(d, context, t.holdout_fraction, t.dtype.bytes())
            }
            DataConfig::Tensors(_) | DataConfig::Csv(_) => {
                let holdout = match &self.config.data {
                    DataConfig::Tensors(t) => t.holdout,
                    DataConfig::Csv(c) => c.holdout,
                    _ => unreachable!("matched above"),
                };
                if d.n_holdout != u(holdout) {
                    return Err(invalid(
                        "dataset.n_holdout",
                        format!("{} but config.data.holdout is {holdout}", d.n_holdout),
                    ));
                }
                if d.n_train == 0 || d.n_train > u(USER_EXAMPLES_MAX) {
                    return Err(invalid("dataset.n_train", format!("{} is not in 1..={USER_EXAMPLES_MAX}", d.n_train)));
                }
                if Some(d.leaves) != d.n_train.checked_add(d.n_holdout) {
                    return Err(invalid(
                        "dataset.leaves",
                        format!(
                            "{} but a file's examples are its {} training and {} held-out ones",
                            d.leaves, d.n_train, d.n_holdout
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

fn check_classes(classes: usize) -> Result<(), SpecInvalid> {
    if (2..=CLASSES_MAX).contains(&classes) {
        Ok(())
    } else {
        Err(invalid("data.classes", format!("must be in 2..={CLASSES_MAX}, got {classes}")))
    }
}

fn check_holdout(holdout: usize) -> Result<(), SpecInvalid> {
    if holdout < USER_EXAMPLES_MAX {
        Ok(())
    } else {
        Err(invalid("data.holdout", format!("{holdout} is more examples than a data file can hold")))
    }
}

/// The first field where a recomputed commitment differs from the committed one.
fn first_difference(committed: &DatasetCommitment, recomputed: &DatasetCommitment) -> Result<(), SpecInvalid> {
    let fields: [(&str, String, String); 4] = [
        ("dataset.leaves", committed.leaves.to_string(), recomputed.leaves.to_string()),
        ("dataset.n_train", committed.n_train.to_string(), recomputed.n_train.to_string()),
        ("dataset.n_holdout", committed.n_holdout.to_string(), recomputed.n_holdout.to_string()),
        ("dataset.root", committed.root.clone(), recomputed.root.clone()),
    ];
    match fields.into_iter().find(|(_, a, b)| a != b) {
        Some((field, a, b)) => Err(invalid(field, format!("{a} but the config's own data gives {b}"))),
        None => Ok(()),
    }
}

/// A text (or token file) commitment's counts must come from some file of `leaves` chunks: its
/// byte length is in `((leaves − 1)·4096, leaves·4096]`, a multiple of the `width` bytes per
/// token, and [`text_split`] of its token count must give them.
fn check_text_counts(
    d: &DatasetCommitment,
    context: usize,
    holdout_fraction: f64,
    width: usize,
) -> Result<(), SpecInvalid> {
    let chunk = u(TEXT_CHUNK_BYTES);
    if d.leaves == 0 || d.leaves > DATA_FILE_BYTES_MAX / chunk {
        return Err(invalid(
            "dataset.leaves",
            format!("{} chunks of text is not in 1..={}", d.leaves, DATA_FILE_BYTES_MAX / chunk),
        ));
    }
    let lengths = (d.leaves - 1) * chunk + 1..=d.leaves * chunk;
    let fits = lengths.clone().filter(|len| len.is_multiple_of(u(width))).any(|len| {
        text_split((len / u(width)) as usize, context, holdout_fraction)
            == Some((d.n_train as usize, d.n_holdout as usize))
    });
    if fits {
        return Ok(());
    }
    Err(invalid(
        "dataset.n_train",
        format!(
            "no text of {} to {} bytes gives {} training and {} held-out windows at context {context} and holdout \
             fraction {holdout_fraction}",
            lengths.start(),
            lengths.end(),
            d.n_train,
            d.n_holdout
        ),
    ))
}
