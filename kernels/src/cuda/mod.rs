//! The `cuda` device profile: every op of [`Device`] on an NVIDIA GPU, with the same values
//! semantics and the same bounds as the CPU profiles.
//!
//! # How it computes
//! - **Products** (`matmul*`, and conv through im2col) are one cuBLAS `cublasDgemmStridedBatched`
//!   call: row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ` ([`gemm_call`]). The
//!   handle runs in `CUBLAS_PEDANTIC_MATH` (no emulated or reduced-precision FP64 paths, such as
//!   CUDA 13's opt-in fixed-point DGEMM emulation, whatever the environment asks for) with
//!   atomics disallowed. The bias, the scale and the
//!   bound stay on the host, in the shared code of `matmul.rs`, so they are the same correctly
//!   rounded operations on every profile.
//! - **Everything else** runs in `kernels.cu`, compiled once per process by NVRTC for the GPU's
//!   compute capability ([`nvrtc_options`]). One thread per output element, row or column; every
//!   sum is a sequential loop from `+0.0` in index order. No atomics, no shared memory, no
//!   warp-level operations: a result depends only on its thread's index and inputs, never on the
//!   launch configuration or on timing (tests vary the block size).
//! - **Host remnants**: conv's im2col, col2im and bias-gradient sums, the layer-norm `x̂` (two
//!   correctly rounded operations, the same on every machine) and all bounds run on the host.
//!   Host-side reductions of this profile use `cpu-seq`'s order (`reduce.rs`).
//!
//! # Where the GPU's arithmetic differs from the CPU profiles'
//! Each difference is one the bounds already allow (they hold against any honest IEEE-754
//! binary64 implementation, see the crate docs):
//! - **FMA contraction.** NVRTC contracts `a·b + c` into one FMA by default (`--fmad=true`, kept
//!   on purpose): dot products, GELU's polynomial, softmax/log-softmax backward, layer norm's
//!   `c·rstd·γ + β`. cuBLAS DGEMM accumulates with FMA (tensor-core DMMA on sm_80+). Contraction
//!   is forbidden where an op is defined as an exact unfused sequence: SGD and AdamW use
//!   `__dmul_rn`, `__dadd_rn`, `__dsub_rn`, `__ddiv_rn`, `__dsqrt_rn` for every operation (PTX
//!   `*.rn` instructions, which ptxas never fuses; a test checks the PTX), as do dropout's
//!   product, the layer-norm mean `Σx/n` and `1/√(V+eps)`. So the optimizer ops are bit-identical
//!   to the CPU's, and the parity test demands equal bits.
//! - **Reduction order.** Kernel sums are sequential (left to right, FMA allowed) — the order
//!   of `cpu-seq` but with contraction; cuBLAS uses its own blocking and split order, which
//!   depends on the GPU model, the cuBLAS version and the shape (deterministic for a given GPU
//!   model, SM count and cuBLAS version, per cuBLAS's documentation).
//! - **Transcendentals.** CUDA's double-precision `exp`, `log`, `tanh` have a maximum error of
//!   1 ulp (`erf`: 2 ulp) per the CUDA C++ Programming Guide (table "Double-Precision
//!   Mathematical Standard Library Functions with Maximum ULP Error"; NVIDIA states these come
//!   from extensive, not exhaustive, testing). The bounds assume 4 ulp. `+ − × ÷ √` and `fma` are
//!   IEEE round-to-nearest in double precision whatever the `-prec-*` flags (which affect only
//!   single precision); `--ftz=false` keeps subnormals in any single-precision code.
//! - **Signed zeros.** A sum whose exact value is zero must give `+0` (the tie-break rule puts
//!   `−0` and `+0` in different cells, and a zero sum has bound 0). Every kernel sum starts from
//!   `+0.0`, as the CPU loops do; cuBLAS's result gets `+ 0.0` on the host ([`GpuRef::gemm`]),
//!   which turns a `−0` that an accumulator-free order can produce into `+0`.
//!
//! # Bounds from GPU values
//! The bounds are computed on the host by the same functions as the CPU path's (in each op's
//! module), from the GPU's own values: kernels return the intermediates a bound uses (softmax's
//! `ln S` and dot products, layer norm's mean, `Σc²` and `rstd`, GELU's `tanh`, cross-entropy's
//! probabilities, `exp(y)` in log-softmax backward). Only elementwise arithmetic without a
//! reduction or a transcendental is recomputed on the host, with correctly rounded operations
//! from those values (e.g. `s = 1 + t` in GELU). Where the GPU may have fused such a step, the
//! host's value is another honest evaluation of it; the derivations use "our" intermediate
//! values only in `O(u)`-weighted terms, so one honest evaluation in place of another changes a
//! bound by a relative `O(u)`, far inside the `1 + 2⁻¹⁶` slack every bound carries.
//!
//! # Run time
//! [`GpuRef::shared`] starts the GPU once per process: it checks that the driver library loads
//! before any other driver call (cudarc's dynamic loading panics otherwise), likewise NVRTC and
//! cuBLAS, and turns every failure into [`KernelError::DeviceUnavailable`]. All GPU work goes
//! through one mutex (one legacy-default stream, one cuBLAS handle); each op uploads its inputs,
//! runs, downloads its outputs and frees its buffers.
//!
//! The backend behind [`Exec`] is the CUDA driver (`driver.rs`) or, in tests, a host emulation
//! that compiles the same `kernels.cu` with a C compiler (`emu.rs`), so the host glue, the
//! kernels' index arithmetic and every launch's parameter list are tested on machines without a
//! GPU. Every launch is checked against the kernel's parameter list parsed from `kernels.cu`.

