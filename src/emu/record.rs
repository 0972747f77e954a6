//! The emulator's access record: every global and shared-memory load and store a kernel
//! makes, with its thread, block, barrier interval and source site.
//!
//! A backend made with [`super::EmuBackend::recording`] runs each launch through the kernels'
//! recording build (build/emu.rs compiles the `.cu` sources a second time with the compiler's
//! ThreadSanitizer instrumentation, whose `__tsan_readN`/`__tsan_writeN` hooks the emulator's
//! runtime implements) and keeps one [`LaunchRecord`] per launch. Global memory is every
//! buffer allocated by an [`super::EmuBackend`] (live when the kernel runs); shared memory is
//! the block's shared-memory arena. Accesses to anything else (thread stacks, kernel
//! parameters, the emulator's own state) are not device memory and are not recorded.
//! kernels/emu/README.md ("Access recording") describes what is recorded and how.

use std::collections::HashMap;

/// The access writes (a read-modify-write atomic has this bit and [`ATOMIC`]).
pub const WRITE: u32 = 1;
/// The access is an atomic read-modify-write (`atomicAdd`, ...).
pub const ATOMIC: u32 = 2;
/// The access is to the block's shared memory (else to a global buffer).
pub const SHARED: u32 = 4;

/// One recorded access (mirror of `struct dfemu_access` in kernels/emu/launch.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Host address of the first byte.
    pub addr: u64,
    /// Code address of the access: its site, resolved by [`Sites`].
    pub pc: u64,
    /// Bytes accessed (1-16 for loads and stores; ldmatrix rows and cp.async copies are 16).
    pub size: u32,
    /// Linear block index `x + gx·(y + gy·z)`.
    pub block: u32,
    /// Linear thread index in the block `x + bx·(y + by·z)` (warp = thread / 32).
    pub thread: u32,
    /// `__syncthreads()` completed by the block before the access: the barrier interval.
    pub barrier: u32,
    /// Synchronisation points the thread passed before the access (its block's barriers and
    /// the warp collectives it took part in: shuffles, votes, `__syncwarp`, mma, ldmatrix).
    pub epoch: u32,
    /// [`WRITE`], [`ATOMIC`], [`SHARED`] bits.
    pub flags: u32,
}

impl Access {
    /// True for a store or an atomic.
    pub fn is_write(&self) -> bool {
        self.flags & WRITE != 0
    }
    /// True for an atomic read-modify-write.
    pub fn is_atomic(&self) -> bool {
        self.flags & ATOMIC != 0
    }
    /// True for shared memory, false for global memory.
    pub fn is_shared(&self) -> bool {
        self.flags & SHARED != 0
    }
    /// The warp of the accessing thread in its block.
    pub fn warp(&self) -> u32 {
        self.thread / 32
    }
}

/// Every access of one kernel launch on the emulator.
#[derive(Debug, Clone)]
pub struct LaunchRecord {
    /// Entry point.
    pub kernel: String,
    /// Grid (blocks per dimension).
    pub grid: [u32; 3],
    /// Block (threads per dimension).
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes.
    pub dynamic_shared: u32,
    /// Static shared memory per block (all `__shared__` variables the kernel touched), bytes.
    pub static_shared: u32,
    /// Blocks recorded: those whose linear index is a multiple of this (1 = every block).
    pub block_stride: u32,
    /// The accesses, each thread's in program order (threads interleave by the schedule).
    pub accesses: Vec<Access>,
    /// The kernel's arguments as launched (pointers, sizes, scalars in parameter order): the
    /// launch shapes a per-kernel byte count reads ([`crate::profile::formula`]).
    pub args: Vec<crate::backend::KernelArg>,
}

impl LaunchRecord {
    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }
    /// Blocks whose accesses are in the record.
    pub fn recorded_blocks(&self) -> u64 {
        self.blocks().div_ceil(self.block_stride.max(1) as u64)
    }
    /// The linear block index as (x, y, z).
    pub fn block_xyz(&self, linear: u32) -> [u32; 3] {
        let (gx, gy) = (self.grid[0], self.grid[1]);
        [linear % gx, (linear / gx) % gy, linear / (gx * gy)]
    }
    /// The linear thread index as (x, y, z).
    pub fn thread_xyz(&self, linear: u32) -> [u32; 3] {
        let (bx, by) = (self.block[0], self.block[1]);
        [linear % bx, (linear / bx) % by, linear / (bx * by)]
    }
}

/// Source sites of code addresses, resolved once per address from the executable's debug
/// information (the recording build is compiled with `-g`).
///
/// A site is the innermost inlined frame in a kernel source (`.cu`); when the access lies in
/// a header only (a helper of `common.cuh` inlined into the kernel), the innermost frame.
#[derive(Debug, Default)]
pub struct Sites {
    cache: HashMap<u64, String>,
}

impl Sites {
    /// An empty cache.
    pub fn new() -> Sites {
        Sites::default()
    }

    /// `file:line` of the code address `pc` (file relative to the repository's `kernels/`
    /// when it lies there), or `0x...` when there is no debug information.
    pub fn site(&mut self, pc: u64) -> String {
        if let Some(s) = self.cache.get(&pc) {
            return s.clone();
        }
        let mut frames: Vec<(String, u32)> = Vec::new();
        // The return address points after the call; resolve the call instruction itself.
        let addr = pc.saturating_sub(1) as usize as *mut std::ffi::c_void;
        backtrace::resolve(addr, |sym| {
            if let (Some(f), Some(l)) = (sym.filename(), sym.lineno()) {
                frames.push((f.to_string_lossy().into_owned(), l));
            }
        });
        let pick = frames
            .iter()
            .find(|(f, _)| f.ends_with(".cu"))
            .or_else(|| frames.first());
        let s = match pick {
            Some((f, l)) => format!("{}:{l}", short_path(f)),
            None => format!("{pc:#x}"),
        };
        self.cache.insert(pc, s.clone());
        s
    }
}

/// `kernels/...` for a path inside a `kernels/` directory, else the file name.
fn short_path(f: &str) -> &str {
    if let Some(i) = f.rfind("/kernels/") {
        &f[i + 1..]
    } else {
        f.rsplit('/').next().unwrap_or(f)
    }
}
