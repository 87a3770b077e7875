//! User-defined graphs: the TOML form, validation errors that name node and field, the Rust
//! builder (same spec digest, same root), and bit-identical replay across device profiles.

use common::leaf::Leaf;
use common::merkle::MerkleTree;
use common::state::StateHash;
use engine::graph::{GraphBuilder, GraphConfig, Op, Width};
use engine::spec::{Config, ModelConfig, RunSpec};
use engine::train::{Run, StepMode};
use kernels::Profile;

const DATA_AND_TRAIN: &str = r#"
[data]
kind = "synthetic"
examples = 256
holdout = 32
features = 16
classes = 4
[train]
batch_size = 16
steps = 6
seed = 5
checkpoint_interval = 2
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
"#;

/// A residual block with every core op: linear, gelu, tanh, sigmoid, mul, add (a tensor with
/// three consumers, so gradients meet), reshape, flatten, and a cross-entropy loss.
const RESIDUAL: &str = r#"
[model]
kind = "graph"
[[model.nodes]]
name = "fc1"
op = "linear"
inputs = ["x"]
out = 12
[[model.nodes]]
name = "h"
op = "gelu"
inputs = ["fc1"]
[[model.nodes]]
name = "fc2"
op = "linear"
inputs = ["h"]
out = 12
[[model.nodes]]
name = "t"
op = "tanh"
inputs = ["fc2"]
[[model.nodes]]
name = "gate"
op = "sigmoid"
inputs = ["h"]
[[model.nodes]]
name = "gated"
op = "mul"
inputs = ["t", "gate"]
[[model.nodes]]
name = "res"
op = "add"
inputs = ["h", "gated"]
[[model.nodes]]
name = "grid"
op = "reshape"
inputs = ["res"]
shape = [3, 4]
[[model.nodes]]
name = "rowwise"
op = "linear"
inputs = ["grid"]
out = 2
bias = false
[[model.nodes]]
name = "flat"
op = "flatten"
inputs = ["rowwise"]
[[model.nodes]]
name = "act"
op = "relu"
inputs = ["flat"]
[[model.nodes]]
name = "head"
op = "linear"
inputs = ["act"]
out = 4
[[model.nodes]]
name = "loss"
op = "cross_entropy"
inputs = ["head", "labels"]
"#;

fn config(model: &str) -> Result<Config, String> {
    Config::from_toml(&format!("{model}\n{DATA_AND_TRAIN}"), "graph.toml").map_err(|e| e.to_string())
}

/// The same graph as [`RESIDUAL`], written with the builder.
fn residual_built() -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let fc1 = g.linear("fc1", &x, 12);
    let h = g.gelu("h", &fc1);
    let fc2 = g.linear("fc2", &h, 12);
    let t = g.tanh("t", &fc2);
    let gate = g.sigmoid("gate", &h);
    let gated = g.mul("gated", &t, &gate);
    let res = g.add("res", &h, &gated);
    let grid = g.reshape("grid", &res, &[3, 4]);
    let rowwise = g.linear_no_bias("rowwise", &grid, 2);
    let flat = g.flatten("flat", &rowwise);
    let act = g.relu("act", &flat);
    let head = g.linear("head", &act, 4);
    g.cross_entropy("loss", &head);
    g.build()
}

type Steps = Vec<(common::state::TrainingState, common::tielog::TieBreakLog)>;

/// Trains `steps` steps; returns the states and logs, and the Merkle root over the leaves.
fn train(r: &Run, steps: u64) -> (Steps, common::codec::Hash) {
    let mut state = r.initial_state().unwrap();
    let mut tree = MerkleTree::new();
    tree.push_entry(&Leaf::initial(state.digest(StateHash::Blake3)).encode());
    let mut out = Vec::new();
    for t in 1..=steps {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        let leaf =
            Leaf { step: t, state: o.state.digest(StateHash::Blake3), log: o.log.digest(), batch: o.batch.digest() };
        tree.push_entry(&leaf.encode());
        state = o.state.clone();
        out.push((o.state, o.log));
    }
    (out, tree.root())
}

