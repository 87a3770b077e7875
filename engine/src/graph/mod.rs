//! User-defined models: a model is a graph of ops from the verified catalogue, written as data
//! in the config (and so committed by the spec digest), and interpreted the same way by the
//! trainer and the auditor. The backward pass is derived by reverse-mode differentiation.
//!
//! # The graph
//! A [`GraphConfig`] is a list of [`Node`]s; **node order is evaluation order**. A node has a
//! unique `name`, the names of its `inputs` (earlier nodes, or the batch's tensors [`INPUT`]
//! and [`LABELS`]) and an [`Op`] with its attributes. Tensors have a per-example shape (the
//! batch dimension is implicit and leading); `x` has the dataset's input shape (`[features]`
//! for synthetic data, `[1, 28, 28]` for MNIST), `labels` holds one class index per example.
//! The last node, and only it, is a loss (`cross_entropy` or `mse`).
//!
//! In TOML:
//! ```toml
//! [model]
//! kind = "graph"
//! [[model.nodes]]
//! name = "fc1"
//! op = "linear"
//! inputs = ["x"]
//! out = 64
//! [[model.nodes]]
//! name = "act1"
//! op = "gelu"
//! inputs = ["fc1"]
//! [[model.nodes]]
//! name = "head"
//! op = "linear"
//! inputs = ["act1"]
//! out = 8
//! [[model.nodes]]
//! name = "loss"
//! op = "cross_entropy"
//! inputs = ["head", "labels"]
//! ```
//! The canonical form in the spec is the same structure as JSON (`{"name":…,"inputs":[…],
//! "op":"linear","out":64,"bias":true}`), with every attribute written out.
//!
//! # Parameters
//! A node with parameters names them after itself, candle-nn style (`fc1.weight`,
//! `fc1.bias`); their shapes follow from the input shapes. Parameters are listed in node
//! order (weight before bias); parameter `k` of that list is initialised from the seeded
//! stream `init` with layer `k`, exactly as the presets' parameters are
//! ([`crate::model::Model::init_params`]). `linear` and `conv2d` weights are uniform in
//! `±1/√fan_in` (PyTorch's default), or He-uniform `±√(6/fan_in)` with `init = "he"` (what the
//! presets use for layers feeding a ReLU); biases zero.
//!
//! # Rounding sites and their order
//! Forward, node by node: `fwd/<node>/out`, then `fwd/<node>/<what>` for intermediate results
//! the backward pass reads (layer norm's `mean` and `rstd`); views — `reshape`, `flatten` —
//! copy FP32 values and round nothing. Backward, node by node in reverse order, for the nodes a gradient
//! reaches: first, if the node's output fed several inputs, the incoming gradients are
//! summed in the order they arrived at `bwd/<node>/sum`; then the gradient of each input that
//! needs one, in input order, at `bwd/<node>/grad_<input>` (`grad_<input>#<position>` when a
//! node reads the same tensor twice; identity gradients, as of `add` and views, are passed on
//! without a site); then each of the node's parameters, in order, at `grad/<param>`. The
//! optimizer's sites follow as for every model (`opt/<param>/<slot>`, parameters in list
//! order). See [`exec`] for why the gradient sums are exact.
//!
//! # The op catalogue
//! See [`Op`]: each op states its shape rule, forward, backward and bound in `ops.rs`; the
//! interpreter (`exec.rs`) knows no op by name. Only ops whose backward is implemented and
//! tested against candle's autograd (`engine/tests/graph_grads.rs`) exist here.

use serde::{Deserialize, Serialize};

mod builder;
mod exec;
mod ops;
pub mod presets;
mod resolve;

pub use builder::{GraphBuilder, Tensor};
pub(crate) use ops::Labels;
pub use ops::dropout_mask;
pub use resolve::{Graph, NAME_MAX, NODES_MAX};

/// The batch's input tensor.
pub const INPUT: &str = "x";
/// The batch's class labels (an input of a loss only).
pub const LABELS: &str = "labels";

/// A model as a graph of nodes, in evaluation order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Tokens per example when the graph trains on text (the window length); absent for other
    /// data, and then not serialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    pub nodes: Vec<Node>,
}

/// A width: a number, or `"classes"` for the data's class count (the vocabulary of text data,
/// which only the data knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Width {
    Fixed(usize),
    Classes(ClassesWord),
}

