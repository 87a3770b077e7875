//! An invalid graph is an error naming the node and the field, from the TOML path and from a
//! committed spec (where it is the trainer's fault), and never a panic.

use engine::graph::{GraphBuilder, GraphConfig, Node, Op, Width};
use engine::spec::{Config, RunSpec, SpecInvalid};
use engine::train::Run;
use kernels::Profile;

const REST: &str = r#"
[data]
kind = "synthetic"
examples = 64
holdout = 8
features = 6
classes = 3
[train]
batch_size = 4
steps = 2
seed = 1
checkpoint_interval = 1
[optimizer]
kind = "sgd"
lr = 0.1
"#;

fn good() -> GraphConfig {
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 5);
    let h = g.relu("act", &h);
    let logits = g.linear("head", &h, 3);
    g.cross_entropy("loss", &logits);
    g.build()
}

fn base() -> Config {
    let mut c = Config::from_toml(&format!("[model]\nkind = \"mlp\"\nhidden = [4]\n{REST}"), "t").unwrap();
    c.model = good().into();
    c
}

fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
    Node { name: name.into(), op, inputs: inputs.iter().map(|s| s.to_string()).collect() }
}

/// Validates `graph` and returns the error, which must name `field` and mention `words`.
fn refused(graph: GraphConfig, field: &str, words: &str) -> SpecInvalid {
    let mut c = base();
    c.model = graph.into();
    let e = c.validate().expect_err(&format!("accepted a graph that should fail at {field}"));
    assert_eq!(e.field, field, "{e}");
    assert!(e.what.contains(words), "{e} does not say {words:?}");
    e
}

fn edit(f: impl FnOnce(&mut Vec<Node>)) -> GraphConfig {
    let mut g = good();
    f(&mut g.nodes);
    g
}

#[test]
fn the_good_graph_is_accepted() {
    base().validate().unwrap();
}

#[test]
fn each_mistake_names_its_node_and_field() {
    refused(edit(|n| n[2].inputs[0] = "nope".into()), "model.nodes[2].inputs[0]", "unknown input \"nope\"");
    refused(edit(|n| n[1].inputs[0] = "head".into()), "model.nodes[1].inputs[0]", "before it is defined");
    // A cycle: act reads head, head reads act.
    refused(
        edit(|n| {
            n[1].inputs[0] = "head".into();
            n[2].inputs[0] = "act".into();
        }),
        "model.nodes[1].inputs[0]",
        "cycle",
    );
    refused(
        edit(|n| n[1].name = "fc1".into()),
        "model.nodes[1].name",
        "already the name of a node (from model.nodes[0])",
    );
    refused(edit(|n| n[1].name = "x".into()), "model.nodes[1].name", "reserved");
    refused(edit(|n| n[1].name = "a/b".into()), "model.nodes[1].name", "characters");
    refused(edit(|n| n[1].name = "a".repeat(49)), "model.nodes[1].name", "1..=48");
    refused(
        edit(|n| n[2].op = Op::Linear { out: Width::Fixed(4), bias: true, init: Default::default() }),
        "model.nodes[3].inputs",
        "3 classes",
    );
    refused(edit(|n| n[1] = node("act", Op::Add {}, &["fc1", "x"])), "model.nodes[1].inputs", "[5] and [6] differ");
    refused(edit(|n| n[1] = node("act", Op::Add {}, &["fc1"])), "model.nodes[1].inputs", "takes 2 inputs, not 1");
    refused(
        edit(|n| n[0].op = Op::Linear { out: Width::Fixed(0), bias: true, init: Default::default() }),
        "model.nodes[0].out",
        "at least 1",
    );
    refused(
        edit(|n| n[1] = node("act", Op::Reshape { shape: vec![2, 3] }, &["fc1"])),
        "model.nodes[1].shape",
        "does not hold the 5 values",
    );
    refused(
        edit(|n| n[1].inputs[0] = "labels".into()),
        "model.nodes[1].inputs[0]",
        "only be the second input of a loss",
    );
    refused(edit(|n| n[3].inputs[1] = "fc1".into()), "model.nodes[3].inputs", "must be labels");
    refused(edit(|n| n[3].inputs[0] = "labels".into()), "model.nodes[3].inputs[0]", "second input of a loss");
}

