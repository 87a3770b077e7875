//! Gradients are right, not only reproducible: the graph interpreter's gradients (FP64 ops,
//! every intermediate rounded to FP32) are compared with candle's FP64 autograd of the same
//! computation, written here independently with candle's own ops, from the same FP32
//! parameters and batch.
//!
//! Tolerance, per parameter tensor: `|ours − candle| ≤ 1e-4·max|candle| + 1e-3·|candle|`. The
//! interpreter rounds each tensor to FP32 (relative error 2⁻²⁴ ≈ 6e-8 per site, a few dozen
//! sites deep), so honest differences are around 1e-6 of the tensor's scale; a wrong
//! backward rule (a missing factor, a wrong sign, a dropped contribution) is off by O(1).

use candle_core::{D, DType, Device as CDevice, Tensor, Var};
use common::rounding::Rounder;
use engine::graph::{GraphBuilder, GraphConfig, INPUT, LABELS, Op, dropout_mask};
use engine::model::{Batch, Ctx, param_key};
use engine::spec::Config;
use engine::train::Run;
use kernels::Profile;

const BASE: &str = r#"
[model]
kind = "mlp"
hidden = [4]
[data]
kind = "synthetic"
examples = 128
holdout = 16
features = 12
classes = 4
[train]
batch_size = 8
steps = 1
seed = 3
checkpoint_interval = 1
[optimizer]
kind = "sgd"
lr = 0.1
"#;

/// `x → linear` (`out` outputs, with bias) in candle, over the last axis.
fn candle_linear(a: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let dims = a.dims().to_vec();
    let i = *dims.last().unwrap();
    let rows = a.elem_count() / i;
    let mut h = a.reshape((rows, i)).unwrap().matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        h = h.broadcast_add(b).unwrap();
    }
    let mut out_dims = dims.clone();
    *out_dims.last_mut().unwrap() = w.dims()[0];
    h.reshape(out_dims).unwrap()
}