#[test]
fn the_toml_graph_parses_to_the_builders_graph_with_the_same_digest_and_root() {
    let toml = config(RESIDUAL).unwrap();
    let ModelConfig::Graph(g) = &toml.model else { panic!("not a graph: {:?}", toml.model) };
    assert_eq!(g, &residual_built());
    assert_eq!(g.nodes[8].op, Op::Linear { out: Width::Fixed(2), bias: false, init: Default::default() });
    assert_eq!(
        g.nodes[0].op,
        Op::Linear { out: Width::Fixed(12), bias: true, init: Default::default() },
        "bias defaults to true"
    );
    let mut built = toml.clone();
    built.model = residual_built().into();
    let a = Run::from_config(&toml, None, Profile::Cpu, 6).unwrap();
    let b = Run::from_config(&built, None, Profile::Cpu, 6).unwrap();
    assert_eq!(a.spec.digest(), b.spec.digest());
    let names: Vec<String> = a.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        names,
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "rowwise.weight", "head.weight", "head.bias"]
    );
    let (_, root_a) = train(&a, 6);
    let (_, root_b) = train(&b, 6);
    assert_eq!(root_a, root_b);
    // The spec commits to the graph: another width is another digest.
    let other = config(
        &RESIDUAL
            .replace("out = 12\n[[model.nodes]]\nname = \"h\"", "out = 11\n[[model.nodes]]\nname = \"h\"")
            .replace("out = 12\n[[model.nodes]]\nname = \"t\"", "out = 11\n[[model.nodes]]\nname = \"t\"")
            .replace("shape = [3, 4]", "shape = [11]")
            .replace("out = 2\nbias", "out = 1\nbias"),
    )
    .unwrap();
    assert_ne!(Run::from_config(&other, None, Profile::Cpu, 6).unwrap().spec.digest(), a.spec.digest());
    // The canonical JSON spells every attribute out, and reads back to the same spec.
    let json = String::from_utf8(a.spec.canonical_json()).unwrap();
    assert!(json.contains(r#"{"name":"fc1","inputs":["x"],"op":"linear","out":12,"bias":true}"#), "{json}");
    assert_eq!(RunSpec::from_committed_json(json.as_bytes()).unwrap(), a.spec);
}

#[test]
fn every_profile_replays_a_graph_bit_identically_and_the_sites_are_named_from_nodes() {
    let cfg = config(RESIDUAL).unwrap();
    for trainer in Profile::CPU {
        let (steps, _) = train(&Run::from_config(&cfg, None, trainer, 6).unwrap(), 6);
        for auditor in Profile::CPU {
            let r = Run::from_config(&cfg, None, auditor, 6).unwrap();
            let mut state = r.initial_state().unwrap();
            for (t, (expected, log)) in steps.iter().enumerate() {
                let o = r.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
                assert!(o.forged.is_empty(), "{trainer}→{auditor}: honest log flagged: {:?}", o.forged);
                assert_eq!(
                    o.state.digest(StateHash::Blake3),
                    expected.digest(StateHash::Blake3),
                    "{trainer}→{auditor}: step {} diverged",
                    t + 1
                );
                state = o.state;
            }
        }
    }
    let r = Run::from_config(&cfg, None, Profile::Cpu, 6).unwrap();
    let o = r.step(&r.initial_state().unwrap(), 1, StepMode::Commit { paper: false }, None).unwrap();
    let sites: Vec<&str> = o.rounded.keys().map(String::as_str).collect();
    let expected = [
        "bwd/act/grad_flat",
        "bwd/fc2/grad_h",
        "bwd/gate/grad_h",
        "bwd/gated/grad_gate",
        "bwd/gated/grad_t",
        "bwd/h/grad_fc1",
        "bwd/h/sum",
        "bwd/head/grad_act",
        "bwd/loss/grad_head",
        "bwd/rowwise/grad_grid",
        "bwd/t/grad_fc2",
        "fwd/act/out",
        "fwd/fc1/out",
        "fwd/fc2/out",
        "fwd/gate/out",
        "fwd/gated/out",
        "fwd/h/out",
        "fwd/head/out",
        "fwd/loss/out",
        "fwd/res/out",
        "fwd/rowwise/out",
        "fwd/t/out",
        "grad/fc1.bias",
        "grad/fc1.weight",
        "grad/fc2.bias",
        "grad/fc2.weight",
        "grad/head.bias",
        "grad/head.weight",
        "grad/rowwise.weight",
    ];
    let model_sites: Vec<&str> = sites.iter().copied().filter(|s| !s.starts_with("opt/")).collect();
    assert_eq!(model_sites, expected);
    // `h` feeds fc2, gate and res: three gradients summed at one site of h's size.
    assert_eq!(o.rounded["bwd/h/sum"], 16 * 12);
    // fc1 reads x, which needs no gradient: no bwd/fc1 site.
    assert!(!sites.iter().any(|s| s.starts_with("bwd/fc1/")));
}

/// The shipped example graph (`configs/synthetic-graph.toml`) learns its task about as well
/// as the MLP preset of `configs/synthetic-mlp.toml` on the same data.
#[test]
fn the_example_graph_learns_the_synthetic_task() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let read = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        Config::from_toml(&text, name).unwrap()
    };
    let mut accuracies = Vec::new();
    for cfg in [read("synthetic-graph.toml"), read("synthetic-mlp.toml")] {
        let r = Run::from_config(&cfg, None, Profile::Cpu, 120).unwrap();
        let (steps, _) = train(&r, 120);
        let before = r.evaluate(&r.initial_state().unwrap(), 256).unwrap();
        let after = r.evaluate(&steps.last().unwrap().0, 256).unwrap();
        assert!(after.loss.unwrap() < 0.5 * before.loss.unwrap(), "{before:?} → {after:?}");
        accuracies.push(after.accuracy.unwrap());
    }
    assert!(
        accuracies[0] > 0.6 && accuracies[0] >= accuracies[1] - 0.05,
        "chance is 0.125; graph, MLP: {accuracies:?}"
    );
}

