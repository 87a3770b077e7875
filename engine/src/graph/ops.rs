//! The op catalogue: for each [`Op`], its arity, shape rule, parameters, forward and backward
//! in terms of the kernels' bounded ops. This is the only place that knows ops by name.
//!
//! Every FP64 result comes back as a [`Bounded`] for the interpreter to round at the node's
//! site; values that are only moved (views, identity gradients) come back as FP32 and are not
//! rounded again.

use kernels::{Bounded, MatmulSpec};

use super::Op;
use crate::EngineError;
use crate::model::{Ctx, Init};

/// What a forward pass produced.
pub(crate) enum Fwd {
    /// FP64 values to round at `fwd/<node>/out`.
    Rounded(Bounded),
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
    pub ins: Vec<&'a [f32]>,
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
            Op::Add {} | Op::Mul {} | Op::CrossEntropy {} | Op::Mse {} => 2,
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
            _ => vec![],
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
            Op::Relu {} => one(Some(Grad::Rounded(dev.relu_backward(a.ins[0], gy).map_err(k)?))),
            Op::Gelu {} => one(Some(Grad::Rounded(dev.gelu_backward(a.ins[0], gy).map_err(k)?))),
            Op::Tanh {} => one(Some(Grad::Rounded(dev.tanh_backward(y, gy).map_err(k)?))),
            Op::Sigmoid {} => one(Some(Grad::Rounded(dev.sigmoid_backward(y, gy).map_err(k)?))),
            Op::Add {} => Bwd {
                inputs: need.iter().map(|&n| n.then(|| Grad::View(gy.to_vec()))).collect(),
                params: vec![],
            },
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

/// Rows and input width of a linear op: every axis but the last is a row.
fn linear_dims(a: &Args) -> (usize, usize) {
    let i = a.in_shapes[0].last().copied().unwrap_or(1);
    (a.ins[0].len() / i.max(1), i)
}

fn zip(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| f(x as f64, y as f64)).collect()
}
