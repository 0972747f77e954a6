//! The CPU emulator backend: runs the very `kernels/*.cu` sources on the host.
//!
//! build.rs (build/emu.rs) compiles every kernel of `kernels/kernels.list` (and the
//! emulator's own test kernels of `kernels/emu/tests/kernels.list`) with the host C++
//! compiler against a small model of the CUDA execution model (`kernels/emu/`, described in
//! `kernels/emu/README.md`): blocks run one after another, the threads of a block run as
//! fibers whose order between synchronisation points is shuffled from a seed, shared memory
//! starts every block as NaN, and barrier divergence, missing warp lanes and deadlocks fail
//! the launch with an error naming the kernel, block and thread.
//!
//! [`EmuBackend`] implements [`Backend`]: device memory is host memory, a launch runs the
//! kernel to completion on the calling thread, and GEMMs use the `matrixmultiply` crate.
//!
//! [`EmuBackend::recording`] makes a backend that records every global and shared-memory
//! access of its launches ([`record`]), for the racecheck ([`racecheck`]) and the profile
//! (`dorafuse profile`).

pub mod racecheck;
pub mod record;

use crate::backend::{
    Backend, DevPtr, DeviceBuffer, DeviceId, DeviceMemory, Elem, GemmDesc, KernelArg, LaunchDims,
    MemoryInfo,
};
use crate::cpu::gemm::{gemm, View, ViewMut};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind};
use crate::kernels::{DevView, DevViewMut, Guard, MatShape};
use anyhow::{bail, ensure, Context, Result};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Every live emulator buffer (address → bytes): the global memory a recorded launch watches.
static LIVE_BUFFERS: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn live_buffers() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
    // A panic while holding the lock leaves the map consistent (single inserts and removes).
    LIVE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The seed [`EmuBackend::from_env`] uses when `DORAFUSE_EMU_SEED` is not set.
pub const DEFAULT_SEED: u64 = 0x5EED_D0AF;

/// Alignment of every emulator buffer (CUDA allocations are aligned to at least 256 bytes).
const BUFFER_ALIGN: usize = 256;

mod ffi {
    use std::ffi::{c_char, c_void};

    /// Mirror of `struct dfemu_kernel` in kernels/emu/launch.h.
    #[repr(C)]
    pub struct Kernel {
        pub name: *const c_char,
        pub entry: Option<unsafe extern "C" fn(*mut *mut c_void)>,
        pub nargs: u32,
        pub sig: *const c_char,
    }

