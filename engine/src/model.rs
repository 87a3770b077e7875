//! Models built on `kernels`, with every intermediate result rounded to FP32 at a named site.
//!
//! # Rounding sites and their order
//! A step visits sites in a fixed order: the forward pass layer by layer (`fwd/<layer>/<what>`),
//! the loss (`fwd/loss`, `bwd/loss/grad_logits`), the backward pass from the last layer to the
//! first (`bwd/<layer>/grad_in`, `grad/<param>`), then the optimizer over parameters in name
//! order (`opt/<param>/<slot>`, with slot `param` last). Names are unique within a step; the
//! replayer checks that every site the trainer logged is visited.
//!
//! Ops whose FP64 result is exact or correctly rounded from FP32 inputs (ReLU, residual adds,
//! copies) carry `ErrorBound::Exact` and are never logged; they are still rounded, so that
//! every tensor a later op reads is FP32.

use common::prng::Stream;
use common::rounding::{ErrorBound, Rounder};
use common::state::{Tensor, TrainingState};
use kernels::{Bounded, Conv2dSpec, Device, MatmulSpec, Pool2dSpec, RowSpec};

use crate::EngineError;
use crate::data::Dataset;
use crate::spec::{GptConfig, ModelConfig};

/// Layer-norm epsilon of the GPT.
pub const LN_EPS: f64 = 1e-5;

/// Everything one step's ops need: the device, the rounder and the step number.
#[derive(Debug)]
pub struct Ctx<'a, 'r> {
    pub dev: &'a Device,
    pub rounder: &'a mut Rounder<'r>,
    pub step: u64,
    pub seed: u64,
    /// Put before every site name (`micro/<j>/` while a step accumulates micro-batch `j`, so the
    /// model's sites stay unique within the step); empty otherwise.
    pub site_prefix: String,
}

impl<'a, 'r> Ctx<'a, 'r> {
    /// A context for step `step` of a run seeded with `seed`, with no site prefix.
    pub fn new(dev: &'a Device, rounder: &'a mut Rounder<'r>, step: u64, seed: u64) -> Self {
        Ctx { dev, rounder, step, seed, site_prefix: String::new() }
    }

    /// Rounds one op's FP64 result at a named site.
    pub fn round(&mut self, site: &str, b: Bounded) -> Result<Vec<f32>, EngineError> {
        let prefixed;
        let site = if self.site_prefix.is_empty() {
            site
        } else {
            prefixed = format!("{}{site}", self.site_prefix);
            &prefixed
        };
        self.rounder
            .round(site, &b.values, &b.bound)
            .map_err(|source| EngineError::Rounding { step: self.step, source })
    }

    fn exact(&mut self, site: &str, values: Vec<f64>) -> Result<Vec<f32>, EngineError> {
        self.round(site, Bounded { values, bound: ErrorBound::Exact })
    }
}

/// A batch of examples, assembled from batch indices.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// `n` inputs of `dim` values each, and their labels.
    Classes { x: Vec<f32>, y: Vec<u32>, n: usize },
    /// `b` windows of `t` token ids, and the next-token targets.
    Tokens { ids: Vec<u32>, targets: Vec<u32>, b: usize, t: usize },
}

impl Batch {
    /// Assembles the examples named by `indices`.
    pub fn gather(data: &Dataset, indices: &[u64]) -> Batch {
        match data {
            Dataset::Classification { input_shape, inputs, labels, .. } => {
                let dim: usize = input_shape.iter().product();
                let mut x = Vec::with_capacity(indices.len() * dim);
                let mut y = Vec::with_capacity(indices.len());
                for &i in indices {
                    let i = i as usize;
                    x.extend_from_slice(&inputs[i * dim..(i + 1) * dim]);
                    y.push(labels[i]);
                }
                Batch::Classes { x, y, n: indices.len() }
            }
            Dataset::Text { tokens, context, .. } => {
                let t = *context;
                let mut ids = Vec::with_capacity(indices.len() * t);
                let mut targets = Vec::with_capacity(indices.len() * t);
                for &i in indices {
                    let i = i as usize;
                    ids.extend_from_slice(&tokens[i..i + t]);
                    targets.extend_from_slice(&tokens[i + 1..i + t + 1]);
                }
                Batch::Tokens { ids, targets, b: indices.len(), t }
            }
        }
    }

    /// Changes one label (or target token) — the `flip-label` adversary drill.
    pub fn flip_one_label(&mut self, classes: usize) {
        match self {
            Batch::Classes { y, .. } => y[0] = (y[0] + 1) % classes as u32,
            Batch::Tokens { targets, .. } => targets[0] = (targets[0] + 1) % classes as u32,
        }
    }
}

/// How a parameter is initialised (uniform in `[-bound, bound]`, or a constant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Uniform(f64),
    Const(f32),
}

/// A parameter's name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

