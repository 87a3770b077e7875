//! FP64 training ops with sound cross-machine error bounds, on several device profiles.
//!
//! Every op takes FP32 inputs (the rounded training state), computes in FP64 and returns a
//! [`Bounded`]: the FP64 values plus an [`ErrorBound`] `d` per element such that
//! `|this result − the result of ANY honest IEEE-754 binary64 implementation of the same op
//! from the same inputs| ≤ d`. "Honest" means: any reduction order or tree, with or without
//! FMA contraction, transcendental functions (`exp`, `ln`, `tanh`) with at most 4 ulp error
//! (relative error ≤ 8u, plus 4 subnormal ulps absolute), and correctly rounded `+ − × ÷ sqrt`.
//! Where an op's definition fixes an evaluation choice that changes rounding (the max shift
//! in softmax, the two-pass variance in layer norm, `β^t` by square-and-multiply), the op's
//! documentation says so: an implementation that chooses differently computes another op.
//!
//! A [`Device`] computes with one [`Profile`] (chosen at run time by name): the profiles use
//! genuinely different FP64 arithmetic (reduction orders, FMA, `exp`/`tanh`/`ln` formulas), which is
//! what makes the cross-profile parity tests (see [`parity`]) meaningful. The `cuda` profile runs
//! the same ops on a GPU (cuBLAS DGEMM and NVRTC-compiled kernels, `src/cuda`); it is compiled
//! only with the `cuda` cargo feature, but [`Profile::Cuda`] always exists and
//! [`Device::new`] says why it is unavailable, so callers never need `#[cfg]`.
//!
//! Bounds use `γ_n = n·u/(1−n·u)`, `u = 2⁻⁵³`. Each bound's derivation is written beside
//! its code. All bounds are finally multiplied by `1 + 2⁻¹⁶`, which absorbs the rounding
//! of the bound's own computation and every second-order term (products of two `O(u)`
//! quantities) that the derivations drop; it is valid for reductions shorter than 2³².

mod activation;
mod alloc;
mod bound;
mod clip;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
mod cuda;
mod embedding;
mod exact;
mod gemm;
pub mod host;
mod layernorm;
mod matmul;
mod optim;
pub mod parity;
mod pointwise;
mod reduce;
mod scatter;
mod softmax;

use std::fmt;
use std::str::FromStr;

pub use alloc::keep_freed_pages;
pub use common::rounding::ErrorBound;
pub use conv::{Conv2dGrads, Conv2dSpec, Pool2dSpec};
#[cfg(feature = "cuda")]
pub use cuda::GemmPrecision;
pub use exact::Sums;
pub use layernorm::{LayerNormGrads, LayerNormOut};
pub use matmul::MatmulSpec;
pub use optim::{AdamWConfig, AdamWOut, SgdConfig, SgdOut, pow_step};
pub use softmax::RowSpec;

/// FP64 values with a sound bound on their distance to any honest machine's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounded {
    pub values: Vec<f64>,
    pub bound: ErrorBound,
}

impl Bounded {
    /// An exactly reproducible result: every honest machine computes the same bits.
    pub fn exact(values: Vec<f64>) -> Bounded {
        Bounded { values, bound: ErrorBound::Exact }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// One way of computing the FP64 ops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Profile {
    /// High-performance blocked GEMM (`gemm` crate, FMA where the CPU has it, both cores);
    /// other reductions in 4 interleaved lanes; the platform's `exp`/`tanh`/`ln`.
    #[default]
    Cpu,
    /// The fast second CPU profile, what an auditor replays a `cpu` trainer on: the same `gemm`
    /// crate, but K split in two below the middle and the upper part summed first (bias
    /// first of all), so each output is a different sum; other reductions in 8 interleaved
    /// lanes; `exp(x) = 1/exp(−x)`, `tanh` from `exp_m1(2|x|)`, `ln x = log₂x·ln 2`.
    CpuAlt,
    /// Plain sequential left-to-right reductions, no FMA; the platform's `exp`/`tanh`/`ln`.
    CpuSeq,
    /// Split-K: blocks of 16 accumulated with `f64::mul_add`, block sums combined pairwise;
    /// `exp(x) = exp(x/2)²`, `tanh` from `exp_m1`, `ln` from `ln_1p` near 1.
    CpuSplitK,
    /// An NVIDIA GPU: cuBLAS DGEMM for products, NVRTC-compiled kernels (one thread per output
    /// element, row or column, sequential sums, FMA contraction allowed) for everything else,
    /// CUDA's `exp`/`tanh`/`log`. Needs the `cuda` cargo feature and a driver at run time.
    Cuda,
}

impl Profile {
    /// Every CPU profile, default first. Helpers that pick a profile on their own (e.g. the
    /// auditor's "one other than the trainer's") choose among these: the GPU is only used when
    /// asked for by name.
    pub const CPU: [Profile; 4] = [Profile::Cpu, Profile::CpuAlt, Profile::CpuSeq, Profile::CpuSplitK];