/// Read by hand so that a wrong width is named in the user's words ("expected a whole number,
/// or \"classes\"…"), not as an untagged enum that matched no variant. It reads what the derived
/// form wrote.
impl<'de> Deserialize<'de> for Width {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Width, D::Error> {
        crate::spec::number_or_word(
            d,
            "a width: a whole number, or \"classes\" for the data's class count",
            Width::Fixed,
            |w| (w == "classes").then_some(Width::Classes(ClassesWord::Classes)),
        )
    }
}

/// The word `classes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassesWord {
    Classes,
}

/// How a `linear` or `conv2d` weight is initialised from the seeded stream: uniform in
/// `±1/√fan_in` (PyTorch's default), or He-uniform `±√(6/fan_in)` (for layers feeding a ReLU).
/// The default is not written into the canonical spec, so graphs that do not set it hash as
/// before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightInit {
    #[default]
    Uniform,
    He,
}

impl WeightInit {
    fn is_default(&self) -> bool {
        *self == WeightInit::Uniform
    }

    /// The bound of the uniform draw for a weight of `fan_in` inputs.
    pub(crate) fn bound(self, fan_in: usize) -> f64 {
        let fan_in = fan_in.max(1) as f64;
        match self {
            WeightInit::Uniform => 1.0 / fan_in.sqrt(),
            WeightInit::He => (6.0 / fan_in).sqrt(),
        }
    }
}

impl Width {
    /// The data's class count for `"classes"`.
    pub fn resolve(self, classes: usize) -> usize {
        match self {
            Width::Fixed(n) => n,
            Width::Classes(_) => classes,
        }
    }
}

impl From<usize> for Width {
    fn from(n: usize) -> Width {
        Width::Fixed(n)
    }
}

/// One op applied to named inputs. (Unknown fields are refused by [`Op`], which receives
/// every field but `name` and `inputs`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique within the graph: 1..=[`NAME_MAX`] characters of `A–Z a–z 0–9 _ . -`.
    pub name: String,
    /// The tensors the op reads: earlier nodes' names, [`INPUT`] or [`LABELS`].
    pub inputs: Vec<String>,
    #[serde(flatten)]
    pub op: Op,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

fn unit() -> f64 {
    1.0
}

fn layer_norm_eps() -> f64 {
    1e-5
}

