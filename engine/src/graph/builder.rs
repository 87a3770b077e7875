//! A Rust builder for graphs, in the style of candle-nn: each call appends one node and
//! returns a handle to its output, and [`GraphBuilder::build`] gives the [`GraphConfig`] — the
//! same data a TOML config gives, so a model written in Rust is replayed by an auditor that
//! only reads the spec.
//!
//! ```
//! use engine::graph::GraphBuilder;
//! let mut g = GraphBuilder::new();
//! let x = g.input();
//! let h = g.linear("fc1", &x, 64);
//! let h = g.gelu("act1", &h);
//! let logits = g.linear("head", &h, 8);
//! g.cross_entropy("loss", &logits);
//! let graph = g.build();
//! assert_eq!(graph.nodes.len(), 4);
//! ```
//!
//! The builder checks nothing: the graph is checked, with errors naming node and field, when
//! the spec is validated (as every graph is, whoever wrote it).

use super::{ClassesWord, GraphConfig, INPUT, Node, Op, Width};

/// A handle to a tensor of the graph being built: the name of the node that produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    name: String,
}

impl Tensor {
    /// A handle to the tensor named `name` (a node added with [`GraphBuilder::node`], or
    /// [`super::INPUT`]).
    pub fn from_name(name: &str) -> Tensor {
        Tensor { name: name.to_string() }
    }

    /// The tensor's name in the graph.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Appends nodes to a graph.
#[derive(Debug, Clone, Default)]
pub struct GraphBuilder {
    context: Option<usize>,
    nodes: Vec<Node>,
}

impl GraphBuilder {
    pub fn new() -> GraphBuilder {
        GraphBuilder::default()
    }

    /// A graph for text data, whose examples are windows of `context` tokens.
    pub fn text(context: usize) -> GraphBuilder {
        GraphBuilder { context: Some(context), nodes: Vec::new() }
    }

    /// The batch's input `x`.
    pub fn input(&self) -> Tensor {
        Tensor { name: INPUT.to_string() }
    }

    /// Appends a node of `op` reading `inputs`; every method below is this with an op.
    pub fn node(&mut self, name: &str, op: Op, inputs: &[&str]) -> Tensor {
        self.nodes.push(Node { name: name.to_string(), inputs: inputs.iter().map(|s| s.to_string()).collect(), op });
        Tensor { name: name.to_string() }
    }

    /// `x·Wᵀ + b` with `out` outputs (parameters `<name>.weight`, `<name>.bias`).
    pub fn linear(&mut self, name: &str, x: &Tensor, out: usize) -> Tensor {
        self.node(name, Op::Linear { out: Width::Fixed(out), bias: true, init: Default::default() }, &[x.name()])
    }

    /// `x·Wᵀ` with `out` outputs (parameter `<name>.weight`).
    pub fn linear_no_bias(&mut self, name: &str, x: &Tensor, out: usize) -> Tensor {
        self.node(name, Op::Linear { out: Width::Fixed(out), bias: false, init: Default::default() }, &[x.name()])
    }

    /// `x·Wᵀ + b` with one output per class (per token of the vocabulary, for text).
    pub fn linear_classes(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(
            name,
            Op::Linear { out: Width::Classes(ClassesWord::Classes), bias: true, init: Default::default() },
            &[x.name()],
        )
    }

    /// A 2-D convolution with `out_channels` square `kernel`s (parameters `<name>.weight`,
    /// `<name>.bias`).
    pub fn conv2d(
        &mut self,
        name: &str,
        x: &Tensor,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Tensor {
        self.node(
            name,
            Op::Conv2d { out_channels, kernel, stride, padding, bias: true, init: Default::default() },
            &[x.name()],
        )
    }

    pub fn max_pool2d(&mut self, name: &str, x: &Tensor, kernel: usize, stride: usize) -> Tensor {
        self.node(name, Op::MaxPool2d { kernel, stride, padding: 0 }, &[x.name()])
    }

    pub fn avg_pool2d(&mut self, name: &str, x: &Tensor, kernel: usize, stride: usize) -> Tensor {
        self.node(name, Op::AvgPool2d { kernel, stride, padding: 0 }, &[x.name()])
    }

    /// `[c, h, w] → [c]`.
    pub fn global_avg_pool(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::GlobalAvgPool {}, &[x.name()])
    }

    /// Batch normalisation with batch statistics over `[c, …]` (parameters `<name>.weight`,
    /// `<name>.bias`).
    pub fn batch_norm(&mut self, name: &str, x: &Tensor, eps: f64) -> Tensor {
        self.node(name, Op::BatchNorm { eps }, &[x.name()])
    }

    /// Embeds the token ids of text data in `dim` dimensions (parameter `<name>.weight`).
    pub fn embedding(&mut self, name: &str, ids: &Tensor, dim: usize) -> Tensor {
        self.node(name, Op::Embedding { dim }, &[ids.name()])
    }

    /// Adds a learned tensor of `x`'s shape (parameter `<name>.weight`).
    pub fn positional_embedding(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::PositionalEmbedding {}, &[x.name()])
    }