fn param(name: &str, shape: Vec<usize>, init: Init) -> ParamSpec {
    ParamSpec { name: name.to_string(), shape, init }
}

/// He-uniform bound for a layer feeding a ReLU/GELU: `sqrt(6 / fan_in)` (sqrt is correctly
/// rounded, so this is the same on every machine).
fn he(fan_in: usize) -> Init {
    Init::Uniform((6.0 / fan_in as f64).sqrt())
}

/// Plain uniform `1/sqrt(fan_in)` for output layers.
fn lecun(fan_in: usize) -> Init {
    Init::Uniform(1.0 / (fan_in as f64).sqrt())
}

/// A model architecture with its dimensions resolved against a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    Mlp { dims: Vec<usize> },
    Cnn { c: [usize; 2], h: usize, w: usize, classes: usize },
    Gpt { cfg: GptConfig, vocab: usize },
    // A user-defined graph, checked against the data (`crate::graph`).
    Graph(Box<crate::graph::Graph>),
}

/// The key of a parameter in the training state.
pub fn param_key(name: &str) -> String {
    format!("param/{name}")
}

/// The key of an optimizer slot in the training state.
pub fn slot_key(name: &str, slot: &str) -> String {
    format!("opt/{name}/{slot}")
}

impl Model {
    /// Resolves a model config against the dataset it trains on.
    pub fn new(cfg: &ModelConfig, data: &Dataset) -> Result<Model, EngineError> {
        let bad = |d: &str| EngineError::Usage(format!("model/data mismatch: {d}"));
        match (cfg, data) {
            (ModelConfig::Mlp(m), Dataset::Classification { input_shape, classes, .. }) => {
                let mut dims = vec![input_shape.iter().product()];
                dims.extend(&m.hidden);
                dims.push(*classes);
                Ok(Model::Mlp { dims })
            }
            (ModelConfig::Cnn(c), Dataset::Classification { input_shape, classes, .. }) => {
                if input_shape.len() != 3 || input_shape[0] != 1 || input_shape[1] % 4 != 0 || input_shape[2] % 4 != 0 {
                    return Err(bad("the CNN needs 1×H×W images with H and W divisible by 4"));
                }
                Ok(Model::Cnn { c: c.channels, h: input_shape[1], w: input_shape[2], classes: *classes })
            }
            (ModelConfig::Gpt(g), Dataset::Text { vocab, context, .. }) => {
                if *context != g.context {
                    return Err(bad("text context differs from model.context"));
                }
                Ok(Model::Gpt { cfg: g.clone(), vocab: *vocab })
            }
            (ModelConfig::Graph(g), Dataset::Classification { input_shape, classes, .. }) => {
                let graph = crate::graph::Graph::resolve(g, input_shape, *classes).map_err(EngineError::InvalidSpec)?;
                Ok(Model::Graph(Box::new(graph)))
            }
            (ModelConfig::Gpt(_), _) => Err(bad("the GPT trains on text or token data")),
            _ => Err(bad("MLP, CNN and graph models train on classification data")),
        }
    }

    /// Number of output classes (vocabulary size for the GPT).
    pub fn classes(&self) -> usize {
        match self {
            Model::Mlp { dims } => *dims.last().unwrap_or(&0),
            Model::Cnn { classes, .. } => *classes,
            Model::Gpt { vocab, .. } => *vocab,
            Model::Graph(g) => g.classes(),
        }
    }

