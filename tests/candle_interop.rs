//! Interop: the exported safetensors load into a candle-nn model of the same architecture, and
//! that model computes the same logits as the verified engine (up to FP32-vs-FP64 arithmetic).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};
use engine::model::{Batch, Ctx};
use engine::spec::Config;
use kernels::Profile;
use trainer_agent::{Session, SessionOptions};

#[test]
fn exported_mlp_loads_in_candle_nn_and_matches_the_engine() {
    let dir = std::env::temp_dir().join(format!("tb-candle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/synthetic-mlp.toml");
    let config = Config::from_toml(&std::fs::read_to_string(path).unwrap(), path).unwrap();
    let opts = SessionOptions {
        config,
        data: None,
        out: dir.join("rec"),
        device: Profile::Cpu,
        steps: Some(8),
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
    let run_data = s.run().data.clone();
    let model = s.run().model.clone();
    let device = kernels::Device::new(Profile::CpuSeq).unwrap();
    s.finish().unwrap();
    let file = dir.join("model.safetensors");
    trainer_agent::export::export_record(&dir.join("rec"), &file).unwrap();

    // candle-nn: Linear(32→64) → ReLU → Linear(64→8), weights from the file.
    let vb = VarBuilder::from_buffered_safetensors(std::fs::read(&file).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let fc1 = candle_nn::linear(32, 64, vb.pp("fc1")).unwrap();
    let fc2 = candle_nn::linear(64, 8, vb.pp("fc2")).unwrap();
    let idx: Vec<u64> = (0..16).map(|k| run_data.holdout_index(k) as u64).collect();
    let batch = Batch::gather(&run_data, &idx);
    let Batch::Classes { x, .. } = &batch else { unreachable!() };
    let input = Tensor::from_slice(x, (16, 32), &Device::Cpu).unwrap();
    let hidden = fc1.forward(&input).unwrap().relu().unwrap();
    let candle_logits: Vec<f32> = fc2.forward(&hidden).unwrap().flatten_all().unwrap().to_vec1().unwrap();

    let mut rounder = common::rounding::Rounder::commit();
    let mut ctx = Ctx::new(&device, &mut rounder, 0, 0);
    let (_, ours) = model.forward_logits(&mut ctx, &state, &batch).unwrap();
    let ours = ours.unwrap();
    assert_eq!(ours.len(), candle_logits.len());
    for (a, b) in ours.iter().zip(&candle_logits) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "engine {a} vs candle {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
