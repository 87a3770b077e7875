//! The presets are graphs: `mlp`, `cnn` and `gpt` configs expand to `engine::graph::presets`,
//! and a user's own graph written like a preset (other node names, the graph's default
//! initialisation) trains bit-identically to it from the same state, for both optimizers. The
//! presets keep their He-uniform initialisation of layers that feed a ReLU.

use common::state::StateHash;
use engine::graph::{GraphBuilder, GraphConfig, Op, presets};
use engine::model::{Init, param_key};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;

fn config(model: &str, optimizer: &str) -> Config {
    let text = format!(
        r#"
{model}
[data]
kind = "synthetic"
examples = 160
holdout = 16
features = 64
classes = 5
[train]
batch_size = 8
steps = 5
seed = 21
checkpoint_interval = 5
{optimizer}
"#
    );
    Config::from_toml(&text, "t").unwrap()
}

const SGD: &str = "[optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.0001";
const ADAMW: &str =
    "[optimizer]\nkind = \"adamw\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\nweight_decay = 0.01";

/// The MLP preset `hidden = [24, 12]` as a user would write it (its own node names).
fn mlp_graph() -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 24);
    let h = g.relu("r1", &h);
    let h = g.linear("fc2", &h, 12);
    let h = g.relu("r2", &h);
    let logits = g.linear("fc3", &h, 5);
    g.cross_entropy("loss", &logits);
    g.build()
}

/// The CNN preset `channels = [3, 4]` on 8×8 images as a user would write it.
fn cnn_graph() -> GraphConfig {
    let conv = |out_channels| Op::Conv2d {
        out_channels,
        kernel: 3,
        stride: 1,
        padding: 1,
        bias: true,
        init: Default::default(),
    };
    let pool = Op::MaxPool2d { kernel: 2, stride: 2, padding: 0 };
    let mut g = GraphBuilder::new();
    let x = g.input();
    g.reshape("img", &x, &[1, 8, 8]);
    g.node("conv1", conv(3), &["img"]);
    g.node("r1", Op::Relu {}, &["conv1"]);
    g.node("pool1", pool.clone(), &["r1"]);
    g.node("conv2", conv(4), &["pool1"]);
    g.node("r2", Op::Relu {}, &["conv2"]);
    g.node("pool2", pool, &["r2"]);
    let flat = g.node("flat", Op::Flatten {}, &["pool2"]);
    let logits = g.linear("fc", &flat, 5);
    g.cross_entropy("loss", &logits);
    g.build()
}

fn same_training(preset: &str, graph: GraphConfig) {
    for opt in [SGD, ADAMW] {
        let preset = Run::from_config(&config(preset, opt), None, Profile::Cpu, 5).unwrap();
        // Any model line: the graph replaces it; only the data and training sections matter.
        let mut cfg = config("[model]\nkind = \"mlp\"\nhidden = [2]", opt);
        cfg.model = graph.clone().into();
        let graph_run = Run::from_config(&cfg, None, Profile::Cpu, 5).unwrap();
        let names = |r: &Run| r.model.params().iter().map(|p| (p.name.clone(), p.shape.clone())).collect::<Vec<_>>();
        assert_eq!(names(&preset), names(&graph_run), "same parameters, in the same order");
        let (mut a, mut b) = (preset.initial_state().unwrap(), preset.initial_state().unwrap());
        for t in 1..=5 {
            assert_eq!(preset.batch_indices(t), graph_run.batch_indices(t));
            let oa = preset.step(&a, t, StepMode::Commit { paper: false }, None).unwrap();
            let ob = graph_run.step(&b, t, StepMode::Commit { paper: false }, None).unwrap();
            assert_eq!(oa.loss.to_bits(), ob.loss.to_bits(), "step {t}");
            assert_eq!(
                oa.state.digest(StateHash::Blake3),
                ob.state.digest(StateHash::Blake3),
                "step {t}: the graph differs from the preset"
            );
            (a, b) = (oa.state, ob.state);
        }
    }
}

