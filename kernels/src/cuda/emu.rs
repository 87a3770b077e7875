//! A host emulation of the GPU, for tests on machines without one: `kernels.cu` compiled by the
//! host's C compiler behind a prelude that stands in for CUDA's thread indices and `__d*_rn`
//! intrinsics, each launch run thread by thread in index order, and DGEMM by a reference loop
//! over cuBLAS's column-major definition that checks every access against the buffer sizes.
//!
//! It tests what the real backend shares with it — the host glue of every op, the kernels'
//! index arithmetic, each launch's parameter list, the DGEMM mapping — and nothing of the GPU's
//! arithmetic: here `exp`/`tanh`/`log` are the host's, nothing is contracted
//! (`-ffp-contract=off`), and the DGEMM sums each dot product from its last term to its first
//! (an order no CPU profile uses, so the bounds are exercised).

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Exec, GemmCall, KERNELS_CU, signatures};

/// What the C compiler needs in front of the kernels: CUDA's names, on the host.
const EMU_PRELUDE: &str = r#"
#include <math.h>
#include <stdbool.h>
typedef unsigned long long u64;
struct tb_dim3 { unsigned x, y, z; };
static struct tb_dim3 blockIdx, blockDim, threadIdx;
void tb_emu_thread(unsigned block, unsigned threads, unsigned thread) {
    blockIdx.x = block; blockDim.x = threads; threadIdx.x = thread;
}
#define KERNEL void
#define DEVICE static
#define TB_NEG_INF (-INFINITY)
#define __dadd_rn(a, b) ((a) + (b))
#define __dsub_rn(a, b) ((a) - (b))
#define __dmul_rn(a, b) ((a) * (b))
#define __ddiv_rn(a, b) ((a) / (b))
#define __dsqrt_rn(a) sqrt(a)
"#;

type Entry = unsafe extern "C" fn(*mut *mut c_void);
type SetThread = unsafe extern "C" fn(u32, u32, u32);

/// One zero-filled, 8-byte aligned host buffer.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with `layout` by `alloc_zeroed` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct EmuExec {
    /// Keeps the compiled kernels loaded while `entries` point into them.
    _lib: libloading::Library,
    entries: BTreeMap<String, Entry>,
    set_thread: SetThread,
    buffers: Vec<Buffer>,
}

// SAFETY: the buffers are owned by this value and only touched through `&mut self` (under the
// `Gpu`'s mutex); the library's code is plain functions whose only state (the emulated thread
// indices) is likewise used only under that mutex.
unsafe impl Send for EmuExec {}

