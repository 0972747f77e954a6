//! One launch API for two backends: the CUDA driver (through cudarc) and the CPU emulator
//! that runs the same `.cu` sources on the host.
//!
//! The layer code above this trait (which kernels, which grids, which GEMMs) is written once.
//! A backend provides device memory, kernel launches by entry-point name with typed
//! arguments (like `cuLaunchKernel`), and a row-major GEMM (cuBLAS on CUDA; the CPU GEMM on
//! the emulator).

use crate::dtype::DType;
use crate::kernels::{DevView, DevViewMut, MatShape};
use anyhow::Result;

/// Which device memory belongs to: a CUDA context, or an emulator device.
///
/// Views and weights carry it, and every call checks it against the backend's, so memory of
/// one device handed to a layer bound to another is an error naming the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceId {
    /// A CUDA context: its device ordinal and its `CUcontext` handle (as an integer).
    Cuda {
        /// The device ordinal.
        ordinal: usize,
        /// The context handle.
        context: u64,
    },
    /// An emulator device (host memory labelled with an ordinal, so that the device checks
    /// run on machines without a GPU).
    Emu {
        /// The ordinal given to [`crate::emu::EmuBackend::with_device`] (0 by default).
        ordinal: usize,
    },
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceId::Cuda { ordinal, context } => {
                write!(f, "CUDA device {ordinal} (context {context:#x})")
            }
            DeviceId::Emu { ordinal } => write!(f, "emulator device {ordinal}"),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the kernels take: `f32`, [`half::f16`] or [`half::bf16`]. The dtype of a
/// typed view or slice comes from it.
#[cfg(feature = "cuda")]
pub trait Elem:
    sealed::Sealed
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Send
    + Sync
    + 'static
{
    /// The dtype.
    const DTYPE: DType;
}

/// An element type the kernels take: `f32`, [`half::f16`] or [`half::bf16`]. The dtype of a
/// typed view or slice comes from it.
#[cfg(not(feature = "cuda"))]
pub trait Elem: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    /// The dtype.
    const DTYPE: DType;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
}
impl Elem for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Elem for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// Where a block of device memory lies: its first byte, its length in elements, its dtype and
/// its device. What layers and adapters keep of the memory they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    /// The address of the first element.
    pub ptr: DevPtr,
    /// Elements.
    pub len: usize,
    /// The element dtype.
    pub dtype: DType,
    /// The device.
    pub device: DeviceId,
}

/// Device memory a layer or adapter can hold (`Arc`-shared with the engine): a backend's typed
/// slice (`CudaSlice<T>`, [`crate::emu::EmuSlice`]).
///
/// # Safety
/// [`DeviceMemory::info`] must describe memory that stays allocated, on that device, for as
/// long as the value lives, and never changes.
pub unsafe trait DeviceMemory: Send + Sync {
    /// Where the memory lies.
    fn info(&self) -> MemoryInfo;
}

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

    /// Typed device memory of this backend: `cudarc::driver::CudaSlice<T>` on CUDA (the
    /// engine's own type), [`crate::emu::EmuSlice<T>`] on the emulator.
    type Slice<T: Elem>: DeviceMemory + 'static;

    /// A point in a stream's work ([`Backend::record_event`]): `cudarc::driver::CudaEvent` on
    /// CUDA, [`crate::emu::EmuEvent`] on the emulator.
    type Event: Send + Sync;

    /// `"cuda"` or `"emu"`.
    fn name(&self) -> &'static str;

    /// The device this backend's memory and launches belong to.
    fn device(&self) -> DeviceId;

    /// `len` zeroed elements, stream-ordered.
    ///
    /// # Errors
    /// Out of memory or a driver error.
    fn alloc_slice<T: Elem>(&self, len: usize) -> Result<Self::Slice<T>>;

    /// A copy of `host` on the device; returns when `host` may be reused.
    ///
    /// # Errors
    /// Out of memory or a driver error.
    fn upload_slice<T: Elem>(&self, host: &[T]) -> Result<Self::Slice<T>>;

    /// The slice's elements, after all work queued so far on this backend's stream.
    ///
    /// # Errors
    /// A driver error (including a fault in earlier work).
    fn download_slice<T: Elem>(&self, slice: &Self::Slice<T>) -> Result<Vec<T>>;

    /// An input view of `slice` as the matrix `shape`, for calls on this backend. On CUDA this
    /// backend's stream first waits for the slice's last write (cudarc's event), and when the
    /// view is dropped, after the calls that read it were queued, cudarc's read event is
    /// recorded, so other streams' later writes wait for those reads.
    ///
    /// The shape is checked against the slice at each call, which names the tensor.
    fn view<'a, T: Elem>(&'a self, slice: &'a Self::Slice<T>, shape: MatShape) -> DevView<'a, T>;

    /// An output view of `slice` as the matrix `shape`: as [`Backend::view`], waiting for the
    /// slice's last reads and writes, and recording cudarc's write event when dropped.
    fn view_mut<'a, T: Elem>(
        &'a self,
        slice: &'a mut Self::Slice<T>,
        shape: MatShape,
    ) -> DevViewMut<'a, T>;

    /// Orders this backend's stream after every write queued on `slice` so far (on CUDA, waits
    /// on cudarc's write event; nothing to do on the emulator). Layers and adapters call it on
    /// the memory they are given, which may come from another stream.
    ///
    /// # Errors
    /// A driver error.
    fn wait_for_writes<T: Elem>(&self, slice: &Self::Slice<T>) -> Result<()>;

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

    /// Records the work queued so far on this backend's stream (a `CUevent` on CUDA).
    ///
    /// # Errors
    /// A driver error.
    fn record_event(&self) -> Result<Self::Event>;

    /// Orders the work queued on this stream from now on after `event` (of a stream of the same
    /// device), without blocking the host (`cuStreamWaitEvent` on CUDA).
    ///
    /// # Errors
    /// A driver error, or an event of another device.
    fn wait_event(&self, event: &Self::Event) -> Result<()>;

    /// Whether the work `event` recorded has finished; never blocks (`cuEventQuery`).
    ///
    /// # Errors
    /// A fault in the recorded work.
    fn event_complete(&self, event: &Self::Event) -> Result<bool>;
}