/// Softmax over the last axis, optionally causal over the last two.
fn candle_softmax(a: &Tensor, causal: bool) -> Tensor {
    let m = a.max_keepdim(D::Minus1).unwrap().detach();
    let mut e = a.broadcast_sub(&m).unwrap().exp().unwrap();
    if causal {
        let t = *a.dims().last().unwrap();
        let tri: Vec<f64> = (0..t * t).map(|i| if i % t <= i / t { 1.0 } else { 0.0 }).collect();
        e = e.broadcast_mul(&Tensor::from_vec(tri, (t, t), a.device()).unwrap()).unwrap();
    }
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

/// Candle's forward pass of `graph`, from the parameter vars by name. `n` examples; `y` holds
/// one label per example (or per position, for text).
fn candle_loss(graph: &GraphConfig, vars: &[(String, Var)], x: &Tensor, y: &[u32], n: usize, classes: usize) -> Tensor {
    let dev = CDevice::Cpu;
    let rows = y.len();
    let onehot = {
        let mut t = vec![0.0f64; rows * classes];
        y.iter().enumerate().for_each(|(r, &c)| t[r * classes + c as usize] = 1.0);
        Tensor::from_vec(t, (rows, classes), &dev).unwrap()
    };
    let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_tensor().clone()).unwrap();
    let mut vals: Vec<(String, Tensor)> = vec![(INPUT.to_string(), x.clone())];
    let get = |vals: &[(String, Tensor)], name: &str| vals.iter().find(|(k, _)| k == name).unwrap().1.clone();
    for node in &graph.nodes {
        let a = get(&vals, &node.inputs[0]);
        let out = match &node.op {
            Op::Linear { bias, .. } => {
                let w = var(&format!("{}.weight", node.name));
                let b = bias.then(|| var(&format!("{}.bias", node.name)));
                candle_linear(&a, &w, b.as_ref())
            }
            Op::Conv2d { stride, padding, bias, .. } => {
                let w = var(&format!("{}.weight", node.name));
                let mut h = a.conv2d(&w, *padding, *stride, 1, 1).unwrap();
                if *bias {
                    let b = var(&format!("{}.bias", node.name));
                    let c = b.dims1().unwrap();
                    h = h.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
                }
                h
            }
            Op::MaxPool2d { kernel, stride, padding } => {
                // Not candle's `max_pool2d`: its backward (0.11) scales each window's gradient
                // by (number of maxima)/k² instead of 1/(number of maxima), so a unique maximum
                // gets a k²-th of its gradient. Two `max` reductions over the window axes
                // have a correct backward (for non-overlapping windows without padding).
                assert!(*padding == 0 && kernel == stride, "the reference covers tiling windows");
                let (b, c, h, w) = a.dims4().unwrap();
                let k = *kernel;
                a.reshape((b, c, h / k, k, w / k, k)).unwrap().max(5).unwrap().max(3).unwrap()
            }
            Op::AvgPool2d { kernel, stride, padding } => {
                let p = a.pad_with_zeros(2, *padding, *padding).unwrap().pad_with_zeros(3, *padding, *padding).unwrap();
                p.avg_pool2d_with_stride(*kernel, *stride).unwrap()
            }
            Op::GlobalAvgPool {} => a.flatten_from(2).unwrap().mean(2).unwrap(),
            Op::LayerNorm { eps } => {
                let c = a.broadcast_sub(&a.mean_keepdim(D::Minus1).unwrap()).unwrap();
                let var_ = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xhat = c.broadcast_div(&(var_ + *eps).unwrap().sqrt().unwrap()).unwrap();
                let w = var(&format!("{}.weight", node.name));
                let b = var(&format!("{}.bias", node.name));
                xhat.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
            }
            Op::Dropout { p } => {
                let keep = dropout_mask(3, 1, &node.name, a.elem_count(), *p);
                let s = 1.0 / (1.0 - p);
                let m: Vec<f64> = keep.iter().map(|&k| if k { s } else { 0.0 }).collect();
                (a.clone() * Tensor::from_vec(m, a.dims(), &dev).unwrap()).unwrap()
            }
            Op::Softmax { causal } => candle_softmax(&a, *causal),
            Op::LogSoftmax {} => {
                let m = a.max_keepdim(D::Minus1).unwrap().detach();
                let shifted = a.broadcast_sub(&m).unwrap();
                let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
                shifted.broadcast_sub(&lse).unwrap()
            }
            Op::Matmul { transpose_b, scale } => {
                let b = get(&vals, &node.inputs[1]);
                let b = if *transpose_b { b.transpose(D::Minus2, D::Minus1).unwrap().contiguous().unwrap() } else { b };
                (a.matmul(&b).unwrap() * *scale).unwrap()
            }
            Op::Transpose {} => a.transpose(D::Minus2, D::Minus1).unwrap().contiguous().unwrap(),
            Op::Relu {} => a.relu().unwrap(),
            Op::Gelu {} => a.gelu().unwrap(),
            Op::Tanh {} => a.tanh().unwrap(),
            Op::Sigmoid {} => ((a.neg().unwrap().exp().unwrap() + 1.0).unwrap()).recip().unwrap(),
            Op::Add {} => (a + get(&vals, &node.inputs[1])).unwrap(),
            Op::Mul {} => (a * get(&vals, &node.inputs[1])).unwrap(),
            Op::Reshape { shape } => {
                let mut dims = vec![n];
                dims.extend(shape);
                a.reshape(dims).unwrap()
            }
            Op::Flatten {} => a.flatten_from(1).unwrap(),
            Op::Permute { perm } => {
                let dims: Vec<usize> = std::iter::once(0).chain(perm.iter().map(|p| p + 1)).collect();
                a.permute(dims).unwrap().contiguous().unwrap()
            }
            Op::Slice { axis, start, end } => a.narrow(axis + 1, *start, end - start).unwrap(),
            Op::Split { axis, parts, index } => {
                let w = a.dims()[axis + 1] / parts;
                a.narrow(axis + 1, index * w, w).unwrap()
            }
            Op::Concat { axis } => {
                let parts: Vec<Tensor> = node.inputs.iter().map(|i| get(&vals, i)).collect();
                Tensor::cat(&parts, axis + 1).unwrap()
            }
            Op::BatchNorm { eps } => {
                // Statistics per channel over the batch and every position.
                let dims = a.dims().to_vec();
                let c = dims[1];
                let a3 = a.reshape((dims[0], c, a.elem_count() / (dims[0] * c))).unwrap();
                let mean = a3.mean_keepdim(2).unwrap().mean_keepdim(0).unwrap();
                let cen = a3.broadcast_sub(&mean).unwrap();
                let var_ = cen.sqr().unwrap().mean_keepdim(2).unwrap().mean_keepdim(0).unwrap();
                let xhat = cen.broadcast_div(&(var_ + *eps).unwrap().sqrt().unwrap()).unwrap();
                let w = var(&format!("{}.weight", node.name)).reshape((1, c, 1)).unwrap();
                let b = var(&format!("{}.bias", node.name)).reshape((1, c, 1)).unwrap();
                xhat.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap().reshape(dims).unwrap()
            }
            Op::Embedding { .. } => {
                let w = var(&format!("{}.weight", node.name));
                let ids: Vec<u32> =
                    a.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|&v| v as u32).collect();
                let t = ids.len() / n;
                let ids = Tensor::from_vec(ids, t * n, &dev).unwrap();
                w.index_select(&ids, 0).unwrap().reshape((n, t, w.dims()[1])).unwrap()
            }
            Op::PositionalEmbedding {} => a.broadcast_add(&var(&format!("{}.weight", node.name))).unwrap(),
            Op::Attention { heads, causal, dropout } => {
                assert_eq!(*dropout, 0.0, "the reference attention has no dropout");
                let (b, t, d) = a.dims3().unwrap();
                let (h, dh) = (*heads, d / heads);
                let p = |s: &str| var(&format!("{}.{s}", node.name));
                let qkv = candle_linear(&a, &p("qkv.weight"), Some(&p("qkv.bias")));
                let head = |i: usize| {
                    let part = qkv.narrow(2, i * d, d).unwrap();
                    part.reshape((b, t, h, dh)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let (q, k, v) = (head(0), head(1), head(2));
                let kt = k.transpose(2, 3).unwrap().contiguous().unwrap();
                let scores = (q.matmul(&kt).unwrap() * (1.0 / (dh as f64).sqrt())).unwrap();
                let ctx = candle_softmax(&scores, *causal).matmul(&v).unwrap();
                let joined = ctx.transpose(1, 2).unwrap().contiguous().unwrap().reshape((b, t, d)).unwrap();
                candle_linear(&joined, &p("proj.weight"), Some(&p("proj.bias")))
            }
            Op::CrossEntropy {} => {
                let a = a.reshape((rows, classes)).unwrap();
                let m = a.max_keepdim(1).unwrap().detach();
                let shifted = a.broadcast_sub(&m).unwrap();
                let lse = shifted.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
                let logp = shifted.broadcast_sub(&lse).unwrap();
                ((logp * &onehot).unwrap().sum_all().unwrap() / -(rows as f64)).unwrap()
            }
            Op::Mse {} => {
                let t = if node.inputs[1] == LABELS {
                    onehot.reshape(a.dims()).unwrap()
                } else {
                    get(&vals, &node.inputs[1])
                };
                (a - t).unwrap().sqr().unwrap().mean_all().unwrap()
            }
        };
        vals.push((node.name.clone(), out));
    }
    vals.pop().unwrap().1
}

/// Runs one step's loss and gradients of `graph` in the interpreter and in candle, and
/// compares every parameter's gradient. Returns the largest relative difference seen.
fn check(graph: GraphConfig, features: usize) -> f64 {
    check_model(graph.into(), features)
}

/// [`check`] for any model config (a preset expands to its graph).
fn check_model(model: engine::spec::ModelConfig, features: usize) -> f64 {
    let mut cfg = Config::from_toml(&BASE.replace("features = 12", &format!("features = {features}")), "t").unwrap();
    cfg.model = model;
    compare(&Run::from_config(&cfg, None, Profile::CpuSeq, 1).unwrap())
}

/// A short text (every letter of it, so the vocabulary is known), as a file for `--data`.
fn text_file() -> std::path::PathBuf {
    let text = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. ".repeat(6);
    let path = std::env::temp_dir().join(format!("tiebreak-graph-grads-{}.txt", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// [`check`] for a graph on text data: windows of `context` tokens.
fn check_text(model: impl Into<engine::spec::ModelConfig>) -> f64 {
    let mut cfg = Config::from_toml(&BASE.replace("batch_size = 8", "batch_size = 3"), "t").unwrap();
    cfg.model = model.into();
    cfg.data = engine::spec::DataConfig::Text(engine::spec::TextConfig { holdout_fraction: 0.1 });
    cfg.validate().unwrap();
    let path = text_file();
    let run = Run::from_config(&cfg, Some(&path), Profile::CpuSeq, 1).unwrap();
    compare(&run)
}

/// One step of `run`'s graph in the interpreter and in candle; see [`check`].
fn compare(run: &Run) -> f64 {
    let graph = run.spec.config.model.graph();
    let state = run.initial_state().unwrap();
    let batch = Batch::gather(&run.data, &run.batch_indices(1).0);
    let mut rounder = Rounder::commit();
    let mut ctx = Ctx::new(&run.device, &mut rounder, 1, &run.spec);
    let (loss, grads) = run.model.loss_and_grads(&mut ctx, &state, &batch).unwrap();

    let dev = CDevice::Cpu;
    let (x, y, n) = match &batch {
        Batch::Classes { x, y, n } => {
            // Each example in the data's own shape (a CNN preset reads [1, h, w] images).
            let engine::data::Dataset::Classification { input_shape, .. } = &run.data else { unreachable!() };
            let shape: Vec<usize> = std::iter::once(*n).chain(input_shape.iter().copied()).collect();
            (Tensor::from_slice(x, shape, &dev).unwrap().to_dtype(DType::F64).unwrap(), y, *n)
        }
        Batch::Tokens { ids, targets, b, t } => {
            let ids: Vec<f64> = ids.iter().map(|&i| i as f64).collect();
            (Tensor::from_vec(ids, (*b, *t), &dev).unwrap(), targets, *b)
        }
        Batch::Targets { .. } => panic!("the gradient checks train on labels (mse against a tensor covers targets)"),
    };
    let params = run.model.params();
    let vars: Vec<(String, Var)> = params
        .iter()
        .map(|p| {
            let t = state.get(&param_key(&p.name)).unwrap();
            let v = Tensor::from_slice(&t.data, t.shape.as_slice(), &dev).unwrap().to_dtype(DType::F64).unwrap();
            (p.name.clone(), Var::from_tensor(&v).unwrap())
        })
        .collect();
    let ref_loss = candle_loss(&graph, &vars, &x, y, n, run.model.classes());
    let store = ref_loss.backward().unwrap();
    let ref_loss = ref_loss.to_scalar::<f64>().unwrap();
    assert!((loss as f64 - ref_loss).abs() <= 1e-5 * ref_loss.abs().max(1.0), "loss {loss} vs candle {ref_loss}");
    let mut worst = 0.0f64;
    for ((name, var), ours) in vars.iter().zip(&grads) {
        let want: Vec<f64> = store.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: candle's gradient is zero, the check would be vacuous");
        for (i, (&o, &w)) in ours.iter().zip(&want).enumerate() {
            let d = (o as f64 - w).abs();
            assert!(d <= 1e-4 * scale + 1e-3 * w.abs(), "{name}[{i}]: ours {o}, candle {w} (scale {scale})");
            worst = worst.max(d / scale);
        }
    }
    worst
}

/// `x → linear → <op> → linear → cross-entropy`, the op under test in the middle.
fn around(op: impl Fn(&mut GraphBuilder, &engine::graph::Tensor) -> engine::graph::Tensor) -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 6);
    let h = op(&mut g, &h);
    let logits = g.linear("head", &h, 4);
    g.cross_entropy("loss", &logits);
    g.build()
}

#[test]
fn linear_and_cross_entropy() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let logits = g.linear("head", &x, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 12);
}

#[test]
fn activations() {
    check(around(|g, h| g.relu("act", h)), 12);
    check(around(|g, h| g.gelu("act", h)), 12);
    check(around(|g, h| g.tanh("act", h)), 12);
    check(around(|g, h| g.sigmoid("act", h)), 12);
}

#[test]
fn add_and_mul_where_a_tensor_feeds_several_nodes() {
    // h feeds the product twice (h·h, one node reading the same tensor twice), the sum, and
    // the second linear: four gradients meet at bwd/h/sum.
    check(
        around(|g, h| {
            let sq = g.mul("sq", h, h);
            let fc = g.linear("fc2", h, 6);
            let s = g.add("s", &sq, &fc);
            g.add("res", &s, h)
        }),
        12,
    );
}

#[test]
fn reshape_flatten_and_linear_over_the_last_axis_without_bias() {
    check(
        around(|g, h| {
            let grid = g.reshape("grid", h, &[2, 3]);
            let r = g.linear_no_bias("rows", &grid, 5);
            g.flatten("flat", &r)
        }),
        12,
    );
}

#[test]
fn mse_against_labels_and_against_a_tensor() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 4);
    let p = g.tanh("p", &h);
    g.mse_labels("loss", &p);
    check(g.build(), 12);
    let mut g = GraphBuilder::new();
    let x = g.input();
    let a = g.linear("a", &x, 5);
    let b = g.linear("b", &x, 5);
    let b = g.sigmoid("sb", &b);
    g.mse("loss", &a, &b);
    check(g.build(), 12);
}

