//! A hostile trainer's spec and states: nothing it commits may panic the engine, and each
//! malformation is a typed error naming what is wrong (`InvalidSpec`, `InvalidState`,
//! `DatasetMismatch`), distinct from a value overflowing while stepping (`is_overflow`).

use common::state::{Tensor, TrainingState};
use engine::EngineError;
use engine::data::Dataset;
use engine::spec::{Config, RunSpec};
use engine::train::{Run, StepMode};
use kernels::{Device, Profile};
use serde_json::{Value, json};

const SYNTHETIC: &str = r#"
[model]
kind = "mlp"
hidden = [8]
[data]
kind = "synthetic"
examples = 96
holdout = 16
features = 6
classes = 3
[train]
batch_size = 8
steps = 4
seed = 3
checkpoint_interval = 2
[optimizer]
kind = "adamw"
lr = 0.01
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
"#;

fn run() -> Run {
    let cfg = Config::from_toml(SYNTHETIC, "test").unwrap();
    Run::from_config(&cfg, None, Profile::Cpu, 4).unwrap()
}

fn gpt_spec_json(text: &[u8]) -> (Value, Dataset) {
    let data = Dataset::text(text.to_vec(), 8, 0.1).unwrap();
    let mut cfg = Config::from_toml(SYNTHETIC, "test").unwrap();
    cfg.model =
        serde_json::from_value(json!({"kind": "gpt", "layers": 1, "d_model": 8, "heads": 2, "context": 8})).unwrap();
    cfg.data = serde_json::from_value(json!({"kind": "text", "holdout_fraction": 0.1})).unwrap();
    let spec = RunSpec::new(cfg, data.commitment(), "cpu", 4);
    (serde_json::to_value(&spec).unwrap(), data)
}

/// Builds a run from hand-edited spec JSON (as a trainer could sign it), with the data the
/// unedited spec was made from.
fn run_from(spec: &Value, data: Dataset) -> Result<Run, EngineError> {
    let spec: RunSpec = serde_json::from_value(spec.clone()).unwrap();
    Run::new(spec, data, Device::new(Profile::Cpu).unwrap())
}

#[test]
fn invalid_specs_are_errors_never_panics() {
    let good = run();
    let spec = serde_json::to_value(&good.spec).unwrap();
    let gpt = gpt_spec_json(&b"a midsummer night's dream, act one. ".repeat(40));
    let cases: [(&Value, &Dataset, &str, Value, &str); 8] = [
        (&spec, &good.data, "/config/train/batch_size", json!(0), "config.train.batch_size"),
        (&spec, &good.data, "/config/train/checkpoint_interval", json!(0), "config.train.checkpoint_interval"),
        (&spec, &good.data, "/config/data/classes", json!(0), "config.data.classes"),
        (&spec, &good.data, "/config/optimizer/beta1", json!(1.0), "config.optimizer.beta1"),
        (&spec, &good.data, "/config/optimizer/beta2", json!(1.0), "config.optimizer.beta2"),
        (&gpt.0, &gpt.1, "/config/model/heads", json!(0), "config.model.heads"),
        (&gpt.0, &gpt.1, "/config/model/dropout", json!(1.0), "config.model.dropout"),
        (&gpt.0, &gpt.1, "/config/model/d_model", json!(7), "config.model.heads"),
    ];
    run_from(&gpt.0, gpt.1.clone()).expect("the unedited GPT spec is valid");
    for (spec, data, at, value, field) in cases {
        let mut bad = spec.clone();
        *bad.pointer_mut(at).unwrap() = value.clone();
        match run_from(&bad, data.clone()) {
            Err(EngineError::InvalidSpec(e)) => assert_eq!(e.field, field, "{at} = {value}: {e}"),
            other => panic!("{at} = {value}: expected InvalidSpec, got {other:?}"),
        }
    }
}

