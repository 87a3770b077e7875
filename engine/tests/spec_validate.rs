//! `RunSpec::validate` and `Config::validate`: every out-of-range or inconsistent field of a
//! spec a trainer could sign is refused, naming the field (table-driven over the fields).

use common::state::StateHash;
use engine::data::Dataset;
use engine::spec::{
    AdamwConfig, CnnConfig, Config, DataConfig, DatasetCommitment, FORMAT_VERSION, GptConfig, LAYERS_MAX, MnistConfig,
    ModelConfig, OptimizerConfig, RunSpec, STEPS_MAX, SpecInvalid, TextConfig,
};
use kernels::Sums;
use serde_json::{Value, json};

const MLP: &str = r#"
[model]
kind = "mlp"
hidden = [32]
[data]
kind = "synthetic"
examples = 300
holdout = 44
features = 16
classes = 4
[train]
batch_size = 16
steps = 20
seed = 7
checkpoint_interval = 5
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
"#;

fn spec_for(config: Config, dataset: DatasetCommitment) -> RunSpec {
    let n_steps = config.planned_steps(dataset.n_train).unwrap();
    RunSpec::new(config, dataset, "cpu", n_steps)
}

fn mlp_spec() -> RunSpec {
    let config = Config::from_toml(MLP, "mlp").unwrap();
    let data = Dataset::for_config(&config, None).unwrap();
    spec_for(config, data.commitment())
}

