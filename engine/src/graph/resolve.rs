//! Checking a graph against its data and resolving it for the interpreter: names to
//! positions, shapes, parameters, and which tensors need a gradient.
//!
//! This is the graph's part of spec validation: a graph in a signed spec comes from a possibly
//! hostile trainer, so every problem is a [`SpecInvalid`] naming the node and field
//! (`model.nodes[3].inputs`), never a panic, and every size is computed with checked
//! arithmetic against [`ACTIVATION_VALUES_MAX`] before anything is allocated.

use std::collections::BTreeMap;

use super::{GraphConfig, INPUT, LABELS, Op};
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
}

/// A checked graph, ready to run on data of one input shape and class count.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub(crate) nodes: Vec<Resolved>,
    pub(crate) params: Vec<ParamSpec>,
    pub(crate) classes: usize,
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

impl Graph {
    /// Checks `cfg` on data of per-example `input_shape` with `classes` classes. Fields are
    /// named from the config's root (`model.nodes[2].out`).
    pub fn resolve(cfg: &GraphConfig, input_shape: &[usize], classes: usize) -> Result<Graph, SpecInvalid> {
        let nodes = &cfg.nodes;
        if nodes.is_empty() {
            return Err(invalid("model.nodes".into(), "the graph has no nodes"));
        }
        if nodes.len() > NODES_MAX {
            return Err(invalid("model.nodes".into(), format!("{} nodes, more than {NODES_MAX}", nodes.len())));
        }
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        let mut resolved: Vec<Resolved> = Vec::with_capacity(nodes.len());
        let mut params: Vec<ParamSpec> = Vec::new();
        let mut used = vec![false; nodes.len()];
        let mut input_used = false;
        let mut activation_values = checked_numel(input_shape).unwrap_or(u64::MAX);
        for (i, node) in nodes.iter().enumerate() {
            let at = |field: &str| format!("model.nodes[{i}].{field}");
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
            if let Some(&j) = index.get(name) {
                return Err(invalid(at("name"), format!("{name:?} is already the name of model.nodes[{j}]")));
            }
            let op = &node.op;
            if node.inputs.len() != op.arity() {
                return Err(invalid(
                    at("inputs"),
                    format!("node {name:?}: {} takes {} inputs, not {}", op.name(), op.arity(), node.inputs.len()),
                ));
            }
            let mut srcs = Vec::with_capacity(node.inputs.len());
            for (pos, input) in node.inputs.iter().enumerate() {
                let field = format!("model.nodes[{i}].inputs[{pos}]");
                let src = match input.as_str() {
                    INPUT => {
                        input_used = true;
                        Src::Input
                    }
                    LABELS if op.takes_labels(pos) => Src::Labels,
                    LABELS => {
                        return Err(invalid(
                            field,
                            format!(
                                "node {name:?}: labels can only be the second input of a loss (cross_entropy, mse)"
                            ),
                        ));
                    }
                    other => match index.get(other) {
                        Some(&j) => {
                            if resolved[j].op.is_loss() {
                                return Err(invalid(field, format!("node {name:?}: the loss {other:?} is no input")));
                            }
                            used[j] = true;
                            Src::Node(j)
                        }
                        None if nodes.iter().any(|n| n.name == other) => {
                            return Err(invalid(
                                field,
                                format!(
                                    "node {name:?} reads {other:?} before it is defined (nodes run in the order \
                                     written, so a cycle cannot be expressed)"
                                ),
                            ));
                        }
                        None => {
                            return Err(invalid(field, format!("node {name:?}: unknown input {other:?}")));
                        }
                    },
                };
                srcs.push(src);
            }
            let in_shapes: Vec<Option<&[usize]>> = srcs
                .iter()
                .map(|s| match s {
                    Src::Input => Some(input_shape),
                    Src::Labels => None,
                    Src::Node(j) => Some(resolved[*j].shape.as_slice()),
                })
                .collect();
            let shape = op
                .shape(&in_shapes, classes)
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
            activation_values =
                activation_values.checked_add(n).filter(|&v| v <= ACTIVATION_VALUES_MAX).ok_or_else(|| {
                    invalid(
                        at("op"),
                        format!("node {name:?}: the graph's tensors exceed {ACTIVATION_VALUES_MAX} values per example"),
                    )
                })?;
            let mut mine = Vec::new();
            for (suffix, pshape, init) in op.params(&in_shapes) {
                if checked_numel(&pshape).is_none() {
                    return Err(invalid(
                        at("op"),
                        format!(
                            "node {name:?}: parameter {suffix} of {pshape:?} exceeds {ACTIVATION_VALUES_MAX} values"
                        ),
                    ));
                }
                mine.push(params.len());
                params.push(ParamSpec { name: format!("{name}.{suffix}"), shape: pshape, init });
            }
            let needs_grad =
                !mine.is_empty() || srcs.iter().any(|s| matches!(s, Src::Node(j) if resolved[*j].needs_grad));
            if op.is_loss() && i + 1 != nodes.len() {
                return Err(invalid(
                    at("op"),
                    format!("node {name:?}: the loss must be the last node, and the only one"),
                ));
            }
            let in_shapes = in_shapes.iter().map(|s| s.map(<[usize]>::to_vec).unwrap_or_default()).collect();
            index.insert(name, i);
            resolved.push(Resolved {
                name: name.to_string(),
                op: op.clone(),
                inputs: srcs,
                input_names: node.inputs.clone(),
                in_shapes,
                shape,
                params: mine,
                needs_grad,
            });
        }
        let last = resolved.len() - 1;
        if !resolved[last].op.is_loss() {
            return Err(invalid(
                format!("model.nodes[{last}].op"),
                format!("the last node ({:?}) must be a loss (cross_entropy or mse)", resolved[last].name),
            ));
        }
        if let Some(j) = (0..last).find(|&j| !used[j]) {
            return Err(invalid(
                format!("model.nodes[{j}].name"),
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
        Ok(Graph { nodes: resolved, params, classes, activation_values })
    }

    /// The parameters, in node order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Number of classes of the data.
    pub fn classes(&self) -> usize {
        self.classes
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
