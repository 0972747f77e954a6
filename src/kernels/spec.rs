//! The one source of truth for kernel specialisations: which entry points exist for which
//! dtype and rank, the tile constants of `kernels/common.cuh`, and the rules that pick a
//! variant. The dispatcher (`launch.rs`) and the tests both read this table, and a
//! test checks every name against `KERNELS` (from `kernels/kernels.list`) and every tile
//! constant against `kernels/common.cuh`.

use crate::dtype::DType;

/// Threads per block of the tiled kernels (`df::THREADS`).
pub const THREADS: u32 = 256;
/// Threads per block of the 1-D helper kernels (`df::SMALL_THREADS`).
pub const SMALL_THREADS: u32 = 256;
/// Rows of V per block of norm v1 / merge (`df::VT_ROWS`).
pub const VT_ROWS: usize = 16;
/// Rows of V per block of norm v2 (`df::NT_ROWS`).
pub const NT_ROWS: usize = 64;
/// Warps per block of norm v2 (`df::NT_WARPS`).
pub const NT_WARPS: u32 = 4;
/// Columns per chunk of norm v2 (`df::NT_COLS`).
pub const NT_COLS: usize = 64;
/// Rows per block of shrink (`df::SH_ROWS`).
pub const SH_ROWS: usize = 16;
/// Ranks per block of shrink (`df::SH_RANKS`).
pub const SH_RANKS: usize = 64;
/// Reduction chunk of shrink (`df::SH_KCHUNK`); a split of d_in holds a whole number.
pub const SH_KCHUNK: usize = 32;
/// Tokens per block of compose (`df::CO_ROWS`).
pub const CO_ROWS: usize = 16;
/// Columns per block of compose (`df::CO_COLS`).
pub const CO_COLS: usize = 64;
/// Columns per block of tn (`df::TN_COLS`).
pub const TN_COLS: usize = 64;
/// Rows per reduction chunk of tn (`df::TN_TCHUNK`); a split holds a whole number of them.
pub const TN_TCHUNK: usize = 16;

/// The largest rank the kernels accept (shared-memory tables below are sized for it).
pub const MAX_RANK: usize = 256;
/// Dynamic shared memory available without opting in (`cudaFuncSetAttribute`), per block.
pub const MAX_DYNAMIC_SHARED: usize = 48 * 1024;
/// Blocks the long-reduction kernels aim for (two waves of an H100/H200's 132 SMs).
pub const TARGET_BLOCKS: usize = 264;

/// The operations with more than one specialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// n and g from W0, A, B, m.
    Norm,
    /// `part = Lᵀ·R` with a long reduction (grad_B, grad_A, exact term).
    Tn,
}

/// One specialisation: an entry-point prefix (the dtype suffix is appended), the dtypes it is
/// stamped for, and the ranks it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The operation.
    pub op: Op,
    /// Entry point without the dtype suffix, e.g. `dora_norm_v2`.
    pub prefix: &'static str,
    /// Version number in the ladder (1 = simplest; the fallback).
    pub version: u32,
    /// Dtypes it is stamped for.
    pub dtypes: &'static [DType],
    /// Smallest rank it is chosen for.
    pub min_rank: usize,
    /// Largest rank it is chosen for (and accepts).
    pub max_rank: usize,
    /// Rank tile (ranks per block) for variants that tile the rank, else 0.
    pub rank_tile: usize,
    /// Also stamped for f32 adapters beside 16-bit activations (`<dtype>_a32`).
    pub mixed: bool,
}

/// The entry-point suffix for activations (W0, x, y, ...) in `act` and adapters (A, B) in
/// `adapter`: `bf16` when they agree, `bf16_a32` for f32 adapters beside bf16 (PEFT's
/// default mix); `None` for any other pair (the host path widens such adapters to f32).
pub fn suffix(act: DType, adapter: DType) -> Option<String> {
    if act == adapter {
        Some(act.name().to_string())
    } else if adapter == DType::F32 {
        Some(format!("{}_a32", act.name()))
    } else {
        None
    }
}

impl Variant {
    /// The entry point for activations in `act` and adapters in `adapter`, e.g.
    /// `dora_norm_v2_bf16` or `dora_norm_v1_bf16_a32`.
    pub fn entry(&self, act: DType, adapter: DType) -> String {
        format!(
            "{}_{}",
            self.prefix,
            suffix(act, adapter).unwrap_or_else(|| format!("{act}_{adapter}"))
        )
    }

    /// True when this variant is stamped for the pair (`act`, `adapter`) and can run rank
    /// `r` (whether or not the dispatcher would prefer it).
    pub fn supports(&self, act: DType, adapter: DType, r: usize) -> bool {
        self.dtypes.contains(&act)
            && (adapter == act || (self.mixed && adapter == DType::F32 && act != DType::F32))
            && (1..=MAX_RANK).contains(&r)
    }
}

const ALL: &[DType] = &DType::ALL;
const MMA: &[DType] = &[DType::F16, DType::BF16];

/// Every specialised variant, most specialised first within an operation: the dispatcher
/// takes the first whose dtype and rank range match; the tests run every one that
/// [`Variant::supports`] a case, forced, against the same reference.
pub const VARIANTS: &[Variant] = &[
    Variant {
        op: Op::Norm,
        prefix: "dora_norm_v2",
        version: 2,
        dtypes: MMA,
        min_rank: 16,
        max_rank: MAX_RANK,
        rank_tile: 0,
        mixed: false,
    },
    Variant {
        op: Op::Norm,
        prefix: "dora_norm_v1",
        version: 1,
        dtypes: ALL,
        min_rank: 1,
        max_rank: MAX_RANK,
        rank_tile: 0,
        mixed: true,
    },
    Variant {
        op: Op::Tn,
        prefix: "dora_tn_r16",
        version: 1,
        dtypes: ALL,
        min_rank: 1,
        max_rank: 16,
        rank_tile: 16,
        mixed: false,
    },
    Variant {
        op: Op::Tn,
        prefix: "dora_tn_r64",
        version: 1,
        dtypes: ALL,
        min_rank: 17,
        max_rank: MAX_RANK,
        rank_tile: 64,
        mixed: false,
    },
];