    extern "C" {
        pub fn dfemu_find_kernel(name: *const c_char) -> *const Kernel;
        pub fn dfemu_kernel_count() -> usize;
        pub fn dfemu_kernel_at(i: usize) -> *const Kernel;
        pub fn dfemu_launch(
            k: *const Kernel,
            grid: *const u32,
            block: *const u32,
            shared_bytes: u32,
            args: *mut *mut c_void,
            seed: u64,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32;
        pub fn dfemu_switch_count() -> u64;
        pub fn dfemu_rec_find_kernel(name: *const c_char) -> *const Kernel;
        #[allow(clippy::too_many_arguments)]
        pub fn dfemu_launch_recorded(
            k: *const Kernel,
            grid: *const u32,
            block: *const u32,
            shared_bytes: u32,
            args: *mut *mut c_void,
            seed: u64,
            ranges: *const u64,
            nranges: usize,
            block_stride: u32,
            skip_others: i32,
            limit: usize,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32;
        pub fn dfemu_recorded(n: *mut usize) -> *const super::record::Access;
        pub fn dfemu_last_static_shared() -> usize;
    }
}

/// One entry point compiled into the emulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuKernel {
    /// Entry-point name.
    pub name: String,
    /// One code per parameter: `p` pointer, `i` i32, `u` u32, `l` i64, `L` u64, `f` f32,
    /// `?` a type [`KernelArg`] cannot pass.
    pub signature: String,
}

/// Every entry point compiled into the emulator (both kernel lists), in list order.
pub fn kernels() -> Vec<EmuKernel> {
    // SAFETY: the generated table is immutable static data; indices below the count are valid
    // and every entry's strings are NUL-terminated literals.
    unsafe {
        (0..ffi::dfemu_kernel_count())
            .map(|i| {
                let k = &*ffi::dfemu_kernel_at(i);
                EmuKernel {
                    name: CStr::from_ptr(k.name).to_string_lossy().into_owned(),
                    signature: CStr::from_ptr(k.sig).to_string_lossy().into_owned(),
                }
            })
            .collect()
    }
}

/// Fiber context switches performed by the calling OS thread so far (for speed measurements).
pub fn switch_count() -> u64 {
    // SAFETY: reads a thread-local counter; no arguments.
    unsafe { ffi::dfemu_switch_count() }
}

/// Host memory standing in for device memory: zeroed, aligned to 256 bytes.
#[derive(Debug)]
pub struct EmuBuffer {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer exclusively owns its allocation; nothing in it is tied to a thread.
unsafe impl Send for EmuBuffer {}
// SAFETY: `&EmuBuffer` only exposes the address and size; writes need `&mut` or an unsafe launch.
unsafe impl Sync for EmuBuffer {}

impl EmuBuffer {
    fn layout(bytes: usize) -> Layout {
        // A zero-size buffer still gets a distinct, aligned allocation (as cudaMalloc(0) may).
        Layout::from_size_align(bytes.max(1), BUFFER_ALIGN).expect("buffer layout")
    }

    /// The buffer's bytes (after the queued work: launches run synchronously here).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of at least `bytes` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// The buffer's bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl DeviceBuffer for EmuBuffer {
    fn ptr(&self) -> DevPtr {
        DevPtr(self.ptr as u64)
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        live_buffers().remove(&(self.ptr as usize));
        // SAFETY: allocated in `alloc_zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.bytes)) }
    }
}

/// Typed emulator memory: `len` elements of `T` in an [`EmuBuffer`], labelled with the
/// emulator device it was allocated on (the emulator's `CudaSlice<T>`).
#[derive(Debug)]
pub struct EmuSlice<T: Elem> {
    buf: EmuBuffer,
    len: usize,
    device: DeviceId,
    _t: std::marker::PhantomData<T>,
}

impl<T: Elem> EmuSlice<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the slice holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements (launches run to completion before returning, so this is current).
    pub fn as_slice(&self) -> &[T] {
        bytemuck::cast_slice(&self.buf.as_slice()[..self.len * std::mem::size_of::<T>()])
    }
}

// SAFETY: the slice owns its 256-byte aligned allocation of `len` elements until dropped, and
// never moves or resizes it.
unsafe impl<T: Elem> DeviceMemory for EmuSlice<T> {
    fn info(&self) -> MemoryInfo {
        MemoryInfo {
            ptr: self.buf.ptr(),
            len: self.len,
            dtype: T::DTYPE,
            device: self.device,
        }
    }
}

/// A point in an emulator stream's work ([`Backend::record_event`]): the stream and the
/// position of the record in it. Work runs to completion when queued, so an event is complete
/// as soon as it is recorded; what the emulator keeps is the order ([`EmuBackend::stream_log`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuEvent {
    /// The stream that recorded it ([`EmuBackend::stream_id`]).
    pub stream: u64,
    /// Its number among the events of the backends sharing a log.
    pub seq: u64,
}

/// One operation in the order an emulator stream queued it ([`EmuBackend::stream_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmuStreamOp {
    /// A kernel launch.
    Launch {
        /// The stream.
        stream: u64,
        /// The entry point.
        kernel: String,
    },
    /// [`Backend::record_event`].
    Record {
        /// The stream.
        stream: u64,
        /// The event recorded.
        event: EmuEvent,
    },
    /// [`Backend::wait_event`].
    Wait {
        /// The waiting stream.
        stream: u64,
        /// The event waited on.
        event: EmuEvent,
    },
    /// [`Backend::synchronize`] or a download: the host waited for the stream.
    HostWait {
        /// The stream.
        stream: u64,
    },
}

