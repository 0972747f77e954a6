//! The CUDA backend: the kernels of `kernels/*.cu`, compiled by build.rs into one fatbin and
//! embedded in the binary, launched through the CUDA driver API (cudarc), with cuBLAS for the
//! large frozen-weight products.
//!
//! Everything a [`CudaBackend`] does is ordered on one [`CudaStream`]: its own (a fresh
//! non-blocking stream, [`CudaBackend::new`]) or the caller's ([`CudaBackend::from_stream`], so
//! an engine's stream orders dorafuse's work with its own). Launches, GEMMs, allocations and
//! uploads never wait for the device; only [`Backend::download`] and [`Backend::synchronize`]
//! block the host. The kernel module is loaded once per CUDA context and shared by every
//! backend on that context; functions are looked up by name once and cached.
//!
//! Without a driver, without a device, or in a build where nvcc was missing, constructing a
//! backend returns an error that says which, and how to fix it; [`device_available`] answers
//! without panicking so callers can fall back to the CPU path.

mod timer;

pub use timer::EventTimer;

use crate::backend::{
    Backend, DevPtr, DeviceBuffer, DeviceId, DeviceMemory, Elem, GemmDesc, KernelArg, LaunchDims,
    MemoryInfo,
};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind};
use crate::kernels::{DevView, DevViewMut, Guard, MatShape};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, sys, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceSlice,
};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

mod build_info {
    include!(concat!(env!("OUT_DIR"), "/cuda_build_info.rs"));
}
mod table {
    include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));
}

pub use build_info::{KERNELS_COMPILED, NOT_COMPILED_REASON, NVCC_VERSION, PTX_ARCH, SASS_ARCHS};

/// The fatbin build.rs compiled (SASS for [`SASS_ARCHS`], PTX for [`PTX_ARCH`]), aligned for
/// `cuModuleLoadData`, which reads the fatbin header in place.
#[cfg(dorafuse_kernels)]
static FATBIN: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/dorafuse.fatbin"
)));

#[cfg(dorafuse_kernels)]
#[repr(C, align(64))]
struct Aligned<T: ?Sized>(T);

/// The embedded fatbin, or `None` when build.rs found no nvcc.
pub fn fatbin() -> Option<&'static [u8]> {
    #[cfg(dorafuse_kernels)]
    return Some(&FATBIN.0);
    #[cfg(not(dorafuse_kernels))]
    return None;
}

/// Every kernel entry point as (file stem, name), from `kernels/kernels.list` (the table
/// build.rs generated; the module resolves each one when it is loaded into a context).
pub fn entry_points() -> &'static [(&'static str, &'static str)] {
    table::KERNELS
}

/// Whether a CUDA driver is installed and reports at least one device. Never panics: without
/// `libcuda.so` it answers `false` (the driver library is probed before any driver call).
pub fn device_available() -> bool {
    device_count().map(|n| n > 0).unwrap_or(false)
}

/// Whether the driver library can be loaded (cudarc's dynamic loading probes it).
#[cfg(not(feature = "candle-cuda"))]
fn culib_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library and closes it again; it
    // calls no driver function.
    unsafe { sys::is_culib_present() }
}

/// With `candle-cuda`, candle links the CUDA libraries (cudarc's `dynamic-linking`): a
/// running program has them.
#[cfg(feature = "candle-cuda")]
fn culib_present() -> bool {
    true
}

/// The number of CUDA devices.
///
/// # Errors
/// "no CUDA driver found" when `libcuda.so` cannot be loaded, or the driver's own error when
/// `cuInit` fails (for instance a driver older than the CUDA 13 API this crate uses).
pub fn device_count() -> Result<usize> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(culib_present);
    if !present {
        return Err(Error::new(
            ErrorKind::NoDriver,
            "no CUDA driver found (libcuda.so could not be loaded): the CUDA path needs an \
             NVIDIA GPU with its driver; use --device cpu or emu",
        )
        .into());
    }
    driver::result::init().map_err(|e| {
        Error::new(
            ErrorKind::NoDriver,
            format!("no CUDA device: cuInit failed: {e}"),
        )
    })?;
    let n = driver::result::device::get_count().context("cuDeviceGetCount")?;
    Ok(n.max(0) as usize)
}

