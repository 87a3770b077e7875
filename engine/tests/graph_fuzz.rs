//! Random graphs, most of them wrong: validation never panics, and a graph that validates
//! builds a run whose step succeeds (or overflows, which is a verdict about values, not a
//! malformed spec) — so the shape rules cover everything the kernels would refuse.

use common::state::StateHash;
use engine::graph::{GraphConfig, Node, Op, Width};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;
use proptest::prelude::*;

const REST: &str = r#"
[model]
kind = "mlp"
hidden = [2]
[data]
kind = "synthetic"
examples = 40
holdout = 4
features = 36
classes = 3
[train]
batch_size = 3
steps = 1
seed = 9
checkpoint_interval = 1
[optimizer]
kind = "sgd"
lr = 0.1
"#;

fn op() -> impl Strategy<Value = Op> {
    let small = 0usize..4;
    prop_oneof![
        (0usize..7, any::<bool>()).prop_map(|(out, bias)| Op::Linear {
            out: Width::Fixed(out),
            bias,
            init: Default::default()
        }),
        (0usize..4, small.clone(), small.clone(), small.clone(), any::<bool>()).prop_map(|(o, k, s, p, bias)| {
            Op::Conv2d { out_channels: o, kernel: k, stride: s, padding: p, bias, init: Default::default() }
        }),
        (small.clone(), small.clone(), small.clone()).prop_map(|(k, s, p)| Op::MaxPool2d {
            kernel: k,
            stride: s,
            padding: p
        }),
        (small.clone(), small.clone(), small.clone()).prop_map(|(k, s, p)| Op::AvgPool2d {
            kernel: k,
            stride: s,
            padding: p
        }),
        Just(Op::GlobalAvgPool {}),
        prop::sample::select(vec![1e-5, 0.0, -1.0, f64::NAN, f64::INFINITY]).prop_map(|eps| Op::LayerNorm { eps }),
        prop::sample::select(vec![0.0, 0.3, 0.99, 1.0, -0.1, f64::NAN]).prop_map(|p| Op::Dropout { p }),
        any::<bool>().prop_map(|causal| Op::Softmax { causal }),
        Just(Op::Relu {}),
        Just(Op::Gelu {}),
        Just(Op::Tanh {}),
        Just(Op::Sigmoid {}),
        Just(Op::Add {}),
        Just(Op::Mul {}),
        prop::collection::vec(0usize..7, 0..4).prop_map(|shape| Op::Reshape { shape }),
        Just(Op::Flatten {}),
        Just(Op::Transpose {}),
        Just(Op::LogSoftmax {}),
        (any::<bool>(), prop::sample::select(vec![1.0, 0.5, f64::NAN]))
            .prop_map(|(transpose_b, scale)| Op::Matmul { transpose_b, scale }),
        Just(Op::CrossEntropy {}),
        Just(Op::Mse {}),
        prop::collection::vec(0usize..5, 0..5).prop_map(|perm| Op::Permute { perm }),
        (small.clone(), small.clone(), 0usize..8).prop_map(|(axis, start, end)| Op::Slice { axis, start, end }),
        (small.clone(), small.clone(), small.clone()).prop_map(|(axis, parts, index)| Op::Split { axis, parts, index }),
        small.clone().prop_map(|axis| Op::Concat { axis }),
        prop::sample::select(vec![1e-5, 0.0, f64::NAN]).prop_map(|eps| Op::BatchNorm { eps }),
        (0usize..5).prop_map(|dim| Op::Embedding { dim }),
        Just(Op::PositionalEmbedding {}),
        (0usize..5, any::<bool>(), prop::sample::select(vec![0.0, 0.2, 1.0]))
            .prop_map(|(heads, causal, dropout)| Op::Attention { heads, causal, dropout }),
    ]
}

/// Mostly chains (each node reads the previous one, which keeps every node used), ending in
/// most cases with a linear head and a cross-entropy loss; sometimes inputs are drawn from x,
/// labels, earlier and later nodes, and a name that does not exist, and names collide.
fn graph() -> impl Strategy<Value = GraphConfig> {
    let picks = prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(0usize..12, 0..3)];
    let body = prop::collection::vec((op(), picks, 0usize..30), 1..8);
    (body, 0usize..4).prop_map(|(spec, ending)| {
        let n = spec.len();
        let mut nodes: Vec<Node> = spec
            .into_iter()
            .enumerate()
            .map(|(i, (op, picks, name_pick))| {
                let prev = if i == 0 { "x".to_string() } else { format!("n{}", i - 1) };
                let input = |p: usize| match p {
                    0 | 1 => "x".to_string(),
                    2 => "labels".to_string(),
                    3 => "ghost".to_string(),
                    p => format!("n{}", (i + p) % (n + 1)),
                };
                let inputs: Vec<String> = if picks.is_empty() {
                    match op {
                        Op::Add {} | Op::Mul {} | Op::Matmul { .. } | Op::Concat { .. } => vec![prev.clone(), prev],
                        Op::CrossEntropy {} | Op::Mse {} => vec![prev, "labels".into()],
                        _ => vec![prev],
                    }
                } else {
                    picks.into_iter().map(input).collect()
                };
                let name = if name_pick == 0 { "n0".to_string() } else { format!("n{i}") };
                Node { name, inputs, op }
            })
            .collect();
        if ending > 0 {
            let last = format!("n{}", n - 1);
            nodes.push(Node {
                name: "head".into(),
                inputs: vec![last],
                op: Op::Linear { out: Width::Fixed(3), bias: true, init: Default::default() },
            });
            nodes.push(Node {
                name: "loss".into(),
                inputs: vec!["head".into(), "labels".into()],
                op: Op::CrossEntropy {},
            });
        }
        GraphConfig { context: None, nodes }
    })
}