#[test]
fn a_synthetic_commitment_the_config_does_not_produce_is_an_invalid_spec() {
    let good = run();
    let mut spec = good.spec.clone();
    spec.dataset.root = "11".repeat(32);
    match Run::new(spec, good.data.clone(), Device::new(Profile::Cpu).unwrap()) {
        Err(EngineError::InvalidSpec(e)) => assert_eq!(e.field, "dataset.root"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[test]
fn data_that_is_not_the_committed_data_is_a_dataset_mismatch() {
    // A text spec is valid on its own (its root depends on the file); another text of the same
    // length is not the committed data.
    let text = b"a midsummer night's dream, act one. ".repeat(40);
    let (spec, _) = gpt_spec_json(&text);
    let other = Dataset::text(text.iter().map(|b| b.to_ascii_uppercase()).collect(), 8, 0.1).unwrap();
    match run_from(&spec, other) {
        Err(EngineError::DatasetMismatch { spec, data }) => {
            assert_eq!((spec.leaves, spec.n_train), (data.leaves, data.n_train));
            assert_ne!(spec.root, data.root);
        }
        other => panic!("expected DatasetMismatch, got {other:?}"),
    }
}

/// `state` with one change applied.
fn with(state: &TrainingState, change: impl FnOnce(&mut Vec<(String, Tensor)>)) -> TrainingState {
    let mut tensors: Vec<(String, Tensor)> = state.tensors().map(|(n, t)| (n.to_string(), t.clone())).collect();
    change(&mut tensors);
    let mut out = TrainingState::new(state.step);
    for (name, t) in tensors {
        // `insert` refuses non-finite values, so a NaN is planted after the fact.
        let nan = t.data.iter().any(|x| x.is_nan());
        let mut clean = t.clone();
        clean.data.iter_mut().for_each(|x| *x = if x.is_nan() { 0.0 } else { *x });
        out.insert(&name, clean).unwrap();
        if nan {
            *out.get_mut(&name).unwrap() = t;
        }
    }
    out
}

#[test]
fn malformed_states_are_refused_naming_the_tensor() {
    let r = run();
    let s0 = r.initial_state().unwrap();
    r.check_state(&s0).unwrap();
    let w = "param/fc1.weight";
    let cases: Vec<(&str, TrainingState, &str, &str)> = vec![
        ("missing", with(&s0, |t| t.retain(|(n, _)| n != w)), w, "missing"),
        (
            "renamed",
            with(&s0, |t| t.iter_mut().filter(|(n, _)| n == w).for_each(|(n, _)| *n = "param/fc1.weigth".into())),
            // Name order: the missing `weight` sorts before the stray `weigth`.
            w,
            "missing (the parameter fc1.weight)",
        ),
        ("extra", with(&s0, |t| t.push(("param/zzz".into(), Tensor::zeros(vec![1])))), "param/zzz", "not a parameter"),
        (
            "missing slot",
            with(&s0, |t| t.retain(|(n, _)| n != "opt/fc2.bias/v")),
            "opt/fc2.bias/v",
            "missing (the optimizer slot v of fc2.bias)",
        ),
        (
            "short",
            with(&s0, |t| {
                let (_, x) = t.iter_mut().find(|(n, _)| n == w).unwrap();
                *x = Tensor::zeros(vec![8, 5]);
            }),
            w,
            "shape",
        ),
        (
            "long",
            with(&s0, |t| {
                let (_, x) = t.iter_mut().find(|(n, _)| n == w).unwrap();
                *x = Tensor::zeros(vec![8, 7]);
            }),
            w,
            "shape",
        ),
        (
            "length disagrees with shape",
            with(&s0, |t| t.iter_mut().filter(|(n, _)| n == w).for_each(|(_, x)| x.data.push(0.0))),
            w,
            "values",
        ),
        (
            "NaN",
            with(&s0, |t| t.iter_mut().filter(|(n, _)| n == "opt/fc1.bias/m").for_each(|(_, x)| x.data[3] = f32::NAN)),
            "opt/fc1.bias/m",
            "element 3 is not finite",
        ),
    ];
    for (what, state, tensor, says) in cases {
        let err = r.check_state(&state).expect_err(what);
        assert_eq!(err.tensor, tensor, "{what}: {err}");
        assert!(err.to_string().contains(says), "{what}: {err}");
        assert!(err.to_string().contains(tensor), "{what}: {err}");
        // Stepping from it is the same typed error, before any kernel runs.
        match r.step(&state, 1, StepMode::Commit { paper: false }, None) {
            Err(EngineError::InvalidState(e)) => assert_eq!(e, err, "{what}"),
            other => panic!("{what}: expected InvalidState, got {other:?}"),
        }
    }
}

#[test]
fn an_overflow_while_stepping_is_not_a_malformed_state() {
    let r = run();
    let s0 = r.initial_state().unwrap();
    let huge = with(&s0, |t| {
        for (n, x) in t.iter_mut() {
            if n.starts_with("param/") {
                x.data.iter_mut().for_each(|v| *v = f32::MAX);
            }
        }
    });
    r.check_state(&huge).unwrap();
    let err = r.step(&huge, 1, StepMode::Commit { paper: false }, None).unwrap_err();
    assert!(err.is_overflow(), "{err:?}");
    assert!(!matches!(err, EngineError::InvalidState(_)));
    let malformed = r.step(&with(&s0, |t| t.pop().map(|_| ()).unwrap()), 1, StepMode::Commit { paper: false }, None);
    assert!(!malformed.unwrap_err().is_overflow());
    // A step counter at the end of u64 is refused, not overflowed.
    let mut last = s0.clone();
    last.step = u64::MAX;
    assert!(r.step(&last, 0, StepMode::Commit { paper: false }, None).is_err());
}

/// Every config that validates can be recorded and read back: a batch whose file could pass the
/// reader's limit, or a graph whose spec.json could, is refused before the run starts (an
/// honest trainer once signed such records and was then called `commitment-invalid`).
#[test]
fn a_config_whose_record_could_not_be_read_back_is_refused() {
    let batch = SYNTHETIC.replace("batch_size = 8", &format!("batch_size = {}", engine::spec::BATCH_SIZE_MAX + 1));
    let e = Config::from_toml(&batch, "big-batch.toml").unwrap_err().to_string();
    assert!(e.contains("train.batch_size") && e.contains("batch file"), "{e}");
    let at_max = SYNTHETIC.replace("batch_size = 8", &format!("batch_size = {}", engine::spec::BATCH_SIZE_MAX));
    Config::from_toml(&at_max, "max-batch.toml").unwrap();

    // 400 concat nodes of 64 inputs with 48-character names: about 1.4 MB of spec JSON.
    let name = |s: String| format!("{s:_<48}");
    let a = name("a".into());
    let mut toml = format!(
        "[model]\nkind = \"graph\"\n[[model.nodes]]\nname = \"{a}\"\nop = \"linear\"\ninputs = [\"x\"]\nout = 1\n"
    );
    let mut prev = a.clone();
    for i in 0..400 {
        let (c, s) = (name(format!("c{i}")), name(format!("s{i}")));
        let inputs: Vec<String> = std::iter::repeat_n(&a, 63).chain([&prev]).map(|n| format!("\"{n}\"")).collect();
        toml += &format!(
            "[[model.nodes]]\nname = \"{c}\"\nop = \"concat\"\ninputs = [{}]\naxis = 0\n\
             [[model.nodes]]\nname = \"{s}\"\nop = \"slice\"\ninputs = [\"{c}\"]\naxis = 0\nstart = 0\nend = 1\n",
            inputs.join(", ")
        );
        prev = s;
    }
    toml += &format!(
        "[[model.nodes]]\nname = \"head\"\nop = \"linear\"\ninputs = [\"{prev}\"]\nout = \"classes\"\n\
         [[model.nodes]]\nname = \"loss\"\nop = \"cross_entropy\"\ninputs = [\"head\", \"labels\"]\n\
         [data]\nkind = \"synthetic\"\nexamples = 20\nholdout = 2\nfeatures = 2\nclasses = 2\n\
         [train]\nseed = 1\nbatch_size = 2\nsteps = 2\ncheckpoint_interval = 1\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
    );
    let e = Config::from_toml(&toml, "big-graph.toml").unwrap_err().to_string();
    assert!(e.contains("big-graph.toml") && e.contains("spec.json") && e.contains("1048576"), "{e}");
}
