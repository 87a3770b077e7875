//! The real backend: the CUDA driver API, NVRTC and cuBLAS through cudarc's raw layers, all
//! loaded at run time. Everything runs on the legacy default stream, so synchronous copies are
//! ordered after the kernels and DGEMMs launched before them.

use std::collections::BTreeMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::cublas::result as blas;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaContext, result as drv, sys as drv_sys};

use super::{Exec, GemmCall, GemmPrecision, arch_for, gemm_call, nvrtc_options};
use crate::MatmulSpec;

/// The driver backend: one context, one module of kernels, one cuBLAS handle, this op's
/// buffers.
struct CudaExec {
    ctx: Arc<CudaContext>,
    module: drv_sys::CUmodule,
    functions: BTreeMap<String, drv_sys::CUfunction>,
    blas: blas_sys::cublasHandle_t,
    buffers: Vec<drv_sys::CUdeviceptr>,
}

// SAFETY: the raw handles (module, functions, cuBLAS handle, device pointers) belong to this
// value alone and are only used through `&mut self`, i.e. under the `Gpu`'s mutex, one thread
// at a time; every method first makes the context current on the calling thread.
unsafe impl Send for CudaExec {}

/// Whether a library cudarc would load by name can be loaded; cudarc panics on first use of a
/// missing one, so this is asked before anything else.
fn present(lib: &str, check: unsafe fn() -> bool) -> Result<(), String> {
    // SAFETY: the `is_culib_present` functions only try `dlopen` on the candidate names and
    // close what they opened; they have no other effect.
    if unsafe { check() } {
        Ok(())
    } else {
        Err(format!(
            "the {lib} library could not be loaded (cudarc looks it up by name: lib{lib}.so, lib{lib}.so.1, \
             lib{lib}.so.12, ...): install it or add its folder to LD_LIBRARY_PATH"
        ))
    }
}

/// Starts the GPU: driver, device 0, kernels compiled by NVRTC, cuBLAS. Returns the backend and
/// a description (GPU, compute capability, driver and NVRTC versions, architecture).
pub(super) fn start(source: &str, kernels: &[&str]) -> Result<(Box<dyn Exec>, String), String> {
    present("cuda", drv_sys::is_culib_present).map_err(|e| format!("no CUDA driver: {e}"))?;
    drv::init().map_err(|e| format!("cuInit failed: {e:?} (is a GPU visible to this process?)"))?;
    let count = drv::device::get_count().map_err(|e| format!("counting CUDA devices: {e:?}"))?;
    if count < 1 {
        return Err("the CUDA driver found no GPU".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("creating a context on GPU 0: {e:?}"))?;
    let name = ctx.name().map_err(|e| format!("reading GPU 0's name: {e:?}"))?;
    let cc = ctx.compute_capability().map_err(|e| format!("reading GPU 0's compute capability: {e:?}"))?;
    let mut driver_version = 0;
    // SAFETY: cuDriverGetVersion writes one int through the valid pointer it is given.
    unsafe { drv_sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| format!("reading the driver version: {e:?}"))?;
    let arch = arch_for(cc).map_err(|e| format!("{name}: {e}"))?;

    present("nvrtc", cudarc::nvrtc::sys::is_culib_present)?;
    let (mut nv_major, mut nv_minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through the valid pointers it is given.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut nv_major, &mut nv_minor) }
        .result()
        .map_err(|e| format!("reading the NVRTC version: {e:?}"))?;
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, nvrtc_options(arch))
        .map_err(|e| format!("NVRTC {nv_major}.{nv_minor} could not compile the kernels for {arch}: {e}"))?;
    let ptx = CString::new(ptx.to_src()).map_err(|_| "NVRTC returned PTX containing a NUL byte".to_string())?;
    ctx.bind_to_thread().map_err(|e| format!("binding the context: {e:?}"))?;
    // SAFETY: `ptx` is a NUL-terminated PTX image that outlives the call.
    let module = unsafe { drv::module::load_data(ptx.as_ptr().cast::<c_void>()) }
        .map_err(|e| format!("loading the compiled kernels: {e:?}"))?;
    let mut exec =
        CudaExec { ctx, module, functions: BTreeMap::new(), blas: std::ptr::null_mut(), buffers: Vec::new() };
    for &k in kernels {
        let cname = CString::new(k).map_err(|_| format!("kernel name {k:?} contains a NUL byte"))?;
        // SAFETY: `module` was loaded above and is unloaded only when `exec` drops.
        let f = unsafe { drv::module::get_function(exec.module, cname) }
            .map_err(|e| format!("kernel {k} is missing from the compiled module: {e:?}"))?;
        exec.functions.insert(k.to_string(), f);
    }

    present("cublas", blas_sys::is_culib_present)?;
    exec.blas = blas::create_handle().map_err(|e| format!("creating a cuBLAS handle: {e:?}"))?;
    // SAFETY: the handle was just created and is destroyed only when `exec` drops.
    unsafe {
        blas_sys::cublasSetMathMode(exec.blas, blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH)
            .result()
            .map_err(|e| format!("setting cuBLAS's pedantic math mode: {e:?}"))?;
        blas_sys::cublasSetAtomicsMode(exec.blas, blas_sys::cublasAtomicsMode_t::CUBLAS_ATOMICS_NOT_ALLOWED)
            .result()
            .map_err(|e| format!("disallowing cuBLAS atomics: {e:?}"))?;
    }
    let description = format!(
        "{name} (compute capability {}.{}), driver API {}.{}, NVRTC {nv_major}.{nv_minor}, kernels for {arch}",
        cc.0,
        cc.1,
        driver_version / 1000,
        driver_version % 1000 / 10
    );
    Ok((Box::new(exec), description))
}