    /// The parameters, in a fixed order.
    pub fn params(&self) -> Vec<ParamSpec> {
        match self {
            Model::Mlp { dims } => {
                let mut out = Vec::new();
                for l in 0..dims.len() - 1 {
                    let last = l == dims.len() - 2;
                    let init = if last { lecun(dims[l]) } else { he(dims[l]) };
                    out.push(param(&format!("fc{}.weight", l + 1), vec![dims[l + 1], dims[l]], init));
                    out.push(param(&format!("fc{}.bias", l + 1), vec![dims[l + 1]], Init::Const(0.0)));
                }
                out
            }
            Model::Cnn { c, h, w, classes } => vec![
                param("conv1.weight", vec![c[0], 1, 3, 3], he(9)),
                param("conv1.bias", vec![c[0]], Init::Const(0.0)),
                param("conv2.weight", vec![c[1], c[0], 3, 3], he(9 * c[0])),
                param("conv2.bias", vec![c[1]], Init::Const(0.0)),
                param("fc.weight", vec![*classes, c[1] * (h / 4) * (w / 4)], lecun(c[1] * (h / 4) * (w / 4))),
                param("fc.bias", vec![*classes], Init::Const(0.0)),
            ],
            Model::Gpt { cfg, vocab } => {
                let d = cfg.d_model;
                let mut out = vec![
                    param("tok_emb", vec![*vocab, d], Init::Uniform(0.1)),
                    param("pos_emb", vec![cfg.context, d], Init::Uniform(0.1)),
                ];
                for l in 0..cfg.layers {
                    let p = |s: &str| format!("blk{l}.{s}");
                    out.push(param(&p("ln1.gamma"), vec![d], Init::Const(1.0)));
                    out.push(param(&p("ln1.beta"), vec![d], Init::Const(0.0)));
                    out.push(param(&p("attn.qkv.weight"), vec![3 * d, d], lecun(d)));
                    out.push(param(&p("attn.qkv.bias"), vec![3 * d], Init::Const(0.0)));
                    out.push(param(&p("attn.proj.weight"), vec![d, d], lecun(d)));
                    out.push(param(&p("attn.proj.bias"), vec![d], Init::Const(0.0)));
                    out.push(param(&p("ln2.gamma"), vec![d], Init::Const(1.0)));
                    out.push(param(&p("ln2.beta"), vec![d], Init::Const(0.0)));
                    out.push(param(&p("mlp.fc.weight"), vec![4 * d, d], lecun(d)));
                    out.push(param(&p("mlp.fc.bias"), vec![4 * d], Init::Const(0.0)));
                    out.push(param(&p("mlp.proj.weight"), vec![d, 4 * d], lecun(4 * d)));
                    out.push(param(&p("mlp.proj.bias"), vec![d], Init::Const(0.0)));
                }
                out.push(param("ln_f.gamma", vec![d], Init::Const(1.0)));
                out.push(param("ln_f.beta", vec![d], Init::Const(0.0)));
                out.push(param("lm_head.weight", vec![*vocab, d], lecun(d)));
                out.push(param("lm_head.bias", vec![*vocab], Init::Const(0.0)));
                out
            }
            Model::Graph(g) => g.params().to_vec(),
        }
    }

    /// Initial parameters from the committed seed (stream `init`, layer = parameter position).
    pub fn init_params(&self, seed: u64, state: &mut TrainingState) -> Result<(), EngineError> {
        for (pos, p) in self.params().iter().enumerate() {
            let n: usize = p.shape.iter().product();
            let data = match p.init {
                Init::Const(c) => vec![c; n],
                Init::Uniform(b) => {
                    let mut s = Stream::new(seed, "init", 0, pos as u32);
                    (0..n).map(|_| s.uniform(-b, b) as f32).collect()
                }
            };
            let t = Tensor::new(p.shape.clone(), data).map_err(EngineError::State)?;
            state.insert(&param_key(&p.name), t).map_err(EngineError::State)?;
        }
        Ok(())
    }

    /// Forward and backward pass: returns the loss and one gradient per parameter (in
    /// [`Model::params`] order), every intermediate rounded at its site.
    pub fn loss_and_grads(
        &self,
        ctx: &mut Ctx<'_, '_>,
        state: &TrainingState,
        batch: &Batch,
    ) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
        self.pass(ctx, state, batch).map(|(l, g, _)| (l, g))
    }

    /// The loss and, for classifiers, the logits (for evaluation; the backward pass runs too).
    pub fn forward_logits(
        &self,
        ctx: &mut Ctx<'_, '_>,
        state: &TrainingState,
        batch: &Batch,
    ) -> Result<(f32, Option<Vec<f32>>), EngineError> {
        self.pass(ctx, state, batch).map(|(l, _, logits)| (l, logits))
    }

    fn pass(&self, ctx: &mut Ctx<'_, '_>, state: &TrainingState, batch: &Batch) -> Result<Pass, EngineError> {
        let get = |name: &str| -> Result<&[f32], EngineError> {
            state
                .get(&param_key(name))
                .map(|t| t.data.as_slice())
                .ok_or_else(|| EngineError::Usage(format!("state has no parameter {name}")))
        };
        match (self, batch) {
            (Model::Mlp { dims }, Batch::Classes { x, y, n }) => mlp(ctx, dims, &get, x, y, *n),
            (Model::Cnn { c, h, w, classes }, Batch::Classes { x, y, n }) => {
                cnn(ctx, *c, *h, *w, *classes, &get, x, y, *n)
            }
            (Model::Gpt { cfg, vocab }, Batch::Tokens { ids, targets, b, t }) => {
                gpt(ctx, cfg, *vocab, &get, ids, targets, *b, *t).map(|(l, g)| (l, g, None))
            }
            (Model::Graph(g), Batch::Classes { x, y, n }) => g.pass(ctx, &get, x, y, *n),
            _ => Err(EngineError::Usage("batch kind does not match the model".into())),
        }
    }
}

/// Loss, gradients in parameter order, and logits where the caller may want them.
type Pass = (f32, Vec<Vec<f32>>, Option<Vec<f32>>);

type Getter<'g> = dyn Fn(&str) -> Result<&'g [f32], EngineError> + 'g;

fn k(e: kernels::KernelError) -> EngineError {
    EngineError::Kernel(e)
}

