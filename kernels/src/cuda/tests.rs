//! The kernel sources under NVRTC (a plain library: no GPU needed), the parameter-order rule,
//! and the DGEMM mapping. Ops themselves are tested against the CPU profiles in `parity`.

use super::*;

/// Whether NVRTC can be loaded; with `TIEBREAK_REQUIRE_NVRTC=1` its absence fails the test.
fn nvrtc_loadable() -> bool {
    // SAFETY: only tries `dlopen` on NVRTC's names and closes what it opened.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        assert!(
            std::env::var("TIEBREAK_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "TIEBREAK_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
        println!(
            "skipped: libnvrtc cannot be loaded here; put a folder holding libnvrtc.so.12 on LD_LIBRARY_PATH \
             (.ci/run takes it from the nvidia-cuda-nvrtc-cu12 wheel)"
        );
    }
    present
}

/// The body of PTX function `.entry name` (up to the next `.entry`).
fn entry<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx.find(&format!(".entry {name}(")).unwrap_or_else(|| panic!("no .entry {name} in the PTX"));
    let body = &ptx[start + 1..];
    &ptx[start..start + 1 + body.find(".entry ").unwrap_or(body.len())]
}

#[test]
fn nvrtc_compiles_every_kernel() {
    if !nvrtc_loadable() {
        return;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through the valid pointers it is given.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}");
    let kernels = signatures(KERNELS_CU).expect("kernel declarations parse");
    // Every architecture of a GPU with Tensor-core FP64 or later, which every NVRTC from 12.0 to
    // 13.x supports (13 dropped compute_60 and compute_70).
    for arch in ["compute_75", "compute_80", "compute_86", "compute_89", "compute_90"] {
        let ptx = match cudarc::nvrtc::compile_ptx_with_opts(cuda_source(), nvrtc_options(arch)) {
            Ok(p) => p.to_src(),
            Err(e) => panic!("NVRTC {major}.{minor} rejected the kernels for {arch}: {e}"),
        };
        for name in kernels.keys() {
            entry(&ptx, name);
        }
        // The optimizers are exact unfused sequences: every operation explicitly rounded (PTX
        // `.rn`, which ptxas never contracts), no FMA.
        for name in ["sgd", "adamw"] {
            let body = entry(&ptx, name);
            assert!(!body.contains("fma."), "{arch}: {name} contains an FMA:\n{body}");
            for op in ["add", "sub", "mul", "div", "sqrt"] {
                assert!(!body.contains(&format!("{op}.f64")), "{arch}: {name} has an unrounded {op}.f64:\n{body}");
            }
        }
        // Elsewhere contraction is on (--fmad=true), as the module docs say.
        assert!(entry(&ptx, "col_dot").contains("fma.rn.f64"), "{arch}: no FMA in col_dot's dot product");
    }
    println!("compiled {} kernels for compute_75/80/86/89/90", kernels.len());
}

#[test]
fn nvrtc_rejects_a_broken_kernel() {
    if !nvrtc_loadable() {
        return;
    }
    let broken =
        format!("{CUDA_PRELUDE}\nKERNEL broken(const float* x, double* y, u64 n) {{ y[0] = undeclared_value; }}\n");
    let e = cudarc::nvrtc::compile_ptx_with_opts(broken, nvrtc_options("compute_80")).expect_err("must not compile");
    let msg = e.to_string();
    assert!(msg.contains("undeclared_value"), "the error names the problem: {msg}");
}

#[test]
fn kernels_declare_inputs_then_outputs_then_scalars() {
    let kernels = signatures(KERNELS_CU).unwrap();
    assert!(kernels.len() >= 20, "{:?}", kernels.keys());
    for (name, params) in &kernels {
        let rank = |k: &Kind| match k {
            Kind::In(_) => 0,
            Kind::Out(_) => 1,
            Kind::U64 | Kind::F64 => 2,
        };
        assert!(params.windows(2).all(|w| rank(&w[0].1) <= rank(&w[1].1)), "{name}: {params:?}");
    }
    assert_eq!(
        kernels["dropout_fwd"].iter().map(|p| p.1).collect::<Vec<_>>(),
        [Kind::In(Elem::F32), Kind::In(Elem::Bool), Kind::Out(Elem::F64), Kind::U64, Kind::F64]
    );
    assert!(signatures("\nKERNEL f(const char* x) {}").is_err(), "a type the host cannot pass is refused");
}

#[test]
fn architectures_follow_compute_capability() {
    assert_eq!(arch_for((9, 0)), Ok("compute_90"));
    assert_eq!(arch_for((12, 0)), Ok("compute_90"));
    assert_eq!(arch_for((8, 7)), Ok("compute_86"));
    assert_eq!(arch_for((7, 5)), Ok("compute_75"));
    assert!(arch_for((5, 2)).is_err());
}

#[test]
fn gemm_call_maps_row_major_to_column_major() {
    let spec = MatmulSpec::batched(3, 5, 7, 11);
    let g = gemm_call(spec, 1, 2, 3).unwrap();
    // cuBLAS's first operand is our B (7×11 row-major = 11×7 column-major, ld 11).
    assert_eq!((g.a, g.b, g.c), (2, 1, 3));
    assert_eq!((g.m, g.n, g.k), (11, 5, 7));
    assert_eq!((g.trans_a, g.trans_b), (false, false));
    assert_eq!((g.lda, g.ldb, g.ldc), (11, 7, 11));
    assert_eq!((g.stride_a, g.stride_b, g.stride_c, g.batch), (77, 35, 55, 3));
    let t = gemm_call(spec.trans_a().trans_b(), 1, 2, 3).unwrap();
    assert_eq!((t.trans_a, t.trans_b), (true, true));
    assert_eq!((t.lda, t.ldb, t.ldc), (7, 5, 11));
    assert!(gemm_call(MatmulSpec::new(1 << 31, 1, 1), 1, 2, 3).is_err(), "32-bit cuBLAS dimensions");
}
