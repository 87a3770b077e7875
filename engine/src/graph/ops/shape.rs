//! Each op's shape rule, parameters and scratch size: what resolving a graph needs, before
//! any value exists.

use super::{Op, ShapeError};
use crate::model::Init;

/// What the data tells the shape rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataInfo {
    /// Classes of the labels (the vocabulary, for text).
    pub classes: usize,
    /// Per-example shape of the labels: `[]` (one class an example) or `[t]` (one a position).
    pub labels: Vec<usize>,
    /// Whether `x` holds token ids (text data), which only an embedding reads.
    pub tokens: bool,
    /// Whether the labels are F32 targets of shape `labels` (regression) rather than classes.
    pub targets: bool,
}

pub(super) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn same_shape(a: &[usize], b: &[usize]) -> Result<(), ShapeError> {
    if a == b { Ok(()) } else { Err(("inputs", format!("shapes {a:?} and {b:?} differ"))) }
}

/// The leading axes and the last two of a shape with at least two.
pub(super) fn split_last2(x: &[usize]) -> Option<(&[usize], &[usize; 2])> {
    let at = x.len().checked_sub(2)?;
    let (lead, last) = x.split_at(at);
    Some((lead, last.try_into().ok()?))
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

/// The axis an op names, checked against the input's rank.
fn axis_of(x: &[usize], axis: usize) -> Result<usize, ShapeError> {
    if axis < x.len() {
        Ok(axis)
    } else {
        Err(("axis", format!("{axis} is not an axis of {x:?} (axes count from 0, the batch axis excluded)")))
    }
}

impl Op {
    /// The bounds `start..end` of a slice or split of an input of shape `x`.
    pub(crate) fn slice_bounds(&self, x: &[usize]) -> Result<(usize, usize, usize), ShapeError> {
        match self {
            Op::Slice { axis, start, end } => {
                let axis = axis_of(x, *axis)?;
                if start >= end || *end > x[axis] {
                    return Err(("end", format!("{start}..{end} is not a non-empty range of axis {axis} ({x:?})")));
                }
                Ok((axis, *start, *end))
            }
            Op::Split { axis, parts, index } => {
                let axis = axis_of(x, *axis)?;
                if *parts == 0 || !x[axis].is_multiple_of(*parts) {
                    return Err(("parts", format!("{parts} equal parts do not divide axis {axis} of {x:?}")));
                }
                if index >= parts {
                    return Err(("index", format!("{index} is not below parts = {parts}")));
                }
                let width = x[axis] / parts;
                Ok((axis, index * width, (index + 1) * width))
            }
            _ => Err(("op", format!("{} is no slice", self.name()))),
        }
    }

    /// The output's per-example shape from the inputs' (`None` stands for `labels`).
    pub(crate) fn shape(&self, ins: &[Option<&[usize]>], data: &DataInfo) -> Result<Vec<usize>, ShapeError> {
        let tensor = |i: usize| ins[i].ok_or_else(|| ("inputs", format!("input {i} cannot be the labels")));
        let classes = data.classes;
        match self {
            Op::Linear { out, .. } => {
                let out = out.resolve(classes);
                if out == 0 {
                    return Err(("out", "must be at least 1".into()));
                }
                let x = tensor(0)?;
                match x.split_last() {
                    Some((_, rest)) => Ok(rest.iter().copied().chain([out]).collect()),
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
            Op::LayerNorm { eps } | Op::BatchNorm { eps } => {
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
            Op::Permute { perm } => {
                let x = tensor(0)?;
                let mut seen = vec![false; x.len()];
                let is_perm = perm.len() == x.len()
                    && perm.iter().all(|&p| p < x.len() && !std::mem::replace(&mut seen[p], true));
                if !is_perm {
                    return Err(("perm", format!("{perm:?} is not a permutation of the {} axes of {x:?}", x.len())));
                }
                Ok(perm.iter().map(|&p| x[p]).collect())
            }
            Op::Slice { .. } | Op::Split { .. } => {
                let x = tensor(0)?;
                let (axis, start, end) = self.slice_bounds(x)?;
                let mut out = x.to_vec();
                out[axis] = end - start;
                Ok(out)
            }
            Op::Concat { axis } => {
                let first = tensor(0)?;
                let axis = axis_of(first, *axis)?;
                let mut out = first.to_vec();
                for i in 1..ins.len() {
                    let x = tensor(i)?;
                    let agree = x.len() == first.len()
                        && x.iter().zip(first).enumerate().all(|(j, (a, b))| j == axis || a == b);
                    if !agree {
                        return Err(("inputs", format!("cannot join {x:?} to {first:?} along axis {axis}")));
                    }
                    out[axis] = out[axis].checked_add(x[axis]).ok_or(("inputs", "the joined axis overflows".into()))?;
                }
                Ok(out)
            }
            Op::Embedding { dim } => {
                if *dim == 0 {
                    return Err(("dim", "must be at least 1".into()));
                }
                if !data.tokens {
                    return Err(("op", "an embedding reads token ids: it needs text data".into()));
                }
                Ok(tensor(0)?.iter().copied().chain([*dim]).collect())
            }
            Op::PositionalEmbedding {} => Ok(tensor(0)?.to_vec()),
            Op::Attention { .. } => Err(("op", "attention is expanded before shapes are checked".into())),
            Op::CrossEntropy {} if data.targets => {
                Err(("op", "cross_entropy needs class labels; this data has F32 targets (use mse)".into()))
            }
            Op::CrossEntropy {} => {
                let logits = tensor(0)?;
                if ins[1].is_some() {
                    return Err(("inputs", "the second input must be labels".into()));
                }
                let want: Vec<usize> = data.labels.iter().copied().chain([classes]).collect();
                if logits != want.as_slice() {
                    return Err((
                        "inputs",
                        format!("logits of shape {logits:?}; the labels need {want:?} ({classes} classes)"),
                    ));
                }
                Ok(vec![])
            }
            Op::Mse {} => {
                let p = tensor(0)?;
                let one_hot: Vec<usize> = data.labels.iter().copied().chain([classes]).collect();
                match ins[1] {
                    Some(t) => same_shape(p, t)?,
                    None if data.targets && p == data.labels.as_slice() => {}
                    None if data.targets => {
                        return Err((
                            "inputs",
                            format!("a prediction of shape {p:?} against targets of shape {:?}", data.labels),
                        ));
                    }
                    None if p == one_hot.as_slice() => {}
                    None => {
                        return Err((
                            "inputs",
                            format!("a prediction of shape {p:?} against one-hot labels of shape {one_hot:?}"),
                        ));
                    }
                }
                Ok(vec![])
            }
        }
    }

    /// The op's parameters (name suffix, shape, initialisation) for inputs of these shapes.
    pub(crate) fn params(&self, ins: &[Option<&[usize]>], data: &DataInfo) -> Vec<(&'static str, Vec<usize>, Init)> {
        match self {
            Op::Linear { out, bias, init } => {
                let out = out.resolve(data.classes);
                let fan_in = ins[0].and_then(|s| s.last().copied()).unwrap_or(1);
                let mut p = vec![("weight", vec![out, fan_in], Init::Uniform(init.bound(fan_in)))];
                if *bias {
                    p.push(("bias", vec![out], Init::Const(0.0)));
                }
                p
            }
            Op::Conv2d { out_channels, kernel, bias, init, .. } => {
                let c_in = ins[0].and_then(|s| s.first().copied()).unwrap_or(1);
                let fan_in = c_in * kernel * kernel;
                let mut p =
                    vec![("weight", vec![*out_channels, c_in, *kernel, *kernel], Init::Uniform(init.bound(fan_in)))];
                if *bias {
                    p.push(("bias", vec![*out_channels], Init::Const(0.0)));
                }
                p
            }
            Op::LayerNorm { .. } => {
                let d = ins[0].and_then(|s| s.last().copied()).unwrap_or(1);
                vec![("weight", vec![d], Init::Const(1.0)), ("bias", vec![d], Init::Const(0.0))]
            }
            Op::BatchNorm { .. } => {
                let c = ins[0].and_then(|s| s.first().copied()).unwrap_or(1);
                vec![("weight", vec![c], Init::Const(1.0)), ("bias", vec![c], Init::Const(0.0))]
            }
            Op::Embedding { dim } => vec![("weight", vec![data.classes, *dim], Init::Uniform(0.1))],
            Op::PositionalEmbedding {} => {
                vec![("weight", ins[0].map(<[usize]>::to_vec).unwrap_or_default(), Init::Uniform(0.1))]
            }
            _ => vec![],
        }
    }

    /// Scratch values per example the op's kernel allocates beyond its output (a
    /// convolution's unfolded input, a batch norm's transposed copies), for the size limits.
    pub(crate) fn scratch_values(&self, ins: &[Option<&[usize]>], out: &[usize]) -> Option<u64> {
        match (self, ins.first().copied().flatten()) {
            (Op::Conv2d { kernel, .. }, Some(x)) => {
                let c_in = *x.first()? as u64;
                let pixels = out.iter().skip(1).try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
                c_in.checked_mul(*kernel as u64)?.checked_mul(*kernel as u64)?.checked_mul(pixels)
            }
            (Op::BatchNorm { .. }, Some(x)) => (numel(x) as u64).checked_mul(3),
            _ => Some(0),
        }
    }
}