fn adamw_spec() -> RunSpec {
    let mut config = Config::from_toml(MLP, "mlp").unwrap();
    config.optimizer =
        OptimizerConfig::Adamw(AdamwConfig { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let data = Dataset::for_config(&config, None).unwrap();
    spec_for(config, data.commitment())
}

fn gpt_spec() -> RunSpec {
    let mut config = Config::from_toml(MLP, "mlp").unwrap();
    config.model = ModelConfig::Gpt(GptConfig { layers: 2, d_model: 16, heads: 4, context: 8, dropout: 0.1 });
    config.data = DataConfig::Text(TextConfig { holdout_fraction: 0.1 });
    config.train.steps = None;
    config.train.epochs = Some(2);
    let data = Dataset::text(b"to be, or not to be: that is the question. ".repeat(200), 8, 0.1).unwrap();
    spec_for(config, data.commitment())
}

fn mnist_cnn_spec() -> RunSpec {
    let mut config = Config::from_toml(MLP, "mlp").unwrap();
    config.model = ModelConfig::Cnn(CnnConfig { channels: [4, 8] });
    config.data = DataConfig::Mnist(MnistConfig { train: 900, holdout: 100 });
    let dataset = DatasetCommitment {
        kind: engine::spec::DataKind::Mnist,
        leaves: 1000,
        n_train: 900,
        n_holdout: 100,
        root: "ab".repeat(32),
    };
    spec_for(config, dataset)
}

/// `spec` with the value at JSON pointer `at` replaced (or removed, for `Value::Null` on a
/// defaulted field), parsed and validated as an auditor would.
fn edited(spec: &RunSpec, at: &str, value: Value) -> Result<RunSpec, SpecInvalid> {
    let mut v = serde_json::to_value(spec).unwrap();
    *v.pointer_mut(at).unwrap_or_else(|| panic!("no {at}")) = value;
    RunSpec::from_committed_json(&serde_json::to_vec(&v).unwrap())
}

#[test]
fn good_specs_pass_and_round_trip() {
    for spec in [mlp_spec(), adamw_spec(), gpt_spec(), mnist_cnn_spec()] {
        spec.validate().unwrap();
        assert_eq!(RunSpec::from_committed_json(&spec.canonical_json()).unwrap(), spec);
    }
}

#[test]
fn each_bad_field_is_refused_by_name() {
    let (mlp, adamw, gpt, cnn) = (mlp_spec(), adamw_spec(), gpt_spec(), mnist_cnn_spec());
    let big = json!(1u64 << 40);
    let cases: Vec<(&RunSpec, &str, Value, &str)> = vec![
        (&mlp, "/format_version", json!(FORMAT_VERSION + 1), "format_version"),
        (&mlp, "/device_profile", json!("tpu"), "device_profile"),
        (&mlp, "/n_steps", json!(0), "n_steps"),
        (&mlp, "/n_steps", json!(19), "n_steps"),
        (&mlp, "/config/train/batch_size", json!(0), "config.train.batch_size"),
        (&mlp, "/config/train/batch_size", big.clone(), "config.train.batch_size"),
        (&mlp, "/config/train/checkpoint_interval", json!(0), "config.train.checkpoint_interval"),
        (&mlp, "/config/train/steps", json!(0), "config.train.steps"),
        (&mlp, "/config/train/steps", json!(STEPS_MAX + 1), "config.train.steps"),
        (&mlp, "/config/train/steps", Value::Null, "config.train.steps"),
        (&gpt, "/config/train/epochs", json!(STEPS_MAX), "config.train.epochs"),
        (&mlp, "/config/optimizer/lr", json!(-1.0), "config.optimizer.lr"),
        (&mlp, "/config/optimizer/lr", json!(0.0), "config.optimizer.lr"),
        (&mlp, "/config/optimizer/momentum", json!(1.0), "config.optimizer.momentum"),
        (&mlp, "/config/optimizer/weight_decay", json!(-0.5), "config.optimizer.weight_decay"),
        (&adamw, "/config/optimizer/beta1", json!(1.0), "config.optimizer.beta1"),
        (&adamw, "/config/optimizer/beta2", json!(1.5), "config.optimizer.beta2"),
        (&adamw, "/config/optimizer/eps", json!(0.0), "config.optimizer.eps"),
        (&mlp, "/config/model/hidden", json!([0]), "config.model.hidden[0]"),
        (&mlp, "/config/model/hidden", json!([big.clone()]), "config.model.hidden"),
        (&mlp, "/config/model/hidden", json!([65536, 65536]), "config.model.hidden"),
        (&mlp, "/config/model/hidden", json!(vec![1; LAYERS_MAX + 1]), "config.model.hidden"),
        (&mlp, "/config/data/classes", json!(1), "config.data.classes"),
        (&mlp, "/config/data/classes", json!(0), "config.data.classes"),
        (&mlp, "/config/data/features", json!(0), "config.data.features"),
        (&mlp, "/config/data/holdout", json!(300), "config.data.holdout"),
        (&mlp, "/config/data/examples", big.clone(), "config.data.examples"),
        (&mlp, "/dataset/kind", json!("mnist"), "dataset.kind"),
        (&mlp, "/dataset/leaves", json!(301), "dataset.leaves"),
        (&mlp, "/dataset/n_train", json!(255), "dataset.n_train"),
        (&mlp, "/dataset/root", json!("00".repeat(32)), "dataset.root"),
        (&mlp, "/config/train/seed", json!(8), "dataset.root"),
        (&gpt, "/config/model/heads", json!(0), "config.model.heads"),
        (&gpt, "/config/model/heads", json!(3), "config.model.heads"),
        (&gpt, "/config/model/layers", json!(0), "config.model.layers"),
        (&gpt, "/config/model/d_model", json!(0), "config.model.d_model"),
        (&gpt, "/config/model/context", json!(0), "config.model.context"),
        (&gpt, "/config/model/context", big.clone(), "config.model.context"),
        (&gpt, "/config/model/d_model", json!(1u64 << 20), "config.model.d_model"),
        (&gpt, "/config/model/dropout", json!(1.0), "config.model.dropout"),
        (&gpt, "/config/model/dropout", json!(-0.1), "config.model.dropout"),
        (&gpt, "/config/data/holdout_fraction", json!(0.5), "config.data.holdout_fraction"),
        (&gpt, "/dataset/n_train", json!(1), "dataset.n_train"),
        (&gpt, "/dataset/leaves", json!(0), "dataset.leaves"),
        (&gpt, "/config/model/context", json!(9), "dataset.n_train"),
        (&cnn, "/config/model/channels", json!([0, 8]), "config.model.channels[0]"),
        (&cnn, "/config/model/channels", json!([4, big]), "config.model.channels"),
        (&cnn, "/config/data/train", json!(0), "config.data.train"),
        (&cnn, "/dataset/n_holdout", json!(99), "dataset.n_holdout"),
        (&cnn, "/dataset/leaves", json!(999), "dataset.leaves"),
    ];
    for (spec, at, value, field) in cases {
        let err = edited(spec, at, value.clone()).expect_err(&format!("{at} = {value} accepted"));
        assert!(err.field.starts_with(field), "{at} = {value}: {err} does not name {field}");
        assert!(err.to_string().starts_with(&format!("{}: ", err.field)), "{err}");
    }
    // Records of earlier formats: 1 (hand-written models, before every model was a graph) and
    // 2 (tie-break logs naming their sites).
    for old in [1, 2] {
        let err = edited(&mlp, "/format_version", json!(old)).unwrap_err();
        assert_eq!(err.what, format!("made by format {old}; this build reads formats 3 to {FORMAT_VERSION}"));
    }
    assert_eq!(FORMAT_VERSION, 5);
    // Formats 3 (SHA-256 state hashes) and 4 (BLAKE3, batch norm summed in each profile's
    // order) are read as well as this build's format 5 (batch norm's sums correctly rounded).
    let (any, exact) = (Sums::ProfileOrder, Sums::CorrectlyRounded);
    for (format, hash, sums) in
        [(3, StateHash::Sha256, any), (4, StateHash::Blake3, any), (5, StateHash::Blake3, exact)]
    {
        let spec = edited(&mlp, "/format_version", json!(format)).unwrap();
        assert_eq!((spec.state_hash(), spec.sums()), (hash, sums), "format {format}");
    }
}

#[test]
fn a_model_of_the_wrong_data_kind_is_refused() {
    let mlp = mlp_spec();
    let mut gpt = serde_json::to_value(gpt_spec()).unwrap();
    gpt["config"]["data"] = serde_json::to_value(&mlp.config.data).unwrap();
    let err = RunSpec::from_committed_json(&serde_json::to_vec(&gpt).unwrap()).unwrap_err();
    assert_eq!(err.field, "config.data.kind", "{err}");
    // A CNN on synthetic data needs square images.
    let mut cnn = mlp.clone();
    cnn.config.model = ModelConfig::Cnn(CnnConfig { channels: [2, 2] });
    let DataConfig::Synthetic(s) = &mut cnn.config.data else { unreachable!() };
    s.features = 15;
    assert_eq!(cnn.validate().unwrap_err().field, "config.data.features");
}

#[test]
fn unparsable_specs_name_the_position() {
    let err = RunSpec::from_committed_json(b"{\"format_version\": 1,").unwrap_err();
    assert_eq!(err.field, "spec.json");
    assert!(err.what.contains("line 1"), "{err}");
    let mut v = serde_json::to_value(mlp_spec()).unwrap();
    v["config"]["train"]["batch_sise"] = json!(3);
    let err = RunSpec::from_committed_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(err.what.contains("batch_sise"), "{err}");
}

#[test]
fn state_size_is_exact_and_bounded() {
    let spec = mlp_spec();
    // fc1: 16→32, fc2: 32→4, SGD: one slot.
    let params = 16 * 32 + 32 + 32 * 4 + 4;
    let sizes = spec.config.sizes().unwrap();
    assert_eq!(sizes.param_values, params);
    assert_eq!(sizes.state_values, 2 * params);
    assert!(spec.state_bytes_max().unwrap() as u64 >= 8 * params);
    assert!(spec.state_bytes_max().unwrap() < (8 * params + 1024) as usize);
}

#[test]
fn planned_steps_follow_the_config() {
    let mut c = Config::from_toml(MLP, "mlp").unwrap();
    assert_eq!(c.planned_steps(256), Ok(20));
    c.train.steps = None;
    c.train.epochs = Some(3);
    assert_eq!(c.planned_steps(256), Ok(48));
    assert_eq!(c.planned_steps(5), Ok(3), "a split smaller than a batch is one step per epoch");
    let c = c.with_planned_steps(7, 256);
    assert_eq!((c.train.steps, c.train.epochs), (Some(7), None));
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
    for name in ["synthetic-mlp", "mnist-mlp", "mnist-cnn", "shakespeare-gpt"] {
        let path = format!("{dir}/{name}.toml");
        let config = Config::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let sizes = config.sizes().unwrap();
        assert!(sizes.state_values >= 2 * sizes.param_values, "{name}");
    }
}

/// An honest text commitment is never refused: whatever the text's length, context and holdout
/// fraction, the counts it gives are found coherent (a false "commitment-invalid" would accuse
/// an honest trainer).
#[test]
fn honest_text_commitments_are_coherent_at_every_length() {
    let mut config = Config::from_toml(MLP, "mlp").unwrap();
    for len in [40usize, 4095, 4096, 4097, 8192, 10_000, 123_457] {
        for context in [8usize, 64] {
            for fraction in [0.0, 0.05, 0.1, 0.3, 0.49] {
                let text: Vec<u8> = (0..len).map(|i| b"abcdefghij .\n"[(i * 7 + i / 13) % 13]).collect();
                let Ok(data) = Dataset::text(text, context, fraction) else { continue };
                config.model = ModelConfig::Gpt(GptConfig { layers: 1, d_model: 8, heads: 2, context, dropout: 0.0 });
                config.data = DataConfig::Text(TextConfig { holdout_fraction: fraction });
                let spec = spec_for(config.clone(), data.commitment());
                spec.validate().unwrap_or_else(|e| panic!("len {len}, context {context}, fraction {fraction}: {e}"));
            }
        }
    }
}

/// Every training config shipped in `configs/` parses and validates (the daemon's
/// `auditor.toml` is not a training config).
#[test]
fn every_shipped_training_config_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".toml") || name == "auditor.toml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::from_toml(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
    }
    assert!(seen >= 12, "only {seen} configs found in {}", dir.display());
}