mod args;
mod driver;
mod emu;

pub(crate) use args::{Elem, In, Kind, Param, size};

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::{Device, KernelError, MatmulSpec, Profile, Result};

/// The kernels of this profile (see the rules at the top of the file).
pub(crate) const KERNELS_CU: &str = include_str!("kernels.cu");

/// What NVRTC needs in front of [`KERNELS_CU`].
const CUDA_PRELUDE: &str = "typedef unsigned long long u64;\n\
    #define KERNEL extern \"C\" __global__ void\n\
    #define DEVICE static __device__\n\
    #define TB_NEG_INF __longlong_as_double(0xfff0000000000000ULL)\n";

/// Threads per block unless a test asks for another size.
const BLOCK_THREADS: u32 = 256;

/// The complete NVRTC source.
pub(crate) fn cuda_source() -> String {
    format!("{CUDA_PRELUDE}{KERNELS_CU}")
}

/// Virtual architectures the kernels are compiled for, by minimum compute capability. The GPU
/// gets the highest one it supports; the driver JIT-compiles the PTX for the actual chip (a
/// newer GPU gets `compute_90` PTX, which the driver accepts on every later architecture).
pub(crate) const ARCHS: [((i32, i32), &str); 7] = [
    ((9, 0), "compute_90"),
    ((8, 9), "compute_89"),
    ((8, 6), "compute_86"),
    ((8, 0), "compute_80"),
    ((7, 5), "compute_75"),
    ((7, 0), "compute_70"),
    ((6, 0), "compute_60"),
];

/// The virtual architecture for a GPU of compute capability `cc`.
pub(crate) fn arch_for(cc: (i32, i32)) -> Result<&'static str, String> {
    ARCHS
        .iter()
        .find(|(min, _)| cc >= *min)
        .map(|(_, a)| *a)
        .ok_or_else(|| format!("compute capability {}.{} is below 6.0 (no fast FP64)", cc.0, cc.1))
}

/// NVRTC options of the kernels. `--fmad=true` is NVRTC's default, spelled out because the
/// bounds are written for it (see the module docs); the `prec`/`ftz` flags only concern single
/// precision and are pinned to IEEE behaviour anyway.
pub(crate) fn nvrtc_options(arch: &'static str) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(true),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        name: Some("tiebreak_kernels.cu".into()),
        ..Default::default()
    }
}

/// The kind of a kernel parameter declared with C type `ty` (whitespace-normalised).
fn kind_of_c_type(ty: &str) -> Option<Kind> {
    let (out, base) = match ty.strip_prefix("const ") {
        Some(b) => (false, b.strip_suffix('*')?),
        None => match ty.strip_suffix('*') {
            Some(b) => (true, b),
            None => {
                return match ty {
                    "u64" => Some(Kind::U64),
                    "double" => Some(Kind::F64),
                    _ => None,
                };
            }
        },
    };
    let elem = match base.trim() {
        "float" => Elem::F32,
        "double" => Elem::F64,
        "unsigned int" => Elem::U32,
        "u64" => Elem::U64,
        "bool" => Elem::Bool,
        _ => return None,
    };
    Some(if out { Kind::Out(elem) } else { Kind::In(elem) })
}