/// `y = x·Wᵀ + b` for `x: n×i`, `W: o×i`.
#[allow(clippy::too_many_arguments)] // reason: a layer's natural inputs
fn linear(
    ctx: &mut Ctx,
    site: &str,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    i: usize,
    o: usize,
) -> Result<Vec<f32>, EngineError> {
    let out = ctx.dev.matmul(x, w, Some(b), MatmulSpec::new(n, i, o).trans_b()).map_err(k)?;
    ctx.round(&format!("fwd/{site}/out"), out)
}

/// Gradients of a linear layer: `(grad_x if wanted, grad_W, grad_b)`.
type LinearGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Backward of [`linear`].
#[allow(clippy::too_many_arguments)] // reason: a layer's natural inputs
fn linear_backward(
    ctx: &mut Ctx,
    layer: &str,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    n: usize,
    i: usize,
    o: usize,
    want_gx: bool,
) -> Result<LinearGrads, EngineError> {
    let spec = MatmulSpec::new(n, i, o).trans_b();
    let (gx, gw) = ctx.dev.matmul_backward(x, w, gy, spec).map_err(k)?;
    let gb = ctx.dev.sum_rows(gy, n, o).map_err(k)?;
    let gx = if want_gx { Some(ctx.round(&format!("bwd/{layer}/grad_in"), gx)?) } else { None };
    let gw = ctx.round(&format!("grad/{layer}.weight"), gw)?;
    let gb = ctx.round(&format!("grad/{layer}.bias"), gb)?;
    Ok((gx, gw, gb))
}

fn loss(ctx: &mut Ctx, logits: &[f32], y: &[u32], rows: usize, cols: usize) -> Result<(f32, Vec<f32>), EngineError> {
    let (l, g) = ctx.dev.cross_entropy(logits, y, rows, cols).map_err(k)?;
    let l = ctx.round("fwd/loss", l)?;
    let g = ctx.round("bwd/loss/grad_logits", g)?;
    Ok((l[0], g))
}

fn mlp(ctx: &mut Ctx, dims: &[usize], get: &Getter, x: &[f32], y: &[u32], n: usize) -> Result<Pass, EngineError> {
    let layers = dims.len() - 1;
    // acts[l] is the input of layer l; pre[l] its pre-activation output.
    let mut acts: Vec<Vec<f32>> = vec![x.to_vec()];
    let mut pre: Vec<Vec<f32>> = Vec::new();
    for l in 0..layers {
        let name = format!("fc{}", l + 1);
        let z = linear(
            ctx,
            &name,
            &acts[l],
            get(&format!("{name}.weight"))?,
            get(&format!("{name}.bias"))?,
            n,
            dims[l],
            dims[l + 1],
        )?;
        if l + 1 < layers {
            let a = ctx.dev.relu(&z).map_err(k)?;
            acts.push(ctx.round(&format!("fwd/{name}/relu"), a)?);
        }
        pre.push(z);
    }
    let (loss_v, mut g) = loss(ctx, &pre[layers - 1], y, n, dims[layers])?;
    let mut grads = vec![Vec::new(); 2 * layers];
    for l in (0..layers).rev() {
        let name = format!("fc{}", l + 1);
        if l + 1 < layers {
            let gz = ctx.dev.relu_backward(&pre[l], &g).map_err(k)?;
            g = ctx.round(&format!("bwd/{name}/relu"), gz)?;
        }
        let (gx, gw, gb) =
            linear_backward(ctx, &name, &acts[l], get(&format!("{name}.weight"))?, &g, n, dims[l], dims[l + 1], l > 0)?;
        grads[2 * l] = gw;
        grads[2 * l + 1] = gb;
        if let Some(gx) = gx {
            g = gx;
        }
    }
    Ok((loss_v, grads, pre.pop()))
}