#[test]
fn structure_mistakes_are_refused() {
    refused(edit(|n| n.truncate(3)), "model.nodes[2].op", "must be a loss");
    refused(edit(|n| n.clear()), "model.nodes", "no nodes");
    // A second loss, before the last node.
    refused(
        edit(|n| n.insert(3, node("early", Op::Mse {}, &["head", "labels"]))),
        "model.nodes[3].op",
        "the loss must be the last node",
    );
    // A node nothing reads (and so an unused parameter).
    refused(
        edit(|n| {
            n.insert(1, node("dead", Op::Linear { out: Width::Fixed(2), bias: true, init: Default::default() }, &["x"]))
        }),
        "model.nodes[1].name",
        "\"dead\" is never used",
    );
    // No parameters at all.
    refused(
        GraphConfig { context: None, nodes: vec![node("loss", Op::Mse {}, &["x", "x"])] },
        "model.nodes",
        "no parameters to train",
    );
    let mut g = GraphBuilder::new();
    let x = g.input();
    let p = g.reshape("p", &x, &[3, 2]);
    let p = g.flatten("f", &p);
    let p = g.sigmoid("s", &p);
    let q = g.reshape("q", &p, &[6]);
    g.mse("loss", &p, &q);
    refused(g.build(), "model.nodes", "no parameters to train");
    let mut g = GraphBuilder::new();
    let _ = g.input();
    let w = g.node("w", Op::Linear { out: Width::Fixed(3), bias: true, init: Default::default() }, &["labels"]);
    g.cross_entropy("loss", &w);
    refused(g.build(), "model.nodes[0].inputs[0]", "only be the second input of a loss");
}

#[test]
fn sizes_beyond_the_limits_are_refused_before_anything_is_allocated() {
    refused(
        edit(|n| n[0].op = Op::Linear { out: Width::Fixed(1 << 40), bias: true, init: Default::default() }),
        "model.nodes[0].op",
        "exceeds",
    );
    refused(
        edit(|n| n[0].op = Op::Linear { out: Width::Fixed(usize::MAX), bias: true, init: Default::default() }),
        "model.nodes[0].op",
        "exceeds",
    );
    let mut g = good();
    g.nodes.splice(1..1, (0..engine::graph::NODES_MAX).map(|i| node(&format!("r{i}"), Op::Relu {}, &["fc1"])));
    refused(g, "model.nodes", "more than 4096");
    // The batch × every kept tensor is checked against the activation limit.
    let mut c = base();
    c.train.batch_size = 1 << 29;
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "train.batch_size", "{e}");
}

#[test]
fn the_toml_form_refuses_unknown_ops_and_attributes() {
    let toml = |nodes: &str| Config::from_toml(&format!("[model]\nkind = \"graph\"\n{nodes}\n{REST}"), "my.toml");
    let fc = "[[model.nodes]]\nname = \"fc1\"\nop = \"linear\"\ninputs = [\"x\"]\nout = 3\n";
    let ce = "[[model.nodes]]\nname = \"loss\"\nop = \"cross_entropy\"\ninputs = [\"fc1\", \"labels\"]\n";
    toml(&format!("{fc}{ce}")).unwrap();
    for (bad, words) in [
        (fc.replace("linear", "lineer"), "lineer"),
        (fc.replace("out = 3", "outt = 3"), "outt"),
        (fc.replace("out = 3", ""), "out"),
        (fc.replace("out = 3", "out = -3"), "my.toml"),
        (format!("{fc}[[model.nodes]]\nname = \"r\"\nop = \"relu\"\ninputs = [\"fc1\"]\nout = 3\n"), "out"),
        (fc.replace("op = \"linear\"\n", ""), "op"),
    ] {
        let e = toml(&format!("{bad}{ce}")).expect_err(&bad).to_string();
        assert!(e.contains(words) && e.contains("my.toml"), "{e} does not say {words:?}");
    }
    // Validation errors on the TOML path name the field too.
    let e = toml(&format!("{fc}{}", ce.replace("fc1\", \"labels", "fc2\", \"labels"))).unwrap_err().to_string();
    assert!(e.contains("model.nodes[1].inputs[0]") && e.contains("fc2"), "{e}");
}

