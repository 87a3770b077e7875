//! Criterion micro-benchmarks of the hot ops of a verified step, at the shapes the three
//! benchmark models use (GPT: 8×64 rows of width 128; CNN: batch 32 of 28×28), and of whole
//! steps (trainer, auditor replay, plain FP32 candle) on synthetic data of the models' shapes.
//!
//! ```text
//! cargo bench -p tiebreak --bench hot_ops
//! ```
//! The per-op kernels have their own matmul benchmark in `kernels/benches/matmul.rs`.

use std::hint::black_box;

use common::rounding::{ErrorBound, round_commit};
use common::state::{StateHash, Tensor, TrainingState};
use criterion::{Criterion, criterion_group, criterion_main};
use engine::model::Batch;
use engine::train::StepMode;
use kernels::parity::SplitMix64;
use kernels::{Conv2dSpec, Device, MatmulSpec, Profile, RowSpec};
use tiebreak::bench::{Setup, TRAINER_PROFILE, auditor_profile, baseline::Baseline};

fn ops(c: &mut Criterion) {
    let dev = Device::new(Profile::Cpu).expect("cpu device");
    let mut rng = SplitMix64(7);
    let (rows, d) = (512, 128);
    let x = rng.uniform(rows * d, 1.0);
    let w4 = rng.uniform(4 * d * d, 0.1);
    let gamma = vec![1.0f32; d];
    let beta = vec![0.0f32; d];
    let scores = rng.uniform(32 * 64 * 64, 3.0);
    let img = rng.uniform(32 * 28 * 28, 1.0);
    let kconv = rng.uniform(16 * 8 * 9, 0.3);
    let fmap = rng.uniform(32 * 8 * 14 * 14, 1.0);

    let mut g = c.benchmark_group("ops");
    g.sample_size(20);
    g.bench_function("matmul_512x128x512_bias_bound", |b| {
        let spec = MatmulSpec::new(rows, d, 4 * d).trans_b();
        b.iter(|| black_box(dev.matmul(&x, &w4, None, spec).expect("matmul")))
    });
    g.bench_function("layer_norm_512x128", |b| {
        b.iter(|| black_box(dev.layer_norm(&x, &gamma, &beta, rows, d, 1e-5).expect("layer_norm")))
    });
    g.bench_function("softmax_causal_32x64x64", |b| {
        b.iter(|| black_box(dev.softmax(&scores, RowSpec::causal(32 * 64, 64)).expect("softmax")))
    });
    g.bench_function("gelu_512x512", |b| {
        let big = rng.uniform(rows * 4 * d, 2.0);
        b.iter(|| black_box(dev.gelu(&big).expect("gelu")))
    });
    g.bench_function("conv2d_32x1x28x28_to_8", |b| {
        let spec = Conv2dSpec { n: 32, c_in: 1, h: 28, w: 28, c_out: 8, kh: 3, kw: 3, stride: 1, pad: 1 };
        let k1 = rng.uniform(8 * 9, 0.3);
        b.iter(|| black_box(dev.conv2d(&img, &k1, None, spec).expect("conv2d")))
    });
    g.bench_function("conv2d_32x8x14x14_to_16", |b| {
        let spec = Conv2dSpec { n: 32, c_in: 8, h: 14, w: 14, c_out: 16, kh: 3, kw: 3, stride: 1, pad: 1 };
        b.iter(|| black_box(dev.conv2d(&fmap, &kconv, None, spec).expect("conv2d")))
    });

    // The rounding step itself: FP64 → FP32 with a bound, logging the ambiguous elements.
    let spec = MatmulSpec::new(rows, d, 4 * d).trans_b();
    let out = dev.matmul(&x, &w4, None, spec).expect("matmul");
    g.bench_function("round_commit_262144", |b| {
        b.iter(|| black_box(round_commit("fwd/x/out", &out.values, &out.bound).expect("round")))
    });
    g.bench_function("round_commit_262144_exact", |b| {
        b.iter(|| black_box(round_commit("fwd/x/out", &out.values, &ErrorBound::Exact).expect("round")))
    });
    let mut state = TrainingState::new(1);
    state.insert("param/w", Tensor::new(vec![1 << 20], rng.uniform(1 << 20, 1.0)).expect("tensor")).expect("insert");
    g.bench_function("state_digest_1M_values_sha256", |b| b.iter(|| black_box(state.digest(StateHash::Sha256))));
    g.bench_function("state_digest_1M_values_blake3", |b| b.iter(|| black_box(state.digest(StateHash::Blake3))));
    g.finish();
}

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("step");
    g.sample_size(10);
    for model in ["mnist-mlp", "mnist-cnn", "shakespeare-gpt"] {
        let setup = Setup::new(model, None).expect("synthetic setup");
        let trainer = setup.run(TRAINER_PROFILE, 1).expect("trainer run");
        let auditor = setup.run(auditor_profile(), 1).expect("auditor run");
        let init = trainer.initial_state().expect("initial state");
        let out = trainer.step(&init, 1, StepMode::Commit { paper: false }, None).expect("step");
        g.bench_function(format!("{model}/trainer"), |b| {
            b.iter(|| black_box(trainer.step(&init, 1, StepMode::Commit { paper: false }, None).expect("step")))
        });
        g.bench_function(format!("{model}/replay-{}", auditor_profile().name()), |b| {
            b.iter(|| black_box(auditor.step(&init, 1, StepMode::Replay(&out.log), None).expect("replay")))
        });
        let batch = Batch::gather(&trainer.data, &trainer.batch_indices(1).0);
        let mut fp32 = Baseline::for_run(&trainer, &init).expect("baseline");
        g.bench_function(format!("{model}/fp32-candle"), |b| b.iter(|| black_box(fp32.step(&batch).expect("fp32"))));
    }
    g.finish();
}

criterion_group!(benches, ops, steps);
criterion_main!(benches);
