//! Checking a graph against its data and resolving it for the interpreter: names to
//! positions, shapes, parameters, and which tensors need a gradient.
//!
//! This is the graph's part of spec validation: a graph in a signed spec comes from a possibly
//! hostile trainer, so every problem is a [`SpecInvalid`] naming the node and field
//! (`model.nodes[3].inputs`), never a panic, and every size is computed with checked
//! arithmetic against [`ACTIVATION_VALUES_MAX`] before anything is allocated.

use std::collections::BTreeMap;

use super::ops::DataInfo;
use super::{GraphConfig, INPUT, LABELS, Node, Op, Width};
use crate::model::ParamSpec;
use crate::spec::{ACTIVATION_VALUES_MAX, SpecInvalid};

/// Most nodes a graph may have.
pub const NODES_MAX: usize = 4096;
/// Longest node name (so that every site and state key built from it stays within the
/// 128-character limit of site names).
pub const NAME_MAX: usize = 48;

/// Where a node's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Input,
    Labels,
    Node(usize),
}

/// A node with its inputs resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Src>,
    /// The inputs' names (for site names).
    pub input_names: Vec<String>,
    /// Per-example shapes of the inputs (empty for labels).
    pub in_shapes: Vec<Vec<usize>>,
    /// Per-example shape of the output.
    pub shape: Vec<usize>,
    /// Positions of the node's parameters in [`Graph::params`].
    pub params: Vec<usize>,
    /// Whether the node's output needs a gradient (it depends on a parameter).
    pub needs_grad: bool,
    /// The position of the node in the config it comes from (an attention node's parts all
    /// come from it).
    pub origin: usize,
}

/// A checked graph, ready to run on data of one input shape and class count.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub(crate) nodes: Vec<Resolved>,
    pub(crate) params: Vec<ParamSpec>,
    pub(crate) data: DataInfo,
    /// Values of every tensor the interpreter keeps, per example (for the batch-size limit).
    pub(crate) activation_values: u64,
}

fn invalid(field: String, what: impl Into<String>) -> SpecInvalid {
    SpecInvalid { field, what: what.into() }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn checked_numel(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).filter(|&n| n <= ACTIVATION_VALUES_MAX)
}

/// A graph being resolved: what the nodes so far have established.
struct Resolver<'c> {
    data: DataInfo,
    input_shape: Vec<usize>,
    index: BTreeMap<String, usize>,
    resolved: Vec<Resolved>,
    params: Vec<ParamSpec>,
    used: Vec<bool>,
    input_used: bool,
    activation_values: u64,
    /// The user's nodes (for "defined later" messages).
    written: &'c [Node],
}

impl Graph {
    /// Checks `cfg` on classification data of per-example `input_shape` with `classes`
    /// classes. Fields are named from the config's root (`model.nodes[2].out`).
    pub fn resolve(cfg: &GraphConfig, input_shape: &[usize], classes: usize) -> Result<Graph, SpecInvalid> {
        if cfg.context.is_some() {
            return Err(invalid("model.context".into(), "only a graph trained on text data has a context"));
        }
        Self::resolve_with(cfg, input_shape, DataInfo { classes, labels: vec![], tokens: false, targets: false })
    }

    /// Checks `cfg` on text data with a vocabulary of `vocab` tokens: `x` holds `context` token
    /// ids per example, `labels` the next token at each position.
    pub fn resolve_text(cfg: &GraphConfig, vocab: usize) -> Result<Graph, SpecInvalid> {
        let t = match cfg.context {
            Some(0) => return Err(invalid("model.context".into(), "must be at least 1")),
            Some(t) => t,
            None => return Err(invalid("model.context".into(), "a graph trained on text data needs a context")),
        };
        Self::resolve_with(cfg, &[t], DataInfo { classes: vocab, labels: vec![t], tokens: true, targets: false })
    }

