//! One launch API for two backends: the CUDA driver (through cudarc) and the CPU emulator
//! that runs the same `.cu` sources on the host.
//!
//! The layer code above this trait (which kernels, which grids, which GEMMs) is written once.
//! A backend provides device memory, kernel launches by entry-point name with typed
//! arguments (like `cuLaunchKernel`), and a row-major GEMM (cuBLAS on CUDA; the CPU GEMM on
//! the emulator).

use crate::dtype::DType;
use anyhow::Result;

/// A device address as a kernel sees it: a `CUdeviceptr` on CUDA, a host address on the
/// emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

/// One kernel argument, passed by value exactly as the `.cu` signature declares it
/// (a `Ptr` for any `T*`, the scalar types for scalars).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// Any pointer parameter.
    Ptr(DevPtr),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `long long` / `int64_t`.
    I64(i64),
    /// `unsigned long long` / `uint64_t`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl KernelArg {
    /// Little-endian bytes of the value, as the kernel parameter buffer holds it.
    pub fn to_bytes(&self) -> ([u8; 8], usize) {
        let mut b = [0u8; 8];
        let n = match *self {
            KernelArg::Ptr(p) => {
                b.copy_from_slice(&p.0.to_le_bytes());
                8
            }
            KernelArg::I32(v) => {
                b[..4].copy_from_slice(&v.to_le_bytes());
                4
            }
            KernelArg::U32(v) => {
                b[..4].copy_from_slice(&v.to_le_bytes());
                4
            }
            KernelArg::I64(v) => {
                b.copy_from_slice(&v.to_le_bytes());
                8
            }
            KernelArg::U64(v) => {
                b.copy_from_slice(&v.to_le_bytes());
                8
            }
            KernelArg::F32(v) => {
                b[..4].copy_from_slice(&v.to_le_bytes());
                4
            }
        };
        (b, n)
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic (`extern __shared__`) bytes per block.
    pub shared_bytes: u32,
}

/// A row-major GEMM: `C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C`, with f32
/// accumulation. `op(X)` is `X` or `Xᵀ`; `ld*` are row strides in elements of the matrix
/// as stored (so a transposed `A` stored `[k, m]` has `lda ≥ m`).
#[derive(Clone, Copy, Debug)]
pub struct GemmDesc {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// A's storage.
    pub a: DevPtr,
    /// A's dtype.
    pub a_dtype: DType,
    /// A's row stride (elements).
    pub lda: usize,
    /// Use Aᵀ.
    pub trans_a: bool,
    /// B's storage.
    pub b: DevPtr,
    /// B's dtype.
    pub b_dtype: DType,
    /// B's row stride (elements).
    pub ldb: usize,
    /// Use Bᵀ.
    pub trans_b: bool,
    /// C's storage (read when `beta != 0`).
    pub c: DevPtr,
    /// C's dtype.
    pub c_dtype: DType,
    /// C's row stride (elements).
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the existing C.
    pub beta: f32,
}

/// Device memory owned by a backend; freed on drop.
pub trait DeviceBuffer {
    /// The address of the first byte.
    fn ptr(&self) -> DevPtr;
    /// Size in bytes.
    fn bytes(&self) -> usize;
}

/// A place to run kernels: CUDA or the emulator.
pub trait Backend {
    /// The backend's owned device memory.
    type Buffer: DeviceBuffer;

    /// `"cuda"` or `"emu"`.
    fn name(&self) -> &'static str;

    /// Allocates `bytes` of zeroed device memory, aligned to at least 256 bytes.
    ///
    /// # Errors
    /// Out of memory or a driver error.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer>;

    /// Copies `src` into the start of `dst`, ordered on the backend's stream; returns when `src`
    /// may be reused (the copy has left it).
    ///
    /// # Errors
    /// `src` longer than `dst`, or a driver error.
    fn upload(&self, dst: &mut Self::Buffer, src: &[u8]) -> Result<()>;

    /// Copies the start of `src` into `dst` after all work queued so far has finished.
    ///
    /// # Errors
    /// `dst` longer than `src`, or a driver error (including a fault in an earlier kernel).
    fn download(&self, src: &Self::Buffer, dst: &mut [u8]) -> Result<()>;

    /// Launches the kernel entry point `kernel` with `args`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and every
    /// pointer argument must address device memory of this backend valid for every access the
    /// kernel makes with these dimensions.
    ///
    /// # Errors
    /// An unknown kernel name, invalid dimensions, or a launch failure (on the emulator, a
    /// detected fault: barrier divergence, a missing warp lane, a deadlock).
    unsafe fn launch(&self, kernel: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()>;

    /// Runs a row-major GEMM (see [`GemmDesc`]).
    ///
    /// # Safety
    /// Every pointer in `g` must address device memory of this backend large enough for the
    /// described matrices and strides.
    ///
    /// # Errors
    /// An unsupported dtype combination or a library failure.
    unsafe fn gemm(&self, g: &GemmDesc) -> Result<()>;

    /// Waits for all queued work.
    ///
    /// # Errors
    /// A fault in queued work.
    fn synchronize(&self) -> Result<()>;
}
