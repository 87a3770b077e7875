//! The plain FP32 baseline: the same models in candle (CPU, FP32, autograd), started from the
//! engine's initial weights and trained on the engine's batches with the same optimizer: the
//! three presets written out, and graphs (the residual CNN, the transformer written as a graph)
//! interpreted node by node with candle's ops.
//!
//! Nothing here is verified or rounded; it is what a trainer would run without tiebreak, so its
//! step time is the denominator of `trainer_overhead_vs_fp32`. Two deliberate departures from
//! "idiomatic" candle-nn code, both forced by missing backward passes in candle 0.11:
//! `softmax_last_dim` and the fused `layer_norm` op have none, so the GPT builds softmax from
//! `exp / sum / div` and layer norm from mean/variance arithmetic (both differentiable).

use anyhow::{Context, Result, bail, ensure};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use common::state::TrainingState;
use engine::data::Dataset;
use engine::graph::{GraphConfig, INPUT, LABELS, Op};
use engine::model::{Batch, Model, param_key};
use engine::spec::{GptConfig, ModelConfig, OptimizerConfig};

/// The architecture of the baseline: one of the presets, with the data's dimensions.
#[derive(Debug, Clone)]
enum Arch {
    Mlp {
        dims: Vec<usize>,
    },
    Cnn {
        h: usize,
        w: usize,
    },
    Gpt {
        cfg: GptConfig,
        vocab: usize,
    },
    /// A graph of the ops [`graph_op_supported`] accepts, on examples of `input_shape` (images,
    /// or `[]` for text, whose batches carry their shape); `names` are the parameters' names in
    /// [`Model::params`] order.
    Graph {
        graph: GraphConfig,
        input_shape: Vec<usize>,
        names: Vec<String>,
    },
}

/// The optimizer of the baseline: the same update rule and hyper-parameters as the engine's.
enum Update {
    /// PyTorch SGD (no dampening): `v ← μ·v + (g + wd·w)`, `w ← w − lr·v`. candle-nn's `SGD`
    /// has no momentum, so this is written out with tensor ops.
    Sgd { lr: f64, momentum: f64, weight_decay: f64, buffers: Vec<Var> },
    /// candle-nn's AdamW (PyTorch semantics, decoupled weight decay).
    Adamw(AdamW),
}

/// A candle FP32 model with its parameters and optimizer state.
pub struct Baseline {
    model: Arch,
    /// Parameters in [`Model::params`] order.
    vars: Vec<Var>,
    update: Update,
    dev: Device,
}

impl std::fmt::Debug for Baseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baseline").field("model", &self.model).field("params", &self.vars.len()).finish()
    }
}

impl Baseline {
    /// The baseline of `run`'s preset, from its model, data, optimizer and initial state `init`.
    pub fn for_run(run: &engine::train::Run, init: &TrainingState) -> Result<Baseline> {
        Baseline::new(&run.spec.config.model, &run.model, &run.data, init, &run.spec.config.optimizer)
    }

