//! Kernel arguments as the op code builds them. Shared by the `cuda` module and its stand-in
//! (`cuda_off.rs`), so op code compiles the same with and without the feature.
// Without the feature the GPU branches that read these are statically dead (no `GpuRef` can
// exist), so most of this is never read there.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Element types of kernel buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F64,
    U32,
    U64,
    Bool,
}

/// What a kernel parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `const T*`
    In(Elem),
    /// `T*`
    Out(Elem),
    /// `u64`
    U64,
    /// `double`
    F64,
}

/// An input slice of an op.
#[derive(Clone, Copy, Debug)]
pub(crate) enum In<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    U32(&'a [u32]),
    U64(&'a [u64]),
    Bool(&'a [bool]),
}

/// One kernel argument: a buffer of this op, or an 8-byte scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Param {
    Buf { addr: u64, kind: Kind, len: usize },
    U64(u64),
    F64(f64),
}

impl Param {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Param::Buf { kind, .. } => *kind,
            Param::U64(_) => Kind::U64,
            Param::F64(_) => Kind::F64,
        }
    }

    /// The 8 bytes the kernel receives.
    pub(crate) fn bits(&self) -> u64 {
        match self {
            Param::Buf { addr, .. } => *addr,
            Param::U64(v) => *v,
            Param::F64(v) => v.to_bits(),
        }
    }
}

/// A size argument.
pub(crate) fn size(n: usize) -> Param {
    Param::U64(n as u64)
}
