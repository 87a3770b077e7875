//! The `cpu` profile's FP64 matmul (bound included) against candle's FP32 CPU matmul, and the
//! bound computation's share of the op's time. Prints one JSON line per shape with the ratios.
//!
//! The JSON figures are medians over repetitions that run ours, ours without the bound and
//! candle back to back, so load from other processes hits all three alike. `bound_ms` is the
//! median of the per-repetition differences `ours − ours without the bound` (everything the
//! bound costs: norms, the outer product, the ambiguity check and the tight refinement);
//! `bound_share` is `bound_ms / tiebreak_cpu_ms`, `bound_overhead` is `bound_ms / unbounded_ms`;
//! `cs_bound_ms` times [`Device::matmul_bound`] (operand conversion and Cauchy–Schwarz bound).
//! `cpu_alt_ms` is the same op on the `cpu-alt` profile (the auditor's default for a `cpu`
//! trainer), timed in the same repetitions; `alt_vs_cpu` is the median of the per-repetition
//! ratios `cpu-alt / cpu`, with their min and max.
//! `cpu_model`, `fp64_kernels` and `fp32_kernels` name the CPU and the `gemm` crate's build
//! each side ran: the FP64 side runs AVX-512 kernels where the CPU has them, candle's FP32
//! side the crate's default AVX2 ones, or AVX-512 too with `--features fp32-avx512`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use kernels::parity::SplitMix64;
use kernels::{Device, MatmulSpec, Profile};

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHAPES: [(usize, usize, usize); 2] = [(512, 512, 512), (64, 784, 256)];

/// `"cpu_model":…,"fp64_kernels":…,"fp32_kernels":…`: the CPU (`/proc/cpuinfo`, empty where
/// there is none) and which build of the `gemm` crate's kernels each side runs on it. The FP64
/// side has the crate's AVX-512 kernels with this crate's default `fp64-avx512` feature; the
/// FP32 side (candle's) has them only with its `fp32-avx512` feature.
fn machine() -> String {
    let model = kernels::host::cpuinfo_field("model name");
    #[cfg(target_arch = "x86_64")]
    let (avx512, fma) = (std::arch::is_x86_feature_detected!("avx512f"), std::arch::is_x86_feature_detected!("fma"));
    #[cfg(not(target_arch = "x86_64"))]
    let (avx512, fma) = (false, false);
    let build = |wide: bool| {
        if wide {
            "avx512"
        } else if fma {
            "avx2+fma"
        } else {
            "other"
        }
    };
    format!(
        "\"cpu_model\":{:?},\"fp64_kernels\":\"{}\",\"fp32_kernels\":\"{}\"",
        model.unwrap_or_default(),
        build(avx512 && cfg!(feature = "fp64-avx512")),
        build(avx512 && cfg!(feature = "fp32-avx512"))
    )
}

fn secs(f: impl FnOnce()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64()
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn bench(c: &mut Criterion) {
    kernels::keep_freed_pages();
    let dev = Device::new(Profile::Cpu).expect("cpu device");
    let alt_dev = Device::new(Profile::CpuAlt).expect("cpu-alt device");
    let cdev = candle_core::Device::Cpu;
    for (m, k, n) in SHAPES {
        let mut rng = SplitMix64(1);
        let a = rng.uniform(m * k, 1.0);
        let b = rng.uniform(k * n, 1.0);
        let spec = MatmulSpec::new(m, k, n);
        let ta = candle_core::Tensor::from_vec(a.clone(), (m, k), &cdev).expect("tensor");
        let tb = candle_core::Tensor::from_vec(b.clone(), (k, n), &cdev).expect("tensor");
        let ours = || drop(black_box(dev.matmul(&a, &b, None, spec).expect("matmul")));
        let alt = || drop(black_box(alt_dev.matmul(&a, &b, None, spec).expect("matmul")));
        let unbounded = || drop(black_box(dev.matmul_unbounded(&a, &b, None, spec).expect("matmul")));
        let cs_bound = || drop(black_box(dev.matmul_bound(&a, &b, None, spec).expect("bound")));
        let candle = || drop(black_box(ta.matmul(&tb).expect("candle matmul")));

        let mut g = c.benchmark_group(format!("matmul_{m}x{k}x{n}"));
        g.bench_function("tiebreak_cpu_f64_bounded", |bch| bch.iter(ours));
        g.bench_function("tiebreak_cpu_alt_f64_bounded", |bch| bch.iter(alt));
        g.bench_function("tiebreak_cpu_f64_unbounded", |bch| bch.iter(unbounded));
        g.bench_function("tiebreak_cs_bound_only", |bch| bch.iter(cs_bound));
        g.bench_function("candle_cpu_f32", |bch| bch.iter(candle));
        g.finish();

        let reps = 41;
        let times: Vec<[f64; 5]> = (0..reps + 1)
            .map(|_| [secs(ours), secs(unbounded), secs(cs_bound), secs(candle), secs(alt)])
            .skip(1)
            .collect();
        let col = |i: usize| times.iter().map(|t| t[i]).collect::<Vec<f64>>();
        let (ours_t, unb_t, cs_t, candle_t, alt_t) = (col(0), col(1), col(2), col(3), col(4));
        let alt_ratios: Vec<f64> = times.iter().map(|t| t[4] / t[0]).collect();
        let (alt_min, alt_max) = alt_ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let (alt_ms, alt_vs_cpu) = (median(alt_t), median(alt_ratios));
        let bound = median(ours_t.iter().zip(&unb_t).map(|(o, u)| o - u).collect());
        let (ours, unb, cs, candle) = (median(ours_t), median(unb_t), median(cs_t), median(candle_t));
        println!(
            "{{\"bench\":\"matmul\",{},\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{},\"tiebreak_cpu_ms\":{:.3},\"unbounded_ms\":{:.3},\"bound_ms\":{:.3},\"cs_bound_ms\":{:.3},\"candle_f32_ms\":{:.3},\"ratio_vs_candle\":{:.3},\"bound_share\":{:.3},\"bound_overhead\":{:.3},\"cpu_alt_ms\":{:.3},\"alt_vs_cpu\":{:.3},\"alt_vs_cpu_min\":{:.3},\"alt_vs_cpu_max\":{:.3}}}",
            machine(),
            rayon::current_num_threads(),
            ours * 1e3,
            unb * 1e3,
            bound * 1e3,
            cs * 1e3,
            candle * 1e3,
            ours / candle,
            bound / ours,
            bound / unb,
            alt_ms * 1e3,
            alt_vs_cpu,
            alt_min,
            alt_max
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