#[allow(clippy::too_many_arguments)] // reason: the model's natural inputs
fn cnn(
    ctx: &mut Ctx,
    c: [usize; 2],
    h: usize,
    w: usize,
    classes: usize,
    get: &Getter,
    x: &[f32],
    y: &[u32],
    n: usize,
) -> Result<Pass, EngineError> {
    let conv1 = Conv2dSpec { n, c_in: 1, h, w, c_out: c[0], kh: 3, kw: 3, stride: 1, pad: 1 };
    let pool1 = Pool2dSpec { n, c: c[0], h, w, kh: 2, kw: 2, stride: 2, pad: 0 };
    let conv2 = Conv2dSpec { n, c_in: c[0], h: h / 2, w: w / 2, c_out: c[1], kh: 3, kw: 3, stride: 1, pad: 1 };
    let pool2 = Pool2dSpec { n, c: c[1], h: h / 2, w: w / 2, kh: 2, kw: 2, stride: 2, pad: 0 };
    let flat = c[1] * (h / 4) * (w / 4);

    let z1 = ctx.dev.conv2d(x, get("conv1.weight")?, Some(get("conv1.bias")?), conv1).map_err(k)?;
    let z1 = ctx.round("fwd/conv1/out", z1)?;
    let a1 = ctx.dev.relu(&z1).map_err(k)?;
    let a1 = ctx.round("fwd/conv1/relu", a1)?;
    let (p1, arg1) = ctx.dev.max_pool2d(&a1, pool1).map_err(k)?;
    let p1 = ctx.round("fwd/pool1/out", p1)?;
    let z2 = ctx.dev.conv2d(&p1, get("conv2.weight")?, Some(get("conv2.bias")?), conv2).map_err(k)?;
    let z2 = ctx.round("fwd/conv2/out", z2)?;
    let a2 = ctx.dev.relu(&z2).map_err(k)?;
    let a2 = ctx.round("fwd/conv2/relu", a2)?;
    let (p2, arg2) = ctx.dev.max_pool2d(&a2, pool2).map_err(k)?;
    let p2 = ctx.round("fwd/pool2/out", p2)?;
    let logits = linear(ctx, "fc", &p2, get("fc.weight")?, get("fc.bias")?, n, flat, classes)?;
    let (loss_v, g) = loss(ctx, &logits, y, n, classes)?;

    let (gp2, gfw, gfb) = linear_backward(ctx, "fc", &p2, get("fc.weight")?, &g, n, flat, classes, true)?;
    let gp2 = gp2.unwrap_or_default();
    let ga2 = ctx.dev.max_pool2d_backward(&gp2, &arg2, pool2).map_err(k)?;
    let ga2 = ctx.round("bwd/pool2/grad_in", ga2)?;
    let gz2 = ctx.dev.relu_backward(&z2, &ga2).map_err(k)?;
    let gz2 = ctx.round("bwd/conv2/relu", gz2)?;
    let g2 = ctx.dev.conv2d_backward(&p1, get("conv2.weight")?, &gz2, conv2).map_err(k)?;
    let gp1 = ctx.round("bwd/conv2/grad_in", g2.gx)?;
    let gw2 = ctx.round("grad/conv2.weight", g2.gw)?;
    let gb2 = ctx.round("grad/conv2.bias", g2.gb)?;
    let ga1 = ctx.dev.max_pool2d_backward(&gp1, &arg1, pool1).map_err(k)?;
    let ga1 = ctx.round("bwd/pool1/grad_in", ga1)?;
    let gz1 = ctx.dev.relu_backward(&z1, &ga1).map_err(k)?;
    let gz1 = ctx.round("bwd/conv1/relu", gz1)?;
    let g1 = ctx.dev.conv2d_backward(x, get("conv1.weight")?, &gz1, conv1).map_err(k)?;
    let gw1 = ctx.round("grad/conv1.weight", g1.gw)?;
    let gb1 = ctx.round("grad/conv1.bias", g1.gb)?;
    Ok((loss_v, vec![gw1, gb1, gw2, gb2, gfw, gfb], Some(logits)))
}

/// Element-wise sum of two FP32 tensors in FP64: correctly rounded, hence exact across machines.
fn add(ctx: &mut Ctx, site: &str, a: &[f32], b: &[f32]) -> Result<Vec<f32>, EngineError> {
    ctx.exact(site, a.iter().zip(b).map(|(&x, &y)| x as f64 + y as f64).collect())
}

/// `[b·t, 3d]` QKV rows → three `[b·h, t, dh]` head-major tensors (a permutation: exact).
fn split_heads(qkv: &[f32], b: usize, t: usize, h: usize, dh: usize) -> [Vec<f32>; 3] {
    let d = h * dh;
    let mut out = [vec![0.0; b * t * d], vec![0.0; b * t * d], vec![0.0; b * t * d]];
    for bi in 0..b {
        for ti in 0..t {
            let row = &qkv[(bi * t + ti) * 3 * d..(bi * t + ti + 1) * 3 * d];
            for (which, o) in out.iter_mut().enumerate() {
                for hi in 0..h {
                    let dst = ((bi * h + hi) * t + ti) * dh;
                    o[dst..dst + dh].copy_from_slice(&row[which * d + hi * dh..which * d + (hi + 1) * dh]);
                }
            }
        }
    }
    out
}

/// Inverse of [`split_heads`] for the gradients: three `[b·h, t, dh]` → `[b·t, 3d]`.
fn join_qkv(parts: [&[f32]; 3], b: usize, t: usize, h: usize, dh: usize) -> Vec<f32> {
    let d = h * dh;
    let mut out = vec![0.0; b * t * 3 * d];
    for bi in 0..b {
        for ti in 0..t {
            for (which, p) in parts.iter().enumerate() {
                for hi in 0..h {
                    let src = ((bi * h + hi) * t + ti) * dh;
                    let dst = (bi * t + ti) * 3 * d + which * d + hi * dh;
                    out[dst..dst + dh].copy_from_slice(&p[src..src + dh]);
                }
            }
        }
    }
    out
}