    /// Causal multi-head self-attention over `[t, d]` (see [`Op::Attention`] for what it
    /// expands to), with dropout `p` on the attention weights.
    pub fn causal_self_attention(&mut self, name: &str, x: &Tensor, heads: usize, p: f64) -> Tensor {
        self.node(name, Op::Attention { heads, causal: true, dropout: p }, &[x.name()])
    }

    /// Output axis `i` is axis `perm[i]` of `x`.
    pub fn permute(&mut self, name: &str, x: &Tensor, perm: &[usize]) -> Tensor {
        self.node(name, Op::Permute { perm: perm.to_vec() }, &[x.name()])
    }

    /// Elements `start..end` of `axis`.
    pub fn slice(&mut self, name: &str, x: &Tensor, axis: usize, start: usize, end: usize) -> Tensor {
        self.node(name, Op::Slice { axis, start, end }, &[x.name()])
    }

    /// `parts` equal parts of `axis`, as nodes `<name>.0`, `<name>.1`, ….
    pub fn split(&mut self, name: &str, x: &Tensor, axis: usize, parts: usize) -> Vec<Tensor> {
        (0..parts)
            .map(|index| self.node(&format!("{name}.{index}"), Op::Split { axis, parts, index }, &[x.name()]))
            .collect()
    }

    /// The tensors joined along `axis`.
    pub fn concat(&mut self, name: &str, xs: &[&Tensor], axis: usize) -> Tensor {
        let inputs: Vec<&str> = xs.iter().map(|x| x.name()).collect();
        self.node(name, Op::Concat { axis }, &inputs)
    }

    pub fn relu(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Relu {}, &[x.name()])
    }

    pub fn gelu(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Gelu {}, &[x.name()])
    }

    pub fn tanh(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Tanh {}, &[x.name()])
    }

    pub fn sigmoid(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Sigmoid {}, &[x.name()])
    }

    pub fn add(&mut self, name: &str, a: &Tensor, b: &Tensor) -> Tensor {
        self.node(name, Op::Add {}, &[a.name(), b.name()])
    }

    pub fn mul(&mut self, name: &str, a: &Tensor, b: &Tensor) -> Tensor {
        self.node(name, Op::Mul {}, &[a.name(), b.name()])
    }

    /// `a·b` over the last two axes (batched over the leading ones).
    pub fn matmul(&mut self, name: &str, a: &Tensor, b: &Tensor) -> Tensor {
        self.node(name, Op::Matmul { transpose_b: false, scale: 1.0 }, &[a.name(), b.name()])
    }

    /// `scale·(a·bᵀ)` over the last two axes (attention scores).
    pub fn matmul_t(&mut self, name: &str, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
        self.node(name, Op::Matmul { transpose_b: true, scale }, &[a.name(), b.name()])
    }

    /// Swaps the last two axes.
    pub fn transpose(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Transpose {}, &[x.name()])
    }

    /// Softmax over the last axis, optionally causal (`[.., t, t]`).
    pub fn softmax(&mut self, name: &str, x: &Tensor, causal: bool) -> Tensor {
        self.node(name, Op::Softmax { causal }, &[x.name()])
    }

    pub fn log_softmax(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::LogSoftmax {}, &[x.name()])
    }

    pub fn layer_norm(&mut self, name: &str, x: &Tensor, eps: f64) -> Tensor {
        self.node(name, Op::LayerNorm { eps }, &[x.name()])
    }

    pub fn dropout(&mut self, name: &str, x: &Tensor, p: f64) -> Tensor {
        self.node(name, Op::Dropout { p }, &[x.name()])
    }

    /// The same values with per-example shape `shape`.
    pub fn reshape(&mut self, name: &str, x: &Tensor, shape: &[usize]) -> Tensor {
        self.node(name, Op::Reshape { shape: shape.to_vec() }, &[x.name()])
    }

    pub fn flatten(&mut self, name: &str, x: &Tensor) -> Tensor {
        self.node(name, Op::Flatten {}, &[x.name()])
    }

    /// Mean cross-entropy of `logits` against the batch's labels.
    pub fn cross_entropy(&mut self, name: &str, logits: &Tensor) -> Tensor {
        self.node(name, Op::CrossEntropy {}, &[logits.name(), super::LABELS])
    }

    /// Mean squared error of `pred` against `target`.
    pub fn mse(&mut self, name: &str, pred: &Tensor, target: &Tensor) -> Tensor {
        self.node(name, Op::Mse {}, &[pred.name(), target.name()])
    }

    /// Mean squared error of `pred` against the one-hot encoding of the batch's labels.
    pub fn mse_labels(&mut self, name: &str, pred: &Tensor) -> Tensor {
        self.node(name, Op::Mse {}, &[pred.name(), super::LABELS])
    }

    /// The graph built so far.
    pub fn build(self) -> GraphConfig {
        GraphConfig { context: self.context, nodes: self.nodes }
    }
}
