//! Interop: for every model kind (the `mlp`, `cnn` and `gpt` presets and a user's graph), the
//! exported safetensors load into a candle-nn model of the same architecture, written here
//! with candle-nn's own modules and `VarBuilder` names, and that model computes the engine's
//! logits (up to FP32-vs-FP64 arithmetic). The export's metadata names the record, the step
//! and, for text, the vocabulary; `--step` exports a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Conv2dConfig, LayerNormConfig, Module, VarBuilder};
use engine::model::{Batch, Ctx};
use engine::spec::Config;
use kernels::Profile;
use trainer_agent::export::{ExportOptions, export};
use trainer_agent::{Session, SessionOptions};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tb-candle-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Trains `steps` steps of `config` into `dir/rec`, exports the final state and returns the
/// file's `VarBuilder`, its metadata, the run (for the engine's logits) and the final state.
struct Trained {
    vb: VarBuilder<'static>,
    metadata: serde_json::Map<String, serde_json::Value>,
    run: engine::train::Run,
    state: common::state::TrainingState,
}

fn train_and_export(dir: &Path, config: Config, data: Option<PathBuf>, steps: u64) -> Trained {
    let opts = SessionOptions {
        config,
        data: data.clone(),
        out: dir.join("rec"),
        device: Profile::Cpu,
        steps: Some(steps),
        resume: false,
        faults: vec![],
        key: Some(dir.join("k")),
        init_weights: None,
    };
    let mut s = Session::create(&opts).unwrap();
    while s.next_step().is_some() {
        s.step().unwrap();
    }
    let state = s.state().clone();
    let device = kernels::Device::new(Profile::CpuSeq).unwrap();
    let run = engine::train::Run::new(s.run().spec.clone(), s.run().data.clone(), device).unwrap();
    s.finish().unwrap();
    let file = dir.join("model.safetensors");
    let done =
        export(&ExportOptions { record: &dir.join("rec"), out: &file, step: None, data: data.as_deref() }).unwrap();
    assert_eq!(done.step, steps);
    let bytes = std::fs::read(&file).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let metadata = header["__metadata__"].as_object().unwrap().clone();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    Trained { vb, metadata, run, state }
}

/// The engine's logits for held-out examples `0..n` (the loss node's input).
fn engine_logits(t: &Trained, n: usize) -> (Batch, Vec<f32>) {
    let idx: Vec<u64> = (0..n).map(|k| t.run.data.holdout_index(k) as u64).collect();
    let batch = Batch::gather(&t.run.data, &idx);
    let device = kernels::Device::new(Profile::CpuSeq).unwrap();
    let mut rounder = common::rounding::Rounder::commit();
    let mut ctx = Ctx::new(&device, &mut rounder, 0, &t.run.spec);
    let (_, logits) = t.run.model.forward_logits(&mut ctx, &t.state, &batch).unwrap();
    (batch, logits.unwrap())
}

fn assert_close(ours: &[f32], candle: &Tensor) {
    let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ours.len(), candle.len());
    for (a, b) in ours.iter().zip(&candle) {
        assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "engine {a} vs candle {b}");
    }
}

fn config(model: &str, data: &str) -> Config {
    let text = format!(
        "{model}\n{data}\n[train]\nbatch_size = 8\nsteps = 8\nseed = 5\ncheckpoint_interval = 4\n\
         [optimizer]\nkind = \"adamw\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.99\neps = 1e-8\n"
    );
    Config::from_toml(&text, "interop").unwrap()
}

const SYNTHETIC: &str = "[data]\nkind = \"synthetic\"\nexamples = 256\nholdout = 32\nfeatures = 64\nclasses = 5";