/// `[b·h, t, dh]` → `[b·t, d]`.
fn merge_heads(x: &[f32], b: usize, t: usize, h: usize, dh: usize) -> Vec<f32> {
    let d = h * dh;
    let mut out = vec![0.0; b * t * d];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let src = ((bi * h + hi) * t + ti) * dh;
                let dst = (bi * t + ti) * d + hi * dh;
                out[dst..dst + dh].copy_from_slice(&x[src..src + dh]);
            }
        }
    }
    out
}

/// `[b·t, d]` → `[b·h, t, dh]`.
fn split_merged(x: &[f32], b: usize, t: usize, h: usize, dh: usize) -> Vec<f32> {
    let d = h * dh;
    let mut out = vec![0.0; b * t * d];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let dst = ((bi * h + hi) * t + ti) * dh;
                let src = (bi * t + ti) * d + hi * dh;
                out[dst..dst + dh].copy_from_slice(&x[src..src + dh]);
            }
        }
    }
    out
}

/// Dropout mask from the committed seed: stream `dropout`, keyed by step and site number.
fn dropout_mask(seed: u64, step: u64, site: u32, n: usize, p: f64) -> Vec<bool> {
    let mut s = Stream::new(seed, "dropout", step, site);
    (0..n).map(|_| !s.bernoulli(p)).collect()
}

/// Saved activations of one transformer block, for the backward pass.
struct BlockCache {
    x_in: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>, Vec<f32>),
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    mask1: Option<Vec<bool>>,
    x_mid: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>, Vec<f32>),
    fc: Vec<f32>,
    act: Vec<f32>,
    mask2: Option<Vec<bool>>,
}