#[test]
fn the_mlp_preset_as_a_graph_trains_bit_identically() {
    same_training("[model]\nkind = \"mlp\"\nhidden = [24, 12]", mlp_graph());
}

#[test]
fn the_cnn_preset_as_a_graph_trains_bit_identically() {
    same_training("[model]\nkind = \"cnn\"\nchannels = [3, 4]", cnn_graph());
}

#[test]
fn presets_expand_to_their_graphs_with_he_initialised_relu_layers() {
    let cfg = config("[model]\nkind = \"mlp\"\nhidden = [24, 12]", SGD);
    assert_eq!(*cfg.model.graph(), presets::mlp(&[24, 12]));
    let run = Run::from_config(&cfg, None, Profile::Cpu, 1).unwrap();
    let params = run.model.params();
    let bound = |name: &str| params.iter().find(|p| p.name == name).map(|p| p.init).unwrap();
    assert_eq!(bound("fc1.weight"), Init::Uniform((6.0f64 / 64.0).sqrt()), "a hidden layer: He");
    assert_eq!(bound("fc3.weight"), Init::Uniform(1.0 / 12.0f64.sqrt()), "the classifier: 1/√fan_in");
    let state = run.initial_state().unwrap();
    let w = &state.get(&param_key("fc1.weight")).unwrap().data;
    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    assert!(max > 1.0 / 8.0 && max <= (6.0f64 / 64.0).sqrt(), "fc1 drawn from ±√(6/64): max |w| = {max}");

    // The MLP flattens image-shaped input (MNIST's [1, 28, 28]) before its first layer.
    let images = engine::data::Dataset::synthetic(64, 8, 64, 5, 3).with_input_shape(vec![1, 8, 8]).unwrap();
    let model = engine::model::Model::new(&cfg.model, &images).unwrap();
    assert_eq!(model.params()[0].shape, vec![24, 64]);
    let cnn = config("[model]\nkind = \"cnn\"\nchannels = [3, 4]", SGD);
    assert_eq!(*cnn.model.graph(), presets::cnn([3, 4]));
    let gpt = engine::spec::GptConfig { layers: 2, d_model: 16, heads: 2, context: 8, dropout: 0.1 };
    let g = presets::gpt(&gpt);
    assert_eq!(g.context, Some(8));
    assert!(g.nodes.iter().any(|n| n.name == "blk1.mlp.drop"), "residual dropout after each MLP");
    assert_eq!(engine::spec::ModelConfig::Gpt(gpt).graph().into_owned(), g);

    // The initialisation is a node attribute any graph may set (the presets set "he"); the
    // default is not written into the canonical form, so graphs that leave it out hash as before.
    let node = |extra: &str| {
        format!(
            "[model]\nkind = \"graph\"\n[[model.nodes]]\nname = \"fc\"\nop = \"linear\"\ninputs = [\"x\"]\nout = 5\n{extra}\n[[model.nodes]]\nname = \"loss\"\nop = \"cross_entropy\"\ninputs = [\"fc\", \"labels\"]"
        )
    };
    let he = config(&node("init = \"he\""), SGD);
    let run = Run::from_config(&he, None, Profile::Cpu, 1).unwrap();
    assert_eq!(run.model.params()[0].init, Init::Uniform((6.0f64 / 64.0).sqrt()));
    let plain = config(&node(""), SGD);
    assert!(!serde_json::to_string(&plain.model).unwrap().contains("init"), "the default is not serialised");
    assert!(serde_json::to_string(&he.model).unwrap().contains("\"init\":\"he\""));
    let text = format!(
        "{}\n[data]\nkind = \"synthetic\"\nexamples = 160\nholdout = 16\nfeatures = 64\nclasses = 5\n[train]\nbatch_size = 8\nsteps = 5\nseed = 21\ncheckpoint_interval = 5\n{SGD}",
        node("init = \"xavier\"")
    );
    assert!(Config::from_toml(&text, "t").unwrap_err().to_string().contains("xavier"));
}