/// Compiles the kernels for the host and loads them.
pub(super) fn start(_cuda_source: &str, kernels: &[&str]) -> Result<(Box<dyn Exec>, String), String> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let sigs = signatures(KERNELS_CU)?;
    let mut src = format!("{EMU_PRELUDE}{KERNELS_CU}\n");
    for (name, params) in &sigs {
        let args: Vec<String> = params.iter().enumerate().map(|(i, (ty, _))| format!("*({ty}*)p[{i}]")).collect();
        src.push_str(&format!("void tb_emu_{name}(void** p) {{ {name}({}); }}\n", args.join(", ")));
    }
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "tiebreak-cuda-emu-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let (c_file, lib_file) = (dir.join("kernels_emu.c"), dir.join("libkernels_emu.so"));
    std::fs::write(&c_file, &src).map_err(|e| format!("writing {}: {e}", c_file.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c99", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-o"])
        .arg(&lib_file)
        .arg(&c_file)
        .arg("-lm")
        .output()
        .map_err(|e| format!("running the C compiler {cc:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cc} could not compile the kernels for the host:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // SAFETY: the library is the code just generated from `kernels.cu` and the prelude: it has
    // no initialisers and no global state besides the emulated thread indices.
    let lib =
        unsafe { libloading::Library::new(&lib_file) }.map_err(|e| format!("loading {}: {e}", lib_file.display()))?;
    // The mapping stays valid after the file is gone.
    let _ = std::fs::remove_dir_all(&dir);
    let mut entries = BTreeMap::new();
    for &k in kernels {
        // SAFETY: `tb_emu_<name>` is generated above with exactly this signature.
        let f: Entry = *unsafe { lib.get::<Entry>(format!("tb_emu_{k}").as_bytes()) }
            .map_err(|e| format!("kernel {k} is missing from the host build: {e}"))?;
        entries.insert(k.to_string(), f);
    }
    // SAFETY: `tb_emu_thread` is defined in the prelude with exactly this signature.
    let set_thread: SetThread =
        *unsafe { lib.get::<SetThread>(b"tb_emu_thread") }.map_err(|e| format!("tb_emu_thread: {e}"))?;
    let exec = EmuExec { _lib: lib, entries, set_thread, buffers: Vec::new() };
    Ok((Box::new(exec), format!("host emulation of the CUDA kernels (compiled by {cc})")))
}

impl EmuExec {
    /// The buffer holding `[addr, addr + len)`, as (start pointer, offset).
    fn locate(&self, addr: u64, len: usize) -> Result<(*mut u8, usize), String> {
        self.buffers
            .iter()
            .find_map(|b| {
                let start = b.ptr as u64;
                let off = addr.checked_sub(start)? as usize;
                (off.checked_add(len)? <= b.layout.size()).then_some((b.ptr, off))
            })
            .ok_or_else(|| format!("[{addr:#x}, +{len}) is not inside one buffer of this op"))
    }

    fn read_f64s(&mut self, addr: u64, n: usize) -> Result<Vec<f64>, String> {
        let mut v = vec![0.0f64; n];
        let (ptr, off) = self.locate(addr, n * 8)?;
        // SAFETY: `locate` checked that the `n·8` bytes lie inside one live buffer, and `v` has
        // room for them; f64 accepts any bit pattern.
        unsafe { std::ptr::copy_nonoverlapping(ptr.add(off), v.as_mut_ptr().cast::<u8>(), n * 8) };
        Ok(v)
    }
}

impl Exec for EmuExec {
    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        let layout =
            std::alloc::Layout::from_size_align(bytes.max(8).next_multiple_of(8), 8).map_err(|e| e.to_string())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("out of host memory for {bytes} bytes"));
        }
        self.buffers.push(Buffer { ptr, layout });
        Ok(ptr as u64)
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        let (ptr, off) = self.locate(addr, bytes.len())?;
        // SAFETY: `locate` checked the destination range lies inside one live buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.add(off), bytes.len()) };
        Ok(())
    }

    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), String> {
        let (ptr, off) = self.locate(addr, out.len())?;
        // SAFETY: `locate` checked the source range lies inside one live buffer.
        unsafe { std::ptr::copy_nonoverlapping(ptr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn launch(&mut self, kernel: &str, grid: u32, block: u32, args: &[u64]) -> Result<(), String> {
        let f = *self.entries.get(kernel).ok_or_else(|| format!("kernel {kernel} was not built"))?;
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| (v as *mut u64).cast::<c_void>()).collect();
        for b in 0..grid {
            for t in 0..block {
                // SAFETY: `set_thread` only stores three integers. `f` unpacks exactly the
                // kernel's parameters from `params` (one 8-byte value each, checked against the
                // declaration by `Scope::launch`); buffer arguments are this op's live buffers.
                unsafe {
                    (self.set_thread)(b, block, t);
                    f(params.as_mut_ptr());
                }
            }
        }
        Ok(())
    }

    fn dgemm(&mut self, g: &GemmCall) -> Result<(), String> {
        let (m, n, k, batch) = (g.m as usize, g.n as usize, g.k as usize, g.batch as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let (sa, sb, sc) = (g.stride_a as usize, g.stride_b as usize, g.stride_c as usize);
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        // cuBLAS's requirements on the leading dimensions, then the extent of each operand.
        let (a_rows, a_cols) = if g.trans_a { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if g.trans_b { (n, k) } else { (k, n) };
        if lda < a_rows.max(1) || ldb < b_rows.max(1) || ldc < m.max(1) {
            return Err(format!("invalid leading dimensions in {g:?}"));
        }
        let extent = |stride: usize, ld: usize, rows: usize, cols: usize| (batch - 1) * stride + (cols - 1) * ld + rows;
        let a = self.read_f64s(g.a, extent(sa, lda, a_rows, a_cols))?;
        let b = self.read_f64s(g.b, extent(sb, ldb, b_rows, b_cols))?;
        let mut c = self.read_f64s(g.c, extent(sc, ldc, m, n))?;
        for p in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    let mut s = 0.0;
                    for l in (0..k).rev() {
                        let x = if g.trans_a { a[p * sa + l + i * lda] } else { a[p * sa + i + l * lda] };
                        let y = if g.trans_b { b[p * sb + j + l * ldb] } else { b[p * sb + l + j * ldb] };
                        s += x * y;
                    }
                    c[p * sc + i + j * ldc] = s;
                }
            }
        }
        let bytes: Vec<u8> = c.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.write(g.c, &bytes)
    }

    fn release(&mut self) -> Result<(), String> {
        self.buffers.clear();
        Ok(())
    }
}