#[test]
fn a_whole_residual_graph() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let fc1 = g.linear("fc1", &x, 8);
    let h = g.gelu("h", &fc1);
    let fc2 = g.linear("fc2", &h, 8);
    let t = g.tanh("t", &fc2);
    let gate = g.sigmoid("gate", &h);
    let gated = g.mul("gated", &t, &gate);
    let res = g.add("res", &h, &gated);
    let act = g.relu("act", &res);
    let logits = g.linear("head", &act, 4);
    g.cross_entropy("loss", &logits);
    let worst = check(g.build(), 12);
    assert!(worst < 1e-5, "honest differences are FP32 rounding, not {worst}");
}

#[test]
fn conv2d_and_pools() {
    // x (36 features) as a 1×6×6 image → conv 3×3 pad 1 → relu → max pool 2 → conv 2×2
    // stride 1 without bias → avg pool 2 with padding 1 and stride 2 → flatten → head.
    let mut g = GraphBuilder::new();
    let x = g.input();
    let img = g.reshape("img", &x, &[1, 6, 6]);
    let c1 = g.node(
        "c1",
        Op::Conv2d { out_channels: 3, kernel: 3, stride: 1, padding: 1, bias: true, init: Default::default() },
        &["img"],
    );
    let r = g.relu("r", &c1);
    let p = g.node("p", Op::MaxPool2d { kernel: 2, stride: 2, padding: 0 }, &[r.name()]);
    let _c2 = g.node(
        "c2",
        Op::Conv2d { out_channels: 4, kernel: 2, stride: 1, padding: 0, bias: false, init: Default::default() },
        &[p.name()],
    );
    let a = g.node("a", Op::AvgPool2d { kernel: 2, stride: 2, padding: 1 }, &["c2"]);
    let f = g.flatten("f", &a);
    let logits = g.linear("head", &f, 4);
    g.cross_entropy("loss", &logits);
    let _ = img;
    check(g.build(), 36);
    // Strided conv with padding, then global average pooling.
    let mut g = GraphBuilder::new();
    let x = g.input();
    g.reshape("img", &x, &[1, 6, 6]);
    g.node(
        "c1",
        Op::Conv2d { out_channels: 5, kernel: 3, stride: 2, padding: 1, bias: true, init: Default::default() },
        &["img"],
    );
    g.node("t", Op::Tanh {}, &["c1"]);
    let gap = g.node("gap", Op::GlobalAvgPool {}, &["t"]);
    let logits = g.linear("head", &gap, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 36);
}