/// The shared order of operations of the emulator streams made by [`EmuBackend::new_stream`].
#[derive(Debug, Default)]
struct StreamLog {
    ops: Vec<EmuStreamOp>,
    events: u64,
    enabled: bool,
}

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// The emulator backend. Each launch runs under a schedule derived from the backend's seed
/// and a launch counter, so a sequence of launches is reproducible for a given seed.
///
/// Each backend is one stream of its device; [`EmuBackend::new_stream`] makes another stream
/// of the same device (a side stream), sharing one log of stream operations that tests read
/// to check the order of launches, event records and waits across streams.
#[derive(Debug)]
pub struct EmuBackend {
    seed: u64,
    launches: AtomicU64,
    ordinal: usize,
    recording: Option<Recording>,
    stream: u64,
    log: Arc<Mutex<StreamLog>>,
}

/// Where a recording backend hands each launch's record, right after the launch.
pub type RecordSink = Box<dyn FnMut(record::LaunchRecord) + Send>;

/// Which kernels a recording backend launches at all (by entry point): a profile run skips
/// the launches it no longer needs (their results are meaningless there anyway).
pub type LaunchFilter = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// What a recording backend records, and the records so far (or their sink).
struct Recording {
    options: RecordOptions,
    records: Mutex<Vec<record::LaunchRecord>>,
    sink: Mutex<Option<RecordSink>>,
    filter: Option<LaunchFilter>,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Options of [`EmuBackend::recording`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordOptions {
    /// Record at most about this many blocks per launch (0: every block): the blocks whose
    /// linear index is a multiple of ⌈blocks / max_blocks⌉. The other blocks still run
    /// unless `skip_unrecorded`; sampling keeps large launches' records small.
    pub max_blocks: u32,
    /// Do not run the blocks that are not recorded (a sampled profile of a large launch:
    /// results are then meaningless, access patterns and launch shapes are not).
    pub skip_unrecorded: bool,
    /// Fail a launch whose record would exceed this many accesses (40 bytes each); 0: none.
    pub max_accesses: usize,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            max_blocks: 0,
            skip_unrecorded: false,
            max_accesses: 50_000_000,
        }
    }
}

impl EmuBackend {
    /// A backend whose thread schedules derive from `seed`, on emulator device 0.
    pub fn new(seed: u64) -> EmuBackend {
        EmuBackend {
            seed,
            launches: AtomicU64::new(0),
            ordinal: 0,
            recording: None,
            stream: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            log: Arc::default(),
        }
    }

    /// The same backend recording every global and shared-memory access of its launches
    /// (through the kernels' recording build; see [`record`]); [`EmuBackend::take_records`]
    /// hands them out. Launches are slower (each access calls the recorder).
    pub fn recording(mut self, options: RecordOptions) -> EmuBackend {
        self.recording = Some(Recording {
            options,
            records: Mutex::new(Vec::new()),
            sink: Mutex::new(None),
            filter: None,
        });
        self
    }

    /// Like [`EmuBackend::recording`], but each launch's record goes to `sink` as soon as the
    /// launch returns, and is not kept: for long runs whose records would not fit in memory
    /// together (a launch's record takes 40 bytes per access). With `filter`, a launch of a
    /// kernel it rejects is skipped entirely (returns `Ok` without running: for profile runs,
    /// whose results are not used).
    pub fn recording_into(
        mut self,
        options: RecordOptions,
        sink: RecordSink,
        filter: Option<LaunchFilter>,
    ) -> EmuBackend {
        self.recording = Some(Recording {
            options,
            records: Mutex::new(Vec::new()),
            sink: Mutex::new(Some(sink)),
            filter,
        });
        self
    }

