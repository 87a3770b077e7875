//! A user's own data (safetensors, CSV, token files) and the training options that came with
//! it (gradient clipping, gradient accumulation): runs on such data replay bit-identically on
//! every other profile, the files are checked with errors that name what is wrong and where,
//! and the options change the computation only where they are set.
//!
//! The data files are written here with independent code (safetensors bytes by hand, CSV by
//! `format!`), not with the engine's loaders.

use common::state::StateHash;
use std::path::{Path, PathBuf};

use common::state::TrainingState;
use common::tielog::TieBreakLog;
use engine::data::Dataset;
use engine::spec::{Config, DataKind};
use engine::train::{Run, StepMode};
use kernels::Profile;

const N: usize = 96;
const FEATURES: usize = 12;
const CLASSES: usize = 3;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiebreak-user-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A learnable task from a tiny LCG: class `c` shifts features `c, c+3, ..` up.
fn examples() -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut s: u64 = 0x2545_f491;
    let mut next = || {
        s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for i in 0..N {
        let c = (i * 7 % CLASSES) as u32;
        xs.push((0..FEATURES).map(|f| next() + if f % CLASSES == c as usize { 1.25 } else { 0.0 }).collect());
        ys.push(c);
    }
    (xs, ys)
}

/// A safetensors file by hand: 8-byte LE header length, JSON header (space-padded to 8
/// bytes), then the data. `tensors` are `(name, dtype, shape, bytes)`.
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut offset = 0;
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + bytes.len()
        );
        offset += bytes.len();
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    tensors.iter().for_each(|t| out.extend_from_slice(&t.3));
    out
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn dataset_file(dir: &Path) -> PathBuf {
    let (xs, ys) = examples();
    let bytes = safetensors(&[
        ("x", "F32", vec![N, FEATURES], f32_bytes(xs.into_iter().flatten())),
        ("y", "I64", vec![N], ys.iter().flat_map(|&y| (y as i64).to_le_bytes()).collect()),
    ]);
    let path = dir.join("data.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn csv_file(dir: &Path) -> PathBuf {
    let (xs, ys) = examples();
    let mut text = String::from("label");
    (0..FEATURES).for_each(|f| text += &format!(",f{f}"));
    text.push('\n');
    for (x, y) in xs.iter().zip(&ys) {
        // Shortest round-trip decimals: they parse back to exactly these FP32 values.
        text += &format!("{y}");
        x.iter().for_each(|v| text += &format!(",{v}"));
        text += "\r\n";
    }
    let path = dir.join("data.csv");
    std::fs::write(&path, text).unwrap();
    path
}

const MLP: &str = "[model]\nkind = \"mlp\"\nhidden = [16]";
const GRAPH: &str = r#"[model]
kind = "graph"
[[model.nodes]]
name = "fc1"
op = "linear"
inputs = ["x"]
out = 16
[[model.nodes]]
name = "act"
op = "gelu"
inputs = ["fc1"]
[[model.nodes]]
name = "head"
op = "linear"
inputs = ["act"]
out = 3
[[model.nodes]]
name = "loss"
op = "cross_entropy"
inputs = ["head", "labels"]"#;
const TENSORS: &str = "[data]\nkind = \"tensors\"\ninput_shape = [12]\nclasses = 3\nholdout = 16";
const CSV: &str =
    "[data]\nkind = \"csv\"\nlabel_column = \"label\"\nheader = true\nfeatures = 12\nclasses = 3\nholdout = 16";

fn config(model: &str, data: &str, train_extra: &str) -> Config {
    let text = format!(
        "{model}\n{data}\n[train]\nbatch_size = 8\nsteps = 6\nseed = 4\ncheckpoint_interval = 2\n{train_extra}\n\
         [optimizer]\nkind = \"adamw\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\n\
         [schedule]\nkind = \"cosine\"\nwarmup_steps = 2\nmin_ratio = 0.1\n"
    );
    Config::from_toml(&text, "test.toml").unwrap()
}

type Steps = Vec<(TrainingState, TieBreakLog, std::collections::BTreeMap<String, u64>)>;

fn train(r: &Run) -> Steps {
    let mut state = r.initial_state().unwrap();
    let mut out = Vec::new();
    for t in 1..=r.spec.n_steps {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        state = o.state.clone();
        out.push((o.state, o.log, o.rounded));
    }
    out
}

/// Trains on `cpu` and replays on the other CPU profiles, bit for bit.
fn trains_and_replays(cfg: &Config, data: Option<&Path>) -> Steps {
    let trainer = Run::from_config(cfg, data, Profile::Cpu, cfg.train.steps.unwrap()).unwrap();
    let steps = train(&trainer);
    for profile in [Profile::CpuSeq, Profile::CpuSplitK] {
        let auditor = Run::from_config(cfg, data, profile, trainer.spec.n_steps).unwrap();
        assert_eq!(auditor.spec.dataset, trainer.spec.dataset);
        let mut state = auditor.initial_state().unwrap();
        for (t, (expected, log, _)) in steps.iter().enumerate() {
            let o = auditor.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
            assert!(o.forged.is_empty(), "{profile:?}: honest log flagged: {:?}", o.forged);
            assert_eq!(
                o.state.digest(StateHash::Blake3),
                expected.digest(StateHash::Blake3),
                "{profile:?}: step {} diverged",
                t + 1
            );
            state = o.state;
        }
    }
    steps
}

#[test]
fn safetensors_and_csv_datasets_train_and_replay_on_every_profile() {
    let dir = scratch("replay");
    let (st, csv) = (dataset_file(&dir), csv_file(&dir));
    for (data, path, kind) in [(TENSORS, &st, DataKind::Tensors), (CSV, &csv, DataKind::Csv)] {
        for model in [MLP, GRAPH] {
            let cfg = config(model, data, "");
            trains_and_replays(&cfg, Some(path));
            let d = Dataset::for_config(&cfg, Some(path)).unwrap().commitment();
            assert_eq!((d.kind, d.leaves, d.n_train, d.n_holdout), (kind, N as u64, (N - 16) as u64, 16));
        }
    }
    // The same examples from either file encode the same leaves, so only the kind differs.
    let a = Dataset::for_config(&config(MLP, TENSORS, ""), Some(&st)).unwrap().commitment();
    let b = Dataset::for_config(&config(MLP, CSV, ""), Some(&csv)).unwrap().commitment();
    assert_eq!(a.root, b.root);
    // A byte-order mark before the header (as spreadsheets write it) is not part of a name.
    let bom = dir.join("bom.csv");
    std::fs::write(&bom, [&b"\xef\xbb\xbf"[..], &std::fs::read(&csv).unwrap()].concat()).unwrap();
    let c = Dataset::for_config(&config(MLP, CSV, ""), Some(&bom)).unwrap().commitment();
    assert_eq!(c, b, "the same examples");
}

#[test]
fn a_token_file_trains_the_gpt_and_replays() {
    let dir = scratch("tokens");
    // 600 ids below 300 (more than a byte, so the u16 width matters), little-endian.
    let ids: Vec<u16> = (0..600u32).map(|i| ((i * 37 + i / 5) % 300) as u16).collect();
    let path = dir.join("tokens.bin");
    std::fs::write(&path, ids.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let model = "[model]\nkind = \"gpt\"\nlayers = 1\nd_model = 8\nheads = 2\ncontext = 8";
    let data = "[data]\nkind = \"tokens\"\ndtype = \"u16\"\nvocab = 300\nholdout_fraction = 0.1";
    let cfg = config(model, data, "accumulate = 2");
    trains_and_replays(&cfg, Some(&path));
    let d = Dataset::for_config(&cfg, Some(&path)).unwrap();
    let Dataset::Text { vocab, ref tokens, .. } = d else { panic!("tokens load as a token stream") };
    assert_eq!((vocab, tokens[1]), (300, 37));
    assert_eq!(d.commitment().kind, DataKind::Tokens);

    // An id at or above the vocabulary is refused, naming the token.
    let err = Dataset::for_config(&config(model, &data.replace("300", "200"), ""), Some(&path)).unwrap_err();
    assert!(err.to_string().contains("tokens.bin") && err.to_string().contains("not below data.vocab"), "{err}");
    // So is a file that is not whole ids.
    std::fs::write(&path, [1u8, 0, 2]).unwrap();
    let err = Dataset::for_config(&cfg, Some(&path)).unwrap_err().to_string();
    assert!(err.contains("whole number of 2-byte"), "{err}");
}

#[test]
fn clipping_and_accumulation_replay_on_every_profile() {
    let dir = scratch("clip");
    let csv = csv_file(&dir);
    for model in [MLP, GRAPH] {
        let cfg = config(model, CSV, "clip_norm = 0.5\naccumulate = 4");
        let steps = trains_and_replays(&cfg, Some(&csv));
        let sites = &steps[0].2;
        for site in ["clip/norm", "clip/scale"] {
            assert!(sites.contains_key(site), "{site} not rounded: {:?}", sites.keys().collect::<Vec<_>>());
        }
        let has = |prefix: &str| sites.keys().any(|s| s.starts_with(prefix));
        assert!(has("micro/0/fwd/") && has("micro/3/grad/") && !has("micro/4/"));
        assert!(has("accum/") && has("clip/fc") && !has("fwd/") && !has("grad/"));
    }
}

#[test]
fn clipping_clips_and_accumulation_changes_only_what_it_should() {
    let dir = scratch("clip-effect");
    let csv = csv_file(&dir);
    let last = |extra: &str| {
        let cfg = config(MLP, CSV, extra);
        let r = Run::from_config(&cfg, Some(&csv), Profile::Cpu, 6).unwrap();
        let steps = train(&r);
        (steps.last().unwrap().0.digest(StateHash::Blake3), steps[0].2.clone())
    };
    let (plain, plain_sites) = last("");
    assert!(!plain_sites.keys().any(|s| s.starts_with("clip/") || s.starts_with("accum/") || s.starts_with("micro/")));
    // A huge clip norm never clips: the trajectory is the plain one (the scale is exactly 1).
    assert_eq!(last("clip_norm = 1e30").0, plain);
    // A tiny one does.
    let (tiny, sites) = last("clip_norm = 1e-3");
    assert_ne!(tiny, plain);
    assert_eq!(sites.get("clip/norm"), Some(&1));
    // Accumulating changes the computation (micro-batch means, then their mean).
    assert_ne!(last("accumulate = 2").0, plain);
    // Old configs serialise without the new fields, so their spec digests are unchanged.
    let json = serde_json::to_string(&config(MLP, CSV, "")).unwrap();
    assert!(!json.contains("clip_norm") && !json.contains("accumulate"), "{json}");
    let json = serde_json::to_string(&config(MLP, CSV, "clip_norm = 1.5\naccumulate = 2")).unwrap();
    assert!(json.contains("\"clip_norm\":1.5") && json.contains("\"accumulate\":2"), "{json}");
}

#[test]
fn bad_training_options_name_the_field() {
    for (extra, field) in [
        ("clip_norm = 0.0", "train.clip_norm"),
        ("clip_norm = -1.0", "train.clip_norm"),
        ("clip_norm = nan", "train.clip_norm"),
        ("clip_norm = inf", "train.clip_norm"),
        ("accumulate = 0", "train.accumulate"),
        ("accumulate = 3", "train.accumulate"),
        ("epochs = 2", "set train.steps or train.epochs, not both"),
        ("[schedule]\nkind = \"constant\"\nwarmup_steps = 100", "warmup_steps"),
    ] {
        let text = format!(
            "{MLP}\n{CSV}\n[train]\nbatch_size = 8\nsteps = 6\nseed = 4\ncheckpoint_interval = 2\n{extra}\n\
             [optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        );
        let err = Config::from_toml(&text, "bad.toml").unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains(field), "{extra}: {err}");
    }
    // A missing field is named itself, not the field read before it.
    for (drop, field) in [("seed = 4\n", "train.seed: missing"), ("lr = 0.1\n", "optimizer.lr: missing")] {
        let text = format!(
            "{MLP}\n{CSV}\n[train]\nbatch_size = 8\nsteps = 6\nseed = 4\ncheckpoint_interval = 2\n\
             [optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        )
        .replace(drop, "");
        let err = Config::from_toml(&text, "bad.toml").unwrap_err().to_string();
        assert!(err.contains(field), "{drop}: {err}");
    }
}

/// The error loading `bytes` as the config's dataset.
fn load_err(data: &str, name: &str, bytes: &[u8]) -> String {
    let dir = scratch(&format!("bad-{name}"));
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = Dataset::for_config(&config(MLP, data, ""), Some(&path)).unwrap_err().to_string();
    assert!(err.contains(name), "the error names the file: {err}");
    err
}

#[test]
fn malformed_safetensors_files_get_clear_errors() {
    let (xs, ys) = examples();
    let x = || ("x", "F32", vec![N, FEATURES], f32_bytes(xs.iter().flatten().copied()));
    let y32 = |ys: &[u32]| ("y", "U32", vec![N], ys.iter().flat_map(|y| y.to_le_bytes()).collect::<Vec<u8>>());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x10\0\0\0\0\0\0\0{not json at all".to_vec(), "not a safetensors file"),
        (u64::MAX.to_le_bytes().to_vec(), "not a safetensors file"),
        (Vec::new(), "not a safetensors file"),
        (safetensors(&[("x", "F64", vec![N, FEATURES], vec![0; N * FEATURES * 8]), y32(&ys)]), "inputs must be F32"),
        (safetensors(&[x(), ("y", "F32", vec![N], f32_bytes(ys.iter().map(|&y| y as f32)))]), "class labels must be"),
        (safetensors(&[x()]), "no tensor y"),
        (safetensors(&[x(), y32(&ys), ("z", "U8", vec![1], vec![0])]), "tensor \"z\" is not x or y"),
        (safetensors(&[x(), y32(&ys), ("x", "U8", vec![1], vec![0])]), "tensor \"x\" is named twice"),
        (
            {
                // The same entry for y twice: the crate alone would keep one and read the file.
                let good = safetensors(&[x(), y32(&ys)]);
                let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
                let header = std::str::from_utf8(&good[8..8 + n]).unwrap().trim_end();
                let y = &header[header.find("\"y\"").unwrap()..header.len() - 1];
                let twice = format!("{},{y}}}", &header[..header.len() - 1]);
                let mut out = (twice.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(twice.as_bytes());
                out.extend_from_slice(&good[8 + n..]);
                out
            },
            "tensor \"y\" is named twice",
        ),
        (safetensors(&[("x", "F32", vec![N, 4, 3], x().3), y32(&ys)]), "data.input_shape is [12]"),
        (safetensors(&[x(), ("y", "U32", vec![N - 1], vec![0; (N - 1) * 4])]), "one per example"),
        (
            {
                let mut bad = ys.clone();
                bad[5] = 3;
                safetensors(&[x(), y32(&bad)])
            },
            "label 3 of example 5 is not below data.classes = 3",
        ),
        (
            safetensors(&[x(), ("y", "I64", vec![N], (0..N).flat_map(|_| (-1i64).to_le_bytes()).collect())]),
            "label -1 of example 0",
        ),
        (
            safetensors(&[
                (
                    "x",
                    "F32",
                    vec![N, FEATURES],
                    f32_bytes((0..N * FEATURES).map(|i| if i == 30 { f32::NAN } else { 0.0 })),
                ),
                y32(&ys),
            ]),
            "value 6 of example 2 is not finite",
        ),
    ];
    for (bytes, want) in cases {
        let err = load_err(TENSORS, "bad.safetensors", &bytes);
        assert!(err.contains(want), "want {want:?}: {err}");
    }
    // Too few examples for the holdout.
    let small =
        safetensors(&[("x", "F32", vec![2, FEATURES], vec![0; 2 * FEATURES * 4]), ("y", "U8", vec![2], vec![0, 1])]);
    assert!(load_err(TENSORS, "small.safetensors", &small).contains("leaves none for training"));
}

#[test]
fn malformed_csv_files_get_clear_errors() {
    let row = |label: &str| format!("{label}{}\n", ",0.5".repeat(FEATURES));
    let header = format!("label{}\n", (0..FEATURES).map(|f| format!(",f{f}")).collect::<String>());
    let good = |n: usize| (0..n).map(|i| row(&(i % 3).to_string())).collect::<String>();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        (header.clone(), "no data rows"),
        (format!("{header}{}1,2,3\n", good(20)), "line 22: 3 fields, every row needs 13"),
        (
            format!("{header}{}7{}\n", good(20), ",1".repeat(FEATURES)),
            "line 22, column 1: label \"7\" is not an integer",
        ),
        (format!("{header}1.5{}\n", ",1".repeat(FEATURES)), "line 2, column 1: label \"1.5\""),
        (format!("{header}1,abc{}\n", ",1".repeat(FEATURES - 1)), "line 2, column 2: \"abc\" is not a number"),
        // A huge cell is quoted cut short, with its size.
        (
            format!("{header}1,{}{}\n", "9x".repeat(500_000), ",1".repeat(FEATURES - 1)),
            "line 2, column 2: \"9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x9x\"… (1000000 bytes) is not a number",
        ),
        (format!("{header}1,nan{}\n", ",1".repeat(FEATURES - 1)), "line 2, column 2: \"nan\" is not a finite"),
        (format!("{header}1,1e39{}\n", ",1".repeat(FEATURES - 1)), "line 2, column 2: \"1e39\" is not a finite"),
        (format!("lbl{}\n{}", &header[5..], good(20)), "no column is named \"label\""),
        (format!("{}{}", &header[6..], good(20)), "the header has 12 columns"),
    ];
    for (text, want) in cases {
        let err = load_err(CSV, "bad.csv", text.as_bytes());
        assert!(err.contains(want), "want {want:?}: {err}");
    }
    assert!(load_err(CSV, "bin.csv", &[0xff, 0xfe, 0]).contains("not UTF-8"));
    // Without a header, the label column is an index; a headerless file of good rows loads.
    let data = "[data]\nkind = \"csv\"\nlabel_column = 0\nfeatures = 12\nclasses = 3\nholdout = 4";
    let dir = scratch("csv-index");
    std::fs::write(dir.join("ok.csv"), good(20)).unwrap();
    let d = Dataset::for_config(&config(MLP, data, ""), Some(&dir.join("ok.csv"))).unwrap();
    assert_eq!((d.n_train(), d.n_holdout()), (16, 4));
}

#[test]
fn bad_data_configs_name_the_field() {
    for (data, field) in [
        ("[data]\nkind = \"tensors\"\ninput_shape = [0]\nclasses = 3\nholdout = 1", "data.input_shape[0]"),
        ("[data]\nkind = \"tensors\"\ninput_shape = [4]\nclasses = 1\nholdout = 1", "data.classes"),
        ("[data]\nkind = \"csv\"\nlabel_column = 13\nfeatures = 12\nclasses = 3\nholdout = 1", "data.label_column"),
        ("[data]\nkind = \"csv\"\nlabel_column = \"y\"\nfeatures = 12\nclasses = 3\nholdout = 1", "data.label_column"),
        ("[data]\nkind = \"csv\"\nlabel_column = 0\nfeatures = 0\nclasses = 3\nholdout = 1", "data.features"),
        ("[data]\nkind = \"tokens\"\ndtype = \"u16\"\nvocab = 300", "data.kind"),
        ("[data]\nkind = \"tokens\"\ndtype = \"u8\"\nvocab = 300", "unknown variant `u8`, expected `u16` or `u32`"),
        (
            "[data]\nkind = \"csv\"\nlabel_column = -1\nfeatures = 12\nclasses = 3\nholdout = 1",
            "data.label_column: invalid value: integer `-1`, expected a column: its 0-based index, or its header name",
        ),
        (
            "[data]\nkind = \"csv\"\nlabel_column = 1.5\nfeatures = 12\nclasses = 3\nholdout = 1",
            "data.label_column: invalid type: floating point `1.5`, expected a column",
        ),
    ] {
        let text = format!(
            "{MLP}\n{data}\n[train]\nbatch_size = 8\nsteps = 6\nseed = 4\ncheckpoint_interval = 2\n\
             [optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        );
        let err = Config::from_toml(&text, "bad.toml").unwrap_err().to_string();
        assert!(err.contains(field), "{data}: {err}");
    }
}

#[test]
fn the_example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    for (name, kind) in
        [("csv-example", DataKind::Csv), ("tensors-example", DataKind::Tensors), ("tokens-example", DataKind::Tokens)]
    {
        let path = dir.join(format!("{name}.toml"));
        let cfg = Config::from_toml(&std::fs::read_to_string(&path).unwrap(), name).unwrap();
        assert_eq!(cfg.data.kind(), kind, "{name}");
    }
}

#[test]
fn a_hostile_spec_over_a_user_file_names_the_field() {
    let dir = scratch("hostile");
    let csv = csv_file(&dir);
    let run = Run::from_config(&config(MLP, CSV, "accumulate = 2"), Some(&csv), Profile::Cpu, 6).unwrap();
    assert!(run.spec.validate().is_ok());
    let bad = |f: &dyn Fn(&mut engine::spec::RunSpec)| {
        let mut spec = run.spec.clone();
        f(&mut spec);
        spec.validate().unwrap_err().field
    };
    assert_eq!(bad(&|s| s.dataset.leaves = u64::MAX), "dataset.leaves");
    assert_eq!(bad(&|s| s.dataset.n_train = 0), "dataset.n_train");
    assert_eq!(bad(&|s| s.dataset.n_train = u64::MAX), "dataset.n_train");
    assert_eq!(bad(&|s| s.dataset.n_holdout = 3), "dataset.n_holdout");
    assert_eq!(bad(&|s| s.dataset.kind = DataKind::Tensors), "dataset.kind");
    assert_eq!(bad(&|s| s.config.train.accumulate = 5), "config.train.accumulate");
    assert_eq!(bad(&|s| s.config.train.accumulate = usize::MAX), "config.train.accumulate");
    assert_eq!(bad(&|s| s.config.train.clip_norm = Some(f64::NAN)), "config.train.clip_norm");
    // And the JSON of a spec with an unknown data kind does not parse (naming where).
    let json = String::from_utf8(run.spec.canonical_json()).unwrap().replace("\"csv\"", "\"parquet\"");
    let err = engine::spec::RunSpec::from_committed_json(json.as_bytes()).unwrap_err();
    assert_eq!(err.field, "spec.json");
}

/// Regression: a safetensors file with F32 targets `y` `[N, 2]` (a fixed linear function of
/// the inputs); a graph with an `mse` loss against `labels` learns it and replays on every
/// profile. The mistakes name their field.
#[test]
fn f32_targets_train_a_graph_with_an_mse_loss_and_replay() {
    let dir = scratch("regression");
    let (xs, _) = examples();
    let ys: Vec<f32> = xs
        .iter()
        .flat_map(|x| {
            let a: f32 = x.iter().enumerate().map(|(i, v)| v * (i as f32 - 5.5) / 8.0).sum();
            [a, x[0] - x[1]]
        })
        .collect();
    let file = dir.join("regression.safetensors");
    let bytes = safetensors(&[
        ("x", "F32", vec![N, FEATURES], f32_bytes(xs.iter().flatten().copied())),
        ("y", "F32", vec![N, 2], f32_bytes(ys.iter().copied())),
    ]);
    std::fs::write(&file, bytes).unwrap();
    let model = "[model]\nkind = \"graph\"\n\
        [[model.nodes]]\nname = \"fc1\"\nop = \"linear\"\ninputs = [\"x\"]\nout = 16\n\
        [[model.nodes]]\nname = \"act\"\nop = \"tanh\"\ninputs = [\"fc1\"]\n\
        [[model.nodes]]\nname = \"head\"\nop = \"linear\"\ninputs = [\"act\"]\nout = 2\n\
        [[model.nodes]]\nname = \"loss\"\nop = \"mse\"\ninputs = [\"head\", \"labels\"]";
    let data = "[data]\nkind = \"tensors\"\ninput_shape = [12]\ntarget_shape = [2]\nholdout = 16";
    let cfg = config(model, data, "");
    let run = Run::from_config(&cfg, Some(&file), Profile::Cpu, 6).unwrap();
    let Dataset::Regression { target_shape, targets, .. } = &run.data else { panic!("a regression dataset") };
    assert_eq!((target_shape.as_slice(), targets.len()), (&[2][..], N * 2));
    let steps = trains_and_replays(&cfg, Some(&file));
    assert!(steps[0].2.contains_key("fwd/loss/out"));
    // It learns: 60 steps lower the held-out error.
    let mut long = cfg.clone();
    long.train.steps = Some(60);
    long.schedule = Default::default();
    let r = Run::from_config(&long, Some(&file), Profile::Cpu, 60).unwrap();
    let before = r.evaluate(&r.initial_state().unwrap(), 16).unwrap();
    let after = r.evaluate(&train(&r).pop().unwrap().0, 16).unwrap();
    assert_eq!(before.accuracy, None, "no accuracy without classes");
    assert!(after.loss.unwrap() < 0.5 * before.loss.unwrap(), "{before:?} → {after:?}");

    // Mistakes, each naming its field.
    let refused = |model: &str, data: &str, field: &str| {
        let text = format!(
            "{model}\n{data}\n[train]\nbatch_size = 8\nsteps = 6\nseed = 4\ncheckpoint_interval = 2\n\
             [optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        );
        let e = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains(field), "{e} does not name {field}");
    };
    refused(model, &data.replace("holdout", "classes = 3\nholdout"), "data.classes");
    refused(MLP, data, "data.target_shape");
    refused(GRAPH, data, "model.nodes[3]");
    refused(model, &data.replace("[2]", "[0]"), "data.target_shape[0]");
    // A file whose y is not F32 targets of that shape is refused, naming y.
    let labels = safetensors(&[
        ("x", "F32", vec![N, FEATURES], f32_bytes(xs.iter().flatten().copied())),
        ("y", "F32", vec![N, 3], f32_bytes((0..N * 3).map(|i| i as f32))),
    ]);
    let path = dir.join("wrong-shape.safetensors");
    std::fs::write(&path, labels).unwrap();
    let e = Dataset::for_config(&cfg, Some(&path)).unwrap_err().to_string();
    assert!(e.contains("wrong-shape.safetensors") && e.contains("tensor y"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