    /// Checks `cfg` on regression data: inputs of `input_shape`, `labels` F32 targets of
    /// `target_shape` (which an `mse` loss reads).
    pub fn resolve_regression(
        cfg: &GraphConfig,
        input_shape: &[usize],
        target_shape: &[usize],
    ) -> Result<Graph, SpecInvalid> {
        if cfg.context.is_some() {
            return Err(invalid("model.context".into(), "only a graph trained on text data has a context"));
        }
        let data = DataInfo { classes: 0, labels: target_shape.to_vec(), tokens: false, targets: true };
        Self::resolve_with(cfg, input_shape, data)
    }

    fn resolve_with(cfg: &GraphConfig, input_shape: &[usize], data: DataInfo) -> Result<Graph, SpecInvalid> {
        let nodes = &cfg.nodes;
        if nodes.is_empty() {
            return Err(invalid("model.nodes".into(), "the graph has no nodes"));
        }
        if nodes.len() > NODES_MAX {
            return Err(invalid("model.nodes".into(), format!("{} nodes, more than {NODES_MAX}", nodes.len())));
        }
        let mut r = Resolver {
            data,
            input_shape: input_shape.to_vec(),
            index: BTreeMap::new(),
            resolved: Vec::with_capacity(nodes.len()),
            params: Vec::new(),
            used: Vec::with_capacity(nodes.len()),
            input_used: false,
            activation_values: checked_numel(input_shape).unwrap_or(u64::MAX),
            written: nodes,
        };
        for (i, node) in nodes.iter().enumerate() {
            if node.op.is_loss() && i + 1 != nodes.len() {
                return Err(invalid(
                    format!("model.nodes[{i}].op"),
                    format!("node {:?}: the loss must be the last node, and the only one", node.name),
                ));
            }
            match &node.op {
                Op::Attention { heads, causal, dropout } => {
                    let parts = r.attention(i, node, *heads, *causal, *dropout)?;
                    if r.resolved.len() + parts.len() > NODES_MAX {
                        return Err(invalid(
                            format!("model.nodes[{i}]"),
                            format!("expanded, the graph has more than {NODES_MAX} nodes"),
                        ));
                    }
                    for part in &parts {
                        r.add(i, part)?;
                    }
                    // The composite's name stands for its last part's output.
                    let last = r.resolved.len() - 1;
                    r.index.insert(node.name.clone(), last);
                }
                _ => r.add(i, node)?,
            }
        }
        let Resolver { resolved, params, used, input_used, activation_values, data, .. } = r;
        let last = resolved.len() - 1;
        if !resolved[last].op.is_loss() {
            return Err(invalid(
                format!("model.nodes[{}].op", nodes.len() - 1),
                format!("the last node ({:?}) must be a loss (cross_entropy or mse)", resolved[last].name),
            ));
        }
        if let Some(j) = (0..last).find(|&j| !used[j]) {
            return Err(invalid(
                format!("model.nodes[{}].name", resolved[j].origin),
                format!("node {:?} is never used (nothing reads its output)", resolved[j].name),
            ));
        }
        if !input_used {
            return Err(invalid("model.nodes".into(), format!("no node reads the input {INPUT:?}")));
        }
        if params.is_empty() {
            return Err(invalid("model.nodes".into(), "the graph has no parameters to train"));
        }
        // Parameter names cannot collide: node names are unique and the suffixes fixed.
        Ok(Graph { nodes: resolved, params, data, activation_values })
    }

    /// The parameters, in node order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Number of classes of the data (the vocabulary of text data).
    pub fn classes(&self) -> usize {
        self.data.classes
    }

    /// Parameter values (checked: each parameter is within [`ACTIVATION_VALUES_MAX`], and
    /// there are at most [`NODES_MAX`] × 2 of them).
    pub fn param_values(&self) -> u64 {
        self.params.iter().map(|p| p.shape.iter().map(|&d| d as u64).product::<u64>()).sum()
    }

    /// Values of every tensor the interpreter keeps, per example.
    pub fn activation_values(&self) -> u64 {
        self.activation_values
    }
}