/// One kernel's parameters as declared in `kernels.cu`: (C type, kind).
pub(crate) type Signature = Vec<(String, Kind)>;

/// Every `KERNEL name(...)` declaration of `src`, by name.
pub(crate) fn signatures(src: &str) -> Result<BTreeMap<String, Signature>, String> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(at) = rest.find("\nKERNEL ") {
        let decl = &rest[at + "\nKERNEL ".len()..];
        let open = decl.find('(').ok_or("a KERNEL declaration has no parameter list")?;
        let close = decl.find(')').ok_or("a KERNEL parameter list is not closed")?;
        let name = decl[..open].trim().to_string();
        let mut params = Vec::new();
        for p in decl[open + 1..close].split(',') {
            let words: Vec<&str> = p.split_whitespace().collect();
            let (ty_words, ident) = words.split_at(words.len().saturating_sub(1));
            let ty = ty_words.join(" ");
            let kind = kind_of_c_type(&ty).ok_or_else(|| {
                format!("kernel {name}: parameter {:?} has a type the host cannot pass", ident.join(""))
            })?;
            params.push((ty, kind));
        }
        if out.insert(name.clone(), params).is_some() {
            return Err(format!("kernel {name} is declared twice"));
        }
        rest = &decl[close..];
    }
    Ok(out)
}

/// Plain-data element types that travel to and from the GPU as bytes.
pub(crate) trait Pod: Copy {
    const ELEM: Elem;
}
impl Pod for f32 {
    const ELEM: Elem = Elem::F32;
}
impl Pod for f64 {
    const ELEM: Elem = Elem::F64;
}
impl Pod for u32 {
    const ELEM: Elem = Elem::U32;
}
impl Pod for u64 {
    const ELEM: Elem = Elem::U64;
}
impl Pod for bool {
    const ELEM: Elem = Elem::Bool;
}

/// The bytes of a slice of plain data.
fn as_bytes<T: Pod>(x: &[T]) -> &[u8] {
    // SAFETY: every `Pod` type (f32, f64, u32, u64, bool) is plain data without padding, so all
    // `size_of_val(x)` bytes behind `x` are initialised and may be read as `u8`; the borrow keeps
    // `x` alive and unmodified for the returned lifetime.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// A cuBLAS `cublasDgemmStridedBatched` call (column-major, `alpha = 1`, `beta = 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GemmCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: i32,
    pub stride_b: i64,
    pub c: u64,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
}

/// The cuBLAS call computing the row-major product of `spec` from buffers at `a`, `b` into `c`.
///
/// Row-major `C (m×n) = op(A)·op(B)` is column-major `Cᵀ (n×m) = op(B)ᵀ·op(A)ᵀ`, so cuBLAS's
/// first operand is our `B`: stored `k×n` row-major it is column-major `n×k` (leading dimension
/// `n`) and needs no transpose; stored `n×k` (`b_trans`) it is column-major `k×n` (leading
/// dimension `k`) and is transposed. Likewise our `A` as cuBLAS's second operand: leading
/// dimension `k`, or `m` and transposed when `a_trans`. `C` has leading dimension `n`.
pub(crate) fn gemm_call(spec: MatmulSpec, a: u64, b: u64, c: u64) -> Result<GemmCall, String> {
    let MatmulSpec { batch, m, k, n, a_trans, b_trans } = spec;
    let int =
        |x: usize, what: &str| i32::try_from(x).map_err(|_| format!("{what} = {x} exceeds cuBLAS's 32-bit dimensions"));
    let long = |x: usize, y: usize| {
        x.checked_mul(y).and_then(|p| i64::try_from(p).ok()).ok_or_else(|| format!("stride {x}·{y} overflows"))
    };
    Ok(GemmCall {
        trans_a: b_trans,
        trans_b: a_trans,
        m: int(n, "n")?,
        n: int(m, "m")?,
        k: int(k, "k")?,
        a: b,
        lda: int(if b_trans { k } else { n }, "leading dimension of B")?,
        stride_a: long(k, n)?,
        b: a,
        ldb: int(if a_trans { m } else { k }, "leading dimension of A")?,
        stride_b: long(m, k)?,
        c,
        ldc: int(n, "n")?,
        stride_c: long(m, n)?,
        batch: int(batch, "batch")?,
    })
}