/// A text file for the text-data variant (every graph is also tried with `context = 4`).
fn text_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tiebreak-graph-fuzz-{}.txt", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, "abcab cabba. ".repeat(8)).unwrap();
    }
    path
}

/// The config of graph `g` on [`REST`]'s synthetic data, or with `text` on a text file
/// (`context = 4`), and the data path the run needs.
fn config_for(mut g: GraphConfig, text: bool) -> (Config, Option<std::path::PathBuf>) {
    let mut cfg = Config::from_toml(REST, "t").unwrap();
    let data = if text {
        g.context = Some(4);
        cfg.data = engine::spec::DataConfig::Text(engine::spec::TextConfig { holdout_fraction: 0.1 });
        Some(text_file())
    } else {
        None
    };
    cfg.model = g.into();
    (cfg, data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn validation_never_panics_and_a_valid_graph_steps(g in graph(), text in any::<bool>()) {
        let (cfg, data) = config_for(g, text);
        if cfg.validate().is_ok() {
            let run = Run::from_config(&cfg, data.as_deref(), Profile::Cpu, 1).expect("a valid graph builds a run");
            let state = run.initial_state().unwrap();
            match run.step(&state, 1, StepMode::Commit { paper: false }, None) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.is_overflow(), "a valid graph failed to step: {e}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, max_global_rejects: 1_000_000, ..ProptestConfig::default() })]
    /// The honest-run property on random valid graphs, batch sizes from 1 and every ordered
    /// pair of CPU profiles: three steps committed on one replay bit for bit on the other, with
    /// no honest entry called forged. Plain SGD (no momentum, no weight decay) keeps a gradient's
    /// zero sign visible in the state (a batch of one once exposed the `gemm` profiles' `−0`).
    #[test]
    fn a_valid_graph_replays_on_every_other_profile(
        g in graph(),
        text in any::<bool>(),
        batch in 1usize..5,
        pair in (0usize..4, 1usize..4),
    ) {
        let (mut cfg, data) = config_for(g, text);
        cfg.train.batch_size = batch;
        prop_assume!(cfg.validate().is_ok());
        let (trainer, auditor) = (Profile::CPU[pair.0], Profile::CPU[(pair.0 + pair.1) % 4]);
        let on = |p| Run::from_config(&cfg, data.as_deref(), p, 3).expect("a valid graph builds a run");
        let (t, a) = (on(trainer), on(auditor));
        let (mut st, mut sa) = (t.initial_state().unwrap(), a.initial_state().unwrap());
        prop_assert_eq!(st.digest(StateHash::Blake3), sa.digest(StateHash::Blake3));
        for step in 1..=3 {
            let o = match t.step(&st, step, StepMode::Commit { paper: false }, None) {
                Ok(o) => o,
                Err(e) => {
                    prop_assert!(e.is_overflow(), "a valid graph failed to step: {}", e);
                    return Ok(());
                }
            };
            let r = a.step(&sa, step, StepMode::Replay(&o.log), None).expect("the replay of an honest step");
            prop_assert!(r.forged.is_empty(), "{} → {}: step {}: honest entries called forged", trainer, auditor, step);
            prop_assert_eq!(r.state.digest(StateHash::Blake3), o.state.digest(StateHash::Blake3), "{} → {}: step {} diverged", trainer, auditor, step);
            (st, sa) = (o.state, r.state);
        }
    }
}

/// The generator is not vacuous: a fair share of its graphs validate and step.
#[test]
fn some_random_graphs_are_valid() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = graph();
    let valid = (0..2000)
        .filter(|_| {
            let mut cfg = Config::from_toml(REST, "t").unwrap();
            cfg.model = strategy.new_tree(&mut runner).unwrap().current().into();
            cfg.validate().is_ok()
        })
        .count();
    eprintln!("{valid} of 2000 random graphs are valid");
    assert!(valid >= 100, "only {valid} of 2000 random graphs are valid");
}