    /// Builds the baseline of a preset `cfg` from the engine's model and initial state (same
    /// weights).
    pub fn new(
        cfg: &ModelConfig,
        model: &Model,
        data: &Dataset,
        init: &TrainingState,
        opt: &OptimizerConfig,
    ) -> Result<Baseline> {
        let dev = Device::Cpu;
        let arch = match (cfg, data) {
            (ModelConfig::Mlp(m), Dataset::Classification { input_shape, classes, .. }) => {
                let mut dims = vec![input_shape.iter().product()];
                dims.extend(&m.hidden);
                dims.push(*classes);
                Arch::Mlp { dims }
            }
            (ModelConfig::Cnn(_), Dataset::Classification { input_shape, .. }) if input_shape.len() == 3 => {
                Arch::Cnn { h: input_shape[1], w: input_shape[2] }
            }
            (ModelConfig::Gpt(g), Dataset::Text { .. }) => Arch::Gpt { cfg: g.clone(), vocab: model.classes() },
            (ModelConfig::Graph(g), Dataset::Classification { .. } | Dataset::Text { .. }) => {
                if let Some(node) = g.nodes.iter().find(|node| !graph_op_supported(&node.op)) {
                    bail!("no FP32 baseline for the graph's node {:?}: op {:?}", node.name, node.op);
                }
                let input_shape = match data {
                    Dataset::Classification { input_shape, .. } => input_shape.clone(),
                    _ => Vec::new(),
                };
                let names = model.params().iter().map(|p| p.name.clone()).collect();
                Arch::Graph { graph: g.clone(), input_shape, names }
            }
            _ => bail!("no FP32 baseline for this model and data"),
        };
        let mut vars = Vec::new();
        for p in model.params() {
            let t = init.get(&param_key(&p.name)).with_context(|| format!("initial state lacks {}", p.name))?;
            let tensor = Tensor::from_slice(&t.data, p.shape.as_slice(), &dev)?;
            vars.push(Var::from_tensor(&tensor)?);
        }
        let update = match opt {
            OptimizerConfig::Sgd(s) => Update::Sgd {
                lr: s.lr,
                momentum: s.momentum,
                weight_decay: s.weight_decay,
                buffers: vars.iter().map(|v| Var::zeros(v.shape(), DType::F32, &dev)).collect::<Result<_, _>>()?,
            },
            OptimizerConfig::Adamw(a) => Update::Adamw(AdamW::new(
                vars.clone(),
                ParamsAdamW { lr: a.lr, beta1: a.beta1, beta2: a.beta2, eps: a.eps, weight_decay: a.weight_decay },
            )?),
        };
        Ok(Baseline { model: arch, vars, update, dev })
    }

    /// One training step: forward, loss, backward, optimizer update. Returns the loss.
    pub fn step(&mut self, batch: &Batch) -> Result<f32> {
        let loss = self.loss(batch)?;
        let grads = loss.backward()?;
        match &mut self.update {
            Update::Adamw(opt) => opt.step(&grads)?,
            Update::Sgd { lr, momentum, weight_decay, buffers } => {
                for (w, v) in self.vars.iter().zip(buffers.iter()) {
                    let g = grads.get(w).context("parameter without gradient")?;
                    let gd = (g + (w.as_tensor() * *weight_decay)?)?;
                    let vn = ((v.as_tensor() * *momentum)? + gd)?;
                    let wn = (w.as_tensor() - (&vn * *lr)?)?;
                    v.set(&vn)?;
                    w.set(&wn)?;
                }
            }
        }
        Ok(loss.to_scalar::<f32>()?)
    }

    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let v = |i: usize| self.vars[i].as_tensor();
        match (&self.model, batch) {
            (Arch::Mlp { dims }, Batch::Classes { x, y, n }) => {
                let mut h = Tensor::from_slice(x, (*n, dims[0]), &self.dev)?;
                let layers = dims.len() - 1;
                for l in 0..layers {
                    h = linear(&h, v(2 * l), v(2 * l + 1))?;
                    if l + 1 < layers {
                        h = h.relu()?;
                    }
                }
                ce(&h, y, &self.dev)
            }
            (Arch::Cnn { h, w }, Batch::Classes { x, y, n }) => {
                let img = Tensor::from_slice(x, (*n, 1, *h, *w), &self.dev)?;
                let conv = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
                    let c = b.dims1()?;
                    Ok(x.conv2d(w, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
                };
                let a1 = conv(&img, v(0), v(1))?.relu()?.max_pool2d(2)?;
                let a2 = conv(&a1, v(2), v(3))?.relu()?.max_pool2d(2)?;
                let flat = a2.flatten_from(1)?;
                ce(&linear(&flat, v(4), v(5))?, y, &self.dev)
            }
            (Arch::Gpt { cfg, vocab }, Batch::Tokens { ids, targets, b, t }) => {
                let logits = self.gpt_logits(cfg, *vocab, ids, *b, *t)?;
                ce(&logits, targets, &self.dev)
            }
            (Arch::Graph { graph, input_shape, names }, Batch::Classes { x, y, n }) => {
                let shape: Vec<usize> = std::iter::once(*n).chain(input_shape.iter().copied()).collect();
                let x = Tensor::from_slice(x, shape, &self.dev)?;
                self.graph_loss(graph, names, x, y)
            }
            (Arch::Graph { graph, names, .. }, Batch::Tokens { ids, targets, b, t }) => {
                let x = Tensor::from_slice(ids, (*b, *t), &self.dev)?;
                self.graph_loss(graph, names, x, targets)
            }
            _ => bail!("batch kind does not match the model"),
        }
    }