#[test]
fn layer_norm_dropout_and_softmax() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 9);
    let h = g.node("ln", Op::LayerNorm { eps: 1e-5 }, &[h.name()]);
    let h = g.node("drop", Op::Dropout { p: 0.25 }, &[h.name()]);
    let h = g.linear("fc2", &h, 9);
    let h = g.reshape("sq", &h, &[3, 3]);
    let h = g.node("sm", Op::Softmax { causal: true }, &[h.name()]);
    let h = g.flatten("f", &h);
    let h2 = g.linear("fc3", &h, 6);
    let h2 = g.node("sm2", Op::Softmax { causal: false }, &[h2.name()]);
    let logits = g.linear("head", &h2, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 12);
}

/// Single-head causal self-attention as a composite (`x` read as 4 tokens of 4 features):
/// q, k, v projections, scaled scores `q·kᵀ/2`, causal softmax, `p·v`, a residual, and a
/// transposed view and log-softmax on the way to the head.
#[test]
fn causal_attention_as_a_composite_with_transpose_and_log_softmax() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let t = g.reshape("tokens", &x, &[4, 4]);
    let q = g.linear_no_bias("q", &t, 4);
    let k = g.linear_no_bias("k", &t, 4);
    let v = g.linear("v", &t, 4);
    let s = g.matmul_t("scores", &q, &k, 0.5);
    let p = g.softmax("probs", &s, true);
    let a = g.matmul("att", &p, &v);
    let r = g.add("res", &t, &a);
    let rt = g.transpose("rt", &r);
    let m = g.linear("mix", &rt, 3);
    let ls = g.log_softmax("ls", &m);
    let f = g.flatten("f", &ls);
    let logits = g.linear("head", &f, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 16);
}

