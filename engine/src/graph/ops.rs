//! The op catalogue: for each [`Op`], its arity, shape rule, parameters, forward and backward
//! in terms of the kernels' bounded ops. This is the only place that knows ops by name.
//!
//! Every FP64 result comes back as a [`Bounded`] for the interpreter to round at the node's
//! site; values that are only moved (views, identity gradients) come back as FP32 and are not
//! rounded again.

use common::prng::Stream;
use kernels::{Bounded, Conv2dSpec, MatmulSpec, Pool2dSpec, RowSpec};

use super::Op;
use crate::EngineError;
use crate::model::{Ctx, Init};

/// What a forward pass produced.
pub(crate) enum Fwd {
    /// FP64 values to round at `fwd/<node>/out`.
    Rounded(Bounded),
    /// The output, and intermediate results the backward pass reads, each rounded at
    /// `fwd/<node>/<what>` after the output.
    Saving(Bounded, Vec<(&'static str, Bounded)>),
    /// FP32 values passed on unchanged (no site).
    View(Vec<f32>),
    /// A loss value (`fwd/<node>/out`), and the gradients of the loss with respect to each
    /// input, to round in the backward pass.
    Loss { loss: Bounded, grads: Vec<Option<Bounded>> },
}

/// The gradient of one input.
pub(crate) enum Grad {
    /// FP64 values to round at `bwd/<node>/grad_<input>`.
    Rounded(Bounded),
    /// The output gradient itself, or a view of it (no site).
    View(Vec<f32>),
}

/// A node's backward pass: one gradient per input that needs one, then one per parameter.
pub(crate) struct Bwd {
    pub inputs: Vec<Option<Grad>>,
    pub params: Vec<Bounded>,
}

/// What an op reads: its inputs' FP32 values and per-example shapes, its parameters, the batch
/// size, and the labels (for losses).
pub(crate) struct Args<'a> {
    /// The node's name (it keys the dropout mask).
    pub name: &'a str,
    pub ins: Vec<&'a [f32]>,
    /// What the forward pass saved (rounded), in the backward pass.
    pub saved: &'a [Vec<f32>],
    pub in_shapes: &'a [Vec<usize>],
    pub params: Vec<&'a [f32]>,
    pub n: usize,
    pub labels: &'a [u32],
    pub classes: usize,
}

/// A shape rule's complaint: the node's field at fault and what is wrong.
pub(crate) type ShapeError = (&'static str, String);

fn k(e: kernels::KernelError) -> EngineError {
    EngineError::Kernel(e)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn same_shape(a: &[usize], b: &[usize]) -> Result<(), ShapeError> {
    if a == b { Ok(()) } else { Err(("inputs", format!("shapes {a:?} and {b:?} differ"))) }
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
    /// The op's name as written in configs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Conv2d { .. } => "conv2d",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::GlobalAvgPool {} => "global_avg_pool",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Dropout { .. } => "dropout",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax {} => "log_softmax",
            Op::Matmul { .. } => "matmul",
            Op::Transpose {} => "transpose",
            Op::Relu {} => "relu",
            Op::Gelu {} => "gelu",
            Op::Tanh {} => "tanh",
            Op::Sigmoid {} => "sigmoid",
            Op::Add {} => "add",
            Op::Mul {} => "mul",
            Op::Reshape { .. } => "reshape",
            Op::Flatten {} => "flatten",
            Op::CrossEntropy {} => "cross_entropy",
            Op::Mse {} => "mse",
        }
    }

    /// Number of inputs.
    pub(crate) fn arity(&self) -> usize {
        match self {
            Op::Add {} | Op::Mul {} | Op::Matmul { .. } | Op::CrossEntropy {} | Op::Mse {} => 2,
            _ => 1,
        }
    }

    /// Whether the op is a loss (a scalar output, and the graph's last node).
    pub(crate) fn is_loss(&self) -> bool {
        matches!(self, Op::CrossEntropy {} | Op::Mse {})
    }

    /// Which inputs may be the batch's labels (only the second input of a loss).
    pub(crate) fn takes_labels(&self, position: usize) -> bool {
        match self {
            Op::CrossEntropy {} => position == 1,
            Op::Mse {} => position == 1,
            _ => false,
        }
    }

    /// The output's per-example shape from the inputs' (`None` stands for `labels`).
    pub(crate) fn shape(&self, ins: &[Option<&[usize]>], classes: usize) -> Result<Vec<usize>, ShapeError> {
        let tensor = |i: usize| ins[i].ok_or_else(|| ("inputs", format!("input {i} cannot be the labels")));
        match self {
            Op::Linear { out, .. } => {
                if *out == 0 {
                    return Err(("out", "must be at least 1".into()));
                }
                let x = tensor(0)?;
                match x.split_last() {
                    Some((_, rest)) => Ok(rest.iter().copied().chain([*out]).collect()),
                    None => Err(("inputs", "a scalar input has no axis to transform".into())),
                }
            }
            Op::Conv2d { out_channels, kernel, stride, padding, .. } => {
                if *out_channels == 0 {
                    return Err(("out_channels", "must be at least 1".into()));
                }
                let [_, h, w] = image(tensor(0)?)?;
                Ok(vec![
                    *out_channels,
                    window_out(h, *kernel, *stride, *padding)?,
                    window_out(w, *kernel, *stride, *padding)?,
                ])
            }
            Op::MaxPool2d { kernel, stride, padding } | Op::AvgPool2d { kernel, stride, padding } => {
                let [c, h, w] = image(tensor(0)?)?;
                if *kernel == 0 {
                    return Err(("kernel", "must be at least 1".into()));
                }
                if padding >= kernel {
                    return Err(("padding", format!("{padding} must be below the window {kernel}")));
                }
                Ok(vec![c, window_out(h, *kernel, *stride, *padding)?, window_out(w, *kernel, *stride, *padding)?])
            }
            Op::GlobalAvgPool {} => Ok(vec![image(tensor(0)?)?[0]]),
            Op::LayerNorm { eps } => {
                if !(eps.is_finite() && *eps > 0.0) {
                    return Err(("eps", format!("must be finite and > 0, got {eps}")));
                }
                let x = tensor(0)?;
                if x.is_empty() {
                    return Err(("inputs", "a scalar input has no axis to normalise".into()));
                }
                Ok(x.to_vec())
            }
            Op::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(("p", format!("must be in [0, 1), got {p}")));
                }
                Ok(tensor(0)?.to_vec())
            }
            Op::Softmax { causal } => {
                let x = tensor(0)?;
                match x {
                    [] => Err(("inputs", "a scalar input has no axis".into())),
                    [.., a, b] if *causal && a != b => {
                        Err(("causal", format!("a causal softmax needs square last axes, not {x:?}")))
                    }
                    [_] if *causal => Err(("causal", "a causal softmax needs [.., t, t]".into())),
                    _ => Ok(x.to_vec()),
                }
            }
            Op::LogSoftmax {} => match tensor(0)? {
                [] => Err(("inputs", "a scalar input has no axis".into())),
                x => Ok(x.to_vec()),
            },
            Op::Matmul { transpose_b, scale } => {
                if !scale.is_finite() {
                    return Err(("scale", format!("must be finite, got {scale}")));
                }
                let (a, b) = (tensor(0)?, tensor(1)?);
                let (Some((ta, [m, k])), Some((tb, [r, c]))) = (split_last2(a), split_last2(b)) else {
                    return Err(("inputs", format!("needs two tensors of at least two axes, not {a:?} and {b:?}")));
                };
                let (kb, n) = if *transpose_b { (*c, *r) } else { (*r, *c) };
                if ta != tb || *k != kb {
                    return Err(("inputs", format!("cannot multiply {a:?} by {b:?} (transpose_b = {transpose_b})")));
                }
                Ok(ta.iter().copied().chain([*m, n]).collect())
            }
            Op::Transpose {} => match split_last2(tensor(0)?) {
                Some((lead, [m, n])) => Ok(lead.iter().copied().chain([*n, *m]).collect()),
                None => Err(("inputs", "needs at least two axes".into())),
            },
            Op::Relu {} | Op::Gelu {} | Op::Tanh {} | Op::Sigmoid {} => Ok(tensor(0)?.to_vec()),
            Op::Add {} | Op::Mul {} => {
                let (a, b) = (tensor(0)?, tensor(1)?);
                same_shape(a, b)?;
                Ok(a.to_vec())
            }
            Op::Reshape { shape } => {
                let x = tensor(0)?;
                if shape.contains(&0) {
                    return Err(("shape", format!("{shape:?} has an empty axis")));
                }
                let fits = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(numel(x));
                if !fits {
                    return Err(("shape", format!("{shape:?} does not hold the {} values of {x:?}", numel(x))));
                }
                Ok(shape.clone())
            }
            Op::Flatten {} => Ok(vec![numel(tensor(0)?)]),
            Op::CrossEntropy {} => {
                let logits = tensor(0)?;
                if ins[1].is_some() {
                    return Err(("inputs", "the second input must be labels".into()));
                }
                if logits != [classes] {
                    return Err(("inputs", format!("logits of shape {logits:?}; the data has {classes} classes")));
                }
                Ok(vec![])
            }
            Op::Mse {} => {
                let p = tensor(0)?;
                match ins[1] {
                    Some(t) => same_shape(p, t)?,
                    None if p == [classes] => {}
                    None => {
                        return Err((
                            "inputs",
                            format!("a prediction of shape {p:?} against one-hot labels of {classes} classes"),
                        ));
                    }
                }
                Ok(vec![])
            }
        }
    }

    /// The op's parameters (name suffix, shape, initialisation) for inputs of these shapes.
    pub(crate) fn params(&self, ins: &[Option<&[usize]>]) -> Vec<(&'static str, Vec<usize>, Init)> {
        match self {
            Op::Linear { out, bias } => {
                let fan_in = ins[0].and_then(|s| s.last().copied()).unwrap_or(1);
                let mut p = vec![("weight", vec![*out, fan_in], Init::Uniform(1.0 / (fan_in as f64).sqrt()))];
                if *bias {
                    p.push(("bias", vec![*out], Init::Const(0.0)));
                }
                p
            }
            Op::Conv2d { out_channels, kernel, bias, .. } => {
                let c_in = ins[0].and_then(|s| s.first().copied()).unwrap_or(1);
                let fan_in = c_in * kernel * kernel;
                let mut p = vec![(
                    "weight",
                    vec![*out_channels, c_in, *kernel, *kernel],
                    Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt()),
                )];
                if *bias {
                    p.push(("bias", vec![*out_channels], Init::Const(0.0)));
                }
                p
            }
            Op::LayerNorm { .. } => {
                let d = ins[0].and_then(|s| s.last().copied()).unwrap_or(1);
                vec![("weight", vec![d], Init::Const(1.0)), ("bias", vec![d], Init::Const(0.0))]
            }
            _ => vec![],
        }
    }

    /// Scratch values per example the op's kernel allocates beyond its output (a
    /// convolution's unfolded input), for the size limits.
    pub(crate) fn scratch_values(&self, ins: &[Option<&[usize]>], out: &[usize]) -> Option<u64> {
        match (self, ins.first().copied().flatten()) {
            (Op::Conv2d { kernel, .. }, Some(x)) => {
                let c_in = *x.first()? as u64;
                let pixels = out.iter().skip(1).try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
                c_in.checked_mul(*kernel as u64)?.checked_mul(*kernel as u64)?.checked_mul(pixels)
            }
            _ => Some(0),
        }
    }

    /// Forward pass.
    pub(crate) fn forward(&self, ctx: &mut Ctx, a: &Args) -> Result<Fwd, EngineError> {
        let dev = ctx.dev;
        Ok(match self {
            Op::Linear { out, .. } => {
                let (rows, i) = linear_dims(a);
                let spec = MatmulSpec::new(rows, i, *out).trans_b();
                Fwd::Rounded(dev.matmul(a.ins[0], a.params[0], a.params.get(1).copied(), spec).map_err(k)?)
            }
            Op::Conv2d { bias, .. } => {
                let spec = self.conv_spec(a);
                Fwd::Rounded(dev.conv2d(a.ins[0], a.params[0], bias.then(|| a.params[1]), spec).map_err(k)?)
            }
            Op::MaxPool2d { .. } => Fwd::Rounded(dev.max_pool2d(a.ins[0], self.pool_spec(a)).map_err(k)?.0),
            Op::AvgPool2d { .. } | Op::GlobalAvgPool {} => {
                Fwd::Rounded(dev.avg_pool2d(a.ins[0], self.pool_spec(a)).map_err(k)?)
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
            Op::CrossEntropy {} => {
                let (loss, grad) = dev.cross_entropy(a.ins[0], a.labels, a.n, a.classes).map_err(k)?;
                Fwd::Loss { loss, grads: vec![Some(grad), None] }
            }
            Op::Mse {} => {
                let target = if a.ins[1].is_empty() { one_hot(a.labels, a.classes) } else { a.ins[1].to_vec() };
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
            Op::Linear { out, bias } => {
                let (rows, i) = linear_dims(a);
                let spec = MatmulSpec::new(rows, i, *out).trans_b();
                let (gx, gw) = dev.matmul_backward(a.ins[0], a.params[0], gy, spec).map_err(k)?;
                let mut params = vec![gw];
                if *bias {
                    params.push(dev.sum_rows(gy, rows, *out).map_err(k)?);
                }
                Bwd { inputs: vec![need[0].then_some(Grad::Rounded(gx))], params }
            }
            Op::Conv2d { bias, .. } => {
                let g = dev.conv2d_backward(a.ins[0], a.params[0], gy, self.conv_spec(a)).map_err(k)?;
                let mut params = vec![g.gw];
                if *bias {
                    params.push(g.gb);
                }
                Bwd { inputs: vec![need[0].then_some(Grad::Rounded(g.gx))], params }
            }
            Op::MaxPool2d { .. } => {
                // The window maxima are recomputed (exact, so the same argmax as forward).
                let spec = self.pool_spec(a);
                let (_, argmax) = dev.max_pool2d(a.ins[0], spec).map_err(k)?;
                one(Some(Grad::Rounded(dev.max_pool2d_backward(gy, &argmax, spec).map_err(k)?)))
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
                let (ga, gb) = dev.matmul_scaled_backward(a.ins[0], a.ins[1], gy, *scale, spec).map_err(k)?;
                Bwd {
                    inputs: vec![need[0].then_some(Grad::Rounded(ga)), need[1].then_some(Grad::Rounded(gb))],
                    params: vec![],
                }
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
            Op::CrossEntropy {} | Op::Mse {} => {
                return Err(EngineError::Usage("a loss's gradients come from its forward pass".into()));
            }
        })
    }
}

impl Op {
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

/// The leading axes and the last two of a shape with at least two.
fn split_last2(x: &[usize]) -> Option<(&[usize], &[usize; 2])> {
    let at = x.len().checked_sub(2)?;
    let (lead, last) = x.split_at(at);
    Some((lead, last.try_into().ok()?))
}

/// The last two axes of a shape the shape rule accepted.
fn last2(x: &[usize]) -> (usize, usize) {
    match x {
        [.., m, n] => (*m, *n),
        _ => (1, x.first().copied().unwrap_or(1)),
    }
}

/// Swaps the last two axes of blocks of `m×n` values.
fn swap_last2(v: &[f32], m: usize, n: usize) -> Vec<f32> {
    let block = (m * n).max(1);
    let mut out = vec![0.0; v.len()];
    for (src, dst) in v.chunks(block).zip(out.chunks_mut(block)) {
        for i in 0..m {
            for j in 0..n {
                dst[j * m + i] = src[i * n + j];
            }
        }
    }
    out
}

/// A per-example `[c, h, w]` shape.
fn image(x: &[usize]) -> Result<[usize; 3], ShapeError> {
    match x {
        [c, h, w] => Ok([*c, *h, *w]),
        _ => Err(("inputs", format!("needs [channels, height, width], not {x:?}"))),
    }
}

/// Output size of a window op along one axis.
fn window_out(size: usize, kernel: usize, stride: usize, pad: usize) -> Result<usize, ShapeError> {
    if kernel == 0 {
        return Err(("kernel", "must be at least 1".into()));
    }
    if stride == 0 {
        return Err(("stride", "must be at least 1".into()));
    }
    let padded =
        pad.checked_mul(2).and_then(|p| p.checked_add(size)).ok_or(("padding", format!("{pad} is too large")))?;
    if padded < kernel {
        return Err(("kernel", format!("{kernel} is larger than the padded input {padded}")));
    }
    Ok((padded - kernel) / stride + 1)
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

/// The dropout mask of node `a.name` at this step: stream `dropout/<node>` of the committed
/// seed, step field = step, layer 0; an element is kept unless its Bernoulli(p) draw hits.
pub fn dropout_mask(seed: u64, step: u64, node: &str, len: usize, p: f64) -> Vec<bool> {
    let mut s = Stream::new(seed, &format!("dropout/{node}"), step, 0);
    (0..len).map(|_| !s.bernoulli(p)).collect()
}

fn mask(ctx: &Ctx, a: &Args, p: f64) -> Vec<bool> {
    dropout_mask(ctx.seed, ctx.step, a.name, a.ins[0].len(), p)
}

/// Rows and input width of a linear op: every axis but the last is a row.
fn linear_dims(a: &Args) -> (usize, usize) {
    let i = a.in_shapes[0].last().copied().unwrap_or(1);
    (a.ins[0].len() / i.max(1), i)
}

fn zip(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| f(x as f64, y as f64)).collect()
}
