//! The interpreter: a forward pass over the nodes in order, then reverse-mode
//! differentiation over them in reverse order, rounding at the sites described in the
//! [module docs](super).
//!
//! # Why gradient sums are exact
//! Where a tensor feeds several inputs, its gradient is the sum of the contributions, which
//! arrive in a fixed order (consumers in reverse node order, inputs in position order). They
//! are FP32 values, added in FP64 in that order: each addition is correctly rounded on every
//! IEEE-754 machine, so the sequence gives the same bits everywhere, and the site carries
//! `ErrorBound::Exact`. (The order is part of the graph's definition, as a kernel's evaluation
//! choices are part of the op's.)

use kernels::Bounded;
use rayon::prelude::*;

use super::Graph;
use super::ops::{Args, Fwd, Grad, Labels};
use super::resolve::Src;
use crate::EngineError;
use crate::model::Ctx;

/// A parameter's FP32 values by name.
pub(crate) type Getter<'g> = dyn Fn(&str) -> Result<&'g [f32], EngineError> + 'g;

/// Loss, gradients in parameter order, and the logits of a cross-entropy loss.
pub(crate) type Pass = (f32, Vec<Vec<f32>>, Option<Vec<f32>>);

impl Graph {
    /// Forward and backward over a batch of `n` examples `x` with labels (or targets) `y`.
    pub(crate) fn pass(
        &self,
        ctx: &mut Ctx<'_, '_>,
        get: &Getter<'_>,
        x: &[f32],
        y: Labels<'_>,
        n: usize,
    ) -> Result<Pass, EngineError> {
        let count = self.nodes.len();
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(count);
        let mut saved: Vec<Vec<Vec<f32>>> = vec![Vec::new(); count];
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); count];
        let mut loss_value = 0.0f32;
        let mut loss_grads: Vec<Option<Bounded>> = Vec::new();
        for node in &self.nodes {
            let fwd = {
                let args = self.args(values.len(), get, x, y, n, &values, &[], &[])?;
                node.op.forward(ctx, &args)?
            };
            match fwd {
                Fwd::Rounded(b) => values.push(ctx.round(&format!("fwd/{}/out", node.name), b)?),
                Fwd::Saving(b, extra) => {
                    values.push(ctx.round(&format!("fwd/{}/out", node.name), b)?);
                    let i = values.len() - 1;
                    for (what, b) in extra {
                        saved[i].push(ctx.round(&format!("fwd/{}/{what}", node.name), b)?);
                    }
                }
                Fwd::View(v) => values.push(v),
                Fwd::Indexed(b, kept) => {
                    values.push(ctx.round(&format!("fwd/{}/out", node.name), b)?);
                    indices[values.len() - 1] = kept;
                }
                Fwd::Loss { loss, grads } => {
                    loss_value = ctx.round(&format!("fwd/{}/out", node.name), loss)?[0];
                    loss_grads = grads;
                    values.push(Vec::new());
                }
            }
        }

        // Backward. `incoming[j]` collects the gradients of node j's output as they arrive.
        let mut incoming: Vec<Vec<Vec<f32>>> = vec![Vec::new(); count];
        let mut param_grads: Vec<Option<Vec<f32>>> = vec![None; self.params.len()];
        for (i, node) in self.nodes.iter().enumerate().rev() {
            if !node.needs_grad {
                continue;
            }
            let need: Vec<bool> =
                node.inputs.iter().map(|s| matches!(s, Src::Node(j) if self.nodes[*j].needs_grad)).collect();
            let site = |pos: usize| -> String {
                let input = &node.input_names[pos];
                let repeat = node.input_names[..pos].contains(input);
                if repeat {
                    format!("bwd/{}/grad_{input}#{pos}", node.name)
                } else {
                    format!("bwd/{}/grad_{input}", node.name)
                }
            };
            let (input_grads, grads_of_params) = if node.op.is_loss() {
                let grads = std::mem::take(&mut loss_grads).into_iter().map(|g| g.map(Grad::Rounded)).collect();
                (grads, Vec::new())
            } else {
                let gy = sum_incoming(ctx, &node.name, std::mem::take(&mut incoming[i]))?;
                let args = self.args(i, get, x, y, n, &values, &saved[i], &indices[i])?;
                let bwd = node.op.backward(ctx, &args, &values[i], &gy, &need)?;
                (bwd.inputs, bwd.params)
            };
            for (pos, g) in input_grads.into_iter().enumerate() {
                let (Some(g), Src::Node(j)) = (g, node.inputs[pos]) else { continue };
                if !need[pos] {
                    continue;
                }
                let g = match g {
                    Grad::Rounded(b) => ctx.round(&site(pos), b)?,
                    Grad::View(v) => v,
                };
                incoming[j].push(g);
            }
            for (&p, g) in node.params.iter().zip(grads_of_params) {
                param_grads[p] = Some(ctx.round(&format!("grad/{}", self.params[p].name), g)?);
            }
        }
        let grads = param_grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| g.ok_or_else(|| EngineError::Usage(format!("no gradient reached parameter {}", p.name))))
            .collect::<Result<Vec<_>, _>>()?;
        let last = &self.nodes[count - 1];
        let logits = match (&last.op, last.inputs[0]) {
            (super::Op::CrossEntropy {}, Src::Node(j)) => Some(values[j].clone()),
            (super::Op::CrossEntropy {}, Src::Input) => Some(x.to_vec()),
            _ => None,
        };
        Ok((loss_value, grads, logits))
    }

    /// The arguments of node `i`.
    #[allow(clippy::too_many_arguments)] // reason: everything a node reads, gathered in one place
    fn args<'a, 'g: 'a>(
        &'a self,
        i: usize,
        get: &Getter<'g>,
        x: &'a [f32],
        y: Labels<'a>,
        n: usize,
        values: &'a [Vec<f32>],
        saved: &'a [Vec<f32>],
        indices: &'a [u32],
    ) -> Result<Args<'a>, EngineError> {
        let node = &self.nodes[i];
        let ins = node
            .inputs
            .iter()
            .map(|s| match s {
                Src::Input => x,
                Src::Labels => &[][..],
                Src::Node(j) => values[*j].as_slice(),
            })
            .collect();
        let params = node.params.iter().map(|&p| get(&self.params[p].name)).collect::<Result<Vec<_>, _>>()?;
        Ok(Args {
            name: &node.name,
            ins,
            saved,
            indices,
            in_shapes: &node.in_shapes,
            params,
            n,
            labels: y,
            classes: self.data.classes,
            out_shape: &node.shape,
        })
    }
}

/// The gradient of a node's output: the only contribution, or their sum in arrival order at
/// `bwd/<node>/sum` (exact: see the module docs).
fn sum_incoming(ctx: &mut Ctx<'_, '_>, node: &str, mut parts: Vec<Vec<f32>>) -> Result<Vec<f32>, EngineError> {
    if parts.len() <= 1 {
        return parts.pop().ok_or_else(|| EngineError::Usage(format!("no gradient reached node {node}")));
    }
    let len = parts[0].len();
    if let Some(part) = parts.iter().find(|p| p.len() != len) {
        return Err(EngineError::Usage(format!("gradients of node {node} have {len} and {} elements", part.len())));
    }
    // One pass, each element's contributions added in arrival order (written in place: no
    // zeroed buffer, no pass per contribution).
    let sum: Vec<f64> = (0..len)
        .into_par_iter()
        .with_min_len(1 << 14)
        .map(|i| parts[1..].iter().fold(parts[0][i] as f64, |s, p| s + p[i] as f64))
        .collect();
    ctx.round(&format!("bwd/{node}/sum"), Bounded::exact(sum))
}
