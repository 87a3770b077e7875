//! The `cpu` profile's FP64 matmul (bound included) against candle's FP32 CPU matmul, and the
//! bound computation's share of the op's time. Prints one JSON line per shape with the ratios.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use kernels::parity::SplitMix64;
use kernels::{Device, MatmulSpec, Profile};

const SHAPES: [(usize, usize, usize); 2] = [(512, 512, 512), (64, 784, 256)];

fn median_secs(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn bench(c: &mut Criterion) {
    let dev = Device::new(Profile::Cpu).expect("cpu device");
    let cdev = candle_core::Device::Cpu;
    for (m, k, n) in SHAPES {
        let mut rng = SplitMix64(1);
        let a = rng.uniform(m * k, 1.0);
        let b = rng.uniform(k * n, 1.0);
        let spec = MatmulSpec::new(m, k, n);
        let ta = candle_core::Tensor::from_vec(a.clone(), (m, k), &cdev).expect("tensor");
        let tb = candle_core::Tensor::from_vec(b.clone(), (k, n), &cdev).expect("tensor");
        let mut g = c.benchmark_group(format!("matmul_{m}x{k}x{n}"));
        g.bench_function("tiebreak_cpu_f64_bounded", |bch| {
            bch.iter(|| black_box(dev.matmul(&a, &b, None, spec).expect("matmul")))
        });
        g.bench_function("tiebreak_bound_only", |bch| {
            bch.iter(|| black_box(dev.matmul_bound(&a, &b, None, spec).expect("bound")))
        });
        g.bench_function("candle_cpu_f32", |bch| bch.iter(|| black_box(ta.matmul(&tb).expect("candle matmul"))));
        g.finish();

        let reps = 31;
        let ours = median_secs(|| drop(black_box(dev.matmul(&a, &b, None, spec).expect("matmul"))), reps);
        let bound = median_secs(|| drop(black_box(dev.matmul_bound(&a, &b, None, spec).expect("bound"))), reps);
        let candle = median_secs(|| drop(black_box(ta.matmul(&tb).expect("candle matmul"))), reps);
        println!(
            "{{\"bench\":\"matmul\",\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{},\"tiebreak_cpu_ms\":{:.3},\"bound_ms\":{:.3},\"candle_f32_ms\":{:.3},\"ratio_vs_candle\":{:.3},\"bound_share\":{:.3}}}",
            rayon::current_num_threads(),
            ours * 1e3,
            bound * 1e3,
            candle * 1e3,
            ours / candle,
            bound / ours
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
