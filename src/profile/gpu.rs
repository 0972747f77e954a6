//! Grid fill on a named GPU: resident blocks per SM from the block size, shared memory and
//! registers per thread, and the waves a grid takes (the CUDA occupancy calculator's rules).
//!
//! Limits per SM are NVIDIA's published figures (CUDA C++ Programming Guide, "Compute
//! Capabilities", table of technical specifications per compute capability, and each GPU's
//! datasheet for the SM count). Registers are allocated per warp in units of 256 (each
//! thread's count rounded up to a multiple of 8), from four SM sub-partitions of 16 K each;
//! the driver reserves 1 KiB of shared memory per block.

use serde::Serialize;

/// The per-SM limits of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// Name on the command line and in JSON.
    pub name: &'static str,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Shared memory per SM usable by blocks, bytes.
    pub shared_per_sm: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// Resident threads per SM.
    pub threads_per_sm: u32,
    /// Resident blocks per SM.
    pub blocks_per_sm: u32,
}

/// H200 (compute capability 9.0, SXM): 132 SMs, 228 KiB shared memory per SM.
pub const H200: Gpu = Gpu {
    name: "h200",
    sms: 132,
    shared_per_sm: 228 * 1024,
    registers_per_sm: 65536,
    threads_per_sm: 2048,
    blocks_per_sm: 32,
};

/// A100 (compute capability 8.0, SXM): 108 SMs, 164 KiB shared memory per SM.
pub const A100: Gpu = Gpu {
    name: "a100",
    sms: 108,
    shared_per_sm: 164 * 1024,
    registers_per_sm: 65536,
    threads_per_sm: 2048,
    blocks_per_sm: 32,
};

/// L40S (compute capability 8.9): 142 SMs, 100 KiB shared memory per SM, 1536 threads.
pub const L40S: Gpu = Gpu {
    name: "l40s",
    sms: 142,
    shared_per_sm: 100 * 1024,
    registers_per_sm: 65536,
    threads_per_sm: 1536,
    blocks_per_sm: 24,
};

/// Every GPU the profile knows.
pub const GPUS: [Gpu; 3] = [H200, A100, L40S];

/// Shared memory the driver reserves per resident block, bytes.
const RESERVED_SHARED: u32 = 1024;

/// How a grid fills a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fill {
    /// The GPU.
    pub gpu: &'static str,
    /// Resident blocks per SM (0: the block does not fit).
    pub blocks_per_sm: u32,
    /// What limits it: "threads", "registers", "shared memory" or "blocks".
    pub limit: &'static str,
    /// Blocks / (resident blocks per SM × SMs): the waves the grid takes (fractional).
    pub waves: f64,
    /// Fraction of the SMs' block slots busy in the last wave (1: the last wave is full).
    pub tail: f64,
}

impl Gpu {
    /// The GPU named `name` (case-insensitive).
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn by_name(name: &str) -> anyhow::Result<Gpu> {
        GPUS.into_iter()
            .find(|g| g.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                let names: Vec<_> = GPUS.iter().map(|g| g.name).collect();
                anyhow::anyhow!("unknown GPU {name:?} (known: {})", names.join(", "))
            })
    }

    /// Grid fill of `blocks` blocks of `threads` threads using `shared` bytes of shared
    /// memory (static + dynamic) and `registers` registers per thread (`None`: unknown, the
    /// register limit is then left out and `limit` says so when it would be the only one).
    pub fn fill(&self, blocks: u64, threads: u32, shared: u32, registers: Option<u32>) -> Fill {
        let warps = threads.div_ceil(32).max(1);
        let mut best = (self.blocks_per_sm, "blocks");
        let mut consider = |n: u32, why: &'static str| {
            if n < best.0 {
                best = (n, why);
            }
        };
        consider(self.threads_per_sm / (warps * 32), "threads");
        if let Some(r) = registers {
            let per_warp = (r.max(1).div_ceil(8) * 8 * 32).div_ceil(256) * 256;
            let warps_by_regs = 4 * ((self.registers_per_sm / 4) / per_warp);
            consider(warps_by_regs / warps, "registers");
        }
        if shared > 0 {
            consider(
                self.shared_per_sm / (shared + RESERVED_SHARED),
                "shared memory",
            );
        }
        let (per_sm, limit) = best;
        let slots = per_sm as u64 * self.sms as u64;
        let (waves, tail) = if slots == 0 {
            (f64::INFINITY, 0.0)
        } else {
            let rem = blocks % slots;
            (
                blocks as f64 / slots as f64,
                if rem == 0 {
                    1.0
                } else {
                    rem as f64 / slots as f64
                },
            )
        };
        Fill {
            gpu: self.name,
            blocks_per_sm: per_sm,
            limit,
            waves,
            tail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_follows_each_limit() {
        // 256 threads, 32 registers, no shared memory: 8 blocks by threads; 132·8 slots.
        let f = H200.fill(64, 256, 0, Some(32));
        assert_eq!((f.blocks_per_sm, f.limit), (8, "threads"));
        assert!((f.waves - 64.0 / 1056.0).abs() < 1e-12);
        // 128 registers per thread: a warp takes 4096 registers, 16 warps per SM, 2 blocks.
        let f = H200.fill(1000, 256, 0, Some(128));
        assert_eq!((f.blocks_per_sm, f.limit), (2, "registers"));
        // 100 KiB of shared memory per block: 2 blocks on an H200, 1 on an A100, 0 on L40S.
        assert_eq!(H200.fill(1, 128, 100 << 10, Some(32)).blocks_per_sm, 2);
        assert_eq!(A100.fill(1, 128, 100 << 10, Some(32)).blocks_per_sm, 1);
        let f = L40S.fill(1, 128, 100 << 10, Some(32));
        assert_eq!((f.blocks_per_sm, f.limit), (0, "shared memory"));
        assert!(f.waves.is_infinite());
        // 2.5 waves: the tail is half full.
        let f = H200.fill(132 * 8 * 5 / 2, 256, 0, Some(32));
        assert!((f.waves - 2.5).abs() < 1e-12 && (f.tail - 0.5).abs() < 1e-12);
        assert!(Gpu::by_name("H200").is_ok() && Gpu::by_name("v100").is_err());
    }
}