    /// The launch records made since the last call, in launch order (empty when the backend
    /// does not record).
    pub fn take_records(&self) -> Vec<record::LaunchRecord> {
        match &self.recording {
            Some(r) => std::mem::take(&mut *r.records.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    /// Another stream of the same emulator device (the side stream of a CUDA context), with a
    /// seed derived from this one's, sharing this backend's log of stream operations.
    pub fn new_stream(&self) -> EmuBackend {
        EmuBackend {
            seed: self.seed.rotate_left(17) ^ 0xA5A5_5A5A,
            launches: AtomicU64::new(0),
            ordinal: self.ordinal,
            stream: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            log: self.log.clone(),
            recording: None,
        }
    }

    /// This stream's identity in [`EmuStreamOp`]s.
    pub fn stream_id(&self) -> u64 {
        self.stream
    }

    /// The launches, event records, waits and host waits of this backend's streams since the
    /// last [`EmuBackend::clear_stream_log`], in the order they were queued.
    pub fn stream_log(&self) -> Vec<EmuStreamOp> {
        self.log.lock().map(|l| l.ops.clone()).unwrap_or_default()
    }

    /// Empties the log of stream operations (and starts logging launches: a backend logs them
    /// only once this was called, so long runs keep no log).
    pub fn clear_stream_log(&self) {
        if let Ok(mut l) = self.log.lock() {
            l.ops.clear();
            l.enabled = true;
        }
    }

    fn log_op(&self, op: EmuStreamOp) {
        if let Ok(mut l) = self.log.lock() {
            if l.enabled {
                l.ops.push(op);
            }
        }
    }

    /// The same backend labelled as emulator device `ordinal`: its slices and views carry that
    /// device, so the device checks of the layer API (memory of one device given to a layer
    /// of another) run without a GPU. The memory itself is host memory either way.
    pub fn with_device(mut self, ordinal: usize) -> EmuBackend {
        self.ordinal = ordinal;
        self
    }

    /// A backend seeded from `DORAFUSE_EMU_SEED` (decimal or `0x` hex), or [`DEFAULT_SEED`].
    ///
    /// # Errors
    /// If `DORAFUSE_EMU_SEED` is set but is not a number: a pinned schedule that silently
    /// fell back to another would make a failure irreproducible.
    pub fn from_env() -> anyhow::Result<EmuBackend> {
        match std::env::var("DORAFUSE_EMU_SEED") {
            Ok(s) => match parse_seed(&s) {
                Some(seed) => Ok(EmuBackend::new(seed)),
                None => anyhow::bail!("DORAFUSE_EMU_SEED={s:?} is not a u64 (decimal or 0x hex)"),
            },
            Err(_) => Ok(EmuBackend::new(DEFAULT_SEED)),
        }
    }

    /// Kernel launches run by this backend so far (GEMMs are not launches): lets tests check
    /// which work a call queues, e.g. that a forward with a precomputed g runs no norm.
    pub fn launch_count(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// The seed this backend was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// Parses a seed written in decimal or as `0x` hexadecimal.
pub fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn arg_code(a: &KernelArg) -> char {
    match a {
        KernelArg::Ptr(_) => 'p',
        KernelArg::I32(_) => 'i',
        KernelArg::U32(_) => 'u',
        KernelArg::I64(_) => 'l',
        KernelArg::U64(_) => 'L',
        KernelArg::F32(_) => 'f',
    }
}

fn code_name(c: char) -> &'static str {
    match c {
        'p' => "a pointer",
        'i' => "int",
        'u' => "unsigned int",
        'l' => "a 64-bit int",
        'L' => "an unsigned 64-bit int",
        'f' => "float",
        _ => "a type KernelArg cannot pass",
    }
}

/// Widens `count` elements of `dtype` at `ptr` to f32.
///
/// # Safety
/// `ptr` must address `count` readable elements of `dtype`.
unsafe fn widen(ptr: DevPtr, dtype: DType, count: usize) -> Vec<f32> {
    let p = ptr.0 as *const u8;
    match dtype {
        DType::F32 => std::slice::from_raw_parts(p as *const f32, count).to_vec(),
        DType::F16 => std::slice::from_raw_parts(p as *const half::f16, count)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        DType::BF16 => std::slice::from_raw_parts(p as *const half::bf16, count)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

/// Elements spanned by a row-major matrix of `rows` x `cols` with row stride `ld`.
fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

impl Backend for EmuBackend {
    type Buffer = EmuBuffer;
    type Slice<T: Elem> = EmuSlice<T>;
    type Event = EmuEvent;

    fn name(&self) -> &'static str {
        "emu"
    }

    fn device(&self) -> DeviceId {
        DeviceId::Emu {
            ordinal: self.ordinal,
        }
    }

    fn alloc_slice<T: Elem>(&self, len: usize) -> Result<EmuSlice<T>> {
        Ok(EmuSlice {
            buf: self.alloc_zeroed(len * std::mem::size_of::<T>())?,
            len,
            device: self.device(),
            _t: std::marker::PhantomData,
        })
    }

    fn upload_slice<T: Elem>(&self, host: &[T]) -> Result<EmuSlice<T>> {
        let mut s = self.alloc_slice::<T>(host.len())?;
        s.buf.as_mut_slice()[..std::mem::size_of_val(host)]
            .copy_from_slice(bytemuck::cast_slice(host));
        Ok(s)
    }

    fn download_slice<T: Elem>(&self, slice: &EmuSlice<T>) -> Result<Vec<T>> {
        self.log_op(EmuStreamOp::HostWait {
            stream: self.stream,
        });
        Ok(slice.as_slice().to_vec())
    }

    fn view<'a, T: Elem>(&'a self, slice: &'a EmuSlice<T>, shape: MatShape) -> DevView<'a, T> {
        DevView::with_guard(slice.buf.ptr(), slice.len, slice.device, shape, Guard::None)
    }

    fn view_mut<'a, T: Elem>(
        &'a self,
        slice: &'a mut EmuSlice<T>,
        shape: MatShape,
    ) -> DevViewMut<'a, T> {
        DevViewMut::with_guard(slice.buf.ptr(), slice.len, slice.device, shape, Guard::None)
    }

    fn wait_for_writes<T: Elem>(&self, _slice: &EmuSlice<T>) -> Result<()> {
        // Launches and copies run to completion before returning.
        Ok(())
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuffer> {
        // SAFETY: the layout has a non-zero size and a power-of-two alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(EmuBuffer::layout(bytes)) };
        ensure!(
            !ptr.is_null(),
            "emulator: out of host memory allocating {bytes} bytes"
        );
        live_buffers().insert(ptr as usize, bytes);
        Ok(EmuBuffer { ptr, bytes })
    }

    fn upload(&self, dst: &mut EmuBuffer, src: &[u8]) -> Result<()> {
        ensure!(
            src.len() <= dst.bytes,
            "emulator upload: {} bytes into a buffer of {} bytes",
            src.len(),
            dst.bytes
        );
        dst.as_mut_slice()[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &EmuBuffer, dst: &mut [u8]) -> Result<()> {
        ensure!(
            dst.len() <= src.bytes,
            "emulator download: {} bytes from a buffer of {} bytes",
            dst.len(),
            src.bytes
        );
        self.log_op(EmuStreamOp::HostWait {
            stream: self.stream,
        });
        dst.copy_from_slice(&src.as_slice()[..dst.len()]);
        Ok(())
    }

    unsafe fn launch(&self, kernel: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        if let Some(Recording {
            filter: Some(f), ..
        }) = &self.recording
        {
            if !f(kernel) {
                self.launches.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let cname = CString::new(kernel).with_context(|| format!("kernel name {kernel:?}"))?;
        // SAFETY: `cname` is NUL-terminated; the table lookups only read static data.
        let k = unsafe {
            if self.recording.is_some() {
                ffi::dfemu_rec_find_kernel(cname.as_ptr())
            } else {
                ffi::dfemu_find_kernel(cname.as_ptr())
            }
        };
        if k.is_null() {
            let known: Vec<String> = kernels().into_iter().map(|k| k.name).collect();
            bail!(
                "emulator: no kernel {kernel} (compiled entry points: {}); add it to \
                 kernels/kernels.list",
                known.join(", ")
            );
        }
        // SAFETY: non-null entries of the generated table are valid for the program's life.
        let (nargs, sig) = unsafe {
            let k = &*k;
            (
                k.nargs as usize,
                CStr::from_ptr(k.sig).to_string_lossy().into_owned(),
            )
        };
        ensure!(
            args.len() == nargs,
            "kernel {kernel}: {} arguments given, the .cu signature has {nargs} ({sig})",
            args.len()
        );
        for (i, (a, want)) in args.iter().zip(sig.chars()).enumerate() {
            let got = arg_code(a);
            ensure!(
                got == want,
                "kernel {kernel}: argument {i} is {} ({a:?}), the .cu signature takes {}",
                code_name(got),
                code_name(want)
            );
        }
        // Each argument's value in its own 8-byte slot; the kernel reads it through the
        // parameter's type (little-endian, so a 4-byte value sits at the slot's start).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| {
                let (b, _) = a.to_bytes();
                u64::from_le_bytes(b)
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let seed = self.seed
            ^ self
                .launches
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut err = vec![0 as c_char; 4096];
        // SAFETY: `k` is a valid table entry whose trampoline reads exactly `nargs` argument
        // pointers, each to an 8-byte slot holding a value of the parameter's kind (checked
        // above); `grid`/`block` point to 3 u32 each; `err` has the stated capacity. The
        // caller guarantees the pointer arguments address memory valid for the kernel.
        let rc = match &self.recording {
            // SAFETY: as above.
            None => unsafe {
                ffi::dfemu_launch(
                    k,
                    dims.grid.as_ptr(),
                    dims.block.as_ptr(),
                    dims.shared_bytes,
                    ptrs.as_mut_ptr(),
                    seed,
                    err.as_mut_ptr(),
                    err.len(),
                )
            },
            Some(r) => {
                let blocks: u64 = dims.grid.iter().map(|&g| g as u64).product();
                let stride = match r.options.max_blocks {
                    0 => 1,
                    m => blocks.div_ceil(m as u64).clamp(1, u32::MAX as u64) as u32,
                };
                let ranges: Vec<u64> = live_buffers()
                    .iter()
                    .flat_map(|(&p, &n)| [p as u64, (p + n) as u64])
                    .collect();
                // SAFETY: as for dfemu_launch; `ranges` holds `len / 2` (start, end) pairs.
                let rc = unsafe {
                    ffi::dfemu_launch_recorded(
                        k,
                        dims.grid.as_ptr(),
                        dims.block.as_ptr(),
                        dims.shared_bytes,
                        ptrs.as_mut_ptr(),
                        seed,
                        ranges.as_ptr(),
                        ranges.len() / 2,
                        stride,
                        i32::from(r.options.skip_unrecorded),
                        r.options.max_accesses,
                        err.as_mut_ptr(),
                        err.len(),
                    )
                };
                if rc == 0 {
                    let mut n = 0usize;
                    // SAFETY: the runtime returns its thread-local record of the launch just
                    // made on this thread: `n` initialised accesses, valid until the next
                    // recorded launch of this thread (copied out here first).
                    let accesses = unsafe {
                        let p = ffi::dfemu_recorded(&mut n);
                        if n == 0 {
                            Vec::new()
                        } else {
                            std::slice::from_raw_parts(p, n).to_vec()
                        }
                    };
                    // SAFETY: reads a thread-local value of the launch just made.
                    let static_shared = unsafe { ffi::dfemu_last_static_shared() };
                    let rec = record::LaunchRecord {
                        kernel: kernel.to_string(),
                        grid: dims.grid,
                        block: dims.block,
                        dynamic_shared: dims.shared_bytes,
                        static_shared: static_shared as u32,
                        block_stride: stride,
                        accesses,
                        args: args.to_vec(),
                    };
                    match r.sink.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        Some(sink) => sink(rec),
                        None => r
                            .records
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(rec),
                    }
                }
                rc
            }
        };
        drop(slots);
        self.log_op(EmuStreamOp::Launch {
            stream: self.stream,
            kernel: kernel.to_string(),
        });
        if rc != 0 {
            // SAFETY: dfemu_launch NUL-terminates the message within the buffer.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(anyhow::Error::new(Error::new(
                ErrorKind::Launch,
                format!("emulator: {msg}"),
            )))
            .with_context(|| format!("launching {kernel} with {dims:?}"));
        }
        Ok(())
    }

    unsafe fn gemm(&self, g: &GemmDesc) -> Result<()> {
        let (m, n, k) = (g.m, g.n, g.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Stored shapes of A and B (row-major), then strides of op(A), op(B) over them.
        let (a_rows, a_cols) = if g.trans_a { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if g.trans_b { (n, k) } else { (k, n) };
        ensure!(
            g.lda >= a_cols.max(1) && g.ldb >= b_cols.max(1) && g.ldc >= n,
            "emulator gemm {m}x{n}x{k}: strides lda {} ldb {} ldc {} are smaller than the rows",
            g.lda,
            g.ldb,
            g.ldc
        );
        // SAFETY: the caller guarantees each matrix is readable over its extent.
        let a = unsafe { widen(g.a, g.a_dtype, extent(a_rows, a_cols, g.lda)) };
        let b = unsafe { widen(g.b, g.b_dtype, extent(b_rows, b_cols, g.ldb)) };
        let c_len = extent(m, n, g.ldc);
        let mut c = if g.beta != 0.0 {
            // SAFETY: as above, C is readable over its extent when beta != 0.
            unsafe { widen(g.c, g.c_dtype, c_len) }
        } else {
            vec![0.0f32; c_len]
        };
        // op(A), op(B) as strided views of the stored matrices (a transpose is a view).
        let av = View::strided(&a, a_rows, a_cols, g.lda, 1);
        let bv = View::strided(&b, b_rows, b_cols, g.ldb, 1);
        gemm(
            g.alpha,
            if g.trans_a { av.t() } else { av },
            if g.trans_b { bv.t() } else { bv },
            g.beta,
            ViewMut::strided(&mut c, m, n, g.ldc),
        );
        // Round C to its dtype, writing only the m x n elements (not the row padding).
        let base = g.c.0 as *mut u8;
        for i in 0..m {
            for j in 0..n {
                let idx = i * g.ldc + j;
                let v = c[idx];
                // SAFETY: idx < c_len, within C's extent that the caller guarantees writable.
                unsafe {
                    match g.c_dtype {
                        DType::F32 => *(base as *mut f32).add(idx) = v,
                        DType::F16 => *(base as *mut half::f16).add(idx) = half::f16::from_f32(v),
                        DType::BF16 => {
                            *(base as *mut half::bf16).add(idx) = half::bf16::from_f32(v)
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        // Launches and GEMMs run to completion before returning; faults were reported there.
        self.log_op(EmuStreamOp::HostWait {
            stream: self.stream,
        });
        Ok(())
    }

    fn record_event(&self) -> Result<EmuEvent> {
        let mut l = self
            .log
            .lock()
            .map_err(|_| anyhow::anyhow!("emulator: the stream log is poisoned"))?;
        l.events += 1;
        let event = EmuEvent {
            stream: self.stream,
            seq: l.events,
        };
        if l.enabled {
            l.ops.push(EmuStreamOp::Record {
                stream: self.stream,
                event,
            });
        }
        Ok(event)
    }

    fn wait_event(&self, event: &EmuEvent) -> Result<()> {
        self.log_op(EmuStreamOp::Wait {
            stream: self.stream,
            event: *event,
        });
        Ok(())
    }

    fn event_complete(&self, _event: &EmuEvent) -> Result<bool> {
        // The recorded work ran to completion when it was queued.
        Ok(true)
    }
}