    /// Every profile this crate knows, whether or not this build or machine can run it.
    pub const ALL: [Profile; 5] = [Profile::Cpu, Profile::CpuAlt, Profile::CpuSeq, Profile::CpuSplitK, Profile::Cuda];

    /// The profile an auditor replays on when none is asked for: a fast one other than the
    /// trainer's (`trainer`, when the record says which). `cpu` trainers get `cpu-alt`, every
    /// other trainer (and an unknown one) gets `cpu`; both are blocked-GEMM profiles, so the
    /// replay costs about what training did.
    pub fn auditor_default(trainer: Option<Profile>) -> Profile {
        match trainer {
            Some(Profile::Cpu) => Profile::CpuAlt,
            _ => Profile::Cpu,
        }
    }

    /// The profile's name as written in run specs and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Cpu => "cpu",
            Profile::CpuAlt => "cpu-alt",
            Profile::CpuSeq => "cpu-seq",
            Profile::CpuSplitK => "cpu-splitk",
            Profile::Cuda => "cuda",
        }
    }

    fn valid_names() -> String {
        Profile::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Profile, KernelError> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| KernelError::UnknownProfile { name: s.to_string(), valid: Profile::valid_names() })
    }
}

/// Errors from the kernels crate.
#[derive(thiserror::Error, Debug)]
pub enum KernelError {
    /// Input sizes do not match the op's spec.
    #[error("{op}: bad shape: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A hyper-parameter or index argument is out of its valid range.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// The profile name is not one this build knows.
    #[error("unknown device profile {name:?} (valid profiles: {valid})")]
    UnknownProfile { name: String, valid: String },
    /// The profile exists but cannot run here: not compiled in, or no driver or GPU found.
    #[error("device profile {profile} is unavailable: {reason}")]
    DeviceUnavailable { profile: Profile, reason: String },
    /// The GPU failed while running an op (driver, cuBLAS or kernel launch error).
    #[error("{op}: CUDA error: {detail}")]
    Cuda { op: &'static str, detail: String },
}

/// Result alias of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape { op, detail: detail.into() }
}

pub(crate) fn arg_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::InvalidArgument { op, detail: detail.into() }
}

/// Checks `len == expected`, naming the argument on failure.
pub(crate) fn check_len(op: &'static str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected { Ok(()) } else { Err(shape_err(op, format!("{what} has {len} elements, expected {expected}"))) }
}

/// Multiplies sizes, reporting overflow as a shape error instead of panicking.
pub(crate) fn checked_prod(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| shape_err(op, format!("size {dims:?} overflows usize")))
}

/// A compute device running one [`Profile`]. Cheap to clone: a CUDA device shares one GPU
/// context (cuBLAS handle, compiled kernels) per process.
#[derive(Clone, Debug)]
pub struct Device {
    profile: Profile,
    /// The GPU of a CUDA device (always `None` in builds without the `cuda` feature).
    gpu: Option<cuda::GpuRef>,
}

impl Device {
    /// Creates a device for `profile`. [`Profile::Cuda`] fails with
    /// [`KernelError::DeviceUnavailable`] (never a panic) when this build has no CUDA support
    /// or no driver, GPU, NVRTC or cuBLAS library is found; the GPU is initialised once per
    /// process (kernels compiled by NVRTC) and shared by every CUDA device.
    pub fn new(profile: Profile) -> Result<Device> {
        let gpu = match profile {
            Profile::Cuda => Some(cuda::GpuRef::shared()?),
            Profile::Cpu | Profile::CpuAlt | Profile::CpuSeq | Profile::CpuSplitK => None,
        };
        Ok(Device { profile, gpu })
    }

    /// The profile this device computes with.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// What a CUDA device runs on (GPU, compute capability, driver and NVRTC versions), for
    /// reports and benchmarks; `None` for the CPU profiles.
    pub fn gpu_description(&self) -> Option<String> {
        self.gpu().map(|g| g.description())
    }

    /// The GPU behind a CUDA device: each op runs there when this is `Some`.
    pub(crate) fn gpu(&self) -> Option<&cuda::GpuRef> {
        self.gpu.as_ref()
    }

    /// The CUDA profile's product, cuBLAS DGEMM (the hook of `matmul_f64`).
    pub(crate) fn gemm_gpu(&self, a: &[f64], b: &[f64], out: &mut [f64], spec: MatmulSpec) -> Result<()> {
        match self.gpu() {
            Some(g) => g.gemm(a, b, out, spec),
            None => Err(KernelError::DeviceUnavailable {
                profile: self.profile,
                reason: "no GPU behind this device".into(),
            }),
        }
    }
}
