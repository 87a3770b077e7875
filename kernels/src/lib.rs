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
//! what makes the cross-profile parity tests (see [`parity`]) meaningful.
//!
//! Bounds use `γ_n = n·u/(1−n·u)`, `u = 2⁻⁵³`. Each bound's derivation is written beside
//! its code. All bounds are finally multiplied by `1 + 2⁻¹⁶`, which absorbs the rounding
//! of the bound's own computation and every second-order term (products of two `O(u)`
//! quantities) that the derivations drop; it is valid for reductions shorter than 2³².

mod activation;
mod bound;
mod conv;
mod embedding;
mod layernorm;
mod matmul;
mod optim;
pub mod parity;
mod reduce;
mod softmax;

use std::fmt;
use std::str::FromStr;

pub use common::rounding::ErrorBound;
pub use conv::{Conv2dGrads, Conv2dSpec, Pool2dSpec};
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
    /// Plain sequential left-to-right reductions, no FMA; the platform's `exp`/`tanh`/`ln`.
    CpuSeq,
    /// Split-K: blocks of 16 accumulated with `f64::mul_add`, block sums combined pairwise;
    /// `exp(x) = exp(x/2)²`, `tanh` from `exp_m1`, `ln` from `ln_1p` near 1.
    CpuSplitK,
}

impl Profile {
    /// Every CPU profile, default first.
    pub const CPU: [Profile; 3] = [Profile::Cpu, Profile::CpuSeq, Profile::CpuSplitK];

    /// The profile's name as written in run specs and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Cpu => "cpu",
            Profile::CpuSeq => "cpu-seq",
            Profile::CpuSplitK => "cpu-splitk",
        }
    }

    fn valid_names() -> String {
        Profile::CPU.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
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
        Profile::CPU
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

/// A compute device running one [`Profile`]. Cheap to clone. (A CUDA profile will keep its
/// context here, so callers never need `#[cfg]`.)
#[derive(Clone, Debug)]
pub struct Device {
    profile: Profile,
}

impl Device {
    /// Creates a device for `profile`.
    pub fn new(profile: Profile) -> Result<Device> {
        Ok(Device { profile })
    }

    /// The profile this device computes with.
    pub fn profile(&self) -> Profile {
        self.profile
    }
}
