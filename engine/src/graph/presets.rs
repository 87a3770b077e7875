//! Ready-made graphs, written with the [`GraphBuilder`] as a user would. The config kinds
//! `mlp`, `cnn` and `gpt` expand to [`mlp`], [`cnn`] and [`gpt`] (the engine has no other model
//! code); [`transformer`] and [`resnet`] are the graphs of `configs/shakespeare-graph.toml` and
//! `configs/mnist-resnet.toml` (a test checks they agree). Nothing about them is special to the
//! verifier: they are interpreted like any user's graph.

use super::{GraphBuilder, GraphConfig, Op, Tensor, WeightInit, Width};
use crate::spec::GptConfig;

/// The input flattened (`flat`), fully connected layers `fc1`, `fc2`, … of the `hidden`
/// widths (He-uniform weights) with ReLU (`relu1`, …) between them, then `fc<n>` over the classes and a
/// cross-entropy loss.
pub fn mlp(hidden: &[usize]) -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let mut h = g.flatten("flat", &x);
    for (l, &width) in hidden.iter().enumerate() {
        let fc = g.node(
            &format!("fc{}", l + 1),
            Op::Linear { out: Width::Fixed(width), bias: true, init: WeightInit::He },
            &[h.name()],
        );
        h = g.relu(&format!("relu{}", l + 1), &fc);
    }
    let logits = g.linear_classes(&format!("fc{}", hidden.len() + 1), &h);
    g.cross_entropy("loss", &logits);
    g.build()
}

/// Two blocks of 3×3 convolution (padding 1; `conv1`, `conv2` with `channels` outputs and
/// He-uniform weights), ReLU
/// and 2×2 max pooling, then a linear classifier `fc` over the flattened features.
pub fn cnn(channels: [usize; 2]) -> GraphConfig {
    let mut g = GraphBuilder::new();
    let mut h = g.input();
    for (i, &c) in channels.iter().enumerate() {
        let op = Op::Conv2d { out_channels: c, kernel: 3, stride: 1, padding: 1, bias: true, init: WeightInit::He };
        let conv = g.node(&format!("conv{}", i + 1), op, &[h.name()]);
        let r = g.relu(&format!("relu{}", i + 1), &conv);
        h = g.max_pool2d(&format!("pool{}", i + 1), &r, 2, 2);
    }
    let flat = g.flatten("flat", &h);
    let logits = g.linear_classes("fc", &flat);
    g.cross_entropy("loss", &logits);
    g.build()
}

/// The character-level GPT: [`transformer`]'s blocks with `cfg.dropout` applied after each
/// attention projection and each MLP (`blk<l>.attn_drop`, `blk<l>.mlp.drop`) rather than on the
/// attention weights.
pub fn gpt(cfg: &GptConfig) -> GraphConfig {
    decoder(cfg.context, cfg.d_model, cfg.heads, cfg.layers, 0.0, cfg.dropout)
}

/// A pre-norm decoder-only transformer on windows of `context` tokens: token and position
/// embeddings (`tok_emb`, `pos_emb`), `layers` blocks of causal multi-head self-attention
/// (`blk<l>.attn`, `heads` heads, dropout `dropout` on the attention weights) and a GELU MLP
/// (`blk<l>.mlp.fc`, `blk<l>.mlp.proj`, width `4·d_model`), each with a layer norm before it
/// and a residual around it, a final layer norm `ln_f` and a head `lm_head` over the
/// vocabulary; the loss is the mean cross-entropy of the next token at every position.
pub fn transformer(context: usize, d_model: usize, heads: usize, layers: usize, dropout: f64) -> GraphConfig {
    decoder(context, d_model, heads, layers, dropout, 0.0)
}