/// Device memory owned by a [`CudaBackend`]: a `CudaSlice<u8>` allocated on the backend's
/// stream (stream-ordered `cuMemAllocAsync` where the device supports it) and freed on that
/// stream when dropped, so a buffer may be dropped right after queuing work that uses it.
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    ptr: DevPtr,
    bytes: usize,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuffer({:#x}, {} bytes)", self.ptr.0, self.bytes)
    }
}

impl CudaBuffer {
    /// Wraps memory the caller allocated with cudarc (on the stream it will be used on), for
    /// the [`DoraLayer`](crate::kernels::DoraLayer) API. No cudarc event is waited on or
    /// recorded for it; typed slices of any element go through [`Backend::view`] and
    /// [`DoraLinear`](crate::kernels::DoraLinear) instead, which keep cudarc's ordering.
    pub fn from_slice(slice: CudaSlice<u8>) -> CudaBuffer {
        let bytes = slice.len();
        let ptr = {
            let (p, _record) = slice.device_ptr(slice.stream());
            DevPtr(p)
        };
        CudaBuffer { slice, ptr, bytes }
    }

    /// The cudarc slice (for copies and interop with other cudarc code).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }

    /// Gives the cudarc slice back.
    pub fn into_slice(self) -> CudaSlice<u8> {
        self.slice
    }
}