    /// The GPT's logits `[b·t, vocab]`; parameters are indexed in [`Model::params`] order.
    fn gpt_logits(&self, cfg: &GptConfig, vocab: usize, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let v = |i: usize| self.vars[i].as_tensor();
        let h = cfg.heads;
        let rows = b * t;
        let ids = Tensor::from_slice(ids, rows, &self.dev)?;
        let pos: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
        let pos = Tensor::from_vec(pos, rows, &self.dev)?;
        let mut x = (v(0).index_select(&ids, 0)? + v(1).index_select(&pos, 0)?)?;
        for l in 0..cfg.layers {
            let p = 2 + 12 * l;
            let ln1 = layer_norm(&x, v(p), v(p + 1), 1e-5)?;
            let att = attention(&ln1, (b, t, h), true, [v(p + 2), v(p + 3), v(p + 4), v(p + 5)])?;
            x = (&x + att)?;
            let ln2 = layer_norm(&x, v(p + 6), v(p + 7), 1e-5)?;
            let fc = linear(&ln2, v(p + 8), v(p + 9))?.gelu()?;
            x = (&x + linear(&fc, v(p + 10), v(p + 11))?)?;
        }
        let f = 2 + 12 * cfg.layers;
        let lnf = layer_norm(&x, v(f), v(f + 1), 1e-5)?;
        let logits = linear(&lnf, v(f + 2), v(f + 3))?;
        debug_assert_eq!(logits.dims2()?, (rows, vocab));
        Ok(logits)
    }
}

/// The graph ops the FP32 baseline interprets: those of image classifiers such as the residual
/// CNN (`configs/mnist-resnet.toml`) and of decoders such as the transformer graph
/// (`configs/shakespeare-graph.toml`; attention without dropout). Other graphs have no
/// baseline (the bench says which node).
fn graph_op_supported(op: &Op) -> bool {
    match op {
        Op::Attention { dropout, .. } => *dropout == 0.0,
        _ => matches!(
            op,
            Op::Linear { .. }
                | Op::Conv2d { .. }
                | Op::BatchNorm { .. }
                | Op::Relu {}
                | Op::Add {}
                | Op::GlobalAvgPool {}
                | Op::Flatten {}
                | Op::Reshape { .. }
                | Op::Embedding { .. }
                | Op::PositionalEmbedding {}
                | Op::LayerNorm { .. }
                | Op::Gelu {}
                | Op::CrossEntropy {}
        ),
    }
}

