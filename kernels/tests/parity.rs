//! Cross-profile soundness: one test body for every op and every ordered pair of profiles —
//! the CPU profiles, `cuda` when this build has the feature and a GPU is present, and (with the
//! feature) the host emulation of the `cuda` profile — plus checks that the profiles really
//! differ, that `cpu` ignores the thread count and that `cuda` ignores the launch configuration.

use kernels::parity::{SplitMix64, cases, compare, tightness, tightness_on};
use kernels::{Device, ErrorBound, KernelError, MatmulSpec, Profile, RowSpec};

fn devices() -> Vec<Device> {
    Profile::CPU.iter().map(|&p| Device::new(p).unwrap()).collect()
}

/// The host emulation of the `cuda` profile (needs a C compiler): `None`, with the reason
/// printed, where it cannot be built, unless `TIEBREAK_REQUIRE_CUDA_EMU=1` makes that a failure.
#[cfg(feature = "cuda")]
fn emulated_cuda() -> Option<Device> {
    match Device::cuda_emulated() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("TIEBREAK_REQUIRE_CUDA_EMU").as_deref() != Ok("1"),
                "TIEBREAK_REQUIRE_CUDA_EMU=1: {e}"
            );
            println!("skipped the emulated cuda profile: {e}");
            None
        }
    }
}

/// Every device to compare, with a label: the CPU profiles, real `cuda` if present, the
/// emulated `cuda` if it can be built. Prints what is skipped and why.
fn all_devices() -> Vec<(String, Device)> {
    let (devs, cuda_missing) = kernels::parity::devices();
    if let Some(why) = cuda_missing {
        // The GPU check (scripts/gpu-check.sh) sets this: there, no CUDA pairs is a failure.
        assert!(std::env::var("TIEBREAK_REQUIRE_GPU").as_deref() != Ok("1"), "TIEBREAK_REQUIRE_GPU=1: {why}");
        println!("no CUDA pairs: {why}");
    }
    #[allow(unused_mut)] // reason: only the `cuda` feature adds the emulation
    let mut out: Vec<(String, Device)> = devs
        .into_iter()
        .map(|d| (d.gpu_description().map_or_else(|| d.profile().to_string(), |g| format!("cuda [{g}]")), d))
        .collect();
    #[cfg(feature = "cuda")]
    out.extend(emulated_cuda().map(|d| ("cuda [host emulation]".to_string(), d)));
    out
}