impl CudaExec {
    fn bind(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| format!("binding the CUDA context: {e:?}"))
    }

    /// Fails unless `addr` is the start of one of this op's buffers (cheap protection against
    /// a glue error pointing anywhere else).
    fn owned(&self, addr: u64) -> Result<(), String> {
        if self.buffers.contains(&addr) { Ok(()) } else { Err(format!("address {addr:#x} is not a buffer of this op")) }
    }

    /// The FP32 twin of [`Exec::dgemm`] on the same call (timing only: buffers hold zeros).
    fn sgemm(&mut self, g: &GemmCall) -> Result<(), String> {
        self.bind()?;
        let op =
            |t| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: as in `dgemm`: the buffers were allocated by `time_gemms` with room for the
        // FP64 operands of this call, twice what the FP32 ones need.
        unsafe {
            blas::sgemm_strided_batched(
                self.blas,
                op(g.trans_a),
                op(g.trans_b),
                g.m,
                g.n,
                g.k,
                &alpha,
                g.a as *const f32,
                g.lda,
                g.stride_a,
                g.b as *const f32,
                g.ldb,
                g.stride_b,
                &beta,
                g.c as *mut f32,
                g.ldc,
                g.stride_c,
                g.batch,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }
}

impl Exec for CudaExec {
    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        self.bind()?;
        let bytes = bytes.max(8);
        // SAFETY: plain allocation; the memory is zero-filled below before anything reads it,
        // and freed in `release`.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(|e| format!("cuMemAlloc({bytes}): {e:?}"))?;
        self.buffers.push(ptr);
        // SAFETY: `ptr` is a fresh allocation of `bytes` bytes.
        unsafe { drv::memset_d8_sync(ptr, 0, bytes) }.map_err(|e| format!("cuMemsetD8: {e:?}"))?;
        Ok(ptr)
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        self.bind()?;
        self.owned(addr)?;
        // SAFETY: `addr` is one of this op's buffers, allocated with at least `bytes.len()` bytes
        // by the caller's `alloc(bytes.len())`.
        unsafe { drv::memcpy_htod_sync(addr, bytes) }.map_err(|e| format!("cuMemcpyHtoD: {e:?}"))
    }

    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), String> {
        self.bind()?;
        self.owned(addr)?;
        // SAFETY: `addr` is one of this op's buffers of at least `out.len()` bytes (the caller
        // reads at most the length it allocated). The synchronous copy runs on the legacy
        // default stream, after every kernel launched before it.
        unsafe { drv::memcpy_dtoh_sync(out, addr) }.map_err(|e| format!("cuMemcpyDtoH: {e:?}"))
    }

    fn launch(&mut self, kernel: &str, grid: u32, block: u32, args: &[u64]) -> Result<(), String> {
        self.bind()?;
        let f = *self.functions.get(kernel).ok_or_else(|| format!("kernel {kernel} was not loaded"))?;
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| (v as *mut u64).cast::<c_void>()).collect();
        // SAFETY: `f` comes from the loaded module; `params` points at one 8-byte value per
        // kernel parameter (`Scope::launch` checked their number and kinds against the kernel's
        // declaration: buffer addresses of this op, u64 sizes, doubles), and `values` outlives
        // the call, which copies them. Stream 0 is the legacy default stream.
        unsafe { drv::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, std::ptr::null_mut(), &mut params) }
            .map_err(|e| format!("cuLaunchKernel: {e:?}"))
    }

    fn dgemm(&mut self, g: &GemmCall) -> Result<(), String> {
        self.bind()?;
        for addr in [g.a, g.b, g.c] {
            self.owned(addr)?;
        }
        let op =
            |t| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f64, 0.0f64);
        // SAFETY: `a`, `b`, `c` are this op's buffers, sized by `GpuRef::gemm` for the
        // shape that `gemm_call` turned into these dimensions, leading dimensions and strides
        // (the emulated DGEMM checks every access of the same call against the buffer sizes);
        // alpha and beta are host values that outlive the call; with beta = 0 cuBLAS does not
        // read C.
        unsafe {
            blas::dgemm_strided_batched(
                self.blas,
                op(g.trans_a),
                op(g.trans_b),
                g.m,
                g.n,
                g.k,
                &alpha,
                g.a as *const f64,
                g.lda,
                g.stride_a,
                g.b as *const f64,
                g.ldb,
                g.stride_b,
                &beta,
                g.c as *mut f64,
                g.ldc,
                g.stride_c,
                g.batch,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }

    fn time_gemms(&mut self, specs: &[MatmulSpec], precision: GemmPrecision, reps: usize) -> Result<f64, String> {
        // Buffers sized for FP64 serve both precisions; they are zero-filled by `alloc`.
        let mut calls = Vec::with_capacity(specs.len());
        for s in specs {
            let a = self.alloc(s.batch * s.m * s.k * 8)?;
            let b = self.alloc(s.batch * s.k * s.n * 8)?;
            let c = self.alloc(s.batch * s.m * s.n * 8)?;
            calls.push(gemm_call(*s, a, b, c)?);
        }
        let pass = |exec: &mut CudaExec| -> Result<(), String> {
            for g in &calls {
                match precision {
                    GemmPrecision::F64 => exec.dgemm(g)?,
                    GemmPrecision::F32 => exec.sgemm(g)?,
                }
            }
            Ok(())
        };
        let timed = (|| -> Result<f64, String> {
            pass(self)?;
            drv::ctx::synchronize().map_err(|e| format!("cuCtxSynchronize: {e:?}"))?;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                pass(self)?;
            }
            drv::ctx::synchronize().map_err(|e| format!("cuCtxSynchronize: {e:?}"))?;
            Ok(t0.elapsed().as_secs_f64() / reps as f64)
        })();
        let released = self.release();
        let seconds = timed?;
        released.map(|()| seconds)
    }

    fn release(&mut self) -> Result<(), String> {
        self.bind()?;
        let synced = drv::ctx::synchronize().map_err(|e| format!("cuCtxSynchronize: {e:?}"));
        let mut freed = Ok(());
        for ptr in self.buffers.drain(..) {
            // SAFETY: each pointer was allocated by `alloc`, is freed once (drained), and no
            // work that uses it is pending (synchronized above; on a sticky error the context
            // is unusable anyway).
            if let Err(e) = unsafe { drv::free_sync(ptr) } {
                freed = Err(format!("cuMemFree: {e:?}"));
            }
        }
        synced.and(freed)
    }
}

impl Drop for CudaExec {
    fn drop(&mut self) {
        let _ = self.release();
        if !self.blas.is_null() {
            // SAFETY: the handle was created by `start` and is destroyed once, here.
            let _ = unsafe { blas::destroy_handle(self.blas) };
        }
        // SAFETY: the module was loaded by `start`; its functions are not used after this.
        let _ = unsafe { drv::module::unload(self.module) };
    }
}