#[test]
fn exported_mlp_loads_in_candle_nn_and_matches_the_engine() {
    let dir = scratch("mlp");
    let t = train_and_export(&dir, config("[model]\nkind = \"mlp\"\nhidden = [24, 12]", SYNTHETIC), None, 8);
    assert_eq!(t.metadata["tiebreak.model"], "mlp");
    assert_eq!(t.metadata["tiebreak.step"], "8");
    let rec = engine::record::Record::open(&dir.join("rec")).unwrap();
    assert_eq!(t.metadata["tiebreak.root"], rec.manifest().unwrap().root.as_str());
    assert_eq!(t.metadata["tiebreak.spec_sha256"], rec.manifest().unwrap().spec_hash.as_str());
    let fc1 = candle_nn::linear(64, 24, t.vb.pp("fc1")).unwrap();
    let fc2 = candle_nn::linear(24, 12, t.vb.pp("fc2")).unwrap();
    let fc3 = candle_nn::linear(12, 5, t.vb.pp("fc3")).unwrap();
    let (batch, ours) = engine_logits(&t, 16);
    let Batch::Classes { x, .. } = &batch else { unreachable!() };
    let x = Tensor::from_slice(x, (16, 64), &Device::Cpu).unwrap();
    let h = fc2.forward(&fc1.forward(&x).unwrap().relu().unwrap()).unwrap().relu().unwrap();
    assert_close(&ours, &fc3.forward(&h).unwrap());

    // --step exports a checkpoint (every 4 steps here), and refuses a step without one.
    let early = dir.join("step4.safetensors");
    let done = export(&ExportOptions { record: &dir.join("rec"), out: &early, step: Some(4), data: None }).unwrap();
    assert_eq!(done.metadata["tiebreak.step"], "4");
    assert_ne!(std::fs::read(&early).unwrap(), std::fs::read(dir.join("model.safetensors")).unwrap());
    let e = export(&ExportOptions { record: &dir.join("rec"), out: &early, step: Some(5), data: None }).unwrap_err();
    assert!(e.to_string().contains("nearest are 4 and 8"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exported_cnn_loads_in_candle_nn_and_matches_the_engine() {
    let dir = scratch("cnn");
    let t = train_and_export(&dir, config("[model]\nkind = \"cnn\"\nchannels = [3, 4]", SYNTHETIC), None, 8);
    assert_eq!(t.metadata["tiebreak.model"], "cnn");
    let conv = Conv2dConfig { padding: 1, ..Default::default() };
    let conv1 = candle_nn::conv2d(1, 3, 3, conv, t.vb.pp("conv1")).unwrap();
    let conv2 = candle_nn::conv2d(3, 4, 3, conv, t.vb.pp("conv2")).unwrap();
    let fc = candle_nn::linear(4 * 2 * 2, 5, t.vb.pp("fc")).unwrap();
    let (batch, ours) = engine_logits(&t, 16);
    let Batch::Classes { x, .. } = &batch else { unreachable!() };
    let x = Tensor::from_slice(x, (16, 1, 8, 8), &Device::Cpu).unwrap();
    let h = conv1.forward(&x).unwrap().relu().unwrap().max_pool2d(2).unwrap();
    let h = conv2.forward(&h).unwrap().relu().unwrap().max_pool2d(2).unwrap();
    assert_close(&ours, &fc.forward(&h.flatten_from(1).unwrap()).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exported_graph_loads_in_candle_nn_and_matches_the_engine() {
    // The shipped example graph: a residual MLP with GELU.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/synthetic-graph.toml");
    let config = Config::from_toml(&std::fs::read_to_string(path).unwrap(), path).unwrap();
    let dir = scratch("graph");
    let t = train_and_export(&dir, config, None, 8);
    assert_eq!(t.metadata["tiebreak.model"], "graph");
    let graph: engine::graph::GraphConfig =
        serde_json::from_str(t.metadata["tiebreak.graph"].as_str().unwrap()).unwrap();
    assert_eq!(graph.nodes.len(), 7, "the metadata carries the graph");
    let fc1 = candle_nn::linear(32, 64, t.vb.pp("fc1")).unwrap();
    let fc2 = candle_nn::linear(64, 64, t.vb.pp("fc2")).unwrap();
    let head = candle_nn::linear(64, 8, t.vb.pp("head")).unwrap();
    let (batch, ours) = engine_logits(&t, 16);
    let Batch::Classes { x, .. } = &batch else { unreachable!() };
    let x = Tensor::from_slice(x, (16, 32), &Device::Cpu).unwrap();
    let a1 = fc1.forward(&x).unwrap().gelu().unwrap();
    let a2 = fc2.forward(&a1).unwrap().gelu().unwrap();
    assert_close(&ours, &head.forward(&(a1 + a2).unwrap()).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exported_gpt_loads_in_candle_nn_and_matches_the_engine() {
    let dir = scratch("gpt");
    let text = dir.join("words.txt");
    std::fs::write(&text, "it was the best of times, it was the worst of times; it was the age of wisdom. ".repeat(6))
        .unwrap();
    let (d, heads, ctx) = (16usize, 2usize, 8usize);
    let cfg = config(
        &format!("[model]\nkind = \"gpt\"\nlayers = 2\nd_model = {d}\nheads = {heads}\ncontext = {ctx}\ndropout = 0.0"),
        "[data]\nkind = \"text\"\nholdout_fraction = 0.1",
    );
    let t = train_and_export(&dir, cfg, Some(text.clone()), 8);
    let vocab: Vec<u8> = serde_json::from_str(t.metadata["tiebreak.vocab"].as_str().unwrap()).unwrap();
    assert_eq!(Some(vocab.clone()), t.run.data.byte_vocabulary(), "the metadata carries the vocabulary");
    assert_eq!(vocab.len(), t.run.model.classes());
    // A text run cannot be exported without its text (the vocabulary comes from it).
    let e =
        export(&ExportOptions { record: &dir.join("rec"), out: &dir.join("x.safetensors"), step: None, data: None })
            .unwrap_err();
    assert!(e.to_string().contains("pass --data"), "{e}");

    let v = vocab.len();
    let vb = &t.vb;
    let ln = |name: &str| {
        candle_nn::layer_norm(d, LayerNormConfig { eps: 1e-5, ..Default::default() }, vb.pp(name)).unwrap()
    };
    let lin = |i: usize, o: usize, name: &str| candle_nn::linear(i, o, vb.pp(name)).unwrap();
    let tok = candle_nn::embedding(v, d, vb.pp("tok_emb")).unwrap();
    let pos = vb.get((ctx, d), "pos_emb.weight").unwrap();
    let (batch, ours) = engine_logits(&t, 3);
    let Batch::Tokens { ids, b, .. } = &batch else { unreachable!() };
    let ids = Tensor::from_slice(ids, (*b, ctx), &Device::Cpu).unwrap();
    let mut x = tok.forward(&ids).unwrap().broadcast_add(&pos).unwrap();
    let dh = d / heads;
    let mask: Vec<f32> = (0..ctx * ctx).map(|k| if k % ctx > k / ctx { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (ctx, ctx), &Device::Cpu).unwrap();
    for l in 0..2 {
        let p = |s: &str| format!("blk{l}.{s}");
        let h = ln(&p("ln1")).forward(&x).unwrap();
        let qkv = lin(d, 3 * d, &p("attn.qkv")).forward(&h).unwrap();
        let split = |i: usize| {
            let part = qkv.narrow(D::Minus1, i * d, d).unwrap();
            part.reshape((*b, ctx, heads, dh)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let (q, k, vv) = (split(0), split(1), split(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let att = probs.matmul(&vv).unwrap().transpose(1, 2).unwrap().reshape((*b, ctx, d)).unwrap();
        x = (x + lin(d, d, &p("attn.proj")).forward(&att).unwrap()).unwrap();
        let h = ln(&p("ln2")).forward(&x).unwrap();
        let f = lin(d, 4 * d, &p("mlp.fc")).forward(&h).unwrap().gelu().unwrap();
        x = (x + lin(4 * d, d, &p("mlp.proj")).forward(&f).unwrap()).unwrap();
    }
    let logits = lin(d, v, "lm_head").forward(&ln("ln_f").forward(&x).unwrap()).unwrap();
    assert_close(&ours, &logits);
    let _ = std::fs::remove_dir_all(&dir);
}