/// The variant the dispatcher uses for `op` with activations in `act`, adapters in
/// `adapter`, at rank `r`: the first in [`VARIANTS`] that supports the pair and whose
/// preferred rank range holds `r`, falling back to any that supports it.
pub fn select(op: Op, act: DType, adapter: DType, r: usize) -> Option<&'static Variant> {
    let ok = |v: &&Variant| v.op == op && v.supports(act, adapter, r);
    VARIANTS
        .iter()
        .filter(ok)
        .find(|v| (v.min_rank..=v.max_rank).contains(&r))
        .or_else(|| VARIANTS.iter().find(ok))
}

/// Every variant of `op` that can run the pair at rank `r` (for tests that force each one).
pub fn candidates(op: Op, act: DType, adapter: DType, r: usize) -> Vec<&'static Variant> {
    VARIANTS
        .iter()
        .filter(|v| v.op == op && v.supports(act, adapter, r))
        .collect()
}

/// The dtype-stamped kernels with one variant each: `(prefix, stamped for, also for f32
/// adapters beside 16-bit activations)`.
pub const SINGLE: &[(&str, &[DType], bool)] = &[
    ("dora_merge", ALL, true),
    ("dora_merge_f32out", ALL, true),
    ("dora_shrink", ALL, true),
    ("dora_compose", ALL, true),
    ("dora_bwd_dz", ALL, true),
    ("dora_scale_rows", ALL, false),
];

/// Kernels with one f32 entry point regardless of the layer dtype.
pub const F32_ONLY: &[&str] = &["dora_mag_reduce_f32", "dora_sum_partials_f32"];

/// Every entry point the dispatcher may launch, derived from [`VARIANTS`], [`SINGLE`] and
/// [`F32_ONLY`]; a test checks it equals `KERNELS`.
pub fn all_entries() -> Vec<String> {
    let mut out = Vec::new();
    let pairs = |ds: &[DType], mixed: bool| -> Vec<String> {
        let mut v: Vec<String> = ds.iter().map(|d| d.name().to_string()).collect();
        if mixed {
            v.extend(
                ds.iter()
                    .filter(|&&d| d != DType::F32)
                    .map(|d| format!("{d}_a32")),
            );
        }
        v
    };
    for v in VARIANTS {
        out.extend(
            pairs(v.dtypes, v.mixed)
                .into_iter()
                .map(|s| format!("{}_{s}", v.prefix)),
        );
    }
    for (p, ds, mixed) in SINGLE {
        out.extend(pairs(ds, *mixed).into_iter().map(|s| format!("{p}_{s}")));
    }
    out.extend(F32_ONLY.iter().map(|s| s.to_string()));
    out
}

/// Tiles of the one-pass backward (`bwd_dz`): tokens per block `tt` and columns per chunk
/// `jt`, chosen per rank so that its dynamic shared memory (see [`bwd_dz_shared_bytes`])
/// stays within [`MAX_DYNAMIC_SHARED`] without an opt-in.
pub fn bwd_dz_tiles(r: usize) -> (usize, usize) {
    match r {
        0..=128 => (16, 32),
        _ => (8, 16),
    }
}

/// Dynamic shared bytes of `bwd_dz` at (tt, jt, r): U rows, dz·B accumulators, B chunk
/// (padded), dz and dy⊙z chunks (padded), all f32.
pub const fn bwd_dz_shared_bytes(tt: usize, jt: usize, r: usize) -> usize {
    4 * (2 * tt * r + jt * (r + 1) + 2 * tt * (jt + 1))
}

/// Dynamic shared bytes of norm v1 / merge: the block's B rows in f32.
pub const fn vtile_shared_bytes(r: usize) -> usize {
    4 * VT_ROWS * r
}

/// Rank padded to the mma k-step (16).
pub const fn pad16(r: usize) -> usize {
    r.div_ceil(16) * 16
}

/// Rank chunk of norm v2 (`df::NT_RK`).
pub const NT_RK: usize = 32;

/// Dynamic shared bytes of norm v2, 16-bit elements: B rows `[64, rp + 8]`, one rank chunk
/// of A `[32, 64 + 8]` and the W0 tile `[64, 64 + 8]`.
pub const fn norm_v2_shared_bytes(r: usize) -> usize {
    let rp = pad16(r);
    2 * (NT_ROWS * (rp + 8) + NT_RK * (NT_COLS + 8) + NT_ROWS * (NT_COLS + 8))
}

// Constants that must agree, checked when the crate compiles.
const _: () = assert!(bwd_dz_shared_bytes(16, 32, 128) <= MAX_DYNAMIC_SHARED);
const _: () = assert!(bwd_dz_shared_bytes(8, 16, MAX_RANK) <= MAX_DYNAMIC_SHARED);
const _: () = assert!(vtile_shared_bytes(MAX_RANK) <= MAX_DYNAMIC_SHARED);
const _: () = assert!(norm_v2_shared_bytes(MAX_RANK) <= MAX_DYNAMIC_SHARED);
const _: () = assert!(THREADS as usize % 32 == 0 && THREADS as usize % CO_COLS == 0);
const _: () = assert!(THREADS as usize % SH_RANKS == 0 && THREADS as usize % TN_COLS == 0);
