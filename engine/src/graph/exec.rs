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
use super::ops::{Args, Fwd, Grad, Labels, Padded};
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
        let mut incoming: Vec<Vec<Part>> = std::iter::repeat_with(Vec::new).take(count).collect();
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
                    Grad::Rounded(b) => Part::Dense(ctx.round(&site(pos), b)?),
                    Grad::View(v) => Part::Dense(v),
                    Grad::Padded(p) => Part::Padded(p),
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

/// One contribution to a node's output gradient.
enum Part {
    Dense(Vec<f32>),
    /// A slice's gradient, zeros not yet written.
    Padded(Padded),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Dense(v) => v.len(),
            Part::Padded(p) => p.len(),
        }
    }

    fn dense(self) -> Vec<f32> {
        match self {
            Part::Dense(v) => v,
            Part::Padded(p) => p.dense(),
        }
    }
}

/// Elements per task of [`sum_incoming`] (rounded to whole rows of padded parts).
const SUM_CHUNK: usize = 1 << 14;

/// The gradient of a node's output: the only contribution, or their sum in arrival order at
/// `bwd/<node>/sum` (exact: see the module docs). A padded part adds +0 outside its values, as
/// its zeros would; it is summed row by row without building them.
fn sum_incoming(ctx: &mut Ctx<'_, '_>, node: &str, mut parts: Vec<Part>) -> Result<Vec<f32>, EngineError> {
    if parts.len() <= 1 {
        return parts
            .pop()
            .map(Part::dense)
            .ok_or_else(|| EngineError::Usage(format!("no gradient reached node {node}")));
    }
    let len = parts[0].len();
    if let Some(part) = parts.iter().find(|p| p.len() != len) {
        return Err(EngineError::Usage(format!("gradients of node {node} have {len} and {} elements", part.len())));
    }
    ctx.round(&format!("bwd/{node}/sum"), Bounded::exact(sum_parts(parts)))
}

/// The FP64 sum of `parts` (two or more, of equal length), element by element in order.
fn sum_parts(mut parts: Vec<Part>) -> Vec<f64> {
    let len = parts[0].len();
    let rows: Vec<usize> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Padded(p) => Some(p.row()),
            Part::Dense(_) => None,
        })
        .collect();
    let row = match rows.first() {
        Some(&r) if rows.iter().all(|&x| x == r) => r.max(1),
        Some(_) => {
            // Rows of different lengths: pad them all.
            parts = parts.into_iter().map(|p| Part::Dense(p.dense())).collect();
            1
        }
        None => 1,
    };
    let chunk = row * (SUM_CHUNK / row).max(1);
    // +0 everywhere to start with: the first part's zeros are already in place.
    let mut sum = vec![0.0f64; len];
    sum.par_chunks_mut(chunk).enumerate().for_each(|(c, acc)| {
        let base = c * chunk;
        for (k, part) in parts.iter().enumerate() {
            let first = k == 0;
            match part {
                Part::Dense(v) => add(acc, &v[base..base + acc.len()], first),
                Part::Padded(p) => {
                    for (r, acc_row) in acc.chunks_mut(row).enumerate() {
                        let (at, values) = p.row_values(base / row + r);
                        let (before, rest) = acc_row.split_at_mut(at);
                        let (mid, after) = rest.split_at_mut(values.len());
                        add(mid, values, first);
                        if !first {
                            // x + 0 is x except for −0, which it turns into +0.
                            before.iter_mut().chain(after).for_each(|a| *a += 0.0);
                        }
                    }
                }
            }
        }
    });
    sum
}

/// `acc = v` (the first part) or `acc += v`, in FP64.
fn add(acc: &mut [f64], v: &[f32], first: bool) {
    if first {
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a = x as f64);
    } else {
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a += x as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::{Padded, unslice};
    use super::*;

    /// Where a slice's gradient goes: `(axis, start, end)`, or `None` for a dense part.
    type Cut = Option<(usize, usize, usize)>;

    /// The sum as the interpreter computed it before padded parts: pad, then add.
    fn padded_then_summed(parts: &[(Vec<f32>, Cut)], n: usize, shape: &[usize]) -> Vec<f64> {
        let dense: Vec<Vec<f32>> = parts
            .iter()
            .map(|(v, cut)| match cut {
                Some((axis, start, end)) => unslice(v, n, shape, *axis, *start, *end),
                None => v.clone(),
            })
            .collect();
        let mut sum: Vec<f64> = dense[0].iter().map(|&v| v as f64).collect();
        for part in &dense[1..] {
            sum.iter_mut().zip(part).for_each(|(s, &v)| *s += v as f64);
        }
        sum
    }

    #[test]
    fn padded_parts_sum_as_their_zeros_would() {
        // Values with signed zeros, so that +0 padding turning −0 into +0 is visible.
        let value = |i: usize| [-0.0f32, 0.0, 1.5, -2.25, 3.0e-39, -7.0][i % 6] * (1 + i % 5) as f32;
        let (n, shape) = (3usize, [6usize, 4, 70]);
        let len = n * shape.iter().product::<usize>();
        let slice_len = |axis: usize, start: usize, end: usize| len / shape[axis] * (end - start);
        let cases: Vec<Vec<Cut>> = vec![
            vec![Some((0, 4, 6)), Some((0, 2, 4)), Some((0, 0, 2))], // an attention's q, k, v, in arrival order
            vec![None, Some((0, 0, 3)), None],
            vec![Some((1, 1, 3)), None, Some((1, 0, 4))],
            vec![Some((0, 0, 6)), Some((2, 10, 70))], // rows of different lengths
            vec![Some((2, 0, 1)), Some((2, 69, 70)), Some((2, 5, 6)), None],
        ];
        for cuts in cases {
            let parts: Vec<(Vec<f32>, Cut)> = cuts
                .iter()
                .enumerate()
                .map(|(k, &cut)| {
                    let m = cut.map_or(len, |(a, s, e)| slice_len(a, s, e));
                    ((0..m).map(|i| value(i * (k + 2) + k)).collect(), cut)
                })
                .collect();
            let want = padded_then_summed(&parts, n, &shape);
            let got = sum_parts(
                parts
                    .into_iter()
                    .map(|(v, cut)| match cut {
                        Some((axis, start, end)) => Part::Padded(Padded::new(v, n, &shape, axis, start, end)),
                        None => Part::Dense(v),
                    })
                    .collect(),
            );
            let bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{cuts:?}");
        }
    }
}
