//! Each op's forward and backward pass, in terms of the kernels' bounded ops.

use kernels::{Bounded, Conv2dSpec, ErrorBound, MatmulSpec, Pool2dSpec, RowSpec};

use super::layout::{Padded, concat, inverse, permute, slice, swap_last2, unconcat};
use super::shape::numel;
use super::{Args, Bwd, Fwd, Grad, Labels, Op, mask};
use crate::EngineError;
use crate::model::Ctx;

fn k(e: kernels::KernelError) -> EngineError {
    EngineError::Kernel(e)
}

/// One-hot rows of `labels` over `classes`.
fn one_hot(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut t = vec![0.0; labels.len() * classes];
    for (r, &c) in labels.iter().enumerate() {
        t[r * classes + c as usize] = 1.0;
    }
    t
}

impl Op {
    /// Forward pass.
    pub(crate) fn forward(&self, ctx: &mut Ctx, a: &Args) -> Result<Fwd, EngineError> {
        let dev = ctx.dev;
        Ok(match self {
            Op::Linear { .. } => {
                let (rows, i) = linear_dims(a);
                let spec = MatmulSpec::new(rows, i, out_width(a)).trans_b();
                Fwd::Rounded(dev.matmul(a.ins[0], a.params[0], a.params.get(1).copied(), spec).map_err(k)?)
            }
            Op::Conv2d { bias, .. } => {
                let spec = self.conv_spec(a);
                Fwd::Rounded(dev.conv2d(a.ins[0], a.params[0], bias.then(|| a.params[1]), spec).map_err(k)?)
            }
            Op::MaxPool2d { .. } => {
                let (y, argmax) = dev.max_pool2d(a.ins[0], self.pool_spec(a)).map_err(k)?;
                Fwd::Indexed(y, argmax)
            }
            Op::AvgPool2d { .. } | Op::GlobalAvgPool {} => {
                Fwd::Rounded(dev.avg_pool2d(a.ins[0], self.pool_spec(a), ctx.sums).map_err(k)?)
            }
            Op::LayerNorm { eps } => {
                let (rows, d) = last_axis(a);
                let out = dev.layer_norm(a.ins[0], a.params[0], a.params[1], rows, d, *eps).map_err(k)?;
                Fwd::Saving(out.y, vec![("mean", out.mean), ("rstd", out.rstd)])
            }
            Op::Dropout { p } => Fwd::Rounded(dev.dropout(a.ins[0], &mask(ctx, a, *p), *p).map_err(k)?),
            Op::Softmax { causal } => Fwd::Rounded(dev.softmax(a.ins[0], row_spec(a, *causal)).map_err(k)?),
            Op::LogSoftmax {} => Fwd::Rounded(dev.log_softmax(a.ins[0], row_spec(a, false)).map_err(k)?),
            Op::Matmul { scale, .. } => {
                Fwd::Rounded(dev.matmul_scaled(a.ins[0], a.ins[1], *scale, self.matmul_spec(a)).map_err(k)?)
            }
            Op::Transpose {} => {
                let (m, n) = last2(&a.in_shapes[0]);
                Fwd::View(swap_last2(a.ins[0], m, n))
            }
            Op::Relu {} => Fwd::Rounded(dev.relu(a.ins[0]).map_err(k)?),
            Op::Gelu {} => Fwd::Rounded(dev.gelu(a.ins[0]).map_err(k)?),
            Op::Tanh {} => Fwd::Rounded(dev.tanh(a.ins[0]).map_err(k)?),
            Op::Sigmoid {} => Fwd::Rounded(dev.sigmoid(a.ins[0]).map_err(k)?),
            // A sum of two FP32 values in FP64 is correctly rounded, and a product exact: the
            // same bits on every IEEE machine.
            Op::Add {} => Fwd::Rounded(Bounded::exact(zip(a.ins[0], a.ins[1], |x, y| x + y))),
            Op::Mul {} => Fwd::Rounded(Bounded::exact(zip(a.ins[0], a.ins[1], |x, y| x * y))),
            Op::Reshape { .. } | Op::Flatten {} => Fwd::View(a.ins[0].to_vec()),
            Op::Permute { perm } => Fwd::View(permute(a.ins[0], a.n, &a.in_shapes[0], perm)),
            Op::Slice { .. } | Op::Split { .. } => {
                let (axis, start, end) = self.bounds(a)?;
                Fwd::View(slice(a.ins[0], a.n, &a.in_shapes[0], axis, start, end))
            }
            Op::Concat { axis } => Fwd::View(concat(&a.ins, a.n, a.in_shapes, *axis)),
            Op::BatchNorm { eps } => {
                let (c, rest) = channels(a);
                let xt = permute(a.ins[0], 1, &[a.n, c, rest], &[1, 0, 2]);
                let out = dev.batch_norm(&xt, a.params[0], a.params[1], c, a.n * rest, *eps, ctx.sums).map_err(k)?;
                let y = permute_bounded(out.y, &[c, a.n, rest], &[1, 0, 2]);
                Fwd::Saving(y, vec![("mean", out.mean), ("rstd", out.rstd)])
            }
            Op::Embedding { dim } => {
                let ids = token_ids(a.ins[0], a.classes)?;
                let table = a.params[0];
                let mut rows = Vec::with_capacity(ids.len() * dim);
                for &id in &ids {
                    rows.extend_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
                }
                Fwd::View(rows)
            }
            Op::PositionalEmbedding {} => {
                let w = a.params[0];
                let per = w.len().max(1);
                Fwd::Rounded(Bounded::exact(
                    a.ins[0].iter().enumerate().map(|(i, &x)| x as f64 + w[i % per] as f64).collect(),
                ))
            }
            Op::Attention { .. } => return Err(expanded()),
            Op::CrossEntropy {} => {
                let Labels::Classes(labels) = a.labels else {
                    return Err(EngineError::Usage("cross_entropy needs class labels".into()));
                };
                let (loss, grad) = dev.cross_entropy(a.ins[0], labels, labels.len(), a.classes).map_err(k)?;
                Fwd::Loss { loss, grads: vec![Some(grad), None] }
            }
            Op::Mse {} => {
                let target = match a.labels {
                    _ if !a.ins[1].is_empty() => a.ins[1].to_vec(),
                    Labels::Classes(labels) => one_hot(labels, a.classes),
                    Labels::Values(targets) => targets.to_vec(),
                };
                let (loss, grad) = dev.mse(a.ins[0], &target).map_err(k)?;
                // d/dt = −d/dp: a negation, exact.
                let g_t = (!a.ins[1].is_empty()).then(|| Bounded::exact(grad.values.iter().map(|v| -v).collect()));
                Fwd::Loss { loss, grads: vec![Some(grad), g_t] }
            }
        })
    }