impl Baseline {
    /// The loss of a graph of [`graph_op_supported`] ops: each node's value from its inputs',
    /// in the graph's order, ending at its `cross_entropy` node.
    fn graph_loss(&self, graph: &GraphConfig, names: &[String], x: Tensor, labels: &[u32]) -> Result<Tensor> {
        let param = |node: &str, what: &str| -> Result<&Tensor> {
            let name = format!("{node}.{what}");
            let i = names.iter().position(|n| *n == name).with_context(|| format!("no parameter {name}"))?;
            Ok(self.vars[i].as_tensor())
        };
        let mut values: Vec<(&str, Tensor)> = vec![(INPUT, x)];
        for node in &graph.nodes {
            let input = |k: usize| -> Result<&Tensor> {
                let name = node.inputs.get(k).with_context(|| format!("{}: input {k} missing", node.name))?;
                values.iter().rev().find(|(n, _)| n == name).map(|(_, t)| t).with_context(|| format!("no value {name}"))
            };
            let a = input(0)?;
            let out = match &node.op {
                Op::Linear { bias, .. } => {
                    let w = param(&node.name, "weight")?;
                    let y = a.broadcast_matmul(&w.t()?)?;
                    if *bias { y.broadcast_add(param(&node.name, "bias")?)? } else { y }
                }
                Op::Conv2d { stride, padding, bias, .. } => {
                    let y = a.conv2d(param(&node.name, "weight")?, *padding, *stride, 1, 1)?;
                    if *bias {
                        let b = param(&node.name, "bias")?;
                        y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?)?
                    } else {
                        y
                    }
                }
                Op::BatchNorm { eps } => batch_norm(a, param(&node.name, "weight")?, param(&node.name, "bias")?, *eps)?,
                Op::LayerNorm { eps } => layer_norm(a, param(&node.name, "weight")?, param(&node.name, "bias")?, *eps)?,
                Op::Embedding { dim } => {
                    let (b, t) = a.dims2()?;
                    param(&node.name, "weight")?.index_select(&a.flatten_all()?, 0)?.reshape((b, t, *dim))?
                }
                Op::PositionalEmbedding {} => a.broadcast_add(param(&node.name, "weight")?)?,
                Op::Attention { heads, causal, .. } => {
                    let (b, t, d) = a.dims3()?;
                    let p = |what: &str| param(&node.name, what);
                    let qkv_proj = [p("qkv.weight")?, p("qkv.bias")?, p("proj.weight")?, p("proj.bias")?];
                    attention(&a.reshape((b * t, d))?, (b, t, *heads), *causal, qkv_proj)?.reshape((b, t, d))?
                }
                Op::Gelu {} => a.gelu()?,
                Op::Relu {} => a.relu()?,
                Op::Add {} => (a + input(1)?)?,
                Op::GlobalAvgPool {} => a.flatten_from(2)?.mean(2)?,
                Op::Flatten {} => a.flatten_from(1)?,
                Op::Reshape { shape } => {
                    a.reshape(std::iter::once(a.dims()[0]).chain(shape.iter().copied()).collect::<Vec<_>>())?
                }
                Op::CrossEntropy {} => {
                    ensure!(
                        node.inputs.get(1).map(String::as_str) == Some(LABELS),
                        "{}: not against the labels",
                        node.name
                    );
                    // Text logits `[b, t, vocab]` are one row per position.
                    let classes = *a.dims().last().context("logits without axes")?;
                    return ce(&a.reshape((a.elem_count() / classes, classes))?, labels, &self.dev);
                }
                other => bail!("no FP32 baseline for op {other:?}"),
            };
            values.push((&node.name, out));
        }
        bail!("the graph has no cross_entropy node")
    }
}

/// Batch normalisation with the batch's statistics, per channel (axis 1) over the batch and
/// every other axis, biased variance, then `·weight + bias`.
fn batch_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let x3 = x.reshape((n, c, x.elem_count() / (n * c)))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?;
    let centred = x3.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let y = centred.broadcast_mul(&rstd)?.broadcast_mul(&weight.reshape((1, c, 1))?)?;
    Ok(y.broadcast_add(&bias.reshape((1, c, 1))?)?.reshape(dims)?)
}

/// `x·Wᵀ + b` for `x: [n, i]`, `W: [o, i]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

/// Mean cross-entropy of logits `[n, c]` against labels.
fn ce(logits: &Tensor, labels: &[u32], dev: &Device) -> Result<Tensor> {
    let y = Tensor::from_slice(labels, labels.len(), dev)?;
    Ok(candle_nn::loss::cross_entropy(logits, &y)?)
}

/// Softmax over the last dimension from differentiable primitives (the max is a constant
/// shift, so it is detached).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension, from differentiable primitives.
fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok(xc.broadcast_mul(&rstd)?.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// Multi-head self-attention of `x` (`[b·t, d]`, `heads` heads) with the fused projection
/// `[qkv.weight, qkv.bias, proj.weight, proj.bias]` (the columns of `qkv` are q, k, v, each by
/// head), causal or not: `[b·t, d]`. The engine's `attention` composite, and the GPT preset's.
fn attention(x: &Tensor, (b, t, heads): (usize, usize, usize), causal: bool, p: [&Tensor; 4]) -> Result<Tensor> {
    let d = x.dims2()?.1;
    let dh = d / heads;
    let qkv = linear(x, p[0], p[1])?;
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv.narrow(1, i * d, d)?.reshape((b, t, heads, dh))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let mut scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
    if causal {
        // Additive mask: 0 on and below the diagonal, a large negative number above.
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { -1e30 } else { 0.0 }).collect();
        scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, t), x.device())?)?;
    }
    let att = softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * t, d))?;
    linear(&att, p[2], p[3])
}