/// A pre-norm decoder with dropout `attn_p` on the attention weights and `resid_p` on each
/// block's two outputs before their residual sums.
fn decoder(context: usize, d_model: usize, heads: usize, layers: usize, attn_p: f64, resid_p: f64) -> GraphConfig {
    let mut g = GraphBuilder::text(context);
    let x = g.input();
    let tok = g.embedding("tok_emb", &x, d_model);
    let mut h = g.positional_embedding("pos_emb", &tok);
    for l in 0..layers {
        let p = |s: &str| format!("blk{l}.{s}");
        let n1 = g.layer_norm(&p("ln1"), &h, 1e-5);
        let mut a = g.causal_self_attention(&p("attn"), &n1, heads, attn_p);
        if resid_p > 0.0 {
            a = g.dropout(&p("attn_drop"), &a, resid_p);
        }
        h = g.add(&p("res1"), &h, &a);
        let n2 = g.layer_norm(&p("ln2"), &h, 1e-5);
        let f = g.linear(&p("mlp.fc"), &n2, 4 * d_model);
        let f = g.gelu(&p("mlp.act"), &f);
        let mut f = g.linear(&p("mlp.proj"), &f, d_model);
        if resid_p > 0.0 {
            f = g.dropout(&p("mlp.drop"), &f, resid_p);
        }
        h = g.add(&p("res2"), &h, &f);
    }
    let h = g.layer_norm("ln_f", &h, 1e-5);
    let logits = g.linear_classes("lm_head", &h);
    g.cross_entropy("loss", &logits);
    g.build()
}

/// A 3×3 convolution without bias (a batch norm follows, which would cancel it).
fn conv(g: &mut GraphBuilder, name: &str, x: &Tensor, out_channels: usize, stride: usize) -> Tensor {
    g.node(
        name,
        Op::Conv2d { out_channels, kernel: 3, stride, padding: 1, bias: false, init: Default::default() },
        &[x.name()],
    )
}

/// A small ResNet for `[1, h, w]` images: a stem (`stem.conv`, stride `stem_stride`, and
/// `stem.bn`), then one stage per
/// entry of `widths`, each of `blocks` residual blocks (`s<i>.b<j>`: conv, batch norm, ReLU,
/// conv, batch norm, plus the block's input, ReLU). Every stage after the first halves the
/// resolution with a stride-2 first convolution, its skip path a stride-2 1×1 convolution
/// with a batch norm (`…skip`). Global average pooling and a linear head over the classes end
/// it; the loss is cross-entropy.
pub fn resnet(widths: &[usize], blocks: usize, stem_stride: usize) -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let first = widths.first().copied().unwrap_or(8);
    let stem = conv(&mut g, "stem.conv", &x, first, stem_stride);
    let stem = g.batch_norm("stem.bn", &stem, 1e-5);
    let mut h = g.relu("stem.relu", &stem);
    for (i, &width) in widths.iter().enumerate() {
        for j in 0..blocks {
            let p = |s: &str| format!("s{i}.b{j}.{s}");
            let down = i > 0 && j == 0;
            let stride = if down { 2 } else { 1 };
            let c1 = conv(&mut g, &p("conv1"), &h, width, stride);
            let b1 = g.batch_norm(&p("bn1"), &c1, 1e-5);
            let r1 = g.relu(&p("relu1"), &b1);
            let c2 = conv(&mut g, &p("conv2"), &r1, width, 1);
            let b2 = g.batch_norm(&p("bn2"), &c2, 1e-5);
            let skip = if down {
                let s = Op::Conv2d {
                    out_channels: width,
                    kernel: 1,
                    stride: 2,
                    padding: 0,
                    bias: false,
                    init: Default::default(),
                };
                let s = g.node(&p("skip.conv"), s, &[h.name()]);
                g.batch_norm(&p("skip.bn"), &s, 1e-5)
            } else {
                h.clone()
            };
            let sum = g.add(&p("add"), &b2, &skip);
            h = g.relu(&p("relu2"), &sum);
        }
    }
    let pooled = g.global_avg_pool("pool", &h);
    let logits = g.linear_classes("head", &pooled);
    g.cross_entropy("loss", &logits);
    g.build()
}