#[test]
fn permute_split_slice_and_concat_move_gradients_back() {
    check(
        around(|g, h| {
            let grid = g.reshape("grid", h, &[2, 3]);
            let cols = g.permute("cols", &grid, &[1, 0]); // [3, 2]
            let parts = g.split("part", &cols, 0, 3); // three [1, 2]
            let a = g.linear("a", &parts[0], 2);
            let joined = g.concat("joined", &[&parts[2], &a, &parts[1], &parts[2]], 0); // [4, 2]
            let mid = g.slice("mid", &joined, 0, 1, 4); // [3, 2]
            let t = g.tanh("t", &mid);
            g.flatten("flat", &t)
        }),
        12,
    );
}

#[test]
fn batch_norm_over_channels_and_over_features() {
    // Convolution → batch norm (statistics over the batch and the 6×6 plane) → relu → pool.
    let mut g = GraphBuilder::new();
    let x = g.input();
    let img = g.reshape("img", &x, &[1, 6, 6]);
    // No bias before a batch norm: it would be removed with the mean (its gradient is 0).
    let conv = |out_channels| Op::Conv2d {
        out_channels,
        kernel: 3,
        stride: 1,
        padding: 1,
        bias: false,
        init: Default::default(),
    };
    let c = g.node("c1", conv(3), &[img.name()]);
    let bn = g.batch_norm("bn", &c, 1e-5);
    let r = g.relu("r", &bn);
    let c2 = g.node("c2", conv(3), &[r.name()]);
    let bn2 = g.batch_norm("bn2", &c2, 1e-5);
    let res = g.add("res", &r, &bn2);
    let gap = g.global_avg_pool("gap", &res);
    let logits = g.linear("head", &gap, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 36);
    // On features: every feature is a channel.
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear_no_bias("fc1", &x, 6);
    let h = g.batch_norm("bn", &h, 1e-3);
    let h = g.tanh("t", &h);
    let logits = g.linear("head", &h, 4);
    g.cross_entropy("loss", &logits);
    check(g.build(), 12);
}

#[test]
fn a_multi_head_transformer_on_text() {
    // A small GPT built from the catalogue (engine::graph::presets::transformer): token and
    // position embeddings, pre-norm blocks of multi-head causal attention and a GELU MLP with
    // residuals, and a head over the vocabulary; the loss averages over every position.
    let worst = check_text(engine::graph::presets::transformer(8, 8, 2, 2, 0.0));
    assert!(worst < 1e-4, "honest differences are FP32 rounding, not {worst}");
}

/// Each preset's whole step (its graph, as the engine runs it) against candle: the MLP on
/// 64 features, the CNN on 8×8 images, the GPT with dropout on text.
#[test]
fn each_presets_whole_step() {
    use engine::spec::{CnnConfig, GptConfig, MlpConfig, ModelConfig};
    check_model(ModelConfig::Mlp(MlpConfig { hidden: vec![16, 8] }), 64);
    check_model(ModelConfig::Cnn(CnnConfig { channels: [3, 4] }), 64);
    let gpt = GptConfig { layers: 2, d_model: 8, heads: 2, context: 8, dropout: 0.1 };
    let worst = check_text(ModelConfig::Gpt(gpt));
    assert!(worst < 1e-4, "honest differences are FP32 rounding, not {worst}");
}