#[test]
fn a_committed_spec_with_an_invalid_graph_is_refused_naming_the_field() {
    let run = Run::from_config(&base(), None, Profile::Cpu, 2).unwrap();
    let json = String::from_utf8(run.spec.canonical_json()).unwrap();
    RunSpec::from_committed_json(json.as_bytes()).unwrap();
    let bad = json.replace(r#""inputs":["act"]"#, r#""inputs":["ghost"]"#);
    assert_ne!(bad, json);
    let e = RunSpec::from_committed_json(bad.as_bytes()).unwrap_err();
    assert_eq!(e.field, "config.model.nodes[2].inputs[0]", "{e}");
    let bad = json.replace(r#""op":"relu""#, r#""op":"softplus""#);
    let e = RunSpec::from_committed_json(bad.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("softplus"), "{e}");
    // Run::new, which both sides call, refuses it as an invalid spec, not a panic.
    let mut spec = run.spec.clone();
    spec.config.model = edit(|n| n[2].inputs[0] = "ghost".into()).into();
    let e = Run::new(spec, run.data.clone(), run.device.clone()).unwrap_err();
    assert!(matches!(e, engine::EngineError::InvalidSpec(_)), "{e}");
}

#[test]
fn windowed_and_normalising_ops_check_their_attributes() {
    let image = |op: Op| {
        let mut g = GraphBuilder::new();
        let x = g.input();
        g.reshape("img", &x, &[1, 2, 3]);
        g.node("op", op, &["img"]);
        g.flatten("f", &engine::graph::Tensor::from_name("op"));
        let f = engine::graph::Tensor::from_name("f");
        let h = g.linear("head", &f, 3);
        g.cross_entropy("loss", &h);
        g.build()
    };
    let conv = |k, s, p| Op::Conv2d {
        out_channels: 2,
        kernel: k,
        stride: s,
        padding: p,
        bias: true,
        init: Default::default(),
    };
    // The good case first, so each refusal below is the attribute's fault.
    let mut c = base();
    c.model = image(conv(2, 1, 0)).into();
    c.validate().unwrap();
    refused(image(conv(3, 1, 0)), "model.nodes[1].kernel", "larger than the padded input 2");
    refused(image(conv(0, 1, 0)), "model.nodes[1].kernel", "at least 1");
    refused(image(conv(2, 0, 0)), "model.nodes[1].stride", "at least 1");
    refused(
        image(Op::Conv2d { out_channels: 0, kernel: 1, stride: 1, padding: 0, bias: true, init: Default::default() }),
        "model.nodes[1].out_channels",
        "at least 1",
    );
    refused(image(Op::MaxPool2d { kernel: 2, stride: 1, padding: 2 }), "model.nodes[1].padding", "below the window");
    refused(image(Op::AvgPool2d { kernel: 0, stride: 1, padding: 0 }), "model.nodes[1].kernel", "at least 1");
    refused(image(Op::LayerNorm { eps: 0.0 }), "model.nodes[1].eps", "> 0");
    refused(image(Op::LayerNorm { eps: f64::NAN }), "model.nodes[1].eps", "> 0");
    refused(image(Op::Dropout { p: 1.0 }), "model.nodes[1].p", "[0, 1)");
    refused(image(Op::Softmax { causal: true }), "model.nodes[1].causal", "square");
    // A convolution needs an image.
    refused(
        edit(|n| n[1] = node("act", conv(1, 1, 0), &["fc1"])),
        "model.nodes[1].inputs",
        "[channels, height, width]",
    );
    refused(
        edit(|n| n[1] = node("act", Op::GlobalAvgPool {}, &["fc1"])),
        "model.nodes[1].inputs",
        "[channels, height, width]",
    );
    // A convolution's unfolded input counts against the limits.
    refused(image(conv(1, 1, 1 << 20)), "model.nodes[1].op", "exceed");
}

#[test]
fn matmul_and_transpose_check_their_shapes() {
    let pair = |op: Op, shape_b: &[usize]| {
        let mut g = GraphBuilder::new();
        let x = g.input();
        let a = g.reshape("a", &x, &[2, 3]);
        let b = g.linear("b", &a, 3);
        let b = g.reshape("bs", &b, shape_b);
        g.node("mm", op, &[a.name(), b.name()]);
        let f = g.flatten("f", &engine::graph::Tensor::from_name("mm"));
        let h = g.linear("head", &f, 3);
        g.cross_entropy("loss", &h);
        g.build()
    };
    let mm = |transpose_b, scale| Op::Matmul { transpose_b, scale };
    let mut c = base();
    c.model = pair(mm(false, 1.0), &[3, 2]).into();
    c.validate().unwrap();
    c.model = pair(mm(true, 0.5), &[2, 3]).into();
    c.validate().unwrap();
    refused(pair(mm(false, 1.0), &[2, 3]), "model.nodes[3].inputs", "cannot multiply [2, 3] by [2, 3]");
    refused(pair(mm(true, f64::NAN), &[2, 3]), "model.nodes[3].scale", "finite");
    refused(pair(mm(false, 1.0), &[6]), "model.nodes[3].inputs", "at least two axes");
    refused(pair(mm(false, 1.0), &[1, 3, 2]), "model.nodes[3].inputs", "cannot multiply");
    refused(edit(|n| n[1] = node("act", Op::Transpose {}, &["fc1"])), "model.nodes[1].inputs", "at least two axes");
}