/// A backend that runs kernels: the CUDA driver or the host emulation. Addresses are device
/// addresses (host addresses in the emulation); buffers live until [`Exec::release`].
pub(crate) trait Exec: Send {
    /// A zero-filled buffer of at least `bytes` bytes (and at least 8), 8-byte aligned.
    fn alloc(&mut self, bytes: usize) -> Result<u64, String>;
    /// Copies `bytes` to `addr`.
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String>;
    /// Copies `out.len()` bytes from `addr`, after all work launched before has finished.
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), String>;
    /// Launches `kernel` on `grid × block` threads with these 8-byte arguments.
    fn launch(&mut self, kernel: &str, grid: u32, block: u32, args: &[u64]) -> Result<(), String>;
    /// Runs a DGEMM.
    fn dgemm(&mut self, call: &GemmCall) -> Result<(), String>;
    /// Waits for all work and frees every buffer.
    fn release(&mut self) -> Result<(), String>;
    /// Seconds per pass of these products as cuBLAS GEMMs of `precision` on buffers that stay
    /// on the GPU (`reps` timed passes after one warm-up), for benchmarks only.
    fn time_gemms(&mut self, specs: &[MatmulSpec], precision: GemmPrecision, reps: usize) -> Result<f64, String> {
        let _ = (specs, precision, reps);
        Err("GEMM timing needs the real GPU, not the host emulation".into())
    }
}

/// The element type of a timed GEMM ([`Device::cuda_gemm_seconds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPrecision {
    /// `cublasSgemmStridedBatched`: what a plain FP32 framework step runs.
    F32,
    /// `cublasDgemmStridedBatched`: what this profile runs.
    F64,
}

/// One GPU (or its emulation) with its compiled kernels.
pub(crate) struct Gpu {
    exec: Mutex<Box<dyn Exec>>,
    kernels: BTreeMap<String, Signature>,
    description: String,
}

/// A handle to the process's GPU, with the block size this device launches with.
#[derive(Clone)]
pub(crate) struct GpuRef {
    gpu: Arc<Gpu>,
    block: u32,
}

impl fmt::Debug for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({}, {} threads per block)", self.gpu.description, self.block)
    }
}

/// Starts a backend, turning a panic inside the CUDA libraries (which the presence checks
/// should make impossible) into an error.
fn start_gpu(start: impl FnOnce(&str, &[&str]) -> Result<(Box<dyn Exec>, String), String>) -> Result<Arc<Gpu>, String> {
    let kernels = signatures(KERNELS_CU)?;
    let names: Vec<&str> = kernels.keys().map(String::as_str).collect();
    let started =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(&cuda_source(), &names))).map_err(|p| {
            let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            format!("the CUDA libraries panicked while starting: {}", what.unwrap_or_default())
        })??;
    let (exec, description) = started;
    Ok(Arc::new(Gpu { exec: Mutex::new(exec), kernels, description }))
}