    /// Backward pass from the output gradient `gy` (unused by losses, whose gradients come from
    /// the forward pass) and the rounded output `y`; `need[i]` says whether input `i` wants
    /// its gradient.
    pub(crate) fn backward(
        &self,
        ctx: &mut Ctx,
        a: &Args,
        y: &[f32],
        gy: &[f32],
        need: &[bool],
    ) -> Result<Bwd, EngineError> {
        let dev = ctx.dev;
        let one = |g: Option<Grad>| Bwd { inputs: vec![need[0].then_some(g).flatten()], params: vec![] };
        Ok(match self {
            Op::Linear { bias, .. } => {
                let (rows, i) = linear_dims(a);
                let out = out_width(a);
                let spec = MatmulSpec::new(rows, i, out).trans_b();
                let (gx, gw) = dev
                    .matmul_scaled_backward_wanted(a.ins[0], a.params[0], gy, 1.0, spec, [need[0], true])
                    .map_err(k)?;
                let mut params = vec![gw.ok_or_else(|| EngineError::Usage("linear: no weight gradient".into()))?];
                if *bias {
                    params.push(dev.sum_rows(gy, rows, out).map_err(k)?);
                }
                Bwd { inputs: vec![gx.map(Grad::Rounded)], params }
            }
            Op::Conv2d { bias, .. } => {
                let (gx, gw, gb) =
                    dev.conv2d_backward_wanted(a.ins[0], a.params[0], gy, self.conv_spec(a), need[0]).map_err(k)?;
                let mut params = vec![gw];
                if *bias {
                    params.push(gb);
                }
                Bwd { inputs: vec![gx.map(Grad::Rounded)], params }
            }
            Op::MaxPool2d { .. } => {
                // The forward pass's argmax (exact: the same on every machine).
                let spec = self.pool_spec(a);
                one(Some(Grad::Rounded(dev.max_pool2d_backward(gy, a.indices, spec).map_err(k)?)))
            }
            Op::AvgPool2d { .. } | Op::GlobalAvgPool {} => {
                one(Some(Grad::Rounded(dev.avg_pool2d_backward(gy, self.pool_spec(a)).map_err(k)?)))
            }
            Op::LayerNorm { .. } => {
                let (rows, d) = last_axis(a);
                let (mean, rstd) = (&a.saved[0], &a.saved[1]);
                let g = dev.layer_norm_backward(a.ins[0], a.params[0], mean, rstd, gy, rows, d).map_err(k)?;
                Bwd { inputs: vec![need[0].then_some(Grad::Rounded(g.gx))], params: vec![g.ggamma, g.gbeta] }
            }
            Op::Dropout { p } => one(Some(Grad::Rounded(dev.dropout_backward(gy, &mask(ctx, a, *p), *p).map_err(k)?))),
            Op::Softmax { causal } => {
                one(Some(Grad::Rounded(dev.softmax_backward(y, gy, row_spec(a, *causal)).map_err(k)?)))
            }
            Op::LogSoftmax {} => {
                one(Some(Grad::Rounded(dev.log_softmax_backward(y, gy, row_spec(a, false)).map_err(k)?)))
            }
            Op::Matmul { scale, .. } => {
                let spec = self.matmul_spec(a);
                let (ga, gb) = dev
                    .matmul_scaled_backward_wanted(a.ins[0], a.ins[1], gy, *scale, spec, [need[0], need[1]])
                    .map_err(k)?;
                Bwd { inputs: vec![ga.map(Grad::Rounded), gb.map(Grad::Rounded)], params: vec![] }
            }
            Op::Transpose {} => {
                // The output gradient has the swapped shape [.., n, m].
                let (m, n) = last2(&a.in_shapes[0]);
                one(Some(Grad::View(swap_last2(gy, n, m))))
            }
            Op::Relu {} => one(Some(Grad::Rounded(dev.relu_backward(a.ins[0], gy).map_err(k)?))),
            Op::Gelu {} => one(Some(Grad::Rounded(dev.gelu_backward(a.ins[0], gy).map_err(k)?))),
            Op::Tanh {} => one(Some(Grad::Rounded(dev.tanh_backward(y, gy).map_err(k)?))),
            Op::Sigmoid {} => one(Some(Grad::Rounded(dev.sigmoid_backward(y, gy).map_err(k)?))),
            Op::Add {} => {
                Bwd { inputs: need.iter().map(|&n| n.then(|| Grad::View(gy.to_vec()))).collect(), params: vec![] }
            }
            Op::Mul {} => {
                // d(a·b)/da = gy·b, /db = gy·a: products of FP32 values, exact.
                let g = |other: &[f32]| Grad::Rounded(Bounded::exact(zip(gy, other, |g, o| g * o)));
                Bwd { inputs: vec![need[0].then(|| g(a.ins[1])), need[1].then(|| g(a.ins[0]))], params: vec![] }
            }
            Op::Reshape { .. } | Op::Flatten {} => one(Some(Grad::View(gy.to_vec()))),
            Op::Permute { perm } => one(Some(Grad::View(permute(gy, a.n, a.out_shape, &inverse(perm))))),
            Op::Slice { .. } | Op::Split { .. } => {
                let (axis, start, end) = self.bounds(a)?;
                one(Some(Grad::Padded(Padded::new(gy.to_vec(), a.n, &a.in_shapes[0], axis, start, end))))
            }
            Op::Concat { axis } => {
                let parts = unconcat(gy, a.n, a.in_shapes, *axis);
                Bwd {
                    inputs: parts.into_iter().zip(need).map(|(g, &n)| n.then_some(Grad::View(g))).collect(),
                    params: vec![],
                }
            }
            Op::BatchNorm { .. } => {
                let (c, rest) = channels(a);
                let to_rows = |v: &[f32]| permute(v, 1, &[a.n, c, rest], &[1, 0, 2]);
                let (mean, rstd) = (&a.saved[0], &a.saved[1]);
                let (xt, gyt) = (to_rows(a.ins[0]), to_rows(gy));
                let sums = ctx.sums;
                let g = dev.batch_norm_backward(&xt, a.params[0], mean, rstd, &gyt, c, a.n * rest, sums).map_err(k)?;
                let gx = permute_bounded(g.gx, &[c, a.n, rest], &[1, 0, 2]);
                Bwd { inputs: vec![need[0].then_some(Grad::Rounded(gx))], params: vec![g.ggamma, g.gbeta] }
            }
            Op::Embedding { dim } => {
                let ids = token_ids(a.ins[0], a.classes)?;
                Bwd { inputs: vec![None], params: vec![dev.embedding_backward(gy, &ids, a.classes, *dim).map_err(k)?] }
            }
            Op::PositionalEmbedding {} => {
                // The parameter's gradient sums the batch's: a column sum over the examples.
                let per = a.params[0].len();
                Bwd {
                    inputs: vec![need[0].then(|| Grad::View(gy.to_vec()))],
                    params: vec![dev.sum_rows(gy, a.n, per).map_err(k)?],
                }
            }
            Op::Attention { .. } => return Err(expanded()),
            Op::CrossEntropy {} | Op::Mse {} => {
                return Err(EngineError::Usage("a loss's gradients come from its forward pass".into()));
            }
        })
    }