#[allow(clippy::too_many_arguments)] // reason: the model's natural inputs
fn gpt(
    ctx: &mut Ctx,
    cfg: &GptConfig,
    vocab: usize,
    get: &Getter,
    ids: &[u32],
    targets: &[u32],
    b: usize,
    t: usize,
) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
    let d = cfg.d_model;
    let h = cfg.heads;
    let dh = d / h;
    let rows = b * t;
    let scale = 1.0 / (dh as f64).sqrt();
    let dev = ctx.dev;

    let tok = dev.embedding(get("tok_emb")?, vocab, d, ids).map_err(k)?;
    let tok = ctx.round("fwd/tok_emb/out", tok)?;
    let pos_ids: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
    let pos = dev.embedding(get("pos_emb")?, t, d, &pos_ids).map_err(k)?;
    let pos = ctx.round("fwd/pos_emb/out", pos)?;
    let mut x = add(ctx, "fwd/emb/sum", &tok, &pos)?;

    let mut caches = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        let p = |s: &str| format!("blk{l}.{s}");
        let x_in = x.clone();
        let ln1 = dev.layer_norm(&x, get(&p("ln1.gamma"))?, get(&p("ln1.beta"))?, rows, d, LN_EPS).map_err(k)?;
        let ln1 = (
            ctx.round(&format!("fwd/blk{l}.ln1/out"), ln1.y)?,
            ctx.round(&format!("fwd/blk{l}.ln1/mean"), ln1.mean)?,
            ctx.round(&format!("fwd/blk{l}.ln1/rstd"), ln1.rstd)?,
        );
        let qkv = linear(
            ctx,
            &p("attn.qkv"),
            &ln1.0,
            get(&p("attn.qkv.weight"))?,
            get(&p("attn.qkv.bias"))?,
            rows,
            d,
            3 * d,
        )?;
        let [q, kk, v] = split_heads(&qkv, b, t, h, dh);
        let att_spec = MatmulSpec::batched(b * h, t, dh, t).trans_b();
        let scores = dev.matmul_scaled(&q, &kk, scale, att_spec).map_err(k)?;
        let scores = ctx.round(&format!("fwd/blk{l}.attn/scores"), scores)?;
        let probs = dev.softmax(&scores, RowSpec::causal(b * h * t, t)).map_err(k)?;
        let probs = ctx.round(&format!("fwd/blk{l}.attn/probs"), probs)?;
        let att = dev.matmul(&probs, &v, None, MatmulSpec::batched(b * h, t, t, dh)).map_err(k)?;
        let att = ctx.round(&format!("fwd/blk{l}.attn/weighted"), att)?;
        let att = merge_heads(&att, b, t, h, dh);
        let mut proj =
            linear(ctx, &p("attn.proj"), &att, get(&p("attn.proj.weight"))?, get(&p("attn.proj.bias"))?, rows, d, d)?;
        let mask1 = if cfg.dropout > 0.0 {
            let m = dropout_mask(ctx.seed, ctx.step, (2 * l) as u32, proj.len(), cfg.dropout);
            let dropped = dev.dropout(&proj, &m, cfg.dropout).map_err(k)?;
            proj = ctx.round(&format!("fwd/blk{l}.attn/dropout"), dropped)?;
            Some(m)
        } else {
            None
        };
        let x_mid = add(ctx, &format!("fwd/blk{l}/residual1"), &x, &proj)?;
        let ln2 = dev.layer_norm(&x_mid, get(&p("ln2.gamma"))?, get(&p("ln2.beta"))?, rows, d, LN_EPS).map_err(k)?;
        let ln2 = (
            ctx.round(&format!("fwd/blk{l}.ln2/out"), ln2.y)?,
            ctx.round(&format!("fwd/blk{l}.ln2/mean"), ln2.mean)?,
            ctx.round(&format!("fwd/blk{l}.ln2/rstd"), ln2.rstd)?,
        );
        let fc = linear(ctx, &p("mlp.fc"), &ln2.0, get(&p("mlp.fc.weight"))?, get(&p("mlp.fc.bias"))?, rows, d, 4 * d)?;
        let act = dev.gelu(&fc).map_err(k)?;
        let act = ctx.round(&format!("fwd/blk{l}.mlp/gelu"), act)?;
        let mut out =
            linear(ctx, &p("mlp.proj"), &act, get(&p("mlp.proj.weight"))?, get(&p("mlp.proj.bias"))?, rows, 4 * d, d)?;
        let mask2 = if cfg.dropout > 0.0 {
            let m = dropout_mask(ctx.seed, ctx.step, (2 * l + 1) as u32, out.len(), cfg.dropout);
            let dropped = dev.dropout(&out, &m, cfg.dropout).map_err(k)?;
            out = ctx.round(&format!("fwd/blk{l}.mlp/dropout"), dropped)?;
            Some(m)
        } else {
            None
        };
        x = add(ctx, &format!("fwd/blk{l}/residual2"), &x_mid, &out)?;
        caches.push(BlockCache { x_in, ln1, q, k: kk, v, probs, att, mask1, x_mid, ln2, fc, act, mask2 });
    }
    let lnf = dev.layer_norm(&x, get("ln_f.gamma")?, get("ln_f.beta")?, rows, d, LN_EPS).map_err(k)?;
    let lnf_y = ctx.round("fwd/ln_f/out", lnf.y)?;
    let lnf_mean = ctx.round("fwd/ln_f/mean", lnf.mean)?;
    let lnf_rstd = ctx.round("fwd/ln_f/rstd", lnf.rstd)?;
    let logits = linear(ctx, "lm_head", &lnf_y, get("lm_head.weight")?, get("lm_head.bias")?, rows, d, vocab)?;
    let (loss_v, g) = loss(ctx, &logits, targets, rows, vocab)?;

    // Backward. Gradients are collected by name, then returned in params() order.
    let mut grads: std::collections::BTreeMap<String, Vec<f32>> = std::collections::BTreeMap::new();
    let (g_lnf, gw, gb) = linear_backward(ctx, "lm_head", &lnf_y, get("lm_head.weight")?, &g, rows, d, vocab, true)?;
    grads.insert("lm_head.weight".into(), gw);
    grads.insert("lm_head.bias".into(), gb);
    let lg = dev
        .layer_norm_backward(&x, get("ln_f.gamma")?, &lnf_mean, &lnf_rstd, &g_lnf.unwrap_or_default(), rows, d)
        .map_err(k)?;
    let mut gx = ctx.round("bwd/ln_f/grad_in", lg.gx)?;
    grads.insert("ln_f.gamma".into(), ctx.round("grad/ln_f.gamma", lg.ggamma)?);
    grads.insert("ln_f.beta".into(), ctx.round("grad/ln_f.beta", lg.gbeta)?);

    for l in (0..cfg.layers).rev() {
        let c = &caches[l];
        let p = |s: &str| format!("blk{l}.{s}");
        // x = x_mid + dropout(mlp(ln2(x_mid)))
        let mut g_out = gx.clone();
        if let Some(m) = &c.mask2 {
            let gd = dev.dropout_backward(&g_out, m, cfg.dropout).map_err(k)?;
            g_out = ctx.round(&format!("bwd/blk{l}.mlp/dropout"), gd)?;
        }
        let (g_act, gw, gb) =
            linear_backward(ctx, &p("mlp.proj"), &c.act, get(&p("mlp.proj.weight"))?, &g_out, rows, 4 * d, d, true)?;
        grads.insert(p("mlp.proj.weight"), gw);
        grads.insert(p("mlp.proj.bias"), gb);
        let g_fc = dev.gelu_backward(&c.fc, &g_act.unwrap_or_default()).map_err(k)?;
        let g_fc = ctx.round(&format!("bwd/blk{l}.mlp/gelu"), g_fc)?;
        let (g_ln2, gw, gb) =
            linear_backward(ctx, &p("mlp.fc"), &c.ln2.0, get(&p("mlp.fc.weight"))?, &g_fc, rows, d, 4 * d, true)?;
        grads.insert(p("mlp.fc.weight"), gw);
        grads.insert(p("mlp.fc.bias"), gb);
        let lg = dev
            .layer_norm_backward(
                &c.x_mid,
                get(&p("ln2.gamma"))?,
                &c.ln2.1,
                &c.ln2.2,
                &g_ln2.unwrap_or_default(),
                rows,
                d,
            )
            .map_err(k)?;
        let g_ln2_in = ctx.round(&format!("bwd/blk{l}.ln2/grad_in"), lg.gx)?;
        grads.insert(p("ln2.gamma"), ctx.round(&format!("grad/{}", p("ln2.gamma")), lg.ggamma)?);
        grads.insert(p("ln2.beta"), ctx.round(&format!("grad/{}", p("ln2.beta")), lg.gbeta)?);
        let g_mid = add(ctx, &format!("bwd/blk{l}/residual2"), &gx, &g_ln2_in)?;

        // x_mid = x_in + dropout(proj(attn(ln1(x_in))))
        let mut g_proj = g_mid.clone();
        if let Some(m) = &c.mask1 {
            let gd = dev.dropout_backward(&g_proj, m, cfg.dropout).map_err(k)?;
            g_proj = ctx.round(&format!("bwd/blk{l}.attn/dropout"), gd)?;
        }
        let (g_att, gw, gb) =
            linear_backward(ctx, &p("attn.proj"), &c.att, get(&p("attn.proj.weight"))?, &g_proj, rows, d, d, true)?;
        grads.insert(p("attn.proj.weight"), gw);
        grads.insert(p("attn.proj.bias"), gb);
        let g_att = split_merged(&g_att.unwrap_or_default(), b, t, h, dh);
        let (g_probs, g_v) =
            dev.matmul_backward(&c.probs, &c.v, &g_att, MatmulSpec::batched(b * h, t, t, dh)).map_err(k)?;
        let g_probs = ctx.round(&format!("bwd/blk{l}.attn/grad_probs"), g_probs)?;
        let g_v = ctx.round(&format!("bwd/blk{l}.attn/grad_v"), g_v)?;
        let g_scores = dev.softmax_backward(&c.probs, &g_probs, RowSpec::causal(b * h * t, t)).map_err(k)?;
        let g_scores = ctx.round(&format!("bwd/blk{l}.attn/grad_scores"), g_scores)?;
        let att_spec = MatmulSpec::batched(b * h, t, dh, t).trans_b();
        let (g_q, g_k) = dev.matmul_scaled_backward(&c.q, &c.k, &g_scores, scale, att_spec).map_err(k)?;
        let g_q = ctx.round(&format!("bwd/blk{l}.attn/grad_q"), g_q)?;
        let g_k = ctx.round(&format!("bwd/blk{l}.attn/grad_k"), g_k)?;
        let g_qkv = join_qkv([&g_q, &g_k, &g_v], b, t, h, dh);
        let (g_ln1, gw, gb) =
            linear_backward(ctx, &p("attn.qkv"), &c.ln1.0, get(&p("attn.qkv.weight"))?, &g_qkv, rows, d, 3 * d, true)?;
        grads.insert(p("attn.qkv.weight"), gw);
        grads.insert(p("attn.qkv.bias"), gb);
        let lg = dev
            .layer_norm_backward(
                &c.x_in,
                get(&p("ln1.gamma"))?,
                &c.ln1.1,
                &c.ln1.2,
                &g_ln1.unwrap_or_default(),
                rows,
                d,
            )
            .map_err(k)?;
        let g_ln1_in = ctx.round(&format!("bwd/blk{l}.ln1/grad_in"), lg.gx)?;
        grads.insert(p("ln1.gamma"), ctx.round(&format!("grad/{}", p("ln1.gamma")), lg.ggamma)?);
        grads.insert(p("ln1.beta"), ctx.round(&format!("grad/{}", p("ln1.beta")), lg.gbeta)?);
        gx = add(ctx, &format!("bwd/blk{l}/residual1"), &g_mid, &g_ln1_in)?;
    }
    let g_tok = dev.embedding_backward(&gx, ids, vocab, d).map_err(k)?;
    grads.insert("tok_emb".into(), ctx.round("grad/tok_emb", g_tok)?);
    // The position embedding's gradient sums over the batch: rows of [b, t·d].
    let g_pos = dev.sum_rows(&gx, b, t * d).map_err(k)?;
    grads.insert("pos_emb".into(), ctx.round("grad/pos_emb", g_pos)?);

    let model = Model::Gpt { cfg: cfg.clone(), vocab };
    let ordered = model
        .params()
        .iter()
        .map(|p| grads.remove(&p.name).ok_or_else(|| EngineError::Usage(format!("no gradient for {}", p.name))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((loss_v, ordered))
}