impl Resolver<'_> {
    /// Checks one node (from `model.nodes[origin]`) and appends it.
    fn add(&mut self, origin: usize, node: &Node) -> Result<(), SpecInvalid> {
        let at = |field: &str| format!("model.nodes[{origin}].{field}");
        let name = node.name.as_str();
        if !valid_name(name) {
            return Err(invalid(
                at("name"),
                format!("{name:?} must be 1..={NAME_MAX} characters of A-Z a-z 0-9 _ . -"),
            ));
        }
        if name == INPUT || name == LABELS {
            return Err(invalid(at("name"), format!("{name:?} is reserved for the batch's tensors")));
        }
        if let Some(&j) = self.index.get(name) {
            return Err(invalid(
                at("name"),
                format!("{name:?} is already the name of a node (from model.nodes[{}])", self.resolved[j].origin),
            ));
        }
        let op = &node.op;
        if !op.arity().contains(&node.inputs.len()) {
            let (lo, hi) = (op.arity().start().to_owned(), op.arity().end().to_owned());
            let takes = if lo == hi { format!("{lo}") } else { format!("{lo} to {hi}") };
            return Err(invalid(
                at("inputs"),
                format!("node {name:?}: {} takes {takes} inputs, not {}", op.name(), node.inputs.len()),
            ));
        }
        let mut srcs = Vec::with_capacity(node.inputs.len());
        for (pos, input) in node.inputs.iter().enumerate() {
            let field = format!("model.nodes[{origin}].inputs[{pos}]");
            let src = match input.as_str() {
                INPUT => {
                    let embeds = matches!(op, Op::Embedding { .. });
                    if self.data.tokens && !embeds {
                        return Err(invalid(
                            field,
                            format!("node {name:?}: the input holds token ids, which only an embedding reads"),
                        ));
                    }
                    self.input_used = true;
                    Src::Input
                }
                LABELS if op.takes_labels(pos) => Src::Labels,
                LABELS => {
                    return Err(invalid(
                        field,
                        format!("node {name:?}: labels can only be the second input of a loss (cross_entropy, mse)"),
                    ));
                }
                other => match self.index.get(other) {
                    Some(&j) => {
                        if self.resolved[j].op.is_loss() {
                            return Err(invalid(field, format!("node {name:?}: the loss {other:?} is no input")));
                        }
                        self.used[j] = true;
                        Src::Node(j)
                    }
                    None if self.written.iter().any(|n| n.name == other) => {
                        return Err(invalid(
                            field,
                            format!(
                                "node {name:?} reads {other:?} before it is defined (nodes run in the order \
                                 written, so a cycle cannot be expressed)"
                            ),
                        ));
                    }
                    None => return Err(invalid(field, format!("node {name:?}: unknown input {other:?}"))),
                },
            };
            if matches!(op, Op::Embedding { .. }) && src != Src::Input {
                return Err(invalid(field, format!("node {name:?}: an embedding reads the token ids {INPUT:?}")));
            }
            srcs.push(src);
        }
        let in_shapes: Vec<Option<&[usize]>> = srcs
            .iter()
            .map(|s| match s {
                Src::Input => Some(self.input_shape.as_slice()),
                Src::Labels => None,
                Src::Node(j) => Some(self.resolved[*j].shape.as_slice()),
            })
            .collect();
        let shape = op
            .shape(&in_shapes, &self.data)
            .map_err(|(field, what)| invalid(at(field), format!("node {name:?}: {what}")))?;
        let n = checked_numel(&shape).ok_or_else(|| {
            invalid(
                at("op"),
                format!("node {name:?}: an output of {shape:?} per example exceeds {ACTIVATION_VALUES_MAX} values"),
            )
        })?;
        // The interpreter keeps every output (and its gradient) for the backward pass; a
        // kernel's scratch (a convolution's unfolded input) counts too.
        let n = op.scratch_values(&in_shapes, &shape).and_then(|s| s.checked_add(n)).unwrap_or(u64::MAX);
        self.activation_values =
            self.activation_values.checked_add(n).filter(|&v| v <= ACTIVATION_VALUES_MAX).ok_or_else(|| {
                invalid(
                    at("op"),
                    format!("node {name:?}: the graph's tensors exceed {ACTIVATION_VALUES_MAX} values per example"),
                )
            })?;
        let mut mine = Vec::new();
        for (suffix, pshape, init) in op.params(&in_shapes, &self.data) {
            if checked_numel(&pshape).is_none() {
                return Err(invalid(
                    at("op"),
                    format!("node {name:?}: parameter {suffix} of {pshape:?} exceeds {ACTIVATION_VALUES_MAX} values"),
                ));
            }
            mine.push(self.params.len());
            self.params.push(ParamSpec { name: format!("{name}.{suffix}"), shape: pshape, init });
        }
        let needs_grad =
            !mine.is_empty() || srcs.iter().any(|s| matches!(s, Src::Node(j) if self.resolved[*j].needs_grad));
        let in_shapes = in_shapes.iter().map(|s| s.map(<[usize]>::to_vec).unwrap_or_default()).collect();
        self.index.insert(name.to_string(), self.resolved.len());
        self.used.push(false);
        self.resolved.push(Resolved {
            name: name.to_string(),
            op: op.clone(),
            inputs: srcs,
            input_names: node.inputs.clone(),
            in_shapes,
            shape,
            params: mine,
            needs_grad,
            origin,
        });
        Ok(())
    }

    /// The ops an attention node (`model.nodes[origin]`) stands for (see [`Op::Attention`]).
    fn attention(
        &self,
        origin: usize,
        node: &Node,
        heads: usize,
        causal: bool,
        dropout: f64,
    ) -> Result<Vec<Node>, SpecInvalid> {
        let at = |field: &str| format!("model.nodes[{origin}].{field}");
        let name = &node.name;
        if node.inputs.len() != 1 {
            return Err(invalid(
                at("inputs"),
                format!("node {name:?}: attention takes 1 input, not {}", node.inputs.len()),
            ));
        }
        let input = &node.inputs[0];
        let shape = match input.as_str() {
            INPUT => self.input_shape.clone(),
            other => match self.index.get(other) {
                Some(&j) => self.resolved[j].shape.clone(),
                // Unknown or later inputs: let the first part's check name the problem.
                None => vec![1, heads.max(1)],
            },
        };
        let [t, d] = shape[..] else {
            return Err(invalid(at("inputs"), format!("node {name:?}: attention needs [t, d], not {shape:?}")));
        };
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(invalid(at("heads"), format!("node {name:?}: {heads} heads do not divide d = {d}")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(invalid(at("dropout"), format!("node {name:?}: must be in [0, 1), got {dropout}")));
        }
        let dh = d / heads;
        let part = |suffix: &str| format!("{name}.{suffix}");
        let node = |suffix: &str, op: Op, inputs: &[String]| Node { name: part(suffix), inputs: inputs.to_vec(), op };
        let mut out = vec![
            node(
                "qkv",
                Op::Linear { out: Width::Fixed(3 * d), bias: true, init: Default::default() },
                std::slice::from_ref(input),
            ),
            node("heads", Op::Reshape { shape: vec![t, 3, heads, dh] }, &[part("qkv")]),
            node("split", Op::Permute { perm: vec![1, 2, 0, 3] }, &[part("heads")]),
        ];
        for (index, which) in ["q", "k", "v"].iter().enumerate() {
            out.push(node(which, Op::Split { axis: 0, parts: 3, index }, &[part("split")]));
        }
        let scale = 1.0 / (dh as f64).sqrt();
        out.push(node("scores", Op::Matmul { transpose_b: true, scale }, &[part("q"), part("k")]));
        out.push(node("probs", Op::Softmax { causal }, &[part("scores")]));
        let mut probs = part("probs");
        if dropout > 0.0 {
            out.push(node("drop", Op::Dropout { p: dropout }, &[probs]));
            probs = part("drop");
        }
        out.push(node("ctx", Op::Matmul { transpose_b: false, scale: 1.0 }, &[probs, part("v")]));
        out.push(node("merge", Op::Permute { perm: vec![0, 2, 1, 3] }, &[part("ctx")]));
        out.push(node("joined", Op::Reshape { shape: vec![t, d] }, &[part("merge")]));
        out.push(node(
            "proj",
            Op::Linear { out: Width::Fixed(d), bias: true, init: Default::default() },
            &[part("joined")],
        ));
        Ok(out)
    }
}