/// An MSE loss against one-hot labels, and against another tensor (whose gradient then flows
/// into both sides).
#[test]
fn mse_graphs_train_and_replay() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let a = g.linear("a", &x, 4);
    let p = g.sigmoid("p", &a);
    g.mse_labels("loss", &p);
    let mut g2 = GraphBuilder::new();
    let x2 = g2.input();
    let a2 = g2.linear("a", &x2, 4);
    let b2 = g2.linear("b", &x2, 4);
    let h2 = g2.tanh("h", &b2);
    let s2 = g2.add("s", &a2, &h2);
    let q2 = g2.linear("q", &s2, 4);
    g2.mse("loss", &q2, &a2);
    for graph in [g.build(), g2.build()] {
        let mut cfg = config(RESIDUAL).unwrap();
        cfg.model = graph.into();
        let (steps, _) = train(&Run::from_config(&cfg, None, Profile::CpuSplitK, 6).unwrap(), 6);
        let r = Run::from_config(&cfg, None, Profile::CpuSeq, 6).unwrap();
        let mut state = r.initial_state().unwrap();
        for (t, (expected, log)) in steps.iter().enumerate() {
            let o = r.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
            assert_eq!(o.state.digest(StateHash::Blake3), expected.digest(StateHash::Blake3), "step {}", t + 1);
            assert!(o.loss.is_finite());
            state = o.state;
        }
    }
}

