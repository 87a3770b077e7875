//! The op catalogue: for each [`Op`], its arity, shape rule and parameters (`shape.rs`),
//! forward and backward in terms of the kernels' bounded ops (`run.rs`), and the ops that only
//! move values (`layout.rs`). This is the only place that knows ops by name.
//!
//! Every FP64 result comes back as a [`Bounded`] for the interpreter to round at the node's
//! site; values that are only moved (views, identity gradients) come back as FP32 and are not
//! rounded again.

use common::prng::Stream;
use kernels::Bounded;

use super::Op;
use crate::model::Ctx;

mod layout;
mod run;
mod shape;

pub(crate) use layout::Padded;
#[cfg(test)]
pub(crate) use layout::unslice;
pub(crate) use shape::DataInfo;

/// What a forward pass produced.
pub(crate) enum Fwd {
    /// FP64 values to round at `fwd/<node>/out`.
    Rounded(Bounded),
    /// The output, and intermediate results the backward pass reads, each rounded at
    /// `fwd/<node>/<what>` after the output.
    Saving(Bounded, Vec<(&'static str, Bounded)>),
    /// FP32 values passed on unchanged (no site).
    View(Vec<f32>),
    /// FP64 values to round at `fwd/<node>/out`, and positions the backward pass reads (a max
    /// pool's argmax: exact, so the same on every machine).
    Indexed(Bounded, Vec<u32>),
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
    /// A slice's gradient: a view padded with zeros, padded only if it has to be (no site).
    Padded(Padded),
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
    /// The positions the forward pass kept ([`Fwd::Indexed`]), in the backward pass.
    pub indices: &'a [u32],
    pub in_shapes: &'a [Vec<usize>],
    pub params: Vec<&'a [f32]>,
    pub n: usize,
    pub labels: Labels<'a>,
    pub classes: usize,
    /// The node's output shape, per example.
    pub out_shape: &'a [usize],
}

/// The batch's labels: class indices (one an example, or one a position of text), or F32
/// targets (regression).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Labels<'a> {
    Classes(&'a [u32]),
    Values(&'a [f32]),
}

/// A shape rule's complaint: the node's field at fault and what is wrong.
pub(crate) type ShapeError = (&'static str, String);

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
            Op::Permute { .. } => "permute",
            Op::Slice { .. } => "slice",
            Op::Split { .. } => "split",
            Op::Concat { .. } => "concat",
            Op::BatchNorm { .. } => "batch_norm",
            Op::Embedding { .. } => "embedding",
            Op::PositionalEmbedding {} => "positional_embedding",
            Op::Attention { .. } => "attention",
            Op::CrossEntropy {} => "cross_entropy",
            Op::Mse {} => "mse",
        }
    }

    /// The numbers of inputs the op takes.
    pub(crate) fn arity(&self) -> std::ops::RangeInclusive<usize> {
        match self {
            Op::Add {} | Op::Mul {} | Op::Matmul { .. } | Op::CrossEntropy {} | Op::Mse {} => 2..=2,
            Op::Concat { .. } => 2..=CONCAT_INPUTS_MAX,
            _ => 1..=1,
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
}

/// Most inputs a `concat` may join.
pub const CONCAT_INPUTS_MAX: usize = 64;

/// The dropout mask of node `a.name` at this step: stream `dropout/<node>` of the committed
/// seed, step field = step, layer 0; an element is kept unless its Bernoulli(p) draw hits.
pub fn dropout_mask(seed: u64, step: u64, node: &str, len: usize, p: f64) -> Vec<bool> {
    let mut s = Stream::new(seed, &format!("dropout/{node}"), step, 0);
    (0..len).map(|_| !s.bernoulli(p)).collect()
}

/// The mask of node `a.name`; while a step accumulates micro-batches, each draws its own (the
/// stream is keyed by the site prefix too: `dropout/micro/<j>/<node>`).
fn mask(ctx: &Ctx, a: &Args, p: f64) -> Vec<bool> {
    if ctx.site_prefix.is_empty() {
        dropout_mask(ctx.seed, ctx.step, a.name, a.ins[0].len(), p)
    } else {
        dropout_mask(ctx.seed, ctx.step, &format!("{}{}", ctx.site_prefix, a.name), a.ins[0].len(), p)
    }
}