    /// A slice's or split's bounds (the shape rule checked them).
    fn bounds(&self, a: &Args) -> Result<(usize, usize, usize), EngineError> {
        self.slice_bounds(&a.in_shapes[0])
            .map_err(|(field, what)| EngineError::Usage(format!("node {}: {field}: {what}", a.name)))
    }

    fn matmul_spec(&self, a: &Args) -> MatmulSpec {
        let transpose_b = matches!(self, Op::Matmul { transpose_b: true, .. });
        let (m, k) = last2(&a.in_shapes[0]);
        let (r, c) = last2(&a.in_shapes[1]);
        let n = if transpose_b { r } else { c };
        let batch = a.ins[0].len() / (m * k).max(1);
        let spec = MatmulSpec::batched(batch, m, k, n);
        if transpose_b { spec.trans_b() } else { spec }
    }

    fn conv_spec(&self, a: &Args) -> Conv2dSpec {
        let (x, w) = (&a.in_shapes[0], a.params[0]);
        let (c_out, k, stride, pad) = match self {
            Op::Conv2d { out_channels, kernel, stride, padding, .. } => (*out_channels, *kernel, *stride, *padding),
            _ => (w.len(), 1, 1, 0),
        };
        Conv2dSpec { n: a.n, c_in: x[0], h: x[1], w: x[2], c_out, kh: k, kw: k, stride, pad }
    }