/// The verified op catalogue, with each op's attributes. Names and attributes follow ONNX
/// where it has the op. Shapes are per example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `y = x·Wᵀ + b` over the last axis: `[…, i] → […, out]`; parameters `weight` `[out, i]`
    /// and (unless `bias = false`) `bias` `[out]`.
    Linear {
        out: Width,
        #[serde(default = "yes")]
        bias: bool,
        /// How `weight` is drawn (default `uniform`: `±1/√fan_in`).
        #[serde(default, skip_serializing_if = "WeightInit::is_default")]
        init: WeightInit,
    },
    /// 2-D convolution of `[c_in, h, w]` with `out_channels` square `kernel`s, `stride` and
    /// zero `padding` on every side: `[out_channels, oh, ow]`, `oh = (h + 2·padding −
    /// kernel)/stride + 1`. Parameters `weight` `[out_channels, c_in, kernel, kernel]` and
    /// (unless `bias = false`) `bias` `[out_channels]`.
    Conv2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "yes")]
        bias: bool,
        /// How `weight` is drawn (default `uniform`: `±1/√fan_in`, fan-in `c_in·kernel²`).
        #[serde(default, skip_serializing_if = "WeightInit::is_default")]
        init: WeightInit,
    },
    /// Max over square windows of `[c, h, w]` (padding, below the window, is never the max).
    MaxPool2d {
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
    },
    /// Mean over square windows of `[c, h, w]` (padding counts as zeros).
    AvgPool2d {
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
    },
    /// Mean over each channel's plane: `[c, h, w] → [c]` (ONNX keeps `[c, 1, 1]`; this drops
    /// the unit axes, ready for a `linear` head).
    GlobalAvgPool {},
    /// Layer normalisation over the last axis, `eps` (default 1e-5) inside the square root;
    /// parameters `weight` (γ, ones) and `bias` (β, zeros) of the last axis' size.
    LayerNorm {
        #[serde(default = "layer_norm_eps")]
        eps: f64,
    },
    /// Inverted dropout with drop probability `p` in `[0, 1)`; the mask comes from the seeded
    /// stream `dropout/<node>` at the step (so it is a checkable claim, not a choice).
    Dropout { p: f64 },
    /// Softmax over the last axis; with `causal`, the last two axes must be `[t, t]` and row
    /// `i` sees columns `≤ i` (masked outputs are exactly 0).
    Softmax {
        #[serde(default)]
        causal: bool,
    },
    /// Log-softmax over the last axis.
    LogSoftmax {},
    /// Batched product over the last two axes, `scale·(a·b)`: `a` `[…, m, k]`, `b` `[…, k, n]`
    /// (`[…, n, k]` with `transpose_b`), the same leading axes; `[…, m, n]`. The scale
    /// multiplies the finished dot product (attention's `1/√d`).
    Matmul {
        #[serde(default)]
        transpose_b: bool,
        #[serde(default = "unit")]
        scale: f64,
    },
    /// Swaps the last two axes (a permutation: moved, not rounded).
    Transpose {},
    /// `max(x, 0)`.
    Relu {},
    /// GPT-2's tanh-approximated GELU.
    Gelu {},
    /// `tanh x`.
    Tanh {},
    /// `1/(1 + e^{−x})`.
    Sigmoid {},
    /// Elementwise sum of two tensors of one shape.
    Add {},
    /// Elementwise product of two tensors of one shape.
    Mul {},
    /// The same values with another per-example shape of as many elements.
    Reshape { shape: Vec<usize> },
    /// The same values as one axis.
    Flatten {},
    /// Permutes the per-example axes: output axis `i` is input axis `perm[i]` (moved, not
    /// rounded).
    Permute { perm: Vec<usize> },
    /// Elements `start..end` of `axis` (moved, not rounded).
    Slice { axis: usize, start: usize, end: usize },
    /// Part `index` of `parts` equal parts of `axis` (a [`Op::Slice`] whose bounds follow from
    /// the shape).
    Split { axis: usize, parts: usize, index: usize },
    /// Two or more tensors joined along `axis`; the other axes must agree (moved, not rounded).
    Concat { axis: usize },
    /// Batch normalisation with batch statistics: for `[c, …]`, each channel is normalised with
    /// the mean and variance over the batch and every position, then scaled and shifted by its
    /// `weight` (ones) and `bias` (zeros); `eps` (default 1e-5) inside the square root. The
    /// statistics are the batch's in training and in evaluation alike: there are no running
    /// averages, so nothing outside the committed parameters shapes the output.
    BatchNorm {
        #[serde(default = "layer_norm_eps")]
        eps: f64,
    },
    /// Token embedding: reads the token ids `x` of text data (`[t]`) and gives `[t, dim]`;
    /// parameter `weight` `[classes, dim]` (the vocabulary), uniform in ±0.1.
    Embedding { dim: usize },
    /// Adds a learned tensor of the input's per-example shape to every example (a GPT's
    /// position embedding on `[t, d]`); parameter `weight`, uniform in ±0.1.
    PositionalEmbedding {},
    /// Causal (unless `causal = false`) multi-head self-attention over `[t, d]`, a composite
    /// that expands, where it stands, into the catalogue's ops: `<name>.qkv` (linear to
    /// `3d`), `<name>.heads` (reshape `[t, 3, heads, d/heads]`), `<name>.split` (permute to
    /// `[3, heads, t, d/heads]`), `<name>.q`, `.k`, `.v` (split), `<name>.scores` (matmul
    /// `q·kᵀ/√(d/heads)`), `<name>.probs` (softmax), `<name>.drop` (dropout `p = dropout`, when
    /// above 0), `<name>.ctx` (matmul with `v`), `<name>.merge` (permute), `<name>.joined`
    /// (reshape `[t, d]`) and `<name>.proj` (linear to `d`), whose output is the node's.
    /// Parameters `<name>.qkv.weight`, `.bias`, `<name>.proj.weight`, `.bias`.
    Attention {
        heads: usize,
        #[serde(default = "yes")]
        causal: bool,
        #[serde(default)]
        dropout: f64,
    },
    /// Mean cross-entropy of logits `[…, classes]` against `labels` (`[…]`: one class per
    /// example, or per position of text data): inputs `[logits, labels]`.
    CrossEntropy {},
    /// Mean squared error over all elements: inputs `[prediction, target]`; a target of
    /// `labels` means their one-hot encoding (`[classes]`).
    Mse {},
}

impl From<GraphConfig> for crate::spec::ModelConfig {
    fn from(g: GraphConfig) -> Self {
        crate::spec::ModelConfig::Graph(g)
    }
}
