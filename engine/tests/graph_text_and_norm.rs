//! Graphs on text and with batch normalisation: the shipped TOML configs are the presets'
//! graphs, a transformer with multi-head attention and dropout and a residual CNN with batch
//! norm replay bit-identically on every CPU profile, and text-specific mistakes name their
//! node and field.

use common::state::StateHash;
use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::graph::{GraphConfig, Node, Op, presets};
use engine::spec::{Config, DataConfig, ModelConfig, RunSpec, TextConfig};
use engine::train::{Run, StepMode};
use kernels::Profile;

const TRAIN: &str = r#"
[model]
kind = "mlp"
hidden = [4]
[data]
kind = "synthetic"
examples = 256
holdout = 32
features = 64
classes = 4
[train]
batch_size = 4
steps = 4
seed = 9
checkpoint_interval = 2
[optimizer]
kind = "adamw"
lr = 0.01
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
weight_decay = 0.01
"#;

fn configs_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn shipped(name: &str) -> Config {
    let path = configs_dir().join(name);
    Config::from_toml(&std::fs::read_to_string(&path).unwrap(), name).unwrap()
}

/// A text file for `--data` (a few sentences, repeated).
fn text_file(tag: &str) -> std::path::PathBuf {
    let text = "to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. ".repeat(5);
    let path = std::env::temp_dir().join(format!("tiebreak-graph-text-{tag}-{}.txt", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn text_config(graph: GraphConfig) -> Config {
    let mut cfg = Config::from_toml(TRAIN, "t").unwrap();
    cfg.model = graph.into();
    cfg.data = DataConfig::Text(TextConfig { holdout_fraction: 0.1 });
    cfg.validate().unwrap();
    cfg
}

/// The residual CNN preset on the synthetic task's 64 features read as an 8×8 image.
fn image_resnet() -> GraphConfig {
    let mut g = presets::resnet(&[4, 6], 1, 1);
    g.nodes[0].inputs = vec!["img".into()];
    g.nodes.insert(0, Node { name: "img".into(), inputs: vec!["x".into()], op: Op::Reshape { shape: vec![1, 8, 8] } });
    g
}

type Steps = Vec<(TrainingState, TieBreakLog)>;

fn train(r: &Run, steps: u64) -> Steps {
    let mut state = r.initial_state().unwrap();
    (1..=steps)
        .map(|t| {
            let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
            state = o.state.clone();
            (o.state, o.log)
        })
        .collect()
}

/// Trains on each CPU profile and replays on each, asserting bit-identical states; returns the
/// sites the first replayed step rounded.
fn replays_everywhere(cfg: &Config, data: Option<&std::path::Path>, what: &str) -> Vec<String> {
    let mut sites = Vec::new();
    for trainer in Profile::CPU {
        let steps = train(&Run::from_config(cfg, data, trainer, 2).unwrap(), 4);
        for auditor in Profile::CPU {
            let r = Run::from_config(cfg, data, auditor, 2).unwrap();
            let mut state = r.initial_state().unwrap();
            for (t, (expected, log)) in steps.iter().enumerate() {
                let o = r.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
                assert!(o.forged.is_empty(), "{what} {trainer}→{auditor}: {:?}", o.forged);
                assert_eq!(
                    o.state.digest(StateHash::Blake3),
                    expected.digest(StateHash::Blake3),
                    "{what} {trainer}→{auditor}: step {} diverged",
                    t + 1
                );
                if sites.is_empty() {
                    sites = o.rounded.keys().cloned().collect();
                }
                state = o.state;
            }
        }
    }
    sites
}

#[test]
fn the_shipped_graph_configs_are_the_presets_graphs() {
    let gpt = shipped("shakespeare-graph.toml");
    assert_eq!(gpt.model, ModelConfig::Graph(presets::transformer(64, 128, 4, 4, 0.0)));
    let resnet = shipped("mnist-resnet.toml");
    assert_eq!(resnet.model, ModelConfig::Graph(presets::resnet(&[16, 32], 1, 2)));
    // The same canonical form, so the same spec digest, whichever way the graph was written.
    let mut built = resnet.clone();
    built.model = presets::resnet(&[16, 32], 1, 2).into();
    let commitment = engine::spec::DatasetCommitment {
        kind: engine::spec::DataKind::Mnist,
        leaves: 10_000,
        n_train: 9000,
        n_holdout: 1000,
        root: "00".repeat(32),
    };
    let spec = |c: Config| RunSpec::new(c, commitment.clone(), "cpu", 562).digest();
    assert_eq!(spec(resnet), spec(built));
}

#[test]
fn a_transformer_with_multi_head_attention_and_dropout_replays_on_every_profile() {
    let cfg = text_config(presets::transformer(8, 16, 4, 2, 0.1));
    let path = text_file("replay");
    let sites = replays_everywhere(&cfg, Some(&path), "transformer");
    // The attention composite's parts round at sites named after the node.
    for site in [
        "fwd/blk0.attn.scores/out",
        "fwd/blk1.attn.probs/out",
        "bwd/blk0.attn.qkv/grad_blk0.ln1",
        "grad/tok_emb.weight",
    ] {
        assert!(sites.iter().any(|s| s == site), "no site {site} in {sites:?}");
    }
    // Dropout on the attention weights: a mask per step.
    assert!(sites.iter().any(|s| s == "fwd/blk0.attn.drop/out"), "{sites:?}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_residual_cnn_with_batch_norm_replays_on_every_profile_and_learns() {
    let cfg = {
        let mut c = Config::from_toml(TRAIN, "t").unwrap();
        c.model = image_resnet().into();
        c.train.batch_size = 8;
        c
    };
    let sites = replays_everywhere(&cfg, None, "resnet");
    for site in ["fwd/stem.bn/mean", "fwd/stem.bn/rstd", "fwd/s1.b0.skip.bn/out", "grad/s1.b0.bn2.weight"] {
        assert!(sites.iter().any(|s| s == site), "no site {site} in {sites:?}");
    }
    // It learns: 40 steps lower the held-out loss.
    let mut c = cfg.clone();
    c.train.steps = Some(40);
    let r = Run::from_config(&c, None, Profile::Cpu, 2).unwrap();
    let before = r.evaluate(&r.initial_state().unwrap(), 32).unwrap().loss.unwrap();
    let after = r.evaluate(&train(&r, 40).pop().unwrap().0, 32).unwrap().loss.unwrap();
    assert!(after < 0.8 * before, "held-out loss {before} → {after}");
}

#[test]
fn text_graph_mistakes_name_their_node_and_field() {
    let refused = |graph: GraphConfig, field: &str, says: &str| {
        let mut cfg = Config::from_toml(TRAIN, "t").unwrap();
        cfg.model = graph.into();
        cfg.data = DataConfig::Text(TextConfig { holdout_fraction: 0.1 });
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(says), "{e} does not say {says:?}");
    };
    let gpt = presets::transformer(8, 16, 4, 1, 0.0);
    let mut no_context = gpt.clone();
    no_context.context = None;
    refused(no_context, "model.context", "needs a context");
    // x holds token ids: only an embedding reads it.
    let mut linear_on_ids = gpt.clone();
    linear_on_ids.nodes[0].op = Op::Linear { out: 16.into(), bias: true, init: Default::default() };
    refused(linear_on_ids, "model.nodes[0].inputs[0]", "only an embedding reads");
    // Heads must divide the width; the composite's node is named.
    let mut bad_heads = gpt.clone();
    bad_heads.nodes[3].op = Op::Attention { heads: 3, causal: true, dropout: 0.0 };
    refused(bad_heads, "model.nodes[3].heads", "3 heads do not divide d = 16");
    // An embedding on classification data is refused, and a context there too.
    let mut cfg = Config::from_toml(TRAIN, "t").unwrap();
    cfg.model = gpt.clone().into();
    let e = cfg.validate().unwrap_err();
    assert_eq!(e.field, "model.context", "{e}");
    // A part's name that clashes with a later node.
    let mut clash = gpt;
    clash.nodes[5].name = "blk0.attn.qkv".into();
    refused(clash, "model.nodes[5].name", "already the name of a node (from model.nodes[3])");
}