    fn pool_spec(&self, a: &Args) -> Pool2dSpec {
        let x = &a.in_shapes[0];
        let (kh, kw, stride, pad) = match self {
            Op::MaxPool2d { kernel, stride, padding } | Op::AvgPool2d { kernel, stride, padding } => {
                (*kernel, *kernel, *stride, *padding)
            }
            _ => (x[1], x[2], 1, 0), // global: one window over the plane
        };
        Pool2dSpec { n: a.n, c: x[0], h: x[1], w: x[2], kh, kw, stride, pad }
    }
}

/// The last two axes of a shape the shape rule accepted.
fn last2(x: &[usize]) -> (usize, usize) {
    match x {
        [.., m, n] => (*m, *n),
        _ => (1, x.first().copied().unwrap_or(1)),
    }
}

/// Rows and length of the last axis.
fn last_axis(a: &Args) -> (usize, usize) {
    let d = a.in_shapes[0].last().copied().unwrap_or(1).max(1);
    (a.ins[0].len() / d, d)
}

fn row_spec(a: &Args, causal: bool) -> RowSpec {
    let (rows, d) = last_axis(a);
    if causal { RowSpec::causal(rows, d) } else { RowSpec::new(rows, d) }
}

/// Rows and input width of a linear op: every axis but the last is a row.
fn linear_dims(a: &Args) -> (usize, usize) {
    let i = a.in_shapes[0].last().copied().unwrap_or(1);
    (a.ins[0].len() / i.max(1), i)
}

fn zip(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| f(x as f64, y as f64)).collect()
}

/// The width of a linear op's output (its output shape's last axis).
fn out_width(a: &Args) -> usize {
    a.out_shape.last().copied().unwrap_or(1)
}

/// Channels `c` and values per channel and example of a `[c, …]` input.
fn channels(a: &Args) -> (usize, usize) {
    let x = &a.in_shapes[0];
    let c = x.first().copied().unwrap_or(1);
    (c, numel(&x[1..]))
}

/// `b` (laid out as one tensor of `shape`) with its axes permuted, bounds moved along.
fn permute_bounded(b: Bounded, shape: &[usize], perm: &[usize]) -> Bounded {
    let values = permute(&b.values, 1, shape, perm);
    let bound = match b.bound {
        ErrorBound::Exact => ErrorBound::Exact,
        ErrorBound::Uniform(d) => ErrorBound::Uniform(d),
        other => {
            let each: Vec<f64> = (0..b.values.len()).map(|i| other.at(i)).collect();
            ErrorBound::PerElement(permute(&each, 1, shape, perm))
        }
    };
    Bounded { values, bound }
}

/// The token ids an embedding reads (FP32 copies of ids below `vocab`, which are exact).
fn token_ids(x: &[f32], vocab: usize) -> Result<Vec<u32>, EngineError> {
    x.iter()
        .map(|&v| {
            let id = v as u32;
            if id as f32 == v && (id as usize) < vocab {
                Ok(id)
            } else {
                Err(EngineError::Usage(format!("{v} is not a token id below the vocabulary of {vocab}")))
            }
        })
        .collect()
}

fn expanded() -> EngineError {
    EngineError::Usage("an attention node runs as the ops it expands to".into())
}
