//! Stand-in for the `cuda` module in builds without the `cuda` feature: the same names, but no
//! value of [`GpuRef`] can exist, so the op code needs no `#[cfg]` and its GPU branches are
//! statically dead. [`GpuRef::shared`] says how to get a build with CUDA support.

#[path = "cuda/args.rs"]
mod args;

pub(crate) use args::{In, Param, size};

use crate::{KernelError, MatmulSpec, Profile, Result};

/// The process's GPU: uninhabited in this build.
#[derive(Clone, Debug)]
pub(crate) enum GpuRef {}

impl GpuRef {
    pub(crate) fn shared() -> Result<GpuRef> {
        Err(KernelError::DeviceUnavailable {
            profile: Profile::Cuda,
            reason: "this build has no CUDA support: rebuild with `--features cuda`".into(),
        })
    }

    pub(crate) fn description(&self) -> String {
        match *self {}
    }

    /// Any arguments: the body can never run.
    pub(crate) fn run<const K: usize, I, S>(
        &self,
        _: &str,
        _: &str,
        _: usize,
        _: I,
        _: [usize; K],
        _: S,
    ) -> Result<[Vec<f64>; K]> {
        match *self {}
    }

    pub(crate) fn gemm(&self, _a: &[f64], _b: &[f64], _out: &mut [f64], _spec: MatmulSpec) -> Result<()> {
        match *self {}
    }
}