#[test]
fn every_op_every_profile_pair_is_within_bounds() {
    let devs = all_devices();
    println!("devices: {:?}", devs.iter().map(|d| &d.0).collect::<Vec<_>>());
    for seed in [1u64, 0xDEAD_BEEF, 42] {
        println!("seed {seed}");
        for case in cases(seed) {
            let results: Vec<_> = devs
                .iter()
                .map(|(name, d)| case.run(d).unwrap_or_else(|e| panic!("{case:?} on {name}: {e}")))
                .collect();
            for (i, ra) in results.iter().enumerate() {
                for (j, rb) in results.iter().enumerate() {
                    if i != j {
                        let (pa, pb) = (&devs[i].0, &devs[j].0);
                        if let Err(e) = compare(ra, rb) {
                            panic!("seed {seed}, {case:?}, {pa} vs {pb}: {e}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn tightness_is_reported_and_sound() {
    let t = tightness(7);
    println!("tightness (max |vA−vB|/bound per op):");
    for (op, r) in &t {
        println!("  {op:24} {r:.3e}");
    }
    let with_cuda: Vec<Device> = all_devices().into_iter().map(|d| d.1).collect();
    if with_cuda.len() > Profile::CPU.len() {
        let tc = tightness_on(&with_cuda, 7);
        println!("with the cuda profile:");
        for (op, r) in &tc {
            println!("  {op:24} {r:.3e}");
            assert!(*r <= 1.0, "{op} violated its bound with cuda: ratio {r}");
        }
    }
    assert!(t.len() >= 25, "every op is covered: {t:?}");
    for (op, r) in &t {
        assert!(*r <= 1.0, "{op} violated its bound: ratio {r}");
    }
    // Reductions must actually differ somewhere, or the ratios say nothing.
    let mm = t.iter().find(|(op, _)| *op == "matmul").unwrap().1;
    assert!(mm > 0.0, "matmul profiles never differed");
}

fn differing_fraction(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count() as f64 / a.len() as f64
}

/// Every pair of CPU profiles computes different bits on most outputs of a realistic product
/// (the most differing shape counts), and `cpu-splitk` on every shape. Measured on an Intel
/// Xeon with AVX-512: `gemm`'s kernel for 64×784×256 sums in the same order as `cpu-seq`, so
/// `cpu` and `cpu-seq` agree on every bit there (0 %) while they differ on 92 % at
/// 16×2048×16; on an AMD EPYC they differ on both. `cpu-alt`, the fast second profile, must
/// differ from `cpu` on most outputs of every shape (see [`cpu_alt_differs_from_cpu_on_most_outputs`]).
#[test]
fn profiles_give_different_bits_on_realistic_shapes() {
    let devs = devices();
    let np = devs.len();
    let mut rng = SplitMix64(99);
    let mut most = vec![vec![0.0f64; np]; np];
    for (m, k, n) in [(64, 784, 256), (16, 2048, 16)] {
        let a = rng.uniform(m * k, 1.0);
        let b = rng.uniform(k * n, 1.0);
        let r: Vec<_> = devs.iter().map(|d| d.matmul(&a, &b, None, MatmulSpec::new(m, k, n)).unwrap()).collect();
        for i in 0..np {
            for j in i + 1..np {
                let f = differing_fraction(&r[i].values, &r[j].values);
                println!(
                    "matmul {m}x{k}x{n}: {} vs {}: {:.1}% of outputs differ",
                    devs[i].profile(),
                    devs[j].profile(),
                    100.0 * f
                );
                most[i][j] = most[i][j].max(f);
                let (pi, pj) = (devs[i].profile(), devs[j].profile());
                if [pi, pj].contains(&Profile::CpuSplitK) || [pi, pj] == [Profile::Cpu, Profile::CpuAlt] {
                    assert!(f > 0.3, "{pi} and {pj} agree too often ({f})");
                }
            }
        }
    }
    for i in 0..np {
        for j in i + 1..np {
            let f = most[i][j];
            assert!(f > 0.3, "{} and {} agree too often on every shape ({f})", devs[i].profile(), devs[j].profile());
        }
    }
    // The GPU's fractions are reported, not required: its order and exp are its own.
    if let (_, None) = kernels::parity::devices() {
        let cuda = Device::new(Profile::Cuda).unwrap();
        for (m, k, n) in [(64, 784, 256), (16, 2048, 16)] {
            let a = rng.uniform(m * k, 1.0);
            let b = rng.uniform(k * n, 1.0);
            let g = cuda.matmul(&a, &b, None, MatmulSpec::new(m, k, n)).unwrap();
            for d in &devs {
                let c = d.matmul(&a, &b, None, MatmulSpec::new(m, k, n)).unwrap();
                let f = differing_fraction(&g.values, &c.values);
                println!("matmul {m}x{k}x{n}: cuda vs {}: {:.1}% of outputs differ", d.profile(), 100.0 * f);
            }
        }
    }
    // Softmax rows (exp + reduction) differ too.
    let x = rng.uniform(64 * 64, 3.0);
    let r: Vec<_> = devs.iter().map(|d| d.softmax(&x, RowSpec::causal(64, 64)).unwrap()).collect();
    for i in 0..np {
        for j in i + 1..np {
            let f = differing_fraction(&r[i].values, &r[j].values);
            assert!(f > 0.1, "softmax: {} and {} agree too often ({f})", devs[i].profile(), devs[j].profile());
        }
    }
}

/// The fast pair an audit of a `cpu` trainer uses by default: `cpu-alt` computes other FP64
/// bits than `cpu` on most outputs of every product shape the presets run (MNIST layers
/// forward and backward, a 512³ product, GPT's attention and MLP shapes, a conv's im2col
/// product), with transposes and a bias, and on a share of the results of softmax, layer
/// norm, GELU and tanh, which go through its own reductions and transcendentals. (Column sums
/// of FP32 values this size are exact in every order, so they cannot differ.) Short sums round less
/// often, so GPT's attention products (k = 32 and 64, measured 33 % and 56 % differing on an
/// Intel Xeon) need only a fifth; every product with k ≥ 64 must differ on most outputs.
#[test]
fn cpu_alt_differs_from_cpu_on_most_outputs() {
    let cpu = Device::new(Profile::Cpu).unwrap();
    let alt = Device::new(Profile::CpuAlt).unwrap();
    let mut rng = SplitMix64(2020);
    let shapes = [
        MatmulSpec::new(512, 512, 512),
        MatmulSpec::new(64, 784, 256),
        MatmulSpec::new(64, 784, 128),
        MatmulSpec::new(784, 64, 128).trans_a(),
        MatmulSpec::new(64, 128, 784).trans_b(),
        MatmulSpec::new(16, 2048, 16),
        MatmulSpec::new(512, 128, 384),
        MatmulSpec::new(512, 512, 128),
        MatmulSpec::batched(32, 64, 32, 64).trans_b(),
        MatmulSpec::batched(32, 64, 64, 32),
        MatmulSpec::new(16, 72, 1568),
    ];
    for spec in shapes {
        let MatmulSpec { batch, m, k, n, .. } = spec;
        let a = rng.uniform(batch * m * k, 1.0);
        let b = rng.uniform(batch * k * n, 1.0);
        let bias = rng.uniform(n, 1.0);
        for bias in [None, Some(&bias[..])] {
            let c = cpu.matmul(&a, &b, bias, spec).unwrap();
            let d = alt.matmul(&a, &b, bias, spec).unwrap();
            let f = differing_fraction(&c.values, &d.values);
            println!("matmul {batch}x{m}x{k}x{n} (bias: {}): cpu vs cpu-alt: {:.1}% differ", bias.is_some(), 100.0 * f);
            let required = if k >= 64 { 0.5 } else { 0.2 };
            assert!(f > required, "{spec:?}: cpu-alt agrees with cpu on {:.1}% of outputs", 100.0 * (1.0 - f));
        }
    }
    let x = rng.uniform(512 * 128, 3.0);
    type RowOp = fn(&Device, &[f32]) -> Vec<f64>;
    let ops: [(&str, RowOp); 4] = [
        ("softmax", |d, x| d.softmax(x, RowSpec::new(512, 128)).unwrap().values),
        ("layer_norm", |d, x| d.layer_norm(x, &[1.0; 128], &[0.0; 128], 512, 128, 1e-5).unwrap().y.values),
        ("gelu", |d, x| d.gelu(x).unwrap().values),
        ("tanh", |d, x| d.tanh(x).unwrap().values),
    ];
    for (name, op) in ops {
        let f = differing_fraction(&op(&cpu, &x), &op(&alt, &x));
        println!("{name}: cpu vs cpu-alt: {:.1}% differ", 100.0 * f);
        assert!(f > 0.05, "{name}: cpu-alt agrees with cpu too often ({f})");
    }
}

#[test]
fn cpu_profiles_are_thread_count_independent() {
    for dev in [Profile::Cpu, Profile::CpuAlt].map(|p| Device::new(p).unwrap()) {
        thread_count_independent(&dev);
    }
}

fn thread_count_independent(dev: &Device) {
    let mut rng = SplitMix64(5);
    let shapes = [(64, 784, 256), (200, 300, 150), (512, 64, 512), (3, 5, 7)];
    let inputs: Vec<_> = shapes
        .iter()
        .map(|&(m, k, n)| (rng.uniform(m * k, 1.0), rng.uniform(k * n, 1.0), MatmulSpec::new(m, k, n)))
        .collect();
    let x = rng.uniform(128 * 100, 2.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
            // Values and bounds: the bound's refinement runs its chunks on every thread there is.
            let mut out: Vec<Vec<u64>> = inputs
                .iter()
                .flat_map(|(a, b, s)| {
                    let r = dev.matmul(a, b, None, *s).unwrap();
                    let ErrorBound::PerElement(d) = &r.bound else { panic!("matmul bound {:?}", r.bound) };
                    [bits(&r.values), bits(d)]
                })
                .collect();
            out.push(dev.softmax(&x, RowSpec::new(128, 100)).unwrap().values.iter().map(|v| v.to_bits()).collect());
            out.push(dev.sum_rows(&x, 128, 100).unwrap().values.iter().map(|v| v.to_bits()).collect());
            out
        })
    };
    let one = run(1);
    for t in [2, 3, 4] {
        assert!(one == run(t), "{} results with {t} threads differ from 1 thread", dev.profile());
    }
}

#[test]
fn profile_names_round_trip_and_bad_names_are_explained() {
    for p in Profile::ALL {
        assert_eq!(p.name().parse::<Profile>().unwrap(), p);
    }
    assert_eq!("cuda".parse::<Profile>().unwrap(), Profile::Cuda, "cuda parses in every build");
    let e = "gpu-fast".parse::<Profile>().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("gpu-fast") && msg.contains("cpu-seq") && msg.contains("cpu-splitk") && msg.contains("cpu-alt"),
        "{msg}"
    );
    assert!(msg.contains("cuda"), "{msg}");
}

/// Without the feature, or without a driver, the cuda device is an error that says why.
#[test]
fn cuda_without_support_or_driver_is_a_clear_error() {
    match Device::new(Profile::Cuda) {
        Ok(d) => println!("skipped: a GPU is present ({})", d.gpu_description().unwrap_or_default()),
        Err(e) => {
            assert!(matches!(e, KernelError::DeviceUnavailable { profile: Profile::Cuda, .. }), "{e:?}");
            let msg = e.to_string();
            println!("{msg}");
            assert!(msg.starts_with("device profile cuda is unavailable: "), "{msg}");
            if cfg!(feature = "cuda") {
                assert!(msg.contains("CUDA driver") || msg.contains("GPU") || msg.contains("library"), "{msg}");
            } else {
                assert!(msg.contains("rebuild with `--features cuda`"), "{msg}");
            }
            // Asking again gives the same answer (the outcome is kept), still without a panic.
            assert_eq!(Device::new(Profile::Cuda).unwrap_err().to_string(), msg);
        }
    }
}

/// A `cuda` device's results do not depend on the threads per block, and repeat exactly.
#[cfg(feature = "cuda")]
#[test]
fn cuda_results_ignore_the_launch_configuration_and_repeat() {
    let mut gpus: Vec<(String, Device)> =
        all_devices().into_iter().filter(|d| d.1.profile() == Profile::Cuda).collect();
    if gpus.is_empty() {
        println!("skipped: neither a GPU nor the host emulation is available");
        return;
    }
    for (name, dev) in gpus.drain(..) {
        let bits = |d: &Device| -> Vec<Vec<u64>> {
            cases(3)
                .iter()
                .flat_map(|c| c.run(d).unwrap_or_else(|e| panic!("{c:?} on {name}: {e}")))
                .map(|b| b.values.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        let reference = bits(&dev);
        assert!(reference == bits(&dev), "{name}: a second run gave other bits");
        for threads in [1, 32, 97, 1024] {
            let d = dev.clone().with_cuda_block_threads(threads).unwrap();
            assert!(reference == bits(&d), "{name}: {threads} threads per block changed the results");
        }
        println!("{name}: identical bits for 256 (twice), 1, 32, 97 and 1024 threads per block");
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let d = Device::new(Profile::Cpu).unwrap();
    let e = d.matmul(&[1.0; 5], &[1.0; 6], None, MatmulSpec::new(2, 3, 2)).unwrap_err();
    assert!(matches!(e, KernelError::Shape { op: "matmul", .. }), "{e}");
    assert!(d.matmul(&[1.0; 6], &[1.0; 6], Some(&[0.0; 3]), MatmulSpec::new(2, 3, 2)).is_err());
    assert!(d.matmul(&[], &[], None, MatmulSpec::batched(usize::MAX, 2, 2, 2)).is_err());
    assert!(d.softmax(&[0.0; 10], RowSpec::causal(5, 2)).is_err());
    assert!(d.softmax(&[0.0; 9], RowSpec::new(2, 5)).is_err());
    assert!(d.cross_entropy(&[0.0; 6], &[0, 3], 2, 3).is_err());
    assert!(d.layer_norm(&[0.0; 6], &[1.0; 3], &[0.0; 3], 2, 3, 0.0).is_err());
    // A constant row with a tiny eps: rstd = 1e150 (an FP32 overflow downstream), and no bound
    // is NaN (it was: 0 × an infinite rstd error).
    for p in [Profile::Cpu, Profile::CpuAlt, Profile::CpuSeq] {
        let out = Device::new(p).unwrap().layer_norm(&[0.0; 6], &[1.0; 3], &[0.0; 3], 2, 3, 1e-300).unwrap();
        let kernels::ErrorBound::PerElement(b) = &out.y.bound else { panic!("per element") };
        assert!(b.iter().all(|x| x.is_finite()), "{p:?}: {b:?}");
    }
    assert!(d.embedding(&[0.0; 6], 3, 2, &[3]).is_err());
    assert!(d.dropout(&[1.0], &[true], 1.0).is_err());
    let cs = kernels::Conv2dSpec { n: 1, c_in: 1, h: 2, w: 2, c_out: 1, kh: 3, kw: 3, stride: 1, pad: 0 };
    assert!(d.conv2d(&[0.0; 4], &[0.0; 9], None, cs).is_err());
    let ps = kernels::Pool2dSpec { n: 1, c: 1, h: 4, w: 4, kh: 2, kw: 2, stride: 0, pad: 0 };
    assert!(d.max_pool2d(&[0.0; 16], ps).is_err());
    assert!(d.max_pool2d_backward(&[0.0; 4], &[99, 0, 0, 0], kernels::Pool2dSpec { stride: 2, ..ps }).is_err());
}

#[test]
fn matmul_bound_alone_equals_the_ops_bound() {
    let d = Device::new(Profile::Cpu).unwrap();
    let mut rng = SplitMix64(3);
    let spec = MatmulSpec::batched(2, 7, 9, 5).trans_a();
    let (a, b, bias) = (rng.uniform(2 * 63, 1.0), rng.uniform(2 * 45, 1.0), rng.uniform(5, 1.0));
    let full = d.matmul(&a, &b, Some(&bias), spec).unwrap();
    let alone = d.matmul_bound(&a, &b, Some(&bias), spec).unwrap();
    assert_eq!(full.bound, kernels::ErrorBound::PerElement(alone));
}

/// The products of one training step of a linear layer on `rows` inputs of width `i` and
/// outputs of width `o`: forward, the weight gradient and (unless the layer reads the data)
/// the input gradient.
#[cfg(feature = "cuda")]
fn linear_gemms(rows: usize, i: usize, o: usize, input_grad: bool) -> Vec<MatmulSpec> {
    let mut v = vec![MatmulSpec::new(rows, i, o), MatmulSpec::new(i, rows, o).trans_a()];
    if input_grad {
        v.push(MatmulSpec::new(rows, o, i).trans_b());
    }
    v
}

/// The GEMMs of one step of `configs/mnist-mlp.toml` (batch 64, 784 → 128 → 10) and of
/// `configs/shakespeare-gpt.toml` (batch 8, context 64, d_model 128, 4 heads, 4 layers, the
/// 62-byte vocabulary of `shakespeare.txt`), timed on the GPU in FP32 and FP64 with operands
/// resident on the device: the GEMM-bound floor of a plain FP32 step (no elementwise ops, no
/// transfers). Run by `scripts/gpu-check.sh` (`--ignored`); needs a GPU.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU; run by scripts/gpu-check.sh"]
fn cuda_step_gemm_floor() {
    use kernels::GemmPrecision;
    let dev = Device::new(Profile::Cuda).expect("this check needs a GPU");
    let mlp: Vec<MatmulSpec> = [linear_gemms(64, 784, 128, false), linear_gemms(64, 128, 10, true)].concat();
    let (b, t, d, h, layers, vocab) = (8, 64, 128, 4, 4, 62);
    let (rows, dh) = (b * t, d / h);
    let mut gpt = Vec::new();
    for _ in 0..layers {
        gpt.extend(linear_gemms(rows, d, 3 * d, true));
        gpt.push(MatmulSpec::batched(b * h, t, dh, t).trans_b()); // scores Q·Kᵀ
        gpt.push(MatmulSpec::batched(b * h, t, t, dh)); // context P·V
        gpt.push(MatmulSpec::batched(b * h, t, t, dh)); // dQ = dS·K
        gpt.push(MatmulSpec::batched(b * h, t, t, dh).trans_a()); // dK = dSᵀ·Q
        gpt.push(MatmulSpec::batched(b * h, t, dh, t).trans_b()); // dP = dC·Vᵀ
        gpt.push(MatmulSpec::batched(b * h, t, t, dh).trans_a()); // dV = Pᵀ·dC
        gpt.extend(linear_gemms(rows, d, d, true));
        gpt.extend(linear_gemms(rows, d, 4 * d, true));
        gpt.extend(linear_gemms(rows, 4 * d, d, true));
    }
    gpt.extend(linear_gemms(rows, d, vocab, true));
    for (model, specs) in [("mnist-mlp", &mlp), ("gpt", &gpt)] {
        let f32_s = dev.cuda_gemm_seconds(specs, GemmPrecision::F32, 200).unwrap();
        let f64_s = dev.cuda_gemm_seconds(specs, GemmPrecision::F64, 200).unwrap();
        assert!(f32_s > 0.0 && f64_s > 0.0, "{model}: timings must be positive");
        let flops: usize = specs.iter().map(|s| 2 * s.batch * s.m * s.k * s.n).sum();
        println!(
            "GEMM_FLOOR {{\"model\": \"{model}\", \"gemms\": {}, \"gflop\": {:.4}, \"f32_s\": {f32_s:.3e}, \"f64_s\": {f64_s:.3e}}}",
            specs.len(),
            flops as f64 / 1e9
        );
    }
}