/// A small residual CNN with every windowed and normalising op (conv2d, max and average
/// pooling, global average pooling, layer norm, dropout, softmax) replays bit-identically on
/// every CPU profile, with dropout masks that differ from step to step.
#[test]
fn a_residual_cnn_with_norm_dropout_and_softmax_replays_on_every_profile() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    g.reshape("img", &x, &[1, 6, 6]);
    g.node(
        "c1",
        Op::Conv2d { out_channels: 4, kernel: 3, stride: 1, padding: 1, bias: true, init: Default::default() },
        &["img"],
    );
    g.node("r1", Op::Relu {}, &["c1"]);
    g.node(
        "c2",
        Op::Conv2d { out_channels: 4, kernel: 3, stride: 1, padding: 1, bias: false, init: Default::default() },
        &["r1"],
    );
    g.node("res", Op::Add {}, &["r1", "c2"]);
    g.node("mp", Op::MaxPool2d { kernel: 2, stride: 2, padding: 0 }, &["res"]);
    g.node("ap", Op::AvgPool2d { kernel: 2, stride: 1, padding: 1 }, &["mp"]);
    g.node("gap", Op::GlobalAvgPool {}, &["ap"]);
    g.node("ln", Op::LayerNorm { eps: 1e-5 }, &["gap"]);
    g.node("drop", Op::Dropout { p: 0.5 }, &["ln"]);
    g.node("fc", Op::Linear { out: Width::Fixed(4), bias: true, init: Default::default() }, &["drop"]);
    g.node("sm", Op::Softmax { causal: false }, &["fc"]);
    g.node("head", Op::Linear { out: Width::Fixed(4), bias: true, init: Default::default() }, &["sm"]);
    g.node("loss", Op::CrossEntropy {}, &["head", "labels"]);
    let mut cfg =
        Config::from_toml(&format!("{RESIDUAL}\n{DATA_AND_TRAIN}").replace("features = 16", "features = 36"), "t")
            .unwrap();
    cfg.model = g.build().into();
    let mut masks = std::collections::BTreeSet::new();
    for trainer in Profile::CPU {
        let (steps, _) = train(&Run::from_config(&cfg, None, trainer, 6).unwrap(), 6);
        for auditor in Profile::CPU {
            let r = Run::from_config(&cfg, None, auditor, 6).unwrap();
            let mut state = r.initial_state().unwrap();
            for (t, (expected, log)) in steps.iter().enumerate() {
                let o = r.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
                assert!(o.forged.is_empty(), "{trainer}→{auditor}: {:?}", o.forged);
                assert_eq!(
                    o.state.digest(StateHash::Blake3),
                    expected.digest(StateHash::Blake3),
                    "{trainer}→{auditor}: step {} diverged",
                    t + 1
                );
                assert!(o.rounded.contains_key("fwd/ln/mean") && o.rounded.contains_key("fwd/ln/rstd"));
                state = o.state;
            }
        }
        for t in 1..=6 {
            masks.insert(engine::graph::dropout_mask(5, t, "drop", 16 * 4, 0.5));
        }
    }
    assert_eq!(masks.len(), 6, "a fresh dropout mask every step");
}

/// Causal self-attention as a composite (with dropout on the attention output) replays
/// bit-identically on every CPU profile.
#[test]
fn an_attention_composite_replays_on_every_profile() {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let t = g.reshape("tokens", &x, &[4, 4]);
    let ln = g.layer_norm("ln", &t, 1e-5);
    let q = g.linear("q", &ln, 4);
    let k = g.linear("k", &ln, 4);
    let v = g.linear("v", &ln, 4);
    let s = g.matmul_t("scores", &q, &k, 0.5);
    let p = g.softmax("probs", &s, true);
    let a = g.matmul("att", &p, &v);
    let a = g.dropout("drop", &a, 0.1);
    let r = g.add("res", &t, &a);
    let f = g.flatten("f", &r);
    let logits = g.linear("head", &f, 4);
    g.cross_entropy("loss", &logits);
    let mut cfg = config(RESIDUAL).unwrap();
    cfg.model = g.build().into();
    for trainer in Profile::CPU {
        let (steps, _) = train(&Run::from_config(&cfg, None, trainer, 6).unwrap(), 6);
        for auditor in Profile::CPU {
            let r = Run::from_config(&cfg, None, auditor, 6).unwrap();
            let mut state = r.initial_state().unwrap();
            for (t, (expected, log)) in steps.iter().enumerate() {
                let o = r.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
                assert!(o.forged.is_empty(), "{trainer}→{auditor}: {:?}", o.forged);
                assert_eq!(
                    o.state.digest(StateHash::Blake3),
                    expected.digest(StateHash::Blake3),
                    "{trainer}→{auditor}: step {} diverged",
                    t + 1
                );
                state = o.state;
            }
        }
    }
}