impl GpuRef {
    /// The process's GPU, started on first use (see the module docs); the outcome, success or
    /// failure, is kept for the life of the process.
    pub(crate) fn shared() -> Result<GpuRef> {
        static SHARED: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| start_gpu(driver::start));
        match started {
            Ok(gpu) => Ok(GpuRef { gpu: gpu.clone(), block: BLOCK_THREADS }),
            Err(reason) => Err(KernelError::DeviceUnavailable { profile: Profile::Cuda, reason: reason.clone() }),
        }
    }

    /// The GPU in words.
    pub(crate) fn description(&self) -> String {
        self.gpu.description.clone()
    }

    /// Locks the GPU for one op.
    pub(crate) fn scope(&self, op: &'static str) -> Result<Scope<'_>> {
        let exec = self.gpu.exec.lock().map_err(|_| KernelError::Cuda {
            op,
            detail: "the GPU's state was poisoned by a panic in an earlier op".into(),
        })?;
        Ok(Scope { exec, gpu: &self.gpu, block: self.block, op })
    }

    /// Runs one kernel over `threads` threads: uploads `ins`, allocates zeroed FP64 outputs of
    /// the lengths in `outs`, passes inputs, outputs, then `scalars` (the order every kernel
    /// declares), and downloads the outputs.
    pub(crate) fn run<const K: usize>(
        &self,
        op: &'static str,
        kernel: &'static str,
        threads: usize,
        ins: &[In<'_>],
        outs: [usize; K],
        scalars: &[Param],
    ) -> Result<[Vec<f64>; K]> {
        let mut s = self.scope(op)?;
        let mut params = Vec::with_capacity(ins.len() + K + scalars.len());
        for x in ins {
            params.push(s.input(*x)?);
        }
        let first_out = params.len();
        for n in outs {
            params.push(s.output(Elem::F64, n)?);
        }
        params.extend_from_slice(scalars);
        s.launch(kernel, threads, &params)?;
        let mut res = Vec::with_capacity(K);
        for (p, n) in params[first_out..first_out + K].iter().zip(outs) {
            res.push(s.read::<f64>(*p, n)?);
        }
        res.try_into().map_err(|_| s.err("internal: wrong number of outputs"))
    }

    /// The product of `spec` by cuBLAS DGEMM into `out` (the `matmul_f64` hook).
    pub(crate) fn gemm(&self, a: &[f64], b: &[f64], out: &mut [f64], spec: MatmulSpec) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        if spec.k == 0 {
            out.fill(0.0);
            return Ok(());
        }
        let mut s = self.scope("matmul")?;
        let pa = s.input(In::F64(a))?;
        let pb = s.input(In::F64(b))?;
        let pc = s.output(Elem::F64, out.len())?;
        let call = gemm_call(spec, pa.bits(), pb.bits(), pc.bits()).map_err(|e| s.err(e))?;
        s.exec.dgemm(&call).map_err(|e| KernelError::Cuda { op: "matmul", detail: format!("cuBLAS DGEMM: {e}") })?;
        let c = s.read::<f64>(pc, out.len())?;
        // `+ 0.0` maps −0 to +0 and leaves every other value alone: see "Signed zeros" above.
        for (o, v) in out.iter_mut().zip(c) {
            *o = v + 0.0;
        }
        Ok(())
    }
}

/// One op's exclusive use of the GPU; its buffers are freed when it ends.
pub(crate) struct Scope<'a> {
    exec: MutexGuard<'a, Box<dyn Exec>>,
    gpu: &'a Gpu,
    block: u32,
    op: &'static str,
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        // An error here (a failed kernel) has already surfaced at the op's last read.
        let _ = self.exec.release();
    }
}