impl DeviceBuffer for CudaBuffer {
    fn ptr(&self) -> DevPtr {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A function of the loaded module, with the dynamic shared-memory limit set on it so far.
struct Function {
    handle: sys::CUfunction,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` as last set (48 KiB needs no opt-in).
    max_dynamic_smem: u32,
}

/// The embedded module loaded into one context.
struct KernelModule {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    functions: RwLock<HashMap<String, Function>>,
}

// SAFETY: CUmodule and CUfunction are driver handles, valid from any thread once the owning
// context is bound (every use below binds `ctx` first); the map is behind a lock.
unsafe impl Send for KernelModule {}
// SAFETY: as above; shared access only reads handles or goes through the RwLock.
unsafe impl Sync for KernelModule {}

impl Drop for KernelModule {
    fn drop(&mut self) {
        // Errors cannot be returned from drop; the context keeps them for its next check.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: the module was loaded into this context by `load` and is unloaded only here;
        // every backend holding it (and so every queued launch's function handle) is gone, and
        // the driver finishes queued work on a module before unloading it.
        self.ctx
            .record_err(unsafe { driver::result::module::unload(self.module) });
    }
}

impl KernelModule {
    /// The module for `ctx`: loaded at the first call per context, then shared.
    fn for_context(ctx: &Arc<CudaContext>) -> Result<Arc<KernelModule>> {
        static LOADED: Mutex<Vec<(usize, Weak<KernelModule>)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(_, w)| w.strong_count() > 0);
        if let Some(m) = loaded
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(m);
        }
        let m = Arc::new(Self::load(ctx)?);
        loaded.push((key, Arc::downgrade(&m)));
        Ok(m)
    }

    fn load(ctx: &Arc<CudaContext>) -> Result<KernelModule> {
        let Some(image) = fatbin() else {
            bail!("CUDA {NOT_COMPILED_REASON}");
        };
        ctx.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: `image` is the complete fatbin nvcc wrote (its header gives its own size),
        // 64-byte aligned, 'static, and the context is bound to this thread.
        let module = unsafe { driver::result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| {
                let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
                anyhow!(
                    "loading the embedded kernel module (nvcc {NVCC_VERSION}, SASS {SASS_ARCHS:?}, \
                     PTX {PTX_ARCH}) on a compute capability {major}.{minor} device: {e}. A \
                     device older than the oldest architecture, or a driver older than nvcc \
                     {NVCC_VERSION}, cannot load it; rebuild with DORAFUSE_CUDA_ARCHS set for \
                     this device"
                )
            })?;
        // Every entry point is looked up now, once per context. Under CUDA's lazy loading (the
        // default since CUDA 12.2) a kernel is loaded into the context at this lookup; loading
        // one can synchronise the context, which must not happen later on the serving path
        // (a launch would then wait for whatever another stream has queued).
        let mut functions = HashMap::with_capacity(table::KERNELS.len());
        for (file, name) in table::KERNELS {
            let cname = CString::new(*name).with_context(|| format!("kernel name {name:?}"))?;
            // SAFETY: `module` was loaded above into the context bound to this thread.
            let handle = unsafe { driver::result::module::get_function(module, cname) }
                .map_err(|e| {
                    anyhow!("entry point `{name}` of kernels/{file}.cu is not in the embedded module: {e}")
                });
            let handle = match handle {
                Ok(h) => h,
                Err(e) => {
                    // SAFETY: `module` is loaded, unused by any launch, and not kept.
                    let _ = unsafe { driver::result::module::unload(module) };
                    return Err(e);
                }
            };
            functions.insert(
                name.to_string(),
                Function {
                    handle,
                    max_dynamic_smem: 0,
                },
            );
        }
        Ok(KernelModule {
            ctx: ctx.clone(),
            module,
            functions: RwLock::new(functions),
        })
    }

    /// The handle of `name` (resolved when the module was loaded); raises the dynamic
    /// shared-memory limit to `shared_bytes` when a launch needs more than the default 48 KiB.
    /// A name that is not an entry point is refused without a driver call.
    fn function(&self, name: &str, shared_bytes: u32) -> Result<sys::CUfunction> {
        let unknown = || {
            anyhow!(
                "kernel `{name}` is not an entry point of the embedded module; entry points: {:?}",
                table::KERNELS.iter().map(|(_, n)| *n).collect::<Vec<_>>()
            )
        };
        {
            let map = self.functions.read().unwrap_or_else(|e| e.into_inner());
            let f = map.get(name).ok_or_else(unknown)?;
            if shared_bytes <= f.max_dynamic_smem.max(48 * 1024) {
                return Ok(f.handle);
            }
        }
        let mut map = self.functions.write().unwrap_or_else(|e| e.into_inner());
        let f = map.get_mut(name).ok_or_else(unknown)?;
        if shared_bytes > 48 * 1024 && shared_bytes > f.max_dynamic_smem {
            // SAFETY: `f.handle` belongs to this module, which is alive.
            unsafe {
                driver::result::function::set_function_attribute(
                    f.handle,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| {
                let limit = self
                    .ctx
                    .attribute(
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    )
                    .unwrap_or(0);
                anyhow!(
                    "kernel `{name}`: {shared_bytes} bytes of dynamic shared memory refused \
                     (device opt-in limit {limit} bytes): {e}"
                )
            })?;
            f.max_dynamic_smem = shared_bytes;
        }
        Ok(f.handle)
    }
}

/// Fails with [`ErrorKind::KernelsNotCompiled`] in a build without the GPU kernels.
fn check_kernels_compiled() -> Result<()> {
    if !KERNELS_COMPILED {
        return Err(Error::new(
            ErrorKind::KernelsNotCompiled,
            format!("CUDA {NOT_COMPILED_REASON}"),
        )
        .into());
    }
    Ok(())
}

/// The [`DeviceId`] of a context.
fn device_id(ctx: &CudaContext) -> DeviceId {
    DeviceId::Cuda {
        ordinal: ctx.ordinal(),
        context: ctx.cu_ctx() as u64,
    }
}

// SAFETY: a CudaSlice owns its allocation of `len` elements of T on its context until it is
// dropped, and its address and length never change.
unsafe impl<T: Elem> DeviceMemory for CudaSlice<T> {
    fn info(&self) -> MemoryInfo {
        let (p, _record) = self.device_ptr(self.stream());
        MemoryInfo {
            ptr: DevPtr(p),
            len: self.len(),
            dtype: T::DTYPE,
            device: device_id(self.context()),
        }
    }
}

/// One cuBLAS handle per stream, shared by every backend (and so every layer) on that stream.
type SharedBlas = Arc<Mutex<CudaBlas>>;

/// The handle of `stream`: created at its first use, then shared while any backend holds it.
fn blas_for_stream(stream: &Arc<CudaStream>) -> Result<SharedBlas> {
    static HANDLES: Mutex<Vec<(usize, Weak<Mutex<CudaBlas>>)>> = Mutex::new(Vec::new());
    let key = stream.cu_stream() as usize;
    let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    // A handle holds its stream alive, so a live entry's key cannot belong to another stream.
    handles.retain(|(_, w)| w.strong_count() > 0);
    if let Some(h) = handles
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(h);
    }
    // SAFETY: only tries to dlopen libcublas; calls nothing in it. Linked with candle-cuda.
    #[cfg(not(feature = "candle-cuda"))]
    if !unsafe { cublas::sys::is_culib_present() } {
        bail!(
            "cuBLAS not found (libcublas.so.13): add the CUDA toolkit's lib64, or \
             Python's site-packages/nvidia/cu13/lib, to LD_LIBRARY_PATH"
        );
    }
    stream
        .context()
        .bind_to_thread()
        .context("binding the CUDA context to this thread")?;
    let h = Arc::new(Mutex::new(
        CudaBlas::new(stream.clone()).context("creating a cuBLAS handle")?,
    ));
    handles.push((key, Arc::downgrade(&h)));
    Ok(h)
}

/// The CUDA implementation of [`Backend`]: one stream, the embedded kernel module, and the
/// stream's cuBLAS handle (created at the first [`Backend::gemm`] on that stream, and shared
/// with every other backend on the same stream).
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    module: Arc<KernelModule>,
    blas: OnceLock<SharedBlas>,
    /// Synchronise after every launch and name the kernel in any fault
    /// (`DORAFUSE_CUDA_SYNC_LAUNCHES=1`; for debugging, it serialises the host with the device).
    sync_launches: bool,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(device {})", self.stream.context().ordinal())
    }
}

impl CudaBackend {
    /// A backend on device `ordinal` (its primary context) with a new non-blocking stream.
    ///
    /// # Errors
    /// "no CUDA driver found", "no CUDA device" (none, or fewer than `ordinal + 1`), "kernels
    /// were not compiled (nvcc not found at build time): run scripts/install-nvcc.sh and
    /// rebuild", or a driver error creating the context or loading the module.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::new(
                ErrorKind::NoDevice,
                format!("no CUDA device {ordinal}: the driver reports {n} device(s)"),
            )
            .into());
        }
        check_kernels_compiled()?;
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a context on CUDA device {ordinal}"))?;
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        Self::from_stream(stream)
    }

    /// A backend that queues all its work on the caller's `stream` (its context must be
    /// current-able on the calling thread). Nothing here synchronises the host.
    ///
    /// # Errors
    /// "kernels were not compiled ...", or a driver error loading the module.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<CudaBackend> {
        check_kernels_compiled()?;
        let module = KernelModule::for_context(stream.context())?;
        let sync_launches =
            std::env::var("DORAFUSE_CUDA_SYNC_LAUNCHES").is_ok_and(|v| !v.is_empty() && v != "0");
        Ok(CudaBackend {
            stream,
            module,
            blas: OnceLock::new(),
            sync_launches,
        })
    }

    /// An input view of a cudarc sub-view (`slice.slice(a..b)`) as the matrix `shape`; cudarc's
    /// events are waited on and recorded as by [`Backend::view`].
    pub fn view_of<'a, T: Elem>(&'a self, v: CudaView<'a, T>, shape: MatShape) -> DevView<'a, T> {
        let (len, device) = (v.len(), device_id(DeviceSlice::stream(&v).context()));
        let (ptr, guard) = v.view_ptr(&self.stream);
        DevView::with_guard(DevPtr(ptr), len, device, shape, Guard::Cuda(guard))
    }

    /// An output view of a cudarc sub-view (`slice.slice_mut(a..b)`) as the matrix `shape`;
    /// cudarc's events are waited on and recorded as by [`Backend::view_mut`].
    pub fn view_mut_of<'a, T: Elem>(
        &'a self,
        v: CudaViewMut<'a, T>,
        shape: MatShape,
    ) -> DevViewMut<'a, T> {
        let (len, device) = (v.len(), device_id(DeviceSlice::stream(&v).context()));
        let (ptr, guard) = v.view_ptr_mut(&self.stream);
        DevViewMut::with_guard(DevPtr(ptr), len, device, shape, Guard::Cuda(guard))
    }

    /// The stream every operation of this backend is ordered on (record events on it to time
    /// work, or make another stream wait for it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context of [`Self::stream`].
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    /// An event pair on this backend's stream for timing device work.
    ///
    /// # Errors
    /// A driver error creating the events.
    pub fn timer(&self) -> Result<EventTimer> {
        EventTimer::new(&self.stream)
    }

    /// `"NVIDIA H200 (sm_90, 132 SMs)"`: for benchmark rows and logs.
    ///
    /// # Errors
    /// A driver error reading the device's attributes.
    pub fn device_description(&self) -> Result<String> {
        let ctx = self.context();
        let name = ctx.name().context("cuDeviceGetName")?;
        let (major, minor) = ctx.compute_capability().context("compute capability")?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("multiprocessor count")?;
        Ok(format!("{name} (sm_{major}{minor}, {sms} SMs)"))
    }

    /// Checks that every entry point of `kernels/kernels.list` has a function handle and returns
    /// how many there are. The module resolves (and, under CUDA's lazy loading, loads) all of
    /// them when it is loaded into the context, so a backend that was created has them all.
    ///
    /// # Errors
    /// The first entry point without a handle.
    pub fn load_all_kernels(&self) -> Result<usize> {
        for (file, name) in table::KERNELS {
            self.module
                .function(name, 0)
                .with_context(|| format!("entry point {name} of kernels/{file}.cu"))?;
        }
        Ok(table::KERNELS.len())
    }

    fn bind(&self) -> Result<()> {
        self.context()
            .bind_to_thread()
            .context("binding the CUDA context to this thread")
    }

    fn with_blas<T>(&self, f: impl FnOnce(&CudaBlas) -> Result<T>) -> Result<T> {
        let shared = match self.blas.get() {
            Some(h) => h,
            None => {
                let h = blas_for_stream(&self.stream)?;
                self.blas.get_or_init(|| h)
            }
        };
        let guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }
}

fn cuda_dtype(d: DType) -> cublas::sys::cudaDataType {
    match d {
        DType::F32 => cublas::sys::cudaDataType::CUDA_R_32F,
        DType::F16 => cublas::sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => cublas::sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Checks one operand of a row-major GEMM: stored `rows × cols` with row stride `ld`.
fn check_operand(name: &str, rows: usize, cols: usize, ld: usize) -> Result<()> {
    ensure!(
        ld >= cols.max(1),
        "gemm: {name} is stored [{rows}, {cols}] but its row stride is {ld} (< {cols})"
    );
    ensure!(
        ld <= i32::MAX as usize && rows <= i32::MAX as usize,
        "gemm: {name} too large for cuBLAS"
    );
    Ok(())
}

/// The column-major cuBLAS call that computes a row-major [`GemmDesc`].
///
/// Row-major `C[m×n] = op(A)·op(B)` is column-major `Cᵀ[n×m] = op(B)ᵀ·op(A)ᵀ`, and a row-major
/// matrix with row stride `ld`, read column-major with the same `ld`, is its transpose. So
/// cuBLAS gets B first and A second, each transposed exactly when the row-major description
/// transposes it, with m and n swapped; C keeps its pointer and `ldc`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColMajorGemm {
    m: usize,
    n: usize,
    k: usize,
    first: DevPtr,
    first_dtype: DType,
    ld_first: usize,
    trans_first: bool,
    second: DevPtr,
    second_dtype: DType,
    ld_second: usize,
    trans_second: bool,
}

impl ColMajorGemm {
    fn of(g: &GemmDesc) -> ColMajorGemm {
        ColMajorGemm {
            m: g.n,
            n: g.m,
            k: g.k,
            first: g.b,
            first_dtype: g.b_dtype,
            ld_first: g.ldb,
            trans_first: g.trans_b,
            second: g.a,
            second_dtype: g.a_dtype,
            ld_second: g.lda,
            trans_second: g.trans_a,
        }
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Slice<T: Elem> = CudaSlice<T>;
    type Event = driver::CudaEvent;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> DeviceId {
        device_id(self.context())
    }

    fn alloc_slice<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.bind()?;
        self.stream.alloc_zeros::<T>(len.max(1)).with_context(|| {
            format!(
                "allocating {len} {} elements on {}",
                T::DTYPE,
                self.device()
            )
        })
    }

    fn upload_slice<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.bind()?;
        let s = self
            .stream
            .clone_htod(host)
            .with_context(|| format!("upload of {} {} elements", host.len(), T::DTYPE))?;
        // Set-up work: synchronise so a pinned `host` may be reused at once (see `upload`).
        self.synchronize()?;
        Ok(s)
    }

    fn download_slice<T: Elem>(&self, slice: &CudaSlice<T>) -> Result<Vec<T>> {
        self.bind()?;
        self.stream
            .clone_dtoh(slice)
            .with_context(|| format!("download of {} {} elements", slice.len(), T::DTYPE))
    }

    fn view<'a, T: Elem>(&'a self, slice: &'a CudaSlice<T>, shape: MatShape) -> DevView<'a, T> {
        let (ptr, guard) = slice.device_ptr(&self.stream);
        DevView::with_guard(
            DevPtr(ptr),
            slice.len(),
            device_id(slice.context()),
            shape,
            Guard::Cuda(guard),
        )
    }

    fn view_mut<'a, T: Elem>(
        &'a self,
        slice: &'a mut CudaSlice<T>,
        shape: MatShape,
    ) -> DevViewMut<'a, T> {
        let (len, device) = (slice.len(), device_id(slice.context()));
        let (ptr, guard) = slice.device_ptr_mut(&self.stream);
        DevViewMut::with_guard(DevPtr(ptr), len, device, shape, Guard::Cuda(guard))
    }

    fn wait_for_writes<T: Elem>(&self, slice: &CudaSlice<T>) -> Result<()> {
        self.bind()?;
        // device_ptr makes this stream wait on the slice's last write event; the read event it
        // records on drop is harmless (it orders later writers after nothing new).
        let (_, _record) = slice.device_ptr(&self.stream);
        self.context()
            .check_err()
            .context("waiting for the writes of a CUDA slice")
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaBuffer> {
        // cuMemAlloc returns 256-byte aligned memory; a zero-byte request still gets a distinct
        // valid address so kernels never see a null pointer.
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .with_context(|| format!("allocating {bytes} bytes on CUDA device"))?;
        let mut b = CudaBuffer::from_slice(slice);
        b.bytes = bytes;
        Ok(b)
    }

    fn upload(&self, dst: &mut CudaBuffer, src: &[u8]) -> Result<()> {
        ensure!(
            src.len() <= dst.bytes,
            "upload: {} bytes into a {}-byte device buffer",
            src.len(),
            dst.bytes
        );
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least src.len() bytes (checked) and stays allocated until its
        // drop frees it on this same stream, after this copy. `src` is only borrowed for this
        // call: the driver returns early for pageable memory but not for pinned memory, so the
        // stream is synchronised below before the borrow ends.
        unsafe { driver::result::memcpy_htod_async(dst.ptr.0, src, self.stream.cu_stream()) }
            .with_context(|| format!("upload of {} bytes", src.len()))?;
        // Uploads are set-up work (weights, host-tensor entry points), never the steady-state
        // path, which works on device buffers the caller owns.
        self.synchronize()
            .with_context(|| format!("upload of {} bytes", src.len()))
    }

    fn download(&self, src: &CudaBuffer, dst: &mut [u8]) -> Result<()> {
        ensure!(
            dst.len() <= src.bytes,
            "download: {} bytes from a {}-byte device buffer",
            dst.len(),
            src.bytes
        );
        if dst.is_empty() {
            return self.synchronize();
        }
        self.bind()?;
        // SAFETY: src holds at least dst.len() bytes (checked); `dst` is borrowed mutably until
        // the stream synchronisation below, so the copy has landed before anyone reads it.
        unsafe { driver::result::memcpy_dtoh_async(dst, src.ptr.0, self.stream.cu_stream()) }
            .with_context(|| format!("download of {} bytes", dst.len()))?;
        self.synchronize().with_context(|| {
            format!(
                "download of {} bytes (or a kernel queued before it)",
                dst.len()
            )
        })
    }

    unsafe fn launch(&self, kernel: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        ensure!(
            gx > 0 && gy > 0 && gz > 0 && bx > 0 && by > 0 && bz > 0,
            "launch of `{kernel}`: empty grid {:?} or block {:?}",
            dims.grid,
            dims.block
        );
        ensure!(
            (bx as u64) * (by as u64) * (bz as u64) <= 1024,
            "launch of `{kernel}`: block {:?} has more than 1024 threads",
            dims.block
        );
        self.bind()?;
        let f = self.module.function(kernel, dims.shared_bytes)?;
        // cuLaunchKernel reads each parameter, with the size the kernel declares, through one
        // pointer per parameter; each value sits little-endian at the start of its own 8 bytes.
        let mut storage: Vec<[u8; 8]> = args.iter().map(|a| a.to_bytes().0).collect();
        let mut params: Vec<*mut c_void> = storage
            .iter_mut()
            .map(|b| b.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: the caller guarantees (this method's contract) that `args` match the kernel's
        // parameters in number, order and type and that every pointer is valid device memory
        // of this context for all accesses at these dimensions; `f` belongs to the module held
        // by `self`; `storage` outlives the call, which copies the parameters before returning.
        unsafe {
            driver::result::launch_kernel(
                f,
                (gx, gy, gz),
                (bx, by, bz),
                dims.shared_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::Launch,
                format!(
                    "launch of `{kernel}` (grid {:?}, block {:?}, {} B dynamic shared memory, {} \
                     args): {e}",
                    dims.grid,
                    dims.block,
                    dims.shared_bytes,
                    args.len()
                ),
            )
        })?;
        if self.sync_launches {
            self.stream.synchronize().with_context(|| {
                format!("kernel `{kernel}` failed (DORAFUSE_CUDA_SYNC_LAUNCHES)")
            })?;
        }
        Ok(())
    }

    unsafe fn gemm(&self, g: &GemmDesc) -> Result<()> {
        ensure!(
            g.a_dtype == g.b_dtype,
            "gemm: A is {} but B is {}; cuBLAS needs one input dtype",
            g.a_dtype.name(),
            g.b_dtype.name()
        );
        ensure!(
            g.a_dtype == g.c_dtype || g.c_dtype == DType::F32,
            "gemm: {} inputs cannot write a {} output",
            g.a_dtype.name(),
            g.c_dtype.name()
        );
        let (a_rows, a_cols) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        check_operand("A", a_rows, a_cols, g.lda)?;
        check_operand("B", b_rows, b_cols, g.ldb)?;
        check_operand("C", g.m, g.n, g.ldc)?;
        ensure!(
            g.m.max(g.n).max(g.k) <= i32::MAX as usize,
            "gemm: dimensions exceed cuBLAS's i32"
        );
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.with_blas(|blas| {
            self.bind()?;
            let cm = ColMajorGemm::of(g);
            let op = |t: bool| {
                if t {
                    cublas::sys::cublasOperation_t::CUBLAS_OP_T
                } else {
                    cublas::sys::cublasOperation_t::CUBLAS_OP_N
                }
            };
            let (alpha, beta) = (g.alpha, g.beta);
            // SAFETY: the caller guarantees (this method's contract) that a, b, c address device
            // memory of this context large enough for the described matrices and strides, which
            // were checked against the dimensions above. The handle's stream is this backend's;
            // alpha and beta are host f32, matching CUBLAS_COMPUTE_32F and the default host
            // pointer mode, and live until the call returns (cuBLAS reads them at enqueue).
            unsafe {
                cublas::result::gemm_ex(
                    *blas.handle(),
                    op(cm.trans_first),
                    op(cm.trans_second),
                    cm.m as i32,
                    cm.n as i32,
                    cm.k as i32,
                    &alpha as *const f32 as *const c_void,
                    cm.first.0 as *const c_void,
                    cuda_dtype(cm.first_dtype),
                    cm.ld_first as i32,
                    cm.second.0 as *const c_void,
                    cuda_dtype(cm.second_dtype),
                    cm.ld_second as i32,
                    &beta as *const f32 as *const c_void,
                    g.c.0 as *mut c_void,
                    cuda_dtype(g.c_dtype),
                    g.ldc as i32,
                    cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| {
                Error::new(
                    ErrorKind::Launch,
                    format!(
                        "cuBLAS gemm {}×{}×{} ({} → {}, trans_a {}, trans_b {}): {e}",
                        g.m,
                        g.n,
                        g.k,
                        g.a_dtype.name(),
                        g.c_dtype.name(),
                        g.trans_a,
                        g.trans_b
                    ),
                )
                .into()
            })
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .context("CUDA stream synchronisation (a queued kernel or copy failed)")?;
        self.context()
            .check_err()
            .context("a deferred CUDA error (from a drop)")
    }

    fn record_event(&self) -> Result<driver::CudaEvent> {
        self.stream
            .record_event(None)
            .context("recording a CUDA event")
    }

    fn wait_event(&self, event: &driver::CudaEvent) -> Result<()> {
        ensure!(
            event.context() == self.context(),
            "waiting on a CUDA event of another context"
        );
        self.stream
            .wait(event)
            .context("making a CUDA stream wait on an event")
    }

    fn event_complete(&self, event: &driver::CudaEvent) -> Result<bool> {
        event
            .try_is_complete()
            .context("querying a CUDA event (or a fault in the work it recorded)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS `gemm` as its reference documentation defines it (column-major, element (i, j) of
    /// X at `x[i + j·ld]`): `C = alpha·op(A)·op(B) + beta·C`, op(A) `m×k`, op(B) `k×n`.
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm_col_major(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        beta: f64,
        c: &mut [f64],
        ldc: usize,
    ) {
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for p in 0..k {
                    let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                    let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                    acc += av * bv;
                }
                c[i + j * ldc] = alpha * acc + beta * c[i + j * ldc];
            }
        }
    }

    /// The mapping handed to a column-major BLAS computes exactly the row-major product the
    /// descriptor asks for, for every transpose combination and padded strides (distinct
    /// values everywhere, so a swapped operand or stride cannot pass).
    #[test]
    fn col_major_mapping_computes_the_row_major_product() {
        let (m, n, k) = (5usize, 3usize, 4usize);
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (a_cols + 2, b_cols + 1, n + 3);
            let a: Vec<f64> = (0..a_rows * lda).map(|i| 1.0 + i as f64 * 0.37).collect();
            let b: Vec<f64> = (0..b_rows * ldb).map(|i| -2.0 + i as f64 * 0.11).collect();
            let c0: Vec<f64> = (0..m * ldc).map(|i| 0.5 - i as f64 * 0.07).collect();
            // Row-major truth.
            let at = |i: usize, p: usize| {
                if trans_a {
                    a[p * lda + i]
                } else {
                    a[i * lda + p]
                }
            };
            let bt = |p: usize, j: usize| {
                if trans_b {
                    b[j * ldb + p]
                } else {
                    b[p * ldb + j]
                }
            };
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                    want[i * ldc + j] = 0.75 * dot + 0.5 * c0[i * ldc + j];
                }
            }
            // The mapped column-major call; pointers 1 and 2 stand for A and B.
            let g = GemmDesc {
                m,
                n,
                k,
                a: DevPtr(1),
                a_dtype: DType::F32,
                lda,
                trans_a,
                b: DevPtr(2),
                b_dtype: DType::F32,
                ldb,
                trans_b,
                c: DevPtr(3),
                c_dtype: DType::F32,
                ldc,
                alpha: 0.75,
                beta: 0.5,
            };
            let cm = ColMajorGemm::of(&g);
            let pick = |p: DevPtr| if p == DevPtr(1) { &a } else { &b };
            let mut got = c0.clone();
            blas_gemm_col_major(
                cm.trans_first,
                cm.trans_second,
                cm.m,
                cm.n,
                cm.k,
                0.75,
                pick(cm.first),
                cm.ld_first,
                pick(cm.second),
                cm.ld_second,
                0.5,
                &mut got,
                ldc,
            );
            assert_eq!(got, want, "trans_a={trans_a} trans_b={trans_b}");
        }
    }
}