impl Scope<'_> {
    fn err(&self, detail: impl fmt::Display) -> KernelError {
        KernelError::Cuda { op: self.op, detail: detail.to_string() }
    }

    fn put<T: Pod>(&mut self, x: &[T]) -> Result<Param> {
        let bytes = as_bytes(x);
        let addr =
            self.exec.alloc(bytes.len()).map_err(|e| self.err(format!("allocating {} bytes: {e}", bytes.len())))?;
        if !bytes.is_empty() {
            self.exec.write(addr, bytes).map_err(|e| self.err(format!("copying an input to the GPU: {e}")))?;
        }
        Ok(Param::Buf { addr, kind: Kind::In(T::ELEM), len: x.len() })
    }

    /// Uploads an input.
    pub(crate) fn input(&mut self, x: In<'_>) -> Result<Param> {
        match x {
            In::F32(v) => self.put(v),
            In::F64(v) => self.put(v),
            In::U32(v) => self.put(v),
            In::U64(v) => self.put(v),
            In::Bool(v) => self.put(v),
        }
    }

    /// A zero-filled output of `n` elements.
    pub(crate) fn output(&mut self, elem: Elem, n: usize) -> Result<Param> {
        let width = match elem {
            Elem::F64 | Elem::U64 => 8,
            Elem::F32 | Elem::U32 => 4,
            Elem::Bool => 1,
        };
        let bytes = n.checked_mul(width).ok_or_else(|| self.err(format!("output of {n} elements overflows")))?;
        let addr = self.exec.alloc(bytes).map_err(|e| self.err(format!("allocating {bytes} bytes: {e}")))?;
        Ok(Param::Buf { addr, kind: Kind::Out(elem), len: n })
    }

    /// Launches `kernel` over `threads` threads after checking `params` against its declaration.
    pub(crate) fn launch(&mut self, kernel: &'static str, threads: usize, params: &[Param]) -> Result<()> {
        let sig = self.gpu.kernels.get(kernel).ok_or_else(|| self.err(format!("no kernel named {kernel}")))?;
        if sig.len() != params.len() {
            return Err(self.err(format!("kernel {kernel} takes {} parameters, got {}", sig.len(), params.len())));
        }
        for (i, ((ty, kind), p)) in sig.iter().zip(params).enumerate() {
            if p.kind() != *kind {
                return Err(self.err(format!("kernel {kernel} parameter {i} is `{ty}`, got {p:?}")));
            }
        }
        if threads == 0 {
            return Ok(());
        }
        let grid = u32::try_from(threads.div_ceil(self.block as usize))
            .ok()
            .filter(|&g| g < 1 << 31)
            .ok_or_else(|| self.err(format!("{threads} threads exceed the grid limit")))?;
        let args: Vec<u64> = params.iter().map(Param::bits).collect();
        self.exec.launch(kernel, grid, self.block, &args).map_err(|e| self.err(format!("kernel {kernel}: {e}")))
    }

    /// Downloads the first `n` elements of buffer `p`.
    pub(crate) fn read<T: Pod + Default>(&mut self, p: Param, n: usize) -> Result<Vec<T>> {
        match p {
            Param::Buf { addr, kind: Kind::Out(e) | Kind::In(e), len } if e == T::ELEM && n <= len => {
                let mut out = vec![T::default(); n];
                // SAFETY: `out` is `n` initialised values of a `Pod` type read back from a buffer
                // of the same type: every byte pattern a kernel writes into f64/u32 storage is
                // a valid value (callers read only f64 and u32), and the byte view does not
                // outlive `out`.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&out[..]))
                };
                self.exec.read(addr, bytes).map_err(|e| self.err(format!("copying a result from the GPU: {e}")))?;
                Ok(out)
            }
            other => Err(self.err(format!("internal: cannot read {n} {:?} from {other:?}", T::ELEM))),
        }
    }
}

impl Device {
    /// A `cuda` device whose GPU is the host emulation (tests only): `kernels.cu` compiled for
    /// this machine by the C compiler `$CC` (default `cc`) and run thread by thread, DGEMM by a
    /// reference loop over cuBLAS's column-major definition. It exercises this profile's host
    /// code, kernels and launches without a GPU; its arithmetic is the host's.
    #[doc(hidden)]
    pub fn cuda_emulated() -> Result<Device> {
        static EMULATED: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
        match EMULATED.get_or_init(|| start_gpu(emu::start)) {
            Ok(gpu) => {
                Ok(Device { profile: Profile::Cuda, gpu: Some(GpuRef { gpu: gpu.clone(), block: BLOCK_THREADS }) })
            }
            Err(reason) => Err(KernelError::DeviceUnavailable {
                profile: Profile::Cuda,
                reason: format!("host emulation: {reason}"),
            }),
        }
    }

    /// Seconds per pass of `specs` as cuBLAS GEMMs of `precision` with every operand already on
    /// the GPU (no uploads, downloads or allocations inside the timed region): the GEMM-bound
    /// floor of a step made of these products. Benchmarks only; a CPU device is an error.
    #[doc(hidden)]
    pub fn cuda_gemm_seconds(&self, specs: &[MatmulSpec], precision: GemmPrecision, reps: usize) -> Result<f64> {
        let err = |detail: String| KernelError::Cuda { op: "gemm timing", detail };
        let gpu = self.gpu.as_ref().ok_or_else(|| err(format!("{} is not a cuda device", self.profile)))?;
        let mut exec = gpu.gpu.exec.lock().map_err(|_| err("a previous GPU call panicked".into()))?;
        exec.time_gemms(specs, precision, reps.max(1)).map_err(err)
    }

    /// This device launching `threads` threads per block (tests: results must not depend on
    /// it). CPU devices are returned unchanged.
    #[doc(hidden)]
    pub fn with_cuda_block_threads(mut self, threads: u32) -> Result<Device> {
        if !(1..=1024).contains(&threads) {
            return Err(crate::arg_err("with_cuda_block_threads", format!("{threads} threads per block")));
        }
        if let Some(g) = self.gpu.as_mut() {
            g.block = threads;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests;
